package esker_test

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/internal/engine"
)

// BenchmarkFailover measures how long a partition is unavailable when its
// owner dies: two `esker node` processes share 4 partitions; the owner of an
// account is killed with SIGKILL, and the clock runs until the survivor
// first answers a read of that account. Without standby replicas the
// survivor restores the partition's whole changelog; with one, only the
// tail. Session timeout 1 s.
//
// Sub-benchmarks: the history of the killed node's partitions (a few
// records, or about 25,000 changelog records per partition), and whether
// commands keep arriving for the killed node's partitions (idle or loaded:
// then the dead node's last transaction is open when it dies).
//
//	go test -run '^$' -bench Failover -benchtime 5x .
func BenchmarkFailover(b *testing.B) {
	for _, history := range []int{0, 50_000} {
		for _, load := range []bool{false, true} {
			for _, standby := range []bool{false, true} {
				name := fmt.Sprintf("history=%d/load=%v/standby=%v", history, load, standby)
				b.Run(name, func(b *testing.B) {
					var extra []string
					if standby {
						extra = []string{"--standby-replicas", "1"}
					}
					benchFailover(b, history, load, extra...)
				})
			}
		}
	}
}

func benchFailover(b *testing.B, history int, load bool, extra ...string) {
	var samples []time.Duration
	var fenced, restored float64
	for i := 0; i < b.N; i++ {
		took, f, r := failoverOnce(b, history, load, extra...)
		samples = append(samples, took)
		fenced += f
		restored += r
	}
	b.ReportMetric(fenced/float64(b.N), "fenced-txns/op")
	b.ReportMetric(restored/float64(b.N), "restored-records/op")
	slices.Sort(samples)
	b.ReportMetric(float64(samples[len(samples)/2].Milliseconds()), "median-failover-ms")
	b.ReportMetric(float64(samples[len(samples)-1].Milliseconds()), "max-failover-ms")
	b.Logf("fail-over times: %v", samples)
}

// failoverOnce runs one fail-over and returns its duration, how many open
// transactions the survivor fenced, and how many changelog records it
// restored. history accounts are opened first (by producing their commands
// straight to the commands topic), spread over the partitions; with load, a
// producer keeps sending deposits to accounts of the killed node's
// partitions until the survivor answers.
func failoverOnce(b *testing.B, history int, load bool, extra ...string) (time.Duration, float64, float64) {
	b.StopTimer()
	defer b.StartTimer()
	c := newCluster(b)
	brokers := c.ListenAddrs()
	nodes := []*process{
		startProcess(b, brokers, freePort(b), b.TempDir(), extra...),
		startProcess(b, brokers, freePort(b), b.TempDir(), extra...),
	}
	client := &http.Client{Timeout: 5 * time.Second}
	owners := waitOwners(b, client, nodes[0].url)
	// Accounts on partitions the first node owns, with some history.
	var ids []string
	for i := 0; len(ids) < 8; i++ {
		cand := fmt.Sprintf("fo-%d", i)
		if owners[aggregate.Partition(cand, 4)] == nodes[0].url {
			ids = append(ids, cand)
		}
	}
	id := ids[0]
	post := func(body string) {
		resp, err := client.Post(nodes[1].url+"/v1/aggregates/account/"+id+"/commands", "application/json", stringsReader(body))
		if err != nil || resp.StatusCode != 200 {
			b.Fatalf("command: %v %v", resp, err)
		}
		resp.Body.Close()
	}
	for _, other := range ids[1:] {
		resp, err := client.Post(nodes[1].url+"/v1/aggregates/account/"+other+"/commands", "application/json", stringsReader(`{"type":"Open","data":{"owner":"x"}}`))
		if err != nil || resp.StatusCode != 200 {
			b.Fatalf("command: %v %v", resp, err)
		}
		resp.Body.Close()
	}
	post(`{"type":"Open","data":{"owner":"x"}}`)
	for range 20 {
		post(`{"type":"Deposit","data":{"amount":1}}`)
	}
	producer, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		b.Fatal(err)
	}
	defer producer.Close()
	if history > 0 {
		preload(b, producer, client, nodes[1].url, history)
	}
	stopLoad := func() {}
	if load {
		stopLoad = keepSending(producer, ids[1:])
		time.Sleep(500 * time.Millisecond) // the owner is mid-transaction when it dies
	}
	defer stopLoad()
	restoredBefore := scrapeSum(b, nodes[1].url, "esker_restore_records_total")
	nodes[0].kill()
	start := time.Now()
	for {
		resp, err := client.Get(nodes[1].url + "/v1/aggregates/account/" + id)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				took := time.Since(start)
				return took, scrapeSum(b, nodes[1].url, "esker_fenced_transactions_total"),
					scrapeSum(b, nodes[1].url, "esker_restore_records_total") - restoredBefore
			}
		}
		if time.Since(start) > 60*time.Second {
			b.Fatal("the survivor never answered")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// preload opens n accounts by producing their commands to the commands
// topic, and waits until the nodes processed them all.
func preload(b *testing.B, producer *kgo.Client, client *http.Client, url string, n int) {
	ctx := context.Background()
	last := map[int32]string{}
	for i := range n {
		acct := fmt.Sprintf("pre-%d", i)
		p := aggregate.Partition(acct, 4)
		last[p] = acct
		producer.Produce(ctx, engine.CommandRecord("account", acct, p, aggregate.Command{Type: "Open", Data: []byte(`{"owner":"p"}`)}),
			func(_ *kgo.Record, err error) {
				if err != nil {
					b.Errorf("produce: %v", err)
				}
			})
	}
	if err := producer.Flush(ctx); err != nil {
		b.Fatal(err)
	}
	// Commands of one partition are processed in order: once its last
	// account exists, all of them do.
	deadline := time.Now().Add(2 * time.Minute)
	for _, acct := range last {
		for {
			resp, err := client.Get(url + "/v1/aggregates/account/" + acct)
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == 200 {
					break
				}
			}
			if time.Now().After(deadline) {
				b.Fatal("preloaded commands were not processed")
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// keepSending produces deposits to the accounts, about 1,000 a second,
// until the returned function is called.
func keepSending(producer *kgo.Client, accounts []string) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for i := 0; ctx.Err() == nil; i++ {
			<-tick.C
			acct := accounts[i%len(accounts)]
			producer.Produce(ctx, engine.CommandRecord("account", acct, aggregate.Partition(acct, 4),
				aggregate.Command{Type: "Deposit", Data: []byte(`{"amount":1}`)}), nil)
		}
	}()
	return func() { cancel(); <-done }
}

// waitOwners waits until the node at url has a map that gives each of the 4
// partitions an owner, and returns partition → owner URL.
func waitOwners(t testing.TB, client *http.Client, url string) map[int32]string {
	t.Helper()
	var owners map[int32]string
	for deadline := time.Now().Add(30 * time.Second); len(owners) < 4; {
		if time.Now().After(deadline) {
			t.Fatalf("cluster did not settle: %v", owners)
		}
		time.Sleep(20 * time.Millisecond)
		owners = clusterOwners(client, url)
	}
	return owners
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
