package esker_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/interactive"
	"github.com/esker-io/esker/internal/testcert"
)

// rawDo sends a request with headers (pairs) and decodes the JSON answer.
func rawDo(t *testing.T, method, url, body string, headers ...string) (int, map[string]any, http.Header) {
	t.Helper()
	req, err := http.NewRequest(method, url, stringsReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var out map[string]any
	if err := jsonDecode(res.Body, &out); err != nil {
		t.Fatalf("%s %s: answer is not JSON: %v", method, url, err)
	}
	return res.StatusCode, out, res.Header
}

// TestSecurityForgedForwardDoesNothing: in a two-node cluster with a
// cluster token, a request forwarded by a node works, and one that only
// claims to be forwarded (no proof, wrong proof) is refused with 401/403 and
// produces no command: the command topic and the entity's version do not
// change.
func TestSecurityForgedForwardDoesNothing(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	a := startBankNode(t, brokers, t.TempDir(), esker.ClusterToken("cluster-secret"))
	b := startBankNode(t, brokers, t.TempDir(), esker.ClusterToken("cluster-secret"))
	ctSettle(t, []*testNode{a, b})

	// An account B owns, opened through A: forwarded with the token.
	owned := ctLocalPartitions(t, b)
	if len(owned) == 0 {
		t.Fatal("B owns no partition")
	}
	id := ""
	for i := 0; id == ""; i++ {
		if k := fmt.Sprintf("acc-%d", i); aggregate.Partition(k, 4) == owned[0] {
			id = k
		}
	}
	path := "/v1/aggregates/account/" + id
	code, body, h := doH(t, a, "POST", path+"/commands", cmd("Open", map[string]any{"owner": "Ada"}))
	mustStatus(t, 200, code, body, "open through A")
	if h.Get(interactive.ServedByHeader) != b.srv.URL {
		t.Fatalf("served by %q, want B %s", h.Get(interactive.ServedByHeader), b.srv.URL)
	}
	// Projection listings fan out to every node, watches are relayed from
	// the owner: both signed.
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, body := do(t, a, "GET", "/v1/projections/owners", nil)
		if code == 200 && len(body["rows"].([]any)) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("projection listing through A: %d %v", code, body)
		}
		time.Sleep(50 * time.Millisecond)
	}
	res, err := http.Get(a.srv.URL + path + "/watch")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 200 || res.Header.Get(interactive.ServedByHeader) != b.srv.URL {
		t.Fatalf("watch through A: %d served by %q", res.StatusCode, res.Header.Get(interactive.ServedByHeader))
	}

	before := len(readTopic(t, brokers, "account-commands"))

	deposit := `{"type":"Deposit","data":{"amount":1000000}}`
	code, body, _ = rawDo(t, "POST", b.srv.URL+path+"/commands", deposit, interactive.ForwardedHeader, a.srv.URL)
	mustStatus(t, 401, code, body, "forged forward without proof")
	code, body, _ = rawDo(t, "POST", b.srv.URL+path+"/commands", deposit, interactive.ForwardedHeader, a.srv.URL,
		interactive.ForwardAuthHeader, fmt.Sprintf("v1 %d %s", time.Now().Unix(), strings.Repeat("ab", 32)))
	mustStatus(t, 403, code, body, "forged forward with a wrong proof")
	code, body, _ = rawDo(t, "GET", b.srv.URL+path, "", interactive.ForwardedHeader, a.srv.URL)
	mustStatus(t, 401, code, body, "forged forwarded read")
	if msg, _ := body["error"].(string); !strings.Contains(msg, "cluster token") {
		t.Errorf("error %q does not mention the cluster token", msg)
	}

	if after := len(readTopic(t, brokers, "account-commands")); after != before {
		t.Fatalf("account-commands grew from %d to %d records: a forged request produced a command", before, after)
	}
	code, body = do(t, a, "GET", path, nil)
	mustStatus(t, 200, code, body, "read through A")
	if v := body["version"]; v != float64(1) {
		t.Fatalf("version %v after forged deposits, want 1", v)
	}
	if got := counterWith(t, b, "esker_http_refused_total", "reason", "unauthenticated"); got != 2 {
		t.Errorf("B refused %v requests as unauthenticated, want 2", got)
	}
}

// TestSecurityNodeBearerAndRateLimit: a node with API tokens and a rate
// limit guards /v1/ and leaves the probes and metrics open.
func TestSecurityNodeBearerAndRateLimit(t *testing.T) {
	c := newCluster(t)
	n := startBankNode(t, c.ListenAddrs(), t.TempDir(), esker.APITokens("tok-a"), esker.RateLimit(0.2, 3))
	url := n.srv.URL + "/v1/aggregates/account/acc-1"
	code, body, h := rawDo(t, "POST", url+"/commands", `{"type":"Open","data":{"owner":"Ada"}}`)
	mustStatus(t, 401, code, body, "no token")
	if !strings.HasPrefix(h.Get("WWW-Authenticate"), "Bearer") {
		t.Errorf("WWW-Authenticate %q", h.Get("WWW-Authenticate"))
	}
	code, body, _ = rawDo(t, "POST", url+"/commands", `{"type":"Open","data":{"owner":"Ada"}}`, "Authorization", "Bearer tok-b")
	mustStatus(t, 401, code, body, "wrong token")
	code, body, _ = rawDo(t, "POST", url+"/commands", `{"type":"Open","data":{"owner":"Ada"}}`, "Authorization", "Bearer tok-a")
	mustStatus(t, 200, code, body, "right token")
	code, body, _ = rawDo(t, "GET", url, "", "Authorization", "Bearer tok-a")
	mustStatus(t, 200, code, body, "read")
	for _, p := range []string{"/healthz", "/readyz"} {
		if code, body, _ := rawDo(t, "GET", n.srv.URL+p, ""); code != 200 {
			t.Errorf("%s: %d %v", p, code, body)
		}
	}
	res, err := http.Get(n.srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 200 {
		t.Errorf("/metrics: %d", res.StatusCode)
	}
	// Three tokens in the bucket, two spent: one more, then 429.
	code, body, _ = rawDo(t, "GET", url, "", "Authorization", "Bearer tok-a")
	mustStatus(t, 200, code, body, "third request")
	code, body, h = rawDo(t, "GET", url, "", "Authorization", "Bearer tok-a")
	mustStatus(t, 429, code, body, "fourth request")
	if h.Get("Retry-After") == "" || !strings.Contains(body["error"].(string), "0.2 requests per second") {
		t.Errorf("429 without Retry-After or the limit: %v %v", h.Get("Retry-After"), body)
	}
}

// TestSecurityMaxBodyBytes: the node's body limit answers 413 naming it.
func TestSecurityMaxBodyBytes(t *testing.T) {
	c := newCluster(t)
	n := startBankNode(t, c.ListenAddrs(), t.TempDir(), esker.MaxBodyBytes(100))
	body := `{"type":"Open","data":{"owner":"` + strings.Repeat("x", 200) + `"}}`
	code, out, _ := rawDo(t, "POST", n.srv.URL+"/v1/aggregates/account/acc-1/commands", body)
	mustStatus(t, 413, code, out, "over the limit")
	if msg, _ := out["error"].(string); !strings.Contains(msg, "limit of 100 bytes") {
		t.Errorf("413 error %q does not name the limit", msg)
	}
}

// saslCluster is a kfake cluster that requires SCRAM-SHA-256 (and -512)
// credentials.
func saslCluster(t *testing.T) *kfake.Cluster {
	return newCluster(t, kfake.EnableSASL(),
		kfake.Superuser("SCRAM-SHA-256", "esker", "right-pw"),
		kfake.Superuser("SCRAM-SHA-512", "esker512", "right-pw"))
}

func TestSecurityKafkaSCRAM(t *testing.T) {
	c := saslCluster(t)
	for _, m := range []struct{ mech, user string }{{esker.SASLScramSHA256, "esker"}, {"scram-sha-512", "esker512"}} {
		t.Run(m.mech, func(t *testing.T) {
			n := startBankNode(t, c.ListenAddrs(), t.TempDir(), esker.KafkaSASL(m.mech, m.user, "right-pw"), esker.ApplicationID("bank-"+m.user))
			code, body := do(t, n, "POST", "/v1/aggregates/account/"+m.user+"/commands", cmd("Open", map[string]any{"owner": "Ada"}))
			mustStatus(t, 200, code, body, "open over SASL")
		})
	}
}

// TestSecurityKafkaSCRAMWrong: wrong credentials stop Run at once with an
// error that names the cause.
func TestSecurityKafkaSCRAMWrong(t *testing.T) {
	c := saslCluster(t)
	for _, tc := range []struct {
		name string
		opts []esker.Option
		want string
	}{
		{"wrong password", []esker.Option{esker.KafkaSASL("SCRAM-SHA-256", "esker", "wrong-pw")}, `SASL authentication failed for user "esker"`},
		{"unknown user", []esker.Option{esker.KafkaSASL("SCRAM-SHA-256", "nobody", "pw")}, `SASL authentication failed for user "nobody"`},
		{"no SASL", nil, "is SASL missing?"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, err := esker.NewNode(append([]esker.Option{esker.Brokers(c.ListenAddrs()...), esker.StateDir(t.TempDir()),
				esker.HTTPListen(""), esker.Logger(testLogger())}, tc.opts...)...)
			if err != nil {
				t.Fatal(err)
			}
			if err := n.Register(bank.Account); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			start := time.Now()
			err = n.Run(ctx)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Run returned %v, want an error containing %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "wrong-pw") {
				t.Errorf("the error shows the password: %v", err)
			}
			if took := time.Since(start); took > 12*time.Second {
				t.Errorf("Run took %s to fail", took)
			}
			t.Logf("%s after %s", err, time.Since(start).Round(time.Millisecond))
		})
	}
}

func TestSecurityOptionsValidated(t *testing.T) {
	getCert := func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return nil, nil }
	getClientCert := func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return nil, nil }
	for _, tc := range []struct {
		opts []esker.Option
		want string
	}{
		{[]esker.Option{esker.KafkaSASL("GSSAPI", "u", "p")}, "unknown Kafka SASL mechanism"},
		{[]esker.Option{esker.KafkaSASL("PLAIN", "", "p")}, "needs a user"},
		{[]esker.Option{esker.RateLimit(0, 1)}, "rate limit must be positive"},
		{[]esker.Option{esker.RateLimit(1, 0)}, "rate limit must be positive"},
		{[]esker.Option{esker.HTTPTLS(&tls.Config{})}, "needs the node's certificate"},
		{[]esker.Option{esker.HTTPTLS(&tls.Config{GetCertificate: getCert, ClientCAs: x509.NewCertPool()})},
			"does not verify client certificates"},
		{[]esker.Option{esker.HTTPTLS(&tls.Config{GetCertificate: getCert, ClientAuth: tls.VerifyClientCertIfGiven}),
			esker.PeerTLS(&tls.Config{GetClientCertificate: getClientCert})}, "has no ClientCAs"},
		{[]esker.Option{esker.HTTPTLS(&tls.Config{GetCertificate: getCert, ClientCAs: x509.NewCertPool(), ClientAuth: tls.VerifyClientCertIfGiven})},
			"PeerTLS gives this node none"},
		{[]esker.Option{esker.HTTPTLS(&tls.Config{GetCertificate: getCert}), esker.AdvertisedURL("http://127.0.0.1:8443")},
			"serves HTTPS (HTTPTLS) but advertises http://"},
	} {
		_, err := esker.NewNode(append([]esker.Option{esker.Brokers("localhost:9092")}, tc.opts...)...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewNode = %v, want an error with %q", err, tc.want)
		}
	}
	// Mutual TLS done right, and a node advertised as HTTPS behind a proxy
	// that terminates TLS, are accepted.
	for _, opts := range [][]esker.Option{
		{esker.HTTPTLS(&tls.Config{GetCertificate: getCert, ClientCAs: x509.NewCertPool(), ClientAuth: tls.VerifyClientCertIfGiven}),
			esker.PeerTLS(&tls.Config{GetClientCertificate: getClientCert}), esker.AdvertisedURL("HTTPS://bank1:8443")},
		{esker.AdvertisedURL("https://bank1.example.com")},
	} {
		if _, err := esker.NewNode(append([]esker.Option{esker.Brokers("localhost:9092")}, opts...)...); err != nil {
			t.Errorf("NewNode refused a valid configuration: %v", err)
		}
	}
}

// testTLS returns a server TLS config for 127.0.0.1 and a pool holding its
// self-signed certificate.
func testTLS(t *testing.T) (*tls.Config, *x509.CertPool) {
	t.Helper()
	server, _, pool := testcert.Localhost(t)
	return server, pool
}

// TestSecurityKafkaTLS: a node that trusts the brokers' certificate works
// over TLS (with SCRAM on top); one that does not fails to start at once.
func TestSecurityKafkaTLS(t *testing.T) {
	serverCfg, pool := testTLS(t)
	c := newCluster(t, kfake.TLS(serverCfg), kfake.EnableSASL(), kfake.Superuser("SCRAM-SHA-256", "esker", "pw"))
	n := startBankNode(t, c.ListenAddrs(), t.TempDir(),
		esker.KafkaTLS(&tls.Config{RootCAs: pool}), esker.KafkaSASL("SCRAM-SHA-256", "esker", "pw"))
	code, body := do(t, n, "POST", "/v1/aggregates/account/acc-1/commands", cmd("Open", map[string]any{"owner": "Ada"}))
	mustStatus(t, 200, code, body, "open over TLS")

	for _, tc := range []struct {
		name string
		opt  esker.Option
		want string
	}{
		{"untrusted certificate", esker.KafkaTLS(nil), "TLS handshake with the brokers failed"},
		{"no TLS", esker.KafkaSASL("SCRAM-SHA-256", "esker", "pw"), "is TLS missing?"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad, err := esker.NewNode(esker.Brokers(c.ListenAddrs()...), esker.StateDir(t.TempDir()), esker.HTTPListen(""),
				esker.Logger(testLogger()), esker.KafkaSASL("SCRAM-SHA-256", "esker", "pw"), tc.opt)
			if err != nil {
				t.Fatal(err)
			}
			if err := bad.Register(bank.Account); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			start := time.Now()
			err = bad.Run(ctx)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Run returned %v, want an error containing %q", err, tc.want)
			}
			if took := time.Since(start); took > 12*time.Second {
				t.Errorf("Run took %s to fail", took)
			}
			t.Logf("%v after %s", err, time.Since(start).Round(time.Millisecond))
		})
	}
}

// TestKafkaClientOpts: the client options of a node's Kafka connection, for
// tools, reach a cluster that requires SCRAM (and TLS); PingKafka names a
// refusal and tells it from brokers that do not answer; bad options fail as
// in NewNode.
func TestKafkaClientOpts(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	produceAndList := func(t *testing.T, opts []kgo.Opt) {
		t.Helper()
		cl, err := kgo.NewClient(append(opts, kgo.DefaultProduceTopic("tool-topic"))...)
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		adm := kadm.NewClient(cl)
		if _, err := adm.CreateTopic(ctx, 1, 1, nil, "tool-topic"); err != nil {
			t.Fatalf("create topic: %v", err)
		}
		if err := cl.ProduceSync(ctx, &kgo.Record{Value: []byte("v")}).FirstErr(); err != nil {
			t.Fatalf("produce: %v", err)
		}
		topics, err := adm.ListTopics(ctx)
		if err != nil {
			t.Fatalf("list topics: %v", err)
		}
		if !topics.Has("tool-topic") {
			t.Errorf("topics %v lack tool-topic", topics.Names())
		}
	}

	t.Run("SASL", func(t *testing.T) {
		c := saslCluster(t)
		brokers := esker.Brokers(c.ListenAddrs()...)
		opts, err := esker.KafkaClientOpts(brokers, esker.KafkaSASL("scram-sha-512", "esker512", "right-pw"), esker.KafkaOptions(kgo.ClientID("tool")))
		if err != nil {
			t.Fatal(err)
		}
		produceAndList(t, opts)
		if err := esker.PingKafka(ctx, brokers, esker.KafkaSASL("SCRAM-SHA-256", "esker", "right-pw")); err != nil {
			t.Errorf("PingKafka with the right password: %v", err)
		}

		// Without the SASL options the same cluster refuses the client.
		plain, err := esker.KafkaClientOpts(brokers)
		if err != nil {
			t.Fatal(err)
		}
		cl, err := kgo.NewClient(plain...)
		if err != nil {
			t.Fatal(err)
		}
		pingCtx, pingCancel := context.WithTimeout(ctx, 5*time.Second)
		if err := cl.Ping(pingCtx); err == nil {
			t.Error("a client without SASL reached the cluster")
		}
		pingCancel()
		cl.Close()

		err = esker.PingKafka(ctx, brokers, esker.KafkaSASL("SCRAM-SHA-256", "esker", "wrong-pw"))
		if !errors.Is(err, esker.ErrKafkaRefused) ||
			!strings.Contains(err.Error(), `esker: kafka: SASL authentication failed for user "esker" (mechanism SCRAM-SHA-256)`) {
			t.Errorf("PingKafka with a wrong password: %v", err)
		}
		if err != nil && strings.Contains(err.Error(), "wrong-pw") {
			t.Errorf("the error shows the password: %v", err)
		}
		if err := esker.PingKafka(ctx, brokers); !errors.Is(err, esker.ErrKafkaRefused) || !strings.Contains(err.Error(), "is SASL missing?") {
			t.Errorf("PingKafka without SASL: %v", err)
		}
	})

	t.Run("TLS", func(t *testing.T) {
		serverCfg, pool := testTLS(t)
		c := newCluster(t, kfake.TLS(serverCfg), kfake.EnableSASL(), kfake.Superuser("SCRAM-SHA-256", "esker", "pw"))
		brokers := esker.Brokers(c.ListenAddrs()...)
		sasl := esker.KafkaSASL("SCRAM-SHA-256", "esker", "pw")
		opts, err := esker.KafkaClientOpts(brokers, sasl, esker.KafkaTLS(&tls.Config{RootCAs: pool}))
		if err != nil {
			t.Fatal(err)
		}
		produceAndList(t, opts)
		if err := esker.PingKafka(ctx, brokers, esker.KafkaTLS(nil), sasl); !errors.Is(err, esker.ErrKafkaRefused) ||
			!strings.Contains(err.Error(), "TLS handshake with the brokers failed") {
			t.Errorf("PingKafka with an untrusted certificate: %v", err)
		}
	})

	t.Run("unreachable", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		pingCtx, pingCancel := context.WithTimeout(ctx, 5*time.Second)
		defer pingCancel()
		err = esker.PingKafka(pingCtx, esker.Brokers(addr), esker.KafkaSASL("PLAIN", "u", "p"))
		if err == nil || errors.Is(err, esker.ErrKafkaRefused) {
			t.Errorf("PingKafka of a closed port: %v, want a client error that is no refusal", err)
		}
	})

	for _, opts := range [][]esker.Option{
		{esker.Brokers("localhost:9092"), esker.KafkaSASL("GSSAPI", "u", "p")},
		{esker.Brokers("localhost:9092"), esker.KafkaSASL("PLAIN", "", "p")},
		{esker.KafkaSASL("PLAIN", "u", "p")},
	} {
		if got, err := esker.KafkaClientOpts(opts...); err == nil || got != nil {
			t.Errorf("KafkaClientOpts accepted %d options: %v", len(opts), got)
		}
		if err := esker.PingKafka(ctx, opts...); err == nil || errors.Is(err, esker.ErrKafkaRefused) {
			t.Errorf("PingKafka with %d bad options: %v", len(opts), err)
		}
	}
	if _, err := esker.KafkaClientOpts(esker.Brokers("b:9092"), esker.KafkaSASL("GSSAPI", "u", "p")); err == nil ||
		!strings.Contains(err.Error(), `unknown Kafka SASL mechanism "GSSAPI"`) {
		t.Errorf("unknown mechanism: %v", err)
	}
}
