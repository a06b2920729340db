package pgsink_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/projection/pgsink"
)

// TestRebalance: two sinks share the partitions in one consumer group; one
// stops and the other takes its partitions over, resuming from the offsets
// in PostgreSQL. Kafka commits are off, so a sink that resumed from
// anywhere else would start the partitions over (and fail its version
// check, or double balances). Every event is applied once in all: the two
// sinks' event counts add up to the committed events.
func TestRebalance(t *testing.T) {
	brokers := newCluster(t)
	db := newDB(t)
	m := &model{}
	p := newProducer(t, brokers, m, 80, 4)
	ctx := context.Background()
	p.produce(ctx, 1000, 20)

	opts := []pgsink.Option{pgsink.MaxBatch(100), pgsink.KafkaCommits(false)}
	a := startSink(t, newAccountsSink(t, db, opts...), brokers)
	waitReady(t, a, 20*time.Second)
	waitCaughtUp(t, db, brokers, bank.AccountsSinkName, 30*time.Second, a.alive)

	b := startSink(t, newAccountsSink(t, db, opts...), brokers)
	waitFor(t, 20*time.Second, "the second sink to get partitions", func() bool {
		na, nb := len(a.Status().Partitions), len(b.Status().Partitions)
		return nb > 0 && na > 0 && na+nb == partitions
	})
	waitReady(t, b, 10*time.Second)
	t.Logf("shared: a %v, b %v", a.Status().Partitions, b.Status().Partitions)
	p.produce(ctx, 1000, 20)
	waitFor(t, 20*time.Second, "the second sink to write events", func() bool { return b.Status().Events > 0 })

	// Stop b while events keep coming.
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); p.produce(ctx, 1000, 10) }()
	t.Cleanup(wg.Wait)
	time.Sleep(50 * time.Millisecond)
	if err := b.stop(); err != nil {
		t.Fatalf("second sink: Run: %v", err)
	}
	waitFor(t, 20*time.Second, "the first sink to take every partition over", func() bool { return len(a.Status().Partitions) == partitions })
	wg.Wait()
	p.produce(ctx, 500, 20)
	waitCaughtUp(t, db, brokers, bank.AccountsSinkName, 30*time.Second, a.alive)
	checkTable(t, db, m)
	_, total := m.snapshot()
	ea, eb := a.Status().Events, b.Status().Events
	if ea+eb != total {
		t.Errorf("sinks wrote %d + %d = %d events, want each of the %d committed events once", ea, eb, ea+eb, total)
	}
	if a.Status().Fenced != 0 {
		// A clean hand-over blocks the rebalance until the batch is
		// written, so the next owner never finds the offsets moved.
		t.Logf("note: %d batches fenced during a clean hand-over", a.Status().Fenced)
	}
}

// TestTwoWritersFenced: two sinks with the same name in different consumer
// groups both believe they own every partition, like a zombie that still
// writes after its partitions moved. The first holds its batch's
// transaction open; the second's offset update waits for the row lock,
// then finds the offset moved and discards its batch before applying it.
// Then both race over the same partitions while events keep coming: every
// event is applied exactly once in all.
func TestTwoWritersFenced(t *testing.T) {
	brokers := newCluster(t)
	db := newDB(t)
	m := &model{}
	p := newProducer(t, brokers, m, 50, 5)
	ctx := context.Background()
	p.produce(ctx, 600, 20)

	entered := make(chan struct{})
	gate := make(chan struct{})
	var first atomic.Bool
	blockFirst := func(ctx context.Context, tx pgx.Tx, events []pgsink.Event) error {
		if first.CompareAndSwap(false, true) {
			close(entered)
			<-gate
		}
		return bank.ApplyAccounts(ctx, tx, events)
	}
	setup := pgsink.Setup(func(ctx context.Context, tx pgx.Tx) error {
		_, err := tx.Exec(ctx, bank.AccountsTableDDL)
		return err
	})
	sa, err := pgsink.New(bank.AccountsSinkName, []string{eventsTopic}, blockFirst, pgsink.ConnString(db.url), setup, pgsink.MaxBatch(100))
	if err != nil {
		t.Fatal(err)
	}
	a := startSink(t, sa, brokers)
	select {
	case <-entered:
	case <-time.After(20 * time.Second):
		t.Fatal("first sink did not apply a batch")
	}

	urlB := withParam(t, db.url, "application_name", "fenced-writer")
	sb, err := pgsink.New(bank.AccountsSinkName, []string{eventsTopic}, bank.ApplyAccounts, pgsink.ConnString(urlB), setup, pgsink.MaxBatch(100))
	if err != nil {
		t.Fatal(err)
	}
	b := startSinkApp(t, sb, brokers, "other-app")
	waitFor(t, 20*time.Second, "the second writer to wait for the offset row lock", func() bool {
		var n int
		err := db.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
WHERE application_name = 'fenced-writer' AND wait_event_type = 'Lock' AND query LIKE '%esker_sink_offsets%'`).Scan(&n)
		return err == nil && n > 0
	})
	close(gate)
	waitFor(t, 20*time.Second, "the second writer to be fenced", func() bool { return b.Status().Fenced > 0 })

	p.produce(ctx, 1500, 10)
	waitCaughtUp(t, db, brokers, bank.AccountsSinkName, 30*time.Second, func() error {
		if err := a.alive(); err != nil {
			return err
		}
		return b.alive()
	})
	checkTable(t, db, m)
	_, total := m.snapshot()
	ea, eb := a.Status().Events, b.Status().Events
	if ea+eb != total {
		t.Errorf("writers wrote %d + %d = %d events, want each of the %d committed events once", ea, eb, ea+eb, total)
	}
	t.Logf("events written: %d + %d; batches fenced: %d + %d", ea, eb, a.Status().Fenced, b.Status().Fenced)
}
