package esker_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/esker-io/esker"
)

// TestOwnershipFollowsRebalances: as nodes join, each partition is served by
// exactly one node; a node that lost a partition answers 503 for its keys,
// also after several revocations while it is idle.
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
		// Every account is answered by exactly one node once the group
		// settles; a stale owner would make it two.
		deadline := time.Now().Add(15 * time.Second)
		for {
			bad := ""
			for i := range accounts {
				owners := 0
				for _, n := range nodes {
					if code, _ := do(t, n, "GET", fmt.Sprintf("/v1/aggregates/account/own-%d", i), nil); code == 200 {
						owners++
					}
				}
				if owners != 1 {
					bad = fmt.Sprintf("own-%d is answered by %d of %d nodes", i, owners, len(nodes))
					break
				}
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
