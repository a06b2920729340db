package sideeffects

import (
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"
)

// stuckAfter is how long commits, fetches or dead-letter writes may keep
// failing before Ready reports the consumer as not ready.
const stuckAfter = 30 * time.Second

// Status is a snapshot of a consumer, for the node's GET /v1/cluster.
type Status struct {
	Name      string    `json:"name"`
	Group     string    `json:"group,omitempty"`
	Guarantee Guarantee `json:"guarantee"`
	Topics    []string  `json:"topics"`
	Running   bool      `json:"running"`
	// Ready is Ready() == nil; NotReady says why not.
	Ready    bool   `json:"ready"`
	NotReady string `json:"notReady,omitempty"`
	// Partitions are the partitions assigned to this member, sorted.
	Partitions []PartitionStatus `json:"partitions"`
	// Lag is the sum of the partitions' known lags.
	Lag int64 `json:"lag"`
	// InFlight counts events polled and not yet finished (queued or in a
	// handler).
	InFlight int `json:"inFlight"`
	// Handled, Retried and DeadLettered count, over the consumer's
	// lifetime, events whose handler succeeded, handler calls that were
	// retries, and events written to the dead-letter topic.
	Handled      uint64 `json:"handled"`
	Retried      uint64 `json:"retried"`
	DeadLettered uint64 `json:"deadLettered"`
}

// PartitionStatus is one assigned partition in a Status.
type PartitionStatus struct {
	Topic     string `json:"topic"`
	Partition int32  `json:"partition"`
	// Committed is the offset this member last committed for the
	// partition since it was assigned; -1 if none yet.
	Committed int64 `json:"committed"`
	// HighWatermark is the partition's end as of the last fetch that
	// returned records or the last end-offset lookup (at least once a
	// second); -1 if unknown.
	HighWatermark int64 `json:"highWatermark"`
	// Lag is the number of records from the lowest unfinished one to the
	// high watermark (transaction markers included); -1 if unknown.
	Lag int64 `json:"lag"`
	// InFlight counts the partition's events polled and not yet finished.
	InFlight int `json:"inFlight"`
}

// Status returns a snapshot of the consumer. It is safe to call at any time,
// from any goroutine, also before Run and after it returned.
func (c *Consumer) Status() Status {
	s := Status{
		Name:         c.name,
		Guarantee:    c.cfg.guarantee,
		Topics:       append([]string(nil), c.topics...),
		Running:      c.running.Load(),
		Partitions:   []PartitionStatus{},
		Handled:      c.handled.Load(),
		Retried:      c.retried.Load(),
		DeadLettered: c.deadLettered.Load(),
	}
	if err := c.Ready(); err != nil {
		s.NotReady = err.Error()
	} else {
		s.Ready = true
	}
	r := c.current.Load()
	if r == nil {
		return s
	}
	s.Group = r.group
	if r.stopped.Load() {
		return s
	}
	for _, p := range r.tracker.all() {
		ps := p.status()
		s.Partitions = append(s.Partitions, ps)
		if ps.Lag > 0 {
			s.Lag += ps.Lag
		}
		s.InFlight += ps.InFlight
	}
	return s
}

// Ready returns nil while the consumer runs as a member of its group and is
// not stuck; otherwise an error that says why: not running (before Run,
// while Run starts, after it returned), joining the group, partitions lost
// and not yet reassigned, or commits, fetches or dead-letter writes failing
// for 30 s or more. A member that the group gave no partition (more members
// than partitions) is ready.
func (c *Consumer) Ready() error {
	r := c.current.Load()
	switch {
	case r == nil || r.stopped.Load() || !c.running.Load():
		return fmt.Errorf("side-effect consumer %s is not running", c.name)
	case !r.started.Load():
		return fmt.Errorf("side-effect consumer %s is starting", c.name)
	case !r.joined.Load():
		return fmt.Errorf("side-effect consumer %s is joining consumer group %s", c.name, r.group)
	case r.lost.Load():
		return fmt.Errorf("side-effect consumer %s lost its partitions (group session expired) and is rejoining", c.name)
	}
	if err := r.health.check(time.Now(), stuckAfter); err != nil {
		return fmt.Errorf("side-effect consumer %s: %w", c.name, err)
	}
	return nil
}

// health remembers operations that keep failing. An operation counts as
// stuck when it has failed continuously — without a success in between —
// for at least the stuck time, and failed again recently; an error that
// happened once and was followed by silence (an idle consumer fetches
// nothing, so reports no success) does not count.
type health struct {
	mu      sync.Mutex
	failing map[string]failure
}

type failure struct {
	since, last time.Time
	err         error
}

func (h *health) fail(what string, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.failing == nil {
		h.failing = map[string]failure{}
	}
	now := time.Now()
	f, ok := h.failing[what]
	if !ok {
		f.since = now
	}
	f.last, f.err = now, err
	h.failing[what] = f
}

func (h *health) ok(what string) {
	h.mu.Lock()
	delete(h.failing, what)
	h.mu.Unlock()
}

// check returns the operation that has been failing the longest, if it has
// failed for at least after and failed again within the last after.
func (h *health) check(now time.Time, after time.Duration) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	var worst string
	var wf failure
	for what, f := range h.failing {
		if f.last.Sub(f.since) >= after && now.Sub(f.last) < after && (worst == "" || f.since.Before(wf.since)) {
			worst, wf = what, f
		}
	}
	if worst == "" {
		return nil
	}
	return fmt.Errorf("%s failing for %v: %w", worst, now.Sub(wf.since).Round(time.Second), wf.err)
}

// Catch-up logging: while the lag is at least catchUpLag records, a line
// every catchUpLogEvery says how far the consumer got.
const (
	catchUpLag      = 1000
	catchUpLogEvery = 5 * time.Second
)

// progress tracks one catch-up (a stretch of large lag).
type progress struct {
	catchingUp    bool
	startFinished uint64 // events finished when the catch-up began
	began         time.Time
	lastAt        time.Time
	lastFinished  uint64
}

// observe is called about every second with the current lag and the count
// of finished events.
func (p *progress) observe(now time.Time, lag int64, finished uint64, logger *slog.Logger) {
	if !p.catchingUp {
		if lag < catchUpLag {
			return
		}
		*p = progress{catchingUp: true, startFinished: finished, began: now, lastAt: now, lastFinished: finished}
		logger.Info("catching up", "lag", lag)
		return
	}
	done := finished - p.startFinished
	if lag < catchUpLag {
		logger.Info("caught up", "events", done, "took", now.Sub(p.began).Round(time.Second), "lag", lag)
		p.catchingUp = false
		return
	}
	if now.Sub(p.lastAt) < catchUpLogEvery-100*time.Millisecond { // ticker jitter
		return
	}
	rate := float64(finished-p.lastFinished) / now.Sub(p.lastAt).Seconds()
	pct := 100 * float64(done) / float64(done+uint64(lag))
	logger.Info("catching up", "caught_up_pct", fmt.Sprintf("%.1f", pct), "events_per_s", int64(rate), "lag", lag)
	p.lastAt, p.lastFinished = now, finished
}

// Report is how a node lists a consumer, or a sink that runs like one, in
// GET /v1/cluster.
type Report struct {
	// Kind is "sideeffect" for a Consumer ("sink" for pgsink.Sink).
	Kind string
	// Partitions are the input partitions assigned to this member.
	Partitions []int32
	// Lag is the sum of the partitions' known lags.
	Lag int64
	// Details is the kind's own status (a Status for a Consumer).
	Details any
}

// Report returns the consumer's Report, for the node.
func (c *Consumer) Report() Report {
	s := c.Status()
	r := Report{Kind: "sideeffect", Lag: s.Lag, Details: s, Partitions: []int32{}}
	for _, p := range s.Partitions {
		if !slices.Contains(r.Partitions, p.Partition) {
			r.Partitions = append(r.Partitions, p.Partition)
		}
	}
	slices.Sort(r.Partitions)
	return r
}
