// Package benchmark measures esker's write path against a raw franz-go
// transactional consume→produce loop on the same Kafka cluster.
//
// # Method
//
// Every run, esker or baseline, is measured the same way:
//
//  1. Reset: the run's topics and consumer group are deleted and created
//     afresh (so point the runs at a scratch cluster, such as an embedded
//     kfake broker), and the processor is started: an esker node with the
//     bank example's Account type, or the baseline loop. The clock is not
//     running yet.
//  2. Ready: wait until the processor owns every partition (Node.Ready, or
//     the baseline's partitions-assigned callback).
//  3. Warm-up, untimed: one Open command per account is produced and
//     processed, so that every timed command is an accepted Deposit on an
//     existing account (esker: one event, not a rejection).
//  4. Throughput, timed: the clock starts when the first of Commands Deposit
//     commands is produced. A separate producer writes them as fast as it
//     can (asynchronously, murmur2 partitioning by account id, JSON command
//     envelopes with command ids, accounts in round-robin order) while the
//     processor consumes them; the clock stops when the processor has
//     committed the last one. Both sides are woken by their commit rather
//     than polled: esker through Node.State(id, minVersion=final version,
//     wait) for every account in turn (the node signals waiters right after
//     a committed transaction is applied to its store); the baseline through
//     a channel its loop closes after every committed transaction.
//     Commands/s is Commands / that duration. Producing and processing
//     share the machine's CPUs, as they would on one host. Progress reports
//     (every 500ms, only when Config.Progress is set) read the node's
//     esker_transaction_commands metric.
//  5. Shape: the records the processor wrote during the timed phase are
//     counted (read_committed) on its two output topics; for esker,
//     "account-events" and "<app>-account-changelog". RecordsPerCommand and
//     the mean record sizes are what the baseline then reproduces.
//  6. Latency: Concurrency goroutines each send commands one at a time and
//     wait for each committed outcome (esker: Node.Submit, which produces
//     the command and waits for its outcome; baseline: a synchronous produce,
//     then a wait until the loop has committed the transaction that consumed
//     the record), LatencyCommands in all. P50 and P99 are taken over those
//     round trips.
//
// The baseline (RunBaseline) is a kgo.GroupTransactSession loop with the
// options esker's engine uses (read_committed, manual partitioner, blocked
// rebalances on poll, PollRecords of up to 10000 records): for each poll it
// begins a transaction, produces for every consumed record one record to its
// "events" topic and, spread evenly, the changelog records esker wrote per
// command to its "changelog" topic (same partition, same key, values sized
// like esker's), and commits the transaction with the consumed offsets. It
// decodes nothing and keeps no state: it is the Kafka cost of esker's write
// path without esker.
package benchmark

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math"
	"runtime/pprof"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/esker-io/esker"
)

// Config configures a run. Zero fields take the defaults noted.
type Config struct {
	// Brokers of a scratch cluster: the runs delete and recreate their
	// topics and consumer groups. Required.
	Brokers []string
	// Commands is the number of timed Deposit commands (default 20000).
	Commands int
	// Entities is the number of accounts the commands spread over
	// (default 1000).
	Entities int
	// Partitions of every topic (default 4).
	Partitions int32
	// Concurrency is the number of goroutines of the latency phase
	// (default 8).
	Concurrency int
	// LatencyCommands is the number of commands of the latency phase
	// (default 2000; negative skips the phase).
	LatencyCommands int
	// Guarantee of the esker node (default esker.ExactlyOnce).
	Guarantee esker.Guarantee
	// AppID is the esker application id, which names the consumer group and
	// the changelog topic (default "bank").
	AppID string
	// StateDir is the parent of the node's state directory; a fresh
	// sub-directory is created and removed per run (default: a temporary
	// directory).
	StateDir string
	// Progress, when set, is called every half second during a phase and
	// once when it ends, with the phase name ("warm-up", "throughput",
	// "count", "latency").
	Progress func(phase string, done, total int)
	// Logger receives the node's logs (default: discarded).
	Logger *slog.Logger
	// Timeout bounds a phase that stops making progress (default 2m).
	Timeout time.Duration
	// Projections makes RunEsker's node also run the bank's owners and
	// daily-totals projections (they share the node's transactions: their
	// cost on the write path); Suite then adds such an exactly-once run to
	// the plain ones.
	Projections bool
	// CPUProfile, when set, receives a CPU profile (pprof format) of the
	// timed throughput phase alone. The process must not be profiling
	// already (go test -cpuprofile).
	CPUProfile io.Writer
}

func (c Config) withDefaults() (Config, error) {
	if len(c.Brokers) == 0 {
		return c, fmt.Errorf("benchmark: no brokers")
	}
	if c.Commands <= 0 {
		c.Commands = 20000
	}
	if c.Entities <= 0 {
		c.Entities = 1000
	}
	if c.Partitions <= 0 {
		c.Partitions = 4
	}
	if c.Concurrency <= 0 {
		c.Concurrency = 8
	}
	if c.LatencyCommands == 0 {
		c.LatencyCommands = 2000
	}
	if c.AppID == "" {
		c.AppID = "bank"
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if c.Timeout <= 0 {
		c.Timeout = 2 * time.Minute
	}
	return c, nil
}

// startProfile starts the CPU profile of the timed phase, if asked for, and
// returns the function that stops it.
func (c Config) startProfile() (stop func(), err error) {
	if c.CPUProfile == nil {
		return func() {}, nil
	}
	if err := pprof.StartCPUProfile(c.CPUProfile); err != nil {
		return nil, fmt.Errorf("benchmark: CPU profile: %w", err)
	}
	return pprof.StopCPUProfile, nil
}

func (c Config) progress(phase string, done, total int) {
	if c.Progress != nil {
		c.Progress(phase, done, total)
	}
}

// Shape is what a processor wrote per command during the timed phase.
type Shape struct {
	// RecordsPerCommand is output records (events plus changelog) per
	// command.
	RecordsPerCommand float64
	// EventsPerCommand is the events-topic share of RecordsPerCommand.
	EventsPerCommand float64
	// EventBytes and ChangelogBytes are the mean sizes of a record on each
	// output topic: key, value and headers.
	EventBytes, ChangelogBytes int
}

// Result is the outcome of one run.
type Result struct {
	Name string
	// Baseline marks the raw franz-go loop; Report compares the others to it.
	Baseline bool
	// Commands processed in the timed phase, and how long they took.
	Commands  int
	Duration  time.Duration
	PerSecond float64
	// P50 and P99 of the latency phase's round trips.
	P50, P99 time.Duration
	// Samples is the number of latency round trips.
	Samples int
	// Shape of the timed phase's output; RecordsPerCommand repeats
	// Shape.RecordsPerCommand.
	Shape             Shape
	RecordsPerCommand float64
}

// Suite runs esker exactly-once, esker at-least-once and the baseline one
// after the other on the same cluster; the baseline reproduces the shape the
// exactly-once run measured. It returns the results in that order.
func Suite(ctx context.Context, cfg Config) ([]Result, error) {
	eos := cfg
	eos.Guarantee, eos.Projections = esker.ExactlyOnce, false
	r1, err := RunEsker(ctx, eos)
	if err != nil {
		return nil, err
	}
	var withProjections []Result
	if cfg.Projections {
		p := eos
		p.Projections = true
		r, err := RunEsker(ctx, p)
		if err != nil {
			return []Result{r1}, err
		}
		withProjections = append(withProjections, r)
	}
	alo := cfg
	alo.Guarantee, alo.Projections = esker.AtLeastOnce, false
	r2, err := RunEsker(ctx, alo)
	if err != nil {
		return append([]Result{r1}, withProjections...), err
	}
	r3, err := RunBaseline(ctx, cfg, r1.Shape)
	out := append(append([]Result{r1}, withProjections...), r2)
	if err != nil {
		return out, err
	}
	return append(out, r3), nil
}

// Report renders results as a table, with each run's throughput relative to
// the baseline and a line on the goal (exactly-once ≥ 0.5× the baseline).
func Report(results []Result) string {
	var base *Result
	for i := range results {
		if results[i].Baseline {
			base = &results[i]
			break
		}
	}
	width := len("run")
	for _, r := range results {
		width = max(width, len(r.Name))
	}
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "%-*s\tcommands\ttime\tcommands/s\tvs baseline\tp50\tp99\trecords/command\t\n", width, "run")
	for _, r := range results {
		ratio := "-"
		if base != nil && base.PerSecond > 0 && !r.Baseline {
			ratio = fmt.Sprintf("%.2fx", r.PerSecond/base.PerSecond)
		} else if r.Baseline {
			ratio = "1.00x"
		}
		fmt.Fprintf(tw, "%-*s\t%d\t%s\t%.0f\t%s\t%s\t%s\t%.3f\t\n", width, r.Name, r.Commands,
			r.Duration.Round(time.Millisecond), r.PerSecond, ratio, fmtLatency(r.P50, r.Samples), fmtLatency(r.P99, r.Samples), r.RecordsPerCommand)
	}
	tw.Flush()
	if base != nil && base.PerSecond > 0 {
		for _, r := range results {
			if r.Name != NameExactlyOnce {
				continue
			}
			ratio := r.PerSecond / base.PerSecond
			verdict := "met"
			if ratio < 0.5 {
				verdict = "NOT met"
			}
			fmt.Fprintf(&b, "goal: esker exactly-once at >= 0.5x the raw transactional loop: %.2fx, %s\n", ratio, verdict)
		}
	}
	return b.String()
}

func fmtLatency(d time.Duration, samples int) string {
	if samples == 0 {
		return "-"
	}
	return FormatDuration(d)
}

// FormatDuration rounds a duration to three significant-ish digits for
// reports: 356ms, 1.48ms, 977µs.
func FormatDuration(d time.Duration) string {
	switch {
	case d >= 100*time.Millisecond:
		return d.Round(time.Millisecond).String()
	case d >= time.Millisecond:
		return d.Round(10 * time.Microsecond).String()
	default:
		return d.Round(time.Microsecond).String()
	}
}

// Names of the runs.
const (
	NameExactlyOnce = "esker exactly-once"
	NameAtLeastOnce = "esker at-least-once"
	NameProjections = "esker exactly-once + 2 projections"
	NameBaseline    = "kgo transact loop"
)

// percentile returns the nearest-rank q-quantile of sorted durations.
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	i = max(0, min(i, len(sorted)-1))
	return sorted[i]
}

func latencies(samples []time.Duration) (p50, p99 time.Duration) {
	sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
	return percentile(samples, 0.50), percentile(samples, 0.99)
}
