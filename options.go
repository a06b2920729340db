package esker

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/internal/keyring"
)

// Guarantee is the processing guarantee of a node's write path.
type Guarantee int

const (
	// ExactlyOnce commits events, changelog records and consumer offsets in
	// one Kafka transaction per batch (the default).
	ExactlyOnce Guarantee = iota
	// AtLeastOnce runs the same loop without transactions: after a crash a
	// command may be processed twice (command-id idempotency still
	// suppresses duplicates of commands whose outcome reached the store).
	AtLeastOnce
)

func (g Guarantee) String() string {
	if g == AtLeastOnce {
		return "at-least-once"
	}
	return "exactly-once"
}

// Option configures a Node, in the style of kgo.Opt.
type Option func(*config)

type config struct {
	brokers           []string
	appID             string
	stateDir          string
	httpListen        string
	httpListener      net.Listener
	advertisedURL     string
	guarantee         Guarantee
	commitInterval    time.Duration
	partitions        int32
	replicationFactor int16
	idempotencyWindow time.Duration
	commandTimeout    time.Duration
	maxBodyBytes      int64
	commandRetention  time.Duration
	logger            *slog.Logger
	kafkaOpts         []kgo.Opt
	sessionTimeout    time.Duration
	instanceID        string
	standbys          int
	stateCleanupDelay time.Duration
	masterKeys        []keyring.MasterKey
	masterKeyErr      error

	// Security (security.go).
	clusterToken   string
	apiTokens      []string
	protectMetrics bool
	ratePerSecond  float64
	rateBurst      int
	rateSet        bool
	saslMechanism  string
	saslUser       string
	saslPassword   string
	kafkaTLS       *tls.Config
	httpTLS        *tls.Config
	peerTLS        *tls.Config
}

func defaultConfig() config {
	return config{
		appID:             "esker",
		stateDir:          "esker-state",
		httpListen:        "127.0.0.1:8080",
		guarantee:         ExactlyOnce,
		commitInterval:    100 * time.Millisecond,
		partitions:        8,
		replicationFactor: -1,
		idempotencyWindow: 24 * time.Hour,
		commandTimeout:    5 * time.Second,
		maxBodyBytes:      1 << 20,
		commandRetention:  7 * 24 * time.Hour,
		logger:            slog.Default(),
		sessionTimeout:    10 * time.Second,
		stateCleanupDelay: 10 * time.Minute,
	}
}

// Brokers sets the Kafka seed brokers (host:port). Required.
func Brokers(brokers ...string) Option { return func(c *config) { c.brokers = brokers } }

// ApplicationID names the application: it is the consumer group and the
// prefix of its changelog topics ("<app>-<type>-changelog"). Every replica of
// one service uses the same id. Default "esker".
func ApplicationID(id string) Option { return func(c *config) { c.appID = id } }

// StateDir is the directory of the node's local state store. Keeping it
// across restarts means a restart restores only the changelog tail; a fresh
// directory restores everything from the changelogs. Default "esker-state".
func StateDir(dir string) Option { return func(c *config) { c.stateDir = dir } }

// HTTPListen is the address the HTTP API listens on; "" disables the
// listener (Node.Handler still serves). Default "127.0.0.1:8080".
func HTTPListen(addr string) Option { return func(c *config) { c.httpListen = addr } }

// HTTPListener makes the HTTP API serve on ln, a listener the caller opened
// (port 0, socket activation), instead of listening on HTTPListen. Run
// closes it when it returns, also when it fails to start (but not when it
// refuses to: called twice, or with nothing registered). The default
// advertised URL is then http:// (or https://) plus ln's address.
func HTTPListener(ln net.Listener) Option {
	return func(c *config) { c.httpListener, c.httpListen = ln, ln.Addr().String() }
}

// AdvertisedURL is the base URL other nodes and clients use to reach this
// node's HTTP API. Default: http:// plus the listen address (https:// with
// HTTPTLS).
func AdvertisedURL(u string) Option { return func(c *config) { c.advertisedURL = u } }

// ProcessingGuarantee selects ExactlyOnce (default) or AtLeastOnce.
func ProcessingGuarantee(g Guarantee) Option { return func(c *config) { c.guarantee = g } }

// CommitInterval caps how long one transaction may collect commands. It is
// not a wait: a transaction commits as soon as no more commands are buffered,
// so a lone command is answered in milliseconds. Default 100ms.
func CommitInterval(d time.Duration) Option { return func(c *config) { c.commitInterval = d } }

// Partitions is the partition count used when creating topics, and the count
// every existing topic of the node must have. Default 8.
func Partitions(n int32) Option { return func(c *config) { c.partitions = n } }

// ReplicationFactor for topics the node creates; -1 (default) uses the
// broker's default.
func ReplicationFactor(n int16) Option { return func(c *config) { c.replicationFactor = n } }

// IdempotencyWindow is how long a command id is remembered: a command with a
// remembered id returns its first outcome and writes nothing. Default 24h.
func IdempotencyWindow(d time.Duration) Option { return func(c *config) { c.idempotencyWindow = d } }

// CommandTimeout bounds how long Submit (and POST) waits for a command's
// outcome before answering that it is unknown. Default 5s.
func CommandTimeout(d time.Duration) Option { return func(c *config) { c.commandTimeout = d } }

// MaxBodyBytes limits HTTP request bodies: a longer body is answered 413.
// Default 1 MiB.
func MaxBodyBytes(n int64) Option { return func(c *config) { c.maxBodyBytes = n } }

// CommandRetention is retention.ms for "<type>-commands" topics the node
// creates. Default 7 days.
func CommandRetention(d time.Duration) Option { return func(c *config) { c.commandRetention = d } }

// Logger sets the structured logger. Default slog.Default().
func Logger(l *slog.Logger) Option { return func(c *config) { c.logger = l } }

// KafkaOptions adds franz-go client options (TLS, SASL, timeouts) to every
// client the node creates.
func KafkaOptions(opts ...kgo.Opt) Option {
	return func(c *config) { c.kafkaOpts = append(c.kafkaOpts, opts...) }
}

// SessionTimeout is the consumer group session timeout: how long a dead
// node keeps its partitions before the group moves them. Default 10s.
func SessionTimeout(d time.Duration) Option { return func(c *config) { c.sessionTimeout = d } }

// StandbyReplicas keeps n standby copies of every partition's state on
// other nodes (never on its active owner): they tail the changelogs, so when
// the owner fails the node that takes over restores only the last records.
// Default 0; capped by the node count minus one.
func StandbyReplicas(n int) Option { return func(c *config) { c.standbys = n } }

// StateCleanupDelay is how long a node keeps the local state of a partition
// it no longer owns or keeps a standby copy of (after a rebalance moved it
// away) before deleting it. While kept, the state makes the partition's
// return cheap: its restore reads only the tail, and the group balancer
// prefers this node for it. 0 or less keeps such state until the partition
// returns. Default 10 minutes.
func StateCleanupDelay(d time.Duration) Option { return func(c *config) { c.stateCleanupDelay = d } }

// InstanceID names this node within the application. The node's Kafka
// transactional id is "<app>-<instance id>": it must be distinct between
// nodes (two nodes with one id fence each other, and the node that loses
// stops with an error) and stable across a node's restarts, so that a
// restarted node fences its previous incarnation's open transaction at once.
// Default: a hash of the advertised URL, the absolute state directory and the
// host name.
func InstanceID(id string) Option { return func(c *config) { c.instanceID = id } }

// MasterKey adds a master key: 32 random bytes and an id that wrapped data
// keys record. Nodes need one to run aggregate types with personal fields
// (tagged esker:"pii"; see package aggregate): each entity's personal data is
// sealed with its own data key, and the master key wraps those keys in the
// "<app>-keys" topic. The first master key given wraps new data keys; later
// ones only open keys wrapped before a rotation, so rotating is: put the new
// key first and keep the old one until no key it wraps is left. Every node
// of an application needs the same master keys. Losing them loses every
// entity's personal data; keep them in a secret store, not next to Kafka.
func MasterKey(id string, key []byte) Option {
	return func(c *config) {
		c.masterKeys = append(c.masterKeys, keyring.MasterKey{ID: id, Key: bytes.Clone(key)})
	}
}

// MasterKeyFile reads master keys from a file (see MasterKey), one per line
// as "<id>:<base64 of 32 bytes>"; the first line is the current key, empty
// lines and lines starting with # are skipped. A file that cannot be read
// or parsed makes the node refuse to start with a message naming the line.
func MasterKeyFile(path string) Option {
	return func(c *config) {
		keys, err := keyring.ReadMasterKeys(path)
		if err != nil {
			c.masterKeyErr = err
			return
		}
		c.masterKeys = append(c.masterKeys, keys...)
	}
}

func (c *config) validate() error {
	if c.masterKeyErr != nil {
		return c.masterKeyErr
	}
	if len(c.brokers) == 0 {
		return fmt.Errorf("esker: no brokers: pass esker.Brokers(\"host:9092\")")
	}
	if !namePattern(c.appID) {
		return fmt.Errorf("esker: invalid application id %q: use letters, digits, '.', '_' and '-'", c.appID)
	}
	if c.commitInterval <= 0 {
		return fmt.Errorf("esker: commit interval must be positive, got %v", c.commitInterval)
	}
	if c.partitions < 1 {
		return fmt.Errorf("esker: partitions must be at least 1, got %d", c.partitions)
	}
	if c.standbys < 0 {
		return fmt.Errorf("esker: standby replicas must be 0 or more, got %d", c.standbys)
	}
	if c.commandTimeout <= 0 || c.maxBodyBytes <= 0 || c.idempotencyWindow <= 0 {
		return fmt.Errorf("esker: command timeout, body limit and idempotency window must be positive")
	}
	if err := c.validateSecurity(); err != nil {
		return err
	}
	if c.advertisedURL == "" {
		c.advertisedURL = "http://" + c.httpListen
		if c.httpTLS != nil {
			c.advertisedURL = "https://" + c.httpListen
		}
	}
	if _, err := url.Parse(c.advertisedURL); err != nil {
		return fmt.Errorf("esker: advertised URL: %w", err)
	}
	if c.instanceID == "" {
		// Stable across restarts of the same node, distinct between nodes:
		// on one host nodes differ by state directory, across hosts (and
		// containers) by host name or advertised URL.
		dir, err := filepath.Abs(c.stateDir)
		if err != nil {
			return fmt.Errorf("esker: state directory: %w", err)
		}
		host, _ := os.Hostname() // containers share paths and listen addresses, not host names
		sum := sha256.Sum256([]byte(c.advertisedURL + "\x00" + dir + "\x00" + host))
		c.instanceID = hex.EncodeToString(sum[:8])
	}
	return nil
}

func namePattern(s string) bool {
	if s == "" || len(s) > 200 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}
