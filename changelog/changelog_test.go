package changelog_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/changelog"
	"github.com/esker-io/esker/statestore"
)

func newStore(t *testing.T) *statestore.Store {
	t.Helper()
	s, err := statestore.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// apply stages records through Apply and commits them.
func apply(t *testing.T, s *statestore.Store, task statestore.Task, kvs ...[2][]byte) {
	t.Helper()
	b := s.NewBatch()
	for _, kv := range kvs {
		if err := changelog.Apply(b, task, kv[0], kv[1]); err != nil {
			b.Discard()
			t.Fatalf("Apply(%q): %v", kv[0], err)
		}
	}
	must(t, b.Commit())
}

func evs(id string, first int64, n int) []aggregate.Event {
	out := make([]aggregate.Event, n)
	for i := range out {
		v := first + int64(i)
		out[i] = aggregate.Event{
			EntityID: id, Version: v, EventID: aggregate.EventID("t", id, v), Type: "Deposited", SchemaVersion: 1,
			CommandID: fmt.Sprintf("cmd-%s-%d", id, v), Time: time.Unix(1700000000, v).UTC(),
			Data: []byte(fmt.Sprintf(`{"v":%d}`, v)),
		}
	}
	return out
}

// journal is what one transaction wrote for id: n events from first, each
// by its own command.
func journal(id string, first int64, n int) *statestore.Journal {
	j := &statestore.Journal{Events: evs(id, first, n)}
	for _, e := range j.Events {
		j.Commands = append(j.Commands, statestore.CommandRecord{CommandID: e.CommandID, EntityID: id, From: e.Version, To: e.Version, At: e.Time.UnixNano()})
	}
	return j
}

func journalKV(t *testing.T, id string, j *statestore.Journal) [2][]byte {
	t.Helper()
	k, v, err := changelog.JournalRecord(id, j)
	if err != nil {
		t.Fatal(err)
	}
	return [2][]byte{k, v}
}

func stateKV(id string, version int64, state string) [2][]byte {
	k, v := changelog.StateRecord(id, statestore.StateRecord{Version: version, UpdatedAt: time.Unix(1700000000, version).UTC(), State: []byte(state)})
	return [2][]byte{k, v}
}

func TestTopic(t *testing.T) {
	if got := changelog.Topic("app", "account"); got != "app-account-changelog" {
		t.Fatalf("Topic = %q", got)
	}
}

func TestStateRecord(t *testing.T) {
	rec := statestore.StateRecord{Version: 3, UpdatedAt: time.Unix(5, 6).UTC(), State: []byte("s")}
	k, v := changelog.StateRecord("acc-1", rec)
	if !bytes.Equal(k, statestore.StateKey("acc-1")) || !bytes.Equal(v, rec.Encode()) {
		t.Fatalf("StateRecord = %q, %q", k, v)
	}
}

func TestJournalRecord(t *testing.T) {
	j := journal("acc-1", 7, 3)
	k, v, err := changelog.JournalRecord("acc-1", j)
	if err != nil {
		t.Fatal(err)
	}
	if want := []byte("j\x00acc-1\x00\x00\x00\x00\x00\x00\x00\x00\x07"); !bytes.Equal(k, want) {
		t.Errorf("key %q, want %q", k, want)
	}
	if !bytes.Equal(k, statestore.JournalKey("acc-1", 7)) {
		t.Errorf("key %q is not JournalKey(id, first version)", k)
	}
	back, err := statestore.DecodeJournal("acc-1", v)
	if err != nil || len(back.Events) != 3 || back.Events[0].Version != 7 || len(back.Commands) != 3 {
		t.Fatalf("value does not decode to the journal: %+v, %v", back, err)
	}

	// Keys are unique per first version (compaction keeps every journal),
	// and per entity.
	keys := map[string]bool{string(k): true}
	for _, other := range []struct {
		id    string
		first int64
	}{{"acc-1", 8}, {"acc-1", 10}, {"acc-1", 1}, {"acc-2", 7}, {"acc-", 7}, {"acc-10", 7}} {
		k2, _, err := changelog.JournalRecord(other.id, journal(other.id, other.first, 1))
		if err != nil {
			t.Fatal(err)
		}
		if keys[string(k2)] {
			t.Errorf("duplicate journal key %q", k2)
		}
		keys[string(k2)] = true
	}

	// A journal of commands that wrote no event is keyed by the first
	// command's time.
	cj := &statestore.Journal{Commands: []statestore.CommandRecord{{CommandID: "c", EntityID: "acc-1", At: 1700000000000000000}, {CommandID: "d", At: 1}}}
	k, _, err = changelog.JournalRecord("acc-1", cj)
	if err != nil || !bytes.Equal(k, statestore.JournalKey("acc-1", 1700000000000000000)) {
		t.Errorf("commands-only journal key %q, %v", k, err)
	}

	if _, _, err := changelog.JournalRecord("acc-1", &statestore.Journal{}); err == nil || !strings.Contains(err.Error(), "empty journal") {
		t.Errorf("empty journal: err = %v", err)
	}
}

var task = statestore.Task{Type: "t", Partition: 3}

func TestApplyState(t *testing.T) {
	s := newStore(t)
	kv := stateKV("acc-1", 2, `{"b":1}`)
	apply(t, s, task, kv)
	v, ok, err := s.Get(task, statestore.StateKey("acc-1"))
	if err != nil || !ok || !bytes.Equal(v, kv[1]) {
		t.Fatalf("state after Apply: %q, %v, %v", v, ok, err)
	}
	rec, err := statestore.DecodeStateRecord(v)
	if err != nil || rec.Version != 2 || string(rec.State) != `{"b":1}` {
		t.Fatalf("decoded state: %+v, %v", rec, err)
	}
	// A newer record replaces it; a tombstone (nil value) deletes it.
	apply(t, s, task, stateKV("acc-1", 3, `{"b":2}`))
	if v, _, _ := s.Get(task, statestore.StateKey("acc-1")); !bytes.Contains(v, []byte(`{"b":2}`)) {
		t.Fatalf("state not replaced: %q", v)
	}
	apply(t, s, task, [2][]byte{statestore.StateKey("acc-1"), nil})
	if _, ok, _ := s.Get(task, statestore.StateKey("acc-1")); ok {
		t.Fatal("tombstone did not delete the state")
	}
	// A tombstone for an absent key is fine.
	apply(t, s, task, [2][]byte{statestore.StateKey("never"), nil})
	// Nothing leaked into another task.
	if _, ok, _ := s.Get(statestore.Task{Type: "t", Partition: 4}, statestore.StateKey("acc-1")); ok {
		t.Fatal("state written to another task")
	}
}

func TestApplyJournal(t *testing.T) {
	s := newStore(t)
	j1, j2 := journal("acc-1", 1, 2), journal("acc-1", 3, 1)
	kv1, kv2 := journalKV(t, "acc-1", j1), journalKV(t, "acc-1", j2)
	apply(t, s, task, kv1, kv2, journalKV(t, "acc-10", journal("acc-10", 1, 1)))

	// The journal is stored verbatim under its key...
	v, ok, err := s.Get(task, kv1[0])
	if err != nil || !ok || !bytes.Equal(v, kv1[1]) {
		t.Fatalf("journal at %q: %v, %v", kv1[0], ok, err)
	}
	// ...so its events are the entity's stream...
	got, err := s.Events(task, "acc-1", 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := append(append([]aggregate.Event{}, j1.Events...), j2.Events...)
	if len(got) != len(want) {
		t.Fatalf("events: got %d, want %d", len(got), len(want))
	}
	for i := range got {
		if got[i].Version != want[i].Version || got[i].EventID != want[i].EventID || got[i].EntityID != "acc-1" ||
			!bytes.Equal(got[i].Data, want[i].Data) || !got[i].Time.Equal(want[i].Time) {
			t.Errorf("event %d: got %+v, want %+v", i, got[i], want[i])
		}
	}
	// ...and each command's outcome lands at its CommandKey.
	for _, c := range append(append([]statestore.CommandRecord{}, j1.Commands...), j2.Commands...) {
		v, ok, err := s.Get(task, statestore.CommandKey(c.CommandID))
		if err != nil || !ok {
			t.Fatalf("command %s: %v, %v", c.CommandID, ok, err)
		}
		rec, err := statestore.DecodeCommandRecord(v)
		if err != nil || rec != c {
			t.Errorf("command %s: got %+v, %v; want %+v", c.CommandID, rec, err, c)
		}
	}
	// The entity id of an event comes from the key: "acc-10" stays apart.
	if got, _ := s.Events(task, "acc-10", 1, 0); len(got) != 1 || got[0].EntityID != "acc-10" {
		t.Errorf("acc-10 events: %+v", got)
	}

	// A journal tombstone deletes the journal.
	apply(t, s, task, [2][]byte{kv2[0], nil})
	if got, _ := s.Events(task, "acc-1", 1, 0); len(got) != 2 {
		t.Errorf("after journal tombstone: %d events, want 2", len(got))
	}
}

func TestApplyCommandsOnlyJournal(t *testing.T) {
	s := newStore(t)
	cj := &statestore.Journal{Commands: []statestore.CommandRecord{{CommandID: "noop-1", EntityID: "acc-1", At: 1700000000000000000}}}
	apply(t, s, task, journalKV(t, "acc-1", journal("acc-1", 1, 1)), journalKV(t, "acc-1", cj))
	v, ok, err := s.Get(task, statestore.CommandKey("noop-1"))
	if err != nil || !ok {
		t.Fatalf("command of a journal without events: %v, %v", ok, err)
	}
	if rec, err := statestore.DecodeCommandRecord(v); err != nil || rec != cj.Commands[0] {
		t.Fatalf("got %+v, %v", rec, err)
	}
	if got, err := s.Events(task, "acc-1", 1, 0); err != nil || len(got) != 1 {
		t.Fatalf("events: %d, %v; want 1", len(got), err)
	}
}

func TestStageJournalMatchesApply(t *testing.T) {
	// The write path stages a journal from memory with StageJournal; restore
	// goes through Apply. Both must leave the same keys and values.
	j := journal("acc-1", 4, 2)
	kv := journalKV(t, "acc-1", j)
	a, b := newStore(t), newStore(t)
	apply(t, a, task, kv)
	batch := b.NewBatch()
	must(t, changelog.StageJournal(batch, task, kv[0], kv[1], j))
	must(t, batch.Commit())
	keys := [][]byte{kv[0]}
	for _, c := range j.Commands {
		keys = append(keys, statestore.CommandKey(c.CommandID))
	}
	for _, k := range keys {
		va, oka, _ := a.Get(task, k)
		vb, okb, _ := b.Get(task, k)
		if !oka || !okb || !bytes.Equal(va, vb) {
			t.Errorf("key %q: Apply %q (%v), StageJournal %q (%v)", k, va, oka, vb, okb)
		}
	}
}

func TestApplyErrors(t *testing.T) {
	good := journalKV(t, "acc-1", journal("acc-1", 1, 1))
	cases := []struct {
		name   string
		key    []byte
		value  []byte
		errHas string
	}{
		{"empty key", nil, []byte("x"), "malformed key"},
		{"one byte key", []byte("s"), []byte("x"), "malformed key"},
		{"no separator", []byte("sacc-1"), []byte("x"), "malformed key"},
		{"unknown kind", []byte("x\x00acc-1"), []byte("x"), "unknown record kind"},
		{"command key", statestore.CommandKey("c-1"), []byte("x"), "unknown record kind"},
		{"checkpoint key", []byte("m\x00checkpoint"), []byte("12345678"), "malformed metadata record"},
		{"command offset of the wrong size", []byte("m\x00commands"), []byte("x"), "malformed metadata record"},
		{"journal key too short", []byte("j\x00a\x00\x01"), good[1], "malformed journal key"},
		{"journal key without separator", []byte("j\x00acc-1X\x00\x00\x00\x00\x00\x00\x00\x01"), good[1], "malformed journal key"},
		{"corrupt journal", good[0], []byte("not a journal"), "journal"},
		{"old JSON journal", good[0], []byte(`{"events":[],"commands":[]}`), "journal"},
		{"truncated journal", good[0], good[1][:len(good[1])-1], "journal"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := newStore(t)
			b := s.NewBatch()
			defer b.Discard()
			err := changelog.Apply(b, task, c.key, c.value)
			if err == nil {
				t.Fatalf("Apply(%q, %q): no error", c.key, c.value)
			}
			if !strings.Contains(err.Error(), c.errHas) || !strings.Contains(err.Error(), task.String()) {
				t.Fatalf("error %q: want it to mention %q and the task", err, c.errHas)
			}
			if b.Len() != 0 {
				t.Fatalf("failed Apply staged %d writes", b.Len())
			}
		})
	}
}

// TestApplyRejectsJournalOfInvalidEntityID: a journal key whose entity id
// holds a 0x00 lies in the key range of another entity's journals ("a\x00b"
// sorts among "a"'s), so applying it would put its events in that entity's
// stream. Apply refuses journal keys of ids the write path cannot produce.
// Found by FuzzApply.
func TestApplyRejectsJournalOfInvalidEntityID(t *testing.T) {
	s := newStore(t)
	apply(t, s, task, journalKV(t, "a", journal("a", 1, 2)))
	forged := journal("x", 7, 1)
	forged.Events[0].Type = "Forged"
	b := s.NewBatch()
	defer b.Discard()
	if err := changelog.Apply(b, task, statestore.JournalKey("a\x00b", 7), forged.Encode()); err == nil {
		must(t, b.Commit())
	} else if !strings.Contains(err.Error(), "entity id") {
		t.Fatalf("error %q does not mention the entity id", err)
	}
	got, err := s.Events(task, "a", 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range got {
		if e.Type == "Forged" {
			t.Fatalf("a journal of entity %q is in the stream of %q: %+v", "a\x00b", "a", got)
		}
	}
	if len(got) != 2 {
		t.Fatalf("%d events of a, want 2", len(got))
	}
	for _, id := range []string{"", "a\x00b", "\xff", "tab\there"} {
		b := s.NewBatch()
		if err := changelog.Apply(b, task, statestore.JournalKey(id, 1), forged.Encode()); err == nil {
			t.Errorf("Apply of a journal of the invalid entity id %q: no error", id)
		}
		b.Discard()
	}
}

// TestApplyStateVersion: the state version travels on the changelog; the
// newest record wins, and a store without one reads version 1.
func TestApplyStateVersion(t *testing.T) {
	s := newStore(t)
	task := statestore.Task{Type: "account", Partition: 1}
	if v, err := s.StateVersion(task); err != nil || v != 1 {
		t.Fatalf("no state version recorded: %d, %v; want 1", v, err)
	}
	b := s.NewBatch()
	for _, v := range []uint64{0, 3} {
		if err := changelog.Apply(b, task, statestore.StateVersionKey, binary.BigEndian.AppendUint64(nil, v)); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	if v, err := s.StateVersion(task); err != nil || v != 3 {
		t.Fatalf("state version %d, %v; want 3", v, err)
	}
	b = s.NewBatch()
	defer b.Discard()
	if err := changelog.Apply(b, task, statestore.StateVersionKey, []byte{1, 2}); err == nil {
		t.Error("a malformed state version was applied")
	}
}
