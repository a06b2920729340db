package benchmark

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Topics and group of the baseline loop.
const (
	BaselineCommandsTopic  = "bench-commands"
	BaselineEventsTopic    = "bench-events"
	BaselineChangelogTopic = "bench-changelog"
	BaselineGroup          = "bench-baseline"
)

const waiterHeader = "bench-id"

// RunBaseline measures a raw kgo.GroupTransactSession consume→produce loop
// that writes, per consumed command, shape.RecordsPerCommand records over two
// topics (see the package comment). Pass the Shape an esker run measured.
// It deletes and recreates the topics "bench-commands", "bench-events" and
// "bench-changelog" and the consumer group "bench-baseline".
func RunBaseline(ctx context.Context, cfg Config, shape Shape) (Result, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return Result{}, err
	}
	if shape.RecordsPerCommand <= 0 {
		return Result{}, fmt.Errorf("benchmark: the baseline needs a shape with records per command > 0")
	}
	if shape.EventsPerCommand <= 0 {
		shape.EventsPerCommand = min(1, shape.RecordsPerCommand)
	}
	topics := []string{BaselineCommandsTopic, BaselineEventsTopic, BaselineChangelogTopic}
	if err := reset(ctx, cfg.Brokers, topics, []string{BaselineGroup}); err != nil {
		return Result{}, fmt.Errorf("benchmark: %w", err)
	}
	// The configs esker gives its topics.
	if err := createTopics(ctx, cfg.Brokers, cfg.Partitions, map[string]map[string]string{
		BaselineCommandsTopic:  {"cleanup.policy": "delete", "retention.ms": strconv.FormatInt((7 * 24 * time.Hour).Milliseconds(), 10)},
		BaselineEventsTopic:    {"cleanup.policy": "delete", "retention.ms": "-1"},
		BaselineChangelogTopic: {"cleanup.policy": "compact"},
	}); err != nil {
		return Result{}, fmt.Errorf("benchmark: %w", err)
	}

	loop, err := newBaselineLoop(cfg, shape)
	if err != nil {
		return Result{}, err
	}
	runCtx, stop := context.WithCancel(context.Background())
	loopErr := make(chan error, 1)
	go func() { loopErr <- loop.run(runCtx) }()
	defer func() {
		stop()
		<-loopErr
		loop.close()
	}()
	stopped := func() error {
		select {
		case err := <-loopErr:
			loopErr <- err
			return fmt.Errorf("the baseline loop stopped: %v", err)
		default:
			return nil
		}
	}

	// Ready: every partition assigned.
	for deadline := time.Now().Add(cfg.Timeout); !loop.ready(); {
		if err := stopped(); err != nil {
			return Result{}, err
		}
		if time.Now().After(deadline) {
			return Result{}, fmt.Errorf("benchmark: baseline loop not assigned its partitions after %v", cfg.Timeout)
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
	run := strconv.FormatInt(time.Now().UnixNano(), 36)

	// Warm-up: the same Open commands esker gets.
	opens := make([]*kgo.Record, cfg.Entities)
	for i := range opens {
		opens[i] = commandRecord(BaselineCommandsTopic, accountID(i), "Open", `{"owner":"bench"}`, run+"-open-"+strconv.Itoa(i), cfg.Partitions)
	}
	acked := produceAll(ctx, producer, opens)
	if err := loop.waitProcessed(ctx, cfg, "warm-up", 0, int64(cfg.Entities), stopped); err != nil {
		return Result{}, err
	}
	if err := acked(); err != nil {
		return Result{}, fmt.Errorf("benchmark: produce: %w", err)
	}
	from, err := stableEnds(ctx, cfg.Brokers, BaselineEventsTopic, BaselineChangelogTopic)
	if err != nil {
		return Result{}, err
	}

	// Throughput.
	deposits := make([]*kgo.Record, cfg.Commands)
	for i := range deposits {
		deposits[i] = commandRecord(BaselineCommandsTopic, accountID(i%cfg.Entities), "Deposit", `{"amount":1}`, run+"-"+strconv.Itoa(i), cfg.Partitions)
	}
	stopProfile, err := cfg.startProfile()
	if err != nil {
		return Result{}, err
	}
	defer stopProfile() // on failure; pprof.StopCPUProfile is idempotent
	before := loop.processedCount()
	start := time.Now()
	acked = produceAll(ctx, producer, deposits)
	if err := loop.waitProcessed(ctx, cfg, "throughput", before, int64(cfg.Commands), stopped); err != nil {
		return Result{}, err
	}
	elapsed := time.Since(start)
	stopProfile()
	if err := acked(); err != nil {
		return Result{}, fmt.Errorf("benchmark: produce: %w", err)
	}
	res := Result{Name: NameBaseline, Baseline: true, Commands: cfg.Commands, Duration: elapsed,
		PerSecond: float64(cfg.Commands) / elapsed.Seconds()}

	if err := cfg.measureShape(ctx, &res, from, BaselineEventsTopic, BaselineChangelogTopic); err != nil {
		return Result{}, err
	}

	// Latency: produce one command, wait for the commit that consumed it.
	if cfg.LatencyCommands > 0 {
		var seq sync.Mutex
		n := 0
		samples, err := latencyPhase(ctx, cfg, func(ctx context.Context, rng *rand.Rand) error {
			seq.Lock()
			n++
			id := run + "-lat-" + strconv.Itoa(n)
			seq.Unlock()
			rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			ch, done := loop.await(id)
			defer done()
			rec := commandRecord(BaselineCommandsTopic, accountID(rng.IntN(cfg.Entities)), "Deposit", `{"amount":1}`, id, cfg.Partitions)
			rec.Headers = []kgo.RecordHeader{{Key: waiterHeader, Value: []byte(id)}}
			if err := producer.ProduceSync(rctx, rec).FirstErr(); err != nil {
				return err
			}
			select {
			case <-ch:
				return nil
			case <-rctx.Done():
				return fmt.Errorf("command %s not committed within 5s", id)
			}
		})
		if err != nil {
			return Result{}, err
		}
		res.Samples = len(samples)
		res.P50, res.P99 = latencies(samples)
	}
	return res, nil
}

// baselineLoop is the raw consume→produce transaction loop.
type baselineLoop struct {
	sess  *kgo.GroupTransactSession
	shape Shape
	parts int32

	eventValue, changelogValue []byte
	eventsOwed, changelogOwed  float64 // fractional records carried over

	mu        sync.Mutex
	assigned  int
	processed int64
	changed   chan struct{} // closed and replaced after every commit
	waiters   map[string]chan struct{}
}

func newBaselineLoop(cfg Config, shape Shape) (*baselineLoop, error) {
	l := &baselineLoop{
		shape:   shape,
		parts:   cfg.Partitions,
		changed: make(chan struct{}),
		waiters: map[string]chan struct{}{},
	}
	// Values sized so that key + value matches esker's mean record size
	// (esker's event records also carry ~10 headers; they are counted in
	// the size, and the baseline puts those bytes in the value).
	keyLen := len(accountID(0))
	l.eventValue = make([]byte, max(1, shape.EventBytes-keyLen))
	l.changelogValue = make([]byte, max(1, shape.ChangelogBytes-keyLen))
	sess, err := kgo.NewGroupTransactSession(
		kgo.SeedBrokers(cfg.Brokers...),
		kgo.ConsumerGroup(BaselineGroup),
		kgo.ConsumeTopics(BaselineCommandsTopic),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.RecordPartitioner(kgo.ManualPartitioner()),
		kgo.DisableAutoCommit(),
		kgo.BlockRebalanceOnPoll(),
		kgo.OnPartitionsAssigned(func(_ context.Context, _ *kgo.Client, m map[string][]int32) {
			l.mu.Lock()
			l.assigned += len(m[BaselineCommandsTopic])
			l.mu.Unlock()
		}),
		kgo.OnPartitionsRevoked(func(_ context.Context, _ *kgo.Client, m map[string][]int32) {
			l.mu.Lock()
			l.assigned -= len(m[BaselineCommandsTopic])
			l.mu.Unlock()
		}),
		kgo.SessionTimeout(10*time.Second),
		kgo.HeartbeatInterval(time.Second),
		kgo.TransactionalID("bench-baseline"),
		kgo.TransactionTimeout(time.Minute),
	)
	if err != nil {
		return nil, err
	}
	l.sess = sess
	return l, nil
}

func (l *baselineLoop) ready() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.assigned == int(l.parts)
}

func (l *baselineLoop) close() { l.sess.CloseAllowingRebalance() }

func (l *baselineLoop) run(ctx context.Context) error {
	cl := l.sess.Client()
	for {
		fetches := cl.PollRecords(ctx, 10000)
		if ctx.Err() != nil {
			return nil
		}
		for _, fe := range fetches.Errors() {
			if ctx.Err() == nil {
				return fmt.Errorf("fetch %s/%d: %w", fe.Topic, fe.Partition, fe.Err)
			}
		}
		if fetches.NumRecords() == 0 {
			l.sess.AllowRebalance()
			continue
		}
		if err := l.sess.Begin(); err != nil {
			return fmt.Errorf("begin: %w", err)
		}
		if err := l.cycle(fetches); err != nil {
			return err
		}
		l.sess.AllowRebalance()
	}
}

// cycle is one transaction: produce the outputs of the poll, commit them
// with the consumed offsets.
func (l *baselineLoop) cycle(fetches kgo.Fetches) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cl := l.sess.Client()
	var (
		wg         sync.WaitGroup
		mu         sync.Mutex
		produceErr error
		n          int64
		ids        []string
	)
	produce := func(r *kgo.Record) {
		wg.Add(1)
		cl.Produce(ctx, r, func(_ *kgo.Record, err error) {
			defer wg.Done()
			if err != nil {
				mu.Lock()
				if produceErr == nil {
					produceErr = err
				}
				mu.Unlock()
			}
		})
	}
	changelogPer := l.shape.RecordsPerCommand - l.shape.EventsPerCommand
	fetches.EachRecord(func(r *kgo.Record) {
		n++
		for _, h := range r.Headers {
			if h.Key == waiterHeader {
				ids = append(ids, string(h.Value))
			}
		}
		for l.eventsOwed += l.shape.EventsPerCommand; l.eventsOwed >= 1; l.eventsOwed-- {
			produce(&kgo.Record{Topic: BaselineEventsTopic, Partition: r.Partition, Key: r.Key, Value: l.eventValue})
		}
		for l.changelogOwed += changelogPer; l.changelogOwed >= 1; l.changelogOwed-- {
			produce(&kgo.Record{Topic: BaselineChangelogTopic, Partition: r.Partition, Key: r.Key, Value: l.changelogValue})
		}
	})
	mu.Lock()
	ok := produceErr == nil
	mu.Unlock()
	committed, err := l.sess.End(ctx, kgo.TransactionEndTry(ok))
	wg.Wait()
	if err != nil {
		return fmt.Errorf("end transaction (committed %v): %w", committed, err)
	}
	if produceErr != nil {
		return fmt.Errorf("produce: %w", produceErr)
	}
	if !committed {
		return nil // rewound; the records come again
	}
	l.mu.Lock()
	l.processed += n
	close(l.changed)
	l.changed = make(chan struct{})
	for _, id := range ids {
		if ch, ok := l.waiters[id]; ok {
			close(ch)
			delete(l.waiters, id)
		}
	}
	l.mu.Unlock()
	return nil
}

func (l *baselineLoop) processedCount() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.processed
}

func (l *baselineLoop) await(id string) (<-chan struct{}, func()) {
	ch := make(chan struct{})
	l.mu.Lock()
	l.waiters[id] = ch
	l.mu.Unlock()
	return ch, func() {
		l.mu.Lock()
		if l.waiters[id] == ch {
			delete(l.waiters, id)
		}
		l.mu.Unlock()
	}
}

// waitProcessed waits until the loop has committed total records more than
// base, reporting progress.
func (l *baselineLoop) waitProcessed(ctx context.Context, cfg Config, phase string, base, total int64, stopped func() error) error {
	target := base + total
	finished := make(chan error, 1)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		for {
			l.mu.Lock()
			n, ch := l.processed, l.changed
			l.mu.Unlock()
			if n >= target {
				finished <- nil
				return
			}
			select {
			case <-ch:
			case <-wctx.Done():
				return
			}
		}
	}()
	count := func() int64 {
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.processed - base
	}
	return wait(ctx, cfg, phase, total, count, finished, stopped)
}
