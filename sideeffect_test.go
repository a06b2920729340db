package esker_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/sideeffects"
)

// TestWithdrawalAlertsOnTheNode: a side-effect consumer added to a node
// runs with it: the bank's withdrawal alerts reach a webhook (retried after
// the webhook's first failure), small withdrawals do not, and GET
// /v1/cluster lists the consumer.
func TestWithdrawalAlertsOnTheNode(t *testing.T) {
	var mu sync.Mutex
	var alerts []bank.Alert
	keys := map[string]int{}
	calls := 0
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		calls++
		if calls == 1 {
			http.Error(w, "warming up", http.StatusServiceUnavailable)
			return
		}
		var a bank.Alert
		if err := json.NewDecoder(r.Body).Decode(&a); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		keys[r.Header.Get("Idempotency-Key")]++
		alerts = append(alerts, a)
	}))
	defer hook.Close()
	alertsConsumer, err := bank.WithdrawalAlerts(hook.URL, 1000, nil, sideeffects.Retries(5, 10*time.Millisecond, 100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	c := newCluster(t)
	tn := startTypesNode(t, c.ListenAddrs(), t.TempDir(), []any{bank.Account, alertsConsumer})
	for _, step := range []struct {
		typ    string
		amount int
	}{{"Deposit", 5000}, {"Withdraw", 10}, {"Withdraw", 3000}} {
		if step.typ == "Deposit" {
			code, body := do(t, tn, "POST", "/v1/aggregates/account/acc-1/commands", cmd("Open", map[string]any{"owner": "x"}))
			mustStatus(t, 200, code, body, "open")
		}
		code, body := do(t, tn, "POST", "/v1/aggregates/account/acc-1/commands", cmd(step.typ, map[string]any{"amount": step.amount}))
		mustStatus(t, 200, code, body, step.typ)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		mu.Lock()
		n := len(keys)
		mu.Unlock()
		if n >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no alert reached the webhook")
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // a second (wrong) alert would arrive by now
	mu.Lock()
	if len(keys) != 1 || alerts[0].Amount != 3000 || alerts[0].Account != "acc-1" || alerts[0].Kind != "withdrawal" || calls < 2 {
		t.Fatalf("alerts %+v (keys %v, %d calls); want the withdrawal of 3000 alone, after one retry", alerts, keys, calls)
	}
	mu.Unlock()

	code, body := do(t, tn, "GET", "/v1/cluster", nil)
	mustStatus(t, 200, code, body, "cluster")
	found := false
	for _, p := range anySlice(body["processors"]) {
		p := p.(map[string]any)
		if p["name"] == "withdrawal-alerts" {
			found = p["kind"] == "sideeffect" && p["details"].(map[string]any)["handled"].(float64) >= 1
		}
	}
	if !found {
		t.Fatalf("withdrawal-alerts missing from /v1/cluster processors: %v", body["processors"])
	}
	if err := tn.ConsumersReady(); err != nil {
		t.Fatalf("ConsumersReady: %v", err)
	}
}
