package engine

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/changelog"
	"github.com/esker-io/esker/statestore"
)

// cycle is one transaction's worth of work. Everything in it is discarded if
// the transaction aborts.
//
// Tasks are independent (an entity lives in exactly one), so the records of
// different tasks are processed in parallel, each task by one goroutine at a
// time; a task's records stay in offset order. Each task stages its writes in
// its own store batch, which carries its own checkpoint: atomicity is per
// task, which is all a restore needs.
type cycle struct {
	e    *Engine
	sess session
	ctx  context.Context
	// now is the cycle's time: every event and outcome of one transaction
	// carries it, and its header form is formatted once.
	now       time.Time
	nowHeader []byte

	tasks map[statestore.Task]*taskCycle
	order []*taskCycle
	n     int // commands processed

	projections     map[statestore.Task]*projCycle // projection.go
	projectionOrder []*projCycle
	bases           []*taskBase // every task of the cycle, in order

	wg  sync.WaitGroup // produce promises in flight
	mu  sync.Mutex
	err error // first produce or staging failure: the cycle must abort
}

// taskBase is what every task of a cycle has, whatever it runs: its store
// batch, its changelog and the produce promises that track it.
type taskBase struct {
	c              *cycle
	task           statestore.Task
	batch          *statestore.Batch
	changelogTopic string
	changelogTo    atomic.Int64             // highest changelog offset written; -1 none
	eventsTo       atomic.Int64             // highest events offset written; -1 none
	counts         map[string]int           // outcomes, by kind
	onEvent        func(*kgo.Record, error) // produce promises
	onChangelog    func(*kgo.Record, error)
}

func (c *cycle) newBase(task statestore.Task) *taskBase {
	b := &taskBase{c: c, task: task, batch: c.e.cfg.Store.NewBatch(), changelogTopic: changelog.Topic(c.e.cfg.AppID, task.Type)}
	b.changelogTo.Store(-1)
	b.eventsTo.Store(-1)
	c.bases = append(c.bases, b)
	return b
}

// taskCycle is one aggregate task's part of a cycle.
type taskCycle struct {
	*taskBase
	def         aggregate.Definition
	eventsTopic string
	contentType []byte
	pending     []*kgo.Record
	known       map[string][]byte // stored outcomes of this cycle's command ids
	entities    map[string]*entity
	order       []*entity
	commands    map[string]statestore.CommandRecord // staged outcomes, by command id
	outcomes    []aggregate.Outcome                 // only those someone awaits
	timestamps  []time.Time                         // command record timestamps, for latency
	processedTo int64                               // the store's command offset at the start of the cycle
	nextCommand int64                               // the command offset after this cycle
	end         int64                               // the partition's high watermark in this cycle's fetch, -1 if unknown
}

// entity is an entity's state within a cycle: loaded from the store on first
// touch, then updated in memory by every command of the cycle.
type entity struct {
	id        string
	version   int64
	state     any
	updatedAt time.Time
	dirty     bool
	journal   statestore.Journal
	// forgotten: the entity was forgotten (its state record is a marker);
	// forgetNow: this cycle forgets it, so its stored journals are deleted.
	forgotten, forgetNow bool
	cipher               aggregate.FieldCipher // nil unless the type has personal fields
}

// cycle runs steps 2–5 of the package comment for the records of one poll
// and whatever else is buffered within the commit interval. It returns an
// error only when the node cannot go on processing (its producer was fenced).
func (e *Engine) cycle(sess session, fetches kgo.Fetches) error {
	start := time.Now()
	// Produces and End must finish even while the node shuts down, so that
	// the cycle in flight commits or aborts cleanly.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	now := start.UTC()
	c := &cycle{
		e: e, sess: sess, ctx: ctx,
		now: now, nowHeader: []byte(now.Format(time.RFC3339Nano)),
		tasks: map[statestore.Task]*taskCycle{},
	}
	if err := sess.Begin(); err != nil {
		// The polled records must not be skipped: abort, which rewinds
		// consumption to the committed offsets.
		e.log.Error("begin transaction", "err", err)
		_, endErr := sess.End(ctx, false)
		e.repositionProjectionInputs(sess.Client())
		if e.beginFailures++; e.beginFailures >= 10 {
			// The producer is broken for good (franz-go reports a fatal
			// producer id error this way, for example after another
			// producer with this transactional id fenced it): a new
			// session gets a new producer id (see run).
			e.beginFailures = 0
			return fencedError{fmt.Errorf("cannot begin transactions (10 failures in a row): %w", err)}
		}
		return fatal(errors.Join(err, endErr), e.cfg.TransactionalID)
	}
	e.beginFailures = 0
	c.process(fetches)
	cl := sess.Client()
	for time.Since(start) < e.cfg.CommitInterval && cl.BufferedFetchRecords() > 0 {
		more := cl.PollRecords(ctx, 10000)
		if more.NumRecords() == 0 {
			break
		}
		c.process(more)
	}
	return fatal(c.commit(), e.cfg.TransactionalID)
}

// fencedError: another producer with this node's transactional id was
// initialized, or the producer is otherwise unusable. Run rejoins with a new
// session and producer id (see run).
type fencedError struct{ err error }

func (f fencedError) Error() string { return "producer fenced: " + f.err.Error() }
func (f fencedError) Unwrap() error { return f.err }

// storeError is a local store failure the node cannot continue after.
type storeError struct{ error }

func (e storeError) Unwrap() error { return e.error }

// fatal returns a node-stopping error for the errors no retry can cure.
func fatal(err error, transactionalID string) error {
	var se storeError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &se):
		return se
	case errors.Is(err, kerr.ProducerFenced), errors.Is(err, kerr.InvalidProducerEpoch):
		return fencedError{err}
	case errors.Is(err, kerr.TransactionalIDAuthorizationFailed), errors.Is(err, kerr.ClusterAuthorizationFailed):
		return fmt.Errorf("the node may not use transactional id %q: grant it Write on that transactional id: %w", transactionalID, err)
	}
	return nil
}

// process hands each task its records and runs the tasks in parallel.
func (c *cycle) process(fetches kgo.Fetches) {
	var busy []*taskCycle
	fetches.EachPartition(func(p kgo.FetchTopicPartition) {
		if len(p.Records) == 0 {
			return
		}
		def := c.e.byTopic[p.Topic]
		if def == nil {
			c.projectionRecords(p)
			return
		}
		task := statestore.Task{Type: def.Name(), Partition: p.Partition}
		if owned, _ := c.e.TaskStatus(task); !owned {
			return // revoked; the session aborts this cycle anyway
		}
		tc := c.taskCycle(task, def)
		tc.end = max(tc.end, p.HighWatermark)
		records := tc.skipProcessed(p)
		if len(records) == 0 {
			return
		}
		if len(tc.pending) == 0 {
			busy = append(busy, tc)
		}
		tc.pending = append(tc.pending, records...)
		tc.nextCommand = records[len(records)-1].Offset + 1
		c.n += len(records)
	})
	parallel(busy, func(tc *taskCycle) {
		cmds := tc.prepare()
		for i, r := range tc.pending {
			tc.handle(r, &cmds[i])
		}
		tc.pending = tc.pending[:0]
	})
	c.processProjections()
}

// parallel runs fn for every task, on at most GOMAXPROCS goroutines.
func parallel[T any](tasks []T, fn func(T)) {
	if len(tasks) == 1 {
		fn(tasks[0])
		return
	}
	workers := min(runtime.GOMAXPROCS(0), len(tasks))
	next := atomic.Int64{}
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := next.Add(1) - 1; i < int64(len(tasks)); i = next.Add(1) - 1 {
				fn(tasks[i])
			}
		}()
	}
	wg.Wait()
}

func (c *cycle) taskCycle(task statestore.Task, def aggregate.Definition) *taskCycle {
	tc, ok := c.tasks[task]
	if !ok {
		tc = &taskCycle{
			taskBase: c.newBase(task), def: def,
			eventsTopic: EventsTopic(task.Type), contentType: []byte(def.ContentType()),
			entities: map[string]*entity{},
			commands: map[string]statestore.CommandRecord{},
		}
		next, err := c.e.cfg.Store.CommandOffset(task)
		if err != nil {
			c.fail(fmt.Errorf("read the command offset of %s: %w", task, err))
		}
		tc.processedTo, tc.nextCommand, tc.end = next, next, -1
		c.tasks[task] = tc
		c.order = append(c.order, tc)
	}
	return tc
}

// skipProcessed drops the records of p whose effects the task's store
// already holds: below its command offset. The group's committed offsets
// normally start consumption there, but a consumer can be reset below them
// (an offset reset after detected data loss, an unclean leader election,
// expired committed offsets): without this, commands would be decided again
// — rejected ones might now be accepted, and accepted ones older than the
// idempotency window applied twice. A partition whose end is below the
// command offset was recreated or truncated: its offsets no longer name the
// commands the store counted, so the guard is dropped (loudly).
func (tc *taskCycle) skipProcessed(p kgo.FetchTopicPartition) []*kgo.Record {
	if tc.processedTo <= 0 {
		return p.Records
	}
	if p.HighWatermark >= 0 && p.HighWatermark < tc.processedTo {
		tc.c.e.log.Error("the commands partition ends below the offset this task has processed: recreated or truncated; processing its records as new",
			"task", tc.task.String(), "end", p.HighWatermark, "processed_to", tc.processedTo)
		tc.processedTo = 0
		return p.Records
	}
	i := 0
	for i < len(p.Records) && p.Records[i].Offset < tc.processedTo {
		i++
	}
	if i > 0 {
		tc.c.e.log.Warn("skipped commands this task had processed already (consumption was reset below its command offset)",
			"task", tc.task.String(), "skipped", i, "from", p.Records[0].Offset, "processed_to", tc.processedTo)
		tc.countN("replayed", i)
	}
	return p.Records[i:]
}

func (c *cycle) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
	}
}

func (c *cycle) failed() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// parsedCommand is a pending record's command, parsed before handling.
type parsedCommand struct {
	cmd aggregate.Command
	id  string
	err error
}

// prepare parses the pending commands and looks up, in one pass over the
// store, which of their ids already have an outcome.
func (tc *taskCycle) prepare() []parsedCommand {
	if tc.timestamps == nil {
		tc.timestamps = make([]time.Time, 0, len(tc.pending))
		tc.commands = make(map[string]statestore.CommandRecord, len(tc.pending))
	}
	cmds := make([]parsedCommand, len(tc.pending))
	ids := make([]string, len(tc.pending))
	for i, r := range tc.pending {
		p := &cmds[i]
		p.cmd, p.err = ParseCommand(r)
		p.id = p.cmd.CommandID
		if p.id == "" {
			// A command without an id (for example produced by hand) gets
			// one derived from its position, so a re-processed record keeps
			// its id.
			p.id = r.Topic + "-" + strconv.Itoa(int(r.Partition)) + "-" + strconv.FormatInt(r.Offset, 10)
		}
		ids[i] = p.id
	}
	known, err := tc.c.e.cfg.Store.Commands(tc.task, ids)
	if err != nil {
		// Without the lookup a duplicate could be applied twice: abort.
		tc.c.fail(fmt.Errorf("look up command ids: %w", err))
	}
	for k, v := range known {
		if tc.known == nil {
			tc.known = map[string][]byte{}
		}
		tc.known[k] = v
	}
	return cmds
}

// handle processes one command record. It never fails the cycle: a command
// that cannot be processed becomes a rejected outcome.
func (tc *taskCycle) handle(r *kgo.Record, p *parsedCommand) {
	e := tc.c.e
	tc.timestamps = append(tc.timestamps, r.Timestamp)
	id := string(r.Key)
	cmd, parseErr, cmdID := p.cmd, p.err, p.id
	awaited := e.waiters.waiting(cmdID)

	if prev, ok := tc.lookupCommand(cmdID); ok {
		if awaited {
			tc.outcomes = append(tc.outcomes, tc.replay(prev))
		}
		tc.count("duplicate")
		return
	}

	now := tc.c.now
	var gone, notFound bool
	reject := func(reason string, conflict bool, current int64) {
		rec := statestore.CommandRecord{CommandID: cmdID, EntityID: id, At: now.UnixNano(),
			Rejected: reason, Conflict: conflict, Gone: gone, NotFound: notFound, Current: current}
		tc.commands[cmdID] = rec
		// Rejections stay local: nothing reaches any topic for them.
		if err := tc.batch.Set(tc.task, statestore.CommandKey(cmdID), rec.Encode()); err != nil {
			tc.c.fail(err)
		}
		if awaited {
			tc.outcomes = append(tc.outcomes, aggregate.Outcome{CommandID: cmdID, EntityID: id,
				Version: current, Reason: reason, Conflict: conflict, Gone: gone, NotFound: notFound})
		}
		if conflict {
			tc.count("conflict")
		} else {
			tc.count("rejected")
		}
	}

	if err := aggregate.ValidateEntityID(id); err != nil {
		reject("invalid record key: "+err.Error(), false, 0)
		return
	}
	if want := aggregate.Partition(id, e.cfg.Partitions); want != r.Partition {
		reject(fmt.Sprintf("command for %q arrived on partition %d, but Kafka's default partitioner (murmur2) puts that key on partition %d; produce with the murmur2 partitioner (librdkafka: partitioner=murmur2_random)", id, r.Partition, want), false, 0)
		return
	}
	if parseErr != nil {
		reject(parseErr.Error(), false, 0)
		return
	}
	ent, err := tc.entity(id)
	if err != nil {
		var decodeErr stateDecodeError
		if errors.As(err, &decodeErr) {
			// The stored state does not fit the code: no retry helps.
			reject("cannot load state: "+err.Error(), false, 0)
			e.log.Error("load entity state", "task", tc.task, "id", id, "err", err)
			return
		}
		// A store read error may pass: abort the cycle and retry it.
		tc.c.fail(fmt.Errorf("read state of %s %q: %w", tc.task.Type, id, err))
		return
	}
	if ent.forgotten {
		gone = true
		reject(fmt.Sprintf("%s %q was forgotten", tc.task.Type, id), false, ent.version)
		return
	}
	if !aggregate.ExpectationMet(cmd.ExpectedVersion, ent.version) {
		reject(fmt.Sprintf("version conflict: the command expected: %s; current version is %d", aggregate.DescribeExpected(*cmd.ExpectedVersion), ent.version), true, ent.version)
		return
	}
	if cmd.Type == aggregate.ForgetCommand {
		if ent.version == 0 {
			notFound = true
			reject(fmt.Sprintf("%s %q does not exist", tc.task.Type, id), false, 0)
			return
		}
		ev := tc.forget(ent, cmd, cmdID)
		rec := statestore.CommandRecord{CommandID: cmdID, EntityID: id, At: now.UnixNano(), From: ev.Version, To: ev.Version}
		ent.journal.Commands = append(ent.journal.Commands, rec)
		tc.commands[cmdID] = rec
		if awaited {
			tc.outcomes = append(tc.outcomes, aggregate.Outcome{CommandID: cmdID, EntityID: id,
				Accepted: true, Version: ent.version, Events: []aggregate.Event{ev}})
		}
		tc.count("accepted")
		return
	}
	events, state, version, err := tc.decide(ent, cmd, cmdID)
	if err == nil && len(events) > 0 && e.isGuarded(tc.task, id) {
		err = tc.checkStateSize(id, state)
	}
	if err != nil {
		reject(err.Error(), false, ent.version)
		return
	}
	for i := range events {
		tc.produce(tc.eventRecord(&events[i]), false)
	}
	rec := statestore.CommandRecord{CommandID: cmdID, EntityID: id, At: now.UnixNano()}
	if len(events) > 0 {
		rec.From, rec.To = events[0].Version, version
		ent.state, ent.version, ent.updatedAt, ent.dirty = state, version, now, true
		ent.journal.Events = append(ent.journal.Events, events...)
	}
	ent.journal.Commands = append(ent.journal.Commands, rec)
	tc.commands[cmdID] = rec
	if awaited {
		tc.outcomes = append(tc.outcomes, aggregate.Outcome{CommandID: cmdID, EntityID: id,
			Accepted: true, Version: ent.version, Events: events})
	}
	tc.count("accepted")
}

// decide runs the user's code for one command: decode, Validate, decide,
// then encode and evolve each event. It computes the new state without
// touching the entity, so a rejection leaves it as it was; a panic in user
// code becomes a rejection rather than a crash of every node in turn.
func (tc *taskCycle) decide(ent *entity, cmd aggregate.Command, cmdID string) (events []aggregate.Event, state any, version int64, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("command handling panicked: %v", r)
		}
	}()
	def, now, id := tc.def, tc.c.now, ent.id
	value, err := def.DecodeCommand(cmd.Type, cmd.Data)
	if err != nil {
		return nil, nil, 0, err
	}
	if ent.cipher != nil {
		if value, err = aggregate.OpenPersonal(value, ent.cipher); err != nil {
			return nil, nil, 0, fmt.Errorf("cannot open the command's personal fields: %w", err)
		}
	}
	if err := def.ValidateCommand(value); err != nil {
		return nil, nil, 0, err
	}
	decided, err := def.Decide(ent.state, value)
	if err != nil {
		return nil, nil, 0, err
	}
	events = make([]aggregate.Event, 0, len(decided))
	state, version = ent.state, ent.version
	for _, ev := range decided {
		stored := ev
		if ent.cipher != nil {
			if stored, err = aggregate.SealPersonal(ev, ent.cipher); err != nil {
				return nil, nil, 0, fmt.Errorf("cannot seal the event's personal fields: %w", err)
			}
		}
		name, schema, data, err := def.EncodeEvent(stored)
		if err != nil {
			return nil, nil, 0, fmt.Errorf("cannot encode event: %w", err)
		}
		if len(data) > maxRecordBytes {
			return nil, nil, 0, fmt.Errorf("event %s is %d bytes encoded; Kafka records are limited to about %d bytes", name, len(data), maxRecordBytes)
		}
		version++
		state = evolve(def, state, ev)
		events = append(events, aggregate.Event{
			EntityID: id, Version: version, EventID: aggregate.EventID(def.Name(), id, version),
			Type: name, SchemaVersion: schema, CommandID: cmdID,
			CorrelationID: orDefault(cmd.CorrelationID, cmdID), CausationID: orDefault(cmd.CausationID, cmdID),
			Time: now, Data: data,
		})
	}
	return events, state, version, nil
}

// forget forgets an entity (the Forget command): it writes the plain
// Forgotten event, destroys the entity's data keys in the keys topic, and
// leaves a forgotten marker as its state; stageChangelog then deletes its
// journals, in the store and (tombstones) on the changelog. All of it
// commits in this cycle's transaction, or none of it.
func (tc *taskCycle) forget(ent *entity, cmd aggregate.Command, cmdID string) aggregate.Event {
	now, id := tc.c.now, ent.id
	ev := aggregate.Event{
		EntityID: id, Version: ent.version + 1, EventID: aggregate.EventID(tc.def.Name(), id, ent.version+1),
		Type: aggregate.ForgottenEvent, SchemaVersion: 1, CommandID: cmdID,
		CorrelationID: orDefault(cmd.CorrelationID, cmdID), CausationID: orDefault(cmd.CausationID, cmdID),
		Time: now, Data: aggregate.ForgottenEventData(now),
	}
	rec := tc.eventRecord(&ev)
	// The Forgotten event is plain JSON whatever the aggregate's codec.
	for i := range rec.Headers {
		if rec.Headers[i].Key == aggregate.HeaderContentType {
			rec.Headers[i].Value = []byte("application/json")
		}
	}
	tc.produce(rec, false)
	if keys := tc.c.e.cfg.Keys; keys != nil {
		// Destroy every key, including one another node created a moment ago.
		if err := keys.Sync(tc.c.ctx); err != nil {
			tc.c.fail(err)
		}
		for _, r := range keys.ForgetRecords(tc.task.Type, id, now) {
			tc.produce(r, false)
		}
	}
	ent.markForgotten(tc.def, ev.Version, now)
	ent.forgetNow = true
	ent.journal.Events = nil // this cycle's events of the entity go too
	return ev
}

// dropJournals deletes the entity's stored journals: from the store, and
// from the changelog with tombstones, so no restore brings them back.
func (tc *taskCycle) dropJournals(ent *entity) {
	keys, err := tc.c.e.cfg.Store.JournalKeys(tc.task, ent.id)
	if err != nil {
		tc.c.fail(fmt.Errorf("list journals of %s %q: %w", tc.task.Type, ent.id, err))
		return
	}
	for _, k := range keys {
		tc.produce(&kgo.Record{Topic: tc.changelogTopic, Partition: tc.task.Partition, Key: k}, true)
		if err := tc.batch.Delete(tc.task, k); err != nil {
			tc.c.fail(err)
		}
	}
}

// checkStateSize rejects a command whose new state is too large to write.
func (tc *taskCycle) checkStateSize(id string, state any) error {
	data, err := tc.entities[id].encodeState(tc.def, state)
	if err != nil {
		return fmt.Errorf("cannot encode the new state: %w", err)
	}
	if len(data) > maxRecordBytes {
		return tc.stateTooLarge(id, len(data))
	}
	return nil
}

func (tc *taskCycle) stateTooLarge(id string, n int) error {
	return fmt.Errorf("the state of %s %q would be %d bytes encoded; Kafka records are limited to about %d bytes: keep aggregate state small", tc.task.Type, id, n, maxRecordBytes)
}

// maxRecordBytes bounds one event payload or state snapshot: a record must
// fit in a produce batch (franz-go's default ProducerBatchMaxBytes is
// 1,000,012 bytes, as is the broker's default message.max.bytes), with room
// for key and headers.
const maxRecordBytes = 900_000

// journalChunkBytes is the size above which one entity's journal of one
// cycle is split into several records.
const journalChunkBytes = 256 << 10

// stateDecodeError marks a stored state the aggregate's codec cannot read.
type stateDecodeError struct{ err error }

func (e stateDecodeError) Error() string { return e.err.Error() }
func (e stateDecodeError) Unwrap() error { return e.err }

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// count tallies an outcome; the tallies reach the metrics only if the
// cycle commits, so a re-processed record is counted once.
func (tc *taskBase) count(outcome string) { tc.countN(outcome, 1) }

func (tc *taskBase) countN(outcome string, n int) {
	if tc.counts == nil {
		tc.counts = map[string]int{}
	}
	tc.counts[outcome] += n
}

// eventRecord builds an event's record; the headers carry the envelope (see
// aggregate.Event.Headers, which this matches without per-event formatting
// of the shared time and content type).
func (tc *taskCycle) eventRecord(ev *aggregate.Event) *kgo.Record {
	// One buffer holds every variable header value and the key: the write
	// path builds a record per event, so allocations count.
	buf := make([]byte, 0, 2*len(ev.EntityID)+len(ev.EventID)+len(ev.Type)+len(ev.CommandID)+
		len(ev.CorrelationID)+len(ev.CausationID)+24)
	slice := func(start int) []byte { return buf[start:len(buf):len(buf)] }
	// The record and its headers share one allocation too.
	a := new(eventRecordAlloc)
	headers := a.headers[:0]
	add := func(key string, value string) {
		if value == "" {
			return
		}
		start := len(buf)
		buf = append(buf, value...)
		headers = append(headers, kgo.RecordHeader{Key: key, Value: slice(start)})
	}
	start := len(buf)
	buf = append(buf, ev.EntityID...)
	key := slice(start)
	add(aggregate.HeaderEntityID, ev.EntityID)
	start = len(buf)
	buf = strconv.AppendInt(buf, ev.Version, 10)
	headers = append(headers, kgo.RecordHeader{Key: aggregate.HeaderVersion, Value: slice(start)})
	add(aggregate.HeaderEventID, ev.EventID)
	add(aggregate.HeaderEventType, ev.Type)
	start = len(buf)
	buf = strconv.AppendInt(buf, int64(ev.SchemaVersion), 10)
	headers = append(headers, kgo.RecordHeader{Key: aggregate.HeaderSchemaVersion, Value: slice(start)})
	headers = append(headers,
		kgo.RecordHeader{Key: aggregate.HeaderTime, Value: tc.c.nowHeader},
		kgo.RecordHeader{Key: aggregate.HeaderContentType, Value: tc.contentType})
	add(aggregate.HeaderCommandID, ev.CommandID)
	add(aggregate.HeaderCorrelationID, ev.CorrelationID)
	add(aggregate.HeaderCausationID, ev.CausationID)
	a.rec = kgo.Record{
		Topic:     tc.eventsTopic,
		Partition: tc.task.Partition,
		Key:       key,
		Value:     ev.Data,
		Headers:   headers,
		Timestamp: ev.Time,
	}
	return &a.rec
}

// eventRecordAlloc is an event record with room for its headers (at most
// ten, see eventRecord), allocated as one object.
type eventRecordAlloc struct {
	rec     kgo.Record
	headers [10]kgo.RecordHeader
}

// entity returns the cycle's view of an entity, loading it on first touch.
func (tc *taskCycle) entity(id string) (*entity, error) {
	if ent, ok := tc.entities[id]; ok {
		return ent, nil
	}
	ent, err := loadEntity(tc.c.ctx, tc.c.e.cfg.Store, tc.c.e.cfg.Keys, tc.task, tc.def, id)
	if err != nil {
		return nil, err
	}
	tc.entities[id] = ent
	tc.order = append(tc.order, ent)
	return ent, nil
}

// loadEntity reads an entity from task t of the store: its state decoded
// by def with its personal fields opened (keys nil: none), its version, or
// its forgotten marker. The write path and the rebuild load entities alike.
func loadEntity(ctx context.Context, store *statestore.Store, keys Keys, t statestore.Task, def aggregate.Definition, id string) (*entity, error) {
	ent := &entity{id: id}
	decode := def.DecodeState
	if keys != nil && def.Personal() {
		ent.cipher = keys.Cipher(ctx, def.Name(), id)
		decode = func(b []byte) (any, error) {
			s, err := def.DecodeState(b)
			if err != nil {
				return nil, err
			}
			return aggregate.OpenPersonal(s, ent.cipher)
		}
	}
	var err error
	ent.state, ent.version, ent.updatedAt, ent.forgotten, err = loadState(store, t, id, def.NewState, decode)
	if err != nil {
		return nil, err
	}
	return ent, nil
}

// encodeState encodes a state of the entity for the store and the
// changelog, its personal fields sealed.
func (ent *entity) encodeState(def aggregate.Definition, state any) ([]byte, error) {
	if ent.cipher != nil {
		sealed, err := aggregate.SealPersonal(state, ent.cipher)
		if err != nil {
			return nil, fmt.Errorf("seal personal fields: %w", err)
		}
		state = sealed
	}
	return def.EncodeState(state)
}

// stateRecord is the entity's state record as stored and written to the
// changelog: its sealed state, or the forgotten marker.
func (ent *entity) stateRecord(def aggregate.Definition) (statestore.StateRecord, error) {
	rec := statestore.StateRecord{Version: ent.version, UpdatedAt: ent.updatedAt, Forgotten: ent.forgotten}
	if ent.forgotten {
		return rec, nil
	}
	var err error
	rec.State, err = ent.encodeState(def, ent.state)
	return rec, err
}

// markForgotten makes the entity forgotten at version (its Forgotten event)
// and time at: the zero state, and a forgotten marker once written.
func (ent *entity) markForgotten(def aggregate.Definition, version int64, at time.Time) {
	ent.state, ent.version, ent.updatedAt = def.NewState(), version, at
	ent.dirty, ent.forgotten = true, true
}

// loadState reads the state record of an entity (or a projection row) and
// decodes its state; one that was never written is zero (newState). A
// record or state that does not decode is a stateDecodeError.
// A forgotten entity has the zero state, its last version and forgotten set.
func loadState(store *statestore.Store, t statestore.Task, id string, newState func() any, decode func([]byte) (any, error)) (state any, version int64, updatedAt time.Time, forgotten bool, err error) {
	raw, found, err := store.Get(t, statestore.StateKey(id))
	if err != nil || !found {
		return newState(), 0, time.Time{}, false, err
	}
	rec, err := statestore.DecodeStateRecord(raw)
	if err != nil {
		return nil, 0, time.Time{}, false, stateDecodeError{err}
	}
	if rec.Forgotten {
		return newState(), rec.Version, rec.UpdatedAt, true, nil
	}
	if state, err = decode(rec.State); err != nil {
		return nil, 0, time.Time{}, false, stateDecodeError{err}
	}
	return state, rec.Version, rec.UpdatedAt, false, nil
}

// lookupCommand finds an earlier outcome of the command id within the
// idempotency window: staged in this cycle, or committed in the store (found
// by prepare).
func (tc *taskCycle) lookupCommand(cmdID string) (statestore.CommandRecord, bool) {
	if rec, ok := tc.commands[cmdID]; ok {
		return rec, true
	}
	raw, found := tc.known[cmdID]
	if !found {
		return statestore.CommandRecord{}, false
	}
	rec, err := statestore.DecodeCommandRecord(raw)
	if err != nil {
		return statestore.CommandRecord{}, false
	}
	if time.Since(time.Unix(0, rec.At)) > tc.c.e.cfg.IdempotencyWindow {
		return statestore.CommandRecord{}, false
	}
	return rec, true
}

// replay rebuilds the first outcome of a command from its record.
func (tc *taskCycle) replay(rec statestore.CommandRecord) aggregate.Outcome {
	o := aggregate.Outcome{CommandID: rec.CommandID, EntityID: rec.EntityID}
	if rec.Rejected != "" {
		o.Reason, o.Conflict, o.Version = rec.Rejected, rec.Conflict, rec.Current
		return o
	}
	o.Accepted = true
	if rec.To == 0 {
		if ent, err := tc.entity(rec.EntityID); err == nil {
			o.Version = ent.version
		}
		return o
	}
	o.Version = rec.To
	if ent := tc.entities[rec.EntityID]; ent != nil {
		for _, ev := range ent.journal.Events {
			if ev.Version >= rec.From && ev.Version <= rec.To {
				o.Events = append(o.Events, ev)
			}
		}
	}
	if int64(len(o.Events)) < rec.To-rec.From+1 {
		o.Events, _ = tc.c.e.cfg.Store.Events(tc.task, rec.EntityID, rec.From, int(rec.To-rec.From+1))
	}
	return o
}

func (tc *taskBase) produce(r *kgo.Record, isChangelog bool) {
	c := tc.c
	c.wg.Add(1)
	if tc.onEvent == nil {
		// Promises made once per task and cycle, not per record.
		tc.onEvent = func(r *kgo.Record, err error) {
			defer c.wg.Done()
			if err != nil {
				c.fail(err)
				return
			}
			for {
				cur := tc.eventsTo.Load()
				if r.Offset <= cur || tc.eventsTo.CompareAndSwap(cur, r.Offset) {
					break
				}
			}
		}
		tc.onChangelog = func(r *kgo.Record, err error) {
			defer c.wg.Done()
			if err != nil {
				c.fail(err)
				return
			}
			for {
				cur := tc.changelogTo.Load()
				if r.Offset <= cur || tc.changelogTo.CompareAndSwap(cur, r.Offset) {
					break
				}
			}
		}
	}
	promise := tc.onEvent
	if isChangelog {
		promise = tc.onChangelog
	}
	c.sess.Client().Produce(c.ctx, r, promise)
}

// stageChangelog produces the task's changelog records, one state record and
// one journal per touched entity, and stages the same writes in its batch.
func (tc *taskCycle) stageChangelog() {
	topic := tc.changelogTopic
	if tc.nextCommand > tc.processedTo {
		v := binary.BigEndian.AppendUint64(nil, uint64(tc.nextCommand))
		tc.produce(&kgo.Record{Topic: topic, Partition: tc.task.Partition, Key: statestore.CommandOffsetKey, Value: v}, true)
		if err := changelog.Apply(tc.batch, tc.task, statestore.CommandOffsetKey, v); err != nil {
			tc.c.fail(err)
		}
	}
	for _, ent := range tc.order {
		if !ent.dirty && len(ent.journal.Commands) == 0 {
			continue
		}
		if ent.forgetNow {
			tc.dropJournals(ent)
		}
		if ent.dirty {
			rec, err := ent.stateRecord(tc.def)
			if err != nil {
				tc.c.fail(fmt.Errorf("encode state of %s %q: %w", tc.task.Type, ent.id, err))
				return
			}
			if len(rec.State) > maxRecordBytes {
				// No retry can write it: abort, and have the retried cycle
				// check this entity's size per command.
				err := tc.stateTooLarge(ent.id, len(rec.State))
				tc.c.e.guard(tc.task, ent.id, err.Error())
				tc.c.fail(err)
				return
			}
			k, v := changelog.StateRecord(ent.id, rec)
			tc.produce(&kgo.Record{Topic: topic, Partition: tc.task.Partition, Key: k, Value: v}, true)
			if err := tc.batch.Set(tc.task, k, v); err != nil {
				tc.c.fail(err)
			}
		}
		for _, j := range splitJournal(&ent.journal, journalChunkBytes) {
			k, v, err := changelog.JournalRecord(ent.id, j)
			if err != nil {
				tc.c.fail(err)
				return
			}
			tc.produce(&kgo.Record{Topic: topic, Partition: tc.task.Partition, Key: k, Value: v}, true)
			// The same writes a restore of this record makes (changelog.Apply).
			if err := changelog.StageJournal(tc.batch, tc.task, k, v, j); err != nil {
				tc.c.fail(err)
			}
		}
	}
}

// splitJournal cuts a journal whose events are large into chunks of about
// budget bytes (each its own changelog record, keyed by its first version).
// A command goes with the chunk holding its first event.
func splitJournal(j *statestore.Journal, budget int) []*statestore.Journal {
	size := 0
	for i := range j.Events {
		size += len(j.Events[i].Data) + 128
	}
	if size <= budget || len(j.Events) < 2 {
		return []*statestore.Journal{j}
	}
	var chunks []*statestore.Journal
	cur, curSize := &statestore.Journal{}, 0
	for i := range j.Events {
		n := len(j.Events[i].Data) + 128
		if curSize+n > budget && len(cur.Events) > 0 {
			chunks = append(chunks, cur)
			cur, curSize = &statestore.Journal{}, 0
		}
		cur.Events = append(cur.Events, j.Events[i])
		curSize += n
	}
	chunks = append(chunks, cur)
	for _, c := range j.Commands {
		at := 0
		for i, ch := range chunks {
			if c.From >= ch.Events[0].Version {
				at = i
			}
		}
		chunks[at].Commands = append(chunks[at].Commands, c)
	}
	return chunks
}

// commit writes the changelog, ends the transaction and, if it committed,
// applies the store batches and reports the outcomes. It returns End's error,
// or an error that must stop the node.
func (c *cycle) commit() error {
	e := c.e
	parallel(c.order, (*taskCycle).stageChangelog)
	parallel(c.projectionOrder, (*projCycle).stageChangelog)
	// Every record must be acknowledged before deciding: franz-go commits a
	// transaction even when one of its records failed (the producer id
	// stays usable), so the decision to commit is ours.
	flushErr := c.sess.Client().Flush(c.ctx)
	if flushErr != nil {
		c.fail(fmt.Errorf("flush: %w", flushErr))
	}
	c.wg.Wait()
	failed := c.failed()
	endCtx, cancelEnd := context.WithTimeout(c.ctx, e.endTimeout())
	e.setEndCancel(cancelEnd)
	endStart := time.Now()
	committed, err := c.sess.End(endCtx, failed == nil)
	e.setEndCancel(nil)
	cancelEnd()
	if err != nil {
		e.log.Warn("ending transaction", "err", err, "committed", committed, "waited", time.Since(endStart).Round(time.Millisecond))
		if failed == nil {
			// The commit was tried and failed in a way that leaves its
			// outcome unknown: the broker may have committed it. The
			// store must not guess: restore the cycle's tasks from the
			// changelog (which waits until the transaction is resolved)
			// before processing them again; commands re-read after the
			// rewind are then found in the store if they committed.
			tasks := make([]statestore.Task, len(c.bases))
			for i, b := range c.bases {
				tasks[i] = b.task
			}
			e.restoreAgain(c.sess.Client(), tasks)
		}
	}
	if failed != nil {
		e.log.Warn("cycle failed; aborted and rewinding", "err", failed)
		if committed {
			return storeError{fmt.Errorf("a transaction committed although the cycle failed (%v): stopping before the store diverges", failed)}
		}
	}
	m := e.cfg.Metrics
	if !committed {
		for _, tc := range c.bases {
			tc.batch.Discard()
		}
		e.repositionProjectionInputs(c.sess.Client())
		if m != nil {
			m.Transactions.WithLabelValues("aborted").Inc()
		}
		return err
	}
	// The tasks' batches are independent (each carries its own
	// checkpoint), so they are applied in parallel.
	var applyMu sync.Mutex
	var applyErr error
	parallel(c.bases, func(tc *taskBase) {
		if off := tc.changelogTo.Load(); off >= 0 {
			if err := tc.batch.SetCheckpoint(tc.task, off+1); err != nil {
				e.log.Error("stage checkpoint", "task", tc.task, "err", err)
			}
		}
		if err := tc.batch.Commit(); err != nil {
			applyMu.Lock()
			defer applyMu.Unlock()
			if applyErr == nil {
				// Kafka holds the committed truth, but the store now lacks
				// it: processing on would decide on stale state. Stop; a
				// restart restores the changelog tail.
				applyErr = storeError{fmt.Errorf("applying a committed transaction to the store of %s: %w", tc.task, err)}
			}
		}
	})
	if applyErr != nil {
		return applyErr
	}
	if m != nil {
		m.Transactions.WithLabelValues("committed").Inc()
		m.BatchCommands.Observe(float64(c.n))
		for _, tc := range c.order {
			for outcome, n := range tc.counts {
				m.command(tc.task.Type, outcome).Add(float64(n))
			}
			h := m.latency(tc.task.Type)
			for _, ts := range tc.timestamps {
				h.Observe(time.Since(ts).Seconds())
			}
		}
		for _, pc := range c.projectionOrder {
			for outcome, n := range pc.counts {
				m.projectionEvents(pc.task.Type, outcome).Add(float64(n))
			}
		}
	}
	for _, pc := range c.projectionOrder {
		pc.committed()
	}
	for _, tc := range c.order {
		if tc.end >= 0 {
			e.progress.report(tc.task, max(tc.end-tc.nextCommand, 0), 0)
		}
		if off := tc.eventsTo.Load(); off >= 0 {
			e.noteEvents(tc.task, off+1)
		}
		e.waiters.resolve(tc.outcomes)
	}
	for _, b := range c.bases {
		e.signal(b.task)
	}
	return err
}

// ReadEvents returns up to limit events of an entity from version from.
func ReadEvents(store *statestore.Store, task statestore.Task, id string, from int64, limit int) ([]aggregate.Event, error) {
	return store.Events(task, id, from, limit)
}
