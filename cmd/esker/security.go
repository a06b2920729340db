package main

import (
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"os"
	"strings"

	"github.com/esker-io/esker"
)

// Environment variables read when the matching flag is not given; prefer
// them for secrets, which command lines show to every user of the machine.
const (
	envClusterToken  = "ESKER_CLUSTER_TOKEN"
	envAPIToken      = "ESKER_API_TOKEN"
	envKafkaPassword = "ESKER_KAFKA_PASSWORD"
)

// httpSecurityFlags are the flags of the HTTP API's security and limits.
type httpSecurityFlags struct {
	clusterToken   *string
	apiTokens      *string
	protectMetrics *bool
	rateLimit      *float64
	rateBurst      *int
	maxBodyBytes   *int64
}

func addHTTPSecurityFlags(fs *flagSet) *httpSecurityFlags {
	return &httpSecurityFlags{
		clusterToken:   fs.String("cluster-token", "", "shared `secret` that authenticates requests the nodes forward to each other; the same on every node (default $"+envClusterToken+"; without one, forwarding is unauthenticated; esker dev generates one for its nodes)"),
		apiTokens:      fs.String("api-token", "", "comma-separated bearer `tokens`: every /v1/ request then needs Authorization: Bearer <token> (default $"+envAPIToken+"; none: the API is open)"),
		protectMetrics: fs.Bool("protect-metrics", false, "require a bearer token on /metrics too (with --api-token)"),
		rateLimit:      fs.Float64("rate-limit", 0, "`requests` per second each client (bearer token, else IP) may send to /v1/ on average; over it: 429 (0: no limit)"),
		rateBurst:      fs.Int("rate-burst", 0, "`requests` a client may send at once under --rate-limit (default: twice the rate, at least 1)"),
		maxBodyBytes:   fs.Int64("max-body-bytes", 1<<20, "largest request body in `bytes`; a longer one is answered 413"),
	}
}

// hasClusterToken reports whether a cluster token was given.
func (f *httpSecurityFlags) hasClusterToken() bool {
	return firstSet(*f.clusterToken, os.Getenv(envClusterToken)) != ""
}

// randomToken returns 32 random bytes in hex.
func randomToken() string {
	var b [32]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand.Read panics instead)
	return hex.EncodeToString(b[:])
}

// options returns the node options of the flags, or a message for the user.
func (f *httpSecurityFlags) options() ([]esker.Option, string) {
	var opts []esker.Option
	if tok := firstSet(*f.clusterToken, os.Getenv(envClusterToken)); tok != "" {
		opts = append(opts, esker.ClusterToken(tok))
	}
	if toks := splitList(firstSet(*f.apiTokens, os.Getenv(envAPIToken))); len(toks) > 0 {
		opts = append(opts, esker.APITokens(toks...))
	}
	if *f.protectMetrics {
		opts = append(opts, esker.ProtectMetrics())
	}
	if *f.rateLimit < 0 || *f.rateBurst < 0 {
		return nil, "--rate-limit and --rate-burst must not be negative"
	}
	if *f.rateLimit > 0 {
		burst := *f.rateBurst
		if burst == 0 {
			burst = max(int(2**f.rateLimit), 1)
		}
		opts = append(opts, esker.RateLimit(*f.rateLimit, burst))
	}
	if *f.maxBodyBytes <= 0 {
		return nil, fmt.Sprintf("--max-body-bytes must be positive, got %d", *f.maxBodyBytes)
	}
	return append(opts, esker.MaxBodyBytes(*f.maxBodyBytes)), ""
}

// kafkaSecurityFlags are the flags of SASL and TLS towards Kafka.
type kafkaSecurityFlags struct {
	mechanism, user, password *string
	tls                       *bool
	ca                        *string
}

func addKafkaSecurityFlags(fs *flagSet) *kafkaSecurityFlags {
	return &kafkaSecurityFlags{
		mechanism: fs.String("kafka-sasl-mechanism", "", "SASL `mechanism` towards Kafka: SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN (none when empty)"),
		user:      fs.String("kafka-user", "", "SASL `user` towards Kafka"),
		password:  fs.String("kafka-password", "", "SASL `password` towards Kafka (prefer $"+envKafkaPassword+": command lines are visible to other users)"),
		tls:       fs.Bool("kafka-tls", false, "connect to Kafka with TLS (system roots, or --kafka-ca)"),
		ca:        fs.String("kafka-ca", "", "PEM `file` of the certificate authorities that sign the brokers' certificates (implies --kafka-tls)"),
	}
}

// options returns the node options of the flags, or a message for the user.
func (f *kafkaSecurityFlags) options() ([]esker.Option, string) {
	var opts []esker.Option
	password := firstSet(*f.password, os.Getenv(envKafkaPassword))
	switch {
	case *f.mechanism != "":
		if *f.user == "" {
			return nil, "--kafka-sasl-mechanism needs --kafka-user"
		}
		opts = append(opts, esker.KafkaSASL(*f.mechanism, *f.user, password))
	case *f.user != "" || password != "":
		return nil, "--kafka-user and --kafka-password need --kafka-sasl-mechanism (SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN)"
	}
	if *f.tls || *f.ca != "" {
		cfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if *f.ca != "" {
			pool, msg := readCAFile("--kafka-ca", *f.ca)
			if msg != "" {
				return nil, msg
			}
			cfg.RootCAs = pool
		}
		opts = append(opts, esker.KafkaTLS(cfg))
	}
	return opts, ""
}

func firstSet(vals ...string) string {
	for _, v := range vals {
		if v != "" {
			return v
		}
	}
	return ""
}

func splitList(s string) []string {
	var out []string
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return out
}
