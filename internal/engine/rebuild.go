package engine

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/changelog"
	"github.com/esker-io/esker/statestore"
)

// Rebuilds. A task's state records are a fold of its entities' events
// with the aggregate's evolve; when evolve changes (the type's
// aggregate.StateVersion is bumped), or on demand (Rebuild), the state is
// folded anew from "<type>-events":
//
//  1. a goroutine replays the partition of the events topic, read_committed,
//     from its start, through the engine's own fold (evolve below, with
//     upcasting by the definition's DecodeEvent), into a staging task: a
//     separate key prefix ("<type>~rebuild"), the live state untouched;
//  2. an online rebuild (the task keeps serving from the old generation)
//     then tails the events the node's cycles keep committing until it has
//     folded all of them;
//  3. the run loop, between two cycles — no transaction of the task in
//     flight, nothing committed unfolded — folds the last events, writes to
//     the changelog a state version of 0 ("mixed"), every rebuilt state
//     record, a tombstone for every entity the new fold has no state for and
//     the new state version, in transactions; once they committed, it swaps
//     the staging records in place of the task's state records, with the
//     version and the checkpoint, in one store batch.
//
// A task restored with another state version than its type's is not served
// (reads and commands answer 503, its commands stay paused) until its
// rebuild has swapped. A restore from the changelog after a rebuild reads the
// new records after the old ones: the newest record of a key wins, so it gets
// the new fold and the new version; one cut short shows version 0 and
// rebuilds again.

// RebuildStatus is the progress of one task's rebuild.
type RebuildStatus struct {
	Type      string
	Partition int32
	// ID numbers the rebuilds of this node since it started.
	ID int64
	// State is running, swapping, done, failed or cancelled.
	State string
	// Online: the old generation serves while it runs (Rebuild); otherwise
	// the task waits for it (its state version changed).
	Online      bool
	Reason      string
	FromVersion int64
	ToVersion   int64
	// Replayed is how far it has read the events partition, Total how far
	// it must read (both in records, from the partition's start).
	Replayed, Total int64
	Events          int64 // events folded
	EventsPerSecond float64
	Error           string
	StartedAt       time.Time
	FinishedAt      time.Time
}

// Percent is Replayed of Total (100 for an empty partition).
func (s RebuildStatus) Percent() float64 {
	if s.Total <= 0 {
		return 100
	}
	return min(100, 100*float64(s.Replayed)/float64(s.Total))
}

// Rebuild states.
const (
	RebuildRunning   = "running"
	RebuildSwapping  = "swapping"
	RebuildDone      = "done"
	RebuildFailed    = "failed"
	RebuildCancelled = "cancelled"
)

// TestHookRebuildReplayed, when set, runs in a rebuild after it has
// replayed the events partition up to its end, before it tails and swaps:
// tests hold rebuilds with it. It must return when ctx ends.
var TestHookRebuildReplayed atomic.Pointer[func(ctx context.Context, t statestore.Task)]

// rebuildLogInterval is how often a running rebuild logs its progress.
var rebuildLogInterval = 3 * time.Second

// swapChunk bounds the changelog records one swap transaction writes.
const swapChunk = 5000

// errNotCaughtUp: the swap found events the rebuild has not folded yet and
// could not read them in time; the rebuild tails on and asks again.
var errNotCaughtUp = errors.New("rebuild: not caught up with the events yet")

// ErrUnknownType is returned by Rebuild for a type not registered here.
var ErrUnknownType = errors.New("unknown aggregate type")

// stagingTask is where rebuild id folds a task's new state: a key prefix
// no task type can have (type names have no '~'), its own per rebuild.
func stagingTask(t statestore.Task, id int64) statestore.Task {
	return statestore.Task{Type: fmt.Sprintf("%s~rebuild~%d", t.Type, id), Partition: t.Partition}
}

// errStale: the task the rebuild works for was revoked or restored again.
var errStale = errors.New("the partition was revoked or restored again during the rebuild; start it again")

// evolve folds one event into an entity's state: the engine's one fold,
// used by the write path (decide) and by rebuilds, so both compute the
// same state from the same events.
func evolve(def aggregate.Definition, state any, event any) any {
	return def.Evolve(state, event)
}

type rebuild struct {
	e      *Engine
	task   statestore.Task
	staged statestore.Task
	def    aggregate.Definition
	ts     *taskState // the assignment it rebuilds for
	online bool
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	// swapped carries the run loop's answer to a swap request.
	swapped chan error

	// The goroutine's, and the run loop's while the goroutine waits for
	// the answer to a swap request.
	cl               *kgo.Client
	start, next, end int64 // events offsets
	lastLog          time.Time
	lastLogEvents    int64
	events           int64 // folded by this attempt

	mu     sync.Mutex
	status RebuildStatus
}

func (r *rebuild) snapshot() RebuildStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.status
	if end := s.FinishedAt; !end.IsZero() || s.State == RebuildRunning || s.State == RebuildSwapping {
		if end.IsZero() {
			end = time.Now()
		}
		if d := end.Sub(s.StartedAt).Seconds(); d > 0 {
			s.EventsPerSecond = float64(s.Events) / d
		}
	}
	return s
}

func (r *rebuild) update(fn func(*RebuildStatus)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	fn(&r.status)
}

// Rebuild starts an online rebuild of every task of the aggregate type this
// node owns and serves (restored): the old generation keeps serving until
// the swap. A task already rebuilding keeps its rebuild. It returns the
// rebuilds of the type's tasks here; ErrUnknownType for a type not
// registered on this node.
func (e *Engine) Rebuild(typ string) ([]RebuildStatus, error) {
	def, ok := e.types[typ]
	if !ok {
		return nil, fmt.Errorf("%w %q", ErrUnknownType, typ)
	}
	type owned struct {
		t  statestore.Task
		ts *taskState
	}
	var tasks []owned
	e.mu.RLock()
	for t, ts := range e.tasks {
		if t.Type == typ && ts.restored {
			tasks = append(tasks, owned{t, ts})
		}
	}
	e.mu.RUnlock()
	var out []RebuildStatus
	for _, o := range tasks {
		v, err := e.cfg.Store.StateVersion(o.t)
		if err != nil {
			return nil, err
		}
		r := e.startRebuild(o.t, o.ts, def, true, "requested", v)
		out = append(out, r.snapshot())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Partition < out[j].Partition })
	return out, nil
}

// RebuildStatuses returns the newest rebuild of each task of the type that
// this node ran since it started (running or finished), by partition.
func (e *Engine) RebuildStatuses(typ string) []RebuildStatus {
	e.rebuildMu.Lock()
	rs := make([]*rebuild, 0, len(e.rebuildLast))
	for t, r := range e.rebuildLast {
		if t.Type == typ {
			rs = append(rs, r)
		}
	}
	e.rebuildMu.Unlock()
	out := make([]RebuildStatus, 0, len(rs))
	for _, r := range rs {
		out = append(out, r.snapshot())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Partition < out[j].Partition })
	return out
}

// TaskRebuild returns the task's rebuild in progress, if any.
func (e *Engine) TaskRebuild(t statestore.Task) (RebuildStatus, bool) {
	e.rebuildMu.Lock()
	r := e.rebuilds[t]
	e.rebuildMu.Unlock()
	if r == nil {
		return RebuildStatus{}, false
	}
	return r.snapshot(), true
}

// startRebuild starts a rebuild of the task, or returns the one running.
func (e *Engine) startRebuild(t statestore.Task, ts *taskState, def aggregate.Definition, online bool, reason string, from int64) *rebuild {
	e.rebuildMu.Lock()
	defer e.rebuildMu.Unlock()
	if r := e.rebuilds[t]; r != nil {
		if r.ts == ts {
			return r
		}
		r.cancel() // for an earlier assignment; it ends on its own
	}
	if e.rebuilds == nil {
		e.rebuilds = map[statestore.Task]*rebuild{}
		e.rebuildLast = map[statestore.Task]*rebuild{}
	}
	e.rebuildSeq++
	ctx, cancel := context.WithCancel(context.Background())
	r := &rebuild{
		e: e, task: t, staged: stagingTask(t, e.rebuildSeq), def: def, ts: ts, online: online,
		ctx: ctx, cancel: cancel, done: make(chan struct{}), swapped: make(chan error, 1),
		status: RebuildStatus{Type: t.Type, Partition: t.Partition, ID: e.rebuildSeq, State: RebuildRunning,
			Online: online, Reason: reason, FromVersion: from, ToVersion: int64(def.StateVersion()), StartedAt: time.Now()},
	}
	e.rebuilds[t] = r
	e.rebuildLast[t] = r
	if m := e.cfg.Metrics; m != nil {
		m.RebuildsInProgress.WithLabelValues(t.Type).Inc()
	}
	e.log.Info("rebuilding state from events", "task", t.String(), "online", online, "reason", reason,
		"from_version", from, "to_version", def.StateVersion())
	go r.run()
	return r
}

// stopRebuilds cancels the rebuilds of the tasks stop selects (all when
// nil) and waits for them to return.
func (e *Engine) stopRebuilds(stop func(statestore.Task) bool) {
	e.rebuildMu.Lock()
	var rs []*rebuild
	for t, r := range e.rebuilds {
		if stop == nil || stop(t) {
			rs = append(rs, r)
		}
	}
	e.rebuildMu.Unlock()
	for _, r := range rs {
		r.cancel()
	}
	for _, r := range rs {
		<-r.done
	}
}

// noteEvents records the end of the events a committed cycle wrote for a
// task (the offset after its last event): an online rebuild must have
// folded up to there before it swaps.
func (e *Engine) noteEvents(t statestore.Task, end int64) {
	e.rebuildMu.Lock()
	defer e.rebuildMu.Unlock()
	if e.eventsEnd == nil {
		e.eventsEnd = map[statestore.Task]int64{}
	}
	e.eventsEnd[t] = max(e.eventsEnd[t], end)
}

// current reports whether the engine still owns the task for the
// assignment the rebuild works for.
func (r *rebuild) current() bool {
	r.e.mu.RLock()
	defer r.e.mu.RUnlock()
	return r.e.tasks[r.task] == r.ts
}

func (r *rebuild) target() int64 {
	r.e.rebuildMu.Lock()
	defer r.e.rebuildMu.Unlock()
	return max(r.end, r.e.eventsEnd[r.task])
}

func (r *rebuild) run() {
	e := r.e
	defer close(r.done)
	var err error
	if r.online {
		err = r.attempt()
	} else if !retry(r.ctx, e.log, "rebuild of "+r.task.String(), func() error {
		err := r.attempt()
		if err != nil && r.ctx.Err() == nil {
			r.update(func(s *RebuildStatus) { s.Error = err.Error() })
		}
		return err
	}) {
		err = r.ctx.Err()
	}
	if err != nil {
		// Nothing was swapped: the staging data is garbage.
		if dropErr := e.cfg.Store.DropTask(r.staged); dropErr != nil {
			e.log.Warn("dropping a rebuild's staging state", "task", r.task.String(), "err", dropErr)
		}
	}
	st := r.snapshot()
	r.update(func(s *RebuildStatus) {
		s.FinishedAt = time.Now()
		switch {
		case err == nil:
			s.State, s.Error, s.Replayed = RebuildDone, "", s.Total
		case r.ctx.Err() != nil:
			s.State, s.Error = RebuildCancelled, "the rebuild was cancelled: this node no longer owns the partition, or it stopped"
		default:
			s.State, s.Error = RebuildFailed, err.Error()
		}
	})
	e.rebuildMu.Lock()
	if e.rebuilds[r.task] == r {
		delete(e.rebuilds, r.task)
	}
	e.rebuildMu.Unlock()
	if m := e.cfg.Metrics; m != nil {
		m.RebuildsInProgress.WithLabelValues(r.task.Type).Dec()
	}
	switch {
	case err == nil:
		e.log.Info("rebuild done: serving the new state", "task", r.task.String(), "events", st.Events,
			"duration", time.Since(st.StartedAt).Round(time.Millisecond), "state_version", st.ToVersion)
	case r.ctx.Err() != nil:
		e.log.Info("rebuild cancelled", "task", r.task.String())
	default:
		e.log.Error("rebuild failed; the old state keeps serving", "task", r.task.String(), "err", err)
	}
}

// attempt runs steps 1–3 once.
func (r *rebuild) attempt() error {
	e := r.e
	store := e.cfg.Store
	if !r.current() {
		return errStale
	}
	if err := store.DropTask(r.staged); err != nil {
		return err
	}
	topic := EventsTopic(r.task.Type)
	start, end, err := r.bounds(topic)
	if err != nil {
		return err
	}
	cl, err := kgo.NewClient(append(slices.Clone(e.cfg.ClientOpts),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: {r.task.Partition: kgo.NewOffset().At(start)}}),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		// Markers move the position past the end of a transaction.
		kgo.KeepControlRecords(),
		kgo.FetchMaxWait(200*time.Millisecond),
	)...)
	if err != nil {
		return err
	}
	defer cl.Close()
	r.cl, r.start, r.next, r.end, r.events = cl, start, start, end, 0
	r.lastLog, r.lastLogEvents = time.Now(), 0
	r.update(func(s *RebuildStatus) { s.Replayed, s.Total, s.Events, s.Error = 0, end-start, 0, "" })
	for r.next < r.end {
		if err := r.poll(r.ctx); err != nil {
			return err
		}
	}
	if h := TestHookRebuildReplayed.Load(); h != nil {
		(*h)(r.ctx, r.task)
	}
	for {
		if r.online {
			// Tail what the node's cycles commit meanwhile.
			for r.next < r.target() {
				ctx, cancel := context.WithTimeout(r.ctx, time.Second)
				err := r.poll(ctx)
				cancel()
				if err != nil {
					return err
				}
			}
		}
		if err := r.ctx.Err(); err != nil {
			return err
		}
		r.e.log.Debug("rebuild asks for the swap", "task", r.task.String())
		r.e.rebuildMu.Lock()
		r.e.swaps = append(r.e.swaps, r)
		r.e.rebuildMu.Unlock()
		r.e.wakeRunLoop()
		select {
		case err := <-r.swapped:
			if errors.Is(err, errNotCaughtUp) {
				continue
			}
			return err
		case <-r.ctx.Done():
			return r.ctx.Err()
		}
	}
}

// bounds returns the start of the events partition and its end once no
// transaction open at the call is: every event committed so far lies
// before it.
func (r *rebuild) bounds(topic string) (start, end int64, err error) {
	admCl, err := kgo.NewClient(r.e.cfg.ClientOpts...)
	if err != nil {
		return 0, 0, err
	}
	defer admCl.Close()
	adm := kadm.NewClient(admCl)
	p := r.task.Partition
	lookup := func(l kadm.ListedOffsets, err error) (int64, error) {
		if err != nil {
			return 0, err
		}
		o, ok := l.Lookup(topic, p)
		if !ok {
			return 0, fmt.Errorf("no offset listed for %s[%d]", topic, p)
		}
		return o.Offset, o.Err
	}
	if start, err = lookup(adm.ListStartOffsets(r.ctx, topic)); err != nil {
		return 0, 0, fmt.Errorf("rebuild: list the start of %s: %w", topic, err)
	}
	high, err := lookup(adm.ListEndOffsets(r.ctx, topic))
	if err != nil {
		return 0, 0, fmt.Errorf("rebuild: list the end of %s: %w", topic, err)
	}
	for {
		if end, err = lookup(adm.ListCommittedOffsets(r.ctx, topic)); err != nil {
			return 0, 0, fmt.Errorf("rebuild: list the last stable offset of %s: %w", topic, err)
		}
		if end >= high {
			return start, high, nil
		}
		select {
		case <-r.ctx.Done():
			return 0, 0, r.ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// poll folds one poll's events into the staging task. A ctx that ends is
// no error unless it is the rebuild's.
func (r *rebuild) poll(ctx context.Context) error {
	fetches := r.cl.PollFetches(ctx)
	if err := r.ctx.Err(); err != nil {
		return err
	}
	var err error
	fetches.EachError(func(topic string, p int32, fe error) {
		if !errors.Is(fe, context.Canceled) && !errors.Is(fe, context.DeadlineExceeded) && err == nil {
			err = fmt.Errorf("rebuild: fetch %s[%d]: %w", topic, p, fe)
		}
	})
	if err != nil {
		return err
	}
	var records []*kgo.Record
	fetches.EachRecord(func(rec *kgo.Record) { records = append(records, rec) })
	if len(records) == 0 {
		return nil
	}
	if err := r.fold(records); err != nil {
		return err
	}
	r.report()
	return nil
}

// fold folds the records through the engine's fold into the staging task,
// in one store batch.
func (r *rebuild) fold(records []*kgo.Record) (err error) {
	e, def := r.e, r.def
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("rebuild of %s: evolve panicked: %v", r.task, p)
		}
	}()
	ents := map[string]*entity{}
	var order []*entity
	var folded int64
	next := r.next
	for _, rec := range records {
		if rec.Offset < next {
			continue
		}
		next = rec.Offset + 1
		if rec.Attrs.IsControl() {
			continue
		}
		hs := make([]aggregate.Header, 0, len(rec.Headers))
		for _, h := range rec.Headers {
			hs = append(hs, aggregate.Header{Key: h.Key, Value: h.Value})
		}
		ev, err := aggregate.EventFromRecord(rec.Key, hs, rec.Value)
		if err != nil {
			return fmt.Errorf("rebuild of %s: record at offset %d of %s: %w", r.task, rec.Offset, rec.Topic, err)
		}
		ent := ents[ev.EntityID]
		if ent == nil {
			if ent, err = loadEntity(r.ctx, e.cfg.Store, e.cfg.Keys, r.staged, def, ev.EntityID); err != nil {
				return fmt.Errorf("rebuild of %s: staged state of %q: %w", r.task, ev.EntityID, err)
			}
			ents[ev.EntityID] = ent
			order = append(order, ent)
		}
		if ev.Version <= ent.version {
			continue // written twice (at-least-once): the first one counts
		}
		if aggregate.IsForgotten(ev) {
			// Forgetting is no evolve: the entity keeps its marker.
			ent.markForgotten(def, ev.Version, ev.Time)
			folded++
			continue
		}
		// The normal read path: upcast, decode, open the personal fields.
		value, err := def.DecodeEvent(ev.Type, ev.SchemaVersion, ev.Data)
		if err == nil && ent.cipher != nil {
			value, err = aggregate.OpenPersonal(value, ent.cipher)
		}
		if err != nil {
			return fmt.Errorf("rebuild of %s: event %s version %d of %q (offset %d): %w", r.task, ev.Type, ev.Version, ev.EntityID, rec.Offset, err)
		}
		ent.state = evolve(def, ent.state, value)
		ent.version, ent.updatedAt, ent.dirty = ev.Version, ev.Time, true
		folded++
	}
	b := e.cfg.Store.NewBatch()
	for _, ent := range order {
		if !ent.dirty {
			continue
		}
		st, err := ent.stateRecord(def)
		if err != nil {
			b.Discard()
			return fmt.Errorf("rebuild of %s: encode the state of %q: %w", r.task, ent.id, err)
		}
		k, v := changelog.StateRecord(ent.id, st)
		if err := b.Set(r.staged, k, v); err != nil {
			b.Discard()
			return err
		}
	}
	if err := b.Commit(); err != nil {
		return fmt.Errorf("rebuild of %s: write staged state: %w", r.task, err)
	}
	r.next = next
	r.events += folded
	if m := e.cfg.Metrics; m != nil && folded > 0 {
		m.RebuildEvents.WithLabelValues(r.task.Type).Add(float64(folded))
	}
	return nil
}

// report updates the status and logs progress every rebuildLogInterval.
func (r *rebuild) report() {
	total := max(r.target(), r.end) - r.start
	replayed := r.next - r.start
	r.update(func(s *RebuildStatus) { s.Replayed, s.Total, s.Events = replayed, total, r.events })
	if now := time.Now(); now.Sub(r.lastLog) >= rebuildLogInterval {
		rate := float64(r.events-r.lastLogEvents) / now.Sub(r.lastLog).Seconds()
		r.lastLog, r.lastLogEvents = now, r.events
		pct := 100.0
		if total > 0 {
			pct = 100 * float64(replayed) / float64(total)
		}
		r.e.log.Info("rebuilding state from events", "task", r.task.String(),
			"done_percent", fmt.Sprintf("%.1f", pct), "replayed", replayed, "total", total,
			"events_per_second", int(rate))
	}
}

// wakeRunLoop makes the run loop's poll return, so that it serves swap
// requests at once.
func (e *Engine) wakeRunLoop() {
	e.pollMu.Lock()
	defer e.pollMu.Unlock()
	if e.cancelPoll != nil {
		e.cancelPoll()
	}
}

func (e *Engine) swapsQueued() bool {
	e.rebuildMu.Lock()
	defer e.rebuildMu.Unlock()
	return len(e.swaps) > 0
}

// runSwaps serves the swap requests of rebuilds. It runs on the run loop
// between cycles. It returns an error only when the node cannot go on.
func (e *Engine) runSwaps(sess session) error {
	if e.needReset.Load() {
		// A revocation is pending: a transaction now would be aborted.
		// The loop resets the session first, then comes back (the queue
		// makes it skip its poll).
		return nil
	}
	e.rebuildMu.Lock()
	queue := e.swaps
	e.swaps = nil
	e.rebuildMu.Unlock()
	for _, r := range queue {
		answer, fatalErr := e.swap(sess, r)
		r.swapped <- answer
		if fatalErr != nil {
			return fatalErr
		}
	}
	return nil
}

// swap runs step 3 for one rebuild; answer goes back to the rebuild, and
// fatalErr stops the node.
func (e *Engine) swap(sess session, r *rebuild) (answer, fatalErr error) {
	if err := r.ctx.Err(); err != nil {
		return err, nil
	}
	t := r.task
	if !r.current() {
		return errStale, nil
	}
	if r.online {
		// Nothing of the task is in flight now: fold what the last cycles
		// committed.
		ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
		for target := r.target(); r.next < target; {
			if err := r.poll(ctx); err != nil {
				cancel()
				return err, nil
			}
			if ctx.Err() != nil {
				cancel()
				return errNotCaughtUp, nil
			}
		}
		cancel()
	}
	swapStart := time.Now()
	r.update(func(s *RebuildStatus) { s.State = RebuildSwapping })
	defer r.update(func(s *RebuildStatus) {
		if s.State == RebuildSwapping {
			s.State = RebuildRunning
		}
	})
	store := e.cfg.Store
	version := binary.BigEndian.AppendUint64(nil, uint64(r.def.StateVersion()))

	// The changelog: "mixed" first, the new fold, then its version.
	type kv struct{ k, v []byte }
	records := []kv{{statestore.StateVersionKey, binary.BigEndian.AppendUint64(nil, 0)}}
	staged := map[string]bool{}
	var fresh []kv
	for after := ""; ; {
		page, err := store.Scan(r.staged, "", after, 1000)
		if err != nil {
			return err, nil
		}
		for _, ent := range page {
			k, v := changelog.StateRecord(ent.ID, ent.Record)
			fresh = append(fresh, kv{k, v})
			staged[ent.ID] = true
		}
		if len(page) < 1000 {
			break
		}
		after = page[len(page)-1].ID
	}
	records = append(records, fresh...)
	for after := ""; ; {
		page, err := store.Scan(t, "", after, 1000)
		if err != nil {
			return err, nil
		}
		for _, ent := range page {
			if !staged[ent.ID] {
				records = append(records, kv{statestore.StateKey(ent.ID), nil}) // the new fold has no state for it
			}
		}
		if len(page) < 1000 {
			break
		}
		after = page[len(page)-1].ID
	}
	records = append(records, kv{statestore.StateVersionKey, version})

	topic := changelog.Topic(e.cfg.AppID, t.Type)
	var last atomic.Int64
	last.Store(-1)
	wrote := false // some transaction committed (or may have)
	for chunk := range slices.Chunk(records, swapChunk) {
		if err := sess.Begin(); err != nil {
			if wrote {
				e.restoreAgain(sess.Client(), []statestore.Task{t})
			}
			return fmt.Errorf("rebuild: begin a transaction: %w", err), fatal(err, e.cfg.TransactionalID)
		}
		var wg sync.WaitGroup
		var mu sync.Mutex
		var produceErr error
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		for _, rec := range chunk {
			wg.Add(1)
			sess.Client().Produce(ctx, &kgo.Record{Topic: topic, Partition: t.Partition, Key: rec.k, Value: rec.v}, func(pr *kgo.Record, err error) {
				defer wg.Done()
				if err != nil {
					mu.Lock()
					produceErr = firstErr(produceErr, err)
					mu.Unlock()
					return
				}
				for cur := last.Load(); pr.Offset > cur && !last.CompareAndSwap(cur, pr.Offset); cur = last.Load() {
				}
			})
		}
		flushErr := sess.Client().Flush(ctx)
		wg.Wait()
		failed := errors.Join(produceErr, flushErr)
		committed, err := sess.End(ctx, failed == nil)
		cancel()
		if committed {
			wrote = true
			continue
		}
		if err != nil && failed == nil {
			wrote = true // unknown outcome: the broker may have committed it
		}
		if err == nil {
			err = failed
		}
		if err == nil {
			err = errors.New("the transaction was aborted")
		}
		if wrote {
			// The changelog may now say "mixed" (version 0) or even hold
			// the whole new fold, while this store holds the old one:
			// restore the task from the changelog, as after a cycle of
			// unknown outcome; a restore that finds version 0 rebuilds.
			e.restoreAgain(sess.Client(), []statestore.Task{t})
		}
		return fmt.Errorf("rebuild: write the rebuilt state to the changelog: %w", err), fatal(err, e.cfg.TransactionalID)
	}

	// The store: the new generation in place of the old, atomically.
	b := store.NewBatch()
	err := b.DeleteStates(t)
	for i := 1; err == nil && i <= len(fresh); i++ {
		err = b.Set(t, fresh[i-1].k, fresh[i-1].v)
	}
	if err == nil {
		err = b.DropTask(r.staged)
	}
	if err == nil {
		err = b.Set(t, statestore.StateVersionKey, version)
	}
	if err == nil {
		err = b.SetCheckpoint(t, last.Load()+1)
	}
	if err == nil {
		err = b.Commit()
	} else {
		b.Discard()
	}
	if err != nil {
		return err, storeError{fmt.Errorf("swapping the rebuilt state of %s into the store after writing it to the changelog: %w", t, err)}
	}
	e.log.Debug("rebuild swapped", "task", t.String(), "records", len(records), "took", time.Since(swapStart))
	r.update(func(s *RebuildStatus) { s.State = RebuildDone })
	if !r.online {
		// Serve the task: mark it restored and fetch its commands.
		e.pauseMu.Lock()
		e.mu.Lock()
		if e.tasks[t] == r.ts {
			r.ts.rebuilding, r.ts.restored = false, true
		}
		resume := e.inputPartitions([]statestore.Task{t})
		e.mu.Unlock()
		sess.Client().ResumeFetchPartitions(resume)
		e.pauseMu.Unlock()
	}
	e.signal(t)
	return nil, nil
}

func firstErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// checkStateVersions returns the restored aggregate tasks whose stored
// state was folded with another state version than their type's.
func (e *Engine) checkStateVersions(tasks []statestore.Task) map[statestore.Task]int64 {
	out := map[statestore.Task]int64{}
	for _, t := range tasks {
		def, ok := e.types[t.Type]
		if !ok {
			continue
		}
		v, err := e.cfg.Store.StateVersion(t)
		if err != nil {
			e.log.Warn("reading a task's state version; rebuilding it", "task", t.String(), "err", err)
			v = 0
		}
		if v != int64(def.StateVersion()) {
			out[t] = v
		}
	}
	return out
}

// dropStaging deletes what rebuilds cut short by a crash left behind.
func (e *Engine) dropStaging() {
	for _, d := range e.cfg.Types {
		if err := e.cfg.Store.DropTypes(d.Name() + "~rebuild~"); err != nil {
			e.log.Warn("dropping leftover rebuild state", "type", d.Name(), "err", err)
		}
	}
}
