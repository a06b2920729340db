package aggregate

import (
	"crypto/sha1"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"time"
	"unicode"
	"unicode/utf8"
)

// Record header names. Every event record on "<type>-events" carries them so
// that consumers in any language can route and deduplicate without decoding
// the value; the value is the event payload alone, encoded by the codec.
const (
	HeaderEntityID      = "esker-entity-id"
	HeaderVersion       = "esker-version"
	HeaderEventID       = "esker-event-id"
	HeaderEventType     = "esker-event-type"
	HeaderSchemaVersion = "esker-schema-version"
	HeaderCommandID     = "esker-command-id"
	HeaderTime          = "esker-time" // RFC 3339 with nanoseconds, UTC
	HeaderCorrelationID = "esker-correlation-id"
	HeaderCausationID   = "esker-causation-id"
	HeaderContentType   = "content-type"
)

// Header is a Kafka record header, kept free of any Kafka client type.
type Header struct {
	Key   string
	Value []byte
}

// Command is a command as it travels on "<type>-commands": a JSON object,
// keyed by entity id, that any Kafka client can produce, for example
//
//	{"type":"Deposit","data":{"amount":500},"commandId":"c-1"}
//
// ExpectedVersion is optimistic concurrency, with EventStoreDB's modes: nil
// (any version: no check), 0 (the entity must not exist yet), ExpectExists
// (it must exist, at any version) or N ≥ 1 (it must be at exactly N).
// Otherwise the command fails with a version conflict. In JSON it is a
// number, or one of "any", "must-not-exist" and "must-exist" (see
// ParseExpectedVersion).
type Command struct {
	Type            string          `json:"type"`
	Data            json.RawMessage `json:"data,omitempty"`
	ExpectedVersion *int64          `json:"expectedVersion,omitempty"`
	CommandID       string          `json:"commandId,omitempty"`
	CorrelationID   string          `json:"correlationId,omitempty"`
	CausationID     string          `json:"causationId,omitempty"`
}

// CommandJSON is the JSON form of a Command as clients write it: decode
// into it (with the decoder options the caller needs), then call Command,
// which reads expectedVersion in any of its forms.
type CommandJSON struct {
	Type            string          `json:"type"`
	Data            json.RawMessage `json:"data,omitempty"`
	ExpectedVersion json.RawMessage `json:"expectedVersion,omitempty"`
	CommandID       string          `json:"commandId,omitempty"`
	CorrelationID   string          `json:"correlationId,omitempty"`
	CausationID     string          `json:"causationId,omitempty"`
}

// Command converts the JSON form; it fails only on an expectedVersion that
// is none of the accepted forms.
func (c CommandJSON) Command() (Command, error) {
	ev, err := ParseExpectedVersion(c.ExpectedVersion)
	return Command{Type: c.Type, Data: c.Data, ExpectedVersion: ev, CommandID: c.CommandID,
		CorrelationID: c.CorrelationID, CausationID: c.CausationID}, err
}

// ExpectExists is the ExpectedVersion of a command that requires its entity
// to exist, whatever its version.
const ExpectExists int64 = -1

// Expected-version names accepted in JSON for "expectedVersion".
const (
	ExpectAnyName          = "any"
	ExpectNotExistsName    = "must-not-exist"
	ExpectExistsName       = "must-exist"
	expectedVersionChoices = `a version (0: must not exist), -1 or "must-exist", "must-not-exist", or "any"`
)

// ParseExpectedVersion reads the JSON value of "expectedVersion": a version
// ≥ 0, -1 (ExpectExists), "must-exist", "must-not-exist" (0), "any" or null
// (nil: no check). Anything else is an error saying what is accepted.
func ParseExpectedVersion(raw []byte) (*int64, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	var name string
	if err := json.Unmarshal(raw, &name); err == nil {
		var v int64
		switch name {
		case ExpectAnyName:
			return nil, nil
		case ExpectNotExistsName:
			v = 0
		case ExpectExistsName:
			v = ExpectExists
		default:
			return nil, fmt.Errorf("expectedVersion %q: want %s", name, expectedVersionChoices)
		}
		return &v, nil
	}
	var v int64
	if err := json.Unmarshal(raw, &v); err != nil || v < ExpectExists {
		return nil, fmt.Errorf("expectedVersion %s: want %s", raw, expectedVersionChoices)
	}
	return &v, nil
}

// ExpectationMet reports whether an entity at version current satisfies a
// command's expected version (see Command).
func ExpectationMet(expected *int64, current int64) bool {
	switch {
	case expected == nil:
		return true
	case *expected == ExpectExists:
		return current > 0
	default:
		return *expected == current
	}
}

// DescribeExpected says in words what an expected version requires.
func DescribeExpected(expected int64) string {
	switch expected {
	case 0:
		return "must not exist"
	case ExpectExists:
		return "must exist"
	}
	return "version " + strconv.FormatInt(expected, 10)
}

// Event is one stored event with its envelope.
type Event struct {
	EntityID      string          `json:"entityId"`
	Version       int64           `json:"version"`
	EventID       string          `json:"eventId"`
	Type          string          `json:"type"`
	SchemaVersion int             `json:"schemaVersion"`
	CommandID     string          `json:"commandId,omitempty"`
	CorrelationID string          `json:"correlationId,omitempty"`
	CausationID   string          `json:"causationId,omitempty"`
	Time          time.Time       `json:"time"`
	Data          json.RawMessage `json:"data"`
}

// EventID derives the id of an entity's n-th event. It is deterministic so
// that a command re-processed after an aborted transaction produces events
// with the same ids, and downstream consumers can deduplicate on it.
func EventID(aggregateType, entityID string, version int64) string {
	var in [128]byte
	b := append(in[:0], aggregateType...)
	b = append(b, 0)
	b = append(b, entityID...)
	b = append(b, 0)
	b = strconv.AppendInt(b, version, 10)
	h := sha1.Sum(b)
	h[6] = (h[6] & 0x0f) | 0x50 // UUID version 5 layout
	h[8] = (h[8] & 0x3f) | 0x80
	var out [36]byte
	hex.Encode(out[0:8], h[0:4])
	out[8] = '-'
	hex.Encode(out[9:13], h[4:6])
	out[13] = '-'
	hex.Encode(out[14:18], h[6:8])
	out[18] = '-'
	hex.Encode(out[19:23], h[8:10])
	out[23] = '-'
	hex.Encode(out[24:36], h[10:16])
	return string(out[:])
}

// Headers returns the record headers for an event.
func (e *Event) Headers(contentType string) []Header {
	hs := []Header{
		{HeaderEntityID, []byte(e.EntityID)},
		{HeaderVersion, []byte(strconv.FormatInt(e.Version, 10))},
		{HeaderEventID, []byte(e.EventID)},
		{HeaderEventType, []byte(e.Type)},
		{HeaderSchemaVersion, []byte(strconv.Itoa(e.SchemaVersion))},
		{HeaderTime, []byte(e.Time.UTC().Format(time.RFC3339Nano))},
		{HeaderContentType, []byte(contentType)},
	}
	if e.CommandID != "" {
		hs = append(hs, Header{HeaderCommandID, []byte(e.CommandID)})
	}
	if e.CorrelationID != "" {
		hs = append(hs, Header{HeaderCorrelationID, []byte(e.CorrelationID)})
	}
	if e.CausationID != "" {
		hs = append(hs, Header{HeaderCausationID, []byte(e.CausationID)})
	}
	return hs
}

// EventFromRecord rebuilds an event envelope from a record's key, headers and
// value. It fails on missing or malformed envelope headers.
//
// Every consumer of events (projections, side effects, sinks) calls it per
// record, so it converts only the headers it keeps to strings, parses
// numbers from the bytes, shares the string of ids that are equal (a
// command's id is usually its correlation and causation id too), and parses
// the time esker writes (RFC 3339, UTC, nanoseconds) without the general
// layout parser.
func EventFromRecord(key []byte, headers []Header, value []byte) (Event, error) {
	e := Event{Data: value}
	var haveVersion, haveType, haveEntity bool
	for _, h := range headers {
		switch h.Key {
		case HeaderEntityID:
			e.EntityID, haveEntity = string(h.Value), true
		case HeaderVersion:
			n, ok := parsePositive(h.Value)
			if !ok {
				return Event{}, fmt.Errorf("header %s: %q is not a positive version", h.Key, h.Value)
			}
			e.Version, haveVersion = n, true
		case HeaderEventID:
			e.EventID = string(h.Value)
		case HeaderEventType:
			e.Type, haveType = string(h.Value), len(h.Value) > 0
		case HeaderSchemaVersion:
			n, ok := parsePositive(h.Value)
			if !ok || n > math.MaxInt {
				return Event{}, fmt.Errorf("header %s: %q is not a positive schema version", h.Key, h.Value)
			}
			e.SchemaVersion = int(n)
		case HeaderCommandID:
			e.CommandID = string(h.Value)
		case HeaderCorrelationID:
			e.CorrelationID = sameString(h.Value, e.CommandID)
		case HeaderCausationID:
			e.CausationID = sameString(h.Value, e.CommandID)
		case HeaderTime:
			t, err := parseEventTime(h.Value)
			if err != nil {
				return Event{}, fmt.Errorf("header %s: %w", h.Key, err)
			}
			// A time near the ends of RFC 3339's years 0000-9999 can fall
			// outside them once its offset is applied (UTC turns
			// "0000-01-01T00:00:00+01:00" into year -1), and Headers,
			// which writes UTC, could not write it back.
			if y := t.UTC().Year(); y < 0 || y > 9999 {
				return Event{}, fmt.Errorf("header %s: %q is outside the years 0000-9999 in UTC", h.Key, h.Value)
			}
			e.Time = t
		}
	}
	if !haveVersion || !haveType {
		return Event{}, errors.New("record is not an esker event: missing version or event type header")
	}
	if !haveEntity {
		e.EntityID = string(key)
	}
	if e.SchemaVersion == 0 {
		e.SchemaVersion = 1
	}
	return e, nil
}

// parsePositive parses a decimal integer ≥ 1 as strconv.ParseInt would
// (a leading '+' allowed), without converting b to a string.
func parsePositive(b []byte) (int64, bool) {
	if len(b) > 0 && b[0] == '+' {
		b = b[1:]
	}
	if len(b) == 0 || len(b) > 19 {
		return 0, false
	}
	var n int64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
		if n < 0 {
			return 0, false // overflow
		}
	}
	return n, n >= 1
}

// sameString returns s if b holds the same bytes, else string(b).
func sameString(b []byte, s string) string {
	if string(b) == s { // no allocation: the compiler compares in place
		return s
	}
	return string(b)
}

// parseEventTime parses an RFC 3339 time. The form esker writes,
// "2006-01-02T15:04:05.999999999Z", takes a fast path; any other is left
// to time.Parse.
func parseEventTime(b []byte) (time.Time, error) {
	if t, ok := parseUTC(b); ok {
		return t, nil
	}
	return time.Parse(time.RFC3339Nano, string(b))
}

// parseUTC parses "YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z" with calendar-valid
// fields; ok is false for anything else.
func parseUTC(b []byte) (time.Time, bool) {
	if len(b) < 20 || b[len(b)-1] != 'Z' || b[4] != '-' || b[7] != '-' || b[10] != 'T' || b[13] != ':' || b[16] != ':' {
		return time.Time{}, false
	}
	num := func(s []byte) (int, bool) {
		n := 0
		for _, c := range s {
			if c < '0' || c > '9' {
				return 0, false
			}
			n = n*10 + int(c-'0')
		}
		return n, true
	}
	year, ok1 := num(b[0:4])
	month, ok2 := num(b[5:7])
	day, ok3 := num(b[8:10])
	hour, ok4 := num(b[11:13])
	minute, ok5 := num(b[14:16])
	sec, ok6 := num(b[17:19])
	if !(ok1 && ok2 && ok3 && ok4 && ok5 && ok6) {
		return time.Time{}, false
	}
	nanos := 0
	if frac := b[19 : len(b)-1]; len(frac) > 0 {
		if frac[0] != '.' || len(frac) < 2 || len(frac) > 10 {
			return time.Time{}, false
		}
		n, ok := num(frac[1:])
		if !ok {
			return time.Time{}, false
		}
		for range 10 - len(frac) {
			n *= 10
		}
		nanos = n
	}
	if month < 1 || month > 12 || day < 1 || hour > 23 || minute > 59 || sec > 59 {
		return time.Time{}, false
	}
	t := time.Date(year, time.Month(month), day, hour, minute, sec, nanos, time.UTC)
	if t.Day() != day { // February 30th and the like: time.Parse refuses them
		return time.Time{}, false
	}
	return t, true
}

// MaxEntityIDBytes bounds entity ids: they are record keys and store keys.
const MaxEntityIDBytes = 256

// ValidateEntityID reports whether id can name an entity: 1 to 256 bytes of
// UTF-8 without control characters.
func ValidateEntityID(id string) error {
	if id == "" {
		return errors.New("entity id is empty")
	}
	if len(id) > MaxEntityIDBytes {
		return fmt.Errorf("entity id is %d bytes; the limit is %d", len(id), MaxEntityIDBytes)
	}
	if !utf8.ValidString(id) {
		return errors.New("entity id is not valid UTF-8")
	}
	for _, r := range id {
		if unicode.IsControl(r) {
			return errors.New("entity id contains a control character")
		}
	}
	return nil
}
