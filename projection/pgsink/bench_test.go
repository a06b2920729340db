package pgsink_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/projection/pgsink"
)

// BenchmarkSink measures how fast the accounts sink drains a topic into
// PostgreSQL, exactly-once, and compares it in the same run with two
// baselines on the same events:
//
//   - db-only: the same batches applied by the same ApplyAccounts, one
//     transaction each, from memory (no Kafka, no offsets): the database's
//     share of the work;
//   - kafka-only: a raw franz-go consumer (read_committed, no group, no
//     database) reading the topic to its end: the broker's share.
//
// It pre-produces PGSINK_BENCH_EVENTS events (default 200000) over 1000
// accounts and 4 partitions, in transactions of 1000, once. Each iteration
// drains them with a new sink (a new group and schema) and runs both
// baselines. Metrics: events/s (the sink), db-only-events/s,
// kafka-only-events/s and the sink's fraction of each baseline.
//
//	go test -run '^$' -bench BenchmarkSink -benchtime 1x -count 5 ./projection/pgsink/
func BenchmarkSink(b *testing.B) {
	n := 200000
	if v, err := strconv.Atoi(os.Getenv("PGSINK_BENCH_EVENTS")); err == nil && v > 0 {
		n = v
	}
	brokers := newCluster(b)
	m := &model{}
	p := newProducer(b, brokers, m, 1000, 42)
	ctx := context.Background()
	start := time.Now()
	committed := 0
	for committed < n {
		if p.txn(ctx, min(1000, n-committed), false) {
			committed += min(1000, n-committed)
		}
	}
	b.Logf("produced %d events in %v", committed, time.Since(start).Round(time.Millisecond))

	var sinkTime, dbTime, kafkaTime time.Duration
	var events []pgsink.Event
	b.ResetTimer()
	for i := range b.N {
		// Kafka only.
		t0 := time.Now()
		evs := drainRaw(b, brokers, committed)
		kafkaTime += time.Since(t0)
		if events == nil {
			events = evs
		}

		// The sink.
		db := newDB(b)
		s, err := bank.AccountsSink(pgsink.ConnString(db.url))
		if err != nil {
			b.Fatal(err)
		}
		t0 = time.Now()
		rs := startSinkApp(b, s, brokers, fmt.Sprintf("bench-%d-%s", i, randomHex(3)))
		waitCaughtUp(b, db, brokers, bank.AccountsSinkName, 10*time.Minute, rs.alive)
		sinkTime += time.Since(t0)
		if err := rs.stop(); err != nil {
			b.Fatal(err)
		}
		checkTable(b, db, m)

		// The database only.
		db2 := newDB(b)
		if _, err := db2.pool.Exec(ctx, bank.AccountsTableDDL); err != nil {
			b.Fatal(err)
		}
		t0 = time.Now()
		for j := 0; j < len(events); j += 5000 {
			tx, err := db2.pool.Begin(ctx)
			if err != nil {
				b.Fatal(err)
			}
			if err := bank.ApplyAccounts(ctx, tx, events[j:min(j+5000, len(events))]); err != nil {
				b.Fatal(err)
			}
			if err := tx.Commit(ctx); err != nil {
				b.Fatal(err)
			}
		}
		dbTime += time.Since(t0)
		checkTable(b, db2, m)
	}
	b.StopTimer()
	total := float64(committed * b.N)
	sinkRate := total / sinkTime.Seconds()
	dbRate := total / dbTime.Seconds()
	kafkaRate := total / kafkaTime.Seconds()
	b.ReportMetric(sinkRate, "events/s")
	b.ReportMetric(dbRate, "db-only-events/s")
	b.ReportMetric(kafkaRate, "kafka-only-events/s")
	b.ReportMetric(sinkRate/dbRate, "x-of-db-only")
	b.ReportMetric(sinkRate/kafkaRate, "x-of-kafka-only")
}

// drainRaw reads every committed event of the topic with a plain consumer
// and returns them in the order read.
func drainRaw(b *testing.B, brokers []string, want int) []pgsink.Event {
	b.Helper()
	ends := endOffsets(b, brokers)
	parts := map[string]map[int32]kgo.Offset{eventsTopic: {}}
	for p := range ends {
		parts[eventsTopic][p] = kgo.NewOffset().AtStart()
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumePartitions(parts),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.FetchMaxWait(200*time.Millisecond))
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	out := make([]pgsink.Event, 0, want)
	next := map[int32]int64{}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for {
		done := true
		for p, end := range ends {
			if next[p] < end-1 { // the last offset is a commit marker
				done = false
			}
		}
		if done && len(out) == want {
			return out
		}
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			b.Fatalf("raw consumer read %d of %d events", len(out), want)
		}
		fs.EachRecord(func(r *kgo.Record) {
			hs := make([]aggregate.Header, len(r.Headers))
			for i, h := range r.Headers {
				hs[i] = aggregate.Header{Key: h.Key, Value: h.Value}
			}
			ev, err := aggregate.EventFromRecord(r.Key, hs, r.Value)
			if err != nil {
				b.Fatal(err)
			}
			out = append(out, pgsink.Event{Event: ev, Topic: r.Topic, Partition: r.Partition, Offset: r.Offset})
			next[r.Partition] = r.Offset + 1
		})
	}
}
