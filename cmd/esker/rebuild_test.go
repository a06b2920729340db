package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"github.com/esker-io/esker"
	"net/http"
	"strings"
	"testing"
	"time"
)

func httpJSON(t *testing.T, method, url string, body any) (int, map[string]any) {
	t.Helper()
	raw, _ := json.Marshal(body)
	req, _ := http.NewRequest(method, url, bytes.NewReader(raw))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, out
}

// TestRebuildCLI runs esker rebuild against a two-node cluster, naming one
// node: it finds the other from the cluster map, rebuilds every partition
// and shows the progress.
func TestRebuildCLI(t *testing.T) {
	addr := startTestBroker(t)
	urlA, _ := startTestNode(t, addr)
	urlB, _ := startTestNode(t, addr)
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, body := httpJSON(t, "GET", urlA+"/v1/cluster", nil)
		members, _ := body["members"].([]any)
		codeA, readyA := httpJSON(t, "GET", urlA+"/readyz", nil)
		codeB, readyB := httpJSON(t, "GET", urlB+"/readyz", nil)
		if codeA == 200 && codeB == 200 && len(members) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the two nodes did not become ready: %v / %v, cluster %v", readyA, readyB, body)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for i := range 8 {
		id := fmt.Sprintf("acc-%d", i)
		for _, c := range []map[string]any{
			{"type": "Open", "data": map[string]any{"owner": "o" + id}},
			{"type": "Deposit", "data": map[string]any{"amount": 10 + i}},
		} {
			deadline := time.Now().Add(20 * time.Second)
			for {
				code, body := httpJSON(t, "POST", urlA+"/v1/aggregates/account/"+id+"/commands", c)
				if code == 200 {
					break
				}
				if code != 503 || time.Now().After(deadline) {
					t.Fatalf("%s %v: %d %v", id, c, code, body)
				}
				time.Sleep(50 * time.Millisecond)
			}
		}
	}

	code, stdout, stderr := runCLI(t, "rebuild", "--type", "account", "--node", urlA, "--interval", "100ms")
	if code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	for _, want := range []string{urlA + ": rebuilding", urlB + ": rebuilding", "account/0", "account/3", "done", "100.0%",
		"4 of 4 partitions done", "rebuild of account done: 4 partition(s), 16 events"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("output lacks %q:\n%s", want, stdout)
		}
	}
	code, body := httpJSON(t, "GET", urlA+"/v1/aggregates/account/acc-3", nil)
	if code != 200 || body["version"] != 2.0 {
		t.Errorf("read after the rebuild: %d %v", code, body)
	}

	// Failures exit 1 with the node's message.
	code, _, stderr = runCLI(t, "rebuild", "--type", "nope", "--node", urlB)
	if code != 1 || !strings.Contains(stderr, `unknown aggregate type "nope"`) {
		t.Errorf("unknown type: exit %d, stderr %q", code, stderr)
	}
	code, _, stderr = runCLI(t, "rebuild", "--type", "account", "--node", "http://127.0.0.1:1", "--timeout", "2s")
	if code != 1 || !strings.Contains(stderr, "cannot read the cluster map") {
		t.Errorf("unreachable node: exit %d, stderr %q", code, stderr)
	}
	code, _, stderr = runCLI(t, "rebuild", "--node", urlA)
	if code != 2 || !strings.Contains(stderr, "missing --type") {
		t.Errorf("no type: exit %d, stderr %q", code, stderr)
	}
}

// TestRebuildCLIToken: against nodes that require a bearer token, esker
// rebuild sends --api-token (or the first of $ESKER_API_TOKEN) and fails
// with the node's 401 without it.
func TestRebuildCLIToken(t *testing.T) {
	url, _ := startTestNode(t, startTestBroker(t), esker.APITokens("tk-1"))
	code, _, stderr := runCLI(t, "rebuild", "--type", "account", "--node", url, "--interval", "100ms")
	if code != 1 || !strings.Contains(stderr, "401") && !strings.Contains(stderr, "token") {
		t.Fatalf("without a token: exit %d, stderr %q", code, stderr)
	}
	code, stdout, stderr := runCLI(t, "rebuild", "--type", "account", "--node", url, "--interval", "100ms", "--api-token", "tk-1")
	if code != 0 || !strings.Contains(stdout, "rebuild of account done") {
		t.Fatalf("with the token: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
}
