package sideeffects

import (
	"fmt"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/projection"
)

// Reactor is a process manager: it turns events into commands for other
// aggregates (or the same one), exactly once. Unlike a Consumer it does no
// I/O of its own: a Node runs it as tasks of its processing engine, so that
// consuming an event, producing the commands it causes, and committing the
// consumption are one Kafka transaction. A crash or rebalance either
// commits all three or none.
//
// Every command a reactor sends gets an id derived from the event's id, the
// reactor's name and the command's index: re-processing the event (after an
// aborted transaction, or a consumer reset) sends the same ids, which the
// receiving aggregate answers from its idempotency records instead of
// applying them again. The task also keeps its input offsets on its
// changelog, "<app>-<name>-changelog", and skips events below them.
//
// A reactor must learn every outcome it reacts to from events: when a
// command it sent is declined, the receiving aggregate should record that as
// an event (a declined withdrawal becomes a WithdrawalDeclined event, say),
// because nobody reads the HTTP answer of a command a reactor sent.
type Reactor struct {
	name    string
	sources []projection.Source
	react   func(ev projection.Event) []aggregate.Addressed
	start   projection.Start
}

// NewReactor defines a reactor that calls react for every event of its
// sources (decoded as the sources decode them) and sends the commands it
// returns, in order; build them with the target type's To method, for
// example bank.Account.To(id, bank.Deposit{Amount: 5}). react must be
// deterministic and free of I/O: it runs again for an event whose
// transaction aborted. A panic in react is logged and counted, and the
// event skipped.
//
// NewReactor panics on an invalid name (lower-case letters, digits and
// dashes), a nil react or no source: programming errors found at start-up.
func NewReactor(name string, react func(ev projection.Event) []aggregate.Addressed, sources ...projection.Source) *Reactor {
	if !namePattern.MatchString(name) {
		panic(fmt.Sprintf("sideeffects: invalid reactor name %q: use lower-case letters, digits and dashes, starting with a letter", name))
	}
	if react == nil || len(sources) == 0 {
		panic(fmt.Sprintf("sideeffects: reactor %q needs a react function and at least one source", name))
	}
	return &Reactor{name: name, react: react, sources: sources}
}

// StartAt sets where a reactor with no stored progress begins: from the
// start of its sources (projection.Earliest, the default), or only new
// events (projection.Latest, for a reactor added to a system whose past
// events it must not act on). It returns r for chaining.
func (r *Reactor) StartAt(s projection.Start) *Reactor {
	r.start = s
	return r
}

// Name returns the reactor's name.
func (r *Reactor) Name() string { return r.name }

// Sources returns the reactor's sources.
func (r *Reactor) Sources() []projection.Source { return r.sources }

// Start returns where the reactor begins without stored progress.
func (r *Reactor) Start() projection.Start { return r.start }

// Decode fills ev.Value from the source that reads ev.Topic.
func (r *Reactor) Decode(ev *projection.Event) error {
	for _, s := range r.sources {
		if s.Topic() == ev.Topic {
			return s.Decode(ev)
		}
	}
	return fmt.Errorf("reactor %q does not read topic %q", r.name, ev.Topic)
}

// React runs the reactor's function on one event; a panic becomes an error.
func (r *Reactor) React(ev projection.Event) (out []aggregate.Addressed, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("reactor %q panicked: %v", r.name, p)
		}
	}()
	return r.react(ev), nil
}
