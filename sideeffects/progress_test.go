package sideeffects_test

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/esker-io/esker/internal/testlog"
	"github.com/esker-io/esker/sideeffects"
)

// TestCatchUpProgressLogged: a consumer that starts far behind logs that it
// is catching up — with the share caught up and the rate every 5 s — and
// that it caught up, and its lag gauge drops to 0.
func TestCatchUpProgressLogged(t *testing.T) {
	if testing.Short() {
		t.Skip("runs for about 7 s")
	}
	const topic = "account-events"
	brokers := newCluster(t, 2, topic)
	produceEvents(t, brokers, topic, entities(100), 1, 30) // 3000 events
	var logs testlog.Buffer
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	// One worker at 5 ms or more per event (at most 200 events/s) keeps
	// the lag far above 1000 until the periodic progress line is out;
	// then the handler is released and the consumer catches up.
	release := make(chan struct{})
	c, err := sideeffects.New("slow", []string{topic}, func(ctx context.Context, ev sideeffects.Event) error {
		select {
		case <-release:
		case <-time.After(5 * time.Millisecond):
		}
		return nil
	}, sideeffects.Workers(1))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- c.Run(ctx, sideeffects.Runtime{AppID: testApp, ClientOpts: clientOpts(brokers), Logger: logger})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	progressLine := `msg="catching up" consumer=slow caught_up_pct=`
	waitFor(t, 30*time.Second, "a progress line", func() bool { return strings.Contains(logs.String(), progressLine) })
	close(release)
	waitFor(t, 30*time.Second, "caught up logged", func() bool { return strings.Contains(logs.String(), `msg="caught up"`) })
	out := logs.String()
	for _, want := range []string{`msg="catching up" consumer=slow lag=`, progressLine, "events_per_s="} {
		if !strings.Contains(out, want) {
			t.Errorf("logs lack %q:\n%s", want, out)
		}
	}
	if s := c.Status(); s.Handled < 2000 {
		t.Errorf("caught up after %d of 3000 events", s.Handled)
	}
	t.Log("\n" + out)
}
