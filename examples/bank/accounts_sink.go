package bank

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/projection/pgsink"
)

// AccountsSinkName is the name of the sink AccountsSink builds: its rows in
// esker_sink_offsets and its consumer group ("<app>-accounts-sink").
const AccountsSinkName = "accounts-sink"

// AccountsTableDDL creates the read model AccountsSink writes: one row per
// account with its owner, balance (cents) and version (the number of
// events applied), in the schema the connection's search_path names.
const AccountsTableDDL = `CREATE TABLE IF NOT EXISTS accounts (
	id text PRIMARY KEY,
	owner text,
	balance bigint NOT NULL,
	version bigint NOT NULL,
	updated_at timestamptz NOT NULL
)`

// AccountsSink builds the exactly-once PostgreSQL sink of the demo: it reads
// "account-events" and keeps the table accounts (see AccountsTableDDL,
// created at start by the sink's Setup) up to date. Pass at least the
// database (pgsink.ConnString or pgsink.Pool); other options (StartAt,
// MaxBatch, ...) are passed on, after the sink's own Setup, so a caller's
// Setup replaces it.
//
// The apply is deliberately not idempotent, to show (and let tests prove)
// that the sink applies every event exactly once: a deposit adds its amount
// to the stored balance (balance = balance + amount), and each event's
// version must be exactly the stored version + 1. An event applied twice or
// skipped makes the apply fail with an error naming the account and the
// versions, which stops the sink instead of writing a wrong balance.
func AccountsSink(opts ...pgsink.Option) (*pgsink.Sink, error) {
	all := append([]pgsink.Option{pgsink.Setup(func(ctx context.Context, tx pgx.Tx) error {
		_, err := tx.Exec(ctx, AccountsTableDDL)
		return err
	})}, opts...)
	return pgsink.New(AccountsSinkName, []string{Account.Name() + "-events"}, ApplyAccounts, all...)
}

// accountChange is one account's events within a batch, folded.
type accountChange struct {
	id string
	// fold is Evolve applied to the batch's events from the zero state:
	// its Balance is the net change (Evolve only adds to and subtracts
	// from the balance), its Owner the owner the batch's last Opened or
	// OwnerChanged set ("" if none).
	fold      AccountState
	first     int64 // version of the first event in the batch
	last      int64 // version of the last event in the batch
	updatedAt time.Time
	forgotten bool // the batch forgets the account: its row is deleted
}

// ApplyAccounts is the apply function of AccountsSink. It folds the batch
// per account with the aggregate's own Evolve, from the zero state, which
// gives the net balance change and the last owner set (events of one
// account arrive in version order, and must be consecutive), then writes
// every touched account with one statement: balance = balance + change,
// and only where the stored version is the version before the batch's
// first event for the account; otherwise the batch fails with an error.
// An event type this build does not know takes its version and changes
// nothing. The Forgotten event deletes the account's row.
func ApplyAccounts(ctx context.Context, tx pgx.Tx, events []pgsink.Event) error {
	byID := make(map[string]*accountChange)
	var order []*accountChange
	for i := range events {
		e := &events[i]
		c := byID[e.EntityID]
		if c == nil {
			c = &accountChange{id: e.EntityID, first: e.Version, last: e.Version - 1}
			byID[e.EntityID] = c
			order = append(order, c)
		}
		if e.Version != c.last+1 {
			return fmt.Errorf("account %s: event version %d (%s/%d offset %d) follows version %d in the same batch: an event was repeated or skipped",
				e.EntityID, e.Version, e.Topic, e.Partition, e.Offset, c.last)
		}
		c.last = e.Version
		c.updatedAt = e.Time
		if aggregate.IsForgotten(e.Event) {
			c.forgotten = true
			continue
		}
		ev, err := Account.DecodeEvent(e.Event)
		switch {
		case errors.Is(err, aggregate.ErrUnknownEvent):
			// A newer event type this build does not know: it still
			// takes a version, and changes nothing here.
			continue
		case err != nil:
			return fmt.Errorf("account %s version %d (%s/%d offset %d): %w", e.EntityID, e.Version, e.Topic, e.Partition, e.Offset, err)
		}
		c.fold = Evolve(c.fold, ev)
	}
	if len(order) == 0 {
		return nil
	}
	ids := make([]string, len(order))
	owners := make([]*string, len(order))
	deltas := make([]int64, len(order))
	firsts := make([]int64, len(order))
	lasts := make([]int64, len(order))
	times := make([]time.Time, len(order))
	var fresh []string
	for i, c := range order {
		ids[i], deltas[i], firsts[i], lasts[i], times[i] = c.id, c.fold.Balance, c.first, c.last, c.updatedAt
		if c.fold.Owner != "" {
			owners[i] = &c.fold.Owner
		}
		if c.first == 1 {
			fresh = append(fresh, c.id)
		}
	}
	// New accounts get a row at version 0 first. If the row exists
	// already (the account's first event was applied before), nothing is
	// inserted and the version check below fails.
	if len(fresh) > 0 {
		if _, err := tx.Exec(ctx, `INSERT INTO accounts (id, balance, version, updated_at)
SELECT id, 0, 0, now() FROM unnest($1::text[]) AS id
ON CONFLICT (id) DO NOTHING`, fresh); err != nil {
			return fmt.Errorf("inserting new accounts: %w", err)
		}
	}
	rows, err := tx.Query(ctx, `UPDATE accounts a SET
	balance = a.balance + u.delta,
	version = u.last,
	owner = COALESCE(u.owner, a.owner),
	updated_at = u.updated_at
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::timestamptz[])
	AS u(id, owner, delta, first, last, updated_at)
WHERE a.id = u.id AND a.version = u.first - 1
RETURNING a.id`, ids, owners, deltas, firsts, lasts, times)
	if err != nil {
		return fmt.Errorf("updating accounts: %w", err)
	}
	updated, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("updating accounts: %w", err)
	}
	if len(updated) == len(order) {
		return deleteForgotten(ctx, tx, order)
	}
	done := make(map[string]bool, len(updated))
	for _, id := range updated {
		done[id] = true
	}
	for _, c := range order {
		if done[c.id] {
			continue
		}
		var stored int64
		err := tx.QueryRow(ctx, `SELECT version FROM accounts WHERE id = $1`, c.id).Scan(&stored)
		if errors.Is(err, pgx.ErrNoRows) {
			stored = 0
		} else if err != nil {
			return fmt.Errorf("account %s: event version %d does not follow the stored version (reading it failed: %w)", c.id, c.first, err)
		}
		return fmt.Errorf("account %s: event version %d does not follow stored version %d: an event was applied twice or skipped", c.id, c.first, stored)
	}
	return fmt.Errorf("updated %d accounts, want %d", len(updated), len(order))
}

// deleteForgotten deletes the rows of the accounts the batch forgets: the
// account's owner must not outlive it here either.
func deleteForgotten(ctx context.Context, tx pgx.Tx, order []*accountChange) error {
	var ids []string
	for _, c := range order {
		if c.forgotten {
			ids = append(ids, c.id)
		}
	}
	if len(ids) == 0 {
		return nil
	}
	if _, err := tx.Exec(ctx, `DELETE FROM accounts WHERE id = ANY($1)`, ids); err != nil {
		return fmt.Errorf("deleting forgotten accounts: %w", err)
	}
	return nil
}
