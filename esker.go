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
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/interactive"
	"github.com/esker-io/esker/internal/engine"
	"github.com/esker-io/esker/internal/keyring"
	"github.com/esker-io/esker/internal/kgolog"
	"github.com/esker-io/esker/projection"
	"github.com/esker-io/esker/sideeffects"
	"github.com/esker-io/esker/statestore"
)

// Registrable is an aggregate type a Node can run: any *aggregate.Type.
type Registrable interface {
	Untyped() aggregate.Definition
}

// Node is one replica of an esker application: it consumes the commands of
// its registered aggregate types, keeps their state, and serves the HTTP API.
// Its methods are safe for concurrent use.
type Node struct {
	cfg      config
	registry *prometheus.Registry
	metrics  *engine.Metrics
	// Cluster metrics: the generation of the newest map, and how many maps
	// (rebalances this node took part in) it has received.
	generation prometheus.Gauge
	rebalances prometheus.Counter

	mu    sync.Mutex
	types map[string]aggregate.Definition
	order []aggregate.Definition
	// projections run as tasks of the engine (AddProjection).
	projections map[string]projection.Definition
	projOrder   []projection.Definition
	reactors    []engine.Reactor
	consumers   []Consumer // side effects and sinks (consumers.go)
	// consumerErrs holds, by name, the error a consumer stopped with.
	consumerErrs sync.Map
	running      bool
	handler      http.Handler
	// forwardClient is the handler's client to the other nodes with
	// PeerTLS (nil: the handler's shared default); Run closes its idle
	// connections when it returns.
	forwardClient *http.Client

	// Set once Run has started; nil before.
	engine   *engine.Engine
	store    *statestore.Store
	producer *kgo.Client
	// keys seals and opens personal fields; nil when no registered type
	// has any. Set before started is closed.
	keys    *keyring.Keyring
	started chan struct{}
	// clientOpts are the base Kafka client options, set before started
	// is closed: event streams (watch.go) build their readers with them.
	clientOpts []kgo.Opt

	storeMu     sync.RWMutex // readers hold it shared while they use the store
	storeClosed bool

	clusterMap atomic.Pointer[interactive.Map] // newest map from the group balancer
}

// setMap keeps the newest cluster map the balancer delivers (a map of an
// older generation can arrive again; see interactive.NewBalancer).
func (n *Node) setMap(m interactive.Map) {
	n.rebalances.Inc()
	for {
		cur := n.clusterMap.Load()
		if cur != nil && cur.Generation > m.Generation {
			return
		}
		if n.clusterMap.CompareAndSwap(cur, &m) {
			n.generation.Set(float64(m.Generation))
			if eng := n.runningEngine(); eng != nil {
				for id, url := range m.Members {
					if url == n.cfg.advertisedURL {
						eng.SetStandbys(m.StandbyPartitions(id))
					}
				}
			}
			return
		}
	}
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
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	n := &Node{
		cfg:      cfg,
		registry: reg,
		metrics:  engine.NewMetrics(reg),
		generation: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "esker_assignment_generation",
			Help: "Consumer group generation of the newest cluster map this node received.",
		}),
		rebalances: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "esker_rebalances_total",
			Help: "Cluster maps (group rebalances) this node received.",
		}),
		types:   map[string]aggregate.Definition{},
		started: make(chan struct{}),
	}
	reg.MustRegister(readiness{n}, n.generation, n.rebalances, prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "esker_event_journals_read_total",
		Help: "Journal records read from the state store to serve entity event streams (GET …/events, Node.Events): proportional to the events read, not to the partition.",
	}, func() float64 {
		if s := n.runningStore(); s != nil {
			return float64(s.JournalsRead())
		}
		return 0
	}))
	hopts := []interactive.HandlerOption{
		interactive.MaxBodyBytes(cfg.maxBodyBytes),
		interactive.CommandTimeout(cfg.commandTimeout),
		interactive.Metrics(promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg})),
		interactive.Logger(cfg.logger),
		interactive.Routing(router{n}),
		interactive.Registerer(reg),
		interactive.ClusterToken(cfg.clusterToken),
		interactive.APITokens(cfg.apiTokens...),
	}
	if cfg.protectMetrics {
		hopts = append(hopts, interactive.ProtectMetrics())
	}
	if cfg.peerTLS != nil {
		n.forwardClient = interactive.NewForwardClient(cfg.peerTLS.Clone())
		hopts = append(hopts, interactive.ForwardClient(n.forwardClient))
	}
	if cfg.verifiesPeers() {
		hopts = append(hopts, interactive.RequirePeerCertificate())
	}
	if cfg.rateSet {
		hopts = append(hopts, interactive.RateLimit(cfg.ratePerSecond, cfg.rateBurst))
	}
	n.handler = interactive.NewHandler(backend{n}, hopts...)
	return n, nil
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
	if err := n.nameFreeLocked(def.Name()); err != nil {
		return err
	}
	n.types[def.Name()] = def
	n.order = append(n.order, def)
	return nil
}

// Projection is a projection a Node can run: any *projection.Projection.
type Projection interface {
	Definition() projection.Definition
}

// AddProjection adds a projection: the node runs it as tasks of its engine,
// beside the aggregates, and serves its rows at /v1/projections/{name}. Every
// node of the application must add the same projections. It fails after Run
// has started and on a name already used by a projection or aggregate type.
func (n *Node) AddProjection(p Projection) error {
	def := p.Definition()
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.running {
		return errors.New("esker: AddProjection after Run")
	}
	if err := n.nameFreeLocked(def.Name()); err != nil {
		return err
	}
	if n.projections == nil {
		n.projections = map[string]projection.Definition{}
	}
	n.projections[def.Name()] = def
	n.projOrder = append(n.projOrder, def)
	return nil
}

// Reactor is a process manager a Node can run: any *sideeffects.Reactor.
type Reactor interface {
	Name() string
	Sources() []projection.Source
	Start() projection.Start
	Decode(ev *projection.Event) error
	React(ev projection.Event) ([]aggregate.Addressed, error)
}

// AddReactor adds a reactor: the node runs it as tasks of its engine, so
// each event it consumes and the commands it sends commit in one
// transaction (see sideeffects.Reactor). Every node of the application must
// add the same reactors. It fails after Run has started and on a name
// already in use.
func (n *Node) AddReactor(r Reactor) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.running {
		return errors.New("esker: AddReactor after Run")
	}
	if err := n.nameFreeLocked(r.Name()); err != nil {
		return err
	}
	n.reactors = append(n.reactors, r)
	return nil
}

// nameFreeLocked fails when an aggregate type, projection or reactor has
// the name already: each names its own topics and store range.
func (n *Node) nameFreeLocked(name string) error {
	if _, dup := n.types[name]; dup {
		return fmt.Errorf("esker: the name %q is taken by an aggregate type", name)
	}
	if _, dup := n.projections[name]; dup {
		return fmt.Errorf("esker: the name %q is taken by a projection", name)
	}
	for _, r := range n.reactors {
		if r.Name() == name {
			return fmt.Errorf("esker: the name %q is taken by a reactor", name)
		}
	}
	for _, c := range n.consumers {
		if c.Name() == name {
			return fmt.Errorf("esker: the name %q is taken by a consumer", name)
		}
	}
	return nil
}

// Run connects to Kafka, creates missing topics (and refuses to start when an
// existing one has the wrong partition count or cleanup policy), opens the
// state store, serves HTTP on the listen address and processes commands until
// ctx is cancelled. Then it stops taking requests, finishes the transaction in
// flight, leaves the consumer group, closes the store and returns nil.
// Run can be called once.
func (n *Node) Run(ctx context.Context) error {
	n.mu.Lock()
	if n.running {
		n.mu.Unlock()
		return errors.New("esker: Run called twice")
	}
	if len(n.order)+len(n.projOrder)+len(n.reactors)+len(n.consumers) == 0 {
		n.mu.Unlock()
		return errors.New("esker: nothing to run; call Register, AddProjection, AddReactor or AddConsumer before Run")
	}
	n.running = true
	n.mu.Unlock()

	c := n.cfg
	log := c.logger
	if c.httpListener != nil {
		defer func() { _ = c.httpListener.Close() }() // also when Run fails before it serves
	}
	if err := os.MkdirAll(c.stateDir, 0o755); err != nil {
		return fmt.Errorf("esker: state directory: %w", err)
	}
	store, err := statestore.Open(c.stateDir)
	if err != nil {
		return err
	}
	defer func() {
		// Handlers mounted elsewhere (Handler with HTTPListen("")) may
		// still run: they see the node stopped, never a closed store.
		n.storeMu.Lock()
		n.storeClosed = true
		n.storeMu.Unlock()
		store.Close()
	}()

	clientOpts := append([]kgo.Opt{kgo.SeedBrokers(c.brokers...), kgo.WithLogger(kgolog.New(log))}, c.kafkaOpts...)
	n.clientOpts = clientOpts
	if err := c.kafkaPreflight(ctx, clientOpts); err != nil {
		return err
	}
	if c.clusterToken == "" && !c.verifiesPeers() {
		log.Warn("esker: forwarding between nodes is unauthenticated: any client that reaches a node can pose as another node; set a cluster token (esker.ClusterToken, --cluster-token or ESKER_CLUSTER_TOKEN) or mutual TLS (esker.HTTPTLS with ClientCAs, --tls-ca)")
	}
	producer, err := kgo.NewClient(append(append([]kgo.Opt{}, clientOpts...),
		kgo.RecordPartitioner(kgo.ManualPartitioner()))...)
	if err != nil {
		return fmt.Errorf("esker: kafka client: %w", err)
	}
	defer producer.Close()

	keys, err := n.startKeyring(ctx, producer, clientOpts)
	if err != nil {
		return err
	}
	var engineKeys engine.Keys
	if keys != nil {
		defer keys.Close()
		engineKeys = keys
	}

	// The group balancer carries this node's URL and local state to the
	// group leader and brings back the whole cluster map.
	var eng *engine.Engine
	balancer := interactive.NewBalancer(c.advertisedURL, c.standbys, func() map[int32]interactive.LocalTask {
		local := map[int32]interactive.LocalTask{}
		standby := eng.StandbyPartitions()
		for p, cp := range eng.LocalState() {
			t := interactive.LocalTask{Checkpoint: cp}
			if standby[p] {
				t.Role = interactive.RoleStandby
			}
			local[p] = t
		}
		return local
	}, n.setMap)
	eng, err = engine.New(engine.Config{
		AppID:             c.appID,
		ClientOpts:        clientOpts,
		Types:             n.order,
		Projections:       n.projOrder,
		Reactors:          n.reactors,
		Store:             store,
		Transactional:     c.guarantee == ExactlyOnce,
		TransactionalID:   c.appID + "-" + c.instanceID,
		CommitInterval:    c.commitInterval,
		IdempotencyWindow: c.idempotencyWindow,
		Partitions:        c.partitions,
		SessionTimeout:    c.sessionTimeout,
		CommandRetention:  c.commandRetention,
		ReplicationFactor: c.replicationFactor,
		Balancer:          balancer,
		Standbys:          c.standbys > 0,
		StateCleanupDelay: max(c.stateCleanupDelay, 0),
		Keys:              engineKeys,
		Metrics:           n.metrics,
		Logger:            log,
	})
	if err != nil {
		return err
	}
	n.mu.Lock()
	n.engine, n.store, n.producer, n.keys = eng, store, producer, keys
	n.mu.Unlock()
	close(n.started)

	var srv *http.Server
	srvErr := make(chan error, 1)
	if c.httpListen != "" {
		ln := c.httpListener
		if ln == nil {
			if ln, err = net.Listen("tcp", c.httpListen); err != nil {
				return fmt.Errorf("esker: listen on %s: %w", c.httpListen, err)
			}
		}
		srv = &http.Server{Handler: n.handler, ReadHeaderTimeout: 10 * time.Second,
			// Failed TLS handshakes (probes, scanners) and the like: the
			// node's debug log, not stderr.
			ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug)}
		if c.httpTLS != nil {
			srv.TLSConfig = c.httpTLS.Clone()
			go func() { srvErr <- srv.ServeTLS(ln, "", "") }()
		} else {
			go func() { srvErr <- srv.Serve(ln) }()
		}
		log.Info("esker node serving", "http", c.advertisedURL, "app", c.appID,
			"guarantee", c.guarantee.String(), "types", strings.Join(eng.TypeNames(), ","))
	}

	engCtx, stopEngine := context.WithCancel(context.Background())
	defer stopEngine()
	engErr := make(chan error, 1)
	go func() { engErr <- eng.Run(engCtx) }()
	rt := sideeffects.Runtime{AppID: c.appID, ClientOpts: clientOpts, Logger: log, Registerer: n.registry}
	if keys != nil {
		rt.OpenEvent = n.openEvent
	}
	stopConsumers := n.runConsumers(rt)
	defer stopConsumers()

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-engErr:
		engErr = nil
	case err := <-srvErr:
		runErr = fmt.Errorf("esker: http server: %w", err)
	}
	// Graceful shutdown: stop taking requests (letting those in flight
	// finish), then let the engine finish its cycle and leave the group.
	if srv != nil {
		shutCtx, cancel := context.WithTimeout(context.Background(), c.commandTimeout+time.Second)
		if err := srv.Shutdown(shutCtx); err != nil {
			_ = srv.Close() // no handler may outlive the store
		}
		cancel()
	}
	if n.forwardClient != nil {
		n.forwardClient.CloseIdleConnections()
	}
	stopConsumers()
	stopEngine()
	if engErr != nil {
		if err := <-engErr; err != nil && runErr == nil {
			runErr = err
		}
	}
	if runErr != nil {
		log.Error("esker node stopped", "err", runErr)
	} else {
		log.Info("esker node stopped")
	}
	return runErr
}

// startKeyring starts the keyring when a registered aggregate type or
// projection has personal data: it creates the keys topic if needed and
// reads it to its end before the node takes commands, from where the keys'
// local store ("<state dir>/keys") stopped. It fails when no master key is
// set.
func (n *Node) startKeyring(ctx context.Context, producer *kgo.Client, clientOpts []kgo.Opt) (*keyring.Keyring, error) {
	var personal []string
	for _, def := range n.order {
		if def.Personal() {
			personal = append(personal, "aggregate type "+def.Name())
		}
	}
	for _, p := range n.projections {
		if g := p.GroupBy(); p.PersonalKeys() || p.PersonalRows() != "" || g != nil && g.Personal() {
			personal = append(personal, "projection "+p.Name())
		}
	}
	if len(personal) == 0 {
		return nil, nil
	}
	slices.Sort(personal)
	c := n.cfg
	if len(c.masterKeys) == 0 {
		return nil, fmt.Errorf("esker: %s has personal data (fields tagged esker:\"pii\", or personal row keys), which is sealed with keys wrapped by a master key: configure one with esker.MasterKey or esker.MasterKeyFile (esker node --master-key-file)", strings.Join(personal, ", "))
	}
	// Every topic of the node is checked (and created) with the keys
	// topic: topics shared with other applications may show a wrong
	// partition count, and a keys topic created before that was found
	// would keep the wrong one.
	specs := append(engine.AppTopics(engine.Config{AppID: c.appID, Types: n.order, Projections: n.projOrder, CommandRetention: c.commandRetention}),
		engine.TopicSpec{Name: keyring.Topic(c.appID), Configs: map[string]string{"cleanup.policy": "compact"}})
	if err := engine.EnsureTopics(ctx, kadm.NewClient(producer), specs, c.partitions, c.replicationFactor); err != nil {
		return nil, fmt.Errorf("esker: %w", err)
	}
	// The keys' local store is a directory inside the state directory, so
	// that one volume keeps both; the state store's Pebble ignores entries
	// whose names are not its own files.
	keys, err := keyring.New(keyring.Config{AppID: c.appID, Partitions: c.partitions, Masters: c.masterKeys,
		Dir: filepath.Join(c.stateDir, "keys"), ClientOpts: clientOpts, Logger: c.logger})
	if err != nil {
		return nil, fmt.Errorf("esker: %w", err)
	}
	go func() { _ = keys.Run(context.Background()) }() // ends when Close closes the client
	syncCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := keys.Sync(syncCtx); err != nil {
		keys.Close()
		return nil, fmt.Errorf("esker: read the keys topic: %w", err)
	}
	return keys, nil
}

// openEvent opens the personal fields of an event read from an aggregate
// type's events topic, for side-effect consumers and sinks. Events of other
// topics are returned as they are.
func (n *Node) openEvent(ctx context.Context, topic string, ev aggregate.Event) (aggregate.Event, error) {
	typ, ok := strings.CutSuffix(topic, "-events")
	if !ok {
		return ev, nil
	}
	evs, err := backend{n}.openEvents(ctx, typ, []aggregate.Event{ev})
	if err != nil {
		return ev, err
	}
	return evs[0], nil
}

// runningStore returns the state store once Run has opened it.
func (n *Node) runningStore() *statestore.Store {
	select {
	case <-n.started:
		return n.store
	default:
		return nil
	}
}

// runningEngine returns the engine once Run has created it.
func (n *Node) runningEngine() *engine.Engine {
	select {
	case <-n.started:
		return n.engine
	default:
		return nil
	}
}

// Handler returns the node's HTTP API, the same handler Run serves on the
// listen address; use it to mount the API in your own server (with
// HTTPListen("")).
func (n *Node) Handler() http.Handler { return n.handler }

// Registry returns the node's Prometheus registry (served at /metrics), to
// register the service's own collectors.
func (n *Node) Registry() *prometheus.Registry { return n.registry }
