package main

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
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
	var rightErr bytes.Buffer
	right.Stderr = &rightErr
	if err := right.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- right.Wait() }()
	defer func() {
		_ = right.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			_ = right.Process.Kill()
		}
	}()
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
		case err := <-exited:
			t.Fatalf("node exited: %v\n%s", err, rightErr.String())
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
		{[]string{"dev", "--rate-limit", "-1"}, "must not be negative"},
	} {
		code, _, stderr := runCLI(t, tc.args...)
		if code != 2 || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want 2 and %q", tc.args, code, stderr, tc.want)
		}
	}
}
