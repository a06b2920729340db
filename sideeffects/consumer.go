package sideeffects

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/internal/backoff"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/esker-io/esker/internal/kgolog"
)

// maxPollRecords bounds one poll. At-most-once, a poll's records are
// committed before they are handled, so this (with the worker queues) also
// bounds what a crash can lose.
const maxPollRecords = 500

// commitTimeout bounds one offset commit.
const commitTimeout = 10 * time.Second

// cancelGrace is how long a handler whose context was cancelled has to
// return before a revocation or a shutdown goes on without it.
const cancelGrace = 2 * time.Second

// Runtime is what Run needs from the process that runs the consumer, usually
// an esker node.
type Runtime struct {
	// AppID is the application id: it prefixes the consumer group
	// ("<app>-<name>") and the dead-letter and re-drive topics. Letters,
	// digits, '.', '_' and '-'.
	AppID string
	// ClientOpts configure the Kafka clients: seed brokers, TLS, SASL,
	// timeouts (for example kgo.SessionTimeout). The consumer adds its own
	// group, topic, commit and isolation options after them; those cannot
	// be overridden.
	ClientOpts []kgo.Opt
	// Logger receives the consumer's logs (nil: none).
	Logger *slog.Logger
	// Registerer, if not nil, gets the consumer's metrics for the time Run
	// runs.
	Registerer prometheus.Registerer
	// OpenEvent, if not nil, opens the personal fields of an esker event
	// read from topic before the handler sees it (an esker node sets it;
	// see aggregate.PersonalTag). An error wrapping aggregate.ErrUnknownKey
	// (no key opens the fields: another application's event, or the keys
	// topic was lost) cannot go away with a retry: the handler gets the
	// event as stored, its personal fields sealed, and a warning is logged.
	// Any other error (the keys topic cannot be read now) is retried like
	// a handler's.
	OpenEvent func(ctx context.Context, topic string, ev aggregate.Event) (aggregate.Event, error)
}

// Consumer is a side-effect consumer: it reads event topics as a consumer
// group and runs a handler for every event, with the guarantee, retries,
// parallelism and dead-letter handling described in the package
// documentation. Build it with New and start it with Run.
type Consumer struct {
	name    string
	topics  []string
	handler Handler
	cfg     config
	metrics *metrics

	running atomic.Bool
	current atomic.Pointer[run] // the latest Run, kept after it returns for Status

	// Counters over the consumer's lifetime, for Status.
	handled, retried, deadLettered atomic.Uint64
}

// New builds a side-effect consumer named name that runs h for every event
// of topics. The name must be lower-case letters, digits and dashes,
// starting with a letter, like an aggregate type's; within an application
// it names the consumer group and the dead-letter topic, so it must be
// unique and stable (renaming a consumer starts it over as a new group). New
// returns an error for an invalid name, no topics, a nil handler or an
// invalid option; it does not contact Kafka.
func New(name string, topics []string, h Handler, opts ...Option) (*Consumer, error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	if len(topics) == 0 {
		return nil, fmt.Errorf("sideeffects: consumer %q has no topics", name)
	}
	for i, t := range topics {
		if t == "" {
			return nil, fmt.Errorf("sideeffects: consumer %q: empty topic name", name)
		}
		if slices.Contains(topics[:i], t) {
			return nil, fmt.Errorf("sideeffects: consumer %q: topic %s listed twice", name, t)
		}
	}
	if h == nil {
		return nil, fmt.Errorf("sideeffects: consumer %q has a nil handler", name)
	}
	cfg := defaultConfig()
	for _, o := range opts {
		o(&cfg)
	}
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("sideeffects: consumer %q: %w", name, err)
	}
	return &Consumer{
		name:    name,
		topics:  slices.Clone(topics),
		handler: h,
		cfg:     cfg,
		metrics: newMetrics(name),
	}, nil
}

// Name returns the consumer's name.
func (c *Consumer) Name() string { return c.name }

// Run runs the consumer until ctx is cancelled. It creates the dead-letter
// and re-drive topics if they are missing (one partition each, the broker's
// default replication factor), joins the consumer group "<app>-<name>",
// subscribes to the consumer's topics and its re-drive topic, and handles
// events.
//
// Run returns an error without handling anything when rt.AppID is invalid,
// when the consumer is already running, when its metrics cannot be
// registered, or when Kafka cannot be reached (or the topics cannot be
// created) within the StartTimeout. After that, Kafka errors do not stop it:
// the client retries, and Ready reports a consumer whose commits, fetches or
// dead-letter writes keep failing. A source topic that does not exist yet is
// logged and consumed once it appears.
//
// When ctx is cancelled, Run stops polling, lets the events it polled finish
// (queued and running, up to the DrainTimeout), commits what finished
// (at-least-once), leaves the group and returns nil.
func (c *Consumer) Run(ctx context.Context, rt Runtime) error {
	if err := ValidateAppID(rt.AppID); err != nil {
		return err
	}
	for _, t := range c.topics {
		if t == DeadLetterTopic(rt.AppID, c.name) || t == RedriveTopic(rt.AppID, c.name) {
			return fmt.Errorf("sideeffects: consumer %q cannot consume its own topic %s", c.name, t)
		}
	}
	if !c.running.CompareAndSwap(false, true) {
		return fmt.Errorf("sideeffects: consumer %q is already running", c.name)
	}
	defer c.running.Store(false)
	unregister, err := c.metrics.register(rt.Registerer, c.name)
	if err != nil {
		return err
	}
	defer unregister()

	r := newRun(c, rt)
	c.current.Store(r)
	defer r.stopped.Store(true)
	if err := r.start(ctx); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	r.pollLoop(ctx)
	r.shutdown()
	return nil
}

// run is the state of one Run.
type run struct {
	c      *Consumer
	cfg    config
	logger *slog.Logger
	rt     Runtime

	group, dlqTopic, redriveTopic string

	producer *kgo.Client // dead letters, topic creation
	consumer *kgo.Client // the group member

	tracker  *tracker
	pool     *pool
	stopWork context.CancelFunc // cancels the parent of every handler's context

	// commitMu serializes commits with revocations, so that no commit of a
	// partition is sent after the revocation that gave it up.
	commitMu      sync.Mutex
	stopCommitter chan struct{}
	committerDone chan struct{}

	started atomic.Bool // clients created, workers running
	joined  atomic.Bool // the first assignment arrived
	lost    atomic.Bool // partitions lost, not reassigned yet
	closing atomic.Bool // shutdown committed; callbacks have nothing to do
	stopped atomic.Bool
	health  health

	// stopRequested is when Run's context was cancelled (unix ns, 0: not
	// yet); the drain at shutdown ends DrainTimeout after it.
	stopRequested atomic.Int64
	// lostEvents counts at-most-once events committed but never handled.
	lostEvents atomic.Uint64
	progress   progress
}

func newRun(c *Consumer, rt Runtime) *run {
	logger := rt.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	workCtx, stopWork := context.WithCancel(context.Background())
	return &run{
		c:             c,
		cfg:           c.cfg,
		logger:        logger.With("consumer", c.name),
		rt:            rt,
		group:         GroupID(rt.AppID, c.name),
		dlqTopic:      DeadLetterTopic(rt.AppID, c.name),
		redriveTopic:  RedriveTopic(rt.AppID, c.name),
		tracker:       newTracker(workCtx),
		stopWork:      stopWork,
		stopCommitter: make(chan struct{}),
		committerDone: make(chan struct{}),
	}
}

// start creates the topics and the clients, and starts the workers and the
// committer.
func (r *run) start(ctx context.Context) error {
	defaults := []kgo.Opt{
		kgo.WithLogger(kgolog.New(r.logger)),
		// A short fetch wait: a partition that is resumed or newly
		// assigned at its end is fetched again soon (kfake does not wake
		// such a first long poll), at the cost of a few empty fetches a
		// second.
		kgo.FetchMaxWait(500 * time.Millisecond),
	}
	userOpts := append(slices.Clone(defaults), r.rt.ClientOpts...)
	producer, err := kgo.NewClient(userOpts...)
	if err != nil {
		r.stopWork()
		return fmt.Errorf("sideeffects: consumer %q: kafka client: %w", r.c.name, err)
	}
	startCtx, cancel := context.WithTimeout(ctx, r.cfg.startTimeout)
	defer cancel()
	missing, err := ensureTopics(startCtx, kadm.NewClient(producer), consumerTopics(r.rt.AppID, r.c.name), r.c.topics)
	if err != nil {
		producer.Close()
		r.stopWork()
		if startCtx.Err() != nil && ctx.Err() == nil {
			return fmt.Errorf("sideeffects: consumer %q: nothing answered within %v: %w", r.c.name, r.cfg.startTimeout, err)
		}
		return fmt.Errorf("sideeffects: consumer %q: %w", r.c.name, err)
	}
	if len(missing) > 0 {
		r.logger.Warn("source topics do not exist yet; they are consumed once created", "topics", missing)
	}
	startOffset := r.cfg.start.offset
	consumer, err := kgo.NewClient(append(userOpts,
		kgo.ConsumerGroup(r.group),
		kgo.ConsumeTopics(append(slices.Clone(r.c.topics), r.redriveTopic)...),
		kgo.ConsumeResetOffset(startOffset),
		// Events of aborted transactions never happened.
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.DisableAutoCommit(),
		kgo.BlockRebalanceOnPoll(),
		kgo.OnPartitionsAssigned(r.onAssigned),
		kgo.OnPartitionsRevoked(r.onRevoked),
		kgo.OnPartitionsLost(r.onLost),
		kgo.AdjustFetchOffsetsFn(func(_ context.Context, offsets map[string]map[int32]kgo.Offset) (map[string]map[int32]kgo.Offset, error) {
			// Re-driven events are always wanted, whatever StartAt says
			// about the history of the source topics.
			for p, o := range offsets[r.redriveTopic] {
				if o == startOffset {
					offsets[r.redriveTopic][p] = kgo.NewOffset().AtStart()
				}
			}
			return offsets, nil
		}),
	)...)
	if err != nil {
		producer.Close()
		r.stopWork()
		return fmt.Errorf("sideeffects: consumer %q: kafka client: %w", r.c.name, err)
	}
	r.producer, r.consumer = producer, consumer
	r.pool = startPool(r.cfg.workers, r.work)
	go r.commitLoop()
	r.started.Store(true)
	r.logger.Info("side-effect consumer started", "group", r.group, "topics", r.c.topics,
		"guarantee", r.cfg.guarantee.String(), "workers", r.cfg.workers, "start", r.cfg.start.String(),
		"dead_letter_topic", r.dlqTopic)
	return nil
}

// pollLoop polls records and hands them to the workers until ctx is done.
// A batch being handed over when ctx is cancelled is still handed over
// (every event of it is registered, and abandoning one would hold the
// commit back below events of other keys that finish) unless that takes
// longer than the DrainTimeout.
func (r *run) pollLoop(ctx context.Context) {
	dispatchCtx, stopDispatch := context.WithCancel(context.Background())
	defer stopDispatch()
	defer context.AfterFunc(ctx, func() {
		r.stopRequested.Store(time.Now().UnixNano())
		time.AfterFunc(r.cfg.drainTimeout, stopDispatch)
	})()
	for {
		fetches := r.consumer.PollRecords(ctx, maxPollRecords)
		if ctx.Err() != nil || fetches.IsClientClosed() {
			r.consumer.AllowRebalance()
			return
		}
		fetches.EachError(func(topic string, partition int32, err error) {
			if errors.Is(err, context.Canceled) {
				return
			}
			r.health.fail("fetch", err)
			r.logger.Warn("fetch failed", "topic", topic, "partition", partition, "err", err)
		})
		var batch []*item
		fetches.EachPartition(func(fp kgo.FetchTopicPartition) {
			if len(fp.Records) == 0 {
				return
			}
			p, created := r.tracker.get(fp.Topic, fp.Partition)
			if created {
				r.logger.Warn("records of a partition that was not assigned; handling them", "topic", fp.Topic, "partition", fp.Partition)
			}
			p.setHighWatermark(fp.HighWatermark)
			for _, rec := range fp.Records {
				batch = append(batch, p.register(rec))
			}
		})
		if len(batch) == 0 {
			r.consumer.AllowRebalance()
			continue
		}
		r.health.ok("fetch")
		if r.cfg.guarantee == AtMostOnce && !r.commitBeforeHandling(ctx, batch) {
			r.consumer.AllowRebalance()
			continue
		}
		// The batch is registered (its offsets hold commits back) and,
		// at-most-once, committed: a rebalance may run from here on.
		r.consumer.AllowRebalance()
		for i, it := range batch {
			if !r.pool.submit(dispatchCtx, it) {
				for _, rest := range batch[i:] {
					rest.part.abandon(rest)
					r.countLost()
				}
				return
			}
		}
	}
}

// commitBeforeHandling commits, at-most-once, the offsets after a polled
// batch before any of it is handled. It retries a failed commit until it
// succeeds; if the member lost its generation or ctx is done, it rewinds the
// batch instead (nothing of it was committed, so it is handled later, by
// this member or the next owner) and returns false.
func (r *run) commitBeforeHandling(ctx context.Context, batch []*item) bool {
	var parts []*partitionState
	first := map[*partitionState]int64{}
	for _, it := range batch {
		if _, ok := first[it.part]; !ok {
			first[it.part] = it.rec.Offset
			parts = append(parts, it.part)
		}
	}
	offsets := map[string]map[int32]kgo.EpochOffset{}
	for _, p := range parts {
		p.mu.Lock()
		if offsets[p.tp.topic] == nil {
			offsets[p.tp.topic] = map[int32]kgo.EpochOffset{}
		}
		offsets[p.tp.topic][p.tp.partition] = p.next
		p.mu.Unlock()
	}
	retry := backoff.Retry{Policy: backoff.Policy{Min: 100 * time.Millisecond, Max: 5 * time.Second}}
	for {
		r.commitMu.Lock()
		err := r.commitOffsets(ctx, parts, offsets)
		r.commitMu.Unlock()
		if err == nil {
			return true
		}
		if ctx.Err() != nil || isMembershipError(err) {
			rewind := map[string]map[int32]kgo.EpochOffset{}
			for p, off := range first {
				p.unregisterFrom(off)
				if rewind[p.tp.topic] == nil {
					rewind[p.tp.topic] = map[int32]kgo.EpochOffset{}
				}
				rewind[p.tp.topic][p.tp.partition] = kgo.EpochOffset{Epoch: -1, Offset: off}
			}
			r.consumer.SetOffsets(rewind)
			return false
		}
		if !backoff.Sleep(ctx, retry.Next(), nil) {
			continue // rewinds above
		}
	}
}

// work is what a worker does with one event.
func (r *run) work(it *item) {
	p := it.part
	if p.ctx.Err() != nil { // the partition was lost, or Run is stopping
		p.abandon(it)
		r.countLost()
		return
	}
	if !p.begin(it) { // the partition is being given up (at-least-once)
		return
	}
	done := r.process(p.ctx, it)
	p.finish(it, done)
	if !done {
		r.countLost()
	}
}

// countLost counts an event that was not handled here. At-least-once it is
// not committed and the next owner handles it; at-most-once it was
// committed, so it is lost.
func (r *run) countLost() {
	if r.cfg.guarantee == AtMostOnce {
		r.lostEvents.Add(1)
	}
}

// process handles one event with retries and, if they fail, dead-letters
// it. It returns true when the event is finished (handled, or its dead
// letter acknowledged), false when ctx ended first.
func (r *run) process(ctx context.Context, it *item) bool {
	ev, err := decodeEvent(it.rec, r.redriveTopic)
	attempts := 0
	if err == nil {
		for {
			attempts++
			err = r.attempt(ctx, ev)
			if err == nil {
				r.c.handled.Add(1)
				r.c.metrics.handled.Inc()
				return true
			}
			if ctx.Err() != nil {
				return false
			}
			if IsPermanent(err) || attempts >= r.cfg.maxAttempts {
				break
			}
			r.c.retried.Add(1)
			r.c.metrics.retries.Inc()
			r.logger.Debug("handler failed; retrying", "topic", ev.Topic, "partition", ev.Partition, "offset", ev.Offset,
				"entity", ev.EntityID, "attempt", attempts, "err", err)
			if !backoff.Sleep(ctx, backoff.Policy{Min: r.cfg.baseBackoff, Max: r.cfg.maxBackoff}.Delay(attempts), nil) {
				return false
			}
		}
	}
	dl := deadLetterRecord(r.dlqTopic, it.rec, ev, err, attempts, time.Now())
	perr := produceDeadLetter(ctx, r.producer, dl, func(perr error) {
		r.health.fail("dead-letter produce", perr)
		r.logger.Error("cannot write dead letter; retrying", "topic", r.dlqTopic, "err", perr)
	})
	if perr != nil {
		return false
	}
	r.health.ok("dead-letter produce")
	r.c.deadLettered.Add(1)
	r.c.metrics.deadLettered.Inc()
	r.logger.Warn("event dead-lettered", "topic", ev.Topic, "partition", ev.Partition, "offset", ev.Offset,
		"entity", ev.EntityID, "type", ev.Type, "attempts", attempts, "err", err, "dead_letter_topic", r.dlqTopic)
	return true
}

// attempt opens the event's personal fields (Runtime.OpenEvent) and runs
// the handler once; a failure of either is retried alike. An event no key
// opens (aggregate.ErrUnknownKey) is handed over sealed, as the engine's
// projections fold it: retrying could only dead-letter it.
func (r *run) attempt(ctx context.Context, ev Event) error {
	if r.rt.OpenEvent != nil && ev.Type != "" {
		opened, err := r.rt.OpenEvent(ctx, ev.Topic, ev.Event)
		switch {
		case err == nil:
			ev.Event = opened
		case errors.Is(err, aggregate.ErrUnknownKey):
			r.logger.Warn("an event's personal fields cannot be opened: no key opens them; handled sealed",
				"topic", ev.Topic, "partition", ev.Partition, "offset", ev.Offset, "entity", ev.EntityID, "type", ev.Type, "err", err)
		default:
			return err
		}
	}
	return r.call(ctx, ev)
}

// call runs the handler once, turning a panic into an error.
func (r *run) call(ctx context.Context, ev Event) (err error) {
	start := time.Now()
	defer func() {
		if v := recover(); v != nil {
			err = fmt.Errorf("handler panicked: %v", v)
			r.logger.Error("handler panicked", "topic", ev.Topic, "partition", ev.Partition, "offset", ev.Offset, "panic", v)
		}
		r.c.metrics.handlerSeconds.Observe(time.Since(start).Seconds())
	}()
	return r.c.handler(ctx, ev)
}

// commitLoop commits finished offsets every CommitInterval (at-least-once)
// and updates the lag and the catch-up log every second.
func (r *run) commitLoop() {
	defer close(r.committerDone)
	tick := min(r.cfg.commitInterval, time.Second)
	t := time.NewTicker(tick)
	defer t.Stop()
	lastCommit := time.Now()
	for {
		select {
		case <-r.stopCommitter:
			return
		case now := <-t.C:
			if r.cfg.guarantee == AtLeastOnce && now.Sub(lastCommit) >= r.cfg.commitInterval-tick/2 {
				r.commitFinished(r.tracker.all())
				lastCommit = now
			}
			r.observe(now)
		}
	}
}

// commitFinished commits, for the given partitions, the offsets below their
// lowest unfinished record.
func (r *run) commitFinished(parts []*partitionState) {
	r.commitMu.Lock()
	defer r.commitMu.Unlock()
	r.commitFinishedLocked(parts)
}

func (r *run) commitFinishedLocked(parts []*partitionState) {
	offsets := toCommit(parts)
	if len(offsets) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), commitTimeout)
	defer cancel()
	if err := r.commitOffsets(ctx, parts, offsets); err != nil {
		r.logger.Warn("commit failed; the next commit retries", "err", err)
	}
}

// commitOffsets commits offsets synchronously and records, on parts, those
// the group accepted. commitMu must be held.
func (r *run) commitOffsets(ctx context.Context, parts []*partitionState, offsets map[string]map[int32]kgo.EpochOffset) error {
	var firstErr error
	accepted := map[string]map[int32]kgo.EpochOffset{}
	r.consumer.CommitOffsetsSync(ctx, offsets, func(_ *kgo.Client, _ *kmsg.OffsetCommitRequest, resp *kmsg.OffsetCommitResponse, err error) {
		if err != nil {
			firstErr = err
			return
		}
		for _, t := range resp.Topics {
			for _, p := range t.Partitions {
				if perr := kerr.ErrorForCode(p.ErrorCode); perr != nil {
					if firstErr == nil {
						firstErr = fmt.Errorf("%s/%d: %w", t.Topic, p.Partition, perr)
					}
					continue
				}
				if o, ok := offsets[t.Topic][p.Partition]; ok {
					if accepted[t.Topic] == nil {
						accepted[t.Topic] = map[int32]kgo.EpochOffset{}
					}
					accepted[t.Topic][p.Partition] = o
				}
			}
		}
	})
	markCommitted(parts, accepted)
	if firstErr != nil {
		r.health.fail("commit", firstErr)
		return firstErr
	}
	r.health.ok("commit")
	return nil
}

// onAssigned starts tracking newly assigned partitions.
func (r *run) onAssigned(_ context.Context, _ *kgo.Client, assigned map[string][]int32) {
	r.tracker.assign(assigned)
	r.joined.Store(true)
	r.lost.Store(false)
	if len(assigned) > 0 {
		r.logger.Info("partitions assigned", "partitions", assigned)
	}
}

// onRevoked gives partitions up in a rebalance: it lets their polled events
// finish (see drain), commits the finished offsets, and only then lets the
// rebalance go on, so the next owner starts right after the last event
// handled here. Finishing the queued events too, rather than leaving them to
// the next owner, matters: events of other keys after them may have
// finished already, and the commit cannot skip the queued ones, so the next
// owner would handle those finished events a second time.
func (r *run) onRevoked(_ context.Context, _ *kgo.Client, revoked map[string][]int32) {
	if r.closing.Load() {
		return
	}
	r.commitMu.Lock()
	defer r.commitMu.Unlock()
	parts := r.tracker.lookup(revoked)
	if len(parts) == 0 {
		return
	}
	start := time.Now()
	stragglers := r.drain(parts, start.Add(r.cfg.drainTimeout))
	if r.cfg.guarantee == AtLeastOnce {
		r.commitFinishedLocked(parts)
	}
	r.tracker.remove(parts)
	r.logger.Info("partitions revoked", "partitions", revoked, "drained_in", time.Since(start).Round(time.Millisecond),
		"partitions_not_drained", stragglers)
}

// onLost forgets partitions the group took away without a revocation (the
// member's session expired): nothing can be committed for them any more.
// At-least-once, their running handlers are cancelled, as the next owner
// handles those events again.
func (r *run) onLost(_ context.Context, _ *kgo.Client, lost map[string][]int32) {
	if r.closing.Load() {
		return
	}
	r.commitMu.Lock()
	defer r.commitMu.Unlock()
	parts := r.tracker.lookup(lost)
	if r.cfg.guarantee == AtLeastOnce {
		for _, p := range parts {
			p.stop()
			p.cancel()
		}
	}
	r.tracker.remove(parts)
	r.lost.Store(true)
	r.logger.Warn("partitions lost (group session expired); rejoining", "partitions", lost)
}

// drain waits until deadline for the partitions' polled events — queued and
// running — to finish, so that the offsets committed next cover all of
// them. Past the deadline, at-least-once, the events not started are
// abandoned to the next owner and the running handlers are cancelled (and
// waited for briefly, so that the commit sees their outcome); at-most-once,
// the events were committed and nobody else will handle them, so they go
// on running (until Run stops). It returns how many partitions had events
// left at the deadline.
func (r *run) drain(parts []*partitionState, deadline time.Time) int {
	left := 0
	for _, p := range parts {
		if p.waitIdle(deadline, false) {
			p.cancel() // nothing uses it any more
		} else {
			left++
		}
	}
	if left == 0 || r.cfg.guarantee == AtMostOnce {
		return left
	}
	for _, p := range parts {
		p.stop()
		p.cancel()
	}
	grace := time.Now().Add(cancelGrace)
	for _, p := range parts {
		p.waitIdle(grace, true)
	}
	return left
}

// shutdown ends a Run after the poll loop returned.
func (r *run) shutdown() {
	start := time.Now()
	close(r.stopCommitter)
	<-r.committerDone

	r.commitMu.Lock()
	parts := r.tracker.all()
	deadline := time.Now().Add(r.cfg.drainTimeout)
	if at := r.stopRequested.Load(); at != 0 {
		deadline = time.Unix(0, at).Add(r.cfg.drainTimeout)
	}
	stragglers := r.drain(parts, deadline)
	r.stopWork()
	if !r.pool.close(5 * time.Second) {
		r.logger.Error("handlers did not return within 5s of their context being cancelled; stopping without them")
	}
	if r.cfg.guarantee == AtLeastOnce {
		r.commitFinishedLocked(parts)
	}
	r.closing.Store(true)
	r.commitMu.Unlock()

	r.consumer.Close()
	r.producer.Close()
	if n := r.lostEvents.Load(); n > 0 {
		r.logger.Warn("at-most-once: events were committed but not handled before the consumer stopped", "events", n)
	}
	r.logger.Info("side-effect consumer stopped", "took", time.Since(start).Round(time.Millisecond),
		"partitions_not_drained", stragglers)
}

// observe refreshes the partitions' ends, then updates the lag gauge and
// the catch-up log.
func (r *run) observe(now time.Time) {
	parts := r.tracker.all()
	r.refreshEnds(parts)
	var lag int64
	for _, p := range parts {
		if l := p.lag(); l > 0 {
			lag += l
		}
	}
	r.c.metrics.lag.Set(float64(lag))
	r.progress.observe(now, lag, r.c.handled.Load()+r.c.deadLettered.Load(), r.logger)
}

// refreshEnds looks up the end offsets of the assigned partitions (fetches
// report them only for partitions whose records were polled: with a
// backlog, the others wait in the client's buffer), and the starting
// position of those not polled yet, so that the lag counts every assigned
// partition.
func (r *run) refreshEnds(parts []*partitionState) {
	if len(parts) == 0 {
		return
	}
	topics := map[string]bool{}
	var names []string
	for _, p := range parts {
		if !topics[p.tp.topic] {
			topics[p.tp.topic] = true
			names = append(names, p.tp.topic)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	adm := kadm.NewClient(r.producer)
	ends, err := adm.ListEndOffsets(ctx, names...)
	if err != nil {
		r.logger.Debug("list end offsets", "err", err)
		return
	}
	committed := r.consumer.CommittedOffsets()
	var starts kadm.ListedOffsets
	for _, p := range parts {
		if e, ok := ends.Lookup(p.tp.topic, p.tp.partition); ok && e.Err == nil {
			p.setHighWatermark(e.Offset)
		}
		if !p.needsPosition() {
			continue
		}
		if c, ok := committed[p.tp.topic][p.tp.partition]; ok && c.Offset >= 0 {
			p.setPosition(c.Offset)
			continue
		}
		// No commit: a new group starting at the earliest (as the
		// re-drive topic always does) starts at the log start.
		if r.cfg.start.desc != Earliest().desc && p.tp.topic != r.redriveTopic {
			continue
		}
		if starts == nil {
			if starts, err = adm.ListStartOffsets(ctx, names...); err != nil {
				return
			}
		}
		if s, ok := starts.Lookup(p.tp.topic, p.tp.partition); ok && s.Err == nil {
			p.setPosition(s.Offset)
		}
	}
}
