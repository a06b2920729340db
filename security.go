package esker

// Security options of a Node: the cluster token that authenticates
// forwarding between nodes, bearer tokens and a rate limit on the HTTP API,
// and SASL and TLS for every Kafka client the node makes.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl"
	"github.com/twmb/franz-go/pkg/sasl/plain"
	"github.com/twmb/franz-go/pkg/sasl/scram"
)

// ClusterToken is the secret every node of the application shares to
// authenticate the requests they forward to each other (see
// interactive.ClusterToken): a request that claims to be forwarded is
// refused with 401 without a proof and 403 with a wrong one, before it
// reads any state or produces any command. Every node must have the same
// token. Without one the node logs a warning at start: any client that can
// reach a node can then pose as another node.
func ClusterToken(secret string) Option { return func(c *config) { c.clusterToken = secret } }

// APITokens makes the HTTP API under /v1/ require "Authorization: Bearer
// <token>" with one of tokens (401 otherwise; see interactive.APITokens).
// /healthz, /readyz and /metrics (unless ProtectMetrics) stay open.
// Requests forwarded by another node with the ClusterToken need no bearer
// token: the node that received them checked it.
func APITokens(tokens ...string) Option {
	return func(c *config) { c.apiTokens = append(c.apiTokens, tokens...) }
}

// ProtectMetrics makes /metrics require a bearer token too (with
// APITokens).
func ProtectMetrics() Option { return func(c *config) { c.protectMetrics = true } }

// RateLimit limits each HTTP client (its bearer token, else its IP address)
// to perSecond requests under /v1/ on average with bursts of burst: a
// request over the limit is answered 429 with Retry-After. Requests
// forwarded by nodes authenticated with the ClusterToken are not counted
// again. NewNode fails on perSecond ≤ 0 or burst < 1.
func RateLimit(perSecond float64, burst int) Option {
	return func(c *config) { c.ratePerSecond, c.rateBurst, c.rateSet = perSecond, burst, true }
}

// SASL mechanisms for KafkaSASL.
const (
	SASLPlain       = "PLAIN"
	SASLScramSHA256 = "SCRAM-SHA-256"
	SASLScramSHA512 = "SCRAM-SHA-512"
)

// KafkaSASL authenticates every Kafka client of the node (engine, admin,
// standbys, side effects, sinks, event streams) with SASL: mechanism is
// SASLScramSHA256, SASLScramSHA512 or SASLPlain (case does not matter).
// NewNode fails on another mechanism or an empty user. When the brokers
// refuse the credentials, Run returns an error naming the user at once. The
// password is never logged.
func KafkaSASL(mechanism, user, password string) Option {
	return func(c *config) {
		c.saslMechanism, c.saslUser, c.saslPassword = strings.ToUpper(mechanism), user, password
	}
}

// KafkaTLS makes every Kafka client of the node connect with TLS using cfg
// (a nil cfg uses the system's roots). When the handshake fails (unknown
// authority, say), Run returns an error at once.
func KafkaTLS(cfg *tls.Config) Option {
	return func(c *config) {
		if cfg == nil {
			cfg = &tls.Config{}
		}
		c.kafkaTLS = cfg
	}
}

// saslMech returns the franz-go mechanism of the configuration, or nil.
func (c *config) saslMech() (sasl.Mechanism, error) {
	switch c.saslMechanism {
	case "":
		return nil, nil
	case SASLPlain:
		return plain.Auth{User: c.saslUser, Pass: c.saslPassword}.AsMechanism(), nil
	case SASLScramSHA256:
		return scram.Auth{User: c.saslUser, Pass: c.saslPassword}.AsSha256Mechanism(), nil
	case SASLScramSHA512:
		return scram.Auth{User: c.saslUser, Pass: c.saslPassword}.AsSha512Mechanism(), nil
	}
	return nil, fmt.Errorf("esker: unknown Kafka SASL mechanism %q: use %s, %s or %s", c.saslMechanism, SASLScramSHA256, SASLScramSHA512, SASLPlain)
}

// validateSecurity checks the security options and adds the Kafka ones to
// the client options.
func (c *config) validateSecurity() error {
	if c.rateSet && (c.ratePerSecond <= 0 || c.rateBurst < 1) {
		return fmt.Errorf("esker: rate limit must be positive with a burst of at least 1, got %v per second, burst %d", c.ratePerSecond, c.rateBurst)
	}
	mech, err := c.saslMech()
	if err != nil {
		return err
	}
	if mech != nil {
		if c.saslUser == "" {
			return errors.New("esker: Kafka SASL needs a user")
		}
		c.kafkaOpts = append(c.kafkaOpts, kgo.SASL(mech))
	}
	if c.kafkaTLS != nil {
		c.kafkaOpts = append(c.kafkaOpts, kgo.DialTLSConfig(c.kafkaTLS.Clone()))
	}
	return nil
}

// kafkaPreflight connects to the brokers once before the node starts, so
// that refused credentials or a failed TLS handshake stop Run at once with
// a clear error instead of leaving the clients retrying. Brokers that are
// merely unreachable are not an error here (the node waits for them, as
// before); the check then gives up once every seed broker was tried, within
// 10 seconds (ping). A broker that accepts the connection and closes it
// during the handshake (some brokers answer bad credentials so) is asked
// three times before that counts as a refusal.
func (c *config) kafkaPreflight(ctx context.Context, clientOpts []kgo.Opt) error {
	var err error
	for attempt := range 3 {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(500 * time.Millisecond):
			}
		}
		err = ping(ctx, clientOpts)
		if err == nil {
			return nil
		}
		if desc := c.describeKafkaAuthError(err); desc != "" {
			return errors.New("esker: kafka: " + desc)
		}
		if !closedDuringHandshake(err) {
			break
		}
	}
	var firstRead *kgo.ErrFirstReadEOF
	if errors.As(err, &firstRead) {
		// Closed before authentication: its message says what is likely
		// missing (TLS, SASL).
		return fmt.Errorf("esker: kafka: the brokers closed the connection at once: %v", err)
	}
	if closedDuringHandshake(err) {
		if c.saslMechanism != "" {
			return fmt.Errorf("esker: kafka: SASL authentication failed for user %q (mechanism %s): the brokers closed the connection during authentication (%v); check the user, password and mechanism", c.saslUser, c.saslMechanism, err)
		}
		return fmt.Errorf("esker: kafka: the brokers closed the connection at once: they may require SASL or TLS (%v)", err)
	}
	c.logger.Warn("esker: kafka brokers not reachable yet; the node keeps trying", "brokers", c.brokers, "err", err)
	return nil
}

// ping connects a client with clientOpts and asks a broker for metadata.
func ping(ctx context.Context, clientOpts []kgo.Opt) error {
	cl, err := kgo.NewClient(clientOpts...)
	if err != nil {
		return fmt.Errorf("kafka client: %w", err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return cl.Ping(ctx)
}

// closedDuringHandshake reports whether err is a broker closing the
// connection right after it was opened.
func closedDuringHandshake(err error) bool {
	var firstRead *kgo.ErrFirstReadEOF
	return errors.As(err, &firstRead) || errors.Is(err, io.EOF)
}

// describeKafkaAuthError describes err when it is an authentication or TLS
// failure, else returns "".
func (c *config) describeKafkaAuthError(err error) string {
	var tlsRecord tls.RecordHeaderError
	var certErr *tls.CertificateVerificationError
	var opErr *net.OpError
	switch {
	case errors.Is(err, kerr.SaslAuthenticationFailed), errors.Is(err, kerr.IllegalSaslState),
		errors.Is(err, kerr.UnsupportedSaslMechanism), errors.Is(err, kerr.ClusterAuthorizationFailed):
		if c.saslMechanism == "" {
			return fmt.Sprintf("the brokers require authentication (configure SASL): %v", err)
		}
		return fmt.Sprintf("SASL authentication failed for user %q (mechanism %s): %v", c.saslUser, c.saslMechanism, err)
	case errors.As(err, &certErr):
		return fmt.Sprintf("TLS handshake with the brokers failed: %v", err)
	case errors.As(err, &tlsRecord):
		return fmt.Sprintf("TLS handshake with the brokers failed (do they speak TLS?): %v", err)
	case errors.As(err, &opErr) && opErr.Op == "remote error":
		return fmt.Sprintf("TLS handshake with the brokers failed: %v", err)
	}
	return ""
}
