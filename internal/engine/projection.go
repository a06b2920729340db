package engine

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/changelog"
	"github.com/esker-io/esker/projection"
	"github.com/esker-io/esker/statestore"
)

// Projection tasks. A projection × partition is a task of the same cycle as
// the aggregates: it consumes its sources' partition (and its repartition
// topic's, when it re-keys), folds each event into the row of its key, and
// writes the changed rows and its input offsets to its changelog and store
// in the cycle's transaction. A change for a row of another partition is
// produced to the repartition topic in the same transaction and folded by
// the task that owns that partition when the transaction has committed.
//
// Invariant: a task's store holds exactly the effects of its input records
// below its input offsets (statestore.InputOffsetKey), which travel on its
// changelog with the rows: consumption reset below them skips the records
// already folded (skipProcessed), so no event is folded twice.

// RepartitionTopic names the topic through which a re-keying projection
// sends changes to the partition of their row.
func RepartitionTopic(appID, projectionName string) string {
	return appID + "-" + projectionName + "-repartition"
}

// inputTopics lists the topics a projection's tasks consume.
func (e *Engine) inputTopics(p projection.Definition) []string {
	var out []string
	for _, s := range p.Sources() {
		if !slices.Contains(out, s.Topic()) {
			out = append(out, s.Topic())
		}
	}
	if p.Rekeys() {
		out = append(out, RepartitionTopic(e.cfg.AppID, p.Name()))
	}
	return out
}

// taskTypesOf returns the task types that consume a topic: the aggregate
// type of a commands topic, or the projections reading it.
func (e *Engine) taskTypesOf(topic string) []string {
	if d, ok := e.byTopic[topic]; ok {
		return []string{d.Name()}
	}
	return e.readers[topic]
}

// projectionTopics returns the topics the projections write: their
// changelogs and repartition topics.
func projectionTopics(cfg Config) []TopicSpec {
	var specs []TopicSpec
	for _, p := range cfg.Projections {
		specs = append(specs, TopicSpec{changelog.Topic(cfg.AppID, p.Name()), map[string]string{"cleanup.policy": "compact"}})
		if p.Rekeys() {
			// A change is needed only until the owner of its row has
			// folded it, which is at once unless the group is down.
			specs = append(specs, TopicSpec{RepartitionTopic(cfg.AppID, p.Name()), map[string]string{
				"cleanup.policy": "delete",
				"retention.ms":   strconv.FormatInt(cfg.CommandRetention.Milliseconds(), 10),
			}})
		}
	}
	return specs
}

// ProjectionNames returns the registered projections' names.
func (e *Engine) ProjectionNames() []string {
	out := make([]string, 0, len(e.cfg.Projections))
	for _, p := range e.cfg.Projections {
		out = append(out, p.Name())
	}
	return out
}

// projCycle is one projection task's part of a cycle.
type projCycle struct {
	*taskBase
	def         projection.Definition
	repartition string // the repartition topic; "" when the projection does not re-key
	pending     []*kgo.Record
	rows        map[string]*projRow
	rowOrder    []*projRow
	entities    map[string]*entityRow // group-by rows, by entity id
	entityOrder []*entityRow
	stored      map[string]int64 // input offsets in the store at the start of the cycle, by topic
	next        map[string]int64 // input offsets after this cycle, by topic
	ends        map[string]int64 // high watermarks seen, by topic (for the lag)
	handled     int
	// warnedMisrouted: the cycle logged a record on the wrong partition.
	warnedMisrouted bool
	warnedLegacy    bool              // the cycle logged a legacy row of a projection with personal keys
	pseudonyms      map[string]string // row keys by personal key, this cycle
}

type projRow struct {
	key       string
	state     any
	version   int64 // changes folded into the row
	updatedAt time.Time
	dirty     bool
	deleted   bool // written as a tombstone (its entity was forgotten, or its group emptied)
}

type entityRow struct {
	rowEntity
	row   []byte // JSON, personal fields opened; nil: none
	blank []byte // row with its personal fields emptied (nil: not made yet)
	// sealed: row's personal fields could not be opened (ErrUnknownKey):
	// its group cannot be computed from them, so it keeps its group, and
	// it is stored as it is, not sealed again.
	sealed bool
	group  string // the row key of the group it is in ("": none)
	dirty  bool
}

func (c *cycle) projCycle(task statestore.Task, def projection.Definition) *projCycle {
	if pc, ok := c.projections[task]; ok {
		return pc
	}
	pc := &projCycle{
		taskBase: c.newBase(task), def: def,
		rows:   map[string]*projRow{},
		stored: map[string]int64{}, next: map[string]int64{}, ends: map[string]int64{},
	}
	if def.Rekeys() {
		pc.repartition = RepartitionTopic(c.e.cfg.AppID, def.Name())
	}
	if def.GroupBy() != nil {
		pc.entities = map[string]*entityRow{}
	}
	if c.projections == nil {
		c.projections = map[statestore.Task]*projCycle{}
	}
	c.projections[task] = pc
	c.projectionOrder = append(c.projectionOrder, pc)
	return pc
}

// projectionRecords hands one fetched partition of a projection input to
// the tasks of every projection that reads it.
func (c *cycle) projectionRecords(p kgo.FetchTopicPartition) {
	for _, name := range c.e.readers[p.Topic] {
		task := statestore.Task{Type: name, Partition: p.Partition}
		if owned, _ := c.e.TaskStatus(task); !owned {
			continue // revoked; the session aborts this cycle anyway
		}
		pc := c.projCycle(task, c.e.projections[name])
		records := pc.skipProcessed(p)
		pc.ends[p.Topic] = p.HighWatermark
		if len(records) == 0 {
			continue
		}
		pc.pending = append(pc.pending, records...)
		pc.next[p.Topic] = records[len(records)-1].Offset + 1
	}
}

// processProjections folds the pending records of every projection task,
// the tasks in parallel.
func (c *cycle) processProjections() {
	var busy []*projCycle
	for _, pc := range c.projectionOrder {
		if len(pc.pending) > 0 {
			busy = append(busy, pc)
		}
	}
	parallel(busy, func(pc *projCycle) {
		for _, r := range pc.pending {
			pc.handle(r)
		}
		pc.handled += len(pc.pending)
		pc.pending = pc.pending[:0]
	})
}

// skipProcessed drops the records the task's store has folded already (see
// the invariant above and taskCycle.skipProcessed).
func (pc *projCycle) skipProcessed(p kgo.FetchTopicPartition) []*kgo.Record {
	stored, ok := pc.stored[p.Topic]
	if !ok {
		var err error
		if stored, err = pc.c.e.cfg.Store.InputOffset(pc.task, p.Topic); err != nil {
			pc.c.fail(fmt.Errorf("read the input offset of %s in %s: %w", pc.task, p.Topic, err))
		}
		if stored == 0 {
			// A task that has folded nothing yet starts at its start
			// position (seekProjectionInputs; 0 for the beginning):
			// records before it are skipped quietly.
			if start, _ := pc.c.e.knownStart(pc.task, p.Topic); start > 0 {
				i := 0
				for i < len(p.Records) && p.Records[i].Offset < start {
					i++
				}
				pc.stored[p.Topic] = start
				return p.Records[i:]
			}
		}
		pc.stored[p.Topic] = stored
	}
	if stored <= 0 {
		return p.Records
	}
	if p.HighWatermark >= 0 && p.HighWatermark < stored {
		pc.c.e.log.Error("a projection input ends below the offset this task has folded: recreated or truncated; folding its records as new",
			"task", pc.task.String(), "topic", p.Topic, "end", p.HighWatermark, "folded_to", stored)
		pc.stored[p.Topic] = 0
		return p.Records
	}
	i := 0
	for i < len(p.Records) && p.Records[i].Offset < stored {
		i++
	}
	if i > 0 {
		pc.c.e.log.Info("skipped records this projection task had folded already (its input is re-read for another projection that starts earlier, or consumption was reset)",
			"task", pc.task.String(), "topic", p.Topic, "skipped", i, "folded_to", stored)
		pc.countN("replayed", i)
	}
	return p.Records[i:]
}

// handle folds one input record: a source event, or a change another task
// sent through the repartition topic. A record that cannot be decoded or
// folded is skipped, logged and counted: it would fail the same way on
// every retry, and blocking the projection on it would stop every row of
// the partition.
func (pc *projCycle) handle(r *kgo.Record) {
	if r.Topic == pc.repartition {
		pc.handleChange(r)
		return
	}
	ev := eventOf(r)
	if !pc.openEvent(r, &ev) {
		return
	}
	if err := pc.def.Decode(&ev); err != nil {
		pc.skip(r, "cannot decode an event", err)
		return
	}
	if rt, ok := pc.def.(reactorTask); ok {
		pc.react(rt, ev)
		return
	}
	if g := pc.def.GroupBy(); g != nil {
		pc.handleGroupRow(r, g, ev)
		return
	}
	changes, err := pc.def.Route(ev)
	if err != nil {
		pc.count("failed")
		pc.c.e.log.Error("projection failed on an event; skipped", "projection", pc.def.Name(), "topic", r.Topic, "partition", r.Partition, "offset", r.Offset, "err", err)
		return
	}
	if len(changes) == 0 {
		pc.count("skipped")
		return
	}
	for i := range changes {
		if changes[i].Key, err = pc.rowKey(changes[i].Key); err != nil {
			pc.c.fail(err)
			return
		}
	}
	pc.route(r, changes)
}

// handleChange applies a change another task sent through the repartition
// topic, its event opened as the sender had it.
func (pc *projCycle) handleChange(r *kgo.Record) {
	ch, err := decodeChange(r)
	if err != nil {
		pc.skip(r, "cannot decode a repartitioned change", err)
		return
	}
	if ch.Event != nil {
		if !pc.openEvent(r, ch.Event) {
			return
		}
		if err := pc.def.Decode(ch.Event); err != nil {
			pc.skip(r, "cannot decode a repartitioned change", err)
			return
		}
	}
	pc.apply(ch)
}

// openEvent opens the personal fields of an event; false: the cycle failed.
func (pc *projCycle) openEvent(r *kgo.Record, ev *projection.Event) bool {
	err := pc.open(ev)
	if err == nil {
		return true
	}
	if !errors.Is(err, aggregate.ErrUnknownKey) {
		// The keys topic could not be read now: retry the cycle.
		pc.c.fail(err)
		return false
	}
	// No retry can open it: fold the event with its personal fields
	// sealed rather than stop the partition.
	pc.c.e.log.Warn("projection folds an event whose personal fields cannot be opened", "projection", pc.def.Name(), "topic", r.Topic, "partition", r.Partition, "offset", r.Offset, "err", err)
	return true
}

// handleGroupRow folds an event into its entity's group-by row and routes
// the changes to the groups the entity leaves and joins.
//
// Invariants: an entity row is stored with the row key of the group it was
// added to, so the projection can remove it from that group even when it
// can no longer compute the group (its personal fields open as "" once the
// entity is forgotten). The rows a change carries to add and subtract have
// their personal fields emptied, always: a group mixes entities, so its
// fold must not depend on one entity's personal data, and a row subtracted
// after its entity was forgotten is then the row that was added.
func (pc *projCycle) handleGroupRow(r *kgo.Record, g projection.GroupRows, ev projection.Event) {
	ent := rowEntity{typ: pc.sourceType(ev.Topic), id: ev.EntityID}
	er, err := pc.entityRow(g, ent)
	if err != nil {
		pc.c.fail(err)
		return
	}
	next, group, err := g.Row(ev, er.row)
	if err != nil {
		pc.count("failed")
		pc.c.e.log.Error("projection failed on an event; skipped", "projection", pc.def.Name(), "topic", r.Topic, "partition", r.Partition, "offset", r.Offset, "err", err)
		return
	}
	if er.row != nil && er.blank == nil {
		if er.blank, err = g.Seal(er.row, blankCipher{}); err != nil {
			pc.c.fail(err)
			return
		}
	}
	var changes []projection.Change
	if next == nil { // forgotten: the entity leaves its group, its row goes
		if er.row == nil {
			pc.count("skipped")
			return
		}
		if er.group != "" {
			changes = append(changes, projection.Change{Key: er.group, Old: er.blank})
		}
		er.row, er.blank, er.group, er.sealed, er.dirty = nil, nil, "", false, true
		pc.route(r, changes)
		return
	}
	newKey := ""
	switch {
	case er.sealed:
		newKey = er.group
	case group != "":
		if newKey, err = pc.rowKey(group); err != nil {
			pc.c.fail(err)
			return
		}
	}
	if bytes.Equal(er.row, next) && newKey == er.group {
		pc.count("skipped")
		return
	}
	nextBlank, err := g.Seal(next, blankCipher{})
	if err != nil {
		pc.c.fail(err)
		return
	}
	switch {
	case er.group != "" && er.group == newKey:
		changes = append(changes, projection.Change{Key: newKey, Old: er.blank, New: nextBlank})
	default:
		if er.group != "" {
			changes = append(changes, projection.Change{Key: er.group, Old: er.blank})
		}
		if newKey != "" {
			changes = append(changes, projection.Change{Key: newKey, New: nextBlank})
		}
	}
	er.row, er.blank, er.group, er.typ, er.dirty = next, nextBlank, newKey, ent.typ, true
	if len(changes) == 0 {
		pc.count("skipped") // the row changed, but it is in no group
		return
	}
	pc.route(r, changes)
}

// rowEntity names the entity whose data key seals a group-by row's
// personal fields ("" type: not sealed).
type rowEntity struct{ typ, id string }

// route applies each change to its row here or sends it through the
// repartition topic to the partition of its row.
func (pc *projCycle) route(r *kgo.Record, changes []projection.Change) {
	for _, ch := range changes {
		part := aggregate.Partition(ch.Key, pc.c.e.cfg.Partitions)
		if part != pc.task.Partition && pc.repartition == "" {
			// A topic source not keyed with Kafka's default partitioner:
			// the row lands here, where reads by key do not look.
			pc.count("misrouted")
			if !pc.warnedMisrouted {
				pc.warnedMisrouted = true
				pc.c.e.log.Warn("a projection input record is on another partition than Kafka's default partitioner (murmur2) puts its key on; reads by key will not find its row: produce the topic with murmur2, or re-key the projection with KeyBy",
					"projection", pc.def.Name(), "topic", r.Topic, "partition", r.Partition, "key", ch.Key, "want_partition", part)
			}
		}
		if pc.repartition == "" || part == pc.task.Partition {
			pc.apply(ch)
			continue
		}
		if ch.Event != nil {
			// A repartitioned event carries its payload as it was read,
			// personal fields sealed; its row's task opens it again.
			read := eventOf(r)
			sealed := *ch.Event
			sealed.SchemaVersion, sealed.Data = read.SchemaVersion, read.Data
			ch.Event = &sealed
		}
		value, err := encodeChange(ch)
		if err != nil {
			pc.skip(r, "cannot encode a change", err)
			continue
		}
		pc.produce(&kgo.Record{Topic: pc.repartition, Partition: part, Key: []byte(ch.Key), Value: value, Timestamp: pc.c.now}, false)
		pc.count("rekeyed")
	}
}

// sealRow seals a group-by row's personal fields with ent's key; when the
// entity was forgotten they are emptied.
func (pc *projCycle) sealRow(g projection.GroupRows, ent rowEntity, row []byte) ([]byte, error) {
	if row == nil || !g.Personal() || ent.typ == "" || pc.c.e.cfg.Keys == nil {
		return row, nil
	}
	sealed, err := g.Seal(row, pc.c.e.cfg.Keys.Cipher(pc.c.ctx, ent.typ, ent.id))
	if errors.Is(err, aggregate.ErrForgotten) {
		return g.Seal(row, blankCipher{})
	}
	if err != nil {
		return nil, fmt.Errorf("seal the %s row of %s %q: %w", pc.def.Name(), ent.typ, ent.id, err)
	}
	return sealed, nil
}

// openRow opens a group-by row's personal fields with ent's key. A row
// whose fields no key opens (ErrUnknownKey: no retry would) is returned as
// it is, with stillSealed set.
func (pc *projCycle) openRow(g projection.GroupRows, ent rowEntity, row []byte) (opened []byte, stillSealed bool, err error) {
	if row == nil || !g.Personal() || ent.typ == "" || pc.c.e.cfg.Keys == nil {
		return row, false, nil
	}
	opened, err = g.Open(row, pc.c.e.cfg.Keys.Cipher(pc.c.ctx, ent.typ, ent.id))
	switch {
	case errors.Is(err, aggregate.ErrUnknownKey):
		pc.c.e.log.Warn("a projection row's personal fields cannot be opened; it stays in its group and is folded sealed", "projection", pc.def.Name(), "type", ent.typ, "id", ent.id, "err", err)
		return row, true, nil
	case err != nil:
		return nil, false, fmt.Errorf("open the %s row of %s %q: %w", pc.def.Name(), ent.typ, ent.id, err)
	}
	return opened, false, nil
}

// blankCipher empties personal fields: the rows a group folds, and what is
// kept of a forgotten entity's row.
type blankCipher struct{}

func (blankCipher) Seal(string) (string, error) { return "", nil }
func (blankCipher) Open(string) (string, error) { return "", nil }

// rowKey returns the key under which a row is stored: key itself, or its
// pseudonym for a projection with personal keys.
func (pc *projCycle) rowKey(key string) (string, error) {
	if key == "" || !pc.def.PersonalKeys() {
		return key, nil
	}
	if p, ok := pc.pseudonyms[key]; ok {
		return p, nil
	}
	if pc.c.e.cfg.Keys == nil {
		return "", fmt.Errorf("projection %s has personal keys but the node has no keyring", pc.def.Name())
	}
	p, err := pc.c.e.cfg.Keys.Pseudonym(pc.c.ctx, pc.def.Name(), key)
	if err != nil {
		return "", fmt.Errorf("projection %s: %w", pc.def.Name(), err)
	}
	if pc.pseudonyms == nil {
		pc.pseudonyms = map[string]string{}
	}
	pc.pseudonyms[key] = p
	return p, nil
}

// sourceType returns the aggregate type whose events topic is the source
// topic ("" for other topics).
func (pc *projCycle) sourceType(topic string) string {
	for _, s := range pc.def.Sources() {
		if def := s.Aggregate(); def != nil && s.Topic() == topic {
			return def.Name()
		}
	}
	return ""
}

// open opens the personal fields of an aggregate's event (a forgotten
// entity's read as empty) before the projection decodes it.
func (pc *projCycle) open(ev *projection.Event) error {
	keys := pc.c.e.cfg.Keys
	if keys == nil {
		return nil
	}
	for _, s := range pc.def.Sources() {
		if def := s.Aggregate(); s.Topic() == ev.Topic && def != nil && def.Personal() {
			schema, data, err := def.OpenEvent(ev.Type, ev.SchemaVersion, ev.Data, keys.Cipher(pc.c.ctx, def.Name(), ev.EntityID))
			if err != nil {
				if errors.Is(err, aggregate.ErrUnknownEvent) || errors.Is(err, aggregate.ErrMalformed) {
					return nil // Decode reports it
				}
				return fmt.Errorf("open the personal fields of %s event %s of %q: %w", def.Name(), ev.Type, ev.EntityID, err)
			}
			ev.SchemaVersion, ev.Data = schema, data
		}
	}
	return nil
}

func (pc *projCycle) skip(r *kgo.Record, what string, err error) {
	pc.count("skipped")
	pc.c.e.log.Warn("projection skipped a record: "+what, "projection", pc.def.Name(), "topic", r.Topic, "partition", r.Partition, "offset", r.Offset, "err", err)
}

// apply folds one change into its row.
func (pc *projCycle) apply(ch projection.Change) {
	if err := aggregate.ValidateEntityID(ch.Key); err != nil {
		pc.count("skipped")
		pc.c.e.log.Warn("projection skipped a change with an invalid row key", "projection", pc.def.Name(), "key", ch.Key, "err", err)
		return
	}
	row, err := pc.row(ch.Key)
	if err != nil {
		var decodeErr stateDecodeError
		if errors.As(err, &decodeErr) {
			pc.count("failed")
			pc.c.e.log.Error("a projection row does not decode; change skipped", "projection", pc.def.Name(), "key", ch.Key, "err", err)
			return
		}
		pc.c.fail(err) // a store read error may pass: abort and retry
		return
	}
	if ch.Delete {
		row.state, row.dirty, row.deleted = pc.def.NewState(), true, true
		pc.count("deleted")
		return
	}
	state, err := pc.def.Apply(row.state, ch)
	if err != nil {
		pc.count("failed")
		pc.c.e.log.Error("projection fold failed; change skipped", "projection", pc.def.Name(), "key", ch.Key, "err", err)
		return
	}
	row.state, row.dirty, row.deleted = state, true, pc.def.Empty(state)
	row.version++
	row.updatedAt = pc.c.now
	if ch.Event != nil && !ch.Event.Time.IsZero() {
		row.updatedAt = ch.Event.Time
	}
	pc.count("folded")
}

// row returns the cycle's view of a row, loading it on first touch.
func (pc *projCycle) row(key string) (*projRow, error) {
	if row, ok := pc.rows[key]; ok {
		return row, nil
	}
	row := &projRow{key: key}
	var err error
	row.state, row.version, row.updatedAt, _, err = loadState(pc.c.e.cfg.Store, pc.task, key, pc.def.NewState, pc.def.DecodeState)
	if err != nil {
		return nil, err
	}
	if typ := pc.def.PersonalRows(); typ != "" && pc.c.e.cfg.Keys != nil && row.version > 0 {
		opened, err := aggregate.OpenPersonal(row.state, pc.c.e.cfg.Keys.Cipher(pc.c.ctx, typ, key))
		switch {
		case errors.Is(err, aggregate.ErrUnknownKey):
			// No retry opens it: fold it sealed rather than stop.
			pc.c.e.log.Warn("a projection row's personal fields cannot be opened; folded sealed", "projection", pc.def.Name(), "type", typ, "id", key, "err", err)
		case err != nil:
			return nil, fmt.Errorf("open the %s row of %s %q: %w", pc.def.Name(), typ, key, err)
		default:
			row.state = opened
		}
	}
	pc.rows[key] = row
	pc.rowOrder = append(pc.rowOrder, row)
	return row, nil
}

// entityRow returns the cycle's view of a group-by entity row.
func (pc *projCycle) entityRow(g projection.GroupRows, ent rowEntity) (*entityRow, error) {
	if er, ok := pc.entities[ent.id]; ok {
		return er, nil
	}
	raw, found, err := pc.c.e.cfg.Store.Get(pc.task, statestore.RowKey(ent.id))
	if err != nil {
		return nil, fmt.Errorf("read the row of %q in %s: %w", ent.id, pc.task, err)
	}
	er := &entityRow{rowEntity: ent}
	if found {
		stored, err := decodeEntityRow(raw)
		if err != nil {
			return nil, fmt.Errorf("the row of %q in %s: %w", ent.id, pc.task, err)
		}
		er.group = stored.Group
		if stored.legacy {
			if er.group, err = pc.legacyGroup(g, raw); err != nil {
				return nil, err
			}
		}
		if stored.Type != "" {
			er.typ = stored.Type
		}
		if er.row, er.sealed, err = pc.openRow(g, er.rowEntity, stored.Row); err != nil {
			return nil, err
		}
	}
	pc.entities[ent.id] = er
	pc.entityOrder = append(pc.entityOrder, er)
	return er, nil
}

// legacyGroup names the group of a row stored without it, by an earlier
// version that kept every row key as it is: its group is the plain key.
// A projection given PersonalKeys since must be renamed, so that it is
// folded again from its sources under pseudonyms.
func (pc *projCycle) legacyGroup(g projection.GroupRows, row []byte) (string, error) {
	group, err := g.Group(row)
	if err != nil {
		return "", fmt.Errorf("projection %s: the group of a stored row: %w", pc.def.Name(), err)
	}
	if pc.def.PersonalKeys() && !pc.warnedLegacy {
		pc.warnedLegacy = true
		pc.c.e.log.Warn("a projection with personal keys has rows stored before it had them, under plain keys: rename the projection to fold it again from its sources", "projection", pc.def.Name(), "task", pc.task.String())
	}
	return group, nil
}

// storedEntityRow is a group-by entity row as the store and changelog keep
// it: entityRowFormat, then this as JSON. Rows written before the format
// are the bare JSON row (legacy).
type storedEntityRow struct {
	Type   string          `json:"type,omitempty"` // the aggregate type whose key seals it
	Group  string          `json:"group,omitempty"`
	Row    json.RawMessage `json:"row"`
	legacy bool
}

const entityRowFormat = 1

func encodeEntityRow(r storedEntityRow) ([]byte, error) {
	b, err := json.Marshal(r)
	if err != nil {
		return nil, err
	}
	return append([]byte{entityRowFormat}, b...), nil
}

func decodeEntityRow(raw []byte) (storedEntityRow, error) {
	if len(raw) == 0 || raw[0] != entityRowFormat {
		return storedEntityRow{Row: raw, legacy: true}, nil
	}
	var r storedEntityRow
	if err := json.Unmarshal(raw[1:], &r); err != nil {
		return r, fmt.Errorf("decode a stored group-by row: %w", err)
	}
	return r, nil
}

// stageChangelog produces the task's changed rows, entity rows and input
// offsets to its changelog and stages the same writes in its batch.
func (pc *projCycle) stageChangelog() {
	topic := pc.changelogTopic
	write := func(key, value []byte) {
		pc.produce(&kgo.Record{Topic: topic, Partition: pc.task.Partition, Key: key, Value: value}, true)
		if err := changelog.Apply(pc.batch, pc.task, key, value); err != nil {
			pc.c.fail(err)
		}
	}
	for t, next := range pc.next {
		if next > pc.stored[t] {
			write(statestore.InputOffsetKey(t), binary.BigEndian.AppendUint64(nil, uint64(next)))
		}
	}
	for _, er := range pc.entityOrder {
		if !er.dirty {
			continue
		}
		if er.row == nil {
			write(statestore.RowKey(er.id), nil)
			continue
		}
		sealed, err := er.row, error(nil)
		if !er.sealed {
			sealed, err = pc.sealRow(pc.def.GroupBy(), er.rowEntity, er.row)
		}
		if err == nil {
			var v []byte
			if v, err = encodeEntityRow(storedEntityRow{Type: er.typ, Group: er.group, Row: sealed}); err == nil {
				write(statestore.RowKey(er.id), v)
				continue
			}
		}
		pc.c.fail(err)
		return
	}
	for _, row := range pc.rowOrder {
		if !row.dirty {
			continue
		}
		if row.deleted {
			write(statestore.StateKey(row.key), nil)
			continue
		}
		sealed, err := pc.sealState(row)
		if err != nil {
			pc.c.fail(err)
			return
		}
		state, err := pc.def.EncodeState(sealed)
		if err != nil {
			pc.c.fail(fmt.Errorf("encode row %q of projection %s: %w", row.key, pc.def.Name(), err))
			return
		}
		if len(state) > maxRecordBytes {
			pc.c.fail(fmt.Errorf("row %q of projection %s is %d bytes encoded; Kafka records are limited to about %d bytes: keep projection rows small", row.key, pc.def.Name(), len(state), maxRecordBytes))
			return
		}
		k, v := changelog.StateRecord(row.key, statestore.StateRecord{Version: row.version, UpdatedAt: row.updatedAt, State: state})
		write(k, v)
	}
}

// sealState returns a row's state with its personal fields sealed by its
// entity's key (projection.Definition.PersonalRows); a forgotten entity's
// are emptied.
func (pc *projCycle) sealState(row *projRow) (any, error) {
	typ := pc.def.PersonalRows()
	if typ == "" || pc.c.e.cfg.Keys == nil {
		return row.state, nil
	}
	sealed, err := aggregate.SealPersonal(row.state, pc.c.e.cfg.Keys.Cipher(pc.c.ctx, typ, row.key))
	if errors.Is(err, aggregate.ErrForgotten) {
		return aggregate.SealPersonal(row.state, blankCipher{})
	}
	if err != nil {
		return nil, fmt.Errorf("seal row %q of projection %s: %w", row.key, pc.def.Name(), err)
	}
	return sealed, nil
}

// committed reports the task's progress once its transaction committed.
func (pc *projCycle) committed() {
	var lag int64
	for t, end := range pc.ends {
		next, ok := pc.next[t]
		if !ok {
			next = pc.stored[t]
		}
		if end > next {
			lag += end - next
		}
	}
	pc.c.e.progress.report(pc.task, lag, pc.handled)
}

// eventOf builds a projection event from a record: esker's envelope when
// the record carries it, otherwise the key as entity id and the value as
// data.
func eventOf(r *kgo.Record) projection.Event {
	var buf [12]aggregate.Header // esker's events carry 10 headers at most
	hs := buf[:0]
	for _, h := range r.Headers {
		hs = append(hs, aggregate.Header{Key: h.Key, Value: h.Value})
	}
	ev, err := aggregate.EventFromRecord(r.Key, hs, r.Value)
	if err != nil {
		ev = aggregate.Event{EntityID: string(r.Key), Time: r.Timestamp, Data: r.Value}
	}
	return projection.Event{Event: ev, Topic: r.Topic, Partition: r.Partition, Offset: r.Offset}
}

// wireChange is a change on a repartition topic (JSON; the row key is the
// record key).
type wireChange struct {
	Event *wireEvent      `json:"event,omitempty"`
	Old   json.RawMessage `json:"old,omitempty"`
	New   json.RawMessage `json:"new,omitempty"`
}

type wireEvent struct {
	Topic         string    `json:"topic"`
	Partition     int32     `json:"partition"`
	Offset        int64     `json:"offset"`
	EntityID      string    `json:"entityId"`
	Version       int64     `json:"version,omitempty"`
	EventID       string    `json:"eventId,omitempty"`
	Type          string    `json:"type,omitempty"`
	SchemaVersion int       `json:"schemaVersion,omitempty"`
	CommandID     string    `json:"commandId,omitempty"`
	CorrelationID string    `json:"correlationId,omitempty"`
	CausationID   string    `json:"causationId,omitempty"`
	Time          time.Time `json:"time"`
	Data          []byte    `json:"data"` // any codec's bytes (base64 in JSON)
}

func encodeChange(ch projection.Change) ([]byte, error) {
	w := wireChange{Old: ch.Old, New: ch.New}
	if ev := ch.Event; ev != nil {
		w.Event = &wireEvent{Topic: ev.Topic, Partition: ev.Partition, Offset: ev.Offset,
			EntityID: ev.EntityID, Version: ev.Version, EventID: ev.EventID, Type: ev.Type, SchemaVersion: ev.SchemaVersion,
			CommandID: ev.CommandID, CorrelationID: ev.CorrelationID, CausationID: ev.CausationID, Time: ev.Time, Data: ev.Data}
	}
	return json.Marshal(w)
}

func decodeChange(r *kgo.Record) (projection.Change, error) {
	var w wireChange
	if err := json.Unmarshal(r.Value, &w); err != nil {
		return projection.Change{}, err
	}
	// A null row is no row (rows are JSON objects; null would fold the
	// zero row).
	if string(w.Old) == "null" {
		w.Old = nil
	}
	if string(w.New) == "null" {
		w.New = nil
	}
	ch := projection.Change{Key: string(r.Key), Old: w.Old, New: w.New}
	if w.Event == nil && w.Old == nil && w.New == nil {
		return ch, errors.New("empty change")
	}
	if ev := w.Event; ev != nil {
		ch.Event = &projection.Event{Topic: ev.Topic, Partition: ev.Partition, Offset: ev.Offset, Event: aggregate.Event{
			EntityID: ev.EntityID, Version: ev.Version, EventID: ev.EventID, Type: ev.Type, SchemaVersion: ev.SchemaVersion,
			CommandID: ev.CommandID, CorrelationID: ev.CorrelationID, CausationID: ev.CausationID, Time: ev.Time, Data: ev.Data}}
	}
	return ch, nil
}

// seekProjectionInputs positions the consumption of the projection inputs
// the restored tasks read. Several projections may read one topic partition
// (the events of one aggregate type) and the group has one position for it:
// consumption starts at the lowest offset any of its readers needs — its
// stored input offset, or for a reader that has none its start position
// (Earliest: 0, Latest: the end, At: the first record at or after the
// time) — and each reader skips what it has folded already or what precedes
// its start (skipProcessed). Without this, a projection added to a running
// system would start where the projections already reading its topic are.
func (e *Engine) seekProjectionInputs(ctx context.Context, cl *kgo.Client, restored []statestore.Task) error {
	type tp struct {
		topic     string
		partition int32
	}
	inputs := map[tp]bool{}
	for _, t := range restored {
		if p, ok := e.projections[t.Type]; ok {
			for _, topic := range e.inputTopics(p) {
				inputs[tp{topic, t.Partition}] = true
			}
		}
	}
	if len(inputs) == 0 {
		return nil
	}
	adm := kadm.NewClient(cl)
	listed := map[string]kadm.ListedOffsets{} // by "end" or a start time
	lookup := func(key, topic string, p int32, list func() (kadm.ListedOffsets, error)) (int64, error) {
		l, ok := listed[key+"\x00"+topic]
		if !ok {
			var err error
			if l, err = list(); err != nil {
				return 0, err
			}
			listed[key+"\x00"+topic] = l
		}
		o, ok := l.Lookup(topic, p)
		if !ok || o.Err != nil {
			return 0, fmt.Errorf("list offsets of %s/%d: %v", topic, p, o.Err)
		}
		return o.Offset, nil
	}
	set := map[string]map[int32]kgo.EpochOffset{}
	starts := map[statestore.Task]map[string]int64{}
	for in := range inputs {
		position := int64(-1)
		for _, name := range e.readers[in.topic] {
			t := statestore.Task{Type: name, Partition: in.partition}
			need, err := e.cfg.Store.InputOffset(t, in.topic)
			if err != nil {
				return err
			}
			if need == 0 && in.topic != RepartitionTopic(e.cfg.AppID, name) {
				// A start once resolved stays until the task folds a
				// record: resolving Latest again (after an abort, say)
				// would skip the records that arrived meanwhile.
				if known, ok := e.knownStart(t, in.topic); ok {
					need = known
					if position < 0 || need < position {
						position = need
					}
					continue
				}
				start := e.projections[name].Start()
				at, isAt := start.Time()
				switch {
				case start.IsLatest():
					need, err = lookup("end", in.topic, in.partition, func() (kadm.ListedOffsets, error) { return adm.ListEndOffsets(ctx, in.topic) })
				case isAt:
					need, err = lookup(strconv.FormatInt(at.UnixMilli(), 10), in.topic, in.partition, func() (kadm.ListedOffsets, error) {
						return adm.ListOffsetsAfterMilli(ctx, at.UnixMilli(), in.topic)
					})
				}
				if err != nil {
					return err
				}
				if starts[t] == nil {
					starts[t] = map[string]int64{}
				}
				starts[t][in.topic] = need
			}
			if position < 0 || need < position {
				position = need
			}
		}
		if set[in.topic] == nil {
			set[in.topic] = map[int32]kgo.EpochOffset{}
		}
		set[in.topic][in.partition] = kgo.EpochOffset{Epoch: -1, Offset: position}
	}
	e.startMu.Lock()
	if e.starts == nil {
		e.starts = map[statestore.Task]map[string]int64{}
	}
	for t, m := range starts {
		if e.starts[t] == nil {
			e.starts[t] = map[string]int64{}
		}
		for topic, off := range m {
			e.starts[t][topic] = off
		}
	}
	e.startMu.Unlock()
	cl.SetOffsets(set)
	return nil
}

// repositionProjectionInputs runs after every abort (a failed cycle, a
// failed Begin, the empty abort after a revocation): franz-go rewound
// consumption to the group's committed offsets, which for a topic read by a
// projection that is catching up beside others may be past what it needs
// (seekProjectionInputs). It covers every owned projection task, also those
// still restoring (whose restore may have positioned them already): a
// position lower than a reader needs is harmless, it skips. If positioning
// fails, the tasks are restored again, which positions them (with retries)
// before resuming.
func (e *Engine) repositionProjectionInputs(cl *kgo.Client) {
	var tasks []statestore.Task
	e.mu.RLock()
	for t := range e.tasks {
		if _, ok := e.projections[t.Type]; ok {
			tasks = append(tasks, t)
		}
	}
	e.mu.RUnlock()
	if len(tasks) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(cl.Context(), 10*time.Second)
	defer cancel()
	if err := e.seekProjectionInputs(ctx, cl, tasks); err != nil {
		e.log.Warn("positioning projection inputs after an abort failed; restoring their tasks to position them", "err", err)
		e.restoreAgain(cl, tasks)
	}
}

// knownStart returns the start offset already resolved for a task's topic.
func (e *Engine) knownStart(t statestore.Task, topic string) (int64, bool) {
	e.startMu.Lock()
	defer e.startMu.Unlock()
	off, ok := e.starts[t][topic]
	return off, ok
}

// ProjectionStatus reports a projection's or reactor's tasks on this node:
// whether it is a reactor, the partitions it owns here, how many of them
// are restored, and its lag summed over them.
func (e *Engine) ProjectionStatus(name string) (reactor bool, partitions []int32, restored int, lag int64) {
	p, ok := e.projections[name]
	if !ok {
		return false, nil, 0, 0
	}
	_, reactor = p.(reactorTask)
	e.mu.RLock()
	for t, ts := range e.tasks {
		if t.Type == name {
			partitions = append(partitions, t.Partition)
			if ts.restored {
				restored++
			}
		}
	}
	e.mu.RUnlock()
	slices.Sort(partitions)
	return reactor, partitions, restored, e.progress.Lag(name)
}
