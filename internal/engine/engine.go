// Package engine is esker's one processing loop: it consumes the commands of
// the tasks (aggregate type × partition) this node owns, decides and folds,
// writes events and changelog records, and commits them with the consumed
// offsets in one Kafka transaction per cycle. Projections are tasks of the
// same loop (projection × partition, projection.go): they fold the events
// of their sources into rows in the same transaction. It restores a task's
// store from its changelog before processing it.
//
// A cycle (see Engine.Run):
//
//  1. poll the buffered command records;
//  2. for each command: idempotency check, expected-version check, decide,
//     produce events to "<type>-events" on the command's partition, evolve;
//     the entity's state is cached in the cycle (reads see earlier writes of
//     the same cycle);
//  3. keep polling while records are buffered and the commit interval has not
//     passed (group commit: under load batches grow, a lone command commits at
//     once);
//  4. produce one state record and one journal per touched entity to the
//     changelog and stage the same records, through changelog.Apply, in a
//     store batch;
//  5. end the transaction; only if it committed, add the changelog
//     checkpoints to the batch, apply it, and report the outcomes. An abort
//     discards the batch and rewinds consumption, so the store never holds
//     uncommitted data.
package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/changelog"
	"github.com/esker-io/esker/projection"
	"github.com/esker-io/esker/statestore"
)

// Config configures an Engine.
type Config struct {
	AppID string
	// ClientOpts are the base franz-go options (seed brokers, TLS, SASL).
	ClientOpts []kgo.Opt
	Types      []aggregate.Definition
	// Projections and reactors run as tasks of the same loop
	// (projection.go, reactor.go).
	Projections []projection.Definition
	Reactors    []Reactor
	Store       *statestore.Store
	// Transactional selects exactly-once (true) or at-least-once.
	Transactional bool
	// TransactionalID must be unique per node and stable across its restarts.
	TransactionalID   string
	CommitInterval    time.Duration
	IdempotencyWindow time.Duration
	Partitions        int32
	SessionTimeout    time.Duration
	CommandRetention  time.Duration
	ReplicationFactor int16
	// Standbys makes the engine keep standby copies of the partitions
	// SetStandbys names.
	Standbys bool
	// StateCleanupDelay is how long the local state of a partition the node
	// neither owns nor keeps a standby copy of is kept before it is
	// deleted; 0 keeps it forever. See cleanup.go.
	StateCleanupDelay time.Duration
	// Balancer, when set, replaces the default cooperative-sticky balancer.
	Balancer kgo.GroupBalancer
	// Keys seals and opens personal fields (internal/keyring); nil when no
	// registered type has any.
	Keys    Keys
	Metrics *Metrics
	Logger  *slog.Logger
}

// Keys is the keyring the engine seals personal fields with.
type Keys interface {
	Cipher(ctx context.Context, typ, id string) aggregate.FieldCipher
	Sync(ctx context.Context) error
	// ForgetRecords returns the keys-topic records that destroy the
	// entity's data keys, produced in the forgetting transaction.
	ForgetRecords(typ, id string, at time.Time) []*kgo.Record
	// Pseudonym returns the pseudonym of a personal row key within a
	// projection (projection.PersonalKeys).
	Pseudonym(ctx context.Context, scope, value string) (string, error)
}

// Engine runs the processing loop of one node.
type Engine struct {
	cfg     Config
	log     *slog.Logger
	types   map[string]aggregate.Definition // by aggregate type name
	byTopic map[string]aggregate.Definition // by commands topic

	projections map[string]projection.Definition // by name
	// readers names, per input topic of a projection (a source or a
	// repartition topic), the projections that read it.
	readers map[string][]string
	// taskTypes lists every task type: aggregate type and projection names.
	taskTypes []string
	progress  *progress // command and projection lag, projections' catch-up (progress.go)
	startMu   sync.Mutex
	starts    map[statestore.Task]map[string]int64 // start offsets of projection tasks that folded nothing yet

	mu       sync.RWMutex
	tasks    map[statestore.Task]*taskState
	joined   bool // the group assigned this node at least once
	changed  map[statestore.Task]chan struct{}
	stopping bool

	waiters waiters

	// franz-go's GroupTransactSession calls our revoke callback only for
	// the first revocation between two ends of a transaction; an idle node
	// must end one (an empty abort) after each revocation, or the next
	// revocation would not reach onRevoked and the node would keep serving
	// tasks it no longer owns.
	needReset  atomic.Bool
	pollMu     sync.Mutex
	cancelPoll context.CancelFunc

	// Standby tasks (standby.go).
	tailer      *changelog.Tailer
	wantStandby map[int32]bool // guarded by mu
	standbyMu   sync.Mutex     // guards tailing; taken after mu
	tailing     map[int32]bool
	standbyKick chan struct{}

	// Membership lease (lease.go): leaseUntil is a time since base.
	base       time.Time
	leaseUntil atomic.Int64
	leaseKick  chan struct{}
	endMu      sync.Mutex
	endCancel  context.CancelFunc // cancels the End in flight (lease.go)

	restoreMu sync.Mutex  // guards restoring; taken before mu
	restoring *restoreRun // the restore run in flight (restore.go)
	// pauseMu makes "decide which input partitions to pause or resume,
	// then do it" atomic (restore.go); taken before mu, never held while
	// waiting for a restore run.
	pauseMu sync.Mutex

	idleSince map[int32]time.Time // partitions held but unused, since when; cleanup goroutine only

	sweepCursor   map[statestore.Task]string // where each task's sweep resumes; run loop only
	beginFailures int                        // consecutive; run loop only

	guardMu sync.Mutex
	guarded map[entityKey]bool // entities whose state size is checked per command

	// Rebuilds (rebuild.go), guarded by rebuildMu (taken after mu, never
	// held while waiting).
	rebuildMu   sync.Mutex
	rebuilds    map[statestore.Task]*rebuild // running
	rebuildLast map[statestore.Task]*rebuild // the newest, running or finished
	rebuildSeq  int64
	swaps       []*rebuild                // waiting for the run loop
	eventsEnd   map[statestore.Task]int64 // after the last event a committed cycle wrote
}

type entityKey struct {
	task statestore.Task
	id   string
}

// guard makes the engine check an entity's encoded state size after every
// command from now on (until the node restarts): its state grew too large
// for a Kafka record in a cycle, which had to abort. The retried cycle then
// rejects exactly the command that makes the state too large.
func (e *Engine) guard(t statestore.Task, id, reason string) {
	e.guardMu.Lock()
	defer e.guardMu.Unlock()
	if e.guarded == nil {
		e.guarded = map[entityKey]bool{}
	}
	e.guarded[entityKey{t, id}] = true
	e.log.Warn("an entity's state is too large; checking its size on every command", "task", t.String(), "id", id, "reason", reason)
}

func (e *Engine) isGuarded(t statestore.Task, id string) bool {
	e.guardMu.Lock()
	defer e.guardMu.Unlock()
	return e.guarded[entityKey{t, id}]
}

type taskState struct {
	restored bool
	// rebuilding: restored, but its state was folded with another state
	// version; not served until its rebuild swaps (rebuild.go).
	rebuilding bool
}

// New validates cfg and returns an engine; Run starts it.
func New(cfg Config) (*Engine, error) {
	for _, r := range cfg.Reactors {
		cfg.Projections = append(slices.Clip(cfg.Projections), reactorTask{r})
	}
	if cfg.Store == nil || len(cfg.Types)+len(cfg.Projections) == 0 || cfg.Partitions < 1 {
		return nil, errors.New("engine: store, types or projections, and partitions are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	e := &Engine{
		cfg:       cfg,
		log:       cfg.Logger,
		types:     map[string]aggregate.Definition{},
		byTopic:   map[string]aggregate.Definition{},
		tasks:     map[statestore.Task]*taskState{},
		changed:   map[statestore.Task]chan struct{}{},
		waiters:   waiters{m: map[string][]*waiter{}},
		base:      time.Now(),
		leaseKick: make(chan struct{}, 1),
	}
	for _, d := range cfg.Types {
		e.types[d.Name()] = d
		e.byTopic[CommandsTopic(d.Name())] = d
		e.taskTypes = append(e.taskTypes, d.Name())
		if m := cfg.Metrics; m != nil {
			// Exported from 0, so that rates and alerts see every type.
			m.RebuildEvents.WithLabelValues(d.Name())
			m.RebuildsInProgress.WithLabelValues(d.Name())
		}
	}
	e.projections = map[string]projection.Definition{}
	e.readers = map[string][]string{}
	for _, p := range cfg.Projections {
		name := p.Name()
		if _, dup := e.types[name]; dup {
			return nil, fmt.Errorf("engine: projection or reactor %q has the name of an aggregate type; task names must be unique", name)
		}
		if _, dup := e.projections[name]; dup {
			return nil, fmt.Errorf("engine: projection or reactor %q registered twice", name)
		}
		e.projections[name] = p
		e.taskTypes = append(e.taskTypes, name)
		for _, topic := range e.inputTopics(p) {
			if _, clash := e.byTopic[topic]; clash {
				return nil, fmt.Errorf("engine: projection %q reads %s, a commands topic", name, topic)
			}
			e.readers[topic] = append(e.readers[topic], name)
		}
	}
	e.progress = newProgress(e)
	// The tailer exists before Run: the HTTP layer asks it for standby
	// lags from the moment the node serves (it connects only in Run).
	if cfg.Standbys {
		if err := e.newTailer(); err != nil {
			return nil, err
		}
	}
	return e, nil
}

// TypeNames returns the registered aggregate type names.
func (e *Engine) TypeNames() []string {
	out := make([]string, 0, len(e.types))
	for _, d := range e.cfg.Types {
		out = append(out, d.Name())
	}
	return out
}

// Run creates or checks the topics, joins the group and processes commands
// until ctx is cancelled; then it finishes the cycle in flight, leaves the
// group and returns nil. It returns an error when the topics are wrong or
// Kafka cannot be reached at start.
func (e *Engine) Run(ctx context.Context) error {
	admCl, err := kgo.NewClient(e.cfg.ClientOpts...)
	if err != nil {
		return err
	}
	adm := kadm.NewClient(admCl)
	specs := AppTopics(e.cfg)
	err = EnsureTopics(ctx, adm, specs, e.cfg.Partitions, e.cfg.ReplicationFactor)
	adm.Close()
	if err != nil {
		if e.tailer != nil {
			e.tailer.Close()
		}
		return err
	}
	if e.tailer != nil {
		standbyCtx, stopStandbys := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); e.runStandbys(standbyCtx) }()
		defer func() { stopStandbys(); <-done }()
	}
	progressCtx, stopProgress := context.WithCancel(context.Background())
	progressDone := make(chan struct{})
	go func() { defer close(progressDone); e.progress.run(progressCtx) }()
	defer func() { stopProgress(); <-progressDone }()
	e.dropStaging()
	if e.cfg.StateCleanupDelay > 0 {
		cleanupCtx, stopCleanup := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); e.runCleanup(cleanupCtx) }()
		defer func() { stopCleanup(); <-done }()
	}
	return e.run(ctx)
}

// run runs sessions until ctx ends or one fails for good. A session whose
// producer was fenced — another node took its partitions over while it was
// paused or cut off, and fenced its open transaction (fence.go) — is
// replaced by a new one that rejoins the group. A node fenced again and
// again shares its transactional id with another node: that stops it.
func (e *Engine) run(ctx context.Context) error {
	defer func() {
		e.mu.Lock()
		e.stopping = true
		e.mu.Unlock()
	}()
	var fenced []time.Time
	for {
		err := e.runSession(ctx)
		var f fencedError
		if !errors.As(err, &f) {
			return err
		}
		now := time.Now()
		fenced = slices.DeleteFunc(append(fenced, now), func(t time.Time) bool { return now.Sub(t) > time.Minute })
		if len(fenced) >= 3 {
			return fmt.Errorf("the producer of transactional id %q was fenced %d times within a minute: most likely another node runs with the same instance id (give every node its own InstanceID, advertised URL or state directory): %w",
				e.cfg.TransactionalID, len(fenced), f.err)
		}
		e.log.Warn("this node's producer was fenced: the group gave its partitions to another node while it was paused or cut off; rejoining with a new session", "err", f.err)
	}
}

// runSession runs one transactional (or at-least-once) session: it joins
// the group and processes cycles until ctx ends or a cycle fails.
func (e *Engine) runSession(ctx context.Context) error {
	sess, err := e.newSession(ctx)
	if err != nil {
		return err
	}
	defer func() {
		e.stopRebuilds(nil)
		e.waiters.release(nil)
		e.mu.Lock()
		ended := e.tasks
		e.tasks = map[statestore.Task]*taskState{}
		e.mu.Unlock()
		for t := range ended {
			e.signal(t) // their readers find them gone
		}
		sess.Close()
		e.restoreMu.Lock()
		e.stopRestore()
		e.restoreMu.Unlock()
		e.leaseUntil.Store(0) // the next session is a new member
	}()
	cl := sess.Client()
	leaseCtx, stopLease := context.WithCancel(ctx)
	leaseDone := make(chan struct{})
	go func() { defer close(leaseDone); e.runLease(leaseCtx, cl) }()
	defer func() { stopLease(); <-leaseDone }()
	nextSweep := time.Now().Add(sweepInterval(e.cfg.IdempotencyWindow))
	for {
		// Poll until records arrive, the next sweep is due, or a revocation
		// needs the session reset (the callbacks cancel the poll).
		pollCtx, cancel := context.WithDeadline(ctx, nextSweep)
		e.pollMu.Lock()
		e.cancelPoll = cancel
		e.pollMu.Unlock()
		if e.swapsQueued() {
			// A rebuild asked before this poll could be cancelled
			// (wakeRunLoop): serve it at once.
			cancel()
		}
		if e.needReset.Swap(false) {
			if _, err := sess.End(ctx, false); err != nil {
				e.log.Warn("resetting the transactional session after a revocation", "err", err)
			}
			// The abort rewound consumption to the group's offsets.
			e.repositionProjectionInputs(cl)
		}
		fetches := cl.PollRecords(pollCtx, 10000)
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		for _, fe := range fetches.Errors() {
			if errors.Is(fe.Err, context.Canceled) || errors.Is(fe.Err, context.DeadlineExceeded) {
				continue
			}
			e.log.Warn("fetch error", "topic", fe.Topic, "partition", fe.Partition, "err", fe.Err)
		}
		if fetches.NumRecords() > 0 {
			if err := e.cycle(sess, fetches); err != nil {
				return err
			}
		}
		if err := e.runSwaps(sess); err != nil {
			return err
		}
		if time.Now().After(nextSweep) {
			next := sweepInterval(e.cfg.IdempotencyWindow)
			if e.sweep() {
				next = time.Second // a sweep in progress goes on soon
			}
			nextSweep = time.Now().Add(next)
		}
		sess.AllowRebalance()
	}
}

// sweepInterval is how often expired command outcomes are deleted.
func sweepInterval(window time.Duration) time.Duration {
	return min(max(window/8, time.Second), 10*time.Minute)
}

// sweep deletes command outcomes older than the idempotency window from the
// tasks this node owns. It runs between cycles, so it never races a cycle's
// batch, and scans a bounded number of records per task per call (resuming
// where it stopped), so processing is held up for milliseconds at most. The
// changelog keeps the journals: a restore brings expired records back and a
// later sweep removes them again. It reports whether a sweep is unfinished.
func (e *Engine) sweep() (unfinished bool) {
	cutoff := time.Now().Add(-e.cfg.IdempotencyWindow).UnixNano()
	e.mu.RLock()
	tasks := make([]statestore.Task, 0, len(e.tasks))
	for t, ts := range e.tasks {
		if ts.restored {
			tasks = append(tasks, t)
		}
	}
	e.mu.RUnlock()
	if e.sweepCursor == nil {
		e.sweepCursor = map[statestore.Task]string{}
	}
	for _, t := range tasks {
		n, next, err := e.cfg.Store.SweepCommands(t, cutoff, 20_000, e.sweepCursor[t])
		if err != nil {
			e.log.Warn("sweeping expired command outcomes", "task", t.String(), "err", err)
			continue
		}
		if next == "" {
			delete(e.sweepCursor, t)
		} else {
			e.sweepCursor[t] = next
			unfinished = true
		}
		if n > 0 {
			e.log.Debug("swept expired command outcomes", "task", t.String(), "deleted", n)
		}
	}
	return unfinished
}

func (e *Engine) newSession(ctx context.Context) (session, error) {
	topics := make([]string, 0, len(e.byTopic)+len(e.readers))
	for t := range e.byTopic {
		topics = append(topics, t)
	}
	for t := range e.readers {
		topics = append(topics, t)
	}
	// A resumed partition (restore.go) joins the fetches to its broker
	// only when the fetch in flight returns, after at most FetchMaxWait; a
	// short wait keeps that delay off fail-over. Client options may
	// override it.
	opts := append(append([]kgo.Opt{kgo.FetchMaxWait(200 * time.Millisecond)}, e.cfg.ClientOpts...),
		kgo.ConsumerGroup(e.cfg.AppID),
		kgo.ConsumeTopics(topics...),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.RecordPartitioner(kgo.ManualPartitioner()),
		kgo.DisableAutoCommit(),
		// Rebalances wait until the cycle in flight has ended, so a task is
		// never revoked between decide and commit.
		kgo.BlockRebalanceOnPoll(),
		kgo.OnPartitionsAssigned(e.onAssigned),
		kgo.OnPartitionsRevoked(e.onRevoked),
		kgo.OnPartitionsLost(e.onRevoked),
	)
	if e.cfg.SessionTimeout > 0 {
		opts = append(opts, kgo.SessionTimeout(e.cfg.SessionTimeout),
			kgo.HeartbeatInterval(e.cfg.SessionTimeout/10))
	}
	if e.cfg.Balancer != nil {
		opts = append(opts, kgo.Balancers(e.cfg.Balancer))
	}
	if e.cfg.Transactional {
		opts = append(opts, kgo.TransactionalID(e.cfg.TransactionalID),
			// A transaction left open by a crashed node holds back the
			// committed offsets (KIP-447: the next owner waits for stable
			// offsets) until the broker aborts it at this timeout. A cycle
			// lasts the commit interval plus one commit, far below it.
			kgo.TransactionTimeout(10*time.Second))
		s, err := newEOSSession(opts)
		if err != nil {
			return nil, err
		}
		// Initialize the producer id now, before the group hands out
		// partitions: with a stable transactional id this fences and
		// aborts the transaction a crashed previous incarnation left open,
		// which would otherwise keep our own offset fetch waiting until
		// the broker times it out.
		if _, _, err := s.Client().ProducerID(ctx); err != nil {
			s.Close()
			if f := fatal(err, e.cfg.TransactionalID); f != nil {
				return nil, f
			}
			return nil, fmt.Errorf("initialize the transactional producer: %w", err)
		}
		return s, nil
	}
	return newALOSession(opts)
}

// onAssigned takes the newly assigned tasks: it pauses fetching their
// commands and starts restoring them in the background (restore.go); the
// client does not fetch assigned partitions until this callback has
// returned, and then not paused ones until the restore resumes them.
func (e *Engine) onAssigned(ctx context.Context, cl *kgo.Client, assigned map[string][]int32) {
	var added []statestore.Task
	promoted := map[int32]bool{}
	e.pauseMu.Lock()
	e.mu.Lock()
	for topic, parts := range assigned {
		for _, name := range e.taskTypesOf(topic) {
			for _, p := range parts {
				t := statestore.Task{Type: name, Partition: p}
				if _, ok := e.tasks[t]; ok {
					continue // a projection reading several assigned topics
				}
				e.tasks[t] = &taskState{}
				added = append(added, t)
				promoted[p] = true
			}
		}
	}
	e.joined = true
	e.mu.Unlock()
	cl.PauseFetchPartitions(e.inputPartitions(added))
	e.pauseMu.Unlock()
	e.kickLease()
	// A promoted standby stops tailing before its restore (which then reads
	// only the tail); from here on the reconciler sees it owned.
	if e.tailer != nil {
		for p := range promoted {
			if err := e.stopStandby(ctx, p); err != nil {
				// Still tailed: restoring now would race the tailer. The
				// tasks stay unrestored (not served); ctx ends only when
				// the client shuts down.
				return
			}
		}
	}
	e.restartRestore(ctx, cl)
}

func (e *Engine) onRevoked(ctx context.Context, cl *kgo.Client, revoked map[string][]int32) {
	lost := map[statestore.Task]bool{}
	for topic, parts := range revoked {
		for _, name := range e.taskTypesOf(topic) {
			for _, p := range parts {
				lost[statestore.Task{Type: name, Partition: p}] = true
			}
		}
	}

	// Last (deferred first), once e.mu is released: readers waiting on
	// the lost tasks wake and find them gone.
	defer func() {
		for t := range lost {
			e.signal(t)
		}
	}()
	defer e.waiters.release(func(t statestore.Task) bool { return lost[t] })
	if e.tailer != nil {
		defer e.kickStandbys() // a revoked partition may become a standby here
	}
	if e.cfg.Transactional {
		e.needReset.Store(true)
		e.pollMu.Lock()
		if e.cancelPoll != nil {
			e.cancelPoll()
		}
		e.pollMu.Unlock()
	}
	// No restore may write to a task after it is given up.
	e.restoreMu.Lock()
	defer e.restoreMu.Unlock()
	e.stopRestore()
	// After the restore run, which may have started rebuilds.
	e.stopRebuilds(func(t statestore.Task) bool { return lost[t] })
	defer e.startRestore(ctx, cl) // the tasks still pending, if any
	// Paused partitions stay paused until resumed, also across
	// assignments; a revoked one must not carry its pause along.
	cl.ResumeFetchPartitions(revoked)
	e.mu.Lock()
	defer e.mu.Unlock()
	for t := range lost {
		delete(e.tasks, t)
	}
}

// TaskStatus reports whether this node owns a task and whether it is
// restored.
func (e *Engine) TaskStatus(t statestore.Task) (owned, restored bool) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	ts, ok := e.tasks[t]
	return ok, ok && ts.restored
}

// Ready returns nil when the node has joined the group, every task it owns
// is restored, and its membership lease is current (lease.go).
func (e *Engine) Ready() error {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if !e.joined {
		return errors.New("waiting for the consumer group to assign partitions")
	}
	n, rebuilding := 0, 0
	for _, ts := range e.tasks {
		switch {
		case ts.rebuilding:
			rebuilding++
		case !ts.restored:
			n++
		}
	}
	if n > 0 {
		return fmt.Errorf("restoring %d of %d tasks from their changelogs", n, len(e.tasks))
	}
	if rebuilding > 0 {
		return fmt.Errorf("rebuilding the state of %d of %d tasks from their events (their state version changed)", rebuilding, len(e.tasks))
	}
	if !e.MembershipCurrent() {
		return errors.New("waiting for the group to confirm this node's membership")
	}
	return nil
}

// Changed returns a channel that is closed the next time the task's store
// changes (a commit applied or a restore finished) or the node stops
// serving the task (revoked, its session ended, its membership dropped by
// the group). A lease that lapses without an answer from the group is not
// signalled: readers that must notice it re-check within the lease period.
func (e *Engine) Changed(t statestore.Task) <-chan struct{} {
	e.mu.Lock()
	defer e.mu.Unlock()
	ch, ok := e.changed[t]
	if !ok {
		ch = make(chan struct{})
		e.changed[t] = ch
	}
	return ch
}

// signalOwned signals every task the engine owns.
func (e *Engine) signalOwned() {
	e.mu.RLock()
	owned := make([]statestore.Task, 0, len(e.tasks))
	for t := range e.tasks {
		owned = append(owned, t)
	}
	e.mu.RUnlock()
	for _, t := range owned {
		e.signal(t)
	}
}

func (e *Engine) signal(t statestore.Task) {
	e.mu.Lock()
	ch, ok := e.changed[t]
	if ok {
		delete(e.changed, t)
	}
	e.mu.Unlock()
	if ok {
		close(ch)
	}
}

// Await registers interest in the outcome of a command sent to a task. The
// first channel receives the outcome once the transaction holding it
// commits (also for a duplicate of an earlier command). The second is
// closed when this node will not learn the outcome: the task was revoked
// (its new owner processes the command) or the engine stopped; the caller
// should answer "outcome unknown" at once instead of waiting out its
// timeout. Call cancel when no longer waiting.
func (e *Engine) Await(t statestore.Task, commandID string) (outcome <-chan aggregate.Outcome, gone <-chan struct{}, cancel func()) {
	return e.waiters.add(t, commandID)
}

type waiter struct {
	task statestore.Task
	ch   chan aggregate.Outcome
	gone chan struct{}
}

type waiters struct {
	mu sync.RWMutex
	m  map[string][]*waiter
}

// waiting reports whether someone awaits the command's outcome: the cycle
// builds outcomes only for those.
func (w *waiters) waiting(id string) bool {
	w.mu.RLock()
	defer w.mu.RUnlock()
	return len(w.m[id]) > 0
}

func (w *waiters) add(t statestore.Task, id string) (<-chan aggregate.Outcome, <-chan struct{}, func()) {
	wt := &waiter{task: t, ch: make(chan aggregate.Outcome, 1), gone: make(chan struct{})}
	w.mu.Lock()
	w.m[id] = append(w.m[id], wt)
	w.mu.Unlock()
	return wt.ch, wt.gone, func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		list := w.m[id]
		for i, c := range list {
			if c == wt {
				list = append(list[:i], list[i+1:]...)
				break
			}
		}
		if len(list) == 0 {
			delete(w.m, id)
		} else {
			w.m[id] = list
		}
	}
}

func (w *waiters) resolve(outcomes []aggregate.Outcome) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.m) == 0 {
		return
	}
	for _, o := range outcomes {
		for _, wt := range w.m[o.CommandID] {
			select {
			case wt.ch <- o:
			default:
			}
		}
	}
}

// release tells the waiters of the given tasks (all, when lost is nil) that
// this node will not learn their outcomes. A waiter is released once.
func (w *waiters) release(lost func(statestore.Task) bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for id, list := range w.m {
		keep := list[:0]
		for _, wt := range list {
			if lost == nil || lost(wt.task) {
				close(wt.gone)
				continue
			}
			keep = append(keep, wt)
		}
		if len(keep) == 0 {
			delete(w.m, id)
		} else {
			w.m[id] = keep
		}
	}
}

// LocalState returns, per partition number this node holds state for, the
// sum over the aggregate types of the tasks' changelog checkpoints: how far
// its store has applied that partition's changelogs. The group balancer
// prefers the member with the most caught-up state when a partition moves.
func (e *Engine) LocalState() map[int32]int64 {
	out := map[int32]int64{}
	for p := range e.cfg.Partitions {
		var sum int64
		for _, name := range e.taskTypes {
			cp, err := e.cfg.Store.Checkpoint(statestore.Task{Type: name, Partition: p})
			if err != nil {
				e.log.Warn("reading a checkpoint for the group balancer", "partition", p, "err", err)
				continue
			}
			sum += cp
		}
		if sum > 0 {
			out[p] = sum
		}
	}
	return out
}

// PartitionStatus reports whether this node owns partition p (of any
// aggregate type or projection: tasks are co-partitioned) and whether all
// of its tasks for p are restored.
func (e *Engine) PartitionStatus(p int32) (owned, restored bool) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	restored = true
	for _, name := range e.taskTypes {
		if ts, ok := e.tasks[statestore.Task{Type: name, Partition: p}]; ok {
			owned = true
			restored = restored && ts.restored
		}
	}
	return owned, owned && restored
}
