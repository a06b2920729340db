package interactive

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/esker-io/esker/aggregate"
)

// Backend is what the HTTP layer needs from a node: the registered aggregate
// types, a way to submit a command and await its committed outcome, and reads
// of committed state. The node adapts its engine to it, so this package never
// imports the engine.
type Backend interface {
	// Definition returns the registered aggregate type with that name.
	Definition(aggregateType string) (aggregate.Definition, bool)
	// Submit produces the command to "<type>-commands" and waits for its
	// outcome. It returns the outcome once the transaction holding it has
	// committed; ErrTimeout when the outcome is still unknown at ctx's
	// deadline (the command may still be applied: retry with the same
	// command id); a *NotReadyError when this node cannot take the command
	// now (nothing was produced).
	Submit(ctx context.Context, aggregateType, id string, cmd aggregate.Command) (aggregate.Outcome, error)
	// State returns the committed state of one entity. When minVersion > 0 it
	// waits up to wait for the entity to reach that version and answers
	// ErrTimeout otherwise. ErrNotFound: the entity has no events.
	State(ctx context.Context, aggregateType, id string, minVersion int64, wait time.Duration) (State, error)
	// Events returns up to limit events of one entity from version from on.
	Events(ctx context.Context, aggregateType, id string, from int64, limit int) ([]aggregate.Event, error)
	// Ready returns nil when every task this node owns is restored and
	// processing, or a *NotReadyError saying why not.
	Ready() error
}

// State is an entity's committed state.
type State struct {
	ID      string
	Version int64
	// State is the encoded state snapshot (the aggregate's codec, JSON by
	// default).
	State []byte
	// UpdatedAt is the time of the last event.
	UpdatedAt time.Time
	// Standby is true when a standby copy answered (the request allowed
	// it with WithStale); Lag is then how many changelog records that copy
	// is behind.
	Standby bool
	Lag     int64
}

type staleKey struct{}

// WithStale marks a read that accepts an answer from a standby copy of the
// entity's partition (GET …?stale=true).
func WithStale(ctx context.Context) context.Context {
	return context.WithValue(ctx, staleKey{}, true)
}

// StaleAllowed reports whether ctx carries WithStale.
func StaleAllowed(ctx context.Context) bool {
	v, _ := ctx.Value(staleKey{}).(bool)
	return v
}

// Errors a Backend returns; the HTTP layer maps each to a status code.
var (
	ErrNotFound = errors.New("not found")
	// ErrGone: the entity was forgotten (410 Gone).
	ErrGone    = errors.New("gone")
	ErrTimeout = errors.New("timed out")
	// ErrTooLarge: Kafka refused the command as too large; nothing was
	// written and a retry cannot succeed.
	ErrTooLarge = errors.New("too large")
)

// NotReadyError means the node cannot serve the request now (restoring,
// rebalancing, or the partition is not owned here); the client should retry
// after RetryAfter.
type NotReadyError struct {
	Reason     string
	RetryAfter time.Duration
}

func (e *NotReadyError) Error() string {
	return fmt.Sprintf("not ready: %s", e.Reason)
}
