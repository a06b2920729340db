package chaostest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/esker-io/esker/examples/bank"
)

// runConfig is a run's knobs, from the environment.
type runConfig struct {
	duration       time.Duration
	seed           uint64
	kinds          []faultKind
	clients        int
	accounts       int
	partitions     int
	sessionTimeout time.Duration
	// fixEpochs corrects kfake's OffsetForLeaderEpoch answers after a
	// leader move (see fixLeaderEpochs).
	fixEpochs bool
	// logLevel is the nodes' --log-level (ESKER_CHAOS_NODE_LOG_LEVEL).
	logLevel string
}

func loadConfig(t *testing.T) runConfig {
	t.Helper()
	cfg := runConfig{clients: 8, accounts: 12, partitions: 6, sessionTimeout: time.Second, fixEpochs: os.Getenv("ESKER_CHAOS_KFAKE_EPOCH_FIX") != "0", logLevel: "info"}
	if s := os.Getenv("ESKER_CHAOS_NODE_LOG_LEVEL"); s != "" {
		cfg.logLevel = s
	}
	var err error
	if cfg.duration, err = time.ParseDuration(os.Getenv("ESKER_CHAOS_DURATION")); err != nil || cfg.duration <= 0 {
		t.Fatalf("ESKER_CHAOS_DURATION=%q: want a duration such as 3m", os.Getenv("ESKER_CHAOS_DURATION"))
	}
	cfg.seed = uint64(time.Now().UnixNano())
	if s := os.Getenv("ESKER_CHAOS_SEED"); s != "" {
		if cfg.seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("ESKER_CHAOS_SEED=%q: want an unsigned integer", s)
		}
	}
	if cfg.kinds, err = parseFaultKinds(os.Getenv("ESKER_CHAOS_FAULTS")); err != nil {
		t.Fatalf("ESKER_CHAOS_FAULTS: %v", err)
	}
	for _, v := range []struct {
		env string
		dst *int
	}{{"ESKER_CHAOS_CLIENTS", &cfg.clients}, {"ESKER_CHAOS_ACCOUNTS", &cfg.accounts}, {"ESKER_CHAOS_PARTITIONS", &cfg.partitions}} {
		if s := os.Getenv(v.env); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n < 1 {
				t.Fatalf("%s=%q: want a positive integer", v.env, s)
			}
			*v.dst = n
		}
	}
	if s := os.Getenv("ESKER_CHAOS_SESSION_TIMEOUT"); s != "" {
		if cfg.sessionTimeout, err = time.ParseDuration(s); err != nil || cfg.sessionTimeout < 100*time.Millisecond {
			t.Fatalf("ESKER_CHAOS_SESSION_TIMEOUT=%q: want a duration of at least 100ms", s)
		}
	}
	return cfg
}

// app is the nodes' application id (esker node's default).
const app = "bank"

// TestChaos runs the chaos suite for ESKER_CHAOS_DURATION of faults; see
// the package documentation. It is skipped without that variable.
func TestChaos(t *testing.T) {
	if os.Getenv("ESKER_CHAOS_DURATION") == "" {
		t.Skip("the chaos suite runs only with ESKER_CHAOS_DURATION set (e.g. ESKER_CHAOS_DURATION=3m)")
	}
	cfg := loadConfig(t)
	// Faults, then up to ~75 s for commands in flight to finish their
	// retries, a few minutes to settle, read and check.
	need := cfg.duration + 4*time.Minute
	deadline, hasDeadline := t.Deadline()
	if hasDeadline && time.Until(deadline) < need {
		t.Fatalf("go test's -timeout leaves %s, the run needs at least %s: pass -timeout %s", time.Until(deadline).Round(time.Second), need, (need + 6*time.Minute).Round(time.Minute))
	}
	// within caps a phase's timeout so that the checks still run before
	// go test's deadline: a test that times out panics without running
	// its cleanups.
	within := func(d, reserve time.Duration) time.Duration {
		if !hasDeadline {
			return d
		}
		return max(10*time.Second, min(d, time.Until(deadline)-reserve))
	}

	runDir, err := os.MkdirTemp("", "esker-chaos-")
	if err != nil {
		t.Fatal(err)
	}
	keep := os.Getenv("ESKER_CHAOS_KEEP") != ""
	t.Cleanup(func() {
		if t.Failed() || keep {
			t.Logf("run directory kept: %s (node logs nN.log, chaos.log, cluster.log, history.jsonl, anomalies.txt, linearizability-*.html)", runDir)
			return
		}
		os.RemoveAll(runDir)
	})
	// The binary is built first: the run's clock (history times, log
	// lines) starts once it is there.
	bin := buildEsker(t, runDir)
	h := NewHistory()
	clock := func() time.Duration { return time.Duration(h.Now()) }
	logFile, err := os.Create(filepath.Join(runDir, "chaos.log"))
	if err != nil {
		t.Fatal(err)
	}
	var logMu sync.Mutex
	// ended is set once the test function has returned: t.Log then
	// panics, and a node may still exit by itself while the cleanups
	// stop the others.
	var ended atomic.Bool
	logf := func(format string, args ...any) {
		line := fmt.Sprintf("+%6.1fs ", clock().Seconds()) + fmt.Sprintf(format, args...)
		logMu.Lock()
		fmt.Fprintln(logFile, line)
		logMu.Unlock()
		if !ended.Load() {
			t.Log(line)
		}
	}
	t.Cleanup(func() { logFile.Close() })

	sum := &Summary{
		Seed: cfg.seed, Duration: cfg.duration.String(), Race: raceEnabled, Clients: cfg.clients, Accounts: cfg.accounts,
		Partitions: cfg.partitions, SessionTimeout: cfg.sessionTimeout.String(), RunDir: runDir,
		Anomalies: map[string]int{}, Linearizability: map[string]int{},
	}
	for _, k := range cfg.kinds {
		sum.FaultKinds = append(sum.FaultKinds, string(k))
	}
	sum.Tree = treeState()
	logf("chaos run: seed %d (ESKER_CHAOS_SEED=%d reproduces the fault schedule), faults %v, kfake epoch fix %t, run directory %s", cfg.seed, cfg.seed, cfg.kinds, cfg.fixEpochs, runDir)

	brokers := newBrokerSet(t, cfg.fixEpochs)
	t.Cleanup(brokers.c.Close)
	stats := newFaultStats()
	c := newCluster(t, brokers, nodeConfig{bin: bin, brokers: brokers.addrs(), partitions: cfg.partitions, sessionTimeout: cfg.sessionTimeout, runDir: runDir, logLevel: cfg.logLevel}, clock, stats, logf)
	t.Cleanup(c.shutdown) // before the brokers close (cleanups run last-in first-out)
	t.Cleanup(func() { ended.Store(true) })

	var accounts []string
	for i := range cfg.accounts {
		accounts = append(accounts, fmt.Sprintf("acc-%02d", i))
	}
	wl := newWorkload(h, c, accounts, cfg.clients, cfg.seed, logf)
	var check *CheckResult
	finish := func(errText string) {
		sum.Error = errText
		sum.fill(wl, stats, check)
		sum.Passed = errText == "" && !t.Failed() && check != nil && !check.Fatal() && anomalyFree(sum.Anomalies)
		t.Log("\n" + sum.text())
		if path := os.Getenv("ESKER_CHAOS_REPORT"); path != "" {
			if err := sum.appendJSON(path); err != nil {
				t.Errorf("ESKER_CHAOS_REPORT: %v", err)
			}
		}
		if !sum.Passed {
			t.Fail()
		}
	}

	startCtx, cancelStart := context.WithTimeout(context.Background(), 3*time.Minute)
	err = c.startMembers(startCtx)
	cancelStart()
	if err != nil {
		finish("the nodes did not start: " + err.Error())
		return
	}
	logf("three nodes ready: %s", c.describe())
	watchCtx, stopWatch := context.WithCancel(context.Background())
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		c.watch(watchCtx, filepath.Join(runDir, "cluster.log"))
	}()
	defer func() { stopWatch(); <-watchDone }()

	// The run: the workload from the start, the faults after a short
	// warm-up, progress every 10 s.
	runCtx, stopRun := context.WithTimeout(context.Background(), cfg.duration)
	defer stopRun()
	wlDone := make(chan struct{})
	go func() {
		defer close(wlDone)
		wl.run(runCtx)
	}()
	progressDone := make(chan struct{})
	go func() {
		defer close(progressDone)
		tick := time.NewTicker(10 * time.Second)
		defer tick.Stop()
		for {
			select {
			case <-tick.C:
				logf("progress: %s | %s", progressLine(wl, stats), c.describe())
			case <-wlDone:
				return
			}
		}
	}()
	nm := newNemesis(c, cfg.kinds, cfg.seed, cfg.sessionTimeout, cfg.partitions, app, stats, logf)
	if sleepCtx(runCtx, 5*time.Second) {
		nm.run(runCtx)
	}
	<-runCtx.Done()
	logf("faults stop; healing: %s", c.describe())
	nm.heal()

	// Settle: commands in flight finish their retries on a healed
	// cluster, every member becomes ready, the group consumes every
	// command and every transaction ends.
	<-wlDone
	<-progressDone
	logf("workload drained: %s", progressLine(wl, stats))
	settleCtx, cancelSettle := context.WithTimeout(context.Background(), within(4*time.Minute, 3*time.Minute))
	defer cancelSettle()
	nm.heal() // a node may have exited by itself meanwhile
	for _, n := range c.members {
		if err := n.waitReady(settleCtx); err != nil {
			c.logf("settle: %v", err)
			sum.Anomalies[KindNoSettle]++
		}
	}
	idle, err := waitIdle(settleCtx, brokers.addrs(), app)
	if err != nil {
		logf("settle: the cluster did not become idle: %s (%v)", idle, err)
		sum.Anomalies[KindNoSettle]++
	}
	logf("settled: %s", c.describe())

	// The truth and the nodes' answers.
	readCtx, cancelRead := context.WithTimeout(context.Background(), within(2*time.Minute, 2*time.Minute))
	defer cancelRead()
	events, ownerKeys, err := readEvents(readCtx, brokers.addrs(), cfg.partitions)
	if err != nil {
		finish("reading account-events: " + err.Error())
		return
	}
	counts := map[string]int64{}
	for _, e := range events {
		counts[e.Account]++
	}
	finalReads := settledReads(c, wl, accounts, counts)
	eventsAPI := map[string][]EventRecord{}
	for _, acc := range accounts {
		evs, err := listEvents(wl, c.members[0], acc)
		if err != nil {
			logf("events route of %s on n1: %v", acc, err)
			continue
		}
		eventsAPI[acc] = evs
	}

	owners, err := settledOwners(wl, c.members[0])
	if err != nil {
		logf("owners projection on n1: %v", err)
		sum.Anomalies[KindProjection]++
	}

	ops := h.Ops()
	if err := WriteJSONL(filepath.Join(runDir, "history.jsonl"), ops); err != nil {
		t.Errorf("writing the history: %v", err)
	}
	logf("checking %d operations against %d events", len(ops), len(events))
	r := Check(CheckInput{
		History: ops, Events: events, FinalReads: finalReads, EventsAPI: eventsAPI, Owners: owners, OwnerKeys: ownerKeys,
		ResolveUnknown: true, LinearizabilityTimeout: within(time.Minute, 90*time.Second), VisualizeDir: runDir,
	})
	check = &r
	for _, msg := range c.unexpectedExits() {
		r.Anomalies = append(r.Anomalies, Anomaly{Kind: KindNodeExit, Detail: msg})
	}
	for _, n := range c.all() {
		r.Anomalies = append(r.Anomalies, n.logScan()...)
	}
	check = &r
	if err := writeAnomalies(filepath.Join(runDir, "anomalies.txt"), r.Anomalies); err != nil {
		t.Errorf("writing anomalies: %v", err)
	}
	const shown = 40
	for i, a := range r.Anomalies {
		if i == shown {
			logf("… %d more anomalies in %s", len(r.Anomalies)-shown, filepath.Join(runDir, "anomalies.txt"))
			break
		}
		logf("ANOMALY %s", a)
	}
	finish("")
}

// anomalyFree reports whether the harness's own counts (settling) hold no
// failure.
func anomalyFree(m map[string]int) bool {
	for k, n := range m {
		if n > 0 && !nonFatalKinds[k] {
			return false
		}
	}
	return true
}

func progressLine(w *workload, s *faultStats) string {
	s.mu.Lock()
	brokerFaults := 0
	for _, n := range s.BrokerFaults {
		brokerFaults += n
	}
	s.mu.Unlock()
	return fmt.Sprintf("commands %d (ok %d, rejected %d, unknown %d, not sent %d), reads %d (%d failed), in flight %d | kills %d (wiped %d), pauses %d, broker faults %d, leader moves %d, bounces %d, joins %d, unexpected exits %d",
		w.stats.Invoked.Load(), w.stats.OK.Load(), w.stats.Rejected.Load(), w.stats.Unknown.Load(), w.stats.NotSent.Load(),
		w.stats.Reads.Load(), w.stats.ReadsFailed.Load(), w.stats.InFlight.Load(),
		s.Kills.Load(), s.KillWipes.Load(), s.Pauses.Load(), brokerFaults, s.LeaderMoves.Load(), s.BrokerBounces.Load(), s.Joins.Load(), s.UnexpectedExits.Load())
}

// settledReads asks every member for every account: a plain read at the
// version the events topic has (each node answers for the owner, locally
// or by forwarding), and a stale=true read, which a standby copy may answer.
// A node that answers 503 (a late rebalance) is asked again for up to 30 s.
func settledReads(c *cluster, w *workload, accounts []string, counts map[string]int64) []NodeRead {
	var out []NodeRead
	for _, acc := range accounts {
		for _, n := range c.members {
			for _, stale := range []bool{false, true} {
				url := fmt.Sprintf("%s/v1/aggregates/account/%s?minVersion=%d&wait=10s", n.url, acc, counts[acc])
				if stale {
					url = fmt.Sprintf("%s/v1/aggregates/account/%s?stale=true", n.url, acc)
				}
				r := NodeRead{Node: n.index + 1, Account: acc, Stale: stale}
				deadline := time.Now().Add(30 * time.Second)
				for {
					status, body, _, err := w.do(http.MethodGet, url, nil)
					r.Status, r.Err = status, ""
					if err != nil {
						r.Err = err.Error()
					} else if st, perr := parseState(status, body); perr != nil {
						r.Err = perr.Error()
					} else {
						r.Version, r.State, r.Standby = st.Version, st.State, st.Standby
					}
					if (r.Err == "" && status != http.StatusServiceUnavailable) || time.Now().After(deadline) {
						break
					}
					time.Sleep(500 * time.Millisecond)
				}
				out = append(out, r)
			}
		}
	}
	return out
}

// settledOwners lists the owners projection through a node once it has
// stopped changing (the projection folds the last events shortly after the
// cluster is idle), without rows left empty.
func settledOwners(w *workload, n *nodeProc) (map[string]bank.OwnerTotals, error) {
	var last map[string]bank.OwnerTotals
	stableSince := time.Now()
	deadline := time.Now().Add(90 * time.Second)
	for {
		cur, err := listOwners(w, n)
		switch {
		case err != nil:
			stableSince = time.Now()
		case !maps.Equal(cur, last):
			last, stableSince = cur, time.Now()
		case time.Since(stableSince) >= 3*time.Second:
			return cur, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no stable listing within 90 s: %v", err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func listOwners(w *workload, n *nodeProc) (map[string]bank.OwnerTotals, error) {
	out := map[string]bank.OwnerTotals{}
	after := ""
	for {
		status, body, _, err := w.do(http.MethodGet, n.url+"/v1/projections/owners?limit=1000&after="+after, nil)
		if err != nil {
			return nil, err
		}
		if status != http.StatusOK {
			return nil, fmt.Errorf("status %d: %s", status, body)
		}
		var page struct {
			Rows []struct {
				Key   string           `json:"key"`
				Value bank.OwnerTotals `json:"value"`
			} `json:"rows"`
			Next string `json:"next"`
		}
		if err := json.Unmarshal(body, &page); err != nil {
			return nil, err
		}
		for _, r := range page.Rows {
			if r.Value != (bank.OwnerTotals{}) {
				out[r.Key] = r.Value
			}
		}
		if page.Next == "" {
			return out, nil
		}
		after = page.Next
	}
}

// listEvents reads an account's events through a node's events route.
func listEvents(w *workload, n *nodeProc, acc string) ([]EventRecord, error) {
	var out []EventRecord
	from := int64(1)
	for {
		url := fmt.Sprintf("%s/v1/aggregates/account/%s/events?from=%d&limit=1000", n.url, acc, from)
		status, body, _, err := w.do(http.MethodGet, url, nil)
		if err != nil {
			return nil, err
		}
		if status == http.StatusNotFound {
			return out, nil
		}
		if status != http.StatusOK {
			return nil, fmt.Errorf("status %d: %s", status, body)
		}
		var page struct {
			Events []struct {
				Version   int64  `json:"version"`
				Type      string `json:"type"`
				EventID   string `json:"eventId"`
				CommandID string `json:"commandId"`
				Data      struct {
					Amount int64  `json:"amount"`
					Owner  string `json:"owner"`
				} `json:"data"`
			} `json:"events"`
		}
		if err := json.Unmarshal(body, &page); err != nil {
			return nil, fmt.Errorf("events page: %w", err)
		}
		for _, e := range page.Events {
			out = append(out, EventRecord{Account: acc, Version: e.Version, Type: e.Type, EventID: e.EventID,
				CommandID: e.CommandID, Amount: e.Data.Amount, Owner: e.Data.Owner})
		}
		if len(page.Events) < 1000 {
			return out, nil
		}
		from = page.Events[len(page.Events)-1].Version + 1
	}
}

// treeState names the code under test: the commit and whether the work
// tree had changes (the nodes are built from the work tree).
func treeState() string {
	rev, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	out := strings.TrimSpace(string(rev))
	if st, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(bytes.TrimSpace(st)) > 0 {
		out += " with uncommitted changes"
	}
	return out
}

func writeAnomalies(path string, as []Anomaly) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	for _, a := range as {
		fmt.Fprintln(f, a.String())
	}
	return f.Close()
}
