package engine

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/changelog"
	"github.com/esker-io/esker/statestore"
)

// cycle is one transaction's worth of work. Everything in it is discarded if
// the transaction aborts.
type cycle struct {
	e     *Engine
	sess  session
	batch *statestore.Batch

	entities map[entityKey]*entity
	order    []*entity
	commands map[string]statestore.CommandRecord // staged outcomes, by command id
	outcomes []aggregate.Outcome
	latency  []latencySample
	touched  map[statestore.Task]bool
	// now is the cycle's time: every event and outcome of one transaction
	// carries it, and its header form is formatted once.
	now       time.Time
	nowHeader []byte

	wg          sync.WaitGroup // produce promises in flight
	mu          sync.Mutex     // guards the fields below, written by promises
	produceErr  error
	changelogTo map[statestore.Task]int64 // highest changelog offset written
}

type entityKey struct {
	task statestore.Task
	id   string
}

// entity is an entity's state within a cycle: loaded from the store on first
// touch, then updated in memory by every command of the cycle.
type entity struct {
	key       entityKey
	def       aggregate.Definition
	version   int64
	state     any
	updatedAt time.Time
	dirty     bool
	journal   statestore.Journal
}

type latencySample struct {
	typ string
	at  time.Time // the command record's timestamp
}

// cycle runs steps 2–5 of the package comment for the records of one poll
// and whatever else is buffered within the commit interval.
func (e *Engine) cycle(sess session, fetches kgo.Fetches) {
	start := time.Now()
	now := start.UTC()
	c := &cycle{
		now:         now,
		nowHeader:   []byte(now.Format(time.RFC3339Nano)),
		e:           e,
		sess:        sess,
		batch:       e.cfg.Store.NewBatch(),
		entities:    map[entityKey]*entity{},
		commands:    map[string]statestore.CommandRecord{},
		touched:     map[statestore.Task]bool{},
		changelogTo: map[statestore.Task]int64{},
	}
	if err := sess.Begin(); err != nil {
		e.log.Error("begin transaction", "err", err)
		c.batch.Discard()
		return
	}
	// Produces and End must finish even while the node shuts down, so that
	// the cycle in flight commits or aborts cleanly.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	n := c.process(ctx, fetches)
	cl := sess.Client()
	for time.Since(start) < e.cfg.CommitInterval && cl.BufferedFetchRecords() > 0 {
		more := cl.PollRecords(ctx, 10000)
		if more.NumRecords() == 0 {
			break
		}
		n += c.process(ctx, more)
	}
	c.commit(ctx, n)
}

func (c *cycle) process(ctx context.Context, fetches kgo.Fetches) int {
	n := 0
	fetches.EachRecord(func(r *kgo.Record) {
		n++
		c.handle(ctx, r)
	})
	return n
}

// handle processes one command record. It never fails the cycle: a command
// that cannot be processed becomes a rejected outcome.
func (c *cycle) handle(ctx context.Context, r *kgo.Record) {
	e := c.e
	def := e.byTopic[r.Topic]
	if def == nil {
		return
	}
	task := statestore.Task{Type: def.Name(), Partition: r.Partition}
	if owned, _ := e.TaskStatus(task); !owned {
		return // revoked; the session aborts this cycle anyway
	}
	c.touched[task] = true
	c.latency = append(c.latency, latencySample{def.Name(), r.Timestamp})
	id := string(r.Key)
	cmd, envErr := CommandEnvelope(r.Value)
	cmdID := cmd.CommandID
	if cmdID == "" {
		// A command without an id (for example produced by hand) gets one
		// derived from its position, so a re-processed record keeps its id.
		cmdID = fmt.Sprintf("%s-%d-%d", r.Topic, r.Partition, r.Offset)
	}

	if prev, ok := c.lookupCommand(task, cmdID); ok {
		c.outcomes = append(c.outcomes, c.replay(task, def, prev))
		c.count(def, "duplicate")
		return
	}

	now := c.now
	reject := func(reason string, conflict bool, current int64) {
		rec := statestore.CommandRecord{CommandID: cmdID, EntityID: id, At: now.UnixNano(),
			Rejected: reason, Conflict: conflict, Current: current}
		c.commands[cmdID] = rec
		// Rejections stay local: nothing reaches any topic for them.
		if err := c.batch.Set(task, statestore.CommandKey(cmdID), rec.Encode()); err != nil {
			c.fail(err)
		}
		c.outcomes = append(c.outcomes, aggregate.Outcome{CommandID: cmdID, EntityID: id,
			Version: current, Reason: reason, Conflict: conflict})
		if conflict {
			c.count(def, "conflict")
		} else {
			c.count(def, "rejected")
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
	if envErr != nil {
		reject(envErr.Error(), false, 0)
		return
	}
	ent, err := c.entity(task, def, id)
	if err != nil {
		reject("cannot load state: "+err.Error(), false, 0)
		e.log.Error("load entity state", "task", task, "id", id, "err", err)
		return
	}
	if cmd.ExpectedVersion != nil && *cmd.ExpectedVersion != ent.version {
		reject(fmt.Sprintf("version conflict: expected version %d, current version is %d", *cmd.ExpectedVersion, ent.version), true, ent.version)
		return
	}
	value, err := def.DecodeCommand(cmd.Type, cmd.Data)
	if err != nil {
		reject(err.Error(), false, ent.version)
		return
	}
	if err := def.ValidateCommand(value); err != nil {
		reject(err.Error(), false, ent.version)
		return
	}
	decided, err := def.Decide(ent.state, value)
	if err != nil {
		reject(err.Error(), false, ent.version)
		return
	}

	events := make([]aggregate.Event, 0, len(decided))
	state, version := ent.state, ent.version
	for _, ev := range decided {
		name, schema, data, err := def.EncodeEvent(ev)
		if err != nil {
			reject("cannot encode event: "+err.Error(), false, ent.version)
			return
		}
		version++
		state = def.Evolve(state, ev)
		events = append(events, aggregate.Event{
			EntityID: id, Version: version, EventID: aggregate.EventID(def.Name(), id, version),
			Type: name, SchemaVersion: schema, CommandID: cmdID,
			CorrelationID: orDefault(cmd.CorrelationID, cmdID), CausationID: orDefault(cmd.CausationID, cmdID),
			Time: now, Data: data,
		})
	}
	for i := range events {
		c.produce(ctx, task, c.eventRecord(def, &events[i], r.Partition))
	}
	rec := statestore.CommandRecord{CommandID: cmdID, EntityID: id, At: now.UnixNano()}
	if len(events) > 0 {
		rec.From, rec.To = events[0].Version, version
		ent.state, ent.version, ent.updatedAt, ent.dirty = state, version, now, true
		ent.journal.Events = append(ent.journal.Events, events...)
	}
	ent.journal.Commands = append(ent.journal.Commands, rec)
	c.commands[cmdID] = rec
	c.outcomes = append(c.outcomes, aggregate.Outcome{CommandID: cmdID, EntityID: id,
		Accepted: true, Version: ent.version, Events: events})
	c.count(def, "accepted")
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func (c *cycle) count(def aggregate.Definition, outcome string) {
	if m := c.e.cfg.Metrics; m != nil {
		m.command(def.Name(), outcome).Inc()
	}
}

// eventRecord builds an event's record; the headers carry the envelope (see
// aggregate.Event.Headers, which this matches without per-event formatting
// of the shared time and content type).
func (c *cycle) eventRecord(def aggregate.Definition, ev *aggregate.Event, partition int32) *kgo.Record {
	headers := make([]kgo.RecordHeader, 0, 10)
	headers = append(headers,
		kgo.RecordHeader{Key: aggregate.HeaderEntityID, Value: []byte(ev.EntityID)},
		kgo.RecordHeader{Key: aggregate.HeaderVersion, Value: strconv.AppendInt(nil, ev.Version, 10)},
		kgo.RecordHeader{Key: aggregate.HeaderEventID, Value: []byte(ev.EventID)},
		kgo.RecordHeader{Key: aggregate.HeaderEventType, Value: []byte(ev.Type)},
		kgo.RecordHeader{Key: aggregate.HeaderSchemaVersion, Value: strconv.AppendInt(nil, int64(ev.SchemaVersion), 10)},
		kgo.RecordHeader{Key: aggregate.HeaderTime, Value: c.nowHeader},
		kgo.RecordHeader{Key: aggregate.HeaderContentType, Value: []byte(def.ContentType())},
	)
	if ev.CommandID != "" {
		headers = append(headers, kgo.RecordHeader{Key: aggregate.HeaderCommandID, Value: []byte(ev.CommandID)})
	}
	if ev.CorrelationID != "" {
		headers = append(headers, kgo.RecordHeader{Key: aggregate.HeaderCorrelationID, Value: []byte(ev.CorrelationID)})
	}
	if ev.CausationID != "" {
		headers = append(headers, kgo.RecordHeader{Key: aggregate.HeaderCausationID, Value: []byte(ev.CausationID)})
	}
	return &kgo.Record{
		Topic:     EventsTopic(def.Name()),
		Partition: partition,
		Key:       []byte(ev.EntityID),
		Value:     ev.Data,
		Headers:   headers,
		Timestamp: ev.Time,
	}
}

// entity returns the cycle's view of an entity, loading it on first touch.
func (c *cycle) entity(task statestore.Task, def aggregate.Definition, id string) (*entity, error) {
	k := entityKey{task, id}
	if ent, ok := c.entities[k]; ok {
		return ent, nil
	}
	ent := &entity{key: k, def: def, state: def.NewState()}
	raw, found, err := c.e.cfg.Store.Get(task, statestore.StateKey(id))
	if err != nil {
		return nil, err
	}
	if found {
		rec, err := statestore.DecodeStateRecord(raw)
		if err != nil {
			return nil, err
		}
		if ent.state, err = def.DecodeState(rec.State); err != nil {
			return nil, err
		}
		ent.version, ent.updatedAt = rec.Version, rec.UpdatedAt
	}
	c.entities[k] = ent
	c.order = append(c.order, ent)
	return ent, nil
}

// lookupCommand finds an earlier outcome of the command id within the
// idempotency window: staged in this cycle, or committed in the store.
func (c *cycle) lookupCommand(task statestore.Task, cmdID string) (statestore.CommandRecord, bool) {
	if rec, ok := c.commands[cmdID]; ok {
		return rec, true
	}
	raw, found, err := c.e.cfg.Store.Get(task, statestore.CommandKey(cmdID))
	if err != nil || !found {
		return statestore.CommandRecord{}, false
	}
	rec, err := statestore.DecodeCommandRecord(raw)
	if err != nil {
		return statestore.CommandRecord{}, false
	}
	if time.Since(time.Unix(0, rec.At)) > c.e.cfg.IdempotencyWindow {
		return statestore.CommandRecord{}, false
	}
	return rec, true
}

// replay rebuilds the first outcome of a command from its record.
func (c *cycle) replay(task statestore.Task, def aggregate.Definition, rec statestore.CommandRecord) aggregate.Outcome {
	o := aggregate.Outcome{CommandID: rec.CommandID, EntityID: rec.EntityID}
	if rec.Rejected != "" {
		o.Reason, o.Conflict, o.Version = rec.Rejected, rec.Conflict, rec.Current
		return o
	}
	o.Accepted = true
	if rec.To == 0 {
		if ent, err := c.entity(task, def, rec.EntityID); err == nil {
			o.Version = ent.version
		}
		return o
	}
	o.Version = rec.To
	if ent := c.entities[entityKey{task, rec.EntityID}]; ent != nil {
		for _, ev := range ent.journal.Events {
			if ev.Version >= rec.From && ev.Version <= rec.To {
				o.Events = append(o.Events, ev)
			}
		}
	}
	if int64(len(o.Events)) < rec.To-rec.From+1 {
		o.Events, _ = ReadEvents(c.e.cfg.Store, task, rec.EntityID, rec.From, int(rec.To-rec.From+1))
	}
	return o
}

func (c *cycle) produce(ctx context.Context, task statestore.Task, r *kgo.Record) {
	c.wg.Add(1)
	isChangelog := r.Topic != EventsTopic(task.Type)
	c.sess.Client().Produce(ctx, r, func(r *kgo.Record, err error) {
		defer c.wg.Done()
		c.mu.Lock()
		defer c.mu.Unlock()
		if err != nil {
			if c.produceErr == nil {
				c.produceErr = err
			}
			return
		}
		if isChangelog && r.Offset >= c.changelogTo[task] {
			c.changelogTo[task] = r.Offset
		}
	})
}

func (c *cycle) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.produceErr == nil {
		c.produceErr = err
	}
}

// commit writes the changelog, ends the transaction and, if it committed,
// applies the store batch and reports the outcomes.
func (c *cycle) commit(ctx context.Context, n int) {
	e := c.e
	for _, ent := range c.order {
		if !ent.dirty && len(ent.journal.Commands) == 0 {
			continue
		}
		task := ent.key.task
		topic := changelog.Topic(e.cfg.AppID, task.Type)
		if ent.dirty {
			state, err := ent.def.EncodeState(ent.state)
			if err != nil {
				c.fail(fmt.Errorf("encode state of %s %q: %w", task.Type, ent.key.id, err))
				break
			}
			k, v := changelog.StateRecord(ent.key.id, statestore.StateRecord{Version: ent.version, UpdatedAt: ent.updatedAt, State: state})
			c.produce(ctx, task, &kgo.Record{Topic: topic, Partition: task.Partition, Key: k, Value: v})
			if err := c.batch.Set(task, k, v); err != nil {
				c.fail(err)
			}
		}
		k, v, err := changelog.JournalRecord(ent.key.id, &ent.journal)
		if err != nil {
			c.fail(err)
			break
		}
		c.produce(ctx, task, &kgo.Record{Topic: topic, Partition: task.Partition, Key: k, Value: v})
		// The same writes a restore of this record makes (changelog.Apply).
		if err := changelog.StageJournal(c.batch, task, k, v, &ent.journal); err != nil {
			c.fail(err)
		}
	}

	c.mu.Lock()
	ok := c.produceErr == nil
	c.mu.Unlock()
	committed, err := c.sess.End(ctx, ok)
	c.wg.Wait()
	if err != nil {
		e.log.Warn("ending transaction", "err", err, "committed", committed)
	}
	if c.produceErr != nil {
		e.log.Warn("cycle failed; aborted and rewinding", "err", c.produceErr)
	}
	m := e.cfg.Metrics
	if !committed {
		c.batch.Discard()
		if m != nil {
			m.Transactions.WithLabelValues("aborted").Inc()
		}
		return
	}
	for task, off := range c.changelogTo {
		if err := c.batch.SetCheckpoint(task, off+1); err != nil {
			e.log.Error("stage checkpoint", "err", err)
		}
	}
	if err := c.batch.Commit(); err != nil {
		// Kafka holds the committed truth; the changelog tail restores it
		// when the task is next assigned.
		e.log.Error("applying committed batch to the store failed", "err", err)
	}
	e.waiters.resolve(c.outcomes)
	for task := range c.touched {
		e.signal(task)
	}
	if m != nil {
		m.Transactions.WithLabelValues("committed").Inc()
		m.BatchCommands.Observe(float64(n))
		for _, l := range c.latency {
			m.CommandLatency.WithLabelValues(l.typ).Observe(time.Since(l.at).Seconds())
		}
	}
}

// ReadEvents returns up to limit events of an entity from version from.
func ReadEvents(store *statestore.Store, task statestore.Task, id string, from int64, limit int) ([]aggregate.Event, error) {
	return store.Events(task, id, from, limit)
}
