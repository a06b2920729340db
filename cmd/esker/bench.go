package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/changelog"
	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/internal/benchmark"
)

// benchApp is the application id of the benchmark's esker node (the
// benchmark package's default), which names its group and changelog topic.
const benchApp = "bank"

func benchAbout() string {
	typ := bank.Account.Name()
	return fmt.Sprintf(`
Measures esker's write path on a Kafka cluster: how many commands per second
a node of the bank demo (package examples/bank) processes exactly-once and
at-least-once, against a raw franz-go transactional consume-process-produce
loop (kgo.GroupTransactSession) that writes as many records per command, of
the same sizes, on the same cluster: the Kafka cost of esker's write path
without esker. It also measures the latency of single commands.

A run has three parts: esker exactly-once, esker at-least-once and the
baseline loop. Each part resets its topics, starts its processor, opens
--entities accounts (untimed), then times --commands Deposit commands,
produced as fast as possible while they are processed, until the last one is
committed; then --concurrency goroutines send --latency-commands commands in
all, one at a time each, and wait for every outcome (p50, p99). The whole run
is repeated --runs times: each run's table is printed as it ends, then the
median of every figure with the exactly-once/baseline ratio, the machine, the
date and the command line.

By default everything runs in this process: an embedded Kafka-protocol broker
(franz-go's kfake, one broker) on a free port of 127.0.0.1 with a temporary
data directory that is removed at the end. Its figures are kfake's, not a
real Kafka's, and the producer, the broker and the processor share this
machine's CPUs.

WARNING: with --brokers the benchmark runs on that cluster and DELETES and
recreates the topics
  %s, %s, %s,
  %s, %s and %s
and deletes the consumer groups %s and %s, with all their data.
Use it only on a scratch cluster, never on one that runs the bank demo or
holds anything you want to keep.`,
		typ+"-commands", typ+"-events", changelog.Topic(benchApp, typ),
		benchmark.BaselineCommandsTopic, benchmark.BaselineEventsTopic, benchmark.BaselineChangelogTopic,
		benchApp, benchmark.BaselineGroup)
}

func runBench(e *env, args []string) int {
	fs := newFlagSet("bench", "esker bench [flags]", benchAbout())
	fs.examples = `
esker bench
esker bench --commands 20000 --entities 500 --runs 1 --latency-commands 0
esker bench --brokers scratch-kafka:9092 --partitions 8 --cpuprofile eos.prof`
	commands := fs.Int("commands", 50000, "`number` of timed Deposit commands per part of a run")
	entities := fs.Int("entities", 1000, "`number` of accounts the commands spread over (at most --commands)")
	partitions := fs.Int("partitions", 4, "partition `count` of every topic")
	concurrency := fs.Int("concurrency", 8, "`number` of goroutines of the latency phase, each sending one command at a time")
	latencyCommands := fs.Int("latency-commands", 2000, "`number` of commands of the latency phase, in all (not per goroutine); 0 skips the phase")
	runs := fs.Int("runs", 3, "`number` of times to run the whole suite; the summary shows the medians")
	projections := fs.Bool("projections", false, "also run exactly-once with the bank's owners and daily-totals projections on the node (their cost on the write path)")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile (pprof) of the first run's exactly-once timed phase to `file`")
	brokers := fs.String("brokers", "", "comma-separated seed `brokers` of an existing SCRATCH cluster to use instead of the embedded broker: "+
		"the benchmark DELETES and recreates its topics and groups, the bank demo's included (see above)")
	// The node's info logs would interleave with the progress lines.
	var level slog.Level
	fs.TextVar(&level, "log-level", slog.LevelWarn, "log `level`: debug, info (the node's and the benchmark's own logs), warn or error")
	if code, ok := fs.parse(e, args); !ok {
		return code
	}
	switch {
	case *commands < 1:
		return fs.fail(e, "--commands must be at least 1, got %d", *commands)
	case *entities < 1:
		return fs.fail(e, "--entities must be at least 1, got %d", *entities)
	case *entities > *commands:
		return fs.fail(e, "--entities (%d) must not exceed --commands (%d): every account gets at least one timed command", *entities, *commands)
	case *partitions < 1 || *partitions > 100000:
		return fs.fail(e, "--partitions must be between 1 and 100000, got %d", *partitions)
	case *concurrency < 1:
		return fs.fail(e, "--concurrency must be at least 1, got %d", *concurrency)
	case *latencyCommands < 0:
		return fs.fail(e, "--latency-commands must be 0 (skip the latency phase) or more, got %d", *latencyCommands)
	case *runs < 1:
		return fs.fail(e, "--runs must be at least 1, got %d", *runs)
	}
	var seeds []string
	if *brokers != "" {
		var err error
		if seeds, err = parseBrokers(*brokers); err != nil {
			return fs.fail(e, "%v", err)
		}
	}

	fail := func(format string, args ...any) int {
		fmt.Fprintf(e.stderr, "esker bench: "+format+"\n", args...)
		return 1
	}
	logger := newLogger(e.stderr, level)
	tmp, err := os.MkdirTemp("", "esker-bench-")
	if err != nil {
		return fail("%v", err)
	}
	defer os.RemoveAll(tmp)

	var profile *os.File
	if *cpuProfile != "" {
		if profile, err = os.Create(*cpuProfile); err != nil {
			return fail("--cpuprofile: %v", err)
		}
		defer profile.Close()
	}

	cluster := "embedded kfake broker (1 broker, in this process)"
	if seeds == nil {
		broker, err := kfake.NewCluster(
			kfake.NumBrokers(1),
			kfake.GroupMinSessionTimeout(100*time.Millisecond),
			kfake.DataDir(filepath.Join(tmp, "kafka")),
			kfake.WithLogger(kfakeLogger{logger.With("component", "kafka")}),
		)
		if err != nil {
			return fail("start the embedded Kafka broker: %v", err)
		}
		// Close before the data directory is removed.
		defer broker.Close()
		seeds = broker.ListenAddrs()
		fmt.Fprintf(e.stderr, "esker bench: embedded Kafka broker on %s\n", seeds[0])
	} else {
		cluster = "existing cluster at " + strings.Join(seeds, ",")
		fmt.Fprintf(e.stderr, "esker bench: WARNING: using the cluster at %s, deleting and recreating the benchmark's topics and groups\n", strings.Join(seeds, ","))
	}
	defer onShutdown(e, "bench")()

	cfg := benchmark.Config{
		Brokers:         seeds,
		Commands:        *commands,
		Entities:        *entities,
		Partitions:      int32(*partitions),
		Concurrency:     *concurrency,
		LatencyCommands: *latencyCommands,
		AppID:           benchApp,
		StateDir:        filepath.Join(tmp, "state"),
		Logger:          logger,
		Projections:     *projections,
	}
	if cfg.LatencyCommands == 0 {
		cfg.LatencyCommands = -1 // the package's way to skip the phase
	}

	var all [][]benchmark.Result
	for i := 1; i <= *runs; i++ {
		var prof io.Writer
		if i == 1 && profile != nil {
			prof = profile
		}
		results, err := benchSuite(e.ctx, cfg, prof, &benchProgress{w: e.stderr, run: fmt.Sprintf("run %d/%d", i, *runs)})
		if err != nil {
			if e.ctx.Err() != nil {
				return fail("run %d/%d: interrupted", i, *runs)
			}
			return fail("run %d/%d: %v", i, *runs, err)
		}
		all = append(all, results)
		fmt.Fprintf(e.stdout, "\nRun %d/%d\n%s", i, *runs, benchmark.Report(results))
	}

	fmt.Fprintln(e.stdout)
	writeBenchSummary(e.stdout, all)
	fmt.Fprintf(e.stdout, `
command   %s
settings  %d commands over %d accounts, %d partitions; latency phase: %s; %d %s
cluster   %s
machine   %s
build     %s
date      %s
`, benchCommandLine(args), *commands, *entities, *partitions, latencySetting(*latencyCommands, *concurrency), *runs, plural(*runs, "run", "runs"),
		cluster, machine(), versionString(), time.Now().Format("2006-01-02 15:04:05 MST"))
	if profile != nil {
		if err := profile.Close(); err != nil {
			return fail("--cpuprofile: %v", err)
		}
		fmt.Fprintf(e.stdout, "profile   %s (run 1, esker exactly-once, timed phase): go tool pprof %s\n", *cpuProfile, *cpuProfile)
	}
	return 0
}

// benchSuite runs what benchmark.Suite runs, in the same order, but profiles
// only the exactly-once part and tells progress which part is running.
func benchSuite(ctx context.Context, cfg benchmark.Config, profile io.Writer, p *benchProgress) ([]benchmark.Result, error) {
	var results []benchmark.Result
	part := func(name string, run func(benchmark.Config) (benchmark.Result, error)) error {
		c := cfg
		c.Progress = p.part(name)
		r, err := run(c)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		p.done(r)
		results = append(results, r)
		return nil
	}
	if err := part(benchmark.NameExactlyOnce, func(c benchmark.Config) (benchmark.Result, error) {
		c.Guarantee, c.CPUProfile, c.Projections = esker.ExactlyOnce, profile, false
		return benchmark.RunEsker(ctx, c)
	}); err != nil {
		return nil, err
	}
	if cfg.Projections {
		if err := part(benchmark.NameProjections, func(c benchmark.Config) (benchmark.Result, error) {
			c.Guarantee = esker.ExactlyOnce
			return benchmark.RunEsker(ctx, c)
		}); err != nil {
			return nil, err
		}
	}
	if err := part(benchmark.NameAtLeastOnce, func(c benchmark.Config) (benchmark.Result, error) {
		c.Guarantee, c.Projections = esker.AtLeastOnce, false
		return benchmark.RunEsker(ctx, c)
	}); err != nil {
		return nil, err
	}
	if err := part(benchmark.NameBaseline, func(c benchmark.Config) (benchmark.Result, error) {
		return benchmark.RunBaseline(ctx, c, results[0].Shape)
	}); err != nil {
		return nil, err
	}
	return results, nil
}

// benchProgress prints progress lines such as
// "run 1/3 · esker exactly-once · throughput 24000/50000": at most one per
// phase every ~half second, and one when the phase is complete.
type benchProgress struct {
	w   io.Writer
	run string // "run 1/3"

	mu      sync.Mutex
	name    string // the part running
	printed map[string]time.Time
	ended   map[string]bool
}

// part starts a part of the run and returns its Config.Progress.
func (p *benchProgress) part(name string) func(phase string, done, total int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.name, p.printed, p.ended = name, map[string]time.Time{}, map[string]bool{}
	fmt.Fprintf(p.w, "%s · %s · starting\n", p.run, name)
	return p.report
}

func (p *benchProgress) report(phase string, done, total int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ended[phase] {
		return
	}
	now := time.Now()
	complete := done >= total
	if last, ok := p.printed[phase]; ok && !complete && now.Sub(last) < 400*time.Millisecond {
		return
	}
	p.printed[phase] = now
	if complete {
		p.ended[phase] = true
	}
	if phase == "count" {
		// Two calls, (0, 1) and (1, 1): say what it is doing, once.
		if !complete {
			fmt.Fprintf(p.w, "%s · %s · counting the records written\n", p.run, p.name)
		}
		return
	}
	fmt.Fprintf(p.w, "%s · %s · %s %d/%d\n", p.run, p.name, phase, done, total)
}

func (p *benchProgress) done(r benchmark.Result) {
	p.mu.Lock()
	defer p.mu.Unlock()
	line := fmt.Sprintf("%s · %s · %.0f commands/s", p.run, r.Name, r.PerSecond)
	if r.Samples > 0 {
		line += fmt.Sprintf(", p50 %s, p99 %s", benchmark.FormatDuration(r.P50), benchmark.FormatDuration(r.P99))
	}
	fmt.Fprintln(p.w, line)
}

// benchMedians returns, per run name in the order of the first run, a
// Result whose every figure is the median of that figure over the runs.
func benchMedians(all [][]benchmark.Result) []benchmark.Result {
	if len(all) == 0 {
		return nil
	}
	var out []benchmark.Result
	for _, first := range all[0] {
		var rs []benchmark.Result
		for _, run := range all {
			for _, r := range run {
				if r.Name == first.Name {
					rs = append(rs, r)
				}
			}
		}
		m := first
		m.Commands = int(median(rs, func(r benchmark.Result) float64 { return float64(r.Commands) }))
		m.Duration = time.Duration(median(rs, func(r benchmark.Result) float64 { return float64(r.Duration) }))
		m.PerSecond = median(rs, func(r benchmark.Result) float64 { return r.PerSecond })
		m.P50 = time.Duration(median(rs, func(r benchmark.Result) float64 { return float64(r.P50) }))
		m.P99 = time.Duration(median(rs, func(r benchmark.Result) float64 { return float64(r.P99) }))
		m.Samples = int(median(rs, func(r benchmark.Result) float64 { return float64(r.Samples) }))
		m.RecordsPerCommand = median(rs, func(r benchmark.Result) float64 { return r.RecordsPerCommand })
		m.Shape.RecordsPerCommand = m.RecordsPerCommand
		out = append(out, m)
	}
	return out
}

// median is the median of f over rs; with an even count, the mean of the
// middle two.
func median[T any](rs []T, f func(T) float64) float64 {
	if len(rs) == 0 {
		return 0
	}
	v := make([]float64, len(rs))
	for i, r := range rs {
		v[i] = f(r)
	}
	sort.Float64s(v)
	if n := len(v); n%2 == 0 {
		return (v[n/2-1] + v[n/2]) / 2
	}
	return v[len(v)/2]
}

// writeBenchSummary writes the table of medians, each run's throughput and
// the ratios of the esker runs to the baseline.
func writeBenchSummary(w io.Writer, all [][]benchmark.Result) {
	medians := benchMedians(all)
	if len(all) == 1 {
		fmt.Fprintf(w, "Summary (1 run)\n")
	} else {
		fmt.Fprintf(w, "Summary: median of %d runs\n", len(all))
	}
	fmt.Fprint(w, benchmark.Report(medians))
	if len(all) > 1 {
		width := len("commands/s")
		for _, m := range medians {
			width = max(width, len(m.Name))
		}
		fmt.Fprintln(w)
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintf(tw, "%-*s\t", width, "commands/s")
		for i := range all {
			fmt.Fprintf(tw, "run %d\t", i+1)
		}
		fmt.Fprint(tw, "median\t\n")
		for _, m := range medians {
			fmt.Fprintf(tw, "%-*s\t", width, m.Name)
			for _, run := range all {
				r, _ := resultNamed(run, m.Name)
				fmt.Fprintf(tw, "%.0f\t", r.PerSecond)
			}
			fmt.Fprintf(tw, "%.0f\t\n", m.PerSecond)
		}
		tw.Flush()
	}
	fmt.Fprintln(w)
	for _, name := range []string{benchmark.NameExactlyOnce, benchmark.NameAtLeastOnce} {
		var ratios []float64
		for _, run := range all {
			r, ok1 := resultNamed(run, name)
			b, ok2 := resultNamed(run, benchmark.NameBaseline)
			if ok1 && ok2 && b.PerSecond > 0 {
				ratios = append(ratios, r.PerSecond/b.PerSecond)
			}
		}
		if len(ratios) == 0 {
			continue
		}
		line := fmt.Sprintf("%s vs baseline: %.2fx", name, median(ratios, func(f float64) float64 { return f }))
		if len(ratios) > 1 {
			s := make([]string, len(ratios))
			for i, r := range ratios {
				s[i] = fmt.Sprintf("%.2fx", r)
			}
			line += fmt.Sprintf(" (median of the runs' ratios %s)", strings.Join(s, ", "))
		}
		fmt.Fprintln(w, line)
	}
}

func resultNamed(rs []benchmark.Result, name string) (benchmark.Result, bool) {
	for _, r := range rs {
		if r.Name == name {
			return r, true
		}
	}
	return benchmark.Result{}, false
}

func latencySetting(commands, concurrency int) string {
	if commands == 0 {
		return "skipped"
	}
	return fmt.Sprintf("%d commands from %d %s", commands, concurrency, plural(concurrency, "goroutine", "goroutines"))
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// benchCommandLine is the command as typed, quoted for a POSIX shell.
func benchCommandLine(args []string) string {
	parts := []string{"esker", "bench"}
	for _, a := range args {
		parts = append(parts, shellQuote(a))
	}
	return strings.Join(parts, " ")
}

func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_=.,:/@%+") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// machine describes this machine: CPUs, platform and, when /proc/cpuinfo
// says, the CPU model.
func machine() string {
	s := fmt.Sprintf("%d %s, %s/%s", runtime.NumCPU(), plural(runtime.NumCPU(), "CPU", "CPUs"), runtime.GOOS, runtime.GOARCH)
	if m := cpuModel(); m != "" {
		s += ", " + m
	}
	return s
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	defer f.Close()
	var fallback string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		key, value, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		key, value = strings.TrimSpace(key), strings.TrimSpace(value)
		switch {
		case value == "":
		case key == "model name":
			return value
		case fallback == "" && (key == "Hardware" || key == "cpu model" || key == "uarch"):
			fallback = value
		}
	}
	return fallback
}
