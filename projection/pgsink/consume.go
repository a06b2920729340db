package pgsink

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/internal/backoff"
)

// onAssigned records newly assigned partitions; their stored offsets are
// loaded next, by adjust.
func (r *run) onAssigned(_ context.Context, _ *kgo.Client, assigned map[string][]int32) {
	s := r.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.st.phase == phaseJoining {
		s.st.phase = phaseRunning
	}
	for topic, ps := range assigned {
		for _, p := range ps {
			s.st.owned[topicPartition{topic, p}] = &partState{end: -1}
		}
	}
	if len(assigned) > 0 {
		r.log.Info("partitions assigned", "partitions", assigned)
	}
}

func (r *run) onRevoked(_ context.Context, _ *kgo.Client, revoked map[string][]int32) {
	r.drop(revoked)
	if len(revoked) > 0 {
		r.log.Info("partitions revoked", "partitions", revoked)
	}
}

func (r *run) onLost(_ context.Context, _ *kgo.Client, lost map[string][]int32) {
	r.drop(lost)
	if len(lost) > 0 {
		r.log.Warn("partitions lost (the group session ended, for example after a session timeout); the offset fence keeps this member from writing them", "partitions", lost)
	}
}

func (r *run) drop(tps map[string][]int32) {
	s := r.s
	s.mu.Lock()
	defer s.mu.Unlock()
	for topic, ps := range tps {
		for _, p := range ps {
			delete(s.st.owned, topicPartition{topic, p})
		}
	}
}

// onBlocked is called (in its own goroutine) when a rebalance waits for the
// poll this member holds.
func (r *run) onBlocked(context.Context, *kgo.Client) {
	select {
	case r.blocked <- struct{}{}:
	default:
	}
}

// adjust replaces the offsets the group fetched from Kafka with the offsets
// stored in PostgreSQL: PostgreSQL is the source of truth, Kafka commits are
// only informational. A partition without a stored row gets one, at the
// StartAt position resolved to a number, so that the row exists before the
// first batch and every batch can update it conditionally.
//
// It retries while PostgreSQL (or Kafka, for resolving StartAt) fails, until
// ctx is done (the group session is being revoked) or the sink stops; the
// partitions are not fetched meanwhile, and the sink reports not ready.
func (r *run) adjust(ctx context.Context, offsets map[string]map[int32]kgo.Offset) (map[string]map[int32]kgo.Offset, error) {
	select {
	case <-r.clReady:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-r.ctx.Done():
		return nil, r.ctx.Err()
	}
	s := r.s
	s.mu.Lock()
	s.st.loading++
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.st.loading--
		if s.st.loading == 0 {
			s.st.loadErr = nil
		}
		s.mu.Unlock()
	}()

	var want []topicPartition
	for topic, ps := range offsets {
		for p := range ps {
			want = append(want, topicPartition{topic, p})
		}
	}
	bo := r.backoff()
	for attempt := 1; ; attempt++ {
		stored, dbErr, err := r.loadOffsets(ctx, want)
		if err == nil {
			r.dbSucceeded()
			s.mu.Lock()
			for _, tp := range want {
				next := stored[tp]
				offsets[tp.topic][tp.partition] = kgo.NewOffset().At(next)
				if ps := s.st.owned[tp]; ps != nil {
					ps.loaded, ps.next = true, next
				}
			}
			s.mu.Unlock()
			r.log.Info("resuming from offsets stored in PostgreSQL", "offsets", describeOffsets(stored))
			return offsets, nil
		}
		if ctx.Err() != nil || r.ctx.Err() != nil {
			return nil, err
		}
		if dbErr {
			r.dbFailed(err)
		}
		s.mu.Lock()
		s.st.loadErr = err
		s.mu.Unlock()
		r.countRetry()
		wait := bo.Next()
		r.log.Warn("cannot load stored offsets for newly assigned partitions; retrying (the partitions are not consumed meanwhile)",
			"attempt", attempt, "retry_in", wait.Round(time.Millisecond), "err", err)
		if !backoff.Sleep(ctx, wait, r.ctx.Done()) {
			return nil, err
		}
	}
}

// loadOffsets returns the stored next offsets of tps, creating rows at the
// StartAt position for partitions that have none. dbErr says whether err
// came from PostgreSQL.
func (r *run) loadOffsets(ctx context.Context, tps []topicPartition) (stored map[topicPartition]int64, dbErr bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, r.s.cfg.txTimeout)
	defer cancel()
	stored, err = r.readOffsets(ctx, tps)
	if err != nil {
		return nil, true, fmt.Errorf("reading stored offsets: %w", err)
	}
	var missing []topicPartition
	for _, tp := range tps {
		if _, ok := stored[tp]; !ok {
			missing = append(missing, tp)
		}
	}
	if len(missing) == 0 {
		return stored, false, nil
	}
	start, err := r.resolveStart(ctx, missing)
	if err != nil {
		return nil, false, fmt.Errorf("resolving start position %s in Kafka: %w", r.s.cfg.start, err)
	}
	b := &pgx.Batch{}
	for _, tp := range missing {
		b.Queue(`INSERT INTO `+r.s.offsets+` (sink, topic, partition, next_offset) VALUES ($1, $2, $3, $4)
ON CONFLICT (sink, topic, partition) DO NOTHING`, r.s.name, tp.topic, tp.partition, start[tp])
	}
	if err := r.pool.SendBatch(ctx, b).Close(); err != nil {
		return nil, true, fmt.Errorf("storing start offsets: %w", err)
	}
	// Read back: a concurrent member may have inserted first.
	again, err := r.readOffsets(ctx, missing)
	if err != nil {
		return nil, true, fmt.Errorf("reading stored offsets: %w", err)
	}
	for _, tp := range missing {
		next, ok := again[tp]
		if !ok {
			return nil, true, fmt.Errorf("the offsets row of %s/%d vanished right after it was inserted", tp.topic, tp.partition)
		}
		stored[tp] = next
	}
	r.log.Info("no stored offsets for partitions: starting at "+r.s.cfg.start.String(), "offsets", describeOffsets(again))
	return stored, false, nil
}

func (r *run) readOffsets(ctx context.Context, tps []topicPartition) (map[topicPartition]int64, error) {
	names := topicNames(tps)
	rows, err := r.pool.Query(ctx, `SELECT topic, partition, next_offset FROM `+r.s.offsets+` WHERE sink = $1 AND topic = ANY($2)`, r.s.name, names)
	if err != nil {
		return nil, err
	}
	all := map[topicPartition]int64{}
	var tp topicPartition
	var next int64
	if _, err := pgx.ForEachRow(rows, []any{&tp.topic, &tp.partition, &next}, func() error {
		all[tp] = next
		return nil
	}); err != nil {
		return nil, err
	}
	out := make(map[topicPartition]int64, len(tps))
	for _, tp := range tps {
		if n, ok := all[tp]; ok {
			out[tp] = n
		}
	}
	return out, nil
}

// topicNames returns the distinct topics of tps.
func topicNames(tps []topicPartition) []string {
	var names []string
	for _, tp := range tps {
		if !slices.Contains(names, tp.topic) {
			names = append(names, tp.topic)
		}
	}
	return names
}

// resolveStart turns StartAt into offsets of the partitions.
func (r *run) resolveStart(ctx context.Context, tps []topicPartition) (map[topicPartition]int64, error) {
	names := topicNames(tps)
	adm := kadm.NewClient(r.cl)
	var listed kadm.ListedOffsets
	var err error
	switch r.s.cfg.start.kind {
	case startLatest:
		listed, err = adm.ListCommittedOffsets(ctx, names...)
	case startTime:
		listed, err = adm.ListOffsetsAfterMilli(ctx, r.s.cfg.start.at.UnixMilli(), names...)
	default:
		listed, err = adm.ListStartOffsets(ctx, names...)
	}
	if err != nil {
		return nil, err
	}
	out := make(map[topicPartition]int64, len(tps))
	for _, tp := range tps {
		o, ok := listed.Lookup(tp.topic, tp.partition)
		switch {
		case !ok:
			return nil, fmt.Errorf("no offset listed for %s/%d", tp.topic, tp.partition)
		case o.Err != nil:
			return nil, fmt.Errorf("%s/%d: %w", tp.topic, tp.partition, o.Err)
		case o.Offset < 0:
			return nil, fmt.Errorf("%s/%d: no offset found", tp.topic, tp.partition)
		}
		out[tp] = o.Offset
	}
	return out, nil
}

// partBatch is one partition's part of a batch.
type partBatch struct {
	tp       topicPartition
	expected int64 // the stored next offset the batch starts from
	first    int64 // first record offset (data or control)
	next     int64 // last record offset + 1: the stored offset after the batch
	events   int
}

type batch struct {
	events []Event
	parts  []*partBatch
	opened int // events[:opened] went through rt.OpenEvent
	sealed int // of those, events left sealed (aggregate.ErrUnknownKey)
}

// loop polls batches and writes them until ctx is done or a permanent error.
func (r *run) loop() error {
	for {
		select { // a signal from before this poll is stale
		case <-r.blocked:
		default:
		}
		fetches := r.cl.PollRecords(r.ctx, r.s.cfg.maxBatch)
		if r.ctx.Err() != nil || fetches.IsClientClosed() {
			return nil
		}
		failed := false
		fetches.EachError(func(topic string, p int32, err error) {
			if errors.Is(err, context.Canceled) {
				return
			}
			failed = true
			r.log.Warn("fetch error; the client retries", "topic", topic, "partition", p, "err", err)
		})
		if failed && fetches.NumRecords() == 0 {
			// Errors only: do not spin on a failure the client reports
			// at every poll.
			r.cl.AllowRebalance()
			if !backoff.Sleep(r.ctx, 500*time.Millisecond, nil) {
				return nil
			}
			continue
		}
		b, err := r.build(fetches)
		if err == nil && len(b.parts) > 0 {
			err = r.write(b)
		}
		r.cl.AllowRebalance()
		if err != nil {
			return err
		}
	}
}

// build turns polled records into a batch. Records of partitions this sink
// does not hold, or below a partition's stored offset (already written),
// are left out. Control records (transaction markers) are not events, but
// the offsets move past them, so a caught-up sink's stored offset is the
// partition's end. The events' personal fields are opened by write, so that
// a keyring failure is retried like a database failure.
func (r *run) build(fetches kgo.Fetches) (*batch, error) {
	b := &batch{}
	var err error
	s := r.s
	fetches.EachPartition(func(fp kgo.FetchTopicPartition) {
		if err != nil || len(fp.Records) == 0 {
			return
		}
		tp := topicPartition{fp.Topic, fp.Partition}
		s.mu.Lock()
		ps := s.st.owned[tp]
		var expected int64
		if ps != nil && ps.loaded {
			expected = ps.next
			end := fp.HighWatermark
			if fp.LastStableOffset >= 0 {
				end = fp.LastStableOffset
			}
			ps.end = max(ps.end, end)
		}
		s.mu.Unlock()
		if ps == nil || !ps.loaded {
			r.log.Warn("records of a partition this sink does not hold; left out", "topic", fp.Topic, "partition", fp.Partition, "records", len(fp.Records))
			return
		}
		pb := &partBatch{tp: tp, expected: expected, first: -1}
		below := 0
		for _, rec := range fp.Records {
			if rec.Offset < expected {
				// Already written. The client never fetches below the
				// stored offset unless it reset a position that was out
				// of range (the topic was deleted and created again).
				below++
				continue
			}
			if pb.first < 0 {
				pb.first = rec.Offset
			}
			pb.next = rec.Offset + 1
			if rec.Attrs.IsControl() {
				continue
			}
			hs := make([]aggregate.Header, len(rec.Headers))
			for i, h := range rec.Headers {
				hs[i] = aggregate.Header{Key: h.Key, Value: h.Value}
			}
			ev, e := aggregate.EventFromRecord(rec.Key, hs, rec.Value)
			if e != nil {
				err = fmt.Errorf("pgsink: sink %s: record %s/%d at offset %d is not an esker event: %w; the sink stops rather than skip it",
					s.name, fp.Topic, fp.Partition, rec.Offset, e)
				return
			}
			b.events = append(b.events, Event{Event: ev, Topic: fp.Topic, Partition: fp.Partition, Offset: rec.Offset})
			pb.events++
		}
		if below > 0 {
			r.log.Warn("records below the stored offset were fetched and left out: they were written before (if the topic was deleted and created again, delete the sink's rows in esker_sink_offsets)",
				"topic", fp.Topic, "partition", fp.Partition, "records", below, "stored_offset", expected)
		}
		if pb.first >= 0 {
			b.parts = append(b.parts, pb)
		}
	})
	return b, err
}

func (b *batch) String() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "%d events from ", len(b.events))
	for i, p := range b.parts {
		if i == 4 {
			fmt.Fprintf(&sb, " and %d more partitions", len(b.parts)-i)
			break
		}
		if i > 0 {
			sb.WriteString(", ")
		}
		fmt.Fprintf(&sb, "%s/%d offsets %d-%d", p.tp.topic, p.tp.partition, p.first, p.next-1)
	}
	return sb.String()
}

// write opens the personal fields of a batch's events and writes the batch,
// retrying while the database is unreachable or the events cannot be opened
// (rt.OpenEvent failed with an error other than aggregate.ErrUnknownKey:
// the keys topic cannot be read now). It returns nil when the batch was
// written, fenced or given back (then the client was rewound to the stored
// offsets), and an error only for a permanent failure.
func (r *run) write(b *batch) error {
	s := r.s
	bo := r.backoff()
	var firstFailure time.Time
	defer func() {
		s.mu.Lock()
		s.st.retrying = false
		// Not retrying any more: written, or given back (if the
		// partitions stay here, the next attempt finds out again).
		s.st.openErr = nil
		s.mu.Unlock()
	}()
	for attempt := 1; ; attempt++ {
		start := time.Now()
		openErr := r.open(b)
		var fenced map[topicPartition]int64
		var err error
		if openErr == nil {
			fenced, err = r.tryWrite(b)
			if err == nil && fenced == nil {
				r.written(b, time.Since(start))
				if attempt > 1 {
					r.log.Info("batch written after failed attempts", "attempts", attempt, "failing_for", time.Since(firstFailure).Round(time.Millisecond), "batch", b.String())
				}
				return nil
			}
			if err == nil {
				r.fence(b, fenced, attempt > 1)
				return nil
			}
		}
		if r.ctx.Err() != nil {
			return nil // stopping; the next start's fence resolves an unknown outcome
		}
		if attempt == 1 {
			firstFailure = time.Now()
		}
		msg := "cannot write batch; nothing of it is written, retrying"
		if openErr != nil {
			err = openErr
			msg = "cannot open the personal fields of the batch's events (the keys topic cannot be read now); nothing of it is written, retrying"
			s.mu.Lock()
			if s.st.openErr == nil {
				s.st.openErrSince = time.Now()
			}
			s.st.openErr = err
			s.mu.Unlock()
		} else {
			if !r.unreachable(err) {
				return fmt.Errorf("pgsink: sink %s: writing %s: %w; nothing of the batch was written: fix the cause and run the sink again to resume at these events", s.name, b, err)
			}
			if !conflict(err) {
				r.dbFailed(err)
			}
		}
		r.countRetry()
		s.mu.Lock()
		s.st.retrying = true
		s.mu.Unlock()
		wait := bo.Next()
		r.log.Warn(msg, "attempt", attempt, "retry_in", wait.Round(time.Millisecond), "batch", b.String(), "err", err)
		if !backoff.Sleep(r.ctx, wait, r.blocked) {
			if r.ctx.Err() != nil {
				return nil
			}
			r.log.Info("a rebalance waits for this member: giving the unwritten batch back so the partitions can move; it is read again from the stored offsets", "batch", b.String())
			r.rewind(b, nil)
			return nil
		}
	}
}

// open opens the personal fields of the batch's events not opened yet, with
// rt.OpenEvent, within TxTimeout. An event no key opens (the error wraps
// aggregate.ErrUnknownKey: another application's event, or a keys topic
// that was lost) is left sealed, as the engine's projections fold it: no
// retry would open it, and stopping would hold the partition back forever.
// Any other error is returned; the events opened so far stay opened, and
// the next call goes on from the one that failed.
func (r *run) open(b *batch) error {
	if r.rt.OpenEvent == nil {
		b.opened = len(b.events)
		return nil
	}
	if b.opened == len(b.events) {
		return nil
	}
	ctx, cancel := context.WithTimeout(r.ctx, r.s.cfg.txTimeout)
	defer cancel()
	for ; b.opened < len(b.events); b.opened++ {
		e := &b.events[b.opened]
		ev, err := r.rt.OpenEvent(ctx, e.Topic, e.Event)
		switch {
		case err == nil:
			e.Event = ev
		case errors.Is(err, aggregate.ErrUnknownKey):
			b.sealed++
			r.log.Warn("an event's personal fields cannot be opened: no key opens them; applied sealed",
				"topic", e.Topic, "partition", e.Partition, "offset", e.Offset, "entity", e.EntityID, "type", e.Type, "err", err)
		default:
			return fmt.Errorf("opening the personal fields of %s/%d at offset %d: %w", e.Topic, e.Partition, e.Offset, err)
		}
	}
	s := r.s
	s.mu.Lock()
	s.st.openErr = nil
	s.mu.Unlock()
	return nil
}

const updateOffsetSQL = `UPDATE %s SET next_offset = $4
WHERE sink = $1 AND topic = $2 AND partition = $3 AND next_offset = $5`

// tryWrite is one attempt: one transaction that first moves the offsets of
// the batch's partitions conditionally (from the offset the batch starts at
// to the offset after it) and then applies the events. If another writer
// moved an offset meanwhile, the update matches no row: the transaction is
// rolled back before ApplyFunc runs, and fenced holds the stored offsets of
// those partitions.
//
// The conditional UPDATE also takes the row lock, so a second writer of the
// same partition blocks until this transaction ends and then finds the
// offset moved (READ COMMITTED re-checks the WHERE clause on the new row).
//
// An attempt under way when Run's context ends is finished (within
// TxTimeout), so that a clean stop knows whether its last batch committed.
func (r *run) tryWrite(b *batch) (fenced map[topicPartition]int64, err error) {
	s := r.s
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.ctx), s.cfg.txTimeout)
	defer cancel()
	tx, err := r.pool.Begin(ctx)
	if err != nil {
		return nil, fmt.Errorf("begin: %w", err)
	}
	defer func() {
		if err != nil && tx.Conn().IsClosed() {
			err = connLost{err}
		}
		_ = tx.Rollback(ctx)
	}()

	q := &pgx.Batch{}
	// A writer that freezes (a paused VM, a stopped process) with this
	// transaction open would hold the offset row locks, and so block the
	// partitions' next owner, until its connection dies. The server ends
	// a transaction left idle longer than TxTimeout.
	q.Queue(`SELECT set_config('idle_in_transaction_session_timeout', $1, true)`, strconv.FormatInt(max(s.cfg.txTimeout.Milliseconds(), 1), 10))
	update := fmt.Sprintf(updateOffsetSQL, s.offsets)
	for _, p := range b.parts {
		q.Queue(update, s.name, p.tp.topic, p.tp.partition, p.next, p.expected)
	}
	res := tx.SendBatch(ctx, q)
	if _, err := res.Exec(); err != nil {
		_ = res.Close()
		return nil, fmt.Errorf("setting the idle transaction timeout: %w", err)
	}
	var lost []topicPartition
	for _, p := range b.parts {
		tag, err := res.Exec()
		if err != nil {
			_ = res.Close()
			return nil, fmt.Errorf("updating offsets: %w", err)
		}
		if tag.RowsAffected() != 1 {
			lost = append(lost, p.tp)
		}
	}
	if err := res.Close(); err != nil {
		return nil, fmt.Errorf("updating offsets: %w", err)
	}
	if len(lost) > 0 {
		stored, err := r.readOffsetsTx(ctx, tx, lost)
		if err != nil {
			return nil, fmt.Errorf("reading offsets: %w", err)
		}
		return stored, nil
	}
	if len(b.events) > 0 {
		if err := callSafely(func() error { return s.apply(ctx, tx, b.events) }); err != nil {
			return nil, fmt.Errorf("ApplyFunc: %w", err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, fmt.Errorf("commit: %w", err)
	}
	return nil, nil
}

func (r *run) readOffsetsTx(ctx context.Context, tx pgx.Tx, tps []topicPartition) (map[topicPartition]int64, error) {
	out := make(map[topicPartition]int64, len(tps))
	for _, tp := range tps {
		var next int64
		err := tx.QueryRow(ctx, `SELECT next_offset FROM `+r.s.offsets+` WHERE sink = $1 AND topic = $2 AND partition = $3`,
			r.s.name, tp.topic, tp.partition).Scan(&next)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil, fmt.Errorf("%w: the offsets row of %s/%d was deleted while the sink ran", errOffsetsRow, tp.topic, tp.partition)
		}
		if err != nil {
			return nil, err
		}
		out[tp] = next
	}
	return out, nil
}

var errOffsetsRow = errors.New("broken offsets table")

// written records a committed batch.
func (r *run) written(b *batch, took time.Duration) {
	s := r.s
	r.m.events.Add(float64(len(b.events)))
	r.m.batch.Observe(took.Seconds())
	s.mu.Lock()
	for _, p := range b.parts {
		if ps := s.st.owned[p.tp]; ps != nil && ps.loaded && ps.next == p.expected {
			ps.next = p.next
		}
		s.st.doneOffsets += p.next - p.expected
	}
	s.st.events += int64(len(b.events))
	s.st.sealed += int64(b.sealed)
	s.st.lastLatency = took
	s.st.lastBatchAt = time.Now()
	s.st.dbOK, s.st.dbErr = true, nil
	s.st.lastDBOK = s.st.lastBatchAt
	r.m.lag.Set(float64(s.lagLocked()))
	s.mu.Unlock()
	select {
	case r.commit <- struct{}{}:
	default:
	}
}

// fence handles a batch whose offsets another writer had moved: nothing was
// written; the client is rewound to the stored offsets.
func (r *run) fence(b *batch, stored map[topicPartition]int64, retried bool) {
	s := r.s
	r.m.fenced.Inc()
	s.mu.Lock()
	s.st.fenced++
	s.st.dbOK, s.st.dbErr = true, nil
	s.mu.Unlock()
	for _, p := range b.parts {
		now, ok := stored[p.tp]
		if !ok {
			continue
		}
		if retried && now == p.next {
			// The previous attempt's COMMIT went through although its
			// answer was lost: the batch is written, once.
			r.log.Info("the previous attempt's commit had succeeded although its answer was lost; not writing the batch again",
				"topic", p.tp.topic, "partition", p.tp.partition, "next_offset", now)
		} else {
			r.log.Warn("another writer moved the stored offset (this member lost the partition in a rebalance, or is a zombie); batch discarded, resuming from the stored offset",
				"topic", p.tp.topic, "partition", p.tp.partition, "expected", p.expected, "stored", now)
		}
	}
	r.rewind(b, stored)
}

// rewind sets the client's fetch position of the batch's partitions back to
// the stored offsets (updated from stored where given), dropping the
// batch and anything buffered after it. Called before AllowRebalance, so no
// revoke runs concurrently.
func (r *run) rewind(b *batch, stored map[topicPartition]int64) {
	s := r.s
	set := map[string]map[int32]kgo.EpochOffset{}
	s.mu.Lock()
	for _, p := range b.parts {
		to := p.expected
		if n, ok := stored[p.tp]; ok {
			to = n
			if ps := s.st.owned[p.tp]; ps != nil && ps.loaded {
				ps.next = n
			}
		}
		if set[p.tp.topic] == nil {
			set[p.tp.topic] = map[int32]kgo.EpochOffset{}
		}
		set[p.tp.topic][p.tp.partition] = kgo.EpochOffset{Epoch: -1, Offset: to}
	}
	s.mu.Unlock()
	r.cl.SetOffsets(set)
}

// monitor updates lag and readiness in the background: it lists the
// partitions' end offsets every few seconds, checks the database while the
// sink is idle, and logs catch-up progress.
func (r *run) monitor() {
	const (
		tick          = time.Second
		listEvery     = 3 * time.Second
		pingAfterIdle = 2 * time.Second
		progressEvery = 5 * time.Second
		catchUpLag    = 1000
	)
	adm := kadm.NewClient(r.cl)
	t := time.NewTicker(tick)
	defer t.Stop()
	var (
		lastList     time.Time
		catching     bool
		catchStart   time.Time
		lastLog      time.Time
		lastLogEvs   int64
		catchDoneOff int64
	)
	s := r.s
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-t.C:
		}
		now := time.Now()
		if now.Sub(lastList) >= listEvery {
			lastList = now
			r.listEnds(adm)
		}
		s.mu.Lock()
		idle := !s.st.retrying && now.Sub(s.st.lastDBOK) >= pingAfterIdle
		s.mu.Unlock()
		if idle {
			ctx, cancel := context.WithTimeout(r.ctx, 2*time.Second)
			err := r.pool.Ping(ctx)
			cancel()
			if r.ctx.Err() != nil {
				return
			}
			if err != nil {
				s.mu.Lock()
				wasOK := s.st.dbOK
				s.mu.Unlock()
				r.dbFailed(err)
				if wasOK {
					r.log.Warn("PostgreSQL health check failed; the sink reports not ready until the database answers", "err", err)
				}
			} else {
				r.dbSucceeded()
			}
		}

		s.mu.Lock()
		lag := s.lagLocked()
		events, doneOff := s.st.events, s.st.doneOffsets
		s.mu.Unlock()
		r.m.lag.Set(float64(lag))
		switch {
		case lag >= catchUpLag && !catching:
			catching, catchStart, lastLog, lastLogEvs, catchDoneOff = true, now, now, events, doneOff
			r.log.Info("catching up", "lag", lag)
		case lag >= catchUpLag && now.Sub(lastLog) >= progressEvery:
			done := doneOff - catchDoneOff
			pct := 100 * float64(done) / float64(done+lag)
			rate := float64(events-lastLogEvs) / now.Sub(lastLog).Seconds()
			r.log.Info(fmt.Sprintf("catching up: %.1f%% done, %d offsets behind, %.0f events/s", pct, lag, rate),
				"lag", lag, "percent", pct, "events_per_second", rate)
			lastLog, lastLogEvs = now, events
		case lag < catchUpLag && catching:
			catching = false
			r.log.Info("caught up", "took", now.Sub(catchStart).Round(time.Millisecond), "lag", lag)
		}
	}
}

// listEnds refreshes the end offsets of the owned partitions.
func (r *run) listEnds(adm *kadm.Client) {
	ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
	defer cancel()
	listed, err := adm.ListCommittedOffsets(ctx, r.s.topics...)
	if err != nil {
		return // the fetches report broker trouble
	}
	s := r.s
	s.mu.Lock()
	defer s.mu.Unlock()
	listed.Each(func(o kadm.ListedOffset) {
		if ps := s.st.owned[topicPartition{o.Topic, o.Partition}]; ps != nil && o.Err == nil && o.Offset > ps.end {
			ps.end = o.Offset
		}
	})
}

// commitToKafka commits the stored offsets to Kafka, best-effort, at most
// once a second: only for lag tooling.
func (r *run) commitToKafka() {
	var last map[string]map[int32]kgo.EpochOffset
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-r.commit:
		}
		offsets := r.snapshot()
		if !sameOffsets(offsets, last) {
			done := make(chan error, 1)
			r.cl.CommitOffsets(r.ctx, offsets, func(_ *kgo.Client, _ *kmsg.OffsetCommitRequest, resp *kmsg.OffsetCommitResponse, err error) {
				if err == nil && resp != nil {
					for _, t := range resp.Topics {
						for _, p := range t.Partitions {
							if p.ErrorCode != 0 && err == nil {
								err = fmt.Errorf("%s/%d: error code %d", t.Topic, p.Partition, p.ErrorCode)
							}
						}
					}
				}
				done <- err
			})
			select {
			case err := <-done:
				if err != nil && r.ctx.Err() == nil {
					r.log.Debug("best-effort Kafka offset commit failed (PostgreSQL holds the offsets)", "err", err)
				} else {
					last = offsets
				}
			case <-r.ctx.Done():
				return
			}
		}
		if !backoff.Sleep(r.ctx, time.Second, nil) {
			return
		}
	}
}

func (r *run) snapshot() map[string]map[int32]kgo.EpochOffset {
	s := r.s
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]map[int32]kgo.EpochOffset{}
	for tp, ps := range s.st.owned {
		if !ps.loaded {
			continue
		}
		if out[tp.topic] == nil {
			out[tp.topic] = map[int32]kgo.EpochOffset{}
		}
		out[tp.topic][tp.partition] = kgo.EpochOffset{Epoch: -1, Offset: ps.next}
	}
	return out
}

func sameOffsets(a, b map[string]map[int32]kgo.EpochOffset) bool {
	return maps.EqualFunc(a, b, maps.Equal)
}

func describeOffsets(m map[topicPartition]int64) string {
	parts := make([]string, 0, len(m))
	for tp, n := range m {
		parts = append(parts, fmt.Sprintf("%s/%d@%d", tp.topic, tp.partition, n))
	}
	slices.Sort(parts)
	return strings.Join(parts, " ")
}
