package interactive

// This file serves Server-Sent Events: GET /v1/aggregates/{type}/{id}/watch
// (one entity's versions as they commit, from the owner of its partition)
// and GET /v1/streams/{type} (every event of an aggregate type, from its
// events topic, on any node), and relays a forwarded stream chunk by chunk.

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/esker-io/esker/aggregate"
)

// Watcher is implemented by a Backend that can follow one entity's versions
// as they commit; the handler serves GET /v1/aggregates/{type}/{id}/watch
// only then (404 otherwise).
type Watcher interface {
	// WatchEntity opens a feed of the entity's committed versions from
	// version from (≥ 1) on; with from 0, of the versions after its
	// current one. The entity need not exist yet. It fails with a
	// *NotReadyError when this node does not serve the entity's partition
	// now (there is no feed to close then). It does little work: the
	// catch-up happens in the feed's Next.
	WatchEntity(ctx context.Context, aggregateType, id string, from int64) (EntityFeed, error)
}

// EntityFeed is one entity's committed versions, in order, each once. One
// goroutine uses it.
type EntityFeed interface {
	// From is the first version the feed returns (with WatchEntity's from
	// 0: the version after the current one when the feed opened).
	From() int64
	// Next returns the next versions, at most max of them, with the
	// entity's current version (head) as far as the feed has read. It
	// waits until at least one version has committed, or ctx ends: then
	// it returns no versions and a nil error (the caller tells why from
	// its ctx). It fails with a *StreamEndedError when this node stops
	// serving the partition (every version returned before is committed:
	// the client resumes after the last one at the partition's next
	// owner), and with any other error when the store cannot be read or
	// the state cannot be computed.
	Next(ctx context.Context, max int) (versions []EntityVersion, head int64, err error)
	// Close releases the feed.
	Close()
}

// EntityVersion is one version of an entity: the event that made it and
// the state after it.
type EntityVersion struct {
	Event aggregate.Event
	// State is the encoded state after Event (the aggregate's codec).
	State []byte
}

// EventStreams is implemented by a Backend that can read an aggregate
// type's events topic; the handler serves GET /v1/streams/{type} only then
// (404 otherwise).
type EventStreams interface {
	// StreamEvents reads every committed event of the aggregate type from
	// its events topic (read_committed), each partition in offset order,
	// from the position from: partition → offset of the next record to
	// read. A partition that from does not name starts at its beginning,
	// or with fromEnd at its end (the last stable offset: the next event
	// to commit). It fails with an error wrapping ErrInvalidPosition when
	// from names a partition or offset the topic cannot have, and with a
	// *NotReadyError when the node cannot read the topic now.
	StreamEvents(ctx context.Context, aggregateType string, from map[int32]int64, fromEnd bool) (EventStream, error)
}

// EventStream is a reader of an events topic. One goroutine uses it.
type EventStream interface {
	// Start is the position the stream started at, with every partition
	// of the topic: partition → offset of the next record.
	Start() map[int32]int64
	// Next returns the next events; it waits until there is one or ctx
	// ends (then it returns none and a nil error). It fails with a
	// *StreamEndedError when the node stops, and with another error when
	// the topic cannot be read.
	Next(ctx context.Context) ([]StreamedEvent, error)
	// Close releases the reader.
	Close()
}

// StreamedEvent is an event as it lies in its events topic.
type StreamedEvent struct {
	Partition int32
	Offset    int64
	Event     aggregate.Event
}

// StreamSettings may be implemented by a Backend to tune the SSE routes;
// without it, or for a zero field, the defaults apply.
type StreamSettings interface {
	StreamSettings() SSESettings
}

// SSESettings tunes the SSE routes.
type SSESettings struct {
	// Heartbeat is how long a stream may be silent before the node sends
	// a comment (": ping"), so that proxies and clients see it alive.
	// Default 15s.
	Heartbeat time.Duration
	// Buffer is how many versions a watch holds in memory at once, and
	// how far a watch that has caught up may fall behind the entity (in
	// versions committed but not sent) before it is ended as slow: the
	// client reconnects with Last-Event-ID and catches up from the store.
	// Default 1024.
	Buffer int
	// WriteTimeout is how long one write to a client may take; a client
	// that does not read for that long is disconnected as slow. Default
	// 30s.
	WriteTimeout time.Duration
}

// Defaults of SSESettings.
const (
	DefaultSSEHeartbeat    = 15 * time.Second
	DefaultWatchBuffer     = 1024
	DefaultSSEWriteTimeout = 30 * time.Second
)

// SSERetry is the reconnection delay the SSE routes ask clients for
// (the "retry:" field), in milliseconds.
const SSERetry = 1000

// Reasons a watch or stream ends: the "reason" of its final "end" event and
// the label of esker_watch_disconnects_total.
const (
	// EndSlow: the client fell too far behind, or stopped reading.
	EndSlow = "slow"
	// EndMoved: the entity's partition left this node (revoked, lease
	// lost), or the node the stream was forwarded to was lost.
	EndMoved = "moved"
	// EndStopped: the node is stopping.
	EndStopped = "stopped"
	// EndClient: the client went away (no end event: nobody reads it).
	EndClient = "client"
	// EndError: the node could not read the entity or the topic; it
	// logged why.
	EndError = "error"
)

// StreamEndedError ends a feed or stream that the client should resume
// elsewhere or later, with Last-Event-ID.
type StreamEndedError struct {
	// Reason is EndMoved or EndStopped.
	Reason string
	// Message says what happened, for a person.
	Message string
}

func (e *StreamEndedError) Error() string { return e.Reason + ": " + e.Message }

// ErrInvalidPosition: a stream position names a partition or offset the
// topic cannot have.
var ErrInvalidPosition = errors.New("invalid stream position")

// Routes of esker_watch_streams.
const (
	sseRouteWatch  = "watch"
	sseRouteStream = "stream"
)

// sseMetrics are the SSE routes' metrics:
//
//	esker_watch_streams{route}             open SSE streams this node serves (watch, stream)
//	esker_watch_disconnects_total{reason}  streams ended, by reason (slow, moved, stopped, client, error)
//
// A stream forwarded to the owner of a partition is counted by the owner.
type sseMetrics struct {
	streams     *prometheus.GaugeVec
	disconnects *prometheus.CounterVec
}

func newSSEMetrics(reg prometheus.Registerer) *sseMetrics {
	m := &sseMetrics{
		streams: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "esker_watch_streams",
			Help: "Open Server-Sent Events streams this node serves, by route (watch: one entity; stream: an aggregate type's events topic).",
		}, []string{"route"}),
		disconnects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "esker_watch_disconnects_total",
			Help: "Server-Sent Events streams ended, by reason (slow, moved, stopped, client, error).",
		}, []string{"reason"}),
	}
	if reg != nil {
		m.streams = register(reg, m.streams)
		m.disconnects = register(reg, m.disconnects)
	}
	for _, route := range []string{sseRouteWatch, sseRouteStream} {
		m.streams.WithLabelValues(route) // export every route from 0
	}
	for _, reason := range []string{EndSlow, EndMoved, EndStopped, EndClient, EndError} {
		m.disconnects.WithLabelValues(reason)
	}
	return m
}

// sseRoutes serves the SSE routes of one handler.
type sseRoutes struct {
	a        *api
	settings SSESettings
	metrics  *sseMetrics
	stops    *serverStops
}

// newSSERoutes returns the SSE routes of a's handler. Its metrics are
// registered with the handler's Registerer (shared with any registered
// before).
func newSSERoutes(a *api) *sseRoutes {
	s := SSESettings{}
	if t, ok := a.b.(StreamSettings); ok {
		s = t.StreamSettings()
	}
	if s.Heartbeat <= 0 {
		s.Heartbeat = DefaultSSEHeartbeat
	}
	if s.Buffer <= 0 {
		s.Buffer = DefaultWatchBuffer
	}
	if s.WriteTimeout <= 0 {
		s.WriteTimeout = DefaultSSEWriteTimeout
	}
	return &sseRoutes{a: a, settings: s, metrics: newSSEMetrics(a.cfg.registerer), stops: &serverStops{}}
}

// serverStops tells streams that the http.Server serving them shuts down:
// Server.Shutdown waits for handlers to return and does not cancel their
// contexts, so a stream that did not notice would hold the shutdown up
// until its deadline.
type serverStops struct {
	mu sync.Mutex
	m  map[*http.Server]chan struct{}
}

// of returns a channel closed when the server serving r shuts down (nil,
// never closed, when r does not name its server).
func (s *serverStops) of(r *http.Request) <-chan struct{} {
	srv, ok := r.Context().Value(http.ServerContextKey).(*http.Server)
	if !ok || srv == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ch, ok := s.m[srv]
	if !ok {
		if s.m == nil {
			s.m = map[*http.Server]chan struct{}{}
		}
		ch = make(chan struct{})
		s.m[srv] = ch
		srv.RegisterOnShutdown(func() { close(ch) })
	}
	return ch
}

// errServerStopping is the cause of a stream's context when its server
// shuts down.
var errServerStopping = errors.New("the node is stopping")

// streamContext returns a context that ends when the client goes away or
// the server shuts down (cause errServerStopping).
func (s *sseRoutes) streamContext(r *http.Request) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(r.Context())
	if stopping := s.stops.of(r); stopping != nil {
		go func() {
			select {
			case <-stopping:
				cancel(errServerStopping)
			case <-ctx.Done():
			}
		}()
	}
	return ctx, func() { cancel(nil) }
}

// endReason says why ctx ended: the server stops, or the client left.
func endReason(ctx context.Context) string {
	if errors.Is(context.Cause(ctx), errServerStopping) {
		return EndStopped
	}
	return EndClient
}

// sseWriter writes Server-Sent Events: it collects fields in a buffer and
// send writes them with one Write and a Flush, under a write deadline.
type sseWriter struct {
	w            http.ResponseWriter
	rc           *http.ResponseController
	buf          bytes.Buffer
	writeTimeout time.Duration
	// broken is set after a failed write: the connection is unusable.
	broken bool
}

// startSSE answers 200 with the event-stream headers and returns a writer.
func startSSE(w http.ResponseWriter, writeTimeout time.Duration) *sseWriter {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // nginx: do not buffer the stream
	w.WriteHeader(http.StatusOK)
	return &sseWriter{w: w, rc: http.NewResponseController(w), writeTimeout: writeTimeout}
}

// field writes "name: value" lines, one per line of value (data that holds
// a newline becomes several data fields, which the client joins again).
func (s *sseWriter) field(name, value string) {
	for {
		line, rest, more := strings.Cut(value, "\n")
		s.buf.WriteString(name)
		s.buf.WriteString(": ")
		s.buf.WriteString(strings.TrimSuffix(line, "\r"))
		s.buf.WriteByte('\n')
		if !more {
			return
		}
		value = rest
	}
}

// oneLine replaces line breaks with spaces, for a field that must stay one
// line.
var oneLine = strings.NewReplacer("\r", " ", "\n", " ")

// event writes one event: id (may be empty), type and JSON data.
func (s *sseWriter) event(id, typ string, data []byte) {
	if id != "" {
		s.field("id", id)
	}
	if typ != "" {
		s.field("event", oneLine.Replace(typ))
	}
	s.field("data", string(data))
	s.buf.WriteByte('\n')
}

// position writes a block that sets the client's last event id without
// dispatching an event (a block without data), and the retry delay.
func (s *sseWriter) position(id, comment string) {
	if comment != "" {
		s.comment(comment)
	}
	s.field("retry", strconv.Itoa(SSERetry))
	s.field("id", id)
	s.buf.WriteByte('\n')
}

// comment writes a comment line, which clients ignore.
func (s *sseWriter) comment(text string) {
	s.field("", text)
}

// ping writes a heartbeat: a comment in a block of its own.
func (s *sseWriter) ping() {
	s.comment("ping")
	s.buf.WriteByte('\n')
}

// send writes what was collected and flushes it to the client. It fails
// when the client does not take it within the write timeout
// (os.ErrDeadlineExceeded) or the connection is gone.
func (s *sseWriter) send() error {
	if s.broken {
		return errors.New("the connection failed before")
	}
	if s.writeTimeout > 0 {
		_ = s.rc.SetWriteDeadline(time.Now().Add(s.writeTimeout)) // not supported: no deadline
	}
	_, err := s.w.Write(s.buf.Bytes())
	s.buf.Reset()
	if err == nil {
		err = s.rc.Flush()
	}
	if err != nil {
		s.broken = true
	}
	return err
}

// finish lifts the write deadline, so that a kept-alive connection serves
// the next request without it.
func (s *sseWriter) finish() {
	if !s.broken {
		_ = s.rc.SetWriteDeadline(time.Time{})
	}
}

// endEvent is the data of the final "end" event of a stream.
type endEvent struct {
	Reason  string `json:"reason"`
	Message string `json:"message"`
	// LastEventID is the id of the last event sent (the stream's start
	// position when none was sent): reconnect with it as Last-Event-ID.
	LastEventID string `json:"lastEventId"`
}

// end counts the end of a stream and, unless the client left or the
// connection broke, writes the final event: a comment, the retry delay and
// an "end" event saying why. The event has no id, so the client's last
// event id stays that of the last event it got.
func (s *sseRoutes) end(sw *sseWriter, reason, message, lastID string) {
	s.metrics.disconnects.WithLabelValues(reason).Inc()
	if reason == EndClient || sw.broken {
		return
	}
	writeEnd(sw, reason, message, lastID)
	_ = sw.send()
}

// open starts a validated SSE request's stream on route: it counts the
// stream, answers 200 with the event-stream headers and writes the client's
// starting position (lastID, the retry delay and comment), to be sent with
// flush. It returns the stream's context (see streamContext), its writer,
// and done, to call when the stream ends.
func (s *sseRoutes) open(w http.ResponseWriter, r *http.Request, route, lastID, comment string) (context.Context, *sseWriter, func()) {
	ctx, cancel := s.streamContext(r)
	s.metrics.streams.WithLabelValues(route).Inc()
	sw := startSSE(w, s.settings.WriteTimeout)
	sw.position(lastID, comment)
	return ctx, sw, func() {
		sw.finish()
		s.metrics.streams.WithLabelValues(route).Dec()
		cancel()
	}
}

// flush sends what sw collected. When the write fails it ends the stream
// (slow, or the client left) and returns false.
func (s *sseRoutes) flush(sw *sseWriter, lastID string) bool {
	if err := sw.send(); err != nil {
		s.end(sw, writeFailure(err), "", lastID)
		return false
	}
	return true
}

// idle follows a wait that brought nothing: when ctx has ended (the server
// stops, or the client left) it ends the stream and returns false;
// otherwise it writes a heartbeat.
func (s *sseRoutes) idle(ctx context.Context, sw *sseWriter, lastID string) bool {
	if ctx.Err() != nil {
		s.end(sw, endReason(ctx), "the node is stopping", lastID)
		return false
	}
	sw.ping()
	return true
}

func writeEnd(sw *sseWriter, reason, message, lastID string) {
	data, _ := json.Marshal(endEvent{Reason: reason, Message: message, LastEventID: lastID}) // cannot fail
	sw.comment("stream ends (" + reason + "): reconnect with Last-Event-ID")
	sw.field("retry", strconv.Itoa(SSERetry))
	sw.event("", "end", data)
}

// watchEventJSON is one version of a watched entity.
type watchEventJSON struct {
	eventJSON
	// State is the entity's state after this version.
	State json.RawMessage `json:"state"`
}

// watch handles GET /v1/aggregates/{type}/{id}/watch.
func (s *sseRoutes) watch(w http.ResponseWriter, r *http.Request) {
	a := s.a
	def, typ, id, ok := a.target(w, r)
	if !ok {
		return
	}
	watcher, ok := a.b.(Watcher)
	if !ok {
		writeError(w, http.StatusNotFound, "this node does not serve watches")
		return
	}
	var from int64 // 0: the versions after the current one
	if v := r.URL.Query().Get("fromVersion"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 1 {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("query parameter fromVersion=%q: want a version, an integer ≥ 1 (1: the whole history; without it: only versions to come)", v))
			return
		}
		from = n
	}
	if v := r.Header.Get("Last-Event-ID"); v != "" {
		n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		if err != nil || n < 0 || n == math.MaxInt64 {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("header Last-Event-ID %q is not an id this route sends: want a version, an integer ≥ 0", v))
			return
		}
		from = n + 1 // resumes after the last version the client got
	}
	if a.route(w, r, typ, id, forwardRequest{timeout: a.cfg.maxWait + a.cfg.forwardSlack, stream: s.relay(r)}) {
		return
	}

	feed, err := watcher.WatchEntity(r.Context(), typ, id, from)
	if err != nil {
		a.readFailed(w, r, typ, id, "watch", err)
		return
	}
	defer feed.Close()

	last := feed.From() - 1 // the last version the client has
	lastID := strconv.FormatInt(last, 10)
	ctx, sw, done := s.open(w, r, sseRouteWatch, lastID, fmt.Sprintf("watching %s %q from version %d", typ, id, last+1))
	defer done()
	if !s.flush(sw, lastID) {
		return
	}
	// live: the client has had every version committed at some point;
	// from then on, falling more than Buffer versions behind is slow.
	live := false
	for {
		waitCtx, stopWait := context.WithTimeout(ctx, s.settings.Heartbeat)
		versions, head, err := feed.Next(waitCtx, s.settings.Buffer)
		stopWait()
		var ended *StreamEndedError
		switch {
		case errors.As(err, &ended):
			s.end(sw, ended.Reason, ended.Message, lastID)
			return
		case err != nil:
			a.log.ErrorContext(r.Context(), "http: watch failed", "type", typ, "id", id, "lastVersion", last, "err", err)
			s.end(sw, EndError, "the node could not read the entity: "+err.Error(), lastID)
			return
		}
		if len(versions) == 0 {
			if !s.idle(ctx, sw, lastID) {
				return
			}
		} else if err := s.writeVersions(sw, def, versions); err != nil {
			a.log.ErrorContext(r.Context(), "http: encoding a watched version failed", "type", typ, "id", id, "lastVersion", last, "err", err)
			s.end(sw, EndError, "the node could not encode the next version: "+err.Error(), lastID)
			return
		}
		if !s.flush(sw, lastID) {
			return
		}
		if len(versions) > 0 {
			last = versions[len(versions)-1].Event.Version
			lastID = strconv.FormatInt(last, 10)
		}
		if last >= head {
			live = true
		} else if live && head-last > int64(s.settings.Buffer) {
			s.end(sw, EndSlow, fmt.Sprintf("the client is %d versions behind %s %q (more than %d)", head-last, typ, id, s.settings.Buffer), lastID)
			return
		}
	}
}

// writeFailure is the end reason of a failed write: a client that did not
// read within the write timeout is slow; any other failure means it left.
func writeFailure(err error) string {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return EndSlow
	}
	return EndClient
}

func (s *sseRoutes) writeVersions(sw *sseWriter, def aggregate.Definition, versions []EntityVersion) error {
	evs := make([]aggregate.Event, len(versions))
	for i, v := range versions {
		evs[i] = v.Event
	}
	out, err := eventsJSON(def, evs)
	if err != nil {
		return err
	}
	for i, v := range versions {
		state, err := stateJSON(def, v.State)
		if err != nil {
			return fmt.Errorf("state after version %d: %w", v.Event.Version, err)
		}
		data, err := json.Marshal(watchEventJSON{eventJSON: out[i], State: state})
		if err != nil {
			return err
		}
		sw.event(strconv.FormatInt(v.Event.Version, 10), v.Event.Type, data)
	}
	return nil
}

// streamEventJSON is one event of an aggregate type's stream.
type streamEventJSON struct {
	// ID is the entity's id.
	ID string `json:"id"`
	eventJSON
	Partition int32 `json:"partition"`
	Offset    int64 `json:"offset"`
}

// stream handles GET /v1/streams/{type}.
func (s *sseRoutes) stream(w http.ResponseWriter, r *http.Request) {
	a := s.a
	typ := pathParam(r, "type")
	def, found := a.b.Definition(typ)
	if !found || def == nil {
		writeError(w, http.StatusNotFound, fmt.Sprintf("unknown aggregate type %q: no such type is registered on this node", typ))
		return
	}
	streams, ok := a.b.(EventStreams)
	if !ok {
		writeError(w, http.StatusNotFound, "this node does not serve event streams")
		return
	}
	var from map[int32]int64
	fromEnd := false
	switch v := r.URL.Query().Get("from"); v {
	case "", "start":
	case "end":
		fromEnd = true
	default:
		pos, err := DecodePosition(v)
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("query parameter from=%q: want start, end, or a position token (an event id of this stream): %v", v, err))
			return
		}
		from = pos
	}
	if v := r.Header.Get("Last-Event-ID"); v != "" {
		pos, err := DecodePosition(strings.TrimSpace(v))
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("header Last-Event-ID %q is not an id this route sends (a position token): %v", v, err))
			return
		}
		from, fromEnd = pos, false
	}

	es, err := streams.StreamEvents(r.Context(), typ, from, fromEnd)
	if err != nil {
		var notReady *NotReadyError
		switch {
		case errors.Is(err, ErrInvalidPosition):
			writeError(w, http.StatusBadRequest, err.Error())
		case errors.As(err, &notReady):
			writeNotReady(w, notReady, "")
		default:
			a.internal(w, r, "open the event stream", err, "")
		}
		return
	}
	defer es.Close()

	pos := make(map[int32]int64, len(es.Start()))
	maps.Copy(pos, es.Start())
	lastID := EncodePosition(pos)
	ctx, sw, done := s.open(w, r, sseRouteStream, lastID, fmt.Sprintf("streaming the events of %s", typ))
	defer done()
	if !s.flush(sw, lastID) {
		return
	}
	for {
		waitCtx, stopWait := context.WithTimeout(ctx, s.settings.Heartbeat)
		evs, err := es.Next(waitCtx)
		stopWait()
		var ended *StreamEndedError
		switch {
		case errors.As(err, &ended):
			s.end(sw, ended.Reason, ended.Message, lastID)
			return
		case err != nil:
			a.log.ErrorContext(r.Context(), "http: event stream failed", "type", typ, "err", err)
			s.end(sw, EndError, "the node could not read the events topic: "+err.Error(), lastID)
			return
		}
		if len(evs) == 0 && !s.idle(ctx, sw, lastID) {
			return
		}
		for _, ev := range evs {
			data, err := streamEventData(def, ev)
			if err != nil {
				a.log.ErrorContext(r.Context(), "http: encoding a streamed event failed", "type", typ, "partition", ev.Partition, "offset", ev.Offset, "err", err)
				s.end(sw, EndError, fmt.Sprintf("the node could not encode the event at offset %d of partition %d: %v", ev.Offset, ev.Partition, err), lastID)
				return
			}
			pos[ev.Partition] = ev.Offset + 1
			lastID = EncodePosition(pos)
			sw.event(lastID, ev.Event.Type, data)
		}
		if !s.flush(sw, lastID) {
			return
		}
	}
}

func streamEventData(def aggregate.Definition, ev StreamedEvent) ([]byte, error) {
	out, err := eventsJSON(def, []aggregate.Event{ev.Event})
	if err != nil {
		return nil, err
	}
	return json.Marshal(streamEventJSON{ID: ev.Event.EntityID, eventJSON: out[0], Partition: ev.Partition, Offset: ev.Offset})
}

// EncodePosition returns the position token of a stream: base64url (no
// padding) of the JSON object {"<partition>": <offset of the next record>}.
func EncodePosition(pos map[int32]int64) string {
	parts := make([]int32, 0, len(pos))
	for p := range pos {
		parts = append(parts, p)
	}
	sort.Slice(parts, func(i, j int) bool { return parts[i] < parts[j] })
	b := []byte{'{'}
	for i, p := range parts {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, '"')
		b = strconv.AppendInt(b, int64(p), 10)
		b = append(b, '"', ':')
		b = strconv.AppendInt(b, pos[p], 10)
	}
	b = append(b, '}')
	return base64.RawURLEncoding.EncodeToString(b)
}

// DecodePosition parses a position token (see EncodePosition). It fails
// on anything else, and on negative partitions or offsets.
func DecodePosition(token string) (map[int32]int64, error) {
	raw, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(token, "="))
	if err != nil {
		return nil, errors.New("not base64url")
	}
	var m map[string]int64
	if err := json.Unmarshal(raw, &m); err != nil || m == nil {
		return nil, errors.New(`not a JSON object {"partition": offset}`)
	}
	pos := make(map[int32]int64, len(m))
	for k, off := range m {
		p, err := strconv.ParseInt(k, 10, 32)
		if err != nil || p < 0 {
			return nil, fmt.Errorf("partition %q is not an integer ≥ 0", k)
		}
		if off < 0 {
			return nil, fmt.Errorf("partition %d: offset %d is negative", p, off)
		}
		pos[int32(p)] = off
	}
	return pos, nil
}

// streamRelay relays an owner's event stream to the client that asked this
// node (see forward): chunk by chunk, each flushed at once.
type streamRelay struct {
	s *sseRoutes
	// stopping is closed when this node's server shuts down.
	stopping <-chan struct{}

	headerTimer *time.Timer
	mu          sync.Mutex
	timedOut    bool
}

// relay returns the relay for a forwarded stream request r.
func (s *sseRoutes) relay(r *http.Request) *streamRelay {
	return &streamRelay{s: s, stopping: s.stops.of(r)}
}

// forwardContext returns the context of a forwarded stream: timeout bounds
// only the wait for the owner's answer headers (see answered); the body is
// relayed until the client leaves, the owner ends it, or this node's server
// shuts down.
func (sr *streamRelay) forwardContext(parent context.Context, timeout time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(parent)
	sr.headerTimer = time.AfterFunc(timeout, func() {
		sr.mu.Lock()
		sr.timedOut = true
		sr.mu.Unlock()
		cancel()
	})
	if sr.stopping != nil {
		go func() {
			select {
			case <-sr.stopping:
				cancel()
			case <-ctx.Done():
			}
		}()
	}
	return ctx, func() { sr.headerTimer.Stop(); cancel() }
}

// answered is called when the owner's answer headers came (err nil) or the
// request failed: it stops the header timeout, and turns the failure it
// caused into a deadline error.
func (sr *streamRelay) answered(err error) error {
	sr.headerTimer.Stop()
	sr.mu.Lock()
	defer sr.mu.Unlock()
	if err != nil && sr.timedOut {
		return fmt.Errorf("%w: %v", context.DeadlineExceeded, err)
	}
	return err
}

// isEventStream reports whether an answer is Server-Sent Events.
func isEventStream(h http.Header) bool {
	ct, _, _ := strings.Cut(h.Get("Content-Type"), ";")
	return strings.EqualFold(strings.TrimSpace(ct), "text/event-stream")
}

// relay copies the owner's event stream to w, flushing each chunk as it
// arrives. When the owner's stream breaks (the owner died or this node
// stops) and what was relayed ends between two events, it ends the
// client's stream as the owner would have: retry delay and an "end" event
// (reason moved or stopped), so the client reconnects with its
// Last-Event-ID. A stream broken inside an event is just closed: clients
// drop an event cut short. It returns the error that broke the relay (nil
// when the owner ended the stream, or the client left).
func (sr *streamRelay) relay(w http.ResponseWriter, r *http.Request, body io.Reader, owner string, partition int32, typ string) error {
	sw := &sseWriter{w: w, rc: http.NewResponseController(w), writeTimeout: sr.s.settings.WriteTimeout}
	defer sw.finish()
	buf := make([]byte, 32<<10)
	var ids idTracker
	for {
		n, err := body.Read(buf)
		if n > 0 {
			sw.buf.Write(buf[:n])
			if werr := sw.send(); werr != nil {
				return nil // the client left or stopped reading: nothing to tell it
			}
			ids.write(buf[:n])
		}
		if err == io.EOF {
			return nil
		}
		if err == nil {
			continue
		}
		if r.Context().Err() != nil {
			return nil
		}
		if ids.atBoundary() {
			reason, msg := EndMoved, fmt.Sprintf("lost the stream from %s, the owner of partition %d of %s", owner, partition, typ)
			select {
			case <-sr.stopping:
				reason, msg = EndStopped, "the node relaying the stream is stopping"
			default:
			}
			writeEnd(sw, reason, msg, ids.last)
			_ = sw.send()
		}
		return err
	}
}

// idTracker follows a relayed event stream line by line: the value of the
// last "id" field, and whether the stream ends between two events.
type idTracker struct {
	line []byte // the incomplete line at the end of what was read
	last string
	// blank is true after an empty line (or before anything): the stream
	// is between two events.
	blank   bool
	started bool
}

func (t *idTracker) write(p []byte) {
	t.started = true
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			t.line = append(t.line, p...)
			return
		}
		line := append(t.line, p[:i]...)
		line = bytes.TrimSuffix(line, []byte{'\r'})
		t.blank = len(line) == 0
		if v, ok := bytes.CutPrefix(line, []byte("id:")); ok {
			t.last = string(bytes.TrimPrefix(v, []byte{' '}))
		}
		t.line = t.line[:0]
		p = p[i+1:]
	}
}

// atBoundary reports whether what was read ends between two events.
func (t *idTracker) atBoundary() bool {
	return !t.started || (t.blank && len(t.line) == 0)
}
