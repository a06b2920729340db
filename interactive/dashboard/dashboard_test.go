package dashboard

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func get(t *testing.T, h http.Handler, path string, header ...string) *http.Response {
	t.Helper()
	req := httptest.NewRequest(http.MethodGet, path, nil)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Result()
}

// TestHandler: the page at /, its assets under /ui/ with their types and an
// ETag that revalidates, and JSON 404s for anything else.
func TestHandler(t *testing.T) {
	h := Handler()
	for path, want := range map[string]struct{ ct, holds string }{
		"/":                 {"text/html", `src="/ui/dashboard.js"`},
		"/ui/dashboard.js":  {"text/javascript", "RATE_COUNTERS"},
		"/ui/dashboard.css": {"text/css", ".part"},
	} {
		res := get(t, h, path)
		body, _ := io.ReadAll(res.Body)
		if res.StatusCode != 200 || !strings.HasPrefix(res.Header.Get("Content-Type"), want.ct) || !strings.Contains(string(body), want.holds) {
			t.Errorf("GET %s: %d %q, body holds %q: %v", path, res.StatusCode, res.Header.Get("Content-Type"), want.holds, strings.Contains(string(body), want.holds))
		}
		etag := res.Header.Get("ETag")
		if etag == "" || res.Header.Get("Cache-Control") != "no-cache" {
			t.Errorf("GET %s: ETag %q, Cache-Control %q", path, etag, res.Header.Get("Cache-Control"))
		}
		if res := get(t, h, path, "If-None-Match", etag); res.StatusCode != http.StatusNotModified {
			t.Errorf("GET %s with its ETag: %d, want 304", path, res.StatusCode)
		}
	}
	if csp := get(t, h, "/").Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'self'") {
		t.Errorf("page CSP %q", csp)
	}
	for _, path := range []string{"/ui/", "/ui/index.html", "/ui/nope.js", "/ui/../dashboard.go", "/v1"} {
		res := get(t, h, path)
		var body struct{ Error string }
		if err := json.NewDecoder(res.Body).Decode(&body); err != nil || res.StatusCode != 404 || body.Error == "" || res.Header.Get("Content-Type") != "application/json" {
			t.Errorf("GET %s: %d %q %+v %v, want a JSON 404", path, res.StatusCode, res.Header.Get("Content-Type"), body, err)
		}
	}
}
