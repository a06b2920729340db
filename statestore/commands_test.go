package statestore_test

import (
	"testing"

	"github.com/esker-io/esker/statestore"
)

func TestCommandsLookup(t *testing.T) {
	s := newStore(t)
	commit(t, s, func(b *statestore.Batch) {
		for _, id := range []string{"c", "c1", "c10", "x y"} {
			must(t, b.Set(acct0, statestore.CommandKey(id), []byte("v-"+id)))
		}
		must(t, b.Set(acct1, statestore.CommandKey("other"), []byte("v-other")))
		// Neighbouring kinds that must not be mistaken for commands.
		must(t, b.Set(acct0, statestore.StateKey("c2"), []byte("state")))
		must(t, b.SetCheckpoint(acct0, 3))
	})

	if got, err := s.Commands(acct0, nil); err != nil || len(got) != 0 {
		t.Fatalf("no ids: %v, %v", got, err)
	}
	got, err := s.Commands(acct0, []string{"c10", "missing", "c", "c2", "c10", "other", "x y", "c1x"})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"c": "v-c", "c10": "v-c10", "x y": "v-x y"}
	if len(got) != len(want) {
		t.Fatalf("found %v, want %v", keysOf(got), want)
	}
	for id, v := range want {
		if string(got[id]) != v {
			t.Errorf("%q: %q, want %q", id, got[id], v)
		}
	}
	// Values are copies: mutating one does not change the store.
	got["c"][0] = 'X'
	if again, _ := s.Commands(acct0, []string{"c"}); string(again["c"]) != "v-c" {
		t.Fatalf("Commands returned a slice aliasing the store: %q", again["c"])
	}
	if got, err := s.Commands(acct0, []string{"nope", "also-nope"}); err != nil || len(got) != 0 {
		t.Fatalf("only absent ids: %v, %v", got, err)
	}
	if got, err := s.Commands(acct1, []string{"c", "other"}); err != nil || len(got) != 1 || string(got["other"]) != "v-other" {
		t.Fatalf("other task: %v, %v", keysOf(got), err)
	}
}

func keysOf(m map[string][]byte) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
