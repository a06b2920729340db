package aggregate

import (
	"crypto/sha1"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
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
// ExpectedVersion, when set, makes the command fail with a version conflict
// unless the entity is at exactly that version (0: must not exist yet).
type Command struct {
	Type            string          `json:"type"`
	Data            json.RawMessage `json:"data,omitempty"`
	ExpectedVersion *int64          `json:"expectedVersion,omitempty"`
	CommandID       string          `json:"commandId,omitempty"`
	CorrelationID   string          `json:"correlationId,omitempty"`
	CausationID     string          `json:"causationId,omitempty"`
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
func EventFromRecord(key []byte, headers []Header, value []byte) (Event, error) {
	e := Event{EntityID: string(key), Data: value}
	var haveVersion, haveType bool
	for _, h := range headers {
		v := string(h.Value)
		switch h.Key {
		case HeaderEntityID:
			e.EntityID = v
		case HeaderVersion:
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 1 {
				return Event{}, fmt.Errorf("header %s: %q is not a positive version", h.Key, v)
			}
			e.Version, haveVersion = n, true
		case HeaderEventID:
			e.EventID = v
		case HeaderEventType:
			e.Type, haveType = v, v != ""
		case HeaderSchemaVersion:
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				return Event{}, fmt.Errorf("header %s: %q is not a positive schema version", h.Key, v)
			}
			e.SchemaVersion = n
		case HeaderCommandID:
			e.CommandID = v
		case HeaderCorrelationID:
			e.CorrelationID = v
		case HeaderCausationID:
			e.CausationID = v
		case HeaderTime:
			t, err := time.Parse(time.RFC3339Nano, v)
			if err != nil {
				return Event{}, fmt.Errorf("header %s: %w", h.Key, err)
			}
			// A time near the ends of RFC 3339's years 0000-9999 can fall
			// outside them once its offset is applied (UTC turns
			// "0000-01-01T00:00:00+01:00" into year -1), and Headers,
			// which writes UTC, could not write it back.
			if y := t.UTC().Year(); y < 0 || y > 9999 {
				return Event{}, fmt.Errorf("header %s: %q is outside the years 0000-9999 in UTC", h.Key, v)
			}
			e.Time = t
		}
	}
	if !haveVersion || !haveType {
		return Event{}, errors.New("record is not an esker event: missing version or event type header")
	}
	if e.SchemaVersion == 0 {
		e.SchemaVersion = 1
	}
	return e, nil
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
