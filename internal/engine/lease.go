package engine

import (
	"context"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// The membership lease keeps a node that has been paused or cut off from
// Kafka (a zombie) from answering reads as the owner of partitions the group
// has already given to another node.
//
// Invariant: the node serves a task's state only while it holds a lease: the
// send time of its last heartbeat that the group coordinator answered with
// no error, plus four fifths of the session timeout. A member answered with
// no error at time s is a member at s, and the coordinator removes it no
// sooner than s + session timeout (heartbeats reset that clock when they
// arrive, after s); until then its partitions are its own, because the
// cooperative protocol moves a partition only after its owner has revoked
// it (and this node drops a task before it revokes it). A heartbeat answered
// REBALANCE_IN_PROGRESS does not renew the lease: the join phase may end,
// and the node be dropped, before the session timeout. The engine sends its
// own heartbeats with the group client's member id and generation for this
// (franz-go's group heartbeats do not report their answers).
//
// The monotonic clock keeps running while a process is stopped, so a node
// resumed after SIGSTOP finds its lease expired and answers 503 until a
// heartbeat confirms it still belongs (or the client learns it was dropped
// and gives up its tasks).

// leaseFraction of the session timeout is how long one answered heartbeat
// vouches for the node's membership.
const leaseFraction = 0.8

func (e *Engine) sessionTimeout() time.Duration {
	if e.cfg.SessionTimeout > 0 {
		return e.cfg.SessionTimeout
	}
	return 45 * time.Second // franz-go's default
}

// MembershipCurrent reports whether the node's group membership is
// confirmed by its lease: whether it may answer reads of the tasks it owns.
func (e *Engine) MembershipCurrent() bool {
	return time.Since(e.base) < time.Duration(e.leaseUntil.Load())
}

// kickLease asks for a heartbeat now (after an assignment, so a new owner
// need not wait for the next tick to serve).
func (e *Engine) kickLease() {
	select {
	case e.leaseKick <- struct{}{}:
	default:
	}
}

// runLease heartbeats every tenth of the session timeout (as the group
// client does) and on kicks, until ctx ends.
func (e *Engine) runLease(ctx context.Context, cl *kgo.Client) {
	every := e.sessionTimeout() / 10
	tick := time.NewTicker(every)
	defer tick.Stop()
	lapsed := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-e.leaseKick:
		}
		// A slow answer still renews the lease from its send time, so
		// wait up to half a session timeout for it: a loaded machine
		// must not lapse the lease of a node the group still counts in.
		renewed := e.heartbeat(ctx, cl, e.sessionTimeout()/2)
		switch current := e.MembershipCurrent(); {
		case !current && !lapsed && !renewed:
			lapsed = true
			e.log.Warn("group membership not confirmed within the lease; refusing reads until it is (paused, or cut off from Kafka?)")
		case current && lapsed:
			lapsed = false
			e.log.Info("group membership confirmed again; serving reads")
		}
	}
}

// heartbeat sends one heartbeat for the group client's current membership
// and renews the lease if the coordinator answers it with no error.
func (e *Engine) heartbeat(ctx context.Context, cl *kgo.Client, timeout time.Duration) bool {
	member, gen := cl.GroupMetadata()
	if member == "" || gen < 0 {
		return false
	}
	sent := time.Since(e.base)
	req := kmsg.NewPtrHeartbeatRequest()
	req.Group = e.cfg.AppID
	req.Generation = gen
	req.MemberID = member
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	resp, err := req.RequestWith(ctx, cl)
	if err != nil {
		return false
	}
	switch resp.ErrorCode {
	case 0:
	case kerr.UnknownMemberID.Code, kerr.FencedInstanceID.Code:
		// The group dropped this node. A transaction ending now would
		// wait for a heartbeat from the client's group loop, which has
		// stopped and waits for that very cycle to end; end it now
		// (its outcome is then unknown, and handled as such).
		e.leaseUntil.Store(0)
		e.cancelEnd()
		e.signalOwned() // readers waiting on its tasks re-check at once
		return false
	default:
		return false
	}
	until := sent + time.Duration(leaseFraction*float64(e.sessionTimeout()))
	for {
		old := e.leaseUntil.Load()
		if int64(until) <= old || e.leaseUntil.CompareAndSwap(old, int64(until)) {
			return true
		}
	}
}

// endTimeout bounds how long a cycle waits for its transaction to end:
// about a session timeout (at least 2 s, at most 10 s, the transaction
// timeout). Ending a transaction waits for a group heartbeat that confirms
// the membership; one not confirmed within a session timeout is doubtful,
// and giving up is safe: the outcome is then unknown and the cycle's tasks
// are restored from their changelogs (restoreAgain). A node the group
// dropped cancels the wait at once (heartbeat above).
func (e *Engine) endTimeout() time.Duration {
	return min(max(e.sessionTimeout(), 2*time.Second), 10*time.Second)
}

func (e *Engine) setEndCancel(cancel context.CancelFunc) {
	e.endMu.Lock()
	e.endCancel = cancel
	e.endMu.Unlock()
}

func (e *Engine) cancelEnd() {
	e.endMu.Lock()
	defer e.endMu.Unlock()
	if e.endCancel != nil {
		e.log.Warn("the group dropped this node while a transaction was ending; ending it unconfirmed")
		e.endCancel()
	}
}
