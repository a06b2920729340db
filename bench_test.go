package esker_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/internal/benchmark"
)

// The write-path benchmarks run on an in-process kfake broker (one per
// iteration) over real TCP with the real franz-go client; see package
// internal/benchmark for the method. One iteration is a whole run (20000
// commands by default; ESKER_BENCH_COMMANDS and ESKER_BENCH_ENTITIES
// change it), so run them with -benchtime 1x, and -count for repetitions:
//
//	go test -run '^$' -bench 'Commands|Baseline' -benchtime 1x -count 3 .
//
// Each reports commands/s, p50-ms and p99-ms (medians over the iterations)
// and records/cmd (output records per command). ESKER_BENCH_CPUPROFILE=DIR
// writes a CPU profile of each run's timed phase alone to
// DIR/<benchmark>-<iteration>.pprof (do not combine with -cpuprofile).

func benchConfig(b *testing.B, brokers []string) benchmark.Config {
	cfg := benchmark.Config{
		Brokers:     brokers,
		Commands:    envInt(b, "ESKER_BENCH_COMMANDS", 20000),
		Entities:    envInt(b, "ESKER_BENCH_ENTITIES", 1000),
		Partitions:  4,
		Concurrency: 8,
		StateDir:    b.TempDir(),
		Logger:      testLogger(),
	}
	cfg.LatencyCommands = min(2000, cfg.Commands)
	if dir := os.Getenv("ESKER_BENCH_CPUPROFILE"); dir != "" {
		benchProfiles[b.Name()]++
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("%s-%d.pprof", strings.ReplaceAll(b.Name(), "/", "_"), benchProfiles[b.Name()])))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { f.Close() })
		cfg.CPUProfile = f
	}
	return cfg
}

var benchProfiles = map[string]int{}

func envInt(b *testing.B, name string, def int) int {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		b.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return n
}

// withBroker starts a fresh kfake cluster for one iteration.
func withBroker(b *testing.B, f func(brokers []string)) {
	b.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.GroupMinSessionTimeout(100*time.Millisecond))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	f(c.ListenAddrs())
}

// eosShape is the output shape the exactly-once benchmark measured, for the
// baseline benchmark run later in the same process.
var (
	eosShapeMu sync.Mutex
	eosShape   *benchmark.Shape
)

func BenchmarkCommandsExactlyOnce(b *testing.B) { benchEsker(b, esker.ExactlyOnce) }

func BenchmarkCommandsAtLeastOnce(b *testing.B) { benchEsker(b, esker.AtLeastOnce) }

func benchEsker(b *testing.B, g esker.Guarantee) {
	var results []benchmark.Result
	for i := 0; i < b.N; i++ {
		withBroker(b, func(brokers []string) {
			cfg := benchConfig(b, brokers)
			cfg.Guarantee = g
			r, err := benchmark.RunEsker(context.Background(), cfg)
			if err != nil {
				b.Fatal(err)
			}
			results = append(results, r)
			if g == esker.ExactlyOnce {
				eosShapeMu.Lock()
				s := r.Shape
				eosShape = &s
				eosShapeMu.Unlock()
			}
		})
	}
	reportMedians(b, results)
}

// BenchmarkBaselineTransactLoop runs the raw franz-go transactional loop
// with the shape BenchmarkCommandsExactlyOnce measured in this process, or,
// when that did not run, with the shape of an esker exactly-once run made
// first (not measured).
func BenchmarkBaselineTransactLoop(b *testing.B) {
	var results []benchmark.Result
	for i := 0; i < b.N; i++ {
		withBroker(b, func(brokers []string) {
			cfg := benchConfig(b, brokers)
			eosShapeMu.Lock()
			shape := eosShape
			eosShapeMu.Unlock()
			if shape == nil {
				b.StopTimer()
				probe := cfg
				probe.LatencyCommands = -1
				r, err := benchmark.RunEsker(context.Background(), probe)
				if err != nil {
					b.Fatal(err)
				}
				shape = &r.Shape
				eosShapeMu.Lock()
				eosShape = shape
				eosShapeMu.Unlock()
				b.StartTimer()
			}
			r, err := benchmark.RunBaseline(context.Background(), cfg, *shape)
			if err != nil {
				b.Fatal(err)
			}
			results = append(results, r)
		})
	}
	reportMedians(b, results)
}

// BenchmarkSuite runs esker exactly-once, at-least-once and the baseline on
// one broker, as "esker bench" does, and logs the report.
func BenchmarkSuite(b *testing.B) {
	for i := 0; i < b.N; i++ {
		withBroker(b, func(brokers []string) {
			results, err := benchmark.Suite(context.Background(), benchConfig(b, brokers))
			if err != nil {
				b.Fatal(err)
			}
			b.Log("\n" + benchmark.Report(results))
			for _, r := range results {
				if r.Name == benchmark.NameExactlyOnce {
					reportMedians(b, []benchmark.Result{r})
				}
			}
		})
	}
}

func reportMedians(b *testing.B, results []benchmark.Result) {
	if len(results) == 0 {
		return
	}
	median := func(f func(benchmark.Result) float64) float64 {
		v := make([]float64, len(results))
		for i, r := range results {
			v[i] = f(r)
		}
		sort.Float64s(v)
		return v[len(v)/2]
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(median(func(r benchmark.Result) float64 { return r.PerSecond }), "commands/s")
	b.ReportMetric(median(func(r benchmark.Result) float64 { return float64(r.P50) / 1e6 }), "p50-ms")
	b.ReportMetric(median(func(r benchmark.Result) float64 { return float64(r.P99) / 1e6 }), "p99-ms")
	b.ReportMetric(median(func(r benchmark.Result) float64 { return r.RecordsPerCommand }), "records/cmd")
	for _, r := range results {
		b.Logf("%s: %d commands in %v (%.0f/s), p50 %v p99 %v, %.3f records/command (event %d B, changelog %d B)",
			r.Name, r.Commands, r.Duration.Round(time.Millisecond), r.PerSecond, r.P50, r.P99,
			r.RecordsPerCommand, r.Shape.EventBytes, r.Shape.ChangelogBytes)
	}
}
