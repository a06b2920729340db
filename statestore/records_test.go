package statestore_test

import (
	"bytes"
	"encoding/binary"
	"reflect"
	"runtime"
	"testing"
	"time"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/statestore"
)

func TestStateRecordRoundTrip(t *testing.T) {
	cases := []statestore.StateRecord{
		{Version: 1, UpdatedAt: time.Unix(1700000000, 123456789).UTC(), State: []byte(`{"balance":5}`)},
		{Version: 0, UpdatedAt: time.Unix(0, 0).UTC(), State: nil},
		{Version: 1 << 40, UpdatedAt: time.Unix(-1, 0).UTC(), State: []byte{0, 1, 2, 0xff}},
		{Version: 300, UpdatedAt: time.Date(2262, 1, 1, 0, 0, 0, 0, time.UTC), State: bytes.Repeat([]byte("x"), 5000)},
	}
	for _, want := range cases {
		enc := want.Encode()
		if enc[0] != 1 {
			t.Errorf("format byte %d, want 1", enc[0])
		}
		got, err := statestore.DecodeStateRecord(enc)
		if err != nil {
			t.Fatalf("%+v: %v", want, err)
		}
		if got.Version != want.Version || !got.UpdatedAt.Equal(want.UpdatedAt) || !bytes.Equal(got.State, want.State) {
			t.Errorf("round trip: got %+v, want %+v", got, want)
		}
		if got.UpdatedAt.Location() != time.UTC {
			t.Errorf("UpdatedAt not in UTC: %v", got.UpdatedAt)
		}
	}
	// Non-UTC input times decode to the same instant in UTC.
	loc := time.FixedZone("X", -7*3600)
	in := statestore.StateRecord{Version: 2, UpdatedAt: time.Date(2024, 5, 6, 7, 8, 9, 10, loc)}
	got, err := statestore.DecodeStateRecord(in.Encode())
	if err != nil || !got.UpdatedAt.Equal(in.UpdatedAt) {
		t.Errorf("non-UTC time: %v, %v", got.UpdatedAt, err)
	}
}

func TestStateRecordLayout(t *testing.T) {
	// format 1, uvarint 300 = ac 02, varint 1 (zig-zag) = 02, then the state.
	enc := statestore.StateRecord{Version: 300, UpdatedAt: time.Unix(0, 1), State: []byte("S")}.Encode()
	if want := []byte{1, 0xac, 0x02, 0x02, 'S'}; !bytes.Equal(enc, want) {
		t.Errorf("Encode() = % x, want % x", enc, want)
	}
}

func TestForgottenStateRecordRoundTrip(t *testing.T) {
	in := statestore.StateRecord{Version: 7, UpdatedAt: time.Unix(0, 42).UTC(), Forgotten: true}
	out, err := statestore.DecodeStateRecord(in.Encode())
	if err != nil {
		t.Fatal(err)
	}
	if !out.Forgotten || out.Version != 7 || !out.UpdatedAt.Equal(in.UpdatedAt) || out.State != nil {
		t.Fatalf("round trip: %+v, want %+v", out, in)
	}
	for _, rec := range []statestore.CommandRecord{{CommandID: "c", Gone: true}, {CommandID: "d", NotFound: true}} {
		got, err := statestore.DecodeCommandRecord(rec.Encode())
		if err != nil || got.Gone != rec.Gone || got.NotFound != rec.NotFound {
			t.Fatalf("command record %+v: %+v, %v", rec, got, err)
		}
	}
}

func TestDecodeStateRecordErrors(t *testing.T) {
	overlong := append([]byte{1}, bytes.Repeat([]byte{0xff}, 11)...)
	cases := map[string][]byte{
		"empty":                nil,
		"unknown format":       {3, 1, 2},
		"forgotten with state": {2, 1, 2, 'S'},
		"JSON":                 []byte(`{"version":1}`),
		"format byte only":     {1},
		"truncated version":    {1, 0x80},
		"version overflow":     overlong,
		"missing time":         {1, 5},
		"truncated time":       {1, 5, 0x80, 0x80},
		"time overflow":        append([]byte{1, 5}, bytes.Repeat([]byte{0xff}, 11)...),
		// A uvarint above 2^63-1 would decode to a negative version.
		"version above int64": binary.AppendUvarint([]byte{1}, 1<<63),
	}
	for name, b := range cases {
		if _, err := statestore.DecodeStateRecord(b); err == nil {
			t.Errorf("%s (% x): no error", name, b)
		}
	}
}

func TestCommandRecordRoundTrip(t *testing.T) {
	cases := []statestore.CommandRecord{
		{CommandID: "c-1", EntityID: "acc-1", From: 3, To: 5, At: 1700000000123456789},
		{CommandID: "c-2", EntityID: "acc-1", At: 1},                                                        // accepted, no events
		{CommandID: "c-3", EntityID: "a b", At: -5, Rejected: "insufficient funds", Current: 9},             // rejected
		{CommandID: "c-4", EntityID: "日本", At: 7, Rejected: "version conflict", Conflict: true, Current: 1}, // conflict
		{},
	}
	for _, want := range cases {
		enc := want.Encode()
		got, err := statestore.DecodeCommandRecord(enc)
		if err != nil {
			t.Fatalf("%+v: %v", want, err)
		}
		if got != want {
			t.Errorf("round trip: got %+v, want %+v", got, want)
		}
		// Every proper prefix is an error, never a silently shorter record.
		for n := 0; n < len(enc); n++ {
			if r, err := statestore.DecodeCommandRecord(enc[:n]); err == nil {
				t.Errorf("%+v: prefix of %d/%d bytes decoded to %+v", want, n, len(enc), r)
			}
		}
	}
}

func TestDecodeCommandRecordErrors(t *testing.T) {
	cases := map[string][]byte{
		"empty":                    nil,
		"old JSON format":          []byte(`{"c":"c-1","e":"a","at":1}`),
		"unknown format":           {9},
		"string longer than input": {1, 100, 'a'},
		"truncated length":         {1, 0x80},
		// Found by FuzzCommandRecordRoundTrip: trailing bytes were ignored.
		"trailing byte": append(statestore.CommandRecord{CommandID: "c", At: 1}.Encode(), 0),
		// A status other than 0 to 3 read as "no conflict".
		"status byte 4": {1, 1, 'c', 0, 0, 0, 2, 0, 4, 0},
		// Found by FuzzDecodeCommandRecord: versions above 2^63-1 decoded
		// as negative numbers.
		"from above int64":    binary.AppendUvarint([]byte{1, 0, 0}, 1<<63),
		"current above int64": binary.AppendUvarint([]byte{1, 0, 0, 0, 0, 0, 0, 0}, 1<<63),
	}
	if _, err := statestore.DecodeCommandRecord([]byte{1, 1, 'c', 0, 0, 0, 2, 0, 1, 0}); err != nil {
		t.Fatalf("the valid neighbour of the corrupt cases: %v", err)
	}
	for name, b := range cases {
		if _, err := statestore.DecodeCommandRecord(b); err == nil {
			t.Errorf("%s (% x): no error", name, b)
		}
	}
}

func sampleJournal() statestore.Journal {
	return statestore.Journal{
		Events: []aggregate.Event{
			{EntityID: "acc-1", Version: 4, EventID: aggregate.EventID("acct", "acc-1", 4), Type: "Deposited", SchemaVersion: 2,
				CommandID: "c-1", CorrelationID: "corr", CausationID: "cause", Time: time.Unix(1700000000, 999).UTC(), Data: []byte(`{"amount":5}`)},
			{EntityID: "acc-1", Version: 5, EventID: aggregate.EventID("acct", "acc-1", 5), Type: "Withdrawn", SchemaVersion: 1,
				CommandID: "c-2", Time: time.Unix(1700000001, 0).UTC(), Data: []byte(`{}`)},
		},
		Commands: []statestore.CommandRecord{
			{CommandID: "c-1", EntityID: "acc-1", From: 4, To: 4, At: 1700000000000000999},
			{CommandID: "c-2", EntityID: "acc-1", From: 5, To: 5, At: 1700000001000000000},
			{CommandID: "c-3", EntityID: "acc-1", At: 1700000002000000000}, // wrote no event
		},
	}
}

func TestJournalRoundTrip(t *testing.T) {
	want := sampleJournal()
	enc := want.Encode()
	got, err := statestore.DecodeJournal("acc-1", enc)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Events) != len(want.Events) || len(got.Commands) != len(want.Commands) {
		t.Fatalf("got %d events, %d commands", len(got.Events), len(got.Commands))
	}
	for i := range want.Events {
		g, w := got.Events[i], want.Events[i]
		if !g.Time.Equal(w.Time) || !bytes.Equal(g.Data, w.Data) {
			t.Errorf("event %d: got %+v, want %+v", i, g, w)
		}
		g.Time, w.Time, g.Data, w.Data = time.Time{}, time.Time{}, nil, nil
		if !reflect.DeepEqual(g, w) {
			t.Errorf("event %d: got %+v, want %+v", i, g, w)
		}
	}
	if !reflect.DeepEqual(got.Commands, want.Commands) {
		t.Errorf("commands: got %+v, want %+v", got.Commands, want.Commands)
	}
	// The entity id comes from the caller (the key), not the encoding.
	other, err := statestore.DecodeJournal("zzz", enc)
	if err != nil || other.Events[0].EntityID != "zzz" || other.Commands[0].EntityID != "zzz" {
		t.Errorf("entity id from the caller: %+v, %v", other, err)
	}
	// Every proper prefix fails.
	for n := 0; n < len(enc); n++ {
		if _, err := statestore.DecodeJournal("acc-1", enc[:n]); err == nil {
			t.Errorf("prefix of %d/%d bytes decoded", n, len(enc))
		}
	}
}

func TestJournalEmptyParts(t *testing.T) {
	for _, j := range []statestore.Journal{
		{},
		{Commands: []statestore.CommandRecord{{CommandID: "c", At: 5}}},
		{Events: sampleJournal().Events[:1]},
	} {
		got, err := statestore.DecodeJournal("acc-1", j.Encode())
		if err != nil {
			t.Fatalf("%+v: %v", j, err)
		}
		if len(got.Events) != len(j.Events) || len(got.Commands) != len(j.Commands) {
			t.Errorf("got %+v, want %+v", got, j)
		}
	}
}

func TestDecodeJournalErrors(t *testing.T) {
	good := sampleJournal()
	enc := good.Encode()
	huge := []byte{1}
	huge = binary.AppendUvarint(huge, 1<<60) // event count far beyond the input
	cases := map[string][]byte{
		"empty":               nil,
		"unknown format":      append([]byte{7}, enc[1:]...),
		"old JSON format":     []byte(`{"events":[],"commands":[]}`),
		"trailing garbage":    append(append([]byte{}, enc...), 0),
		"huge count":          huge,
		"format only":         {1},
		"version above int64": append(binary.AppendUvarint([]byte{1, 1}, 1<<63), 0, 0, 0, 0, 0, 0, 0, 0, 0),
	}
	for name, b := range cases {
		if _, err := statestore.DecodeJournal("a", b); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

// TestDecodeJournalCountIsBoundedByItsSize: a list length is checked against
// the least space its items take (9 bytes an event, 4 a command), so a
// corrupt length cannot make the decoder allocate 160 bytes of Event per
// input byte. Found by FuzzDecodeJournal's allocation check.
func TestDecodeJournalCountIsBoundedByItsSize(t *testing.T) {
	const n = 1 << 16
	// n zero bytes hold n/9 empty events, not n.
	b := append(binary.AppendUvarint([]byte{1}, n), make([]byte, n)...)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := statestore.DecodeJournal("a", b)
	runtime.ReadMemStats(&after)
	if err == nil {
		t.Fatal("a count beyond the input decoded")
	}
	if got := after.TotalAlloc - before.TotalAlloc; got > 4*n {
		t.Fatalf("decoding %d bytes allocated %d bytes", len(b), got)
	}
	// The same bytes with a count that fits decode.
	b = append(binary.AppendUvarint([]byte{1}, n/9), make([]byte, n/9*9+1)...)
	j, err := statestore.DecodeJournal("a", b)
	if err != nil || len(j.Events) != n/9 {
		t.Fatalf("%d events, %v", len(j.Events), err)
	}
}
