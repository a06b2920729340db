package interactive

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/esker-io/esker/aggregate"
)

const testPartitions = 4

// testCluster is the cluster map the fake routers share: partition → owner
// URL. A node's router may override it (an inconsistent map).
type testCluster struct {
	mu     sync.Mutex
	owners map[int32]string
	m      *Map
}

func (c *testCluster) setOwner(p int32, url string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if url == "" {
		delete(c.owners, p)
		return
	}
	c.owners[p] = url
}

// fakeRouter is one node's Router over a testCluster.
type fakeRouter struct {
	c    *testCluster
	self string

	mu     sync.Mutex
	view   map[int32]string // overrides c.owners on this node
	status map[int32]TaskStatus
}

func (f *fakeRouter) Partitions() int32 { return testPartitions }

func (f *fakeRouter) Owner(p int32) (string, bool, bool) {
	f.mu.Lock()
	u, ok := f.view[p]
	f.mu.Unlock()
	if !ok {
		f.c.mu.Lock()
		u, ok = f.c.owners[p]
		f.c.mu.Unlock()
	}
	return u, ok && u == f.self, ok
}

func (f *fakeRouter) Map() (Map, bool) {
	f.c.mu.Lock()
	defer f.c.mu.Unlock()
	if f.c.m == nil {
		return Map{}, false
	}
	return *f.c.m, true
}

func (f *fakeRouter) Self() string { return f.self }

func (f *fakeRouter) setView(p int32, url string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.view == nil {
		f.view = map[int32]string{}
	}
	f.view[p] = url
}

// reporterRouter adds TaskReporter to a fakeRouter.
type reporterRouter struct{ *fakeRouter }

func (r reporterRouter) TaskStatus(p int32) (TaskStatus, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	st, ok := r.status[p]
	return st, ok
}

// seenRequest is what a node's server received.
type seenRequest struct {
	method, uri, forwarded, idempotencyKey, contentType string
	body                                                []byte
}

// testNode is one node: an httptest server running NewHandler with a fake
// backend and a fake router.
type testNode struct {
	srv *httptest.Server
	url string
	be  *fakeBackend
	rt  *fakeRouter
	reg *prometheus.Registry

	mu   sync.Mutex
	seen []seenRequest
}

func (n *testNode) requests() []seenRequest {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]seenRequest(nil), n.seen...)
}

func (n *testNode) backendCalls() []string {
	n.be.mu.Lock()
	defer n.be.mu.Unlock()
	return append([]string(nil), n.be.calls...)
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// withForwardSlack shortens the forward deadline's slack, for tests of
// owners that do not answer.
func withForwardSlack(d time.Duration) HandlerOption {
	return func(c *handlerConfig) { c.forwardSlack = d }
}

// newTestNode starts a node of cluster c.
func newTestNode(t *testing.T, c *testCluster, opts ...HandlerOption) *testNode {
	t.Helper()
	n := &testNode{be: &fakeBackend{def: counterType()}, reg: prometheus.NewRegistry()}
	n.rt = &fakeRouter{c: c}
	srv := httptest.NewUnstartedServer(nil)
	n.url = "http://" + srv.Listener.Addr().String() // what Start sets as srv.URL
	n.rt.self = n.url
	all := append([]HandlerOption{Logger(quietLogger()), Routing(n.rt), Registerer(n.reg)}, opts...)
	h := NewHandler(n.be, all...)
	srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body))
		n.mu.Lock()
		n.seen = append(n.seen, seenRequest{
			method: r.Method, uri: r.RequestURI, forwarded: r.Header.Get(ForwardedHeader),
			idempotencyKey: r.Header.Get("Idempotency-Key"), contentType: r.Header.Get("Content-Type"), body: body,
		})
		n.mu.Unlock()
		h.ServeHTTP(w, r)
	})
	srv.Start()
	t.Cleanup(srv.Close)
	if srv.URL != n.url {
		t.Fatalf("server URL %s, want %s", srv.URL, n.url)
	}
	n.srv = srv
	return n
}

func newTestCluster() *testCluster { return &testCluster{owners: map[int32]string{}} }

// answer is a response, read.
type answer struct {
	status int
	header http.Header
	body   []byte
	json   map[string]any
}

func do(t *testing.T, method, url, body string, header ...string) answer {
	t.Helper()
	return doWith(t, http.DefaultClient, method, url, body, header...)
}

// doWith is do with client.
func doWith(t *testing.T, client *http.Client, method, url, body string, header ...string) answer {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	res, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	a := answer{status: res.StatusCode, header: res.Header, body: b}
	_ = json.Unmarshal(b, &a.json)
	return a
}

func (a answer) want(t *testing.T, status int) {
	t.Helper()
	if a.status != status {
		t.Fatalf("status %d, want %d; body %s", a.status, status, a.body)
	}
}

func (a answer) errorLike(t *testing.T, sub string) {
	t.Helper()
	msg, _ := a.json["error"].(string)
	if !strings.Contains(msg, sub) {
		t.Errorf("error %q does not mention %q", msg, sub)
	}
}

// forwardedCount returns esker_forwarded_requests_total{outcome} of reg.
func forwardedCount(t *testing.T, reg *prometheus.Registry, outcome string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "esker_forwarded_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "outcome" && l.GetValue() == outcome {
					return m.GetCounter().GetValue()
				}
			}
		}
		t.Fatalf("no outcome %q in esker_forwarded_requests_total", outcome)
	}
	t.Fatal("esker_forwarded_requests_total is not registered")
	return 0
}

func forwardSeconds(t *testing.T, reg *prometheus.Registry) uint64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "esker_forward_seconds" {
			return mf.GetMetric()[0].GetHistogram().GetSampleCount()
		}
	}
	t.Fatal("esker_forward_seconds is not registered")
	return 0
}

func wantCounts(t *testing.T, n *testNode, want map[string]float64) {
	t.Helper()
	for _, o := range []string{outcomeOK, outcomeOwnerError, outcomeUnreachable, outcomeLoop, outcomeNoOwner} {
		if got := forwardedCount(t, n.reg, o); got != want[o] {
			t.Errorf("%s: esker_forwarded_requests_total{outcome=%q} = %v, want %v", n.url, o, got, want[o])
		}
	}
}

// keyIn returns an entity id of partition p.
func keyIn(t *testing.T, p int32) string {
	for i := 0; i < 1000; i++ {
		if id := "k" + strconv.Itoa(i); aggregate.Partition(id, testPartitions) == p {
			return id
		}
	}
	t.Fatalf("no key for partition %d", p)
	return ""
}

func stateFrom(version int64) func(context.Context, int64, time.Duration) (State, error) {
	return func(context.Context, int64, time.Duration) (State, error) {
		return State{ID: "c1", Version: version, State: []byte(`{"total":5}`), UpdatedAt: evTime}, nil
	}
}

var pc1 = aggregate.Partition("c1", testPartitions)

// twoNodes returns nodes A and B with c1's partition owned by B and every
// other partition by A.
func twoNodes(t *testing.T, opts ...HandlerOption) (c *testCluster, a, b *testNode) {
	c = newTestCluster()
	a, b = newTestNode(t, c, opts...), newTestNode(t, c, opts...)
	for p := int32(0); p < testPartitions; p++ {
		c.setOwner(p, a.url)
	}
	c.setOwner(pc1, b.url)
	return c, a, b
}

func TestRouteGetForwardedToOwner(t *testing.T) {
	_, a, b := twoNodes(t)
	b.be.state = stateFrom(7)
	b.be.events = func(from int64, limit int) ([]aggregate.Event, error) {
		return []aggregate.Event{addedEvent(from, 2)}, nil
	}

	res := do(t, "GET", a.url+"/v1/aggregates/counter/c1?minVersion=2&wait=1500ms", "")
	res.want(t, 200)
	if res.json["version"] != 7.0 || res.json["id"] != "c1" {
		t.Errorf("body %s, want B's state at version 7", res.body)
	}
	if got := res.header.Get(ServedByHeader); got != b.url {
		t.Errorf("%s = %q, want the owner %q", ServedByHeader, got, b.url)
	}
	if ct := res.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q", ct)
	}
	b.be.mu.Lock()
	if b.be.id != "c1" || b.be.minV != 2 || b.be.wait != 1500*time.Millisecond {
		t.Errorf("B's backend got id %q minVersion %d wait %s; want the client's query", b.be.id, b.be.minV, b.be.wait)
	}
	b.be.mu.Unlock()

	res = do(t, "GET", a.url+"/v1/aggregates/counter/c1/events?from=3&limit=2", "")
	res.want(t, 200)
	if evs, _ := res.json["events"].([]any); len(evs) != 1 {
		t.Errorf("events body %s", res.body)
	}
	b.be.mu.Lock()
	if b.be.from != 3 || b.be.limit != 2 {
		t.Errorf("B's backend got from %d limit %d, want 3 and 2", b.be.from, b.be.limit)
	}
	b.be.mu.Unlock()

	if calls := a.backendCalls(); len(calls) != 0 {
		t.Errorf("A's backend was called: %v", calls)
	}
	if calls := b.backendCalls(); strings.Join(calls, ",") != "State,Events" {
		t.Errorf("B's backend calls %v, want State, Events", calls)
	}
	// Exactly one hop each: A saw the client's requests, B the forwarded ones.
	for _, r := range a.requests() {
		if r.forwarded != "" {
			t.Errorf("A received a forwarded request: %+v", r)
		}
	}
	bs := b.requests()
	if len(bs) != 2 {
		t.Fatalf("B received %d requests, want 2", len(bs))
	}
	for i, wantURI := range []string{"/v1/aggregates/counter/c1?minVersion=2&wait=1500ms", "/v1/aggregates/counter/c1/events?from=3&limit=2"} {
		if bs[i].forwarded != a.url || bs[i].uri != wantURI || bs[i].method != "GET" {
			t.Errorf("B received %s %s with %s %q; want GET %s from %s", bs[i].method, bs[i].uri, ForwardedHeader, bs[i].forwarded, wantURI, a.url)
		}
	}
	wantCounts(t, a, map[string]float64{outcomeOK: 2})
	wantCounts(t, b, nil)
	if n := forwardSeconds(t, a.reg); n != 2 {
		t.Errorf("esker_forward_seconds count %d, want 2", n)
	}
}

func TestRouteLocalAnswer(t *testing.T) {
	_, a, b := twoNodes(t)
	a.be.state = stateFrom(1)
	b.be.state = stateFrom(1)
	// c1 is B's: asked of B itself, B serves it without a hop.
	res := do(t, "GET", b.url+"/v1/aggregates/counter/c1", "")
	res.want(t, 200)
	if got := res.header.Get(ServedByHeader); got != b.url {
		t.Errorf("%s = %q, want %q", ServedByHeader, got, b.url)
	}
	// A key of A's is served by A.
	other := keyIn(t, (pc1+1)%testPartitions)
	res = do(t, "GET", a.url+"/v1/aggregates/counter/"+other, "")
	res.want(t, 200)
	if got := res.header.Get(ServedByHeader); got != a.url {
		t.Errorf("%s = %q, want %q", ServedByHeader, got, a.url)
	}
	if len(a.requests()) != 1 || len(b.requests()) != 1 {
		t.Errorf("A saw %d requests and B %d; want 1 each (no forwarding)", len(a.requests()), len(b.requests()))
	}
	wantCounts(t, a, nil)
	wantCounts(t, b, nil)
	// Health routes carry the header too.
	if got := do(t, "GET", a.url+"/healthz", "").header.Get(ServedByHeader); got != a.url {
		t.Errorf("/healthz %s = %q", ServedByHeader, got)
	}
}

func TestRouteEscapedIDForwarded(t *testing.T) {
	c, a, b := twoNodes(t)
	id := "a/b c"
	c.setOwner(aggregate.Partition(id, testPartitions), b.url)
	b.be.state = stateFrom(1)
	do(t, "GET", a.url+"/v1/aggregates/counter/a%2Fb%20c", "").want(t, 200)
	b.be.mu.Lock()
	defer b.be.mu.Unlock()
	if b.be.id != id {
		t.Errorf("B's backend got id %q, want %q", b.be.id, id)
	}
	if bs := b.requests(); len(bs) != 1 || bs[0].uri != "/v1/aggregates/counter/a%2Fb%20c" {
		t.Errorf("B received %+v", bs)
	}
}

func TestRouteCommandForwarded(t *testing.T) {
	hexID := regexp.MustCompile(`^[0-9a-f]{32}$`)
	_, a, b := twoNodes(t)
	accepted(b.be)

	// Without a commandId: A generates one and forwards it in the body.
	res := do(t, "POST", a.url+cmdPath, `{"type":"Add","data":{"n":2}}`)
	res.want(t, 200)
	id, _ := res.json["commandId"].(string)
	if !hexID.MatchString(id) {
		t.Fatalf("commandId %q, want 32 hex digits", id)
	}
	b.be.mu.Lock()
	got := b.be.cmd
	b.be.mu.Unlock()
	if got.CommandID != id || got.Type != "Add" || string(got.Data) != `{"n":2}` {
		t.Errorf("B's backend got %+v; want Add {n:2} with commandId %s", got, id)
	}
	bs := b.requests()
	if len(bs) != 1 {
		t.Fatalf("B received %d requests, want 1", len(bs))
	}
	if bs[0].method != "POST" || bs[0].uri != cmdPath || bs[0].forwarded != a.url || bs[0].contentType != "application/json" || bs[0].idempotencyKey != id {
		t.Errorf("B received %+v", bs[0])
	}
	if res.header.Get(ServedByHeader) != b.url {
		t.Errorf("%s = %q, want %q", ServedByHeader, res.header.Get(ServedByHeader), b.url)
	}

	// With a commandId: the body goes as the client sent it.
	body := `{"type":"Add", "data":{"n":3},"commandId":"mine","expectedVersion":2}`
	res = do(t, "POST", a.url+cmdPath, body)
	res.want(t, 200)
	if res.json["commandId"] != "mine" {
		t.Errorf("commandId %v, want mine", res.json["commandId"])
	}
	if bs := b.requests(); string(bs[1].body) != body {
		t.Errorf("B received body %s, want %s", bs[1].body, body)
	}
	if calls := a.backendCalls(); len(calls) != 0 {
		t.Errorf("A's backend was called: %v", calls)
	}
	wantCounts(t, a, map[string]float64{outcomeOK: 2})
}

// TestRouteRelaysOwnerAnswers: what A answers for B's key is what B answers
// when asked directly, byte for byte, plus the ServedByHeader.
func TestRouteRelaysOwnerAnswers(t *testing.T) {
	cases := []struct {
		name, method, path, body string
		backend                  func(*fakeBackend)
		status                   int
		retryAfter               string
		outcome                  string
	}{
		{
			name: "409 conflict", method: "POST", path: cmdPath, body: `{"type":"Add","data":{"n":1},"expectedVersion":1,"commandId":"c-9"}`,
			backend: func(f *fakeBackend) {
				f.submit = func(context.Context, aggregate.Command) (aggregate.Outcome, error) {
					return aggregate.Outcome{Conflict: true, Version: 4}, nil
				}
			},
			status: 409, outcome: outcomeOK,
		},
		{
			name: "422 rejected", method: "POST", path: cmdPath, body: `{"type":"Add","data":{"n":1},"commandId":"c-9"}`,
			backend: func(f *fakeBackend) {
				f.submit = func(context.Context, aggregate.Command) (aggregate.Outcome, error) {
					return aggregate.Outcome{Reason: "insufficient funds", Version: 4}, nil
				}
			},
			status: 422, outcome: outcomeOK,
		},
		{
			name: "503 restoring", method: "POST", path: cmdPath, body: `{"type":"Add","data":{"n":1},"commandId":"c-9"}`,
			backend: func(f *fakeBackend) {
				f.submit = func(context.Context, aggregate.Command) (aggregate.Outcome, error) {
					return aggregate.Outcome{}, &NotReadyError{Reason: "partition 1 is restoring", RetryAfter: 3 * time.Second}
				}
			},
			status: 503, retryAfter: "3", outcome: outcomeOwnerError,
		},
		{
			name: "504 outcome unknown", method: "POST", path: cmdPath, body: `{"type":"Add","data":{"n":1},"commandId":"c-9"}`,
			backend: func(f *fakeBackend) {
				f.submit = func(context.Context, aggregate.Command) (aggregate.Outcome, error) {
					return aggregate.Outcome{}, ErrTimeout
				}
			},
			status: 504, outcome: outcomeOwnerError,
		},
		{
			name: "404 no events", method: "GET", path: "/v1/aggregates/counter/c1",
			backend: func(f *fakeBackend) {
				f.state = func(context.Context, int64, time.Duration) (State, error) { return State{}, ErrNotFound }
			},
			status: 404, outcome: outcomeOK,
		},
		{
			name: "503 state rebalancing", method: "GET", path: "/v1/aggregates/counter/c1/events",
			backend: func(f *fakeBackend) {
				f.events = func(int64, int) ([]aggregate.Event, error) {
					return nil, &NotReadyError{Reason: "rebalancing", RetryAfter: 2 * time.Second}
				}
			},
			status: 503, retryAfter: "2", outcome: outcomeOwnerError,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, a, b := twoNodes(t)
			tc.backend(b.be)
			direct := do(t, tc.method, b.url+tc.path, tc.body)
			direct.want(t, tc.status)
			via := do(t, tc.method, a.url+tc.path, tc.body)
			via.want(t, tc.status)
			if !bytes.Equal(via.body, direct.body) {
				t.Errorf("relayed body %s, owner's %s", via.body, direct.body)
			}
			for _, k := range []string{"Content-Type", "Retry-After", "X-Content-Type-Options", ServedByHeader} {
				if g, w := via.header.Get(k), direct.header.Get(k); g != w {
					t.Errorf("relayed %s %q, owner's %q", k, g, w)
				}
			}
			if got := via.header.Get("Retry-After"); got != tc.retryAfter {
				t.Errorf("Retry-After %q, want %q", got, tc.retryAfter)
			}
			if calls := a.backendCalls(); len(calls) != 0 {
				t.Errorf("A's backend was called: %v", calls)
			}
			wantCounts(t, a, map[string]float64{tc.outcome: 1})
		})
	}
}

// TestRouteLoopRefused: A thinks B owns c1's partition and B thinks A does.
// The request crosses the network once and is refused, not bounced.
func TestRouteLoopRefused(t *testing.T) {
	for _, tc := range []struct{ method, path, body string }{
		{"GET", "/v1/aggregates/counter/c1", ""},
		{"GET", "/v1/aggregates/counter/c1/events", ""},
		{"POST", cmdPath, `{"type":"Add","data":{"n":1}}`},
	} {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			t.Parallel()
			_, a, b := twoNodes(t)
			b.rt.setView(pc1, a.url)
			accepted(a.be)
			accepted(b.be)
			res := do(t, tc.method, a.url+tc.path, tc.body)
			res.want(t, 503)
			res.errorLike(t, "moved while the request was forwarded; retry")
			if res.header.Get("Retry-After") != "1" {
				t.Errorf("Retry-After %q, want 1", res.header.Get("Retry-After"))
			}
			if tc.method == "POST" {
				if id, _ := res.json["commandId"].(string); id == "" {
					t.Errorf("503 for a command without its commandId: %s", res.body)
				} else if bs := b.requests(); bs[0].idempotencyKey != id {
					t.Errorf("answered commandId %s, forwarded %s", id, bs[0].idempotencyKey)
				}
			}
			if len(a.requests()) != 1 || len(b.requests()) != 1 {
				t.Errorf("A saw %d requests, B %d; want one each (one hop, no ping-pong)", len(a.requests()), len(b.requests()))
			}
			if ca, cb := a.backendCalls(), b.backendCalls(); len(ca)+len(cb) != 0 {
				t.Errorf("backends called: A %v, B %v", ca, cb)
			}
			wantCounts(t, a, map[string]float64{outcomeOwnerError: 1})
			wantCounts(t, b, map[string]float64{outcomeLoop: 1})
		})
	}
}

// TestRouteOneHopOfThree: A thinks B owns the key, B thinks C does. B does
// not forward again.
func TestRouteOneHopOfThree(t *testing.T) {
	c, a, b := twoNodes(t)
	cn := newTestNode(t, c)
	b.rt.setView(pc1, cn.url)
	cn.be.state = stateFrom(1)
	res := do(t, "GET", a.url+"/v1/aggregates/counter/c1", "")
	res.want(t, 503)
	res.errorLike(t, "moved while the request was forwarded")
	if len(cn.requests()) != 0 {
		t.Errorf("C received %d requests: the request was forwarded twice", len(cn.requests()))
	}
	if res.header.Get(ServedByHeader) != b.url {
		t.Errorf("%s = %q, want B %q (B refused)", ServedByHeader, res.header.Get(ServedByHeader), b.url)
	}

	// Once the maps agree, A forwards straight to C.
	c.setOwner(pc1, cn.url)
	b.rt.setView(pc1, cn.url)
	do(t, "GET", a.url+"/v1/aggregates/counter/c1", "").want(t, 200)
	if len(cn.requests()) != 1 || cn.requests()[0].forwarded != a.url {
		t.Errorf("C received %+v", cn.requests())
	}
	if len(b.requests()) != 1 {
		t.Errorf("B received %d requests, want 1 (the first)", len(b.requests()))
	}
}

func TestRouteNoOwner(t *testing.T) {
	c, a, b := twoNodes(t)
	c.setOwner(pc1, "")
	for _, tc := range []struct{ method, path, body string }{
		{"GET", "/v1/aggregates/counter/c1", ""},
		{"GET", "/v1/aggregates/counter/c1/events", ""},
		{"POST", cmdPath, `{"type":"Add","data":{"n":1},"commandId":"x-1"}`},
	} {
		res := do(t, tc.method, a.url+tc.path, tc.body)
		res.want(t, 503)
		res.errorLike(t, "no node owns partition")
		if res.header.Get("Retry-After") != "1" || res.header.Get(ServedByHeader) != a.url {
			t.Errorf("headers %v", res.header)
		}
		if tc.method == "POST" && res.json["commandId"] != "x-1" {
			t.Errorf("body %s, want commandId x-1", res.body)
		}
	}
	if len(b.requests()) != 0 || len(a.backendCalls()) != 0 {
		t.Errorf("B saw %d requests, A's backend %v", len(b.requests()), a.backendCalls())
	}
	wantCounts(t, a, map[string]float64{outcomeNoOwner: 3})
}

func TestRouteOwnerDown(t *testing.T) {
	_, a, b := twoNodes(t)
	b.srv.Close() // connection refused from now on

	res := do(t, "GET", a.url+"/v1/aggregates/counter/c1", "")
	res.want(t, 503)
	res.errorLike(t, "unreachable")
	if res.header.Get("Retry-After") != "1" {
		t.Errorf("Retry-After %q", res.header.Get("Retry-After"))
	}

	// Refused before anything was sent: 503, the command was not applied.
	res = do(t, "POST", a.url+cmdPath, `{"type":"Add","data":{"n":1}}`)
	res.want(t, 503)
	res.errorLike(t, "the command was not sent")
	if id, _ := res.json["commandId"].(string); id == "" {
		t.Errorf("503 without the commandId: %s", res.body)
	}
	if calls := a.backendCalls(); len(calls) != 0 {
		t.Errorf("A's backend was called: %v", calls)
	}
	wantCounts(t, a, map[string]float64{outcomeUnreachable: 2})
}

// silentOwner starts a server that takes requests and never answers (hang)
// or drops the connection (drop), and records the bodies it got.
func silentOwner(t *testing.T, drop bool) (url string, bodies chan []byte) {
	bodies = make(chan []byte, 10)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		bodies <- b
		if drop {
			conn, _, err := http.NewResponseController(w).Hijack()
			if err == nil {
				conn.Close()
			}
			return
		}
		select {
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
	}))
	t.Cleanup(srv.Close)
	return srv.URL, bodies
}

func TestRouteOwnerLost(t *testing.T) {
	for _, drop := range []bool{false, true} {
		name := map[bool]string{false: "owner hangs", true: "owner drops the connection"}[drop]
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			c := newTestCluster()
			a := newTestNode(t, c, CommandTimeout(100*time.Millisecond), MaxWait(100*time.Millisecond), withForwardSlack(50*time.Millisecond))
			owner, bodies := silentOwner(t, drop)
			c.setOwner(pc1, owner)

			start := time.Now()
			res := do(t, "POST", a.url+cmdPath, `{"type":"Add","data":{"n":1}}`)
			res.want(t, 504)
			res.errorLike(t, "outcome unknown; retry with the same commandId")
			id, _ := res.json["commandId"].(string)
			if id == "" {
				t.Fatalf("504 without the commandId: %s", res.body)
			}
			var sent aggregate.Command
			if err := json.Unmarshal(<-bodies, &sent); err != nil || sent.CommandID != id {
				t.Errorf("the owner got commandId %q (%v), the client %q", sent.CommandID, err, id)
			}
			if !drop && time.Since(start) < 150*time.Millisecond {
				t.Errorf("gave up after %s, before the command timeout + slack", time.Since(start))
			}

			res = do(t, "GET", a.url+"/v1/aggregates/counter/c1", "")
			res.want(t, 503)
			if res.header.Get("Retry-After") != "1" {
				t.Errorf("Retry-After %q", res.header.Get("Retry-After"))
			}
			if calls := a.backendCalls(); len(calls) != 0 {
				t.Errorf("A's backend was called: %v", calls)
			}
			wantCounts(t, a, map[string]float64{outcomeUnreachable: 2})
		})
	}
}

// TestRouteBadInputNotForwarded: requests a node can refuse itself never
// reach the owner.
func TestRouteBadInputNotForwarded(t *testing.T) {
	_, a, b := twoNodes(t, MaxBodyBytes(200))
	for _, tc := range []struct {
		name, method, path, body string
		status                   int
	}{
		{"malformed JSON", "POST", cmdPath, `{"type":`, 400},
		{"unknown field", "POST", cmdPath, `{"type":"Add","amount":1}`, 400},
		{"unknown command", "POST", cmdPath, `{"type":"Nope"}`, 400},
		{"invalid data", "POST", cmdPath, `{"type":"Add","data":{"n":"x"}}`, 400},
		{"Validate fails", "POST", cmdPath, `{"type":"Add","data":{"n":-1}}`, 400},
		{"negative expectedVersion", "POST", cmdPath, `{"type":"Add","data":{"n":1},"expectedVersion":-2}`, 400},
		{"empty body", "POST", cmdPath, ``, 400},
		{"too large", "POST", cmdPath, `{"type":"Add","data":{"n":1},"correlationId":"` + strings.Repeat("x", 300) + `"}`, 413},
		{"unknown type", "POST", "/v1/aggregates/nope/c1/commands", `{"type":"Add"}`, 404},
		{"bad minVersion", "GET", "/v1/aggregates/counter/c1?minVersion=-1", "", 400},
		{"bad wait", "GET", "/v1/aggregates/counter/c1?wait=soon", "", 400},
		{"bad limit", "GET", "/v1/aggregates/counter/c1/events?limit=0", "", 400},
		{"bad from", "GET", "/v1/aggregates/counter/c1/events?from=x", "", 400},
	} {
		res := do(t, tc.method, a.url+tc.path, tc.body)
		if res.status != tc.status {
			t.Errorf("%s: status %d, want %d; body %s", tc.name, res.status, tc.status, res.body)
		}
		if res.header.Get(ServedByHeader) != a.url {
			t.Errorf("%s: %s = %q, want A", tc.name, ServedByHeader, res.header.Get(ServedByHeader))
		}
	}
	if n := len(b.requests()); n != 0 {
		t.Errorf("B received %d requests; bad input crossed the network", n)
	}
	if calls := a.backendCalls(); len(calls) != 0 {
		t.Errorf("A's backend was called: %v", calls)
	}
	wantCounts(t, a, nil)
}

// TestRouteForwardedToOwnerServed: a forwarded request for a partition the
// node owns is served as usual.
func TestRouteForwardedToOwnerServed(t *testing.T) {
	_, _, b := twoNodes(t)
	b.be.state = stateFrom(2)
	res := do(t, "GET", b.url+"/v1/aggregates/counter/c1", "", ForwardedHeader, "http://elsewhere")
	res.want(t, 200)
	if calls := b.backendCalls(); len(calls) != 1 {
		t.Errorf("B's backend calls %v", calls)
	}
}

func TestNoRoutingUnchanged(t *testing.T) {
	f := &fakeBackend{def: counterType()}
	f.state = stateFrom(1)
	srv := httptest.NewServer(NewHandler(f, Logger(quietLogger())))
	defer srv.Close()
	res := do(t, "GET", srv.URL+"/v1/aggregates/counter/c1", "", ForwardedHeader, "http://elsewhere")
	res.want(t, 200)
	if res.header.Get(ServedByHeader) != "" {
		t.Errorf("%s without Routing: %q", ServedByHeader, res.header.Get(ServedByHeader))
	}
	do(t, "GET", srv.URL+"/v1/cluster", "").want(t, 404)
}

// TestRegistererShared: two handlers on one registry share the collectors.
func TestRegistererShared(t *testing.T) {
	reg := prometheus.NewRegistry()
	rt := &fakeRouter{c: newTestCluster(), self: "http://a"}
	NewHandler(&fakeBackend{def: counterType()}, Routing(rt), Registerer(reg))
	h := NewHandler(&fakeBackend{def: counterType()}, Routing(rt), Registerer(reg), Logger(quietLogger()))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/v1/aggregates/counter/c1", nil))
	if rec.Code != 503 {
		t.Fatalf("status %d, want 503 (no owner)", rec.Code)
	}
	if got := forwardedCount(t, reg, outcomeNoOwner); got != 1 {
		t.Errorf("no_owner = %v, want 1", got)
	}
}
