package peers

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
)

// The workload: bank account events as esker writes them to
// "account-events", produced once per process to one embedded broker that
// every benchmark iteration (esker's and goka's) folds from the beginning.
const (
	eventsTopic = "account-events"
	partitions  = 8
	accounts    = 2_000
)

// totalEvents is the number of events produced (PEERS_EVENTS, default
// 200 000). Every account gets an Opened event first.
var totalEvents = func() int {
	if s := os.Getenv("PEERS_EVENTS"); s != "" {
		if n, err := strconv.Atoi(s); err == nil && n >= accounts {
			return n
		}
	}
	return 200_000
}()

// Balance is the row both sides fold per account: its balance in cents and
// the number of events folded into it.
type Balance struct {
	Balance int64 `json:"balance"`
	Count   int64 `json:"count"`
}

type workload struct {
	cluster  *kfake.Cluster
	brokers  []string
	admin    *kadm.Client
	expected map[string]Balance
}

var (
	sharedOnce sync.Once
	shared     *workload
	sharedErr  error
)

// setup returns the shared broker with the events produced, starting it on
// first use.
func setup(tb testing.TB) *workload {
	tb.Helper()
	sharedOnce.Do(func() { shared, sharedErr = newWorkload() })
	if sharedErr != nil {
		tb.Fatal(sharedErr)
	}
	return shared
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared != nil {
		shared.admin.Close()
		shared.cluster.Close()
	}
	os.Exit(code)
}

func newWorkload() (*workload, error) {
	c, err := kfake.NewCluster(kfake.NumBrokers(1))
	if err != nil {
		return nil, err
	}
	w := &workload{cluster: c, brokers: c.ListenAddrs(), expected: map[string]Balance{}}
	cl, err := kgo.NewClient(kgo.SeedBrokers(w.brokers...), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		c.Close()
		return nil, err
	}
	defer cl.Close()
	adm, err := kgo.NewClient(kgo.SeedBrokers(w.brokers...))
	if err != nil {
		c.Close()
		return nil, err
	}
	w.admin = kadm.NewClient(adm)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// The configs esker requires of an events topic, so the node accepts
	// it as it is.
	resp, err := w.admin.CreateTopic(ctx, partitions, 1, map[string]*string{
		"cleanup.policy": kadm.StringPtr("delete"),
		"retention.ms":   kadm.StringPtr("-1"),
	}, eventsTopic)
	if err == nil {
		err = resp.Err
	}
	if err != nil && !errors.Is(err, kerr.TopicAlreadyExists) {
		return nil, fmt.Errorf("create %s: %w", eventsTopic, err)
	}

	rng := rand.New(rand.NewPCG(1, 2))
	versions := make([]int64, accounts)
	base := time.Date(2026, 11, 25, 8, 0, 0, 0, time.UTC)
	var batch []*kgo.Record
	flush := func() error {
		err := cl.ProduceSync(ctx, batch...).FirstErr()
		batch = batch[:0]
		return err
	}
	for i := range totalEvents {
		a := i
		var typ string
		var data []byte
		id := accountID(a % accounts)
		if i < accounts {
			typ, data = "Opened", []byte(`{"owner":"owner-`+strconv.Itoa(a%97)+`"}`)
		} else {
			a = rng.IntN(accounts)
			id = accountID(a)
			amount := int64(1 + rng.IntN(500))
			row := w.expected[id]
			if rng.IntN(3) == 0 && row.Balance >= amount {
				typ = "Withdrawn"
				row.Balance -= amount
			} else {
				typ = "Deposited"
				row.Balance += amount
			}
			w.expected[id] = row
			data = []byte(`{"amount":` + strconv.FormatInt(amount, 10) + `}`)
		}
		row := w.expected[id]
		row.Count++
		w.expected[id] = row
		versions[a%accounts]++
		ev := aggregate.Event{
			EntityID:      id,
			Version:       versions[a%accounts],
			EventID:       aggregate.EventID("account", id, versions[a%accounts]),
			Type:          typ,
			SchemaVersion: 1,
			CommandID:     "cmd-" + strconv.Itoa(i),
			Time:          base.Add(time.Duration(i) * time.Millisecond),
			Data:          data,
		}
		batch = append(batch, eventRecord(&ev))
		if len(batch) == 10_000 {
			if err := flush(); err != nil {
				return nil, err
			}
		}
	}
	if len(batch) > 0 {
		if err := flush(); err != nil {
			return nil, err
		}
	}
	return w, nil
}

func accountID(i int) string { return fmt.Sprintf("acc-%04d", i) }

// eventRecord is an event's record as esker's engine writes it: keyed by
// entity id, the envelope in headers, the JSON payload as the value, on the
// murmur2 partition of the entity id.
func eventRecord(ev *aggregate.Event) *kgo.Record {
	r := &kgo.Record{
		Topic:     eventsTopic,
		Partition: aggregate.Partition(ev.EntityID, partitions),
		Key:       []byte(ev.EntityID),
		Value:     ev.Data,
		Timestamp: ev.Time,
	}
	for _, h := range ev.Headers("application/json") {
		r.Headers = append(r.Headers, kgo.RecordHeader{Key: h.Key, Value: h.Value})
	}
	return r
}

// deleteTopics removes an iteration's topics and group so the shared broker
// does not grow from run to run.
func (w *workload) cleanup(tb testing.TB, group string, topics ...string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if len(topics) > 0 {
		if _, err := w.admin.DeleteTopics(ctx, topics...); err != nil {
			tb.Logf("delete topics %v: %v", topics, err)
		}
	}
	if group != "" {
		if _, err := w.admin.DeleteGroups(ctx, group); err != nil {
			tb.Logf("delete group %s: %v", group, err)
		}
	}
}

// topicEnd sums the high watermarks of a topic's partitions.
func (w *workload) topicEnd(ctx context.Context, topic string) (int64, error) {
	ends, err := w.admin.ListEndOffsets(ctx, topic)
	if err != nil {
		return 0, err
	}
	var n int64
	var ferr error
	ends.Each(func(o kadm.ListedOffset) {
		if o.Err != nil {
			ferr = o.Err
		}
		n += o.Offset
	})
	return n, ferr
}
