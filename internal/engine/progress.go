package engine

import (
	"context"
	"sync"
	"time"

	"github.com/esker-io/esker/statestore"
)

// progress follows how far the command tasks and the projections this node
// runs are behind their inputs: the lag gauges, and while a projection
// catches up (added to a running system, or after downtime) a log line every
// few seconds with the share done and the rate.
type progress struct {
	e  *Engine
	mu sync.Mutex
	// lag per task (command tasks and projection tasks: their names are
	// distinct), from the high watermarks of its last committed cycle.
	lag map[statestore.Task]int64
	// handled counts input records per projection since the node started.
	handled map[string]int64
	// catchUps are the projections catching up now.
	catchUps map[string]*catchUp
}

type catchUp struct {
	since     time.Time
	handled0  int64 // handled when the catch-up began
	lastLog   time.Time
	lastCount int64 // handled at lastLog
}

// catchUpThreshold is the lag above which a projection counts as catching
// up (and is logged); below it, it is following live.
const catchUpThreshold = 1000

// progressLogInterval is how often a catching-up projection is logged.
var progressLogInterval = 5 * time.Second

func newProgress(e *Engine) *progress {
	return &progress{e: e, lag: map[statestore.Task]int64{}, handled: map[string]int64{}, catchUps: map[string]*catchUp{}}
}

// report records a committed cycle of a command or projection task.
func (p *progress) report(t statestore.Task, lag int64, handled int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.lag[t] = lag
	p.handled[t.Type] += int64(handled)
}

// Lag returns a projection's (or an aggregate type's) lag summed over the
// tasks this node owns.
func (p *progress) Lag(name string) int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lagLocked(name)
}

func (p *progress) lagLocked(name string) int64 {
	var sum int64
	for t, l := range p.lag {
		if t.Type != name {
			continue
		}
		if owned, _ := p.e.TaskStatus(t); !owned {
			delete(p.lag, t)
			continue
		}
		sum += l
	}
	return sum
}

// run updates the lag gauges every second and logs catch-ups until ctx ends.
func (p *progress) run(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			p.tick(now)
		}
	}
}

func (p *progress) tick(now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if m := p.e.cfg.Metrics; m != nil {
		for name := range p.e.types {
			m.CommandLag.WithLabelValues(name).Set(float64(p.lagLocked(name)))
		}
	}
	for _, name := range p.e.ProjectionNames() {
		lag, handled := p.lagLocked(name), p.handled[name]
		if m := p.e.cfg.Metrics; m != nil {
			m.ProjectionLag.WithLabelValues(name).Set(float64(lag))
		}
		cu := p.catchUps[name]
		switch {
		case cu == nil && lag >= catchUpThreshold:
			p.catchUps[name] = &catchUp{since: now, handled0: handled, lastLog: now, lastCount: handled}
			p.e.log.Info("projection catching up", "projection", name, "lag", lag)
		case cu != nil && lag < catchUpThreshold:
			delete(p.catchUps, name)
			d := now.Sub(cu.since)
			p.e.log.Info("projection caught up; following live", "projection", name,
				"records", handled-cu.handled0, "duration", d.Round(time.Millisecond), "lag", lag)
		case cu != nil && now.Sub(cu.lastLog) >= progressLogInterval:
			done := handled - cu.handled0
			rate := float64(handled-cu.lastCount) / now.Sub(cu.lastLog).Seconds()
			pct := 100 * float64(done) / float64(done+lag)
			cu.lastLog, cu.lastCount = now, handled
			p.e.log.Info("projection catching up", "projection", name,
				"done_percent", int(pct), "events_per_second", int(rate), "lag", lag)
		}
	}
}
