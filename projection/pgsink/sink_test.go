package pgsink_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/projection/pgsink"
)

func newAccountsSink(t testing.TB, db *testDB, opts ...pgsink.Option) *pgsink.Sink {
	t.Helper()
	s, err := bank.AccountsSink(append([]pgsink.Option{pgsink.ConnString(db.url), pgsink.Backoff(20*time.Millisecond, 500*time.Millisecond)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestBasic: events already on the topic and events produced while the sink
// runs end up in the table exactly as their fold, across partitions and
// accounts, with the stored offsets at the end of every partition.
func TestBasic(t *testing.T) {
	brokers := newCluster(t)
	db := newDB(t)
	m := &model{}
	p := newProducer(t, brokers, m, 60, 1)
	ctx := context.Background()
	p.produce(ctx, 2000, 25)

	rs := startSink(t, newAccountsSink(t, db, pgsink.MaxBatch(300), pgsink.Schema(db.schema)), brokers)
	waitReady(t, rs, 20*time.Second)
	p.produce(ctx, 1500, 10)
	waitCaughtUp(t, db, brokers, bank.AccountsSinkName, 30*time.Second, rs.alive)
	checkTable(t, db, m)

	_, total := m.snapshot()
	st := rs.Status()
	if st.Events != total {
		t.Errorf("Status.Events = %d, want %d committed events", st.Events, total)
	}
	if len(st.Partitions) != partitions {
		t.Errorf("Status.Partitions = %v, want all %d partitions", st.Partitions, partitions)
	}
	if !st.Ready || !st.DBReachable || st.Group != "bank-"+bank.AccountsSinkName {
		t.Errorf("Status = %+v, want ready, database reachable, group bank-%s", st, bank.AccountsSinkName)
	}
	if got := metricValue(t, rs, "esker_sink_events_total"); got != float64(total) {
		t.Errorf("esker_sink_events_total = %v, want %d", got, total)
	}
	if got := metricValue(t, rs, "esker_sink_lag_records"); got != 0 {
		t.Errorf("esker_sink_lag_records = %v after catching up, want 0", got)
	}
	if n := metricCount(t, rs, "esker_sink_batch_seconds"); n == 0 {
		t.Error("esker_sink_batch_seconds observed no batch")
	}
	// The best-effort Kafka commits follow, for lag tooling.
	ends := endOffsets(t, brokers)
	waitFor(t, 10*time.Second, "the group's Kafka commits to reach the end offsets", func() bool {
		committed := groupOffsets(t, brokers, "bank-"+bank.AccountsSinkName)
		for p, end := range ends {
			if committed[p] != end {
				return false
			}
		}
		return true
	})
	if err := rs.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if err := rs.Ready(); err == nil || !strings.Contains(err.Error(), "not running") {
		t.Errorf("Ready after Run returned = %v, want not running", err)
	}
}

// metricValue returns the value of a counter or gauge of the sink.
func metricValue(t testing.TB, rs *runningSink, name string) float64 {
	t.Helper()
	mfs, err := rs.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "sink" && l.GetValue() == rs.Name() {
					if c := m.GetCounter(); c != nil {
						return c.GetValue()
					}
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	t.Fatalf("metric %s{sink=%q} not registered", name, rs.Name())
	return 0
}

// metricCount returns the sample count of a histogram of the sink.
func metricCount(t testing.TB, rs *runningSink, name string) uint64 {
	t.Helper()
	mfs, err := rs.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				return m.GetHistogram().GetSampleCount()
			}
		}
	}
	t.Fatalf("metric %s not registered", name)
	return 0
}

// TestStartAtLatest: a sink without stored offsets that starts at Latest
// skips the events already on the topic and applies every later one; the
// position is stored at the first assignment, so a restart before any new
// event still applies the events written while it was down.
func TestStartAtLatest(t *testing.T) {
	brokers := newCluster(t)
	db := newDB(t)
	old := newProducerPrefix(t, brokers, &model{}, 30, 10, "old-")
	ctx := context.Background()
	old.produce(ctx, 400, 20)

	m := &model{}
	p := newProducerPrefix(t, brokers, m, 30, 11, "new-")
	rs := startSink(t, newAccountsSink(t, db, pgsink.StartAt(pgsink.Latest)), brokers)
	waitReady(t, rs, 20*time.Second)
	if err := rs.stop(); err != nil {
		t.Fatal(err)
	}
	p.produce(ctx, 300, 20) // while no sink runs
	rs = startSink(t, newAccountsSink(t, db, pgsink.StartAt(pgsink.Latest)), brokers)
	p.produce(ctx, 300, 20)
	waitCaughtUp(t, db, brokers, bank.AccountsSinkName, 30*time.Second, rs.alive)
	checkTable(t, db, m) // only the new accounts, all of their events
}

// TestNotAnEvent: a record without the esker envelope stops the sink with
// an error naming it; the stored offset never moves past it.
func TestNotAnEvent(t *testing.T) {
	brokers := newCluster(t)
	db := newDB(t)
	m := &model{}
	p := newProducer(t, brokers, m, 10, 12)
	ctx := context.Background()
	p.produce(ctx, 100, 20)
	ends := endOffsets(t, brokers)
	bad := &kgo.Record{Topic: eventsTopic, Partition: 2, Key: []byte("x"), Value: []byte("not an event")}
	if err := p.cl.BeginTransaction(); err != nil {
		t.Fatal(err)
	}
	if err := p.cl.ProduceSync(ctx, bad).FirstErr(); err != nil {
		t.Fatal(err)
	}
	if err := p.cl.EndTransaction(ctx, kgo.TryCommit); err != nil {
		t.Fatal(err)
	}

	rs := startSink(t, newAccountsSink(t, db), brokers)
	var err error
	select {
	case err = <-rs.done:
		rs.done <- err
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not stop at a record that is not an event")
	}
	want := fmt.Sprintf("record %s/2 at offset %d is not an esker event", eventsTopic, ends[2])
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("Run = %v, want an error containing %q", err, want)
	}
	if err := rs.Ready(); err == nil || !strings.Contains(err.Error(), "stopped") {
		t.Errorf("Ready = %v, want stopped with the error", err)
	}
	rs.once.Do(rs.cancel) // Run already returned, with the expected error
	if got := db.storedOffsets(t, bank.AccountsSinkName)[2]; got > ends[2] {
		t.Errorf("stored offset of partition 2 = %d, past the bad record at %d", got, ends[2])
	}
}

// groupOffsets returns a consumer group's committed offsets in Kafka.
func groupOffsets(t testing.TB, brokers []string, group string) map[int32]int64 {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := kadm.NewClient(cl).FetchOffsets(ctx, group)
	out := map[int32]int64{}
	if err != nil {
		return out
	}
	resp.Each(func(o kadm.OffsetResponse) {
		if o.Err == nil && o.Topic == eventsTopic {
			out[o.Partition] = o.At
		}
	})
	return out
}
