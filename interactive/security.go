package interactive

// This file guards the API: node-to-node forwarding authenticated by a shared
// cluster token, optional bearer tokens on /v1/..., and a per-client rate
// limit. The guard runs before any route: a refused request reads no state
// and produces no command.

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// ForwardAuthHeader carries a forwarded request's proof that it comes from a
// node of the cluster: "v1 <unix seconds> <hex HMAC-SHA256>" keyed with the
// cluster token (see ClusterToken).
const ForwardAuthHeader = "Esker-Forward-Auth"

// ForwardAuthWindow bounds how far the timestamp of a forwarded request's
// proof may be from the receiving node's clock, either way: a captured
// request can be replayed for at most this long, and the nodes' clocks must
// agree within it.
const ForwardAuthWindow = 30 * time.Second

// DefaultRateLimitClients bounds how many clients the rate limiter tracks.
const DefaultRateLimitClients = 100_000

// ClusterToken sets the secret the nodes of a cluster share to authenticate
// the requests they forward to each other. With it, a forwarded request
// (ForwardedHeader) carries ForwardAuthHeader: an HMAC-SHA256, keyed with
// the token, over the method, the request URI, a timestamp, the forwarding
// node's URL and the SHA-256 of the body. A request that claims to be
// forwarded is refused before anything else is done: 401 when it has no
// proof, 403 when the proof is wrong, malformed or older (or newer) than
// ForwardAuthWindow. A request with a valid proof needs no bearer token (the
// node that forwarded it checked the client's) and is not rate limited.
//
// Without a cluster token (or with ""), any client can send ForwardedHeader
// and be served as if another node had forwarded its request: run without
// one only on a network only the nodes reach.
func ClusterToken(secret string) HandlerOption {
	return func(c *handlerConfig) {
		if secret == "" {
			c.clusterKey = nil
			return
		}
		c.clusterKey = []byte(secret)
	}
}

// APITokens makes every route under /v1/ require "Authorization: Bearer
// <token>" with one of tokens (compared in constant time). A request
// without it is answered 401 with "WWW-Authenticate: Bearer" and a JSON
// error; one with another token 401 (error="invalid_token"). /healthz,
// /readyz and everything outside /v1/ (static files) stay open; so does
// /metrics unless ProtectMetrics is given. Empty tokens are ignored; with
// none the API is open.
func APITokens(tokens ...string) HandlerOption {
	return func(c *handlerConfig) {
		for _, t := range tokens {
			if t != "" {
				c.apiTokens = append(c.apiTokens, sha256.Sum256([]byte(t)))
			}
		}
	}
}

// ForwardClient sets the client this handler forwards requests with (to
// the partition owner, for a projection's rows, for a watch), typically
// NewForwardClient with the TLS configuration of mutual TLS between nodes.
// The caller owns it: close its idle connections when the node stops. A
// redirect must not be followed (the owner's answer is relayed as it is).
// Without it the handler shares a default client for plain HTTP and the
// system's roots.
func ForwardClient(c *http.Client) HandlerOption {
	return func(cfg *handlerConfig) { cfg.client = c }
}

// RequirePeerCertificate makes a request that claims to be forwarded by
// another node (ForwardedHeader) need a client certificate that the TLS
// server verified (http.Request.TLS.VerifiedChains): the server's
// tls.Config must have ClientCAs and a ClientAuth of at least
// tls.VerifyClientCertIfGiven, so that clients other than the nodes may
// still connect without one. A forwarded request without a verified
// certificate is refused with 401 before anything else is done; with a
// ClusterToken as well, its proof is checked next. The certificate
// authority should be one that signs only the nodes' certificates: any
// certificate it verifies is taken for a node.
func RequirePeerCertificate() HandlerOption {
	return func(c *handlerConfig) { c.peerCerts = true }
}

// ProtectMetrics makes GET /metrics require a bearer token too (with
// APITokens). By default /metrics stays open: Prometheus scrapers are
// usually configured without credentials, and the metrics hold counts and
// durations, not entity data.
func ProtectMetrics() HandlerOption {
	return func(c *handlerConfig) { c.protectMetrics = true }
}

// RateLimit limits each client to perSecond requests under /v1/ on average,
// with bursts of up to burst requests (a token bucket per client). A client
// is its bearer token when APITokens is set, else its remote IP address.
// Requests forwarded by an authenticated node (ClusterToken) are not
// counted: the node that received them counted them. A request over the
// limit is answered 429 with Retry-After and a JSON error naming the limit,
// before it is served. The limiter tracks at most DefaultRateLimitClients
// clients; beyond that it forgets idle clients first. perSecond ≤ 0
// disables the limit; burst < 1 is taken as 1.
func RateLimit(perSecond float64, burst int) HandlerOption {
	return func(c *handlerConfig) {
		c.ratePerSecond, c.rateBurst = perSecond, max(burst, 1)
	}
}

// Reasons of esker_http_refused_total.
const (
	refusedUnauthenticated = "unauthenticated"
	refusedForbidden       = "forbidden"
	refusedRateLimited     = "rate_limited"
)

// guard is the security middleware.
type guard struct {
	clusterKey     []byte
	peerCerts      bool
	tokens         [][32]byte
	protectMetrics bool
	limiter        *rateLimiter
	refused        *prometheus.CounterVec
}

func newGuard(cfg handlerConfig) *guard {
	g := &guard{clusterKey: cfg.clusterKey, peerCerts: cfg.peerCerts, tokens: cfg.apiTokens, protectMetrics: cfg.protectMetrics}
	if cfg.ratePerSecond > 0 {
		g.limiter = newRateLimiter(cfg.ratePerSecond, cfg.rateBurst, DefaultRateLimitClients)
	}
	g.refused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "esker_http_refused_total",
		Help: "HTTP requests refused before they were served, by reason (unauthenticated, forbidden, rate_limited).",
	}, []string{"reason"})
	if cfg.registerer != nil {
		g.refused = register(cfg.registerer, g.refused)
	}
	for _, r := range []string{refusedUnauthenticated, refusedForbidden, refusedRateLimited} {
		g.refused.WithLabelValues(r)
	}
	return g
}

func (g *guard) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if isForwarded(r) && (g.clusterKey != nil || g.peerCerts) {
			if g.peerCerts && !g.checkPeerCertificate(w, r) {
				return
			}
			if g.clusterKey != nil && !g.checkPeer(w, r) {
				return
			}
			next.ServeHTTP(w, r) // an authenticated node: no bearer, no limit
			return
		}
		api := r.URL.Path == "/v1" || strings.HasPrefix(r.URL.Path, "/v1/")
		client := ""
		if len(g.tokens) > 0 && (api || (g.protectMetrics && r.URL.Path == "/metrics")) {
			i, ok := g.checkBearer(w, r)
			if !ok {
				return
			}
			client = "token " + strconv.Itoa(i)
		}
		if api && g.limiter != nil {
			if client == "" {
				client = remoteIP(r)
			}
			if ok, retry := g.limiter.allow(client, time.Now()); !ok {
				g.refused.WithLabelValues(refusedRateLimited).Inc()
				w.Header().Set("Retry-After", strconv.Itoa(retryAfterSeconds(retry)))
				writeError(w, http.StatusTooManyRequests, fmt.Sprintf(
					"rate limit exceeded: at most %s requests per second per client (bursts of %d); retry after the Retry-After delay",
					strconv.FormatFloat(g.limiter.rate, 'f', -1, 64), int(g.limiter.burst)))
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// checkBearer checks the request's bearer token; on failure it has answered
// 401 and returns ok false. i is the index of the matching token.
func (g *guard) checkBearer(w http.ResponseWriter, r *http.Request) (i int, ok bool) {
	h := r.Header.Get("Authorization")
	if h == "" {
		g.refused.WithLabelValues(refusedUnauthenticated).Inc()
		w.Header().Set("WWW-Authenticate", `Bearer realm="esker"`)
		writeError(w, http.StatusUnauthorized, "missing bearer token: this API requires the header Authorization: Bearer TOKEN")
		return 0, false
	}
	scheme, tok, _ := strings.Cut(h, " ")
	tok = strings.TrimSpace(tok)
	if !strings.EqualFold(scheme, "Bearer") || tok == "" {
		g.refused.WithLabelValues(refusedUnauthenticated).Inc()
		w.Header().Set("WWW-Authenticate", `Bearer realm="esker", error="invalid_request"`)
		writeError(w, http.StatusUnauthorized, "malformed Authorization header: want Authorization: Bearer TOKEN")
		return 0, false
	}
	sum := sha256.Sum256([]byte(tok))
	found := -1
	for j := range g.tokens { // every token is compared: the time says nothing
		if subtle.ConstantTimeCompare(sum[:], g.tokens[j][:]) == 1 {
			found = j
		}
	}
	if found < 0 {
		g.refused.WithLabelValues(refusedUnauthenticated).Inc()
		w.Header().Set("WWW-Authenticate", `Bearer realm="esker", error="invalid_token"`)
		writeError(w, http.StatusUnauthorized, "invalid bearer token: the token is not one this node accepts")
		return 0, false
	}
	return found, true
}

// checkPeerCertificate answers 401 and returns false unless r came over TLS
// with a client certificate the server verified.
func (g *guard) checkPeerCertificate(w http.ResponseWriter, r *http.Request) bool {
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
		return true
	}
	g.refused.WithLabelValues(refusedUnauthenticated).Inc()
	writeError(w, http.StatusUnauthorized, fmt.Sprintf("the request claims to be forwarded by another node (%s) but came without a verified client certificate: only nodes with a certificate of the cluster's authority may forward requests", ForwardedHeader))
	return false
}

// checkPeer verifies the proof of a request that claims to be forwarded by
// another node; on failure it has answered 401 (no proof), 403 (wrong
// proof) or 413 (a body over the limit) and returns false. It reads the
// body to check its hash, and puts it back.
func (g *guard) checkPeer(w http.ResponseWriter, r *http.Request) bool {
	proof := r.Header.Get(ForwardAuthHeader)
	if proof == "" {
		g.refused.WithLabelValues(refusedUnauthenticated).Inc()
		writeError(w, http.StatusUnauthorized, fmt.Sprintf("the request claims to be forwarded by another node (%s) but carries no %s proof: only nodes that share the cluster token may forward requests", ForwardedHeader, ForwardAuthHeader))
		return false
	}
	var body []byte
	if r.Body != nil && r.Body != http.NoBody {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			var tooBig *http.MaxBytesError
			if errors.As(err, &tooBig) {
				writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body is larger than the limit of %d bytes; send a smaller command", tooBig.Limit))
				return false
			}
			writeError(w, http.StatusBadRequest, "cannot read the request body: "+err.Error())
			return false
		}
		body = b
		r.Body = io.NopCloser(bytes.NewReader(b))
	}
	if msg := verifyForward(g.clusterKey, r, body, time.Now()); msg != "" {
		g.refused.WithLabelValues(refusedForbidden).Inc()
		writeError(w, http.StatusForbidden, "forwarded request refused: "+msg)
		return false
	}
	return true
}

// forwardMAC is the HMAC of a forwarded request.
func forwardMAC(key []byte, method, uri, ts, from string, body []byte) []byte {
	bodySum := sha256.Sum256(body)
	m := hmac.New(sha256.New, key)
	fmt.Fprintf(m, "esker-forward-v1\n%s\n%s\n%s\n%s\n%x", method, uri, ts, from, bodySum)
	return m.Sum(nil)
}

// signForward adds ForwardAuthHeader to req, a request this node forwards
// with body; ForwardedHeader must be set.
func signForward(key []byte, req *http.Request, body []byte, now time.Time) {
	ts := strconv.FormatInt(now.Unix(), 10)
	mac := forwardMAC(key, req.Method, req.URL.RequestURI(), ts, req.Header.Get(ForwardedHeader), body)
	req.Header.Set(ForwardAuthHeader, "v1 "+ts+" "+hex.EncodeToString(mac))
}

// verifyForward checks the proof of a received forwarded request; it
// returns why it is wrong, or "".
func verifyForward(key []byte, r *http.Request, body []byte, now time.Time) string {
	f := strings.Fields(r.Header.Get(ForwardAuthHeader))
	if len(f) != 3 || f[0] != "v1" {
		return fmt.Sprintf("malformed %s header: want \"v1 <unix seconds> <hex HMAC>\"", ForwardAuthHeader)
	}
	sec, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil {
		return fmt.Sprintf("malformed %s header: bad timestamp", ForwardAuthHeader)
	}
	mac, err := hex.DecodeString(f[2])
	if err != nil {
		return fmt.Sprintf("malformed %s header: the HMAC is not hex", ForwardAuthHeader)
	}
	uri := r.RequestURI
	if uri == "" {
		uri = r.URL.RequestURI()
	}
	want := forwardMAC(key, r.Method, uri, f[1], r.Header.Get(ForwardedHeader), body)
	if !hmac.Equal(mac, want) {
		return "the proof does not match: the nodes must share the same cluster token"
	}
	if skew := now.Sub(time.Unix(sec, 0)); skew > ForwardAuthWindow || skew < -ForwardAuthWindow {
		return fmt.Sprintf("the proof is %s away from this node's clock, more than the %s allowed: a replay, or the nodes' clocks disagree", skew.Round(time.Second).Abs(), ForwardAuthWindow)
	}
	return ""
}

// remoteIP is the client's IP address (without the port).
func remoteIP(r *http.Request) string {
	if host, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		return host
	}
	return r.RemoteAddr
}

// rateLimiter holds a token bucket per client, at most max of them.
type rateLimiter struct {
	rate, burst float64
	max         int

	mu        sync.Mutex
	buckets   map[string]*bucket
	lastSweep time.Time
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newRateLimiter(perSecond float64, burst, maxClients int) *rateLimiter {
	return &rateLimiter{rate: perSecond, burst: float64(burst), max: maxClients, buckets: map[string]*bucket{}}
}

// allow takes a token from client's bucket; when there is none it returns
// false and how long until there is one.
func (l *rateLimiter) allow(client string, now time.Time) (bool, time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[client]
	if b == nil {
		if len(l.buckets) >= l.max {
			l.makeRoom(now)
		}
		b = &bucket{tokens: l.burst, last: now}
		l.buckets[client] = b
	}
	if el := now.Sub(b.last); el > 0 {
		b.tokens = math.Min(l.burst, b.tokens+el.Seconds()*l.rate)
		b.last = now
	}
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	return false, time.Duration((1 - b.tokens) / l.rate * float64(time.Second))
}

// makeRoom frees at least one slot: it forgets the clients whose bucket has
// refilled (forgetting them loses nothing: a new bucket is full), at most
// once a second; when that is not enough, arbitrary clients (which start
// again with a full bucket: lenient, never stricter).
func (l *rateLimiter) makeRoom(now time.Time) {
	if now.Sub(l.lastSweep) >= time.Second {
		l.lastSweep = now
		for k, b := range l.buckets {
			if b.tokens+now.Sub(b.last).Seconds()*l.rate >= l.burst {
				delete(l.buckets, k)
			}
		}
	}
	for k := range l.buckets {
		if len(l.buckets) < l.max {
			break
		}
		delete(l.buckets, k)
	}
}
