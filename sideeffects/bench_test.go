package sideeffects_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/sideeffects"
)

// BenchmarkNoopHandler measures an at-least-once consumer with a handler
// that does nothing — the consumer's own cost: decoding, the keyed worker
// pool, offset tracking and commits — against a raw franz-go group consumer
// that polls the same topic and does nothing with the records. Each
// iteration reads the whole topic once with each, as a new group (group
// join included in both). Reported: events/s of each, their ratio, and the
// consumer's overhead per event in ns.
func BenchmarkNoopHandler(b *testing.B) {
	const (
		topic  = "account-events"
		events = 50_000
	)
	brokers := newCluster(b, 4, topic)
	produceEvents(b, brokers, topic, entities(1000), 1, events/1000)

	var eskerTotal, rawTotal time.Duration
	for i := 0; b.Loop(); i++ {
		// Alternate the order so neither always runs on a warmer broker.
		if i%2 == 0 {
			eskerTotal += benchEsker(b, brokers, topic, events, i)
			rawTotal += benchRaw(b, brokers, topic, events, i)
		} else {
			rawTotal += benchRaw(b, brokers, topic, events, i)
			eskerTotal += benchEsker(b, brokers, topic, events, i)
		}
	}
	n := float64(b.N) * events
	eskerRate, rawRate := n/eskerTotal.Seconds(), n/rawTotal.Seconds()
	b.ReportMetric(eskerRate, "events/s")
	b.ReportMetric(rawRate, "baseline-events/s")
	b.ReportMetric(eskerRate/rawRate, "ratio")
	b.ReportMetric(float64(eskerTotal-rawTotal)/n, "overhead-ns/event")
}

// benchEsker reads the topic once with a new side-effect consumer.
func benchEsker(b *testing.B, brokers []string, topic string, events, i int) time.Duration {
	c, err := sideeffects.New(fmt.Sprintf("bench-%d", i), []string{topic},
		func(context.Context, sideeffects.Event) error { return nil })
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		done <- c.Run(ctx, sideeffects.Runtime{AppID: testApp, ClientOpts: clientOpts(brokers), Logger: testLogger(b)})
	}()
	for c.Status().Handled < uint64(events) {
		select {
		case err := <-done:
			b.Fatalf("Run returned: %v", err)
		case <-time.After(time.Millisecond):
		}
	}
	elapsed := time.Since(start)
	cancel()
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	return elapsed
}

// benchRaw reads the topic once with a plain kgo group consumer.
func benchRaw(b *testing.B, brokers []string, topic string, events, i int) time.Duration {
	start := time.Now()
	cl, err := kgo.NewClient(append(clientOpts(brokers),
		kgo.ConsumerGroup(fmt.Sprintf("raw-%d", i)),
		kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.FetchMaxWait(500*time.Millisecond),
	)...)
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	got := 0
	for got < events {
		fs := cl.PollRecords(ctx, 500)
		if err := ctx.Err(); err != nil {
			b.Fatalf("raw consumer read %d of %d records: %v", got, events, err)
		}
		got += fs.NumRecords()
	}
	return time.Since(start)
}
