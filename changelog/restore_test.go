package changelog_test

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/changelog"
	"github.com/esker-io/esker/statestore"
)

const (
	appID = "app"
	typ   = "t"
)

var topic = changelog.Topic(appID, typ) // "app-t-changelog"

func newCluster(t *testing.T, opts ...kfake.Opt) []string {
	t.Helper()
	c, err := kfake.NewCluster(append([]kfake.Opt{kfake.NumBrokers(1), kfake.SeedTopics(2, topic)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c.ListenAddrs()
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// txProducer produces changelog records in transactions, choosing the
// partition of each record explicitly.
type txProducer struct {
	t  *testing.T
	cl *kgo.Client
}

func newTxProducer(t *testing.T, brokers []string) *txProducer {
	t.Helper()
	cl, err := kgo.NewClient(
		kgo.SeedBrokers(brokers...),
		kgo.TransactionalID("changelog-test"),
		kgo.DefaultProduceTopic(topic),
		kgo.RecordPartitioner(kgo.ManualPartitioner()),
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return &txProducer{t: t, cl: cl}
}

type rec struct {
	partition int32
	kv        [2][]byte
}

// tx produces recs in one transaction and commits or aborts it.
func (p *txProducer) tx(ctx context.Context, commit bool, recs ...rec) {
	p.t.Helper()
	if err := p.cl.BeginTransaction(); err != nil {
		p.t.Fatal(err)
	}
	for _, r := range recs {
		kr := &kgo.Record{Partition: r.partition, Key: r.kv[0], Value: r.kv[1]}
		if err := p.cl.ProduceSync(ctx, kr).FirstErr(); err != nil {
			p.t.Fatal(err)
		}
	}
	if err := p.cl.EndTransaction(ctx, kgo.TransactionEndTry(commit)); err != nil {
		p.t.Fatal(err)
	}
}

func restoreOpts(brokers []string) []kgo.Opt {
	return []kgo.Opt{kgo.SeedBrokers(brokers...), kgo.FetchMaxWait(200 * time.Millisecond)}
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func endOffsets(t *testing.T, ctx context.Context, brokers []string, topic string) map[int32]int64 {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	adm := kadm.NewClient(cl)
	defer adm.Close()
	ends, err := adm.ListEndOffsets(ctx, topic)
	if err != nil {
		t.Fatal(err)
	}
	out := map[int32]int64{}
	ends.Each(func(o kadm.ListedOffset) {
		if o.Err != nil {
			t.Fatal(o.Err)
		}
		out[o.Partition] = o.Offset
	})
	return out
}

func TestRestore(t *testing.T) {
	ctx := testCtx(t)
	brokers := newCluster(t)
	p := newTxProducer(t, brokers)
	t0 := statestore.Task{Type: typ, Partition: 0}
	t1 := statestore.Task{Type: typ, Partition: 1}
	targets := []changelog.Target{{Task: t0, Topic: topic}, {Task: t1, Topic: topic}}

	ja1, jb1, jx1 := journal("a", 1, 1), journal("b", 1, 2), journal("x", 1, 1)
	ja2 := journal("a", 2, 1)
	// Transaction 1 spans both partitions.
	p.tx(ctx, true,
		rec{0, stateKV("a", 1, "a1")}, rec{0, journalKV(t, "a", ja1)},
		rec{0, stateKV("b", 2, "b2")}, rec{0, journalKV(t, "b", jb1)},
		rec{1, stateKV("x", 1, "x1")}, rec{1, journalKV(t, "x", jx1)},
	)
	// Transaction 2: partition 0 only; b's state is tombstoned.
	p.tx(ctx, true,
		rec{0, stateKV("a", 2, "a2")}, rec{0, journalKV(t, "a", ja2)},
		rec{0, [2][]byte{statestore.StateKey("b"), nil}},
	)
	// An aborted transaction at the tail of both partitions.
	ja3, jx2 := journal("a", 3, 1), journal("x", 2, 1)
	p.tx(ctx, false,
		rec{0, stateKV("a", 3, "a3-aborted")}, rec{0, journalKV(t, "a", ja3)},
		rec{1, stateKV("x", 2, "x2-aborted")}, rec{1, journalKV(t, "x", jx2)},
	)
	ends := endOffsets(t, ctx, brokers, topic)

	store := newStore(t)
	res, err := changelog.Restore(ctx, store, restoreOpts(brokers), targets, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	if res.Records[t0] != 7 || res.Records[t1] != 2 || len(res.Records) != 2 {
		t.Fatalf("records applied %v, want %s: 7, %s: 2", res.Records, t0, t1)
	}
	if res.Duration <= 0 {
		t.Errorf("duration %v", res.Duration)
	}

	// Committed data is there, aborted data is not.
	assertState(t, store, t0, "a", 2, "a2")
	assertNoState(t, store, t0, "b")
	assertState(t, store, t1, "x", 1, "x1")
	assertNoState(t, store, t0, "x")
	assertNoState(t, store, t1, "a")
	assertVersions(t, store, t0, "a", 1, 2)
	assertVersions(t, store, t0, "b", 1, 2)
	assertVersions(t, store, t1, "x", 1)
	for _, c := range [][]string{{"cmd-a-1", "cmd-a-2", "cmd-b-1", "cmd-b-2"}, {"cmd-x-1"}} {
		tk := t0
		if c[0] == "cmd-x-1" {
			tk = t1
		}
		for _, id := range c {
			if _, ok, _ := store.Get(tk, statestore.CommandKey(id)); !ok {
				t.Errorf("task %s: command %s missing", tk, id)
			}
		}
	}
	for tk, id := range map[statestore.Task]string{t0: "cmd-a-3", t1: "cmd-x-2"} {
		if _, ok, _ := store.Get(tk, statestore.CommandKey(id)); ok {
			t.Errorf("task %s: command %s of the aborted transaction applied", tk, id)
		}
	}

	// Checkpoints are at the end of each partition (past the abort marker).
	assertCheckpoint(t, store, t0, ends[0])
	assertCheckpoint(t, store, t1, ends[1])
	// Partition 0: 7 records, 2 commit markers, 2 aborted records, 1 abort
	// marker; partition 1: 2 records, 1 marker, 2 aborted, 1 marker.
	if ends[0] != 12 || ends[1] != 6 {
		t.Fatalf("end offsets %v, want 12 and 6 (one marker per transaction and partition)", ends)
	}

	// A second restore reads nothing.
	res, err = changelog.Restore(ctx, store, restoreOpts(brokers), targets, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	if res.Records[t0] != 0 || res.Records[t1] != 0 || len(res.Records) != 2 {
		t.Fatalf("second restore applied %v, want zeros for both tasks", res.Records)
	}
	assertCheckpoint(t, store, t0, ends[0])
	assertCheckpoint(t, store, t1, ends[1])

	// Three more committed records: the third restore reads exactly those.
	p.tx(ctx, true,
		rec{0, stateKV("a", 3, "a3")}, rec{0, journalKV(t, "a", ja3)},
		rec{1, stateKV("y", 1, "y1")},
	)
	res, err = changelog.Restore(ctx, store, restoreOpts(brokers), targets, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	if res.Records[t0] != 2 || res.Records[t1] != 1 {
		t.Fatalf("third restore applied %v, want %s: 2, %s: 1", res.Records, t0, t1)
	}
	assertState(t, store, t0, "a", 3, "a3")
	assertState(t, store, t1, "y", 1, "y1")
	assertState(t, store, t1, "x", 1, "x1")
	assertVersions(t, store, t0, "a", 1, 2, 3)
	ends = endOffsets(t, ctx, brokers, topic)
	assertCheckpoint(t, store, t0, ends[0])
	assertCheckpoint(t, store, t1, ends[1])

	// A fresh store restores everything committed, the same state.
	fresh := newStore(t)
	res, err = changelog.Restore(ctx, fresh, restoreOpts(brokers), targets, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Records[t0] != 9 || res.Records[t1] != 3 {
		t.Fatalf("fresh restore applied %v, want %s: 9, %s: 3", res.Records, t0, t1)
	}
	assertState(t, fresh, t0, "a", 3, "a3")
	assertNoState(t, fresh, t0, "b")
	assertVersions(t, fresh, t0, "a", 1, 2, 3)
}

func TestRestoreOneTaskOfTwo(t *testing.T) {
	ctx := testCtx(t)
	brokers := newCluster(t)
	p := newTxProducer(t, brokers)
	p.tx(ctx, true, rec{0, stateKV("a", 1, "a1")}, rec{1, stateKV("x", 1, "x1")})
	store := newStore(t)
	t1 := statestore.Task{Type: typ, Partition: 1}
	res, err := changelog.Restore(ctx, store, restoreOpts(brokers), []changelog.Target{{Task: t1, Topic: topic}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Records) != 1 || res.Records[t1] != 1 {
		t.Fatalf("records %v", res.Records)
	}
	assertState(t, store, t1, "x", 1, "x1")
	assertNoState(t, store, statestore.Task{Type: typ, Partition: 0}, "a")
	if cp, _ := store.Checkpoint(statestore.Task{Type: typ, Partition: 0}); cp != 0 {
		t.Fatalf("checkpoint of a task not restored: %d", cp)
	}
}

func TestRestoreNoTargets(t *testing.T) {
	store := newStore(t)
	// No targets: no broker is contacted (the options name none).
	res, err := changelog.Restore(testCtx(t), store, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Records) != 0 {
		t.Fatalf("records %v", res.Records)
	}
}

func TestRestoreEmptyTopic(t *testing.T) {
	ctx := testCtx(t)
	brokers := newCluster(t)
	store := newStore(t)
	t0 := statestore.Task{Type: typ, Partition: 0}
	t1 := statestore.Task{Type: typ, Partition: 1}
	res, err := changelog.Restore(ctx, store, restoreOpts(brokers),
		[]changelog.Target{{Task: t0, Topic: topic}, {Task: t1, Topic: topic}}, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Records) != 2 || res.Records[t0] != 0 || res.Records[t1] != 0 {
		t.Fatalf("records %v, want zeros for both tasks", res.Records)
	}
	assertCheckpoint(t, store, t0, 0)
	assertCheckpoint(t, store, t1, 0)
}

func TestRestoreOnlyAbortedRecords(t *testing.T) {
	ctx := testCtx(t)
	brokers := newCluster(t)
	p := newTxProducer(t, brokers)
	p.tx(ctx, false, rec{0, stateKV("a", 1, "aborted")})
	store := newStore(t)
	t0 := statestore.Task{Type: typ, Partition: 0}
	res, err := changelog.Restore(ctx, store, restoreOpts(brokers), []changelog.Target{{Task: t0, Topic: topic}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Records[t0] != 0 {
		t.Fatalf("records %v, want 0", res.Records)
	}
	assertNoState(t, store, t0, "a")
	assertCheckpoint(t, store, t0, endOffsets(t, ctx, brokers, topic)[0])
}

func TestRestoreMissingTopic(t *testing.T) {
	ctx := testCtx(t)
	brokers := newCluster(t)
	store := newStore(t)
	_, err := changelog.Restore(ctx, store, restoreOpts(brokers),
		[]changelog.Target{{Task: statestore.Task{Type: "nope", Partition: 0}, Topic: "app-nope-changelog"}}, nil)
	if err == nil {
		t.Fatal("restore from a missing topic: no error")
	}
}

func TestRestoreCorruptRecord(t *testing.T) {
	ctx := testCtx(t)
	brokers := newCluster(t)
	p := newTxProducer(t, brokers)
	p.tx(ctx, true, rec{0, stateKV("a", 1, "a1")}, rec{0, [2][]byte{[]byte("bogus"), []byte("x")}})
	store := newStore(t)
	t0 := statestore.Task{Type: typ, Partition: 0}
	_, err := changelog.Restore(ctx, store, restoreOpts(brokers), []changelog.Target{{Task: t0, Topic: topic}}, nil)
	if err == nil {
		t.Fatal("corrupt record: no error")
	}
	// Nothing of the failed batch was applied and the checkpoint did not move.
	assertNoState(t, store, t0, "a")
	assertCheckpoint(t, store, t0, 0)
}

func assertState(t *testing.T, s *statestore.Store, tk statestore.Task, id string, version int64, state string) {
	t.Helper()
	v, ok, err := s.Get(tk, statestore.StateKey(id))
	if err != nil || !ok {
		t.Fatalf("task %s: state of %q: found=%v, %v", tk, id, ok, err)
	}
	r, err := statestore.DecodeStateRecord(v)
	if err != nil || r.Version != version || string(r.State) != state {
		t.Fatalf("task %s: state of %q = %+v (%s), %v; want version %d %q", tk, id, r, r.State, err, version, state)
	}
}

func assertNoState(t *testing.T, s *statestore.Store, tk statestore.Task, id string) {
	t.Helper()
	if v, ok, err := s.Get(tk, statestore.StateKey(id)); err != nil || ok {
		t.Fatalf("task %s: state of %q = %q, %v; want none", tk, id, v, err)
	}
}

func assertVersions(t *testing.T, s *statestore.Store, tk statestore.Task, id string, want ...int64) {
	t.Helper()
	got, err := s.Events(tk, id, 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("task %s: %q has %d events, want versions %v", tk, id, len(got), want)
	}
	for i, e := range got {
		if e.Version != want[i] {
			t.Fatalf("task %s: %q event %d has version %d, want %v", tk, id, i, e.Version, want)
		}
	}
}

func assertCheckpoint(t *testing.T, s *statestore.Store, tk statestore.Task, want int64) {
	t.Helper()
	cp, err := s.Checkpoint(tk)
	if err != nil || cp != want {
		t.Fatalf("task %s: checkpoint %d, %v; want %d", tk, cp, err, want)
	}
}

func TestRestoreAfterDeleteRecords(t *testing.T) {
	ctx := testCtx(t)
	brokers := newCluster(t)
	p := newTxProducer(t, brokers)
	p.tx(ctx, true, rec{0, stateKV("old", 1, "old")})                             // offsets 0, marker 1
	p.tx(ctx, true, rec{0, stateKV("a", 1, "a1")}, rec{0, stateKV("b", 1, "b1")}) // 2, 3, marker 4

	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	adm := kadm.NewClient(cl)
	defer adm.Close()
	del := kadm.Offsets{}
	del.Add(kadm.Offset{Topic: topic, Partition: 0, At: 2})
	resp, err := adm.DeleteRecords(ctx, del)
	if err != nil {
		t.Fatal(err)
	}
	if err := resp.Error(); err != nil {
		t.Skipf("broker does not support DeleteRecords: %v", err)
	}

	// A fresh store (checkpoint 0) starts at the log start offset instead of
	// failing with an out-of-range offset.
	store := newStore(t)
	t0 := statestore.Task{Type: typ, Partition: 0}
	res, err := changelog.Restore(ctx, store, restoreOpts(brokers), []changelog.Target{{Task: t0, Topic: topic}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Records[t0] != 2 {
		t.Fatalf("records %v, want 2", res.Records)
	}
	assertNoState(t, store, t0, "old")
	assertState(t, store, t0, "a", 1, "a1")
	assertState(t, store, t0, "b", 1, "b1")
	assertCheckpoint(t, store, t0, 5)
}

// TestRestoreWaitsForOpenTransaction: a transaction open when the restore
// starts (the previous owner's last one, its markers not yet written) must
// not be skipped: the restore waits for it to end and includes it if it
// committed.
func TestRestoreWaitsForOpenTransaction(t *testing.T) {
	ctx := testCtx(t)
	brokers := newCluster(t)
	p := newTxProducer(t, brokers)
	p.tx(ctx, true, rec{0, stateKV("a", 1, "a1")}) // offset 0, marker 1

	if err := p.cl.BeginTransaction(); err != nil {
		t.Fatal(err)
	}
	if err := p.cl.ProduceSync(ctx, &kgo.Record{Partition: 0, Key: statestore.StateKey("a"), Value: stateKV("a", 2, "a2")[1]}).FirstErr(); err != nil {
		t.Fatal(err)
	}

	store := newStore(t)
	t0 := statestore.Task{Type: typ, Partition: 0}
	targets := []changelog.Target{{Task: t0, Topic: topic}}
	type result struct {
		res changelog.RestoreResult
		err error
	}
	done := make(chan result, 1)
	go func() {
		res, err := changelog.Restore(ctx, store, restoreOpts(brokers), targets, nil)
		done <- result{res, err}
	}()
	select {
	case r := <-done:
		t.Fatalf("restore finished while a transaction was open: %v %v", r.res.Records, r.err)
	case <-time.After(300 * time.Millisecond):
	}
	if err := p.cl.EndTransaction(ctx, kgo.TryCommit); err != nil {
		t.Fatal(err)
	}
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.res.Records[t0] != 2 {
		t.Fatalf("records %v, want 2", r.res.Records)
	}
	assertState(t, store, t0, "a", 2, "a2")
	assertCheckpoint(t, store, t0, 4)
}
