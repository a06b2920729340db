package esker_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/esker-io/esker"
)

// TestOwnershipFollowsRebalances: as nodes join, every node answers every
// key, and all of them agree on the one node that serves it (the
// Esker-Served-By header): a node that lost a partition never serves it
// itself, also after several revocations while it is idle.
func TestOwnershipFollowsRebalances(t *testing.T) {
	c := newCluster(t)
	// 8 partitions: the first node loses partitions at every join.
	a := startNode(t, c.ListenAddrs(), t.TempDir(), esker.Partitions(8))
	const accounts = 16
	for i := range accounts {
		code, body := do(t, a, "POST", fmt.Sprintf("/v1/aggregates/account/own-%d/commands", i), cmd("Open", map[string]any{"owner": "x"}))
		mustStatus(t, 200, code, body, "open")
	}
	nodes := []*testNode{a}
	for range 3 {
		nodes = append(nodes, startNode(t, c.ListenAddrs(), t.TempDir(), esker.Partitions(8)))
		// Once the group settles every node answers every account, all
		// served by one owner; a stale owner would serve it itself.
		deadline := time.Now().Add(15 * time.Second)
		for {
			bad := ""
			for i := range accounts {
				servedBy := map[string]bool{}
				for _, n := range nodes {
					code, _, h := doH(t, n, "GET", fmt.Sprintf("/v1/aggregates/account/own-%d", i), nil)
					if code != 200 {
						bad = fmt.Sprintf("own-%d: a node answered %d", i, code)
						break
					}
					servedBy[h.Get("Esker-Served-By")] = true
				}
				if bad == "" && len(servedBy) != 1 {
					bad = fmt.Sprintf("own-%d is served by %d different nodes: %v", i, len(servedBy), servedBy)
				}
				if bad != "" {
					break
				}
			}
			if bad == "" {
				bad = localTasksMatchMap(t, nodes)
			}
			if bad == "" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal(bad)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// localTasksMatchMap checks that each node's own view of the partitions it
// processes (the "local" entries of GET /v1/cluster) is exactly what the
// cluster map gives it.
func localTasksMatchMap(t *testing.T, nodes []*testNode) string {
	t.Helper()
	for i, n := range nodes {
		code, body := do(t, n, "GET", "/v1/cluster", nil)
		if code != 200 {
			return fmt.Sprintf("node %d: /v1/cluster answered %d", i, code)
		}
		self := body["self"].(string)
		ids := map[string]string{}
		for _, m := range body["members"].([]any) {
			m := m.(map[string]any)
			ids[m["id"].(string)] = m["url"].(string)
		}
		for _, task := range body["tasks"].([]any) {
			task := task.(map[string]any)
			mine := ids[task["active"].(string)] == self
			l, _ := task["local"].(map[string]any)
			local := l != nil && l["role"] == "active"
			if mine != local {
				return fmt.Sprintf("node %d, partition %v: the map says owner=%v, the node processes it=%v", i, task["partition"], mine, local)
			}
		}
	}
	return ""
}

// TestEveryNodeAnswersEveryKey: with three nodes, commands and reads for
// every account work through any node, answered by the owner after at most
// one forwarded hop.
func TestEveryNodeAnswersEveryKey(t *testing.T) {
	c := newCluster(t)
	var nodes []*testNode
	for range 3 {
		nodes = append(nodes, startNode(t, c.ListenAddrs(), t.TempDir(), esker.Partitions(6)))
	}
	waitSettled(t, nodes)
	const accounts = 12
	for i := range accounts {
		id := fmt.Sprintf("any-%d", i)
		code, body := do(t, nodes[i%3], "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Open", map[string]any{"owner": id}))
		mustStatus(t, 200, code, body, "open via node "+fmt.Sprint(i%3))
		code, body = do(t, nodes[(i+1)%3], "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Deposit", map[string]any{"amount": 10 + i}))
		mustStatus(t, 200, code, body, "deposit via another node")
		var servedBy string
		for j, n := range nodes {
			code, body, h := doH(t, n, "GET", "/v1/aggregates/account/"+id+"?minVersion=2&wait=2s", nil)
			mustStatus(t, 200, code, body, fmt.Sprintf("GET via node %d", j))
			if body["state"].(map[string]any)["balance"].(float64) != float64(10+i) {
				t.Fatalf("node %d: %v", j, body)
			}
			if servedBy == "" {
				servedBy = h.Get("Esker-Served-By")
			} else if h.Get("Esker-Served-By") != servedBy {
				t.Fatalf("%s served by %s and %s", id, servedBy, h.Get("Esker-Served-By"))
			}
		}
	}
	var forwarded, refused float64
	for _, n := range nodes {
		forwarded += metricSum(t, n.Node, "esker_forwarded_requests_total")
		refused += forwardOutcome(t, n, "loop_refused")
	}
	// 12 accounts × (2 commands + 3 reads), of which a third is local.
	if forwarded == 0 || forwarded > accounts*5 || refused != 0 {
		t.Fatalf("forwarded %v requests, %v refused as loops", forwarded, refused)
	}
	for i, n := range nodes {
		if metricSum(t, n.Node, "esker_rebalances_total") == 0 {
			t.Fatalf("node %d counted no rebalance", i)
		}
	}
}

// waitSettled waits until every node holds the map of one generation, the
// map's members are exactly these nodes, every partition has an owner, and
// each node processes exactly the partitions the map gives it. A check of
// one node's map alone could pass before a joining node's rebalance had
// reached the others.
func waitSettled(t *testing.T, nodes []*testNode) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		bad := localTasksMatchMap(t, nodes)
		if bad == "" {
			bad = sameFullMap(t, nodes)
		}
		if bad == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the cluster did not settle: %s", bad)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// sameFullMap returns "" when every node's /v1/cluster shows one
// generation, the nodes as its members and an owner for every partition,
// or else what differs.
func sameFullMap(t *testing.T, nodes []*testNode) string {
	t.Helper()
	want := map[string]bool{}
	for _, n := range nodes {
		want[n.srv.URL] = true
	}
	gen := -1.0
	for i, n := range nodes {
		code, body := do(t, n, "GET", "/v1/cluster", nil)
		if code != 200 {
			return fmt.Sprintf("node %d: /v1/cluster answered %d", i, code)
		}
		g, _ := body["generation"].(float64)
		if i > 0 && g != gen {
			return fmt.Sprintf("node %d holds generation %v, node 0 %v", i, g, gen)
		}
		gen = g
		members := body["members"].([]any)
		if len(members) != len(nodes) {
			return fmt.Sprintf("node %d's map has %d members, want %d", i, len(members), len(nodes))
		}
		for _, m := range members {
			if url := m.(map[string]any)["url"].(string); !want[url] {
				return fmt.Sprintf("node %d's map has member %s, not one of these nodes", i, url)
			}
		}
		for _, task := range body["tasks"].([]any) {
			if task := task.(map[string]any); task["active"] == "" {
				return fmt.Sprintf("node %d's map has no owner for partition %v", i, task["partition"])
			}
		}
	}
	return ""
}

func forwardOutcome(t *testing.T, n *testNode, outcome string) float64 {
	t.Helper()
	return counterWith(t, n, "esker_forwarded_requests_total", "outcome", outcome)
}
