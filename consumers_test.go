package esker_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/esker-io/esker/sideeffects"
)

// failingConsumer stops with an error as soon as it runs, as a sink does on
// a permanent database error.
type failingConsumer struct{}

func (failingConsumer) Name() string { return "broken-sink" }
func (failingConsumer) Run(context.Context, sideeffects.Runtime) error {
	return errors.New("relation accounts does not exist")
}
func (failingConsumer) Ready() error               { return errors.New("not running") }
func (failingConsumer) Report() sideeffects.Report { return sideeffects.Report{Kind: "sink"} }

// TestConsumerFailureDoesNotStopTheNode: a consumer that stops with an
// error leaves the command API serving; the node reports the error in
// ConsumersReady and GET /v1/cluster.
func TestConsumerFailureDoesNotStopTheNode(t *testing.T) {
	c := newCluster(t)
	tn := startTypesNode(t, c.ListenAddrs(), t.TempDir(), []any{bankAccount(), failingConsumer{}})
	waitUntil(t, "the consumer's error", func() bool {
		err := tn.ConsumersReady()
		return err != nil && strings.Contains(err.Error(), "relation accounts does not exist")
	})
	code, body := do(t, tn, "POST", "/v1/aggregates/account/still-up/commands", cmd("Open", map[string]any{"owner": "Up"}))
	mustStatus(t, 200, code, body, "a command after the consumer stopped")
	code, body = do(t, tn, "GET", "/v1/cluster", nil)
	mustStatus(t, 200, code, body, "cluster")
	found := false
	for _, p := range body["processors"].([]any) {
		if p := p.(map[string]any); p["name"] == "broken-sink" && strings.Contains(p["error"].(string), "relation accounts does not exist") {
			found = true
		}
	}
	if !found {
		t.Fatalf("GET /v1/cluster does not show the consumer's error: %v", body["processors"])
	}
	select {
	case err := <-tn.done:
		t.Fatalf("the node stopped: %v", err)
	default:
	}
}
