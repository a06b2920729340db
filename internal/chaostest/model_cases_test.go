package chaostest

import (
	"math"
	"testing"

	"github.com/anishathalye/porcupine"

	"github.com/esker-io/esker/examples/bank"
)

// pop builds one porcupine operation on the account model; times are in
// arbitrary units.
func pop(client int, kind OpKind, amount int64, outcome Outcome, version, balance int64, call, ret int64) porcupine.Operation {
	in := modelInput{Kind: kind, Account: "a", Amount: amount, CommandID: "c"}
	out := modelOutput{Outcome: outcome, Version: version}
	if kind == OpGet && outcome == OutcomeOK {
		out.State = bank.AccountState{Owner: "a", Balance: balance, Open: true}
	}
	return porcupine.Operation{ClientId: client, Input: in, Output: out, Call: call, Return: ret}
}

// TestModel feeds the account model histories whose verdict is known: it
// must accept the linearizable ones and reject the others, or the
// linearizability check of the chaos run means nothing.
func TestModel(t *testing.T) {
	const inf = math.MaxInt64
	cases := []struct {
		name string
		ops  []porcupine.Operation
		want porcupine.CheckResult
	}{
		{"sequential", []porcupine.Operation{
			pop(0, OpOpen, 0, OutcomeOK, 1, 0, 0, 1),
			pop(0, OpDeposit, 100, OutcomeOK, 2, 0, 2, 3),
			pop(1, OpGet, 0, OutcomeOK, 2, 100, 4, 5),
			pop(0, OpWithdraw, 50, OutcomeOK, 3, 0, 6, 7),
			pop(0, OpWithdraw, 100, OutcomeRejected, 0, 0, 8, 9),
			pop(0, OpOpen, 0, OutcomeRejected, 0, 0, 10, 11),
			pop(1, OpGet, 0, OutcomeOK, 3, 50, 12, 13),
		}, porcupine.Ok},
		{"read before open is not found", []porcupine.Operation{
			pop(1, OpGet, 0, OutcomeNotFound, 0, 0, 0, 1),
			pop(0, OpDeposit, 5, OutcomeRejected, 0, 0, 2, 3),
			pop(0, OpOpen, 0, OutcomeOK, 1, 0, 4, 5),
		}, porcupine.Ok},
		{"concurrent deposits in either order", []porcupine.Operation{
			pop(0, OpOpen, 0, OutcomeOK, 1, 0, 0, 1),
			pop(0, OpDeposit, 10, OutcomeOK, 3, 0, 2, 10),
			pop(1, OpDeposit, 20, OutcomeOK, 2, 0, 3, 9),
			pop(2, OpGet, 0, OutcomeOK, 2, 20, 4, 8),
			pop(2, OpGet, 0, OutcomeOK, 3, 30, 11, 12),
		}, porcupine.Ok},
		{"stale read after an acknowledged write", []porcupine.Operation{
			pop(0, OpOpen, 0, OutcomeOK, 1, 0, 0, 1),
			pop(0, OpDeposit, 100, OutcomeOK, 2, 0, 2, 3),
			pop(1, OpGet, 0, OutcomeOK, 1, 0, 4, 5),
		}, porcupine.Illegal},
		{"read goes back in time", []porcupine.Operation{
			pop(0, OpOpen, 0, OutcomeOK, 1, 0, 0, 1),
			pop(0, OpDeposit, 100, OutcomeOK, 2, 0, 2, 20),
			pop(1, OpGet, 0, OutcomeOK, 2, 100, 4, 5),
			pop(1, OpGet, 0, OutcomeOK, 1, 0, 6, 7),
		}, porcupine.Illegal},
		{"two commands acknowledged at one version", []porcupine.Operation{
			pop(0, OpOpen, 0, OutcomeOK, 1, 0, 0, 1),
			pop(0, OpDeposit, 10, OutcomeOK, 2, 0, 2, 5),
			pop(1, OpDeposit, 20, OutcomeOK, 2, 0, 2, 5),
		}, porcupine.Illegal},
		{"withdrawal rejected although the balance covers it", []porcupine.Operation{
			pop(0, OpOpen, 0, OutcomeOK, 1, 0, 0, 1),
			pop(0, OpDeposit, 100, OutcomeOK, 2, 0, 2, 3),
			pop(0, OpWithdraw, 10, OutcomeRejected, 0, 0, 4, 5),
		}, porcupine.Illegal},
		{"overdraft acknowledged", []porcupine.Operation{
			pop(0, OpOpen, 0, OutcomeOK, 1, 0, 0, 1),
			pop(0, OpWithdraw, 10, OutcomeOK, 2, 0, 2, 3),
		}, porcupine.Illegal},
		{"unknown deposit seen by a read", []porcupine.Operation{
			pop(0, OpOpen, 0, OutcomeOK, 1, 0, 0, 1),
			pop(0, OpDeposit, 10, OutcomeUnknown, 0, 0, 2, inf),
			pop(1, OpGet, 0, OutcomeOK, 2, 10, 30, 31),
		}, porcupine.Ok},
		{"unknown deposit never seen", []porcupine.Operation{
			pop(0, OpOpen, 0, OutcomeOK, 1, 0, 0, 1),
			pop(0, OpDeposit, 10, OutcomeUnknown, 0, 0, 2, inf),
			pop(1, OpGet, 0, OutcomeOK, 1, 0, 30, 31),
			pop(1, OpDeposit, 5, OutcomeOK, 2, 0, 32, 33),
			pop(1, OpGet, 0, OutcomeOK, 2, 5, 34, 35),
		}, porcupine.Ok},
		{"unknown deposit cannot explain another amount", []porcupine.Operation{
			pop(0, OpOpen, 0, OutcomeOK, 1, 0, 0, 1),
			pop(0, OpDeposit, 10, OutcomeUnknown, 0, 0, 2, inf),
			pop(1, OpGet, 0, OutcomeOK, 2, 20, 30, 31),
		}, porcupine.Illegal},
		{"unknown deposit cannot take effect before it was sent", []porcupine.Operation{
			pop(0, OpOpen, 0, OutcomeOK, 1, 0, 0, 1),
			pop(1, OpGet, 0, OutcomeOK, 2, 10, 2, 3),
			pop(0, OpDeposit, 10, OutcomeUnknown, 0, 0, 4, inf),
		}, porcupine.Illegal},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := porcupine.CheckOperationsTimeout(accountModel, c.ops, 0); got != c.want {
				t.Fatalf("porcupine says %s, want %s", got, c.want)
			}
		})
	}
}
