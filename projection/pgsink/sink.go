package pgsink

import (
	"context"
	"fmt"
	"log/slog"
	"regexp"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/internal/backoff"
	"github.com/esker-io/esker/sideeffects"
)

// Event is one event as the sink hands it to the ApplyFunc: the envelope
// and payload (aggregate.Event, rebuilt from the record headers), and where
// the record is in Kafka. Decode the payload with the aggregate type's
// DecodeEvent (for example bank.Account.DecodeEvent(e.Event)).
type Event struct {
	aggregate.Event
	Topic     string
	Partition int32
	Offset    int64
}

// ApplyFunc writes one poll batch of events to the database inside tx, the
// transaction that also moves the sink's stored offsets past these events.
// ctx ends after TxTimeout (not when Run's context ends: a batch under way
// at a stop is finished).
// The events are in offset order within each partition; events of
// different partitions are not ordered against each other. Every event of an
// entity is in the entity's partition, so one entity's events arrive in
// version order. Their personal fields are opened (Runtime.OpenEvent),
// except those no key opens (aggregate.ErrUnknownKey), which arrive sealed,
// as stored.
//
// If ApplyFunc returns nil, the sink commits tx: the effects and the new
// offsets become visible together. If it returns an error, the sink rolls
// tx back, so none of its effects and no offset is stored, and then:
//
//   - if the error comes from the database connection or is a conflict a new
//     attempt can get past (it wraps a *pgconn.PgError of class 08, 40, 53,
//     57P or 58, a network error, a timeout), the sink retries the same
//     events in a new transaction after a backoff;
//   - otherwise (an SQL error, a constraint violation, an error made up by
//     the function), Run returns the error: the batch is never skipped, so
//     a sink run again after the cause is fixed resumes at the same events.
//
// Wrap errors with %w so the sink can see their cause. A panic in ApplyFunc
// is recovered and treated like a permanent error.
//
// ApplyFunc must:
//   - write only through tx (a write through another connection would not
//     be rolled back with the batch, and would be applied again when the
//     batch is retried or re-read after a crash);
//   - not commit or roll back tx, and not keep tx or the events slice after
//     it returns;
//   - have no effects outside the database (no HTTP calls, no e-mails): the
//     same events can be passed again after a rolled-back attempt. Use a
//     side-effect consumer for those.
//
// ApplyFunc need not be idempotent: a batch's events are committed exactly
// once. It is not called for a batch that holds no event (only transaction
// markers); the offsets still advance.
type ApplyFunc func(ctx context.Context, tx pgx.Tx, events []Event) error

// Runtime is what Run needs from the process that runs the sink, usually an
// esker node (Node.AddConsumer): the application id (the sink's consumer
// group is "<AppID>-<name>"), the Kafka client options (seed brokers, TLS,
// SASL; the sink adds its own consumer options after them), a logger and a
// metrics registerer. It is the Runtime of side-effect consumers. Its
// OpenEvent, if set, opens the personal fields of every event before
// ApplyFunc sees it: an error wrapping aggregate.ErrUnknownKey (no key opens
// the fields, and none ever will) passes the event on sealed, with a
// warning; any other error (the keys topic cannot be read now) is retried
// like a database failure (see Run).
type Runtime = sideeffects.Runtime

// Sink is an exactly-once PostgreSQL sink: it consumes event topics in a
// consumer group and writes each poll batch, together with its offsets, in
// one database transaction. See the package documentation.
type Sink struct {
	name    string
	topics  []string
	apply   ApplyFunc
	cfg     config
	offsets string // the offsets table, sanitized and possibly qualified

	running atomic.Bool

	mu sync.Mutex
	st state
}

// Status is a snapshot of a sink, for the node's GET /v1/cluster.
type Status struct {
	Name   string   `json:"name"`
	Group  string   `json:"group,omitempty"`
	Topics []string `json:"topics"`
	// Running is true between the start and the return of Run.
	Running bool `json:"running"`
	// Ready and NotReady are Ready's answer.
	Ready    bool   `json:"ready"`
	NotReady string `json:"notReady,omitempty"`
	// Partitions assigned to this sink, sorted by topic and partition.
	Partitions []PartitionStatus `json:"partitions"`
	// Lag is the sum of the partitions' lags.
	Lag int64 `json:"lag"`
	// LastBatchLatency is the time the last written batch took, BEGIN to
	// COMMIT; LastBatchAt is when it committed.
	LastBatchLatency time.Duration `json:"lastBatchLatencyNanos"`
	LastBatchAt      time.Time     `json:"lastBatchAt,omitzero"`
	// DBReachable is false from a failed database operation until the next
	// one succeeds (the sink checks every two seconds while idle).
	DBReachable bool   `json:"dbReachable"`
	DBError     string `json:"dbError,omitempty"`
	// OpenError is set while the personal fields of a batch's events
	// cannot be opened (Runtime.OpenEvent fails) and the batch is retried.
	OpenError string `json:"openError,omitempty"`
	// Counters since the sink was created: events written, failed
	// attempts that were retried, batches discarded by the offset fence,
	// and events written with personal fields no key opened (passed to
	// ApplyFunc sealed).
	Events  int64 `json:"events"`
	Retries int64 `json:"retries"`
	Fenced  int64 `json:"fenced"`
	Sealed  int64 `json:"sealed"`
}

// PartitionStatus is one assigned partition.
type PartitionStatus struct {
	Topic     string `json:"topic"`
	Partition int32  `json:"partition"`
	// NextOffset is the stored offset: the next record to apply; -1 while
	// it is being loaded from PostgreSQL.
	NextOffset int64 `json:"nextOffset"`
	// EndOffset is the partition's last stable offset as last seen; -1 if
	// not known yet.
	EndOffset int64 `json:"endOffset"`
	// Lag is EndOffset - NextOffset (0 while either is unknown).
	Lag int64 `json:"lag"`
}

type phase int

const (
	phaseStopped phase = iota
	phaseSetup
	phaseJoining
	phaseRunning
)

type topicPartition struct {
	topic     string
	partition int32
}

// partState is the sink's knowledge of one assigned partition.
type partState struct {
	loaded bool  // next was read from PostgreSQL (AdjustFetchOffsetsFn)
	next   int64 // the stored next offset, as of the last batch this sink wrote or read
	end    int64 // last stable offset, -1 if not known
}

func (p *partState) lag() int64 {
	if !p.loaded || p.end < 0 {
		return 0
	}
	return max(p.end-p.next, 0)
}

type state struct {
	phase   phase
	group   string
	owned   map[topicPartition]*partState
	loading int   // AdjustFetchOffsetsFn calls under way
	loadErr error // the last failure to load offsets, while loading

	dbOK       bool
	dbErr      error
	dbErrSince time.Time
	lastDBOK   time.Time
	retrying   bool // a batch is being retried: the monitor does not ping

	openErr      error // the batch being retried cannot be opened
	openErrSince time.Time

	stopErr     error
	lastLatency time.Duration
	lastBatchAt time.Time

	events, retries, fenced, sealed int64
	doneOffsets                     int64 // offsets moved past, for progress
}

var namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$`)

// New creates a sink named name that applies the events of topics with
// apply. The name identifies the sink's rows in the offsets table and its
// consumer group ("<app>-<name>"): renaming a sink makes it start over
// (at StartAt). It must be 1 to 100 letters, digits, '.', '_' or '-'.
//
// New checks its arguments and options and returns an error naming the
// problem; it does not connect to Kafka or PostgreSQL (Run does).
func New(name string, topics []string, apply ApplyFunc, opts ...Option) (*Sink, error) {
	if !namePattern.MatchString(name) {
		return nil, fmt.Errorf("pgsink: invalid sink name %q: use 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit", name)
	}
	if len(topics) == 0 {
		return nil, fmt.Errorf("pgsink: sink %s: no topics to consume", name)
	}
	for _, t := range topics {
		if t == "" {
			return nil, fmt.Errorf("pgsink: sink %s: empty topic name", name)
		}
	}
	if apply == nil {
		return nil, fmt.Errorf("pgsink: sink %s: nil ApplyFunc", name)
	}
	cfg := defaultConfig()
	for _, o := range opts {
		o(&cfg)
	}
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("pgsink: sink %s: %w", name, err)
	}
	if cfg.connString != "" {
		if _, err := pgxpool.ParseConfig(cfg.connString); err != nil {
			return nil, fmt.Errorf("pgsink: sink %s: connection string: %w", name, err)
		}
	}
	table := pgx.Identifier{"esker_sink_offsets"}
	if cfg.schema != "" {
		table = pgx.Identifier{cfg.schema, "esker_sink_offsets"}
	}
	topics = slices.Clone(topics)
	slices.Sort(topics)
	topics = slices.Compact(topics)
	return &Sink{name: name, topics: topics, apply: apply, cfg: cfg, offsets: table.Sanitize()}, nil
}

// Name returns the sink's name.
func (s *Sink) Name() string { return s.name }

// Ready reports whether the sink is running and able to write: it returns
// nil, or an error whose message names the cause. A sink is not ready
//   - before Run and after it returned (with Run's error, if any);
//   - while it creates its tables (Setup) and before its consumer group
//     first assigns partitions to it (a member assigned no partition, in a
//     group with more members than partitions, is ready);
//   - while it loads the stored offsets of newly assigned partitions;
//   - while PostgreSQL is unreachable: from a failed write, offset load or
//     health check until the next success;
//   - while the personal fields of a batch's events cannot be opened
//     (Runtime.OpenEvent fails with an error other than
//     aggregate.ErrUnknownKey): from the failure until they open, or until
//     the batch is given back in a rebalance.
func (s *Sink) Ready() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.readyLocked()
}

func (s *Sink) readyLocked() error {
	st := &s.st
	switch st.phase {
	case phaseStopped:
		if st.stopErr != nil {
			return fmt.Errorf("sink %s stopped: %v", s.name, st.stopErr)
		}
		return fmt.Errorf("sink %s is not running", s.name)
	case phaseSetup:
		if !st.dbOK {
			return fmt.Errorf("sink %s is setting up its tables, but PostgreSQL is unreachable (since %s): %v; retrying",
				s.name, st.dbErrSince.Format(time.RFC3339), st.dbErr)
		}
		return fmt.Errorf("sink %s is setting up its tables", s.name)
	case phaseJoining:
		return fmt.Errorf("sink %s has not been assigned partitions by consumer group %s yet", s.name, st.group)
	}
	if !st.dbOK {
		return fmt.Errorf("sink %s: PostgreSQL is unreachable (since %s): %v; nothing is lost, the sink retries and resumes where it stopped",
			s.name, st.dbErrSince.Format(time.RFC3339), st.dbErr)
	}
	if st.openErr != nil {
		return fmt.Errorf("sink %s cannot open the personal fields of events (since %s): %v; nothing is lost, the sink retries the same events",
			s.name, st.openErrSince.Format(time.RFC3339), st.openErr)
	}
	loading := st.loading > 0
	for _, p := range st.owned {
		if !p.loaded {
			loading = true // assigned, offsets not loaded yet
		}
	}
	if loading {
		if st.loadErr != nil {
			return fmt.Errorf("sink %s is loading the stored offsets of newly assigned partitions: %v; retrying", s.name, st.loadErr)
		}
		return fmt.Errorf("sink %s is loading the stored offsets of newly assigned partitions", s.name)
	}
	return nil
}

// Report returns the sink's Report, for the node's GET /v1/cluster.
func (s *Sink) Report() sideeffects.Report {
	st := s.Status()
	r := sideeffects.Report{Kind: "sink", Lag: st.Lag, Details: st, Partitions: []int32{}}
	for _, p := range st.Partitions {
		if !slices.Contains(r.Partitions, p.Partition) {
			r.Partitions = append(r.Partitions, p.Partition)
		}
	}
	slices.Sort(r.Partitions)
	return r
}

// Status returns a snapshot of the sink: assigned partitions with stored
// and end offsets, lag, the last batch's latency, database reachability.
func (s *Sink) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := &s.st
	out := Status{
		Name:             s.name,
		Group:            st.group,
		Topics:           slices.Clone(s.topics),
		Running:          st.phase != phaseStopped,
		Partitions:       []PartitionStatus{},
		LastBatchLatency: st.lastLatency,
		LastBatchAt:      st.lastBatchAt,
		DBReachable:      st.dbOK,
		Events:           st.events,
		Retries:          st.retries,
		Fenced:           st.fenced,
		Sealed:           st.sealed,
	}
	if err := s.readyLocked(); err != nil {
		out.NotReady = err.Error()
	} else {
		out.Ready = true
	}
	if st.dbErr != nil && !st.dbOK {
		out.DBError = st.dbErr.Error()
	}
	if st.openErr != nil {
		out.OpenError = st.openErr.Error()
	}
	for tp, p := range st.owned {
		ps := PartitionStatus{Topic: tp.topic, Partition: tp.partition, NextOffset: -1, EndOffset: p.end, Lag: p.lag()}
		if p.loaded {
			ps.NextOffset = p.next
		}
		out.Partitions = append(out.Partitions, ps)
		out.Lag += ps.Lag
	}
	sort.Slice(out.Partitions, func(i, j int) bool {
		a, b := out.Partitions[i], out.Partitions[j]
		if a.Topic != b.Topic {
			return a.Topic < b.Topic
		}
		return a.Partition < b.Partition
	})
	return out
}

// lagLocked is the total lag of the owned partitions.
func (s *Sink) lagLocked() int64 {
	var lag int64
	for _, p := range s.st.owned {
		lag += p.lag()
	}
	return lag
}

// Run runs the sink until ctx is done, then finishes the batch it is
// writing, if any (within TxTimeout; a batch waiting for a retry is
// abandoned), leaves the consumer group and returns nil. Only one Run of a Sink may be under way at a time; Run may be
// called again after it returned.
//
// Run first opens the pool (ConnString) and, in one transaction, creates the
// offsets table (and schema) and calls the Setup function; then it joins the
// consumer group "<rt.AppID>-<name>" and writes each poll batch in one
// transaction with its offsets.
//
// What happens on failure:
//   - PostgreSQL unreachable (at start, while loading offsets, while writing
//     a batch): Run logs the error, reports not ready and retries the same
//     work with exponential backoff (see Backoff), forever; nothing is
//     skipped and nothing is written twice. A batch whose COMMIT was sent
//     but not answered is resolved by the offset fence on the next attempt.
//   - rt.OpenEvent fails on an event of a batch with an error that does not
//     wrap aggregate.ErrUnknownKey (the keys topic cannot be read now, a
//     timeout; each batch's opening is bounded by TxTimeout): nothing of
//     the batch is written; Run logs the error, reports not ready and
//     retries the same events with the same backoff, forever, counting each
//     failed attempt in esker_sink_retries_total, as for a database outage.
//   - rt.OpenEvent fails with an error wrapping aggregate.ErrUnknownKey (no
//     key opens the fields: another application's event, or the keys topic
//     was lost): no retry can open it, so the event is passed to ApplyFunc
//     sealed, as stored, with a warning naming its topic, partition and
//     offset; Status counts it in Sealed.
//   - A rebalance while a batch is being retried: the batch is given back
//     (the client rewinds to the stored offsets) so the rebalance is not
//     held up; the partitions' next owner resumes from PostgreSQL.
//   - Another writer moved a partition's stored offset (a zombie, or the
//     previous owner finishing a batch): the batch is rolled back before
//     ApplyFunc runs, and the sink rewinds to the stored offsets.
//   - Kafka unreachable: the client retries; the sink simply receives no
//     records (fetch errors are logged).
//   - A permanent error (ApplyFunc or Setup returned a non-transient error,
//     a record on the topic is not an esker event, a broken offsets table,
//     an invalid rt): Run returns it, wrapped with the sink's name and the
//     batch's position; nothing of the failed batch was written.
func (s *Sink) Run(ctx context.Context, rt Runtime) (err error) {
	if rt.AppID == "" {
		return fmt.Errorf("pgsink: sink %s: Runtime.AppID is empty", s.name)
	}
	if !s.running.CompareAndSwap(false, true) {
		return fmt.Errorf("pgsink: sink %s is already running", s.name)
	}
	defer s.running.Store(false)

	log := rt.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("sink", s.name)
	m, err := newMetrics(rt.Registerer, s.name)
	if err != nil {
		return fmt.Errorf("pgsink: sink %s: metrics: %w", s.name, err)
	}
	group := sideeffects.GroupID(rt.AppID, s.name)

	s.mu.Lock()
	s.st.phase = phaseSetup
	s.st.group = group
	s.st.owned = map[topicPartition]*partState{}
	s.st.loading, s.st.loadErr = 0, nil
	s.st.dbOK, s.st.dbErr = true, nil
	s.st.openErr = nil
	s.st.stopErr = nil
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.st.phase = phaseStopped
		s.st.stopErr = err
		s.st.owned = map[topicPartition]*partState{}
		s.mu.Unlock()
	}()

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()

	pool := s.cfg.pool
	if pool == nil {
		pool, err = pgxpool.New(runCtx, s.cfg.connString)
		if err != nil {
			return fmt.Errorf("pgsink: sink %s: %w", s.name, err)
		}
		defer pool.Close()
	}

	r := &run{
		s:       s,
		rt:      rt,
		ctx:     runCtx,
		pool:    pool,
		log:     log,
		m:       m,
		group:   group,
		clReady: make(chan struct{}),
		blocked: make(chan struct{}, 1),
		commit:  make(chan struct{}, 1),
	}
	if err := r.setupTables(); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	s.mu.Lock()
	s.st.phase = phaseJoining
	s.mu.Unlock()

	opts := append(slices.Clone(rt.ClientOpts),
		kgo.ConsumerGroup(group),
		kgo.ConsumeTopics(s.topics...),
		kgo.DisableAutoCommit(),
		kgo.BlockRebalanceOnPoll(),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.KeepControlRecords(),
		kgo.ConsumeResetOffset(s.cfg.start.kgoOffset()),
		kgo.OnPartitionsAssigned(r.onAssigned),
		kgo.OnPartitionsRevoked(r.onRevoked),
		kgo.OnPartitionsLost(r.onLost),
		kgo.AdjustFetchOffsetsFn(r.adjust),
		kgo.OnPartitionsCallbackBlocked(r.onBlocked),
	)
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return fmt.Errorf("pgsink: sink %s: Kafka client: %w", s.name, err)
	}
	r.cl = cl
	close(r.clReady)
	log.Info("sink started", "group", group, "topics", s.topics, "start_at", s.cfg.start.String(), "max_batch", s.cfg.maxBatch)

	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); r.monitor() }()
	if s.cfg.kafkaCommits {
		wg.Add(1)
		go func() { defer wg.Done(); r.commitToKafka() }()
	}

	err = r.loop()
	cancel()
	wg.Wait()
	cl.AllowRebalance()
	cl.Close() // leaves the group: the other members take the partitions over at once
	if err != nil {
		log.Error("sink stopped", "err", err)
		return err
	}
	log.Info("sink stopped")
	return nil
}

// run is the state of one Run.
type run struct {
	s     *Sink
	rt    Runtime
	ctx   context.Context
	pool  *pgxpool.Pool
	log   *slog.Logger
	m     metrics
	group string

	cl      *kgo.Client
	clReady chan struct{} // closed once cl is set

	blocked chan struct{} // a rebalance waits for the poll we hold
	commit  chan struct{} // offsets moved: commit them to Kafka (best-effort)
}

func (r *run) backoff() *backoff.Retry {
	return &backoff.Retry{Policy: backoff.Policy{Min: r.s.cfg.minBackoff, Max: r.s.cfg.maxBackoff}}
}

// dbFailed records a failed database operation.
func (r *run) dbFailed(err error) {
	s := r.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.st.dbOK {
		s.st.dbErrSince = time.Now()
	}
	s.st.dbOK, s.st.dbErr = false, err
}

// dbSucceeded records a successful database operation.
func (r *run) dbSucceeded() {
	s := r.s
	s.mu.Lock()
	defer s.mu.Unlock()
	s.st.dbOK, s.st.dbErr = true, nil
	s.st.lastDBOK = time.Now()
}

func (r *run) countRetry() {
	r.m.retries.Inc()
	r.s.mu.Lock()
	r.s.st.retries++
	r.s.mu.Unlock()
}

// unreachable reports whether err should be retried: a transient error, or
// any error while the database does not answer a ping (an ApplyFunc that
// lost the error's cause, a connection that broke under it).
func (r *run) unreachable(err error) bool {
	if transient(err) {
		return true
	}
	ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
	defer cancel()
	return r.pool.Ping(ctx) != nil
}

// setupTables creates the schema, the offsets table and the user's tables,
// retrying while the database is unreachable.
func (r *run) setupTables() error {
	bo := r.backoff()
	for attempt := 1; ; attempt++ {
		err := r.trySetup()
		if err == nil {
			r.dbSucceeded()
			if attempt > 1 {
				r.log.Info("tables set up after PostgreSQL became reachable", "attempts", attempt)
			}
			return nil
		}
		if r.ctx.Err() != nil {
			return r.ctx.Err()
		}
		if !r.unreachable(err) {
			return fmt.Errorf("pgsink: sink %s: setting up tables: %w", r.s.name, err)
		}
		r.dbFailed(err)
		r.countRetry()
		wait := bo.Next()
		r.log.Warn("cannot set up tables: PostgreSQL unreachable; retrying", "attempt", attempt, "retry_in", wait.Round(time.Millisecond), "err", err)
		if !backoff.Sleep(r.ctx, wait, nil) {
			return r.ctx.Err()
		}
	}
}

// setupLockKey is the advisory lock that serializes table creation between
// sinks starting at once (concurrent CREATE TABLE IF NOT EXISTS can fail on
// a unique violation in the catalog).
const setupLockKey int64 = 0x65736b65_72736e6b // "eskersnk"

func (r *run) trySetup() error {
	ctx, cancel := context.WithTimeout(r.ctx, r.s.cfg.txTimeout)
	defer cancel()
	tx, err := r.pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback(ctx) }()
	if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", setupLockKey); err != nil {
		return err
	}
	if r.s.cfg.schema != "" {
		if _, err := tx.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+pgx.Identifier{r.s.cfg.schema}.Sanitize()); err != nil {
			return err
		}
	}
	if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS `+r.s.offsets+` (
	sink text NOT NULL,
	topic text NOT NULL,
	partition int NOT NULL,
	next_offset bigint NOT NULL,
	PRIMARY KEY (sink, topic, partition)
)`); err != nil {
		return err
	}
	if r.s.cfg.setup != nil {
		if err := callSafely(func() error { return r.s.cfg.setup(ctx, tx) }); err != nil {
			return fmt.Errorf("Setup: %w", err)
		}
	}
	return tx.Commit(ctx)
}

// callSafely calls fn, turning a panic into an error.
func callSafely(fn func() error) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("panic: %v", p)
		}
	}()
	return fn()
}
