package sideeffects_test

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esker-io/esker/sideeffects"
)

// The crash tests run a consumer in a child process (this test binary,
// re-executed into TestHelperProcess), kill it with SIGKILL while it works,
// and finish the stream with a second consumer in this process. Both append
// every handled event id to one file, with fsync, before the handler
// returns: the file is the ground truth of what ran.
const (
	helperEnv          = "ESKER_SIDEEFFECTS_HELPER"
	helperBrokersEnv   = "ESKER_SIDEEFFECTS_BROKERS"
	helperOutEnv       = "ESKER_SIDEEFFECTS_OUT"
	helperGuaranteeEnv = "ESKER_SIDEEFFECTS_GUARANTEE"
	crashTopic         = "order-events"
	crashConsumer      = "shipper"
)

// TestHelperProcess is the child of the crash tests; it does nothing in a
// normal test run.
func TestHelperProcess(t *testing.T) {
	if os.Getenv(helperEnv) != "1" {
		t.Skip("the crash tests' child process")
	}
	var g sideeffects.Guarantee
	if err := g.UnmarshalText([]byte(os.Getenv(helperGuaranteeEnv))); err != nil {
		t.Fatal(err)
	}
	out := newLineFile(t, os.Getenv(helperOutEnv))
	c, err := sideeffects.New(crashConsumer, []string{crashTopic}, out.handler, sideeffects.WithGuarantee(g),
		sideeffects.Workers(4), sideeffects.CommitInterval(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	// Runs until killed.
	err = c.Run(context.Background(), sideeffects.Runtime{AppID: testApp,
		ClientOpts: clientOpts(strings.Split(os.Getenv(helperBrokersEnv), ","))})
	t.Fatalf("Run returned %v", err)
}

// lineFile appends handled event ids to a file, synced before the handler
// returns.
type lineFile struct {
	mu sync.Mutex
	f  *os.File
}

func newLineFile(t testing.TB, path string) *lineFile {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &lineFile{f: f}
}

func (l *lineFile) handler(ctx context.Context, ev sideeffects.Event) error {
	time.Sleep(10 * time.Millisecond) // the side effect
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, err := l.f.WriteString(ev.EventID + "\n"); err != nil {
		return err
	}
	return l.f.Sync()
}

func readLines(t testing.TB, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		out = append(out, sc.Text())
	}
	return out
}

// crashRun produces a stream, kills a child consumer in the middle of it,
// finishes with a consumer in this process, and returns every line of the
// file and the ids of all events produced.
func crashRun(t *testing.T, g sideeffects.Guarantee) (lines []string, produced map[string]bool) {
	brokers := newCluster(t, 3, crashTopic)
	out := filepath.Join(t.TempDir(), "handled")
	orders := entities(20)
	// A backlog that keeps the child busy (4 workers, 10 ms per event),
	// and more events arriving while it runs and after it died.
	produceEvents(t, brokers, crashTopic, orders, 1, 10)
	trickle := make(chan struct{})
	go func() {
		defer close(trickle)
		for v := int64(11); v <= 20; v++ {
			produceEvents(t, brokers, crashTopic, orders, v, v)
			time.Sleep(100 * time.Millisecond)
		}
	}()

	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"=1", helperBrokersEnv+"="+strings.Join(brokers, ","),
		helperOutEnv+"="+out, helperGuaranteeEnv+"="+g.String())
	var childOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &childOut, &childOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Kill it while it works through the backlog, once it has committed
	// some of it, so that the restart resumes in the middle.
	waitFor(t, 30*time.Second, "the child to handle 80 events and commit", func() bool {
		if cmd.ProcessState != nil {
			t.Fatalf("child exited: %s", childOut.String())
		}
		if len(readLines(t, out)) < 80 {
			return false
		}
		lag, err := groupLag(brokers, sideeffects.GroupID(testApp, crashConsumer), crashTopic)
		return err == nil && lag < int64(len(readLines(t, out)))
	})
	if err := cmd.Process.Kill(); err != nil { // SIGKILL: no shutdown, no final commit
		t.Fatal(err)
	}
	_ = cmd.Wait()
	atKill := len(readLines(t, out))
	<-trickle

	lf := newLineFile(t, out)
	c, err := sideeffects.New(crashConsumer, []string{crashTopic}, lf.handler, sideeffects.WithGuarantee(g), sideeffects.Workers(4))
	if err != nil {
		t.Fatal(err)
	}
	r := startConsumer(t, c, brokers, nil)
	waitFor(t, 30*time.Second, "the restarted consumer to finish the stream", func() bool {
		return groupCaughtUp(t, brokers, sideeffects.GroupID(testApp, crashConsumer), crashTopic) && c.Status().InFlight == 0
	})
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	lines = readLines(t, out)
	if len(lines) == atKill {
		t.Errorf("the restarted consumer handled nothing (%d lines at the kill)", atKill)
	}
	produced = map[string]bool{}
	for v := int64(1); v <= 20; v++ {
		for _, o := range orders {
			produced[testEvent(o, v).EventID] = true
		}
	}
	t.Logf("%d events produced, %d handled before the kill, %d lines in all", len(produced), atKill, len(lines))
	if atKill >= len(produced) {
		t.Errorf("the child handled everything before it was killed: the test did not crash it mid-stream")
	}
	return lines, produced
}

// TestAtMostOnceCrashNeverRepeats: killed in the middle of a stream and
// restarted, an at-most-once consumer never runs a handler twice for one
// event (offsets are committed before handlers run).
func TestAtMostOnceCrashNeverRepeats(t *testing.T) {
	lines, produced := crashRun(t, sideeffects.AtMostOnce)
	seen := map[string]int{}
	for _, id := range lines {
		if !produced[id] {
			t.Errorf("unknown event id %q in the file", id)
		}
		seen[id]++
		if seen[id] == 2 {
			t.Errorf("event %s handled twice", id)
		}
	}
	t.Logf("at-most-once: %d of %d events lost to the crash", len(produced)-len(seen), len(produced))
}

// TestAtLeastOnceCrashLosesNothing: killed in the middle of a stream and
// restarted, an at-least-once consumer handles every event (some twice).
func TestAtLeastOnceCrashLosesNothing(t *testing.T) {
	lines, produced := crashRun(t, sideeffects.AtLeastOnce)
	seen := map[string]int{}
	for _, id := range lines {
		seen[id]++
	}
	for id := range produced {
		if seen[id] == 0 {
			t.Errorf("event %s never handled", id)
		}
	}
	dups := 0
	for _, n := range seen {
		dups += n - 1
	}
	t.Logf("at-least-once: %d duplicate handler runs after the crash", dups)
}
