package aggregate

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"sort"
)

// Decide turns a command into the events it causes, given the current state.
// Returning an error rejects the command: no event is written and the caller
// receives the error's message (HTTP 422). Decide must be deterministic and
// free of I/O: it may run again for the same command after an aborted
// transaction.
type Decide[S, C, E any] func(state S, cmd C) ([]E, error)

// Evolve folds one event into the state. It must be pure and total: it runs
// on the write path and whenever state is rebuilt from events.
type Evolve[S, E any] func(state S, ev E) S

// Type is an aggregate type: its name (which names its topics), its decide and
// evolve functions and the registries of its command and event types.
//
// Build it with New and register it on a Node. A Type is immutable once the
// Node runs; registering commands or events after that panics.
type Type[S, C, E any] struct {
	name     string
	decide   Decide[S, C, E]
	evolve   Evolve[S, E]
	initial  func() S
	codec    Codec
	commands registry
	events   registry
	// upcasters[event][v] turns schema version v of the event into v+1.
	upcasters map[string]map[int]Upcaster
	// personal: some registered command or event type, or the state, has
	// fields tagged esker:"pii" (kept as types are registered: the engine
	// asks on every entity it loads).
	personal, statePersonal bool
	// stateVersion names the fold: see StateVersion.
	stateVersion int
}

// Option configures a Type.
type Option func(*options)

type options struct {
	codec        Codec
	stateVersion int
}

// WithCodec sets the codec used for event payloads and state snapshots.
// The default is JSON. Commands on the commands topic are always JSON
// envelopes so that any client can produce them.
func WithCodec(c Codec) Option { return func(o *options) { o.codec = c } }

// StateVersion sets the version of the type's fold (its evolve function and
// state shape); the default is 1. Bump it whenever evolve changes the state
// it computes from the same events: every node records, per partition, the
// version its stored state was folded with (and writes it to the changelog),
// and a node that finds stored state of another version refuses to serve it
// (503, "rebuilding") until it has rebuilt the partition's state by
// replaying "<name>-events" through the new evolve. StateVersion panics on
// n < 1, a programming error found at start-up.
func StateVersion(n int) Option {
	if n < 1 {
		panic(fmt.Sprintf("aggregate: StateVersion(%d): state versions start at 1", n))
	}
	return func(o *options) { o.stateVersion = n }
}

var namePattern = regexp.MustCompile(`^[a-z][a-z0-9-]{0,62}$`)

// New defines an aggregate type. The name must be lower case letters, digits
// and dashes (it becomes part of topic names: "<name>-commands",
// "<name>-events"). New panics on an invalid name or nil functions: these are
// programming errors found at start-up.
func New[S, C, E any](name string, decide Decide[S, C, E], evolve Evolve[S, E], opts ...Option) *Type[S, C, E] {
	if !namePattern.MatchString(name) {
		panic(fmt.Sprintf("aggregate: invalid type name %q: use lower-case letters, digits and dashes, starting with a letter", name))
	}
	if decide == nil || evolve == nil {
		panic("aggregate: New needs a decide and an evolve function")
	}
	o := options{codec: JSON{}, stateVersion: 1}
	for _, opt := range opts {
		opt(&o)
	}
	statePersonal := HasPersonal(reflect.TypeFor[S]()) // panics here on a misplaced tag
	return &Type[S, C, E]{
		statePersonal: statePersonal,
		personal:      statePersonal,
		name:          name,
		decide:        decide,
		evolve:        evolve,
		initial:       func() S { var s S; return s },
		codec:         o.codec,
		commands:      newRegistry(),
		events:        newRegistry(),
		stateVersion:  o.stateVersion,
	}
}

// Commands registers command types by example value (for instance
// Deposit{}). The registered name is the Go type name, or the result of a
// TypeName() string method when the type has one. It returns t for chaining
// and panics on duplicate names.
func (t *Type[S, C, E]) Commands(examples ...C) *Type[S, C, E] {
	for _, c := range examples {
		name := t.commands.add(c, 1)
		if name == ForgetCommand {
			panic(fmt.Sprintf("aggregate: the command name %q is reserved for forgetting an entity", ForgetCommand))
		}
		t.personal = t.personal || t.commands.byName[name].personal
	}
	return t
}

// Events registers event types by example value, like Commands. Each event
// is written with schema version 1 unless it has a SchemaVersion() int method.
func (t *Type[S, C, E]) Events(examples ...E) *Type[S, C, E] {
	for _, e := range examples {
		version := 1
		if v, ok := any(e).(interface{ SchemaVersion() int }); ok {
			version = v.SchemaVersion()
			if version < 1 {
				panic(fmt.Sprintf("aggregate: %T.SchemaVersion() is %d; schema versions start at 1", e, version))
			}
		}
		name := t.events.add(e, version)
		if name == ForgottenEvent {
			panic(fmt.Sprintf("aggregate: the event name %q is reserved for forgetting an entity", ForgottenEvent))
		}
		t.personal = t.personal || t.events.byName[name].personal
	}
	return t
}

// Upcaster turns the payload of an event of one schema version into the
// next version's, in the type's codec (UpcastJSON builds one from a typed
// function). It must be pure: every read of an old event runs it.
type Upcaster func(data []byte) ([]byte, error)

// Upcast registers the upcaster of the named event from schema version from
// to from+1; upcasters chain (v1→v2→v3) up to the event's registered
// version (its SchemaVersion method). Every read path decodes events
// through the chain: projections, side effects, sinks and the events API
// see old events in the current form, while the stored events stay as they
// were written. It returns t for chaining and panics on an unknown event, a
// version outside 1..current-1, or a duplicate: programming errors found at
// start-up.
func (t *Type[S, C, E]) Upcast(event string, from int, up Upcaster) *Type[S, C, E] {
	entry, ok := t.events.byName[event]
	switch {
	case !ok:
		panic(fmt.Sprintf("aggregate: Upcast of %q: no such event is registered on %q", event, t.name))
	case from < 1 || from >= entry.version:
		panic(fmt.Sprintf("aggregate: Upcast of %q from version %d: the event is at version %d; upcasters go from 1 up to it", event, from, entry.version))
	case up == nil:
		panic("aggregate: Upcast needs a function")
	}
	if t.upcasters == nil {
		t.upcasters = map[string]map[int]Upcaster{}
	}
	if t.upcasters[event] == nil {
		t.upcasters[event] = map[int]Upcaster{}
	}
	if _, dup := t.upcasters[event][from]; dup {
		panic(fmt.Sprintf("aggregate: Upcast of %q from version %d registered twice", event, from))
	}
	t.upcasters[event][from] = up
	return t
}

// UpcastJSON builds an Upcaster for JSON payloads from a typed function
// that maps the old form to the new one.
func UpcastJSON[Old, New any](fn func(Old) New) Upcaster {
	return func(data []byte) ([]byte, error) {
		var old Old
		if err := json.Unmarshal(data, &old); err != nil {
			return nil, fmt.Errorf("%w: %s", ErrMalformed, describeDecodeError(err))
		}
		return json.Marshal(fn(old))
	}
}

// upcast brings a payload of schemaVersion to the event's registered
// version through the chain of upcasters. A payload of the current version
// (or a newer one, written by newer code) is returned as it is.
func (t *Type[S, C, E]) upcast(name string, schemaVersion int, data []byte) (int, []byte, error) {
	entry, ok := t.events.byName[name]
	if !ok {
		return schemaVersion, data, nil
	}
	for v := max(schemaVersion, 1); v < entry.version; v++ {
		up, ok := t.upcasters[name][v]
		if !ok {
			return v, nil, fmt.Errorf("%w: event %s of %q has schema version %d and no upcaster from version %d is registered (the event is at version %d)",
				ErrMalformed, name, t.name, schemaVersion, v, entry.version)
		}
		var err error
		if data, err = up(data); err != nil {
			return v, nil, fmt.Errorf("upcast %s of %q from version %d: %w", name, t.name, v, err)
		}
	}
	return max(entry.version, schemaVersion), data, nil
}

// Name returns the aggregate type's name.
func (t *Type[S, C, E]) Name() string { return t.name }

// StateVersion returns the version of the type's fold (see the
// StateVersion option).
func (t *Type[S, C, E]) StateVersion() int { return t.stateVersion }

// CommandNames lists the registered command type names, sorted.
func (t *Type[S, C, E]) CommandNames() []string { return t.commands.names() }

// EventNames lists the registered event type names, sorted.
func (t *Type[S, C, E]) EventNames() []string { return t.events.names() }

// Fold applies events to a state in order: the state an entity has after
// those events. Useful in tests and in read paths that replay events.
func (t *Type[S, C, E]) Fold(state S, events ...E) S {
	for _, e := range events {
		state = t.evolve(state, e)
	}
	return state
}

// DecodeEvent decodes a stored event's payload into its registered Go type,
// for consumers of "<type>-events" (projections, side effects, sinks). An
// unregistered event type returns an error wrapping ErrUnknownEvent; a
// payload that does not fit its type, one wrapping ErrMalformed.
func (t *Type[S, C, E]) DecodeEvent(ev Event) (E, error) {
	v, err := t.Untyped().DecodeEvent(ev.Type, ev.SchemaVersion, ev.Data)
	if err != nil {
		var zero E
		return zero, err
	}
	return v.(E), nil
}

// To addresses a command to one entity of this type: the form in which
// reactors send commands (see package sideeffects). The command is encoded
// as it travels on "<type>-commands"; it panics if cmd's Go type is not
// registered or cannot be encoded, a programming error.
func (t *Type[S, C, E]) To(id string, cmd C) Addressed {
	entry, ok := t.commands.byType[reflect.TypeOf(cmd)]
	if !ok {
		panic(fmt.Sprintf("aggregate: %T is not a registered command of %q", cmd, t.name))
	}
	data, err := json.Marshal(cmd)
	if err != nil {
		panic(fmt.Sprintf("aggregate: encode %T: %v", cmd, err))
	}
	return Addressed{Type: t.name, ID: id, Command: Command{Type: entry.name, Data: data}}
}

// Addressed is a command for one entity of an aggregate type.
type Addressed struct {
	Type    string
	ID      string
	Command Command
}

// Untyped returns the type-erased view the engine uses.
func (t *Type[S, C, E]) Untyped() Definition { return untyped[S, C, E]{t} }

// Definition is the type-erased view of an aggregate type used by the engine
// and the HTTP layer. User code does not implement it; it gets one from
// Type.Untyped (a Node accepts any Type directly).
type Definition interface {
	Name() string
	// NewState returns the zero state of an entity that has no events.
	NewState() any
	DecodeState(data []byte) (any, error)
	EncodeState(state any) ([]byte, error)
	// DecodeCommand decodes a registered command by name. Unknown names
	// return an error wrapping ErrUnknownCommand; data that does not fit the
	// Go type returns an error wrapping ErrMalformed.
	DecodeCommand(name string, data []byte) (any, error)
	// ValidateCommand runs the command's Validate() error method if it has one.
	ValidateCommand(cmd any) error
	// Decide runs the user's decide function; a panic becomes an error.
	Decide(state any, cmd any) ([]any, error)
	Evolve(state any, event any) any
	// EncodeEvent returns the registered name, schema version and payload.
	EncodeEvent(event any) (name string, schemaVersion int, data []byte, err error)
	// DecodeEvent decodes a stored payload, upcast first from its schema
	// version to the registered one.
	DecodeEvent(name string, schemaVersion int, data []byte) (any, error)
	// Upcast returns a stored payload in the registered schema version
	// (see Type.Upcast) and that version.
	Upcast(name string, schemaVersion int, data []byte) (int, []byte, error)
	CommandNames() []string
	EventNames() []string
	ContentType() string

	// Personal reports whether the type's commands, events or state have
	// personal fields (see PersonalTag); a node needs a master key to run
	// such a type.
	Personal() bool
	// SealCommand returns a command's JSON payload with its personal
	// fields sealed by c (unchanged if the command has none).
	SealCommand(name string, data []byte, c FieldCipher) ([]byte, error)
	// OpenEvent returns a stored event's payload upcast to its registered
	// schema version, with its personal fields opened by c; an event type
	// without personal fields is only upcast.
	OpenEvent(name string, schemaVersion int, data []byte, c FieldCipher) (int, []byte, error)
	// OpenState returns an encoded state with its personal fields opened.
	OpenState(data []byte, c FieldCipher) ([]byte, error)
	// StateVersion is the version of the fold (the StateVersion option).
	StateVersion() int
}

// Errors returned when decoding commands; the HTTP layer maps them to 4xx.
var (
	ErrUnknownCommand = errors.New("unknown command type")
	ErrUnknownEvent   = errors.New("unknown event type")
	ErrMalformed      = errors.New("malformed data")
)

type untyped[S, C, E any] struct{ t *Type[S, C, E] }

func (u untyped[S, C, E]) Name() string           { return u.t.name }
func (u untyped[S, C, E]) NewState() any          { return u.t.initial() }
func (u untyped[S, C, E]) CommandNames() []string { return u.t.commands.names() }
func (u untyped[S, C, E]) EventNames() []string   { return u.t.events.names() }
func (u untyped[S, C, E]) ContentType() string    { return u.t.codec.ContentType() }
func (u untyped[S, C, E]) StateVersion() int      { return u.t.stateVersion }

func (u untyped[S, C, E]) Personal() bool { return u.t.personal }

func (u untyped[S, C, E]) SealCommand(name string, data []byte, c FieldCipher) ([]byte, error) {
	if e, ok := u.t.commands.byName[name]; !ok || !e.personal {
		return data, nil
	}
	v, err := u.DecodeCommand(name, data)
	if err != nil {
		return nil, err
	}
	if v, err = SealPersonal(v, c); err != nil {
		return nil, err
	}
	return json.Marshal(v)
}

func (u untyped[S, C, E]) OpenEvent(name string, schemaVersion int, data []byte, c FieldCipher) (int, []byte, error) {
	version, data, err := u.t.upcast(name, schemaVersion, data)
	if err != nil {
		return version, nil, err
	}
	if e, ok := u.t.events.byName[name]; !ok || !e.personal {
		return version, data, nil
	}
	v, err := u.t.events.decode(name, data, u.t.codec)
	if err != nil {
		return version, nil, err
	}
	if v, err = OpenPersonal(v, c); err != nil {
		return version, nil, err
	}
	data, err = u.t.codec.Marshal(v)
	return version, data, err
}

func (u untyped[S, C, E]) OpenState(data []byte, c FieldCipher) ([]byte, error) {
	if !u.t.statePersonal {
		return data, nil
	}
	s, err := u.DecodeState(data)
	if err != nil {
		return nil, err
	}
	if s, err = OpenPersonal(s, c); err != nil {
		return nil, err
	}
	return u.t.codec.Marshal(s.(S))
}

func (u untyped[S, C, E]) DecodeState(data []byte) (any, error) {
	s := u.t.initial()
	if err := u.t.codec.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("decode %s state: %w", u.t.name, err)
	}
	return s, nil
}

func (u untyped[S, C, E]) EncodeState(state any) ([]byte, error) {
	return u.t.codec.Marshal(state.(S))
}

func (u untyped[S, C, E]) DecodeCommand(name string, data []byte) (any, error) {
	v, err := u.t.commands.decode(name, data, JSON{})
	if err != nil {
		if errors.Is(err, errUnknownName) {
			return nil, fmt.Errorf("%w %q for aggregate %q (known: %v)", ErrUnknownCommand, name, u.t.name, u.t.commands.names())
		}
		return nil, err
	}
	return v.(C), nil
}

func (u untyped[S, C, E]) ValidateCommand(cmd any) error {
	if v, ok := cmd.(interface{ Validate() error }); ok {
		return v.Validate()
	}
	return nil
}

func (u untyped[S, C, E]) Decide(state any, cmd any) (events []any, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("decide panicked: %v", r)
		}
	}()
	evs, err := u.t.decide(state.(S), cmd.(C))
	if err != nil {
		return nil, err
	}
	out := make([]any, len(evs))
	for i, e := range evs {
		if _, ok := u.t.events.byType[reflect.TypeOf(e)]; !ok {
			return nil, fmt.Errorf("decide returned unregistered event type %T; register it with Events", e)
		}
		out[i] = e
	}
	return out, nil
}

func (u untyped[S, C, E]) Evolve(state any, event any) any {
	return u.t.evolve(state.(S), event.(E))
}

func (u untyped[S, C, E]) EncodeEvent(event any) (string, int, []byte, error) {
	entry, ok := u.t.events.byType[reflect.TypeOf(event)]
	if !ok {
		return "", 0, nil, fmt.Errorf("%w: %T is not registered on %q", ErrUnknownEvent, event, u.t.name)
	}
	data, err := u.t.codec.Marshal(event)
	return entry.name, entry.version, data, err
}

func (u untyped[S, C, E]) Upcast(name string, schemaVersion int, data []byte) (int, []byte, error) {
	return u.t.upcast(name, schemaVersion, data)
}

func (u untyped[S, C, E]) DecodeEvent(name string, schemaVersion int, data []byte) (any, error) {
	_, data, err := u.t.upcast(name, schemaVersion, data)
	if err != nil {
		return nil, err
	}
	v, err := u.t.events.decode(name, data, u.t.codec)
	if err != nil {
		if errors.Is(err, errUnknownName) {
			return nil, fmt.Errorf("%w %q for aggregate %q", ErrUnknownEvent, name, u.t.name)
		}
		return nil, err
	}
	return v.(E), nil
}

// registry maps type names to Go types and back.
type registry struct {
	byName map[string]registryEntry
	byType map[reflect.Type]registryEntry
}

type registryEntry struct {
	name     string
	typ      reflect.Type
	version  int
	personal bool // has fields tagged esker:"pii"
}

var errUnknownName = errors.New("unknown name")

func newRegistry() registry {
	return registry{byName: map[string]registryEntry{}, byType: map[reflect.Type]registryEntry{}}
}

func (r registry) add(example any, version int) string {
	if example == nil {
		panic("aggregate: cannot register a nil example")
	}
	typ := reflect.TypeOf(example)
	name := typ.Name()
	if typ.Kind() == reflect.Pointer {
		name = typ.Elem().Name()
	}
	if n, ok := example.(interface{ TypeName() string }); ok {
		name = n.TypeName()
	}
	if name == "" {
		panic(fmt.Sprintf("aggregate: %v has no name; use a named type or a TypeName method", typ))
	}
	if _, dup := r.byName[name]; dup {
		panic(fmt.Sprintf("aggregate: type name %q registered twice", name))
	}
	e := registryEntry{name: name, typ: typ, version: version, personal: HasPersonal(typ)}
	r.byName[name] = e
	r.byType[typ] = e
	return name
}

func (r registry) names() []string {
	out := make([]string, 0, len(r.byName))
	for n := range r.byName {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// decode returns a value of the registered Go type (not a pointer, unless
// the registered example was a pointer).
func (r registry) decode(name string, data []byte, codec Codec) (any, error) {
	e, ok := r.byName[name]
	if !ok {
		return nil, errUnknownName
	}
	isPtr := e.typ.Kind() == reflect.Pointer
	base := e.typ
	if isPtr {
		base = e.typ.Elem()
	}
	ptr := reflect.New(base)
	if len(data) > 0 && string(data) != "null" {
		if err := codec.Unmarshal(data, ptr.Interface()); err != nil {
			return nil, fmt.Errorf("%w for %s: %s", ErrMalformed, name, describeDecodeError(err))
		}
	}
	if isPtr {
		return ptr.Interface(), nil
	}
	return ptr.Elem().Interface(), nil
}

// describeDecodeError turns encoding/json errors into messages a person can
// act on ("field amount: want int64, got string").
func describeDecodeError(err error) string {
	var typeErr *json.UnmarshalTypeError
	if errors.As(err, &typeErr) {
		field := typeErr.Field
		if field == "" {
			field = "(value)"
		}
		return fmt.Sprintf("field %s: want %s, got %s", field, typeErr.Type, typeErr.Value)
	}
	return err.Error()
}
