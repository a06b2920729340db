package benchmark

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
)

func TestReport(t *testing.T) {
	out := Report([]Result{
		{Name: NameExactlyOnce, Commands: 20000, Duration: 400 * time.Millisecond, PerSecond: 50000, P50: 1500 * time.Microsecond, P99: 3 * time.Millisecond, Samples: 10, RecordsPerCommand: 1.1},
		{Name: NameAtLeastOnce, Commands: 20000, Duration: 380 * time.Millisecond, PerSecond: 52631, RecordsPerCommand: 1.1},
		{Name: NameBaseline, Baseline: true, Commands: 20000, Duration: 80 * time.Millisecond, PerSecond: 250000, P50: 900 * time.Microsecond, P99: 2 * time.Millisecond, Samples: 10, RecordsPerCommand: 1.1},
	})
	t.Log("\n" + out)
	for _, want := range []string{"esker exactly-once ", "0.20x", "1.00x", "1.5ms", "goal: esker exactly-once at >= 0.5x the raw transactional loop: 0.20x, NOT met"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
}

func TestPercentile(t *testing.T) {
	var d []time.Duration
	for i := 1; i <= 100; i++ {
		d = append(d, time.Duration(101-i)*time.Millisecond)
	}
	p50, p99 := latencies(d)
	if p50 != 50*time.Millisecond || p99 != 99*time.Millisecond {
		t.Fatalf("p50 %v p99 %v", p50, p99)
	}
	if percentile(nil, 0.5) != 0 || percentile([]time.Duration{7}, 0.99) != 7 {
		t.Fatal("edge cases")
	}
}

func TestSuiteOnKfake(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a broker and three processors")
	}
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.GroupMinSessionTimeout(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var mu sync.Mutex
	phases := map[string]int{}
	results, err := Suite(context.Background(), Config{
		Brokers: c.ListenAddrs(), Commands: 600, Entities: 50, Partitions: 3,
		Concurrency: 4, LatencyCommands: 40, StateDir: t.TempDir(),
		Progress: func(phase string, done, total int) {
			mu.Lock()
			defer mu.Unlock()
			if done == total {
				phases[phase]++
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + Report(results))
	if len(results) != 3 || !results[2].Baseline {
		t.Fatalf("results: %+v", results)
	}
	for _, r := range results {
		if r.Commands != 600 || r.PerSecond <= 0 || r.Samples != 40 || r.P50 <= 0 || r.P99 < r.P50 {
			t.Errorf("%s: %+v", r.Name, r)
		}
		// One event per deposit plus at least a state and a journal record
		// per account touched.
		if r.Shape.EventsPerCommand != 1 || r.RecordsPerCommand < 1+2*50.0/600 {
			t.Errorf("%s: shape %+v", r.Name, r.Shape)
		}
	}
	if got, want := results[2].RecordsPerCommand, results[0].RecordsPerCommand; got < want-0.01 || got > want+0.01 {
		t.Errorf("baseline wrote %.3f records per command, esker %.3f", got, want)
	}
	for _, p := range []string{"warm-up", "throughput", "count", "latency"} {
		if phases[p] != 3 {
			t.Errorf("phase %s completed %d times, want 3", p, phases[p])
		}
	}
}
