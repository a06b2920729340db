package esker_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/esker-io/esker"
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
	// Opened is at schema version 1, Deposited at 2 (it gained a currency).
	for i, r := range recs {
		if string(r.Key) != "acc-1" || header(r, aggregate.HeaderVersion) != fmt.Sprint(i+1) ||
			header(r, aggregate.HeaderEventID) == "" || header(r, aggregate.HeaderCommandID) == "" ||
			header(r, aggregate.HeaderSchemaVersion) != []string{"1", "2"}[i] || header(r, aggregate.HeaderTime) == "" ||
			header(r, aggregate.HeaderContentType) != "application/json" {
			t.Fatalf("record %d: key %q headers %v", i, r.Key, r.Headers)
		}
	}
	if header(recs[0], aggregate.HeaderEventType) != "Opened" || string(recs[1].Value) != `{"amount":500,"currency":"EUR"}` {
		t.Fatalf("records: %v / %s", recs[0].Headers, recs[1].Value)
	}
}

func TestRejectionAndConflictWriteNothing(t *testing.T) {
	c := newCluster(t)
	n := startNode(t, c.ListenAddrs(), t.TempDir())
	code, body := do(t, n, "POST", "/v1/aggregates/account/a/commands", cmd("Open", map[string]any{"owner": "Ada"}))
	mustStatus(t, 200, code, body, "open")
	events := len(readTopic(t, c.ListenAddrs(), "account-events"))
	// Entity records on the changelog; the task's command offset (one
	// compacted key per task) moves with every cycle, rejections included.
	entityRecords := func() int {
		n := 0
		for _, r := range readTopic(t, c.ListenAddrs(), "bank-account-changelog") {
			if len(r.Key) > 0 && r.Key[0] != 'm' {
				n++
			}
		}
		return n
	}
	changes := entityRecords()

	code, body = do(t, n, "POST", "/v1/aggregates/account/a/commands", cmd("Withdraw", map[string]any{"amount": 100}))
	mustStatus(t, 422, code, body, "overdraw")
	if body["error"] == "" {
		t.Fatalf("422 without a reason: %v", body)
	}
	conflict := map[string]any{"type": "Deposit", "data": map[string]any{"amount": 5}, "expectedVersion": 7}
	code, body = do(t, n, "POST", "/v1/aggregates/account/a/commands", conflict)
	mustStatus(t, 409, code, body, "conflict")
	if body["currentVersion"].(float64) != 1 {
		t.Fatalf("409 should name the current version: %v", body)
	}
	code, body = do(t, n, "POST", "/v1/aggregates/account/never-opened/commands", cmd("Deposit", map[string]any{"amount": 5}))
	mustStatus(t, 422, code, body, "deposit to unopened account")

	if got := len(readTopic(t, c.ListenAddrs(), "account-events")); got != events {
		t.Fatalf("rejections wrote %d events", got-events)
	}
	if got := entityRecords(); got != changes {
		t.Fatalf("rejections wrote %d changelog records of entities", got-changes)
	}
	code, body = do(t, n, "GET", "/v1/aggregates/account/never-opened", nil)
	mustStatus(t, 404, code, body, "state of an entity without events")
	// The matching expected version is accepted.
	conflict["expectedVersion"] = 1
	code, body = do(t, n, "POST", "/v1/aggregates/account/a/commands", conflict)
	mustStatus(t, 200, code, body, "expected version matches")
}

func TestSameCommandIDTwice(t *testing.T) {
	c := newCluster(t)
	dir := t.TempDir()
	n := startNode(t, c.ListenAddrs(), dir)
	do(t, n, "POST", "/v1/aggregates/account/a/commands", cmd("Open", map[string]any{"owner": "Ada"}))
	dep := map[string]any{"type": "Deposit", "data": map[string]any{"amount": 250}, "commandId": "dep-1"}
	code1, first := do(t, n, "POST", "/v1/aggregates/account/a/commands", dep)
	code2, second := do(t, n, "POST", "/v1/aggregates/account/a/commands", dep)
	mustStatus(t, 200, code1, first, "first")
	mustStatus(t, 200, code2, second, "second")
	if fmt.Sprint(first) != fmt.Sprint(second) {
		t.Fatalf("outcomes differ:\n%v\n%v", first, second)
	}
	// A rejected command id also keeps its outcome.
	bad := map[string]any{"type": "Withdraw", "data": map[string]any{"amount": 10_000}, "commandId": "w-1"}
	c1, r1 := do(t, n, "POST", "/v1/aggregates/account/a/commands", bad)
	c2, r2 := do(t, n, "POST", "/v1/aggregates/account/a/commands", bad)
	if c1 != 422 || c2 != 422 || fmt.Sprint(r1) != fmt.Sprint(r2) {
		t.Fatalf("rejected twice: %d %v / %d %v", c1, r1, c2, r2)
	}

	// The idempotency memory survives a restore on another node.
	n.stop()
	n2 := startNode(t, c.ListenAddrs(), t.TempDir())
	code3, third := do(t, n2, "POST", "/v1/aggregates/account/a/commands", dep)
	mustStatus(t, 200, code3, third, "after restore")
	if fmt.Sprint(first) != fmt.Sprint(third) {
		t.Fatalf("outcome after restore differs:\n%v\n%v", first, third)
	}
	deposits := 0
	for _, r := range readTopic(t, c.ListenAddrs(), "account-events") {
		if header(r, aggregate.HeaderEventType) == "Deposited" {
			deposits++
		}
	}
	if deposits != 1 {
		t.Fatalf("%d Deposited events, want 1", deposits)
	}
	_, st := do(t, n2, "GET", "/v1/aggregates/account/a", nil)
	if st["state"].(map[string]any)["balance"].(float64) != 250 {
		t.Fatalf("state: %v", st)
	}
}

func TestBadInput(t *testing.T) {
	c := newCluster(t)
	n := startNode(t, c.ListenAddrs(), t.TempDir(), esker.MaxBodyBytes(4096))
	do(t, n, "POST", "/v1/aggregates/account/a/commands", cmd("Open", map[string]any{"owner": "Ada"}))
	commandsBefore := len(readTopic(t, c.ListenAddrs(), "account-commands"))
	huge := `{"type":"Open","data":{"owner":"` + strings.Repeat("x", 10_000) + `"}}`
	cases := []struct {
		name, path, body string
		want             int
		mention          string
	}{
		{"malformed JSON", "/v1/aggregates/account/a/commands", `{"type":"Deposit",`, 400, "JSON"},
		{"not an object", "/v1/aggregates/account/a/commands", `[1,2]`, 400, ""},
		{"missing type", "/v1/aggregates/account/a/commands", `{"data":{"amount":1}}`, 400, "type"},
		{"unknown command type", "/v1/aggregates/account/a/commands", `{"type":"Steal","data":{}}`, 400, "Deposit"},
		{"unknown aggregate type", "/v1/aggregates/planet/a/commands", `{"type":"Open","data":{}}`, 404, "planet"},
		{"wrong field type", "/v1/aggregates/account/a/commands", `{"type":"Deposit","data":{"amount":"ten"}}`, 400, "amount"},
		{"huge body", "/v1/aggregates/account/a/commands", huge, 413, ""},
		{"negative amount", "/v1/aggregates/account/a/commands", `{"type":"Deposit","data":{"amount":-5}}`, 400, "positive"},
		{"zero amount", "/v1/aggregates/account/a/commands", `{"type":"Withdraw","data":{"amount":0}}`, 400, "positive"},
		{"negative expected version", "/v1/aggregates/account/a/commands", `{"type":"Deposit","data":{"amount":5},"expectedVersion":-2}`, 400, "expectedVersion"},
		{"bad minVersion", "/v1/aggregates/account/a?minVersion=x", "", 400, "minVersion"},
		{"bad wait", "/v1/aggregates/account/a?minVersion=1&wait=forever", "", 400, "wait"},
		{"bad limit", "/v1/aggregates/account/a/events?limit=0", "", 400, "limit"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			method := "POST"
			if tc.body == "" {
				method = "GET"
			}
			code, body := do(t, n, method, tc.path, tc.body)
			mustStatus(t, tc.want, code, body, tc.name)
			msg, _ := body["error"].(string)
			if msg == "" || !strings.Contains(msg, tc.mention) {
				t.Fatalf("error %q should mention %q", msg, tc.mention)
			}
		})
	}
	if got := len(readTopic(t, c.ListenAddrs(), "account-commands")); got != commandsBefore {
		t.Fatalf("bad input produced %d command records", got-commandsBefore)
	}
}

func TestIdempotencyWindowExpires(t *testing.T) {
	c := newCluster(t)
	n := startNode(t, c.ListenAddrs(), t.TempDir(), esker.IdempotencyWindow(time.Second))
	do(t, n, "POST", "/v1/aggregates/account/a/commands", cmd("Open", map[string]any{"owner": "Ada"}))
	dep := map[string]any{"type": "Deposit", "data": map[string]any{"amount": 10}, "commandId": "once"}
	_, first := do(t, n, "POST", "/v1/aggregates/account/a/commands", dep)
	_, again := do(t, n, "POST", "/v1/aggregates/account/a/commands", dep)
	if first["version"] != again["version"] {
		t.Fatalf("within the window: %v then %v", first, again)
	}
	time.Sleep(1500 * time.Millisecond)
	_, later := do(t, n, "POST", "/v1/aggregates/account/a/commands", dep)
	if later["version"].(float64) != first["version"].(float64)+1 {
		t.Fatalf("after the window the id is new again: %v then %v", first, later)
	}
}
