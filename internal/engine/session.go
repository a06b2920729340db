package engine

import (
	"context"
	"errors"

	"github.com/twmb/franz-go/pkg/kgo"
)

// session is the Kafka side of one processing cycle. The exactly-once
// session wraps kgo.GroupTransactSession: records produced between Begin and
// End, and the consumed offsets, commit in one transaction, and an abort
// rewinds consumption to the last committed offsets. The at-least-once
// session runs the same cycle without a transaction: End flushes, then
// commits offsets.
type session interface {
	Client() *kgo.Client
	Begin() error
	// End finishes the cycle. committed reports whether the produced records
	// are durable (and, exactly-once, visible with the offsets); only then
	// may the staged store batch be applied.
	End(ctx context.Context, commit bool) (committed bool, err error)
	AllowRebalance()
	Close()
}

type eosSession struct{ s *kgo.GroupTransactSession }

func newEOSSession(opts []kgo.Opt) (*eosSession, error) {
	s, err := kgo.NewGroupTransactSession(opts...)
	if err != nil {
		return nil, err
	}
	return &eosSession{s}, nil
}

func (e *eosSession) Client() *kgo.Client { return e.s.Client() }
func (e *eosSession) Begin() error        { return e.s.Begin() }
func (e *eosSession) AllowRebalance()     { e.s.AllowRebalance() }
func (e *eosSession) Close()              { e.s.CloseAllowingRebalance() }

func (e *eosSession) End(ctx context.Context, commit bool) (bool, error) {
	return e.s.End(ctx, kgo.TransactionEndTry(commit))
}

type aloSession struct{ cl *kgo.Client }

func newALOSession(opts []kgo.Opt) (*aloSession, error) {
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, err
	}
	return &aloSession{cl}, nil
}

func (a *aloSession) Client() *kgo.Client { return a.cl }
func (a *aloSession) Begin() error        { return nil }
func (a *aloSession) AllowRebalance()     { a.cl.AllowRebalance() }
func (a *aloSession) Close()              { a.cl.CloseAllowingRebalance() }

// End flushes the produced records. When they all reached Kafka the cycle
// counts as committed (the store may apply it) and the offsets are committed;
// a failed offset commit only means the commands are delivered again, and
// command-id idempotency answers them from the store. When a record failed,
// consumption rewinds to the last committed offsets.
func (a *aloSession) End(ctx context.Context, commit bool) (bool, error) {
	flushErr := a.cl.Flush(ctx)
	if !commit || flushErr != nil {
		a.cl.SetOffsets(a.cl.CommittedOffsets())
		return false, flushErr
	}
	if err := a.cl.CommitUncommittedOffsets(ctx); err != nil {
		return true, errors.Join(errors.New("records are durable but committing offsets failed; the commands will be redelivered and deduplicated"), err)
	}
	return true, nil
}
