package pgsink

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are one sink's collectors: children of vectors labelled by sink
// name only, so the label set stays bounded by the number of sinks.
type metrics struct {
	events  prometheus.Counter
	batch   prometheus.Observer
	lag     prometheus.Gauge
	retries prometheus.Counter
	fenced  prometheus.Counter
}

func newVecs() (events *prometheus.CounterVec, batch *prometheus.HistogramVec, lag *prometheus.GaugeVec, retries, fenced *prometheus.CounterVec) {
	events = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "esker_sink_events_total",
		Help: "Events written to PostgreSQL by a sink (counted when their transaction commits).",
	}, []string{"sink"})
	batch = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "esker_sink_batch_seconds",
		Help:    "Time to write one poll batch: BEGIN to COMMIT of the attempt that committed.",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
	}, []string{"sink"})
	lag = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "esker_sink_lag_records",
		Help: "Offsets between a sink's stored position and the end of its assigned partitions (last stable offset).",
	}, []string{"sink"})
	retries = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "esker_sink_retries_total",
		Help: "Failed attempts to write a batch (or open its events' personal fields), load offsets or set up tables that were retried after a backoff.",
	}, []string{"sink"})
	fenced = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "esker_sink_fenced_total",
		Help: "Batches discarded because another writer had moved the stored offset (a rebalance, or a commit whose outcome was unknown).",
	}, []string{"sink"})
	return
}

// newMetrics registers the sink collectors on reg (nil: unregistered, the
// sink still counts for Status) and returns the children for one sink. A
// second sink on the same registerer reuses the vectors the first
// registered.
func newMetrics(reg prometheus.Registerer, sink string) (metrics, error) {
	events, batch, lag, retries, fenced := newVecs()
	if reg != nil {
		var errs []error
		events = register(reg, events, &errs)
		batch = register(reg, batch, &errs)
		lag = register(reg, lag, &errs)
		retries = register(reg, retries, &errs)
		fenced = register(reg, fenced, &errs)
		if err := errors.Join(errs...); err != nil {
			return metrics{}, err
		}
	}
	return metrics{
		events:  events.WithLabelValues(sink),
		batch:   batch.WithLabelValues(sink),
		lag:     lag.WithLabelValues(sink),
		retries: retries.WithLabelValues(sink),
		fenced:  fenced.WithLabelValues(sink),
	}, nil
}

// register registers c, or returns the collector already registered under
// the same description; another error (a different collector under the
// same name) is added to errs.
func register[C prometheus.Collector](reg prometheus.Registerer, c C, errs *[]error) C {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
		*errs = append(*errs, err)
	}
	return c
}
