// Package bank is esker's demo domain: bank accounts.
//
// An account is opened for an owner, takes deposits and withdrawals (amounts
// in cents, never overdrawn), can change owner, and can be closed once its
// balance is zero. Closing is final.
//
// Two projections read the accounts' events (projections.go): Owners (per
// owner: accounts and total balance, a group-by) and DailyTotals (per day:
// deposits and withdrawals, re-keyed by date).
//
// Names: AccountState is the state of one account, Command and Event are the
// interfaces of its commands and events, and Account is the aggregate type
// (named "account", so its topics are "account-commands" and
// "account-events") that a node registers:
//
//	node.Register(bank.Account)
//
// Over HTTP, a command is its Go type name and its JSON fields:
//
//	POST /v1/aggregates/account/alice/commands
//	{"type": "Deposit", "data": {"amount": 500}}
package bank

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"unicode/utf8"

	"github.com/esker-io/esker/aggregate"
)

// AccountState is the state of one account. The zero value is an account
// that has not been opened.
type AccountState struct {
	Owner string `json:"owner" esker:"pii"`
	// Balance in cents; never negative.
	Balance int64 `json:"balance"`
	// Open is true from the Opened event until the Closed event.
	Open bool `json:"open"`
	// Closed is true once the account has been closed; closing is final.
	Closed bool `json:"closed"`
}

// Command is a command on an account: Open, Deposit, Withdraw, ChangeOwner
// or Close.
type Command interface{ isCommand() }

// Event is an event of an account: Opened, Deposited, Withdrawn,
// OwnerChanged or Closed.
type Event interface{ isEvent() }

// MaxOwnerLength is the longest owner name Open accepts, in characters.
const MaxOwnerLength = 200

// Open opens a new account for an owner.
type Open struct {
	Owner string `json:"owner" esker:"pii"`
}

// Deposit adds Amount cents to the balance. Currency is recorded on the
// event ("EUR" when empty); balances are kept in one currency.
type Deposit struct {
	Amount   int64  `json:"amount"`
	Currency string `json:"currency,omitempty"`
}

// Withdraw takes Amount cents from the balance; it is rejected if the
// balance is too small.
type Withdraw struct {
	Amount int64 `json:"amount"`
}

// ChangeOwner gives an open account to another owner.
type ChangeOwner struct {
	Owner string `json:"owner" esker:"pii"`
}

// Close closes an account whose balance is zero.
type Close struct{}

func (Open) isCommand()              {}
func (DebitForTransfer) isCommand()  {}
func (CreditForTransfer) isCommand() {}
func (Deposit) isCommand()           {}
func (Withdraw) isCommand()          {}
func (ChangeOwner) isCommand()       {}
func (Close) isCommand()             {}

// Validate checks the owner name; it runs at the edge (HTTP) and again in
// Decide.
func (c Open) Validate() error { return validateOwner(c.Owner) }

// Validate checks the new owner's name.
func (c ChangeOwner) Validate() error { return validateOwner(c.Owner) }

func validateOwner(owner string) error {
	if strings.TrimSpace(owner) == "" {
		return errors.New("owner is required")
	}
	if n := utf8.RuneCountInString(owner); n > MaxOwnerLength {
		return fmt.Errorf("owner is %d characters; the limit is %d", n, MaxOwnerLength)
	}
	return nil
}

// Validate checks that the amount is positive.
func (c Deposit) Validate() error { return validateAmount(c.Amount) }

// Validate checks that the amount is positive.
func (c Withdraw) Validate() error { return validateAmount(c.Amount) }

// ErrNonPositiveAmount rejects deposits and withdrawals of zero or less.
var ErrNonPositiveAmount = errors.New("amount must be a positive number of cents")

func validateAmount(amount int64) error {
	if amount <= 0 {
		return ErrNonPositiveAmount
	}
	return nil
}

// Opened records that an account was opened.
type Opened struct {
	Owner string `json:"owner" esker:"pii"`
}

// Deposited records a deposit of Amount cents. It is at schema version 2,
// which added Currency: events written at version 1 (DepositedV1) are read
// with "EUR", through the upcaster registered on Account.
type Deposited struct {
	Amount   int64  `json:"amount"`
	Currency string `json:"currency"`
}

// SchemaVersion is 2: version 1 had no currency.
func (Deposited) SchemaVersion() int { return 2 }

// DepositedV1 is Deposited at schema version 1.
type DepositedV1 struct {
	Amount int64 `json:"amount"`
}

// DefaultCurrency is the currency of deposits that name none, and of
// deposits recorded before Deposited had a currency.
const DefaultCurrency = "EUR"

// Withdrawn records a withdrawal of Amount cents.
type Withdrawn struct {
	Amount int64 `json:"amount"`
}

// OwnerChanged records that an account was given to another owner.
type OwnerChanged struct {
	Owner string `json:"owner" esker:"pii"`
}

// Closed records that an account was closed.
type Closed struct{}

func (Opened) isEvent()                 {}
func (TransferDebited) isEvent()        {}
func (TransferDebitDeclined) isEvent()  {}
func (TransferCredited) isEvent()       {}
func (TransferCreditDeclined) isEvent() {}
func (Deposited) isEvent()              {}
func (Withdrawn) isEvent()              {}
func (OwnerChanged) isEvent()           {}
func (Closed) isEvent()                 {}

// Rejections returned by Decide. Messages reach the client as they are
// (HTTP 422), so they say what is wrong in words a person can act on.
var (
	ErrAlreadyOpen = errors.New("account is already open")
	ErrNotOpen     = errors.New("account is not open; send Open first")
	ErrClosed      = errors.New("account is closed")
)

// Decide turns a command into events or rejects it. It re-runs the
// commands' Validate checks because commands produced straight to the
// "account-commands" topic never pass through the HTTP edge.
func Decide(s AccountState, cmd Command) ([]Event, error) {
	if v, ok := cmd.(interface{ Validate() error }); ok {
		if err := v.Validate(); err != nil {
			return nil, err
		}
	}
	// A transfer's steps are never rejected: the transfer reactor learns
	// their outcome from the events they write (transfer.go).
	switch c := cmd.(type) {
	case DebitForTransfer:
		return []Event{decideDebit(s, c)}, nil
	case CreditForTransfer:
		return []Event{decideCredit(s, c)}, nil
	}
	if s.Closed {
		return nil, ErrClosed
	}
	if c, ok := cmd.(Open); ok {
		if s.Open {
			return nil, ErrAlreadyOpen
		}
		return []Event{Opened{Owner: c.Owner}}, nil
	}
	if !s.Open {
		return nil, ErrNotOpen
	}
	switch c := cmd.(type) {
	case Deposit:
		if c.Amount > math.MaxInt64-s.Balance {
			return nil, fmt.Errorf("deposit of %d would overflow the balance %d", c.Amount, s.Balance)
		}
		currency := c.Currency
		if currency == "" {
			currency = DefaultCurrency
		}
		return []Event{Deposited{Amount: c.Amount, Currency: currency}}, nil
	case Withdraw:
		if c.Amount > s.Balance {
			return nil, fmt.Errorf("insufficient funds: balance %d, withdrawal %d", s.Balance, c.Amount)
		}
		return []Event{Withdrawn{Amount: c.Amount}}, nil
	case ChangeOwner:
		if c.Owner == s.Owner {
			return nil, nil // already theirs: nothing happens
		}
		return []Event{OwnerChanged{Owner: c.Owner}}, nil
	case Close:
		if s.Balance != 0 {
			return nil, fmt.Errorf("cannot close an account with a balance of %d; withdraw it first", s.Balance)
		}
		return []Event{Closed{}}, nil
	default:
		return nil, fmt.Errorf("unknown command %T", cmd)
	}
}

// Evolve folds one event into the state. Unknown events leave the state
// unchanged.
func Evolve(s AccountState, ev Event) AccountState {
	switch e := ev.(type) {
	case Opened:
		s.Owner = e.Owner
		s.Open = true
	case Deposited:
		s.Balance += e.Amount
	case Withdrawn:
		s.Balance -= e.Amount
	case OwnerChanged:
		s.Owner = e.Owner
	case TransferDebited:
		s.Balance -= e.Amount
	case TransferCredited:
		s.Balance += e.Amount
	case Closed:
		s.Open = false
		s.Closed = true
	}
	return s
}

// Account is the "account" aggregate type: register it on an esker.Node.
var Account = aggregate.New[AccountState, Command, Event]("account", Decide, Evolve).
	Commands(Open{}, Deposit{}, Withdraw{}, ChangeOwner{}, Close{}, DebitForTransfer{}, CreditForTransfer{}).
	Events(Opened{}, Deposited{}, Withdrawn{}, OwnerChanged{}, Closed{},
		TransferDebited{}, TransferDebitDeclined{}, TransferCredited{}, TransferCreditDeclined{}).
	Upcast("Deposited", 1, aggregate.UpcastJSON(func(v1 DepositedV1) Deposited {
		return Deposited{Amount: v1.Amount, Currency: DefaultCurrency}
	}))
