package peers

import (
	"context"
	"encoding/json"
	"sync/atomic"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/lovoo/goka"
	"github.com/lovoo/goka/codec"
	"github.com/lovoo/goka/storage"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/examples/bank"
)

// balanceCodec is the group table's codec: the row as JSON, like esker's
// projection rows.
type balanceCodec struct{}

func (balanceCodec) Encode(v any) ([]byte, error) { return json.Marshal(v) }

func (balanceCodec) Decode(data []byte) (any, error) {
	var b Balance
	err := json.Unmarshal(data, &b)
	return b, err
}

// saramaConfig is goka's default configuration with the changes the
// benchmark needs: streams start from the oldest offset (goka's default is
// the newest, and the events are produced before the processor starts).
func saramaConfig() *sarama.Config {
	cfg := goka.DefaultConfig()
	cfg.Consumer.Offsets.Initial = sarama.OffsetOldest
	return cfg
}

type quietLogger struct{}

func (quietLogger) Print(...any)          {}
func (quietLogger) Println(...any)        {}
func (quietLogger) Printf(string, ...any) {}

// runGoka starts a fresh goka processor (new group, so a new group table
// "<group>-table") with in-memory storage on the shared broker and times it
// from Run until its callback has processed every event. It also records
// when the group table holds one record per event, i.e. when every
// SetValue was acknowledged by the broker (goka writes each one).
func runGoka(tb testing.TB, w *workload, group string, verify bool) foldResult {
	tb.Helper()
	var processed atomic.Int64
	all := make(chan struct{})
	firstAt := make(chan time.Time, 1)
	eventType := aggregate.HeaderEventType
	cb := func(ctx goka.Context, msg any) {
		var b Balance
		if v := ctx.Value(); v != nil {
			b = v.(Balance)
		}
		data := msg.([]byte)
		switch string(ctx.Headers()[eventType]) {
		case "Deposited":
			var e bank.Deposited
			if err := json.Unmarshal(data, &e); err != nil {
				ctx.Fail(err)
			}
			b.Balance += e.Amount
		case "Withdrawn":
			var e bank.Withdrawn
			if err := json.Unmarshal(data, &e); err != nil {
				ctx.Fail(err)
			}
			b.Balance -= e.Amount
		case "Opened":
			var e bank.Opened
			if err := json.Unmarshal(data, &e); err != nil {
				ctx.Fail(err)
			}
		}
		b.Count++
		ctx.SetValue(b)
		switch n := processed.Add(1); {
		case n == 1:
			firstAt <- time.Now()
		case n == int64(totalEvents):
			close(all)
		}
	}
	graph := goka.DefineGroup(goka.Group(group),
		goka.Input(goka.Stream(eventsTopic), new(codec.Bytes), cb),
		goka.Persist(balanceCodec{}),
	)
	tmc := goka.NewTopicManagerConfig()
	tmc.Table.Replication = 1 // one broker
	tmc.Stream.Replication = 1
	proc, err := goka.NewProcessor(w.brokers, graph,
		goka.WithStorageBuilder(storage.MemoryBuilder()),
		goka.WithTopicManagerBuilder(goka.TopicManagerBuilderWithConfig(saramaConfig(), tmc)),
		goka.WithConsumerGroupBuilder(goka.ConsumerGroupBuilderWithConfig(saramaConfig())),
		goka.WithConsumerSaramaBuilder(goka.SaramaConsumerBuilderWithConfig(saramaConfig())),
		goka.WithProducerBuilder(goka.ProducerBuilderWithConfig(saramaConfig())),
		goka.WithLogger(quietLogger{}),
		goka.WithHasher(kafkaHasher),
	)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	stopProfile := startProfile(tb, "goka")
	cpu0, start := processCPU(tb), time.Now()
	go func() { done <- proc.Run(ctx) }()
	var res foldResult
	select {
	case <-all:
		res.elapsed = time.Since(start)
		res.cpu = processCPU(tb) - cpu0
	case err := <-done:
		tb.Fatalf("goka processor stopped after %d events: %v", processed.Load(), err)
	case <-time.After(5 * time.Minute):
		cancel()
		tb.Fatalf("goka processed %d of %d events in 5 minutes", processed.Load(), totalEvents)
	}
	res.first = (<-firstAt).Sub(start)
	table := string(goka.GroupTable(goka.Group(group)))
	tick := time.NewTicker(10 * time.Millisecond)
	for res.persisted == 0 {
		n, err := w.topicEnd(context.Background(), table)
		if err != nil {
			tb.Fatalf("end offsets of %s: %v", table, err)
		}
		if n >= int64(totalEvents) {
			res.persisted = time.Since(start)
		} else {
			<-tick.C
		}
	}
	tick.Stop()
	stopProfile()
	if verify {
		for id, want := range w.expected {
			v, err := proc.Get(id)
			if err != nil {
				tb.Fatalf("goka row %s: %v", id, err)
			}
			if got, _ := v.(Balance); got != want {
				tb.Fatalf("goka row %s = %+v, want %+v", id, v, want)
			}
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			tb.Fatalf("goka processor: %v", err)
		}
	case <-time.After(time.Minute):
		tb.Fatal("goka processor did not stop within a minute")
	}
	w.cleanup(tb, group, table)
	return res
}
