package bank

import (
	"github.com/esker-io/esker/projection"
)

// AccountRow is what the Owners projection keeps of each account: whose it
// is and its balance; an account counts for its owner while it is open. The
// owner's name is personal: sealed with the account's key wherever the row
// is written.
type AccountRow struct {
	Owner   string `json:"owner" esker:"pii"`
	Balance int64  `json:"balance"`
	Open    bool   `json:"open"`
}

// OwnerTotals is a row of the Owners projection.
type OwnerTotals struct {
	Accounts int   `json:"accounts"`
	Balance  int64 `json:"balance"`
}

// FoldAccountRow folds an account event into the account's row.
func FoldAccountRow(r AccountRow, ev projection.Event) AccountRow {
	switch e := ev.Value.(type) {
	case Opened:
		r.Owner, r.Open = e.Owner, true
	case Deposited:
		r.Balance += e.Amount
	case Withdrawn:
		r.Balance -= e.Amount
	case TransferDebited:
		r.Balance -= e.Amount
	case TransferCredited:
		r.Balance += e.Amount
	case OwnerChanged:
		r.Owner = e.Owner
	case Closed:
		r.Open = false
	}
	return r
}

// Owners is the "owners" projection: per owner, the number of open accounts
// and their total balance. It groups accounts by owner, so an account that
// changes owner leaves the first owner's totals and joins the second's.
// Owners' names are personal keys: rows are kept under pseudonyms, and read
// by name.
//
//	GET /v1/projections/owners/alice → {"accounts":2,"balance":1500}
var Owners = projection.GroupBy("owners", FoldAccountRow,
	func(r AccountRow) string {
		if !r.Open {
			return ""
		}
		return r.Owner
	},
	func(t OwnerTotals, r AccountRow) OwnerTotals {
		t.Accounts++
		t.Balance += r.Balance
		return t
	},
	func(t OwnerTotals, r AccountRow) OwnerTotals {
		t.Accounts--
		t.Balance -= r.Balance
		return t
	},
	projection.From(projection.Events(Account)),
	projection.PersonalKeys())

// DayTotals is a row of the DailyTotals projection: the money moved on one
// day (UTC), in cents.
type DayTotals struct {
	Deposits    int64 `json:"deposits"`
	Withdrawals int64 `json:"withdrawals"`
	// Count is the number of deposits and withdrawals.
	Count int `json:"count"`
}

// DailyTotals is the "daily-totals" projection: per day (the events' time,
// UTC, as 2006-01-02), the sums of deposits and withdrawals. Its rows are
// keyed by date, so the events are re-keyed through its repartition topic.
//
//	GET /v1/projections/daily-totals/2026-11-25 → {"deposits":…,"withdrawals":…,"count":…}
//	GET /v1/projections/daily-totals?prefix=2026-11 → November's days
var DailyTotals = projection.New("daily-totals",
	func(t DayTotals, ev projection.Event) DayTotals {
		switch e := ev.Value.(type) {
		case Deposited:
			t.Deposits += e.Amount
			t.Count++
		case Withdrawn:
			t.Withdrawals += e.Amount
			t.Count++
		}
		return t
	},
	projection.From(projection.Events(Account)),
	projection.KeyBy(func(ev projection.Event) string {
		switch ev.Value.(type) {
		case Deposited, Withdrawn:
			return ev.Time.UTC().Format("2006-01-02")
		}
		return "" // other events do not move money
	}))
