package interactive

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/esker-io/esker/aggregate"
)

// sseBackend adds Watcher, EventStreams and StreamSettings to fakeBackend.
type sseBackend struct {
	*fakeBackend
	settings SSESettings

	feed   func(id string, from int64) (EntityFeed, error)
	stream func(from map[int32]int64, fromEnd bool) (EventStream, error)

	mu         sync.Mutex
	watchFrom  []int64
	streamFrom []map[int32]int64
	streamEnd  []bool
}

func newSSEBackend() *sseBackend {
	return &sseBackend{fakeBackend: &fakeBackend{def: counterType()}}
}

func (b *sseBackend) StreamSettings() SSESettings { return b.settings }

func (b *sseBackend) WatchEntity(ctx context.Context, typ, id string, from int64) (EntityFeed, error) {
	b.mu.Lock()
	b.watchFrom = append(b.watchFrom, from)
	b.mu.Unlock()
	if b.feed == nil {
		return nil, errors.New("no feed in this test")
	}
	return b.feed(id, from)
}

func (b *sseBackend) StreamEvents(ctx context.Context, typ string, from map[int32]int64, fromEnd bool) (EventStream, error) {
	b.mu.Lock()
	b.streamFrom = append(b.streamFrom, from)
	b.streamEnd = append(b.streamEnd, fromEnd)
	b.mu.Unlock()
	if b.stream == nil {
		return nil, errors.New("no stream in this test")
	}
	return b.stream(from, fromEnd)
}

func (b *sseBackend) froms() []int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]int64(nil), b.watchFrom...)
}

// feedStep is what one call of a fakeFeed's Next returns.
type feedStep struct {
	versions []EntityVersion
	head     int64
	err      error
}

// fakeFeed answers Next with the steps sent on its channel, waiting for
// one until ctx ends.
type fakeFeed struct {
	from   int64
	steps  chan feedStep
	closed chan struct{}
	once   sync.Once
}

func newFakeFeed(from int64) *fakeFeed {
	return &fakeFeed{from: from, steps: make(chan feedStep, 16), closed: make(chan struct{})}
}

func (f *fakeFeed) From() int64 { return f.from }
func (f *fakeFeed) Close()      { f.once.Do(func() { close(f.closed) }) }
func (f *fakeFeed) Next(ctx context.Context, max int) ([]EntityVersion, int64, error) {
	select {
	case s := <-f.steps:
		if len(s.versions) > max {
			panic(fmt.Sprintf("the handler asked for %d versions, the step has %d", max, len(s.versions)))
		}
		return s.versions, s.head, s.err
	case <-ctx.Done():
		return nil, 0, nil
	}
}

// counterVersion is version v of counter c1, whose total is then total.
func counterVersion(v int64, n, total int) EntityVersion {
	return EntityVersion{Event: addedEvent(v, n), State: []byte(fmt.Sprintf(`{"total":%d}`, total))}
}

// sseBlock is one block of an event stream (the lines up to a blank line).
type sseBlock struct {
	id       string
	hasID    bool
	event    string
	data     string
	retry    string
	comments []string
}

// sseReader splits an event stream into blocks.
type sseReader struct{ r *bufio.Reader }

func newSSEReader(r io.Reader) *sseReader { return &sseReader{r: bufio.NewReader(r)} }

// next returns the next complete block; io.EOF (or another error) when the
// stream ends, dropping an incomplete block as clients do.
func (s *sseReader) next() (sseBlock, error) {
	var b sseBlock
	var data []string
	for {
		line, err := s.r.ReadString('\n')
		if err != nil {
			return sseBlock{}, err
		}
		line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
		if line == "" {
			b.data = strings.Join(data, "\n")
			return b, nil
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
			b.retry = value
		}
	}
}

// nextEvent skips blocks without data (comments, positions).
func (s *sseReader) nextEvent(t *testing.T) sseBlock {
	t.Helper()
	for {
		b, err := s.next()
		if err != nil {
			t.Fatalf("stream ended: %v", err)
		}
		if b.data != "" {
			return b
		}
	}
}

// openSSE sends a GET and returns the answer; the body is closed at the end
// of the test. The request gives up after 20s: no test streams that long.
func openSSE(t *testing.T, url string, header ...string) *http.Response {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { res.Body.Close() })
	return res
}

func newSSEServer(t *testing.T, b Backend, opts ...HandlerOption) (*httptest.Server, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	h := NewHandler(b, append([]HandlerOption{Logger(quietLogger()), Registerer(reg)}, opts...)...)
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv, reg
}

// metricWith returns the value of a gauge or counter family's sample with label=value.
func metricWith(t *testing.T, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					if g := m.GetGauge(); g != nil {
						return g.GetValue()
					}
					return m.GetCounter().GetValue()
				}
			}
		}
		t.Fatalf("%s has no sample with %s=%q", name, label, value)
	}
	t.Fatalf("%s is not registered", name)
	return 0
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestWatchEventFormat checks the event stream of a watch: the start block
// (retry delay, the client's position as id), one event per version with
// its state, heartbeats while idle, and the final block when the partition
// moves (retry delay, an "end" event with the reason and the last id), and
// the metrics.
func TestWatchEventFormat(t *testing.T) {
	be := newSSEBackend()
	be.settings = SSESettings{Heartbeat: 50 * time.Millisecond}
	feed := newFakeFeed(3)
	be.feed = func(string, int64) (EntityFeed, error) { return feed, nil }
	srv, reg := newSSEServer(t, be)

	res := openSSE(t, srv.URL+"/v1/aggregates/counter/c1/watch?fromVersion=3")
	if res.StatusCode != 200 {
		t.Fatalf("status %d", res.StatusCode)
	}
	for k, want := range map[string]string{"Content-Type": "text/event-stream", "Cache-Control": "no-cache"} {
		if got := res.Header.Get(k); got != want {
			t.Errorf("%s %q, want %q", k, got, want)
		}
	}
	rd := newSSEReader(res.Body)
	start, err := rd.next()
	if err != nil {
		t.Fatal(err)
	}
	if !start.hasID || start.id != "2" || start.retry != "1000" || start.data != "" {
		t.Fatalf("start block %+v: want id 2 (the version before the first), retry 1000, no data", start)
	}
	if got := be.froms(); len(got) != 1 || got[0] != 3 {
		t.Fatalf("WatchEntity got from %v, want [3]", got)
	}
	if g := metricWith(t, reg, "esker_watch_streams", "route", "watch"); g != 1 {
		t.Fatalf("esker_watch_streams{route=watch} = %v while a watch is open, want 1", g)
	}

	feed.steps <- feedStep{versions: []EntityVersion{counterVersion(3, 2, 7), counterVersion(4, 5, 12)}, head: 4}
	for i, want := range []struct {
		v     int64
		n     int
		total int
	}{{3, 2, 7}, {4, 5, 12}} {
		ev := rd.nextEvent(t)
		if ev.id != strconv.FormatInt(want.v, 10) || ev.event != "Added" {
			t.Fatalf("event %d: id %q type %q, want %d Added", i, ev.id, ev.event, want.v)
		}
		var got struct {
			Version int64
			Type    string
			EventID string
			Time    time.Time
			Data    struct{ N int }
			State   struct{ Total int }
		}
		if err := json.Unmarshal([]byte(ev.data), &got); err != nil {
			t.Fatalf("data %q: %v", ev.data, err)
		}
		if got.Version != want.v || got.Type != "Added" || got.Data.N != want.n || got.State.Total != want.total ||
			got.EventID != aggregate.EventID("counter", "c1", want.v) || !got.Time.Equal(evTime) {
			t.Fatalf("event %d: %+v, want version %d n %d total %d", i, got, want.v, want.n, want.total)
		}
	}

	// Idle: heartbeats.
	ping, err := rd.next()
	if err != nil {
		t.Fatal(err)
	}
	if len(ping.comments) != 1 || ping.comments[0] != "ping" || ping.data != "" || ping.hasID {
		t.Fatalf("idle block %+v, want the comment ping", ping)
	}

	feed.steps <- feedStep{head: 4, err: &StreamEndedError{Reason: EndMoved, Message: "partition 1 was revoked"}}
	var end sseBlock
	for end.event != "end" {
		if end, err = rd.next(); err != nil {
			t.Fatalf("no end event: %v", err)
		}
	}
	var body endEvent
	if err := json.Unmarshal([]byte(end.data), &body); err != nil {
		t.Fatal(err)
	}
	if end.retry != "1000" || end.hasID || body.Reason != EndMoved || body.LastEventID != "4" || !strings.Contains(body.Message, "revoked") {
		t.Fatalf("end block %+v %+v: want retry 1000, no id, reason moved, last id 4", end, body)
	}
	if _, err := rd.next(); err != io.EOF {
		t.Fatalf("after the end event: %v, want EOF", err)
	}
	select {
	case <-feed.closed:
	case <-time.After(5 * time.Second):
		t.Fatal("the feed was not closed")
	}
	waitFor(t, "the stream gauge to drop", func() bool { return metricWith(t, reg, "esker_watch_streams", "route", "watch") == 0 })
	if got := metricWith(t, reg, "esker_watch_disconnects_total", "reason", EndMoved); got != 1 {
		t.Fatalf("esker_watch_disconnects_total{reason=moved} = %v, want 1", got)
	}
}

// TestWatchBadInput: bad input is refused with JSON errors before any
// stream starts, and nothing is asked of the backend.
func TestWatchBadInput(t *testing.T) {
	be := newSSEBackend()
	srv, _ := newSSEServer(t, be)
	for _, tc := range []struct {
		name, path, lastEventID string
		status                  int
		errLike                 string
	}{
		{"unknown type", "/v1/aggregates/nope/c1/watch", "", 404, "unknown aggregate type"},
		{"invalid id", "/v1/aggregates/counter/" + strings.Repeat("x", aggregate.MaxEntityIDBytes+1) + "/watch", "", 400, "invalid counter id"},
		{"fromVersion not a number", "/v1/aggregates/counter/c1/watch?fromVersion=abc", "", 400, "fromVersion"},
		{"fromVersion 0", "/v1/aggregates/counter/c1/watch?fromVersion=0", "", 400, "fromVersion"},
		{"Last-Event-ID garbage", "/v1/aggregates/counter/c1/watch", "garbage", 400, "Last-Event-ID"},
		{"Last-Event-ID negative", "/v1/aggregates/counter/c1/watch", "-1", 400, "Last-Event-ID"},
		{"stream of unknown type", "/v1/streams/nope", "", 404, "unknown aggregate type"},
		{"stream from garbage", "/v1/streams/counter?from=%25%25", "", 400, "position token"},
		{"stream Last-Event-ID garbage", "/v1/streams/counter", "garbage!", 400, "Last-Event-ID"},
		{"stream Last-Event-ID negative offset", "/v1/streams/counter", EncodePosition(map[int32]int64{0: -1}), 400, "Last-Event-ID"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h []string
			if tc.lastEventID != "" {
				h = []string{"Last-Event-ID", tc.lastEventID}
			}
			a := do(t, http.MethodGet, srv.URL+tc.path, "", h...)
			a.want(t, tc.status)
			if ct := a.header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q, want application/json", ct)
			}
			a.errorLike(t, tc.errLike)
		})
	}
	if got := be.froms(); len(got) != 0 {
		t.Fatalf("the backend was asked to watch from %v", got)
	}
	if len(be.streamFrom) != 0 {
		t.Fatalf("the backend was asked to stream from %v", be.streamFrom)
	}
}

// TestWatchLastEventIDResumes: Last-Event-ID n resumes at version n+1 and
// overrides fromVersion; without either the watch starts at the head (from
// 0 for the backend).
func TestWatchLastEventIDResumes(t *testing.T) {
	be := newSSEBackend()
	be.feed = func(_ string, from int64) (EntityFeed, error) {
		f := newFakeFeed(max(from, 10))
		f.steps <- feedStep{err: &StreamEndedError{Reason: EndStopped, Message: "test"}}
		return f, nil
	}
	srv, _ := newSSEServer(t, be)
	for _, c := range []struct {
		query, lastEventID string
	}{{"", ""}, {"?fromVersion=5", ""}, {"?fromVersion=5", "7"}, {"", "0"}} {
		var h []string
		if c.lastEventID != "" {
			h = []string{"Last-Event-ID", c.lastEventID}
		}
		res := openSSE(t, srv.URL+"/v1/aggregates/counter/c1/watch"+c.query, h...)
		if _, err := io.ReadAll(res.Body); err != nil {
			t.Fatal(err)
		}
	}
	if got, want := fmt.Sprint(be.froms()), "[0 5 8 1]"; got != want {
		t.Fatalf("WatchEntity got from %s, want %s", got, want)
	}
}

// TestWatchSlowClientDisconnected: a watch that has caught up and then
// falls more than Buffer versions behind the entity ends as slow, with the
// last id it sent.
func TestWatchSlowClientDisconnected(t *testing.T) {
	be := newSSEBackend()
	be.settings = SSESettings{Buffer: 4}
	feed := newFakeFeed(1)
	be.feed = func(string, int64) (EntityFeed, error) { return feed, nil }
	// Catching up: far behind, but paced: not slow.
	feed.steps <- feedStep{versions: []EntityVersion{counterVersion(1, 1, 1)}, head: 100}
	feed.steps <- feedStep{versions: []EntityVersion{counterVersion(2, 1, 2)}, head: 2}     // caught up: live
	feed.steps <- feedStep{versions: []EntityVersion{counterVersion(3, 1, 3)}, head: 3 + 4} // 4 behind: still fine
	feed.steps <- feedStep{versions: []EntityVersion{counterVersion(4, 1, 4)}, head: 4 + 5} // 5 behind: slow
	srv, reg := newSSEServer(t, be)
	res := openSSE(t, srv.URL+"/v1/aggregates/counter/c1/watch?fromVersion=1")
	rd := newSSEReader(res.Body)
	var ids []string
	for {
		b, err := rd.next()
		if err != nil {
			t.Fatalf("no end event: %v (events %v)", err, ids)
		}
		if b.event == "end" {
			var body endEvent
			_ = json.Unmarshal([]byte(b.data), &body)
			if body.Reason != EndSlow || body.LastEventID != "4" {
				t.Fatalf("end %+v, want reason slow, last id 4", body)
			}
			break
		}
		if b.data != "" {
			ids = append(ids, b.id)
		}
	}
	if got := strings.Join(ids, ","); got != "1,2,3,4" {
		t.Fatalf("events %s, want 1,2,3,4", got)
	}
	waitFor(t, "the slow disconnect to be counted", func() bool {
		return metricWith(t, reg, "esker_watch_disconnects_total", "reason", EndSlow) == 1
	})
}

// TestWatchShutdownEndsStream: Server.Shutdown ends open streams at once
// (reason stopped) instead of waiting for them.
func TestWatchShutdownEndsStream(t *testing.T) {
	be := newSSEBackend()
	feed := newFakeFeed(1)
	be.feed = func(string, int64) (EntityFeed, error) { return feed, nil }
	srv, reg := newSSEServer(t, be)
	res := openSSE(t, srv.URL+"/v1/aggregates/counter/c1/watch")
	rd := newSSEReader(res.Body)
	if _, err := rd.next(); err != nil {
		t.Fatal(err)
	}
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		shut <- srv.Config.Shutdown(ctx)
	}()
	var end sseBlock
	for end.event != "end" {
		var err error
		if end, err = rd.next(); err != nil {
			t.Fatalf("no end event: %v", err)
		}
	}
	if !strings.Contains(end.data, `"reason":"stopped"`) || end.retry != "1000" {
		t.Fatalf("end block %+v, want reason stopped and retry 1000", end)
	}
	if err := <-shut; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if got := metricWith(t, reg, "esker_watch_disconnects_total", "reason", EndStopped); got != 1 {
		t.Fatalf("esker_watch_disconnects_total{reason=stopped} = %v, want 1", got)
	}
}

// newSSENode starts a node of cluster c (see route_test.go) whose backend
// serves watches.
func newSSENode(t *testing.T, c *testCluster, be Backend) (url string, srv *httptest.Server) {
	t.Helper()
	rt := &fakeRouter{c: c}
	srv = httptest.NewUnstartedServer(nil)
	rt.self = "http://" + srv.Listener.Addr().String()
	srv.Config.Handler = NewHandler(be, Logger(quietLogger()), Routing(rt), Registerer(prometheus.NewRegistry()))
	srv.Start()
	t.Cleanup(srv.Close)
	return rt.self, srv
}

// TestWatchForwardedStreams: a watch sent to a node that does not own the
// entity is forwarded to the owner (with the client's Last-Event-ID), and
// the owner's events reach the client as they come, not when the stream
// ends. When the owner's stream breaks, the forwarding node ends the
// client's stream itself: retry delay and an "end" event (moved) with the
// last id relayed.
func TestWatchForwardedStreams(t *testing.T) {
	c := newTestCluster()
	feed := newFakeFeed(5)
	owner := newSSEBackend()
	owner.feed = func(string, int64) (EntityFeed, error) { return feed, nil }
	ownerURL, ownerSrv := newSSENode(t, c, owner)
	other := newSSEBackend()
	other.feed = func(string, int64) (EntityFeed, error) {
		return nil, errors.New("the watch was served by the wrong node")
	}
	otherURL, _ := newSSENode(t, c, other)
	for p := range int32(testPartitions) {
		c.setOwner(p, otherURL)
	}
	c.setOwner(pc1, ownerURL)

	res := openSSE(t, otherURL+"/v1/aggregates/counter/c1/watch", "Last-Event-ID", "4")
	if res.StatusCode != 200 || res.Header.Get(ServedByHeader) != ownerURL || res.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("status %d, served by %q, type %q; want 200 from the owner %s, text/event-stream", res.StatusCode, res.Header.Get(ServedByHeader), res.Header.Get("Content-Type"), ownerURL)
	}
	if got := owner.froms(); len(got) != 1 || got[0] != 5 {
		t.Fatalf("the owner watched from %v, want [5] (Last-Event-ID 4 forwarded)", got)
	}
	rd := newSSEReader(res.Body)
	for v := int64(5); v <= 6; v++ {
		feed.steps <- feedStep{versions: []EntityVersion{counterVersion(v, 1, int(v))}, head: v}
		// The stream stays open: without flushing, this would wait forever.
		got := make(chan sseBlock, 1)
		go func() {
			for {
				b, err := rd.next()
				if err != nil || b.data != "" {
					got <- b
					return
				}
			}
		}()
		select {
		case b := <-got:
			if b.id != strconv.FormatInt(v, 10) {
				t.Fatalf("event id %q, want %d", b.id, v)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("version %d did not reach the client through the forwarding node", v)
		}
	}

	ownerSrv.CloseClientConnections() // the owner dies
	var end sseBlock
	for end.event != "end" {
		var err error
		if end, err = rd.next(); err != nil {
			t.Fatalf("no end event from the forwarding node: %v", err)
		}
	}
	var body endEvent
	_ = json.Unmarshal([]byte(end.data), &body)
	if body.Reason != EndMoved || body.LastEventID != "6" || end.retry != "1000" {
		t.Fatalf("end %+v %+v, want reason moved, last id 6, retry 1000", end, body)
	}
}

// TestStreamPositions: a stream's ids are position tokens that name every
// partition; a token as Last-Event-ID resumes exactly there; from=end asks
// for the end.
func TestStreamPositions(t *testing.T) {
	be := newSSEBackend()
	evs := make(chan []StreamedEvent, 4)
	be.stream = func(from map[int32]int64, fromEnd bool) (EventStream, error) {
		start := map[int32]int64{0: 0, 1: 0}
		for p, o := range from {
			start[p] = o
		}
		return &fakeStream{start: start, evs: evs}, nil
	}
	srv, reg := newSSEServer(t, be)

	res := openSSE(t, srv.URL+"/v1/streams/counter")
	rd := newSSEReader(res.Body)
	first, err := rd.next()
	if err != nil {
		t.Fatal(err)
	}
	if pos, err := DecodePosition(first.id); err != nil || fmt.Sprint(pos) != "map[0:0 1:0]" {
		t.Fatalf("start id %q (%v, %v), want the start of both partitions", first.id, pos, err)
	}
	added := func(p int32, off int64, id string, v int64) StreamedEvent {
		e := addedEvent(v, 1)
		e.EntityID = id
		return StreamedEvent{Partition: p, Offset: off, Event: e}
	}
	evs <- []StreamedEvent{added(1, 0, "a", 1), added(0, 3, "b", 1), added(1, 2, "a", 2)}
	wantPos := []string{"map[0:0 1:1]", "map[0:4 1:1]", "map[0:4 1:3]"}
	var lastID string
	for i, want := range wantPos {
		ev := rd.nextEvent(t)
		pos, err := DecodePosition(ev.id)
		if err != nil || fmt.Sprint(pos) != want {
			t.Fatalf("event %d: id %q (%v, %v), want %s", i, ev.id, pos, err, want)
		}
		var body struct {
			ID        string
			Version   int64
			Partition int32
			Offset    int64
			Data      struct{ N int }
		}
		if err := json.Unmarshal([]byte(ev.data), &body); err != nil || body.ID == "" || body.Data.N != 1 {
			t.Fatalf("event %d: data %q: %v", i, ev.data, err)
		}
		lastID = ev.id
	}
	if g := metricWith(t, reg, "esker_watch_streams", "route", "stream"); g != 1 {
		t.Fatalf("esker_watch_streams{route=stream} = %v, want 1", g)
	}
	res.Body.Close()

	res = openSSE(t, srv.URL+"/v1/streams/counter?from=end", "Last-Event-ID", lastID)
	if res.StatusCode != 200 {
		t.Fatalf("resume: status %d", res.StatusCode)
	}
	res.Body.Close()
	res = openSSE(t, srv.URL+"/v1/streams/counter?from=end")
	res.Body.Close()
	be.mu.Lock()
	defer be.mu.Unlock()
	if got := fmt.Sprint(be.streamFrom[1], be.streamEnd[1]); got != "map[0:4 1:3] false" {
		t.Fatalf("resumed with %s, want map[0:4 1:3] false (Last-Event-ID overrides from=end)", got)
	}
	if !be.streamEnd[2] || be.streamFrom[2] != nil {
		t.Fatalf("from=end asked for %v %v", be.streamFrom[2], be.streamEnd[2])
	}
	waitFor(t, "the client disconnects to be counted", func() bool {
		return metricWith(t, reg, "esker_watch_disconnects_total", "reason", EndClient) == 3
	})
}

type fakeStream struct {
	start map[int32]int64
	evs   chan []StreamedEvent
}

func (s *fakeStream) Start() map[int32]int64 { return s.start }
func (s *fakeStream) Close()                 {}
func (s *fakeStream) Next(ctx context.Context) ([]StreamedEvent, error) {
	select {
	case e := <-s.evs:
		return e, nil
	case <-ctx.Done():
		return nil, nil
	}
}

func TestStreamPositionTokens(t *testing.T) {
	pos := map[int32]int64{0: 12, 3: 0, 10: 1 << 40}
	tok := EncodePosition(pos)
	if strings.ContainsAny(tok, "+/=") {
		t.Fatalf("token %q is not base64url without padding", tok)
	}
	got, err := DecodePosition(tok)
	if err != nil || fmt.Sprint(got) != fmt.Sprint(pos) {
		t.Fatalf("round trip: %v %v, want %v", got, err, pos)
	}
	for _, bad := range []string{"", "!!", "bnVsbA" /* null */, "W10" /* [] */, "eyJ4IjoxfQ" /* {"x":1} */, "eyItMSI6MX0" /* {"-1":1} */} {
		if _, err := DecodePosition(bad); err == nil {
			t.Errorf("DecodePosition(%q) accepted it", bad)
		}
	}
}

// TestWatchMetricsRegisteredOnce: two handlers on one registry share the
// SSE metrics instead of failing to register them twice.
func TestWatchMetricsRegisteredOnce(t *testing.T) {
	reg := prometheus.NewRegistry()
	for range 2 {
		NewHandler(newSSEBackend(), Registerer(reg), Routing(&fakeRouter{c: newTestCluster()}))
	}
	if got := metricWith(t, reg, "esker_watch_streams", "route", "stream"); got != 0 {
		t.Fatalf("esker_watch_streams = %v", got)
	}
	if got := metricWith(t, reg, "esker_watch_disconnects_total", "reason", EndSlow); got != 0 {
		t.Fatalf("esker_watch_disconnects_total = %v", got)
	}
}
