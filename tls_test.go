package esker_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/interactive"
	"github.com/esker-io/esker/internal/testcert"
)

// tlsNode is a node serving HTTPS on its own listener.
type tlsNode struct {
	*esker.Node
	url string
}

// startTLSNode runs a bank node that serves HTTPS with a certificate of
// ca and talks mutual TLS to the other nodes.
func startTLSNode(t testing.TB, brokers []string, ca *testcert.Authority, name string) *tlsNode {
	t.Helper()
	cert, _, _ := ca.Issue(t, name)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	n, err := esker.NewNode(
		esker.Brokers(brokers...),
		esker.ApplicationID("bank"),
		esker.StateDir(t.TempDir()),
		esker.HTTPListener(ln), // advertised as https://addr by default
		esker.Partitions(2),
		esker.SessionTimeout(3*time.Second),
		esker.Logger(testLogger()),
		testMasterKeyOption(),
		esker.HTTPTLS(&tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: ca.Pool, ClientAuth: tls.VerifyClientCertIfGiven}),
		esker.PeerTLS(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: ca.Pool}),
	)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Register(bankAccount()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("node %s: %v", name, err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("node %s did not stop", name)
		}
	})
	return &tlsNode{Node: n, url: "https://" + addr}
}

// tlsDo sends a request with client and decodes its JSON answer.
func tlsDo(t testing.TB, client *http.Client, method, url string, body any, headers ...string) (int, map[string]any, error) {
	t.Helper()
	var rd *bytes.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	} else {
		rd = bytes.NewReader(nil)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	res, err := client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer res.Body.Close()
	var out map[string]any
	if err := json.NewDecoder(res.Body).Decode(&out); err != nil {
		t.Fatalf("%s %s: answer is not JSON: %v", method, url, err)
	}
	return res.StatusCode, out, nil
}

// tlsDoSettled is tlsDo retried while the answer is 503, as a client does
// while a rebalance settles.
func tlsDoSettled(t testing.TB, client *http.Client, method, url string, body any) (code int, out map[string]any, err error) {
	t.Helper()
	waitUntil(t, method+" "+url, func() bool {
		code, out, err = tlsDo(t, client, method, url, body)
		return err != nil || code != http.StatusServiceUnavailable
	})
	return code, out, err
}

func tlsClient(cfg *tls.Config) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
}

// TestMutualTLSBetweenNodes: two nodes serve HTTPS and forward to each
// other over mutual TLS, with no cluster token: the nodes' certificates
// authenticate forwarding. A client needs no certificate for its own
// requests, but one that claims to forward without a certificate of the
// nodes' authority is refused with 401 and changes nothing; one with a
// certificate of another authority cannot even connect.
func TestMutualTLSBetweenNodes(t *testing.T) {
	brokers := newCluster(t).ListenAddrs()
	ca := testcert.NewAuthority(t, "esker nodes")
	a := startTLSNode(t, brokers, ca, "node a")
	b := startTLSNode(t, brokers, ca, "node b")
	client := tlsClient(&tls.Config{RootCAs: ca.Pool})

	waitUntil(t, "both nodes to own a partition", func() bool {
		if a.Ready() != nil || b.Ready() != nil {
			return false
		}
		owners := map[string]bool{}
		for _, n := range []*tlsNode{a, b} {
			code, body, err := tlsDo(t, client, "GET", n.url+"/v1/cluster", nil)
			if err != nil || code != 200 {
				return false
			}
			for _, task := range body["tasks"].([]any) {
				owners[task.(map[string]any)["active"].(string)] = true
			}
		}
		return len(owners) == 2 && !owners[""]
	})

	// One account per partition, all through a: half are forwarded to b.
	var ids []string
	for i := 0; len(ids) < 2; i++ {
		id := fmt.Sprintf("tls-%d", i)
		if int(aggregate.Partition(id, 2)) == len(ids) {
			ids = append(ids, id)
		}
	}
	for _, id := range ids {
		for i, c := range []map[string]any{cmd("Open", map[string]any{"owner": "Ada " + id}), cmd("Deposit", map[string]any{"amount": 250})} {
			// A client retries a 503 (a rebalance may still be settling);
			// the command id makes the retry safe.
			c["commandId"] = fmt.Sprintf("%s-%d", id, i)
			code, body, err := tlsDoSettled(t, client, "POST", a.url+"/v1/aggregates/account/"+id+"/commands", c)
			if err != nil || code != 200 {
				t.Fatalf("%s via a: %d %v %v", id, code, body, err)
			}
		}
		code, body, err := tlsDoSettled(t, client, "GET", b.url+"/v1/aggregates/account/"+id, nil)
		if err != nil || code != 200 || body["state"].(map[string]any)["balance"] != 250.0 {
			t.Fatalf("read %s via b: %d %v %v", id, code, body, err)
		}
	}
	if f := metricSum(t, a.Node, "esker_forwarded_requests_total") + metricSum(t, b.Node, "esker_forwarded_requests_total"); f < 2 {
		t.Errorf("forwarded %v requests, want at least 2", f)
	}

	// A forward claimed without a certificate: 401 on every entity, and
	// nothing applied.
	for _, n := range []*tlsNode{a, b} {
		for _, id := range ids {
			code, body, err := tlsDo(t, client, "POST", n.url+"/v1/aggregates/account/"+id+"/commands",
				cmd("Withdraw", map[string]any{"amount": 100}), interactive.ForwardedHeader, "https://intruder")
			if err != nil || code != 401 || !strings.Contains(fmt.Sprint(body["error"]), "certificate") {
				t.Errorf("forged forward of %s to %s: %d %v %v, want 401 naming the certificate", id, n.url, code, body, err)
			}
		}
	}
	// With a certificate of another authority (sent even though the server
	// asks for its own authority's) the handshake fails.
	rogue, _, _ := testcert.NewAuthority(t, "rogue").Issue(t, "rogue")
	sendRogue := func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &rogue, nil }
	if _, _, err := tlsDo(t, tlsClient(&tls.Config{RootCAs: ca.Pool, GetClientCertificate: sendRogue}), "POST",
		a.url+"/v1/aggregates/account/"+ids[0]+"/commands", cmd("Withdraw", map[string]any{"amount": 100}),
		interactive.ForwardedHeader, "https://intruder"); err == nil {
		t.Error("a client with another authority's certificate was served")
	}
	for _, id := range ids {
		code, body, err := tlsDoSettled(t, client, "GET", a.url+"/v1/aggregates/account/"+id, nil)
		if err != nil || code != 200 || body["state"].(map[string]any)["balance"] != 250.0 || body["version"] != 2.0 {
			t.Errorf("%s after the refused forwards: %d %v %v, want balance 250 at version 2", id, code, body, err)
		}
	}
}

// TestHTTPListenerClosedOnFailure: a node given a listener closes it when
// Run fails to start, so the caller's port is not left open.
func TestHTTPListenerClosedOnFailure(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	notADir := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notADir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	n, err := esker.NewNode(esker.Brokers("127.0.0.1:1"), esker.StateDir(notADir), esker.HTTPListener(ln))
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Register(bankAccount()); err != nil {
		t.Fatal(err)
	}
	if err := n.Run(context.Background()); err == nil {
		t.Fatal("Run started with a file for its state directory")
	}
	if _, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		t.Error("the listener is still open after Run failed")
	}
}
