package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/internal/keyring"
	"github.com/esker-io/esker/projection/pgsink"
)

// nodeConfig is what the dev and node commands configure a bank node with.
type nodeConfig struct {
	brokers     []string
	app         string
	httpListen  string
	advertise   string // "" lets esker derive it from httpListen
	dataDir     string // the state store goes in dataDir/state (or dataDir/<stateName>)
	stateName   string
	partitions  int
	atLeastOnce bool
	// sessionTimeout is how long the group waits for a silent node before
	// moving its partitions (0: esker's default).
	sessionTimeout time.Duration
	standbys       int
	// stateCleanupDelay: 0 keeps the node's default.
	stateCleanupDelay time.Duration
	// alertsURL, when set, receives the bank's withdrawal alerts (a
	// side-effect consumer) for amounts of at least alertsThreshold cents.
	alertsURL       string
	alertsThreshold int64
	// postgres, when set, is the connection string of the database the
	// bank's accounts sink keeps its accounts table in.
	postgres string
	// masterKeys seal the bank's personal fields (the owner's name).
	masterKeys []keyring.MasterKey
	logger     *slog.Logger
	// security holds the options of the security and limit flags.
	security []esker.Option
}

// newBankNode returns a node running the whole bank demo (bank.AddTo).
func newBankNode(c nodeConfig) (*esker.Node, error) {
	opts := []esker.Option{
		esker.Brokers(c.brokers...),
		esker.ApplicationID(c.app),
		esker.StateDir(filepath.Join(c.dataDir, cmp.Or(c.stateName, "state"))),
		esker.HTTPListen(c.httpListen),
		esker.Partitions(int32(c.partitions)),
		esker.Logger(c.logger),
	}
	if c.advertise != "" {
		opts = append(opts, esker.AdvertisedURL(c.advertise))
	}
	if c.atLeastOnce {
		opts = append(opts, esker.ProcessingGuarantee(esker.AtLeastOnce))
	}
	if c.standbys > 0 {
		opts = append(opts, esker.StandbyReplicas(c.standbys))
	}
	if c.stateCleanupDelay != 0 {
		opts = append(opts, esker.StateCleanupDelay(c.stateCleanupDelay))
	}
	if c.sessionTimeout > 0 {
		opts = append(opts, esker.SessionTimeout(c.sessionTimeout))
	}
	for _, k := range c.masterKeys {
		opts = append(opts, esker.MasterKey(k.ID, k.Key))
	}
	node, err := esker.NewNode(append(opts, c.security...)...)
	if err != nil {
		return nil, err
	}
	if err := bank.AddTo(node); err != nil {
		return nil, err
	}
	if c.postgres != "" {
		sink, err := bank.AccountsSink(pgsink.ConnString(c.postgres))
		if err != nil {
			return nil, fmt.Errorf("--postgres: %w", err)
		}
		if err := node.AddConsumer(sink); err != nil {
			return nil, err
		}
	}
	if c.alertsURL != "" {
		alerts, err := bank.WithdrawalAlerts(c.alertsURL, c.alertsThreshold, nil)
		if err != nil {
			return nil, err
		}
		if err := node.AddConsumer(alerts); err != nil {
			return nil, err
		}
	}
	return node, nil
}

// runUntilDone runs the node until ctx is cancelled; a node that stops
// because of the cancellation is not an error.
func runUntilDone(ctx context.Context, node *esker.Node) error {
	err := node.Run(ctx)
	if err != nil && ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

func runNode(e *env, args []string) int {
	fs := newFlagSet("node", "esker node --brokers HOST:PORT[,HOST:PORT...] [flags]", `
Runs one node of the bank demo service against a Kafka cluster (any Kafka
2.5+ broker, or "esker kafka"): the account and transfer aggregate types,
the owners and daily-totals projections and the transfers reactor, plus the
withdrawal alerts with --alerts-url and the accounts table with --postgres.
Run several with the same --app and --brokers and different
--http/--advertise addresses: they share the partitions, and any node
answers any HTTP request by forwarding it to the node that owns the entity.

The node creates the topics it needs if they do not exist, each with
--partitions partitions: for each aggregate type T (account, transfer)
T-commands, T-events and <app>-T-changelog, the topics of the projections
and the reactor, and <app>-keys (the keys that seal the owners' names). Its
local state store is kept in DIR/state, so a restart only restores what
changed while it was down.

Commands are processed exactly once (one Kafka transaction per batch) unless
--at-least-once is given.`)
	fs.examples = `
esker node --brokers 127.0.0.1:9092
esker node --brokers kafka-1:9092,kafka-2:9092 --http :8080 --advertise http://node-1:8080 --data /var/lib/esker
esker node --brokers 127.0.0.1:9092 --http 127.0.0.1:8081 --data esker-data-2 --standby-replicas 1`
	brokers := fs.String("brokers", "", "comma-separated Kafka seed `brokers` (required)")
	httpListen := fs.String("http", "127.0.0.1:8080", "`address` the HTTP API listens on")
	advertise := fs.String("advertise", "", "base `URL` other nodes and clients reach this node's HTTP API at (default http://<--http address>; required when --http listens on all interfaces)")
	dataDir := fs.String("data", "esker-data", "data `directory`; the state store goes in DIR/state")
	app := fs.String("app", "bank", "application `id`: consumer group and changelog topic prefix, the same on every node")
	partitions := fs.Int("partitions", 8, "partition `count` of the topics the node creates (must match existing topics)")
	atLeastOnce := fs.Bool("at-least-once", false, "process commands at least once, without Kafka transactions")
	standbys := fs.Int("standby-replicas", 0, "standby `copies` of every partition's state kept on other nodes, for fail-over in about a second")
	sessionTimeout := fs.Duration("session-timeout", 10*time.Second, "consumer group session `timeout`: how long a node that stopped answering keeps its partitions")
	cleanupDelay := fs.Duration("state-cleanup-delay", 10*time.Minute, "`time` the node keeps the local state of a partition it no longer owns or keeps a standby of, before deleting it (0: keep it)")
	alertsURL := fs.String("alerts-url", "", "`URL` that receives a JSON POST for every withdrawal or outgoing transfer of at least --alerts-threshold (a side-effect consumer, at least once; none when empty)")
	alertsThreshold := fs.Int64("alerts-threshold", 100000, "smallest `amount` in cents that raises a withdrawal alert")
	postgres := fs.String("postgres", "", "PostgreSQL connection `URL` (e.g. postgres://user@host/db): keep the table accounts(id, owner, balance, version, updated_at) there, exactly once (none when empty)")
	masterKeyFile := fs.String("master-key-file", "", "`file` of master keys, one \"<id>:<base64 of 32 bytes>\" per line, the current one first (default: the key in $ESKER_MASTER_KEY); they wrap the keys that seal each account's personal data, and every node needs the same ones")
	httpSec := addHTTPSecurityFlags(fs)
	httpTLS := addHTTPTLSFlags(fs)
	kafkaSec := addKafkaSecurityFlags(fs)
	level := fs.logLevel()
	if code, ok := fs.parse(e, args); !ok {
		return code
	}
	if *alertsURL != "" {
		if msg := checkURL("--alerts-url", *alertsURL); msg != "" {
			return fs.fail(e, "%s", msg)
		}
	}
	security, msg := httpSec.options()
	if msg != "" {
		return fs.fail(e, "%s", msg)
	}
	kafkaOpts, msg := kafkaSec.options()
	if msg != "" {
		return fs.fail(e, "%s", msg)
	}
	security = append(security, kafkaOpts...)
	if *cleanupDelay == 0 {
		*cleanupDelay = -1 // 0 would mean "the default" below
	}
	seeds, err := parseBrokers(*brokers)
	if err != nil {
		return fs.fail(e, "%v", err)
	}
	if msg := checkCommon(*httpListen, *dataDir, *partitions); msg != "" {
		return fs.fail(e, "%s", msg)
	}
	scheme := "http"
	if httpTLS.enabled() {
		scheme = "https"
	}
	if *advertise != "" {
		if msg := checkAdvertise(*advertise); msg != "" {
			return fs.fail(e, "%s", msg)
		}
		// https on a plain node is fine: a proxy may terminate TLS for it.
		if u, _ := url.Parse(*advertise); scheme == "https" && u.Scheme != "https" {
			return fs.fail(e, "--advertise %s: the node serves https (--tls-cert), so advertise an https:// URL", *advertise)
		}
	} else if listensOnAllInterfaces(*httpListen) {
		return fs.fail(e, "--http %s listens on all interfaces: set --advertise to a URL other nodes can reach, e.g. %s://%s", *httpListen, scheme, exampleHost(*httpListen))
	}
	masterKeys, err := loadMasterKeys(*masterKeyFile, os.Getenv("ESKER_MASTER_KEY"))
	if err != nil {
		return fs.fail(e, "%v", err)
	}

	logger := newLogger(e.stderr, *level)
	host, _, _ := net.SplitHostPort(*httpListen)
	if *advertise != "" {
		u, _ := url.Parse(*advertise)
		host = u.Hostname()
	}
	tlsOpts, msg := httpTLS.options(host, logger)
	if msg != "" {
		return fs.fail(e, "%s", msg)
	}
	security = append(security, tlsOpts...)
	node, err := newBankNode(nodeConfig{
		brokers:           seeds,
		app:               *app,
		httpListen:        *httpListen,
		advertise:         *advertise,
		dataDir:           *dataDir,
		partitions:        *partitions,
		atLeastOnce:       *atLeastOnce,
		sessionTimeout:    *sessionTimeout,
		standbys:          *standbys,
		stateCleanupDelay: *cleanupDelay,
		alertsURL:         *alertsURL,
		alertsThreshold:   *alertsThreshold,
		postgres:          *postgres,
		masterKeys:        masterKeys,
		logger:            logger,
		security:          security,
	})
	if err != nil {
		return fs.fail(e, "%s", trimPrefix(err))
	}
	logger.Info("starting bank node", "brokers", seeds, "app", *app, "http", *httpListen, "state", filepath.Join(*dataDir, "state"))
	defer onShutdown(e, "node")()
	if err := runUntilDone(e.ctx, node); err != nil {
		fmt.Fprintf(e.stderr, "esker node: %s\n", trimPrefix(err))
		return 1
	}
	return 0
}

// loadMasterKeys reads the master keys from --master-key-file, else from
// $ESKER_MASTER_KEY ("<id>:<base64>"). The bank keeps personal data, so a
// node needs one.
func loadMasterKeys(file, env string) ([]keyring.MasterKey, error) {
	switch {
	case file != "":
		return keyring.ReadMasterKeys(file)
	case env != "":
		k, err := keyring.ParseMasterKey(env)
		if err != nil {
			return nil, fmt.Errorf("$ESKER_MASTER_KEY: %w", err)
		}
		return []keyring.MasterKey{k}, nil
	}
	return nil, errors.New("no master key: the bank seals each owner's name with a key wrapped by a master key; pass --master-key-file FILE or set ESKER_MASTER_KEY (make one with: echo k1:$(head -c 32 /dev/urandom | base64) > master.key)")
}

// trimPrefix drops the "esker: " prefix of the node's errors, which the
// CLI's own "esker <command>: " prefix replaces.
func trimPrefix(err error) string { return strings.TrimPrefix(err.Error(), "esker: ") }

// parseBrokers splits a comma-separated broker list and checks each entry
// is host:port.
func parseBrokers(s string) ([]string, error) {
	var out []string
	for _, b := range strings.Split(s, ",") {
		b = strings.TrimSpace(b)
		if b == "" {
			continue
		}
		host, port, err := net.SplitHostPort(b)
		if err != nil || host == "" || port == "" {
			return nil, fmt.Errorf("--brokers: %q is not host:port", b)
		}
		out = append(out, b)
	}
	if len(out) == 0 {
		return nil, errors.New("--brokers is required, e.g. --brokers localhost:9092")
	}
	return out, nil
}

// checkCommon validates the flags dev and node share; it returns a message
// for the user, or "".
func checkCommon(httpListen, dataDir string, partitions int) string {
	if _, port, err := net.SplitHostPort(httpListen); err != nil || port == "" || port == "0" {
		return fmt.Sprintf("--http %q is not host:port with a fixed port (for example 127.0.0.1:8080 or :8080)", httpListen)
	}
	if dataDir == "" {
		return "--data must not be empty"
	}
	if partitions < 1 || partitions > 100000 {
		return fmt.Sprintf("--partitions must be between 1 and 100000, got %d", partitions)
	}
	return ""
}

func checkAdvertise(u string) string { return checkURL("--advertise", u) }

// checkURL returns a message when u is not an absolute http(s) URL.
func checkURL(flag, u string) string {
	p, err := url.Parse(u)
	if err != nil || (p.Scheme != "http" && p.Scheme != "https") || p.Host == "" {
		return fmt.Sprintf("%s %q is not an http:// or https:// URL", flag, u)
	}
	return ""
}

func listensOnAllInterfaces(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsUnspecified()
}

// exampleHost suggests a reachable host:port for a listen address.
func exampleHost(addr string) string {
	_, port, _ := net.SplitHostPort(addr)
	return net.JoinHostPort("my-host", port)
}

// localURL is the URL a person on this machine uses to reach an HTTP
// listen address: an unspecified host becomes 127.0.0.1.
func localURL(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "http://" + addr
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, port)
}
