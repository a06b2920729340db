package aggregate_test

import (
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/esker-io/esker/aggregate"
)

var uuidV5 = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

func TestEventID(t *testing.T) {
	id := aggregate.EventID("account", "acc-1", 1)
	if id != aggregate.EventID("account", "acc-1", 1) {
		t.Fatal("EventID is not deterministic")
	}
	if !uuidV5.MatchString(id) {
		t.Fatalf("EventID %q is not a version 5 UUID", id)
	}
	// Pinned (computed independently: SHA-1 of "type\x00entity\x00version",
	// first 16 bytes, version and variant bits set). Downstream consumers
	// deduplicate on these ids, so they must not change between releases.
	pinned := []struct {
		typ, entity string
		version     int64
		want        string
	}{
		{"account", "acc-1", 1, "44a2bb1a-8337-5de8-8261-0f7345ed64ce"},
		{"bank", "alice", 7, "ffc98326-1d4e-5eaf-987e-88817c54d72a"},
	}
	for _, p := range pinned {
		if got := aggregate.EventID(p.typ, p.entity, p.version); got != p.want {
			t.Errorf("EventID(%q, %q, %d) = %s, want %s", p.typ, p.entity, p.version, got, p.want)
		}
	}

	seen := map[string]string{}
	add := func(typ, entity string, v int64) {
		t.Helper()
		id := aggregate.EventID(typ, entity, v)
		if !uuidV5.MatchString(id) {
			t.Fatalf("EventID(%q, %q, %d) = %q: not a version 5 UUID", typ, entity, v, id)
		}
		key := fmt.Sprintf("(%q, %q, %d)", typ, entity, v)
		if prev, dup := seen[id]; dup {
			t.Fatalf("EventID collision: %s and %s both give %s", prev, key, id)
		}
		seen[id] = key
	}
	for v := int64(1); v <= 1000; v++ {
		add("account", "acc-1", v)
	}
	// Same version, another entity or type; the separators keep ("a", "bc")
	// and ("ab", "c") apart, and ("acc-", 11) apart from ("acc-1", 1).
	add("account", "acc-2", 1)
	add("account", "acc-", 11)
	add("ledger", "acc-1", 1)
	add("a", "bc", 1)
	add("ab", "c", 1)
}

func fullEvent() aggregate.Event {
	return aggregate.Event{
		EntityID:      "acc-1",
		Version:       42,
		EventID:       aggregate.EventID("account", "acc-1", 42),
		Type:          "Deposited",
		SchemaVersion: 3,
		CommandID:     "cmd-7",
		CorrelationID: "corr-1",
		CausationID:   "cause-1",
		Time:          time.Date(2024, 2, 29, 23, 59, 58, 123456789, time.FixedZone("IST", 5*3600+1800)),
		Data:          []byte(`{"amount":5}`),
	}
}

func headerMap(t *testing.T, hs []aggregate.Header) map[string]string {
	t.Helper()
	m := map[string]string{}
	for _, h := range hs {
		if _, dup := m[h.Key]; dup {
			t.Fatalf("header %s twice", h.Key)
		}
		m[h.Key] = string(h.Value)
	}
	return m
}

func eventsEqual(a, b aggregate.Event) bool {
	return a.EntityID == b.EntityID && a.Version == b.Version && a.EventID == b.EventID &&
		a.Type == b.Type && a.SchemaVersion == b.SchemaVersion && a.CommandID == b.CommandID &&
		a.CorrelationID == b.CorrelationID && a.CausationID == b.CausationID &&
		a.Time.Equal(b.Time) && string(a.Data) == string(b.Data)
}

func TestEventHeadersRoundTrip(t *testing.T) {
	ev := fullEvent()
	hs := ev.Headers("application/json")
	got := headerMap(t, hs)
	want := map[string]string{
		aggregate.HeaderEntityID:      "acc-1",
		aggregate.HeaderVersion:       "42",
		aggregate.HeaderEventID:       ev.EventID,
		aggregate.HeaderEventType:     "Deposited",
		aggregate.HeaderSchemaVersion: "3",
		aggregate.HeaderCommandID:     "cmd-7",
		aggregate.HeaderTime:          "2024-02-29T18:29:58.123456789Z", // UTC, nanoseconds
		aggregate.HeaderCorrelationID: "corr-1",
		aggregate.HeaderCausationID:   "cause-1",
		aggregate.HeaderContentType:   "application/json",
	}
	if len(got) != len(want) {
		t.Errorf("headers %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("header %s = %q, want %q", k, got[k], v)
		}
	}

	back, err := aggregate.EventFromRecord([]byte("acc-1"), hs, ev.Data)
	if err != nil {
		t.Fatal(err)
	}
	if !eventsEqual(back, ev) {
		t.Errorf("round trip:\n got %+v\nwant %+v", back, ev)
	}
	if back.Time.Location() != time.UTC || back.Time.Nanosecond() != 123456789 {
		t.Errorf("time = %v, want UTC with nanoseconds", back.Time)
	}
}

func TestEventHeadersOptionalOmitted(t *testing.T) {
	ev := aggregate.Event{
		EntityID: "e", Version: 1, EventID: aggregate.EventID("t", "e", 1), Type: "Opened",
		SchemaVersion: 1, Time: time.Unix(1700000000, 0), Data: []byte(`{}`),
	}
	got := headerMap(t, ev.Headers("application/json"))
	for _, k := range []string{aggregate.HeaderCommandID, aggregate.HeaderCorrelationID, aggregate.HeaderCausationID} {
		if _, ok := got[k]; ok {
			t.Errorf("empty optional header %s written", k)
		}
	}
	if got[aggregate.HeaderTime] != "2023-11-14T22:13:20Z" {
		t.Errorf("time header %q", got[aggregate.HeaderTime])
	}
	back, err := aggregate.EventFromRecord([]byte("e"), ev.Headers("application/json"), ev.Data)
	if err != nil {
		t.Fatal(err)
	}
	if !eventsEqual(back, ev) {
		t.Errorf("round trip:\n got %+v\nwant %+v", back, ev)
	}
}

func TestEventFromRecordDefaults(t *testing.T) {
	hs := []aggregate.Header{
		{Key: aggregate.HeaderVersion, Value: []byte("5")},
		{Key: aggregate.HeaderEventType, Value: []byte("Opened")},
		{Key: "unrelated", Value: []byte("ignored")},
	}
	e, err := aggregate.EventFromRecord([]byte("from-key"), hs, []byte("payload"))
	if err != nil {
		t.Fatal(err)
	}
	if e.EntityID != "from-key" {
		t.Errorf("entity id %q, want the record key", e.EntityID)
	}
	if e.SchemaVersion != 1 {
		t.Errorf("schema version %d, want the default 1", e.SchemaVersion)
	}
	if e.Version != 5 || e.Type != "Opened" || string(e.Data) != "payload" || !e.Time.IsZero() {
		t.Errorf("got %+v", e)
	}
	// The entity id header wins over the key.
	hs = append(hs, aggregate.Header{Key: aggregate.HeaderEntityID, Value: []byte("from-header")})
	if e, err := aggregate.EventFromRecord([]byte("from-key"), hs, nil); err != nil || e.EntityID != "from-header" {
		t.Errorf("entity id header: got %q, %v", e.EntityID, err)
	}
}

func TestEventFromRecordErrors(t *testing.T) {
	base := func() map[string]string {
		return map[string]string{
			aggregate.HeaderVersion:   "1",
			aggregate.HeaderEventType: "Opened",
		}
	}
	cases := []struct {
		name   string
		edit   func(map[string]string)
		errHas string
	}{
		{"missing version", func(m map[string]string) { delete(m, aggregate.HeaderVersion) }, "missing version"},
		{"missing type", func(m map[string]string) { delete(m, aggregate.HeaderEventType) }, "event type"},
		{"empty type", func(m map[string]string) { m[aggregate.HeaderEventType] = "" }, "event type"},
		{"version not a number", func(m map[string]string) { m[aggregate.HeaderVersion] = "one" }, aggregate.HeaderVersion},
		{"version zero", func(m map[string]string) { m[aggregate.HeaderVersion] = "0" }, aggregate.HeaderVersion},
		{"version negative", func(m map[string]string) { m[aggregate.HeaderVersion] = "-3" }, aggregate.HeaderVersion},
		{"version overflow", func(m map[string]string) { m[aggregate.HeaderVersion] = "9223372036854775808" }, aggregate.HeaderVersion},
		{"version with space", func(m map[string]string) { m[aggregate.HeaderVersion] = " 1" }, aggregate.HeaderVersion},
		{"schema version not a number", func(m map[string]string) { m[aggregate.HeaderSchemaVersion] = "v2" }, aggregate.HeaderSchemaVersion},
		{"schema version zero", func(m map[string]string) { m[aggregate.HeaderSchemaVersion] = "0" }, aggregate.HeaderSchemaVersion},
		{"time not RFC 3339", func(m map[string]string) { m[aggregate.HeaderTime] = "yesterday" }, aggregate.HeaderTime},
		{"time without zone", func(m map[string]string) { m[aggregate.HeaderTime] = "2024-01-01T00:00:00" }, aggregate.HeaderTime},
		// Found by FuzzEventFromRecord: times that are before year 0 or
		// after 9999 in UTC decoded, and Headers could not write them back.
		{"time before year 0 in UTC", func(m map[string]string) { m[aggregate.HeaderTime] = "0000-01-01T00:00:00+01:00" }, aggregate.HeaderTime},
		{"time after 9999 in UTC", func(m map[string]string) { m[aggregate.HeaderTime] = "9999-12-31T23:59:59-01:00" }, aggregate.HeaderTime},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := base()
			c.edit(m)
			var hs []aggregate.Header
			for k, v := range m {
				hs = append(hs, aggregate.Header{Key: k, Value: []byte(v)})
			}
			_, err := aggregate.EventFromRecord([]byte("id"), hs, nil)
			if err == nil {
				t.Fatalf("no error for headers %v", m)
			}
			if !strings.Contains(err.Error(), c.errHas) {
				t.Fatalf("error %q does not mention %q", err, c.errHas)
			}
		})
	}
	if _, err := aggregate.EventFromRecord([]byte("id"), nil, nil); err == nil {
		t.Fatal("no headers: no error")
	}
}

// An event written with schema version 0 produces a header that
// EventFromRecord rejects. Events() accepts a SchemaVersion() method that
// returns 0 (or a negative number) and EncodeEvent passes it through, so such
// events are written to Kafka but cannot be read back by EventFromRecord.
type zeroSchema struct{}

func (zeroSchema) SchemaVersion() int { return 0 }

func TestSchemaVersionZeroRejectedAtRegistration(t *testing.T) {
	a := aggregate.New("x", func(int, any) ([]any, error) { return nil, nil }, func(s int, _ any) int { return s })
	mustPanic(t, "schema version", func() { a.Events(zeroSchema{}) })
}

func TestValidateEntityID(t *testing.T) {
	cases := []struct {
		id string
		ok bool
	}{
		{"acc-1", true},
		{"a", true},
		{"with space", true},
		{"unicode-ü-日本", true},
		{"emoji-🙂", true},
		{"slash/and?query#frag", true},
		{strings.Repeat("x", aggregate.MaxEntityIDBytes), true},
		{strings.Repeat("é", aggregate.MaxEntityIDBytes/2), true}, // 256 bytes
		{"", false},
		{strings.Repeat("x", aggregate.MaxEntityIDBytes+1), false},
		{strings.Repeat("é", aggregate.MaxEntityIDBytes/2) + "x", false}, // 257 bytes, 129 runes
		{"nul\x00byte", false},
		{"tab\there", false},
		{"new\nline", false},
		{"\x1f", false},
		{"del\x7f", false},
		{"bad\xffutf8", false},
		{"\xc3", false}, // truncated sequence
	}
	for _, c := range cases {
		err := aggregate.ValidateEntityID(c.id)
		if (err == nil) != c.ok {
			t.Errorf("ValidateEntityID(%q) = %v, want ok=%v", c.id, err, c.ok)
		}
	}
}

// The documentation promises "UTF-8 without control characters", but only
// C0 controls and DEL are refused: C1 controls (U+0080..U+009F, e.g. NEL
// U+0085) pass.
func TestValidateEntityIDC1Controls(t *testing.T) {
	for _, id := range []string{"nel\u0085", "csi\u009b"} {
		if aggregate.ValidateEntityID(id) == nil {
			t.Errorf("ValidateEntityID(%q) accepted a C1 control character", id)
		}
	}
}

// TestEventTimeFastPath: the fast parser of esker's own time format agrees
// with time.Parse on what both accept, and leaves everything else to it.
func TestEventTimeFastPath(t *testing.T) {
	for _, s := range []string{
		"2026-11-25T20:21:51.974592691Z", "2026-11-25T20:21:51Z", "2026-11-25T20:21:51.9Z",
		"0000-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999Z", "2024-02-29T12:00:00Z",
		"2023-02-29T12:00:00Z", "2026-13-01T00:00:00Z", "2026-11-25T24:00:00Z", "2026-11-25T20:21:60Z",
		"2026-11-25T20:21:51.Z", "2026-11-25T20:21:51.1234567891Z", "2026-11-25T20:21:51+01:00",
		"2026-11-25t20:21:51Z", "2026-11-25T20:21:51z", "2026-1-25T20:21:51Z", "+026-11-25T20:21:51Z",
	} {
		want, wantErr := time.Parse(time.RFC3339Nano, s)
		got, err := aggregate.ParseEventTimeForTest([]byte(s))
		if (err != nil) != (wantErr != nil) || (err == nil && (!got.Equal(want) || got.Location() != want.Location())) {
			t.Errorf("%q: got %v, %v; time.Parse gives %v, %v", s, got, err, want, wantErr)
		}
	}
}
