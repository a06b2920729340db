package projection

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"time"

	"github.com/esker-io/esker/aggregate"
)

// Event is one input record as a projection's functions see it: the event's
// envelope, where it sits in Kafka, and its payload decoded by its Source.
type Event struct {
	aggregate.Event
	Topic     string
	Partition int32
	Offset    int64
	// Value is the decoded payload: the aggregate's Go event type for a
	// source made with Events (use a type switch), or what the decode
	// function of a Topic source returned.
	Value any
}

// Fold folds one event into the state of a projection row. It must be pure:
// it runs again when a transaction aborts, and on every replica that
// rebuilds the projection.
type Fold[S any] func(state S, ev Event) S

// Source is an input topic of a projection and how its records are decoded.
type Source struct {
	topic     string
	decode    func(ev *Event) error
	aggregate aggregate.Definition // the aggregate type of an Events source
}

// Aggregate returns the aggregate type whose events an Events source reads
// (nil for a Topic source): the engine opens their personal fields before
// Decode.
func (s Source) Aggregate() aggregate.Definition { return s.aggregate }

// Topic returns the source's Kafka topic.
func (s Source) Topic() string { return s.topic }

// Decode fills ev.Value from ev's payload, as the source decodes it.
func (s Source) Decode(ev *Event) error { return s.decode(ev) }

// Aggregate is any aggregate type (an *aggregate.Type).
type Aggregate interface {
	Untyped() aggregate.Definition
}

// Events is the source of an aggregate type's events ("<type>-events"),
// decoded into the type's registered Go event types. An event whose type is
// not registered (written by a newer version of the code, say) reaches the
// fold with a nil Value. The event that forgets an entity has the Value
// aggregate.Forgotten; a projection whose rows are keyed by entity id (no
// KeyBy) deletes the entity's row on it, and a GroupBy removes the entity
// from its group.
func Events(t Aggregate) Source {
	def := t.Untyped()
	return Source{
		topic:     def.Name() + "-events",
		aggregate: def,
		decode: func(ev *Event) error {
			if aggregate.IsForgotten(ev.Event) {
				var f aggregate.Forgotten
				err := json.Unmarshal(ev.Data, &f)
				ev.Value = f
				return err
			}
			v, err := def.DecodeEvent(ev.Type, ev.SchemaVersion, ev.Data)
			if errors.Is(err, aggregate.ErrUnknownEvent) {
				return nil
			}
			ev.Value = v
			return err
		},
	}
}

// Topic is the source of any Kafka topic. decode turns a record's key and
// value into the event's Value; records that carry esker's envelope headers
// also fill the envelope, others get the record key as EntityID. A record
// decode rejects is skipped, logged and counted (it would fail again on
// every replay). The topic must have the application's partition count, and
// its records must be keyed with Kafka's default partitioner unless the
// projection re-keys them (KeyBy).
func Topic(name string, decode func(key, value []byte) (any, error)) Source {
	return Source{
		topic: name,
		decode: func(ev *Event) error {
			v, err := decode([]byte(ev.EntityID), ev.Data)
			ev.Value = v
			return err
		},
	}
}

// Start says where a projection with no stored progress begins reading its
// sources: a projection added to a running system catches up from there,
// then follows live.
type Start struct {
	kind int // 0 earliest, 1 latest, 2 at
	at   time.Time
}

// Earliest starts from the beginning of the sources (the default).
func Earliest() Start { return Start{} }

// Latest starts at the end of the sources: only new events are folded.
func Latest() Start { return Start{kind: 1} }

// At starts at the first record at or after t.
func At(t time.Time) Start { return Start{kind: 2, at: t} }

// IsLatest and Time describe the start position to the engine.
func (s Start) IsLatest() bool { return s.kind == 1 }

// Time returns the start time of At; ok is false for Earliest and Latest.
func (s Start) Time() (t time.Time, ok bool) { return s.at, s.kind == 2 }

// Option configures a projection.
type Option func(*options)

type options struct {
	sources      []Source
	key          func(Event) string
	start        Start
	personalKeys bool
}

// From sets the projection's sources; at least one is required.
func From(sources ...Source) Option {
	return func(o *options) { o.sources = append(o.sources, sources...) }
}

// KeyBy folds each event into the row named by key(ev) instead of the row
// of its entity id. Rows are partitioned by their key, so events are
// re-keyed through the repartition topic "<app>-<name>-repartition" within
// the same transaction that consumes them. An empty key drops the event.
func KeyBy(key func(Event) string) Option {
	return func(o *options) { o.key = key }
}

// StartAt sets where the projection begins when it has no stored progress.
func StartAt(s Start) Option { return func(o *options) { o.start = s } }

// PersonalKeys says the projection's row keys are personal data (an owner's
// name, an e-mail address), as the group keys of a GroupBy or the keys of
// KeyBy may be. Each row is then stored, partitioned and listed under a
// pseudonym of its key: an HMAC-SHA256 of the key with a secret of the
// projection kept, wrapped by the master key, in "<app>-keys" (the node
// needs a master key). GET /v1/projections/{name}/{key} and
// Node.ProjectionRow take the key itself and find its row; a listing shows
// the pseudonyms, and ?prefix= does not apply to it. The changelog and the
// repartition topic then hold no key in plaintext.
func PersonalKeys() Option { return func(o *options) { o.personalKeys = true } }

var namePattern = regexp.MustCompile(`^[a-z][a-z0-9-]{0,62}$`)

// Projection is a named read model: rows of state S, each folded from the
// events routed to its key. Build one with New or GroupBy and add it to a
// Node. It is immutable once built.
type Projection[S any] struct {
	name    string
	opts    options
	fold    Fold[S]
	groupBy GroupRows
	apply   func(state any, ch Change) (any, error) // a GroupBy's add and subtract
	// sealedBy is the aggregate type whose entity keys seal the rows'
	// personal fields ("": the rows have none).
	sealedBy string
}

// New defines a projection that folds every event of its sources into the
// row of the event's entity id (or of KeyBy's key). It panics on an invalid
// name, a nil fold or no source: programming errors found at start-up.
//
// Personal data: string fields of S tagged `esker:"pii"` are sealed with the
// row's entity's data key in the store and the changelog, and opened for
// the fold and for reads (GET /v1/projections/{name}/{id}); forgetting the
// entity deletes its row and makes every copy unreadable. Such a projection
// must keep one row per entity of one aggregate type: New panics on KeyBy
// or a Topic source with a personal state.
// Names are lower-case letters, digits and dashes; they name the topics
// "<app>-<name>-changelog" and, with KeyBy, "<app>-<name>-repartition".
func New[S any](name string, fold Fold[S], opts ...Option) *Projection[S] {
	o := build(name, opts)
	if fold == nil {
		panic("projection: New needs a fold function")
	}
	if o.personalKeys && o.key == nil {
		panic(fmt.Sprintf("projection %q: PersonalKeys applies to KeyBy and GroupBy keys; rows keyed by entity id are keyed as the events are", name))
	}
	p := &Projection[S]{name: name, opts: o, fold: fold}
	if aggregate.HasPersonal(reflect.TypeFor[S]()) {
		p.sealedBy = entityRowsOf(name, o)
	}
	return p
}

// entityRowsOf returns the aggregate type whose entities' keys seal the
// rows of a projection whose state has personal fields: its rows must be
// one entity's each (no KeyBy) of one aggregate type, so that forgetting
// the entity makes its row's copies unreadable. Otherwise it panics.
func entityRowsOf(name string, o options) string {
	typ := ""
	for _, s := range o.sources {
		if s.aggregate == nil || (typ != "" && typ != s.aggregate.Name()) {
			typ = ""
			break
		}
		typ = s.aggregate.Name()
	}
	if o.key != nil || typ == "" {
		panic(fmt.Sprintf("projection %q: its row type has fields tagged esker:\"pii\", which are sealed with the key of the row's entity: its rows must be keyed by entity id (no KeyBy) and read the events of one aggregate type (projection.Events); keep personal data out of other rows", name))
	}
	return typ
}

func build(name string, opts []Option) options {
	if !namePattern.MatchString(name) {
		panic(fmt.Sprintf("projection: invalid name %q: use lower-case letters, digits and dashes, starting with a letter", name))
	}
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if len(o.sources) == 0 {
		panic(fmt.Sprintf("projection %q: no source; add From(projection.Events(...))", name))
	}
	return o
}

// Name returns the projection's name.
func (p *Projection[S]) Name() string { return p.name }

// Definition returns the type-erased view the engine runs.
func (p *Projection[S]) Definition() Definition { return definition[S]{p} }

// Change is one fold a projection makes at a row: an event to fold (New and
// KeyBy), or a group-by row that leaves (Old) and/or joins (New) the row's
// group. Rows are JSON, their personal fields opened.
type Change struct {
	Key   string
	Event *Event
	Old   json.RawMessage
	New   json.RawMessage
	// Delete removes the row (its entity was forgotten).
	Delete bool
}

// Definition is the type-erased view of a projection used by the engine and
// the HTTP layer. User code gets one from Projection.Definition.
type Definition interface {
	Name() string
	Sources() []Source
	Start() Start
	// Rekeys reports whether rows are keyed by anything but the events'
	// entity ids: then changes go through the repartition topic.
	Rekeys() bool
	// PersonalKeys reports whether row keys are stored as pseudonyms
	// (the PersonalKeys option).
	PersonalKeys() bool
	// PersonalRows returns the aggregate type whose entity keys seal the
	// personal fields of the rows (each row is one entity's, keyed by its
	// id); "" when rows have no personal fields.
	PersonalRows() string
	// Decode fills ev.Value from the source that reads ev.Topic.
	Decode(ev *Event) error
	// Route returns the changes one input event makes to rows (not for a
	// GroupBy, whose engine side is GroupBy()).
	Route(ev Event) ([]Change, error)
	// GroupBy returns the per-entity rows of a GroupBy projection; nil for
	// others.
	GroupBy() GroupRows
	NewState() any
	// Apply folds one change into a row's state; a panic in user code
	// becomes an error.
	Apply(state any, ch Change) (any, error)
	// Empty reports whether a GroupBy row has folded back to the zero
	// state (every entity left its group): the row is then deleted.
	Empty(state any) bool
	EncodeState(state any) ([]byte, error)
	DecodeState(data []byte) (any, error)
}

type definition[S any] struct{ p *Projection[S] }

func (d definition[S]) Name() string         { return d.p.name }
func (d definition[S]) Sources() []Source    { return d.p.opts.sources }
func (d definition[S]) Start() Start         { return d.p.opts.start }
func (d definition[S]) GroupBy() GroupRows   { return d.p.groupBy }
func (d definition[S]) NewState() any        { var s S; return s }
func (d definition[S]) PersonalKeys() bool   { return d.p.opts.personalKeys }
func (d definition[S]) PersonalRows() string { return d.p.sealedBy }

func (d definition[S]) Rekeys() bool { return d.p.opts.key != nil || d.p.groupBy != nil }

func (d definition[S]) Decode(ev *Event) error {
	for _, s := range d.p.opts.sources {
		if s.topic == ev.Topic {
			return s.decode(ev)
		}
	}
	return fmt.Errorf("projection %q does not read topic %q", d.p.name, ev.Topic)
}

func (d definition[S]) Route(ev Event) (changes []Change, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("projection %q panicked routing an event: %v", d.p.name, r)
		}
	}()
	if d.p.groupBy != nil {
		return nil, fmt.Errorf("projection %q is a GroupBy: its changes come from its rows", d.p.name)
	}
	key := ev.EntityID
	if d.p.opts.key != nil {
		key = d.p.opts.key(ev)
	} else if aggregate.IsForgotten(ev.Event) {
		return []Change{{Key: key, Delete: true}}, nil
	}
	if key == "" {
		return nil, nil
	}
	return []Change{{Key: key, Event: &ev}}, nil
}

func (d definition[S]) Apply(state any, ch Change) (out any, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("projection %q panicked folding into %q: %v", d.p.name, ch.Key, r)
		}
	}()
	s := state.(S)
	if d.p.apply != nil {
		return d.p.apply(s, ch)
	}
	if ch.Event == nil {
		return nil, fmt.Errorf("projection %q: a change without an event", d.p.name)
	}
	return d.p.fold(s, *ch.Event), nil
}

func (d definition[S]) Empty(state any) bool {
	s, ok := state.(S)
	return ok && d.p.groupBy != nil && reflect.ValueOf(&s).Elem().IsZero()
}

func (d definition[S]) EncodeState(state any) ([]byte, error) { return json.Marshal(state.(S)) }

func (d definition[S]) DecodeState(data []byte) (any, error) {
	var s S
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("decode a row of projection %q: %w", d.p.name, err)
	}
	return s, nil
}
