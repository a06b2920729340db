package sideeffects_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/sideeffects"
)

const testApp = "shop"

// newCluster starts an in-process Kafka-protocol broker with the given
// topics; tests talk to it over TCP with the real franz-go client.
func newCluster(t testing.TB, partitions int32, topics ...string) []string {
	t.Helper()
	opts := []kfake.Opt{kfake.NumBrokers(1), kfake.GroupMinSessionTimeout(100 * time.Millisecond)}
	if len(topics) > 0 {
		opts = append(opts, kfake.SeedTopics(partitions, topics...))
	}
	c, err := kfake.NewCluster(opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c.ListenAddrs()
}

// clientOpts are the Kafka options of the tests: quick group timing, so
// that a rebalance or a dead member costs about a second.
func clientOpts(brokers []string) []kgo.Opt {
	return []kgo.Opt{
		kgo.SeedBrokers(brokers...),
		kgo.SessionTimeout(1500 * time.Millisecond),
		kgo.HeartbeatInterval(150 * time.Millisecond),
		kgo.RebalanceTimeout(10 * time.Second),
	}
}

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("ESKER_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// testEvent is the envelope of an account's version-th event, as the esker
// engine writes it.
func testEvent(entity string, version int64) aggregate.Event {
	return aggregate.Event{
		EntityID:      entity,
		Version:       version,
		EventID:       aggregate.EventID("account", entity, version),
		Type:          "Deposited",
		SchemaVersion: 1,
		Time:          time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC).Add(time.Duration(version) * time.Second),
		Data:          json.RawMessage(fmt.Sprintf(`{"amount":%d}`, version)),
	}
}

func eventRecord(topic string, e aggregate.Event) *kgo.Record {
	rec := &kgo.Record{Topic: topic, Key: []byte(e.EntityID), Value: e.Data}
	for _, h := range e.Headers("application/json") {
		rec.Headers = append(rec.Headers, kgo.RecordHeader{Key: h.Key, Value: h.Value})
	}
	return rec
}

// produceEvents writes versions from..to of every entity, in version order,
// keyed by entity id (Kafka's murmur2 partitioning).
func produceEvents(t testing.TB, brokers []string, topic string, entities []string, from, to int64) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var recs []*kgo.Record
	for v := from; v <= to; v++ {
		for _, e := range entities {
			recs = append(recs, eventRecord(topic, testEvent(e, v)))
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		t.Fatal(err)
	}
}

func entities(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("acct-%02d", i)
	}
	return out
}

// running is a consumer started by startConsumer.
type running struct {
	*sideeffects.Consumer
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
	err    error
}

// startConsumer runs c until the test ends (or stop) and waits until it is
// ready.
func startConsumer(t testing.TB, c *sideeffects.Consumer, brokers []string, reg prometheus.Registerer) *running {
	t.Helper()
	return startConsumerWith(t, c, sideeffects.Runtime{AppID: testApp, ClientOpts: clientOpts(brokers), Logger: testLogger(t), Registerer: reg})
}

// startConsumerWith is startConsumer with the whole runtime given.
func startConsumerWith(t testing.TB, c *sideeffects.Consumer, rt sideeffects.Runtime) *running {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{Consumer: c, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- c.Run(ctx, rt) }()
	t.Cleanup(func() {
		if err := r.stop(); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	waitFor(t, 20*time.Second, "consumer "+c.Name()+" ready", func() bool {
		select {
		case err := <-r.done:
			t.Fatalf("Run returned early: %v", err)
		default:
		}
		return c.Ready() == nil
	})
	return r
}

// stop cancels Run and returns its result.
func (r *running) stop() error {
	r.once.Do(func() {
		r.cancel()
		select {
		case r.err = <-r.done:
		case <-time.After(40 * time.Second):
			r.err = fmt.Errorf("Run did not return within 40s of its context being cancelled")
		}
	})
	return r.err
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// groupCaughtUp reports whether group has committed every partition of
// topics up to its end.
func groupCaughtUp(t testing.TB, brokers []string, group string, topics ...string) bool {
	t.Helper()
	lag, err := groupLag(brokers, group, topics...)
	if err != nil {
		t.Logf("group lag: %v", err)
		return false
	}
	return lag == 0
}

// groupLag is the end offsets of topics minus group's committed offsets.
func groupLag(brokers []string, group string, topics ...string) (int64, error) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		return 0, err
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ends, err := adm.ListEndOffsets(ctx, topics...)
	if err != nil {
		return 0, err
	}
	committed, err := adm.FetchOffsets(ctx, group)
	if err != nil {
		return 0, err
	}
	var lag int64
	var lerr error
	ends.Each(func(o kadm.ListedOffset) {
		if o.Err != nil {
			lerr = o.Err
			return
		}
		at := int64(0)
		if c, ok := committed.Lookup(o.Topic, o.Partition); ok && c.Err == nil && c.At >= 0 {
			at = c.At
		}
		lag += o.Offset - at
	})
	return lag, lerr
}

// readAll reads every record of topic up to its end at the time of the call.
func readAll(t testing.TB, brokers []string, topic string) []*kgo.Record {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ends, err := kadm.NewClient(cl).ListEndOffsets(ctx, topic)
	cl.Close()
	if err != nil {
		t.Fatal(err)
	}
	want := 0
	ends.Each(func(o kadm.ListedOffset) { want += int(o.Offset) })
	if want == 0 {
		return nil
	}
	cl, err = kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchMaxWait(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var out []*kgo.Record
	for len(out) < want {
		fs := cl.PollFetches(ctx)
		if err := ctx.Err(); err != nil {
			t.Fatalf("read %s: got %d of %d records: %v", topic, len(out), want, err)
		}
		out = append(out, fs.Records()...)
	}
	return out
}

// metricValue reads a counter or gauge (or a histogram's count) of the registry by name and labels.
func metricValue(t testing.TB, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			for k, v := range labels {
				found := false
				for _, l := range m.GetLabel() {
					found = found || l.GetName() == k && l.GetValue() == v
				}
				if !found {
					continue metrics
				}
			}
			switch {
			case m.Counter != nil:
				return m.Counter.GetValue()
			case m.Gauge != nil:
				return m.Gauge.GetValue()
			case m.Histogram != nil:
				return float64(m.Histogram.GetSampleCount())
			}
		}
	}
	t.Fatalf("metric %s%v not found", name, labels)
	return 0
}

// header returns the value of a record header, and whether it is there.
func header(rec *kgo.Record, key string) (string, bool) {
	for _, h := range rec.Headers {
		if h.Key == key {
			return string(h.Value), true
		}
	}
	return "", false
}

// eventKey identifies an event in assertions.
func eventKey(ev sideeffects.Event) string {
	if ev.EventID != "" {
		return ev.EventID
	}
	return fmt.Sprintf("%s/%d/%d", ev.Topic, ev.Partition, ev.Offset)
}
