package bank

import (
	"errors"
	"fmt"
	"math"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/projection"
	"github.com/esker-io/esker/sideeffects"
)

// Transfers move money between two accounts without a distributed
// transaction: a transfer is its own aggregate, and the Transfers reactor
// drives it through the accounts with commands whose outcomes come back as
// events:
//
//	transfer Initiated          → source account: DebitForTransfer
//	account TransferDebited     → transfer: MarkDebited; target account: CreditForTransfer
//	account TransferDebitDeclined → transfer: Fail (nothing moved)
//	account TransferCredited    → transfer: Complete
//	account TransferCreditDeclined → source account: CreditForTransfer (refund); transfer: Fail
//
// Each step is one Kafka transaction (the event consumed, the commands
// produced), and the accounts never reject a transfer step: a debit the
// balance cannot cover is recorded as TransferDebitDeclined, so the reactor
// sees every outcome. Money is conserved at every committed step, and every
// transfer ends exactly once, Completed or Failed.

// TransferState is the state of one transfer.
type TransferState struct {
	From   string `json:"from"`
	To     string `json:"to"`
	Amount int64  `json:"amount"`
	// Status is "initiated", "debited", "completed" or "failed".
	Status string `json:"status"`
	Reason string `json:"reason,omitempty"`
}

// TransferCommand is a command on a transfer.
type TransferCommand interface{ isTransferCommand() }

// TransferEvent is an event of a transfer.
type TransferEvent interface{ isTransferEvent() }

// Initiate starts a transfer of Amount cents from one account to another.
type Initiate struct {
	From   string `json:"from"`
	To     string `json:"to"`
	Amount int64  `json:"amount"`
}

// MarkDebited, Complete and Fail are sent by the Transfers reactor.
type (
	MarkDebited struct{}
	Complete    struct{}
	Fail        struct {
		Reason string `json:"reason"`
	}
)

func (Initiate) isTransferCommand()    {}
func (MarkDebited) isTransferCommand() {}
func (Complete) isTransferCommand()    {}
func (Fail) isTransferCommand()        {}

// Validate checks the accounts and the amount.
func (c Initiate) Validate() error {
	if err := aggregate.ValidateEntityID(c.From); err != nil {
		return fmt.Errorf("from: %w", err)
	}
	if err := aggregate.ValidateEntityID(c.To); err != nil {
		return fmt.Errorf("to: %w", err)
	}
	if c.From == c.To {
		return errors.New("from and to are the same account")
	}
	return validateAmount(c.Amount)
}

// Transfer events.
type (
	Initiated struct {
		From   string `json:"from"`
		To     string `json:"to"`
		Amount int64  `json:"amount"`
	}
	Debited   struct{}
	Completed struct{}
	Failed    struct {
		Reason string `json:"reason"`
	}
)

func (Initiated) isTransferEvent() {}
func (Debited) isTransferEvent()   {}
func (Completed) isTransferEvent() {}
func (Failed) isTransferEvent()    {}

// ErrTransferExists rejects a second Initiate of one transfer id.
var ErrTransferExists = errors.New("transfer already initiated; use a new transfer id")

// DecideTransfer handles transfer commands. Steps that arrive again, or
// after the transfer ended, change nothing.
func DecideTransfer(s TransferState, cmd TransferCommand) ([]TransferEvent, error) {
	switch c := cmd.(type) {
	case Initiate:
		if err := c.Validate(); err != nil {
			return nil, err
		}
		if s.Status != "" {
			return nil, ErrTransferExists
		}
		return []TransferEvent{Initiated(c)}, nil
	case MarkDebited:
		if s.Status == "initiated" {
			return []TransferEvent{Debited{}}, nil
		}
	case Complete:
		if s.Status == "initiated" || s.Status == "debited" {
			return []TransferEvent{Completed{}}, nil
		}
	case Fail:
		if s.Status == "initiated" || s.Status == "debited" {
			return []TransferEvent{Failed(c)}, nil
		}
	default:
		return nil, fmt.Errorf("unknown command %T", cmd)
	}
	return nil, nil
}

// EvolveTransfer folds a transfer event.
func EvolveTransfer(s TransferState, ev TransferEvent) TransferState {
	switch e := ev.(type) {
	case Initiated:
		s.From, s.To, s.Amount, s.Status = e.From, e.To, e.Amount, "initiated"
	case Debited:
		s.Status = "debited"
	case Completed:
		s.Status = "completed"
	case Failed:
		s.Status, s.Reason = "failed", e.Reason
	}
	return s
}

// Transfer is the "transfer" aggregate type.
var Transfer = aggregate.New[TransferState, TransferCommand, TransferEvent]("transfer", DecideTransfer, EvolveTransfer).
	Commands(Initiate{}, MarkDebited{}, Complete{}, Fail{}).
	Events(Initiated{}, Debited{}, Completed{}, Failed{})

// The account side of a transfer.
type (
	// DebitForTransfer takes a transfer's amount from its source account.
	DebitForTransfer struct {
		Transfer string `json:"transfer"`
		To       string `json:"to"`
		Amount   int64  `json:"amount"`
	}
	// CreditForTransfer gives a transfer's amount to its target account,
	// or back to its source (Refund) when the target declined it.
	CreditForTransfer struct {
		Transfer string `json:"transfer"`
		From     string `json:"from"`
		Amount   int64  `json:"amount"`
		Refund   bool   `json:"refund,omitempty"`
	}
	TransferDebited struct {
		Transfer string `json:"transfer"`
		To       string `json:"to"`
		Amount   int64  `json:"amount"`
	}
	TransferDebitDeclined struct {
		Transfer string `json:"transfer"`
		Amount   int64  `json:"amount"`
		Reason   string `json:"reason"`
	}
	TransferCredited struct {
		Transfer string `json:"transfer"`
		Amount   int64  `json:"amount"`
		Refund   bool   `json:"refund,omitempty"`
	}
	TransferCreditDeclined struct {
		Transfer string `json:"transfer"`
		From     string `json:"from"`
		Amount   int64  `json:"amount"`
		Reason   string `json:"reason"`
	}
)

func decideDebit(s AccountState, c DebitForTransfer) Event {
	reason := ""
	switch {
	case c.Amount <= 0:
		reason = ErrNonPositiveAmount.Error()
	case !s.Open:
		reason = "the source account is not open"
	case c.Amount > s.Balance:
		reason = fmt.Sprintf("insufficient funds: balance %d, transfer %d", s.Balance, c.Amount)
	default:
		return TransferDebited(c)
	}
	return TransferDebitDeclined{Transfer: c.Transfer, Amount: c.Amount, Reason: reason}
}

func decideCredit(s AccountState, c CreditForTransfer) Event {
	if c.Refund {
		// Money taken must go back, whatever happened to the account since.
		return TransferCredited{Transfer: c.Transfer, Amount: c.Amount, Refund: true}
	}
	reason := ""
	switch {
	case c.Amount <= 0:
		reason = ErrNonPositiveAmount.Error()
	case !s.Open:
		reason = "the target account is not open"
	case c.Amount > math.MaxInt64-s.Balance:
		reason = "the target balance would overflow"
	default:
		return TransferCredited{Transfer: c.Transfer, Amount: c.Amount}
	}
	return TransferCreditDeclined{Transfer: c.Transfer, From: c.From, Amount: c.Amount, Reason: reason}
}

// ReactToTransfers is the Transfers reactor's function: the table at the
// top of this file.
func ReactToTransfers(ev projection.Event) []aggregate.Addressed {
	switch e := ev.Value.(type) {
	case Initiated:
		return []aggregate.Addressed{Account.To(e.From, DebitForTransfer{Transfer: ev.EntityID, To: e.To, Amount: e.Amount})}
	case TransferDebited:
		return []aggregate.Addressed{
			Transfer.To(e.Transfer, MarkDebited{}),
			Account.To(e.To, CreditForTransfer{Transfer: e.Transfer, From: ev.EntityID, Amount: e.Amount}),
		}
	case TransferDebitDeclined:
		return []aggregate.Addressed{Transfer.To(e.Transfer, Fail{Reason: e.Reason})}
	case TransferCredited:
		if !e.Refund {
			return []aggregate.Addressed{Transfer.To(e.Transfer, Complete{})}
		}
	case TransferCreditDeclined:
		return []aggregate.Addressed{
			Account.To(e.From, CreditForTransfer{Transfer: e.Transfer, Amount: e.Amount, Refund: true}),
			Transfer.To(e.Transfer, Fail{Reason: e.Reason}),
		}
	}
	return nil
}

// Transfers is the "transfers" reactor: register it with the Account and
// Transfer types (node.AddReactor(bank.Transfers)).
var Transfers = sideeffects.NewReactor("transfers", ReactToTransfers,
	projection.Events(Transfer), projection.Events(Account))
