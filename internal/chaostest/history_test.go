package chaostest

import (
	"bufio"
	"encoding/json"
	"os"
	"sync"
	"time"

	"github.com/esker-io/esker/examples/bank"
)

// OpKind is what a client asked for.
type OpKind string

const (
	OpOpen     OpKind = "open"
	OpDeposit  OpKind = "deposit"
	OpWithdraw OpKind = "withdraw"
	// OpGet is a plain read, routed to the owner of the account's
	// partition: it must be linearizable.
	OpGet OpKind = "get"
	// OpGetStale is a read with ?stale=true, which a standby copy may
	// answer: it may be old, but it must be a state the account really
	// had (the fold of a prefix of its events). It is not part of the
	// linearizability check.
	OpGetStale OpKind = "get-stale"
)

// isCommand reports whether the kind writes (has a command id).
func (k OpKind) isCommand() bool { return k == OpOpen || k == OpDeposit || k == OpWithdraw }

// isRead reports whether the kind reads an account's state.
func (k OpKind) isRead() bool { return k == OpGet || k == OpGetStale }

// Outcome is how an operation ended, as the client saw it.
type Outcome string

const (
	// OutcomeOK: a command answered 200 (applied at Version), or a read
	// answered 200 with Version and State.
	OutcomeOK Outcome = "ok"
	// OutcomeRejected: a command answered 422; it must not be applied.
	OutcomeRejected Outcome = "rejected"
	// OutcomeNotFound: a read answered 404, the account has no events.
	OutcomeNotFound Outcome = "not-found"
	// OutcomeUnknown: a command the client gave up on after its retries
	// were all ambiguous (504, 500, network errors): it may be applied,
	// at most once.
	OutcomeUnknown Outcome = "unknown"
	// OutcomeNotSent: a command every attempt of which was answered 503,
	// which esker answers only when the command was provably not written:
	// it must not be applied.
	OutcomeNotSent Outcome = "not-sent"
	// OutcomeFailed: a read without an answer. It carries no information
	// and is left out of the checks.
	OutcomeFailed Outcome = "failed"
)

// Op is one operation of the history: its invocation and its completion.
// Times are nanoseconds since the run started, on the monotonic clock. A
// command's interval spans all its attempts (retries reuse its command id).
type Op struct {
	ID        int     `json:"id"`
	Client    int     `json:"client"`
	Kind      OpKind  `json:"kind"`
	Account   string  `json:"account"`
	CommandID string  `json:"commandId,omitempty"`
	Amount    int64   `json:"amount,omitempty"`
	Start     int64   `json:"start"`
	End       int64   `json:"end"`
	Outcome   Outcome `json:"outcome"`
	// Version is the version a command was acknowledged at, or the
	// version a read returned (0 for not-found).
	Version int64 `json:"version,omitempty"`
	// State is the state a read returned.
	State bank.AccountState `json:"state"`
	// Attempts is how many HTTP requests the operation took.
	Attempts int `json:"attempts"`
	// Last is the last attempt's answer: an HTTP status or an error.
	Last string `json:"last,omitempty"`
	// Node is the node the last attempt was sent to, ServedBy the node
	// that answered it (Esker-Served-By), and Standby whether a standby
	// copy answered a stale read.
	Node     int    `json:"node"`
	ServedBy string `json:"servedBy,omitempty"`
	Standby  bool   `json:"standby,omitempty"`
}

// History records operations from many clients at once.
type History struct {
	mu    sync.Mutex
	start time.Time
	ops   []*Op
}

// NewHistory starts the run's clock.
func NewHistory() *History { return &History{start: time.Now()} }

// Now is the time since the run started, in nanoseconds (monotonic).
func (h *History) Now() int64 { return int64(time.Since(h.start)) }

// Invoke records the invocation of op and returns the record to complete.
func (h *History) Invoke(op Op) *Op {
	h.mu.Lock()
	defer h.mu.Unlock()
	op.ID = len(h.ops)
	op.Start = h.Now()
	p := &op
	h.ops = append(h.ops, p)
	return p
}

// Complete records the completion of an operation returned by Invoke; the
// caller has filled in its outcome.
func (h *History) Complete(op *Op) {
	h.mu.Lock()
	defer h.mu.Unlock()
	op.End = h.Now()
}

// Ops returns a copy of the completed operations, in invocation order.
// Operations still in flight are left out.
func (h *History) Ops() []Op {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]Op, 0, len(h.ops))
	for _, op := range h.ops {
		if op.End != 0 {
			out = append(out, *op)
		}
	}
	return out
}

// WriteJSONL writes operations one JSON object a line: the evidence a
// failed run leaves for a person to read.
func WriteJSONL(path string, ops []Op) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	enc := json.NewEncoder(w)
	for _, op := range ops {
		if err := enc.Encode(op); err != nil {
			f.Close()
			return err
		}
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
