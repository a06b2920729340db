package statestore

import (
	"encoding/binary"
	"errors"
	"math"
	"time"

	"github.com/esker-io/esker/aggregate"
)

// The record formats below are stored in Pebble and travel, byte for byte,
// on the changelog topics. They are compact binary: the write path encodes
// one state record and one journal per touched entity per transaction, and a
// restore decodes every journal of a partition.

// StateRecord is an entity's current state as stored under StateKey and
// written to the changelog: its version, the time of its last event and the
// state encoded by the aggregate's codec.
//
// A forgotten entity keeps a state record with Forgotten set and no state:
// its version (the Forgotten event's) and the time it was forgotten, so that
// reads answer 410 Gone and a restore never brings the entity back.
type StateRecord struct {
	Version   int64
	UpdatedAt time.Time
	State     []byte
	Forgotten bool
}

const (
	stateRecordFormat   = 1
	forgottenFormat     = 2 // a StateRecord with Forgotten set
	journalFormat       = 1
	commandRecordFormat = 1
)

var errCorrupt = errors.New("statestore: corrupt record")

// Encode returns the binary form: format byte, uvarint version, varint unix
// nanoseconds, state bytes.
func (r StateRecord) Encode() []byte {
	b := make([]byte, 0, 1+2*binary.MaxVarintLen64+len(r.State))
	if r.Forgotten {
		b = append(b, forgottenFormat)
		b = binary.AppendUvarint(b, uint64(r.Version))
		return binary.AppendVarint(b, r.UpdatedAt.UnixNano())
	}
	b = append(b, stateRecordFormat)
	b = binary.AppendUvarint(b, uint64(r.Version))
	b = binary.AppendVarint(b, r.UpdatedAt.UnixNano())
	return append(b, r.State...)
}

// DecodeStateRecord parses Encode's output.
func DecodeStateRecord(b []byte) (StateRecord, error) {
	if len(b) < 1 || b[0] != stateRecordFormat && b[0] != forgottenFormat {
		return StateRecord{}, errors.New("statestore: unknown state record format")
	}
	d := decoder{b: b[1:]}
	v := d.version()
	ts := d.varint()
	if d.err != nil {
		return StateRecord{}, d.err
	}
	if b[0] == forgottenFormat {
		if len(d.b) != 0 {
			return StateRecord{}, errCorrupt
		}
		return StateRecord{Version: v, UpdatedAt: time.Unix(0, ts).UTC(), Forgotten: true}, nil
	}
	return StateRecord{Version: v, UpdatedAt: time.Unix(0, ts).UTC(), State: d.b}, nil
}

// CommandRecord is a command's outcome as remembered for idempotency. An
// accepted command points at the versions it wrote (From..To, empty when it
// wrote no event); a rejected one keeps its reason.
type CommandRecord struct {
	CommandID string
	EntityID  string
	From, To  int64
	At        int64 // unix nanoseconds of the outcome
	Rejected  string
	Conflict  bool
	Gone      bool  // rejected: the entity was forgotten
	NotFound  bool  // rejected: the entity does not exist (a forget of nothing)
	Current   int64 // version when rejected
}

// Encode returns the binary form.
func (r CommandRecord) Encode() []byte {
	b := make([]byte, 0, 32+len(r.CommandID)+len(r.EntityID)+len(r.Rejected))
	b = append(b, commandRecordFormat)
	b = appendString(b, r.CommandID)
	b = appendString(b, r.EntityID)
	b = binary.AppendUvarint(b, uint64(r.From))
	b = binary.AppendUvarint(b, uint64(r.To))
	b = binary.AppendVarint(b, r.At)
	b = appendString(b, r.Rejected)
	status := byte(0)
	switch {
	case r.Conflict:
		status = 1
	case r.Gone:
		status = 2
	case r.NotFound:
		status = 3
	}
	b = append(b, status)
	return binary.AppendUvarint(b, uint64(r.Current))
}

// DecodeCommandRecord parses Encode's output.
func DecodeCommandRecord(b []byte) (CommandRecord, error) {
	if len(b) < 1 || b[0] != commandRecordFormat {
		return CommandRecord{}, errors.New("statestore: unknown command record format")
	}
	d := decoder{b: b[1:]}
	r := CommandRecord{
		CommandID: d.string(),
		EntityID:  d.string(),
		From:      d.version(),
		To:        d.version(),
		At:        d.varint(),
		Rejected:  d.string(),
	}
	// Encode writes the status as 0 (none), 1 (conflict), 2 (gone) or 3
	// (not found); any other byte means the record is corrupt.
	switch d.byte() {
	case 0:
	case 1:
		r.Conflict = true
	case 2:
		r.Gone = true
	case 3:
		r.NotFound = true
	default:
		d.fail()
	}
	r.Current = d.version()
	// The record is exactly its encoding: trailing bytes mean corruption
	// (or a format this version does not know) and must not be ignored.
	if d.err == nil && len(d.b) != 0 {
		d.err = errCorrupt
	}
	if d.err != nil {
		return CommandRecord{}, d.err
	}
	return r, nil
}

// Journal is what one transaction wrote for one entity: its events, in
// version order, and the accepted commands that wrote them. It is stored
// under JournalKey (first event's version) and is the entity's stream index.
type Journal struct {
	Events   []aggregate.Event
	Commands []CommandRecord
}

// Encode returns the binary form. The entity id is not repeated per event:
// it is in the key.
func (j *Journal) Encode() []byte {
	n := 8
	for i := range j.Events {
		e := &j.Events[i]
		n += 48 + len(e.EventID) + len(e.Type) + len(e.CommandID) + len(e.CorrelationID) + len(e.CausationID) + len(e.Data)
	}
	for _, c := range j.Commands {
		n += 24 + len(c.CommandID)
	}
	b := make([]byte, 0, n)
	b = append(b, journalFormat)
	b = binary.AppendUvarint(b, uint64(len(j.Events)))
	for i := range j.Events {
		e := &j.Events[i]
		b = binary.AppendUvarint(b, uint64(e.Version))
		b = appendString(b, e.EventID)
		b = appendString(b, e.Type)
		b = binary.AppendUvarint(b, uint64(e.SchemaVersion))
		b = appendString(b, e.CommandID)
		b = appendString(b, e.CorrelationID)
		b = appendString(b, e.CausationID)
		b = binary.AppendVarint(b, e.Time.UnixNano())
		b = appendBytes(b, e.Data)
	}
	b = binary.AppendUvarint(b, uint64(len(j.Commands)))
	for _, c := range j.Commands {
		b = appendString(b, c.CommandID)
		b = binary.AppendUvarint(b, uint64(c.From))
		b = binary.AppendUvarint(b, uint64(c.To))
		b = binary.AppendVarint(b, c.At)
	}
	return b
}

// DecodeJournal parses Encode's output; entityID fills the events' and
// commands' entity ids. Event data aliases b.
func DecodeJournal(entityID string, b []byte) (Journal, error) {
	if len(b) < 1 || b[0] != journalFormat {
		return Journal{}, errors.New("statestore: unknown journal format")
	}
	d := decoder{b: b[1:]}
	var j Journal
	n := d.count(minEventBytes)
	if n > 0 {
		j.Events = make([]aggregate.Event, n)
	}
	for i := 0; i < n && d.err == nil; i++ {
		e := &j.Events[i]
		e.EntityID = entityID
		e.Version = d.version()
		e.EventID = d.string()
		e.Type = d.string()
		e.SchemaVersion = int(d.version())
		e.CommandID = d.string()
		e.CorrelationID = d.string()
		e.CausationID = d.string()
		e.Time = time.Unix(0, d.varint()).UTC()
		e.Data = d.bytes()
	}
	n = d.count(minJournalCommandBytes)
	if n > 0 {
		j.Commands = make([]CommandRecord, n)
	}
	for i := 0; i < n && d.err == nil; i++ {
		j.Commands[i] = CommandRecord{
			CommandID: d.string(),
			EntityID:  entityID,
			From:      d.version(),
			To:        d.version(),
			At:        d.varint(),
		}
	}
	if d.err == nil && len(d.b) != 0 {
		d.err = errCorrupt
	}
	if d.err != nil {
		return Journal{}, d.err
	}
	return j, nil
}

// The fewest bytes one element of a journal's lists takes in the encoding:
// an event is nine varints or lengths (version, event id, type, schema
// version, command id, correlation id, causation id, time, data), a command
// four (command id, from, to, at).
const (
	minEventBytes          = 9
	minJournalCommandBytes = 4
)

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendBytes(b []byte, p []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(p)))
	return append(b, p...)
}

// decoder reads the binary formats; the first error sticks and later reads
// return zero values.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail() {
	if d.err == nil {
		d.err = errCorrupt
	}
}

func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.err = errCorrupt
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint() int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.err = errCorrupt
		return 0
	}
	d.b = d.b[n:]
	return v
}

// version reads a version (or another non-negative int64) written as a
// uvarint. Encoders only write values up to 2^63-1; a larger one would turn
// negative, so it means corruption.
func (d *decoder) version() int64 {
	v := d.uvarint()
	if v > math.MaxInt64 {
		d.fail()
		return 0
	}
	return int64(v)
}

// count reads the length of a list whose items take at least minBytes each
// in the encoding. A length the remaining bytes cannot hold is rejected
// before anything is allocated for it: counting one byte per item would let
// a corrupt length allocate far more than the input's size (an Event is 160
// bytes in memory).
func (d *decoder) count(minBytes int) int {
	n := d.uvarint()
	if d.err == nil && n > uint64(len(d.b)/minBytes) {
		d.err = errCorrupt
	}
	if d.err != nil {
		return 0
	}
	return int(n)
}

func (d *decoder) bytes() []byte {
	n := d.uvarint()
	if d.err != nil {
		return nil
	}
	if n > uint64(len(d.b)) {
		d.err = errCorrupt
		return nil
	}
	p := d.b[:n:n]
	d.b = d.b[n:]
	return p
}

func (d *decoder) string() string { return string(d.bytes()) }

func (d *decoder) byte() byte {
	if d.err != nil {
		return 0
	}
	if len(d.b) == 0 {
		d.err = errCorrupt
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}
