package esker

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/esker-io/esker/interactive"
	"github.com/esker-io/esker/sideeffects"
)

// Consumer is a consumer a Node runs beside its engine, with the node's
// Kafka settings, application id, logger and metrics registry: a
// *sideeffects.Consumer (user I/O at least or at most once), or a sink that
// keeps its own offsets (a *pgsink.Sink). It reads with its own consumer
// group, "<app>-<name>", so its progress is independent of the engine's.
type Consumer interface {
	Name() string
	Run(ctx context.Context, rt sideeffects.Runtime) error
	Ready() error
	Report() sideeffects.Report
}

// AddConsumer adds a side-effect consumer or a sink. The node runs it while
// it runs and lists it, with its readiness, in GET /v1/cluster and
// ConsumersReady. Its readiness is not part of Ready (/readyz): a sink whose
// database is down must not take the node's command API out of a load
// balancer. For the same reason a consumer that stops with an error (a sink
// on a permanent database error) does not stop the node: the error is
// logged and reported as the consumer's readiness until the node restarts.
// It fails after Run has started and on a name already in use.
func (n *Node) AddConsumer(c Consumer) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.running {
		return errors.New("esker: AddConsumer after Run")
	}
	if err := n.nameFreeLocked(c.Name()); err != nil {
		return err
	}
	n.consumers = append(n.consumers, c)
	return nil
}

// runConsumers starts the consumers; stop cancels them and waits for them
// to return. A consumer that returns an error before stop does not stop the
// node (see AddConsumer): the error is logged and the consumer reports it as
// not ready — in ConsumersReady, GET /v1/cluster and esker_consumer_ready —
// until the node restarts.
func (n *Node) runConsumers(rt sideeffects.Runtime) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, c := range n.consumers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.Run(ctx, rt); err != nil && ctx.Err() == nil {
				err = fmt.Errorf("stopped: %w", err)
				n.consumerErrs.Store(c.Name(), err)
				n.cfg.logger.Error("esker: consumer stopped; the node goes on without it", "consumer", c.Name(), "err", err)
			}
		}()
	}
	return func() { cancel(); wg.Wait() }
}

// consumerReady is c's readiness, or the error it stopped with.
func (n *Node) consumerReady(c Consumer) error {
	if err, ok := n.consumerErrs.Load(c.Name()); ok {
		return err.(error)
	}
	return c.Ready()
}

// ConsumersReady returns nil when every consumer added with AddConsumer is
// ready, or an error naming the first that is not and why.
func (n *Node) ConsumersReady() error {
	for _, c := range n.consumers {
		if err := n.consumerReady(c); err != nil {
			return fmt.Errorf("consumer %s: %w", c.Name(), err)
		}
	}
	return nil
}

// consumerStatuses lists the consumers for GET /v1/cluster.
func (n *Node) consumerStatuses() []interactive.ProcessorStatus {
	var out []interactive.ProcessorStatus
	for _, c := range n.consumers {
		r := c.Report()
		st := interactive.ProcessorStatus{Kind: r.Kind, Name: c.Name(), Partitions: r.Partitions, Lag: r.Lag, Details: r.Details}
		if st.Partitions == nil {
			st.Partitions = []int32{}
		}
		if err := n.consumerReady(c); err != nil {
			st.Error = err.Error()
		}
		out = append(out, st)
	}
	return out
}
