package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
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
	httpListen := fs.String("http", "127.0.0.1:8080", "`address` the HTTP API listens on")
	kafkaAddr := fs.String("kafka", "127.0.0.1:9092", "`address` the embedded broker listens on and advertises (port 0 picks a free port)")
	dataDir := fs.String("data", "esker-data", "data `directory`, kept across restarts: the broker's data in DIR/kafka, the node's state in DIR/state")
	partitions := fs.Int("partitions", 8, "partition `count` of the topics the node creates (must match existing topics)")
	level := fs.logLevel()
	if code, ok := fs.parse(e, args); !ok {
		return code
	}
	if msg := checkCommon(*httpListen, *dataDir, *partitions); msg != "" {
		return fs.fail(e, "%s", msg)
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

	base := localURL(*httpListen)
	node, err := newBankNode(nodeConfig{
		brokers:    []string{brokerAddr},
		app:        "bank",
		httpListen: *httpListen,
		advertise:  base,
		dataDir:    *dataDir,
		partitions: *partitions,
		embedded:   true,
		logger:     logger,
	})
	if err != nil {
		return fs.fail(e, "%s", trimPrefix(err))
	}
	printDevBanner(e.stdout, brokerAddr, kafkaDir, base, filepath.Join(*dataDir, "state"))

	defer onShutdown(e, "dev")()
	if err := runUntilDone(e.ctx, node); err != nil {
		fmt.Fprintf(e.stderr, "esker dev: %s\n", trimPrefix(err))
		return 1
	}
	return 0
}

func printDevBanner(w io.Writer, brokerAddr, kafkaDir, base, stateDir string) {
	account := base + "/v1/aggregates/account/alice"
	fmt.Fprintf(w, `esker dev
  Kafka broker  %s  (data in %s)
  bank node     %s  (state in %s)

Try it:
  curl -sS -X POST %s/commands -H 'Content-Type: application/json' -d '{"type":"Open","data":{"owner":"Alice"}}'
  curl -sS -X POST %s/commands -H 'Content-Type: application/json' -d '{"type":"Deposit","data":{"amount":500}}'
  curl -sS %s

Press Ctrl-C to stop; the data directory is kept.
`, brokerAddr, kafkaDir, base, stateDir, account, account, account)
}
