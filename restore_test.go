package esker_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
)

// states reads the state of accounts acc-0..acc-(n-1) from a node.
func states(t *testing.T, n *testNode, accounts int) map[string]string {
	t.Helper()
	out := map[string]string{}
	for i := range accounts {
		id := fmt.Sprintf("acc-%d", i)
		code, body := do(t, n, "GET", "/v1/aggregates/account/"+id, nil)
		mustStatus(t, 200, code, body, "get "+id)
		out[id] = fmt.Sprint(body["version"], body["state"])
	}
	return out
}

func TestRestore(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	const accounts = 20
	dir1 := t.TempDir()

	n1 := startNode(t, brokers, dir1)
	for i := range accounts {
		id := fmt.Sprintf("acc-%d", i)
		do(t, n1, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Open", map[string]any{"owner": id}))
		for j := 1; j <= 3; j++ {
			code, body := do(t, n1, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Deposit", map[string]any{"amount": 100 * j}))
			mustStatus(t, 200, code, body, "deposit")
		}
	}
	want := states(t, n1, accounts)
	if r := metricSum(t, n1.Node, "esker_restore_records_total"); r != 0 {
		t.Fatalf("first start restored %v records from empty changelogs", r)
	}
	n1.stop()
	afterFirst := len(readTopic(t, brokers, "bank-account-changelog"))

	// A fresh state directory restores everything and reaches the same state.
	n2 := startNode(t, brokers, t.TempDir())
	if got := states(t, n2, accounts); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("fresh restore differs:\n got %v\nwant %v", got, want)
	}
	if r := metricSum(t, n2.Node, "esker_restore_records_total"); int(r) != afterFirst {
		t.Fatalf("fresh restore read %v changelog records, want all %d", r, afterFirst)
	}
	// Events of one entity come from the restored index.
	code, body := do(t, n2, "GET", "/v1/aggregates/account/acc-3/events?from=2&limit=2", nil)
	if evs := body["events"].([]any); code != 200 || len(evs) != 2 || evs[0].(map[string]any)["version"].(float64) != 2 {
		t.Fatalf("events after restore: %d %v", code, body)
	}
	for i := range 5 {
		code, body := do(t, n2, "POST", fmt.Sprintf("/v1/aggregates/account/acc-%d/commands", i), cmd("Withdraw", map[string]any{"amount": 50}))
		mustStatus(t, 200, code, body, "withdraw on n2")
	}
	want = states(t, n2, accounts)
	n2.stop()
	tail := len(readTopic(t, brokers, "bank-account-changelog")) - afterFirst

	// A restart with the state directory intact reads only the tail.
	n1 = startNode(t, brokers, dir1)
	if got := states(t, n1, accounts); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("tail restore differs:\n got %v\nwant %v", got, want)
	}
	if r := metricSum(t, n1.Node, "esker_restore_records_total"); int(r) != tail {
		t.Fatalf("restart read %v changelog records, want only the tail of %d", r, tail)
	}
}

func TestRefusesWrongTopics(t *testing.T) {
	cases := []struct {
		name    string
		create  func(adm *kadm.Client) error
		mention string
	}{
		{"partition count", func(adm *kadm.Client) error {
			_, err := adm.CreateTopic(context.Background(), 3, -1, nil, "account-events")
			return err
		}, "3 partitions"},
		{"changelog not compacted", func(adm *kadm.Client) error {
			_, err := adm.CreateTopic(context.Background(), 4, -1, map[string]*string{"cleanup.policy": kadm.StringPtr("delete")}, "bank-account-changelog")
			return err
		}, "cleanup.policy"},
		{"events with retention", func(adm *kadm.Client) error {
			_, err := adm.CreateTopic(context.Background(), 4, -1, map[string]*string{"retention.ms": kadm.StringPtr("86400000")}, "account-events")
			return err
		}, "retention.ms"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t)
			cl, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...))
			if err != nil {
				t.Fatal(err)
			}
			defer cl.Close()
			if err := tc.create(kadm.NewClient(cl)); err != nil {
				t.Fatal(err)
			}
			n, _ := esker.NewNode(esker.Brokers(c.ListenAddrs()...), esker.ApplicationID("bank"),
				esker.StateDir(t.TempDir()), esker.HTTPListen(""), esker.Partitions(4), esker.Logger(testLogger()), testMasterKeyOption())
			n.Register(bankAccount())
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			err = n.Run(ctx)
			if err == nil || !strings.Contains(err.Error(), tc.mention) {
				t.Fatalf("Run = %v, want an error mentioning %q", err, tc.mention)
			}
			// Nothing was created that a corrected node would refuse.
			topics, err := kadm.NewClient(cl).ListTopics(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if names := topics.Names(); len(names) != 1 {
				t.Errorf("topics after the refused start: %v, want only the one made by the test", names)
			}
		})
	}
}

func TestAtLeastOnce(t *testing.T) {
	c := newCluster(t)
	n := startNode(t, c.ListenAddrs(), t.TempDir(), esker.ProcessingGuarantee(esker.AtLeastOnce))
	do(t, n, "POST", "/v1/aggregates/account/a/commands", cmd("Open", map[string]any{"owner": "Ada"}))
	code, body := do(t, n, "POST", "/v1/aggregates/account/a/commands", cmd("Deposit", map[string]any{"amount": 70}))
	mustStatus(t, 200, code, body, "deposit")
	code, body = do(t, n, "GET", "/v1/aggregates/account/a?minVersion=2&wait=1s", nil)
	mustStatus(t, 200, code, body, "get")
	if body["state"].(map[string]any)["balance"].(float64) != 70 {
		t.Fatalf("state %v", body)
	}
	if got := len(readTopic(t, c.ListenAddrs(), "account-events")); got != 2 {
		t.Fatalf("%d events, want 2", got)
	}
}

// TestRestoreDoesNotStopProcessing: a node that takes over a partition whose
// restore cannot finish yet (a transaction is open on its changelog, so its
// stable end is not known) keeps processing the partitions it already owns,
// answers 503 for keys of the restoring one, and serves them once the
// restore finishes.
func TestRestoreDoesNotStopProcessing(t *testing.T) {
	c := newCluster(t)
	a := startNode(t, c.ListenAddrs(), t.TempDir())
	b := startNode(t, c.ListenAddrs(), t.TempDir())
	waitSettled(t, []*testNode{a, b})
	owners := clusterOwners(httpClient, a.srv.URL)
	var onA, onB int32 = -1, -1
	for p, url := range owners {
		if url == a.srv.URL {
			onA = p
		} else {
			onB = p
		}
	}
	if onA < 0 || onB < 0 {
		t.Fatalf("owners: %v", owners)
	}
	idOn := func(p int32, prefix string) string {
		for i := 0; ; i++ {
			if id := fmt.Sprintf("%s-%d", prefix, i); aggregate.Partition(id, 4) == p {
				return id
			}
		}
	}
	idA, idB := idOn(onA, "ra"), idOn(onB, "rb")
	for _, id := range []string{idA, idB} {
		code, body := do(t, b, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Open", map[string]any{"owner": id}))
		mustStatus(t, 200, code, body, "open")
	}

	// A transaction left open on a's partition of the changelog holds back
	// its stable end, and so any restore of it.
	txn, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...), kgo.TransactionalID("test-hanging"),
		kgo.TransactionTimeout(time.Minute), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	defer txn.Close()
	ctx := context.Background()
	if err := txn.BeginTransaction(); err != nil {
		t.Fatal(err)
	}
	if err := txn.ProduceSync(ctx, &kgo.Record{Topic: "bank-account-changelog", Partition: onA, Key: []byte("junk"), Value: []byte("never committed")}).FirstErr(); err != nil {
		t.Fatal(err)
	}

	a.stop() // b takes a's partitions; their restore waits
	ctWaitFor(t, 15*time.Second, "b to restore a's partitions", func() bool {
		err := b.Ready()
		return err != nil && strings.Contains(err.Error(), "restoring")
	})
	// b's own partition keeps going, and a's answers 503, never stale.
	for i := range 5 {
		start := time.Now()
		code, body := do(t, b, "POST", "/v1/aggregates/account/"+idB+"/commands", cmd("Deposit", map[string]any{"amount": 1}))
		mustStatus(t, 200, code, body, "deposit on b's own partition during the restore")
		if took := time.Since(start); took > 2*time.Second {
			t.Fatalf("deposit %d took %v during another partition's restore", i, took)
		}
		code, body = do(t, b, "GET", "/v1/aggregates/account/"+idA, nil)
		if code != 503 || body["error"] == nil {
			t.Fatalf("GET of the restoring partition: %d %v", code, body)
		}
	}

	// A read that may wait for a version waits for the restore too.
	waited := make(chan int, 1)
	go func() {
		code, _ := do(t, b, "GET", "/v1/aggregates/account/"+idA+"?minVersion=1&wait=20s", nil)
		waited <- code
	}()
	time.Sleep(200 * time.Millisecond)
	if err := txn.EndTransaction(ctx, kgo.TryAbort); err != nil {
		t.Fatal(err)
	}
	ctWaitFor(t, 15*time.Second, "the restore to finish", func() bool {
		code, _ := do(t, b, "GET", "/v1/aggregates/account/"+idA, nil)
		return code == 200
	})
	if code := <-waited; code != 200 {
		t.Fatalf("GET with wait during the restore: %d", code)
	}
	code, body := do(t, b, "POST", "/v1/aggregates/account/"+idA+"/commands", cmd("Deposit", map[string]any{"amount": 7}))
	mustStatus(t, 200, code, body, "deposit after the restore")
	if v := body["version"]; v != float64(2) {
		t.Fatalf("version after restore and deposit: %v", body)
	}
}

// TestConsumptionResetDoesNotDecideAgain: when the group's consumption of
// the commands topic is reset below what was processed (here by hand; in
// production by an offset reset after data loss, an unclean leader election
// or expired committed offsets), the commands are not decided again: a
// withdrawal rejected for lack of funds is not applied now that the account
// has them. The task's command offset travels on the changelog, so a node
// with a fresh store knows it too.
func TestConsumptionResetDoesNotDecideAgain(t *testing.T) {
	c := newCluster(t)
	a := startNode(t, c.ListenAddrs(), t.TempDir())
	code, body := do(t, a, "POST", "/v1/aggregates/account/rs/commands", cmd("Open", map[string]any{"owner": "r"}))
	mustStatus(t, 200, code, body, "open")
	code, body = do(t, a, "POST", "/v1/aggregates/account/rs/commands", cmd("Withdraw", map[string]any{"amount": 50}))
	mustStatus(t, 422, code, body, "withdraw without funds")
	code, body = do(t, a, "POST", "/v1/aggregates/account/rs/commands", cmd("Deposit", map[string]any{"amount": 100}))
	mustStatus(t, 200, code, body, "deposit")
	a.stop()

	// Rewind the group to the start of the commands topic.
	cl, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	var rewind kadm.Offsets
	for p := range int32(4) {
		rewind.Add(kadm.Offset{Topic: "account-commands", Partition: p, At: 0})
	}
	if err := adm.CommitAllOffsets(context.Background(), "bank", rewind); err != nil {
		t.Fatal(err)
	}

	b := startNode(t, c.ListenAddrs(), t.TempDir()) // fresh store: restored from the changelog
	// Once a later command is answered, the replayed ones were handled.
	code, body = do(t, b, "POST", "/v1/aggregates/account/rs/commands", cmd("Deposit", map[string]any{"amount": 1}))
	mustStatus(t, 200, code, body, "deposit after the rewind")
	if v := body["version"]; v != float64(3) {
		t.Fatalf("version after the rewind: %v (the replayed commands were decided again)", body)
	}
	var types []string
	for _, r := range readTopic(t, c.ListenAddrs(), "account-events") {
		types = append(types, header(r, aggregate.HeaderEventType))
	}
	if strings.Join(types, ",") != "Opened,Deposited,Deposited" {
		t.Fatalf("events after the rewind: %v", types)
	}
	if n := counterWith(t, b, "esker_commands_total", "outcome", "replayed"); n != 3 {
		t.Fatalf("replayed commands skipped: %v, want 3", n)
	}
}
