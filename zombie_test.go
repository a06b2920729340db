package esker_test

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
)

// TestPausedNodeServesNoStaleRead: a node paused (SIGSTOP) past its session
// timeout loses its partitions to the other node, which then acknowledges a
// newer version. When the paused node resumes (SIGCONT), still believing it
// owns the partition, it must not answer a read with the old version: its
// membership lease has expired, so it refuses (503) until the group
// confirms it, and by then it has learnt the partition moved.
func TestPausedNodeServesNoStaleRead(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	a := startProcess(t, brokers, freePort(t), t.TempDir(), "--standby-replicas", "1")
	b := startProcess(t, brokers, freePort(t), t.TempDir(), "--standby-replicas", "1")
	owners := waitOwners(t, httpClient, a.url)
	var id string
	for i := 0; id == ""; i++ {
		if cand := fmt.Sprintf("z-%d", i); owners[aggregate.Partition(cand, 4)] == a.url {
			id = cand
		}
	}
	post := func(url, body string) int64 {
		t.Helper()
		resp, err := httpClient.Post(url+"/v1/aggregates/account/"+id+"/commands", "application/json", stringsReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out struct{ Version int64 }
		raw, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || json.Unmarshal(raw, &out) != nil {
			t.Fatalf("command: %d %s\nlog of a:\n%s\nlog of b:\n%s", resp.StatusCode, raw, a.log, b.log)
		}
		return out.Version
	}
	post(a.url, `{"type":"Open","data":{"owner":"z"}}`)
	post(a.url, `{"type":"Deposit","data":{"amount":1}}`)

	if err := a.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = a.cmd.Process.Signal(syscall.SIGCONT) }()
	// b takes the partition over and acknowledges a newer version.
	var acked int64
	for deadline := time.Now().Add(20 * time.Second); ; {
		resp, err := httpClient.Post(b.url+"/v1/aggregates/account/"+id+"/commands", "application/json",
			stringsReader(`{"type":"Deposit","data":{"amount":1},"commandId":"after-pause"}`))
		if err == nil {
			raw, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			var out struct{ Version int64 }
			if resp.StatusCode == 200 && json.Unmarshal(raw, &out) == nil {
				acked = out.Version
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("b never took the partition over")
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("b acknowledged version %d while a was paused", acked)

	// Resume a and read from it at once and for a while: every answer is
	// either a refusal or at least the acknowledged version.
	if err := a.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	var served, refused int
	resumed := time.Now()
	var firstServed time.Duration
	for end := time.Now().Add(30 * time.Second); time.Now().Before(end); {
		resp, err := httpClient.Get(a.url + "/v1/aggregates/account/" + id)
		if err != nil {
			continue
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			refused++
			continue
		}
		var st struct{ Version int64 }
		if err := json.Unmarshal(raw, &st); err != nil {
			t.Fatal(err)
		}
		if st.Version < acked {
			t.Fatalf("stale read from the resumed node: version %d after version %d was acknowledged (%s served by %s)",
				st.Version, acked, raw, resp.Header.Get("Esker-Served-By"))
		}
		if served == 0 {
			firstServed = time.Since(resumed)
			end = time.Now().Add(time.Second) // and a little longer
		}
		served++
	}
	t.Logf("resumed node: %d reads answered (none stale), %d refused; it answered again %v after SIGCONT",
		served, refused, firstServed.Round(time.Millisecond))
	if served == 0 {
		_ = a.cmd.Process.Signal(syscall.SIGQUIT) // its goroutines, into its log
		time.Sleep(time.Second)
		t.Fatalf("the resumed node never answered again; its log:\n%s", a.log)
	}
}

// TestDuplicateInstanceIDStops: two nodes started with one instance id
// (hence one transactional id) fence each other; a fenced node first
// assumes it was a zombie and rejoins, but fenced again and again it stops
// with an error that names the cause.
func TestDuplicateInstanceIDStops(t *testing.T) {
	c := newCluster(t)
	a := startNode(t, c.ListenAddrs(), t.TempDir(), esker.InstanceID("same"))
	b := startNode(t, c.ListenAddrs(), t.TempDir(), esker.InstanceID("same"))
	deadline := time.After(90 * time.Second)
	for i := 0; ; i++ {
		for _, n := range []*testNode{a, b} {
			select {
			case err := <-n.done:
				n.done <- err // for stop, at cleanup
				if err == nil || !strings.Contains(err.Error(), "same instance id") {
					t.Fatalf("Run returned %v; want an error about the shared instance id", err)
				}
				t.Logf("a node stopped: %v", err)
				return
			default:
			}
			id := fmt.Sprintf("dup-%d", i%16)
			do(t, n, "POST", "/v1/aggregates/account/"+id+"/commands", cmd("Open", map[string]any{"owner": id}))
		}
		select {
		case <-deadline:
			t.Fatal("two nodes with one instance id kept running")
		default:
		}
	}
}
