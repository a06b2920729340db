package esker

// Security options of a Node: the cluster token and mutual TLS that
// authenticate forwarding between nodes, TLS, bearer tokens and a rate
// limit on the HTTP API, and SASL and TLS for every Kafka client the node
// makes (and for tools that talk to the same cluster: KafkaClientOpts,
// PingKafka).

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
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

// HTTPTLS makes the node serve its HTTP API (HTTPListen) over TLS with cfg,
// which must hold the node's certificate (Certificates, GetCertificate or
// GetConfigForClient). The default advertised URL becomes https://; an
// explicit AdvertisedURL must be https. The other nodes then need PeerTLS
// to verify this node's certificate, unless it chains to the system's roots.
//
// Mutual TLS between nodes: with cfg.ClientCAs set (an authority that signs
// only the nodes' certificates) and cfg.ClientAuth
// tls.VerifyClientCertIfGiven, a request that claims to be forwarded by
// another node is refused (401) unless it carries a client certificate that
// verifies against ClientCAs; other clients still connect without one.
// tls.RequireAndVerifyClientCert asks every client for a certificate,
// probes included. The node then needs PeerTLS with its own certificate to
// present. NewNode refuses ClientCAs with a ClientAuth that verifies
// nothing (every forward would be refused), a verifying ClientAuth without
// ClientCAs (any publicly trusted certificate would pass for a node), and
// mutual TLS without a certificate in PeerTLS. A GetConfigForClient must
// return configurations with the same ClientCAs. With HTTPListen("") serve
// Node.Handler with the same configuration: the handler still asks forwards
// for a verified certificate.
func HTTPTLS(cfg *tls.Config) Option { return func(c *config) { c.httpTLS = cfg } }

// PeerTLS sets the TLS configuration the node uses to forward requests to
// other nodes (commands, reads, projection rows and watches for partitions
// it does not own): RootCAs to verify their certificates and Certificates,
// this node's client certificate, for mutual TLS (see HTTPTLS). The nodes
// must advertise https URLs. Without it, https peers are verified against
// the system's roots and no client certificate is sent.
func PeerTLS(cfg *tls.Config) Option { return func(c *config) { c.peerTLS = cfg } }

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
	if err := c.validateHTTPTLS(); err != nil {
		return err
	}
	return c.validateKafkaSecurity()
}

// validateHTTPTLS checks HTTPTLS: a certificate to serve; client
// certificates verified against ClientCAs, or not at all; for mutual TLS a
// certificate to present to the other nodes (PeerTLS); and an https
// advertised URL.
func (c *config) validateHTTPTLS() error {
	t := c.httpTLS
	if t == nil {
		return nil
	}
	if len(t.Certificates) == 0 && t.GetCertificate == nil && t.GetConfigForClient == nil {
		return errors.New("esker: HTTPTLS needs the node's certificate (tls.Config.Certificates or GetCertificate)")
	}
	verifies := t.ClientAuth == tls.VerifyClientCertIfGiven || t.ClientAuth == tls.RequireAndVerifyClientCert
	switch {
	case t.ClientCAs != nil && !verifies:
		return fmt.Errorf("esker: HTTPTLS has ClientCAs but ClientAuth %v does not verify client certificates: use tls.VerifyClientCertIfGiven for mutual TLS between nodes", t.ClientAuth)
	case t.ClientCAs == nil && verifies:
		// Go would verify against the system's roots: any publicly
		// trusted certificate would then pass for a node.
		return fmt.Errorf("esker: HTTPTLS verifies client certificates (ClientAuth %v) but has no ClientCAs: set ClientCAs to the authority that signs only the nodes' certificates", t.ClientAuth)
	case verifies && (c.peerTLS == nil || len(c.peerTLS.Certificates) == 0 && c.peerTLS.GetClientCertificate == nil):
		return errors.New("esker: HTTPTLS asks forwards for a client certificate, but PeerTLS gives this node none to present: every node it forwards to would refuse it")
	}
	if c.advertisedURL != "" {
		if u, err := url.Parse(c.advertisedURL); err == nil && u.Scheme != "https" {
			return fmt.Errorf("esker: the node serves HTTPS (HTTPTLS) but advertises %s: the other nodes would send it plain HTTP", c.advertisedURL)
		}
	}
	return nil
}

// verifiesPeers reports whether the HTTP API verifies client certificates
// against the nodes' authority, which then authenticate forwarded requests
// (HTTPTLS; validateHTTPTLS has checked that ClientCAs come with it).
func (c *config) verifiesPeers() bool {
	return c.httpTLS != nil && c.httpTLS.ClientCAs != nil &&
		(c.httpTLS.ClientAuth == tls.VerifyClientCertIfGiven || c.httpTLS.ClientAuth == tls.RequireAndVerifyClientCert)
}

// validateKafkaSecurity checks the SASL and TLS options and adds them to
// the client options.
func (c *config) validateKafkaSecurity() error {
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

// KafkaClientOpts returns the franz-go client options of the Kafka
// connection that opts describe, as a node built with them connects: the
// Brokers as seed brokers, then KafkaSASL, KafkaTLS and KafkaOptions. It is
// for tools that talk to the same cluster as a node (esker inspect, esker
// dlq); options that do not concern the connection are ignored. It checks
// them as NewNode does and returns an error (and no options) on no brokers,
// an unknown SASL mechanism or SASL without a user. Nothing connects.
func KafkaClientOpts(opts ...Option) ([]kgo.Opt, error) {
	c, err := kafkaConfig(opts)
	if err != nil {
		return nil, err
	}
	return c.clientOpts(), nil
}

// PingKafka connects to the Kafka cluster that opts describe (see
// KafkaClientOpts) and asks a broker for metadata, as a node does before it
// starts, so that a tool learns at once why it cannot use the cluster. It
// returns KafkaClientOpts' error on invalid options; an error wrapping
// ErrKafkaRefused and naming the cause (`esker: kafka: SASL authentication
// failed for user "bank" ...`, a failed TLS handshake, a connection closed
// at once) when the brokers refuse the connection; and the franz-go
// client's error when no broker answers before ctx is done. A broker that
// closes the connection during the handshake is asked three times before
// that counts as a refusal. The password is never in the error.
func PingKafka(ctx context.Context, opts ...Option) error {
	c, err := kafkaConfig(opts)
	if err != nil {
		return err
	}
	refused, err := c.checkKafka(ctx, c.clientOpts(), 0)
	if refused != nil {
		return refused
	}
	return err
}

// ErrKafkaRefused is wrapped by the errors of Node.Run and PingKafka when
// the brokers refuse the connection: they reject the SASL credentials, the
// TLS handshake fails, or they close the connection at once (SASL or TLS
// missing). Retrying with the same options does not help.
var ErrKafkaRefused = errors.New("esker: kafka refused the connection")

// kafkaRefusal is an error of the brokers refusing the connection: its
// message names the cause; it wraps ErrKafkaRefused and the client's error.
type kafkaRefusal struct {
	msg string
	err error
}

func (e *kafkaRefusal) Error() string   { return e.msg }
func (e *kafkaRefusal) Unwrap() []error { return []error{ErrKafkaRefused, e.err} }

// kafkaConfig applies opts and checks the options of the Kafka connection.
func kafkaConfig(opts []Option) (*config, error) {
	c := defaultConfig()
	for _, o := range opts {
		o(&c)
	}
	if len(c.brokers) == 0 {
		return nil, errors.New("esker: no brokers: pass esker.Brokers(\"host:9092\")")
	}
	if err := c.validateKafkaSecurity(); err != nil {
		return nil, err
	}
	return &c, nil
}

// clientOpts returns the franz-go options of a validated configuration's
// Kafka connection, in a new slice.
func (c *config) clientOpts() []kgo.Opt {
	return append([]kgo.Opt{kgo.SeedBrokers(c.brokers...)}, c.kafkaOpts...)
}

// kafkaPreflight connects to the brokers once before the node starts, so
// that refused credentials or a failed TLS handshake stop Run at once with
// a clear error instead of leaving the clients retrying. Brokers that are
// merely unreachable are not an error here (the node waits for them, as
// before); the check then gives up once every seed broker was tried, within
// 10 seconds (ping).
func (c *config) kafkaPreflight(ctx context.Context, clientOpts []kgo.Opt) error {
	refused, err := c.checkKafka(ctx, clientOpts, 10*time.Second)
	if refused != nil {
		return refused
	}
	if err != nil && ctx.Err() == nil {
		c.logger.Warn("esker: kafka brokers not reachable yet; the node keeps trying", "brokers", c.brokers, "err", err)
	}
	return nil
}

// checkKafka pings the brokers with clientOpts, each attempt within
// timeout (0: only ctx bounds it). refused, wrapping ErrKafkaRefused, says
// why the brokers refused the connection; otherwise err is the last ping's
// error, nil when a broker answered. A broker that accepts the connection
// and closes it during the handshake (some brokers answer bad credentials
// so) is asked three times before that counts as a refusal.
func (c *config) checkKafka(ctx context.Context, clientOpts []kgo.Opt, timeout time.Duration) (refused, err error) {
	for attempt := range 3 {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(500 * time.Millisecond):
			}
		}
		err = ping(ctx, clientOpts, timeout)
		if err == nil {
			return nil, nil
		}
		if desc := c.describeKafkaAuthError(err); desc != "" {
			return &kafkaRefusal{msg: "esker: kafka: " + desc, err: err}, nil
		}
		if !closedDuringHandshake(err) {
			return nil, err
		}
	}
	var firstRead *kgo.ErrFirstReadEOF
	if errors.As(err, &firstRead) {
		// Closed before authentication: its message says what is likely
		// missing (TLS, SASL).
		return &kafkaRefusal{msg: fmt.Sprintf("esker: kafka: the brokers closed the connection at once: %v", err), err: err}, nil
	}
	if c.saslMechanism != "" {
		return &kafkaRefusal{msg: fmt.Sprintf("esker: kafka: SASL authentication failed for user %q (mechanism %s): the brokers closed the connection during authentication (%v); check the user, password and mechanism", c.saslUser, c.saslMechanism, err), err: err}, nil
	}
	return &kafkaRefusal{msg: fmt.Sprintf("esker: kafka: the brokers closed the connection at once: they may require SASL or TLS (%v)", err), err: err}, nil
}

// ping connects a client with clientOpts and asks a broker for metadata,
// within timeout unless it is 0.
func ping(ctx context.Context, clientOpts []kgo.Opt, timeout time.Duration) error {
	cl, err := kgo.NewClient(clientOpts...)
	if err != nil {
		return fmt.Errorf("kafka client: %w", err)
	}
	defer cl.Close()
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
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
