package interactive

// This file serves projection rows: one row from the owner of its key's
// partition, and ranges merged from the owners of every partition.

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/esker-io/esker/aggregate"
)

// Projections is implemented by a Backend whose node runs projections; the
// handler serves /v1/projections only then.
type Projections interface {
	// HasProjection reports whether a projection of that name runs here.
	HasProjection(name string) bool
	// PersonalKeys reports whether the projection's row keys are
	// personal: rows are stored, partitioned and listed under pseudonyms.
	PersonalKeys(name string) bool
	// ProjectionRowKey returns the key the row named key is stored and
	// partitioned under: key itself, or its pseudonym.
	ProjectionRowKey(ctx context.Context, name, key string) (string, error)
	// ProjectionRow returns one row; ErrNotFound when the row has never
	// been written, a *NotReadyError when this node does not serve the
	// key's partition now.
	ProjectionRow(ctx context.Context, name, key string) (Row, error)
	// ProjectionScan returns, from each of the given partitions, the rows
	// whose keys start with prefix and sort after after, in key order, at
	// most limit of them in all. It fails with a *NotReadyError when this
	// node does not serve one of the partitions now.
	ProjectionScan(ctx context.Context, name string, partitions []int32, prefix, after string, limit int) ([]Row, error)
}

// Row is one row of a projection.
type Row struct {
	Key string `json:"key"`
	// Version counts the changes folded into the row.
	Version   int64           `json:"version"`
	Value     json.RawMessage `json:"value"`
	UpdatedAt time.Time       `json:"updatedAt,omitzero"`
}

// Limits of GET /v1/projections/{name}.
const (
	DefaultRowsLimit = 100
	MaxRowsLimit     = 1000
)

// partitionsParam names the partitions a fanned-out range request asks a
// node for (set by the node that fans out, with the ForwardedHeader).
const partitionsParam = "partitions"

type rowsResponse struct {
	Rows []Row `json:"rows"`
	// Next, when present, continues the listing: pass it as ?after=.
	Next string `json:"next,omitempty"`
}

// projectionName resolves {name}; on failure it has answered 404.
func (a *api) projectionName(w http.ResponseWriter, r *http.Request) (Projections, string, bool) {
	name := pathParam(r, "name")
	p, ok := a.b.(Projections)
	if !ok || !p.HasProjection(name) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("unknown projection %q: no such projection runs on this node", name))
		return nil, "", false
	}
	return p, name, true
}

// projectionRow handles GET /v1/projections/{name}/{key}.
func (a *api) projectionRow(w http.ResponseWriter, r *http.Request) {
	p, name, ok := a.projectionName(w, r)
	if !ok {
		return
	}
	key := pathParam(r, "key")
	if err := aggregate.ValidateEntityID(key); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("invalid row key %q: %v", key, err))
		return
	}
	rowKey, err := p.ProjectionRowKey(r.Context(), name, key)
	var notReady *NotReadyError
	switch {
	case errors.As(err, &notReady):
		writeNotReady(w, notReady, "")
		return
	case err != nil:
		// The keys topic could not be read in time: another attempt may.
		writeRetry(w, http.StatusServiceUnavailable, fmt.Sprintf("cannot find the row of a personal key of projection %s now (%v); retry after the Retry-After delay", name, err), "")
		return
	}
	if a.route(w, r, "projection "+name, rowKey, forwardRequest{timeout: a.cfg.maxWait + a.cfg.forwardSlack}) {
		return
	}
	row, err := p.ProjectionRow(r.Context(), name, key)
	switch {
	case err == nil:
		writeJSON(w, http.StatusOK, row)
	case errors.As(err, &notReady):
		writeNotReady(w, notReady, "")
	case errors.Is(err, ErrNotFound):
		writeError(w, http.StatusNotFound, fmt.Sprintf("projection %s has no row %q", name, key))
	default:
		a.internal(w, r, "read a projection row", err, "")
	}
}

// projectionRows handles GET /v1/projections/{name}?prefix=&after=&limit=:
// the rows of every partition, merged in key order.
func (a *api) projectionRows(w http.ResponseWriter, r *http.Request) {
	p, name, ok := a.projectionName(w, r)
	if !ok {
		return
	}
	q := r.URL.Query()
	limit := DefaultRowsLimit
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("query parameter limit=%q: want a number of rows, 1 to %d", s, MaxRowsLimit))
			return
		}
		limit = min(n, MaxRowsLimit)
	}
	prefix := q.Get("prefix")
	if prefix != "" && p.PersonalKeys(name) {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("projection %s has personal keys: its rows are listed under pseudonyms, so prefix= does not apply; read a row by its key, GET /v1/projections/%s/{key}", name, name))
		return
	}
	after := ""
	if s := q.Get("after"); s != "" {
		b, err := base64.RawURLEncoding.DecodeString(s)
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("query parameter after=%q is not a continuation token: pass the \"next\" of the previous page", s))
			return
		}
		after = string(b)
	}
	n := int32(0)
	if a.rt != nil {
		n = a.rt.Partitions()
	}
	if s := q.Get(partitionsParam); s != "" && isForwarded(r) {
		// Another node fans out to this one: serve the partitions named.
		parts, err := parsePartitions(s)
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		rows, err := p.ProjectionScan(r.Context(), name, parts, prefix, after, limit)
		a.writeRows(w, r, rows, err, limit)
		return
	}
	if n <= 0 { // no router, or no partition count yet: ask the backend for all
		rows, err := p.ProjectionScan(r.Context(), name, nil, prefix, after, limit)
		a.writeRows(w, r, rows, err, limit)
		return
	}
	// Group the partitions by owner; one request per owner.
	byOwner := map[string][]int32{}
	var local []int32
	for part := range n {
		owner, self, ok := a.rt.Owner(part)
		switch {
		case ok && self:
			local = append(local, part)
		case !ok || owner == "":
			writeRetry(w, http.StatusServiceUnavailable, fmt.Sprintf("no node serves partition %d of projection %s right now (the cluster is rebalancing); retry after the Retry-After delay", part, name), "")
			return
		default:
			byOwner[owner] = append(byOwner[owner], part)
		}
	}
	var (
		mu     sync.Mutex
		all    []Row
		failed error
		wg     sync.WaitGroup
	)
	collect := func(rows []Row, err error) {
		mu.Lock()
		defer mu.Unlock()
		if err != nil && failed == nil {
			failed = err
		}
		all = append(all, rows...)
	}
	if len(local) > 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			collect(p.ProjectionScan(r.Context(), name, local, prefix, after, limit))
		}()
	}
	for owner, parts := range byOwner {
		wg.Add(1)
		go func() {
			defer wg.Done()
			collect(a.fetchRows(r, owner, parts, limit))
		}()
	}
	wg.Wait()
	slices.SortFunc(all, func(x, y Row) int { return strings.Compare(x.Key, y.Key) })
	a.writeRows(w, r, all, failed, limit)
}

// writeRows answers a range: rows sorted by key, cut at limit, with a
// continuation token when the cut dropped any (or may have).
func (a *api) writeRows(w http.ResponseWriter, r *http.Request, rows []Row, err error, limit int) {
	var notReady *NotReadyError
	switch {
	case errors.As(err, &notReady):
		writeNotReady(w, notReady, "")
		return
	case err != nil:
		a.internal(w, r, "list projection rows", err, "")
		return
	}
	resp := rowsResponse{Rows: rows}
	if resp.Rows == nil {
		resp.Rows = []Row{}
	}
	if len(rows) >= limit {
		// Each source returned at most limit rows: with limit or more in
		// all, more may follow the last one shown.
		resp.Rows = rows[:limit]
		resp.Next = base64.RawURLEncoding.EncodeToString([]byte(rows[limit-1].Key))
	}
	writeJSON(w, http.StatusOK, resp)
}

// fetchRows asks owner for its rows of parts, one hop.
func (a *api) fetchRows(r *http.Request, owner string, parts []int32, limit int) ([]Row, error) {
	ctx, cancel := context.WithTimeout(r.Context(), a.cfg.maxWait+a.cfg.forwardSlack)
	defer cancel()
	q := r.URL.Query()
	q.Set("limit", strconv.Itoa(limit))
	ps := make([]string, len(parts))
	for i, p := range parts {
		ps[i] = strconv.Itoa(int(p))
	}
	q.Set(partitionsParam, strings.Join(ps, ","))
	target := strings.TrimRight(owner, "/") + r.URL.Path + "?" + q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		return nil, &NotReadyError{Reason: fmt.Sprintf("the node serving partitions %v has an unusable URL %q", parts, owner), RetryAfter: time.Second}
	}
	a.markForwarded(r, req, nil)
	res, err := a.client.Do(req)
	if err != nil {
		return nil, &NotReadyError{Reason: fmt.Sprintf("the node serving partitions %v (%s) did not answer: %v", parts, owner, err), RetryAfter: time.Second}
	}
	defer res.Body.Close()
	body, err := io.ReadAll(io.LimitReader(res.Body, 64<<20))
	if err != nil {
		return nil, &NotReadyError{Reason: fmt.Sprintf("reading the rows of partitions %v from %s: %v", parts, owner, err), RetryAfter: time.Second}
	}
	if res.StatusCode != http.StatusOK {
		var e errorBody
		_ = json.Unmarshal(body, &e)
		return nil, &NotReadyError{Reason: fmt.Sprintf("the node serving partitions %v (%s) answered %d: %s", parts, owner, res.StatusCode, e.Error), RetryAfter: time.Second}
	}
	var rr rowsResponse
	if err := json.Unmarshal(body, &rr); err != nil {
		return nil, fmt.Errorf("decode the rows of partitions %v from %s: %w", parts, owner, err)
	}
	return rr.Rows, nil
}

func parsePartitions(s string) ([]int32, error) {
	var out []int32
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.ParseInt(f, 10, 32)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("query parameter %s=%q: want partition numbers separated by commas", partitionsParam, url.QueryEscape(s))
		}
		out = append(out, int32(n))
	}
	return out, nil
}
