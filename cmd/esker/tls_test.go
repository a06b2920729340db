package main

import (
	"crypto/tls"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/esker-io/esker/internal/testcert"
	"github.com/esker-io/esker/internal/testlog"
)

func TestTLSFlagErrors(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewAuthority(t, "nodes")
	_, certPEM, keyPEM := ca.Issue(t, "node")
	cert, key, caFile := filepath.Join(dir, "node.pem"), filepath.Join(dir, "node-key.pem"), filepath.Join(dir, "ca.pem")
	for f, b := range map[string][]byte{cert: certPEM, key: keyPEM, caFile: ca.PEM} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	_, otherPEM, otherKeyPEM := testcert.NewAuthority(t, "other").Issue(t, "node")
	otherCert, otherKey := filepath.Join(dir, "other.pem"), filepath.Join(dir, "other-key.pem")
	for f, b := range map[string][]byte{otherCert: otherPEM, otherKey: otherKeyPEM} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--tls-cert", otherCert, "--tls-key", otherKey, "--tls-ca", caFile}, "--tls-cert does not verify against --tls-ca for server authentication: x509: certificate signed by unknown authority"},
		{[]string{"--tls-cert", cert}, "--tls-cert and --tls-key go together"},
		{[]string{"--tls-ca", caFile}, "--tls-ca needs --tls-cert and --tls-key"},
		{[]string{"--tls-cert", cert, "--tls-key", caFile}, "--tls-cert " + cert + ", --tls-key " + caFile},
		{[]string{"--tls-cert", "/nonexistent.pem", "--tls-key", key}, "--tls-cert: stat /nonexistent.pem"},
		{[]string{"--tls-cert", cert, "--tls-key", key, "--tls-ca", key}, "--tls-ca " + key + ": no PEM certificate"},
		{[]string{"--tls-cert", cert, "--tls-key", key, "--advertise", "http://127.0.0.1:8080"}, "advertise an https:// URL"},
		{[]string{"--tls-cert", cert, "--tls-key", key, "--advertise", "https://bank1:8443"}, "--tls-cert is not valid for bank1"},
	} {
		args := append([]string{"node", "--brokers", "b:9092"}, tc.args...)
		code, _, stderr := runCLI(t, args...)
		if code != 2 || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want 2 and %q", tc.args, code, stderr, tc.want)
		}
	}
	code, _, stderr := runCLI(t, "rebuild", "--type", "account", "--node", "https://n:8080", "--tls-ca", "/nonexistent.pem")
	if code != 2 || !strings.Contains(stderr, "--tls-ca: open /nonexistent.pem") {
		t.Errorf("rebuild --tls-ca: exit %d, stderr %q", code, stderr)
	}
}

// TestNodeTLSBinary runs the built binary with --tls-cert, --tls-key and
// --tls-ca: it serves HTTPS (advertised as https:// by default), and a
// certificate rotated on disk is served on new connections without a
// restart.
func TestNodeTLSBinary(t *testing.T) {
	bin := buildCLI(t)
	broker, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.GroupMinSessionTimeout(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(broker.Close)

	dir := t.TempDir()
	ca := testcert.NewAuthority(t, "nodes")
	certFile, keyFile, caFile := filepath.Join(dir, "node.pem"), filepath.Join(dir, "node-key.pem"), filepath.Join(dir, "ca.pem")
	writePair := func(name string) *tls.Certificate {
		cert, certPEM, keyPEM := ca.Issue(t, name)
		// The key first: a certificate without its key fails to load, and
		// the node keeps the previous pair meanwhile.
		if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(certFile, certPEM, 0o600); err != nil {
			t.Fatal(err)
		}
		return &cert
	}
	first := writePair("first")
	if err := os.WriteFile(caFile, ca.PEM, 0o600); err != nil {
		t.Fatal(err)
	}

	addr := freeAddr(t)
	node := exec.Command(bin, "node", "--brokers", broker.ListenAddrs()[0], "--data", t.TempDir(), "--http", addr, "--partitions", "2",
		"--tls-cert", certFile, "--tls-key", keyFile, "--tls-ca", caFile)
	node.Env = append(os.Environ(), "ESKER_MASTER_KEY=k1:"+strings.Repeat("A", 43)+"=")
	exited, stderr := startBinaryNode(t, node)

	// served returns the serial of the certificate a new connection sees.
	served := func() string {
		client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: ca.Pool}, DisableKeepAlives: true}}
		res, err := client.Post("https://"+addr+"/v1/aggregates/account/alice/commands", "application/json",
			strings.NewReader(`{"type":"Open","data":{"owner":"Alice"},"commandId":"open-alice"}`))
		if err != nil {
			return ""
		}
		res.Body.Close()
		if res.StatusCode != 200 {
			return ""
		}
		return res.TLS.PeerCertificates[0].SerialNumber.String()
	}
	deadline := time.Now().Add(30 * time.Second)
	var serial string
	for serial == "" {
		select {
		case <-exited:
			t.Fatalf("node exited:\n%s", stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no 200 over https from the node\n%s", stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
		serial = served()
	}
	if serial != first.Leaf.SerialNumber.String() {
		t.Fatalf("served certificate %s, want %s", serial, first.Leaf.SerialNumber)
	}
	if res, err := http.Get("http://" + addr + "/healthz"); err == nil {
		res.Body.Close()
		if res.StatusCode == 200 {
			t.Error("plain http was served")
		}
	}

	second := writePair("second")
	want := second.Leaf.SerialNumber.String()
	deadline = time.Now().Add(10 * time.Second)
	for served() != want {
		if time.Now().After(deadline) {
			t.Fatalf("the rotated certificate was not served\n%s", stderr.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestKeyPairRotation: the certificate a node presents, as a server and as
// a client, follows the files; a rotated pair that does not verify against
// the nodes' authority, or does not load, keeps the previous one.
func TestKeyPairRotation(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewAuthority(t, "nodes")
	certFile, keyFile := filepath.Join(dir, "node.pem"), filepath.Join(dir, "node-key.pem")
	write := func(certPEM, keyPEM []byte) {
		if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(certFile, certPEM, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	first, certPEM, keyPEM := ca.Issue(t, "first")
	write(certPEM, keyPEM)
	var logs testlog.Buffer
	p, err := newKeyPair(certFile, keyFile, ca.Pool, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	serial := func() string {
		p.mu.Lock()
		p.checked = time.Time{} // as if a second had passed
		p.mu.Unlock()
		c, _ := p.clientCertificate(nil)
		s, _ := p.serverCertificate(nil)
		if c != s {
			t.Fatal("the server and client certificates differ")
		}
		return c.Leaf.SerialNumber.String()
	}
	if got := serial(); got != first.Leaf.SerialNumber.String() {
		t.Fatalf("serial %s, want the first certificate's", got)
	}

	_, rogueCert, rogueKey := testcert.NewAuthority(t, "rogue").Issue(t, "rogue")
	write(rogueCert, rogueKey)
	if got := serial(); got != first.Leaf.SerialNumber.String() {
		t.Fatal("a certificate of another authority replaced the node's")
	}
	if !strings.Contains(logs.String(), "was not loaded") {
		t.Errorf("the refused rotation was not logged: %q", logs.String())
	}
	write([]byte("not PEM"), keyPEM)
	if got := serial(); got != first.Leaf.SerialNumber.String() {
		t.Fatal("an unreadable certificate replaced the node's")
	}

	second, certPEM, keyPEM := ca.Issue(t, "second")
	write(certPEM, keyPEM)
	if got := serial(); got != second.Leaf.SerialNumber.String() {
		t.Fatalf("serial %s after the rotation, want the second certificate's", got)
	}
	if !strings.Contains(logs.String(), "TLS certificate reloaded") {
		t.Errorf("the rotation was not logged: %q", logs.String())
	}
}
