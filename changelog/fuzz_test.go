package changelog

import (
	"bytes"
	"encoding/binary"
	"testing"
	"time"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/statestore"
)

// A restore and a standby apply whatever the changelog topics hold, and any
// client with write access can produce to them. FuzzApply checks that Apply
// never panics on any key and value, stages nothing when it fails, and only
// accepts what the write path could have produced; FuzzJournalRecord checks
// that what the write path produces is applied as it was written.

var fuzzTask = statestore.Task{Type: "account", Partition: 3}

func openFuzzStore(f *testing.F) *statestore.Store {
	s, err := statestore.Open(f.TempDir())
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = s.Close() })
	return s
}

func sampleJournal(id string) *statestore.Journal {
	return &statestore.Journal{
		Events: []aggregate.Event{{EntityID: id, Version: 4, EventID: aggregate.EventID("account", id, 4), Type: "Deposited",
			SchemaVersion: 1, CommandID: "c-1", Time: time.Unix(1700000000, 999).UTC(), Data: []byte(`{"amount":5}`)}},
		Commands: []statestore.CommandRecord{{CommandID: "c-1", EntityID: id, From: 4, To: 4, At: 1700000000000000999}},
	}
}

func FuzzApply(f *testing.F) {
	s := openFuzzStore(f)
	stateKey, stateValue := StateRecord("acc-1", statestore.StateRecord{Version: 3, UpdatedAt: time.Unix(5, 6).UTC(), State: []byte(`{"b":1}`)})
	journalKey, journalValue, err := JournalRecord("acc-1", sampleJournal("acc-1"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(stateKey, stateValue, false)
	f.Add(stateKey, []byte(nil), true)
	f.Add(journalKey, journalValue, false)
	f.Add(journalKey, []byte(nil), true)
	f.Add(journalKey, journalValue[:len(journalValue)-1], false)
	f.Add([]byte("j\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01"), journalValue, false)       // empty entity id
	f.Add([]byte("j\x00a\x00b\x00\x00\x00\x00\x00\x00\x00\x00\x04"), journalValue, false) // 0x00 in the entity id
	f.Add([]byte("j\x00\xff\x00\x00\x00\x00\x00\x00\x00\x00\x04"), journalValue, false)   // invalid UTF-8
	f.Add([]byte("c\x00c-1"), []byte("x"), false)
	f.Add([]byte{}, []byte{}, false)
	f.Fuzz(func(t *testing.T, key, value []byte, tombstone bool) {
		if tombstone {
			value = nil
		}
		b := s.NewBatch()
		defer b.Discard()
		err := Apply(b, fuzzTask, key, value)
		if err != nil {
			if b.Len() != 0 {
				t.Fatalf("a failed Apply staged %d writes", b.Len())
			}
			return
		}
		switch {
		case len(key) < 2 || key[1] != 0:
			t.Fatalf("applied the malformed key %q", key)
		case key[0] == statestore.KindState || key[0] == statestore.KindRow || value == nil:
			if b.Len() != 1 {
				t.Fatalf("a state record, row or tombstone staged %d writes", b.Len())
			}
		case key[0] == statestore.KindMeta:
			// Only the command offset and a projection's input offsets
			// travel on a changelog, as 8-byte offsets.
			if !bytes.Equal(key, statestore.CommandOffsetKey) && !statestore.IsInputOffsetKey(key) || len(value) != 8 || b.Len() != 1 {
				t.Fatalf("applied the metadata record %q = %q (%d writes)", key, value, b.Len())
			}
		case key[0] == statestore.KindJournal:
			id, ok := journalEntity(key)
			if !ok {
				t.Fatalf("applied the malformed journal key %q", key)
			}
			// The write path only writes journals of valid entities, and
			// an id with a 0x00 would put its journals in the key range
			// of another entity's stream.
			if err := aggregate.ValidateEntityID(id); err != nil {
				t.Fatalf("applied a journal of the invalid entity id %q: %v", id, err)
			}
			if want := statestore.JournalKey(id, int64(binary.BigEndian.Uint64(key[len(key)-8:]))); !bytes.Equal(key, want) {
				t.Fatalf("journal key %q is not JournalKey(%q, …) = %q", key, id, want)
			}
			j, err := statestore.DecodeJournal(id, value)
			if err != nil {
				t.Fatalf("applied a journal that does not decode: %v", err)
			}
			if b.Len() != 1+len(j.Commands) {
				t.Fatalf("a journal of %d commands staged %d writes", len(j.Commands), b.Len())
			}
		default:
			t.Fatalf("applied a record of kind %q", key[0])
		}
	})
}

func FuzzJournalRecord(f *testing.F) {
	s := openFuzzStore(f)
	f.Add("acc-1", int64(4), uint8(2), "Deposited", []byte(`{"amount":5}`), uint8(1), int64(1700000000000000999))
	f.Add("acc-1", int64(0), uint8(0), "", []byte(nil), uint8(1), int64(1700000000000000999)) // commands only
	f.Add("日本 x/y", int64(1<<62), uint8(1), "\xff", []byte{0}, uint8(0), int64(-1))
	f.Add("a", int64(1), uint8(0), "", []byte(nil), uint8(0), int64(0)) // empty journal
	f.Fuzz(func(t *testing.T, id string, first int64, nEvents uint8, typ string, data []byte, nCommands uint8, at int64) {
		if aggregate.ValidateEntityID(id) != nil || first < 0 || first > 1<<62 {
			return // the write path only writes valid entities and versions
		}
		j := &statestore.Journal{}
		for i := range int64(nEvents % 4) {
			v := first + i
			j.Events = append(j.Events, aggregate.Event{EntityID: id, Version: v, EventID: aggregate.EventID("account", id, v),
				Type: typ, SchemaVersion: 1, Time: time.Unix(0, at+i).UTC(), Data: data})
		}
		for i := range int64(nCommands % 4) {
			j.Commands = append(j.Commands, statestore.CommandRecord{CommandID: id + "-" + string(rune('a'+i)), EntityID: id,
				From: first, To: first + i, At: at + i})
		}
		key, value, err := JournalRecord(id, j)
		if len(j.Events) == 0 && len(j.Commands) == 0 {
			if err == nil {
				t.Fatal("an empty journal has a record")
			}
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		if got, ok := journalEntity(key); !ok || got != id {
			t.Fatalf("journal key %q names entity %q (%v), want %q", key, got, ok, id)
		}
		b := s.NewBatch()
		defer b.Discard()
		if err := Apply(b, fuzzTask, key, value); err != nil {
			t.Fatalf("Apply of a journal the write path produced: %v", err)
		}
		if b.Len() != 1+len(j.Commands) {
			t.Fatalf("a journal of %d commands staged %d writes", len(j.Commands), b.Len())
		}
		back, err := statestore.DecodeJournal(id, value)
		if err != nil || len(back.Events) != len(j.Events) || len(back.Commands) != len(j.Commands) {
			t.Fatalf("journal value decodes to %+v, %v", back, err)
		}
		for i, e := range back.Events {
			w := j.Events[i]
			if e.Version != w.Version || e.EventID != w.EventID || e.Type != w.Type || !e.Time.Equal(w.Time) || !bytes.Equal(e.Data, w.Data) {
				t.Fatalf("event %d: got %+v, want %+v", i, e, w)
			}
		}
		for i, c := range back.Commands {
			if c != j.Commands[i] {
				t.Fatalf("command %d: got %+v, want %+v", i, c, j.Commands[i])
			}
		}
	})
}
