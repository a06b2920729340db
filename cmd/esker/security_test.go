package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl/scram"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/internal/testcert"
	"github.com/esker-io/esker/internal/testlog"
	"github.com/esker-io/esker/sideeffects"
)

// buildCLI builds the esker binary into a temporary directory.
func buildCLI(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "esker")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// startBinaryNode starts node, a command of the built binary, and stops it
// when the test ends: SIGTERM, then SIGKILL after 20 s. exited is closed
// when the process has ended; stderr collects what it wrote there.
func startBinaryNode(t *testing.T, node *exec.Cmd) (exited <-chan struct{}, stderr *testlog.Buffer) {
	t.Helper()
	stderr = &testlog.Buffer{}
	node.Stderr = stderr
	if err := node.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		_ = node.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		_ = node.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			_ = node.Process.Kill()
			<-done
		}
	})
	return done, stderr
}

func saslBroker(t *testing.T) string {
	t.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.EnableSASL(),
		kfake.Superuser("SCRAM-SHA-256", "esker", "right-pw"),
		kfake.GroupMinSessionTimeout(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c.ListenAddrs()[0]
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestNodeKafkaSASLBinary runs the built binary against a broker that
// requires SCRAM: wrong credentials make it exit non-zero at once with a
// message naming the cause (and not the password); right ones serve
// commands, behind a bearer token.
func TestNodeKafkaSASLBinary(t *testing.T) {
	bin := buildCLI(t)
	broker := saslBroker(t)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	wrong := exec.CommandContext(ctx, bin, "node", "--brokers", broker, "--data", t.TempDir(), "--http", freeAddr(t),
		"--kafka-sasl-mechanism", "SCRAM-SHA-256", "--kafka-user", "esker")
	wrong.Env = append(os.Environ(), "ESKER_KAFKA_PASSWORD=wrong-pw")
	var stderr bytes.Buffer
	wrong.Stderr = &stderr
	start := time.Now()
	err := wrong.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("wrong credentials: %v, want exit status 1; stderr:\n%s", err, stderr.String())
	}
	if took := time.Since(start); took > 15*time.Second {
		t.Errorf("the node took %s to give up", took)
	}
	if !strings.Contains(stderr.String(), `esker node: kafka: SASL authentication failed for user "esker"`) {
		t.Errorf("stderr does not name the cause:\n%s", stderr.String())
	}
	if strings.Contains(stderr.String(), "wrong-pw") {
		t.Errorf("stderr shows the password:\n%s", stderr.String())
	}

	addr := freeAddr(t)
	right := exec.Command(bin, "node", "--brokers", broker, "--data", t.TempDir(), "--http", addr, "--partitions", "2",
		"--kafka-sasl-mechanism", "scram-sha-256", "--kafka-user", "esker", "--api-token", "tok", "--cluster-token", "cs")
	right.Env = append(os.Environ(), "ESKER_KAFKA_PASSWORD=right-pw")
	exited, rightErr := startBinaryNode(t, right)
	url := "http://" + addr + "/v1/aggregates/account/alice/commands"
	deadline := time.Now().Add(30 * time.Second)
	for {
		req, _ := http.NewRequest("POST", url, strings.NewReader(`{"type":"Open","data":{"owner":"Alice"},"commandId":"open-alice"}`))
		req.Header.Set("Authorization", "Bearer tok")
		res, err := http.DefaultClient.Do(req)
		if err == nil {
			res.Body.Close()
			if res.StatusCode == 200 {
				break
			}
		}
		select {
		case <-exited:
			t.Fatalf("node exited:\n%s", rightErr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no 200 from the node (last: %v)\n%s", err, rightErr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	res, err := http.Post(url, "application/json", strings.NewReader(`{"type":"Deposit","data":{"amount":1}}`))
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 401 {
		t.Errorf("without the bearer token: %d, want 401", res.StatusCode)
	}
}

func TestSecurityFlagErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"node", "--brokers", "b:9092", "--kafka-user", "u"}, "need --kafka-sasl-mechanism"},
		{[]string{"node", "--brokers", "b:9092", "--kafka-sasl-mechanism", "PLAIN"}, "needs --kafka-user"},
		{[]string{"node", "--brokers", "b:9092", "--kafka-sasl-mechanism", "GSSAPI", "--kafka-user", "u"}, "unknown Kafka SASL mechanism"},
		{[]string{"node", "--brokers", "b:9092", "--kafka-ca", "/nonexistent.pem"}, "--kafka-ca"},
		{[]string{"node", "--brokers", "b:9092", "--max-body-bytes", "0"}, "--max-body-bytes must be positive"},
		{[]string{"inspect", "topics", "--brokers", "b:9092", "--kafka-user", "u"}, "esker inspect topics: --kafka-user and --kafka-password need --kafka-sasl-mechanism"},
		{[]string{"inspect", "group", "--brokers", "b:9092", "--kafka-sasl-mechanism", "PLAIN"}, "esker inspect group: --kafka-sasl-mechanism needs --kafka-user"},
		{[]string{"inspect", "entity", "account", "a", "--brokers", "b:9092", "--kafka-sasl-mechanism", "GSSAPI", "--kafka-user", "u"}, `esker inspect entity: unknown Kafka SASL mechanism "GSSAPI"`},
		{[]string{"dlq", "list", "mailer", "--kafka-password", "p"}, "esker dlq list: --kafka-user and --kafka-password need --kafka-sasl-mechanism"},
		{[]string{"dlq", "replay", "mailer", "--kafka-sasl-mechanism", "scram-sha-1", "--kafka-user", "u"}, `unknown Kafka SASL mechanism "SCRAM-SHA-1"`},
		{[]string{"dlq", "list", "mailer", "--kafka-ca", "/nonexistent.pem"}, "esker dlq list: --kafka-ca"},
		{[]string{"dev", "--rate-limit", "-1"}, "must not be negative"},
	} {
		code, _, stderr := runCLI(t, tc.args...)
		if code != 2 || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want 2 and %q", tc.args, code, stderr, tc.want)
		}
	}
}

// TestInspectKafkaSASL runs a node on a broker that requires SCRAM and
// inspects it: with the right credentials (flag or $ESKER_KAFKA_PASSWORD)
// every inspect command works; a wrong password or none exits 1 at once
// with a message naming the cause, never the password.
func TestInspectKafkaSASL(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a broker and a node")
	}
	broker := saslBroker(t)
	url, _ := startTestNode(t, broker, esker.KafkaSASL("SCRAM-SHA-256", "esker", "right-pw"))
	sendCommand(t, url, "alice", `{"type":"Open","data":{"owner":"Alice"}}`)
	sasl := []string{"--brokers", broker, "--kafka-sasl-mechanism", "scram-sha-256", "--kafka-user", "esker"}

	code, stdout, stderr := runCLI(t, append([]string{"inspect", "topics", "--kafka-password", "right-pw"}, sasl...)...)
	if code != 0 || stderr != "" || !regexp.MustCompile(`(?m)^bank-account-changelog +changelog +4 +compact `).MatchString(stdout) {
		t.Errorf("inspect topics: exit %d, stderr %q, stdout:\n%s", code, stderr, stdout)
	}
	t.Setenv("ESKER_KAFKA_PASSWORD", "right-pw")
	code, stdout, stderr = runCLI(t, append([]string{"inspect", "group"}, sasl...)...)
	if code != 0 || stderr != "" || !strings.Contains(stdout, url) {
		t.Errorf("inspect group: exit %d, stderr %q, stdout:\n%s", code, stderr, stdout)
	}
	code, stdout, stderr = runCLI(t, append([]string{"inspect", "entity", "account", "alice"}, sasl...)...)
	if code != 0 || !regexp.MustCompile(`(?m)^1 +Opened +1 +\S+ +0 +\{"owner":"Alice"\}$`).MatchString(stdout) {
		t.Errorf("inspect entity: exit %d, stderr %q, stdout:\n%s", code, stderr, stdout)
	}

	for _, action := range [][]string{{"topics"}, {"group"}, {"entity", "account", "alice"}} {
		args := append(append([]string{"inspect"}, action...), append(sasl, "--kafka-password", "wrong-pw")...)
		start := time.Now()
		code, stdout, stderr := runCLI(t, args...)
		want := "esker inspect " + action[0] + `: kafka: SASL authentication failed for user "esker" (mechanism SCRAM-SHA-256)`
		if code != 1 || stdout != "" || !strings.Contains(stderr, want) || strings.Contains(stderr, "wrong-pw") {
			t.Errorf("%v with a wrong password: exit %d, stdout %q, stderr %q; want 1 and %q", action, code, stdout, stderr, want)
		}
		if took := time.Since(start); took > 8*time.Second {
			t.Errorf("%v took %s to give up", action, took)
		}
	}
	t.Setenv("ESKER_KAFKA_PASSWORD", "")
	code, stdout, stderr = runCLI(t, "inspect", "topics", "--brokers", broker)
	if code != 1 || stdout != "" || !strings.Contains(stderr, "esker inspect topics: kafka: the brokers closed the connection at once") ||
		!strings.Contains(stderr, "is SASL missing?") {
		t.Errorf("inspect topics without SASL: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}

// TestDLQKafkaSASL dead-letters an event of a side-effect consumer on a
// broker that requires SCRAM: esker dlq lists and replays it with the right
// credentials, and exits 1 naming the cause with a wrong password.
func TestDLQKafkaSASL(t *testing.T) {
	broker := saslBroker(t)
	clientOpts := []kgo.Opt{kgo.SeedBrokers(broker), kgo.SASL(scram.Auth{User: "esker", Pass: "right-pw"}.AsSha256Mechanism())}
	cl, err := kgo.NewClient(clientOpts...)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const topic = "account-events"
	if _, err := kadm.NewClient(cl).CreateTopic(ctx, 1, 1, nil, topic); err != nil {
		t.Fatal(err)
	}
	ev := aggregate.Event{EntityID: "bob", Version: 1, EventID: aggregate.EventID("account", "bob", 1), Type: "Deposited",
		SchemaVersion: 1, Time: time.Now().UTC(), Data: []byte(`{"amount":1}`)}
	rec := &kgo.Record{Topic: topic, Key: []byte("bob"), Value: ev.Data}
	for _, h := range ev.Headers("application/json") {
		rec.Headers = append(rec.Headers, kgo.RecordHeader{Key: h.Key, Value: h.Value})
	}
	if err := cl.ProduceSync(ctx, rec).FirstErr(); err != nil {
		t.Fatal(err)
	}

	var fixed atomic.Bool
	var redriven atomic.Int32
	c, err := sideeffects.New("mailer", []string{topic}, func(ctx context.Context, ev sideeffects.Event) error {
		if !fixed.Load() {
			return sideeffects.Permanent(errors.New("smtp: 550"))
		}
		if ev.Redriven() {
			redriven.Add(1)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- c.Run(runCtx, sideeffects.Runtime{AppID: "shop", ClientOpts: clientOpts, Logger: quietLogger()})
	}()
	defer func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	waitUntil(t, func() bool { return c.Status().DeadLettered == 1 })

	sasl := []string{"--brokers", broker, "--app", "shop", "--kafka-sasl-mechanism", "SCRAM-SHA-256", "--kafka-user", "esker"}
	code, stdout, stderr := runCLI(t, append([]string{"dlq", "list", "mailer", "--kafka-password", "right-pw"}, sasl...)...)
	if code != 0 || stderr != "" || !regexp.MustCompile(`(?m)^0 +\S+ +account-events/0@0 +1 +bob +Deposited +no +smtp: 550$`).MatchString(stdout) {
		t.Errorf("dlq list: exit %d, stderr %q, stdout:\n%s", code, stderr, stdout)
	}
	fixed.Store(true)
	t.Setenv("ESKER_KAFKA_PASSWORD", "right-pw")
	code, stdout, stderr = runCLI(t, append([]string{"dlq", "replay", "mailer"}, sasl...)...)
	if code != 0 || !strings.Contains(stdout, "Replayed 1 dead letter from shop-mailer-dlq to shop-mailer-redrive") {
		t.Fatalf("dlq replay: exit %d, stderr %q, stdout:\n%s", code, stderr, stdout)
	}
	waitUntil(t, func() bool { return redriven.Load() == 1 })

	for _, action := range []string{"list", "replay"} {
		code, stdout, stderr := runCLI(t, append([]string{"dlq", action, "mailer", "--kafka-password", "wrong-pw"}, sasl...)...)
		if code != 1 || stdout != "" || !strings.Contains(stderr, `esker dlq: kafka: SASL authentication failed for user "esker"`) ||
			strings.Contains(stderr, "wrong-pw") {
			t.Errorf("dlq %s with a wrong password: exit %d, stdout %q, stderr %q", action, code, stdout, stderr)
		}
	}
}

// testTLS returns a server TLS config for 127.0.0.1 and its self-signed
// certificate in PEM.
func testTLS(t *testing.T) (*tls.Config, []byte) {
	t.Helper()
	server, certPEM, _ := testcert.Localhost(t)
	return server, certPEM
}

// TestInspectKafkaTLS inspects a broker that speaks only TLS: with
// --kafka-ca of its certificate it works; without trusting it, or without
// TLS, it exits 1 naming the cause.
func TestInspectKafkaTLS(t *testing.T) {
	serverCfg, caPEM := testTLS(t)
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.TLS(serverCfg))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	broker := c.ListenAddrs()[0]
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cl, err := kgo.NewClient(kgo.SeedBrokers(broker), kgo.DialTLSConfig(&tls.Config{RootCAs: pool}))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := kadm.NewClient(cl).CreateTopic(ctx, 2, 1, map[string]*string{"cleanup.policy": kadm.StringPtr("compact")}, "bank-account-changelog"); err != nil {
		t.Fatal(err)
	}
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, caPEM, 0o600); err != nil {
		t.Fatal(err)
	}

	code, stdout, stderr := runCLI(t, "inspect", "topics", "--brokers", broker, "--kafka-ca", ca)
	if code != 0 || stderr != "" || !regexp.MustCompile(`(?m)^bank-account-changelog +changelog +2 +compact `).MatchString(stdout) {
		t.Errorf("with --kafka-ca: exit %d, stderr %q, stdout:\n%s", code, stderr, stdout)
	}
	for _, tc := range []struct {
		flags []string
		want  string
	}{
		{[]string{"--kafka-tls"}, "esker inspect topics: kafka: TLS handshake with the brokers failed"},
		{nil, "is TLS missing?"},
	} {
		code, stdout, stderr := runCLI(t, append([]string{"inspect", "topics", "--brokers", broker, "--timeout", "5s"}, tc.flags...)...)
		if code != 1 || stdout != "" || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want 1 and %q", tc.flags, code, stdout, stderr, tc.want)
		}
	}
	notPEM := filepath.Join(t.TempDir(), "ca.txt")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, stderr = runCLI(t, "inspect", "topics", "--brokers", broker, "--kafka-ca", notPEM)
	if code != 2 || !strings.Contains(stderr, "no PEM certificate in the file") {
		t.Errorf("--kafka-ca of no certificate: exit %d, stderr %q", code, stderr)
	}
}

// TestInspectDLQSecurityHelp: the help of inspect and dlq, and of their
// actions, lists the Kafka security flags.
func TestInspectDLQSecurityHelp(t *testing.T) {
	for _, args := range [][]string{{"inspect"}, {"inspect", "topics"}, {"inspect", "group"}, {"inspect", "entity"},
		{"dlq"}, {"dlq", "list", "x"}, {"dlq", "replay", "x"}} {
		code, stdout, stderr := runCLI(t, append(args, "--help")...)
		if code != 0 || stderr != "" {
			t.Fatalf("%v --help: exit %d, stderr %q", args, code, stderr)
		}
		for _, f := range []string{"-kafka-sasl-mechanism", "-kafka-user", "-kafka-password", "-kafka-tls", "-kafka-ca"} {
			if !regexp.MustCompile(`(?m)^  ` + f + `( |$)`).MatchString(stdout) {
				t.Errorf("%v --help lacks %s:\n%s", args, f, stdout)
			}
		}
	}
}
