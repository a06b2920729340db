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
	// Older than 300: a and b; the limit makes it take two calls.
	n, more, err := s.SweepCommands(task, 300, 1)
	if err != nil || n != 1 || !more {
		t.Fatalf("first sweep: %d %v %v", n, more, err)
	}
	n, more, err = s.SweepCommands(task, 300, 10)
	if err != nil || n != 1 || more {
		t.Fatalf("second sweep: %d %v %v", n, more, err)
	}
	found, err := s.Commands(task, []string{"a", "b", "c", "d"})
	if err != nil || len(found) != 2 || found["c"] == nil || found["d"] == nil {
		t.Fatalf("after sweeping: %v %v", found, err)
	}
	if found, _ := s.Commands(other, []string{"a", "b", "c", "d"}); len(found) != 4 {
		t.Fatalf("sweeping one task touched another: %d left", len(found))
	}
}
