package esker_test

import (
	"fmt"
	"hash/crc32"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/esker-io/esker/aggregate"
)

// TestKcatInterop proves a client in another language (kcat, on librdkafka)
// can drive esker: it produces a command to account-commands and reads the
// resulting event with its headers from account-events.
func TestKcatInterop(t *testing.T) {
	kcat, err := exec.LookPath("kcat")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("kcat is not installed; .ci/run installs it")
		}
		t.Skip("kcat is not installed (.ci/run installs it)")
	}
	c := newCluster(t)
	broker := c.ListenAddrs()[0]
	n := startNode(t, c.ListenAddrs(), t.TempDir())

	produce := exec.Command(kcat, "-P", "-b", broker, "-t", "account-commands", "-K", "|",
		"-X", "topic.partitioner=murmur2_random")
	produce.Stdin = strings.NewReader(`kc-1|{"type":"Open","data":{"owner":"Grace"},"commandId":"kcat-open-1"}` + "\n")
	if out, err := produce.CombinedOutput(); err != nil {
		t.Fatalf("kcat produce: %v\n%s", err, out)
	}
	code, body := do(t, n, "GET", "/v1/aggregates/account/kc-1?minVersion=1&wait=10s", nil)
	mustStatus(t, 200, code, body, "state of the kcat-opened account")
	if body["state"].(map[string]any)["owner"] != "Grace" {
		t.Fatalf("state: %v", body)
	}

	var out []byte
	deadline := time.Now().Add(15 * time.Second)
	for {
		out, err = exec.Command(kcat, "-C", "-b", broker, "-t", "account-events", "-e", "-q",
			"-X", "isolation.level=read_committed",
			"-f", "%k|%h|%s\n").CombinedOutput()
		if err == nil && strings.Contains(string(out), "kc-1|") || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	line := strings.TrimSpace(string(out))
	if err != nil || !strings.HasPrefix(line, "kc-1|") {
		t.Fatalf("kcat consume: %v\n%s", err, out)
	}
	for _, want := range []string{"esker-event-type=Opened", "esker-version=1", "esker-command-id=kcat-open-1",
		// The owner is personal: esker sealed it on the event, which
		// another client reads as an opaque string.
		`{"owner":"` + aggregate.SealedPrefix} {
		if !strings.Contains(line, want) {
			t.Fatalf("kcat read %q; missing %q", line, want)
		}
	}

	// librdkafka's default partitioner (crc32) disagrees with Kafka's
	// murmur2 for most keys: such a command is rejected, not applied to the
	// wrong partition's state.
	key := ""
	for i := 0; key == ""; i++ {
		k := fmt.Sprintf("crc-%d", i)
		if int32(crc32.ChecksumIEEE([]byte(k))%4) != aggregate.Partition(k, 4) {
			key = k
		}
	}
	rejected := metricSum(t, n.Node, "esker_commands_total")
	produce = exec.Command(kcat, "-P", "-b", broker, "-t", "account-commands", "-K", "|")
	produce.Stdin = strings.NewReader(key + `|{"type":"Open","data":{"owner":"Wrong"}}` + "\n")
	if out, err := produce.CombinedOutput(); err != nil {
		t.Fatalf("kcat produce: %v\n%s", err, out)
	}
	for metricSum(t, n.Node, "esker_commands_total") == rejected {
		if time.Now().After(deadline.Add(10 * time.Second)) {
			t.Fatal("the mis-partitioned command was never processed")
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, r := range readTopic(t, []string{broker}, "account-events") {
		if string(r.Key) == key {
			t.Fatalf("a mis-partitioned command wrote an event on partition %d", r.Partition)
		}
	}
}
