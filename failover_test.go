package esker_test

import (
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/esker-io/esker/aggregate"
)

// BenchmarkFailover measures how long a partition is unavailable when its
// owner dies: two `esker node` processes share the partitions; the owner of
// an account is killed with SIGKILL, and the clock runs until the survivor
// first answers a read of that account. Without standby replicas the
// survivor restores the partition's whole changelog; with one, only the
// tail. Session timeout 1 s.
//
//	go test -run '^$' -bench Failover -benchtime 5x .
func BenchmarkFailover(b *testing.B) {
	b.Run("no-standby", func(b *testing.B) { benchFailover(b) })
	b.Run("standby", func(b *testing.B) { benchFailover(b, "--standby-replicas", "1") })
}

func benchFailover(b *testing.B, extra ...string) {
	var samples []time.Duration
	for i := 0; i < b.N; i++ {
		samples = append(samples, failoverOnce(b, extra...))
	}
	slices.Sort(samples)
	b.ReportMetric(float64(samples[len(samples)/2].Milliseconds()), "median-failover-ms")
	b.ReportMetric(float64(samples[len(samples)-1].Milliseconds()), "max-failover-ms")
	b.Logf("fail-over times: %v", samples)
}

func failoverOnce(b *testing.B, extra ...string) time.Duration {
	b.StopTimer()
	defer b.StartTimer()
	c := newCluster(b)
	brokers := c.ListenAddrs()
	nodes := []*process{
		startProcess(b, brokers, freePort(b), b.TempDir(), extra...),
		startProcess(b, brokers, freePort(b), b.TempDir(), extra...),
	}
	client := &http.Client{Timeout: 5 * time.Second}
	// Wait until the map gives every partition to one of the two nodes.
	var owners map[int32]string
	deadline := time.Now().Add(30 * time.Second)
	for owners == nil || len(owners) < 4 {
		if time.Now().After(deadline) {
			b.Fatalf("cluster did not settle: %v", owners)
		}
		time.Sleep(20 * time.Millisecond)
		owners = clusterOwners(client, nodes[0].url)
	}
	// An account on a partition the first node owns, with some history.
	var id string
	for i := 0; id == ""; i++ {
		cand := fmt.Sprintf("fo-%d", i)
		if owners[aggregate.Partition(cand, 4)] == nodes[0].url {
			id = cand
		}
	}
	post := func(body string) {
		resp, err := client.Post(nodes[1].url+"/v1/aggregates/account/"+id+"/commands", "application/json", stringsReader(body))
		if err != nil || resp.StatusCode != 200 {
			b.Fatalf("command: %v %v", resp, err)
		}
		resp.Body.Close()
	}
	post(`{"type":"Open","data":{"owner":"x"}}`)
	for range 20 {
		post(`{"type":"Deposit","data":{"amount":1}}`)
	}
	nodes[0].kill()
	start := time.Now()
	for {
		resp, err := client.Get(nodes[1].url + "/v1/aggregates/account/" + id)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return time.Since(start)
			}
		}
		if time.Since(start) > 60*time.Second {
			b.Fatal("the survivor never answered")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// clusterOwners returns partition → owner URL from a node's cluster map.
func clusterOwners(client *http.Client, url string) map[int32]string {
	resp, err := client.Get(url + "/v1/cluster")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return nil
	}
	var m struct {
		Members []struct{ ID, URL string }
		Tasks   []struct {
			Partition int32
			Active    string
		}
	}
	if err := jsonDecode(resp.Body, &m); err != nil {
		return nil
	}
	urls := map[string]string{}
	for _, mem := range m.Members {
		urls[mem.ID] = mem.URL
	}
	out := map[int32]string{}
	for _, t := range m.Tasks {
		if u := urls[t.Active]; u != "" {
			out[t.Partition] = u
		}
	}
	return out
}
