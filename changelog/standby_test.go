package changelog_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/changelog"
	"github.com/esker-io/esker/statestore"
)

const typ2 = "u"

var topic2 = changelog.Topic(appID, typ2) // "app-u-changelog"

// trec is a changelog record on any topic.
type trec struct {
	topic     string
	partition int32
	kv        [2][]byte
}

// txAny produces recs in one transaction and commits or aborts it.
func (p *txProducer) txAny(ctx context.Context, commit bool, recs ...trec) {
	p.t.Helper()
	if err := p.cl.BeginTransaction(); err != nil {
		p.t.Error(err)
		return
	}
	for _, r := range recs {
		kr := &kgo.Record{Topic: r.topic, Partition: r.partition, Key: r.kv[0], Value: r.kv[1]}
		if err := p.cl.ProduceSync(ctx, kr).FirstErr(); err != nil {
			p.t.Error(err)
		}
	}
	if err := p.cl.EndTransaction(ctx, kgo.TransactionEndTry(commit)); err != nil {
		p.t.Error(err)
	}
}

// startTailer runs a Tailer until the test ends.
func startTailer(t *testing.T, store *statestore.Store, brokers []string) *changelog.Tailer {
	t.Helper()
	tl, err := changelog.NewTailer(store, restoreOpts(brokers), quietLog())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- tl.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		tl.Close()
	})
	return tl
}

// waitCaughtUp waits until every target's checkpoint is the end of its
// partition and its Lag is 0.
func waitCaughtUp(t *testing.T, ctx context.Context, brokers []string, tl *changelog.Tailer, store *statestore.Store, targets ...changelog.Target) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	adm := kadm.NewClient(cl)
	defer adm.Close()
	for {
		var behind []string
		for _, tg := range targets {
			ends, err := adm.ListEndOffsets(ctx, tg.Topic)
			if err != nil {
				t.Fatal(err)
			}
			end, _ := ends.Lookup(tg.Topic, tg.Task.Partition)
			cp, err := store.Checkpoint(tg.Task)
			if err != nil {
				t.Fatal(err)
			}
			lag, ok := tl.Lag(tg.Task)
			if cp != end.Offset || !ok || lag != 0 {
				behind = append(behind, fmt.Sprintf("%s: checkpoint %d end %d lag %d/%v", tg.Task, cp, end.Offset, lag, ok))
			}
		}
		if len(behind) == 0 {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("standby not caught up: %v", behind)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// assertSameStores compares what two stores hold for a task: states,
// events and command outcomes of the given entities, and the checkpoint.
func assertSameStores(t *testing.T, a, b *statestore.Store, tk statestore.Task, ids []string, maxVersion int64) {
	t.Helper()
	cpa, erra := a.Checkpoint(tk)
	cpb, errb := b.Checkpoint(tk)
	if erra != nil || errb != nil || cpa != cpb {
		t.Fatalf("task %s: checkpoints %d (%v) and %d (%v)", tk, cpa, erra, cpb, errb)
	}
	for _, id := range ids {
		va, oka, _ := a.Get(tk, statestore.StateKey(id))
		vb, okb, _ := b.Get(tk, statestore.StateKey(id))
		if oka != okb || !bytes.Equal(va, vb) {
			t.Fatalf("task %s: state of %q differs: %v %q / %v %q", tk, id, oka, va, okb, vb)
		}
		ea, err := a.Events(tk, id, 0, 0)
		must(t, err)
		eb, err := b.Events(tk, id, 0, 0)
		must(t, err)
		if len(ea) != len(eb) {
			t.Fatalf("task %s: %q has %d and %d events", tk, id, len(ea), len(eb))
		}
		for i := range ea {
			if ea[i].Version != eb[i].Version || !bytes.Equal(ea[i].Data, eb[i].Data) {
				t.Fatalf("task %s: %q event %d differs", tk, id, i)
			}
		}
		var cmds []string
		for v := int64(1); v <= maxVersion; v++ {
			cmds = append(cmds, fmt.Sprintf("cmd-%s-%d", id, v))
		}
		ca, err := a.Commands(tk, cmds)
		must(t, err)
		cb, err := b.Commands(tk, cmds)
		must(t, err)
		if len(ca) != len(cb) {
			t.Fatalf("task %s: %q: %d and %d command outcomes", tk, id, len(ca), len(cb))
		}
		for k, v := range ca {
			if !bytes.Equal(v, cb[k]) {
				t.Fatalf("task %s: command %s differs", tk, k)
			}
		}
	}
}

// workload writes transactions over several tasks, aborting some, and
// tracks the committed versions.
type workload struct {
	rnd     *rand.Rand
	targets []changelog.Target
	ids     []string
	version map[statestore.Task]map[string]int64 // committed
	deleted map[statestore.Task]map[string]bool
}

func newWorkload(seed int64, targets []changelog.Target, ids []string) *workload {
	w := &workload{rnd: rand.New(rand.NewSource(seed)), targets: targets, ids: ids,
		version: map[statestore.Task]map[string]int64{}, deleted: map[statestore.Task]map[string]bool{}}
	for _, tg := range targets {
		w.version[tg.Task] = map[string]int64{}
		w.deleted[tg.Task] = map[string]bool{}
	}
	return w
}

// next produces one transaction touching one to three tasks.
func (w *workload) next(ctx context.Context, t *testing.T, p *txProducer, commit bool) {
	var recs []trec
	type touch struct {
		task    statestore.Task
		id      string
		version int64
		tomb    bool
	}
	var touched []touch
	seen := map[string]bool{}
	for n := 1 + w.rnd.Intn(3); n > 0; n-- {
		tg := w.targets[w.rnd.Intn(len(w.targets))]
		id := w.ids[w.rnd.Intn(len(w.ids))]
		if seen[tg.Task.String()+id] {
			continue
		}
		seen[tg.Task.String()+id] = true
		v := w.version[tg.Task][id] + 1
		if w.rnd.Intn(8) == 0 && v > 1 {
			recs = append(recs, trec{tg.Topic, tg.Task.Partition, [2][]byte{statestore.StateKey(id), nil}})
			touched = append(touched, touch{tg.Task, id, v - 1, true})
			continue
		}
		recs = append(recs,
			trec{tg.Topic, tg.Task.Partition, stateKV(id, v, fmt.Sprintf("%s-%s-%d-%v", tg.Task, id, v, commit))},
			trec{tg.Topic, tg.Task.Partition, journalKV(t, id, journal(id, v, 1))})
		touched = append(touched, touch{tg.Task, id, v, false})
	}
	p.txAny(ctx, commit, recs...)
	if commit {
		for _, tc := range touched {
			w.version[tc.task][tc.id] = tc.version
			w.deleted[tc.task][tc.id] = tc.tomb
		}
	}
}

// check asserts the committed model: each live entity's state has its
// committed version, tombstoned or untouched ones have none.
func (w *workload) check(t *testing.T, s *statestore.Store) {
	t.Helper()
	for _, tg := range w.targets {
		for _, id := range w.ids {
			v := w.version[tg.Task][id]
			if v == 0 || w.deleted[tg.Task][id] {
				assertNoState(t, s, tg.Task, id)
				continue
			}
			assertState(t, s, tg.Task, id, v, fmt.Sprintf("%s-%s-%d-true", tg.Task, id, v))
		}
	}
}

// TestTailerConvergesWithRestore: a standby tails four tasks on two topics
// while transactions, some aborted, are written; it ends with the store and
// checkpoints a restore into a fresh store gets, and a lag of 0.
func TestTailerConvergesWithRestore(t *testing.T) {
	ctx := testCtx(t)
	brokers := newCluster(t, kfake.SeedTopics(2, topic2))
	p := newTxProducer(t, brokers)
	var targets []changelog.Target
	for _, tp := range []struct{ typ, topic string }{{typ, topic}, {typ2, topic2}} {
		for part := int32(0); part < 2; part++ {
			targets = append(targets, changelog.Target{Task: statestore.Task{Type: tp.typ, Partition: part}, Topic: tp.topic})
		}
	}
	ids := []string{"a", "b", "c", "d", "e"}
	w := newWorkload(1, targets, ids)
	// Some history before the standby starts.
	for i := 0; i < 10; i++ {
		w.next(ctx, t, p, i%3 != 2)
	}

	standby := newStore(t)
	tl := startTailer(t, standby, brokers)
	must(t, tl.Add(targets...))
	for i := 0; i < 50; i++ {
		w.next(ctx, t, p, i%3 != 1)
		if i%10 == 0 {
			time.Sleep(5 * time.Millisecond) // let the standby catch up in between
		}
	}
	// End on an aborted transaction on every partition: its marker too
	// must be passed for a lag of 0.
	var abort []trec
	for _, tg := range targets {
		abort = append(abort, trec{tg.Topic, tg.Task.Partition, stateKV("a", 999, "aborted")})
	}
	p.txAny(ctx, false, abort...)

	waitCaughtUp(t, ctx, brokers, tl, standby, targets...)
	fresh := newStore(t)
	if _, err := changelog.Restore(ctx, fresh, restoreOpts(brokers), targets, nil); err != nil {
		t.Fatal(err)
	}
	for _, tg := range targets {
		assertSameStores(t, standby, fresh, tg.Task, ids, 999)
	}
	w.check(t, standby)

	// A restore over the standby's store (what a promotion does) reads nothing.
	res, err := changelog.Restore(ctx, standby, restoreOpts(brokers), targets, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tg := range targets {
		if res.Records[tg.Task] != 0 {
			t.Fatalf("promotion restore read %v, want nothing", res.Records)
		}
	}
}

// TestTailerRemoveAndAddAgain: after Remove returns, nothing more is written
// for the task even while records keep arriving; adding it again resumes
// from its checkpoint, not from the start of the changelog.
func TestTailerRemoveAndAddAgain(t *testing.T) {
	ctx := testCtx(t)
	brokers := newCluster(t)
	p := newTxProducer(t, brokers)
	t0 := changelog.Target{Task: statestore.Task{Type: typ, Partition: 0}, Topic: topic}
	t1 := changelog.Target{Task: statestore.Task{Type: typ, Partition: 1}, Topic: topic}

	// "first" is written once, at offset 0, and never again.
	p.txAny(ctx, true, trec{topic, 0, stateKV("first", 1, "first")}, trec{topic, 1, stateKV("x", 1, "x1")})

	standby := newStore(t)
	tl := startTailer(t, standby, brokers)
	must(t, tl.Add(t0, t1))
	waitCaughtUp(t, ctx, brokers, tl, standby, t0, t1)
	assertState(t, standby, t0.Task, "first", 1, "first")

	// A producer keeps writing to partition 0 while Remove runs.
	var started atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	stopProducer := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopProducer() // also when the test fails: no t.Error after it ended
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := int64(1); ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			started.Store(i)
			id := fmt.Sprintf("r%d", i)
			p.txAny(ctx, true, trec{topic, 0, stateKV(id, 1, id)}, trec{topic, 0, journalKV(t, id, journal(id, 1, 1))})
		}
	}()
	for started.Load() < 10 {
		time.Sleep(time.Millisecond)
	}
	must(t, tl.Remove(ctx, t0.Task))
	after := started.Load() + 1 // this and later transactions began after Remove returned
	cp, err := standby.Checkpoint(t0.Task)
	must(t, err)
	if _, ok := tl.Lag(t0.Task); ok {
		t.Fatal("Lag of a removed task: ok")
	}
	for started.Load() < after+10 {
		time.Sleep(time.Millisecond)
	}
	stopProducer()
	last := started.Load()

	// Partition 1 moves on and is applied: the tailer has polled past the
	// records of partition 0 that arrived after Remove.
	p.txAny(ctx, true, trec{topic, 1, stateKV("x", 2, "x2")})
	waitCaughtUp(t, ctx, brokers, tl, standby, t1)
	time.Sleep(300 * time.Millisecond) // more than FetchMaxWait
	assertCheckpoint(t, standby, t0.Task, cp)
	for i := after; i <= last; i++ {
		assertNoState(t, standby, t0.Task, fmt.Sprintf("r%d", i))
	}
	assertState(t, standby, t1.Task, "x", 2, "x2")

	// Mark "first" locally: a tailer that re-applied partition 0 from the
	// start would overwrite it.
	b := standby.NewBatch()
	must(t, b.Set(t0.Task, statestore.StateKey("first"), stateKV("first", 7, "sentinel")[1]))
	must(t, b.Commit())

	must(t, tl.Add(t0))
	waitCaughtUp(t, ctx, brokers, tl, standby, t0, t1)
	assertState(t, standby, t0.Task, "first", 7, "sentinel")
	fresh := newStore(t)
	if _, err := changelog.Restore(ctx, fresh, restoreOpts(brokers), []changelog.Target{t0, t1}, nil); err != nil {
		t.Fatal(err)
	}
	ids := []string{"x"}
	for i := int64(1); i <= last; i++ {
		ids = append(ids, fmt.Sprintf("r%d", i))
	}
	assertSameStores(t, standby, fresh, t0.Task, ids, 1)
	assertSameStores(t, standby, fresh, t1.Task, ids, 2)
	for i := int64(1); i <= last; i++ {
		id := fmt.Sprintf("r%d", i)
		assertState(t, standby, t0.Task, id, 1, id)
	}
}

// TestTailerRemoveUnderLoad removes and adds tasks repeatedly while records
// arrive; each time Remove returns, the checkpoint stays put until the task
// is added again, and the standby still converges.
func TestTailerRemoveUnderLoad(t *testing.T) {
	ctx := testCtx(t)
	brokers := newCluster(t)
	p := newTxProducer(t, brokers)
	targets := []changelog.Target{
		{Task: statestore.Task{Type: typ, Partition: 0}, Topic: topic},
		{Task: statestore.Task{Type: typ, Partition: 1}, Topic: topic},
	}
	ids := []string{"a", "b", "c"}
	w := newWorkload(2, targets, ids)
	standby := newStore(t)
	tl := startTailer(t, standby, brokers)
	must(t, tl.Add(targets...))

	stop := make(chan struct{})
	done := make(chan struct{})
	stopProducer := sync.OnceFunc(func() { close(stop); <-done })
	defer stopProducer()
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			w.next(ctx, t, p, i%4 != 3)
		}
	}()
	for round := 0; round < 5; round++ {
		time.Sleep(20 * time.Millisecond)
		tg := targets[round%2]
		must(t, tl.Remove(ctx, tg.Task))
		cp, err := standby.Checkpoint(tg.Task)
		must(t, err)
		time.Sleep(50 * time.Millisecond)
		assertCheckpoint(t, standby, tg.Task, cp)
		must(t, tl.Add(tg))
	}
	stopProducer()
	waitCaughtUp(t, ctx, brokers, tl, standby, targets...)
	fresh := newStore(t)
	if _, err := changelog.Restore(ctx, fresh, restoreOpts(brokers), targets, nil); err != nil {
		t.Fatal(err)
	}
	for _, tg := range targets {
		assertSameStores(t, standby, fresh, tg.Task, ids, 1000)
	}
	w.check(t, standby)
}

func TestTailerAddRemoveErrors(t *testing.T) {
	ctx := testCtx(t)
	brokers := newCluster(t)
	standby := newStore(t)
	tl := startTailer(t, standby, brokers)
	t0 := changelog.Target{Task: statestore.Task{Type: typ, Partition: 0}, Topic: topic}
	must(t, tl.Add(t0))
	if err := tl.Add(t0); err == nil {
		t.Fatal("adding a tailed task again: no error")
	}
	other := changelog.Target{Task: statestore.Task{Type: "other", Partition: 0}, Topic: topic}
	if err := tl.Add(other); err == nil {
		t.Fatal("two tasks on one partition: no error")
	}
	t1 := changelog.Target{Task: statestore.Task{Type: typ, Partition: 1}, Topic: topic}
	if err := tl.Add(t1, t1); err == nil {
		t.Fatal("one task twice in one Add: no error")
	}
	if _, ok := tl.Lag(t1.Task); ok {
		t.Fatal("a failed Add added a task")
	}
	if _, ok := tl.Lag(statestore.Task{Type: "nope"}); ok {
		t.Fatal("Lag of an unknown task: ok")
	}
	must(t, tl.Remove(ctx, statestore.Task{Type: "nope"}))
	// An empty partition reports its end: lag 0.
	waitCaughtUp(t, ctx, brokers, tl, standby, t0)
}

func TestTailerCloseStopsRun(t *testing.T) {
	brokers := newCluster(t)
	tl, err := changelog.NewTailer(newStore(t), restoreOpts(brokers), nil)
	if err != nil {
		t.Fatal(err)
	}
	must(t, tl.Add(changelog.Target{Task: statestore.Task{Type: typ, Partition: 0}, Topic: topic}))
	done := make(chan error, 1)
	go func() { done <- tl.Run(context.Background()) }()
	time.Sleep(50 * time.Millisecond)
	tl.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after Close")
	}
}
