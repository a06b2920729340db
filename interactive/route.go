package interactive

// This file routes requests for an entity to the node that owns the entity's
// partition: serve locally, or forward one hop over HTTP (see Routing).

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/esker-io/esker/aggregate"
)

// Headers of the routing protocol between nodes.
const (
	// ForwardedHeader marks a request one node forwarded to another; its
	// value is the forwarding node's URL. A node that receives a request
	// carrying it serves the request if it owns the entity's partition and
	// refuses it (503) otherwise: a request crosses the network at most
	// once, even while two nodes disagree about who owns a partition.
	// With a ClusterToken the request must also carry a valid
	// ForwardAuthHeader, or it is refused (401/403) before it is served.
	ForwardedHeader = "Esker-Forwarded"
	// ServedByHeader, on every answer of a handler with Routing, is the URL
	// of the node that served the request: this node, or the owner the
	// request was forwarded to.
	ServedByHeader = "Esker-Served-By"
)

// defaultForwardSlack is added to the command timeout (POST) or the maximum wait
// (GET) to get the deadline of a forwarded request: the owner answers 504
// itself when its own timeout passes, and the slack leaves time for that
// answer to arrive.
const defaultForwardSlack = 2 * time.Second

// Router says which node serves an aggregate type's partition. The node
// implements it from its cluster map and its own identity; the handler asks
// it once per request, so its methods must be cheap and safe for concurrent
// use.
type Router interface {
	// Partitions is the partition count of every topic of the application.
	Partitions() int32
	// Owner returns the base URL of the node that serves partition p as its
	// active owner, and whether that node is this one. ok is false when no
	// node owns p now (rebalancing). When self is true the request is
	// served by this node's Backend (which may still answer 503 while the
	// partition restores); url is not used then.
	Owner(p int32) (url string, self bool, ok bool)
	// Map returns the current cluster map (for GET /v1/cluster); ok false
	// before the first assignment.
	Map() (Map, bool)
	// Self returns this node's advertised base URL: the value of the
	// ForwardedHeader this node sends and of the ServedByHeader on answers
	// it serves itself. It may be empty (the node advertises no URL).
	Self() string
}

// TaskReporter may be implemented by a Router to add this node's own view of
// its tasks to GET /v1/cluster (the "local" object of each task it holds).
type TaskReporter interface {
	// TaskStatus reports this node's local task for partition p; ok is
	// false when the node holds no task for p.
	TaskStatus(p int32) (TaskStatus, bool)
}

// TaskStatus is one node's view of its local task for a partition.
type TaskStatus struct {
	// Role is RoleActive or RoleStandby (RoleNone: state kept within its
	// grace period after release).
	Role Role
	// Restored is true when the task's state has caught up with its
	// changelogs (an active task then processes commands).
	Restored bool
	// Lag is how many changelog records the local state is behind.
	Lag int64
}

// Routing makes the handler serve every route that names an entity on any
// node: the entity's partition is aggregate.Partition(id, r.Partitions()),
// and a request for a partition another node owns is forwarded to that node
// (one hop, with the ForwardedHeader) and its answer relayed with the
// ServedByHeader. Requests are validated before they are forwarded: bad
// input is refused by the node that received it. A command without a
// commandId gets one before it is forwarded, so that a 504 from a lost
// forward can be retried safely. Routing also serves GET /v1/cluster.
//
// Without Routing (or with a nil r) every request is served by the local
// Backend.
func Routing(r Router) HandlerOption {
	return func(c *handlerConfig) { c.router = r }
}

// Registerer registers the handler's metrics with reg:
//
//	esker_forwarded_requests_total{outcome}  requests for an entity this node
//	    did not serve itself, by outcome: ok (the owner answered, status
//	    < 500), owner_error (the owner answered 5xx), unreachable (no answer
//	    from the owner: connection refused, timeout, connection lost),
//	    loop_refused (a forwarded request for a partition this node does not
//	    own), no_owner (nobody owns the partition now)
//	esker_forward_seconds  the duration of forwarded requests, from
//	    sending to the end of relaying the owner's answer
//
// The metrics exist only with Routing. Collectors already registered with
// reg (a second handler on the same registry) are shared.
func Registerer(reg prometheus.Registerer) HandlerOption {
	return func(c *handlerConfig) { c.registerer = reg }
}

// Outcomes of esker_forwarded_requests_total.
const (
	outcomeOK          = "ok"
	outcomeOwnerError  = "owner_error"
	outcomeUnreachable = "unreachable"
	outcomeLoop        = "loop_refused"
	outcomeNoOwner     = "no_owner"
)

type routeMetrics struct {
	forwarded *prometheus.CounterVec
	seconds   prometheus.Histogram
}

func newRouteMetrics(reg prometheus.Registerer) *routeMetrics {
	m := &routeMetrics{
		forwarded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "esker_forwarded_requests_total",
			Help: "Requests for an entity this node did not serve itself, by outcome (ok, owner_error, unreachable, loop_refused, no_owner).",
		}, []string{"outcome"}),
		seconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "esker_forward_seconds",
			Help:    "Duration of requests forwarded to the owner of the entity's partition, until the owner's answer is relayed.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}),
	}
	if reg != nil {
		m.forwarded = register(reg, m.forwarded)
		m.seconds = register(reg, m.seconds)
	}
	for _, o := range []string{outcomeOK, outcomeOwnerError, outcomeUnreachable, outcomeLoop, outcomeNoOwner} {
		m.forwarded.WithLabelValues(o) // export every outcome from 0
	}
	return m
}

// register registers c, or returns the equal collector registered before.
func register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if err := reg.Register(c); err != nil {
		var dup prometheus.AlreadyRegisteredError
		if errors.As(err, &dup) {
			if existing, ok := dup.ExistingCollector.(C); ok {
				return existing
			}
		}
		panic(fmt.Sprintf("interactive: register metrics: %v", err))
	}
	return c
}

// forwardClient is shared by every handler without ForwardClient:
// keep-alive connections to the other nodes, no proxy (the nodes talk
// directly), no redirects followed and no transparent compression (answers
// are relayed as the owner sent them). Deadlines are per request (the
// request's context).
var forwardClient = NewForwardClient(nil)

// NewForwardClient returns a client like the one handlers forward with by
// default, speaking TLS with tlsConfig (nil: the transport's defaults, for
// https URLs): RootCAs verify the other nodes' certificates, and
// Certificates (or GetClientCertificate) is what this node presents when
// they ask for one (RequirePeerCertificate). Give it to ForwardClient.
func NewForwardClient(tlsConfig *tls.Config) *http.Client {
	return &http.Client{
		Transport: &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			TLSClientConfig:     tlsConfig,
			TLSHandshakeTimeout: 5 * time.Second,
			MaxIdleConns:        1024,
			MaxIdleConnsPerHost: 128,
			IdleConnTimeout:     90 * time.Second,
			DisableCompression:  true,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// forwardRequest is a request for an entity, validated, that the router may
// send to another node.
type forwardRequest struct {
	typ       string
	partition int32
	// body is the body to send (POST): the command with its commandId.
	body []byte
	// commandID is set for commands; it changes how a lost forward is
	// answered (504: outcome unknown) and is included in every error.
	commandID string
	timeout   time.Duration
	// stream, for a route that answers with Server-Sent Events, relays
	// the owner's answer chunk by chunk (watch.go); timeout then bounds
	// only the wait for the answer's headers.
	stream *streamRelay
}

// route decides who serves a validated request for entity id of type typ.
// It returns false when this node serves it (no routing, or this node owns
// the partition); otherwise it has answered the request: with the owner's
// answer, or with a 503/504 of its own.
func (a *api) route(w http.ResponseWriter, r *http.Request, typ, id string, fr forwardRequest) bool {
	if a.rt == nil {
		return false
	}
	n := a.rt.Partitions()
	if n <= 0 {
		a.fwdMetrics.forwarded.WithLabelValues(outcomeNoOwner).Inc()
		writeRetry(w, http.StatusServiceUnavailable, fmt.Sprintf("this node does not know the partition count of %s yet; retry after the Retry-After delay", typ), fr.commandID)
		return true
	}
	p := aggregate.Partition(id, n)
	owner, self, ok := a.rt.Owner(p)
	if ok && self {
		return false
	}
	fr.typ, fr.partition = typ, p
	switch {
	case !ok || owner == "":
		a.fwdMetrics.forwarded.WithLabelValues(outcomeNoOwner).Inc()
		msg := fmt.Sprintf("no node owns partition %d of %s right now (the cluster is rebalancing); retry after the Retry-After delay", p, typ)
		if ok {
			msg = fmt.Sprintf("the node that owns partition %d of %s advertises no URL, so it cannot be reached; retry after the Retry-After delay", p, typ)
		}
		writeRetry(w, http.StatusServiceUnavailable, msg, fr.commandID)
	case isForwarded(r):
		a.fwdMetrics.forwarded.WithLabelValues(outcomeLoop).Inc()
		writeRetry(w, http.StatusServiceUnavailable, fmt.Sprintf("partition %d moved while the request was forwarded; retry", p), fr.commandID)
	default:
		a.forward(w, r, owner, fr)
	}
	return true
}

// markForwarded marks req, which this node forwards for r with body, as
// forwarded (ForwardedHeader: this node's URL) and proves that it comes from
// a node of the cluster: signed with the cluster token, or without one
// carrying r's Authorization header, for the owner to check the client's
// bearer token itself.
func (a *api) markForwarded(r, req *http.Request, body []byte) {
	self := a.rt.Self()
	if self == "" {
		self = "unknown"
	}
	req.Header.Set(ForwardedHeader, self)
	if a.cfg.clusterKey != nil {
		signForward(a.cfg.clusterKey, req, body, time.Now())
		return
	}
	if v := r.Header.Get("Authorization"); v != "" {
		req.Header.Set("Authorization", v)
	}
}

// isForwarded reports whether another node forwarded r.
func isForwarded(r *http.Request) bool {
	return len(r.Header.Values(ForwardedHeader)) > 0
}

// forward sends r to the owner at base, one hop, and relays its answer.
func (a *api) forward(w http.ResponseWriter, r *http.Request, base string, fr forwardRequest) {
	start := time.Now()
	var ctx context.Context
	var cancel context.CancelFunc
	if fr.stream != nil {
		ctx, cancel = fr.stream.forwardContext(r.Context(), fr.timeout)
	} else {
		ctx, cancel = context.WithTimeout(r.Context(), fr.timeout)
	}
	defer cancel()

	// sent turns true once a request's headers were written to a
	// connection: from then on the owner may have received the command.
	var sent atomic.Bool
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		WroteHeaders: func() { sent.Store(true) },
	})

	var body io.Reader
	if fr.body != nil {
		body = bytes.NewReader(fr.body) // also sets GetBody: replayable
	}
	target := strings.TrimRight(base, "/") + r.URL.RequestURI()
	req, err := http.NewRequestWithContext(ctx, r.Method, target, body)
	if err != nil {
		a.fwdMetrics.forwarded.WithLabelValues(outcomeUnreachable).Inc()
		a.log.ErrorContext(r.Context(), "http: cannot forward: bad owner URL", "owner", base, "partition", fr.partition, "err", err)
		writeRetry(w, http.StatusServiceUnavailable, fmt.Sprintf("the node that owns partition %d of %s has an unusable URL %q; retry after the Retry-After delay", fr.partition, fr.typ, base), fr.commandID)
		return
	}
	for _, k := range []string{"Content-Type", "Last-Event-ID"} {
		if v := r.Header.Get(k); v != "" {
			req.Header.Set(k, v)
		}
	}
	a.markForwarded(r, req, fr.body)
	if fr.commandID != "" {
		// The command id makes the POST idempotent: this lets the
		// transport resend it on a kept-alive connection the owner had
		// closed, instead of failing it.
		req.Header.Set("Idempotency-Key", fr.commandID)
	}

	res, err := a.client.Do(req)
	if fr.stream != nil {
		err = fr.stream.answered(err)
	}
	if err != nil {
		a.forwardFailed(w, r, base, fr, err, sent.Load())
		a.fwdMetrics.seconds.Observe(time.Since(start).Seconds())
		return
	}
	defer res.Body.Close()

	h := w.Header()
	for _, k := range []string{"Content-Type", "Retry-After", "X-Content-Type-Options", "Cache-Control", "X-Accel-Buffering"} {
		if v := res.Header.Values(k); len(v) > 0 {
			h[k] = append([]string(nil), v...)
		} else {
			h.Del(k)
		}
	}
	h.Set(ServedByHeader, base)
	w.WriteHeader(res.StatusCode)
	var copyErr error
	if fr.stream != nil && isEventStream(res.Header) {
		// Flushed chunk by chunk; a stream's duration is not a forward's.
		copyErr = fr.stream.relay(w, r, res.Body, base, fr.partition, fr.typ)
	} else {
		_, copyErr = io.Copy(w, res.Body)
		a.fwdMetrics.seconds.Observe(time.Since(start).Seconds())
	}
	if res.StatusCode >= 500 {
		a.fwdMetrics.forwarded.WithLabelValues(outcomeOwnerError).Inc()
	} else {
		a.fwdMetrics.forwarded.WithLabelValues(outcomeOK).Inc()
	}
	if copyErr != nil && r.Context().Err() == nil {
		// The status line is out: the client sees a truncated body.
		a.log.WarnContext(r.Context(), "http: relaying the owner's answer failed",
			append(requestAttrs(r), "owner", base, "partition", fr.partition, "err", describeForwardError(copyErr, fr.timeout))...)
	}
}

// forwardFailed answers a forward that got no answer from the owner. A GET
// is safe to retry: 503. A command is only safe to call "not applied" when
// nothing was sent (the connection was refused, say); once it may have
// reached the owner its outcome is unknown: 504 with the commandId.
func (a *api) forwardFailed(w http.ResponseWriter, r *http.Request, base string, fr forwardRequest, err error, sent bool) {
	if r.Context().Err() != nil {
		// The client went away; nobody reads this answer, and the owner
		// was not at fault: not counted as unreachable.
		writeRetry(w, http.StatusServiceUnavailable, "the request was canceled", fr.commandID)
		return
	}
	a.fwdMetrics.forwarded.WithLabelValues(outcomeUnreachable).Inc()
	reason := describeForwardError(err, fr.timeout) // without the URL, which may hold a personal key
	a.log.WarnContext(r.Context(), "http: forwarding to the owner failed",
		append(requestAttrs(r), "owner", base, "partition", fr.partition, "sent", sent, "commandId", fr.commandID, "err", reason)...)
	if fr.commandID != "" && sent {
		w.Header().Set(ServedByHeader, base)
		writeJSON(w, http.StatusGatewayTimeout, errorBody{
			Error:     fmt.Sprintf("the command was forwarded to %s, the owner of partition %d of %s, and no answer came back (%s): outcome unknown; retry with the same commandId", base, fr.partition, fr.typ, reason),
			CommandID: fr.commandID,
		})
		return
	}
	msg := fmt.Sprintf("the node that owns partition %d of %s (%s) is unreachable (%s); retry after the Retry-After delay", fr.partition, fr.typ, base, reason)
	if fr.commandID != "" {
		msg = fmt.Sprintf("the node that owns partition %d of %s (%s) is unreachable (%s); the command was not sent; retry after the Retry-After delay", fr.partition, fr.typ, base, reason)
	}
	writeRetry(w, http.StatusServiceUnavailable, msg, fr.commandID)
}

// describeForwardError says briefly why a forward got no answer.
func describeForwardError(err error, timeout time.Duration) string {
	var nerr net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &nerr) && nerr.Timeout()):
		return fmt.Sprintf("no answer within %s", timeout)
	case isConnRefused(err):
		return "connection refused"
	}
	var uerr *url.Error
	if errors.As(err, &uerr) && uerr.Err != nil {
		return uerr.Err.Error() // without the `Post "…":` prefix
	}
	return err.Error()
}

func isConnRefused(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED)
}

// commandBody returns the body to forward for cmd: the client's own body
// when it already carries cmd's command id, else cmd re-encoded with the id
// this node generated.
func commandBody(original []byte, cmd aggregate.Command, generated bool) ([]byte, error) {
	if !generated {
		return original, nil
	}
	return json.Marshal(cmd)
}

// servedBy sets ServedByHeader to this node's URL on every answer; a
// forwarded answer overwrites it with the owner's.
func servedBy(rt Router) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if self := rt.Self(); self != "" {
				w.Header().Set(ServedByHeader, self)
			}
			next.ServeHTTP(w, r)
		})
	}
}
