package esker_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/internal/testlog"
	"github.com/esker-io/esker/projection"
)

// ownerCount counts the events a KeyBy row folded, and how many of them
// came with their owner opened (not sealed, not empty).
type ownerCount struct {
	Events int `json:"events"`
	Named  int `json:"named"`
}

func foldOwnerCount(s ownerCount, ev projection.Event) ownerCount {
	s.Events++
	switch e := ev.Value.(type) {
	case bank.Opened:
		if e.Owner != "" && len(e.Owner) < 40 { // a sealed owner is long
			s.Named++
		}
	}
	return s
}

// TestKeyByPersonalEventsNoPlaintext: a KeyBy projection re-keys an
// aggregate's events through its repartition topic; the events travel
// sealed and the row's task opens them, and a projection keyed by a
// personal value (PersonalKeys) keeps it out of its topics' record keys.
func TestKeyByPersonalEventsNoPlaintext(t *testing.T) {
	const name = "Ottoline Vandersteen"
	all := projection.New("all-opened", foldOwnerCount, projection.From(projection.Events(bank.Account)),
		projection.KeyBy(func(ev projection.Event) string {
			if _, ok := ev.Value.(bank.Opened); ok {
				return "all"
			}
			return ""
		}))
	byOwner := projection.New("by-owner", foldOwnerCount, projection.From(projection.Events(bank.Account)),
		projection.KeyBy(func(ev projection.Event) string {
			if e, ok := ev.Value.(bank.Opened); ok {
				return e.Owner
			}
			return ""
		}), projection.PersonalKeys())
	c := newCluster(t)
	brokers := c.ListenAddrs()
	tn := startTypesNode(t, brokers, t.TempDir(), []any{bank.Account, all, byOwner})
	// Accounts on every partition, so that some "Opened" events cross
	// the repartition topic to the partition of "all".
	ids := map[int32]string{}
	for i := 0; len(ids) < 4; i++ {
		id := "kb-" + string(rune('a'+i))
		p := aggregate.Partition(id, 4)
		if _, ok := ids[p]; !ok {
			ids[p] = id
		}
	}
	for _, id := range ids {
		code, body := do(t, tn, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Open", map[string]any{"owner": name}))
		mustStatus(t, 200, code, body, "open "+id)
		code, body = do(t, tn, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Deposit", map[string]any{"amount": 777001}))
		mustStatus(t, 200, code, body, "deposit "+id)
	}
	waitUntil(t, "every Opened event folded, opened, into the row of all", func() bool {
		code, body := do(t, tn, "GET", "/v1/projections/all-opened/all", nil)
		if code != 200 {
			return false
		}
		v := body["value"].(map[string]any)
		return v["events"] == float64(4) && v["named"] == float64(4)
	})
	waitUntil(t, "the owner's row, read by name", func() bool {
		code, body := do(t, tn, "GET", "/v1/projections/by-owner/"+url.PathEscape(name), nil)
		return code == 200 && body["value"].(map[string]any)["named"] == float64(4)
	})
	// The change's event data is base64 in the JSON: a raw search does not
	// see it.
	for _, topic := range []string{"bank-all-opened-repartition", "bank-by-owner-repartition"} {
		for _, r := range readTopic(t, brokers, topic) {
			var ch struct {
				Event *struct {
					Data []byte `json:"data"`
				} `json:"event"`
			}
			if err := json.Unmarshal(r.Value, &ch); err != nil {
				t.Fatal(err)
			}
			if ch.Event != nil && bytes.Contains(ch.Event.Data, []byte(name)) {
				t.Fatalf("%s offset %d carries the owner in plaintext: %s", topic, r.Offset, ch.Event.Data)
			}
		}
	}
	assertNoPlaintext(t, brokers, name, "777001", "bank-all-opened-repartition", "bank-all-opened-changelog",
		"bank-by-owner-repartition", "bank-by-owner-changelog")
}

// TestPersonalKeyNotLogged: reading a projection row by a personal key
// (PersonalKeys) logs nothing of the key at Warn level when forwarding the
// read to the row's owner fails.
func TestPersonalKeyNotLogged(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	logs := &testlog.Buffer{}
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	a := startTypesNode(t, brokers, t.TempDir(), []any{bank.Account, bank.Owners}, esker.Logger(logger))
	b := startTypesNode(t, brokers, t.TempDir(), []any{bank.Account, bank.Owners})
	// An owner whose row (under its pseudonym) is on a partition of b.
	owner := ""
	waitUntil(t, "an owner whose row b serves", func() bool {
		for i := range 16 {
			name := fmt.Sprintf("Philippa Quarrington %d", i)
			code, _, h := doH(t, a, "GET", "/v1/projections/owners/"+url.PathEscape(name), nil)
			if code == 404 && h.Get("Esker-Served-By") == b.srv.URL {
				owner = name
				return true
			}
		}
		return false
	})
	b.srv.Close() // b still owns the partition, but cannot be reached
	code, _, _ := doH(t, a, "GET", "/v1/projections/owners/"+url.PathEscape(owner), nil)
	if code != 503 {
		t.Fatalf("reading through an unreachable owner: %d, want 503", code)
	}
	if !strings.Contains(logs.String(), "forwarding to the owner failed") {
		t.Fatalf("the failed forward was not logged:\n%s", logs.String())
	}
	if strings.Contains(logs.String(), url.PathEscape(owner)) || strings.Contains(logs.String(), owner) {
		t.Fatalf("the personal key is in the node's log:\n%s", logs.String())
	}
}

// TestOwnersNoDriftWithForgets: the owners projection (GroupBy with
// personal rows and personal keys) equals a fold of the events topic after
// accounts are opened, moved between owners and forgotten from two
// nodes at once while one of them restarts (rebalances, restores).
func TestOwnersNoDriftWithForgets(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	a := startBankNode(t, brokers, t.TempDir())
	bDir := t.TempDir()
	b := startBankNode(t, brokers, bDir)
	owners := []string{"Ann Ash", "Ben Birch", "Cy Cedar", "Di Dogwood", "Ed Elm", "Flo Fir"}
	const accounts = 24
	for i := range accounts {
		id := fmt.Sprintf("nd-%02d", i)
		waitUntil(t, "open "+id, func() bool {
			code, _ := do(t, a, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Open", map[string]any{"owner": owners[i%len(owners)]}))
			return code == 200 || code == 409
		})
	}
	var nodes atomic.Pointer[[]*testNode]
	nodes.Store(&[]*testNode{a, b})
	var wg sync.WaitGroup
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for range 120 {
				ns := *nodes.Load()
				n := ns[rng.IntN(len(ns))]
				id := fmt.Sprintf("nd-%02d", rng.IntN(accounts))
				switch k := rng.IntN(60); {
				case k == 0:
					tryDo(n, "DELETE", "/v1/aggregates/account/"+id, nil)
				case k < 15:
					tryDo(n, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("ChangeOwner", map[string]any{"owner": owners[rng.IntN(len(owners))]}))
				default:
					tryDo(n, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Deposit", map[string]any{"amount": 1 + rng.IntN(500)}))
				}
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	nodes.Store(&[]*testNode{a})
	b.stop()
	time.Sleep(300 * time.Millisecond)
	b = startBankNode(t, brokers, bDir)
	nodes.Store(&[]*testNode{a, b})
	wg.Wait()
	for _, n := range []*testNode{a, b} {
		waitOwnersProjection(t, n, brokers)
	}
}

// tryDo sends a request and ignores its answer and any failure to get
// one (the node may be stopping): for load from goroutines other than the
// test's.
func tryDo(tn *testNode, method, path string, body any) {
	raw, _ := json.Marshal(body)
	req, err := http.NewRequest(method, tn.srv.URL+path, bytes.NewReader(raw))
	if err != nil {
		return
	}
	req.Header.Set("Content-Type", "application/json")
	if resp, err := httpClient.Do(req); err == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
}

// TestOwnersFoldedAfterForgets: the owners projection added after accounts
// were moved between owners and forgotten folds their whole history at
// once, the forgotten ones' fields opening empty, and equals the fold of
// the events topic.
func TestOwnersFoldedAfterForgets(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	dir := t.TempDir()
	a := startTypesNode(t, brokers, dir, []any{bank.Account})
	owners := []string{"Gil Gum", "Hal Hazel", "Ivy Ironwood"}
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range 12 {
		id := fmt.Sprintf("af-%02d", i)
		code, body := do(t, a, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Open", map[string]any{"owner": owners[i%len(owners)]}))
		mustStatus(t, 200, code, body, "open")
		for range 4 {
			do(t, a, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Deposit", map[string]any{"amount": 1 + rng.IntN(500)}))
			do(t, a, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("ChangeOwner", map[string]any{"owner": owners[rng.IntN(len(owners))]}))
		}
		if i%3 == 0 {
			code, body := do(t, a, "DELETE", "/v1/aggregates/account/"+id, nil)
			mustStatus(t, 200, code, body, "forget")
		}
	}
	a.stop()
	a = startTypesNode(t, brokers, dir, []any{bank.Account, bank.Owners})
	waitOwnersProjection(t, a, brokers)
}

// TestOwnersRowWithLostKey: a group-by row stored while its entity's key
// existed, whose key is then lost (destroyed without forgetting, as when
// the keys topic is damaged), keeps its group when later events of the
// entity are folded: its owner cannot be opened to name the group again,
// so the account stays in its owner's totals instead of moving to a group
// named by its ciphertext.
func TestOwnersRowWithLostKey(t *testing.T) {
	const owner = "Lost Keyholder"
	c := newCluster(t)
	brokers := c.ListenAddrs()
	dir := t.TempDir()
	tn := startTypesNode(t, brokers, dir, []any{bank.Account, bank.Owners})
	for _, cmd := range []struct {
		typ  string
		data any
	}{{"Open", bank.Open{Owner: owner}}, {"Deposit", bank.Deposit{Amount: 100}}} {
		code, body := do(t, tn, "POST", "/v1/aggregates/account/lost-1/commands", map[string]any{"type": cmd.typ, "data": cmd.data})
		mustStatus(t, 200, code, body, cmd.typ)
	}
	ownerRow := func(tn *testNode) (int, map[string]any) {
		return do(t, tn, "GET", "/v1/projections/owners/"+url.PathEscape(owner), nil)
	}
	waitUntil(t, "the owner's row", func() bool {
		code, body := ownerRow(tn)
		return code == 200 && body["value"].(map[string]any)["balance"] == float64(100)
	})
	tn.stop()

	// Another deposit while the projection does not run, then the key is lost.
	other := startTypesNode(t, brokers, t.TempDir(), []any{bank.Account})
	code, body := do(t, other, "POST", "/v1/aggregates/account/lost-1/commands", map[string]any{"type": "Deposit", "data": bank.Deposit{Amount: 50}})
	mustStatus(t, 200, code, body, "deposit")
	other.stop()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	lost := 0
	for _, r := range readTopic(t, brokers, "bank-keys") {
		if strings.HasPrefix(string(r.Key), "account/lost-1#") && r.Value != nil {
			tomb := &kgo.Record{Topic: r.Topic, Partition: r.Partition, Key: r.Key}
			if err := cl.ProduceSync(context.Background(), tomb).FirstErr(); err != nil {
				t.Fatal(err)
			}
			lost++
		}
	}
	if lost == 0 {
		t.Fatal("no data key of lost-1 in bank-keys")
	}

	// The projection folds the deposit into the row it stored, whose owner
	// no longer opens.
	tn = startTypesNode(t, brokers, dir, []any{bank.Account, bank.Owners})
	waitUntil(t, "the deposit folded into the owner's totals", func() bool {
		code, body := ownerRow(tn)
		return code == 200 && body["value"].(map[string]any)["balance"] == float64(150) && body["value"].(map[string]any)["accounts"] == float64(1)
	})
}
