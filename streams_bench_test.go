package esker_test

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker"
)

// BenchmarkEntityStream measures reading one entity's 100 events among
// 1,000,000 events in its partition (one partition; ESKER_BENCH_ENTITIES
// changes the 10,000 entities), over HTTP (GET …/events) and from Go
// (Node.Events), one read at a time: p50 and p99 latency. Setting up writes
// the million events through the node (commands produced to the topic) and
// takes a while.
func BenchmarkEntityStream(b *testing.B) {
	entities := 10_000
	if s := os.Getenv("ESKER_BENCH_ENTITIES"); s != "" {
		entities, _ = strconv.Atoi(s)
	}
	const perEntity = 100
	c := newCluster(b)
	brokers := c.ListenAddrs()
	tn := startNode(b, brokers, b.TempDir(), esker.Partitions(1))
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ProducerLinger(5*time.Millisecond))
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	ctx := context.Background()
	id := func(i int) string { return fmt.Sprintf("s-%05d", i) }
	start := time.Now()
	for v := 1; v <= perEntity; v++ {
		recs := make([]*kgo.Record, 0, entities)
		for i := range entities {
			value := `{"type":"Deposit","data":{"amount":1},"commandId":"d-` + id(i) + `-` + strconv.Itoa(v) + `"}`
			if v == 1 {
				value = `{"type":"Open","data":{"owner":"o"},"commandId":"open-` + id(i) + `"}`
			}
			recs = append(recs, &kgo.Record{Topic: "account-commands", Key: []byte(id(i)), Value: []byte(value)})
		}
		if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
			b.Fatal(err)
		}
	}
	for i := range entities {
		if _, err := tn.State(ctx, "account", id(i), perEntity, 5*time.Minute); err != nil {
			b.Fatalf("%s: %v", id(i), err)
		}
	}
	b.Logf("%d events in one partition written in %v", entities*perEntity, time.Since(start).Round(time.Millisecond))

	rng := rand.New(rand.NewPCG(1, 1))
	viaHTTP := make([]time.Duration, 0, b.N)
	viaGo := make([]time.Duration, 0, b.N)
	client := &http.Client{}
	b.ResetTimer()
	for range b.N {
		e := id(rng.IntN(entities))
		t0 := time.Now()
		resp, err := client.Get(tn.srv.URL + "/v1/aggregates/account/" + e + "/events?from=1&limit=100")
		if err != nil || resp.StatusCode != 200 {
			b.Fatalf("GET events of %s: %v %v", e, resp, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		viaHTTP = append(viaHTTP, time.Since(t0))
		t0 = time.Now()
		evs, err := tn.Events(ctx, "account", e, 1, perEntity)
		if err != nil || len(evs) != perEntity {
			b.Fatalf("Events of %s: %d, %v", e, len(evs), err)
		}
		viaGo = append(viaGo, time.Since(t0))
	}
	b.StopTimer()
	pct := func(s []time.Duration, q float64) float64 {
		slices.Sort(s)
		return float64(s[int(q*float64(len(s)-1))].Microseconds()) / 1000
	}
	b.ReportMetric(pct(viaHTTP, 0.5), "http-p50-ms")
	b.ReportMetric(pct(viaHTTP, 0.99), "http-p99-ms")
	b.ReportMetric(pct(viaGo, 0.5), "go-p50-ms")
	b.ReportMetric(pct(viaGo, 0.99), "go-p99-ms")
}
