package interactive

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/internal/fuzzcheck"
)

// Command bodies come from any HTTP client, and the group protocol's
// metadata and assignments from any member of the consumer group. The fuzz
// targets check that their decoders never panic, never allocate much more
// than the input's size, and accept only what round-trips; and that the
// command route answers every body with a JSON answer, never a 5xx.

// allocBudget is how many bytes a decoder may allocate for an input of n
// bytes: a small multiple of the input, never what a length field claims.
func allocBudget(n int) uint64 { return 64*uint64(n) + 16<<10 }

// checkAllocs fails t if fn, a decoding of n bytes, allocates more than
// allocBudget(n).
func checkAllocs(t *testing.T, n int, fn func()) { fuzzcheck.Allocs(t, n, allocBudget, fn) }

// commandBodySeeds are realistic command bodies and edge cases.
var commandBodySeeds = []string{
	`{"type":"Add","data":{"n":5}}`,
	`{"type":"Add","data":{"n":5},"commandId":"c-1","expectedVersion":0,"correlationId":"corr","causationId":"cause"}`,
	` {"type":"Reset"} ` + "\n",
	`{"type":"Add","data":{"n":-1}}`,
	`{"type":"Add","data":{"n":"5"}}`,
	`{"type":"Add","data":[1,2]}`,
	`{"type":"Add","data":null,"expectedVersion":-2}`,
	`{"type":"Add","expectedVersion":"must-exist"}`,
	`{"type":"Add","expectedVersion":1.5}`,
	`{"type":"Add","expectedVersion":99999999999999999999}`,
	`{"type":"Nope"}`,
	`{"type":""}`,
	`{"TYPE":"Add","Data":{"n":1}}`,
	`{"type":"Add","type":"Reset"}`,
	`{"type":"Add","bogus":1}`,
	`{"type":"Add"}{"type":"Add"}`,
	`{"type":"Add"}}`,
	`{"type":"Add"`,
	`{"type":"\ud800"}`,
	"{\"type\":\"\xff\xfe\"}",
	`[{"type":"Add"}]`,
	`"Add"`,
	`null`,
	``,
	"  \t\n",
	`{"type":"Add","data":` + strings.Repeat("[", 9990) + strings.Repeat("]", 9990) + `}`, // just within encoding/json's depth limit
	`{"type":"Add","data":"` + strings.Repeat("x", 5000) + `"}`,
}

func FuzzDecodeCommandBody(f *testing.F) {
	for _, s := range commandBodySeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var cmd aggregate.Command
		var msg string
		checkAllocs(t, len(body), func() { cmd, msg = decodeCommandBody(body) })
		if msg != "" {
			return
		}
		if cmd.Type == "" {
			t.Fatalf("accepted a command without a type: %q", body)
		}
		if !utf8.ValidString(cmd.Type) || len(cmd.Data) > 0 && !json.Valid(cmd.Data) {
			t.Fatalf("accepted %q as %+v", body, cmd)
		}
		// The body a node forwards (the command re-encoded with the id it
		// generated) decodes to the same command.
		fwd, err := commandBody(body, cmd, true)
		if err != nil {
			t.Fatalf("re-encode %+v: %v", cmd, err)
		}
		again, msg := decodeCommandBody(fwd)
		if msg != "" {
			t.Fatalf("re-encoded command %s does not decode: %s", fwd, msg)
		}
		if !sameCommand(again, cmd) {
			t.Fatalf("re-encoding changed the command: %+v, then %+v", cmd, again)
		}
	})
}

// sameCommand compares commands, their data as JSON values.
func sameCommand(a, b aggregate.Command) bool {
	if (a.ExpectedVersion == nil) != (b.ExpectedVersion == nil) ||
		a.ExpectedVersion != nil && *a.ExpectedVersion != *b.ExpectedVersion {
		return false
	}
	return a.Type == b.Type && sameJSONValue(a.Data, b.Data) && a.CommandID == b.CommandID &&
		a.CorrelationID == b.CorrelationID && a.CausationID == b.CausationID
}

// sameJSONValue reports whether a and b are both empty or the same JSON
// value: encoding may escape strings differently ("&" as "\u0026").
func sameJSONValue(a, b []byte) bool {
	if len(a) == 0 || len(b) == 0 {
		return len(a) == len(b)
	}
	decode := func(p []byte) (any, bool) {
		d := json.NewDecoder(bytes.NewReader(p))
		d.UseNumber()
		var v any
		return v, d.Decode(&v) == nil
	}
	x, ok1 := decode(a)
	y, ok2 := decode(b)
	return ok1 && ok2 && reflect.DeepEqual(x, y)
}

// fuzzMaxBody is the body limit of the handler FuzzSubmitCommand drives,
// small enough for the fuzzer to reach 413.
const fuzzMaxBody = 4 << 10

func FuzzSubmitCommand(f *testing.F) {
	for _, s := range commandBodySeeds {
		f.Add("c1", false, []byte(s))
	}
	for _, id := range []string{"", "a/b", "%2F", "%zz", "tab\there", "nul\x00", "\xff", "日本", "..", strings.Repeat("x", 257)} {
		f.Add(id, false, []byte(commandBodySeeds[0]))
		f.Add(id, true, []byte(commandBodySeeds[0]))
	}
	def := counterType()
	// The backend decides for real on an entity that does not exist yet:
	// 200 with events, 409 for an expected version other than 0, 422 when
	// decide refuses.
	backend := &fakeBackend{def: def, submit: func(_ context.Context, cmd aggregate.Command) (aggregate.Outcome, error) {
		if cmd.ExpectedVersion != nil && *cmd.ExpectedVersion != 0 {
			return aggregate.Outcome{Conflict: true}, nil
		}
		c, err := def.DecodeCommand(cmd.Type, cmd.Data)
		if err != nil {
			return aggregate.Outcome{}, err
		}
		evs, err := def.Decide(def.NewState(), c)
		if err != nil {
			return aggregate.Outcome{Reason: err.Error()}, nil
		}
		out := aggregate.Outcome{Accepted: true}
		for i, e := range evs {
			name, schema, data, err := def.EncodeEvent(e)
			if err != nil {
				return aggregate.Outcome{}, err
			}
			v := int64(i + 1)
			out.Events = append(out.Events, aggregate.Event{Version: v, Type: name, SchemaVersion: schema,
				EventID: aggregate.EventID(def.Name(), "c1", v), CommandID: cmd.CommandID, Time: time.Unix(1700000000, 0), Data: data})
			out.Version = v
		}
		return out, nil
	}}
	h := NewHandler(backend, MaxBodyBytes(fuzzMaxBody), Logger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	f.Fuzz(func(t *testing.T, id string, raw bool, body []byte) {
		target := "/v1/aggregates/counter/" + url.PathEscape(id) + "/commands"
		if raw {
			// The id as a client may put it in the request line, escapes
			// and all.
			target = "/v1/aggregates/counter/" + id + "/commands"
		}
		u, err := url.ParseRequestURI(target)
		if err != nil {
			return // net/http refuses such a request line before any handler
		}
		req := httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(body))
		req.URL, req.RequestURI = u, target
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		res := rec.Result()
		backend.mu.Lock()
		submitted := len(backend.calls) > 0
		backend.calls = backend.calls[:0]
		backend.mu.Unlock()

		if res.StatusCode >= 500 {
			t.Fatalf("%s %q: status %d: %s", target, body, res.StatusCode, rec.Body.Bytes())
		}
		if ct := res.Header.Get("Content-Type"); ct != "application/json" {
			t.Fatalf("Content-Type %q", ct)
		}
		var got map[string]any
		if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
			t.Fatalf("status %d: the body is not a JSON object: %v: %q", res.StatusCode, err, rec.Body.Bytes())
		}
		if res.StatusCode >= 400 {
			if msg, ok := got["error"].(string); !ok || msg == "" {
				t.Fatalf("status %d without an error message: %s", res.StatusCode, rec.Body.Bytes())
			}
		}
		// The backend answers with 200, 409 or 422; what the handler
		// refuses (400, 404, 405, 413) never reaches it.
		answered := res.StatusCode == http.StatusOK || res.StatusCode == http.StatusConflict || res.StatusCode == http.StatusUnprocessableEntity
		if answered != submitted {
			t.Fatalf("status %d, submitted to the backend: %v", res.StatusCode, submitted)
		}
		// With a valid entity id, a body over the limit is answered 413,
		// and one the decoder refuses 400 with the decoder's message.
		if raw || aggregate.ValidateEntityID(id) != nil {
			return
		}
		if len(body) > fuzzMaxBody {
			if res.StatusCode != http.StatusRequestEntityTooLarge {
				t.Fatalf("a body of %d bytes, over the limit: status %d", len(body), res.StatusCode)
			}
			return
		}
		if _, msg := decodeCommandBody(body); msg != "" && (res.StatusCode != http.StatusBadRequest || got["error"] != asJSON(msg)) {
			t.Fatalf("%q: status %d %s, want 400 %q", body, res.StatusCode, rec.Body.Bytes(), msg)
		}
	})
}

// asJSON returns s as a client reads it from a JSON answer: invalid UTF-8
// replaced.
func asJSON(s string) string {
	b, _ := json.Marshal(s)
	var out string
	_ = json.Unmarshal(b, &out)
	return out
}
