package esker_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/examples/bank"
)

// TestTransfersSurviveKill: 1000 random transfers among 20 accounts through
// two `esker node` processes, one of them killed (SIGKILL) in the middle and
// restarted. After quiescence the total money is unchanged, no account is
// negative, and every transfer ended exactly once, completed or failed —
// the transfers reactor's steps are transactions of the engine.
func TestTransfersSurviveKill(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	dirs := []string{t.TempDir(), t.TempDir()}
	ports := []int{freePort(t), freePort(t)}
	var nodes [2]atomic.Pointer[process]
	for i := range nodes {
		nodes[i].Store(startProcess(t, brokers, ports[i], dirs[i]))
	}
	client := &http.Client{Timeout: 10 * time.Second}
	// post retries the same command id on 503, 504 and network errors,
	// through either node.
	post := func(typ, id, cmdID string, body map[string]any) (int, map[string]any) {
		body["commandId"] = cmdID
		raw, _ := json.Marshal(body)
		deadline := time.Now().Add(90 * time.Second)
		for attempt := 0; ; attempt++ {
			url := nodes[attempt%2].Load().url
			resp, err := client.Post(url+"/v1/aggregates/"+typ+"/"+id+"/commands", "application/json", bytes.NewReader(raw))
			if err == nil {
				var out map[string]any
				_ = json.NewDecoder(resp.Body).Decode(&out)
				resp.Body.Close()
				if resp.StatusCode != 503 && resp.StatusCode != 504 {
					return resp.StatusCode, out
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s never answered", cmdID)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	const accounts, initial, transfers = 20, 10_000, 1000
	for i := range accounts {
		id := fmt.Sprintf("acc-%02d", i)
		code, out := post("account", id, "open-"+id, cmd("Open", map[string]any{"owner": "o"}))
		mustStatus(t, 200, code, out, "open")
		code, out = post("account", id, "fund-"+id, cmd("Deposit", map[string]any{"amount": initial}))
		mustStatus(t, 200, code, out, "fund")
	}

	var sent atomic.Int64
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for i := w; i < transfers; i += 4 {
				from := rng.IntN(accounts)
				to := (from + 1 + rng.IntN(accounts-1)) % accounts
				id := fmt.Sprintf("t-%04d", i)
				code, out := post("transfer", id, "init-"+id, cmd("Initiate", map[string]any{
					"from": fmt.Sprintf("acc-%02d", from), "to": fmt.Sprintf("acc-%02d", to), "amount": 1 + rng.IntN(3000)}))
				if code != 200 {
					t.Errorf("initiate %s: %d %v", id, code, out)
					return
				}
				sent.Add(1)
			}
		}()
	}
	for sent.Load() < transfers/3 {
		time.Sleep(5 * time.Millisecond)
	}
	nodes[1].Load().kill()
	t.Logf("killed node 1 after %d transfers", sent.Load())
	time.Sleep(1500 * time.Millisecond)
	nodes[1].Store(startProcess(t, brokers, ports[1], dirs[1]))
	wg.Wait()
	if t.Failed() {
		return
	}

	// Quiescence: every transfer ended.
	deadline := time.Now().Add(90 * time.Second)
	var status map[string]string
	for {
		status = map[string]string{}
		for _, r := range readTopic(t, brokers, "transfer-events") {
			status[string(r.Key)] = header(r, aggregate.HeaderEventType)
		}
		ended := 0
		for _, s := range status {
			if s == "Completed" || s == "Failed" {
				ended++
			}
		}
		if ended == transfers {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d transfers ended", ended, transfers)
		}
		time.Sleep(200 * time.Millisecond)
	}

	// Exactly once: per transfer, one outcome of each step.
	steps := map[string]map[string]int{}
	count := func(transfer, step string) {
		if steps[transfer] == nil {
			steps[transfer] = map[string]int{}
		}
		steps[transfer][step]++
	}
	for _, r := range readTopic(t, brokers, "transfer-events") {
		count(string(r.Key), header(r, aggregate.HeaderEventType))
	}
	balances := map[string]int64{}
	for _, r := range readTopic(t, brokers, "account-events") {
		ev := recordEvent(t, r)
		v, err := bank.Account.DecodeEvent(ev)
		if err != nil {
			t.Fatal(err)
		}
		switch e := v.(type) {
		case bank.Deposited:
			balances[ev.EntityID] += e.Amount
		case bank.TransferDebited:
			balances[ev.EntityID] -= e.Amount
			count(e.Transfer, "debit")
		case bank.TransferDebitDeclined:
			count(e.Transfer, "debit")
		case bank.TransferCredited:
			balances[ev.EntityID] += e.Amount
			if e.Refund {
				count(e.Transfer, "refund")
			} else {
				count(e.Transfer, "credit")
			}
		case bank.TransferCreditDeclined:
			count(e.Transfer, "credit")
		}
		if balances[ev.EntityID] < 0 {
			t.Fatalf("%s went negative: %d", ev.EntityID, balances[ev.EntityID])
		}
	}
	completed, failed := 0, 0
	for id, s := range steps {
		terminal := s["Completed"] + s["Failed"]
		if s["Initiated"] != 1 || terminal != 1 || s["debit"] != 1 || s["credit"] > 1 || s["refund"] > 1 || s["Debited"] > 1 {
			t.Errorf("transfer %s: steps %v; want each exactly once", id, s)
		}
		if s["Completed"] == 1 {
			completed++
			if s["credit"] != 1 || s["Debited"] != 1 {
				t.Errorf("completed transfer %s without a debit and a credit: %v", id, s)
			}
		} else {
			failed++
		}
	}
	var total int64
	for _, b := range balances {
		total += b
	}
	if total != accounts*initial {
		t.Fatalf("total money %d, want %d", total, accounts*initial)
	}
	// The nodes' states agree with the events.
	for id, want := range balances {
		code, body := do2(t, client, nodes[0].Load().url, "/v1/aggregates/account/"+id)
		mustStatus(t, 200, code, body, "get "+id)
		if got := int64(body["state"].(map[string]any)["balance"].(float64)); got != want {
			t.Errorf("%s: balance %d, events say %d", id, got, want)
		}
	}
	t.Logf("%d transfers: %d completed, %d failed; total %d", transfers, completed, failed, total)
	if completed == 0 || failed == 0 {
		t.Fatalf("want both outcomes exercised: %d completed, %d failed", completed, failed)
	}
}

func do2(t testing.TB, client *http.Client, base, path string) (int, map[string]any) {
	t.Helper()
	for range 100 {
		resp, err := client.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		var out map[string]any
		_ = json.NewDecoder(resp.Body).Decode(&out)
		resp.Body.Close()
		if resp.StatusCode != 503 {
			return resp.StatusCode, out
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("GET %s: 503 for 5 s", path)
	return 0, nil
}
