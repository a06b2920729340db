package statestore_test

import (
	"bytes"
	"encoding/binary"
	"reflect"
	"testing"
	"time"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/internal/fuzzcheck"
	"github.com/esker-io/esker/statestore"
)

// The records decoded here come from Pebble and from the changelog topics,
// where any client with write access can put any bytes. The fuzz targets
// check that the decoders never panic, never return a value no encoder
// could have written (a negative version, say), never allocate much more
// than the input's size whatever its length fields claim, and that
// everything they accept re-encodes to an equal value.

// allocBudget is how many bytes a decoder may allocate for an input of n
// bytes: the decoded values are at most a small multiple of the input (an
// event takes at least 9 bytes on the wire and 160 in memory, a journal's
// command 4 and 88), never what a length field claims.
func allocBudget(n int) uint64 { return 32*uint64(n) + 4<<10 }

// checkAllocs fails t if fn, a decoding of n bytes, allocates more than
// allocBudget(n).
func checkAllocs(t *testing.T, n int, fn func()) { fuzzcheck.Allocs(t, n, allocBudget, fn) }

func FuzzDecodeStateRecord(f *testing.F) {
	for _, r := range []statestore.StateRecord{
		{Version: 1, UpdatedAt: time.Unix(1700000000, 123456789).UTC(), State: []byte(`{"balance":5}`)},
		{Version: 1 << 40, UpdatedAt: time.Unix(-1, 0).UTC(), State: []byte{0, 1, 2, 0xff}},
		{},
	} {
		f.Add(r.Encode())
	}
	f.Add([]byte{})
	f.Add([]byte{1, 0x80})
	f.Add(append([]byte{1}, bytes.Repeat([]byte{0xff}, 9)...))
	f.Fuzz(func(t *testing.T, b []byte) {
		var r statestore.StateRecord
		var err error
		checkAllocs(t, len(b), func() { r, err = statestore.DecodeStateRecord(b) })
		if err != nil {
			return
		}
		if r.Version < 0 {
			t.Fatalf("decoded a negative version %d", r.Version)
		}
		if r.UpdatedAt.Location() != time.UTC {
			t.Fatalf("UpdatedAt %v is not in UTC", r.UpdatedAt)
		}
		again, err := statestore.DecodeStateRecord(r.Encode())
		if err != nil {
			t.Fatalf("re-encoded %+v does not decode: %v", r, err)
		}
		if again.Version != r.Version || !again.UpdatedAt.Equal(r.UpdatedAt) || !bytes.Equal(again.State, r.State) {
			t.Fatalf("re-encoding changed the record: %+v, then %+v", r, again)
		}
	})
}

func FuzzStateRecordRoundTrip(f *testing.F) {
	f.Add(int64(1), int64(1700000000123456789), []byte(`{"balance":5}`))
	f.Add(int64(0), int64(0), []byte(nil))
	f.Add(int64(1<<62), int64(-1<<62), []byte{0xff, 0xfe})
	f.Fuzz(func(t *testing.T, version, nanos int64, state []byte) {
		if version < 0 {
			return // versions are never negative
		}
		want := statestore.StateRecord{Version: version, UpdatedAt: time.Unix(0, nanos).UTC(), State: state}
		got, err := statestore.DecodeStateRecord(want.Encode())
		if err != nil {
			t.Fatalf("%+v: %v", want, err)
		}
		if got.Version != want.Version || !got.UpdatedAt.Equal(want.UpdatedAt) || !bytes.Equal(got.State, want.State) {
			t.Fatalf("round trip: got %+v, want %+v", got, want)
		}
	})
}

func FuzzDecodeCommandRecord(f *testing.F) {
	for _, r := range []statestore.CommandRecord{
		{CommandID: "c-1", EntityID: "acc-1", From: 3, To: 5, At: 1700000000123456789},
		{CommandID: "c-4", EntityID: "日本", At: 7, Rejected: "version conflict", Conflict: true, Current: 1},
		{},
	} {
		f.Add(r.Encode())
	}
	f.Add([]byte{})
	f.Add([]byte{1, 100, 'a'})
	f.Add([]byte{1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f})
	f.Fuzz(func(t *testing.T, b []byte) {
		var r statestore.CommandRecord
		var err error
		checkAllocs(t, len(b), func() { r, err = statestore.DecodeCommandRecord(b) })
		if err != nil {
			return
		}
		if r.From < 0 || r.To < 0 || r.Current < 0 {
			t.Fatalf("decoded a negative version: %+v", r)
		}
		again, err := statestore.DecodeCommandRecord(r.Encode())
		if err != nil || again != r {
			t.Fatalf("re-encoding changed the record: %+v, then %+v, %v", r, again, err)
		}
	})
}

func FuzzCommandRecordRoundTrip(f *testing.F) {
	f.Add("c-1", "acc-1", int64(3), int64(5), int64(1700000000123456789), "", false, int64(0), []byte{0})
	f.Add("c-3", "a b", int64(0), int64(0), int64(-5), "insufficient funds", true, int64(9), []byte("x"))
	f.Add("", "", int64(0), int64(0), int64(0), "", false, int64(0), []byte{})
	f.Fuzz(func(t *testing.T, cmdID, entityID string, from, to, at int64, rejected string, conflict bool, current int64, extra []byte) {
		if from < 0 || to < 0 || current < 0 {
			return // versions are never negative
		}
		want := statestore.CommandRecord{CommandID: cmdID, EntityID: entityID, From: from, To: to, At: at,
			Rejected: rejected, Conflict: conflict, Current: current}
		enc := want.Encode()
		got, err := statestore.DecodeCommandRecord(enc)
		if err != nil || got != want {
			t.Fatalf("round trip: got %+v, %v; want %+v", got, err, want)
		}
		// A record is exactly its encoding: one cut short or followed by
		// anything is corrupt.
		if _, err := statestore.DecodeCommandRecord(enc[:len(enc)-1]); err == nil {
			t.Fatalf("%+v: a truncated encoding decoded", want)
		}
		if len(extra) > 0 {
			if r, err := statestore.DecodeCommandRecord(append(enc, extra...)); err == nil {
				t.Fatalf("%+v followed by % x decoded to %+v", want, extra, r)
			}
		}
	})
}

func FuzzDecodeJournal(f *testing.F) {
	j := sampleJournal()
	f.Add("acc-1", j.Encode())
	f.Add("acc-1", (&statestore.Journal{}).Encode())
	f.Add("x", (&statestore.Journal{Commands: j.Commands[2:]}).Encode())
	f.Add("", []byte{})
	f.Add("a", binary.AppendUvarint([]byte{1}, 1<<60))
	f.Add("a", append(binary.AppendUvarint([]byte{1}, 200), make([]byte, 200)...))
	f.Fuzz(func(t *testing.T, id string, b []byte) {
		var j statestore.Journal
		var err error
		checkAllocs(t, len(b)+len(id), func() { j, err = statestore.DecodeJournal(id, b) })
		if err != nil {
			return
		}
		for _, e := range j.Events {
			if e.EntityID != id || e.Version < 0 || e.SchemaVersion < 0 || e.Time.Location() != time.UTC {
				t.Fatalf("decoded an impossible event: %+v", e)
			}
		}
		for _, c := range j.Commands {
			if c.EntityID != id || c.From < 0 || c.To < 0 {
				t.Fatalf("decoded an impossible command: %+v", c)
			}
		}
		again, err := statestore.DecodeJournal(id, j.Encode())
		if err != nil {
			t.Fatalf("re-encoded journal does not decode: %v", err)
		}
		if !journalsEqual(j, again) {
			t.Fatalf("re-encoding changed the journal: %+v, then %+v", j, again)
		}
	})
}

func FuzzJournalRoundTrip(f *testing.F) {
	f.Add("acc-1", uint8(2), int64(4), "Deposited", uint16(1), "c-1", "corr", "cause", int64(1700000000000000999), []byte(`{"amount":5}`), uint8(3), int64(1700000002000000000), []byte{0})
	f.Add("", uint8(0), int64(0), "", uint16(0), "", "", "", int64(0), []byte(nil), uint8(0), int64(0), []byte(nil))
	f.Add("日本", uint8(1), int64(1<<62), "E", uint16(65535), "\xff", "", "", int64(-1), bytes.Repeat([]byte{0x80}, 300), uint8(1), int64(-7), []byte("trailing"))
	f.Fuzz(func(t *testing.T, id string, nEvents uint8, first int64, typ string, schema uint16, cmdID, corr, caus string, nanos int64, data []byte, nCommands uint8, at int64, extra []byte) {
		if first < 0 || first > 1<<62 {
			return // versions are never negative; leave room for the following ones
		}
		var want statestore.Journal
		for i := range int64(nEvents % 5) {
			v := first + i
			want.Events = append(want.Events, aggregate.Event{EntityID: id, Version: v, EventID: aggregate.EventID("t", id, v),
				Type: typ, SchemaVersion: int(schema), CommandID: cmdID, CorrelationID: corr, CausationID: caus,
				Time: time.Unix(0, nanos+i).UTC(), Data: data})
		}
		for i := range int64(nCommands % 5) {
			want.Commands = append(want.Commands, statestore.CommandRecord{CommandID: cmdID + string(rune('a'+i)), EntityID: id,
				From: first, To: first + i, At: at + i})
		}
		enc := want.Encode()
		got, err := statestore.DecodeJournal(id, enc)
		if err != nil {
			t.Fatalf("%+v: %v", want, err)
		}
		if !journalsEqual(want, got) {
			t.Fatalf("round trip: got %+v, want %+v", got, want)
		}
		if _, err := statestore.DecodeJournal(id, enc[:len(enc)-1]); err == nil {
			t.Fatal("a truncated journal decoded")
		}
		if len(extra) > 0 {
			if _, err := statestore.DecodeJournal(id, append(enc, extra...)); err == nil {
				t.Fatalf("a journal followed by % x decoded", extra)
			}
		}
	})
}

// journalsEqual compares journals field by field: times by instant, data
// by content (nil and empty are the same).
func journalsEqual(a, b statestore.Journal) bool {
	if len(a.Events) != len(b.Events) || len(a.Commands) != len(b.Commands) {
		return false
	}
	for i := range a.Events {
		x, y := a.Events[i], b.Events[i]
		if !x.Time.Equal(y.Time) || !bytes.Equal(x.Data, y.Data) {
			return false
		}
		x.Time, y.Time, x.Data, y.Data = time.Time{}, time.Time{}, nil, nil
		if !reflect.DeepEqual(x, y) {
			return false
		}
	}
	for i := range a.Commands {
		if a.Commands[i] != b.Commands[i] {
			return false
		}
	}
	return true
}
