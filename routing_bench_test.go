package esker_test

import (
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/internal/testcert"
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
	b.ResetTimer()
	local := measureGets(b, http.DefaultClient, nodes[0].srv.URL+"/v1/aggregates/account/"+id)
	forwarded := measureGets(b, http.DefaultClient, nodes[1].srv.URL+"/v1/aggregates/account/"+id)
	b.StopTimer()
	reportLatency(b, "local", local)
	reportLatency(b, "forwarded", forwarded)
}

// BenchmarkGetForwardedMutualTLS is BenchmarkGetLocalVsForwarded with the
// nodes serving HTTPS and forwarding over mutual TLS (esker.HTTPTLS,
// esker.PeerTLS); the client keeps its connections alive, as the nodes do.
//
//	go test -run '^$' -bench 'GetLocalVsForwarded|GetForwardedMutualTLS' -benchtime 2000x .
func BenchmarkGetForwardedMutualTLS(b *testing.B) {
	brokers := newCluster(b).ListenAddrs()
	ca := testcert.NewAuthority(b, "esker nodes")
	nodes := []*tlsNode{startTLSNode(b, brokers, ca, "a"), startTLSNode(b, brokers, ca, "b")}
	client := tlsClient(&tls.Config{RootCAs: ca.Pool})
	var owners map[int32]string
	waitUntil(b, "each node to own a partition", func() bool {
		owners = clusterOwners(client, nodes[0].url)
		other := clusterOwners(client, nodes[1].url)
		return nodes[0].Ready() == nil && nodes[1].Ready() == nil && len(owners) == 2 &&
			owners[0] != owners[1] && fmt.Sprint(owners) == fmt.Sprint(other)
	})
	var id string
	for i := 0; id == ""; i++ {
		if cand := fmt.Sprintf("lat-%d", i); owners[aggregate.Partition(cand, 2)] == nodes[0].url {
			id = cand
		}
	}
	if code, body, err := tlsDo(b, client, "POST", nodes[0].url+"/v1/aggregates/account/"+id+"/commands", cmd("Open", map[string]any{"owner": "x"})); err != nil || code != 200 {
		b.Fatalf("open: %d %v %v", code, body, err)
	}
	b.ResetTimer()
	local := measureGets(b, client, nodes[0].url+"/v1/aggregates/account/"+id)
	forwarded := measureGets(b, client, nodes[1].url+"/v1/aggregates/account/"+id)
	b.StopTimer()
	reportLatency(b, "local", local)
	reportLatency(b, "forwarded", forwarded)
}

// measureGets sends b.N GETs of url with client at 500 requests/s and
// returns their latencies, sorted.
func measureGets(b *testing.B, client *http.Client, url string) []time.Duration {
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	out := make([]time.Duration, 0, b.N)
	for range b.N {
		<-tick.C
		start := time.Now()
		resp, err := client.Get(url)
		if err != nil || resp.StatusCode != 200 {
			b.Fatalf("GET: %v %v", resp, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		out = append(out, time.Since(start))
	}
	slices.Sort(out)
	return out
}

// reportLatency reports the p50 and p99 of sorted latencies as name-p50-µs
// and name-p99-µs.
func reportLatency(b *testing.B, name string, sorted []time.Duration) {
	pct := func(q float64) float64 {
		return float64(sorted[int(q*float64(len(sorted)-1))].Microseconds())
	}
	b.ReportMetric(pct(0.5), name+"-p50-µs")
	b.ReportMetric(pct(0.99), name+"-p99-µs")
}
