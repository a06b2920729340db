package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/internal/testlog"
)

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func testBroker(t *testing.T, dir string) (*kfake.Cluster, string) {
	t.Helper()
	c, err := startBroker("127.0.0.1:0", dir, 3, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	return c, c.ListenAddrs()[0]
}

func newClient(t *testing.T, addr string, opts ...kgo.Opt) *kgo.Client {
	t.Helper()
	cl, err := kgo.NewClient(append([]kgo.Opt{kgo.SeedBrokers(addr)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return cl
}

// produceTxn writes values to topic in one committed transaction.
func produceTxn(ctx context.Context, t *testing.T, addr, txnID, topic string, values ...string) {
	t.Helper()
	cl := newClient(t, addr, kgo.TransactionalID(txnID), kgo.DefaultProduceTopic(topic))
	defer cl.Close()
	if err := cl.BeginTransaction(); err != nil {
		t.Fatalf("begin transaction: %v", err)
	}
	for _, v := range values {
		if err := cl.ProduceSync(ctx, &kgo.Record{Key: []byte("k"), Value: []byte(v)}).FirstErr(); err != nil {
			t.Fatalf("produce %q: %v", v, err)
		}
	}
	if err := cl.EndTransaction(ctx, kgo.TryCommit); err != nil {
		t.Fatalf("commit transaction: %v", err)
	}
}

// consumeAll reads topic from the start with read_committed until it has n
// records.
func consumeAll(ctx context.Context, t *testing.T, addr, topic string, n int) []string {
	t.Helper()
	cl := newClient(t, addr,
		kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
	)
	defer cl.Close()
	var got []string
	for len(got) < n {
		fs := cl.PollFetches(ctx)
		if err := ctx.Err(); err != nil {
			t.Fatalf("consumed %q, want %d records: %v", got, n, err)
		}
		fs.EachError(func(_ string, _ int32, err error) { t.Fatalf("fetch: %v", err) })
		fs.EachRecord(func(r *kgo.Record) { got = append(got, string(r.Value)) })
	}
	return got
}

// TestEmbeddedBrokerPersists proves what "esker dev" relies on: the embedded
// broker keeps topics, committed transactional records, committed offsets
// and transactional producer state in its data directory across Close and a
// restart.
func TestEmbeddedBrokerPersists(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dir := filepath.Join(t.TempDir(), "kafka")
	const topic, group = "account-events", "bank"

	broker, addr := testBroker(t, dir)
	adm := kadm.NewClient(newClient(t, addr))
	if _, err := adm.CreateTopic(ctx, 1, 1, map[string]*string{"retention.ms": kadm.StringPtr("-1")}, topic); err != nil {
		t.Fatalf("create topic: %v", err)
	}
	produceTxn(ctx, t, addr, "bank-node-1", topic, "opened", "deposited")
	if got := consumeAll(ctx, t, addr, topic, 2); strings.Join(got, ",") != "opened,deposited" {
		t.Fatalf("before restart: consumed %q", got)
	}
	offsets := kadm.Offsets{}
	offsets.AddOffset(topic, 0, 2, -1)
	if resp, err := adm.CommitOffsets(ctx, group, offsets); err != nil || resp.Error() != nil {
		t.Fatalf("commit offsets: %v %v", err, resp.Error())
	}
	adm.Close()
	broker.Close()

	broker, addr = testBroker(t, dir)
	defer broker.Close()
	adm = kadm.NewClient(newClient(t, addr))
	defer adm.Close()

	if got := consumeAll(ctx, t, addr, topic, 2); strings.Join(got, ",") != "opened,deposited" {
		t.Fatalf("after restart: consumed %q", got)
	}
	fetched, err := adm.FetchOffsets(ctx, group)
	if err != nil {
		t.Fatalf("fetch offsets: %v", err)
	}
	if o, ok := fetched.Lookup(topic, 0); !ok || o.At != 2 {
		t.Fatalf("after restart: committed offset %+v (found %v), want 2", o, ok)
	}
	cfgs, err := adm.DescribeTopicConfigs(ctx, topic)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := cfgs.On(topic, nil); err != nil {
		t.Fatal(err)
	} else if v := configValue(c, "retention.ms"); v != "-1" {
		t.Errorf("after restart: retention.ms = %q, want -1", v)
	}

	// The same transactional id works again after the restart, and the
	// log continues after the persisted records.
	produceTxn(ctx, t, addr, "bank-node-1", topic, "withdrawn")
	if got := consumeAll(ctx, t, addr, topic, 3); strings.Join(got, ",") != "opened,deposited,withdrawn" {
		t.Fatalf("after restart and another transaction: consumed %q", got)
	}
}

// TestEmbeddedBrokerAutoCreates checks that topics a client produces to
// before they exist are created with the configured partition count, as
// kcat users expect.
func TestEmbeddedBrokerAutoCreates(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	broker, addr := testBroker(t, "")
	defer broker.Close()
	cl := newClient(t, addr, kgo.AllowAutoTopicCreation())
	defer cl.Close()
	if err := cl.ProduceSync(ctx, &kgo.Record{Topic: "fresh", Value: []byte("v")}).FirstErr(); err != nil {
		t.Fatalf("produce to a new topic: %v", err)
	}
	topics, err := kadm.NewClient(cl).ListTopics(ctx, "fresh")
	if err != nil {
		t.Fatal(err)
	}
	if n := len(topics["fresh"].Partitions); n != 3 {
		t.Fatalf("auto-created topic has %d partitions, want 3", n)
	}
}

func configValue(rc kadm.ResourceConfig, key string) string {
	for _, c := range rc.Configs {
		if c.Key == key {
			return c.MaybeValue()
		}
	}
	return ""
}

// TestKafkaCommand runs "esker kafka" in-process until its context is
// cancelled.
func TestKafkaCommand(t *testing.T) {
	dataDir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr testlog.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run(&env{ctx: ctx, stdout: &stdout, stderr: &stderr}, []string{"kafka", "--port", "0", "--data", dataDir})
	}()

	addrRE := regexp.MustCompile(`listening on (127\.0\.0\.1:\d+)`)
	var addr string
	deadline := time.Now().Add(10 * time.Second)
	for addr == "" {
		if m := addrRE.FindStringSubmatch(stdout.String()); m != nil {
			addr = m[1]
		} else if time.Now().After(deadline) {
			t.Fatalf("no listening line; stdout %q stderr %q", stdout.String(), stderr.String())
		} else {
			time.Sleep(10 * time.Millisecond)
		}
	}

	reqCtx, reqCancel := context.WithTimeout(ctx, 10*time.Second)
	defer reqCancel()
	adm := kadm.NewClient(newClient(t, addr))
	if _, err := adm.CreateTopic(reqCtx, 2, 1, nil, "t"); err != nil {
		t.Fatalf("create topic on the embedded broker: %v", err)
	}
	adm.Close()

	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("exit %d; stderr %q", code, stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("esker kafka did not stop after cancellation")
	}
	if !strings.Contains(stdout.String(), "Kafka broker stopped.") {
		t.Errorf("stdout lacks the stop line: %q", stdout.String())
	}
	if _, err := os.Stat(filepath.Join(dataDir, "kafka", "meta.json")); err != nil {
		t.Errorf("no persisted broker state in DIR/kafka: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dataDir, "kafka", "topics.json")); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Error(err)
	}
}
