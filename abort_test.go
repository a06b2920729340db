package esker_test

import (
	"fmt"
	"sync"
	"testing"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/esker-io/esker/aggregate"
)

// TestAbortDiscardsAndRewinds injects broker faults that make cycles abort:
// a transaction end that fails, and an event record the broker refuses.
// Each abort discards the cycle's store writes and rewinds consumption; the
// commands are processed again and every one is applied exactly once.
func TestAbortDiscardsAndRewinds(t *testing.T) {
	faults := []struct {
		name  string
		fault kfake.Fault
	}{
		{"transaction end fails", kfake.Fault{Keys: []kmsg.Key{kmsg.EndTxn}, TopLevel: true, Err: kerr.TransactionAbortable, Count: 2}},
		{"event record refused", kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: "account-events", Err: kerr.InvalidRecord, Count: 2}},
		{"changelog record refused", kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: "bank-account-changelog", Err: kerr.InvalidRecord, Count: 2}},
	}
	for _, f := range faults {
		t.Run(f.name, func(t *testing.T) {
			c := newCluster(t)
			n := startNode(t, c.ListenAddrs(), t.TempDir())
			code, body := do(t, n, "POST", "/v1/aggregates/account/a/commands", cmd("Open", map[string]any{"owner": "Ada"}))
			mustStatus(t, 200, code, body, "open")
			aborted := abortedCount(t, n)

			h := c.Fault(f.fault)
			const deposits = 20
			var wg sync.WaitGroup
			for i := range deposits {
				wg.Add(1)
				go func() {
					defer wg.Done()
					dep := map[string]any{"type": "Deposit", "data": map[string]any{"amount": i + 1}, "commandId": fmt.Sprintf("dep-%d", i)}
					for {
						code, body := do(t, n, "POST", "/v1/aggregates/account/a/commands", dep)
						if code == 200 {
							return
						}
						if code != 504 && code != 503 {
							t.Errorf("deposit %d: %d %v", i, code, body)
							return
						}
					}
				}()
			}
			wg.Wait()
			if h.Hits() == 0 {
				t.Fatal("the fault never fired")
			}
			if got := abortedCount(t, n); got <= aborted {
				t.Fatalf("no cycle aborted (%v)", got)
			}
			var sum, events int
			seen := map[string]bool{}
			for _, r := range readTopic(t, c.ListenAddrs(), "account-events") {
				if header(r, aggregate.HeaderEventType) != "Deposited" {
					continue
				}
				id := header(r, aggregate.HeaderCommandID)
				if seen[id] {
					t.Fatalf("command %s applied twice", id)
				}
				seen[id] = true
				events++
			}
			for i := range deposits {
				sum += i + 1
			}
			if events != deposits {
				t.Fatalf("%d deposits in account-events, want %d", events, deposits)
			}
			_, st := do(t, n, "GET", "/v1/aggregates/account/a", nil)
			if st["state"].(map[string]any)["balance"].(float64) != float64(sum) || st["version"].(float64) != deposits+1 {
				t.Fatalf("state %v, want balance %d at version %d", st, sum, deposits+1)
			}
		})
	}
}

func abortedCount(t *testing.T, n *testNode) float64 {
	t.Helper()
	return counterWith(t, n, "esker_transactions_total", "result", "aborted")
}
