package pgsink_test

import (
	"context"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/projection/pgsink"
)

func pgHostPort(t testing.TB) string {
	t.Helper()
	u := postgresURL()
	i := strings.Index(u, "@")
	rest := u[i+1:]
	if j := strings.IndexAny(rest, "/?"); j >= 0 {
		rest = rest[:j]
	}
	return rest
}

// TestDatabaseDown: the database is unreachable (a proxy in front of it
// cuts every connection and refuses new ones) when the sink starts, and
// again later while events keep coming. The sink reports not ready with the
// cause, writes nothing, and once the database is back writes every event
// exactly once.
func TestDatabaseDown(t *testing.T) {
	brokers := newCluster(t)
	db := newDB(t)
	proxy := newProxy(t, pgHostPort(t))
	m := &model{}
	p := newProducer(t, brokers, m, 40, 2)
	ctx := context.Background()
	p.produce(ctx, 500, 20)

	// The sink starts while the database is down: it waits, not ready.
	proxy.stop()
	rs := startSink(t, newAccountsSink(t, db, pgsink.ConnString(withHost(t, db.url, proxy.addr)), pgsink.MaxBatch(200)), brokers)
	waitFor(t, 10*time.Second, "Ready to report the tables cannot be set up", func() bool {
		err := rs.Ready()
		return err != nil && strings.Contains(err.Error(), "setting up its tables, but PostgreSQL is unreachable")
	})
	proxy.start()
	waitReady(t, rs, 20*time.Second)
	waitCaughtUp(t, db, brokers, bank.AccountsSinkName, 30*time.Second, rs.alive)

	// Down while idle: the health check notices.
	proxy.stop()
	before := db.storedOffsets(t, bank.AccountsSinkName)
	waitFor(t, 15*time.Second, "Ready to report the database unreachable", func() bool {
		err := rs.Ready()
		return err != nil && strings.Contains(err.Error(), "PostgreSQL is unreachable")
	})
	// Events keep coming: batches fail and are retried.
	p.produce(ctx, 1000, 20)
	t.Logf("while down: Ready() = %v", rs.Ready())
	st := rs.Status()
	if st.DBReachable || st.DBError == "" || st.Ready {
		t.Errorf("Status while the database is down = %+v, want unreachable with an error, not ready", st)
	}
	// Stay down a while longer, with events still coming: several
	// attempts back off.
	for range 10 {
		p.produce(ctx, 40, 20)
		time.Sleep(100 * time.Millisecond)
	}
	waitFor(t, 10*time.Second, "retries", func() bool { return rs.Status().Retries >= 3 })
	if err := rs.Ready(); err == nil {
		t.Error("Ready() = nil while the database is still unreachable")
	}
	if after := db.storedOffsets(t, bank.AccountsSinkName); !maps.Equal(before, after) {
		t.Errorf("stored offsets moved while the database was unreachable through the sink's address: %v -> %v", before, after)
	}

	proxy.start()
	p.produce(ctx, 300, 20)
	waitCaughtUp(t, db, brokers, bank.AccountsSinkName, 30*time.Second, rs.alive)
	checkTable(t, db, m)
	waitReady(t, rs, 10*time.Second)
	_, total := m.snapshot()
	if got := rs.Status().Events; got != total {
		t.Errorf("Status.Events = %d, want %d", got, total)
	}
	if got := metricValue(t, rs, "esker_sink_retries_total"); got < 3 {
		t.Errorf("esker_sink_retries_total = %v, want at least 3", got)
	}
}

// TestCommitAnswerLost: the connection dies after the server committed a
// batch but before the sink heard so. The sink retries the batch; the
// conditional offset update finds the offsets already moved, so the batch
// is not applied a second time (the non-idempotent apply would double
// balances and fail its version check).
func TestCommitAnswerLost(t *testing.T) {
	brokers := newCluster(t)
	db := newDB(t)
	proxy := newProxy(t, pgHostPort(t))
	m := &model{}
	p := newProducer(t, brokers, m, 40, 3)
	ctx := context.Background()
	p.produce(ctx, 300, 20)

	rs := startSink(t, newAccountsSink(t, db, pgsink.ConnString(withHost(t, db.url, proxy.addr))), brokers)
	waitReady(t, rs, 20*time.Second)
	waitCaughtUp(t, db, brokers, bank.AccountsSinkName, 30*time.Second, rs.alive)
	if proxy.sawSSLorGSS.Load() {
		t.Fatal("the connection asked for encryption; the proxy needs sslmode=disable to see COMMIT")
	}

	proxy.armed.Store(true)
	p.produce(ctx, 500, 20)
	waitFor(t, 15*time.Second, "a COMMIT whose answer is lost", func() bool { return proxy.lostCommits.Load() == 1 })
	waitCaughtUp(t, db, brokers, bank.AccountsSinkName, 30*time.Second, rs.alive)
	checkTable(t, db, m)
	st := rs.Status()
	if st.Fenced < 1 {
		t.Errorf("Status.Fenced = %d: the retry after the lost answer should have found the offsets moved", st.Fenced)
	}
	_, total := m.snapshot()
	if st.Events > total {
		t.Errorf("Status.Events = %d > %d committed events: the sink counted a batch it never wrote twice", st.Events, total)
	}
}
