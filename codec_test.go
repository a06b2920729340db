package esker_test

import (
	"bytes"
	"encoding/gob"
	"testing"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
)

// gobCodec is a non-JSON codec: event payloads and state snapshots travel
// and are stored as gob.
type gobCodec struct{}

func (gobCodec) Marshal(v any) ([]byte, error) {
	var b bytes.Buffer
	err := gob.NewEncoder(&b).Encode(v)
	return b.Bytes(), err
}
func (gobCodec) Unmarshal(data []byte, v any) error {
	return gob.NewDecoder(bytes.NewReader(data)).Decode(v)
}
func (gobCodec) ContentType() string { return "application/x-gob" }

type tally struct{ Total int }
type tallyCommand interface{ isTallyCommand() }
type Add struct{ N int }

func (Add) isTallyCommand() {}

type tallyEvent interface{ isTallyEvent() }
type Added struct{ N int }

func (Added) isTallyEvent() {}

// TestCustomCodec runs an aggregate whose events and state use gob through
// the write path, the store, the changelog restore and the HTTP API.
func TestCustomCodec(t *testing.T) {
	tallies := aggregate.New[tally, tallyCommand, tallyEvent]("tally",
		func(s tally, c tallyCommand) ([]tallyEvent, error) { return []tallyEvent{Added{c.(Add).N}}, nil },
		func(s tally, e tallyEvent) tally { s.Total += e.(Added).N; return s },
		aggregate.WithCodec(gobCodec{}),
	).Commands(Add{}).Events(Added{})

	c := newCluster(t)
	run := func(dir string) *testNode {
		return startTypesNode(t, c.ListenAddrs(), dir, []any{tallies},
			esker.ApplicationID("tallies"), esker.Partitions(2))
	}
	n := run(t.TempDir())
	for _, k := range []int{3, 4} {
		code, body := do(t, n, "POST", "/v1/aggregates/tally/t1/commands", cmd("Add", map[string]any{"N": k}))
		mustStatus(t, 200, code, body, "add")
	}
	check := func(n *testNode) {
		t.Helper()
		code, body := do(t, n, "GET", "/v1/aggregates/tally/t1", nil)
		if code != 200 || body["state"].(map[string]any)["Total"].(float64) != 7 {
			t.Fatalf("state: %d %v", code, body)
		}
		code, body = do(t, n, "GET", "/v1/aggregates/tally/t1/events", nil)
		evs, _ := body["events"].([]any)
		if code != 200 || len(evs) != 2 || evs[1].(map[string]any)["data"].(map[string]any)["N"].(float64) != 4 {
			t.Fatalf("events: %d %v", code, body)
		}
	}
	check(n)
	for _, r := range readTopic(t, c.ListenAddrs(), "tally-events") {
		if header(r, aggregate.HeaderContentType) != "application/x-gob" {
			t.Fatalf("content-type header %q", header(r, aggregate.HeaderContentType))
		}
	}
	n.stop()
	// A fresh node restores the gob state and journals from the changelog.
	n2 := run(t.TempDir())
	check(n2)
}
