package statestore_test

import (
	"testing"

	"github.com/esker-io/esker/statestore"
)

func TestSweepCommands(t *testing.T) {
	s, err := statestore.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	task := statestore.Task{Type: "acct", Partition: 1}
	other := statestore.Task{Type: "acct", Partition: 2}
	b := s.NewBatch()
	for i, at := range []int64{100, 200, 300, 400} {
		rec := statestore.CommandRecord{CommandID: string(rune('a' + i)), EntityID: "e", At: at}
		if err := b.Set(task, statestore.CommandKey(rec.CommandID), rec.Encode()); err != nil {
			t.Fatal(err)
		}
		if err := b.Set(other, statestore.CommandKey(rec.CommandID), rec.Encode()); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	// Older than 300: a and b. Scanning 1 record per call takes 4 calls
	// to reach the end, resuming each time where the last one stopped.
	total, resume, calls := 0, "", 0
	for {
		n, next, err := s.SweepCommands(task, 300, 1, resume)
		if err != nil {
			t.Fatal(err)
		}
		total += n
		calls++
		if next == "" {
			break
		}
		if calls > 10 {
			t.Fatal("the sweep does not progress")
		}
		resume = next
	}
	if total != 2 || calls != 4 {
		t.Fatalf("deleted %d in %d calls, want 2 in 4", total, calls)
	}
	found, err := s.Commands(task, []string{"a", "b", "c", "d"})
	if err != nil || len(found) != 2 || found["c"] == nil || found["d"] == nil {
		t.Fatalf("after sweeping: %v %v", found, err)
	}
	if found, _ := s.Commands(other, []string{"a", "b", "c", "d"}); len(found) != 4 {
		t.Fatalf("sweeping one task touched another: %d left", len(found))
	}
}
