package sideeffects_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/esker-io/esker/sideeffects"
)

// TestParallelAcrossKeysSerialWithinKey: with 8 workers and a slow handler,
// events of different accounts of one partition are handled at the same
// time, while one account's events never overlap and keep their order;
// offsets, finished out of order, still end committed to the end.
func TestParallelAcrossKeysSerialWithinKey(t *testing.T) {
	const topic = "account-events"
	brokers := newCluster(t, 1, topic) // one partition: all parallelism is within it
	accounts := entities(8)
	const versions = 4
	produceEvents(t, brokers, topic, accounts, 1, versions)

	var mu sync.Mutex
	active := map[string]int{}
	var running, maxRunning int
	var overlaps []string
	order := map[string][]int64{}
	handler := func(ctx context.Context, ev sideeffects.Event) error {
		mu.Lock()
		active[ev.EntityID]++
		if active[ev.EntityID] > 1 {
			overlaps = append(overlaps, fmt.Sprintf("%s v%d", ev.EntityID, ev.Version))
		}
		running++
		maxRunning = max(maxRunning, running)
		mu.Unlock()

		time.Sleep(40 * time.Millisecond)

		mu.Lock()
		active[ev.EntityID]--
		running--
		order[ev.EntityID] = append(order[ev.EntityID], ev.Version)
		mu.Unlock()
		return nil
	}
	c, err := sideeffects.New("indexer", []string{topic}, handler, sideeffects.Workers(8))
	if err != nil {
		t.Fatal(err)
	}
	startConsumer(t, c, brokers, nil)
	total := len(accounts) * versions
	waitFor(t, 30*time.Second, "every event handled", func() bool { return c.Status().Handled == uint64(total) })
	waitFor(t, 15*time.Second, "offsets committed to the end", func() bool {
		return groupCaughtUp(t, brokers, sideeffects.GroupID(testApp, "indexer"), topic)
	})

	mu.Lock()
	defer mu.Unlock()
	if len(overlaps) > 0 {
		t.Errorf("events of one account overlapped: %v", overlaps)
	}
	// 8 accounts hash onto 8 workers; even with collisions at least two
	// workers have work, so handlers overlap (a serial consumer would show
	// 1). The bound is loose on purpose: the machine may be busy.
	if maxRunning < 2 {
		t.Errorf("at most %d handlers ran at once; want parallelism across accounts", maxRunning)
	}
	t.Logf("at most %d handlers ran at once", maxRunning)
	for _, a := range accounts {
		if !slices.Equal(order[a], []int64{1, 2, 3, 4}) {
			t.Errorf("%s handled in order %v", a, order[a])
		}
	}
}

// TestRebalanceDuplicatesNothing: a second member joins while the first is
// busy. The first commits only when partitions are revoked (its periodic
// commit is an hour away), so it has handled, uncommitted events on every
// partition when the rebalance starts. It gives partitions up only after
// the events it polled from them finished and their offsets are committed:
// at-least-once, no event is handled twice and none is lost.
func TestRebalanceDuplicatesNothing(t *testing.T) {
	const topic = "account-events"
	brokers := newCluster(t, 6, topic)
	accounts := entities(30)
	const versions = 30
	produceEvents(t, brokers, topic, accounts, 1, 3)

	var mu sync.Mutex
	handled := map[string]int{}
	byMember := map[string]int{}
	handler := func(member string) sideeffects.Handler {
		return func(ctx context.Context, ev sideeffects.Event) error {
			time.Sleep(2 * time.Millisecond)
			mu.Lock()
			defer mu.Unlock()
			handled[ev.EventID]++
			byMember[member]++
			return nil
		}
	}
	first, err := sideeffects.New("notifier", []string{topic}, handler("first"), sideeffects.Workers(4),
		sideeffects.CommitInterval(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	firstRun := startConsumer(t, first, brokers, nil)
	waitFor(t, 20*time.Second, "the first member to handle the first versions", func() bool {
		return first.Status().Handled == uint64(3*len(accounts))
	})
	produceEvents(t, brokers, topic, accounts, 4, 20)
	second, err := sideeffects.New("notifier", []string{topic}, handler("second"), sideeffects.Workers(4))
	if err != nil {
		t.Fatal(err)
	}
	secondRun := startConsumer(t, second, brokers, nil)
	// Events after the rebalance, for both members.
	produceEvents(t, brokers, topic, accounts, 21, versions)
	total := len(accounts) * versions
	waitFor(t, 60*time.Second, "every event handled", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(handled) == total
	})
	for _, r := range []*running{firstRun, secondRun} { // the first commits its last offsets when it stops
		if err := r.stop(); err != nil {
			t.Fatal(err)
		}
	}
	if !groupCaughtUp(t, brokers, sideeffects.GroupID(testApp, "notifier"), topic) {
		t.Error("offsets not committed to the end after both members stopped")
	}

	mu.Lock()
	defer mu.Unlock()
	dups := 0
	for id, n := range handled {
		if n > 1 {
			dups++
			t.Errorf("event %s handled %d times", id, n)
		}
	}
	if byMember["second"] == 0 {
		t.Errorf("the second member handled nothing: no rebalance happened (%v)", byMember)
	}
	t.Logf("handled per member %v; %d duplicates", byMember, dups)
}
