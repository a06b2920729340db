package esker_test

import (
	"fmt"
	"testing"

	"github.com/esker-io/esker/aggregate"
)

func TestAcceptedCommand(t *testing.T) {
	c := newCluster(t)
	n := startNode(t, c.ListenAddrs(), t.TempDir())

	code, body := do(t, n, "POST", "/v1/aggregates/account/acc-1/commands", cmd("Open", map[string]any{"owner": "Ada"}))
	if code != 200 {
		t.Fatalf("open: %d %v", code, body)
	}
	code, body = do(t, n, "POST", "/v1/aggregates/account/acc-1/commands", cmd("Deposit", map[string]any{"amount": 500}))
	if code != 200 || body["version"].(float64) != 2 {
		t.Fatalf("deposit: %d %v", code, body)
	}
	code, body = do(t, n, "GET", "/v1/aggregates/account/acc-1", nil)
	if code != 200 {
		t.Fatalf("get: %d %v", code, body)
	}
	state := body["state"].(map[string]any)
	if body["version"].(float64) != 2 || state["balance"].(float64) != 500 || state["owner"] != "Ada" {
		t.Fatalf("state: %v", body)
	}
	code, body = do(t, n, "GET", "/v1/aggregates/account/acc-1/events", nil)
	evs := body["events"].([]any)
	if code != 200 || len(evs) != 2 || evs[0].(map[string]any)["type"] != "Opened" || evs[1].(map[string]any)["type"] != "Deposited" {
		t.Fatalf("events: %d %v", code, body)
	}

	recs := readTopic(t, c.ListenAddrs(), "account-events")
	if len(recs) != 2 {
		t.Fatalf("account-events has %d records, want 2", len(recs))
	}
	for i, r := range recs {
		if string(r.Key) != "acc-1" || header(r, aggregate.HeaderVersion) != fmt.Sprint(i+1) ||
			header(r, aggregate.HeaderEventID) == "" || header(r, aggregate.HeaderCommandID) == "" ||
			header(r, aggregate.HeaderSchemaVersion) != "1" || header(r, aggregate.HeaderTime) == "" ||
			header(r, aggregate.HeaderContentType) != "application/json" {
			t.Fatalf("record %d: key %q headers %v", i, r.Key, r.Headers)
		}
	}
	if header(recs[0], aggregate.HeaderEventType) != "Opened" || string(recs[1].Value) != `{"amount":500}` {
		t.Fatalf("records: %v / %s", recs[0].Headers, recs[1].Value)
	}
}
