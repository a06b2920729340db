package engine

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/esker-io/esker/internal/testlog"
	"github.com/esker-io/esker/projection"
	"github.com/esker-io/esker/statestore"
)

// TestProgressLogsCatchUp: a projection far behind its inputs is logged as
// catching up, every progressLogInterval with its share done and its rate,
// and once more when it follows live; the lag counts only owned tasks.
func TestProgressLogsCatchUp(t *testing.T) {
	var logs testlog.Buffer
	p := projection.New("counts", func(n int, _ projection.Event) int { return n + 1 },
		projection.From(projection.Topic("in", func(_, v []byte) (any, error) { return v, nil })))
	e := &Engine{
		cfg:   Config{Projections: []projection.Definition{p.Definition()}},
		log:   slog.New(slog.NewTextHandler(&logs, nil)),
		tasks: map[statestore.Task]*taskState{{Type: "counts", Partition: 0}: {restored: true}, {Type: "counts", Partition: 1}: {restored: true}},
	}
	e.progress = newProgress(e)
	pr := e.progress
	t0 := time.Now()
	pr.report(statestore.Task{Type: "counts", Partition: 0}, 6000, 0)
	pr.report(statestore.Task{Type: "counts", Partition: 1}, 4000, 0)
	pr.report(statestore.Task{Type: "counts", Partition: 7}, 99999, 0) // not owned: not counted
	if lag := pr.Lag("counts"); lag != 10_000 {
		t.Fatalf("lag %d, want 10000 (owned tasks only)", lag)
	}
	pr.tick(t0)
	pr.report(statestore.Task{Type: "counts", Partition: 0}, 1000, 5000)
	pr.report(statestore.Task{Type: "counts", Partition: 1}, 1500, 2500)
	pr.tick(t0.Add(progressLogInterval))
	pr.report(statestore.Task{Type: "counts", Partition: 0}, 0, 1000)
	pr.report(statestore.Task{Type: "counts", Partition: 1}, 1, 1500)
	pr.tick(t0.Add(progressLogInterval + time.Second))
	out := logs.String()
	for _, want := range []string{
		`msg="projection catching up" projection=counts lag=10000`,
		`msg="projection catching up" projection=counts done_percent=75 events_per_second=1500 lag=2500`,
		`msg="projection caught up; following live" projection=counts records=10000`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %s:\n%s", want, out)
		}
	}
}
