package pgsink_test

import (
	"context"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/internal/testlog"
	"github.com/esker-io/esker/projection/pgsink"
)

// TestHelperProcess is not a test: TestCrash and TestZombie run the test
// binary again with PGSINK_HELPER=1 to get a sink in a process they can
// kill or freeze. It runs the accounts sink until SIGTERM.
func TestHelperProcess(t *testing.T) {
	if os.Getenv("PGSINK_HELPER") != "1" {
		t.Skip("helper process of TestCrash and TestZombie")
	}
	brokers := strings.Split(os.Getenv("PGSINK_BROKERS"), ",")
	delay, _ := time.ParseDuration(os.Getenv("PGSINK_APPLY_DELAY"))
	txTimeout, _ := time.ParseDuration(os.Getenv("PGSINK_TX_TIMEOUT"))
	if txTimeout <= 0 {
		txTimeout = time.Minute
	}
	maxBatch, _ := strconv.Atoi(os.Getenv("PGSINK_MAX_BATCH"))
	if maxBatch <= 0 {
		maxBatch = 200
	}
	apply := func(ctx context.Context, tx pgx.Tx, events []pgsink.Event) error {
		if err := bank.ApplyAccounts(ctx, tx, events); err != nil {
			return err
		}
		time.Sleep(delay) // inside the transaction, after its writes
		return nil
	}
	s, err := pgsink.New(bank.AccountsSinkName, []string{eventsTopic}, apply,
		pgsink.ConnString(os.Getenv("PGSINK_DB")),
		pgsink.Setup(func(ctx context.Context, tx pgx.Tx) error {
			_, err := tx.Exec(ctx, bank.AccountsTableDDL)
			return err
		}),
		pgsink.MaxBatch(maxBatch),
		pgsink.TxTimeout(txTimeout),
		pgsink.Backoff(20*time.Millisecond, 500*time.Millisecond))
	if err != nil {
		fmt.Fprintln(os.Stderr, "RUN ERROR:", err)
		os.Exit(3)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	err = s.Run(ctx, pgsink.Runtime{AppID: "bank", ClientOpts: clientOpts(brokers), Logger: log})
	if err != nil {
		fmt.Fprintln(os.Stderr, "RUN ERROR:", err)
		os.Exit(3)
	}
	os.Exit(0)
}

// helper is a sink running in a child process.
type helper struct {
	t    testing.TB
	cmd  *exec.Cmd
	out  *testlog.Buffer
	done chan error
}

func startHelper(t testing.TB, brokers []string, dbURL string, env ...string) *helper {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(),
		"PGSINK_HELPER=1",
		"PGSINK_BROKERS="+strings.Join(brokers, ","),
		"PGSINK_DB="+dbURL)
	cmd.Env = append(cmd.Env, env...)
	h := &helper{t: t, cmd: cmd, out: &testlog.Buffer{}, done: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = h.out, h.out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { h.done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGCONT)
		_ = cmd.Process.Kill()
		<-h.done
		if t.Failed() {
			t.Logf("helper %d output:\n%s", cmd.Process.Pid, h.out.String())
		}
	})
	return h
}

// kill sends SIGKILL and waits for the process to end.
func (h *helper) kill() {
	_ = h.cmd.Process.Kill()
	err := <-h.done
	h.done <- err
}

// terminate stops the helper cleanly and fails the test if its Run failed.
func (h *helper) terminate() {
	h.t.Helper()
	_ = h.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-h.done:
		h.done <- err
		if err != nil {
			h.t.Errorf("helper exited with %v:\n%s", err, h.out.String())
		}
	case <-time.After(30 * time.Second):
		h.t.Errorf("helper did not stop within 30s of SIGTERM")
	}
}

func (h *helper) alive() error {
	select {
	case err := <-h.done:
		h.done <- err
		return fmt.Errorf("helper exited (%v):\n%s", err, h.out.String())
	default:
		return nil
	}
}

func sum(m map[int32]int64) int64 {
	var n int64
	for _, v := range m {
		n += v
	}
	return n
}

// produceUntil produces small transactions until the returned function is
// called (or the test ends).
func produceUntil(t testing.TB, p *producer) (stop func()) {
	quit := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-quit:
				return
			default:
			}
			p.produce(context.Background(), 10, 10)
			time.Sleep(2 * time.Millisecond)
		}
	}()
	var once sync.Once
	stop = func() { once.Do(func() { close(quit); <-done }) }
	t.Cleanup(stop)
	return stop
}

// TestCrash: a sink process is killed with SIGKILL three times in the
// middle of a stream (each time after it wrote some batches, while events
// keep coming), and started again. After the last start the table equals
// the fold of the committed events, and every account's version equals its
// number of events: no event was applied twice and none was skipped.
func TestCrash(t *testing.T) {
	brokers := newCluster(t)
	db := newDB(t)
	m := &model{}
	p := newProducer(t, brokers, m, 100, 6)
	p.produce(context.Background(), 1000, 20)

	stopProducing := produceUntil(t, p)
	rnd := mrand.New(mrand.NewPCG(7, 8))
	for i := range 3 {
		before := db.storedOffsets(t, bank.AccountsSinkName)
		h := startHelper(t, brokers, db.url, "PGSINK_MAX_BATCH=50")
		// Kill only once the process wrote batches of every partition
		// (after the killed one's session expired).
		waitFor(t, 30*time.Second, "the helper to write batches of every partition", func() bool {
			if err := h.alive(); err != nil {
				t.Fatal(err)
			}
			now := db.storedOffsets(t, bank.AccountsSinkName)
			for p := range int32(partitions) {
				if now[p] <= before[p] {
					return false
				}
			}
			return true
		})
		time.Sleep(time.Duration(rnd.IntN(200)) * time.Millisecond)
		h.kill()
		stored := db.storedOffsets(t, bank.AccountsSinkName)
		t.Logf("kill %d: stored offsets %v, were %v at start", i+1, stored, before)
	}
	stopProducing()

	h := startHelper(t, brokers, db.url)
	waitCaughtUp(t, db, brokers, bank.AccountsSinkName, 60*time.Second, h.alive)
	checkTable(t, db, m)
	h.terminate()
	_, total := m.snapshot()
	t.Logf("%d committed events applied exactly once", total)
}

// TestZombie: a sink process is frozen (SIGSTOP) in the middle of a batch's
// transaction, holding the locks of its offset rows. Its session times out,
// the other member of the group takes every partition, and the server ends
// the frozen transaction after TxTimeout, so the new owner is not blocked:
// it catches up while the zombie is still frozen. Then the zombie wakes up
// (SIGCONT) with its stale batch: it must not apply it, and after it
// rejoins, both write on without losing or doubling anything.
func TestZombie(t *testing.T) {
	brokers := newCluster(t)
	db := newDB(t)
	m := &model{}
	p := newProducer(t, brokers, m, 60, 9)
	p.produce(context.Background(), 500, 20)

	zombieURL := withParam(t, db.url, "application_name", "zombie-sink")
	z := startHelper(t, brokers, zombieURL, "PGSINK_APPLY_DELAY=300ms", "PGSINK_TX_TIMEOUT=2s", "PGSINK_MAX_BATCH=50")
	waitFor(t, 30*time.Second, "the zombie-to-be to write batches", func() bool {
		if err := z.alive(); err != nil {
			t.Fatal(err)
		}
		return sum(db.storedOffsets(t, bank.AccountsSinkName)) > 100
	})
	b := startSink(t, newAccountsSink(t, db, pgsink.MaxBatch(100)), brokers)
	waitFor(t, 20*time.Second, "the in-process sink to share the partitions", func() bool {
		n := len(b.Status().Partitions)
		return n > 0 && n < partitions
	})

	stopProducing := produceUntil(t, p)
	// Freeze the zombie while it is inside a batch's transaction.
	inTx := func() bool {
		var n int
		err := db.pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity
WHERE application_name = 'zombie-sink' AND state = 'idle in transaction'`).Scan(&n)
		return err == nil && n > 0
	}
	waitFor(t, 20*time.Second, "the zombie-to-be to be inside a transaction", inTx)
	if err := z.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	if !inTx() {
		t.Log("note: the zombie left its transaction just before it froze")
	}
	time.Sleep(500 * time.Millisecond)
	stopProducing()

	// The in-process sink takes everything over and catches up while the
	// zombie is frozen.
	waitFor(t, 20*time.Second, "the in-process sink to own every partition", func() bool { return len(b.Status().Partitions) == partitions })
	waitCaughtUp(t, db, brokers, bank.AccountsSinkName, 30*time.Second, b.alive)
	checkTable(t, db, m)
	if inTx() {
		t.Error("the frozen zombie still has a transaction open: the server should have ended it after TxTimeout")
	}

	// Wake the zombie: its stale batch must not be applied.
	if err := z.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "the zombie to rejoin", func() bool { return len(b.Status().Partitions) < partitions })
	p.produce(context.Background(), 500, 20)
	waitCaughtUp(t, db, brokers, bank.AccountsSinkName, 30*time.Second, func() error {
		if err := z.alive(); err != nil {
			return err
		}
		return b.alive()
	})
	checkTable(t, db, m)
	z.terminate()
	out := z.out.String()
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "cannot write batch") || strings.Contains(line, "another writer") || strings.Contains(line, "giving the unwritten batch back") || strings.Contains(line, "lost") {
			t.Logf("zombie: %.300s", line)
		}
	}
}
