package esker_test

import (
	"strings"
	"testing"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
)

type blob struct{ S string }
type blobCommand interface{ isBlobCommand() }
type Append struct{ S string }

func (Append) isBlobCommand() {}

type blobEvent interface{ isBlobEvent() }
type Appended struct{ S string }

func (Appended) isBlobEvent() {}

// TestOversizedRecords: an event or a state too large for a Kafka record is
// rejected with a reason, the cycle that found out is retried without the
// offending command, and the node goes on working.
func TestOversizedRecords(t *testing.T) {
	blobs := aggregate.New[blob, blobCommand, blobEvent]("blob",
		func(s blob, c blobCommand) ([]blobEvent, error) { return []blobEvent{Appended{c.(Append).S}}, nil },
		func(s blob, e blobEvent) blob { s.S += e.(Appended).S; return s },
	).Commands(Append{}).Events(Appended{})
	c := newCluster(t)
	tn := startTypesNode(t, c.ListenAddrs(), t.TempDir(), []any{blobs},
		esker.ApplicationID("blobs"), esker.Partitions(1), esker.MaxBodyBytes(4<<20))

	code, body := do(t, tn, "POST", "/v1/aggregates/blob/b/commands", cmd("Append", map[string]any{"S": strings.Repeat("x", 950_000)}))
	mustStatus(t, 422, code, body, "oversized event")
	if !strings.Contains(body["error"].(string), "bytes") {
		t.Fatalf("reason %v", body)
	}
	for i := range 2 {
		code, body := do(t, tn, "POST", "/v1/aggregates/blob/b/commands", cmd("Append", map[string]any{"S": strings.Repeat("y", 400_000)}))
		mustStatus(t, 200, code, body, "append "+string(rune('1'+i)))
	}
	code, body = do(t, tn, "POST", "/v1/aggregates/blob/b/commands", cmd("Append", map[string]any{"S": strings.Repeat("z", 400_000)}))
	mustStatus(t, 422, code, body, "append that makes the state too large")
	if !strings.Contains(body["error"].(string), "state") {
		t.Fatalf("reason %v", body)
	}
	code, body = do(t, tn, "POST", "/v1/aggregates/blob/b/commands", cmd("Append", map[string]any{"S": "small"}))
	mustStatus(t, 200, code, body, "a small append still works")
	if body["version"].(float64) != 3 {
		t.Fatalf("version %v, want 3", body["version"])
	}
	code, body = do(t, tn, "GET", "/v1/aggregates/blob/b/events?from=1", nil)
	if code != 200 || len(body["events"].([]any)) != 3 {
		t.Fatalf("events: %d, %d of them", code, len(body["events"].([]any)))
	}
}
