package esker_test

import (
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/esker-io/esker/aggregate"
)

// BenchmarkGetLocalVsForwarded measures GET latency of one account read
// from its owner (local) and from the other node (one forwarded hop), at a
// fixed rate of 500 requests/s per path, two in-process nodes.
//
//	go test -run '^$' -bench GetLocalVsForwarded -benchtime 2000x .
func BenchmarkGetLocalVsForwarded(b *testing.B) {
	c := newCluster(b)
	nodes := []*testNode{startNode(b, c.ListenAddrs(), b.TempDir()), startNode(b, c.ListenAddrs(), b.TempDir())}
	owners := map[int32]string{}
	for deadline := time.Now().Add(15 * time.Second); len(owners) < 4; {
		if time.Now().After(deadline) {
			b.Fatal("cluster did not settle")
		}
		time.Sleep(20 * time.Millisecond)
		owners = clusterOwners(http.DefaultClient, nodes[0].srv.URL)
	}
	var id string
	for i := 0; id == ""; i++ {
		if cand := fmt.Sprintf("lat-%d", i); owners[aggregate.Partition(cand, 4)] == nodes[0].srv.URL {
			id = cand
		}
	}
	if code, body := do(b, nodes[0], "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Open", map[string]any{"owner": "x"})); code != 200 {
		b.Fatalf("open: %d %v", code, body)
	}
	measure := func(n *testNode) []time.Duration {
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		out := make([]time.Duration, 0, b.N)
		for range b.N {
			<-tick.C
			start := time.Now()
			resp, err := http.Get(n.srv.URL + "/v1/aggregates/account/" + id)
			if err != nil || resp.StatusCode != 200 {
				b.Fatalf("GET: %v %v", resp, err)
			}
			resp.Body.Close()
			out = append(out, time.Since(start))
		}
		slices.Sort(out)
		return out
	}
	b.ResetTimer()
	local, forwarded := measure(nodes[0]), measure(nodes[1])
	b.StopTimer()
	pct := func(s []time.Duration, q float64) float64 {
		return float64(s[int(q*float64(len(s)-1))].Microseconds())
	}
	b.ReportMetric(pct(local, 0.5), "local-p50-µs")
	b.ReportMetric(pct(local, 0.99), "local-p99-µs")
	b.ReportMetric(pct(forwarded, 0.5), "forwarded-p50-µs")
	b.ReportMetric(pct(forwarded, 0.99), "forwarded-p99-µs")
}
