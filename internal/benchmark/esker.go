package benchmark

import (
	"context"
	cryptorand "crypto/rand"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/changelog"
	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/interactive"
)

// RunEsker measures an esker node running the bank example's Account type
// with cfg.Guarantee (see the package comment for the method). It deletes
// and recreates the topics "account-commands", "account-events" and
// "<app>-account-changelog" and the consumer group "<app>".
func RunEsker(ctx context.Context, cfg Config) (Result, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return Result{}, err
	}
	name := NameExactlyOnce
	if cfg.Guarantee == esker.AtLeastOnce {
		name = NameAtLeastOnce
	}
	typ := bank.Account.Name()
	commandsTopic, eventsTopic := typ+"-commands", typ+"-events"
	changelogTopic := changelog.Topic(cfg.AppID, typ)
	topics := []string{commandsTopic, eventsTopic, changelogTopic}
	if cfg.Projections {
		name = NameProjections
		topics = append(topics, changelog.Topic(cfg.AppID, bank.Owners.Name()), changelog.Topic(cfg.AppID, bank.DailyTotals.Name()),
			cfg.AppID+"-"+bank.Owners.Name()+"-repartition", cfg.AppID+"-"+bank.DailyTotals.Name()+"-repartition")
	}
	if err := reset(ctx, cfg.Brokers, topics, []string{cfg.AppID}); err != nil {
		return Result{}, fmt.Errorf("benchmark: %w", err)
	}

	parent := cfg.StateDir
	if parent == "" {
		parent = os.TempDir()
	} else if err := os.MkdirAll(parent, 0o755); err != nil {
		return Result{}, err
	}
	stateDir, err := os.MkdirTemp(parent, "esker-bench-")
	if err != nil {
		return Result{}, err
	}
	defer os.RemoveAll(stateDir)

	node, err := esker.NewNode(
		esker.Brokers(cfg.Brokers...),
		esker.ApplicationID(cfg.AppID),
		esker.StateDir(filepath.Join(stateDir, "state")),
		esker.HTTPListen(""),
		esker.Partitions(cfg.Partitions),
		esker.ProcessingGuarantee(cfg.Guarantee),
		esker.InstanceID("bench"),
		esker.Logger(cfg.Logger),
		// The bank's owner is personal data. Runs on one broker share the
		// keys topic, so they share the master key too.
		esker.MasterKey("bench", benchMasterKey()),
	)
	if err != nil {
		return Result{}, err
	}
	if err := node.Register(bank.Account); err != nil {
		return Result{}, err
	}
	if cfg.Projections {
		for _, p := range []esker.Projection{bank.Owners, bank.DailyTotals} {
			if err := node.AddProjection(p); err != nil {
				return Result{}, err
			}
		}
	}
	runCtx, stop := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- node.Run(runCtx) }()
	defer func() {
		stop()
		<-runErr
	}()
	stopped := func() error {
		select {
		case err := <-runErr:
			runErr <- err // for the deferred wait
			return fmt.Errorf("the node stopped: %v", err)
		default:
			return nil
		}
	}

	// Ready.
	for deadline := time.Now().Add(cfg.Timeout); node.Ready() != nil; {
		if err := stopped(); err != nil {
			return Result{}, err
		}
		if time.Now().After(deadline) {
			return Result{}, fmt.Errorf("benchmark: node not ready after %v: %v", cfg.Timeout, node.Ready())
		}
		select {
		case <-ctx.Done():
			return Result{}, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}

	producer, err := newProducer(cfg.Brokers)
	if err != nil {
		return Result{}, err
	}
	defer producer.Close()
	committed := func() int64 { return int64(metricSum(node.Registry(), "esker_transaction_commands", nil)) }
	run := strconv.FormatInt(time.Now().UnixNano(), 36)

	// Warm-up: open every account.
	opens := make([]*kgo.Record, cfg.Entities)
	for i := range opens {
		opens[i] = commandRecord(commandsTopic, accountID(i), "Open", `{"owner":"bench"}`, run+"-open-"+strconv.Itoa(i), cfg.Partitions)
	}
	before := committed()
	acked := produceAll(ctx, producer, opens)
	if err := waitEsker(ctx, cfg, node, "warm-up", cfg.Entities, before, committed, stopped, func(int) int64 { return 1 }); err != nil {
		return Result{}, err
	}
	if err := acked(); err != nil {
		return Result{}, fmt.Errorf("benchmark: produce: %w", err)
	}
	from, err := stableEnds(ctx, cfg.Brokers, eventsTopic, changelogTopic)
	if err != nil {
		return Result{}, err
	}
	accepted := func() float64 {
		return metricSum(node.Registry(), "esker_commands_total", map[string]string{"outcome": "accepted"})
	}
	acceptedBefore := accepted()

	// Throughput: the backlog is built while it is processed.
	deposits := make([]*kgo.Record, cfg.Commands)
	for i := range deposits {
		deposits[i] = commandRecord(commandsTopic, accountID(i%cfg.Entities), "Deposit", `{"amount":1}`, run+"-"+strconv.Itoa(i), cfg.Partitions)
	}
	stopProfile, err := cfg.startProfile()
	if err != nil {
		return Result{}, err
	}
	defer stopProfile() // on failure; pprof.StopCPUProfile is idempotent
	before = committed()
	txnsBefore := metricSum(node.Registry(), "esker_transactions_total", map[string]string{"result": "committed"})
	start := time.Now()
	acked = produceAll(ctx, producer, deposits)
	finalVersion := func(i int) int64 {
		n := cfg.Commands / cfg.Entities
		if i < cfg.Commands%cfg.Entities {
			n++
		}
		return 1 + int64(n)
	}
	if err := waitEsker(ctx, cfg, node, "throughput", cfg.Commands, before, committed, stopped, finalVersion); err != nil {
		return Result{}, err
	}
	elapsed := time.Since(start)
	stopProfile()
	txns := metricSum(node.Registry(), "esker_transactions_total", map[string]string{"result": "committed"}) - txnsBefore
	if cfg.Logger != nil {
		cfg.Logger.Info("throughput phase", "transactions", txns, "commands per transaction", float64(cfg.Commands)/max(txns, 1))
	}
	if err := acked(); err != nil {
		return Result{}, fmt.Errorf("benchmark: produce: %w", err)
	}
	if got := accepted() - acceptedBefore; int(got) != cfg.Commands {
		return Result{}, fmt.Errorf("benchmark: %v of %d deposits accepted", got, cfg.Commands)
	}
	res := Result{Name: name, Commands: cfg.Commands, Duration: elapsed,
		PerSecond: float64(cfg.Commands) / elapsed.Seconds()}

	// Shape of what the node wrote.
	if err := cfg.measureShape(ctx, &res, from, eventsTopic, changelogTopic); err != nil {
		return Result{}, err
	}

	// Latency: sequential Submits from Concurrency goroutines.
	if cfg.LatencyCommands > 0 {
		samples, err := latencyPhase(ctx, cfg, func(ctx context.Context, rng *rand.Rand) error {
			id := accountID(rng.IntN(cfg.Entities))
			o, err := node.Submit(ctx, typ, id, aggregate.Command{Type: "Deposit", Data: []byte(`{"amount":1}`)})
			if err == nil && !o.Accepted {
				err = fmt.Errorf("deposit on %s rejected: %s", id, o.Reason)
			}
			return err
		})
		if err != nil {
			return Result{}, err
		}
		res.Samples = len(samples)
		res.P50, res.P99 = latencies(samples)
	}
	return res, nil
}

// waitEsker waits until every account has reached its final version, which
// the node makes visible right after the transaction that wrote it has
// committed. Progress is reported from the committed-commands metric.
func waitEsker(ctx context.Context, cfg Config, node *esker.Node, phase string, total int, before int64,
	committed func() int64, stopped func() error, finalVersion func(i int) int64) error {
	finished := make(chan error, 1)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		for i := 0; i < cfg.Entities; i++ {
			id := accountID(i)
			for {
				_, err := node.State(wctx, bank.Account.Name(), id, finalVersion(i), time.Second)
				if err == nil {
					break
				}
				var nr *interactive.NotReadyError
				if wctx.Err() != nil || !(errors.Is(err, interactive.ErrTimeout) || errors.Is(err, interactive.ErrNotFound) || errors.As(err, &nr)) {
					finished <- fmt.Errorf("%s: state of %s: %w", phase, id, err)
					return
				}
				if errors.Is(err, interactive.ErrNotFound) || errors.As(err, &nr) {
					time.Sleep(time.Millisecond)
				}
			}
		}
		finished <- nil
	}()
	return wait(ctx, cfg, phase, int64(total), func() int64 { return committed() - before }, finished, stopped)
}

// wait blocks until finished delivers, reporting count every half second;
// it fails when count has not moved for cfg.Timeout or stopped fails.
func wait(ctx context.Context, cfg Config, phase string, total int64, count func() int64, finished <-chan error, stopped func() error) error {
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	last, lastChange := int64(-1), time.Now()
	for {
		select {
		case err := <-finished:
			if err == nil {
				cfg.progress(phase, int(total), int(total))
			}
			return err
		case <-ctx.Done():
			return ctx.Err()
		case now := <-tick.C:
			if err := stopped(); err != nil {
				return fmt.Errorf("%s: %w", phase, err)
			}
			n := count()
			// Done is reported once, when finished says so: counted
			// commands may reach total before their outcomes are read.
			cfg.progress(phase, int(min(n, total-1)), int(total))
			if n != last {
				last, lastChange = n, now
			} else if now.Sub(lastChange) > cfg.Timeout {
				return fmt.Errorf("%s: no progress for %v at %d of %d", phase, cfg.Timeout, n, total)
			}
		}
	}
}

// latencyPhase runs cfg.LatencyCommands round trips from cfg.Concurrency
// goroutines, each one at a time, and returns their durations.
func latencyPhase(ctx context.Context, cfg Config, roundTrip func(context.Context, *rand.Rand) error) ([]time.Duration, error) {
	var (
		mu       sync.Mutex
		samples  = make([]time.Duration, 0, cfg.LatencyCommands)
		firstErr error
		next     int
		wg       sync.WaitGroup
	)
	take := func() bool {
		mu.Lock()
		defer mu.Unlock()
		if next >= cfg.LatencyCommands || firstErr != nil {
			return false
		}
		next++
		return true
	}
	done := make(chan struct{})
	go func() {
		tick := time.NewTicker(500 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				mu.Lock()
				n := len(samples)
				mu.Unlock()
				cfg.progress("latency", n, cfg.LatencyCommands)
			}
		}
	}()
	for g := 0; g < cfg.Concurrency; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 42))
			for take() {
				start := time.Now()
				err := roundTrip(ctx, rng)
				d := time.Since(start)
				mu.Lock()
				if err != nil {
					if firstErr == nil {
						firstErr = err
					}
				} else {
					samples = append(samples, d)
				}
				mu.Unlock()
			}
		}(g)
	}
	wg.Wait()
	close(done)
	if firstErr != nil {
		return nil, fmt.Errorf("latency: %w", firstErr)
	}
	cfg.progress("latency", len(samples), cfg.LatencyCommands)
	return samples, nil
}

// metricSum adds up the samples of a counter, or the sums of a histogram,
// whose labels include the given ones.
func metricSum(g prometheus.Gatherer, name string, labels map[string]string) float64 {
	families, err := g.Gather()
	if err != nil {
		return 0
	}
	var sum float64
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	metrics:
		for _, m := range f.GetMetric() {
			for k, v := range labels {
				found := false
				for _, lp := range m.GetLabel() {
					if lp.GetName() == k && lp.GetValue() == v {
						found = true
					}
				}
				if !found {
					continue metrics
				}
			}
			switch {
			case m.GetCounter() != nil:
				sum += m.GetCounter().GetValue()
			case m.GetHistogram() != nil:
				sum += m.GetHistogram().GetSampleSum()
			}
		}
	}
	return sum
}

// benchMasterKey returns the process's master key, random.
var benchMasterKey = sync.OnceValue(func() []byte {
	key := make([]byte, 32)
	_, _ = cryptorand.Read(key) // never fails (crypto/rand)
	return key
})
