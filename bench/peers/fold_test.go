package peers

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"testing"
	"time"
)

// BenchmarkProjectionFold folds the shared workload (PEERS_EVENTS events,
// default 200 000, over 2 000 accounts and 8 partitions of
// "account-events") with esker and with goka, one fresh application or
// group per iteration, on the same embedded broker. events/s is the
// workload divided by the time from start until every event was folded
// (ns/op is that time per fold; median-events/s the median fold);
// events/cpu-s divides it by the CPU time the process used meanwhile
// (broker included), which other load on the machine disturbs far less.
func BenchmarkProjectionFold(b *testing.B) {
	w := setup(b)
	b.Run("esker", func(b *testing.B) {
		benchFold(b, func() foldResult { return runEsker(b, w, nextID("esker"), false) })
	})
	b.Run("goka", func(b *testing.B) {
		benchFold(b, func() foldResult { return runGoka(b, w, nextID("goka"), false) })
	})
}

// BenchmarkProjectionFoldPairs runs esker and goka back to back in every
// iteration (esker first in even iterations, goka first in odd ones), so
// that on a noisy machine each ratio compares two folds run moments apart:
// it reports both sides' median events/s and the medians of the pairs'
// esker/goka ratios of events/s (esker/goka) and of events per CPU second
// (cpu-esker/goka).
func BenchmarkProjectionFoldPairs(b *testing.B) {
	w := setup(b)
	var eskerRates, gokaRates, ratios, cpuRatios []float64
	for i := range b.N {
		var e, g foldResult
		if i%2 == 0 {
			e = runEsker(b, w, nextID("esker"), false)
			g = runGoka(b, w, nextID("goka"), false)
		} else {
			g = runGoka(b, w, nextID("goka"), false)
			e = runEsker(b, w, nextID("esker"), false)
		}
		er, gr := e.rate(), g.rate()
		eskerRates, gokaRates = append(eskerRates, er), append(gokaRates, gr)
		ratios, cpuRatios = append(ratios, er/gr), append(cpuRatios, e.cpuRate()/g.cpuRate())
		b.Logf("pair %d: esker %s | goka %s | esker/goka %.2fx, per CPU second %.2fx",
			i, e, g, er/gr, e.cpuRate()/g.cpuRate())
	}
	b.ReportMetric(median(eskerRates), "esker-events/s")
	b.ReportMetric(median(gokaRates), "goka-events/s")
	b.ReportMetric(median(ratios), "esker/goka")
	b.ReportMetric(median(cpuRatios), "cpu-esker/goka")
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func (r foldResult) rate() float64    { return float64(totalEvents) / r.elapsed.Seconds() }
func (r foldResult) cpuRate() float64 { return float64(totalEvents) / r.cpu.Seconds() }

func (r foldResult) String() string {
	s := fmt.Sprintf("%.0f events/s (%v, first fold after %v, %.0f events/cpu-s)",
		r.rate(), r.elapsed.Round(time.Millisecond), r.first.Round(time.Millisecond), r.cpuRate())
	if r.persisted > 0 {
		s += fmt.Sprintf(", table persisted after %v", r.persisted.Round(time.Millisecond))
	}
	return s
}

func benchFold(b *testing.B, run func() foldResult) {
	var elapsed, first, persisted, cpu time.Duration
	var rates []float64
	for range b.N {
		r := run()
		elapsed += r.elapsed
		first += r.first
		persisted += r.persisted
		cpu += r.cpu
		rates = append(rates, r.rate())
		b.Log("fold: " + r.String())
	}
	n := float64(b.N)
	b.ReportMetric(float64(elapsed.Nanoseconds())/n, "ns/op")
	b.ReportMetric(float64(totalEvents)*n/elapsed.Seconds(), "events/s")
	b.ReportMetric(median(rates), "median-events/s")
	b.ReportMetric(float64(totalEvents)*n/cpu.Seconds(), "events/cpu-s")
	b.ReportMetric(first.Seconds()*1000/n, "first-fold-ms")
	if persisted > 0 {
		b.ReportMetric(float64(totalEvents)*n/persisted.Seconds(), "persisted-events/s")
	}
}

// TestFoldsAgree runs each side once and checks every account's row
// against the fold computed while producing the events.
func TestFoldsAgree(t *testing.T) {
	if testing.Short() {
		t.Skip("folds the whole workload")
	}
	w := setup(t)
	r := runEsker(t, w, nextID("esker"), true)
	t.Logf("esker: %s", r)
	r = runGoka(t, w, nextID("goka"), true)
	t.Logf("goka: %s", r)
}

var profileSeq int

// startProfile profiles the timed phase of one fold into
// $PEERS_CPUPROFILE/<side>-<n>.pprof when PEERS_CPUPROFILE names a
// directory (go tool pprof merges several files).
func startProfile(tb testing.TB, side string) (stop func()) {
	dir := os.Getenv("PEERS_CPUPROFILE")
	if dir == "" {
		return func() {}
	}
	profileSeq++
	f, err := os.Create(filepath.Join(dir, fmt.Sprintf("%s-%d.pprof", side, profileSeq)))
	if err != nil {
		tb.Fatal(err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		tb.Fatal(err)
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}
}
