package statestore_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/statestore"
)

func openStore(t *testing.T, dir string) *statestore.Store {
	t.Helper()
	s, err := statestore.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func newStore(t *testing.T) *statestore.Store {
	t.Helper()
	s := openStore(t, t.TempDir())
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func commit(t *testing.T, s *statestore.Store, fn func(b *statestore.Batch)) {
	t.Helper()
	b := s.NewBatch()
	fn(b)
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func get(t *testing.T, s *statestore.Store, task statestore.Task, key []byte) (string, bool) {
	t.Helper()
	v, ok, err := s.Get(task, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(v), ok
}

var (
	acct0 = statestore.Task{Type: "acct", Partition: 0}
	acct1 = statestore.Task{Type: "acct", Partition: 1}
)

func TestOpenErrors(t *testing.T) {
	file := filepath.Join(t.TempDir(), "not-a-dir")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := statestore.Open(file)
	if err == nil || !strings.Contains(err.Error(), "statestore: open") {
		t.Fatalf("Open on a file: err = %v", err)
	}
}

func TestTaskPrefix(t *testing.T) {
	got := statestore.Task{Type: "acct", Partition: 258}.Prefix()
	want := []byte("t\x00acct\x00\x00\x00\x01\x02\x00")
	if !bytes.Equal(got, want) {
		t.Errorf("Prefix() = %q, want %q", got, want)
	}
	if s := (statestore.Task{Type: "acct", Partition: 3}).String(); s != "acct/3" {
		t.Errorf("String() = %q", s)
	}
}

func TestKeys(t *testing.T) {
	cases := []struct {
		got, want []byte
	}{
		{statestore.StateKey("a b"), []byte("s\x00a b")},
		{statestore.CommandKey("c-1"), []byte("c\x00c-1")},
		{statestore.JournalKey("acc", 258), []byte("j\x00acc\x00\x00\x00\x00\x00\x00\x00\x01\x02")},
	}
	for _, c := range cases {
		if !bytes.Equal(c.got, c.want) {
			t.Errorf("key %q, want %q", c.got, c.want)
		}
	}
	// Journal keys of one entity sort by first version.
	if bytes.Compare(statestore.JournalKey("a", 255), statestore.JournalKey("a", 256)) >= 0 {
		t.Error("journal keys do not sort by version")
	}
}

func TestBatchVisibility(t *testing.T) {
	s := newStore(t)
	k := statestore.StateKey("e1")

	b := s.NewBatch()
	must(t, b.Set(acct0, k, []byte("v1")))
	must(t, b.Set(acct1, k, []byte("other")))
	if b.Len() != 2 {
		t.Errorf("Len() = %d, want 2", b.Len())
	}
	if _, ok := get(t, s, acct0, k); ok {
		t.Fatal("staged write visible before Commit")
	}
	must(t, b.Commit())
	if v, ok := get(t, s, acct0, k); !ok || v != "v1" {
		t.Fatalf("after Commit: %q, %v", v, ok)
	}
	if v, ok := get(t, s, acct1, k); !ok || v != "other" {
		t.Fatalf("other task after Commit: %q, %v", v, ok)
	}

	// Discard drops everything staged.
	b = s.NewBatch()
	must(t, b.Set(acct0, k, []byte("v2")))
	must(t, b.Delete(acct1, k))
	must(t, b.SetCheckpoint(acct0, 99))
	b.Discard()
	if v, _ := get(t, s, acct0, k); v != "v1" {
		t.Fatalf("discarded Set visible: %q", v)
	}
	if _, ok := get(t, s, acct1, k); !ok {
		t.Fatal("discarded Delete applied")
	}
	if cp, err := s.Checkpoint(acct0); err != nil || cp != 0 {
		t.Fatalf("discarded checkpoint: %d, %v", cp, err)
	}

	// Delete and overwrite in one batch; later writes in a batch win.
	b = s.NewBatch()
	must(t, b.Delete(acct1, k))
	must(t, b.Set(acct0, k, []byte("v2")))
	must(t, b.Set(acct0, k, []byte("v3")))
	if _, ok := get(t, s, acct1, k); !ok {
		t.Fatal("staged Delete visible before Commit")
	}
	must(t, b.Commit())
	if _, ok := get(t, s, acct1, k); ok {
		t.Fatal("Delete not applied")
	}
	if v, _ := get(t, s, acct0, k); v != "v3" {
		t.Fatalf("last write in batch: got %q, want v3", v)
	}

	// Deleting an absent key is fine; an empty batch commits.
	commit(t, s, func(b *statestore.Batch) { must(t, b.Delete(acct0, statestore.StateKey("never"))) })
	commit(t, s, func(*statestore.Batch) {})
}

func TestGetReturnsCopy(t *testing.T) {
	s := newStore(t)
	k := statestore.StateKey("e")
	commit(t, s, func(b *statestore.Batch) { must(t, b.Set(acct0, k, []byte("abc"))) })
	v, _, _ := s.Get(acct0, k)
	v[0] = 'X'
	if got, _ := get(t, s, acct0, k); got != "abc" {
		t.Fatalf("Get returned a slice aliasing the store: %q", got)
	}
	// The value passed to Set may be reused after Set returns.
	val := []byte("def")
	commit(t, s, func(b *statestore.Batch) {
		must(t, b.Set(acct0, k, val))
		val[0] = 'Y'
	})
	if got, _ := get(t, s, acct0, k); got != "def" {
		t.Fatalf("Set kept a reference to the caller's slice: %q", got)
	}
}

func TestCheckpoint(t *testing.T) {
	s := newStore(t)
	if cp, err := s.Checkpoint(acct0); err != nil || cp != 0 {
		t.Fatalf("default checkpoint: %d, %v; want 0", cp, err)
	}
	for _, v := range []int64{1, 12345, 1 << 40} {
		commit(t, s, func(b *statestore.Batch) { must(t, b.SetCheckpoint(acct0, v)) })
		if cp, err := s.Checkpoint(acct0); err != nil || cp != v {
			t.Fatalf("checkpoint: %d, %v; want %d", cp, err, v)
		}
	}
	if cp, _ := s.Checkpoint(acct1); cp != 0 {
		t.Fatalf("checkpoint leaked to another task: %d", cp)
	}
	// The checkpoint lives at 'm' 0x00 "checkpoint"; a value of the wrong
	// length is reported, not misread.
	commit(t, s, func(b *statestore.Batch) { must(t, b.Set(acct1, []byte("m\x00checkpoint"), []byte{1, 2, 3})) })
	if _, err := s.Checkpoint(acct1); err == nil || !strings.Contains(err.Error(), "corrupt checkpoint") {
		t.Fatalf("corrupt checkpoint: err = %v", err)
	}
}

// events builds n events of id starting at version first.
func events(id string, first int64, n int) []aggregate.Event {
	out := make([]aggregate.Event, n)
	for i := range out {
		v := first + int64(i)
		out[i] = aggregate.Event{
			EntityID: id, Version: v, EventID: aggregate.EventID("acct", id, v), Type: "Deposited",
			SchemaVersion: 1, CommandID: fmt.Sprintf("%s-cmd-%d", id, v),
			Time: time.Unix(1700000000, v).UTC(), Data: []byte(fmt.Sprintf(`{"id":%q,"v":%d}`, id, v)),
		}
	}
	return out
}

// putJournals stores journals of the given sizes for id in task, as the
// write path does: one per transaction, keyed by its first version.
func putJournals(t *testing.T, s *statestore.Store, task statestore.Task, id string, sizes ...int) []aggregate.Event {
	t.Helper()
	var all []aggregate.Event
	v := int64(1)
	commit(t, s, func(b *statestore.Batch) {
		for _, n := range sizes {
			evs := events(id, v, n)
			j := statestore.Journal{Events: evs, Commands: []statestore.CommandRecord{{CommandID: evs[0].CommandID, EntityID: id, From: v, To: v + int64(n) - 1, At: 1}}}
			must(t, b.Set(task, statestore.JournalKey(id, v), j.Encode()))
			all = append(all, evs...)
			v += int64(n)
		}
	})
	return all
}

func versions(evs []aggregate.Event) []int64 {
	out := make([]int64, len(evs))
	for i, e := range evs {
		out[i] = e.Version
	}
	return out
}

func sameEvents(t *testing.T, got, want []aggregate.Event) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got versions %v, want %v", versions(got), versions(want))
	}
	for i := range got {
		g, w := got[i], want[i]
		if g.EntityID != w.EntityID || g.Version != w.Version || g.EventID != w.EventID || g.Type != w.Type ||
			g.SchemaVersion != w.SchemaVersion || g.CommandID != w.CommandID || !g.Time.Equal(w.Time) ||
			!bytes.Equal(g.Data, w.Data) {
			t.Fatalf("event %d:\n got %+v\nwant %+v", i, g, w)
		}
	}
}

func readEvents(t *testing.T, s *statestore.Store, task statestore.Task, id string, from int64, limit int) []aggregate.Event {
	t.Helper()
	evs, err := s.Events(task, id, from, limit)
	if err != nil {
		t.Fatal(err)
	}
	return evs
}

func TestEventsOrderFromLimit(t *testing.T) {
	s := newStore(t)
	// Journals [1..3] [4] [5..6] [7..10].
	all := putJournals(t, s, acct0, "a", 3, 1, 2, 4)
	// A journal without events (its commands wrote none), keyed by time.
	commit(t, s, func(b *statestore.Batch) {
		j := statestore.Journal{Commands: []statestore.CommandRecord{{CommandID: "noop", EntityID: "a", At: 1700000000000000000}}}
		must(t, b.Set(acct0, statestore.JournalKey("a", 1700000000000000000), j.Encode()))
	})

	sameEvents(t, readEvents(t, s, acct0, "a", 1, 0), all)
	sameEvents(t, readEvents(t, s, acct0, "a", 0, 0), all)
	sameEvents(t, readEvents(t, s, acct0, "a", -1, 0), all)
	sameEvents(t, readEvents(t, s, acct0, "a", 1, -1), all)
	cases := []struct {
		from  int64
		limit int
		want  []int64
	}{
		{2, 0, []int64{2, 3, 4, 5, 6, 7, 8, 9, 10}}, // inside the first journal
		{3, 2, []int64{3, 4}},                       // across a journal boundary
		{4, 1, []int64{4}},                          // a journal's first version
		{5, 0, []int64{5, 6, 7, 8, 9, 10}},
		{6, 3, []int64{6, 7, 8}},
		{9, 10, []int64{9, 10}},
		{10, 0, []int64{10}},
		{11, 0, nil}, // past the end
		{1 << 62, 0, nil},
		{1, 1, []int64{1}},
		{1, 10, []int64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}},
	}
	for _, c := range cases {
		got := readEvents(t, s, acct0, "a", c.from, c.limit)
		if fmt.Sprint(versions(got)) != fmt.Sprint(c.want) {
			t.Errorf("Events(from=%d, limit=%d) = %v, want %v", c.from, c.limit, versions(got), c.want)
		}
		for _, e := range got {
			if e.EntityID != "a" {
				t.Errorf("event entity id %q, want a", e.EntityID)
			}
		}
	}
	if got := readEvents(t, s, acct0, "nobody", 1, 0); len(got) != 0 {
		t.Errorf("unknown entity: %v", versions(got))
	}
}

// Store.Events documents "version ≥ from"; for from ≤ -2 the seek key
// JournalKey(id, from+1) wraps to a huge unsigned version and the iterator
// starts at the entity's last journal, skipping the earlier ones.
func TestEventsNegativeFrom(t *testing.T) {
	s := newStore(t)
	all := putJournals(t, s, acct0, "a", 2, 2)
	sameEvents(t, readEvents(t, s, acct0, "a", -5, 0), all)
}

func TestEventsEntityIsolation(t *testing.T) {
	s := newStore(t)
	// Entity ids that are prefixes of one another, and one that sorts between
	// "a" and "ab" byte-wise (space is 0x20).
	ids := []string{"a", "ab", "a b", "a-", "b"}
	want := map[string][]aggregate.Event{}
	for i, id := range ids {
		sizes := []int{1 + i, 2}
		want[id] = putJournals(t, s, acct0, id, sizes...)
	}
	for _, id := range ids {
		sameEvents(t, readEvents(t, s, acct0, id, 1, 0), want[id])
		// Seeking past the end of one entity never lands in its neighbour.
		if got := readEvents(t, s, acct0, id, 100, 0); len(got) != 0 {
			t.Errorf("%q from 100: %v", id, versions(got))
		}
		last := want[id][len(want[id])-1].Version
		sameEvents(t, readEvents(t, s, acct0, id, last, 0), want[id][len(want[id])-1:])
	}
}

func TestEventsTaskIsolation(t *testing.T) {
	s := newStore(t)
	tasks := []statestore.Task{
		{Type: "acct", Partition: 0},
		{Type: "acct", Partition: 1},
		{Type: "acct", Partition: 256}, // differs from 1 only in another byte
		{Type: "acct-x", Partition: 0}, // type with "acct" as prefix
		{Type: "ac", Partition: 0},
	}
	want := map[statestore.Task][]aggregate.Event{}
	for i, task := range tasks {
		want[task] = putJournals(t, s, task, "same-id", i+1)
	}
	for _, task := range tasks {
		sameEvents(t, readEvents(t, s, task, "same-id", 1, 0), want[task])
	}
	if got := readEvents(t, s, statestore.Task{Type: "acct", Partition: 2}, "same-id", 1, 0); len(got) != 0 {
		t.Errorf("empty task: %v", versions(got))
	}
}

func TestEventsDataNotAliased(t *testing.T) {
	s := newStore(t)
	all := putJournals(t, s, acct0, "a", 3)
	got := readEvents(t, s, acct0, "a", 1, 0)
	// Overwrite the journal many times: the returned data must stay intact.
	commit(t, s, func(b *statestore.Batch) {
		for i := 0; i < 100; i++ {
			must(t, b.Set(acct0, statestore.JournalKey("a", 1), bytes.Repeat([]byte{0xff}, 64)))
		}
	})
	sameEvents(t, got, all)
}

func TestEventsCorruptJournal(t *testing.T) {
	s := newStore(t)
	commit(t, s, func(b *statestore.Batch) {
		must(t, b.Set(acct0, statestore.JournalKey("a", 1), []byte("garbage")))
	})
	_, err := s.Events(acct0, "a", 1, 0)
	if err == nil || !strings.Contains(err.Error(), `"a"`) || !strings.Contains(err.Error(), "acct/0") {
		t.Fatalf("corrupt journal: err = %v, want one naming the task and entity", err)
	}
}

func TestDropTask(t *testing.T) {
	s := newStore(t)
	tasks := []statestore.Task{
		{Type: "acct", Partition: 0},
		{Type: "acct", Partition: 1},
		{Type: "acct", Partition: 256},
		{Type: "acct-x", Partition: 0},
		{Type: "ac", Partition: 0},
		{Type: "acct", Partition: -1},
	}
	commit(t, s, func(b *statestore.Batch) {
		for _, task := range tasks {
			must(t, b.Set(task, statestore.StateKey("e"), []byte(task.String())))
			must(t, b.Set(task, statestore.CommandKey("c"), []byte("x")))
			must(t, b.SetCheckpoint(task, 7))
		}
	})
	putJournals(t, s, tasks[0], "e", 2)
	if err := s.DropTask(tasks[0]); err != nil {
		t.Fatal(err)
	}

	if _, ok := get(t, s, tasks[0], statestore.StateKey("e")); ok {
		t.Error("dropped task: state still there")
	}
	if _, ok := get(t, s, tasks[0], statestore.CommandKey("c")); ok {
		t.Error("dropped task: command still there")
	}
	if got := readEvents(t, s, tasks[0], "e", 1, 0); len(got) != 0 {
		t.Errorf("dropped task: events %v", versions(got))
	}
	if cp, err := s.Checkpoint(tasks[0]); err != nil || cp != 0 {
		t.Errorf("dropped task: checkpoint %d, %v", cp, err)
	}
	for _, task := range tasks[1:] {
		if v, ok := get(t, s, task, statestore.StateKey("e")); !ok || v != task.String() {
			t.Errorf("task %s: state %q, %v after dropping %s", task, v, ok, tasks[0])
		}
		if _, ok := get(t, s, task, statestore.CommandKey("c")); !ok {
			t.Errorf("task %s: command gone", task)
		}
		if cp, _ := s.Checkpoint(task); cp != 7 {
			t.Errorf("task %s: checkpoint %d", task, cp)
		}
	}
	// Dropping an empty task is fine, and a dropped task can be written again.
	must(t, s.DropTask(statestore.Task{Type: "none", Partition: 3}))
	commit(t, s, func(b *statestore.Batch) { must(t, b.SetCheckpoint(tasks[0], 1)) })
	if cp, _ := s.Checkpoint(tasks[0]); cp != 1 {
		t.Errorf("re-written checkpoint %d", cp)
	}
}

func TestReopen(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	all := putJournals(t, s, acct0, "a", 2, 3)
	rec := statestore.StateRecord{Version: 5, UpdatedAt: time.Unix(1700000000, 42).UTC(), State: []byte(`{"b":1}`)}
	commit(t, s, func(b *statestore.Batch) {
		must(t, b.Set(acct0, statestore.StateKey("a"), rec.Encode()))
		must(t, b.SetCheckpoint(acct0, 17))
	})
	// Discarded writes never reach disk.
	b := s.NewBatch()
	must(t, b.Set(acct0, statestore.StateKey("ghost"), []byte("x")))
	b.Discard()
	must(t, s.Close())

	s = openStore(t, dir)
	defer s.Close()
	v, ok, err := s.Get(acct0, statestore.StateKey("a"))
	if err != nil || !ok {
		t.Fatalf("state after reopen: %v, %v", ok, err)
	}
	back, err := statestore.DecodeStateRecord(v)
	if err != nil || back.Version != 5 || !back.UpdatedAt.Equal(rec.UpdatedAt) || string(back.State) != `{"b":1}` {
		t.Fatalf("state after reopen: %+v, %v", back, err)
	}
	if cp, err := s.Checkpoint(acct0); err != nil || cp != 17 {
		t.Fatalf("checkpoint after reopen: %d, %v", cp, err)
	}
	sameEvents(t, readEvents(t, s, acct0, "a", 1, 0), all)
	if _, ok := get(t, s, acct0, statestore.StateKey("ghost")); ok {
		t.Fatal("discarded write visible after reopen")
	}
}
