// Package dashboard serves a node's web dashboard: one HTML page with its
// stylesheet and script, embedded in the binary. The page reads only the
// public HTTP API of the node that served it (GET /v1/cluster, /metrics,
// /v1/aggregates/…, /v1/projections/…), with the API token the user gives
// it, so it shows nothing a client of the API could not see.
package dashboard

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"encoding/json"
	"io/fs"
	"mime"
	"net/http"
	"path"
	"strings"
	"time"
)

// AssetsPrefix is the path under which the page's assets are served.
const AssetsPrefix = "/ui/"

//go:embed assets
var embedded embed.FS

// asset is one embedded file, ready to serve.
type asset struct {
	body        []byte
	contentType string
	etag        string
}

// Handler serves the dashboard: GET / is the page, GET /ui/{file} its
// assets (AssetsPrefix). Any other path, or a file that does not exist,
// answers 404 with a JSON error like the API's. Assets carry an ETag and
// are revalidated on every load, so a new binary's page is never mixed
// with an old cached script.
func Handler() http.Handler {
	files := map[string]asset{}
	err := fs.WalkDir(embedded, "assets", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		body, err := embedded.ReadFile(p)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(body)
		ct := mime.TypeByExtension(path.Ext(p))
		if ct == "" {
			ct = http.DetectContentType(body)
		}
		files[strings.TrimPrefix(p, "assets/")] = asset{body: body, contentType: ct, etag: `"` + hex.EncodeToString(sum[:8]) + `"`}
		return nil
	})
	if err != nil {
		panic("dashboard: reading the embedded assets: " + err.Error()) // the binary is broken
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		name := ""
		switch {
		case r.URL.Path == "/":
			name = "index.html"
		case strings.HasPrefix(r.URL.Path, AssetsPrefix) && r.URL.Path != AssetsPrefix+"index.html":
			name = strings.TrimPrefix(r.URL.Path, AssetsPrefix)
		}
		a, ok := files[name]
		if !ok {
			notFound(w, r)
			return
		}
		h := w.Header()
		h.Set("Content-Type", a.contentType)
		h.Set("ETag", a.etag)
		h.Set("Cache-Control", "no-cache")
		h.Set("X-Content-Type-Options", "nosniff")
		if name == "index.html" {
			// The page loads only its own script and style and talks only
			// to its own node.
			h.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'")
			h.Set("Referrer-Policy", "no-referrer")
		}
		http.ServeContent(w, r, name, time.Time{}, bytes.NewReader(a.body))
	})
}

// notFound answers 404 with {"error": "…"}.
func notFound(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusNotFound)
	_ = json.NewEncoder(w).Encode(map[string]string{
		"error": "no dashboard file at " + r.URL.Path + "; the dashboard is at /",
	})
}
