package chaostest

import (
	"fmt"
	"hash/fnv"

	"github.com/anishathalye/porcupine"

	"github.com/esker-io/esker/examples/bank"
)

// modelState is one account as the sequential specification sees it: the
// bank domain's state and the account's version (its event count). It is
// comparable, so porcupine's default equality works on it.
type modelState struct {
	Version int64
	Account bank.AccountState
}

// modelInput is what an operation asked for.
type modelInput struct {
	Kind      OpKind
	Account   string
	Amount    int64
	CommandID string
}

// modelOutput is what the client observed. For a command whose outcome is
// unknown, Outcome is OutcomeUnknown and the operation's return time is
// "after the run" (see porcupineOps): it may have taken effect at any point
// after its invocation, or never.
type modelOutput struct {
	Outcome Outcome
	Version int64
	State   bank.AccountState
}

// decide runs the bank domain's own decide and evolve functions on the
// model state: the model must agree with the domain, so it uses it, and
// what is checked is esker's execution of it (ordering, exactly once,
// read visibility), not the domain logic.
func decide(s modelState, in modelInput) (modelState, bool) {
	var cmd bank.Command
	switch in.Kind {
	case OpOpen:
		// Every client opens an account for the same owner (the account
		// id), so which of two concurrent opens wins does not show.
		cmd = bank.Open{Owner: in.Account}
	case OpDeposit:
		cmd = bank.Deposit{Amount: in.Amount}
	case OpWithdraw:
		cmd = bank.Withdraw{Amount: in.Amount}
	default:
		return s, false
	}
	evs, err := bank.Decide(s.Account, cmd)
	if err != nil {
		return s, false
	}
	next := s
	for _, ev := range evs {
		next.Account = bank.Evolve(next.Account, ev)
		next.Version++
	}
	return next, true
}

// accountModel is the porcupine model of one account. Reads must return the
// current state exactly; a command answered 200 must be accepted by the
// domain in the current state and produce the acknowledged version; a
// rejected command must be rejected by the domain and leaves the state
// alone; a command with an unknown outcome takes effect if the domain
// accepts it where porcupine places it (it is "placed" at the end of the
// history when it never happened, which its infinite return time allows).
var accountModel = porcupine.Model{
	Init: func() any { return modelState{} },
	Step: func(state, input, output any) (bool, any) {
		s, in, out := state.(modelState), input.(modelInput), output.(modelOutput)
		if in.Kind == OpGet {
			switch out.Outcome {
			case OutcomeNotFound:
				return s.Version == 0, s
			case OutcomeOK:
				return out.Version == s.Version && out.State == s.Account, s
			}
			return false, s
		}
		next, accepted := decide(s, in)
		switch out.Outcome {
		case OutcomeOK:
			return accepted && next.Version == out.Version, next
		case OutcomeRejected:
			return !accepted, s
		case OutcomeNotSent:
			return true, s
		case OutcomeUnknown:
			if accepted {
				return true, next
			}
			return true, s
		}
		return false, s
	},
	Hash: func(state any) uint64 {
		s := state.(modelState)
		h := fnv.New64a()
		fmt.Fprintf(h, "%d/%d/%t/%t/%s", s.Version, s.Account.Balance, s.Account.Open, s.Account.Closed, s.Account.Owner)
		return h.Sum64()
	},
	DescribeOperation: func(input, output any) string {
		in, out := input.(modelInput), output.(modelOutput)
		var call string
		switch in.Kind {
		case OpGet:
			call = "get()"
		case OpOpen:
			call = "open()"
		default:
			call = fmt.Sprintf("%s(%d)", in.Kind, in.Amount)
		}
		switch out.Outcome {
		case OutcomeOK:
			if in.Kind == OpGet {
				return fmt.Sprintf("%s → v%d %s", call, out.Version, describeAccount(out.State))
			}
			return fmt.Sprintf("%s → ok v%d [%s]", call, out.Version, in.CommandID)
		default:
			if in.CommandID != "" {
				return fmt.Sprintf("%s → %s [%s]", call, out.Outcome, in.CommandID)
			}
			return fmt.Sprintf("%s → %s", call, out.Outcome)
		}
	},
	DescribeState: func(state any) string {
		s := state.(modelState)
		return fmt.Sprintf("v%d %s", s.Version, describeAccount(s.Account))
	},
}

func describeAccount(a bank.AccountState) string {
	switch {
	case a.Closed:
		return fmt.Sprintf("closed balance=%d", a.Balance)
	case a.Open:
		return fmt.Sprintf("open balance=%d", a.Balance)
	}
	return "absent"
}
