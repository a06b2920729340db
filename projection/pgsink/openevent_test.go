package pgsink_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/projection/pgsink"
)

type openFunc = func(ctx context.Context, topic string, ev aggregate.Event) (aggregate.Event, error)

// startSinkOpening runs a sink as part of application "bank" with open as
// its Runtime.OpenEvent, as a node that holds the keyring would.
func startSinkOpening(t testing.TB, s *pgsink.Sink, brokers []string, open openFunc) *runningSink {
	t.Helper()
	return startSinkWith(t, s, pgsink.Runtime{AppID: "bank", ClientOpts: clientOpts(brokers), Logger: testLogger(t), OpenEvent: open})
}

// TestOpenEventTransient: the keyring cannot be read for a while
// (Runtime.OpenEvent fails with an error that is not ErrUnknownKey). The
// sink does not stop: it reports not ready with the cause, writes nothing,
// retries the same events with its backoff (counted in
// esker_sink_retries_total), and once the events open writes every one of
// them exactly once. Then OpenEvent fails now and then, in the middle of
// batches: every event still lands once.
func TestOpenEventTransient(t *testing.T) {
	brokers := newCluster(t)
	db := newDB(t)
	m := &model{}
	p := newProducer(t, brokers, m, 40, 21)
	ctx := context.Background()
	p.produce(ctx, 600, 20)

	var (
		down     atomic.Bool  // every call fails
		every    atomic.Int64 // > 0: one call in every fails
		calls    atomic.Int64 // OpenEvent calls
		failures atomic.Int64 // of which failed
	)
	down.Store(true)
	open := func(_ context.Context, _ string, ev aggregate.Event) (aggregate.Event, error) {
		n := calls.Add(1)
		if down.Load() || (every.Load() > 0 && n%every.Load() == 0) {
			failures.Add(1)
			// What the keyring says when it cannot list the keys
			// topic's offsets; the zero event must not be used.
			return aggregate.Event{}, errors.New("keyring: list offsets of bank-keys: context deadline exceeded")
		}
		return ev, nil
	}
	rs := startSinkOpening(t, newAccountsSink(t, db, pgsink.MaxBatch(100)), brokers, open)

	waitFor(t, 20*time.Second, "Ready to report that the events cannot be opened, after several attempts", func() bool {
		if err := rs.alive(); err != nil {
			t.Fatalf("the sink stopped on a transient OpenEvent failure: %v", err)
		}
		err := rs.Ready()
		return err != nil && strings.Contains(err.Error(), "cannot open the personal fields") && failures.Load() >= 4
	})
	st := rs.Status()
	if st.Ready || st.OpenError == "" || st.Retries < 3 || st.Events != 0 {
		t.Errorf("Status while OpenEvent fails = %+v, want not ready with the open error, retries, no event written", st)
	}
	for part, next := range db.storedOffsets(t, bank.AccountsSinkName) {
		if next != 0 {
			t.Errorf("stored offset of partition %d moved to %d while the events could not be opened", part, next)
		}
	}
	if got := db.accounts(t); len(got) != 0 {
		t.Errorf("%d accounts written while the events could not be opened", len(got))
	}

	// The keyring answers again.
	down.Store(false)
	waitCaughtUp(t, db, brokers, bank.AccountsSinkName, 30*time.Second, rs.alive)
	checkTable(t, db, m)
	waitReady(t, rs, 10*time.Second)

	// Failures in the middle of batches: the opened events are not
	// opened twice, nor skipped.
	every.Store(30)
	p.produce(ctx, 800, 20)
	waitCaughtUp(t, db, brokers, bank.AccountsSinkName, 30*time.Second, rs.alive)
	checkTable(t, db, m)

	_, total := m.snapshot()
	st = rs.Status()
	if st.Events != total || st.Sealed != 0 {
		t.Errorf("Status.Events = %d, Sealed = %d; want %d committed events, none sealed", st.Events, st.Sealed, total)
	}
	got := metricValue(t, rs, "esker_sink_retries_total")
	if got < 4 || got != float64(st.Retries) {
		t.Errorf("esker_sink_retries_total = %v (Status.Retries %d), want at least 4", got, st.Retries)
	}
	t.Logf("%d OpenEvent calls, %d failed, %v retries", calls.Load(), failures.Load(), got)
}

// TestOpenEventUnknownKey: Runtime.OpenEvent says no key opens one event
// (an error wrapping aggregate.ErrUnknownKey, and a zero event). No retry
// could open it: the sink passes it to ApplyFunc as stored, sealed, counts
// it, and goes on with the next events, every one of them applied once.
func TestOpenEventUnknownKey(t *testing.T) {
	brokers := newCluster(t)
	db := newDB(t)
	m := &model{}
	p := newProducer(t, brokers, m, 10, 22)
	ctx := context.Background()
	p.produce(ctx, 300, 20)

	const target = "acct-0003"
	var unknown atomic.Int64
	open := func(_ context.Context, _ string, ev aggregate.Event) (aggregate.Event, error) {
		if ev.EntityID == target && ev.Version == 1 {
			unknown.Add(1)
			return aggregate.Event{}, fmt.Errorf("keyring: %w: the data key k1 of account %q is not in bank-keys", aggregate.ErrUnknownKey, ev.EntityID)
		}
		ev.Data = json.RawMessage(`{"opened":` + string(ev.Data) + `}`)
		return ev, nil
	}
	// Records every event as ApplyFunc sees it; the primary key refuses
	// an event applied twice (a constraint violation stops the sink).
	apply := func(ctx context.Context, tx pgx.Tx, evs []pgsink.Event) error {
		for _, e := range evs {
			if _, err := tx.Exec(ctx, `INSERT INTO seen (topic, part, off, entity, version, data) VALUES ($1, $2, $3, $4, $5, $6)`,
				e.Topic, e.Partition, e.Offset, e.EntityID, e.Version, string(e.Data)); err != nil {
				return fmt.Errorf("insert: %w", err)
			}
		}
		return nil
	}
	setup := func(ctx context.Context, tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS seen (topic text, part int, off bigint, entity text, version bigint, data text NOT NULL,
	PRIMARY KEY (topic, part, off))`)
		return err
	}
	const name = "seen-sink"
	s, err := pgsink.New(name, []string{eventsTopic}, apply, pgsink.ConnString(db.url), pgsink.Setup(setup),
		pgsink.Backoff(20*time.Millisecond, 500*time.Millisecond), pgsink.MaxBatch(50))
	if err != nil {
		t.Fatal(err)
	}
	rs := startSinkOpening(t, s, brokers, open)
	waitCaughtUp(t, db, brokers, name, 30*time.Second, rs.alive)
	p.produce(ctx, 200, 20) // after the sealed event, too
	waitCaughtUp(t, db, brokers, name, 30*time.Second, rs.alive)
	waitReady(t, rs, 10*time.Second)

	accounts, total := m.snapshot()
	if accounts[target].Version < 2 {
		t.Fatalf("the producer wrote %d events of %s; the test needs events after its first", accounts[target].Version, target)
	}
	sealed, _ := json.Marshal(bank.Opened{Owner: "owner of " + target})
	rows, err := db.pool.Query(ctx, `SELECT entity, version, data FROM seen`)
	if err != nil {
		t.Fatal(err)
	}
	var entity, data string
	var version int64
	var n, sealedSeen, targetLast int64
	if _, err := pgx.ForEachRow(rows, []any{&entity, &version, &data}, func() error {
		n++
		switch {
		case entity == target && version == 1:
			sealedSeen++
			if data != string(sealed) {
				t.Errorf("ApplyFunc saw %s version 1 as %s, want it as stored: %s", target, data, sealed)
			}
		case !strings.HasPrefix(data, `{"opened":`):
			t.Errorf("ApplyFunc saw %s version %d unopened: %s", entity, version, data)
		}
		if entity == target {
			targetLast = max(targetLast, version)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if n != total || sealedSeen != 1 {
		t.Errorf("ApplyFunc saw %d events (%d of them the sealed one), want the %d committed events, the sealed one once", n, sealedSeen, total)
	}
	if targetLast != accounts[target].Version {
		t.Errorf("%s's last applied version = %d, want %d: the sink did not go on after the sealed event", target, targetLast, accounts[target].Version)
	}
	if unknown.Load() < 1 {
		t.Error("OpenEvent never saw the event whose key is unknown")
	}
	st := rs.Status()
	if st.Sealed != 1 || st.Events != total || !st.Ready {
		t.Errorf("Status = %+v, want ready, 1 sealed event, %d events", st, total)
	}
}
