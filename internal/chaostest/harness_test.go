package chaostest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// The harness: a kfake cluster hosted by the test process, and esker nodes
// run as separate processes, so that kill -9 and SIGSTOP act on a real
// process with its own memory, store and Kafka clients.

// buildEsker builds cmd/esker into dir, with -race when the test runs with
// it, so the node processes are checked by the race detector too.
// The esker node processes seal the bank's personal fields with this
// master key, which they read from the environment.
func init() { os.Setenv("ESKER_MASTER_KEY", "chaos-1:AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=") }

func buildEsker(t testing.TB, dir string) string {
	t.Helper()
	bin := filepath.Join(dir, "esker")
	args := []string{"build", "-o", bin}
	if raceEnabled {
		args = append(args, "-race")
	}
	out, err := exec.Command("go", append(args, "github.com/esker-io/esker/cmd/esker")...).CombinedOutput()
	if err != nil {
		t.Fatalf("go build cmd/esker: %v\n%s", err, out)
	}
	return bin
}

// brokerSet is the kfake cluster with what the faults need to know about
// it: each broker's port (to add a removed broker back where the nodes'
// seed list points) and which brokers are removed.
type brokerSet struct {
	c *kfake.Cluster

	mu      sync.Mutex
	ports   map[int32]int
	removed map[int32]bool
	// lns are the listeners kfake accepted on, by address.
	lns map[string]*trackingListener
}

// newBrokerSet starts three brokers. The group minimum session timeout is
// lowered so nodes can use a 1 s session timeout (kfake's default minimum
// is 6 s). The listeners are wrapped so that removing a broker also drops
// its open connections, as a broker process that goes away would: kfake's
// RemoveNode only closes the listener, and a client that keeps an old
// connection to a broker re-added under the same id would be answered
// NOT_LEADER forever (kfake compares broker pointers, not ids).
//
// With fixEpochs, OffsetForLeaderEpoch requests are corrected before kfake
// answers them; see fixLeaderEpochs.
func newBrokerSet(t testing.TB, fixEpochs bool) *brokerSet {
	t.Helper()
	bs := &brokerSet{ports: map[int32]int{}, removed: map[int32]bool{}, lns: map[string]*trackingListener{}}
	c, err := kfake.NewCluster(
		kfake.NumBrokers(3),
		kfake.GroupMinSessionTimeout(100*time.Millisecond),
		kfake.ListenFn(bs.listen),
	)
	if err != nil {
		t.Fatal(err)
	}
	bs.c = c
	if fixEpochs {
		fixLeaderEpochs(c)
	}
	for i, addr := range c.ListenAddrs() {
		_, port, _ := net.SplitHostPort(addr)
		bs.ports[int32(i)], _ = strconv.Atoi(port)
	}
	return bs
}

// fixLeaderEpochs works around a kfake bug that a leader move exposes.
// After a leader change (ShufflePartitionLeaders, MoveTopicPartition,
// RemoveNode, AddNode) a consumer validates its position with
// OffsetForLeaderEpoch for the epoch it last consumed. kfake derives the
// epochs it knows from the record batches it holds, so until a batch is
// written at the new epoch it answers UNDEFINED_EPOCH_OFFSET (-1) for the
// older epoch, where Kafka answers the log end (a new leader's epoch starts
// at the log end when it is elected). franz-go takes -1 as a diverged log
// (KIP-320) and resets the partition like an out-of-range fetch: esker's
// command consumer, with franz-go's default reset, starts the partition
// over from offset 0. kfake never truncates a log, so no consumer ever
// diverges: asking for the current epoch, which kfake answers with the
// high watermark, gives the answer Kafka would. Set
// ESKER_CHAOS_KFAKE_EPOCH_FIX=0 to run without it.
func fixLeaderEpochs(c *kfake.Cluster) {
	c.ControlKey(int16(kmsg.OffsetForLeaderEpoch), func(kreq kmsg.Request) (kmsg.Response, error, bool) {
		req := kreq.(*kmsg.OffsetForLeaderEpochRequest)
		for i := range req.Topics {
			for j := range req.Topics[i].Partitions {
				p := &req.Topics[i].Partitions[j]
				if p.CurrentLeaderEpoch >= 0 && p.LeaderEpoch < p.CurrentLeaderEpoch {
					p.LeaderEpoch = p.CurrentLeaderEpoch
				}
			}
		}
		return nil, nil, false // kfake answers the corrected request
	})
}

func (bs *brokerSet) listen(network, address string) (net.Listener, error) {
	ln, err := net.Listen(network, address)
	if err != nil {
		return nil, err
	}
	tl := &trackingListener{Listener: ln, conns: map[net.Conn]struct{}{}}
	bs.mu.Lock()
	bs.lns[ln.Addr().String()] = tl
	bs.mu.Unlock()
	return tl, nil
}

// addrs is the seed list every node gets: all three brokers, whether or
// not one is removed at the moment.
func (bs *brokerSet) addrs() []string {
	out := make([]string, 0, 3)
	for id := int32(0); id < 3; id++ {
		out = append(out, net.JoinHostPort("127.0.0.1", strconv.Itoa(bs.ports[id])))
	}
	return out
}

// present returns the ids of the brokers in the cluster now.
func (bs *brokerSet) present() []int32 {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	var out []int32
	for id := int32(0); id < 3; id++ {
		if !bs.removed[id] {
			out = append(out, id)
		}
	}
	return out
}

// remove takes a broker out of the cluster: kfake moves its partitions to
// the others (the data is shared, nothing is lost) and we drop its
// connections.
func (bs *brokerSet) remove(id int32) error {
	if err := bs.c.RemoveNode(id); err != nil {
		return err
	}
	bs.mu.Lock()
	bs.removed[id] = true
	bs.mu.Unlock()
	return nil
}

// addBack adds a removed broker again under its id and port.
func (bs *brokerSet) addBack(id int32) error {
	var err error
	for range 50 { // the port may linger a moment after the close
		if _, _, err = bs.c.AddNode(id, bs.ports[id]); err == nil {
			bs.mu.Lock()
			delete(bs.removed, id)
			bs.mu.Unlock()
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return err
}

// trackingListener remembers the connections it accepted, and closes them
// when it is closed.
type trackingListener struct {
	net.Listener
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		c.Close()
		return nil, net.ErrClosed
	}
	tc := &trackedConn{Conn: c, l: l}
	l.conns[tc] = struct{}{}
	return tc, nil
}

func (l *trackingListener) Close() error {
	err := l.Listener.Close()
	l.mu.Lock()
	l.closed = true
	conns := l.conns
	l.conns = map[net.Conn]struct{}{}
	l.mu.Unlock()
	for c := range conns {
		c.(*trackedConn).Conn.Close()
	}
	return err
}

type trackedConn struct {
	net.Conn
	l    *trackingListener
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		delete(c.l.conns, c)
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}

// nodeConfig is what every node process is started with.
type nodeConfig struct {
	bin            string
	brokers        []string
	partitions     int
	sessionTimeout time.Duration
	runDir         string
	logLevel       string
}

// nodeProc is one esker node process: its port, state directory and log
// stay the same across restarts, so a restart is the same node coming back
// (its instance id, hence its transactional id, derives from the
// advertised URL and the state directory).
type nodeProc struct {
	name    string
	index   int
	port    int
	url     string
	dataDir string
	logPath string
	cfg     nodeConfig
	clock   func() time.Duration

	mu      sync.Mutex
	cmd     *exec.Cmd
	logFile *os.File
	running bool
	paused  bool
	// expectExit is set before the harness kills or stops the process,
	// so its exit is not reported as unexpected.
	expectExit bool
	exited     chan struct{}
	starts     int
	// onExit is told about exits nobody asked for.
	onExit func(n *nodeProc, err error)
}

func newNodeProc(cfg nodeConfig, index int, clock func() time.Duration, onExit func(*nodeProc, error)) (*nodeProc, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	name := fmt.Sprintf("n%d", index+1)
	return &nodeProc{
		name:    name,
		index:   index,
		port:    port,
		url:     fmt.Sprintf("http://127.0.0.1:%d", port),
		dataDir: filepath.Join(cfg.runDir, name+"-data"),
		logPath: filepath.Join(cfg.runDir, name+".log"),
		cfg:     cfg,
		clock:   clock,
		onExit:  onExit,
	}, nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// start runs the process; it does not wait for it to be ready. Its output
// is appended to its log file, after a line that says which start this is.
func (n *nodeProc) start() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.running {
		return fmt.Errorf("%s is running", n.name)
	}
	f, err := os.OpenFile(n.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	n.starts++
	fmt.Fprintf(f, "=== chaos: start #%d of %s at +%.3fs ===\n", n.starts, n.name, n.clock().Seconds())
	cmd := exec.Command(n.cfg.bin, "node",
		"--brokers", strings.Join(n.cfg.brokers, ","),
		"--http", fmt.Sprintf("127.0.0.1:%d", n.port),
		"--data", n.dataDir,
		"--partitions", strconv.Itoa(n.cfg.partitions),
		"--standby-replicas", "1",
		"--session-timeout", n.cfg.sessionTimeout.String(),
		"--log-level", n.cfg.logLevel,
	)
	cmd.Stdout, cmd.Stderr = f, f
	// If the test process dies (go test's timeout panics without running
	// cleanups), the node dies with it instead of running on alone.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return err
	}
	n.cmd, n.logFile, n.running, n.paused, n.expectExit = cmd, f, true, false, false
	exited := make(chan struct{})
	n.exited = exited
	go func() {
		err := cmd.Wait()
		n.mu.Lock()
		expected := n.expectExit
		n.running, n.paused = false, false
		fmt.Fprintf(f, "=== chaos: %s exited at +%.3fs: %v (expected %t) ===\n", n.name, n.clock().Seconds(), exitText(err), expected)
		f.Close()
		onExit := n.onExit
		n.mu.Unlock()
		close(exited)
		if !expected && onExit != nil {
			onExit(n, err)
		}
	}()
	return nil
}

func exitText(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// signal sends sig to the running process and marks the exit as expected
// when sig ends it. It returns the channel closed at its exit, or nil when
// it is not running.
func (n *nodeProc) signal(sig syscall.Signal, note string) chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.running {
		return nil
	}
	if sig == syscall.SIGKILL || sig == syscall.SIGTERM {
		n.expectExit = true
	}
	if n.logFile != nil && note != "" {
		fmt.Fprintf(n.logFile, "=== chaos: %s at +%.3fs ===\n", note, n.clock().Seconds())
	}
	_ = n.cmd.Process.Signal(sig)
	switch sig {
	case syscall.SIGSTOP:
		n.paused = true
	case syscall.SIGCONT:
		n.paused = false
	}
	return n.exited
}

// kill sends SIGKILL (no shutdown: no transaction end, no group leave, no
// store close) and waits for the exit.
func (n *nodeProc) kill(note string) {
	if ch := n.signal(syscall.SIGKILL, note); ch != nil {
		<-ch
	}
}

// stop asks the process to shut down (SIGTERM) and kills it if it has not
// stopped within timeout.
func (n *nodeProc) stop(timeout time.Duration, note string) (graceful bool) {
	n.signal(syscall.SIGCONT, "")
	ch := n.signal(syscall.SIGTERM, note)
	if ch == nil {
		return true
	}
	select {
	case <-ch:
		return true
	case <-time.After(timeout):
		n.kill("did not stop in time: kill -9")
		return false
	}
}

func (n *nodeProc) pause(note string)  { n.signal(syscall.SIGSTOP, note) }
func (n *nodeProc) resume(note string) { n.signal(syscall.SIGCONT, note) }

// wipe deletes the node's data directory; the process must not run.
func (n *nodeProc) wipe() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.running {
		return fmt.Errorf("%s is running", n.name)
	}
	return os.RemoveAll(n.dataDir)
}

// status says whether the process runs and whether it is paused.
func (n *nodeProc) status() (running, paused bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.running, n.paused
}

// note appends a line to the node's log, to line up its output with the
// faults.
func (n *nodeProc) note(format string, args ...any) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.logFile != nil && n.running {
		fmt.Fprintf(n.logFile, "=== chaos: +%.3fs "+format+" ===\n", append([]any{n.clock().Seconds()}, args...)...)
	}
}

var probe = &http.Client{Timeout: 2 * time.Second}

// ready reports whether the node answers /readyz with 200.
func (n *nodeProc) ready() bool {
	resp, err := probe.Get(n.url + "/readyz")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// waitReady waits until the node is ready, the process exits or ctx ends.
func (n *nodeProc) waitReady(ctx context.Context) error {
	for {
		if n.ready() {
			return nil
		}
		if running, _ := n.status(); !running {
			return fmt.Errorf("%s is not running", n.name)
		}
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), fmt.Errorf("%s not ready", n.name))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// logScan looks for what a node must never print: race reports, panics,
// and a transaction end that waited longer than the engine's bound on it
// ("ending transaction … context deadline exceeded waited=…"); an end given
// up within the bound is reported as non-fatal. It returns anomalies with
// the log line as evidence.
func (n *nodeProc) logScan() []Anomaly {
	raw, err := os.ReadFile(n.logPath)
	if err != nil {
		return nil
	}
	var out []Anomaly
	lines := strings.Split(string(raw), "\n")
	for i, l := range lines {
		switch {
		case strings.Contains(l, "WARNING: DATA RACE"):
			out = append(out, Anomaly{Kind: KindDataRace, Detail: fmt.Sprintf("%s:%d %s", n.logPath, i+1, excerpt(lines, i+1, 6))})
		case strings.HasPrefix(l, "panic:") || strings.HasPrefix(l, "fatal error:"):
			out = append(out, Anomaly{Kind: KindPanic, Detail: fmt.Sprintf("%s:%d %s", n.logPath, i+1, excerpt(lines, i, 4))})
		case strings.Contains(l, `msg="ending transaction"`) && strings.Contains(l, "context deadline exceeded"):
			kind := KindEndGivenUp
			if m := waitedRE.FindStringSubmatch(l); m == nil {
				kind = KindStalledCycle // no duration: an engine without the bound
			} else if d, err := time.ParseDuration(m[1]); err != nil || d > maxEndWait {
				kind = KindStalledCycle
			}
			out = append(out, Anomaly{Kind: kind, Detail: fmt.Sprintf("%s:%d %s", n.logPath, i+1, excerpt(lines, i, 3))})
		}
	}
	return out
}

// waitedRE finds how long a transaction end waited in the engine's
// "ending transaction" warning; maxEndWait is the engine's bound on it (10
// s) plus slack for a loaded machine.
var (
	waitedRE   = regexp.MustCompile(`waited=([0-9.]+[a-zµ]+)`)
	maxEndWait = 15 * time.Second
)

// tail returns the last lines of the node's log.
func (n *nodeProc) tail(lines int) string {
	raw, err := os.ReadFile(n.logPath)
	if err != nil {
		return ""
	}
	all := strings.Split(strings.TrimRight(string(raw), "\n"), "\n")
	return strings.Join(all[max(0, len(all)-lines):], "\n")
}

func excerpt(lines []string, from, n int) string {
	end := min(len(lines), from+n)
	return strings.Join(lines[from:end], " | ")
}

// cluster is the system under test: the brokers, the three member nodes
// and a fourth node that joins and leaves.
type cluster struct {
	brokers *brokerSet
	members []*nodeProc
	extra   *nodeProc
	clock   func() time.Duration
	stats   *faultStats
	logf    func(format string, args ...any)

	mu          sync.Mutex
	extraJoined bool
	// settling is set once the faults stopped: from then on an exit
	// nobody asked for is still recorded but no longer restarted by
	// onExit (the settle phase restarts what is down).
	settling bool
	exits    []string
}

func newCluster(t testing.TB, brokers *brokerSet, cfg nodeConfig, clock func() time.Duration, stats *faultStats, logf func(string, ...any)) *cluster {
	t.Helper()
	c := &cluster{brokers: brokers, clock: clock, stats: stats, logf: logf}
	for i := range 4 {
		n, err := newNodeProc(cfg, i, clock, c.onExit)
		if err != nil {
			t.Fatal(err)
		}
		if i < 3 {
			c.members = append(c.members, n)
		} else {
			c.extra = n
		}
	}
	return c
}

// all returns every node process, the fourth included.
func (c *cluster) all() []*nodeProc { return append(append([]*nodeProc{}, c.members...), c.extra) }

// targets is the nodes clients send requests to: the members, whether up
// or not (a client does not know a node is down), and the fourth node
// while it is part of the cluster.
func (c *cluster) targets() []*nodeProc {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.extraJoined {
		return c.all()
	}
	return c.members
}

func (c *cluster) setExtraJoined(joined bool) {
	c.mu.Lock()
	c.extraJoined = joined
	c.mu.Unlock()
}

// onExit records a node process that exited by itself and restarts it (a
// supervisor would), so the run goes on; the exit is an anomaly of the
// run.
func (c *cluster) onExit(n *nodeProc, err error) {
	c.mu.Lock()
	msg := fmt.Sprintf("%s exited by itself at +%.1fs: %s; last log lines:\n%s", n.name, c.clock().Seconds(), exitText(err), n.tail(15))
	c.exits = append(c.exits, msg)
	settling := c.settling
	joined := c.extraJoined
	c.mu.Unlock()
	c.stats.add(&c.stats.UnexpectedExits)
	c.logf("UNEXPECTED EXIT: %s", msg)
	if n == c.extra && !joined {
		return
	}
	if settling {
		return
	}
	go func() {
		time.Sleep(time.Second)
		if err := n.start(); err != nil {
			c.logf("restart %s after its exit: %v", n.name, err)
			return
		}
		c.stats.add(&c.stats.Restarts)
	}()
}

func (c *cluster) unexpectedExits() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.exits...)
}

// startMembers starts the three members, the first alone so that it
// creates the topics, and waits until all are ready.
func (c *cluster) startMembers(ctx context.Context) error {
	for i, n := range c.members {
		if err := n.start(); err != nil {
			return err
		}
		if i == 0 {
			if err := n.waitReady(ctx); err != nil {
				return fmt.Errorf("%w; log:\n%s", err, n.tail(30))
			}
		}
	}
	for _, n := range c.members {
		if err := n.waitReady(ctx); err != nil {
			return fmt.Errorf("%w; log:\n%s", err, n.tail(30))
		}
	}
	return nil
}

// describe is a one-line view of the nodes, for progress lines.
func (c *cluster) describe() string {
	var parts []string
	for _, n := range c.targets() {
		running, paused := n.status()
		switch {
		case paused:
			parts = append(parts, n.name+":paused")
		case !running:
			parts = append(parts, n.name+":down")
		case n.ready():
			parts = append(parts, n.name+":ready")
		default:
			parts = append(parts, n.name+":not-ready")
		}
	}
	if removed := 3 - len(c.brokers.present()); removed > 0 {
		parts = append(parts, fmt.Sprintf("brokers:%d/3", 3-removed))
	}
	return strings.Join(parts, " ")
}

// shutdown stops every process (used at the end of the test).
func (c *cluster) shutdown() {
	c.mu.Lock()
	c.settling = true
	c.mu.Unlock()
	var wg sync.WaitGroup
	for _, n := range c.all() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n.stop(20*time.Second, "test ends: stop")
		}()
	}
	wg.Wait()
}

// clusterView is the part of GET /v1/cluster the watcher records.
type clusterView struct {
	Generation int32 `json:"generation"`
	Members    []struct {
		ID  string `json:"id"`
		URL string `json:"url"`
	} `json:"members"`
	Tasks []struct {
		Partition int32    `json:"partition"`
		Active    string   `json:"active"`
		Pending   string   `json:"pending"`
		Standbys  []string `json:"standbys"`
		Local     *struct {
			Role     string `json:"role"`
			Restored bool   `json:"restored"`
			Lag      int64  `json:"lag"`
		} `json:"local"`
	} `json:"tasks"`
}

// watch polls every running node's GET /v1/cluster once a second until
// ctx ends and appends a node's view to path whenever it changes: the
// evidence of who believed it owned what when an anomaly shows up.
func (c *cluster) watch(ctx context.Context, path string) {
	f, err := os.Create(path)
	if err != nil {
		c.logf("cluster watcher: %v", err)
		return
	}
	defer f.Close()
	last := map[string]string{}
	client := &http.Client{Timeout: time.Second}
	for ctx.Err() == nil {
		names := map[string]string{}
		for _, n := range c.all() {
			names[n.url] = n.name
		}
		name := func(u string) string {
			if n, ok := names[u]; ok {
				return n
			}
			if u == "" {
				return "-"
			}
			return u
		}
		for _, n := range c.all() {
			if running, paused := n.status(); !running || paused {
				if last[n.name] != "down" {
					last[n.name] = "down"
					fmt.Fprintf(f, "+%.1fs %s down or paused\n", c.clock().Seconds(), n.name)
				}
				continue
			}
			resp, err := client.Get(n.url + "/v1/cluster")
			if err != nil {
				continue
			}
			var v clusterView
			err = json.NewDecoder(resp.Body).Decode(&v)
			resp.Body.Close()
			if err != nil || resp.StatusCode != http.StatusOK {
				continue
			}
			// The map names members by group member id: show them by
			// node name.
			ids := map[string]string{}
			for _, m := range v.Members {
				ids[m.ID] = name(m.URL)
			}
			member := func(id string) string {
				if n, ok := ids[id]; ok {
					return n
				}
				return name(id)
			}
			var b strings.Builder
			fmt.Fprintf(&b, "gen %d", v.Generation)
			for _, t := range v.Tasks {
				fmt.Fprintf(&b, " | p%d %s", t.Partition, member(t.Active))
				if t.Pending != "" {
					fmt.Fprintf(&b, " pending %s", member(t.Pending))
				}
				if len(t.Standbys) > 0 {
					var sb []string
					for _, s := range t.Standbys {
						sb = append(sb, member(s))
					}
					fmt.Fprintf(&b, " sb %s", strings.Join(sb, ","))
				}
				if t.Local != nil {
					fmt.Fprintf(&b, " [here %s", t.Local.Role)
					if !t.Local.Restored {
						b.WriteString(" restoring")
					}
					if t.Local.Lag > 0 {
						fmt.Fprintf(&b, " lag %d", t.Local.Lag)
					}
					b.WriteString("]")
				}
			}
			if view := b.String(); view != last[n.name] {
				last[n.name] = view
				fmt.Fprintf(f, "+%.1fs %s %s\n", c.clock().Seconds(), n.name, view)
			}
		}
		sleepCtx(ctx, time.Second)
	}
}
