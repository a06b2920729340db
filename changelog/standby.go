package changelog

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/statestore"
)

// Tailer keeps standby tasks' stores up to date by tailing their changelog
// partitions with its own non-group, read_committed consumer, applying
// records with Apply and the checkpoint in the same batch (the batches a
// Restore writes), so that promoting a standby to active restores only the
// remaining tail.
//
// Invariant: a task is never tailed and processed as active at the same
// time. The engine calls Remove, and waits for it to return, before it
// restores a task to promote it; when Remove returns, the Tailer will never
// write to that task's key range again (until it is added anew). Adding a
// task the node processes as active would interleave two writers of one
// checkpoint.
//
// One goroutine runs Run; Add, Remove and Lag may be called from any
// goroutine. A lock (sem) is held while one poll's records are applied and
// committed, so Remove waits for an in-flight batch, and records of a task
// removed meanwhile — buffered in the client or already polled — are
// dropped under that lock.
type Tailer struct {
	store *statestore.Store
	log   *slog.Logger
	cl    *kgo.Client

	sem    chan struct{} // a lock that a context can abandon
	byTP   map[topicPartition]*tailed
	byTask map[statestore.Task]topicPartition
	gen    uint64        // incremented by every Add
	wake   chan struct{} // Add wakes the end lister
}

// endsEvery is how often Run lists the ends of the tailed partitions. A
// fetch reports the end only when it returns records, so the listing is
// what tells the lag of a partition that has none to read (or had none
// since the last one).
const endsEvery = time.Second

type topicPartition struct {
	topic     string
	partition int32
}

// tailed is the state of one tailed task, guarded by sem.
type tailed struct {
	task statestore.Task
	gen  uint64 // the Tailer's gen when the task was added
	next int64  // next changelog offset to apply (= the store checkpoint)
	end  int64  // end of the partition (LSO) from a fetch or a listing; -1: unknown
}

// NewTailer creates a Tailer over store. clientOpts must hold at least the
// seed brokers and no consumer group or consume option; the Tailer adds its
// own consumer options. It starts with no task: see Add.
func NewTailer(store *statestore.Store, clientOpts []kgo.Opt, log *slog.Logger) (*Tailer, error) {
	opts := append(append([]kgo.Opt{}, clientOpts...),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		// Transaction markers move the checkpoint past the end of the last
		// transaction, committed or aborted, so a caught-up standby has a
		// lag of 0 and its promotion reads nothing.
		kgo.KeepControlRecords(),
		// A checkpoint below the log start (records deleted) resumes at
		// the start, as Restore does.
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
	)
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, err
	}
	return &Tailer{
		store:  store,
		log:    log,
		cl:     cl,
		sem:    make(chan struct{}, 1),
		byTP:   map[topicPartition]*tailed{},
		byTask: map[statestore.Task]topicPartition{},
		wake:   make(chan struct{}, 1),
	}, nil
}

func (t *Tailer) lock(ctx context.Context) error {
	select {
	case t.sem <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (t *Tailer) unlock() { <-t.sem }

// Add starts tailing each target's changelog partition from its task's
// checkpoint in the store. Adding a task already tailed, or two tasks on one
// changelog partition, is an error (and adds none of the targets).
func (t *Tailer) Add(targets ...Target) error {
	if len(targets) == 0 {
		return nil
	}
	_ = t.lock(context.Background())
	defer t.unlock()
	seenTask := map[statestore.Task]bool{}
	seenTP := map[topicPartition]bool{}
	for _, tg := range targets {
		tp := topicPartition{tg.Topic, tg.Task.Partition}
		if _, ok := t.byTask[tg.Task]; ok || seenTask[tg.Task] {
			return fmt.Errorf("changelog: standby task %s is already tailed", tg.Task)
		}
		if _, ok := t.byTP[tp]; ok || seenTP[tp] {
			return fmt.Errorf("changelog: %s[%d] is already tailed", tg.Topic, tg.Task.Partition)
		}
		seenTask[tg.Task], seenTP[tp] = true, true
	}
	cps := make([]int64, len(targets))
	for i, tg := range targets {
		cp, err := t.store.Checkpoint(tg.Task)
		if err != nil {
			return err
		}
		cps[i] = cp
	}
	t.gen++
	consume := map[string]map[int32]kgo.Offset{}
	for i, tg := range targets {
		tp := topicPartition{tg.Topic, tg.Task.Partition}
		t.byTP[tp] = &tailed{task: tg.Task, gen: t.gen, next: cps[i], end: -1}
		t.byTask[tg.Task] = tp
		if consume[tg.Topic] == nil {
			consume[tg.Topic] = map[int32]kgo.Offset{}
		}
		consume[tg.Topic][tg.Task.Partition] = kgo.NewOffset().At(cps[i])
	}
	t.cl.AddConsumePartitions(consume)
	select {
	case t.wake <- struct{}{}:
	default:
	}
	return nil
}

// Remove stops tailing the tasks (tasks not tailed are ignored). It waits
// for a batch being applied to end; when it returns nil, no further write
// for those tasks will happen. It returns ctx's error if ctx ends first, and
// then the tasks are still tailed.
func (t *Tailer) Remove(ctx context.Context, tasks ...statestore.Task) error {
	if err := t.lock(ctx); err != nil {
		return err
	}
	defer t.unlock()
	remove := map[string][]int32{}
	for _, task := range tasks {
		tp, ok := t.byTask[task]
		if !ok {
			continue
		}
		delete(t.byTask, task)
		delete(t.byTP, tp)
		remove[tp.topic] = append(remove[tp.topic], tp.partition)
	}
	// Drops buffered fetches and invalidates fetches in flight for these
	// partitions; records already polled are dropped by Run, which looks
	// the task up under the lock.
	t.cl.RemoveConsumePartitions(remove)
	return nil
}

// Lag returns how many offsets the task's store is behind the end of its
// changelog partition (the last stable offset, transaction markers
// included), for metrics and for a standby's stale reads. The end is the
// newest of what the last fetch reported and what Run lists every second,
// so a lag may be up to a second old. ok is false when the task is not
// tailed or its end is not known yet (just added).
func (t *Tailer) Lag(task statestore.Task) (records int64, ok bool) {
	_ = t.lock(context.Background())
	defer t.unlock()
	tp, ok := t.byTask[task]
	if !ok {
		return 0, false
	}
	s := t.byTP[tp]
	if s.end < 0 {
		return 0, false
	}
	return max(s.end-s.next, 0), true
}

// Run polls the tailed partitions and applies their records until ctx is
// done or the Tailer is closed (then it returns nil). Fetch errors are
// logged and retried by the client. A record that cannot be applied or a
// batch that cannot be committed stops Run with an error; the store then
// holds whole batches with their checkpoints, and the Tailer must be closed.
func (t *Tailer) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	listed := make(chan struct{})
	go func() {
		defer close(listed)
		t.listEnds(ctx)
	}()
	defer func() {
		cancel()
		<-listed
	}()
	var lastWarn time.Time
	for {
		if err := t.lock(ctx); err != nil {
			return nil
		}
		pollGen := t.gen
		t.unlock()

		fetches := t.cl.PollFetches(ctx)
		if ctx.Err() != nil || t.cl.Context().Err() != nil {
			return nil
		}
		closed := false
		fetches.EachError(func(topic string, p int32, err error) {
			if errors.Is(err, kgo.ErrClientClosed) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
				closed = true
				return
			}
			if t.log != nil && time.Since(lastWarn) > 5*time.Second {
				lastWarn = time.Now()
				t.log.Warn("standby: changelog fetch failed", "topic", topic, "partition", p, "err", err)
			}
		})
		if closed {
			return nil
		}
		if err := t.apply(ctx, fetches, pollGen); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
}

// listEnds lists the last stable offsets of the tailed partitions every
// endsEvery and after every Add, until ctx ends or the client is closed.
func (t *Tailer) listEnds(ctx context.Context) {
	adm := kadm.NewClient(t.cl)
	tick := time.NewTicker(endsEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.cl.Context().Done():
			return
		case <-tick.C:
		case <-t.wake:
		}
		if err := t.lock(ctx); err != nil {
			return
		}
		topics := map[string]bool{}
		for tp := range t.byTP {
			topics[tp.topic] = true
		}
		t.unlock()
		if len(topics) == 0 {
			continue
		}
		names := make([]string, 0, len(topics))
		for tp := range topics {
			names = append(names, tp)
		}
		ends, err := adm.ListCommittedOffsets(ctx, names...)
		if err != nil {
			continue // logged by nobody: the fetches report broker trouble
		}
		if err := t.lock(ctx); err != nil {
			return
		}
		ends.Each(func(o kadm.ListedOffset) {
			if s := t.byTP[topicPartition{o.Topic, o.Partition}]; s != nil && o.Err == nil && o.Offset > s.end {
				s.end = o.Offset
			}
		})
		t.unlock()
	}
}

// apply applies one poll's records in one batch, under the lock.
func (t *Tailer) apply(ctx context.Context, fetches kgo.Fetches, pollGen uint64) error {
	if err := t.lock(ctx); err != nil {
		return err
	}
	defer t.unlock()
	b := t.store.NewBatch()
	type update struct {
		s         *tailed
		next, end int64
	}
	var (
		updates []update
		rewind  map[string]map[int32]kgo.EpochOffset
		err     error
	)
	pending := map[*tailed]int{} // index in updates
	fetches.EachPartition(func(fp kgo.FetchTopicPartition) {
		if err != nil {
			return
		}
		s := t.byTP[topicPartition{fp.Topic, fp.Partition}]
		if s == nil {
			return // removed: drop whatever was buffered for it
		}
		if s.gen > pollGen {
			// Added while this poll was under way: the records may come
			// from an assignment removed before this one. Drop them and
			// fetch again from the task's checkpoint.
			if len(fp.Records) > 0 {
				if rewind == nil {
					rewind = map[string]map[int32]kgo.EpochOffset{}
				}
				if rewind[fp.Topic] == nil {
					rewind[fp.Topic] = map[int32]kgo.EpochOffset{}
				}
				rewind[fp.Topic][fp.Partition] = kgo.EpochOffset{Epoch: -1, Offset: s.next}
			}
			return
		}
		i, ok := pending[s]
		if !ok {
			i = len(updates)
			pending[s] = i
			updates = append(updates, update{s: s, next: s.next, end: s.end})
		}
		u := &updates[i]
		if u.next, _, _, err = applyFetched(b, s.task, fp.Records, u.next, -1); err != nil {
			return
		}
		end := fp.HighWatermark
		if fp.LastStableOffset >= 0 {
			end = fp.LastStableOffset
		}
		if end > u.end { // a listing may have seen a newer end
			u.end = end
		}
	})
	if rewind != nil {
		t.cl.SetOffsets(rewind)
	}
	if err != nil {
		b.Discard()
		return fmt.Errorf("changelog: standby: %w", err)
	}
	if b.Len() > 0 {
		if err := b.Commit(); err != nil {
			return fmt.Errorf("changelog: standby: apply changelog records: %w", err)
		}
	} else {
		b.Discard()
	}
	for _, u := range updates {
		u.s.next, u.s.end = u.next, u.end
	}
	return nil
}

// Close closes the Tailer's client; a Run under way returns. Close does not
// wait for Run: cancel its context and wait for it to return before closing
// the store.
func (t *Tailer) Close() { t.cl.Close() }
