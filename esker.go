// Package esker is a framework for event-sourced services on Apache Kafka.
//
// A service defines aggregates (package aggregate), registers them on a Node
// and runs N replicas of the Node against its Kafka cluster:
//
//	node, err := esker.NewNode(
//		esker.Brokers("localhost:9092"),
//		esker.ApplicationID("bank"),
//		esker.StateDir("/var/lib/bank"),
//		esker.HTTPListen(":8080"),
//	)
//	node.Register(bank.Account)
//	err = node.Run(ctx) // until ctx is cancelled
//
// Commands are produced to "<type>-commands" keyed by entity id. The node
// that owns a partition decides, writes events to "<type>-events" and the new
// state to its Pebble store and the compacted "<app>-<type>-changelog", all in
// one Kafka transaction. See docs/ARCHITECTURE.md for the commit protocol.
package esker

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"

	"github.com/esker-io/esker/aggregate"
)

// Registrable is an aggregate type a Node can run: any *aggregate.Type.
type Registrable interface {
	Untyped() aggregate.Definition
}

// Node is one replica of an esker application: it consumes the commands of
// its registered aggregate types, keeps their state, and serves the HTTP API.
type Node struct {
	cfg config

	mu      sync.Mutex
	types   map[string]aggregate.Definition
	order   []string
	running bool
}

// NewNode validates the options and returns a node. Nothing connects to
// Kafka before Run.
func NewNode(opts ...Option) (*Node, error) {
	cfg := defaultConfig()
	for _, o := range opts {
		o(&cfg)
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &Node{cfg: cfg, types: map[string]aggregate.Definition{}}, nil
}

// Register adds an aggregate type. It fails after Run has started and on a
// duplicate name.
func (n *Node) Register(t Registrable) error {
	def := t.Untyped()
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.running {
		return errors.New("esker: Register after Run")
	}
	if _, dup := n.types[def.Name()]; dup {
		return fmt.Errorf("esker: aggregate type %q registered twice", def.Name())
	}
	n.types[def.Name()] = def
	n.order = append(n.order, def.Name())
	return nil
}

// Run connects to Kafka, creates or checks the topics, restores state and
// processes commands until ctx is cancelled, then shuts down gracefully.
func (n *Node) Run(ctx context.Context) error {
	return errors.New("esker: not implemented yet")
}

// Handler returns the node's HTTP API (the same handler Run serves on the
// listen address).
func (n *Node) Handler() http.Handler { return http.NotFoundHandler() }
