package esker_test

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/examples/bank"
)

// TestEntityStreamsReadOnlyTheirRecords: 1000 accounts × 100 events. Reading
// one account's stream (HTTP and Go) returns its events in order, pages with
// from/limit, and reads only that account's journals from the store —
// counted, not timed — however many records its partition holds.
func TestEntityStreamsReadOnlyTheirRecords(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	tn := startNode(t, brokers, t.TempDir())
	const accounts, perAccount = 1000, 100
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ProducerLinger(5*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx := context.Background()
	var recs []*kgo.Record
	id := func(i int) string { return fmt.Sprintf("e-%04d", i) }
	for i := range accounts {
		recs = append(recs, &kgo.Record{Topic: "account-commands", Key: []byte(id(i)),
			Value: []byte(`{"type":"Open","data":{"owner":"o"},"commandId":"open-` + id(i) + `"}`)})
	}
	for v := 2; v <= perAccount; v++ {
		for i := range accounts {
			recs = append(recs, &kgo.Record{Topic: "account-commands", Key: []byte(id(i)),
				Value: []byte(`{"type":"Deposit","data":{"amount":` + strconv.Itoa(v) + `},"commandId":"d-` + id(i) + `-` + strconv.Itoa(v) + `"}`)})
		}
	}
	if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		t.Fatal(err)
	}
	for i := range accounts {
		if _, err := tn.State(ctx, "account", id(i), perAccount, time.Minute); err != nil {
			t.Fatalf("%s did not reach version %d: %v", id(i), perAccount, err)
		}
	}

	read := func() float64 { return gaugeOrCounter(t, tn, "esker_event_journals_read_total") }
	before := read()
	code, body := do(t, tn, "GET", "/v1/aggregates/account/e-0500/events?from=1&limit=1000", nil)
	mustStatus(t, 200, code, body, "events")
	evs := anySlice(body["events"])
	if len(evs) != perAccount {
		t.Fatalf("%d events, want %d", len(evs), perAccount)
	}
	for i, e := range evs {
		if v := int(e.(map[string]any)["version"].(float64)); v != i+1 {
			t.Fatalf("event %d has version %d", i, v)
		}
	}
	// Its journals only: at most one per event (one per transaction that
	// wrote it), against about 25,000 journals in its partition.
	if n := read() - before; n < 1 || n > perAccount {
		t.Fatalf("reading 100 events read %v journals; want between 1 and %d (the account's own)", n, perAccount)
	}

	// Paging, in Go.
	before = read()
	page, err := tn.Events(ctx, "account", "e-0500", 51, 25)
	if err != nil || len(page) != 25 || page[0].Version != 51 || page[24].Version != 75 {
		t.Fatalf("page from 51, 25: %d events (%v), err %v", len(page), versionsOf(page), err)
	}
	if n := read() - before; n > 26 {
		t.Fatalf("a page of 25 events read %v journals", n)
	}
	state, version, err := esker.Load(ctx, tn.Node, bank.Account, "e-0500")
	if err != nil || version != perAccount || state.Balance != perAccount*(perAccount+1)/2-1 || !state.Open {
		t.Fatalf("Load: %+v at %d, %v", state, version, err)
	}
	if state, version, err := esker.Load(ctx, tn.Node, bank.Account, "nobody"); err != nil || version != 0 || state.Open {
		t.Fatalf("Load of an account without events: %+v at %d, %v", state, version, err)
	}
}

func versionsOf(evs []aggregate.Event) []int64 {
	out := make([]int64, len(evs))
	for i, e := range evs {
		out[i] = e.Version
	}
	return out
}

// TestExpectedVersionModes: any, must-not-exist, must-exist and an exact
// version, through HTTP, as EventStoreDB has them.
func TestExpectedVersionModes(t *testing.T) {
	c := newCluster(t)
	tn := startNode(t, c.ListenAddrs(), t.TempDir())
	send := func(id string, body map[string]any) (int, map[string]any) {
		return do(t, tn, "POST", "/v1/aggregates/account/"+id+"/commands", body)
	}
	with := func(typ string, data any, expected any) map[string]any {
		b := cmd(typ, data)
		if expected != nil {
			b["expectedVersion"] = expected
		}
		return b
	}
	open := map[string]any{"owner": "o"}
	dep := map[string]any{"amount": 5}
	for _, step := range []struct {
		what     string
		id       string
		body     map[string]any
		status   int
		version  float64 // the answer's version, or currentVersion of a 409
		contains string
	}{
		{"must-exist on a new entity", "a", with("Open", open, "must-exist"), 409, 0, "must exist"},
		{"-1 (must exist) on a new entity", "a", with("Open", open, -1), 409, 0, "must exist"},
		{"must-not-exist on a new entity", "a", with("Open", open, "must-not-exist"), 200, 1, ""},
		{"0 on an existing entity", "a", with("Deposit", dep, 0), 409, 1, "must not exist"},
		{"must-not-exist on an existing entity", "a", with("Deposit", dep, "must-not-exist"), 409, 1, "must not exist"},
		{"must-exist on an existing entity", "a", with("Deposit", dep, "must-exist"), 200, 2, ""},
		{"-1 on an existing entity", "a", with("Deposit", dep, -1), 200, 3, ""},
		{"the exact version", "a", with("Deposit", dep, 3), 200, 4, ""},
		{"a stale version", "a", with("Deposit", dep, 3), 409, 4, "version 3"},
		{"any", "a", with("Deposit", dep, "any"), 200, 5, ""},
		{"none", "a", with("Deposit", dep, nil), 200, 6, ""},
		{"an unknown mode", "a", with("Deposit", dep, "sometimes"), 400, -1, `"sometimes"`},
		{"below -1", "a", with("Deposit", dep, -2), 400, -1, "-2"},
		{"a fraction", "a", with("Deposit", dep, 1.5), 400, -1, "1.5"},
	} {
		code, body := send(step.id, step.body)
		if code != step.status {
			t.Fatalf("%s: status %d, want %d: %v", step.what, code, step.status, body)
		}
		switch code {
		case 200:
			if body["version"] != step.version {
				t.Fatalf("%s: version %v, want %v", step.what, body["version"], step.version)
			}
		case 409:
			if body["currentVersion"] != step.version {
				t.Fatalf("%s: currentVersion %v, want %v", step.what, body["currentVersion"], step.version)
			}
		}
		if msg, _ := body["error"].(string); !strings.Contains(msg, step.contains) {
			t.Fatalf("%s: error %q does not mention %q", step.what, msg, step.contains)
		}
	}
}

// gaugeOrCounter returns the value of an unlabelled gauge or counter.
func gaugeOrCounter(t testing.TB, n *testNode, name string) float64 {
	t.Helper()
	v, ok := metricValue(t, n.Node, name)
	if !ok {
		t.Fatalf("no metric %s", name)
	}
	return v
}
