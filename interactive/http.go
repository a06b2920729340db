package interactive

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/interactive/dashboard"
)

// Defaults of the HTTP API's options.
const (
	DefaultMaxBodyBytes   int64 = 1 << 20
	DefaultCommandTimeout       = 5 * time.Second
	DefaultMaxWait              = 30 * time.Second

	// MaxEventsLimit caps ?limit= on the events route.
	MaxEventsLimit = 1000
	// DefaultEventsLimit is the page size of the events route without ?limit=.
	DefaultEventsLimit = 100
)

// HandlerOption configures NewHandler.
type HandlerOption func(*handlerConfig)

type handlerConfig struct {
	maxBodyBytes   int64
	commandTimeout time.Duration
	maxWait        time.Duration
	metrics        http.Handler
	logger         *slog.Logger
	router         Router
	registerer     prometheus.Registerer
	// forwardSlack is added to the command timeout or maximum wait to get
	// a forwarded request's deadline (defaultForwardSlack; shorter in tests).
	forwardSlack time.Duration
	// Security (security.go).
	clusterKey     []byte
	apiTokens      [][32]byte
	protectMetrics bool
	ratePerSecond  float64
	rateBurst      int
	client         *http.Client
	peerCerts      bool
}

// MaxBodyBytes limits request bodies to n bytes; a longer body is answered
// with 413 before any of it is decoded. The default is 1 MiB; n ≤ 0 keeps
// the default.
func MaxBodyBytes(n int64) HandlerOption {
	return func(c *handlerConfig) {
		if n > 0 {
			c.maxBodyBytes = n
		}
	}
}

// CommandTimeout sets how long POST …/commands waits for a command's
// outcome. When it passes, the client gets 504 with the command id: the
// command may still be applied, and resending it with the same commandId
// returns its outcome without applying it twice. The default is 5s; d ≤ 0
// keeps the default.
func CommandTimeout(d time.Duration) HandlerOption {
	return func(c *handlerConfig) {
		if d > 0 {
			c.commandTimeout = d
		}
	}
}

// MaxWait caps ?wait= on GET /v1/aggregates/{type}/{id}: a longer wait is
// shortened to d, not refused. The default is 30s; d ≤ 0 keeps the default.
func MaxWait(d time.Duration) HandlerOption {
	return func(c *handlerConfig) {
		if d > 0 {
			c.maxWait = d
		}
	}
}

// Metrics serves h at GET /metrics, typically promhttp.HandlerFor(registry,
// …). Without it, or with a nil h, /metrics answers 404.
func Metrics(h http.Handler) HandlerOption {
	return func(c *handlerConfig) { c.metrics = h }
}

// Logger sets the logger for server-side failures: 500s (with the
// underlying error) and recovered panics (with the stack). The default is
// slog.Default(); a nil l keeps the default.
func Logger(l *slog.Logger) HandlerOption {
	return func(c *handlerConfig) {
		if l != nil {
			c.logger = l
		}
	}
}

// NewHandler returns the HTTP API of a node (see the package documentation
// and DESIGN.md, "HTTP API (v1)"):
//
//	POST /v1/aggregates/{type}/{id}/commands   submit a command, await its outcome
//	GET  /v1/aggregates/{type}/{id}            committed state (?minVersion=&wait=)
//	DELETE /v1/aggregates/{type}/{id}          forget the entity (crypto-shredding): 200, then 410 Gone
//	GET  /v1/aggregates/{type}/{id}/events     the entity's events (?from=&limit=)
//	GET  /v1/aggregates/{type}/{id}/watch      its versions as Server-Sent Events; GET /v1/streams/{type}: all its type's events (watch.go)
//	GET  /v1/projections/{name}/{key}          one projection row (Backend implements Projections)
//	GET  /v1/projections/{name}                rows in key order (?prefix=&after=&limit=)
//	GET  /v1/cluster                           the cluster map (with Routing)
//	POST /v1/admin/rebuild/{type}              rebuild the type's state from its events on this node (Backend implements Rebuilder)
//	GET  /v1/admin/rebuild/{type}              that rebuild's progress, per partition
//	GET  /healthz                              liveness: always 200
//	GET  /readyz                               readiness: b.Ready()
//	GET  /metrics                              the Metrics handler, if any
//	GET  /, /ui/…                              the web dashboard (package dashboard), which reads this API
//
// Every error is JSON {"error": "…"} with Content-Type application/json:
// 400 for a request the client must fix, 401 and 403 for a request that is
// not authenticated (APITokens, ClusterToken), 404 for an unknown aggregate
// type, entity or route, 405 (with Allow) for a wrong method, 410 for a
// forgotten entity, 413 for a body over MaxBodyBytes, 429 (with Retry-After)
// over the RateLimit, 503 with Retry-After while the node cannot serve the key,
// 504 when the answer is not known in time, and 500 for failures of the node
// itself, which are logged. A panic in a handler is recovered, logged with
// its stack and answered with 500.
//
// With Routing, the routes that name an entity are served by the node that
// owns the entity's partition: locally, or forwarded there (see Routing).
func NewHandler(b Backend, opts ...HandlerOption) http.Handler {
	cfg := handlerConfig{
		maxBodyBytes:   DefaultMaxBodyBytes,
		commandTimeout: DefaultCommandTimeout,
		maxWait:        DefaultMaxWait,
		logger:         slog.Default(),
		forwardSlack:   defaultForwardSlack,
	}
	for _, o := range opts {
		o(&cfg)
	}
	a := &api{b: b, cfg: cfg, log: cfg.logger, rt: cfg.router, client: forwardClient}
	if cfg.client != nil {
		a.client = cfg.client
	}

	r := chi.NewRouter()
	r.Use(recoverer(a.log), limitBody(cfg.maxBodyBytes))
	if a.rt != nil {
		a.fwdMetrics = newRouteMetrics(cfg.registerer)
		r.Use(servedBy(a.rt))
	}
	r.Use(newGuard(cfg).middleware)
	r.NotFound(func(w http.ResponseWriter, req *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no route for %s %s; the API lives under /v1/aggregates/{type}/{id}", req.Method, req.URL.Path))
	})
	r.MethodNotAllowed(func(w http.ResponseWriter, req *http.Request) {
		msg := fmt.Sprintf("method %s is not allowed on %s", req.Method, req.URL.Path)
		if allowed := allowedMethods(r, req); len(allowed) > 0 {
			w.Header().Set("Allow", strings.Join(allowed, ", "))
			msg += "; use " + strings.Join(allowed, " or ")
		}
		writeError(w, http.StatusMethodNotAllowed, msg)
	})

	r.Get("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	r.Get("/readyz", a.ready)
	if cfg.metrics != nil {
		r.Method(http.MethodGet, "/metrics", cfg.metrics)
	}
	ui := dashboard.Handler()
	r.Method(http.MethodGet, "/", ui)
	r.Method(http.MethodGet, dashboard.AssetsPrefix+"*", ui)
	r.Post("/v1/aggregates/{type}/{id}/commands", a.submit)
	r.Get("/v1/aggregates/{type}/{id}", a.state)
	r.Delete("/v1/aggregates/{type}/{id}", a.forget)
	r.Get("/v1/aggregates/{type}/{id}/events", a.events)
	sse := newSSERoutes(a)
	r.Get("/v1/aggregates/{type}/{id}/watch", sse.watch)
	r.Get("/v1/streams/{type}", sse.stream)
	r.Get("/v1/projections/{name}/{key}", a.projectionRow)
	r.Get("/v1/projections/{name}", a.projectionRows)
	r.Post("/v1/admin/rebuild/{type}", a.startRebuild)
	r.Get("/v1/admin/rebuild/{type}", a.rebuildStatus)
	if a.rt != nil {
		r.Get("/v1/cluster", a.cluster)
	}
	return r
}

// api holds the route handlers.
type api struct {
	b   Backend
	cfg handlerConfig
	log *slog.Logger
	// rt routes requests to the owner of their partition; nil without
	// Routing (everything is served locally).
	rt         Router
	fwdMetrics *routeMetrics
	// client forwards requests to other nodes: forwardClient, or the
	// ForwardClient option's.
	client *http.Client
}

// eventJSON is one event as the API shows it. Data is the payload as JSON,
// whatever the aggregate's codec.
type eventJSON struct {
	Version       int64           `json:"version"`
	Type          string          `json:"type"`
	SchemaVersion int             `json:"schemaVersion"`
	EventID       string          `json:"eventId"`
	Time          time.Time       `json:"time"`
	CommandID     string          `json:"commandId,omitempty"`
	CorrelationID string          `json:"correlationId,omitempty"`
	CausationID   string          `json:"causationId,omitempty"`
	Data          json.RawMessage `json:"data"`
}

type commandResponse struct {
	ID        string      `json:"id"`
	CommandID string      `json:"commandId"`
	Version   int64       `json:"version"`
	Events    []eventJSON `json:"events"`
}

type forgetResponse struct {
	ID        string `json:"id"`
	CommandID string `json:"commandId"`
	Version   int64  `json:"version"`
	Forgotten bool   `json:"forgotten"`
}

type stateResponse struct {
	ID        string          `json:"id"`
	Version   int64           `json:"version"`
	State     json.RawMessage `json:"state"`
	UpdatedAt time.Time       `json:"updatedAt,omitzero"`
	// Standby and Lag say a standby copy answered a ?stale=true read, and
	// how many changelog records it is behind.
	Standby bool   `json:"standby,omitempty"`
	Lag     *int64 `json:"lag,omitempty"`
}

type eventsResponse struct {
	ID     string      `json:"id"`
	Events []eventJSON `json:"events"`
}

// target resolves {type} and {id}. On failure it has answered the request
// (404 unknown type, 400 invalid id) and returns ok false.
func (a *api) target(w http.ResponseWriter, r *http.Request) (def aggregate.Definition, typ, id string, ok bool) {
	typ, id = pathParam(r, "type"), pathParam(r, "id")
	def, found := a.b.Definition(typ)
	if !found || def == nil {
		writeError(w, http.StatusNotFound, fmt.Sprintf("unknown aggregate type %q: no such type is registered on this node", typ))
		return nil, "", "", false
	}
	if err := aggregate.ValidateEntityID(id); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("invalid %s id %q: %v", typ, id, err))
		return nil, "", "", false
	}
	return def, typ, id, true
}

// pathParam returns a decoded path parameter. chi routes on the escaped path
// when the URL has one that differs from the default encoding (an id holding
// "%2F", say), and then its parameters are still escaped.
func pathParam(r *http.Request, name string) string {
	v := chi.URLParam(r, name)
	if r.URL.RawPath != "" {
		if u, err := url.PathUnescape(v); err == nil {
			return u
		}
	}
	return v
}

// commandFields lists the top-level fields of a command body, for messages.
const commandFields = "type, data, expectedVersion, commandId, correlationId, causationId"

// submit handles POST /v1/aggregates/{type}/{id}/commands.
func (a *api) submit(w http.ResponseWriter, r *http.Request) {
	def, typ, id, ok := a.target(w, r)
	if !ok {
		return
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body is larger than the limit of %d bytes; send a smaller command", tooBig.Limit))
			return
		}
		writeError(w, http.StatusBadRequest, "cannot read the request body: "+err.Error())
		return
	}
	cmd, msg := decodeCommandBody(body)
	if msg != "" {
		writeError(w, http.StatusBadRequest, msg)
		return
	}
	decoded, err := def.DecodeCommand(cmd.Type, cmd.Data)
	switch {
	case errors.Is(err, aggregate.ErrUnknownCommand):
		writeError(w, http.StatusBadRequest, fmt.Sprintf("unknown command type %q for %s; known command types: %s", cmd.Type, typ, strings.Join(def.CommandNames(), ", ")))
		return
	case err != nil:
		// ErrMalformed, or anything else the decoder rejects: the data does
		// not fit the command's Go type.
		writeError(w, http.StatusBadRequest, "invalid data for command "+cmd.Type+": "+strings.TrimPrefix(err.Error(), aggregate.ErrMalformed.Error()+" for "+cmd.Type+": "))
		return
	}
	if err := def.ValidateCommand(decoded); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	generated := cmd.CommandID == ""
	if generated {
		cmd.CommandID = newCommandID()
	}
	if a.rt != nil {
		fwdBody, err := commandBody(body, cmd, generated)
		if err != nil {
			a.internal(w, r, "encode the command to forward", err, cmd.CommandID)
			return
		}
		if a.route(w, r, typ, id, forwardRequest{body: fwdBody, commandID: cmd.CommandID, timeout: a.cfg.commandTimeout + a.cfg.forwardSlack}) {
			return
		}
	}
	a.runCommand(w, r, def, typ, id, cmd)
}

// forget handles DELETE /v1/aggregates/{type}/{id}: it sends the Forget
// command (see aggregate.ForgetCommand) and answers 200 once the entity is
// forgotten, 404 if it never existed and 410 if it was forgotten before.
func (a *api) forget(w http.ResponseWriter, r *http.Request) {
	def, typ, id, ok := a.target(w, r)
	if !ok {
		return
	}
	cmd := aggregate.Command{Type: aggregate.ForgetCommand, CommandID: newCommandID()}
	if a.route(w, r, typ, id, forwardRequest{commandID: cmd.CommandID, timeout: a.cfg.commandTimeout + a.cfg.forwardSlack}) {
		return
	}
	a.runCommand(w, r, def, typ, id, cmd)
}

// runCommand submits a command this node serves and answers its outcome.
func (a *api) runCommand(w http.ResponseWriter, r *http.Request, def aggregate.Definition, typ, id string, cmd aggregate.Command) {
	ctx, cancel := context.WithTimeout(r.Context(), a.cfg.commandTimeout)
	defer cancel()
	out, err := a.b.Submit(ctx, typ, id, cmd)
	if err != nil {
		var notReady *NotReadyError
		switch {
		case errors.As(err, &notReady):
			writeNotReady(w, notReady, cmd.CommandID)
		case errors.Is(err, ErrTimeout) || errors.Is(err, context.DeadlineExceeded):
			writeJSON(w, http.StatusGatewayTimeout, errorBody{
				Error:     fmt.Sprintf("outcome unknown after %s; retry with the same commandId", a.cfg.commandTimeout),
				CommandID: cmd.CommandID,
			})
		case errors.Is(err, ErrTooLarge):
			writeJSON(w, http.StatusRequestEntityTooLarge, errorBody{Error: err.Error(), CommandID: cmd.CommandID})
		case errors.Is(err, ErrGone):
			writeJSON(w, http.StatusGone, errorBody{Error: fmt.Sprintf("%s %q was forgotten", typ, id), CommandID: cmd.CommandID})
		default:
			a.internal(w, r, "submit command", err, cmd.CommandID)
		}
		return
	}

	if out.CommandID == "" {
		out.CommandID = cmd.CommandID
	}
	if out.EntityID == "" {
		out.EntityID = id
	}
	current := out.Version
	switch {
	case out.Accepted && cmd.Type == aggregate.ForgetCommand:
		writeJSON(w, http.StatusOK, forgetResponse{ID: out.EntityID, CommandID: out.CommandID, Version: out.Version, Forgotten: true})
	case out.Gone:
		writeJSON(w, http.StatusGone, errorBody{Error: out.Reason, CommandID: out.CommandID, CurrentVersion: &current})
	case out.NotFound:
		writeJSON(w, http.StatusNotFound, errorBody{Error: out.Reason, CommandID: out.CommandID})
	case out.Accepted:
		events, err := eventsJSON(def, out.Events)
		if err != nil {
			a.internal(w, r, "encode events", err, out.CommandID)
			return
		}
		writeJSON(w, http.StatusOK, commandResponse{ID: out.EntityID, CommandID: out.CommandID, Version: out.Version, Events: events})
	case out.Conflict:
		msg := fmt.Sprintf("version conflict: %s %q is at version %d", typ, id, out.Version)
		if cmd.ExpectedVersion != nil {
			msg += ", but the command expected: " + aggregate.DescribeExpected(*cmd.ExpectedVersion)
		}
		msg += "; read the current state, decide again and send a new command (with a new commandId)"
		writeJSON(w, http.StatusConflict, errorBody{Error: msg, CommandID: out.CommandID, CurrentVersion: &current})
	default:
		reason := out.Reason
		if reason == "" {
			reason = fmt.Sprintf("command %s rejected by %s", cmd.Type, typ)
		}
		writeJSON(w, http.StatusUnprocessableEntity, errorBody{Error: reason, CommandID: out.CommandID, CurrentVersion: &current})
	}
}

// decodeCommandBody parses a command body strictly: one JSON object, known
// top-level fields only, a non-empty type. It returns a message for the
// client when the body does not qualify.
func decodeCommandBody(body []byte) (aggregate.Command, string) {
	var cmd aggregate.Command
	if len(bytes.TrimSpace(body)) == 0 {
		return cmd, `request body is empty; send a command such as {"type":"Deposit","data":{…}}`
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	var raw aggregate.CommandJSON
	if err := dec.Decode(&raw); err != nil {
		return cmd, "request body is not a valid command: " + describeJSONError(err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return cmd, "request body has more data after the command's JSON object; send exactly one object"
	}
	cmd, err := raw.Command()
	if err != nil {
		return cmd, err.Error()
	}
	if cmd.Type == "" {
		return cmd, `request body has no "type": name the command, as in {"type":"Deposit","data":{…}}`
	}
	return cmd, ""
}

// describeJSONError turns an encoding/json error on the command envelope
// into a message a person can act on.
func describeJSONError(err error) string {
	var syntax *json.SyntaxError
	var typeErr *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syntax):
		return fmt.Sprintf("invalid JSON at byte %d: %v", syntax.Offset, err)
	case errors.As(err, &typeErr):
		if typeErr.Field == "" {
			return fmt.Sprintf("want a JSON object, got %s", typeErr.Value)
		}
		return fmt.Sprintf("field %s: want %s, got %s", typeErr.Field, typeErr.Type, typeErr.Value)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "the JSON ends early"
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return fmt.Sprintf("unknown field %s; the fields are %s", strings.TrimPrefix(err.Error(), "json: unknown field "), commandFields)
	}
	return err.Error()
}

// newCommandID returns 16 random bytes in hex.
func newCommandID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand.Read panics instead)
	return hex.EncodeToString(b[:])
}

// state handles GET /v1/aggregates/{type}/{id}.
func (a *api) state(w http.ResponseWriter, r *http.Request) {
	def, typ, id, ok := a.target(w, r)
	if !ok {
		return
	}
	q := r.URL.Query()
	var minVersion int64
	if s := q.Get("minVersion"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 0 {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("query parameter minVersion=%q: want a version, an integer ≥ 0", s))
			return
		}
		minVersion = n
	}
	var wait time.Duration
	if s := q.Get("wait"); s != "" {
		d, err := parseWait(s)
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("query parameter wait=%q: %v", s, err))
			return
		}
		wait = min(d, a.cfg.maxWait)
	}
	stale := false
	if s := q.Get("stale"); s != "" {
		b, err := strconv.ParseBool(s)
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("query parameter stale=%q: want true or false", s))
			return
		}
		stale = b
	}
	if stale && !isForwarded(r) {
		// A local copy, even a standby's, may answer without a hop; when
		// there is none (or it is not at minVersion), the owner answers.
		if st, err := a.b.State(WithStale(r.Context()), typ, id, minVersion, 0); err == nil {
			a.writeState(w, r, def, id, st)
			return
		}
	}
	if a.route(w, r, typ, id, forwardRequest{timeout: a.cfg.maxWait + a.cfg.forwardSlack}) {
		return
	}

	st, err := a.b.State(r.Context(), typ, id, minVersion, wait)
	if errors.Is(err, ErrTimeout) {
		body := errorBody{Error: fmt.Sprintf("%s %q did not reach version %d within %s; retry, or wait longer with ?wait=", typ, id, minVersion, wait)}
		if st.Version > 0 {
			v := st.Version
			body.CurrentVersion = &v
			body.Error = fmt.Sprintf("%s %q is at version %d and did not reach version %d within %s; retry, or wait longer with ?wait=", typ, id, v, minVersion, wait)
		}
		writeJSON(w, http.StatusGatewayTimeout, body)
		return
	}
	if err != nil {
		a.readFailed(w, r, typ, id, "read state", err)
		return
	}
	a.writeState(w, r, def, id, st)
}

// readFailed answers a failed read of one entity: 503 + Retry-After when the
// node cannot serve it now, 404 when it has no events, 500 otherwise.
func (a *api) readFailed(w http.ResponseWriter, r *http.Request, typ, id, what string, err error) {
	var notReady *NotReadyError
	switch {
	case errors.As(err, &notReady):
		writeNotReady(w, notReady, "")
	case errors.Is(err, ErrNotFound):
		writeError(w, http.StatusNotFound, fmt.Sprintf("%s %q has no events", typ, id))
	case errors.Is(err, ErrGone):
		writeError(w, http.StatusGone, fmt.Sprintf("%s %q was forgotten: its personal data was destroyed", typ, id))
	default:
		a.internal(w, r, what, err, "")
	}
}

func (a *api) writeState(w http.ResponseWriter, r *http.Request, def aggregate.Definition, id string, st State) {
	state, err := stateJSON(def, st.State)
	if err != nil {
		a.internal(w, r, "encode state", err, "")
		return
	}
	if st.ID == "" {
		st.ID = id
	}
	resp := stateResponse{ID: st.ID, Version: st.Version, State: state, UpdatedAt: st.UpdatedAt.UTC()}
	if st.Standby {
		lag := st.Lag
		resp.Standby, resp.Lag = true, &lag
		w.Header().Set("Esker-Standby-Lag", strconv.FormatInt(lag, 10))
	}
	writeJSON(w, http.StatusOK, resp)
}

// parseWait reads ?wait=: a Go duration ("2s", "1500ms") or an integer
// number of milliseconds.
func parseWait(s string) (time.Duration, error) {
	var d time.Duration
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		if n > int64(time.Duration(1<<63-1)/time.Millisecond) {
			n = int64(time.Duration(1<<63-1) / time.Millisecond)
		}
		d = time.Duration(n) * time.Millisecond
	} else {
		d, err = time.ParseDuration(s)
		if err != nil {
			return 0, errors.New("want a duration such as 2s or 500ms, or an integer number of milliseconds")
		}
	}
	if d < 0 {
		return 0, errors.New("want a duration ≥ 0")
	}
	return d, nil
}

// events handles GET /v1/aggregates/{type}/{id}/events.
func (a *api) events(w http.ResponseWriter, r *http.Request) {
	def, typ, id, ok := a.target(w, r)
	if !ok {
		return
	}
	q := r.URL.Query()
	from := int64(1)
	if s := q.Get("from"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 1 {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("query parameter from=%q: want a version, an integer ≥ 1", s))
			return
		}
		from = n
	}
	limit := DefaultEventsLimit
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > MaxEventsLimit {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("query parameter limit=%q: want an integer from 1 to %d", s, MaxEventsLimit))
			return
		}
		limit = n
	}
	if a.route(w, r, typ, id, forwardRequest{timeout: a.cfg.maxWait + a.cfg.forwardSlack}) {
		return
	}

	evs, err := a.b.Events(r.Context(), typ, id, from, limit)
	if err != nil {
		a.readFailed(w, r, typ, id, "read events", err)
		return
	}
	out, err := eventsJSON(def, evs)
	if err != nil {
		a.internal(w, r, "encode events", err, "")
		return
	}
	writeJSON(w, http.StatusOK, eventsResponse{ID: id, Events: out})
}

// ready handles GET /readyz.
func (a *api) ready(w http.ResponseWriter, r *http.Request) {
	err := a.b.Ready()
	var notReady *NotReadyError
	switch {
	case err == nil:
		writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
	case errors.As(err, &notReady):
		reason := notReady.Reason
		if reason == "" {
			reason = "not ready"
		}
		w.Header().Set("Retry-After", strconv.Itoa(retryAfterSeconds(notReady.RetryAfter)))
		writeError(w, http.StatusServiceUnavailable, reason)
	default:
		a.internal(w, r, "check readiness", err, "")
	}
}

// requestAttrs names a request in a log line without personal data: its
// method and route pattern, and the aggregate type and entity id of an
// aggregate route (entity ids must not be personal: they are the keys of
// every topic). The path is not logged: a projection row's key may be
// personal (projection.PersonalKeys).
func requestAttrs(r *http.Request) []any {
	attrs := []any{"method", r.Method}
	rc := chi.RouteContext(r.Context())
	if rc == nil {
		return attrs
	}
	attrs = append(attrs, "route", rc.RoutePattern())
	if strings.HasPrefix(rc.RoutePattern(), "/v1/aggregates/") {
		attrs = append(attrs, "type", rc.URLParam("type"), "id", rc.URLParam("id"))
	}
	return attrs
}

// internal logs a failure of the node and answers 500.
func (a *api) internal(w http.ResponseWriter, r *http.Request, what string, err error, commandID string) {
	a.log.ErrorContext(r.Context(), "http: "+what+" failed",
		append(requestAttrs(r), "commandId", commandID, "err", err)...)
	writeJSON(w, http.StatusInternalServerError, errorBody{
		Error:     fmt.Sprintf("internal error: %s: %v", what, err),
		CommandID: commandID,
	})
}

// isJSON reports whether a codec content type is JSON.
func isJSON(contentType string) bool {
	ct, _, _ := strings.Cut(contentType, ";")
	ct = strings.TrimSpace(strings.ToLower(ct))
	return ct == "" || ct == "application/json" || strings.HasSuffix(ct, "+json")
}

// payloadJSON returns an encoded payload as JSON: as is when the codec is
// JSON, else decoded with decode and re-encoded. An empty payload is null.
func payloadJSON(contentType string, data []byte, decode func([]byte) (any, error)) (json.RawMessage, error) {
	if len(data) == 0 {
		return json.RawMessage("null"), nil
	}
	if isJSON(contentType) {
		if !json.Valid(data) {
			return nil, errors.New("stored payload is not valid JSON")
		}
		return json.RawMessage(data), nil
	}
	v, err := decode(data)
	if err != nil {
		return nil, err
	}
	return json.Marshal(v)
}

func stateJSON(def aggregate.Definition, data []byte) (json.RawMessage, error) {
	return payloadJSON(def.ContentType(), data, def.DecodeState)
}

func eventsJSON(def aggregate.Definition, evs []aggregate.Event) ([]eventJSON, error) {
	out := make([]eventJSON, 0, len(evs))
	ct := def.ContentType()
	for _, e := range evs {
		// Old events are shown in the current schema (upcast).
		schema, payload, err := def.Upcast(e.Type, e.SchemaVersion, e.Data)
		if err != nil {
			return nil, fmt.Errorf("event %d (%s): %w", e.Version, e.Type, err)
		}
		data, err := payloadJSON(ct, payload, func(b []byte) (any, error) {
			return def.DecodeEvent(e.Type, schema, b)
		})
		if err != nil {
			return nil, fmt.Errorf("event %d (%s): %w", e.Version, e.Type, err)
		}
		out = append(out, eventJSON{
			Version:       e.Version,
			Type:          e.Type,
			SchemaVersion: schema,
			EventID:       e.EventID,
			Time:          e.Time.UTC(),
			CommandID:     e.CommandID,
			CorrelationID: e.CorrelationID,
			CausationID:   e.CausationID,
			Data:          data,
		})
	}
	return out, nil
}

// allowedMethods lists the methods the router serves for req's path.
func allowedMethods(routes chi.Routes, req *http.Request) []string {
	path := req.URL.RawPath
	if path == "" {
		path = req.URL.Path
	}
	var out []string
	for _, m := range []string{http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete} {
		if routes.Match(chi.NewRouteContext(), m, path) {
			out = append(out, m)
		}
	}
	return out
}

// limitBody caps request bodies at n bytes with http.MaxBytesReader;
// handlers that read past the cap get a *http.MaxBytesError and answer 413.
func limitBody(n int64) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Body != nil && r.Body != http.NoBody {
				r.Body = http.MaxBytesReader(w, r.Body, n)
			}
			next.ServeHTTP(w, r)
		})
	}
}

// recoverer turns a panic in a handler into a logged error (with stack) and
// a 500 JSON answer, if nothing was written yet. http.ErrAbortHandler is
// re-panicked so net/http aborts the response as intended.
func recoverer(log *slog.Logger) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			tw := &trackingWriter{ResponseWriter: w}
			defer func() {
				p := recover()
				if p == nil {
					return
				}
				if p == http.ErrAbortHandler {
					panic(p)
				}
				log.ErrorContext(r.Context(), "http: handler panicked",
					append(requestAttrs(r), "panic", p, "stack", string(debug.Stack()))...)
				if !tw.wrote {
					writeError(tw, http.StatusInternalServerError, "internal error: the handler panicked; the node logged the details")
				}
			}()
			next.ServeHTTP(tw, r)
		})
	}
}

// trackingWriter records whether the response has started. Unwrap lets
// http.ResponseController reach the underlying writer; Flush is forwarded
// for streaming handlers.
type trackingWriter struct {
	http.ResponseWriter
	wrote bool
}

func (t *trackingWriter) WriteHeader(code int) {
	if code >= 200 {
		t.wrote = true
	}
	t.ResponseWriter.WriteHeader(code)
}

func (t *trackingWriter) Write(p []byte) (int, error) {
	t.wrote = true
	return t.ResponseWriter.Write(p)
}

func (t *trackingWriter) Flush() {
	t.wrote = true
	if f, ok := t.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (t *trackingWriter) Unwrap() http.ResponseWriter { return t.ResponseWriter }
