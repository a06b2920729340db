package sideeffects

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
)

// backoff is the wait after the given failed attempt (1-based): base
// doubled per attempt, capped at maxBackoff, then drawn at random between
// half and all of it ("equal jitter": never much shorter than planned, and
// never in lock-step with other failing events).
func backoff(base, maxBackoff time.Duration, attempt int) time.Duration {
	d := base
	for i := 1; i < attempt && d < maxBackoff; i++ {
		d *= 2
	}
	d = min(d, maxBackoff)
	if d <= 0 {
		return 0
	}
	half := d / 2
	return half + rand.N(d-half+1)
}

// sleepCtx waits d or until ctx is done; it reports whether d passed.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// isMembershipError reports whether a commit failed because this member no
// longer belongs to the group's current generation: its partitions are
// (being) given to others, so retrying the commit is pointless.
func isMembershipError(err error) bool {
	return errors.Is(err, kerr.IllegalGeneration) ||
		errors.Is(err, kerr.UnknownMemberID) ||
		errors.Is(err, kerr.RebalanceInProgress) ||
		errors.Is(err, kerr.FencedInstanceID)
}
