package sideeffects

import (
	"fmt"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Guarantee is how often a side-effect consumer runs its handler for an
// event when something fails: a crash, a lost connection, a rebalance.
type Guarantee int

const (
	// AtLeastOnce commits an event's offset only after its handler
	// succeeded (or after it was dead-lettered). A crash or a lost
	// membership re-runs the handler for the events that were in flight,
	// so handlers should be idempotent (Event.EventID is stable for this).
	// It is the default.
	AtLeastOnce Guarantee = iota
	// AtMostOnce commits the offsets of every polled batch before any of
	// its events reaches a handler. A crash after the commit never re-runs
	// a handler; the events that were committed but not yet handled at
	// that moment are not handled at all.
	AtMostOnce
)

// String returns "at-least-once" or "at-most-once".
func (g Guarantee) String() string {
	switch g {
	case AtLeastOnce:
		return "at-least-once"
	case AtMostOnce:
		return "at-most-once"
	}
	return fmt.Sprintf("Guarantee(%d)", int(g))
}

// MarshalText makes a Guarantee appear as its name in JSON (GET /v1/cluster).
func (g Guarantee) MarshalText() ([]byte, error) {
	if g != AtLeastOnce && g != AtMostOnce {
		return nil, fmt.Errorf("sideeffects: unknown guarantee %d", int(g))
	}
	return []byte(g.String()), nil
}

// UnmarshalText parses "at-least-once" or "at-most-once".
func (g *Guarantee) UnmarshalText(b []byte) error {
	switch strings.ToLower(string(b)) {
	case "at-least-once":
		*g = AtLeastOnce
	case "at-most-once":
		*g = AtMostOnce
	default:
		return fmt.Errorf("sideeffects: unknown guarantee %q: use at-least-once or at-most-once", b)
	}
	return nil
}

// StartPosition is where a consumer group that has no committed offset for
// a partition starts reading it. Build one with Earliest, Latest or AtTime.
type StartPosition struct {
	offset kgo.Offset
	desc   string
}

// Earliest starts at the oldest event still in the topic: a new consumer
// handles the whole history. It is the default.
func Earliest() StartPosition {
	return StartPosition{kgo.NewOffset().AtStart(), "earliest"}
}

// Latest starts after the newest event: a new consumer handles only events
// written after it first joined.
func Latest() StartPosition {
	return StartPosition{kgo.NewOffset().AtEnd(), "latest"}
}

// AtTime starts at the first event whose record timestamp is at or after t
// (at the end of a partition that has none).
func AtTime(t time.Time) StartPosition {
	return StartPosition{kgo.NewOffset().AfterMilli(t.UnixMilli()), "time " + t.UTC().Format(time.RFC3339)}
}

// String describes the position: "earliest", "latest" or "time <RFC 3339>".
func (p StartPosition) String() string { return p.desc }

// Option configures a Consumer. Options are checked by New, which returns an
// error naming the first invalid one.
type Option func(*config)

type config struct {
	guarantee      Guarantee
	workers        int
	maxAttempts    int
	baseBackoff    time.Duration
	maxBackoff     time.Duration
	start          StartPosition
	commitInterval time.Duration
	drainTimeout   time.Duration
	startTimeout   time.Duration
}

func defaultConfig() config {
	return config{
		guarantee:      AtLeastOnce,
		workers:        16,
		maxAttempts:    5,
		baseBackoff:    100 * time.Millisecond,
		maxBackoff:     10 * time.Second,
		start:          Earliest(),
		commitInterval: time.Second,
		drainTimeout:   10 * time.Second,
		startTimeout:   30 * time.Second,
	}
}

// WithGuarantee chooses when offsets are committed: AtLeastOnce (after the
// handler, the default) or AtMostOnce (before it). See Guarantee.
func WithGuarantee(g Guarantee) Option { return func(c *config) { c.guarantee = g } }

// Workers sets how many events run their handlers at once (default 16).
// Events are routed to workers by a hash of their record key (entity id),
// so one key's events always run one after another, in offset order, and
// different keys run in parallel. n must be at least 1.
func Workers(n int) Option { return func(c *config) { c.workers = n } }

// Retries bounds how often a failing handler is called for one event:
// maxAttempts calls in all (1: no retry), separated by exponential backoff
// starting at baseBackoff and doubling up to maxBackoff, each wait drawn at
// random between half and all of its nominal value (jitter, so that many
// failing events do not retry in lock-step). After the last attempt, the
// event goes to the dead-letter topic. Default: 5 attempts, 100 ms to 10 s.
// While an event is retried, the events of the same key wait behind it.
func Retries(maxAttempts int, baseBackoff, maxBackoff time.Duration) Option {
	return func(c *config) {
		c.maxAttempts, c.baseBackoff, c.maxBackoff = maxAttempts, baseBackoff, maxBackoff
	}
}

// StartAt sets where the consumer group starts on a partition for which it
// has no committed offset: when it runs for the first time, on a partition
// added later, or when its committed offset was deleted by retention.
// Default: Earliest. The re-drive topic always starts at its beginning, so
// that dead letters replayed before the first run are not skipped.
func StartAt(p StartPosition) Option { return func(c *config) { c.start = p } }

// CommitInterval sets how often finished offsets are committed (default 1 s).
// Offsets are also committed when partitions are revoked and when Run
// stops. A shorter interval re-runs fewer handlers after a crash
// (at-least-once) at the cost of more commit requests.
func CommitInterval(d time.Duration) Option { return func(c *config) { c.commitInterval = d } }

// DrainTimeout bounds how long a revocation, or Run stopping, waits for the
// events already polled from the partitions concerned — queued and running
// — to finish, before it commits and lets go (default 10 s). Events are
// finished rather than left to the next owner because the commit cannot
// skip an unfinished event: events of other keys behind it that did finish
// would be handled a second time. Past the timeout, at-least-once, the
// events not started are left to the next owner (or the restart), running
// handlers have their context cancelled and 2 s to return, and the next
// owner handles again what was not committed; at-most-once, the events
// were already committed, so they keep running until Run stops, and those
// still unhandled then are lost (Run logs how many). Keep it below the
// group's rebalance timeout (kgo.RebalanceTimeout, 60 s by default).
func DrainTimeout(d time.Duration) Option { return func(c *config) { c.drainTimeout = d } }

// StartTimeout bounds how long Run tries to reach Kafka and create its
// topics before it gives up with an error (default 30 s).
func StartTimeout(d time.Duration) Option { return func(c *config) { c.startTimeout = d } }

func (c *config) validate() error {
	switch {
	case c.guarantee != AtLeastOnce && c.guarantee != AtMostOnce:
		return fmt.Errorf("unknown guarantee %d: use AtLeastOnce or AtMostOnce", int(c.guarantee))
	case c.workers < 1:
		return fmt.Errorf("Workers must be at least 1, got %d", c.workers)
	case c.maxAttempts < 1:
		return fmt.Errorf("Retries: maxAttempts must be at least 1 (1: no retry), got %d", c.maxAttempts)
	case c.baseBackoff < 0 || c.maxBackoff < c.baseBackoff:
		return fmt.Errorf("Retries: need 0 <= baseBackoff <= maxBackoff, got %v and %v", c.baseBackoff, c.maxBackoff)
	case c.start.desc == "":
		return fmt.Errorf("StartAt: use Earliest(), Latest() or AtTime(t)")
	case c.commitInterval <= 0:
		return fmt.Errorf("CommitInterval must be positive, got %v", c.commitInterval)
	case c.drainTimeout <= 0:
		return fmt.Errorf("DrainTimeout must be positive, got %v", c.drainTimeout)
	case c.startTimeout <= 0:
		return fmt.Errorf("StartTimeout must be positive, got %v", c.startTimeout)
	}
	return nil
}
