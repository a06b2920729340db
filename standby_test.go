package esker_test

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/statestore"
)

// TestStandbyTakesOver: with StandbyReplicas(1), the node that does not own
// a partition keeps a warm copy of it; when the owner stops, it takes over
// having restored less than 1% of the partition's changelog, and answers at
// once with the right state.
func TestStandbyTakesOver(t *testing.T) {
	c := newCluster(t)
	opts := []esker.Option{esker.Partitions(2), esker.StandbyReplicas(1)}
	a := startNode(t, c.ListenAddrs(), t.TempDir(), opts...)
	b := startNode(t, c.ListenAddrs(), t.TempDir(), opts...)
	nodes := []*testNode{a, b}
	waitSettled(t, nodes)

	// Accounts on a partition a owns.
	owners := clusterOwners(httpClient, a.srv.URL)
	var p int32 = -1
	for q, url := range owners {
		if url == a.srv.URL {
			p = q
		}
	}
	if p < 0 {
		t.Fatalf("a owns nothing: %v", owners)
	}
	var ids []string
	for i := 0; len(ids) < 10; i++ {
		if id := fmt.Sprintf("sb-%d", i); aggregate.Partition(id, 2) == p {
			ids = append(ids, id)
		}
	}
	for _, id := range ids {
		do(t, a, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Open", map[string]any{"owner": id}))
		for j := range 20 {
			code, body := do(t, a, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Deposit", map[string]any{"amount": j + 1}))
			mustStatus(t, 200, code, body, "deposit")
		}
	}
	// b's standby copy catches up.
	deadline := time.Now().Add(10 * time.Second)
	for !standbyCaughtUp(t, b, p) {
		if time.Now().After(deadline) {
			t.Fatal("the standby did not catch up")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The lag is exported as a metric too (updated every second).
	for deadline := time.Now().Add(5 * time.Second); !hasGauge(t, b, "esker_standby_lag_records"); {
		if time.Now().After(deadline) {
			t.Fatal("no esker_standby_lag_records on the standby node")
		}
		time.Sleep(50 * time.Millisecond)
	}
	// A read that accepts staleness is answered by the standby copy itself,
	// saying so; a plain read goes to the owner.
	code, body, h := doH(t, b, "GET", "/v1/aggregates/account/"+ids[0]+"?stale=true", nil)
	if code != 200 || body["standby"] != true || body["lag"] == nil || h.Get("Esker-Served-By") != b.srv.URL {
		t.Fatalf("stale read on the standby: %d %v served by %q", code, body, h.Get("Esker-Served-By"))
	}
	code, body, h = doH(t, b, "GET", "/v1/aggregates/account/"+ids[0], nil)
	if code != 200 || body["standby"] != nil || h.Get("Esker-Served-By") != a.srv.URL {
		t.Fatalf("plain read: %d %v served by %q", code, body, h.Get("Esker-Served-By"))
	}
	if code, body = do(t, b, "GET", "/v1/aggregates/account/"+ids[0]+"?stale=maybe", nil); code != 400 {
		t.Fatalf("stale=maybe: %d %v", code, body)
	}
	var changelogRecords int
	for _, r := range readTopic(t, c.ListenAddrs(), "bank-account-changelog") {
		if r.Partition == p {
			changelogRecords++
		}
	}
	before := metricSum(t, b.Node, "esker_restore_records_total")

	a.stop()
	start := time.Now()
	for {
		code, _ := do(t, b, "GET", "/v1/aggregates/account/"+ids[0], nil)
		if code == 200 {
			break
		}
		if time.Since(start) > 10*time.Second {
			t.Fatalf("b never served partition %d", p)
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("b served partition %d %v after a stopped", p, time.Since(start).Round(time.Millisecond))
	restored := metricSum(t, b.Node, "esker_restore_records_total") - before
	t.Logf("on promotion it restored %v of the partition's %d changelog records", restored, changelogRecords)
	if restored*100 >= float64(changelogRecords) {
		t.Fatalf("the standby restored %v of the partition's %d changelog records on promotion; want < 1%%", restored, changelogRecords)
	}
	for _, id := range ids {
		code, body := do(t, b, "GET", "/v1/aggregates/account/"+id, nil)
		if code != 200 || body["version"].(float64) != 21 || body["state"].(map[string]any)["balance"].(float64) != 210 {
			t.Fatalf("%s after take-over: %d %v", id, code, body)
		}
	}
}

// standbyCaughtUp reports whether the node's /v1/cluster shows a standby
// copy of partition p with no lag.
func standbyCaughtUp(t *testing.T, n *testNode, p int32) bool {
	t.Helper()
	code, body := do(t, n, "GET", "/v1/cluster", nil)
	if code != 200 {
		return false
	}
	for _, task := range body["tasks"].([]any) {
		task := task.(map[string]any)
		if int32(task["partition"].(float64)) != p {
			continue
		}
		l, _ := task["local"].(map[string]any)
		return l != nil && l["role"] == "standby" && l["lag"].(float64) == 0
	}
	return false
}

func hasGauge(t *testing.T, n *testNode, name string) bool {
	t.Helper()
	mfs, err := n.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) > 0 {
			return true
		}
	}
	return false
}

// TestStandbyTakesOverAfterKill is TestStandbyTakesOver with the owner
// killed (SIGKILL: no group leave, no clean shutdown), as separate
// `esker node` processes with a 1 s session timeout: the standby serves the
// partition within 2 s, having restored under 1% of its changelog.
func TestStandbyTakesOverAfterKill(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	a := startProcess(t, brokers, freePort(t), t.TempDir(), "--standby-replicas", "1")
	b := startProcess(t, brokers, freePort(t), t.TempDir(), "--standby-replicas", "1")
	owners := waitOwners(t, httpClient, a.url)
	var p int32 = -1
	for q, url := range owners {
		if url == a.url {
			p = q
		}
	}
	if p < 0 {
		t.Fatalf("a owns nothing: %v", owners)
	}
	var ids []string
	for i := 0; len(ids) < 5; i++ {
		if id := fmt.Sprintf("sk-%d", i); aggregate.Partition(id, 4) == p {
			ids = append(ids, id)
		}
	}
	post := func(id, body string) {
		t.Helper()
		resp, err := httpClient.Post(b.url+"/v1/aggregates/account/"+id+"/commands", "application/json", stringsReader(body))
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("command: %v %v", resp, err)
		}
		resp.Body.Close()
	}
	for _, id := range ids {
		post(id, `{"type":"Open","data":{"owner":"x"}}`)
		for range 30 {
			post(id, `{"type":"Deposit","data":{"amount":2}}`)
		}
	}
	for deadline := time.Now().Add(10 * time.Second); !processStandbyCaughtUp(b.url, p); {
		if time.Now().After(deadline) {
			t.Fatal("the standby did not catch up")
		}
		time.Sleep(20 * time.Millisecond)
	}
	var changelogRecords int
	for _, r := range readTopic(t, brokers, "bank-account-changelog") {
		if r.Partition == p {
			changelogRecords++
		}
	}
	before := scrapeSum(t, b.url, "esker_restore_records_total")

	a.kill()
	start := time.Now()
	lastErr := ""
	for {
		resp, err := httpClient.Get(b.url + "/v1/aggregates/account/" + ids[0])
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
			lastErr = fmt.Sprintf("%d %s", resp.StatusCode, body)
		}
		if time.Since(start) > 2*time.Second {
			t.Fatalf("the standby did not serve partition %d within 2 s of the kill; last answer %s\nits log:\n%s", p, lastErr, b.log)
		}
		time.Sleep(5 * time.Millisecond)
	}
	restored := scrapeSum(t, b.url, "esker_restore_records_total") - before
	t.Logf("served %v after the kill; restored %v of %d changelog records", time.Since(start).Round(time.Millisecond), restored, changelogRecords)
	if restored*100 >= float64(changelogRecords) {
		t.Fatalf("restored %v of %d records on promotion; want < 1%%", restored, changelogRecords)
	}
}

func processStandbyCaughtUp(url string, p int32) bool {
	resp, err := httpClient.Get(url + "/v1/cluster")
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var m struct {
		Tasks []struct {
			Partition int32
			Local     *struct {
				Role string
				Lag  int64
			}
		}
	}
	if resp.StatusCode != 200 || jsonDecode(resp.Body, &m) != nil {
		return false
	}
	for _, task := range m.Tasks {
		if task.Partition == p {
			return task.Local != nil && task.Local.Role == "standby" && task.Local.Lag == 0
		}
	}
	return false
}

// scrapeSum adds up a metric's samples from a node's /metrics text.
func scrapeSum(t testing.TB, url, name string) float64 {
	t.Helper()
	resp, err := httpClient.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var sum float64
	for _, line := range strings.Split(string(raw), "\n") {
		if !strings.HasPrefix(line, name) || strings.HasPrefix(line, "#") {
			continue
		}
		rest := strings.TrimPrefix(line, name)
		if rest != "" && rest[0] != '{' && rest[0] != ' ' {
			continue // another metric with this prefix
		}
		if i := strings.LastIndexByte(line, ' '); i > 0 {
			v, err := strconv.ParseFloat(line[i+1:], 64)
			if err == nil {
				sum += v
			}
		}
	}
	return sum
}

// TestUnusedStateIsCleanedUp: a node that gives up a partition (neither
// active nor standby for it any more) deletes that partition's local state
// after the state cleanup delay, and keeps the state of its own roles.
func TestUnusedStateIsCleanedUp(t *testing.T) {
	c := newCluster(t)
	opts := []esker.Option{esker.Partitions(3), esker.StandbyReplicas(1), esker.StateCleanupDelay(300 * time.Millisecond)}
	dirA := t.TempDir()
	a := startNode(t, c.ListenAddrs(), dirA, opts...)
	// a alone holds every partition: give each some state.
	for i := range 30 {
		id := fmt.Sprintf("cu-%d", i)
		code, body := do(t, a, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Open", map[string]any{"owner": id}))
		mustStatus(t, 200, code, body, "open")
	}
	b := startNode(t, c.ListenAddrs(), t.TempDir(), opts...)
	cn := startNode(t, c.ListenAddrs(), t.TempDir(), opts...)
	nodes := []*testNode{a, b, cn}
	waitSettled(t, nodes)

	// With 3 partitions, 3 nodes and one standby each, a is active for one
	// partition and standby for one: the third is unused on a.
	deadline := time.Now().Add(15 * time.Second)
	for metricSum(t, a.Node, "esker_state_cleanups_total") < 1 {
		if time.Now().After(deadline) {
			t.Fatal("a deleted no unused partition's state")
		}
		time.Sleep(50 * time.Millisecond)
	}
	roles := nodeRoles(t, a, a.srv.URL)
	a.stop()
	store, err := statestore.Open(dirA)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	unused := 0
	for p := range int32(3) {
		cp, err := store.Checkpoint(statestore.Task{Type: "account", Partition: p})
		if err != nil {
			t.Fatal(err)
		}
		role := roles[p]
		t.Logf("partition %d: role on a %q, checkpoint %d", p, role, cp)
		switch {
		case role == "" && cp != 0:
			t.Errorf("partition %d: unused on a but its state is kept (checkpoint %d)", p, cp)
		case role != "" && cp == 0:
			t.Errorf("partition %d: a is %s for it but its state is gone", p, role)
		}
		if role == "" {
			unused++
		}
	}
	if unused == 0 {
		t.Fatalf("a has a role for every partition: %v", roles)
	}
}

// nodeRoles returns partition → "active" or "standby" for the node with the
// given URL, from n's cluster map.
func nodeRoles(t *testing.T, n *testNode, url string) map[int32]string {
	t.Helper()
	code, body := do(t, n, "GET", "/v1/cluster", nil)
	if code != 200 {
		t.Fatalf("GET /v1/cluster: %d %v", code, body)
	}
	var id string
	for _, m := range body["members"].([]any) {
		if m := m.(map[string]any); m["url"] == url {
			id = m["id"].(string)
		}
	}
	out := map[int32]string{}
	for _, task := range body["tasks"].([]any) {
		task := task.(map[string]any)
		p := int32(task["partition"].(float64))
		if task["active"] == id {
			out[p] = "active"
		}
		for _, s := range anySlice(task["standbys"]) {
			if s == id {
				out[p] = "standby"
			}
		}
	}
	return out
}

func anySlice(v any) []any {
	s, _ := v.([]any)
	return s
}
