package esker

import (
	"github.com/prometheus/client_golang/prometheus"
)

// readiness exports, at every scrape, whether the node and each consumer it
// runs are ready:
//
//	esker_ready                           1 when Ready (GET /readyz) is nil, else 0
//	esker_consumer_ready{consumer,kind}   1 when the consumer's Ready is nil, else 0
//
// The consumer label takes the names given to AddConsumer, the kind label
// "sideeffect" or "sink": both are bounded by the node's configuration.
type readiness struct{ n *Node }

var (
	readyDesc = prometheus.NewDesc("esker_ready",
		"1 when the node is ready (GET /readyz answers 200: every partition it owns is restored and processing, and the group has confirmed its membership), else 0.", nil, nil)
	consumerReadyDesc = prometheus.NewDesc("esker_consumer_ready",
		"1 when a side-effect consumer or sink this node runs is ready (a member of its group, not stuck; a sink: its database reachable and offsets loaded), else 0.",
		[]string{"consumer", "kind"}, nil)
)

func (r readiness) Describe(ch chan<- *prometheus.Desc) {
	ch <- readyDesc
	ch <- consumerReadyDesc
}

func (r readiness) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(readyDesc, prometheus.GaugeValue, boolValue(r.n.Ready() == nil))
	r.n.mu.Lock()
	consumers := r.n.consumers
	r.n.mu.Unlock()
	for _, c := range consumers {
		ch <- prometheus.MustNewConstMetric(consumerReadyDesc, prometheus.GaugeValue,
			boolValue(r.n.consumerReady(c) == nil), c.Name(), c.Report().Kind)
	}
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
