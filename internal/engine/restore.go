package engine

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/changelog"
	"github.com/esker-io/esker/internal/backoff"
	"github.com/esker-io/esker/statestore"
)

// Restores run in the background, off the group's assignment callback: a
// newly assigned task's partition is paused (no command of it is fetched)
// until its store is restored, while the node keeps processing the tasks it
// already has, and rebalances — which wait for the assignment callback to
// return — are not held up by a long restore.
//
// One restore run at a time restores every owned task that is not restored
// yet. Assignment and revocation cancel the run in flight and start a new one
// for the new set of pending tasks; a cancelled run loses nothing, because a
// restore commits its progress with the checkpoint in each batch.
//
// Invariant: no restore run writes to a task the engine does not own.
// onRevoked cancels the run, and waits for it to return, before it gives
// tasks up; so a task is never restored and tailed (as a standby) or deleted
// (cleanup.go) at the same time.

type restoreRun struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// stopRestore cancels the restore run in flight, if any, and waits for it to
// return. restoreMu must be held.
func (e *Engine) stopRestore() {
	if e.restoring == nil {
		return
	}
	e.restoring.cancel()
	<-e.restoring.done
	e.restoring = nil
}

// startRestore starts a run for the owned tasks that are not restored (none
// may be in flight; restoreMu must be held). ctx is the group client's
// context: it ends when the client closes.
func (e *Engine) startRestore(ctx context.Context, cl *kgo.Client) {
	pending := map[statestore.Task]*taskState{}
	e.mu.RLock()
	for t, ts := range e.tasks {
		if !ts.restored && !ts.rebuilding {
			pending[t] = ts
		}
	}
	e.mu.RUnlock()
	if len(pending) == 0 {
		return
	}
	ctx, cancel := context.WithCancel(ctx)
	run := &restoreRun{cancel: cancel, done: make(chan struct{})}
	e.restoring = run
	go func() {
		defer close(run.done)
		defer cancel()
		e.restore(ctx, cl, pending)
	}()
}

// restore restores the pending tasks, retrying failures with a backoff
// until it succeeds or ctx ends; then it marks the tasks restored and
// resumes fetching their commands.
func (e *Engine) restore(ctx context.Context, cl *kgo.Client, pending map[statestore.Task]*taskState) {
	targets := make([]changelog.Target, 0, len(pending))
	tasks := make([]statestore.Task, 0, len(pending))
	for t := range pending {
		targets = append(targets, changelog.Target{Task: t, Topic: changelog.Topic(e.cfg.AppID, t.Type)})
		tasks = append(tasks, t)
	}
	e.fenceStaleTransactions(ctx, tasks)
	ok := retry(ctx, e.log, "restore", func() error {
		res, err := changelog.Restore(ctx, e.cfg.Store, e.cfg.ClientOpts, targets, e.log)
		if e.cfg.Metrics != nil {
			for t, n := range res.Records {
				e.cfg.Metrics.RestoreRecords.WithLabelValues(t.Type).Add(float64(n))
			}
		}
		if err != nil {
			return err
		}
		if e.cfg.Metrics != nil {
			e.cfg.Metrics.RestoreDuration.Observe(res.Duration.Seconds())
		}
		var n int64
		for _, c := range res.Records {
			n += c
		}
		e.log.Info("tasks restored", "tasks", len(targets), "records", n, "duration", res.Duration.Round(time.Millisecond))
		return nil
	})
	if !ok {
		return
	}

	// Projection inputs start where their readers need them.
	if !retry(ctx, e.log, "positioning projection inputs", func() error { return e.seekProjectionInputs(ctx, cl, tasks) }) {
		return
	}

	// A task whose state was folded with another state version is not
	// served: it rebuilds first (rebuild.go), its commands still paused.
	stale := e.checkStateVersions(tasks)

	// A task revoked meanwhile is no longer in e.tasks (and one assigned
	// again has a new taskState): only the tasks this run restored for
	// their current assignment become served.
	var restored []statestore.Task
	var rebuild []statestore.Task
	// Deciding what to resume and resuming it must not interleave with
	// restoreAgain marking a reader unrestored and pausing its input.
	e.pauseMu.Lock()
	defer e.pauseMu.Unlock()
	e.mu.Lock()
	for t, ts := range pending {
		if e.tasks[t] != ts {
			continue
		}
		if _, ok := stale[t]; ok {
			ts.rebuilding = true
			rebuild = append(rebuild, t)
			continue
		}
		ts.restored = true
		restored = append(restored, t)
	}
	for _, t := range rebuild {
		// Under e.mu: a revocation (which stops rebuilds before it takes
		// e.mu) cannot slip between marking and starting.
		e.startRebuild(t, pending[t], e.types[t.Type], false,
			fmt.Sprintf("the stored state was folded with state version %d; the code's is %d", stale[t], e.types[t.Type].StateVersion()), stale[t])
	}
	// A topic partition several tasks read (an events topic two
	// projections fold) resumes once all of them are restored: its records
	// must not reach a cycle before every reader can take them.
	resume := e.inputPartitions(restored)
	for topic, parts := range resume {
		parts = slices.DeleteFunc(parts, func(p int32) bool {
			for _, name := range e.taskTypesOf(topic) {
				if ts := e.tasks[statestore.Task{Type: name, Partition: p}]; ts == nil || !ts.restored {
					return true
				}
			}
			return false
		})
		resume[topic] = parts
	}
	e.mu.Unlock()
	cl.ResumeFetchPartitions(resume)
	for _, t := range restored {
		e.signal(t)
	}
}

// retry runs fn until it succeeds (true) or ctx ends (false), logging each
// failure and waiting a growing backoff between attempts.
func retry(ctx context.Context, log *slog.Logger, what string, fn func() error) bool {
	for attempt := 0; ; attempt++ {
		err := fn()
		if err == nil {
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		log.Error(what+" failed; retrying", "err", err, "attempt", attempt+1)
		select {
		case <-ctx.Done():
			return false
		case <-time.After(retryPolicy.Delay(attempt + 1)):
		}
	}
}

// retryPolicy spaces the attempts of a failing restore step.
var retryPolicy = backoff.Policy{Min: 100 * time.Millisecond, Max: 5 * time.Second}

// restoreAgain makes the cycle's tasks unrestored, pauses their partitions
// and restores them again in the background: after a transaction whose
// outcome is unknown, the store may lack what Kafka committed. It runs on
// the run loop, between polls, when no group callback runs.
func (e *Engine) restoreAgain(cl *kgo.Client, tasks []statestore.Task) {
	var again []statestore.Task
	e.pauseMu.Lock()
	e.mu.Lock()
	for _, t := range tasks {
		if e.tasks[t] != nil {
			e.tasks[t] = &taskState{}
			again = append(again, t)
		}
	}
	e.mu.Unlock()
	if len(again) == 0 {
		e.pauseMu.Unlock()
		return
	}
	pause := e.inputPartitions(again)
	e.log.Warn("a transaction's outcome is unknown; restoring its tasks from the changelogs before processing them again", "partitions", pause)
	cl.PauseFetchPartitions(pause)
	e.pauseMu.Unlock() // before restartRestore, which waits for the run in flight
	e.restartRestore(cl.Context(), cl)
}

// restartRestore cancels the restore run in flight and starts one for every
// owned task not restored yet.
func (e *Engine) restartRestore(ctx context.Context, cl *kgo.Client) {
	e.restoreMu.Lock()
	defer e.restoreMu.Unlock()
	e.stopRestore()
	e.startRestore(ctx, cl)
}

// inputPartitions returns the partitions the tasks consume (an aggregate's
// commands, a projection's sources and repartition topic), in the form
// franz-go's pause and resume calls take.
func (e *Engine) inputPartitions(tasks []statestore.Task) map[string][]int32 {
	out := map[string][]int32{}
	for _, t := range tasks {
		topics := []string{CommandsTopic(t.Type)}
		if p, ok := e.projections[t.Type]; ok {
			topics = e.inputTopics(p)
		}
		for _, topic := range topics {
			if !slices.Contains(out[topic], t.Partition) {
				out[topic] = append(out[topic], t.Partition)
			}
		}
	}
	return out
}
