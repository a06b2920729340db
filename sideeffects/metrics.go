package sideeffects

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Outcome label values of esker_sideeffect_events_total.
const (
	outcomeHandled      = "handled"
	outcomeDeadLettered = "dead_lettered"
)

// metrics are one consumer's Prometheus collectors. The consumer's name is a
// constant label, so consumers of one node share metric names and differ by
// label; nothing is registered globally.
type metrics struct {
	events         *prometheus.CounterVec
	handled        prometheus.Counter
	deadLettered   prometheus.Counter
	retries        prometheus.Counter
	lag            prometheus.Gauge
	handlerSeconds prometheus.Histogram
}

func newMetrics(consumer string) *metrics {
	labels := prometheus.Labels{"consumer": consumer}
	m := &metrics{
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name:        "esker_sideeffect_events_total",
			Help:        "Events a side-effect consumer finished, by outcome: handled (the handler succeeded) or dead_lettered (written to the dead-letter topic after the last attempt or a permanent error).",
			ConstLabels: labels,
		}, []string{"outcome"}),
		retries: prometheus.NewCounter(prometheus.CounterOpts{
			Name:        "esker_sideeffect_retries_total",
			Help:        "Handler calls of a side-effect consumer that were retries of a failed call.",
			ConstLabels: labels,
		}),
		lag: prometheus.NewGauge(prometheus.GaugeOpts{
			Name:        "esker_sideeffect_lag_records",
			Help:        "Records of a side-effect consumer's assigned partitions not yet handled: high watermark minus the lowest unfinished offset, summed over the partitions whose end is known.",
			ConstLabels: labels,
		}),
		handlerSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:        "esker_sideeffect_handler_seconds",
			Help:        "Duration of one handler call of a side-effect consumer (each attempt counts).",
			ConstLabels: labels,
			Buckets:     prometheus.ExponentialBuckets(0.0005, 4, 10), // 0.5 ms .. 131 s
		}),
	}
	// Create both outcomes so that they are exported as 0 from the start.
	m.handled = m.events.WithLabelValues(outcomeHandled)
	m.deadLettered = m.events.WithLabelValues(outcomeDeadLettered)
	return m
}

func (m *metrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.events, m.retries, m.lag, m.handlerSeconds}
}

// register registers the collectors on reg (nothing if reg is nil) and
// returns the function that unregisters them. Registering the same
// consumer's collectors twice is harmless; another consumer's collectors
// under the same name are an error, since names must be unique within an
// application.
func (m *metrics) register(reg prometheus.Registerer, consumer string) (unregister func(), err error) {
	if reg == nil {
		return func() {}, nil
	}
	var done []prometheus.Collector
	for _, c := range m.collectors() {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) && are.ExistingCollector == c {
				continue
			}
			for _, d := range done {
				reg.Unregister(d)
			}
			if errors.As(err, &are) {
				return nil, fmt.Errorf("sideeffects: metrics of a consumer named %q are already registered: consumer names must be unique", consumer)
			}
			return nil, fmt.Errorf("sideeffects: register metrics: %w", err)
		}
		done = append(done, c)
	}
	return func() {
		for _, c := range done {
			reg.Unregister(c)
		}
	}, nil
}
