package engine

import (
	"context"
	"time"
)

// Local state cleanup. A node keeps the state of a partition it gave up —
// revoked as active, or released as standby — so that if the partition comes
// back soon (a rolling restart, a short-lived rebalance) its restore reads
// only the tail, and the group balancer prefers it for that warm state. State
// nobody asks this node for again is deleted after StateCleanupDelay, as
// Kafka Streams' state.cleanup.delay.ms does, so a node's disk holds what its
// roles need rather than every partition it ever held.
//
// Invariant: a partition's state is deleted only while the engine neither
// owns it (active, restored or not) nor tails it as a standby. The check and
// the deletion happen under e.mu and standbyMu, the locks under which
// onAssigned marks a partition owned and the reconciler adds a standby, so
// neither can start using a partition while its state is being deleted.

// runCleanup deletes unused partitions' state until ctx ends.
func (e *Engine) runCleanup(ctx context.Context) {
	every := min(max(e.cfg.StateCleanupDelay/4, 100*time.Millisecond), 30*time.Second)
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		e.cleanup(time.Now())
	}
}

// cleanup deletes the state of the partitions that have been held but unused
// for the cleanup delay, and starts the clock of newly unused ones.
func (e *Engine) cleanup(now time.Time) {
	held := e.LocalState()
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.joined || e.stopping {
		// Before the first assignment every partition looks unused; a
		// restarting node must not delete the state it is about to get
		// back.
		return
	}
	if e.standbyMu.TryLock() {
		defer e.standbyMu.Unlock()
	} else {
		return // a standby is being added or removed; look again next tick
	}
	if e.idleSince == nil {
		e.idleSince = map[int32]time.Time{}
	}
	for p := range e.cfg.Partitions {
		if _, ok := held[p]; !ok || e.ownsLocked(p) || e.tailing[p] {
			delete(e.idleSince, p)
			continue
		}
		since, ok := e.idleSince[p]
		if !ok {
			e.idleSince[p] = now
			continue
		}
		if now.Sub(since) < e.cfg.StateCleanupDelay {
			continue
		}
		delete(e.idleSince, p)
		for _, t := range e.tasksOf(p) {
			if err := e.cfg.Store.DropTask(t); err != nil {
				e.log.Warn("deleting an unused partition's state", "task", t.String(), "err", err)
				return
			}
		}
		e.log.Info("deleted the state of a partition this node no longer owns or keeps a standby of",
			"partition", p, "unused_for", now.Sub(since).Round(time.Millisecond))
		if e.cfg.Metrics != nil {
			e.cfg.Metrics.StateCleanups.Inc()
		}
	}
}
