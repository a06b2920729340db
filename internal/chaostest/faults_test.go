package chaostest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// The faults. A seeded schedule alternates phases where faults run one at a
// time (each healed before the next) with phases where two run at once.
// Every choice (kind, target, duration, variant) is drawn from the seeded
// generator before the fault runs, so a seed names the same sequence of
// faults; their timing against the workload still varies from run to run.

// faultKind names one kind of fault; ESKER_CHAOS_FAULTS selects among them.
type faultKind string

const (
	// faultKill: kill -9 a member node and restart it on its state
	// directory after a few seconds.
	faultKill faultKind = "kill"
	// faultKillWipe: kill -9 a member node, delete its state directory and
	// restart it: it restores everything from the changelogs.
	faultKillWipe faultKind = "kill-wipe"
	// faultPause: SIGSTOP a member node for several session timeouts, then
	// SIGCONT: the group moves its partitions away while it sleeps, and it
	// wakes up as a zombie that still believes it owns them.
	faultPause faultKind = "pause"
	// faultBroker: make the brokers fail some requests (kfake Fault):
	// produce errors, transaction ends, AddPartitionsToTxn, coordinator
	// look-ups, offset commits, fetches, group requests.
	faultBroker faultKind = "broker-fault"
	// faultLeaders: move partition leaders (all of them, or one).
	faultLeaders faultKind = "leader-move"
	// faultBrokerBounce: remove a broker from the cluster, add it back.
	faultBrokerBounce faultKind = "broker-bounce"
	// faultCoordinators: move every group and transaction coordinator.
	faultCoordinators faultKind = "coordinator-move"
	// faultJoinLeave: a fourth node joins (a rebalance moves partitions
	// to it), stays a while, then leaves, gracefully or by kill -9.
	faultJoinLeave faultKind = "join-leave"
)

// faultKinds is every kind, with its weight in the draw.
var faultKinds = []struct {
	kind   faultKind
	weight int
}{
	{faultKill, 3},
	{faultKillWipe, 2},
	{faultPause, 3},
	{faultBroker, 5},
	{faultLeaders, 2},
	{faultBrokerBounce, 2},
	{faultCoordinators, 1},
	{faultJoinLeave, 1},
}

// parseFaultKinds reads ESKER_CHAOS_FAULTS: "" is every kind.
func parseFaultKinds(s string) ([]faultKind, error) {
	var all []faultKind
	for _, k := range faultKinds {
		all = append(all, k.kind)
	}
	if strings.TrimSpace(s) == "" {
		return all, nil
	}
	var out []faultKind
	for _, f := range strings.Split(s, ",") {
		k := faultKind(strings.TrimSpace(f))
		if !slices.Contains(all, k) {
			return nil, fmt.Errorf("unknown fault kind %q; kinds: %v", k, all)
		}
		out = append(out, k)
	}
	return out, nil
}

// faultStats counts what the faults did, for the summary.
type faultStats struct {
	Kills, KillWipes, Restarts, UnexpectedExits atomic.Int64
	Pauses, LeaderMoves, BrokerBounces          atomic.Int64
	CoordinatorMoves, Joins, Leaves             atomic.Int64

	mu sync.Mutex
	// BrokerFaults counts the installed broker faults by name, and
	// BrokerFaultHits the requests they answered.
	BrokerFaults, BrokerFaultHits map[string]int
}

func newFaultStats() *faultStats {
	return &faultStats{BrokerFaults: map[string]int{}, BrokerFaultHits: map[string]int{}}
}

func (s *faultStats) add(c *atomic.Int64) { c.Add(1) }

func (s *faultStats) brokerFault(name string, hits int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.BrokerFaults[name]++
	s.BrokerFaultHits[name] += hits
}

// brokerFaultSpec is one kind of broker fault: a kfake.Fault whose count
// (requests answered with the error) or duration the plan draws.
type brokerFaultSpec struct {
	name  string
	fault kfake.Fault
	// timed faults stay for the plan's hold, answering every matching
	// request; the others answer Count requests (drawn 1–5).
	timed bool
}

// brokerFaultSpecs covers the requests of esker's write path, its group
// membership and its command producer. AddPartitionsToTxn and
// AddOffsetsToTxn are not in it: kfake speaks KIP-890 part 2, with which
// franz-go adds partitions through Produce v12+ and offsets through
// TxnOffsetCommit v5+, so faults on them never fire (measured: 0 hits). REQUEST_TIMED_OUT on produce is
// answered after the records were appended, like a real broker whose
// answer got lost: the client retries, and the idempotent producer must
// not write them twice.
func brokerFaultSpecs(app string) []brokerFaultSpec {
	events, changelog, commands := "account-events", app+"-account-changelog", "account-commands"
	produce := []kmsg.Key{kmsg.Produce}
	return []brokerFaultSpec{
		{name: "produce-events-not-enough-replicas", fault: kfake.Fault{Keys: produce, Topic: events, Err: kerr.NotEnoughReplicas}},
		{name: "produce-events-invalid-record", fault: kfake.Fault{Keys: produce, Topic: events, Err: kerr.InvalidRecord}},
		{name: "produce-events-timeout-after-append", fault: kfake.Fault{Keys: produce, Topic: events, Err: kerr.RequestTimedOut}},
		{name: "produce-changelog-invalid-record", fault: kfake.Fault{Keys: produce, Topic: changelog, Err: kerr.InvalidRecord}},
		{name: "produce-changelog-timeout-after-append", fault: kfake.Fault{Keys: produce, Topic: changelog, Err: kerr.RequestTimedOut}},
		{name: "produce-commands-not-leader", fault: kfake.Fault{Keys: produce, Topic: commands, Err: kerr.NotLeaderForPartition}},
		{name: "produce-commands-timeout-after-append", fault: kfake.Fault{Keys: produce, Topic: commands, Err: kerr.RequestTimedOut}},
		{name: "produce-all-timeout-after-append", fault: kfake.Fault{Keys: produce, Err: kerr.RequestTimedOut}, timed: true},
		{name: "end-txn-abortable", fault: kfake.Fault{Keys: []kmsg.Key{kmsg.EndTxn}, TopLevel: true, Err: kerr.TransactionAbortable}},
		{name: "end-txn-coordinator-not-available", fault: kfake.Fault{Keys: []kmsg.Key{kmsg.EndTxn}, TopLevel: true, Err: kerr.CoordinatorNotAvailable}},
		{name: "end-txn-not-coordinator", fault: kfake.Fault{Keys: []kmsg.Key{kmsg.EndTxn}, TopLevel: true, Err: kerr.NotCoordinator}},
		{name: "end-txn-concurrent-transactions", fault: kfake.Fault{Keys: []kmsg.Key{kmsg.EndTxn}, TopLevel: true, Err: kerr.ConcurrentTransactions}},
		{name: "txn-offset-commit-not-coordinator", fault: kfake.Fault{Keys: []kmsg.Key{kmsg.TxnOffsetCommit}, Err: kerr.NotCoordinator}},
		{name: "txn-offset-commit-illegal-generation", fault: kfake.Fault{Keys: []kmsg.Key{kmsg.TxnOffsetCommit}, Err: kerr.IllegalGeneration}},
		{name: "txn-offset-commit-timeout-after-apply", fault: kfake.Fault{Keys: []kmsg.Key{kmsg.TxnOffsetCommit}, Err: kerr.RequestTimedOut}},
		{name: "find-coordinator-not-available", fault: kfake.Fault{Keys: []kmsg.Key{kmsg.FindCoordinator}, Err: kerr.CoordinatorNotAvailable}, timed: true},
		{name: "init-producer-id-coordinator-loading", fault: kfake.Fault{Keys: []kmsg.Key{kmsg.InitProducerID}, TopLevel: true, Err: kerr.CoordinatorLoadInProgress}, timed: true},
		{name: "heartbeat-not-coordinator", fault: kfake.Fault{Keys: []kmsg.Key{kmsg.Heartbeat}, TopLevel: true, Err: kerr.NotCoordinator}},
		{name: "join-group-coordinator-loading", fault: kfake.Fault{Keys: []kmsg.Key{kmsg.JoinGroup}, TopLevel: true, Err: kerr.CoordinatorLoadInProgress}},
		{name: "sync-group-rebalance-in-progress", fault: kfake.Fault{Keys: []kmsg.Key{kmsg.SyncGroup}, TopLevel: true, Err: kerr.RebalanceInProgress}},
		{name: "fetch-not-leader", fault: kfake.Fault{Keys: []kmsg.Key{kmsg.Fetch}, Err: kerr.NotLeaderForPartition}, timed: true},
		{name: "list-offsets-not-leader", fault: kfake.Fault{Keys: []kmsg.Key{kmsg.ListOffsets}, Err: kerr.NotLeaderForPartition}, timed: true},
	}
}

// faultPlan is one fault with every choice drawn.
type faultPlan struct {
	kind faultKind
	// node is the member a node fault targets.
	node int
	// hold is how long the fault lasts before it is healed.
	hold time.Duration
	// broker is the broker a bounce removes, or a leader move moves to.
	broker int32
	// shuffle moves every leader; otherwise one partition of topic moves.
	shuffle   bool
	topic     string
	partition int32
	spec      brokerFaultSpec
	count     int
	// graceful: the fourth node leaves with SIGTERM rather than kill -9.
	graceful bool
}

func (p faultPlan) String() string {
	switch p.kind {
	case faultKill, faultKillWipe, faultPause:
		return fmt.Sprintf("%s n%d for %s", p.kind, p.node+1, p.hold.Round(100*time.Millisecond))
	case faultBroker:
		if p.spec.timed {
			return fmt.Sprintf("%s %s for %s", p.kind, p.spec.name, p.hold.Round(100*time.Millisecond))
		}
		return fmt.Sprintf("%s %s ×%d", p.kind, p.spec.name, p.count)
	case faultLeaders:
		if p.shuffle {
			return "leader-move: shuffle every partition leader"
		}
		return fmt.Sprintf("leader-move: %s[%d] to broker %d", p.topic, p.partition, p.broker)
	case faultBrokerBounce:
		return fmt.Sprintf("%s broker %d for %s", p.kind, p.broker, p.hold.Round(100*time.Millisecond))
	case faultCoordinators:
		return string(p.kind)
	case faultJoinLeave:
		how := "kill -9"
		if p.graceful {
			how = "graceful"
		}
		return fmt.Sprintf("%s n4 for %s, leaves %s", p.kind, p.hold.Round(100*time.Millisecond), how)
	}
	return string(p.kind)
}

// nemesis runs the fault schedule.
type nemesis struct {
	c              *cluster
	kinds          []faultKind
	rng            *rand.Rand
	sessionTimeout time.Duration
	partitions     int
	app            string
	stats          *faultStats
	logf           func(format string, args ...any)

	mu sync.Mutex
	// busy marks what a running fault holds: a member ("n1"), "broker"
	// (one bounce at a time), "n4".
	busy map[string]bool
	// handles are the broker faults installed now, removed on heal.
	handles map[*kfake.FaultHandle]bool
	wg      sync.WaitGroup

	// brokerDeck is a shuffled deck of broker fault kinds, drawn from the
	// top and reshuffled when empty, so a run with at least as many broker
	// faults as kinds injects every kind.
	brokerDeck []int
}

func newNemesis(c *cluster, kinds []faultKind, seed uint64, sessionTimeout time.Duration, partitions int, app string, stats *faultStats, logf func(string, ...any)) *nemesis {
	return &nemesis{
		c: c, kinds: kinds, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		sessionTimeout: sessionTimeout, partitions: partitions, app: app, stats: stats, logf: logf,
		busy: map[string]bool{}, handles: map[*kfake.FaultHandle]bool{},
	}
}

// between draws a duration in [lo, hi).
func (nm *nemesis) between(lo, hi time.Duration) time.Duration {
	return lo + time.Duration(nm.rng.Int64N(int64(hi-lo)))
}

// pick draws a fault kind among the enabled ones, by weight.
func (nm *nemesis) pick() faultKind {
	total := 0
	for _, k := range faultKinds {
		if slices.Contains(nm.kinds, k.kind) {
			total += k.weight
		}
	}
	n := nm.rng.IntN(total)
	for _, k := range faultKinds {
		if !slices.Contains(nm.kinds, k.kind) {
			continue
		}
		if n < k.weight {
			return k.kind
		}
		n -= k.weight
	}
	return nm.kinds[0]
}

// plan draws every choice of one fault.
func (nm *nemesis) plan() faultPlan {
	p := faultPlan{kind: nm.pick()}
	switch p.kind {
	case faultKill, faultKillWipe:
		p.node = nm.rng.IntN(3)
		p.hold = nm.between(500*time.Millisecond, 6*time.Second)
	case faultPause:
		p.node = nm.rng.IntN(3)
		// Past the session timeout, so the group moves its partitions.
		p.hold = nm.between(2*nm.sessionTimeout, 8*nm.sessionTimeout)
	case faultBroker:
		specs := brokerFaultSpecs(nm.app)
		if len(nm.brokerDeck) == 0 {
			nm.brokerDeck = nm.rng.Perm(len(specs))
		}
		p.spec = specs[nm.brokerDeck[0]]
		nm.brokerDeck = nm.brokerDeck[1:]
		p.count = 1 + nm.rng.IntN(5)
		p.hold = nm.between(500*time.Millisecond, 4*time.Second)
	case faultLeaders:
		p.shuffle = nm.rng.IntN(2) == 0
		topics := []string{"account-commands", "account-events", nm.app + "-account-changelog"}
		p.topic = topics[nm.rng.IntN(len(topics))]
		p.partition = int32(nm.rng.IntN(nm.partitions))
		p.broker = int32(nm.rng.IntN(3))
	case faultBrokerBounce:
		// Broker 2 is kfake's controller, which RemoveNode does not
		// move: removing it would leave the nodes' admin requests
		// (topic creation at start) without a controller, which is
		// kfake's limit, not esker's.
		p.broker = int32(nm.rng.IntN(2))
		p.hold = nm.between(2*time.Second, 10*time.Second)
	case faultJoinLeave:
		p.hold = nm.between(8*time.Second, 25*time.Second)
		p.graceful = nm.rng.IntN(2) == 0
	}
	return p
}

// resource is what a plan holds while it runs; "" holds nothing.
func (p faultPlan) resource() string {
	switch p.kind {
	case faultKill, faultKillWipe, faultPause:
		return fmt.Sprintf("n%d", p.node+1)
	case faultBrokerBounce:
		return "broker"
	case faultJoinLeave:
		return "n4"
	}
	return ""
}

// run drives the schedule until ctx ends, then heals whatever is still
// broken. Phases of about 30 s alternate: one fault at a time, then two at
// once.
func (nm *nemesis) run(ctx context.Context) {
	defer nm.wg.Wait()
	for phase := 0; ctx.Err() == nil; phase++ {
		mixed := phase%2 == 1
		end := time.Now().Add(30 * time.Second)
		nm.logf("nemesis: phase %d, %s", phase, map[bool]string{false: "one fault at a time", true: "two faults at once"}[mixed])
		for time.Now().Before(end) && ctx.Err() == nil {
			if !sleepCtx(ctx, nm.between(2*time.Second, 6*time.Second)) {
				return
			}
			n := 1
			if mixed {
				n = 2
			}
			var plans []faultPlan
			for range n {
				plans = append(plans, nm.plan())
			}
			var wg sync.WaitGroup
			for _, p := range plans {
				if !nm.acquire(p) {
					nm.logf("nemesis: skip %s: its target is busy", p)
					continue
				}
				wg.Add(1)
				nm.wg.Add(1)
				go func() {
					defer nm.wg.Done()
					defer wg.Done()
					defer nm.release(p)
					nm.execute(ctx, p)
				}()
			}
			wg.Wait()
		}
	}
}

func (nm *nemesis) acquire(p faultPlan) bool {
	r := p.resource()
	if r == "" {
		return true
	}
	nm.mu.Lock()
	defer nm.mu.Unlock()
	if nm.busy[r] {
		return false
	}
	nm.busy[r] = true
	return true
}

func (nm *nemesis) release(p faultPlan) {
	if r := p.resource(); r != "" {
		nm.mu.Lock()
		delete(nm.busy, r)
		nm.mu.Unlock()
	}
}

// sleepCtx sleeps d, or less when ctx ends; it reports whether it slept d.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// execute runs one fault and heals it; a hold ends early when ctx ends,
// so the run's end heals everything at once.
func (nm *nemesis) execute(ctx context.Context, p faultPlan) {
	nm.logf("fault: %s", p)
	for _, n := range nm.c.all() {
		n.note("fault: %s", p)
	}
	switch p.kind {
	case faultKill, faultKillWipe:
		n := nm.c.members[p.node]
		n.kill(fmt.Sprintf("fault: kill -9 (%s)", p.kind))
		nm.stats.add(&nm.stats.Kills)
		sleepCtx(ctx, p.hold)
		if p.kind == faultKillWipe {
			if err := n.wipe(); err != nil {
				nm.logf("fault: wipe %s: %v", n.name, err)
			}
			nm.stats.add(&nm.stats.KillWipes)
		}
		nm.restart(n)
	case faultPause:
		n := nm.c.members[p.node]
		if running, _ := n.status(); !running {
			nm.logf("fault: %s is not running, no pause", n.name)
			return
		}
		n.pause("fault: SIGSTOP")
		nm.stats.add(&nm.stats.Pauses)
		sleepCtx(ctx, p.hold)
		n.resume("fault: SIGCONT")
	case faultBroker:
		f := p.spec.fault
		f.Count = p.count
		if p.spec.timed {
			f.Count = -1
		}
		h := nm.c.brokers.c.Fault(f)
		nm.mu.Lock()
		nm.handles[h] = true
		nm.mu.Unlock()
		// A counted fault stays until it has answered its count, or
		// for at most the hold plus 5 s: some requests (JoinGroup,
		// SyncGroup) come only with a rebalance.
		limit := p.hold
		if !p.spec.timed {
			limit += 5 * time.Second
		}
		waitCtx, cancel := context.WithTimeout(ctx, limit)
		if p.spec.timed {
			<-waitCtx.Done()
		} else {
			_ = h.Wait(waitCtx, p.count)
		}
		cancel()
		h.Remove()
		nm.mu.Lock()
		delete(nm.handles, h)
		nm.mu.Unlock()
		nm.stats.brokerFault(p.spec.name, h.Hits())
		nm.logf("fault: %s answered %d requests", p.spec.name, h.Hits())
	case faultLeaders:
		if p.shuffle {
			nm.c.brokers.c.ShufflePartitionLeaders()
		} else {
			present := nm.c.brokers.present()
			b := present[int(p.broker)%len(present)]
			if err := nm.c.brokers.c.MoveTopicPartition(p.topic, p.partition, b); err != nil {
				nm.logf("fault: move %s[%d] to %d: %v", p.topic, p.partition, b, err)
			}
		}
		nm.stats.add(&nm.stats.LeaderMoves)
	case faultBrokerBounce:
		if err := nm.c.brokers.remove(p.broker); err != nil {
			nm.logf("fault: remove broker %d: %v", p.broker, err)
			return
		}
		nm.stats.add(&nm.stats.BrokerBounces)
		sleepCtx(ctx, p.hold)
		if err := nm.c.brokers.addBack(p.broker); err != nil {
			nm.logf("fault: add broker %d back: %v", p.broker, err)
		}
	case faultCoordinators:
		nm.c.brokers.c.RehashCoordinators()
		nm.stats.add(&nm.stats.CoordinatorMoves)
	case faultJoinLeave:
		n := nm.c.extra
		if err := n.wipe(); err != nil {
			nm.logf("fault: wipe %s: %v", n.name, err)
			return
		}
		if err := n.start(); err != nil {
			nm.logf("fault: start %s: %v", n.name, err)
			return
		}
		nm.c.setExtraJoined(true)
		nm.stats.add(&nm.stats.Joins)
		sleepCtx(ctx, p.hold)
		nm.c.setExtraJoined(false)
		if p.graceful {
			if !n.stop(30*time.Second, "fault: leave (SIGTERM)") {
				nm.logf("fault: %s did not stop within 30 s of SIGTERM: killed", n.name)
			}
		} else {
			n.kill("fault: leave (kill -9)")
		}
		nm.stats.add(&nm.stats.Leaves)
	}
}

// restart starts a member again, retrying a failed start.
func (nm *nemesis) restart(n *nodeProc) {
	for i := 0; ; i++ {
		err := n.start()
		if err == nil {
			nm.stats.add(&nm.stats.Restarts)
			return
		}
		if i == 10 {
			nm.logf("fault: restart %s: %v", n.name, err)
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// heal removes what may be left once the schedule stopped: broker faults,
// removed brokers, paused or stopped members.
func (nm *nemesis) heal() {
	nm.mu.Lock()
	for h := range nm.handles {
		h.Remove()
	}
	nm.mu.Unlock()
	for id := int32(0); id < 3; id++ {
		if !slices.Contains(nm.c.brokers.present(), id) {
			if err := nm.c.brokers.addBack(id); err != nil {
				nm.logf("heal: add broker %d back: %v", id, err)
			}
		}
	}
	for _, n := range nm.c.members {
		running, paused := n.status()
		switch {
		case paused:
			n.resume("heal: SIGCONT")
		case !running:
			nm.restart(n)
		}
	}
}
