package esker_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/esker-io/esker/aggregate"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// eskerBinary builds cmd/esker once per test run.
func eskerBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "esker-bin")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "esker")
		args := []string{"build", "-o", binPath}
		if raceEnabled {
			args = append(args, "-race")
		}
		out, err := exec.Command("go", append(args, "./cmd/esker")...).CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

type process struct {
	cmd *exec.Cmd
	url string
	log *bytes.Buffer
}

// startProcess runs `esker node` as a separate process and waits until it
// is ready.
func startProcess(t testing.TB, brokers []string, port int, dataDir string, extra ...string) *process {
	t.Helper()
	p := &process{url: fmt.Sprintf("http://127.0.0.1:%d", port), log: &bytes.Buffer{}}
	p.cmd = exec.Command(eskerBinary(t), "node",
		"--brokers", brokers[0],
		"--http", fmt.Sprintf("127.0.0.1:%d", port),
		"--data", dataDir,
		"--partitions", "4",
		"--session-timeout", "1s")
	p.cmd.Args = append(p.cmd.Args, extra...)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.kill() })
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(p.url + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return p
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("node process not ready; its log:\n%s", p.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// kill stops the process with SIGKILL: no graceful shutdown, no transaction
// end, no group leave, no store close.
func (p *process) kill() {
	if p.cmd.ProcessState == nil {
		_ = p.cmd.Process.Signal(syscall.SIGKILL)
		_, _ = p.cmd.Process.Wait()
	}
}

type ack struct {
	version int64
	events  int
	amount  int64
}

// TestCrashLosesNothing kills a node with SIGKILL in the middle of a stream
// of commands and restarts it on the same state directory. Clients retry
// each command with the same id until it is acknowledged. Afterwards every
// acknowledged command is applied exactly once, the events topic has no
// gap or duplicate, and the state equals the fold of the events.
func TestCrashLosesNothing(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	dir := t.TempDir()
	port := freePort(t)
	var (
		mu   sync.Mutex
		node = startProcess(t, brokers, port, dir)
	)
	url := node.url

	const accounts, perAccount = 8, 40
	client := &http.Client{Timeout: 10 * time.Second}
	send := func(id, cmdID string, body map[string]any) (int, map[string]any, error) {
		body["commandId"] = cmdID
		raw, _ := json.Marshal(body)
		resp, err := client.Post(url+"/v1/aggregates/account/"+id+"/commands", "application/json", bytes.NewReader(raw))
		if err != nil {
			return 0, nil, err
		}
		defer resp.Body.Close()
		var out map[string]any
		_ = json.NewDecoder(resp.Body).Decode(&out)
		return resp.StatusCode, out, nil
	}
	// sendUntilAnswered retries the same command id on 503, 504 and
	// network errors, as a client of esker should.
	sendUntilAnswered := func(id, cmdID string, body map[string]any) (int, map[string]any) {
		deadline := time.Now().Add(60 * time.Second)
		for {
			code, out, err := send(id, cmdID, body)
			if err == nil && code != 503 && code != 504 {
				return code, out
			}
			if time.Now().After(deadline) {
				t.Errorf("command %s never answered: %d %v %v", cmdID, code, out, err)
				return code, out
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	acks := map[string]ack{} // command id → acknowledged outcome
	var wg sync.WaitGroup
	for a := range accounts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("acc-%d", a)
			code, out := sendUntilAnswered(id, id+"-open", cmd("Open", map[string]any{"owner": id}))
			if code != 200 {
				t.Errorf("open %s: %d %v", id, code, out)
				return
			}
			for i := range perAccount {
				cmdID := fmt.Sprintf("%s-dep-%d", id, i)
				amount := int64(i + 1)
				code, out := sendUntilAnswered(id, cmdID, cmd("Deposit", map[string]any{"amount": amount}))
				if code != 200 {
					t.Errorf("deposit %s: %d %v", cmdID, code, out)
					return
				}
				mu.Lock()
				acks[cmdID] = ack{version: int64(out["version"].(float64)), events: len(out["events"].([]any)), amount: amount}
				mu.Unlock()
			}
		}()
	}

	// Kill the node once a fair share of the commands is acknowledged.
	var acked int
	for {
		mu.Lock()
		acked = len(acks)
		mu.Unlock()
		if acked >= accounts*perAccount/3 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	node.kill()
	t.Logf("killed the node after %d acknowledged commands", acked)
	node = startProcess(t, brokers, port, dir)
	wg.Wait()
	if t.Failed() {
		t.Fatalf("node log:\n%s", node.log)
	}

	// The events topic, read_committed, is the truth.
	type stream struct {
		versions []int64
		balance  int64
	}
	streams := map[string]*stream{}
	applied := map[string]int{} // command id → events written
	for _, r := range readTopic(t, brokers, "account-events") {
		id := string(r.Key)
		s := streams[id]
		if s == nil {
			s = &stream{}
			streams[id] = s
		}
		v, _ := strconv.ParseInt(header(r, aggregate.HeaderVersion), 10, 64)
		s.versions = append(s.versions, v)
		applied[header(r, aggregate.HeaderCommandID)]++
		if header(r, aggregate.HeaderEventType) == "Deposited" {
			var d struct{ Amount int64 }
			_ = json.Unmarshal(r.Value, &d)
			s.balance += d.Amount
		}
	}
	for id, s := range streams {
		for i, v := range s.versions {
			if v != int64(i+1) {
				t.Fatalf("%s: versions %v have a gap or a duplicate at index %d", id, s.versions, i)
			}
		}
	}
	for cmdID, a := range acks {
		if applied[cmdID] != a.events {
			t.Fatalf("acknowledged command %s wrote %d events, acknowledged %d", cmdID, applied[cmdID], a.events)
		}
	}
	if len(streams) != accounts {
		t.Fatalf("%d accounts in the events topic, want %d", len(streams), accounts)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for id, s := range streams {
		req, _ := http.NewRequestWithContext(ctx, "GET", fmt.Sprintf("%s/v1/aggregates/account/%s?minVersion=%d&wait=5s", url, id, len(s.versions)), nil)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var st struct {
			Version int64
			State   struct{ Balance int64 }
			Error   string
		}
		_ = json.NewDecoder(resp.Body).Decode(&st)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("%s: GET answered %d: %s\nnode log:\n%s", id, resp.StatusCode, st.Error, node.log)
		}
		want := int64(perAccount * (perAccount + 1) / 2)
		if st.Version != int64(len(s.versions)) || st.State.Balance != s.balance || s.balance != want {
			t.Fatalf("%s: node says version %d balance %d; events say version %d balance %d; want balance %d",
				id, st.Version, st.State.Balance, len(s.versions), s.balance, want)
		}
	}
}
