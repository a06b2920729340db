package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"

	"github.com/twmb/franz-go/pkg/kfake"
)

// startBroker starts franz-go's kfake as a one-broker Kafka cluster that
// listens on addr (host:port; port 0 picks a free port) and, when dataDir is
// not empty, persists its log, groups and transactions there and reloads
// them on the next start. Records, committed offsets and transaction state
// are appended to the directory as they happen (without fsync), so a killed
// process loses nothing the OS had accepted; Close additionally writes a
// snapshot of the broker's metadata and syncs the files, so stop it with
// Close when you can.
//
// Like a default Kafka, it creates a topic when a client that asks for it
// (kcat, librdkafka producers) uses a topic that does not exist; such topics
// and CreateTopics requests without a count get partitions partitions.
//
// The broker advertises the address it listens on, so clients must be able
// to reach that host.
func startBroker(addr, dataDir string, partitions int, logger *slog.Logger) (*kfake.Cluster, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("broker address %q: %w", addr, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 0 || port > 65535 {
		return nil, fmt.Errorf("broker address %q: invalid port", addr)
	}
	opts := []kfake.Opt{
		kfake.NumBrokers(1),
		kfake.Ports(port),
		kfake.ClusterID("esker-dev"),
		kfake.AllowAutoTopicCreation(),
		kfake.DefaultNumPartitions(partitions),
		// kfake listens on 127.0.0.1; listen on the host asked for instead.
		kfake.ListenFn(func(network, address string) (net.Listener, error) {
			_, p, err := net.SplitHostPort(address)
			if err != nil {
				return nil, err
			}
			return net.Listen(network, net.JoinHostPort(host, p))
		}),
		kfake.WithLogger(kfakeLogger{logger.With("component", "kafka")}),
	}
	if dataDir != "" {
		opts = append(opts, kfake.DataDir(dataDir))
	}
	c, err := kfake.NewCluster(opts...)
	if err != nil {
		return nil, fmt.Errorf("start embedded Kafka broker on %s: %w", addr, err)
	}
	return c, nil
}

// kfakeLogger sends kfake's log lines to slog. kfake's info level logs every
// request, so it maps to debug.
type kfakeLogger struct{ l *slog.Logger }

func (k kfakeLogger) Logf(level kfake.LogLevel, format string, args ...any) {
	var l slog.Level
	switch level {
	case kfake.LogLevelError:
		l = slog.LevelError
	case kfake.LogLevelWarn:
		l = slog.LevelWarn
	case kfake.LogLevelInfo:
		l = slog.LevelDebug
	default:
		l = slog.LevelDebug - 4
	}
	if !k.l.Enabled(context.Background(), l) {
		return
	}
	k.l.Log(context.Background(), l, fmt.Sprintf(format, args...))
}

func runKafka(e *env, args []string) int {
	fs := newFlagSet("kafka", "esker kafka [flags]", `
Runs the embedded Kafka-protocol broker (franz-go's kfake) alone, listening
on 127.0.0.1, until interrupted. It supports what esker needs: topics,
consumer groups and transactions. Its data is kept in DIR/kafka (the same
place "esker dev --data DIR" keeps it), so topics, records, committed offsets
and transactions survive a restart.

Use it to run "esker node" processes by hand, or to point any Kafka client
(kcat, franz-go, librdkafka) at a throw-away broker. As with Kafka's
auto.create.topics.enable, a topic a client uses before it exists is
created, with --partitions partitions. It is a development tool, not a
production Kafka.`)
	fs.examples = `
esker kafka
esker kafka --port 19092 --data /tmp/esker --partitions 4`
	port := fs.Int("port", 9092, "`port` to listen on (0 picks a free port)")
	dataDir := fs.String("data", "esker-data", "data `directory`; the broker's data goes in DIR/kafka")
	partitions := fs.Int("partitions", 8, "partition `count` of topics created automatically (esker nodes create theirs with their own --partitions)")
	level := fs.logLevel()
	if code, ok := fs.parse(e, args); !ok {
		return code
	}
	if *port < 0 || *port > 65535 {
		return fs.fail(e, "--port %d is not a TCP port", *port)
	}
	if *dataDir == "" {
		return fs.fail(e, "--data must not be empty")
	}
	if *partitions < 1 || *partitions > 100000 {
		return fs.fail(e, "--partitions must be between 1 and 100000, got %d", *partitions)
	}
	logger := newLogger(e.stderr, *level)
	kafkaDir := filepath.Join(*dataDir, "kafka")
	broker, err := startBroker(net.JoinHostPort("127.0.0.1", strconv.Itoa(*port)), kafkaDir, *partitions, logger)
	if err != nil {
		fmt.Fprintf(e.stderr, "esker kafka: %v\n", err)
		return 1
	}
	fmt.Fprintf(e.stdout, "Kafka broker listening on %s (data in %s). Press Ctrl-C to stop.\n", broker.ListenAddrs()[0], kafkaDir)
	<-e.ctx.Done()
	fmt.Fprintln(e.stderr, "esker kafka: shutting down (press Ctrl-C again to force)")
	broker.Close()
	fmt.Fprintln(e.stdout, "Kafka broker stopped.")
	return 0
}
