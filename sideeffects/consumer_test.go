package sideeffects_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/sideeffects"
)

// TestAtLeastOnceRetriesKeepKeyOrder: a handler that fails every third
// version of every account twice is retried until it succeeds; every event
// is handled, each account's events succeed in version order (a retried
// event holds its account's later events back), the counters and metrics
// agree, and the group ends with its offsets committed to the end.
func TestAtLeastOnceRetriesKeepKeyOrder(t *testing.T) {
	const topic = "account-events"
	brokers := newCluster(t, 3, topic)
	accounts := entities(12)
	const versions = 10
	produceEvents(t, brokers, topic, accounts, 1, versions)

	var mu sync.Mutex
	calls := map[string]int{}         // event id → handler calls
	succeeded := map[string][]int64{} // account → versions, in the order they succeeded
	var problems []string
	handler := func(ctx context.Context, ev sideeffects.Event) error {
		mu.Lock()
		defer mu.Unlock()
		calls[ev.EventID]++
		if want := aggregate.EventID("account", ev.EntityID, ev.Version); ev.EventID != want || ev.Type != "Deposited" ||
			ev.Topic != topic || string(ev.Data) != fmt.Sprintf(`{"amount":%d}`, ev.Version) || ev.Redriven() {
			problems = append(problems, fmt.Sprintf("bad event %+v", ev))
		}
		if ev.Version%3 == 0 && calls[ev.EventID] <= 2 {
			return fmt.Errorf("transient failure %d", calls[ev.EventID])
		}
		succeeded[ev.EntityID] = append(succeeded[ev.EntityID], ev.Version)
		return nil
	}
	reg := prometheus.NewRegistry()
	c, err := sideeffects.New("mailer", []string{topic}, handler,
		sideeffects.Retries(3, time.Millisecond, 10*time.Millisecond), sideeffects.Workers(4))
	if err != nil {
		t.Fatal(err)
	}
	r := startConsumer(t, c, brokers, reg)

	total := len(accounts) * versions
	waitFor(t, 30*time.Second, "every event handled", func() bool { return c.Status().Handled >= uint64(total) })
	waitFor(t, 15*time.Second, "offsets committed to the end", func() bool {
		return groupCaughtUp(t, brokers, sideeffects.GroupID(testApp, "mailer"), topic)
	})

	mu.Lock()
	for _, p := range problems {
		t.Error(p)
	}
	for _, a := range accounts {
		want := make([]int64, versions)
		for i := range want {
			want[i] = int64(i + 1)
		}
		if !slices.Equal(succeeded[a], want) {
			t.Errorf("%s: versions succeeded in order %v, want %v", a, succeeded[a], want)
		}
		for v := int64(1); v <= versions; v++ {
			wantCalls := 1
			if v%3 == 0 {
				wantCalls = 3
			}
			if got := calls[aggregate.EventID("account", a, v)]; got != wantCalls {
				t.Errorf("%s v%d: %d handler calls, want %d", a, v, got, wantCalls)
			}
		}
	}
	mu.Unlock()

	failing := len(accounts) * (versions / 3) // versions 3, 6, 9
	s := c.Status()
	if s.Handled != uint64(total) || s.Retried != uint64(2*failing) || s.DeadLettered != 0 {
		t.Errorf("status counters handled %d retried %d dead-lettered %d, want %d, %d, 0", s.Handled, s.Retried, s.DeadLettered, total, 2*failing)
	}
	if !s.Ready || !s.Running || s.Guarantee != sideeffects.AtLeastOnce || s.Group != "shop-mailer" {
		t.Errorf("status %+v", s)
	}
	if len(s.Partitions) != 4 { // 3 source partitions and the re-drive topic's one
		t.Errorf("status partitions %+v, want 4", s.Partitions)
	}
	waitFor(t, 10*time.Second, "lag 0 and nothing in flight", func() bool {
		s := c.Status()
		return s.Lag == 0 && s.InFlight == 0
	})
	raw, err := json.Marshal(c.Status())
	if err != nil || !strings.Contains(string(raw), `"guarantee":"at-least-once"`) {
		t.Errorf("status JSON %s, %v", raw, err)
	}

	labels := map[string]string{"consumer": "mailer"}
	if got := metricValue(t, reg, "esker_sideeffect_events_total", map[string]string{"consumer": "mailer", "outcome": "handled"}); got != float64(total) {
		t.Errorf("events_total{handled} = %v, want %d", got, total)
	}
	if got := metricValue(t, reg, "esker_sideeffect_events_total", map[string]string{"consumer": "mailer", "outcome": "dead_lettered"}); got != 0 {
		t.Errorf("events_total{dead_lettered} = %v, want 0", got)
	}
	if got := metricValue(t, reg, "esker_sideeffect_retries_total", labels); got != float64(2*failing) {
		t.Errorf("retries_total = %v, want %d", got, 2*failing)
	}
	if got := metricValue(t, reg, "esker_sideeffect_handler_seconds", labels); got != float64(total+2*failing) {
		t.Errorf("handler_seconds count = %v, want %d", got, total+2*failing)
	}
	waitFor(t, 5*time.Second, "lag gauge 0", func() bool { return metricValue(t, reg, "esker_sideeffect_lag_records", labels) == 0 })
	if dead := readAll(t, brokers, sideeffects.DeadLetterTopic(testApp, "mailer")); len(dead) != 0 {
		t.Errorf("%d dead letters, want none", len(dead))
	}

	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	if err := c.Ready(); err == nil || !strings.Contains(err.Error(), "not running") {
		t.Errorf("Ready after stop = %v", err)
	}
	if s := c.Status(); s.Running || s.Ready {
		t.Errorf("status after stop %+v", s)
	}
	if mfs, _ := reg.Gather(); len(mfs) != 0 {
		t.Errorf("metrics still registered after Run returned: %d families", len(mfs))
	}
}

// TestPlainAndMalformedRecords: a record without an esker envelope is
// delivered with its key as entity id and its value as data; a record whose
// envelope does not parse never reaches the handler and is dead-lettered
// with 0 attempts; records after both are handled.
func TestPlainAndMalformedRecords(t *testing.T) {
	const topic = "webhooks"
	brokers := newCluster(t, 1, topic)
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ts := time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC)
	recs := []*kgo.Record{
		{Topic: topic, Key: []byte("k1"), Value: []byte("hello"), Timestamp: ts, Headers: []kgo.RecordHeader{{Key: "x", Value: []byte("y")}}},
		{Topic: topic, Key: []byte("k2"), Value: []byte("broken"), Headers: []kgo.RecordHeader{
			{Key: aggregate.HeaderVersion, Value: []byte("abc")}, {Key: aggregate.HeaderEventType, Value: []byte("X")}}},
		eventRecord(topic, testEvent("k2", 1)),
	}
	if err := cl.ProduceSync(context.Background(), recs...).FirstErr(); err != nil {
		t.Fatal(err)
	}

	got := make(chan sideeffects.Event, 10)
	c, err := sideeffects.New("hooks", []string{topic}, func(ctx context.Context, ev sideeffects.Event) error {
		got <- ev
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	startConsumer(t, c, brokers, nil)
	var evs []sideeffects.Event
	for len(evs) < 2 {
		select {
		case ev := <-got:
			evs = append(evs, ev)
		case <-time.After(20 * time.Second):
			t.Fatalf("handled %d events, want 2", len(evs))
		}
	}
	plain := evs[0]
	if plain.EntityID != "k1" || string(plain.Data) != "hello" || plain.Type != "" || plain.Version != 0 || plain.EventID != "" ||
		!plain.Time.Equal(ts) || plain.Offset != 0 || len(plain.Headers) != 1 || plain.Headers[0].Key != "x" {
		t.Errorf("plain record delivered as %+v", plain)
	}
	if e := evs[1]; e.EntityID != "k2" || e.Version != 1 || e.Type != "Deposited" || e.Offset != 2 {
		t.Errorf("event after the malformed one delivered as %+v", e)
	}
	waitFor(t, 10*time.Second, "malformed record dead-lettered", func() bool { return c.Status().DeadLettered == 1 })
	dead, err := sideeffects.List(context.Background(), clientOpts(brokers), testApp, "hooks", 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != 1 || dead[0].Attempts != 0 || !strings.Contains(dead[0].Error, "malformed esker event envelope") ||
		dead[0].Event.Offset != 1 || dead[0].Event.EntityID != "k2" || string(dead[0].Event.Data) != "broken" {
		t.Errorf("dead letters %+v", dead)
	}
	select {
	case ev := <-got:
		t.Errorf("unexpected delivery %+v", ev)
	default:
	}
}

// TestStartAtLatest: a new group that starts at the end handles only events
// written after it joined.
func TestStartAtLatest(t *testing.T) {
	const topic = "account-events"
	brokers := newCluster(t, 2, topic)
	produceEvents(t, brokers, topic, entities(5), 1, 3)
	var mu sync.Mutex
	var seen []int64
	c, err := sideeffects.New("fresh", []string{topic}, func(ctx context.Context, ev sideeffects.Event) error {
		mu.Lock()
		seen = append(seen, ev.Version)
		mu.Unlock()
		return nil
	}, sideeffects.StartAt(sideeffects.Latest()))
	if err != nil {
		t.Fatal(err)
	}
	startConsumer(t, c, brokers, nil)
	// The group resolves "latest" shortly after it joins: write new
	// versions until one arrives, then check nothing old did.
	v := int64(100)
	waitFor(t, 20*time.Second, "a new event handled", func() bool {
		mu.Lock()
		n := len(seen)
		mu.Unlock()
		if n > 0 {
			return true
		}
		produceEvents(t, brokers, topic, entities(5), v, v)
		v++
		time.Sleep(200 * time.Millisecond)
		return false
	})
	mu.Lock()
	defer mu.Unlock()
	for _, s := range seen {
		if s < 100 {
			t.Errorf("handled old version %d with StartAt(Latest)", s)
		}
	}
}

func TestNewRejectsBadArguments(t *testing.T) {
	ok := func(context.Context, sideeffects.Event) error { return nil }
	tests := []struct {
		name    string
		cname   string
		topics  []string
		h       sideeffects.Handler
		opts    []sideeffects.Option
		wantErr string
	}{
		{"upper-case name", "Mailer", []string{"t"}, ok, nil, "invalid consumer name"},
		{"name with dot", "a.b", []string{"t"}, ok, nil, "invalid consumer name"},
		{"empty name", "", []string{"t"}, ok, nil, "invalid consumer name"},
		{"no topics", "m", nil, ok, nil, "no topics"},
		{"empty topic", "m", []string{""}, ok, nil, "empty topic"},
		{"duplicate topic", "m", []string{"t", "t"}, ok, nil, "listed twice"},
		{"nil handler", "m", []string{"t"}, nil, nil, "nil handler"},
		{"zero workers", "m", []string{"t"}, ok, []sideeffects.Option{sideeffects.Workers(0)}, "Workers must be at least 1"},
		{"zero attempts", "m", []string{"t"}, ok, []sideeffects.Option{sideeffects.Retries(0, 0, 0)}, "maxAttempts must be at least 1"},
		{"backoff order", "m", []string{"t"}, ok, []sideeffects.Option{sideeffects.Retries(3, time.Second, time.Millisecond)}, "baseBackoff <= maxBackoff"},
		{"bad guarantee", "m", []string{"t"}, ok, []sideeffects.Option{sideeffects.WithGuarantee(7)}, "unknown guarantee"},
		{"zero start position", "m", []string{"t"}, ok, []sideeffects.Option{sideeffects.StartAt(sideeffects.StartPosition{})}, "StartAt"},
		{"zero commit interval", "m", []string{"t"}, ok, []sideeffects.Option{sideeffects.CommitInterval(0)}, "CommitInterval"},
		{"zero drain timeout", "m", []string{"t"}, ok, []sideeffects.Option{sideeffects.DrainTimeout(0)}, "DrainTimeout"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := sideeffects.New(tt.cname, tt.topics, tt.h, tt.opts...)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("New = %v, %v; want error containing %q", c, err, tt.wantErr)
			}
		})
	}
	if c, err := sideeffects.New("order-mailer-2", []string{"a", "b"}, ok, sideeffects.WithGuarantee(sideeffects.AtMostOnce)); err != nil || c.Name() != "order-mailer-2" {
		t.Errorf("valid New = %v, %v", c, err)
	}
}

// TestRunFailsWithoutKafka: Run gives up with an error when no broker
// answers within the start timeout, and rejects an invalid application id
// and a second concurrent Run.
func TestRunFailsWithoutKafka(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	c, err := sideeffects.New("mailer", []string{"t"}, func(context.Context, sideeffects.Event) error { return nil },
		sideeffects.StartTimeout(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = c.Run(context.Background(), sideeffects.Runtime{AppID: testApp, ClientOpts: []kgo.Opt{kgo.SeedBrokers(dead)}})
	if err == nil || !strings.Contains(err.Error(), "cannot reach Kafka") {
		t.Errorf("Run = %v, want cannot reach Kafka", err)
	}
	if d := time.Since(start); d > 15*time.Second {
		t.Errorf("Run took %v to give up", d)
	}
	if err := c.Ready(); err == nil {
		t.Error("Ready after a failed Run = nil")
	}
	err = c.Run(context.Background(), sideeffects.Runtime{AppID: "no spaces"})
	if err == nil || !strings.Contains(err.Error(), "invalid application id") {
		t.Errorf("Run with a bad app id = %v", err)
	}

	// A cancelled context during start is a stop, not an error.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := c.Run(ctx, sideeffects.Runtime{AppID: testApp, ClientOpts: []kgo.Opt{kgo.SeedBrokers(dead)}}); err != nil {
		t.Errorf("Run with a cancelled context = %v, want nil", err)
	}
}

func TestRunRejectsSecondRunAndDuplicateMetrics(t *testing.T) {
	const topic = "account-events"
	brokers := newCluster(t, 1, topic)
	ok := func(context.Context, sideeffects.Event) error { return nil }
	reg := prometheus.NewRegistry()
	c, err := sideeffects.New("mailer", []string{topic}, ok)
	if err != nil {
		t.Fatal(err)
	}
	startConsumer(t, c, brokers, reg)
	err = c.Run(context.Background(), sideeffects.Runtime{AppID: testApp, ClientOpts: clientOpts(brokers)})
	if err == nil || !strings.Contains(err.Error(), "already running") {
		t.Errorf("second Run = %v", err)
	}
	twin, err := sideeffects.New("mailer", []string{topic}, ok)
	if err != nil {
		t.Fatal(err)
	}
	err = twin.Run(context.Background(), sideeffects.Runtime{AppID: testApp, ClientOpts: clientOpts(brokers), Registerer: reg})
	if err == nil || !strings.Contains(err.Error(), "already registered") {
		t.Errorf("Run of a second consumer with the same name and registry = %v", err)
	}
	self, err := sideeffects.New("self", []string{sideeffects.DeadLetterTopic(testApp, "self")}, ok)
	if err != nil {
		t.Fatal(err)
	}
	if err := self.Run(context.Background(), sideeffects.Runtime{AppID: testApp, ClientOpts: clientOpts(brokers)}); err == nil ||
		!strings.Contains(err.Error(), "its own topic") {
		t.Errorf("consuming its own dead-letter topic: Run = %v", err)
	}
}

func TestPermanent(t *testing.T) {
	base := errors.New("bad payload")
	p := sideeffects.Permanent(base)
	if !sideeffects.IsPermanent(p) || !errors.Is(p, base) || p.Error() != "bad payload" {
		t.Errorf("Permanent(%v) = %v", base, p)
	}
	if wrapped := fmt.Errorf("send: %w", p); !sideeffects.IsPermanent(wrapped) {
		t.Error("a wrapped permanent error is not permanent")
	}
	if sideeffects.IsPermanent(base) || sideeffects.IsPermanent(nil) || sideeffects.Permanent(nil) != nil {
		t.Error("IsPermanent of plain or nil errors")
	}
	var g sideeffects.Guarantee
	if err := g.UnmarshalText([]byte("at-most-once")); err != nil || g != sideeffects.AtMostOnce {
		t.Errorf("UnmarshalText: %v %v", g, err)
	}
	if err := g.UnmarshalText([]byte("twice")); err == nil {
		t.Error("UnmarshalText accepted twice")
	}
}

// startOpening runs a consumer of topic, named name, whose handler passes
// every event it gets to the returned channel, with open as its
// Runtime.OpenEvent and quick retries.
func startOpening(t *testing.T, name, topic string, brokers []string,
	open func(context.Context, string, aggregate.Event) (aggregate.Event, error)) (*running, <-chan sideeffects.Event) {
	t.Helper()
	got := make(chan sideeffects.Event, 10)
	c, err := sideeffects.New(name, []string{topic}, func(ctx context.Context, ev sideeffects.Event) error {
		got <- ev
		return nil
	}, sideeffects.Retries(5, 10*time.Millisecond, 50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	return startConsumerWith(t, c, sideeffects.Runtime{AppID: testApp, ClientOpts: clientOpts(brokers), Logger: testLogger(t), OpenEvent: open}), got
}

// TestOpenEventFailureRetried: Runtime.OpenEvent failing (the keys topic
// briefly unreadable, say) is retried like a handler error, as Runtime
// documents: the handler then gets the opened event, and nothing is
// dead-lettered.
func TestOpenEventFailureRetried(t *testing.T) {
	const topic = "account-events"
	brokers := newCluster(t, 1, topic)
	produceEvents(t, brokers, topic, []string{"alice"}, 1, 1)
	var mu sync.Mutex
	opens := 0
	open := func(_ context.Context, tp string, ev aggregate.Event) (aggregate.Event, error) {
		mu.Lock()
		defer mu.Unlock()
		opens++
		if opens <= 2 {
			return aggregate.Event{}, errors.New("keys topic unreachable")
		}
		ev.Data = json.RawMessage(`{"opened":true}`)
		return ev, nil
	}
	c, got := startOpening(t, "opener", topic, brokers, open)
	select {
	case ev := <-got:
		if ev.EntityID != "alice" || ev.Version != 1 || string(ev.Data) != `{"opened":true}` {
			t.Errorf("handler got %+v, want alice's opened version 1", ev)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("handler never called; status %+v", c.Status())
	}
	// The handler returned after it sent ev: the count follows.
	waitFor(t, 10*time.Second, "the event counted as handled", func() bool { return c.Status().Handled == 1 })
	if s := c.Status(); s.DeadLettered != 0 || s.Retried != 2 || s.Handled != 1 {
		t.Errorf("status %+v, want 1 handled after 2 retries, none dead-lettered", s)
	}
}

// TestOpenEventUnknownKeyHandledSealed: Runtime.OpenEvent says no key opens
// an event's personal fields (an error wrapping aggregate.ErrUnknownKey,
// and a zero event). No retry could open them: the handler gets the event
// as stored, at once, instead of retries ending in the dead-letter topic,
// and the events after it are handled opened.
func TestOpenEventUnknownKeyHandledSealed(t *testing.T) {
	const topic = "account-events"
	brokers := newCluster(t, 1, topic)
	produceEvents(t, brokers, topic, []string{"alice"}, 1, 3)
	var mu sync.Mutex
	opens := map[int64]int{}
	open := func(_ context.Context, tp string, ev aggregate.Event) (aggregate.Event, error) {
		mu.Lock()
		defer mu.Unlock()
		opens[ev.Version]++
		if ev.Version == 2 {
			return aggregate.Event{}, fmt.Errorf("keyring: %w: the data key k1 of account %q is not in shop-keys", aggregate.ErrUnknownKey, ev.EntityID)
		}
		ev.Data = json.RawMessage(`{"opened":true}`)
		return ev, nil
	}
	c, got := startOpening(t, "sealed", topic, brokers, open)
	waitFor(t, 20*time.Second, "the three events finished", func() bool {
		s := c.Status()
		return s.Handled+s.DeadLettered == 3
	})
	// The handler sent each event before returning, so every handled
	// event is in got.
	if s := c.Status(); s.Handled != 3 || s.Retried != 0 || s.DeadLettered != 0 || len(got) != 3 {
		t.Errorf("status %+v, handler saw %d events; want 3 handled, no retry, none dead-lettered", s, len(got))
	}
	want := map[int64]string{1: `{"opened":true}`, 2: string(testEvent("alice", 2).Data), 3: `{"opened":true}`}
	for range len(got) {
		ev := <-got
		if ev.EntityID != "alice" || string(ev.Data) != want[ev.Version] || ev.Type != "Deposited" {
			t.Errorf("handler got alice version %d as %+v, want data %s", ev.Version, ev, want[ev.Version])
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if opens[2] != 1 {
		t.Errorf("OpenEvent called %d times for the event no key opens, want once", opens[2])
	}
}
