package esker_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/projection/pgsink"
)

// pgSchema creates a fresh schema in the test database (PostgreSQL on
// 127.0.0.1:5432) and returns a connection string whose search_path is it;
// the schema is dropped when the test ends.
func pgSchema(t *testing.T) string {
	t.Helper()
	ctx := context.Background()
	base := "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	if u := os.Getenv("ESKER_TEST_POSTGRES"); u != "" {
		base = u
	}
	conn, err := pgx.Connect(ctx, base)
	if err != nil {
		t.Fatalf("PostgreSQL on 127.0.0.1:5432 (database test): %v", err)
	}
	schema := fmt.Sprintf("esker_node_%d", rand.Uint64()%1e12)
	if _, err := conn.Exec(ctx, "CREATE SCHEMA "+schema); err != nil {
		t.Fatal(err)
	}
	conn.Close(ctx)
	t.Cleanup(func() {
		conn, err := pgx.Connect(context.Background(), base)
		if err == nil {
			_, _ = conn.Exec(context.Background(), "DROP SCHEMA "+schema+" CASCADE")
			conn.Close(context.Background())
		}
	})
	sep := "?"
	if strings.Contains(base, "?") {
		sep = "&"
	}
	return base + sep + "search_path=" + schema
}

// TestAccountsSinkOnTheNode: the bank's PostgreSQL sink, added to a node,
// keeps the accounts table equal to the accounts' states, and the node lists
// it in GET /v1/cluster.
func TestAccountsSinkOnTheNode(t *testing.T) {
	dsn := pgSchema(t)
	sink, err := bank.AccountsSink(pgsink.ConnString(dsn))
	if err != nil {
		t.Fatal(err)
	}
	c := newCluster(t)
	tn := startTypesNode(t, c.ListenAddrs(), t.TempDir(), []any{bank.Account, sink})
	want := map[string]int64{}
	for i := range 10 {
		id := fmt.Sprintf("pg-%d", i)
		code, body := do(t, tn, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Open", map[string]any{"owner": "o" + id}))
		mustStatus(t, 200, code, body, "open")
		for j := range 5 {
			code, body := do(t, tn, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Deposit", map[string]any{"amount": 10 * (j + 1)}))
			mustStatus(t, 200, code, body, "deposit")
			want[id] += int64(10 * (j + 1))
		}
	}
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := map[string]int64{}
		versions := map[string]int64{}
		rows, err := conn.Query(context.Background(), "SELECT id, balance, version FROM accounts")
		if err == nil {
			for rows.Next() {
				var id string
				var balance, version int64
				if err := rows.Scan(&id, &balance, &version); err != nil {
					t.Fatal(err)
				}
				got[id], versions[id] = balance, version
			}
			rows.Close()
		}
		ok := len(got) == len(want)
		for id, b := range want {
			ok = ok && got[id] == b && versions[id] == 6
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("accounts table %v (versions %v, err %v), want balances %v at version 6", got, versions, err, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
	code, body := do(t, tn, "GET", "/v1/cluster", nil)
	mustStatus(t, 200, code, body, "cluster")
	for _, p := range anySlice(body["processors"]) {
		p := p.(map[string]any)
		if p["name"] == bank.AccountsSinkName && p["kind"] == "sink" && p["error"] == nil {
			return
		}
	}
	t.Fatalf("the sink is missing from /v1/cluster: %v", body["processors"])
}
