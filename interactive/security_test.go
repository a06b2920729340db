package interactive

import (
	"context"
	"crypto/tls"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/internal/testcert"
)

const cmdC1 = "/v1/aggregates/counter/c1/commands"

func acceptAll(f *fakeBackend) {
	f.submit = func(context.Context, aggregate.Command) (aggregate.Outcome, error) {
		return aggregate.Outcome{Accepted: true, Version: 1}, nil
	}
	f.state = stateFrom(1)
}

// signedRequest sends a request to url as a node with key would forward
// it, at time at.
func signedRequest(t *testing.T, key, method, url, body string, at time.Time) answer {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body == "" {
		req.Body = http.NoBody
	}
	req.Header.Set(ForwardedHeader, "http://peer")
	signForward([]byte(key), req, []byte(body), at)
	return do(t, method, url, body, ForwardedHeader, "http://peer", ForwardAuthHeader, req.Header.Get(ForwardAuthHeader))
}

// TestForgedForwardRefused: with a cluster token, a request that claims to
// be forwarded without proof is refused with 401, with a wrong, stale or
// tampered proof with 403, and the backend is never called.
func TestForgedForwardRefused(t *testing.T) {
	_, _, b := twoNodes(t, ClusterToken("cluster-secret"))
	acceptAll(b.be)
	body := `{"type":"Add","data":{"n":1},"commandId":"c-1"}`

	res := do(t, "POST", b.url+cmdC1, body, ForwardedHeader, "http://evil")
	res.want(t, 401)
	res.errorLike(t, "no "+ForwardAuthHeader)
	res = do(t, "GET", b.url+"/v1/aggregates/counter/c1", "", ForwardedHeader, "http://evil")
	res.want(t, 401)

	signedRequest(t, "other-secret", "POST", b.url+cmdC1, body, time.Now()).want(t, 403)
	res = signedRequest(t, "cluster-secret", "POST", b.url+cmdC1, body, time.Now().Add(-2*ForwardAuthWindow))
	res.want(t, 403)
	res.errorLike(t, "clock")
	signedRequest(t, "cluster-secret", "GET", b.url+"/v1/aggregates/counter/c1", "", time.Now().Add(2*ForwardAuthWindow)).want(t, 403)
	res = do(t, "POST", b.url+cmdC1, body, ForwardedHeader, "http://evil", ForwardAuthHeader, "v1 garbage")
	res.want(t, 403)
	res.errorLike(t, "malformed")

	// A proof for one body does not cover another.
	req, _ := http.NewRequest("POST", b.url+cmdC1, nil)
	req.Header.Set(ForwardedHeader, "http://peer")
	signForward([]byte("cluster-secret"), req, []byte(body), time.Now())
	tampered := strings.Replace(body, `"n":1`, `"n":1000`, 1)
	res = do(t, "POST", b.url+cmdC1, tampered, ForwardedHeader, "http://peer", ForwardAuthHeader, req.Header.Get(ForwardAuthHeader))
	res.want(t, 403)
	res.errorLike(t, "does not match")

	if calls := b.backendCalls(); len(calls) != 0 {
		t.Fatalf("refused requests reached the backend: %v", calls)
	}
	if res.header.Get("Content-Type") != "application/json" {
		t.Errorf("Content-Type %q", res.header.Get("Content-Type"))
	}

	// The genuine article is served.
	signedRequest(t, "cluster-secret", "POST", b.url+cmdC1, body, time.Now()).want(t, 200)
	if calls := b.backendCalls(); len(calls) != 1 {
		t.Fatalf("backend calls %v, want one Submit", calls)
	}
}

// TestSignedForwardServed: through A, requests for B's partition are
// forwarded with a proof B accepts.
func TestSignedForwardServed(t *testing.T) {
	_, a, b := twoNodes(t, ClusterToken("cluster-secret"))
	acceptAll(b.be)
	res := do(t, "POST", a.url+cmdC1, `{"type":"Add","data":{"n":1}}`)
	res.want(t, 200)
	if res.header.Get(ServedByHeader) != b.url {
		t.Errorf("served by %q, want %s", res.header.Get(ServedByHeader), b.url)
	}
	do(t, "GET", a.url+"/v1/aggregates/counter/c1?minVersion=1", "").want(t, 200)
	if calls := b.backendCalls(); len(calls) != 2 {
		t.Fatalf("B's backend calls %v, want Submit and State", calls)
	}
	if calls := a.backendCalls(); len(calls) != 0 {
		t.Fatalf("A's backend calls %v", calls)
	}
	for _, s := range b.requests() {
		if s.forwarded != a.url {
			t.Errorf("B saw %s %s forwarded by %q", s.method, s.uri, s.forwarded)
		}
	}
}

// TestForwardTokenMismatch: nodes with different tokens cannot forward to
// each other; the client sees the owner's 403.
func TestForwardTokenMismatch(t *testing.T) {
	c := newTestCluster()
	a := newTestNode(t, c, ClusterToken("one"))
	b := newTestNode(t, c, ClusterToken("two"))
	for p := int32(0); p < testPartitions; p++ {
		c.setOwner(p, a.url)
	}
	c.setOwner(pc1, b.url)
	acceptAll(b.be)
	do(t, "GET", a.url+"/v1/aggregates/counter/c1", "").want(t, 403)
	if calls := b.backendCalls(); len(calls) != 0 {
		t.Fatalf("B's backend calls %v", calls)
	}
}

// TestUnauthenticatedForwardingUnchanged: without a cluster token, the
// ForwardedHeader alone is trusted, as before.
func TestUnauthenticatedForwardingUnchanged(t *testing.T) {
	_, _, b := twoNodes(t)
	acceptAll(b.be)
	do(t, "GET", b.url+"/v1/aggregates/counter/c1", "", ForwardedHeader, "http://elsewhere").want(t, 200)
}

// TestPeerCertificateAndClusterToken: with RequirePeerCertificate and a
// ClusterToken, a forwarded request needs both a verified client
// certificate and a valid proof; a client that does not claim to forward
// needs neither.
func TestPeerCertificateAndClusterToken(t *testing.T) {
	ca := testcert.NewAuthority(t, "nodes")
	nodeCert, _, _ := ca.Issue(t, "node")
	f := &fakeBackend{def: counterType()}
	acceptAll(f)
	srv := httptest.NewUnstartedServer(NewHandler(f, RequirePeerCertificate(), ClusterToken("cluster-secret"), Logger(quietLogger())))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{nodeCert}, ClientCAs: ca.Pool, ClientAuth: tls.VerifyClientCertIfGiven}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	client := func(certs ...tls.Certificate) *http.Client {
		return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool, Certificates: certs}}}
	}
	node, anyone := client(nodeCert), client()
	body := `{"type":"Add","data":{"n":1},"commandId":"c-1"}`
	proof := func() string {
		req, _ := http.NewRequest("POST", srv.URL+cmdC1, nil)
		req.Header.Set(ForwardedHeader, "https://peer")
		signForward([]byte("cluster-secret"), req, []byte(body), time.Now())
		return req.Header.Get(ForwardAuthHeader)
	}

	res := doWith(t, anyone, "POST", srv.URL+cmdC1, body, ForwardedHeader, "https://peer", ForwardAuthHeader, proof())
	res.want(t, 401)
	res.errorLike(t, "certificate")
	res = doWith(t, node, "POST", srv.URL+cmdC1, body, ForwardedHeader, "https://peer")
	res.want(t, 401)
	res.errorLike(t, "no "+ForwardAuthHeader)
	f.mu.Lock()
	calls := f.calls
	f.mu.Unlock()
	if len(calls) != 0 {
		t.Fatalf("refused requests reached the backend: %v", calls)
	}
	doWith(t, node, "POST", srv.URL+cmdC1, body, ForwardedHeader, "https://peer", ForwardAuthHeader, proof()).want(t, 200)
	doWith(t, anyone, "POST", srv.URL+cmdC1, body).want(t, 200)
}

func TestBearerAuth(t *testing.T) {
	f := &fakeBackend{def: counterType()}
	acceptAll(f)
	f.ready = func() error { return nil }
	metrics := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("m 1\n")) })
	srv := httptest.NewServer(NewHandler(f, Logger(quietLogger()), APITokens("tok-1", "tok-2"), Metrics(metrics)))
	defer srv.Close()
	url := srv.URL + "/v1/aggregates/counter/c1"

	res := do(t, "GET", url, "")
	res.want(t, 401)
	res.errorLike(t, "missing bearer token")
	if got := res.header.Get("WWW-Authenticate"); !strings.HasPrefix(got, "Bearer") {
		t.Errorf("WWW-Authenticate %q", got)
	}
	res = do(t, "GET", url, "", "Authorization", "Bearer tok-3")
	res.want(t, 401)
	res.errorLike(t, "invalid bearer token")
	if got := res.header.Get("WWW-Authenticate"); !strings.Contains(got, "invalid_token") {
		t.Errorf("WWW-Authenticate %q", got)
	}
	do(t, "GET", url, "", "Authorization", "Basic dG9rLTE=").want(t, 401)
	do(t, "POST", srv.URL+cmdC1, `{"type":"Add","data":{"n":1}}`).want(t, 401)
	do(t, "GET", srv.URL+"/v1/projections/p", "").want(t, 401)
	if calls := f.calls; len(calls) != 0 {
		t.Fatalf("unauthenticated requests reached the backend: %v", calls)
	}

	do(t, "GET", url, "", "Authorization", "Bearer tok-1").want(t, 200)
	do(t, "GET", url, "", "Authorization", "bearer tok-2").want(t, 200)
	do(t, "POST", srv.URL+cmdC1, `{"type":"Add","data":{"n":1}}`, "Authorization", "Bearer tok-2").want(t, 200)

	// Open: probes, metrics, and what is not the API.
	do(t, "GET", srv.URL+"/healthz", "").want(t, 200)
	do(t, "GET", srv.URL+"/readyz", "").want(t, 200)
	do(t, "GET", srv.URL+"/metrics", "").want(t, 200)
	do(t, "GET", srv.URL+"/index.html", "").want(t, 404)

	prot := httptest.NewServer(NewHandler(f, Logger(quietLogger()), APITokens("tok-1"), Metrics(metrics), ProtectMetrics()))
	defer prot.Close()
	do(t, "GET", prot.URL+"/metrics", "").want(t, 401)
	do(t, "GET", prot.URL+"/metrics", "", "Authorization", "Bearer tok-1").want(t, 200)
	do(t, "GET", prot.URL+"/healthz", "").want(t, 200)
}

// TestBearerAndClusterToken: the entry node checks the bearer token before
// forwarding; the owner accepts the signed request without one.
func TestBearerAndClusterToken(t *testing.T) {
	_, a, b := twoNodes(t, ClusterToken("cluster-secret"), APITokens("tok"))
	acceptAll(b.be)
	do(t, "GET", a.url+"/v1/aggregates/counter/c1", "").want(t, 401)
	do(t, "POST", a.url+cmdC1, `{"type":"Add","data":{"n":1}}`, "Authorization", "Bearer nope").want(t, 401)
	if n := len(b.requests()); n != 0 {
		t.Fatalf("B received %d requests the entry node should have refused", n)
	}
	do(t, "POST", a.url+cmdC1, `{"type":"Add","data":{"n":1}}`, "Authorization", "Bearer tok").want(t, 200)
	do(t, "GET", a.url+"/v1/aggregates/counter/c1", "", "Authorization", "Bearer tok").want(t, 200)
	if calls := b.backendCalls(); len(calls) != 2 {
		t.Fatalf("B's backend calls %v", calls)
	}
	// A forged forward to B needs the cluster proof, not a bearer token.
	do(t, "GET", b.url+"/v1/aggregates/counter/c1", "", ForwardedHeader, "http://evil", "Authorization", "Bearer tok").want(t, 401)
}

// TestBearerWithoutClusterToken: without a cluster token the owner checks
// the client's bearer token itself (the entry node passes it on).
func TestBearerWithoutClusterToken(t *testing.T) {
	_, a, b := twoNodes(t, APITokens("tok"))
	acceptAll(b.be)
	do(t, "GET", a.url+"/v1/aggregates/counter/c1", "", "Authorization", "Bearer tok").want(t, 200)
	do(t, "GET", b.url+"/v1/aggregates/counter/c1", "", ForwardedHeader, "http://evil").want(t, 401)
}

func TestRateLimit(t *testing.T) {
	f := &fakeBackend{def: counterType()}
	acceptAll(f)
	srv := httptest.NewServer(NewHandler(f, Logger(quietLogger()), RateLimit(0.5, 2), APITokens("a", "b")))
	defer srv.Close()
	url := srv.URL + "/v1/aggregates/counter/c1"
	for i := range 2 {
		if res := do(t, "GET", url, "", "Authorization", "Bearer a"); res.status != 200 {
			t.Fatalf("request %d: status %d, body %s", i, res.status, res.body)
		}
	}
	res := do(t, "GET", url, "", "Authorization", "Bearer a")
	res.want(t, 429)
	res.errorLike(t, "at most 0.5 requests per second per client (bursts of 2)")
	if ra, err := strconv.Atoi(res.header.Get("Retry-After")); err != nil || ra < 1 || ra > 2 {
		t.Errorf("Retry-After %q, want 1 or 2 seconds", res.header.Get("Retry-After"))
	}
	// Another client has its own bucket; probes are not limited.
	do(t, "GET", url, "", "Authorization", "Bearer b").want(t, 200)
	for range 5 {
		do(t, "GET", srv.URL+"/healthz", "").want(t, 200)
	}
}

// TestRateLimitByIPAndPeersExempt: without bearer tokens clients are told
// apart by IP; requests forwarded by an authenticated node are not limited.
func TestRateLimitByIPAndPeersExempt(t *testing.T) {
	_, a, b := twoNodes(t, ClusterToken("cluster-secret"), RateLimit(0.1, 1))
	acceptAll(b.be)
	acceptAll(a.be)
	do(t, "GET", b.url+"/v1/aggregates/counter/c1", "").want(t, 200)
	do(t, "GET", b.url+"/v1/aggregates/counter/c1", "").want(t, 429)
	for range 5 {
		signedRequest(t, "cluster-secret", "GET", b.url+"/v1/aggregates/counter/c1", "", time.Now()).want(t, 200)
	}
	// A counts the client once; B does not count the forward again.
	do(t, "GET", a.url+"/v1/aggregates/counter/c1", "").want(t, 200)
	do(t, "GET", a.url+"/v1/aggregates/counter/c1", "").want(t, 429)
}

// TestRateLimiterBounded: the limiter never tracks more clients than its
// bound, and forgetting a client never makes it stricter.
func TestRateLimiterBounded(t *testing.T) {
	l := newRateLimiter(1, 1, 3)
	now := time.Now()
	for i := range 100 {
		if ok, _ := l.allow("c"+strconv.Itoa(i), now); !ok {
			t.Fatalf("new client %d refused", i)
		}
		if len(l.buckets) > 3 {
			t.Fatalf("%d clients tracked, bound 3", len(l.buckets))
		}
	}
	ok, retry := l.allow("c99", now)
	if ok || retry <= 0 || retry > time.Second {
		t.Fatalf("second request of c99 at once: ok %v retry %v", ok, retry)
	}
	if ok, _ := l.allow("c99", now.Add(time.Second)); !ok {
		t.Fatal("c99 refused after its bucket refilled")
	}
}

// TestForwardedBodyTooLarge: a signed forward with a body over the limit is
// answered 413, not mistaken for a bad proof.
func TestForwardedBodyTooLarge(t *testing.T) {
	_, _, b := twoNodes(t, ClusterToken("cluster-secret"), MaxBodyBytes(64))
	acceptAll(b.be)
	body := `{"type":"Add","data":{"n":1},"correlationId":"` + strings.Repeat("x", 100) + `"}`
	res := signedRequest(t, "cluster-secret", "POST", b.url+cmdC1, body, time.Now())
	res.want(t, 413)
	res.errorLike(t, "limit of 64 bytes")
}
