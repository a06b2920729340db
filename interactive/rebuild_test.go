package interactive

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// rebuildBackend is a fakeBackend that can rebuild.
type rebuildBackend struct {
	fakeBackend
	started []string
	err     error
}

func (b *rebuildBackend) StartRebuild(typ string) (RebuildStatus, error) {
	if b.err != nil {
		return RebuildStatus{}, b.err
	}
	b.started = append(b.started, typ)
	return b.RebuildStatus(typ)
}

func (b *rebuildBackend) RebuildStatus(typ string) (RebuildStatus, error) {
	if b.err != nil {
		return RebuildStatus{}, b.err
	}
	if typ != "counter" {
		return RebuildStatus{}, fmt.Errorf("%w: %s", ErrNotFound, typ)
	}
	return RebuildStatus{Type: typ, StateVersion: 2, InProgress: len(b.started) > 0, Partitions: []PartitionRebuild{
		{Partition: 0, ID: 1, State: "running", Online: true, Replayed: 5, Total: 10, Percent: 50, StartedAt: time.Unix(0, 0).UTC()},
	}}, nil
}

func TestRebuildRoutes(t *testing.T) {
	quiet := Logger(slog.New(slog.NewTextHandler(io.Discard, nil)))
	serve := func(b Backend, method, path string) (int, string) {
		rec := httptest.NewRecorder()
		NewHandler(b, quiet).ServeHTTP(rec, httptest.NewRequest(method, path, nil))
		return rec.Code, rec.Body.String()
	}
	b := &rebuildBackend{fakeBackend: fakeBackend{def: counterType()}}
	if code, body := serve(b, "GET", "/v1/admin/rebuild/counter"); code != 200 || !strings.Contains(body, `"inProgress":false`) {
		t.Errorf("status before: %d %s", code, body)
	}
	code, body := serve(b, "POST", "/v1/admin/rebuild/counter")
	if code != 202 || !strings.Contains(body, `"inProgress":true`) || !strings.Contains(body, `"percent":50`) || len(b.started) != 1 {
		t.Errorf("start: %d %s (started %v)", code, body, b.started)
	}
	if code, body := serve(b, "POST", "/v1/admin/rebuild/nope"); code != 404 || !strings.Contains(body, `unknown aggregate type \"nope\"`) {
		t.Errorf("unknown type: %d %s", code, body)
	}
	b.err = &NotReadyError{Reason: "the node is starting", RetryAfter: time.Second}
	if code, body := serve(b, "POST", "/v1/admin/rebuild/counter"); code != 503 || !strings.Contains(body, "the node is starting") {
		t.Errorf("not ready: %d %s", code, body)
	}
	b.err = errors.New("disk on fire")
	if code, body := serve(b, "GET", "/v1/admin/rebuild/counter"); code != 500 || !strings.Contains(body, `"error"`) {
		t.Errorf("failure: %d %s", code, body)
	}
	// A backend that cannot rebuild has no such route.
	if code, body := serve(&fakeBackend{def: counterType()}, "POST", "/v1/admin/rebuild/counter"); code != 404 || !strings.Contains(body, "cannot rebuild") {
		t.Errorf("no Rebuilder: %d %s", code, body)
	}
}
