package chaostest

import (
	"os"
	"strings"
	"testing"

	"github.com/anishathalye/porcupine"

	"github.com/esker-io/esker/examples/bank"
)

// story builds a hand-made history and the events topic that goes with it.
// Times are in seconds, turned into nanoseconds.
type story struct {
	ops    []Op
	events []EventRecord
}

const sec = int64(1e9)

func (s *story) cmd(client int, acc string, kind OpKind, amount int64, id string, start, end int64, out Outcome, version int64) {
	s.ops = append(s.ops, Op{ID: len(s.ops), Client: client, Kind: kind, Account: acc, CommandID: id, Amount: amount,
		Start: start * sec, End: end * sec, Outcome: out, Version: version, Attempts: 1})
}

func (s *story) get(client int, acc string, start, end int64, version, balance int64) {
	op := Op{ID: len(s.ops), Client: client, Kind: OpGet, Account: acc, Start: start * sec, End: end * sec,
		Outcome: OutcomeOK, Version: version, Attempts: 1}
	if version == 0 {
		op.Outcome = OutcomeNotFound
	} else {
		op.State = bank.AccountState{Owner: acc, Balance: balance, Open: true}
	}
	s.ops = append(s.ops, op)
}

func (s *story) event(acc string, version int64, id, typ string, amount int64) {
	e := EventRecord{Account: acc, Version: version, CommandID: id, EventID: acc + "-" + typ, Type: typ, Amount: amount, Offset: int64(len(s.events))}
	if typ == "Opened" {
		e.Owner = acc
	}
	s.events = append(s.events, e)
}

// clean is a history without anomalies on two accounts: concurrent
// deposits, a rejected withdrawal, an unknown deposit that was applied and
// one that was not, reads.
func clean() *story {
	s := &story{}
	s.cmd(0, "a", OpOpen, 0, "a-open", 0, 1, OutcomeOK, 1)
	s.event("a", 1, "a-open", "Opened", 0)
	s.cmd(0, "a", OpDeposit, 100, "a-d1", 2, 5, OutcomeOK, 3)
	s.cmd(1, "a", OpDeposit, 50, "a-d2", 2, 4, OutcomeOK, 2)
	s.event("a", 2, "a-d2", "Deposited", 50)
	s.event("a", 3, "a-d1", "Deposited", 100)
	s.get(2, "a", 3, 4, 2, 50)
	s.cmd(1, "a", OpWithdraw, 500, "a-w1", 6, 7, OutcomeRejected, 0)
	s.cmd(1, "a", OpDeposit, 7, "a-d3", 8, 20, OutcomeUnknown, 0)
	s.event("a", 4, "a-d3", "Deposited", 7)
	s.cmd(0, "a", OpDeposit, 9, "a-d4", 8, 20, OutcomeUnknown, 0)
	s.get(2, "a", 21, 22, 4, 157)
	s.cmd(0, "b", OpDeposit, 5, "b-d0", 0, 1, OutcomeRejected, 0)
	s.get(0, "b", 2, 3, 0, 0)
	s.cmd(0, "b", OpOpen, 0, "b-open", 4, 5, OutcomeOK, 1)
	s.event("b", 1, "b-open", "Opened", 0)
	s.cmd(1, "b", OpOpen, 0, "b-open2", 4, 6, OutcomeRejected, 0)
	s.get(1, "b", 7, 8, 1, 0)
	return s
}

func (s *story) input() CheckInput {
	return CheckInput{History: s.ops, Events: s.events, ResolveUnknown: true}
}

func kinds(r CheckResult) string {
	var out []string
	for _, a := range r.Anomalies {
		out = append(out, a.String())
	}
	return strings.Join(out, "\n")
}

func TestCheckCleanHistory(t *testing.T) {
	s := clean()
	in := s.input()
	in.FinalReads = []NodeRead{
		{Node: 0, Account: "a", Status: 200, Version: 4, State: bank.AccountState{Owner: "a", Balance: 157, Open: true}},
		{Node: 1, Account: "b", Status: 200, Version: 1, State: bank.AccountState{Owner: "b", Open: true}},
		{Node: 2, Account: "c", Status: 404},
		{Node: 2, Account: "a", Stale: true, Status: 200, Version: 2, State: bank.AccountState{Owner: "a", Balance: 50, Open: true}, Standby: true},
	}
	in.EventsAPI = map[string][]EventRecord{"b": {s.events[4]}}
	in.Owners = map[string]bank.OwnerTotals{"a": {Accounts: 1, Balance: 157}, "b": {Accounts: 1}}
	r := Check(in)
	if len(r.Anomalies) != 0 {
		t.Fatalf("anomalies in a clean history:\n%s", kinds(r))
	}
	for acc, v := range r.Linearizability {
		if v != porcupine.Ok {
			t.Fatalf("%s: %s", acc, v)
		}
	}
	if r.UnknownApplied != 1 || r.UnknownNotApplied != 1 || r.Applied != 5 {
		t.Fatalf("unknown applied %d, not applied %d, applied %d; want 1, 1, 5", r.UnknownApplied, r.UnknownNotApplied, r.Applied)
	}
	// Without resolving the unknown commands against the events topic,
	// the history is still linearizable: the model treats them as maybe.
	in.ResolveUnknown = false
	if r := Check(in); len(r.Anomalies) != 0 {
		t.Fatalf("anomalies without resolution:\n%s", kinds(r))
	}
}

// TestCheckFindsAnomalies plants one anomaly at a time in the clean history
// and checks that the checker names it.
func TestCheckFindsAnomalies(t *testing.T) {
	cases := []struct {
		name  string
		plant func(s *story, in *CheckInput)
		want  []string
	}{
		{"projection row off", func(s *story, in *CheckInput) {
			in.Owners = map[string]bank.OwnerTotals{"a": {Accounts: 1, Balance: 150}, "b": {Accounts: 1}}
		}, []string{KindProjection}},
		{"projection row missing", func(s *story, in *CheckInput) {
			in.Owners = map[string]bank.OwnerTotals{"a": {Accounts: 1, Balance: 157}}
		}, []string{KindProjection}},
		{"projection row extra", func(s *story, in *CheckInput) {
			in.Owners = map[string]bank.OwnerTotals{"a": {Accounts: 1, Balance: 157}, "b": {Accounts: 1}, "z": {Accounts: 1}}
		}, []string{KindProjection}},
		{"lost write", func(s *story, in *CheckInput) {
			s.cmd(3, "b", OpDeposit, 10, "b-lost", 9, 10, OutcomeOK, 2)
			in.History = s.ops
		}, []string{KindLost}},
		{"duplicate", func(s *story, in *CheckInput) {
			s.event("b", 2, "b-open", "Opened", 0)
			in.Events = s.events
		}, []string{KindDuplicated}},
		{"rejected but applied", func(s *story, in *CheckInput) {
			s.event("b", 2, "b-open2", "Opened", 0)
			in.Events = s.events
		}, []string{KindRejectedApplied}},
		{"acknowledged at another version", func(s *story, in *CheckInput) {
			s.ops[1].Version = 2
			s.ops[2].Version = 3
		}, []string{KindAckVersion, KindNonLinearizable}},
		{"version gap", func(s *story, in *CheckInput) {
			s.event("b", 3, "b-x", "Deposited", 1)
			s.cmd(3, "b", OpDeposit, 1, "b-x", 9, 10, OutcomeUnknown, 0)
			in.Events, in.History = s.events, s.ops
		}, []string{KindVersionGap, KindNonLinearizable}},
		{"phantom event", func(s *story, in *CheckInput) {
			s.event("b", 2, "nobody", "Deposited", 1)
			in.Events = s.events
		}, []string{KindPhantom}},
		{"negative balance", func(s *story, in *CheckInput) {
			s.event("b", 2, "b-w", "Withdrawn", 1)
			s.cmd(3, "b", OpWithdraw, 1, "b-w", 9, 10, OutcomeUnknown, 0)
			in.Events, in.History = s.events, s.ops
		}, []string{KindNegative, KindNonLinearizable}},
		{"stale read", func(s *story, in *CheckInput) {
			s.get(3, "a", 30, 31, 2, 50)
			in.History = s.ops
		}, []string{KindStaleRead, KindNonLinearizable}},
		{"non-linearizable reads", func(s *story, in *CheckInput) {
			// The first read sees v4 (the unknown deposit), the second,
			// which began later, v3. No write was acknowledged at v4, so
			// this is not a stale read by that definition, but no order
			// explains it.
			s.get(3, "a", 12, 13, 4, 157)
			s.get(3, "a", 14, 15, 3, 150)
			in.History = s.ops
		}, []string{KindNonLinearizable}},
		{"read of a write that never committed", func(s *story, in *CheckInput) {
			// The read shows a deposit of 9 that the events topic does
			// not hold: with the unknown command resolved as "never
			// applied", nothing explains it.
			s.get(3, "a", 23, 24, 5, 166)
			in.History = s.ops
		}, []string{KindImpossibleRead, KindNonLinearizable}},
		{"settled answer differs", func(s *story, in *CheckInput) {
			in.FinalReads = []NodeRead{{Node: 1, Account: "a", Status: 200, Version: 3, State: bank.AccountState{Owner: "a", Balance: 150, Open: true}}}
		}, []string{KindStateMismatch}},
		{"settled answer missing", func(s *story, in *CheckInput) {
			in.FinalReads = []NodeRead{{Node: 1, Account: "a", Status: 503}}
		}, []string{KindUnavailable}},
		{"standby answer the account never had", func(s *story, in *CheckInput) {
			in.FinalReads = []NodeRead{{Node: 1, Account: "a", Stale: true, Status: 200, Version: 2, State: bank.AccountState{Owner: "a", Balance: 100, Open: true}}}
		}, []string{KindStandbyMismatch}},
		{"events route differs", func(s *story, in *CheckInput) {
			in.EventsAPI = map[string][]EventRecord{"a": s.events[:2]}
		}, []string{KindEventsAPI}},
		{"applied after 503", func(s *story, in *CheckInput) {
			s.cmd(3, "b", OpDeposit, 2, "b-503", 9, 10, OutcomeNotSent, 0)
			s.event("b", 2, "b-503", "Deposited", 2)
			in.Events, in.History = s.events, s.ops
		}, []string{KindNotSentApplied}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := clean()
			in := s.input()
			in.VisualizeDir = t.TempDir()
			c.plant(s, &in)
			if in.History == nil || len(in.History) < len(s.ops) {
				in.History = s.ops
			}
			r := Check(in)
			got := r.ByKind()
			for _, k := range c.want {
				if got[k] == 0 {
					t.Errorf("no %s anomaly; found:\n%s", k, kinds(r))
				}
			}
			for k := range got {
				if !contains(c.want, k) {
					t.Errorf("unexpected %s anomaly:\n%s", k, kinds(r))
				}
			}
			if got[KindNonLinearizable] > 0 {
				if len(r.Visualizations) == 0 {
					t.Fatal("no visualization written for a non-linearizable account")
				}
				for _, path := range r.Visualizations {
					if fi, err := os.Stat(path); err != nil || fi.Size() == 0 {
						t.Fatalf("visualization %s: %v", path, err)
					}
				}
			}
			if !r.Fatal() {
				t.Fatal("the anomaly does not fail the run")
			}
		})
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
