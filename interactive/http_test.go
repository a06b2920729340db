package interactive

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esker-io/esker/aggregate"
)

// The test aggregate: a counter.

type counterState struct {
	Total int `json:"total"`
}

type Add struct {
	N int `json:"n"`
}

func (a Add) Validate() error {
	if a.N <= 0 {
		return fmt.Errorf("n must be positive, got %d", a.N)
	}
	return nil
}

type Reset struct{}

type Added struct {
	N int `json:"n"`
}

func counterType() aggregate.Definition {
	decide := func(s counterState, c any) ([]any, error) {
		switch c := c.(type) {
		case Add:
			return []any{Added(c)}, nil
		}
		return nil, errors.New("unsupported")
	}
	evolve := func(s counterState, e any) counterState {
		if a, ok := e.(Added); ok {
			s.Total += a.N
		}
		return s
	}
	return aggregate.New("counter", decide, evolve).Commands(Add{}, Reset{}).Events(Added{}).Untyped()
}

// fakeBackend records calls and answers from its function fields.
type fakeBackend struct {
	def aggregate.Definition

	submit func(ctx context.Context, cmd aggregate.Command) (aggregate.Outcome, error)
	state  func(ctx context.Context, minVersion int64, wait time.Duration) (State, error)
	events func(from int64, limit int) ([]aggregate.Event, error)
	ready  func() error

	mu    sync.Mutex
	calls []string
	cmd   aggregate.Command
	id    string
	minV  int64
	wait  time.Duration
	from  int64
	limit int
}

func (f *fakeBackend) record(call, id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, call)
	f.id = id
}

func (f *fakeBackend) Definition(t string) (aggregate.Definition, bool) {
	if t == f.def.Name() {
		return f.def, true
	}
	return nil, false
}

func (f *fakeBackend) Submit(ctx context.Context, typ, id string, cmd aggregate.Command) (aggregate.Outcome, error) {
	f.record("Submit", id)
	f.mu.Lock()
	f.cmd = cmd
	f.mu.Unlock()
	if f.submit == nil {
		return aggregate.Outcome{}, errors.New("no submit in this test")
	}
	return f.submit(ctx, cmd)
}

func (f *fakeBackend) State(ctx context.Context, typ, id string, minVersion int64, wait time.Duration) (State, error) {
	f.record("State", id)
	f.mu.Lock()
	f.minV, f.wait = minVersion, wait
	f.mu.Unlock()
	if f.state == nil {
		return State{}, errors.New("no state in this test")
	}
	return f.state(ctx, minVersion, wait)
}

func (f *fakeBackend) Events(ctx context.Context, typ, id string, from int64, limit int) ([]aggregate.Event, error) {
	f.record("Events", id)
	f.mu.Lock()
	f.from, f.limit = from, limit
	f.mu.Unlock()
	if f.events == nil {
		return nil, nil
	}
	return f.events(from, limit)
}

func (f *fakeBackend) Ready() error {
	f.record("Ready", "")
	if f.ready == nil {
		return nil
	}
	return f.ready()
}

var evTime = time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)

func addedEvent(v int64, n int) aggregate.Event {
	return aggregate.Event{
		EntityID: "c1", Version: v, EventID: aggregate.EventID("counter", "c1", v),
		Type: "Added", SchemaVersion: 1, CommandID: "c-1", Time: evTime,
		Data: json.RawMessage(fmt.Sprintf(`{"n":%d}`, n)),
	}
}

type httpCase struct {
	name    string
	method  string
	path    string
	body    string
	opts    []HandlerOption
	backend func(*fakeBackend)

	status  int
	header  map[string]string // exact header values
	json    map[string]any    // top-level fields, compared after JSON round-trip
	errLike string            // substring of "error"
	check   func(t *testing.T, f *fakeBackend, body map[string]any)
	// noBackend asserts that the backend was not asked to act.
	noBackend bool
}

func runCases(t *testing.T, cases []httpCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := &fakeBackend{def: counterType()}
			if tc.backend != nil {
				tc.backend(f)
			}
			opts := append([]HandlerOption{Logger(slog.New(slog.NewTextHandler(io.Discard, nil)))}, tc.opts...)
			h := NewHandler(f, opts...)
			var body io.Reader
			if tc.body != "" {
				body = strings.NewReader(tc.body)
			}
			req := httptest.NewRequest(tc.method, tc.path, body)
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			res := rec.Result()

			if res.StatusCode != tc.status {
				t.Fatalf("status %d, want %d; body %s", res.StatusCode, tc.status, rec.Body.String())
			}
			if ct := res.Header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q, want application/json", ct)
			}
			for k, v := range tc.header {
				if got := res.Header.Get(k); got != v {
					t.Errorf("header %s = %q, want %q", k, got, v)
				}
			}
			var got map[string]any
			if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
				t.Fatalf("body is not a JSON object: %v: %s", err, rec.Body.String())
			}
			if res.StatusCode >= 400 {
				msg, ok := got["error"].(string)
				if !ok || msg == "" {
					t.Fatalf("error answer without an error message: %s", rec.Body.String())
				}
				if tc.errLike != "" && !strings.Contains(msg, tc.errLike) {
					t.Errorf("error %q does not mention %q", msg, tc.errLike)
				}
			}
			for k, want := range tc.json {
				if g, w := mustJSON(got[k]), mustJSON(want); string(g) != string(w) {
					t.Errorf("field %s = %s, want %s", k, g, w)
				}
			}
			if tc.noBackend {
				f.mu.Lock()
				for _, c := range f.calls {
					if c != "Ready" {
						t.Errorf("backend.%s called; the request should have been refused before", c)
					}
				}
				f.mu.Unlock()
			}
			if tc.check != nil {
				tc.check(t, f, got)
			}
		})
	}
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

const cmdPath = "/v1/aggregates/counter/c1/commands"

func accepted(f *fakeBackend) {
	f.submit = func(_ context.Context, cmd aggregate.Command) (aggregate.Outcome, error) {
		return aggregate.Outcome{CommandID: cmd.CommandID, EntityID: "c1", Accepted: true, Version: 3,
			Events: []aggregate.Event{addedEvent(3, 2)}}, nil
	}
}

func TestSubmit(t *testing.T) {
	hexID := regexp.MustCompile(`^[0-9a-f]{32}$`)
	runCases(t, []httpCase{
		{
			name: "accepted", method: "POST", path: cmdPath, backend: accepted,
			body:   `{"type":"Add","data":{"n":2},"expectedVersion":2,"commandId":"c-1","correlationId":"corr","causationId":"cause"}`,
			status: 200,
			json: map[string]any{"id": "c1", "commandId": "c-1", "version": 3, "events": []any{map[string]any{
				"version": 3, "type": "Added", "schemaVersion": 1, "eventId": aggregate.EventID("counter", "c1", 3),
				"time": "2025-01-02T03:04:05.000000006Z", "commandId": "c-1", "data": map[string]any{"n": 2},
			}}},
			check: func(t *testing.T, f *fakeBackend, _ map[string]any) {
				c := f.cmd
				if c.Type != "Add" || string(c.Data) != `{"n":2}` || c.ExpectedVersion == nil || *c.ExpectedVersion != 2 ||
					c.CommandID != "c-1" || c.CorrelationID != "corr" || c.CausationID != "cause" || f.id != "c1" {
					t.Errorf("backend got %+v for %q", c, f.id)
				}
			},
		},
		{
			name: "accepted without commandId gets a generated one", method: "POST", path: cmdPath, backend: accepted,
			body: `{"type":"Add","data":{"n":2}}`, status: 200,
			check: func(t *testing.T, f *fakeBackend, body map[string]any) {
				id, _ := body["commandId"].(string)
				if !hexID.MatchString(id) || f.cmd.CommandID != id {
					t.Errorf("commandId %q, backend got %q; want the same 32 hex digits", id, f.cmd.CommandID)
				}
			},
		},
		{
			name: "accepted with no events answers an empty list", method: "POST", path: cmdPath,
			backend: func(f *fakeBackend) {
				f.submit = func(_ context.Context, cmd aggregate.Command) (aggregate.Outcome, error) {
					return aggregate.Outcome{CommandID: cmd.CommandID, Accepted: true, Version: 7}, nil
				}
			},
			body: `{"type":"Reset"}`, status: 200,
			json: map[string]any{"id": "c1", "version": 7, "events": []any{}},
		},
		{
			name: "entity id is path-unescaped", method: "POST", path: "/v1/aggregates/counter/a%2Fb%20c/commands", backend: accepted,
			body: `{"type":"Add","data":{"n":1}}`, status: 200,
			check: func(t *testing.T, f *fakeBackend, _ map[string]any) {
				if f.id != "a/b c" {
					t.Errorf("backend got id %q, want %q", f.id, "a/b c")
				}
			},
		},
		{
			name: "version conflict", method: "POST", path: cmdPath,
			backend: func(f *fakeBackend) {
				f.submit = func(_ context.Context, cmd aggregate.Command) (aggregate.Outcome, error) {
					return aggregate.Outcome{CommandID: cmd.CommandID, Conflict: true, Version: 5, Reason: "conflict"}, nil
				}
			},
			body: `{"type":"Add","data":{"n":1},"expectedVersion":4,"commandId":"c-9"}`, status: 409,
			json:    map[string]any{"currentVersion": 5, "commandId": "c-9"},
			errLike: "version 5, but the command expected: version 4",
		},
		{
			name: "conflict at version 0 still reports currentVersion", method: "POST", path: cmdPath,
			backend: func(f *fakeBackend) {
				f.submit = func(_ context.Context, cmd aggregate.Command) (aggregate.Outcome, error) {
					return aggregate.Outcome{CommandID: cmd.CommandID, Conflict: true, Version: 0}, nil
				}
			},
			body: `{"type":"Add","data":{"n":1},"expectedVersion":4}`, status: 409,
			json: map[string]any{"currentVersion": 0},
		},
		{
			name: "rejected by decide", method: "POST", path: cmdPath,
			backend: func(f *fakeBackend) {
				f.submit = func(_ context.Context, cmd aggregate.Command) (aggregate.Outcome, error) {
					return aggregate.Outcome{CommandID: cmd.CommandID, Version: 4, Reason: "counter is frozen"}, nil
				}
			},
			body: `{"type":"Add","data":{"n":1},"commandId":"c-2"}`, status: 422,
			json: map[string]any{"error": "counter is frozen", "commandId": "c-2", "currentVersion": 4},
		},
		{
			name: "outcome unknown in time", method: "POST", path: cmdPath,
			opts: []HandlerOption{CommandTimeout(20 * time.Millisecond)},
			backend: func(f *fakeBackend) {
				f.submit = func(ctx context.Context, _ aggregate.Command) (aggregate.Outcome, error) {
					if _, ok := ctx.Deadline(); !ok {
						return aggregate.Outcome{}, errors.New("no deadline")
					}
					<-ctx.Done()
					return aggregate.Outcome{}, fmt.Errorf("await outcome: %w", ErrTimeout)
				}
			},
			body: `{"type":"Add","data":{"n":1},"commandId":"c-3"}`, status: 504,
			json: map[string]any{"error": "outcome unknown after 20ms; retry with the same commandId", "commandId": "c-3"},
		},
		{
			name: "not ready", method: "POST", path: cmdPath,
			backend: func(f *fakeBackend) {
				f.submit = func(context.Context, aggregate.Command) (aggregate.Outcome, error) {
					return aggregate.Outcome{}, fmt.Errorf("submit: %w", &NotReadyError{Reason: "partition 3 is restoring", RetryAfter: 1200 * time.Millisecond})
				}
			},
			body: `{"type":"Add","data":{"n":1}}`, status: 503,
			header: map[string]string{"Retry-After": "2"}, errLike: "partition 3 is restoring",
		},
		{
			name: "not ready without a delay says retry after 1s", method: "POST", path: cmdPath,
			backend: func(f *fakeBackend) {
				f.submit = func(context.Context, aggregate.Command) (aggregate.Outcome, error) {
					return aggregate.Outcome{}, &NotReadyError{Reason: "rebalancing"}
				}
			},
			body: `{"type":"Add","data":{"n":1}}`, status: 503,
			header: map[string]string{"Retry-After": "1"},
		},
		{
			name: "backend failure", method: "POST", path: cmdPath,
			backend: func(f *fakeBackend) {
				f.submit = func(context.Context, aggregate.Command) (aggregate.Outcome, error) {
					return aggregate.Outcome{}, errors.New("kafka unreachable")
				}
			},
			body: `{"type":"Add","data":{"n":1},"commandId":"c-4"}`, status: 500,
			errLike: "kafka unreachable", json: map[string]any{"commandId": "c-4"},
		},
		{
			name: "unknown aggregate type", method: "POST", path: "/v1/aggregates/nope/c1/commands",
			body: `{"type":"Add","data":{"n":1}}`, status: 404, errLike: `unknown aggregate type "nope"`, noBackend: true,
		},
		{
			name: "invalid entity id", method: "POST", path: "/v1/aggregates/counter/a%01b/commands",
			body: `{"type":"Add","data":{"n":1}}`, status: 400, errLike: "control character", noBackend: true,
		},
		{
			name: "entity id too long", method: "POST", path: "/v1/aggregates/counter/" + strings.Repeat("x", 257) + "/commands",
			body: `{"type":"Add","data":{"n":1}}`, status: 400, errLike: "the limit is 256", noBackend: true,
		},
		{
			name: "body over the limit", method: "POST", path: cmdPath, opts: []HandlerOption{MaxBodyBytes(64)},
			body: `{"type":"Add","data":{"n":1},"commandId":"` + strings.Repeat("x", 100) + `"}`, status: 413,
			errLike: "limit of 64 bytes", noBackend: true,
		},
		{
			name: "body over the default 1 MiB", method: "POST", path: cmdPath,
			body: `{"type":"Add","data":{"n":1},"commandId":"` + strings.Repeat("x", 1<<20) + `"}`, status: 413,
			errLike: "limit of 1048576 bytes", noBackend: true,
		},
		{
			name: "malformed JSON", method: "POST", path: cmdPath,
			body: `{"type":"Add",`, status: 400, errLike: "not a valid command", noBackend: true,
		},
		{
			name: "syntax error", method: "POST", path: cmdPath,
			body: `{"type" "Add"}`, status: 400, errLike: "invalid JSON at byte", noBackend: true,
		},
		{
			name: "empty body", method: "POST", path: cmdPath,
			status: 400, errLike: "request body is empty", noBackend: true,
		},
		{
			name: "not an object", method: "POST", path: cmdPath,
			body: `[1,2]`, status: 400, errLike: "want a JSON object", noBackend: true,
		},
		{
			name: "trailing data", method: "POST", path: cmdPath,
			body: `{"type":"Add","data":{"n":1}} {}`, status: 400, errLike: "more data after", noBackend: true,
		},
		{
			name: "missing type", method: "POST", path: cmdPath,
			body: `{"data":{"n":1}}`, status: 400, errLike: `no "type"`, noBackend: true,
		},
		{
			name: "unknown top-level field", method: "POST", path: cmdPath,
			body: `{"type":"Add","data":{"n":1},"expectedversoin":3}`, status: 400,
			errLike: `unknown field "expectedversoin"; the fields are type, data`, noBackend: true,
		},
		{
			name: "wrong type of a top-level field", method: "POST", path: cmdPath,
			body: `{"type":"Add","data":{"n":1},"expectedVersion":"3"}`, status: 400,
			errLike: `expectedVersion "3": want a version`, noBackend: true,
		},
		{
			name: "unknown command type lists the known ones", method: "POST", path: cmdPath,
			body: `{"type":"Subtract","data":{"n":1}}`, status: 400,
			errLike: `unknown command type "Subtract" for counter; known command types: Add, Reset`, noBackend: true,
		},
		{
			name: "wrong field types in data", method: "POST", path: cmdPath,
			body: `{"type":"Add","data":{"n":"two"}}`, status: 400,
			errLike: "invalid data for command Add: field n: want int, got string", noBackend: true,
		},
		{
			name: "validation error", method: "POST", path: cmdPath,
			body: `{"type":"Add","data":{"n":0}}`, status: 400,
			json: map[string]any{"error": "n must be positive, got 0"}, noBackend: true,
		},
		{
			name: "negative expectedVersion", method: "POST", path: cmdPath,
			body: `{"type":"Add","data":{"n":1},"expectedVersion":-2}`, status: 400,
			errLike: "expectedVersion -2: want a version", noBackend: true,
		},
		{
			name: "GET on the commands route", method: "GET", path: cmdPath, status: 405,
			header: map[string]string{"Allow": "POST"}, noBackend: true,
		},
	})
}

const statePath = "/v1/aggregates/counter/c1"

func stateOK(f *fakeBackend) {
	f.state = func(context.Context, int64, time.Duration) (State, error) {
		return State{ID: "c1", Version: 3, State: []byte(`{"total":6}`), UpdatedAt: evTime}, nil
	}
}

func wantStateArgs(minVersion int64, wait time.Duration) func(*testing.T, *fakeBackend, map[string]any) {
	return func(t *testing.T, f *fakeBackend, _ map[string]any) {
		if f.minV != minVersion || f.wait != wait {
			t.Errorf("backend got minVersion %d wait %v, want %d and %v", f.minV, f.wait, minVersion, wait)
		}
	}
}

func TestState(t *testing.T) {
	runCases(t, []httpCase{
		{
			name: "state", method: "GET", path: statePath, backend: stateOK, status: 200,
			json: map[string]any{"id": "c1", "version": 3, "state": map[string]any{"total": 6},
				"updatedAt": "2025-01-02T03:04:05.000000006Z"},
			check: wantStateArgs(0, 0),
		},
		{
			name: "minVersion and wait as a duration", method: "GET", path: statePath + "?minVersion=3&wait=2s",
			backend: stateOK, status: 200, check: wantStateArgs(3, 2*time.Second),
		},
		{
			name: "wait in milliseconds", method: "GET", path: statePath + "?minVersion=1&wait=1500",
			backend: stateOK, status: 200, check: wantStateArgs(1, 1500*time.Millisecond),
		},
		{
			name: "wait capped by the default MaxWait", method: "GET", path: statePath + "?minVersion=1&wait=1h",
			backend: stateOK, status: 200, check: wantStateArgs(1, 30*time.Second),
		},
		{
			name: "wait capped by MaxWait", method: "GET", path: statePath + "?minVersion=1&wait=99999999999999999",
			opts: []HandlerOption{MaxWait(time.Second)}, backend: stateOK, status: 200, check: wantStateArgs(1, time.Second),
		},
		{
			name: "negative minVersion", method: "GET", path: statePath + "?minVersion=-1",
			status: 400, errLike: "minVersion", noBackend: true,
		},
		{
			name: "minVersion not a number", method: "GET", path: statePath + "?minVersion=abc",
			status: 400, errLike: "minVersion", noBackend: true,
		},
		{
			name: "wait not a duration", method: "GET", path: statePath + "?wait=soon",
			status: 400, errLike: "wait", noBackend: true,
		},
		{
			name: "negative wait", method: "GET", path: statePath + "?wait=-1s",
			status: 400, errLike: "wait", noBackend: true,
		},
		{
			name: "never existed", method: "GET", path: statePath,
			backend: func(f *fakeBackend) {
				f.state = func(context.Context, int64, time.Duration) (State, error) { return State{}, ErrNotFound }
			},
			status: 404, json: map[string]any{"error": `counter "c1" has no events`},
		},
		{
			name: "not ready", method: "GET", path: statePath,
			backend: func(f *fakeBackend) {
				f.state = func(context.Context, int64, time.Duration) (State, error) {
					return State{}, &NotReadyError{Reason: "restoring", RetryAfter: 3 * time.Second}
				}
			},
			status: 503, header: map[string]string{"Retry-After": "3"}, errLike: "restoring",
		},
		{
			name: "version not reached", method: "GET", path: statePath + "?minVersion=9&wait=10ms",
			backend: func(f *fakeBackend) {
				f.state = func(context.Context, int64, time.Duration) (State, error) {
					return State{Version: 4}, ErrTimeout
				}
			},
			status: 504, json: map[string]any{"currentVersion": 4}, errLike: "did not reach version 9 within 10ms",
		},
		{
			name: "version not reached, current unknown", method: "GET", path: statePath + "?minVersion=9",
			backend: func(f *fakeBackend) {
				f.state = func(context.Context, int64, time.Duration) (State, error) { return State{}, ErrTimeout }
			},
			status: 504, errLike: "did not reach version 9",
			check: func(t *testing.T, _ *fakeBackend, body map[string]any) {
				if _, ok := body["currentVersion"]; ok {
					t.Error("currentVersion reported though unknown")
				}
			},
		},
		{
			name: "corrupt stored state", method: "GET", path: statePath,
			backend: func(f *fakeBackend) {
				f.state = func(context.Context, int64, time.Duration) (State, error) {
					return State{Version: 1, State: []byte("{not json")}, nil
				}
			},
			status: 500, errLike: "not valid JSON",
		},
		{
			name: "unknown aggregate type", method: "GET", path: "/v1/aggregates/nope/c1",
			status: 404, errLike: "unknown aggregate type", noBackend: true,
		},
		{
			name: "POST on the state route", method: "POST", path: statePath, body: "{}",
			status: 405, header: map[string]string{"Allow": "GET, DELETE"}, noBackend: true,
		},
	})
}

const eventsPath = "/v1/aggregates/counter/c1/events"

func wantEventsArgs(from int64, limit int) func(*testing.T, *fakeBackend, map[string]any) {
	return func(t *testing.T, f *fakeBackend, _ map[string]any) {
		if f.from != from || f.limit != limit {
			t.Errorf("backend got from %d limit %d, want %d and %d", f.from, f.limit, from, limit)
		}
	}
}

func TestEvents(t *testing.T) {
	twoEvents := func(f *fakeBackend) {
		f.events = func(from int64, limit int) ([]aggregate.Event, error) {
			return []aggregate.Event{addedEvent(from, 1), addedEvent(from+1, 2)}, nil
		}
	}
	runCases(t, []httpCase{
		{
			name: "defaults", method: "GET", path: eventsPath, backend: twoEvents, status: 200,
			json: map[string]any{"id": "c1", "events": []any{
				map[string]any{"version": 1, "type": "Added", "schemaVersion": 1, "eventId": aggregate.EventID("counter", "c1", 1),
					"time": "2025-01-02T03:04:05.000000006Z", "commandId": "c-1", "data": map[string]any{"n": 1}},
				map[string]any{"version": 2, "type": "Added", "schemaVersion": 1, "eventId": aggregate.EventID("counter", "c1", 2),
					"time": "2025-01-02T03:04:05.000000006Z", "commandId": "c-1", "data": map[string]any{"n": 2}},
			}},
			check: wantEventsArgs(1, 100),
		},
		{
			name: "paging", method: "GET", path: eventsPath + "?from=5&limit=1000", backend: twoEvents, status: 200,
			check: wantEventsArgs(5, 1000),
		},
		{
			name: "none from here on", method: "GET", path: eventsPath + "?from=50", status: 200,
			json: map[string]any{"id": "c1", "events": []any{}},
		},
		{name: "from 0", method: "GET", path: eventsPath + "?from=0", status: 400, errLike: "from", noBackend: true},
		{name: "from not a number", method: "GET", path: eventsPath + "?from=x", status: 400, errLike: "from", noBackend: true},
		{name: "limit 0", method: "GET", path: eventsPath + "?limit=0", status: 400, errLike: "from 1 to 1000", noBackend: true},
		{name: "limit too big", method: "GET", path: eventsPath + "?limit=1001", status: 400, errLike: "from 1 to 1000", noBackend: true},
		{
			name: "never existed", method: "GET", path: eventsPath,
			backend: func(f *fakeBackend) {
				f.events = func(int64, int) ([]aggregate.Event, error) { return nil, ErrNotFound }
			},
			status: 404, errLike: `counter "c1" has no events`,
		},
		{
			name: "not ready", method: "GET", path: eventsPath,
			backend: func(f *fakeBackend) {
				f.events = func(int64, int) ([]aggregate.Event, error) {
					return nil, &NotReadyError{Reason: "rebalancing", RetryAfter: 500 * time.Millisecond}
				}
			},
			status: 503, header: map[string]string{"Retry-After": "1"},
		},
		{name: "invalid id", method: "GET", path: "/v1/aggregates/counter/%7F/events", status: 400, errLike: "control character", noBackend: true},
	})
}

type panicBackend struct{ fakeBackend }

func (*panicBackend) Ready() error { panic("boom") }

func TestOperational(t *testing.T) {
	metrics := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"metrics":true}`)
	})
	runCases(t, []httpCase{
		{name: "healthz", method: "GET", path: "/healthz", status: 200, json: map[string]any{"status": "ok"}, noBackend: true},
		{name: "ready", method: "GET", path: "/readyz", status: 200, json: map[string]any{"status": "ready"}},
		{
			name: "not ready", method: "GET", path: "/readyz",
			backend: func(f *fakeBackend) {
				f.ready = func() error {
					return &NotReadyError{Reason: "restoring counter-changelog/2", RetryAfter: 2500 * time.Millisecond}
				}
			},
			status: 503, header: map[string]string{"Retry-After": "3"},
			json: map[string]any{"error": "restoring counter-changelog/2"},
		},
		{
			name: "readiness check failed", method: "GET", path: "/readyz",
			backend: func(f *fakeBackend) { f.ready = func() error { return errors.New("store closed") } },
			status:  500, errLike: "store closed",
		},
		{name: "unknown route", method: "GET", path: "/v2/nothing", status: 404, errLike: "no route for GET /v2/nothing"},
		{name: "wrong method", method: "DELETE", path: "/healthz", status: 405, header: map[string]string{"Allow": "GET"}, errLike: "use GET"},
		{name: "method chi does not know", method: "BREW", path: "/healthz", status: 405, errLike: "method BREW is not allowed on /healthz"},
		{name: "no metrics handler", method: "GET", path: "/metrics", status: 404},
		{name: "metrics", method: "GET", path: "/metrics", opts: []HandlerOption{Metrics(metrics)}, status: 200, json: map[string]any{"metrics": true}},
	})
}

func TestPanicBecomes500(t *testing.T) {
	b := &panicBackend{fakeBackend{def: counterType()}}
	h := NewHandler(b, Logger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/readyz", nil))
	if rec.Code != 500 || rec.Header().Get("Content-Type") != "application/json" || !strings.Contains(rec.Body.String(), `"error"`) {
		t.Fatalf("got %d %q %s; want a 500 JSON error", rec.Code, rec.Header().Get("Content-Type"), rec.Body.String())
	}
}

func TestRetryAfterSeconds(t *testing.T) {
	for d, want := range map[time.Duration]int{0: 1, -time.Second: 1, time.Millisecond: 1, time.Second: 1, 1001 * time.Millisecond: 2, time.Minute: 60} {
		if got := retryAfterSeconds(d); got != want {
			t.Errorf("retryAfterSeconds(%v) = %d, want %d", d, got, want)
		}
	}
}
