package peers

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"syscall"
	"testing"
	"time"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/projection"
)

// balances is the esker projection: per account (the event's entity id, no
// re-keying), the balance and the number of events — the same fold as the
// goka processor's group table.
var balances = projection.New("balances", func(b Balance, ev projection.Event) Balance {
	switch e := ev.Value.(type) {
	case bank.Deposited:
		b.Balance += e.Amount
	case bank.Withdrawn:
		b.Balance -= e.Amount
	}
	b.Count++
	return b
}, projection.From(projection.Events(bank.Account)))

// foldResult is one timed fold of the whole workload.
type foldResult struct {
	elapsed time.Duration // from start until every event is folded
	first   time.Duration // from start until the first fold was seen
	// persisted (goka only): until every table write was acknowledged.
	persisted time.Duration
	// cpu is the CPU time (user + system) the whole process used from
	// start until every event was folded: the side under test, the
	// in-process broker serving it and the benchmark's polling. Unlike
	// wall time it is not stretched by other processes on the machine.
	cpu time.Duration
}

// processCPU returns the process's user + system CPU time so far.
func processCPU(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// runEsker starts a fresh node (new application id, state directory and
// consumer group) on the shared broker and times it from Run until its
// projection reports every event folded (esker_projection_events_total
// {projection="balances",outcome="folded"}, polled every 10 ms; the counter
// moves after the transaction holding the fold committed and the store
// applied it).
func runEsker(tb testing.TB, w *workload, app string, verify bool) foldResult {
	tb.Helper()
	n, err := esker.NewNode(
		esker.Brokers(w.brokers...),
		esker.ApplicationID(app),
		esker.StateDir(tb.TempDir()),
		esker.HTTPListen(""),
		esker.Partitions(partitions),
		esker.Logger(slog.New(slog.NewTextHandler(io.Discard, nil))),
	)
	if err != nil {
		tb.Fatal(err)
	}
	if err := n.Register(bank.Account); err != nil {
		tb.Fatal(err)
	}
	if err := n.AddProjection(balances); err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	stopProfile := startProfile(tb, "esker")
	cpu0, start := processCPU(tb), time.Now()
	go func() { done <- n.Run(ctx) }()
	var res foldResult
	deadline := start.Add(5 * time.Minute)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		folded := foldedCount(tb, n)
		if folded > 0 && res.first == 0 {
			res.first = time.Since(start)
		}
		if folded >= float64(totalEvents) {
			res.elapsed = time.Since(start)
			res.cpu = processCPU(tb) - cpu0
			break
		}
		if time.Now().After(deadline) {
			cancel()
			tb.Fatalf("esker folded %v of %d events in 5 minutes", folded, totalEvents)
		}
		select {
		case err := <-done:
			tb.Fatalf("node stopped: %v", err)
		case <-tick.C:
		}
	}
	stopProfile()
	if verify {
		for id, want := range w.expected {
			row, err := n.ProjectionRow(context.Background(), "balances", id)
			if err != nil {
				tb.Fatalf("esker row %s: %v", id, err)
			}
			var got Balance
			if err := json.Unmarshal(row.Value, &got); err != nil {
				tb.Fatal(err)
			}
			if got != want {
				tb.Fatalf("esker row %s = %+v, want %+v", id, got, want)
			}
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			tb.Fatalf("node: %v", err)
		}
	case <-time.After(time.Minute):
		tb.Fatal("node did not stop within a minute")
	}
	w.cleanup(tb, app, app+"-account-changelog", app+"-balances-changelog")
	return res
}

// foldedCount reads esker_projection_events_total{projection="balances",
// outcome="folded"} from the node's registry.
func foldedCount(tb testing.TB, n *esker.Node) float64 {
	mfs, err := n.Registry().Gather()
	if err != nil {
		tb.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "esker_projection_events_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			var proj, outcome string
			for _, l := range m.GetLabel() {
				switch l.GetName() {
				case "projection":
					proj = l.GetValue()
				case "outcome":
					outcome = l.GetValue()
				}
			}
			if proj == "balances" && outcome == "folded" {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

var runSeq int

// nextID names an iteration's application or group, fresh on the shared
// broker.
func nextID(kind string) string {
	runSeq++
	return fmt.Sprintf("%s-%d-%d", kind, time.Now().UnixNano()%1_000_000, runSeq)
}
