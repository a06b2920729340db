package esker_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/interactive"
)

// sseBlock is one block of an event stream: the lines up to a blank line.
type sseBlock struct {
	id       string
	hasID    bool
	event    string
	data     string
	retry    int
	comments []string
}

// readSSE calls fn with each complete block of an event stream until fn
// returns false or the stream ends; a block cut short by the end is dropped,
// as EventSource drops it.
func readSSE(body io.Reader, fn func(sseBlock) bool) error {
	rd := bufio.NewReader(body)
	var b sseBlock
	var data []string
	for {
		line, err := rd.ReadString('\n')
		if err != nil {
			return err
		}
		line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
		if line == "" {
			b.data = strings.Join(data, "\n")
			if !fn(b) {
				return nil
			}
			b, data = sseBlock{}, nil
			continue
		}
		name, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch name {
		case "":
			b.comments = append(b.comments, value)
		case "id":
			b.id, b.hasID = value, true
		case "event":
			b.event = value
		case "data":
			data = append(data, value)
		case "retry":
			b.retry, _ = strconv.Atoi(value)
		}
	}
}

// endEvent is the data of a stream's final "end" event.
type endEvent struct {
	Reason      string
	Message     string
	LastEventID string
}

// eventSource follows an SSE route as a browser's EventSource does: it
// reconnects when the stream ends or fails, after the retry delay the
// server asked for, sending the id of the last event it got as
// Last-Event-ID. Unlike EventSource it also retries answers other than 200
// (503 while a partition moves), as a client of esker should.
type eventSource struct {
	// base returns the node to connect to.
	base func() string
	path string

	mu         sync.Mutex
	lastID     string
	hasLastID  bool
	connects   int
	servedBy   []string
	ends       []endEvent
	statuses   map[int]int
	connErrors int
}

// run follows the stream until onEvent returns false or ctx ends.
func (s *eventSource) run(ctx context.Context, onEvent func(sseBlock) bool) error {
	retry := 200 * time.Millisecond
	for {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		done, err := s.connect(ctx, onEvent, &retry)
		if done {
			return nil
		}
		if err != nil && err != io.EOF && ctx.Err() == nil {
			s.mu.Lock()
			s.connErrors++
			s.mu.Unlock()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(retry):
		}
	}
}

func (s *eventSource) connect(ctx context.Context, onEvent func(sseBlock) bool, retry *time.Duration) (done bool, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.base()+s.path, nil)
	if err != nil {
		return false, err
	}
	req.Header.Set("Accept", "text/event-stream")
	s.mu.Lock()
	if s.hasLastID {
		req.Header.Set("Last-Event-ID", s.lastID)
	}
	s.connects++
	s.mu.Unlock()
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return false, err
	}
	defer res.Body.Close()
	s.mu.Lock()
	if s.statuses == nil {
		s.statuses = map[int]int{}
	}
	s.statuses[res.StatusCode]++
	s.mu.Unlock()
	if res.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, res.Body)
		return false, fmt.Errorf("status %d", res.StatusCode)
	}
	s.mu.Lock()
	s.servedBy = append(s.servedBy, res.Header.Get(interactive.ServedByHeader))
	s.mu.Unlock()
	err = readSSE(res.Body, func(b sseBlock) bool {
		if b.retry > 0 {
			*retry = time.Duration(b.retry) * time.Millisecond
		}
		if b.hasID {
			s.mu.Lock()
			s.lastID, s.hasLastID = b.id, true
			s.mu.Unlock()
		}
		if b.event == "end" {
			var e endEvent
			_ = json.Unmarshal([]byte(b.data), &e)
			s.mu.Lock()
			s.ends = append(s.ends, e)
			s.mu.Unlock()
			return true
		}
		if b.data == "" {
			return true
		}
		if !onEvent(b) {
			done = true
			return false
		}
		return true
	})
	return done, err
}

// snapshot returns the nodes that served each connection and the end
// events received.
func (s *eventSource) snapshot() (servedBy []string, ends []endEvent) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.servedBy...), append([]endEvent(nil), s.ends...)
}

func (s *eventSource) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return fmt.Sprintf("%d connections (statuses %v, %d failed), served by %v, ends %+v, last id %q",
		s.connects, s.statuses, s.connErrors, s.servedBy, s.ends, s.lastID)
}

// watchedVersion is one event of a watch, decoded.
type watchedVersion struct {
	Version int64
	Type    string
	EventID string
	Time    time.Time
	Data    struct{ Amount int64 }
	State   struct {
		Balance int64
		Open    bool
	}
}

// versionLog collects a watch's versions and checks them as they come:
// every version once, in order, from version 1, with the balance the events
// so far add up to.
type versionLog struct {
	id string

	mu       sync.Mutex
	versions []watchedVersion
	balance  int64
	err      error
}

func (l *versionLog) add(b sseBlock) {
	var v watchedVersion
	err := json.Unmarshal([]byte(b.data), &v)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		return
	}
	want := int64(len(l.versions) + 1)
	switch {
	case err != nil:
		l.err = fmt.Errorf("event %q: %v", b.data, err)
	case v.Version != want || b.id != strconv.FormatInt(want, 10):
		l.err = fmt.Errorf("got version %d (id %q) after %d: a gap or a repeat", v.Version, b.id, want-1)
	case b.event != v.Type:
		l.err = fmt.Errorf("version %d: SSE event %q, type %q", v.Version, b.event, v.Type)
	case v.EventID != aggregate.EventID("account", l.id, v.Version):
		l.err = fmt.Errorf("version %d: event id %s", v.Version, v.EventID)
	case v.Version == 1 && (v.Type != "Opened" || !v.State.Open):
		l.err = fmt.Errorf("version 1 is %s (state %+v), want Opened", v.Type, v.State)
	case v.Version > 1 && v.Type != "Deposited":
		l.err = fmt.Errorf("version %d is %s, want Deposited", v.Version, v.Type)
	}
	if l.err != nil {
		return
	}
	l.balance += v.Data.Amount
	if v.State.Balance != l.balance {
		l.err = fmt.Errorf("version %d: state balance %d, the events add up to %d", v.Version, v.State.Balance, l.balance)
		return
	}
	l.versions = append(l.versions, v)
}

// check fails unless the log holds versions 1..want with the balance
// wantBalance, and no error.
func (l *versionLog) check(t *testing.T, what string, want int64, wantBalance int64) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		t.Fatalf("%s: %v", what, l.err)
	}
	if int64(len(l.versions)) != want || l.balance != wantBalance {
		t.Fatalf("%s: saw %d versions with balance %d, want %d with balance %d", what, len(l.versions), l.balance, want, wantBalance)
	}
}

func (l *versionLog) count() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return int64(len(l.versions))
}

func (l *versionLog) failed() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

// follow runs an event source into a version log until it holds want
// versions (or fails); it returns a channel closed when it stops.
func follow(ctx context.Context, src *eventSource, log *versionLog, want int64) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = src.run(ctx, func(b sseBlock) bool {
			log.add(b)
			return log.failed() == nil && log.count() < want
		})
	}()
	return done
}

// commandSender sends commands until acknowledged: it retries the same
// command id on network errors, 503 and 504, as a client of esker should.
type commandSender struct {
	base   func() string
	client *http.Client
}

func (c commandSender) send(t testing.TB, id, cmdID string, body map[string]any) map[string]any {
	body["commandId"] = cmdID
	raw, _ := json.Marshal(body)
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := c.client.Post(c.base()+"/v1/aggregates/account/"+id+"/commands", "application/json", strings.NewReader(string(raw)))
		if err == nil {
			var out map[string]any
			_ = json.NewDecoder(resp.Body).Decode(&out)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return out
			}
			if resp.StatusCode != 503 && resp.StatusCode != 504 {
				t.Errorf("command %s: %d %v", cmdID, resp.StatusCode, out)
				return nil
			}
		}
		if time.Now().After(deadline) {
			t.Errorf("command %s never acknowledged: %v", cmdID, err)
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// deposits sends n deposits of 1, 2, … n cents to account id from workers
// goroutines, and returns when all are acknowledged.
func (c commandSender) deposits(t testing.TB, id string, n, workers int, sent *atomic.Int64) {
	var wg sync.WaitGroup
	next := atomic.Int64{}
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1)
				if i > int64(n) {
					return
				}
				if c.send(t, id, fmt.Sprintf("%s-dep-%d", id, i), cmd("Deposit", map[string]any{"amount": i})) == nil {
					return
				}
				if sent != nil {
					sent.Add(1)
				}
			}
		}()
	}
	wg.Wait()
}

func sum1toN(n int64) int64 { return n * (n + 1) / 2 }

// TestWatchTwoWatchersEveryVersionOnce: two watchers of one account from
// version 1 — one from before the deposits start, one joining midway, so it
// catches up from the store and then goes live — while 1000 deposits are
// sent: each sees every version exactly once, in order, with the balance
// after it.
func TestWatchTwoWatchersEveryVersionOnce(t *testing.T) {
	c := newCluster(t)
	node := startNode(t, c.ListenAddrs(), t.TempDir())
	const deposits = 1000
	id := "watched"
	base := func() string { return node.srv.URL }
	sender := commandSender{base: base, client: httpClient}
	sender.send(t, id, id+"-open", cmd("Open", map[string]any{"owner": "w"}))

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	path := "/v1/aggregates/account/" + id + "/watch?fromVersion=1"
	early, late := &versionLog{id: id}, &versionLog{id: id}
	earlySrc, lateSrc := &eventSource{base: base, path: path}, &eventSource{base: base, path: path}
	earlyDone := follow(ctx, earlySrc, early, deposits+1)

	var sent atomic.Int64
	lateStarted := make(chan (<-chan struct{}), 1)
	go func() {
		for sent.Load() < deposits/3 && ctx.Err() == nil {
			time.Sleep(5 * time.Millisecond)
		}
		lateStarted <- follow(ctx, lateSrc, late, deposits+1)
	}()
	waitGauge := func(want float64) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for gaugeWith(t, node.Node, "esker_watch_streams", "route", "watch") != want {
			if time.Now().After(deadline) {
				t.Fatalf("esker_watch_streams{route=watch} = %v, want %v", gaugeWith(t, node.Node, "esker_watch_streams", "route", "watch"), want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	// The gauge, sampled while the deposits flow: both watches are open
	// once the late one has started.
	var maxOpen atomic.Int64
	sampleCtx, stopSampling := context.WithCancel(ctx)
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for sampleCtx.Err() == nil {
			maxOpen.Store(max(maxOpen.Load(), int64(gaugeWith(t, node.Node, "esker_watch_streams", "route", "watch"))))
			time.Sleep(5 * time.Millisecond)
		}
	}()
	sender.deposits(t, id, deposits, 8, &sent)
	stopSampling()
	<-sampled
	if got := maxOpen.Load(); got != 2 {
		t.Errorf("esker_watch_streams{route=watch} was at most %d while two watches were open", got)
	}
	if t.Failed() {
		t.FailNow()
	}
	lateDone := <-lateStarted
	t.Logf("the late watcher had %d versions when the deposits ended", late.count())
	for name, w := range map[string]struct {
		done <-chan struct{}
		log  *versionLog
		src  *eventSource
	}{"early watcher": {earlyDone, early, earlySrc}, "late watcher": {lateDone, late, lateSrc}} {
		select {
		case <-w.done:
		case <-ctx.Done():
			t.Fatalf("%s: timed out with %d versions; %v", name, w.log.count(), w.src)
		}
		w.log.check(t, name, deposits+1, sum1toN(deposits))
		if w.src.connects != 1 {
			t.Errorf("%s reconnected: %v", name, w.src)
		}
	}
	waitGauge(0)
	if got := counterWith(t, node, "esker_watch_disconnects_total", "reason", "client"); got != 2 {
		t.Fatalf("esker_watch_disconnects_total{reason=client} = %v, want 2", got)
	}
}

// gaugeWith returns a gauge family's sample whose label has the value.
func gaugeWith(t testing.TB, n *esker.Node, name, label, value string) float64 {
	t.Helper()
	v, ok := metricValue(t, n, name, label, value)
	if !ok {
		t.Errorf("no %s{%s=%q}", name, label, value)
	}
	return v
}

// TestWatchReconnectResumes: a watcher that disconnects midway and
// reconnects with Last-Event-ID gets the rest with no gap and no repeat,
// also when it started with only versions to come (its first id then is
// its position, so it resumes there).
func TestWatchReconnectResumes(t *testing.T) {
	c := newCluster(t)
	node := startNode(t, c.ListenAddrs(), t.TempDir())
	id := "resumed"
	base := func() string { return node.srv.URL }
	sender := commandSender{base: base, client: httpClient}
	sender.send(t, id, id+"-open", cmd("Open", map[string]any{"owner": "r"}))

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// A live-only watch opened at version 1: its position block says 1.
	liveSrc := &eventSource{base: base, path: "/v1/aggregates/account/" + id + "/watch"}
	liveCtx, liveHangUp := context.WithCancel(ctx)
	liveStopped := make(chan struct{})
	go func() {
		defer close(liveStopped)
		_ = liveSrc.run(liveCtx, func(sseBlock) bool { return false })
	}()
	waitFor(t, ctx, "the live watch to get its position", func() bool {
		liveSrc.mu.Lock()
		defer liveSrc.mu.Unlock()
		return liveSrc.hasLastID
	})
	liveHangUp()
	<-liveStopped
	if liveSrc.lastID != "1" {
		t.Fatalf("a live-only watch of an account at version 1 starts at id %q, want 1", liveSrc.lastID)
	}

	const deposits = 200
	log := &versionLog{id: id}
	src := &eventSource{base: base, path: "/v1/aggregates/account/" + id + "/watch?fromVersion=1"}
	var sent atomic.Int64
	sendDone := make(chan struct{})
	go func() { defer close(sendDone); sender.deposits(t, id, deposits, 4, &sent) }()

	// Read part of the stream, then hang up.
	firstCtx, hangUp := context.WithCancel(ctx)
	var cut int64
	_ = src.run(firstCtx, func(b sseBlock) bool {
		log.add(b)
		if log.count() >= 60 {
			cut = log.count()
			hangUp()
			return false
		}
		return true
	})
	hangUp()
	if cut == 0 || src.lastID != strconv.FormatInt(cut, 10) {
		t.Fatalf("hung up after %d versions with last id %q", cut, src.lastID)
	}
	// The live-only watch, resumed from its position, gets version 2 on.
	liveLog := &versionLog{id: id}
	liveLog.versions = []watchedVersion{{Version: 1}}
	liveDone := follow(ctx, liveSrc, liveLog, deposits+1)

	<-follow(ctx, src, log, deposits+1)
	<-sendDone
	log.check(t, "resumed watcher", deposits+1, sum1toN(deposits))
	if src.connects != 2 {
		t.Fatalf("want 2 connections: %v", src)
	}
	select {
	case <-liveDone:
	case <-ctx.Done():
	}
	liveLog.mu.Lock()
	err, n := liveLog.err, len(liveLog.versions)
	liveLog.mu.Unlock()
	if err != nil || n != deposits+1 {
		t.Fatalf("live-only watcher resumed at its position: %d versions, %v; %v", n, err, liveSrc)
	}
}

func waitFor(t *testing.T, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		if ctx.Err() != nil {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// accountOn returns an account id whose partition (of 4) owner picks.
func accountOn(prefix string, pick func(p int32) bool) string {
	for i := 0; ; i++ {
		id := fmt.Sprintf("%s-%d", prefix, i)
		if pick(aggregate.Partition(id, 4)) {
			return id
		}
	}
}

// TestWatchOwnerStopsMidStream: two in-process nodes; the watcher connects
// through the node that does not own the account (forwarded, streaming),
// and the owner stops gracefully midway while deposits continue through the
// other node. The stream ends with an "end" event and a retry delay, the
// watcher reconnects with Last-Event-ID to the new owner, and sees every
// version exactly once.
func TestWatchOwnerStopsMidStream(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	a := startNode(t, brokers, t.TempDir())
	b := startNode(t, brokers, t.TempDir())
	waitSettled(t, []*testNode{a, b})
	owned := ctLocalPartitions(t, a)
	if len(owned) == 0 {
		t.Fatal("node a owns no partition")
	}
	id := accountOn("stop", func(p int32) bool { return p == owned[0] })
	base := func() string { return b.srv.URL }
	sender := commandSender{base: base, client: httpClient}
	sender.send(t, id, id+"-open", cmd("Open", map[string]any{"owner": "s"}))

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const deposits = 300
	log := &versionLog{id: id}
	src := &eventSource{base: base, path: "/v1/aggregates/account/" + id + "/watch?fromVersion=1"}
	done := follow(ctx, src, log, deposits+1)
	var sent atomic.Int64
	sendDone := make(chan struct{})
	go func() { defer close(sendDone); sender.deposits(t, id, deposits, 4, &sent) }()
	for log.count() < deposits/3 {
		if ctx.Err() != nil {
			t.Fatalf("the watcher saw %d versions: %v", log.count(), src)
		}
		time.Sleep(5 * time.Millisecond)
	}
	a.stop()
	<-sendDone
	select {
	case <-done:
	case <-ctx.Done():
		t.Fatalf("timed out with %d versions: %v", log.count(), src)
	}
	log.check(t, "watcher", deposits+1, sum1toN(deposits))
	servedBy, ends := src.snapshot()
	if len(servedBy) < 2 || servedBy[0] != a.srv.URL || servedBy[len(servedBy)-1] != b.srv.URL {
		t.Fatalf("served by %v: want the owner a (%s) first, through b, and b last", servedBy, a.srv.URL)
	}
	if len(ends) == 0 || (ends[0].Reason != "moved" && ends[0].Reason != "stopped") || ends[0].LastEventID == "" {
		t.Fatalf("the first stream did not end with an end event (moved or stopped, with the last id): %v", src)
	}
	t.Logf("watcher: %v", src)
}

// TestWatchFailoverKilledOwner: two `esker node` processes; the watcher
// connects through the node that does not own the account (forwarded,
// streaming); the owner is killed with SIGKILL midway while deposits go on
// through the other node. The watcher reconnects with Last-Event-ID until
// the survivor serves the partition, and sees every version exactly once.
func TestWatchFailoverKilledOwner(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs esker node processes")
	}
	c := newCluster(t)
	brokers := c.ListenAddrs()
	nodes := []*process{
		startProcess(t, brokers, freePort(t), t.TempDir()),
		startProcess(t, brokers, freePort(t), t.TempDir()),
	}
	client := &http.Client{Timeout: 10 * time.Second}
	// Wait until each node owns some partitions.
	var owners map[int32]string
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		owners = waitOwners(t, client, nodes[1].url)
		owned := 0
		for _, u := range owners {
			if u == nodes[0].url {
				owned++
			}
		}
		if owned > 0 && owned < 4 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the nodes never shared the partitions: %v", owners)
		}
	}
	id := accountOn("kill", func(p int32) bool { return owners[p] == nodes[0].url })
	base := func() string { return nodes[1].url }
	sender := commandSender{base: base, client: client}
	sender.send(t, id, id+"-open", cmd("Open", map[string]any{"owner": "k"}))

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const deposits = 300
	log := &versionLog{id: id}
	src := &eventSource{base: base, path: "/v1/aggregates/account/" + id + "/watch?fromVersion=1"}
	done := follow(ctx, src, log, deposits+1)
	sendDone := make(chan struct{})
	go func() { defer close(sendDone); sender.deposits(t, id, deposits, 4, nil) }()
	for log.count() < deposits/3 {
		if ctx.Err() != nil {
			t.Fatalf("the watcher saw %d versions: %v", log.count(), src)
		}
		time.Sleep(5 * time.Millisecond)
	}
	nodes[0].kill()
	t.Logf("killed the owner after the watcher saw %d versions", log.count())
	<-sendDone
	select {
	case <-done:
	case <-ctx.Done():
		t.Fatalf("timed out with %d versions: %v\nsurvivor's log:\n%s", log.count(), src, nodes[1].log)
	}
	log.check(t, "watcher", deposits+1, sum1toN(deposits))
	servedBy, _ := src.snapshot()
	if len(servedBy) < 2 || servedBy[0] != nodes[0].url || servedBy[len(servedBy)-1] != nodes[1].url {
		t.Fatalf("served by %v: want the owner %s first (forwarded) and the survivor last", servedBy, nodes[0].url)
	}
	t.Logf("watcher: %v", src)
}

// streamedEvent is one event of /v1/streams/account, decoded.
type streamedEvent struct {
	ID        string
	Version   int64
	Type      string
	Partition int32
	Offset    int64
	Data      struct{ Amount int64 }
}

// streamLog collects a stream's events: each (account, version) once, the
// versions of each account in order.
type streamLog struct {
	mu     sync.Mutex
	ids    []string // the SSE id of each event
	events []streamedEvent
	next   map[string]int64 // account → next version expected
	err    error
}

func (l *streamLog) add(b sseBlock) {
	var e streamedEvent
	err := json.Unmarshal([]byte(b.data), &e)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		return
	}
	if l.next == nil {
		l.next = map[string]int64{}
	}
	want := max(l.next[e.ID], 1)
	switch {
	case err != nil:
		l.err = fmt.Errorf("event %q: %v", b.data, err)
	case e.Version != want:
		l.err = fmt.Errorf("%s: version %d after %d: a gap or a repeat", e.ID, e.Version, want-1)
	case b.event != e.Type:
		l.err = fmt.Errorf("%s %d: SSE event %q, type %q", e.ID, e.Version, b.event, e.Type)
	}
	if l.err != nil {
		return
	}
	pos, err := interactive.DecodePosition(b.id)
	if err != nil || len(pos) != 4 || pos[e.Partition] != e.Offset+1 {
		l.err = fmt.Errorf("%s %d at %d/%d: id %q (%v, %v) is not the position after it on all 4 partitions", e.ID, e.Version, e.Partition, e.Offset, b.id, pos, err)
		return
	}
	l.next[e.ID] = want + 1
	l.ids = append(l.ids, b.id)
	l.events = append(l.events, e)
}

func (l *streamLog) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.events)
}

// TestStreamAccountEvents: /v1/streams/account from the start sees every
// event of several accounts once (each account's versions in order), also
// those written while it streams; a reconnect with one of its ids as
// Last-Event-ID resumes right after that event; from=end sees only events
// to come.
func TestStreamAccountEvents(t *testing.T) {
	c := newCluster(t)
	node := startNode(t, c.ListenAddrs(), t.TempDir())
	base := func() string { return node.srv.URL }
	sender := commandSender{base: base, client: httpClient}
	const accounts, perAccount = 6, 20
	sendAll := func(prefix string) {
		var wg sync.WaitGroup
		for a := range accounts {
			wg.Add(1)
			go func() {
				defer wg.Done()
				id := fmt.Sprintf("%s-%d", prefix, a)
				sender.send(t, id, id+"-open", cmd("Open", map[string]any{"owner": id}))
				for i := range perAccount - 1 {
					sender.send(t, id, fmt.Sprintf("%s-%d", id, i), cmd("Deposit", map[string]any{"amount": i + 1}))
				}
			}()
		}
		wg.Wait()
	}
	sendAll("before") // written before the stream starts

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	total := 2 * accounts * perAccount
	all := &streamLog{}
	src := &eventSource{base: base, path: "/v1/streams/account"}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = src.run(ctx, func(b sseBlock) bool {
			all.add(b)
			return all.err == nil && all.count() < total
		})
	}()
	sendAll("during") // written while it streams
	select {
	case <-done:
	case <-ctx.Done():
		t.Fatalf("the stream got %d of %d events: %v", all.count(), total, src)
	}
	if all.err != nil || all.count() != total || src.connects != 1 {
		t.Fatalf("stream: %d of %d events, %v; %v", all.count(), total, all.err, src)
	}

	// Resume after the k-th event: exactly the events after it, in the
	// same order per partition.
	for _, k := range []int{0, 17, total / 2, total - 1} {
		resumed := &streamLog{}
		for _, e := range all.events[:k+1] {
			resumed.mu.Lock()
			if resumed.next == nil {
				resumed.next = map[string]int64{}
			}
			resumed.next[e.ID] = e.Version + 1
			resumed.mu.Unlock()
		}
		rsrc := &eventSource{base: base, path: "/v1/streams/account", lastID: all.ids[k], hasLastID: true}
		if k < total-1 {
			rctx, rcancel := context.WithTimeout(ctx, 30*time.Second)
			_ = rsrc.run(rctx, func(b sseBlock) bool {
				resumed.add(b)
				return resumed.err == nil && resumed.count() < total-k-1
			})
			rcancel()
		}
		idle := waitIdle(t, base()+"/v1/streams/account", rsrc.lastID)
		if resumed.err != nil || resumed.count() != total-k-1 || idle != 0 {
			t.Fatalf("resumed after event %d: %d events (want %d), %v, %d more after the end; %v", k, resumed.count(), total-k-1, resumed.err, idle, rsrc)
		}
	}

	// from=end: only what comes next.
	live := &streamLog{}
	lsrc := &eventSource{base: base, path: "/v1/streams/account?from=end"}
	ldone := make(chan struct{})
	go func() {
		defer close(ldone)
		_ = lsrc.run(ctx, func(b sseBlock) bool {
			live.add(b)
			return live.err == nil && live.count() < 2
		})
	}()
	waitFor(t, ctx, "the live stream to start", func() bool {
		lsrc.mu.Lock()
		defer lsrc.mu.Unlock()
		return lsrc.hasLastID
	})
	sender.send(t, "after-0", "after-open", cmd("Open", map[string]any{"owner": "x"}))
	sender.send(t, "after-0", "after-dep", cmd("Deposit", map[string]any{"amount": 5}))
	select {
	case <-ldone:
	case <-ctx.Done():
		t.Fatalf("the live stream got %d events: %v", live.count(), lsrc)
	}
	if live.err != nil || live.events[0].ID != "after-0" || live.events[1].Type != "Deposited" {
		t.Fatalf("from=end: %+v, %v", live.events, live.err)
	}
}

// waitIdle opens the stream at position lastID and counts the events that
// arrive within half a second: none, if lastID is the end.
func waitIdle(t *testing.T, url, lastID string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	req.Header.Set("Last-Event-ID", lastID)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	n := 0
	_ = readSSE(res.Body, func(b sseBlock) bool {
		if b.data != "" {
			n++
		}
		return true
	})
	return n
}

// TestWatchStreamBadInput: the node refuses bad watch and stream requests
// with JSON errors before streaming.
func TestWatchStreamBadInput(t *testing.T) {
	c := newCluster(t)
	node := startNode(t, c.ListenAddrs(), t.TempDir())
	for _, tc := range []struct {
		path, lastEventID string
		status            int
		errLike           string
	}{
		{"/v1/aggregates/nope/a1/watch", "", 404, "unknown aggregate type"},
		{"/v1/aggregates/account/" + strings.Repeat("x", aggregate.MaxEntityIDBytes+1) + "/watch", "", 400, "invalid account id"},
		{"/v1/aggregates/account/a1/watch?fromVersion=x", "", 400, "fromVersion"},
		{"/v1/aggregates/account/a1/watch", "not-a-version", 400, "Last-Event-ID"},
		{"/v1/streams/nope", "", 404, "unknown aggregate type"},
		{"/v1/streams/account?from=zzz", "", 400, "from="},
		{"/v1/streams/account", "not-a-token", 400, "Last-Event-ID"},
		{"/v1/streams/account", interactive.EncodePosition(map[int32]int64{9: 0}), 400, "partition 9"},
	} {
		req, _ := http.NewRequest(http.MethodGet, node.srv.URL+tc.path, nil)
		if tc.lastEventID != "" {
			req.Header.Set("Last-Event-ID", tc.lastEventID)
		}
		res, err := httpClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var body map[string]any
		ct := res.Header.Get("Content-Type")
		err = json.NewDecoder(res.Body).Decode(&body)
		res.Body.Close()
		msg, _ := body["error"].(string)
		if res.StatusCode != tc.status || ct != "application/json" || err != nil || !strings.Contains(msg, tc.errLike) {
			t.Errorf("%s (Last-Event-ID %q): %d %s %q, want %d with an error about %q", tc.path, tc.lastEventID, res.StatusCode, ct, msg, tc.status, tc.errLike)
		}
	}
}
