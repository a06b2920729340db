package esker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/url"
	"reflect"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/projection"
)

// expectedProjections folds the bank projections independently of the
// engine: straight from the records of "account-events", a forgotten
// account dropped. The owners are keyed by their pseudonyms, as the owners
// projection (PersonalKeys) lists them.
func expectedProjections(t testing.TB, brokers []string) (owners map[string]bank.OwnerTotals, days map[string]bank.DayTotals, events int) {
	t.Helper()
	rows := map[string]bank.AccountRow{}
	days = map[string]bank.DayTotals{}
	open := testOpener(t, brokers)
	ownerKey := ownerKeys(t, brokers)
	for _, r := range readTopic(t, brokers, "account-events") {
		ev := recordEvent(t, r)
		events++
		if aggregate.IsForgotten(ev) {
			delete(rows, ev.EntityID)
			continue
		}
		ev = open(ev) // the owner is sealed
		v, err := bank.Account.DecodeEvent(ev)
		if err != nil {
			t.Fatal(err)
		}
		rows[ev.EntityID] = bank.FoldAccountRow(rows[ev.EntityID], projection.Event{Event: ev, Value: v})
		day := ev.Time.UTC().Format("2006-01-02")
		d := days[day]
		switch e := v.(type) {
		case bank.Deposited:
			d.Deposits += e.Amount
			d.Count++
			days[day] = d
		case bank.Withdrawn:
			d.Withdrawals += e.Amount
			d.Count++
			days[day] = d
		}
	}
	owners = map[string]bank.OwnerTotals{}
	for _, r := range rows {
		if r.Open && r.Owner != "" {
			k := ownerKey(r.Owner)
			o := owners[k]
			o.Accounts++
			o.Balance += r.Balance
			owners[k] = o
		}
	}
	return owners, days, events
}

// ownerKeys returns the function that gives the key an owner's row is
// listed under in the owners projection: the owner's pseudonym.
func ownerKeys(t testing.TB, brokers []string) func(owner string) string {
	kr := testKeyring(t, brokers)
	return func(owner string) string {
		t.Helper()
		p, err := kr.Pseudonym(context.Background(), "owners", owner)
		if err != nil {
			t.Fatalf("the pseudonym of %q: %v", owner, err)
		}
		return p
	}
}

// listRows pages through a projection over HTTP, limit rows per page, and
// fails on a repeated or out-of-order key.
func listRows[S any](t testing.TB, tn *testNode, name, prefix string, limit int) (map[string]S, []string, int) {
	t.Helper()
	out := map[string]S{}
	var keys []string
	after, pages := "", 0
	for {
		q := url.Values{"limit": {strconv.Itoa(limit)}}
		if prefix != "" {
			q.Set("prefix", prefix)
		}
		if after != "" {
			q.Set("after", after)
		}
		code, body := do(t, tn, "GET", "/v1/projections/"+name+"?"+q.Encode(), nil)
		if code != 200 {
			return nil, nil, -1 // not ready yet: the caller retries
		}
		pages++
		raw, _ := json.Marshal(body["rows"])
		var rows []struct {
			Key   string `json:"key"`
			Value S      `json:"value"`
		}
		if err := json.Unmarshal(raw, &rows); err != nil {
			t.Fatal(err)
		}
		if len(rows) > limit {
			t.Fatalf("page of %d rows, limit %d", len(rows), limit)
		}
		for _, r := range rows {
			if len(keys) > 0 && r.Key <= keys[len(keys)-1] {
				t.Fatalf("key %q after %q: not in order or repeated", r.Key, keys[len(keys)-1])
			}
			keys = append(keys, r.Key)
			out[r.Key] = r.Value
		}
		next, _ := body["next"].(string)
		if next == "" {
			return out, keys, pages
		}
		after = next
	}
}

// withoutEmpty drops owners left with no account (rows stay after their
// last account leaves).
func withoutEmpty(m map[string]bank.OwnerTotals) map[string]bank.OwnerTotals {
	out := map[string]bank.OwnerTotals{}
	for k, v := range m {
		if v != (bank.OwnerTotals{}) {
			out[k] = v
		}
	}
	return out
}

// waitOwnersProjection waits until the owners projection, listed over HTTP from tn,
// equals the fold of the events topic.
func waitOwnersProjection(t testing.TB, tn *testNode, brokers []string) {
	t.Helper()
	var got, want map[string]bank.OwnerTotals
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		want, _, _ = expectedProjections(t, brokers)
		got, _, _ = listRows[bank.OwnerTotals](t, tn, "owners", "", 1000)
		if reflect.DeepEqual(withoutEmpty(got), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the owners projection differs from the fold of the events:\ngot  %v\nwant %v", withoutEmpty(got), want)
		}
	}
}

// waitProjections waits until both bank projections, listed over HTTP from
// tn, equal the fold of the events topic.
func waitProjections(t testing.TB, tn *testNode, brokers []string, limit int) (map[string]bank.OwnerTotals, map[string]bank.DayTotals) {
	t.Helper()
	wantOwners, wantDays, _ := expectedProjections(t, brokers)
	deadline := time.Now().Add(30 * time.Second)
	var gotOwners map[string]bank.OwnerTotals
	var gotDays map[string]bank.DayTotals
	for {
		gotOwners, _, _ = listRows[bank.OwnerTotals](t, tn, "owners", "", limit)
		gotDays, _, _ = listRows[bank.DayTotals](t, tn, "daily-totals", "", limit)
		if reflect.DeepEqual(withoutEmpty(gotOwners), wantOwners) && reflect.DeepEqual(gotDays, wantDays) {
			return gotOwners, gotDays
		}
		if time.Now().After(deadline) {
			t.Fatalf("projections do not match the fold of the events:\nowners: got %v\n        want %v\ndays:   got %v\n        want %v", withoutEmpty(gotOwners), wantOwners, gotDays, wantDays)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestProjectionsFoldEvents: the owners (group-by) and daily-totals
// (re-keyed) projections equal a fold computed independently from the
// events topic, also after accounts move between owners.
func TestProjectionsFoldEvents(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	tn := startBankNode(t, brokers, t.TempDir())
	rng := rand.New(rand.NewPCG(1, 2))
	owners := []string{"alice", "bob", "carol", "dave", "erin"}
	ownerOf := map[string]string{}
	for i := range 20 {
		id := fmt.Sprintf("acc-%02d", i)
		ownerOf[id] = owners[i%len(owners)]
		code, body := do(t, tn, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Open", map[string]any{"owner": ownerOf[id]}))
		mustStatus(t, 200, code, body, "open")
	}
	for range 150 {
		id := fmt.Sprintf("acc-%02d", rng.IntN(20))
		kind := "Deposit"
		if rng.IntN(3) == 0 {
			kind = "Withdraw" // some are declined: no event
		}
		do(t, tn, "POST", "/v1/aggregates/account/"+id+"/commands", cmd(kind, map[string]any{"amount": 1 + rng.IntN(500)}))
	}
	got, _ := waitProjections(t, tn, brokers, 3)
	ownerKey := ownerKeys(t, brokers)
	before := got[ownerKey("alice")]

	// acc-00 (alice's) moves to bob: alice's totals lose it, bob's gain it.
	var st struct {
		State bank.AccountState `json:"state"`
	}
	code, body := do(t, tn, "GET", "/v1/aggregates/account/acc-00", nil)
	mustStatus(t, 200, code, body, "get acc-00")
	raw, _ := json.Marshal(body)
	_ = json.Unmarshal(raw, &st)
	code, body = do(t, tn, "POST", "/v1/aggregates/account/acc-00/commands", cmd("ChangeOwner", map[string]any{"owner": "bob"}))
	mustStatus(t, 200, code, body, "change owner")
	got, _ = waitProjections(t, tn, brokers, 1000)
	after := got[ownerKey("alice")]
	if after.Accounts != before.Accounts-1 || after.Balance != before.Balance-st.State.Balance {
		t.Fatalf("alice after giving away acc-00 (balance %d): %+v, before %+v", st.State.Balance, after, before)
	}

	// One row, routed by key.
	code, body = do(t, tn, "GET", "/v1/projections/owners/bob", nil)
	mustStatus(t, 200, code, body, "get bob")
	if v := body["value"].(map[string]any); int(v["accounts"].(float64)) != got[ownerKey("bob")].Accounts || body["version"].(float64) < 1 || body["key"] != "bob" {
		t.Fatalf("bob's row: %v, want %+v", body, got[ownerKey("bob")])
	}
	code, body = do(t, tn, "GET", "/v1/projections/owners/nobody", nil)
	mustStatus(t, 404, code, body, "missing row")
	code, body = do(t, tn, "GET", "/v1/projections/nope/x", nil)
	mustStatus(t, 404, code, body, "unknown projection")
	code, body = do(t, tn, "GET", "/v1/projections/owners?limit=0", nil)
	mustStatus(t, 400, code, body, "limit 0")
	code, body = do(t, tn, "GET", "/v1/projections/owners?after=%25%25", nil)
	mustStatus(t, 400, code, body, "bad token")
	code, body = do(t, tn, "GET", "/v1/projections/owners?prefix=al", nil)
	mustStatus(t, 400, code, body, "a prefix of personal keys")
	today := time.Now().UTC().Format("2006-01-02")
	if days, _, _ := listRows[bank.DayTotals](t, tn, "daily-totals", today[:7], 10); len(days) == 0 {
		t.Fatalf("prefix %q listed no day", today[:7])
	}
	if n := projectionCounter(t, tn, "owners", "folded"); n == 0 {
		t.Fatal("esker_projection_events_total{projection=owners,outcome=folded} is 0")
	}
	// GET /v1/cluster lists the projections with their partitions.
	code, body = do(t, tn, "GET", "/v1/cluster", nil)
	mustStatus(t, 200, code, body, "cluster")
	kinds := map[string]string{}
	for _, p := range anySlice(body["processors"]) {
		p := p.(map[string]any)
		kinds[p["name"].(string)] = p["kind"].(string)
		if n := len(anySlice(p["partitions"])); n != 4 {
			t.Errorf("%s runs %d partitions here, want all 4", p["name"], n)
		}
	}
	if kinds["owners"] != "projection" || kinds["daily-totals"] != "projection" {
		t.Fatalf("processors in /v1/cluster: %v", body["processors"])
	}
}

// projectionCounter returns esker_projection_events_total of a projection
// and outcome on a node.
func projectionCounter(t testing.TB, n *testNode, name, outcome string) float64 {
	t.Helper()
	v, _ := metricValue(t, n.Node, "esker_projection_events_total", "projection", name, "outcome", outcome)
	return v
}

// TestProjectionCatchesUpThenFollows: a projection added to a system that
// already holds 10,000 events — and already runs another projection of the
// same events, which shares its consumer position — starts from the
// beginning, catches up, and then follows new events live.
func TestProjectionCatchesUpThenFollows(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	dir := t.TempDir()
	tn := startTypesNode(t, brokers, dir, []any{bank.Account, bank.Owners})
	const accounts = 100
	ctx := context.Background()
	submit := func(tn *testNode, id string, typ string, data any) {
		raw, _ := json.Marshal(data)
		out, err := tn.Submit(ctx, "account", id, aggregate.Command{Type: typ, Data: raw})
		if err != nil {
			t.Fatal(err)
		}
		if !out.Accepted {
			t.Fatalf("%s %s: %s", typ, id, out.Reason)
		}
	}
	for i := range accounts {
		submit(tn, fmt.Sprintf("a%03d", i), "Open", bank.Open{Owner: fmt.Sprintf("owner-%d", i%7)})
	}
	// 9,900 deposits, produced straight to the commands topic.
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var recs []*kgo.Record
	for i := range 10_000 - accounts {
		id := fmt.Sprintf("a%03d", i%accounts)
		recs = append(recs, &kgo.Record{Topic: "account-commands", Key: []byte(id),
			Value: []byte(`{"type":"Deposit","data":{"amount":` + strconv.Itoa(1+i%9) + `},"commandId":"d-` + strconv.Itoa(i) + `"}`)})
	}
	if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, _, n := expectedProjections(t, brokers); n == 10_000 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the 10,000 events were not written")
		}
		time.Sleep(200 * time.Millisecond)
	}
	// owners has folded every event before the node stops.
	wantOwners, _, _ := expectedProjections(t, brokers)
	for deadline := time.Now().Add(60 * time.Second); ; {
		got, _, _ := listRows[bank.OwnerTotals](t, tn, "owners", "", 1000)
		if reflect.DeepEqual(withoutEmpty(got), wantOwners) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("owners did not fold the 10,000 events: %v, want %v", withoutEmpty(got), wantOwners)
		}
		time.Sleep(100 * time.Millisecond)
	}
	tn.stop()

	// The same node, restarted with daily-totals added: it reads from the
	// beginning while owners, which folded everything already, skips. Its
	// first cycles abort (the broker refuses its changelog records): an
	// abort rewinds consumption to the group's committed offsets, past
	// what daily-totals needs, and the engine must position it again.
	fault := c.Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: "bank-daily-totals-changelog", Err: kerr.InvalidRecord, Count: 2})
	tn = startBankNode(t, brokers, dir)
	waitProjections(t, tn, brokers, 1000)
	if fault.Hits() == 0 {
		t.Fatal("the changelog fault never fired")
	}
	// Each deposit is one change, folded once: here or, re-keyed, by the
	// owner of its day's partition (this node too).
	if n := projectionCounter(t, tn, "daily-totals", "folded"); n != 9_900 {
		t.Fatalf("daily-totals folded %v changes, want each of the 9,900 deposits once", n)
	}
	if n := projectionCounter(t, tn, "owners", "folded"); n != 0 {
		t.Fatalf("owners folded %v changes again after the restart, want 0", n)
	}
	// Live: new events reach the projections.
	for i := range 20 {
		submit(tn, fmt.Sprintf("a%03d", i), "Deposit", bank.Deposit{Amount: 1000})
	}
	submit(tn, "a000", "ChangeOwner", bank.ChangeOwner{Owner: "newcomer"})
	got, _ := waitProjections(t, tn, brokers, 1000)
	if n := got[ownerKeys(t, brokers)("newcomer")]; n.Accounts != 1 {
		t.Fatalf("newcomer: %+v", n)
	}
}

// TestProjectionRangeAcrossNodes: a listing fans out to the owners of every
// partition of a 3-node cluster and returns every key once, in order, with
// working paging, whichever node is asked; a row read by its personal key
// is routed to the owner of its pseudonym.
func TestProjectionRangeAcrossNodes(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	nodes := []*testNode{
		startBankNode(t, brokers, t.TempDir(), esker.Partitions(6)),
		startBankNode(t, brokers, t.TempDir(), esker.Partitions(6)),
		startBankNode(t, brokers, t.TempDir(), esker.Partitions(6)),
	}
	for _, n := range nodes {
		waitReady(t, n)
	}
	wantKeys := map[string]bool{}
	for i := range 60 {
		id, owner := fmt.Sprintf("r%02d", i), fmt.Sprintf("owner-%02d", i%37)
		wantKeys[owner] = true
		raw, _ := json.Marshal(bank.Open{Owner: owner})
		for {
			n := nodes[i%3]
			code, body := do(t, n, "POST", "/v1/aggregates/account/"+id+"/commands", json.RawMessage(`{"type":"Open","data":`+string(raw)+`,"commandId":"open-`+id+`"}`))
			if code == 200 {
				break
			}
			if code != 503 {
				t.Fatalf("open %s: %d %v", id, code, body)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// The owners are listed under their pseudonyms (PersonalKeys).
	ownerKey := ownerKeys(t, brokers)
	var want []string
	for owner := range wantKeys {
		want = append(want, ownerKey(owner))
	}
	slices.Sort(want)
	for i, n := range nodes {
		deadline := time.Now().Add(30 * time.Second)
		for {
			_, keys, pages := listRows[bank.OwnerTotals](t, n, "owners", "", 5)
			if slices.Equal(keys, want) {
				if pages < len(want)/5 {
					t.Fatalf("node %d: %d pages of 5 for %d keys", i, pages, len(want))
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("node %d listed %v, want %v", i, keys, want)
			}
			time.Sleep(100 * time.Millisecond)
		}
		// Every owner's row is found by name from every node: routed to
		// the owner of its pseudonym's partition.
		for owner := range wantKeys {
			code, body := do(t, n, "GET", "/v1/projections/owners/"+owner, nil)
			if code != 200 || body["key"] != owner {
				t.Fatalf("node %d: the row of %s: %d %v", i, owner, code, body)
			}
		}
		code, body := do(t, n, "GET", "/v1/projections/owners?prefix=owner-1", nil)
		mustStatus(t, 400, code, body, "a prefix of personal keys")
	}
}

// TestProjectionStartPositions: a projection added with StartAt(Latest)
// folds only the events written after it started; one with At(t) starts at
// the first event at or after t.
func TestProjectionStartPositions(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	dir := t.TempDir()
	ctx := context.Background()
	deposit := func(tn *testNode, id string, n int) {
		for range n {
			out, err := tn.Submit(ctx, "account", id, aggregate.Command{Type: "Deposit", Data: json.RawMessage(`{"amount":1}`)})
			if err != nil || !out.Accepted {
				t.Fatalf("deposit: %+v, %v", out, err)
			}
		}
	}
	tn := startNode(t, brokers, dir)
	for i := range 4 {
		id := fmt.Sprintf("s%d", i)
		if out, err := tn.Submit(ctx, "account", id, aggregate.Command{Type: "Open", Data: json.RawMessage(`{"owner":"x"}`)}); err != nil || !out.Accepted {
			t.Fatalf("open: %+v, %v", out, err)
		}
		deposit(tn, id, 10)
	}
	time.Sleep(20 * time.Millisecond)
	mark := time.Now()
	time.Sleep(20 * time.Millisecond)
	for i := range 4 {
		deposit(tn, fmt.Sprintf("s%d", i), 3)
	}
	tn.stop()

	count := func(n int, ev projection.Event) int {
		if _, ok := ev.Value.(bank.Deposited); ok {
			n++
		}
		return n
	}
	latest := projection.New("deposits-latest", count, projection.From(projection.Events(bank.Account)), projection.StartAt(projection.Latest()))
	since := projection.New("deposits-since", count, projection.From(projection.Events(bank.Account)), projection.StartAt(projection.At(mark)))
	tn = startTypesNode(t, brokers, dir, []any{bank.Account, latest, since})
	// The first cycle that folds into deposits-latest aborts: its start
	// (the end of the topic when it started) must not move past the
	// deposit that cycle held.
	fault := c.Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: "bank-deposits-latest-changelog", Err: kerr.InvalidRecord, Count: 1})
	for i := range 4 {
		deposit(tn, fmt.Sprintf("s%d", i), 2)
	}
	for _, want := range []struct {
		name string
		n    int
	}{{"deposits-latest", 2}, {"deposits-since", 5}} {
		deadline := time.Now().Add(20 * time.Second)
		for i := 0; i < 4; {
			id := fmt.Sprintf("s%d", i)
			code, body := do(t, tn, "GET", "/v1/projections/"+want.name+"/"+id, nil)
			if code == 200 && int(body["value"].(float64)) == want.n {
				i++
				continue
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s of %s: %d %v, want %d", want.name, id, code, body, want.n)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	if fault.Hits() == 0 {
		t.Fatal("the changelog fault never fired")
	}
	// Restarted, they resume where they were (no start position again).
	tn.stop()
	tn = startTypesNode(t, brokers, dir, []any{bank.Account, latest, since})
	deposit(tn, "s0", 1)
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, a := do(t, tn, "GET", "/v1/projections/deposits-latest/s0", nil)
		_, b := do(t, tn, "GET", "/v1/projections/deposits-since/s0", nil)
		if a["value"] == float64(3) && b["value"] == float64(6) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after a restart: latest %v, since %v; want 3 and 6", a, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
