package esker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkWatchFanout measures how fast committed versions reach watchers:
// 100 SSE clients watch accounts on one node (in-process, kfake) while b.N
// deposits flow through the HTTP API from 8 senders. Sub-benchmarks: 100
// accounts with one watcher each, and 10 hot accounts with 10 watchers each.
// It reports the delivery lag of every (watcher, version):
//
//	ack-p50-ms, ack-p99-ms    receipt by the watcher minus the moment the
//	                          sender got the command's 200 (negative: the
//	                          event arrived first)
//	event-p50-ms, event-p99-ms  receipt minus the event's time (set when the
//	                          command was decided, before the commit)
//
//	go test -run '^$' -bench WatchFanout -benchtime 2000x -count 5 .
func BenchmarkWatchFanout(b *testing.B) {
	for _, accounts := range []int{100, 10} {
		b.Run(fmt.Sprintf("accounts=%d/watchers=100", accounts), func(b *testing.B) {
			benchWatchFanout(b, accounts, 100)
		})
	}
}

func benchWatchFanout(b *testing.B, accounts, watchers int) {
	c := newCluster(b)
	node := startNode(b, c.ListenAddrs(), b.TempDir())
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}, Timeout: 30 * time.Second}
	base := func() string { return node.srv.URL }
	sender := commandSender{base: base, client: client}
	ids := make([]string, accounts)
	for i := range ids {
		ids[i] = fmt.Sprintf("fan-%d", i)
		sender.send(b, ids[i], ids[i]+"-open", cmd("Open", map[string]any{"owner": "f"}))
	}

	// The deposits: account i gets every accounts-th command.
	perAccount := make([]int64, accounts)
	for i := range b.N {
		perAccount[i%accounts]++
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	// Each watcher records when it got each version of its account.
	type receipt struct {
		version   int64
		at        time.Time
		eventTime time.Time
	}
	received := make([][]receipt, watchers)
	var live sync.WaitGroup
	var done sync.WaitGroup
	for w := range watchers {
		acct := w % accounts
		want := perAccount[acct] + 1
		received[w] = make([]receipt, 0, want)
		live.Add(1)
		src := &eventSource{base: base, path: "/v1/aggregates/account/" + ids[acct] + "/watch"}
		expect := want > 1 // b.N < accounts leaves some accounts without deposits
		if expect {
			done.Add(1)
		}
		go func() {
			if expect {
				defer done.Done()
			}
			_ = src.run(ctx, func(blk sseBlock) bool {
				at := time.Now()
				var ev struct{ Time time.Time }
				_ = json.Unmarshal([]byte(blk.data), &ev)
				v, _ := strconv.ParseInt(blk.id, 10, 64)
				received[w] = append(received[w], receipt{version: v, at: at, eventTime: ev.Time})
				return v < want
			})
		}()
		// Live once its position arrived (the account is at version 1).
		go func() {
			defer live.Done()
			for ctx.Err() == nil {
				src.mu.Lock()
				ok := src.hasLastID
				src.mu.Unlock()
				if ok {
					return
				}
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	live.Wait()

	var acksMu sync.Mutex
	acks := make(map[string]time.Time, b.N) // "account/version" → ack time
	b.ResetTimer()
	var next atomic.Int64
	var senders sync.WaitGroup
	for range 8 {
		senders.Add(1)
		go func() {
			defer senders.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(b.N) {
					return
				}
				id := ids[i%int64(accounts)]
				out := sender.send(b, id, fmt.Sprintf("%s-d%d", id, i), cmd("Deposit", map[string]any{"amount": 1}))
				at := time.Now()
				if out == nil {
					return
				}
				v, _ := out["version"].(float64)
				acksMu.Lock()
				acks[id+"/"+strconv.FormatInt(int64(v), 10)] = at
				acksMu.Unlock()
			}
		}()
	}
	senders.Wait()
	waited := make(chan struct{})
	go func() { done.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-ctx.Done():
		b.Fatal("the watchers did not get every version")
	}
	b.StopTimer()

	var fromAck, fromEvent []time.Duration
	for w, rs := range received {
		id := ids[w%accounts]
		if int64(len(rs)) != perAccount[w%accounts] {
			b.Fatalf("watcher %d got %d versions of %s, want %d", w, len(rs), id, perAccount[w%accounts])
		}
		for _, r := range rs {
			fromEvent = append(fromEvent, r.at.Sub(r.eventTime))
			if ack, ok := acks[id+"/"+strconv.FormatInt(r.version, 10)]; ok {
				fromAck = append(fromAck, r.at.Sub(ack))
			}
		}
	}
	pct := func(ds []time.Duration, p float64) float64 {
		slices.Sort(ds)
		return float64(ds[int(float64(len(ds)-1)*p)].Microseconds()) / 1000
	}
	b.ReportMetric(pct(fromAck, 0.50), "ack-p50-ms")
	b.ReportMetric(pct(fromAck, 0.99), "ack-p99-ms")
	b.ReportMetric(pct(fromEvent, 0.50), "event-p50-ms")
	b.ReportMetric(pct(fromEvent, 0.99), "event-p99-ms")
	b.ReportMetric(float64(len(fromEvent)), "deliveries")
}
