package esker_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/internal/engine"
	"github.com/esker-io/esker/statestore"
)

// A bank-like "ledger" whose fold changes between two releases of the code.

type ledgerState struct {
	Balance int `json:"balance"`
	Count   int `json:"count"`
}

type ledgerCredit struct {
	Amount int `json:"amount"`
}

func (ledgerCredit) TypeName() string { return "Credit" }

// ledgerCreditedV1 is the first release's event: an amount in units.
type ledgerCreditedV1 struct {
	Amount int `json:"amount"`
}

func (ledgerCreditedV1) TypeName() string { return "Credited" }

// ledgerCreditedV2 is the second release's: cents (schema version 2, upcast from 1).
type ledgerCreditedV2 struct {
	Cents int `json:"cents"`
}

func (ledgerCreditedV2) TypeName() string   { return "Credited" }
func (ledgerCreditedV2) SchemaVersion() int { return 2 }

// ledgerV1 folds the balance in units.
func ledgerV1() *aggregate.Type[ledgerState, ledgerCredit, ledgerCreditedV1] {
	return aggregate.New[ledgerState, ledgerCredit, ledgerCreditedV1]("ledger",
		func(_ ledgerState, c ledgerCredit) ([]ledgerCreditedV1, error) {
			return []ledgerCreditedV1{{Amount: c.Amount}}, nil
		},
		func(s ledgerState, e ledgerCreditedV1) ledgerState { s.Balance += e.Amount; return s },
	).Commands(ledgerCredit{}).Events(ledgerCreditedV1{})
}

// ledgerV2 folds the balance in cents and counts the credits; version is
// its state version (1: the bump was forgotten).
func ledgerV2(version int) *aggregate.Type[ledgerState, ledgerCredit, ledgerCreditedV2] {
	return aggregate.New[ledgerState, ledgerCredit, ledgerCreditedV2]("ledger",
		func(_ ledgerState, c ledgerCredit) ([]ledgerCreditedV2, error) {
			return []ledgerCreditedV2{{Cents: 100 * c.Amount}}, nil
		},
		func(s ledgerState, e ledgerCreditedV2) ledgerState { s.Balance += e.Cents; s.Count++; return s },
		aggregate.StateVersion(version),
	).Commands(ledgerCredit{}).Events(ledgerCreditedV2{}).
		Upcast("Credited", 1, aggregate.UpcastJSON(func(o ledgerCreditedV1) ledgerCreditedV2 { return ledgerCreditedV2{Cents: 100 * o.Amount} }))
}

// ledgerBook remembers the credits sent per entity.
type ledgerBook struct {
	mu      sync.Mutex
	credits map[string][]int
}

func (b *ledgerBook) credit(t *testing.T, tn *testNode, id string, amount int) {
	t.Helper()
	code, body := do(t, tn, "POST", "/v1/aggregates/ledger/"+id+"/commands", cmd("Credit", map[string]int{"amount": amount}))
	mustStatus(t, 200, code, body, "credit "+id)
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.credits == nil {
		b.credits = map[string][]int{}
	}
	b.credits[id] = append(b.credits[id], amount)
}

// newFold is the state ledgerV2 folds from the credits.
func (b *ledgerBook) newFold(id string) (balance, count int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, a := range b.credits[id] {
		balance += 100 * a
	}
	return balance, len(b.credits[id])
}

// check asserts that every entity's state is the new fold.
func (b *ledgerBook) check(t *testing.T, tn *testNode) {
	t.Helper()
	b.mu.Lock()
	ids := make([]string, 0, len(b.credits))
	for id := range b.credits {
		ids = append(ids, id)
	}
	b.mu.Unlock()
	for _, id := range ids {
		balance, count := b.newFold(id)
		code, body := do(t, tn, "GET", "/v1/aggregates/ledger/"+id, nil)
		mustStatus(t, 200, code, body, "read "+id)
		st := body["state"].(map[string]any)
		if int(st["balance"].(float64)) != balance || int(st["count"].(float64)) != count || int(body["version"].(float64)) != count {
			t.Errorf("%s: state %v version %v, want the new fold: balance %d, count %d, version %d", id, st, body["version"], balance, count, count)
		}
	}
}

// holdRebuilds makes every rebuild wait, once it has replayed the events,
// until release is called; held receives each task held.
func holdRebuilds(t *testing.T) (release func(), held <-chan statestore.Task) {
	gate := make(chan struct{})
	ch := make(chan statestore.Task, 64)
	hook := func(ctx context.Context, task statestore.Task) {
		ch <- task
		select {
		case <-gate:
		case <-ctx.Done():
		}
	}
	engine.TestHookRebuildReplayed.Store(&hook)
	var once sync.Once
	release = func() { once.Do(func() { close(gate) }) }
	t.Cleanup(func() { release(); engine.TestHookRebuildReplayed.Store(nil) })
	return release, ch
}

// countRebuilds counts the rebuilds that replayed their events.
func countRebuilds(t *testing.T) *atomic.Int32 {
	var n atomic.Int32
	hook := func(context.Context, statestore.Task) { n.Add(1) }
	engine.TestHookRebuildReplayed.Store(&hook)
	t.Cleanup(func() { engine.TestHookRebuildReplayed.Store(nil) })
	return &n
}

func waitHeld(t *testing.T, held <-chan statestore.Task, n int) {
	t.Helper()
	for i := range n {
		select {
		case <-held:
		case <-time.After(30 * time.Second):
			t.Fatalf("only %d of %d rebuilds started", i, n)
		}
	}
}

// TestRebuildOnStateVersionChange: a node restarted with a new fold (state
// version 2) serves nothing of the old state: reads and commands answer 503
// "rebuilding" until it has rebuilt every partition from ledger-events
// (upcasting the old events), then every entity has the new fold; a fresh
// node restoring from the changelog gets the new fold and rebuilds nothing.
func TestRebuildOnStateVersionChange(t *testing.T) {
	cluster := newCluster(t)
	brokers := cluster.ListenAddrs()
	dir := t.TempDir()
	var book ledgerBook

	n1 := startTypesNode(t, brokers, dir, []any{ledgerV1()})
	for i := range 12 {
		for k := 1; k <= 3; k++ {
			book.credit(t, n1, fmt.Sprintf("acct-%d", i), 10*i+k)
		}
	}
	code, body := do(t, n1, "GET", "/v1/aggregates/ledger/acct-5", nil)
	mustStatus(t, 200, code, body, "v1 read")
	if got := body["state"].(map[string]any)["balance"].(float64); got != 51+52+53 {
		t.Fatalf("v1 fold: balance %v", got)
	}
	n1.stop()

	release, held := holdRebuilds(t)
	n2 := startTypesNodeNoWait(t, brokers, dir, []any{ledgerV2(2)})
	waitHeld(t, held, 4) // every partition: the stored state is version 1

	code, body, h := doH(t, n2, "GET", "/v1/aggregates/ledger/acct-5", nil)
	mustStatus(t, 503, code, body, "read while rebuilding")
	if msg, _ := body["error"].(string); !strings.Contains(msg, "rebuilding its state from ledger-events") || !strings.Contains(msg, "state version 1 → 2") {
		t.Errorf("503 error does not say a rebuild is in progress: %q", msg)
	}
	if h.Get("Retry-After") == "" {
		t.Error("503 without Retry-After")
	}
	code, body = do(t, n2, "POST", "/v1/aggregates/ledger/acct-5/commands", cmd("Credit", map[string]int{"amount": 1}))
	mustStatus(t, 503, code, body, "command while rebuilding")
	if err := n2.Ready(); err == nil || !strings.Contains(err.Error(), "rebuilding") {
		t.Errorf("Ready while rebuilding: %v", err)
	}
	if v, _ := metricValue(t, n2.Node, "esker_rebuilds_in_progress", "type", "ledger"); v != 4 {
		t.Errorf("esker_rebuilds_in_progress = %v, want 4", v)
	}
	code, body = do(t, n2, "GET", "/v1/admin/rebuild/ledger", nil)
	mustStatus(t, 200, code, body, "rebuild status")
	if body["inProgress"] != true || len(body["partitions"].([]any)) != 4 {
		t.Errorf("rebuild status while held: %v", body)
	}

	release()
	waitReady(t, n2)
	book.check(t, n2)
	if v, _ := metricValue(t, n2.Node, "esker_rebuild_events_total", "type", "ledger"); v != 36 {
		t.Errorf("esker_rebuild_events_total = %v, want 36", v)
	}
	// The rebuilds end right after their swap.
	waitUntil(t, "esker_rebuilds_in_progress to reach 0", func() bool {
		v, _ := metricValue(t, n2.Node, "esker_rebuilds_in_progress", "type", "ledger")
		return v == 0
	})
	code, body = do(t, n2, "GET", "/v1/admin/rebuild/ledger", nil)
	mustStatus(t, 200, code, body, "rebuild status")
	for _, p := range body["partitions"].([]any) {
		p := p.(map[string]any)
		if p["state"] != "done" || p["online"] != false || p["toVersion"] != 2.0 || p["fromVersion"] != 1.0 || p["percent"] != 100.0 {
			t.Errorf("partition rebuild: %v", p)
		}
	}
	// The new code writes on the new fold.
	book.credit(t, n2, "acct-5", 7)
	book.credit(t, n2, "acct-new", 2)
	book.check(t, n2)
	n2.stop()

	// A restart with the intact store rebuilds nothing.
	rebuilds := countRebuilds(t)
	n3 := startTypesNode(t, brokers, dir, []any{ledgerV2(2)})
	book.check(t, n3)
	n3.stop()

	// Neither does a fresh node restoring from the changelog, where the
	// rebuilt records and version 2 come after the old ones.
	n4 := startTypesNode(t, brokers, t.TempDir(), []any{ledgerV2(2)})
	book.check(t, n4)
	if n := rebuilds.Load(); n != 0 {
		t.Errorf("%d rebuilds after the state version was recorded", n)
	}
	if v, _ := metricValue(t, n4.Node, "esker_rebuild_events_total", "type", "ledger"); v != 0 {
		t.Errorf("the fresh node rebuilt: esker_rebuild_events_total = %v", v)
	}
}

// TestRebuildOnline: a rebuild on demand (the fold changed without a
// version bump) builds a fresh generation while the old one keeps serving
// reads and commands; after the swap every entity has the new fold,
// including the commands made during the rebuild, on this node and on a
// fresh node restoring from the changelog.
func TestRebuildOnline(t *testing.T) {
	cluster := newCluster(t)
	brokers := cluster.ListenAddrs()
	dir := t.TempDir()
	var book ledgerBook

	n1 := startTypesNode(t, brokers, dir, []any{ledgerV1()})
	for i := range 10 {
		for k := 1; k <= 2; k++ {
			book.credit(t, n1, fmt.Sprintf("acct-%d", i), 10*i+k)
		}
	}
	n1.stop()

	// The fold changed, the state version did not: the old state serves.
	n2 := startTypesNode(t, brokers, dir, []any{ledgerV2(1)})
	code, body := do(t, n2, "GET", "/v1/aggregates/ledger/acct-3", nil)
	mustStatus(t, 200, code, body, "read")
	if st := body["state"].(map[string]any); st["balance"] != 31.0+32 || st["count"] != 0.0 {
		t.Fatalf("old state: %v", st)
	}

	release, held := holdRebuilds(t)
	code, body = do(t, n2, "POST", "/v1/admin/rebuild/ledger", nil)
	mustStatus(t, 202, code, body, "start the rebuild")
	if ps := body["partitions"].([]any); len(ps) != 4 || ps[0].(map[string]any)["online"] != true {
		t.Fatalf("start answer: %v", body)
	}
	waitHeld(t, held, 4)

	// The old generation serves, and commands go on.
	code, body = do(t, n2, "GET", "/v1/aggregates/ledger/acct-3", nil)
	mustStatus(t, 200, code, body, "read during the rebuild")
	if st := body["state"].(map[string]any); st["balance"] != 31.0+32 {
		t.Errorf("read during the rebuild: %v", st)
	}
	for i := range 10 {
		book.credit(t, n2, fmt.Sprintf("acct-%d", i), 5)
	}
	code, body = do(t, n2, "GET", "/v1/aggregates/ledger/acct-3", nil)
	mustStatus(t, 200, code, body, "read during the rebuild")
	if st := body["state"].(map[string]any); st["balance"] != 31.0+32+500 || body["version"] != 3.0 {
		t.Errorf("old generation after a command: %v", body)
	}
	code, body = do(t, n2, "GET", "/v1/admin/rebuild/ledger", nil)
	mustStatus(t, 200, code, body, "rebuild status")
	if body["inProgress"] != true {
		t.Errorf("status during the rebuild: %v", body)
	}

	// Commands keep coming while it tails and swaps.
	stop := make(chan struct{})
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			book.credit(t, n2, fmt.Sprintf("acct-%d", i%12), 1)
		}
	}()
	release()
	waitUntil(t, "the rebuild to finish", func() bool {
		_, body := do(t, n2, "GET", "/v1/admin/rebuild/ledger", nil)
		return body["inProgress"] == false
	})
	close(stop)
	<-sent
	_, body = do(t, n2, "GET", "/v1/admin/rebuild/ledger", nil)
	for _, p := range body["partitions"].([]any) {
		if p := p.(map[string]any); p["state"] != "done" {
			t.Errorf("partition rebuild: %v", p)
		}
	}
	book.check(t, n2)
	n2.stop()

	n3 := startTypesNode(t, brokers, t.TempDir(), []any{ledgerV2(1)})
	book.check(t, n3)
}

// TestRebuildReachesStandbys: the rebuilt state and its version travel on
// the changelog to the standby copies: a standby promoted after the rebuild
// serves the new fold without rebuilding.
func TestRebuildReachesStandbys(t *testing.T) {
	cluster := newCluster(t)
	brokers := cluster.ListenAddrs()
	dirA := t.TempDir()
	var book ledgerBook
	opts := []esker.Option{esker.Partitions(2), esker.StandbyReplicas(1)}

	n1 := startTypesNode(t, brokers, dirA, []any{ledgerV1()}, opts...)
	for i := range 10 {
		book.credit(t, n1, fmt.Sprintf("acct-%d", i), i+1)
		book.credit(t, n1, fmt.Sprintf("acct-%d", i), 2*i+1)
	}
	n1.stop()

	a := startTypesNode(t, brokers, dirA, []any{ledgerV2(2)}, opts...)
	b := startTypesNode(t, brokers, t.TempDir(), []any{ledgerV2(2)}, opts...)
	waitSettled(t, []*testNode{a, b})
	waitReady(t, a)
	waitReady(t, b)
	book.check(t, a)

	var p int32 = -1
	for q, url := range clusterOwners(httpClient, a.srv.URL) {
		if url == a.srv.URL {
			p = q
		}
	}
	if p < 0 {
		t.Fatal("a owns no partition")
	}
	waitUntil(t, "b's standby copy to catch up", func() bool { return standbyCaughtUp(t, b, p) })

	rebuilds := countRebuilds(t)
	a.stop()
	waitUntil(t, "b to serve every partition", func() bool { return b.Ready() == nil && ownsAll(b, 2) })
	book.check(t, b)
	if n := rebuilds.Load(); n != 0 {
		t.Errorf("the promoted standby rebuilt %d partitions", n)
	}
}

func ownsAll(tn *testNode, partitions int32) bool {
	owners := clusterOwners(httpClient, tn.srv.URL)
	for p := range partitions {
		if owners[p] != tn.srv.URL {
			return false
		}
	}
	return true
}

// TestRebuildAtLeastOnce: the rebuild works the same without transactions.
func TestRebuildAtLeastOnce(t *testing.T) {
	cluster := newCluster(t)
	brokers := cluster.ListenAddrs()
	dir := t.TempDir()
	var book ledgerBook
	alo := esker.ProcessingGuarantee(esker.AtLeastOnce)

	n1 := startTypesNode(t, brokers, dir, []any{ledgerV1()}, alo)
	for i := range 8 {
		book.credit(t, n1, fmt.Sprintf("acct-%d", i), i+1)
		book.credit(t, n1, fmt.Sprintf("acct-%d", i), 3)
	}
	n1.stop()

	n2 := startTypesNode(t, brokers, dir, []any{ledgerV2(2)}, alo) // ready once rebuilt
	book.check(t, n2)
	if v, _ := metricValue(t, n2.Node, "esker_rebuild_events_total", "type", "ledger"); v != 16 {
		t.Errorf("esker_rebuild_events_total = %v, want 16", v)
	}
	book.credit(t, n2, "acct-1", 4)
	n2.stop()

	n3 := startTypesNode(t, brokers, t.TempDir(), []any{ledgerV2(2)}, alo)
	book.check(t, n3)
}

// TestRebuildKeepsForgottenAndPersonal: an online rebuild of the bank's
// accounts opens each owner (sealed on the events) before evolve and seals
// it again in the new state, and a forgotten account stays forgotten — also
// on a node that restores the rebuilt changelog.
func TestRebuildKeepsForgottenAndPersonal(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	n := startNode(t, brokers, t.TempDir())
	for _, id := range []string{"keep", "gone"} {
		code, body := do(t, n, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Open", map[string]any{"owner": "Owner of " + id}))
		mustStatus(t, 200, code, body, "open "+id)
		code, body = do(t, n, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Deposit", map[string]any{"amount": 70}))
		mustStatus(t, 200, code, body, "deposit "+id)
	}
	code, body := do(t, n, "DELETE", "/v1/aggregates/account/gone", nil)
	mustStatus(t, 200, code, body, "forget")

	code, body = do(t, n, "POST", "/v1/admin/rebuild/account", nil)
	mustStatus(t, 202, code, body, "start the rebuild")
	waitUntil(t, "the rebuild to finish", func() bool {
		_, body := do(t, n, "GET", "/v1/admin/rebuild/account", nil)
		return body["inProgress"] == false
	})
	_, body = do(t, n, "GET", "/v1/admin/rebuild/account", nil)
	for _, p := range body["partitions"].([]any) {
		if p := p.(map[string]any); p["state"] != "done" {
			t.Fatalf("partition rebuild: %v", p)
		}
	}
	check := func(tn *testNode, when string) {
		t.Helper()
		code, body := do(t, tn, "GET", "/v1/aggregates/account/keep", nil)
		mustStatus(t, 200, code, body, when+": the kept account")
		if st := body["state"].(map[string]any); st["owner"] != "Owner of keep" || st["balance"] != 70.0 {
			t.Fatalf("%s: kept account %v", when, st)
		}
		if code, body := do(t, tn, "GET", "/v1/aggregates/account/gone", nil); code != 410 {
			t.Fatalf("%s: the forgotten account answers %d %v", when, code, body)
		}
	}
	check(n, "after the rebuild")
	n.stop()
	check(startNode(t, brokers, t.TempDir()), "after a restore of the rebuilt changelog")
	assertNoPlaintext(t, brokers, "Owner of keep", "70")
}
