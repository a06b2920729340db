package engine

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the engine's Prometheus collectors. Labels stay bounded: the
// aggregate type and an outcome or result from a fixed set.
type Metrics struct {
	Commands        *prometheus.CounterVec   // type, outcome
	CommandLag      *prometheus.GaugeVec     // type
	CommandLatency  *prometheus.HistogramVec // type
	Transactions    *prometheus.CounterVec   // result
	BatchCommands   prometheus.Histogram
	RestoreRecords  *prometheus.CounterVec // type
	RestoreDuration prometheus.Histogram
	StandbyLag      *prometheus.GaugeVec // partition
	StateCleanups   prometheus.Counter
	Fenced          prometheus.Counter
	// Projections (projection.go, progress.go).
	ProjectionEvents *prometheus.CounterVec // projection, outcome
	ProjectionLag    *prometheus.GaugeVec   // projection
	// Rebuilds (rebuild.go).
	RebuildEvents      *prometheus.CounterVec // type
	RebuildsInProgress *prometheus.GaugeVec   // type

	mu        sync.Mutex
	counters  map[[2]string]prometheus.Counter
	latencies map[string]prometheus.Observer
}

// command returns the commands counter of a type and outcome, cached: the
// write path counts every command.
func (m *Metrics) command(typ, outcome string) prometheus.Counter {
	m.mu.Lock()
	defer m.mu.Unlock()
	return cached(&m.counters, [2]string{typ, outcome}, func() prometheus.Counter {
		return m.Commands.WithLabelValues(typ, outcome)
	})
}

// projectionEvents returns the events counter of a projection and outcome,
// cached.
func (m *Metrics) projectionEvents(name, outcome string) prometheus.Counter {
	m.mu.Lock()
	defer m.mu.Unlock()
	return cached(&m.counters, [2]string{"projection:" + name, outcome}, func() prometheus.Counter {
		return m.ProjectionEvents.WithLabelValues(name, outcome)
	})
}

// latency returns the command latency histogram of a type, cached.
func (m *Metrics) latency(typ string) prometheus.Observer {
	m.mu.Lock()
	defer m.mu.Unlock()
	return cached(&m.latencies, typ, func() prometheus.Observer {
		return m.CommandLatency.WithLabelValues(typ)
	})
}

// cached returns (*cache)[k], making it with mk on first use.
func cached[K comparable, V any](cache *map[K]V, k K, mk func() V) V {
	if v, ok := (*cache)[k]; ok {
		return v
	}
	if *cache == nil {
		*cache = map[K]V{}
	}
	v := mk()
	(*cache)[k] = v
	return v
}

// NewMetrics creates the collectors and registers them on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Commands: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "esker_commands_total",
			Help: "Commands processed, by aggregate type and outcome (accepted, rejected, conflict, duplicate, replayed: read again after a reset and skipped).",
		}, []string{"type", "outcome"}),
		CommandLag: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "esker_command_lag_records",
			Help: "Commands on this node's partitions of an aggregate type not processed yet: the commands partitions' high watermarks, as of the last committed transaction, minus the next command to process (summed over the partitions this node owns).",
		}, []string{"type"}),
		CommandLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "esker_command_processing_seconds",
			Help:    "Time from a command's record timestamp to the commit of its outcome.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"type"}),
		Transactions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "esker_transactions_total",
			Help: "Processing cycles ended, by result (committed, aborted).",
		}, []string{"result"}),
		BatchCommands: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "esker_transaction_commands",
			Help:    "Commands per committed transaction.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 14),
		}),
		RestoreRecords: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "esker_restore_records_total",
			Help: "Changelog records applied while restoring state stores, by aggregate type.",
		}, []string{"type"}),
		StandbyLag: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "esker_standby_lag_records",
			Help: "Changelog records a standby copy of a partition is behind (summed over aggregate types); only partitions this node keeps as standby.",
		}, []string{"partition"}),
		StateCleanups: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "esker_state_cleanups_total",
			Help: "Partitions whose local state was deleted after the node neither owned nor kept a standby copy of them for the state cleanup delay.",
		}),
		Fenced: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "esker_fenced_transactions_total",
			Help: "Open transactions of dropped nodes that this node fenced (aborted) to take over their partitions without waiting for the transaction timeout.",
		}),
		ProjectionEvents: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "esker_projection_events_total",
			Help: "Input records of projections and reactors, by name and outcome (folded; rekeyed: sent through the repartition topic; sent: commands a reactor sent; skipped: undecodable, unkeyed or nothing to do; failed: user code panicked or returned an error; replayed: below the stored input offset; misrouted: a record on another partition than its key's).",
		}, []string{"projection", "outcome"}),
		ProjectionLag: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "esker_projection_lag_records",
			Help: "Records of a projection's inputs on this node's partitions not folded yet (summed over its tasks here).",
		}, []string{"projection"}),
		RebuildEvents: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "esker_rebuild_events_total",
			Help: "Events folded by state rebuilds (a changed state version, or a rebuild on demand), by aggregate type.",
		}, []string{"type"}),
		RebuildsInProgress: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "esker_rebuilds_in_progress",
			Help: "Tasks (partitions) of an aggregate type whose state this node is rebuilding from events now.",
		}, []string{"type"}),
		RestoreDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "esker_restore_seconds",
			Help:    "Duration of state store restores after a partition assignment.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
		}),
	}
	for _, result := range []string{"committed", "aborted"} {
		m.Transactions.WithLabelValues(result) // export both results from 0
	}
	reg.MustRegister(m.Commands, m.CommandLag, m.CommandLatency, m.Transactions, m.BatchCommands, m.RestoreRecords, m.RestoreDuration, m.StandbyLag, m.StateCleanups, m.Fenced, m.ProjectionEvents, m.ProjectionLag, m.RebuildEvents, m.RebuildsInProgress)
	return m
}
