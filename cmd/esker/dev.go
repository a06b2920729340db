package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/internal/keyring"
)

func runDev(e *env, args []string) int {
	fs := newFlagSet("dev", "esker dev [flags]", `
Runs everything a newcomer needs in one process, with no other set-up: an
embedded Kafka-protocol broker (franz-go's kfake) and a node of the bank
demo service (package examples/bank: accounts you open, deposit to, withdraw
from and close) with its HTTP API.

Everything is kept in the data directory: the broker's topics, offsets and
transactions in DIR/kafka, the node's state store in DIR/state. Stop with
Ctrl-C and start again: the accounts are still there. Delete DIR to start
from scratch.

Other Kafka clients can use the broker too, for example
  kcat -b 127.0.0.1:9092 -C -t account-events -f '%k %h %s\n'
  echo '{"type":"Deposit","data":{"amount":100}}' |
    kcat -b 127.0.0.1:9092 -P -t account-commands -k alice -X partitioner=murmur2_random
Producers must partition by Kafka's murmur2 key hash, as esker does: the
Java client does by default, librdkafka-based clients (kcat, confluent-kafka)
need partitioner=murmur2_random.`)
	fs.examples = `
esker dev
esker dev --data /tmp/esker --partitions 4
esker dev --nodes 3 --standby-replicas 1
esker dev --postgres postgres://postgres@127.0.0.1/test`
	httpListen := fs.String("http", "127.0.0.1:8080", "`address` the HTTP API listens on")
	kafkaAddr := fs.String("kafka", "127.0.0.1:9092", "`address` the embedded broker listens on and advertises (port 0 picks a free port)")
	dataDir := fs.String("data", "esker-data", "data `directory`, kept across restarts: the broker's data in DIR/kafka, the node's state in DIR/state")
	partitions := fs.Int("partitions", 8, "partition `count` of the topics the node creates (must match existing topics)")
	standbys := fs.Int("standby-replicas", 0, "standby `copies` of every partition's state kept on other nodes (with --nodes > 1)")
	nodes := fs.Int("nodes", 1, "number of bank `nodes` to run, on consecutive HTTP ports from --http's (state of node i>1 in DIR/state-i)")
	alertsURL := fs.String("alerts-url", "", "`URL` that receives the withdrawal alerts (default: a receiver in this process that logs them)")
	alertsThreshold := fs.Int64("alerts-threshold", 100000, "smallest `amount` in cents that raises a withdrawal alert")
	postgres := fs.String("postgres", "", "PostgreSQL connection `URL` (e.g. postgres://postgres@127.0.0.1/test): also keep the table accounts(id, owner, balance, version, updated_at) there, exactly once")
	httpSec := addHTTPSecurityFlags(fs)
	level := fs.logLevel()
	if code, ok := fs.parse(e, args); !ok {
		return code
	}
	security, msg := httpSec.options()
	if msg != "" {
		return fs.fail(e, "%s", msg)
	}
	if !httpSec.hasClusterToken() {
		// The nodes all run here: they can share a secret nobody else knows.
		security = append(security, esker.ClusterToken(randomToken()))
	}
	if msg := checkCommon(*httpListen, *dataDir, *partitions); msg != "" {
		return fs.fail(e, "%s", msg)
	}
	if *alertsURL != "" {
		if msg := checkURL("--alerts-url", *alertsURL); msg != "" {
			return fs.fail(e, "%s", msg)
		}
	}
	if *nodes < 1 || *nodes > 16 {
		return fs.fail(e, "--nodes %d: run between 1 and 16 nodes", *nodes)
	}
	httpHost, httpPort, _ := net.SplitHostPort(*httpListen)
	firstPort, err := strconv.Atoi(httpPort)
	if err != nil || firstPort+*nodes-1 > 65535 {
		return fs.fail(e, "--http %s: no room for %d consecutive ports", *httpListen, *nodes)
	}
	host, port, err := net.SplitHostPort(*kafkaAddr)
	if err != nil || host == "" {
		return fs.fail(e, "--kafka %q is not host:port (for example 127.0.0.1:9092)", *kafkaAddr)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
		return fs.fail(e, "--kafka %q: invalid port", *kafkaAddr)
	}
	if listensOnAllInterfaces(*kafkaAddr) {
		return fs.fail(e, "--kafka %s: the broker advertises the address it listens on, so give a concrete host (e.g. 127.0.0.1 or this machine's name)", *kafkaAddr)
	}
	if err := os.MkdirAll(*dataDir, 0o755); err != nil {
		fmt.Fprintf(e.stderr, "esker dev: %v\n", err)
		return 1
	}

	masterKeys, err := devMasterKeys(filepath.Join(*dataDir, "master.key"))
	if err != nil {
		fmt.Fprintf(e.stderr, "esker dev: %v\n", err)
		return 1
	}
	logger := newLogger(e.stderr, *level)
	kafkaDir := filepath.Join(*dataDir, "kafka")
	broker, err := startBroker(*kafkaAddr, kafkaDir, *partitions, logger)
	if err != nil {
		fmt.Fprintf(e.stderr, "esker dev: %v\n", err)
		return 1
	}
	// The node stops first (it leaves its group and commits or aborts its
	// transaction), then the broker, whose Close persists its state.
	defer broker.Close()
	brokerAddr := broker.ListenAddrs()[0]
	if *alertsURL == "" {
		url, stop, err := startAlertReceiver(logger)
		if err != nil {
			fmt.Fprintf(e.stderr, "esker dev: %v\n", err)
			return 1
		}
		defer stop()
		*alertsURL = url
	}

	var (
		running []*esker.Node
		bases   []string
		states  []string
	)
	for i := range *nodes {
		listen := net.JoinHostPort(httpHost, strconv.Itoa(firstPort+i))
		stateName := "state"
		if i > 0 {
			stateName = fmt.Sprintf("state-%d", i+1)
		}
		base := localURL(listen)
		node, err := newBankNode(nodeConfig{
			alertsThreshold: *alertsThreshold,
			brokers:         []string{brokerAddr},
			app:             "bank",
			httpListen:      listen,
			advertise:       base,
			dataDir:         *dataDir,
			stateName:       stateName,
			partitions:      *partitions,
			standbys:        *standbys,
			alertsURL:       *alertsURL,
			postgres:        *postgres,
			masterKeys:      masterKeys,
			logger:          logger.With("node", i+1),
			security:        security,
		})
		if err != nil {
			return fs.fail(e, "%s", trimPrefix(err))
		}
		running = append(running, node)
		bases = append(bases, base)
		states = append(states, filepath.Join(*dataDir, stateName))
	}
	printDevBanner(e.stdout, brokerAddr, kafkaDir, bases, states)

	defer onShutdown(e, "dev")()
	// All nodes run until Ctrl-C; if one fails, the others stop too.
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	errs := make(chan error, len(running))
	for _, node := range running {
		go func() {
			err := runUntilDone(ctx, node)
			if err != nil {
				cancel()
			}
			errs <- err
		}()
	}
	code := 0
	for range running {
		if err := <-errs; err != nil {
			fmt.Fprintf(e.stderr, "esker dev: %s\n", trimPrefix(err))
			code = 1
		}
	}
	return code
}

func printDevBanner(w io.Writer, brokerAddr, kafkaDir string, bases, stateDirs []string) {
	base := bases[0]
	account := base + "/v1/aggregates/account/alice"
	var nodes strings.Builder
	for i := range bases {
		fmt.Fprintf(&nodes, "  bank node     %s  (state in %s)\n", bases[i], stateDirs[i])
	}
	if len(bases) > 1 {
		nodes.WriteString("  any node answers any request; GET /v1/cluster shows who owns what\n")
	}
	fmt.Fprintf(w, `esker dev
  Kafka broker  %s  (data in %s)
%s
Try it:
  curl -sS -X POST %s/commands -H 'Content-Type: application/json' -d '{"type":"Open","data":{"owner":"Alice"}}'
  curl -sS -X POST %s/commands -H 'Content-Type: application/json' -d '{"type":"Deposit","data":{"amount":500}}'
  curl -sS %s
  curl -sS %s/v1/projections/owners/Alice
  curl -sS -X POST %s/v1/aggregates/transfer/t-1/commands -H 'Content-Type: application/json' -d '{"type":"Initiate","data":{"from":"alice","to":"bob","amount":100}}'
  curl -sS %s/v1/aggregates/transfer/t-1

Press Ctrl-C to stop; the data directory is kept.
`, brokerAddr, kafkaDir, nodes.String(), account, account, account, base, base, base)
}

// devMasterKeys reads the master key esker dev keeps in its data directory,
// generating it on the first run: the demo's personal data stays readable
// across restarts, and deleting the data directory forgets everything.
func devMasterKeys(path string) ([]keyring.MasterKey, error) {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		line := keyring.NewMasterKey("dev-1") + "\n"
		if err := os.WriteFile(path, []byte(line), 0o600); err != nil {
			return nil, fmt.Errorf("write the master key: %w", err)
		}
	}
	return keyring.ReadMasterKeys(path)
}
