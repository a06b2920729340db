package sideeffects

import (
	"cmp"
	"context"
	"slices"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// topicPartition names one partition of one topic.
type topicPartition struct {
	topic     string
	partition int32
}

// slotState is how far one registered record has come.
type slotState uint8

const (
	slotPending   slotState = iota // queued or in its handler
	slotDone                       // handled, or dead-lettered with the produce acknowledged
	slotAbandoned                  // never finished here: not handled, must not be committed past
)

// slot is one registered record in a partition's window.
type slot struct {
	offset int64
	epoch  int32
	state  slotState
}

// item is one record on its way through the worker pool.
type item struct {
	rec  *kgo.Record
	part *partitionState
	seq  uint64 // position in part's window: window[seq-base]
}

// partitionState tracks the records of one assigned partition from the poll
// that returned them to the end of their handling.
//
// The commit rule: a partition's safe commit offset is the offset of its
// lowest unfinished record, or the offset after the last registered record
// when none is unfinished. Records of different keys finish out of order
// (they run on different workers); committing below the lowest unfinished
// one never marks a record consumed that was not handled.
type partitionState struct {
	tp topicPartition

	// ctx is the context handlers of this partition run with. It is
	// cancelled when the partition is lost, or given up and the drain
	// timeout has passed (at-least-once: the next owner handles the events
	// again).
	ctx    context.Context
	cancel context.CancelFunc

	mu sync.Mutex
	// stopping: the partition is being given up (at-least-once); records
	// not yet started are abandoned instead of handled, since the next
	// owner starts at the commit offset, which stays below them.
	stopping bool
	// window holds the registered records from the lowest unfinished one
	// on, in offset order; finished records at its head are dropped.
	window []slot
	base   uint64 // sequence number of window[0]
	seq    uint64 // sequence number of the next registered record
	// next is the offset after the last registered record.
	next    kgo.EpochOffset
	hasNext bool
	// committed is the offset this consumer last committed, -1 if none.
	committed int64
	// highWatermark is the partition's end as of the last fetch or end
	// offset lookup, -1 unknown.
	highWatermark int64
	// position is where consumption of the partition starts (the group's
	// committed offset, or the log start for a new group reading from the
	// earliest), for the lag until a record is registered; -1 unknown.
	position int64
	running  int // records inside process
	pending  int // registered records neither finished nor abandoned
	// changed is closed (and cleared) on every change waiters care about.
	changed chan struct{}
}

func newPartitionState(parent context.Context, tp topicPartition) *partitionState {
	ctx, cancel := context.WithCancel(parent)
	return &partitionState{tp: tp, ctx: ctx, cancel: cancel, committed: -1, highWatermark: -1, position: -1}
}

// register appends a polled record to the window.
func (p *partitionState) register(rec *kgo.Record) *item {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.window = append(p.window, slot{offset: rec.Offset, epoch: rec.LeaderEpoch})
	it := &item{rec: rec, part: p, seq: p.seq}
	p.seq++
	p.pending++
	p.next = kgo.EpochOffset{Epoch: rec.LeaderEpoch, Offset: rec.Offset + 1}
	p.hasNext = true
	return it
}

// unregisterFrom drops the records registered from offset on (the tail of
// the window), after a batch could not be committed at-most-once and the
// fetch position was rewound to them.
func (p *partitionState) unregisterFrom(offset int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.window) > 0 && p.window[len(p.window)-1].offset >= offset {
		p.window = p.window[:len(p.window)-1]
		p.seq--
		p.pending--
	}
	if p.hasNext && p.next.Offset > offset {
		p.next = kgo.EpochOffset{Epoch: -1, Offset: offset}
	}
	p.notify()
}

// begin marks an item started. It returns false, and abandons the item,
// when the partition is being given up.
func (p *partitionState) begin(it *item) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopping {
		p.settle(it, slotAbandoned)
		return false
	}
	p.running++
	return true
}

// finish ends an item begin started: done (handled or dead-lettered) or not.
func (p *partitionState) finish(it *item, done bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.running--
	state := slotAbandoned
	if done {
		state = slotDone
	}
	p.settle(it, state)
}

// abandon ends an item that was never started.
func (p *partitionState) abandon(it *item) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.settle(it, slotAbandoned)
}

func (p *partitionState) settle(it *item, state slotState) {
	p.pending--
	if i := it.seq - p.base; it.seq >= p.base && i < uint64(len(p.window)) {
		p.window[i].state = state
	}
	n := 0
	for n < len(p.window) && p.window[n].state == slotDone {
		n++
	}
	if n > 0 {
		p.window = p.window[n:]
		p.base += uint64(n)
	}
	p.notify()
}

func (p *partitionState) notify() {
	if p.changed != nil {
		close(p.changed)
		p.changed = nil
	}
}

// commitPoint returns the offset below which every registered record is
// done, and false when no record has been registered.
func (p *partitionState) commitPoint() (kgo.EpochOffset, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.commitPointLocked()
}

func (p *partitionState) commitPointLocked() (kgo.EpochOffset, bool) {
	if len(p.window) > 0 {
		return kgo.EpochOffset{Epoch: p.window[0].epoch, Offset: p.window[0].offset}, true
	}
	return p.next, p.hasNext
}

// lag is the number of records between the commit point (or, before any
// record is registered, the starting position) and the high watermark, or
// -1 when either is unknown.
func (p *partitionState) lag() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lagLocked()
}

func (p *partitionState) lagLocked() int64 {
	from := p.position
	if point, ok := p.commitPointLocked(); ok {
		from = point.Offset
	}
	if from < 0 || p.highWatermark < 0 {
		return -1
	}
	return max(0, p.highWatermark-from)
}

// setHighWatermark records the partition's end; ends only grow (a fetch
// and an end offset lookup may answer out of order).
func (p *partitionState) setHighWatermark(hwm int64) {
	p.mu.Lock()
	p.highWatermark = max(p.highWatermark, hwm)
	p.mu.Unlock()
}

// needsPosition reports whether the lag needs the starting position: no
// record was registered yet and the position is unknown.
func (p *partitionState) needsPosition() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.hasNext && p.position < 0
}

func (p *partitionState) setPosition(offset int64) {
	p.mu.Lock()
	if !p.hasNext {
		p.position = offset
	}
	p.mu.Unlock()
}

// stop marks the partition as being given up: records not yet started are
// abandoned when a worker reaches them.
func (p *partitionState) stop() {
	p.mu.Lock()
	p.stopping = true
	p.notify()
	p.mu.Unlock()
}

// waitIdle waits until no record is running (runningOnly) or none is
// pending, or until deadline. It reports whether the condition was met.
func (p *partitionState) waitIdle(deadline time.Time, runningOnly bool) bool {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	for {
		p.mu.Lock()
		if p.running == 0 && (runningOnly || p.pending == 0) {
			p.mu.Unlock()
			return true
		}
		if p.changed == nil {
			p.changed = make(chan struct{})
		}
		ch := p.changed
		p.mu.Unlock()
		select {
		case <-ch:
		case <-timer.C:
			return false
		}
	}
}

// partitionStatus is a snapshot for Status.
func (p *partitionState) status() PartitionStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := PartitionStatus{
		Topic:         p.tp.topic,
		Partition:     p.tp.partition,
		Committed:     p.committed,
		HighWatermark: p.highWatermark,
		Lag:           p.lagLocked(),
		InFlight:      p.pending,
	}
	return s
}

// tracker holds the states of the partitions currently assigned.
type tracker struct {
	parent context.Context // parent of the partitions' handler contexts
	mu     sync.Mutex
	parts  map[topicPartition]*partitionState
}

func newTracker(parent context.Context) *tracker {
	return &tracker{parent: parent, parts: map[topicPartition]*partitionState{}}
}

// get returns the state of a partition, creating it (created is true) if
// it is missing. The assignment callback runs before a partition is
// fetched, so that should not happen; if it does, handling the records
// risks duplicates, while dropping them would skip events for good.
func (t *tracker) get(topic string, partition int32) (p *partitionState, created bool) {
	tp := topicPartition{topic, partition}
	t.mu.Lock()
	defer t.mu.Unlock()
	p = t.parts[tp]
	if p == nil {
		p = newPartitionState(t.parent, tp)
		t.parts[tp] = p
		created = true
	}
	return p, created
}

// assign starts fresh states for newly assigned partitions. A partition that
// comes back after a revocation starts from its committed offset, so its old
// state is replaced.
func (t *tracker) assign(assigned map[string][]int32) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for topic, ps := range assigned {
		for _, partition := range ps {
			tp := topicPartition{topic, partition}
			if _, ok := t.parts[tp]; !ok {
				t.parts[tp] = newPartitionState(t.parent, tp)
			}
		}
	}
}

// lookup returns the states of the given partitions that are tracked.
func (t *tracker) lookup(m map[string][]int32) []*partitionState {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []*partitionState
	for topic, ps := range m {
		for _, partition := range ps {
			if p := t.parts[topicPartition{topic, partition}]; p != nil {
				out = append(out, p)
			}
		}
	}
	return out
}

// remove forgets partitions the consumer no longer owns.
func (t *tracker) remove(ps []*partitionState) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, p := range ps {
		if t.parts[p.tp] == p {
			delete(t.parts, p.tp)
		}
	}
}

// all returns every tracked partition, sorted by topic and partition.
func (t *tracker) all() []*partitionState {
	t.mu.Lock()
	out := make([]*partitionState, 0, len(t.parts))
	for _, p := range t.parts {
		out = append(out, p)
	}
	t.mu.Unlock()
	slices.SortFunc(out, func(a, b *partitionState) int {
		return cmp.Or(cmp.Compare(a.tp.topic, b.tp.topic), cmp.Compare(a.tp.partition, b.tp.partition))
	})
	return out
}

// toCommit returns, for the given partitions, the commit points that are
// ahead of what was last committed.
func toCommit(ps []*partitionState) map[string]map[int32]kgo.EpochOffset {
	out := map[string]map[int32]kgo.EpochOffset{}
	for _, p := range ps {
		p.mu.Lock()
		point, ok := p.commitPointLocked()
		if ok && point.Offset > p.committed {
			if out[p.tp.topic] == nil {
				out[p.tp.topic] = map[int32]kgo.EpochOffset{}
			}
			out[p.tp.topic][p.tp.partition] = point
		}
		p.mu.Unlock()
	}
	return out
}

// markCommitted records offsets the group accepted for the given
// partitions.
func markCommitted(ps []*partitionState, offsets map[string]map[int32]kgo.EpochOffset) {
	for _, p := range ps {
		if o, ok := offsets[p.tp.topic][p.tp.partition]; ok {
			p.mu.Lock()
			p.committed = max(p.committed, o.Offset)
			p.mu.Unlock()
		}
	}
}
