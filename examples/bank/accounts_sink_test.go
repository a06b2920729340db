package bank_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/projection/pgsink"
)

// accountsDB connects to the test database with a fresh schema holding the
// accounts table, dropped at cleanup.
func accountsDB(t *testing.T) *pgx.Conn {
	t.Helper()
	url := os.Getenv("ESKER_TEST_POSTGRES")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("PostgreSQL at %s is needed (set ESKER_TEST_POSTGRES to another server): %v", url, err)
	}
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	schema := "bank_test_" + hex.EncodeToString(b)
	for _, q := range []string{"CREATE SCHEMA " + schema, "SET search_path TO " + schema, bank.AccountsTableDDL} {
		if _, err := conn.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		if _, err := conn.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE"); err != nil {
			t.Errorf("dropping schema %s: %v", schema, err)
		}
		conn.Close(ctx)
	})
	return conn
}

func sinkEvent(t *testing.T, id string, version int64, e bank.Event) pgsink.Event {
	t.Helper()
	name, _, data, err := bank.Account.Untyped().EncodeEvent(e)
	if err != nil {
		t.Fatal(err)
	}
	return pgsink.Event{Event: aggregate.Event{EntityID: id, Version: version, Type: name, SchemaVersion: 1,
		Time: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), Data: json.RawMessage(data)}, Topic: "account-events"}
}

// apply runs ApplyAccounts in a transaction, committed only if it succeeds.
func apply(t *testing.T, conn *pgx.Conn, events ...pgsink.Event) error {
	t.Helper()
	ctx := context.Background()
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if err := bank.ApplyAccounts(ctx, tx, events); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

func account(t *testing.T, conn *pgx.Conn, id string) (owner string, balance, version int64) {
	t.Helper()
	if err := conn.QueryRow(context.Background(), "SELECT owner, balance, version FROM accounts WHERE id = $1", id).Scan(&owner, &balance, &version); err != nil {
		t.Fatalf("account %s: %v", id, err)
	}
	return
}

// TestApplyAccounts: the accounts apply folds events into balances and
// versions, and refuses an event applied twice or skipped — the check the
// sink tests rely on to prove exactly-once.
func TestApplyAccounts(t *testing.T) {
	conn := accountsDB(t)
	ok := func(events ...pgsink.Event) {
		t.Helper()
		if err := apply(t, conn, events...); err != nil {
			t.Fatal(err)
		}
	}
	fails := func(want string, events ...pgsink.Event) {
		t.Helper()
		err := apply(t, conn, events...)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("ApplyAccounts = %v, want an error containing %q", err, want)
		}
	}

	ok(sinkEvent(t, "a", 1, bank.Opened{Owner: "alice"}),
		sinkEvent(t, "a", 2, bank.Deposited{Amount: 500}),
		sinkEvent(t, "b", 1, bank.Opened{Owner: "bob"}),
		sinkEvent(t, "a", 3, bank.Withdrawn{Amount: 200}))
	ok(sinkEvent(t, "a", 4, bank.Deposited{Amount: 5}), sinkEvent(t, "b", 2, bank.Deposited{Amount: 7}))
	if owner, balance, version := account(t, conn, "a"); owner != "alice" || balance != 305 || version != 4 {
		t.Fatalf("account a = %s %d v%d, want alice 305 v4", owner, balance, version)
	}
	if owner, balance, version := account(t, conn, "b"); owner != "bob" || balance != 7 || version != 2 {
		t.Fatalf("account b = %s %d v%d, want bob 7 v2", owner, balance, version)
	}

	fails("event version 4 does not follow stored version 4", sinkEvent(t, "a", 4, bank.Deposited{Amount: 5}))
	fails("event version 6 does not follow stored version 4", sinkEvent(t, "a", 6, bank.Deposited{Amount: 5}))
	fails("event version 1 does not follow stored version 2", sinkEvent(t, "b", 1, bank.Opened{Owner: "bob"}))
	fails("follows version 5 in the same batch", sinkEvent(t, "a", 5, bank.Deposited{Amount: 1}), sinkEvent(t, "a", 7, bank.Deposited{Amount: 1}))
	fails("does not follow stored version 0", sinkEvent(t, "c", 2, bank.Deposited{Amount: 1}))

	// The failed batches changed nothing.
	if _, balance, version := account(t, conn, "a"); balance != 305 || version != 4 {
		t.Fatalf("account a after refused batches = %d v%d, want 305 v4", balance, version)
	}
}
