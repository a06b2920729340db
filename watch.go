package esker

// This file adapts the node to the SSE routes of package interactive:
// watches (one entity's versions as they commit, from this node's store)
// and event streams (every event of an aggregate type, from its events
// topic).

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/interactive"
	"github.com/esker-io/esker/internal/engine"
	"github.com/esker-io/esker/statestore"
)

var (
	_ interactive.Watcher      = backend{}
	_ interactive.EventStreams = backend{}
)

// ownershipPoll is how often a watch that waits for a change checks that
// this node still serves the entity's partition. The engine's Changed
// channel wakes it when the task is revoked, its session ends or the group
// drops the node; a lease that lapses silently (no answer from the group)
// is only noticed by this check, so it is well within the lease period.
const ownershipPoll = 500 * time.Millisecond

// foldPage is how many events a watch reads from the store at once while it
// folds versions it does not send (the history before its first version).
const foldPage = 1000

// stopped reports whether Run has returned (the store is closed).
func (b backend) stopped() bool {
	b.n.storeMu.RLock()
	defer b.n.storeMu.RUnlock()
	return b.n.storeClosed
}

// WatchEntity opens a feed of an entity's versions from this node's store
// (see interactive.Watcher). It fails with a *interactive.NotReadyError
// when the entity's partition is not owned and restored here, or the
// membership lease has lapsed.
func (b backend) WatchEntity(ctx context.Context, aggregateType, id string, from int64) (interactive.EntityFeed, error) {
	def, ok := b.Definition(aggregateType)
	if !ok {
		return nil, fmt.Errorf("unknown aggregate type %q", aggregateType)
	}
	t, err := b.task(aggregateType, id)
	if err != nil {
		return nil, err
	}
	f := &entityFeed{b: b, eng: b.n.engine, def: def, task: t, typ: aggregateType, id: id, next: from}
	rec, found, err := f.current() // a forgotten entity answers ErrGone here
	if err != nil {
		return nil, err
	}
	if from <= 0 {
		// Only versions to come: they fold onto the current state.
		f.next, f.head = rec.Version+1, rec.Version
		if err := f.startFrom(rec, found); err != nil {
			return nil, err
		}
	}
	return f, nil
}

// entityFeed reads one entity's versions from the store as they commit,
// and computes the state after each by folding the events with the
// aggregate's Evolve.
type entityFeed struct {
	b       backend
	eng     *engine.Engine
	def     aggregate.Definition
	task    statestore.Task
	typ, id string

	next int64 // the next version to return
	head int64 // the entity's newest version seen

	// state is the entity's state after version folded; nil until the
	// feed has chosen where to start folding.
	state  any
	folded int64
}

func (f *entityFeed) From() int64 { return f.next }
func (f *entityFeed) Close()      {}

// Next returns the next versions (see interactive.EntityFeed). The versions
// come from this node's store, which holds only committed data, so every
// version it returns stays true after the partition moves.
func (f *entityFeed) Next(ctx context.Context, limit int) ([]interactive.EntityVersion, int64, error) {
	limit = max(limit, 1)
	for {
		changed := f.eng.Changed(f.task) // before reading: no missed change
		if err := f.serving(); err != nil {
			return nil, f.head, err
		}
		out, err := f.read(limit)
		if err != nil || len(out) > 0 {
			return out, f.head, err
		}
		timer := time.NewTimer(ownershipPoll)
		select {
		case <-changed:
		case <-timer.C:
		case <-ctx.Done():
			timer.Stop()
			return nil, f.head, nil
		}
		timer.Stop()
	}
}

// serving returns a *interactive.StreamEndedError when this node no longer
// serves the entity's partition (moved) or has stopped.
func (f *entityFeed) serving() error {
	if f.b.stopped() {
		return &interactive.StreamEndedError{Reason: interactive.EndStopped, Message: "the node stopped"}
	}
	if _, err := f.b.task(f.typ, f.id); err != nil {
		var nr *interactive.NotReadyError
		if errors.As(err, &nr) {
			return &interactive.StreamEndedError{Reason: interactive.EndMoved, Message: nr.Reason}
		}
		return err
	}
	return nil
}

// current reads the entity's state record.
func (f *entityFeed) current() (statestore.StateRecord, bool, error) {
	rec, found, err := f.b.stateRecord(f.task, f.id)
	if err != nil || !found {
		return statestore.StateRecord{}, false, f.storeErr(err)
	}
	if rec.Forgotten {
		return statestore.StateRecord{}, false, interactive.ErrGone
	}
	return rec, true, nil
}

// storeErr turns the store's "the node has stopped" into the end of the
// feed.
func (f *entityFeed) storeErr(err error) error {
	var nr *interactive.NotReadyError
	if errors.As(err, &nr) {
		return &interactive.StreamEndedError{Reason: interactive.EndStopped, Message: "the node stopped"}
	}
	return err
}

// startFrom chooses where folding starts: at the current state when it is
// older than the first version to send (the common case of a client that
// resumes at the head, or wants only versions to come), else at the
// beginning.
func (f *entityFeed) startFrom(rec statestore.StateRecord, found bool) error {
	if found && rec.Version < f.next {
		st, err := f.b.openState(context.Background(), f.typ, interactive.State{ID: f.id, State: rec.State})
		if err != nil {
			return err
		}
		s, err := f.def.DecodeState(st.State)
		if err != nil {
			return err
		}
		f.state, f.folded = s, rec.Version
		return nil
	}
	f.state, f.folded = f.def.NewState(), 0
	return nil
}

// read folds the committed events after the last folded version and returns
// those from next on, at most limit of them.
func (f *entityFeed) read(limit int) ([]interactive.EntityVersion, error) {
	rec, found, err := f.current()
	if err != nil {
		return nil, err
	}
	f.head = max(f.head, rec.Version)
	if f.state == nil {
		if err := f.startFrom(rec, found); err != nil {
			return nil, err
		}
	}
	var out []interactive.EntityVersion
	for len(out) < limit && f.folded < f.head {
		page := foldPage
		if f.folded+1 >= f.next {
			page = limit - len(out)
		}
		var evs []aggregate.Event
		err := f.b.withStore(func(s *statestore.Store) (err error) {
			evs, err = s.Events(f.task, f.id, f.folded+1, page)
			return err
		})
		if err != nil {
			return out, f.storeErr(err)
		}
		if len(evs) == 0 {
			return out, fmt.Errorf("the store holds version %d of %s %q but no event after version %d", f.head, f.typ, f.id, f.folded)
		}
		if evs, err = f.b.openEvents(context.Background(), f.typ, evs); err != nil {
			return out, err
		}
		for _, e := range evs {
			if e.Version != f.folded+1 {
				return out, fmt.Errorf("the events of %s %q jump from version %d to %d", f.typ, f.id, f.folded, e.Version)
			}
			if err := f.fold(e); err != nil {
				return out, err
			}
			f.head = max(f.head, e.Version)
			if e.Version < f.next {
				continue
			}
			state, err := f.def.EncodeState(f.state)
			if err != nil {
				return out, fmt.Errorf("encode the state of %s %q at version %d: %w", f.typ, f.id, e.Version, err)
			}
			out = append(out, interactive.EntityVersion{Event: e, State: state})
			f.next = e.Version + 1
			if len(out) == limit {
				break
			}
		}
	}
	return out, nil
}

// fold evolves the state with e; a panic in Evolve is an error.
func (f *entityFeed) fold(e aggregate.Event) (err error) {
	ev, err := f.def.DecodeEvent(e.Type, e.SchemaVersion, e.Data)
	if err != nil {
		return fmt.Errorf("decode event %d (%s) of %s %q: %w", e.Version, e.Type, f.typ, f.id, err)
	}
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("evolve %s %q with event %d (%s) panicked: %v", f.typ, f.id, e.Version, e.Type, p)
		}
	}()
	f.state = f.def.Evolve(f.state, ev)
	f.folded = e.Version
	return nil
}

// Event streams read the events topic directly, read_committed, without a
// consumer group. Each buffers at most about streamFetchBytes per broker.
const (
	streamFetchBytes   = 1 << 20
	streamPollRecords  = 500
	streamFetchMaxWait = time.Second
)

// StreamEvents opens a reader of an aggregate type's events topic (see
// interactive.EventStreams). It fails with a *interactive.NotReadyError
// before Run has started or after it returned, and when the end offsets
// for fromEnd cannot be listed.
func (b backend) StreamEvents(ctx context.Context, aggregateType string, from map[int32]int64, fromEnd bool) (interactive.EventStream, error) {
	if _, ok := b.Definition(aggregateType); !ok {
		return nil, fmt.Errorf("unknown aggregate type %q", aggregateType)
	}
	if _, err := b.started(); err != nil {
		return nil, err
	}
	if b.stopped() {
		return nil, &interactive.NotReadyError{Reason: "the node has stopped", RetryAfter: time.Second}
	}
	partitions := b.n.cfg.partitions
	for p, off := range from {
		if p < 0 || p >= partitions || off < 0 {
			return nil, fmt.Errorf("%w: partition %d at offset %d (%s has partitions 0 to %d)", interactive.ErrInvalidPosition, p, off, aggregateType, partitions-1)
		}
	}
	topic := engine.EventsTopic(aggregateType)
	var ends kadm.ListedOffsets
	if fromEnd && len(from) < int(partitions) {
		// The last stable offset: a transaction open now may still commit
		// records after it, which a live reader must not skip.
		var err error
		ends, err = kadm.NewClient(b.n.producer).ListCommittedOffsets(ctx, topic)
		if err == nil {
			err = ends.Error()
		}
		if err != nil {
			return nil, &interactive.NotReadyError{Reason: fmt.Sprintf("cannot list the end offsets of %s: %v", topic, err), RetryAfter: time.Second}
		}
	}
	start := make(map[int32]int64, partitions)
	offsets := make(map[int32]kgo.Offset, partitions)
	for p := range partitions {
		off, ok := from[p]
		if !ok && fromEnd {
			lo, found := ends.Lookup(topic, p)
			if !found {
				return nil, &interactive.NotReadyError{Reason: fmt.Sprintf("no end offset for partition %d of %s", p, topic), RetryAfter: time.Second}
			}
			off = lo.Offset
		}
		start[p] = off
		offsets[p] = kgo.NewOffset().At(off)
	}
	cl, err := kgo.NewClient(append(slices.Clone(b.n.clientOpts),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: offsets}),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.FetchMaxWait(streamFetchMaxWait),
		kgo.FetchMaxBytes(streamFetchBytes),
		kgo.FetchMaxPartitionBytes(streamFetchBytes),
	)...)
	if err != nil {
		return nil, fmt.Errorf("kafka client for %s: %w", topic, err)
	}
	return &eventStream{b: b, cl: cl, topic: topic, typ: aggregateType, start: start}, nil
}

// eventStream reads an events topic with its own client.
type eventStream struct {
	b     backend
	cl    *kgo.Client
	topic string
	typ   string
	start map[int32]int64
}

func (s *eventStream) Start() map[int32]int64 { return s.start }
func (s *eventStream) Close()                 { s.cl.Close() }

// Next polls the next events. Records that are not esker events are
// skipped (logged); fetch errors franz-go retries itself are logged.
func (s *eventStream) Next(ctx context.Context) ([]interactive.StreamedEvent, error) {
	if s.b.stopped() {
		return nil, &interactive.StreamEndedError{Reason: interactive.EndStopped, Message: "the node stopped"}
	}
	fs := s.cl.PollRecords(ctx, streamPollRecords)
	for _, fe := range fs.Errors() {
		switch {
		case errors.Is(fe.Err, context.Canceled), errors.Is(fe.Err, context.DeadlineExceeded):
		case errors.Is(fe.Err, kgo.ErrClientClosed):
			return nil, &interactive.StreamEndedError{Reason: interactive.EndStopped, Message: "the stream's Kafka client closed"}
		default:
			s.b.n.cfg.logger.Warn("event stream: fetch error", "topic", fe.Topic, "partition", fe.Partition, "err", fe.Err)
		}
	}
	var out []interactive.StreamedEvent
	var hs []aggregate.Header
	fs.EachRecord(func(r *kgo.Record) {
		hs = hs[:0]
		for _, h := range r.Headers {
			hs = append(hs, aggregate.Header{Key: h.Key, Value: h.Value})
		}
		ev, err := aggregate.EventFromRecord(r.Key, hs, r.Value)
		if err != nil {
			s.b.n.cfg.logger.Warn("event stream: skipping a record that is not an esker event", "topic", r.Topic, "partition", r.Partition, "offset", r.Offset, "err", err)
			return
		}
		opened, err := s.b.openEvents(ctx, s.typ, []aggregate.Event{ev})
		if err != nil {
			s.b.n.cfg.logger.Warn("event stream: cannot open an event's personal fields; sent sealed", "topic", r.Topic, "partition", r.Partition, "offset", r.Offset, "err", err)
		} else {
			ev = opened[0]
		}
		out = append(out, interactive.StreamedEvent{Partition: r.Partition, Offset: r.Offset, Event: ev})
	})
	return out, nil
}
