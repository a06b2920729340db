package pgsink

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"
)

// Option configures a Sink; pass options to New.
type Option func(*config)

type config struct {
	connString   string
	pool         *pgxpool.Pool
	schema       string
	start        StartPosition
	maxBatch     int
	setup        func(ctx context.Context, tx pgx.Tx) error
	minBackoff   time.Duration
	maxBackoff   time.Duration
	txTimeout    time.Duration
	kafkaCommits bool
}

func defaultConfig() config {
	return config{
		start:        Earliest,
		maxBatch:     5000,
		minBackoff:   100 * time.Millisecond,
		maxBackoff:   10 * time.Second,
		txTimeout:    time.Minute,
		kafkaCommits: true,
	}
}

// ConnString makes the sink open its own pgxpool.Pool from a PostgreSQL
// connection string (URL or key=value form, see pgxpool.ParseConfig) when
// Run starts, and close it when Run returns. Run parameters such as
// search_path can be given in the string and apply to every connection,
// for example "postgres://user@host/db?search_path=app".
//
// New fails if the string cannot be parsed. Opening the pool does not
// connect; an unreachable database is retried by Run (see Run). Use either
// ConnString or Pool, not both.
func ConnString(s string) Option { return func(c *config) { c.connString = s } }

// Pool makes the sink use a pool the caller owns: the sink never closes it.
// The sink holds one connection from it while it writes a batch and,
// when idle, uses it for a health check every two seconds. Use either
// ConnString or Pool, not both.
func Pool(p *pgxpool.Pool) Option { return func(c *config) { c.pool = p } }

// Schema sets the schema that holds the offsets table esker_sink_offsets.
// Run creates the schema if it does not exist. The default is no schema:
// the table name is unqualified and PostgreSQL resolves it through the
// connection's search_path (normally "public"). The user's own tables are
// not affected: the ApplyFunc and Setup function name their tables
// themselves.
func Schema(name string) Option { return func(c *config) { c.schema = name } }

// StartPosition says where a sink starts reading a partition that has no
// stored offset yet: Earliest, Latest or AtTime(t).
type StartPosition struct {
	kind int
	at   time.Time
}

const (
	startEarliest = iota
	startLatest
	startTime
)

var (
	// Earliest starts at the oldest record still in the partition: the
	// sink reads the whole history (the default; events topics are kept
	// forever, so this rebuilds the read model from the first event).
	Earliest = StartPosition{kind: startEarliest}
	// Latest starts after the last committed record at the time the sink
	// first sees the partition: older events are never applied.
	Latest = StartPosition{kind: startLatest}
)

// AtTime starts at the first record whose timestamp is at or after t (the
// end of the partition if there is none).
func AtTime(t time.Time) StartPosition { return StartPosition{kind: startTime, at: t} }

// String names the position, for logs.
func (p StartPosition) String() string {
	switch p.kind {
	case startLatest:
		return "latest"
	case startTime:
		return "time " + p.at.UTC().Format(time.RFC3339Nano)
	default:
		return "earliest"
	}
}

// StartAt sets where the sink starts reading a partition for which the
// offsets table has no row (a new sink, or a new partition). The position is
// resolved to a number and stored the first time the sink is assigned the
// partition, so a sink that starts at Latest and is restarted before any
// event arrived still reads every event written after its first start.
// Partitions with a stored row always resume from it; StartAt never
// overrides a stored offset. The default is Earliest.
func StartAt(p StartPosition) Option { return func(c *config) { c.start = p } }

// MaxBatch bounds the number of records in one poll batch, and so in one
// database transaction and one ApplyFunc call. The default is 5000. Larger
// batches write faster (fewer transactions) but hold a transaction and a
// rebalance longer. New fails if n < 1.
func MaxBatch(n int) Option { return func(c *config) { c.maxBatch = n } }

// Setup sets a function that creates the user's tables. Run calls it once at
// start, before joining the consumer group, in the same transaction that
// creates the offsets table and under a PostgreSQL advisory lock (so that
// several nodes starting at once do not race on CREATE TABLE). It must be
// idempotent (CREATE TABLE IF NOT EXISTS, CREATE INDEX IF NOT EXISTS): it
// runs at every start of every node. If it fails because the database is
// unreachable, Run retries with backoff; if it fails for another reason (an
// SQL error), Run returns the error and nothing is created.
func Setup(fn func(ctx context.Context, tx pgx.Tx) error) Option {
	return func(c *config) { c.setup = fn }
}

// Backoff sets the bounds of the exponential backoff between attempts to
// write a batch (or to load offsets, or to set up the tables) while the
// database is unreachable, or the batch's personal fields cannot be opened:
// the first wait is about min, each next one
// doubles, up to max, each with random jitter (a wait is between half and
// all of its nominal length). The defaults are 100ms and 10s. New fails if
// min <= 0 or max < min.
func Backoff(min, max time.Duration) Option {
	return func(c *config) { c.minBackoff, c.maxBackoff = min, max }
}

// TxTimeout bounds one attempt to write a batch: BEGIN, the offset update,
// the ApplyFunc and COMMIT; and, separately, the opening of the batch's
// personal fields (Runtime.OpenEvent) before it. An attempt that takes
// longer is cancelled, rolled back and retried like any other database
// failure. The default is one
// minute; raise it if the ApplyFunc legitimately needs longer for MaxBatch
// events. New fails if d <= 0.
func TxTimeout(d time.Duration) Option { return func(c *config) { c.txTimeout = d } }

// KafkaCommits sets whether the sink also commits its offsets to Kafka for
// its consumer group, at most once a second after batches are written
// (default true). These commits are best-effort and only serve lag tooling
// (kafka-consumer-groups, kadm, Burrow): the sink never reads them back. It
// always resumes from the offsets stored in PostgreSQL, so a failed or
// stale Kafka commit cannot cause a loss or a duplicate.
func KafkaCommits(enabled bool) Option { return func(c *config) { c.kafkaCommits = enabled } }

func (c *config) validate() error {
	switch {
	case c.connString != "" && c.pool != nil:
		return fmt.Errorf("use either ConnString or Pool, not both")
	case c.connString == "" && c.pool == nil:
		return fmt.Errorf("no database: pass ConnString or Pool")
	case c.maxBatch < 1:
		return fmt.Errorf("MaxBatch(%d): must be at least 1", c.maxBatch)
	case c.minBackoff <= 0 || c.maxBackoff < c.minBackoff:
		return fmt.Errorf("Backoff(%v, %v): need 0 < min <= max", c.minBackoff, c.maxBackoff)
	case c.txTimeout <= 0:
		return fmt.Errorf("TxTimeout(%v): must be positive", c.txTimeout)
	}
	return nil
}

// kgoOffset is the client's reset offset: where the client goes when a
// stored offset is out of the partition's range (the topic was deleted and
// created again, or retention removed records the sink had not read).
func (p StartPosition) kgoOffset() kgo.Offset {
	switch p.kind {
	case startLatest:
		return kgo.NewOffset().AtEnd()
	case startTime:
		return kgo.NewOffset().AfterMilli(p.at.UnixMilli())
	default:
		return kgo.NewOffset().AtStart()
	}
}
