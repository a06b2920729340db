package esker_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/internal/keyring"
)

// newCluster starts an in-process Kafka-protocol broker; tests talk to it
// over TCP with the real franz-go client.
func newCluster(t testing.TB, opts ...kfake.Opt) *kfake.Cluster {
	t.Helper()
	c, err := kfake.NewCluster(append([]kfake.Opt{kfake.NumBrokers(1), kfake.GroupMinSessionTimeout(100 * time.Millisecond)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

type testNode struct {
	*esker.Node
	srv    *httptest.Server
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

// testMasterKey seals the bank's personal fields in tests. The esker node
// processes some tests start read it from the environment.
const testMasterKey = "test-1:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="

func init() { os.Setenv("ESKER_MASTER_KEY", testMasterKey) }

// testMasterKeyOption is testMasterKey as a node option.
func testMasterKeyOption() esker.Option {
	id, b64, _ := strings.Cut(testMasterKey, ":")
	key, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(key) != 32 {
		panic("bad test master key")
	}
	return esker.MasterKey(id, key)
}

// testKeyring reads the application's keys topic with the test master key,
// as a node does; it is closed when the test ends.
func testKeyring(t testing.TB, brokers []string) *keyring.Keyring {
	t.Helper()
	id, b64, _ := strings.Cut(testMasterKey, ":")
	master, _ := base64.StdEncoding.DecodeString(b64)
	kr, err := keyring.New(keyring.Config{AppID: "bank", Partitions: 4, Masters: []keyring.MasterKey{{ID: id, Key: master}},
		ClientOpts: []kgo.Opt{kgo.SeedBrokers(brokers...)}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(kr.Close)
	go func() { _ = kr.Run(context.Background()) }()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := kr.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	return kr
}

// testOpener returns a function that opens the personal fields of a bank
// account event read raw from Kafka.
func testOpener(t testing.TB, brokers []string) func(aggregate.Event) aggregate.Event {
	kr := testKeyring(t, brokers)
	def := bank.Account.Untyped()
	return func(ev aggregate.Event) aggregate.Event {
		schema, data, err := def.OpenEvent(ev.Type, ev.SchemaVersion, ev.Data, kr.Cipher(context.Background(), "account", ev.EntityID))
		if err != nil {
			t.Fatalf("open %s %q version %d: %v", ev.Type, ev.EntityID, ev.Version, err)
		}
		ev.SchemaVersion, ev.Data = schema, data
		return ev
	}
}

func testLogger() *slog.Logger {
	if os.Getenv("ESKER_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// startNode runs a bank node on the cluster with its HTTP API on a test
// server, and waits until it is ready.
func startNode(t testing.TB, brokers []string, stateDir string, opts ...esker.Option) *testNode {
	t.Helper()
	return startTypesNode(t, brokers, stateDir, []any{bank.Account}, opts...)
}

// startBankNode runs a node with the bank's account type and projections.
func startBankNode(t testing.TB, brokers []string, stateDir string, opts ...esker.Option) *testNode {
	t.Helper()
	return startTypesNode(t, brokers, stateDir, []any{bank.Account, bank.Owners, bank.DailyTotals}, opts...)
}

// startTypesNode is startNode with other aggregate types and projections
// (esker.Registrable or esker.Projection); opts come after the test defaults
// (application "bank", 4 partitions), so they override them.
func startTypesNode(t testing.TB, brokers []string, stateDir string, types []any, opts ...esker.Option) *testNode {
	t.Helper()
	tn := startTypesNodeNoWait(t, brokers, stateDir, types, opts...)
	waitReady(t, tn)
	return tn
}

// startTypesNodeNoWait is startTypesNode without waiting for the node to
// be ready.
func startTypesNodeNoWait(t testing.TB, brokers []string, stateDir string, types []any, opts ...esker.Option) *testNode {
	t.Helper()
	// The test server exists before the node, so the node can advertise
	// its URL (nodes route requests to each other by it).
	var handler atomic.Pointer[http.Handler]
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		(*handler.Load()).ServeHTTP(w, r)
	}))
	all := append([]esker.Option{
		esker.AdvertisedURL(srv.URL),
		esker.Brokers(brokers...),
		esker.ApplicationID("bank"),
		esker.StateDir(stateDir),
		esker.HTTPListen(""),
		esker.Partitions(4),
		esker.SessionTimeout(3 * time.Second),
		esker.Logger(testLogger()),
		testMasterKeyOption(),
	}, opts...)
	n, err := esker.NewNode(all...)
	if err != nil {
		t.Fatal(err)
	}
	for _, typ := range types {
		var err error
		switch x := typ.(type) {
		case esker.Registrable:
			err = n.Register(x)
		case esker.Projection:
			err = n.AddProjection(x)
		case esker.Consumer:
			err = n.AddConsumer(x)
		default:
			t.Fatalf("cannot add %T to a node", typ)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := n.Handler()
	handler.Store(&h)
	tn := &testNode{Node: n, srv: srv, cancel: cancel, done: make(chan error, 1)}
	go func() { tn.done <- n.Run(ctx) }()
	t.Cleanup(tn.stop)
	return tn
}

// stop shuts the node down gracefully and waits for Run to return.
func (tn *testNode) stop() {
	tn.once.Do(func() {
		tn.cancel()
		select {
		case <-tn.done:
		case <-time.After(30 * time.Second):
			panic("node did not stop within 30s")
		}
		tn.srv.Close()
	})
}

func waitReady(t testing.TB, tn *testNode) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := tn.Ready()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("node not ready: %v", err)
		}
		select {
		case err := <-tn.done:
			t.Fatalf("node stopped: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// do sends an HTTP request and decodes the JSON answer.
func do(t testing.TB, tn *testNode, method, path string, body any) (int, map[string]any) {
	t.Helper()
	code, out, _ := doH(t, tn, method, path, body)
	return code, out
}

// doH is do that also returns the response headers.
func doH(t testing.TB, tn *testNode, method, path string, body any) (int, map[string]any, http.Header) {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = bytes.NewBufferString(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		raw, _ := json.Marshal(b)
		rd = bytes.NewReader(raw)
	}
	req, _ := http.NewRequest(method, tn.srv.URL+path, rd)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	raw, _ := io.ReadAll(resp.Body)
	if len(raw) > 0 {
		if err := json.Unmarshal(raw, &out); err != nil {
			t.Fatalf("%s %s: answer is not JSON: %q", method, path, raw)
		}
	}
	return resp.StatusCode, out, resp.Header
}

func cmd(typ string, data any) map[string]any {
	return map[string]any{"type": typ, "data": data}
}

// recordEvent decodes an esker event read raw from Kafka.
func recordEvent(t testing.TB, r *kgo.Record) aggregate.Event {
	t.Helper()
	hs := make([]aggregate.Header, len(r.Headers))
	for i, h := range r.Headers {
		hs[i] = aggregate.Header{Key: h.Key, Value: h.Value}
	}
	ev, err := aggregate.EventFromRecord(r.Key, hs, r.Value)
	if err != nil {
		t.Fatal(err)
	}
	return ev
}

// readTopic reads every committed record of a topic, read_committed, up to
// its last stable offset.
func readTopic(t testing.TB, brokers []string, topic string) []*kgo.Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	admCl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	ends, err := kadm.NewClient(admCl).ListCommittedOffsets(ctx, topic)
	admCl.Close()
	if err != nil {
		t.Fatal(err)
	}
	pending := map[int32]int64{}
	ends.Each(func(o kadm.ListedOffset) {
		if o.Offset > 0 {
			pending[o.Partition] = o.Offset
		}
	})
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...),
		kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.KeepControlRecords())
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var out []*kgo.Record
	for len(pending) > 0 {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("reading %s: timed out with partitions %v unread", topic, pending)
		}
		fs.EachRecord(func(r *kgo.Record) {
			end, ok := pending[r.Partition]
			if !ok || r.Offset >= end {
				return
			}
			if !r.Attrs.IsControl() {
				out = append(out, r)
			}
			if r.Offset+1 >= end {
				delete(pending, r.Partition)
			}
		})
	}
	return out
}

func header(r *kgo.Record, key string) string {
	for _, h := range r.Headers {
		if h.Key == key {
			return string(h.Value)
		}
	}
	return ""
}

var _ = aggregate.HeaderEventType

// metricSum returns the sum of a counter family's samples on a node.
func metricSum(t testing.TB, n *esker.Node, name string) float64 {
	t.Helper()
	mfs, err := n.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if c := m.GetCounter(); c != nil {
				sum += c.GetValue()
			}
		}
	}
	return sum
}

func mustStatus(t testing.TB, want int, code int, body map[string]any, what string) {
	t.Helper()
	if code != want {
		t.Fatalf("%s: status %d, want %d: %v", what, code, want, body)
	}
}

func bankAccount() esker.Registrable { return bank.Account }

// metricValue returns the value of the counter or gauge sample of the
// family name whose labels include every label/value pair given; ok is
// false when no sample matches.
func metricValue(t testing.TB, n *esker.Node, name string, labelValues ...string) (v float64, ok bool) {
	t.Helper()
	mfs, err := n.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	samples:
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			for k := 0; k+1 < len(labelValues); k += 2 {
				if labels[labelValues[k]] != labelValues[k+1] {
					continue samples
				}
			}
			if c := m.GetCounter(); c != nil {
				return c.GetValue(), true
			}
			return m.GetGauge().GetValue(), true
		}
	}
	return 0, false
}

// counterWith returns the value of a counter family's sample whose label has
// the given value (0 when there is none).
func counterWith(t testing.TB, n *testNode, name, label, value string) float64 {
	t.Helper()
	v, _ := metricValue(t, n.Node, name, label, value)
	return v
}

func stringsReader(s string) io.Reader { return bytes.NewBufferString(s) }

func jsonDecode(r io.Reader, v any) error { return json.NewDecoder(r).Decode(v) }

var httpClient = &http.Client{Timeout: 10 * time.Second}

// waitUntil polls cond every 20 ms for up to 30 s.
func waitUntil(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
