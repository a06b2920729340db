package esker_test

import (
	"bytes"
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/internal/keyring"
	"github.com/esker-io/esker/projection"
	"github.com/esker-io/esker/projection/pgsink"
)

// TestForgetByCryptoShredding: the owner's name (a personal field) never
// reaches Kafka in plaintext — not on the commands, events, changelog or
// keys topics, nor in the owners projection, which groups accounts by that
// name (its changelog and repartition topic), read raw with franz-go and
// with kcat — while amounts and headers stay plain. DELETE forgets the
// account: its state, events and commands answer 410, its sealed fields no
// longer open even with the master key, the owners projection subtracts it
// from its owner and the PostgreSQL table drops it, and neither a restart
// nor a full restore from Kafka brings it back. Another account is
// untouched.
func TestForgetByCryptoShredding(t *testing.T) {
	const name = "Zebulon Quixote-Marsh"
	const other = "Ordinary Keeper"
	dsn := pgSchema(t)
	sink, err := bank.AccountsSink(pgsink.ConnString(dsn))
	if err != nil {
		t.Fatal(err)
	}
	c := newCluster(t)
	brokers := c.ListenAddrs()
	dir := t.TempDir()
	types := []any{bank.Account, bank.Owners, bank.DailyTotals, accountViews, sink}
	tn := startTypesNode(t, brokers, dir, types)

	send := func(tn *testNode, id, typ string, data any, want int) map[string]any {
		t.Helper()
		code, body := do(t, tn, "POST", "/v1/aggregates/account/"+id+"/commands", cmd(typ, data))
		mustStatus(t, want, code, body, typ+" "+id)
		return body
	}
	opened := send(tn, "gdpr-1", "Open", map[string]any{"owner": name}, 200)
	if got := opened["events"].([]any)[0].(map[string]any)["data"].(map[string]any)["owner"]; got != name {
		t.Fatalf("the command's answer shows owner %v, want it opened: %q", got, name)
	}
	send(tn, "gdpr-1", "Deposit", map[string]any{"amount": 424242}, 200)
	// A second account of the same owner, on another partition: the
	// owner's row is on at most one of theirs, so a group change crosses
	// the repartition topic.
	second := "gdpr-2"
	for i := 3; aggregate.Partition(second, 4) == aggregate.Partition("gdpr-1", 4); i++ {
		second = fmt.Sprintf("gdpr-%d", i)
	}
	send(tn, second, "Open", map[string]any{"owner": name}, 200)
	send(tn, second, "Deposit", map[string]any{"amount": 1000}, 200)
	send(tn, "keep-1", "Open", map[string]any{"owner": other}, 200)
	send(tn, "keep-1", "Deposit", map[string]any{"amount": 100}, 200)

	code, body := do(t, tn, "GET", "/v1/aggregates/account/gdpr-1", nil)
	mustStatus(t, 200, code, body, "state")
	if st := body["state"].(map[string]any); st["owner"] != name || st["balance"] != float64(424242) {
		t.Fatalf("state before forgetting: %v", st)
	}
	code, body = do(t, tn, "GET", "/v1/aggregates/account/gdpr-1/events", nil)
	mustStatus(t, 200, code, body, "events")
	if got := body["events"].([]any)[0].(map[string]any)["data"].(map[string]any)["owner"]; got != name {
		t.Fatalf("events API shows owner %v", got)
	}
	ownerRow := func() (int, map[string]any) {
		t.Helper()
		return do(t, tn, "GET", "/v1/projections/owners/"+url.PathEscape(name), nil)
	}
	waitUntil(t, "the owners projection row of both accounts", func() bool {
		code, body := ownerRow()
		return code == 200 && body["value"].(map[string]any)["accounts"] == float64(2) && body["value"].(map[string]any)["balance"] == float64(425242)
	})
	pg, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Close(context.Background())
	waitUntil(t, "the account's view, its owner opened", func() bool {
		code, body := do(t, tn, "GET", "/v1/projections/account-view/gdpr-1", nil)
		return code == 200 && body["value"].(map[string]any)["owner"] == name && body["value"].(map[string]any)["balance"] == float64(424242)
	})
	waitUntil(t, "the sink's row", func() bool {
		var owner string
		err := pg.QueryRow(context.Background(), "SELECT owner FROM accounts WHERE id = 'gdpr-1'").Scan(&owner)
		return err == nil && owner == name
	})

	// Raw: no plaintext name on any topic esker writes for the aggregate;
	// the amount and the headers are plain.
	assertNoPlaintext(t, brokers, name, "424242", "bank-owners-changelog", "bank-owners-repartition", "bank-account-view-changelog")

	code, body = do(t, tn, "DELETE", "/v1/aggregates/account/gdpr-1", nil)
	mustStatus(t, 200, code, body, "forget")
	if body["forgotten"] != true || body["version"] != float64(3) {
		t.Fatalf("forget answered %v", body)
	}
	assertGone := func(tn *testNode, when string) {
		t.Helper()
		for _, r := range []struct{ method, path string }{
			{"GET", "/v1/aggregates/account/gdpr-1"},
			{"GET", "/v1/aggregates/account/gdpr-1/events"},
			{"GET", "/v1/aggregates/account/gdpr-1/watch?fromVersion=1"},
			{"DELETE", "/v1/aggregates/account/gdpr-1"},
		} {
			code, body := do(t, tn, r.method, r.path, nil)
			if code != 410 || body["error"] == nil {
				t.Fatalf("%s: %s %s answered %d %v, want 410 with an error", when, r.method, r.path, code, body)
			}
		}
		code, body := do(t, tn, "POST", "/v1/aggregates/account/gdpr-1/commands", cmd("Deposit", map[string]any{"amount": 1}))
		if code != 410 {
			t.Fatalf("%s: a command answered %d %v, want 410", when, code, body)
		}
		code, body = do(t, tn, "GET", "/v1/aggregates/account/keep-1", nil)
		if code != 200 || body["state"].(map[string]any)["owner"] != other {
			t.Fatalf("%s: the other account answered %d %v", when, code, body)
		}
	}
	assertGone(tn, "after forgetting")
	code, body = do(t, tn, "DELETE", "/v1/aggregates/account/never-was", nil)
	mustStatus(t, 404, code, body, "forget an account that never existed")

	waitUntil(t, "the owners projection to drop the account", func() bool {
		code, body := ownerRow()
		return code == 200 && body["value"].(map[string]any)["accounts"] == float64(1) && body["value"].(map[string]any)["balance"] == float64(1000)
	})
	waitUntil(t, "the account's view to go", func() bool {
		code, _ := do(t, tn, "GET", "/v1/projections/account-view/gdpr-1", nil)
		return code == 404
	})
	waitUntil(t, "the sink to delete the row", func() bool {
		var n int
		err := pg.QueryRow(context.Background(), "SELECT count(*) FROM accounts WHERE id = 'gdpr-1'").Scan(&n)
		return err == nil && n == 0
	})

	// The Forgotten event is plain; the sealed fields of the account's
	// events no longer open, even with the master key.
	var sealed string
	var forgotten bool
	for _, r := range readTopic(t, brokers, "account-events") {
		if string(r.Key) != "gdpr-1" {
			continue
		}
		switch header(r, aggregate.HeaderEventType) {
		case "Opened":
			sealed = strings.TrimSuffix(strings.TrimPrefix(string(r.Value), `{"owner":"`), `"}`)
		case aggregate.ForgottenEvent:
			forgotten = bytes.Contains(r.Value, []byte("forgottenAt"))
		}
	}
	if !strings.HasPrefix(sealed, aggregate.SealedPrefix) || !forgotten {
		t.Fatalf("account-events: sealed owner %q, plain Forgotten event %v", sealed, forgotten)
	}
	kr := testKeyring(t, brokers)
	ctx := context.Background()
	if plain, err := kr.Cipher(ctx, "account", "gdpr-1").Open(sealed); plain != "" {
		t.Fatalf("the forgotten owner still opens: %q (%v)", plain, err)
	}
	for _, r := range readTopic(t, brokers, keyring.Topic("bank")) {
		if strings.HasPrefix(string(r.Key), "account/gdpr-1#") && r.Value != nil {
			// The key record is still in the log until compaction; its
			// tombstone must follow it.
			tomb := false
			for _, later := range readTopic(t, brokers, keyring.Topic("bank")) {
				if string(later.Key) == string(r.Key) && later.Value == nil && later.Offset > r.Offset {
					tomb = true
				}
			}
			if !tomb {
				t.Fatalf("data key %s has no tombstone", r.Key)
			}
		}
	}
	assertNoPlaintext(t, brokers, name, "424242", "bank-owners-changelog", "bank-owners-repartition", "bank-account-view-changelog")

	// A restart, and a full restore from Kafka into an empty directory.
	tn.stop()
	tn = startTypesNode(t, brokers, dir, types)
	assertGone(tn, "after a restart")
	tn.stop()
	tn = startTypesNode(t, brokers, t.TempDir(), types)
	assertGone(tn, "after a full restore")
	code, body = ownerRow()
	if code != 200 || body["value"].(map[string]any)["accounts"] != float64(1) {
		t.Fatalf("the owners projection row after a full restore: %d %v, want the second account only", code, body)
	}
	if code, body := do(t, tn, "GET", "/v1/projections/account-view/gdpr-1", nil); code != 404 {
		t.Fatalf("the forgotten account's view is back after a full restore: %d %v", code, body)
	}
	code, body = do(t, tn, "GET", "/v1/projections/account-view?limit=10", nil)
	mustStatus(t, 200, code, body, "list the account views")
	listed := false
	for _, r := range body["rows"].([]any) {
		if v := r.(map[string]any); v["key"] == second {
			listed = true
			if v["value"].(map[string]any)["owner"] != name {
				t.Fatalf("a listed view shows owner %v, want it opened", v["value"])
			}
		}
	}
	if !listed {
		t.Fatalf("the view of %s is not listed: %v", second, body["rows"])
	}
	// The owner's last account forgotten, the owner's row goes.
	code, body = do(t, tn, "DELETE", "/v1/aggregates/account/"+second, nil)
	mustStatus(t, 200, code, body, "forget the second account")
	waitUntil(t, "the owners projection to drop the owner", func() bool {
		code, _ := ownerRow()
		return code == 404
	})
	assertNoPlaintext(t, brokers, name, "424242", "bank-owners-changelog", "bank-owners-repartition", "bank-account-view-changelog")
}

// accountView is a projection row with a personal field: one account's
// owner and balance, sealed by the account's key.
type accountView struct {
	Owner   string `json:"owner" esker:"pii"`
	Balance int64  `json:"balance"`
}

var accountViews = projection.New("account-view", func(v accountView, ev projection.Event) accountView {
	switch e := ev.Value.(type) {
	case bank.Opened:
		v.Owner = e.Owner
	case bank.Deposited:
		v.Balance += e.Amount
	}
	return v
}, projection.From(projection.Events(bank.Account)))

// assertNoPlaintext reads every topic of the application raw, with franz-go
// and with kcat, and fails if name appears anywhere (keys, values, headers)
// or if amount appears nowhere. The account's topics and the topics named
// in nonEmpty must have records: the owners projection's, for one, carry
// the name sealed in its rows and as a pseudonym in its row keys.
func assertNoPlaintext(t *testing.T, brokers []string, name, amount string, nonEmpty ...string) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	topics, err := kadm.NewClient(cl).ListTopics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var checked []string
	sawAmount := false
	for _, topic := range topics.Names() {
		if strings.HasPrefix(topic, "__") {
			continue
		}
		checked = append(checked, topic)
		records := readTopic(t, brokers, topic)
		if slices.Contains(nonEmpty, topic) && len(records) == 0 {
			t.Fatalf("topic %s is empty", topic)
		}
		for _, r := range records {
			fields := [][]byte{r.Key, r.Value}
			for _, h := range r.Headers {
				fields = append(fields, []byte(h.Key), h.Value)
			}
			for _, f := range fields {
				if bytes.Contains(f, []byte(name)) {
					t.Fatalf("topic %s, partition %d, offset %d holds %q in plaintext: %q", topic, r.Partition, r.Offset, name, f)
				}
				if bytes.Contains(f, []byte(amount)) {
					sawAmount = true
				}
			}
		}
	}
	for _, want := range append([]string{"account-commands", "account-events", "bank-account-changelog", "bank-keys"}, nonEmpty...) {
		if !strings.Contains(strings.Join(checked, ","), want) {
			t.Fatalf("topic %s was not read (topics: %v)", want, checked)
		}
	}
	if !sawAmount {
		t.Fatalf("the amount %s is in no topic: amounts must stay plain", amount)
	}
	kcat, err := exec.LookPath("kcat")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("kcat is not installed; .ci/run installs it")
		}
		t.Log("kcat is not installed: the raw read with another client is skipped (.ci/run installs it)")
		return
	}
	for _, topic := range checked {
		out, err := exec.Command(kcat, "-C", "-b", brokers[0], "-t", topic, "-e", "-q",
			"-f", "%k|%h|%s\n").CombinedOutput()
		if err != nil {
			t.Fatalf("kcat %s: %v\n%s", topic, err, out)
		}
		if bytes.Contains(out, []byte(name)) {
			t.Fatalf("kcat read %q in plaintext from %s", name, topic)
		}
	}
}
