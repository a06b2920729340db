// Package backoff computes the waits of esker's retry loops: exponential,
// capped, with equal jitter, so that many nodes or events that failed at
// once do not retry in lock-step, and a wait is never much shorter than
// planned.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Policy is an exponential backoff: the wait after the n-th failed attempt
// is Min doubled n-1 times, capped at Max, then drawn between half and all
// of it. A zero or negative Min waits nothing.
type Policy struct {
	Min, Max time.Duration
}

// Delay returns the wait after failed attempt n (1-based; 0 counts as 1).
func (p Policy) Delay(n int) time.Duration {
	d := p.Min
	for i := 1; i < n && d < p.Max; i++ {
		d *= 2
	}
	d = min(d, p.Max)
	if d <= 0 {
		return 0
	}
	half := d / 2
	return half + rand.N(d-half+1)
}

// Retry is a Policy with the count of one operation's failed attempts.
type Retry struct {
	Policy
	failed int
}

// Next counts a failed attempt and returns the wait before the next one.
func (r *Retry) Next() time.Duration {
	r.failed++
	return r.Delay(r.failed)
}

// Sleep waits d, or less if ctx is done or abort (nil: never) is closed; it
// reports whether the whole wait passed.
func Sleep(ctx context.Context, d time.Duration, abort <-chan struct{}) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-abort:
		return false
	case <-t.C:
		return true
	}
}
