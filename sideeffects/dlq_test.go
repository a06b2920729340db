package sideeffects_test

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/sideeffects"
)

// TestPoisonEventDeadLetteredAndReplayed: an event the handler always fails
// on is dead-lettered after the configured attempts, one failing with a
// Permanent error after a single attempt; the events after them, of the
// same account and of others, are still handled. The dead letters carry
// the original record and every documented header, List shows them, and
// after the handler is fixed Replay re-drives them to the running consumer,
// exactly once.
func TestPoisonEventDeadLetteredAndReplayed(t *testing.T) {
	const topic = "account-events"
	brokers := newCluster(t, 2, topic)
	accounts := []string{"a", "b", "c", "d", "e"}
	const versions = 5
	produceEvents(t, brokers, topic, accounts, 1, versions)
	poison := aggregate.EventID("account", "c", 2)    // fails until fixed
	permanent := aggregate.EventID("account", "d", 3) // fails permanently until fixed

	var fixed atomic.Bool
	var mu sync.Mutex
	calls := map[string]int{}
	firstCalls := map[string]int{} // calls before the fix
	var handledOrder []string      // "<entity>/<version>" of successes
	var redriven []sideeffects.Event
	origin := map[string]sideeffects.Event{}
	handler := func(ctx context.Context, ev sideeffects.Event) error {
		mu.Lock()
		defer mu.Unlock()
		calls[ev.EventID]++
		if !fixed.Load() {
			firstCalls[ev.EventID]++
			origin[ev.EventID] = ev
			switch ev.EventID {
			case poison:
				return errors.New("smtp: 550 mailbox unavailable")
			case permanent:
				return sideeffects.Permanent(errors.New("template missing"))
			}
		}
		if ev.Redriven() {
			redriven = append(redriven, ev)
		}
		handledOrder = append(handledOrder, ev.EntityID+"/"+strconv.FormatInt(ev.Version, 10))
		return nil
	}
	reg := prometheus.NewRegistry()
	c, err := sideeffects.New("mailer", []string{topic}, handler, sideeffects.Retries(3, time.Millisecond, 5*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	startConsumer(t, c, brokers, reg)

	total := len(accounts) * versions
	waitFor(t, 30*time.Second, "all but two events handled and two dead-lettered", func() bool {
		s := c.Status()
		return s.Handled == uint64(total-2) && s.DeadLettered == 2
	})
	waitFor(t, 15*time.Second, "offsets committed past the dead letters", func() bool {
		return groupCaughtUp(t, brokers, sideeffects.GroupID(testApp, "mailer"), topic)
	})
	mu.Lock()
	if firstCalls[poison] != 3 || firstCalls[permanent] != 1 {
		t.Errorf("handler calls: poison %d (want 3), permanent %d (want 1)", firstCalls[poison], firstCalls[permanent])
	}
	later := strings.Join(handledOrder, " ")
	for _, want := range []string{"c/3", "c/4", "c/5", "d/4", "d/5", "a/5", "e/5"} {
		if !strings.Contains(later, want) {
			t.Errorf("%s not handled after the poison events: %s", want, later)
		}
	}
	mu.Unlock()

	// The dead letters on the wire: original key, value and headers, plus
	// the dead-letter headers.
	dlq := readAll(t, brokers, sideeffects.DeadLetterTopic(testApp, "mailer"))
	if len(dlq) != 2 {
		t.Fatalf("%d dead letters, want 2", len(dlq))
	}
	for _, rec := range dlq {
		id, _ := header(rec, aggregate.HeaderEventID)
		mu.Lock()
		orig, ok := origin[id]
		mu.Unlock()
		if !ok {
			t.Errorf("dead letter of unknown event %q", id)
			continue
		}
		wantAttempts, wantErr := "3", "smtp: 550 mailbox unavailable"
		if id == permanent {
			wantAttempts, wantErr = "1", "template missing"
		}
		want := map[string]string{
			sideeffects.HeaderDLQError:           wantErr,
			sideeffects.HeaderDLQAttempts:        wantAttempts,
			sideeffects.HeaderDLQSourceTopic:     topic,
			sideeffects.HeaderDLQSourcePartition: strconv.Itoa(int(orig.Partition)),
			sideeffects.HeaderDLQSourceOffset:    strconv.FormatInt(orig.Offset, 10),
			aggregate.HeaderEntityID:             orig.EntityID,
			aggregate.HeaderVersion:              strconv.FormatInt(orig.Version, 10),
			aggregate.HeaderEventType:            "Deposited",
		}
		for k, v := range want {
			if got, ok := header(rec, k); !ok || got != v {
				t.Errorf("dead letter %s: header %s = %q (present %v), want %q", id, k, got, ok, v)
			}
		}
		when, _ := header(rec, sideeffects.HeaderDLQTime)
		if ts, err := time.Parse(time.RFC3339Nano, when); err != nil || time.Since(ts) > time.Minute || time.Since(ts) < 0 {
			t.Errorf("dead letter %s: %s = %q (%v)", id, sideeffects.HeaderDLQTime, when, err)
		}
		if string(rec.Key) != orig.EntityID || string(rec.Value) != string(orig.Data) {
			t.Errorf("dead letter %s: key %q value %q, want the original %q %q", id, rec.Key, rec.Value, orig.EntityID, orig.Data)
		}
	}

	ctx := context.Background()
	list, err := sideeffects.List(ctx, clientOpts(brokers), testApp, "mailer", 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 {
		t.Fatalf("List = %d dead letters, want 2", len(list))
	}
	for _, dl := range list {
		if dl.Replayed || dl.Event.Topic != topic || dl.Event.Type != "Deposited" || dl.Time.IsZero() ||
			(dl.Event.EventID == poison) == (dl.Attempts == 1) || dl.Error == "" {
			t.Errorf("List entry %+v", dl)
		}
	}
	if one, err := sideeffects.List(ctx, clientOpts(brokers), testApp, "mailer", 1); err != nil || len(one) != 1 || one[0].Offset != 1 {
		t.Errorf("List with limit 1 = %+v, %v; want the newest", one, err)
	}

	// Fix the handler and re-drive.
	fixed.Store(true)
	var progress []int
	n, err := sideeffects.Replay(ctx, clientOpts(brokers), testApp, "mailer", func(n int) { progress = append(progress, n) })
	if err != nil || n != 2 || len(progress) == 0 || progress[len(progress)-1] != 2 {
		t.Fatalf("Replay = %d, %v (progress %v); want 2", n, err, progress)
	}
	waitFor(t, 20*time.Second, "re-driven events handled", func() bool { return c.Status().Handled == uint64(total) })
	mu.Lock()
	if len(redriven) != 2 {
		t.Errorf("%d re-driven deliveries, want 2", len(redriven))
	}
	for _, ev := range redriven {
		orig := origin[ev.EventID]
		if ev.Topic != topic || ev.Partition != orig.Partition || ev.Offset != orig.Offset || ev.Version != orig.Version {
			t.Errorf("re-driven event %s at %s/%d@%d, want the original %s/%d@%d", ev.EventID, ev.Topic, ev.Partition, ev.Offset,
				orig.Topic, orig.Partition, orig.Offset)
		}
	}
	mu.Unlock()

	list, err = sideeffects.List(ctx, clientOpts(brokers), testApp, "mailer", 0)
	if err != nil || len(list) != 2 || !list[0].Replayed || !list[1].Replayed {
		t.Errorf("List after Replay = %+v, %v; want both replayed", list, err)
	}
	if n, err := sideeffects.Replay(ctx, clientOpts(brokers), testApp, "mailer", nil); err != nil || n != 0 {
		t.Errorf("second Replay = %d, %v; want 0", n, err)
	}
	waitFor(t, 15*time.Second, "re-drive offsets committed", func() bool {
		return groupCaughtUp(t, brokers, sideeffects.GroupID(testApp, "mailer"), topic, sideeffects.RedriveTopic(testApp, "mailer"))
	})
	mu.Lock()
	if calls[poison] != 4 || calls[permanent] != 2 {
		t.Errorf("handler calls in all: poison %d (want 4), permanent %d (want 2)", calls[poison], calls[permanent])
	}
	mu.Unlock()
	labels := map[string]string{"consumer": "mailer", "outcome": "dead_lettered"}
	if got := metricValue(t, reg, "esker_sideeffect_events_total", labels); got != 2 {
		t.Errorf("events_total{dead_lettered} = %v, want 2", got)
	}
	labels["outcome"] = "handled"
	if got := metricValue(t, reg, "esker_sideeffect_events_total", labels); got != float64(total) {
		t.Errorf("events_total{handled} = %v, want %d", got, total)
	}

	if _, err := sideeffects.List(ctx, clientOpts(brokers), testApp, "nobody", 0); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("List of an unknown consumer = %v", err)
	}
	if _, err := sideeffects.Replay(ctx, clientOpts(brokers), testApp, "nobody", nil); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("Replay of an unknown consumer = %v", err)
	}
}
