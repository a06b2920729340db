package pgsink_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net/url"
	"os"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/projection/pgsink"
)

const (
	eventsTopic = "account-events"
	partitions  = 4
)

// postgresURL is the test database: ESKER_TEST_POSTGRES, or the local
// server CI and developers run (trust auth).
func postgresURL() string {
	if u := os.Getenv("ESKER_TEST_POSTGRES"); u != "" {
		return u
	}
	return "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// testDB is a schema of its own in the test database, dropped at cleanup.
type testDB struct {
	schema string
	url    string // connection string whose search_path is the schema
	pool   *pgxpool.Pool
}

func newDB(t testing.TB) *testDB {
	t.Helper()
	schema := "pgsink_test_" + randomHex(6)
	u := withParam(t, postgresURL(), "search_path", schema)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	admin, err := pgx.Connect(ctx, postgresURL())
	if err != nil {
		t.Fatalf("PostgreSQL at %s is needed by these tests (set ESKER_TEST_POSTGRES to another server): %v", postgresURL(), err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "CREATE SCHEMA "+schema); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, postgresURL())
		if err != nil {
			t.Errorf("dropping schema %s: %v", schema, err)
			return
		}
		defer c.Close(ctx)
		if _, err := c.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE"); err != nil {
			t.Errorf("dropping schema %s: %v", schema, err)
		}
	})
	pool, err := pgxpool.New(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return &testDB{schema: schema, url: u, pool: pool}
}

func withParam(t testing.TB, raw, key, value string) string {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set(key, value)
	u.RawQuery = q.Encode()
	return u.String()
}

// withHost points a connection URL at another host:port.
func withHost(t testing.TB, raw, hostport string) string {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	u.Host = hostport
	return u.String()
}

type row struct {
	Owner   string
	Balance int64
	Version int64
}

// accounts reads the accounts table.
func (db *testDB) accounts(t testing.TB) map[string]row {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rows, err := db.pool.Query(ctx, "SELECT id, coalesce(owner, ''), balance, version FROM accounts")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]row{}
	var id string
	var r row
	if _, err := pgx.ForEachRow(rows, []any{&id, &r.Owner, &r.Balance, &r.Version}, func() error {
		out[id] = r
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

// storedOffsets reads a sink's rows of esker_sink_offsets (nil if the table
// does not exist yet).
func (db *testDB) storedOffsets(t testing.TB, sink string) map[int32]int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rows, err := db.pool.Query(ctx, "SELECT partition, next_offset FROM esker_sink_offsets WHERE sink = $1 AND topic = $2", sink, eventsTopic)
	if err != nil {
		return nil
	}
	out := map[int32]int64{}
	var p int32
	var n int64
	if _, err := pgx.ForEachRow(rows, []any{&p, &n}, func() error { out[p] = n; return nil }); err != nil {
		return nil
	}
	return out
}

func newCluster(t testing.TB) []string {
	t.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(partitions, eventsTopic),
		kfake.GroupMinSessionTimeout(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c.ListenAddrs()
}

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("ESKER_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// clientOpts are the Kafka options a test sink runs with: short session
// and rebalance timeouts, so that members that die are noticed quickly.
func clientOpts(brokers []string) []kgo.Opt {
	return []kgo.Opt{
		kgo.SeedBrokers(brokers...),
		kgo.SessionTimeout(1500 * time.Millisecond),
		kgo.HeartbeatInterval(150 * time.Millisecond),
		kgo.RebalanceTimeout(5 * time.Second),
		kgo.FetchMaxWait(200 * time.Millisecond),
	}
}

// model is the expected fold of the committed events, per account.
type model struct {
	mu       sync.Mutex
	accounts map[string]*row
	total    int64 // committed events
}

func (m *model) snapshot() (map[string]row, int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[string]row, len(m.accounts))
	for id, r := range m.accounts {
		if r.Version > 0 {
			out[id] = *r
		}
	}
	return out, m.total
}

// producer writes bank events the way the engine does: one transaction per
// batch, explicit partitions (murmur2 of the account id), the envelope in
// headers. About one transaction in ten is aborted: read_committed
// consumers never see its events, and the next transaction reuses its
// versions.
type producer struct {
	t        testing.TB
	cl       *kgo.Client
	m        *model
	rnd      *mrand.Rand
	accounts []string
	abortAll bool
}

func newProducer(t testing.TB, brokers []string, m *model, nAccounts int, seed uint64) *producer {
	t.Helper()
	return newProducerPrefix(t, brokers, m, nAccounts, seed, "acct-")
}

// newProducerPrefix is newProducer with account ids "<prefix>NNNN".
func newProducerPrefix(t testing.TB, brokers []string, m *model, nAccounts int, seed uint64, prefix string) *producer {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...),
		kgo.TransactionalID("producer-"+randomHex(4)),
		kgo.RecordPartitioner(kgo.ManualPartitioner()),
		kgo.ProducerLinger(0))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	p := &producer{t: t, cl: cl, m: m, rnd: mrand.New(mrand.NewPCG(seed, seed+1))}
	m.mu.Lock()
	if m.accounts == nil {
		m.accounts = map[string]*row{}
	}
	for i := range nAccounts {
		id := fmt.Sprintf("%s%04d", prefix, i)
		p.accounts = append(p.accounts, id)
		if m.accounts[id] == nil {
			m.accounts[id] = &row{}
		}
	}
	m.mu.Unlock()
	return p
}

// produce writes n events (in transactions of txSize) and returns how many
// of them were committed.
func (p *producer) produce(ctx context.Context, n, txSize int) int {
	committed := 0
	for n > 0 && ctx.Err() == nil {
		k := min(n, txSize)
		n -= k
		abort := p.rnd.IntN(10) == 0
		if p.txn(ctx, k, abort) {
			committed += k
		}
	}
	return committed
}

// txn writes k events in one transaction and commits it (or aborts it).
func (p *producer) txn(ctx context.Context, k int, abort bool) bool {
	t := p.t
	p.m.mu.Lock()
	// Work on a copy: the model changes only when the transaction commits.
	next := map[string]row{}
	for _, id := range p.accounts {
		next[id] = *p.m.accounts[id]
	}
	p.m.mu.Unlock()
	now := time.Now().UTC()
	records := make([]*kgo.Record, 0, k)
	for range k {
		id := p.accounts[p.rnd.IntN(len(p.accounts))]
		a := next[id]
		a.Version++
		var typ string
		var data any
		switch amount := int64(1 + p.rnd.IntN(1000)); {
		case a.Version == 1:
			a.Owner = "owner of " + id
			typ, data = "Opened", bank.Opened{Owner: a.Owner}
		case a.Balance >= amount && p.rnd.IntN(3) == 0:
			a.Balance -= amount
			typ, data = "Withdrawn", bank.Withdrawn{Amount: amount}
		default:
			a.Balance += amount
			typ, data = "Deposited", bank.Deposited{Amount: amount}
		}
		next[id] = a
		raw, _ := json.Marshal(data)
		ev := aggregate.Event{EntityID: id, Version: a.Version, EventID: aggregate.EventID("account", id, a.Version),
			Type: typ, SchemaVersion: 1, Time: now, Data: raw}
		var hs []kgo.RecordHeader
		for _, h := range ev.Headers("application/json") {
			hs = append(hs, kgo.RecordHeader{Key: h.Key, Value: h.Value})
		}
		records = append(records, &kgo.Record{Topic: eventsTopic, Partition: aggregate.Partition(id, partitions),
			Key: []byte(id), Value: raw, Headers: hs, Timestamp: now})
	}
	for {
		if err := p.cl.BeginTransaction(); err != nil {
			t.Errorf("begin transaction: %v", err)
			return false
		}
		if err := p.cl.ProduceSync(ctx, records...).FirstErr(); err != nil {
			_ = p.cl.EndTransaction(context.Background(), kgo.TryAbort)
			if ctx.Err() != nil {
				return false
			}
			t.Logf("produce failed, retrying the transaction: %v", err)
			continue
		}
		commit := kgo.TryCommit
		if abort || p.abortAll {
			commit = kgo.TryAbort
		}
		if err := p.cl.EndTransaction(context.Background(), commit); err != nil {
			t.Errorf("end transaction: %v", err)
			return false
		}
		break
	}
	if abort || p.abortAll {
		return false
	}
	p.m.mu.Lock()
	for id, a := range next {
		*p.m.accounts[id] = a
	}
	p.m.total += int64(k)
	p.m.mu.Unlock()
	return true
}

// endOffsets lists the last stable offsets of the events topic.
func endOffsets(t testing.TB, brokers []string) map[int32]int64 {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	listed, err := kadm.NewClient(cl).ListCommittedOffsets(ctx, eventsTopic)
	if err != nil {
		t.Fatal(err)
	}
	out := map[int32]int64{}
	listed.Each(func(o kadm.ListedOffset) {
		if o.Err == nil {
			out[o.Partition] = o.Offset
		}
	})
	return out
}

// waitCaughtUp waits until the sink's stored offsets reach the end of every
// partition (the producer must have stopped).
func waitCaughtUp(t testing.TB, db *testDB, brokers []string, sink string, timeout time.Duration, alive func() error) {
	t.Helper()
	ends := endOffsets(t, brokers)
	deadline := time.Now().Add(timeout)
	for {
		stored := db.storedOffsets(t, sink)
		done := len(stored) == len(ends)
		for p, end := range ends {
			if stored[p] != end {
				done = false
			}
		}
		if done {
			return
		}
		if alive != nil {
			if err := alive(); err != nil {
				t.Fatalf("sink stopped before catching up: %v", err)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("sink did not catch up within %v: stored offsets %v, end offsets %v", timeout, stored, ends)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkTable compares the accounts table with the model: every account,
// its owner, its balance and its version (the number of its events).
func checkTable(t testing.TB, db *testDB, m *model) {
	t.Helper()
	want, total := m.snapshot()
	got := db.accounts(t)
	if len(got) != len(want) {
		t.Errorf("accounts table has %d rows, want %d", len(got), len(want))
	}
	var bad []string
	for id, w := range want {
		if g, ok := got[id]; !ok || g != w {
			bad = append(bad, fmt.Sprintf("%s: got %+v (present %v), want %+v", id, g, ok, w))
		}
	}
	sort.Strings(bad)
	if len(bad) > 5 {
		bad = append(bad[:5], fmt.Sprintf("... and %d more", len(bad)-5))
	}
	for _, b := range bad {
		t.Errorf("account %s", b)
	}
	var versions int64
	for _, g := range got {
		versions += g.Version
	}
	if versions != total {
		t.Errorf("the versions in the table add up to %d events, want the %d committed events", versions, total)
	}
}

// runningSink is a sink run in a goroutine.
type runningSink struct {
	*pgsink.Sink
	cancel context.CancelFunc
	done   chan error
	reg    *prometheus.Registry
	once   sync.Once
	err    error
}

func startSink(t testing.TB, s *pgsink.Sink, brokers []string, extra ...kgo.Opt) *runningSink {
	t.Helper()
	return startSinkApp(t, s, brokers, "bank", extra...)
}

// startSinkApp runs a sink as part of application app: its group is
// "<app>-<sink name>".
func startSinkApp(t testing.TB, s *pgsink.Sink, brokers []string, app string, extra ...kgo.Opt) *runningSink {
	t.Helper()
	return startSinkWith(t, s, pgsink.Runtime{AppID: app, ClientOpts: append(clientOpts(brokers), extra...), Logger: testLogger(t)})
}

// startSinkWith runs a sink with rt, whose Registerer is set to a fresh
// registry (runningSink.reg).
func startSinkWith(t testing.TB, s *pgsink.Sink, rt pgsink.Runtime) *runningSink {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	rs := &runningSink{Sink: s, cancel: cancel, done: make(chan error, 1), reg: prometheus.NewRegistry()}
	rt.Registerer = rs.reg
	go func() { rs.done <- s.Run(ctx, rt) }()
	t.Cleanup(func() {
		if err := rs.stop(); err != nil {
			t.Errorf("sink %s: Run: %v", s.Name(), err)
		}
	})
	return rs
}

// stop cancels Run and returns its error.
func (rs *runningSink) stop() error {
	rs.once.Do(func() {
		rs.cancel()
		select {
		case rs.err = <-rs.done:
		case <-time.After(30 * time.Second):
			rs.err = fmt.Errorf("Run did not return within 30s of its context ending")
		}
	})
	return rs.err
}

// alive returns Run's error if Run has returned.
func (rs *runningSink) alive() error {
	select {
	case err := <-rs.done:
		rs.done <- err
		if err == nil {
			err = fmt.Errorf("Run returned nil")
		}
		return err
	default:
		return nil
	}
}

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

func waitReady(t testing.TB, rs *runningSink, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := rs.Ready()
		if err == nil {
			return
		}
		if e := rs.alive(); e != nil {
			t.Fatalf("sink stopped: %v", e)
		}
		if time.Now().After(deadline) {
			t.Fatalf("sink not ready after %v: %v", timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
