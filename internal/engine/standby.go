package engine

import (
	"context"
	"strconv"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/changelog"
	"github.com/esker-io/esker/statestore"
)

// Standby tasks. The cluster map names, per partition, the nodes that keep a
// warm copy of its state; this node tails those partitions' changelogs into
// its store (changelog.Tailer), so that when it is promoted its restore reads
// only the tail.
//
// Invariant: a partition is never tailed while the engine owns it as active.
// Both sides decide under e.mu: the reconciler adds a standby only while the
// engine does not own the partition (read lock), and onAssigned marks a
// partition owned (write lock) before it removes the standby — Remove waits
// for any batch in flight — and only then restores.

// SetStandbys sets the partitions this node should keep standby copies of
// (from the newest cluster map). It does not block.
func (e *Engine) SetStandbys(partitions []int32) {
	if e.tailer == nil {
		return
	}
	want := map[int32]bool{}
	for _, p := range partitions {
		want[p] = true
	}
	e.mu.Lock()
	e.wantStandby = want
	e.mu.Unlock()
	e.kickStandbys()
}

// StandbyPartitions returns the partitions this node tails now.
func (e *Engine) StandbyPartitions() map[int32]bool {
	e.standbyMu.Lock()
	defer e.standbyMu.Unlock()
	out := make(map[int32]bool, len(e.tailing))
	for p := range e.tailing {
		out[p] = true
	}
	return out
}

// StandbyLag returns how many changelog records the standby copy of
// partition p is behind (summed over the aggregate types); ok is false when
// this node does not tail p or the lag is not known yet.
func (e *Engine) StandbyLag(p int32) (lag int64, ok bool) {
	if e.tailer == nil {
		return 0, false
	}
	for _, name := range e.taskTypes {
		l, known := e.tailer.Lag(statestore.Task{Type: name, Partition: p})
		if !known {
			return 0, false
		}
		lag += l
	}
	return lag, true
}

func (e *Engine) kickStandbys() {
	select {
	case e.standbyKick <- struct{}{}:
	default:
	}
}

func (e *Engine) targets(p int32) []changelog.Target {
	out := make([]changelog.Target, 0, len(e.taskTypes))
	for _, name := range e.taskTypes {
		out = append(out, changelog.Target{
			Task:  statestore.Task{Type: name, Partition: p},
			Topic: changelog.Topic(e.cfg.AppID, name),
		})
	}
	return out
}

func (e *Engine) tasksOf(p int32) []statestore.Task {
	out := make([]statestore.Task, 0, len(e.taskTypes))
	for _, name := range e.taskTypes {
		out = append(out, statestore.Task{Type: name, Partition: p})
	}
	return out
}

// runStandbys runs the tailer and reconciles what it tails with what the map
// wants, until ctx ends.
func (e *Engine) runStandbys(ctx context.Context) {
	tailerDone := make(chan struct{})
	go func() {
		defer close(tailerDone)
		if err := e.tailer.Run(ctx); err != nil {
			e.log.Error("standby tailing stopped; promoted partitions will restore in full", "err", err)
		}
	}()
	defer func() {
		<-tailerDone
		e.tailer.Close()
	}()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-e.standbyKick:
		case <-tick.C:
		}
		e.reconcileStandbys(ctx)
		e.reportStandbyLag()
	}
}

// reportStandbyLag sets the standby lag gauge of the partitions tailed now
// and drops those no longer tailed.
func (e *Engine) reportStandbyLag() {
	m := e.cfg.Metrics
	if m == nil {
		return
	}
	tailing := e.StandbyPartitions()
	for p := range e.cfg.Partitions {
		label := strconv.Itoa(int(p))
		lag, ok := e.StandbyLag(p)
		if tailing[p] && ok {
			m.StandbyLag.WithLabelValues(label).Set(float64(lag))
		} else {
			m.StandbyLag.DeleteLabelValues(label)
		}
	}
}

// reconcileStandbys adds wanted standbys the engine does not own and removes
// unwanted ones.
func (e *Engine) reconcileStandbys(ctx context.Context) {
	e.mu.RLock()
	e.standbyMu.Lock()
	for p := range e.wantStandby {
		if e.tailing[p] || e.ownsLocked(p) {
			continue
		}
		if err := e.tailer.Add(e.targets(p)...); err != nil {
			e.log.Warn("adding a standby task", "partition", p, "err", err)
			continue
		}
		e.tailing[p] = true
	}
	var drop []int32
	for p := range e.tailing {
		if !e.wantStandby[p] {
			drop = append(drop, p)
		}
	}
	e.standbyMu.Unlock()
	e.mu.RUnlock()
	for _, p := range drop {
		_ = e.stopStandby(ctx, p) // retried at the next reconcile
	}
}

// stopStandby stops tailing p; when it returns nil, the tailer writes
// nothing more for p. An error (ctx ended first) means p is still tailed.
func (e *Engine) stopStandby(ctx context.Context, p int32) error {
	e.standbyMu.Lock()
	defer e.standbyMu.Unlock()
	if !e.tailing[p] {
		return nil
	}
	if err := e.tailer.Remove(ctx, e.tasksOf(p)...); err != nil {
		e.log.Warn("removing a standby task", "partition", p, "err", err)
		return err
	}
	delete(e.tailing, p)
	return nil
}

// ownsLocked reports whether the engine owns partition p; e.mu must be held.
func (e *Engine) ownsLocked(p int32) bool {
	for _, name := range e.taskTypes {
		if _, ok := e.tasks[statestore.Task{Type: name, Partition: p}]; ok {
			return true
		}
	}
	return false
}

func (e *Engine) newTailer() error {
	// A short fetch wait bounds a standby's lag even where the broker does
	// not wake a long poll on new data (kfake); on Kafka it costs at most
	// five empty fetches a second per node.
	opts := append(append([]kgo.Opt{}, e.cfg.ClientOpts...), kgo.FetchMaxWait(200*time.Millisecond))
	t, err := changelog.NewTailer(e.cfg.Store, opts, e.log)
	if err != nil {
		return err
	}
	e.tailer = t
	e.tailing = map[int32]bool{}
	e.standbyKick = make(chan struct{}, 1)
	return nil
}
