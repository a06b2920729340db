package esker

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/interactive"
	"github.com/esker-io/esker/internal/engine"
	"github.com/esker-io/esker/statestore"
)

// Submit sends a command to an entity and waits for its committed outcome:
// the Go form of POST /v1/aggregates/{type}/{id}/commands. A missing command
// id is generated. It fails with a *interactive.NotReadyError when the
// entity's partition is not owned and restored on this node (nothing was
// produced), and with interactive.ErrTimeout when the outcome is unknown at
// the deadline (ctx's, or the CommandTimeout option's): the command may still
// be applied, so retry with the same command id.
func (n *Node) Submit(ctx context.Context, aggregateType, id string, cmd aggregate.Command) (aggregate.Outcome, error) {
	ctx, cancel := context.WithTimeout(ctx, n.cfg.commandTimeout)
	defer cancel()
	return backend{n}.Submit(ctx, aggregateType, id, cmd)
}

// State returns an entity's committed state (see interactive.Backend.State).
func (n *Node) State(ctx context.Context, aggregateType, id string, minVersion int64, wait time.Duration) (interactive.State, error) {
	return backend{n}.State(ctx, aggregateType, id, minVersion, wait)
}

// Events returns up to limit events of an entity from version from.
func (n *Node) Events(ctx context.Context, aggregateType, id string, from int64, limit int) ([]aggregate.Event, error) {
	return backend{n}.Events(ctx, aggregateType, id, from, limit)
}

// Ready returns nil when the node processes every task it owns.
func (n *Node) Ready() error { return backend{n}.Ready() }

// router tells the HTTP layer which node serves a partition, from the
// newest cluster map the group balancer delivered.
type router struct{ n *Node }

func (r router) Partitions() int32 { return r.n.cfg.partitions }
func (r router) Self() string      { return r.n.cfg.advertisedURL }

func (r router) Map() (interactive.Map, bool) {
	m := r.n.clusterMap.Load()
	if m == nil {
		return interactive.Map{}, false
	}
	return *m, true
}

// Owner compares URLs: every node of an application must advertise its own
// (AdvertisedURL).
func (r router) Owner(p int32) (url string, self bool, ok bool) {
	m := r.n.clusterMap.Load()
	if m == nil {
		return "", false, false
	}
	url, ok = m.ActiveURL(p)
	return url, ok && url == r.n.cfg.advertisedURL, ok
}

// TaskStatus reports this node's active task for partition p (standby
// tasks come with standby replicas). An active task writes its changelog
// itself, so once restored it is not behind.
func (r router) TaskStatus(p int32) (interactive.TaskStatus, bool) {
	select {
	case <-r.n.started:
	default:
		return interactive.TaskStatus{}, false
	}
	owned, restored := r.n.engine.PartitionStatus(p)
	if !owned {
		if lag, ok := r.n.engine.StandbyLag(p); ok {
			return interactive.TaskStatus{Role: interactive.RoleStandby, Restored: lag == 0, Lag: lag}, true
		}
		return interactive.TaskStatus{}, false
	}
	return interactive.TaskStatus{Role: interactive.RoleActive, Restored: restored}, true
}

// backend adapts the engine and the store to interactive.Backend (and
// interactive.Projections: projections.go).
type backend struct{ n *Node }

func (b backend) Definition(t string) (aggregate.Definition, bool) {
	b.n.mu.Lock()
	defer b.n.mu.Unlock()
	d, ok := b.n.types[t]
	return d, ok
}

// AggregateTypes lists the registered aggregate types (GET /v1/cluster).
func (b backend) AggregateTypes() []string {
	b.n.mu.Lock()
	defer b.n.mu.Unlock()
	return slices.Collect(maps.Keys(b.n.types))
}

func (b backend) started() (*engine.Engine, error) {
	select {
	case <-b.n.started:
		return b.n.engine, nil
	default:
		return nil, &interactive.NotReadyError{Reason: "the node is starting", RetryAfter: time.Second}
	}
}

// task returns the entity's task if this node serves it now (see serves).
func (b backend) task(aggregateType, id string) (statestore.Task, error) {
	t := statestore.Task{Type: aggregateType, Partition: aggregate.Partition(id, b.n.cfg.partitions)}
	return t, b.serves(t)
}

// serves fails with a *interactive.NotReadyError unless this node serves
// the task now: it has started, owns the task, has restored it, and its
// group membership is confirmed.
func (b backend) serves(t statestore.Task) error {
	eng, err := b.started()
	if err != nil {
		return err
	}
	owned, restored := eng.TaskStatus(t)
	switch {
	case !owned:
		return &interactive.NotReadyError{
			Reason:     fmt.Sprintf("partition %d of %s is not owned by this node (rebalancing, or owned by another node)", t.Partition, t.Type),
			RetryAfter: time.Second,
		}
	case !restored:
		if s, rebuilding := eng.TaskRebuild(t); rebuilding && !s.Online {
			return rebuildingError(s)
		}
		return &interactive.NotReadyError{
			Reason:     fmt.Sprintf("partition %d of %s is restoring its state", t.Partition, t.Type),
			RetryAfter: time.Second,
		}
	case !eng.MembershipCurrent():
		// Maybe a zombie: the group may have moved the partition already.
		return &interactive.NotReadyError{
			Reason:     "this node's group membership is not confirmed (it was paused or cut off from Kafka); it answers again once the group confirms it",
			RetryAfter: time.Second,
		}
	}
	return nil
}

// restoredTask is task, except that with wait a task this node owns but is
// still restoring is waited for (until deadline or ctx ends) rather than
// refused: a read that may wait for a version may wait for the restore.
func (b backend) restoredTask(ctx context.Context, aggregateType, id string, wait bool, deadline <-chan time.Time) (statestore.Task, error) {
	for {
		t, err := b.task(aggregateType, id)
		var nr *interactive.NotReadyError
		if err == nil || !wait || !errors.As(err, &nr) {
			return t, err
		}
		eng, started := b.started()
		if started != nil {
			return t, err
		}
		changed := eng.Changed(t) // before the check: no missed change
		owned, restored := eng.TaskStatus(t)
		if !owned {
			return t, err
		}
		if restored {
			return b.task(aggregateType, id) // restored meanwhile
		}
		select {
		case <-changed:
		case <-deadline:
			return t, err
		case <-ctx.Done():
			return t, err
		}
	}
}

func (b backend) Submit(ctx context.Context, aggregateType, id string, cmd aggregate.Command) (aggregate.Outcome, error) {
	o, err := b.submit(ctx, aggregateType, id, cmd)
	if err == nil && len(o.Events) > 0 {
		// The outcome's events are as stored: sealed.
		o.Events, err = b.openEvents(ctx, aggregateType, slices.Clone(o.Events))
	}
	return o, err
}

func (b backend) submit(ctx context.Context, aggregateType, id string, cmd aggregate.Command) (aggregate.Outcome, error) {
	def, ok := b.Definition(aggregateType)
	if !ok {
		return aggregate.Outcome{}, fmt.Errorf("unknown aggregate type %q", aggregateType)
	}
	t, err := b.task(aggregateType, id)
	if err != nil {
		return aggregate.Outcome{}, err
	}
	if c := b.cipher(ctx, def, id); c != nil {
		// Personal fields never reach the commands topic in plaintext: a
		// copy there would outlive forgetting the entity.
		data, err := def.SealCommand(cmd.Type, cmd.Data, c)
		if errors.Is(err, aggregate.ErrForgotten) {
			return aggregate.Outcome{}, interactive.ErrGone
		}
		if err != nil {
			return aggregate.Outcome{}, &interactive.NotReadyError{
				Reason: fmt.Sprintf("cannot seal the command's personal fields: %v", err), RetryAfter: time.Second}
		}
		cmd.Data = data
	}
	if cmd.CommandID == "" {
		cmd.CommandID = newCommandID()
	}
	// Await before producing: the outcome may commit before ProduceSync
	// returns.
	outcome, gone, cancel := b.n.engine.Await(t, cmd.CommandID)
	defer cancel()
	rec := engine.CommandRecord(aggregateType, id, t.Partition, cmd)
	if err := b.n.producer.ProduceSync(ctx, rec).FirstErr(); err != nil {
		if ctx.Err() != nil {
			return aggregate.Outcome{}, interactive.ErrTimeout
		}
		if errors.Is(err, kerr.MessageTooLarge) || errors.Is(err, kerr.RecordListTooLarge) {
			return aggregate.Outcome{}, fmt.Errorf("%w: Kafka refused the command record as too large (%v): send smaller commands", interactive.ErrTooLarge, err)
		}
		return aggregate.Outcome{}, &interactive.NotReadyError{
			Reason: fmt.Sprintf("could not write the command to Kafka: %v", err), RetryAfter: time.Second}
	}
	select {
	case o := <-outcome:
		return o, nil
	case <-gone:
		// The partition moved (or the node stops) before this node learnt
		// the outcome; its new owner applies the command. Unknown: the
		// client retries with the same command id.
		select {
		case o := <-outcome:
			return o, nil
		default:
		}
		return aggregate.Outcome{}, interactive.ErrTimeout
	case <-ctx.Done():
		return aggregate.Outcome{}, interactive.ErrTimeout
	}
}

func (b backend) State(ctx context.Context, aggregateType, id string, minVersion int64, wait time.Duration) (interactive.State, error) {
	// Without a wait, a version not reached yet answers at once.
	timer := time.NewTimer(wait)
	defer timer.Stop()
	deadline := timer.C
	t, err := b.restoredTask(ctx, aggregateType, id, wait > 0, deadline)
	if err != nil {
		if interactive.StaleAllowed(ctx) {
			return b.standbyState(t, id, minVersion, err)
		}
		return interactive.State{}, err
	}
	for {
		changed := b.n.engine.Changed(t) // before reading: no missed change
		rec, found, err := b.stateRecord(t, id)
		if err != nil {
			return interactive.State{}, err
		}
		var st interactive.State
		if found {
			if rec.Forgotten {
				return interactive.State{}, interactive.ErrGone
			}
			st = interactive.State{ID: id, Version: rec.Version, State: rec.State, UpdatedAt: rec.UpdatedAt}
			if rec.Version >= minVersion {
				return b.openState(ctx, aggregateType, st)
			}
		} else if minVersion <= 0 {
			return interactive.State{}, interactive.ErrNotFound
		}
		select {
		case <-changed:
			if _, err := b.task(aggregateType, id); err != nil {
				return st, err // the partition moved away while waiting
			}
		case <-deadline:
			return st, interactive.ErrTimeout
		case <-ctx.Done():
			return st, interactive.ErrTimeout
		}
	}
}

// standbyState answers a read that accepts staleness from this node's
// standby copy of the partition, if it has one (else notOwned).
func (b backend) standbyState(t statestore.Task, id string, minVersion int64, notOwned error) (interactive.State, error) {
	eng := b.n.runningEngine()
	if eng == nil {
		return interactive.State{}, notOwned
	}
	lag, ok := eng.StandbyLag(t.Partition)
	if !ok {
		return interactive.State{}, notOwned
	}
	rec, found, err := b.stateRecord(t, id)
	if err != nil {
		return interactive.State{}, err
	}
	if !found {
		return interactive.State{}, interactive.ErrNotFound
	}
	if rec.Forgotten {
		return interactive.State{}, interactive.ErrGone
	}
	if rec.Version < minVersion {
		return interactive.State{}, interactive.ErrTimeout
	}
	return b.openState(context.Background(), t.Type, interactive.State{ID: id, Version: rec.Version, State: rec.State, UpdatedAt: rec.UpdatedAt, Standby: true, Lag: lag})
}

// cipher returns the field cipher of an entity whose type has personal
// fields, or nil.
func (b backend) cipher(ctx context.Context, def aggregate.Definition, id string) aggregate.FieldCipher {
	if b.n.keys == nil || !def.Personal() {
		return nil
	}
	return b.n.keys.Cipher(ctx, def.Name(), id)
}

// openState opens the personal fields of a state read from the store.
func (b backend) openState(ctx context.Context, aggregateType string, st interactive.State) (interactive.State, error) {
	def, ok := b.Definition(aggregateType)
	if !ok {
		return st, nil
	}
	if c := b.cipher(ctx, def, st.ID); c != nil {
		data, err := def.OpenState(st.State, c)
		if err != nil {
			return interactive.State{}, fmt.Errorf("open the personal fields of %s %q: %w", aggregateType, st.ID, err)
		}
		st.State = data
	}
	return st, nil
}

// openEvents opens the personal fields of an entity's events (upcasting
// them to their registered schema versions on the way).
func (b backend) openEvents(ctx context.Context, aggregateType string, evs []aggregate.Event) ([]aggregate.Event, error) {
	def, ok := b.Definition(aggregateType)
	if !ok || len(evs) == 0 {
		return evs, nil
	}
	c := b.cipher(ctx, def, evs[0].EntityID)
	if c == nil {
		return evs, nil
	}
	for i := range evs {
		schema, data, err := def.OpenEvent(evs[i].Type, evs[i].SchemaVersion, evs[i].Data, c)
		if errors.Is(err, aggregate.ErrUnknownKey) {
			// Sealed with a key this application does not hold: no retry
			// opens it, so it is shown as stored.
			b.n.cfg.logger.Warn("an event's personal fields cannot be opened; passed on sealed", "type", aggregateType, "id", evs[i].EntityID, "version", evs[i].Version, "err", err)
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("open the personal fields of %s %q version %d: %w", aggregateType, evs[i].EntityID, evs[i].Version, err)
		}
		evs[i].SchemaVersion, evs[i].Data = schema, data
	}
	return evs, nil
}

func (b backend) Events(ctx context.Context, aggregateType, id string, from int64, limit int) ([]aggregate.Event, error) {
	t, err := b.task(aggregateType, id)
	if err != nil {
		return nil, err
	}
	var evs []aggregate.Event
	err = b.withStore(func(s *statestore.Store) (err error) {
		evs, err = engine.ReadEvents(s, t, id, from, limit)
		return err
	})
	if err != nil {
		return nil, err
	}
	rec, found, err := b.stateRecord(t, id)
	if err != nil {
		return nil, err
	}
	if !found && len(evs) == 0 {
		return nil, interactive.ErrNotFound
	}
	if rec.Forgotten {
		return nil, interactive.ErrGone
	}
	return b.openEvents(ctx, aggregateType, evs)
}

// withStore runs fn with the store unless the node has stopped.
func (b backend) withStore(fn func(*statestore.Store) error) error {
	b.n.storeMu.RLock()
	defer b.n.storeMu.RUnlock()
	if b.n.storeClosed {
		return &interactive.NotReadyError{Reason: "the node has stopped", RetryAfter: time.Second}
	}
	return fn(b.n.store)
}

// stateRecord reads and decodes the state record of id (an entity or a
// projection row); found is false when there is none.
func (b backend) stateRecord(t statestore.Task, id string) (rec statestore.StateRecord, found bool, err error) {
	var raw []byte
	err = b.withStore(func(s *statestore.Store) error {
		raw, found, err = s.Get(t, statestore.StateKey(id))
		return err
	})
	if err != nil || !found {
		return rec, false, err
	}
	if rec, err = statestore.DecodeStateRecord(raw); err != nil {
		return rec, false, fmt.Errorf("state record of %s %q: %w", t, id, err)
	}
	return rec, true, nil
}

func (b backend) Ready() error {
	eng, err := b.started()
	if err != nil {
		return err
	}
	if err := eng.Ready(); err != nil {
		return &interactive.NotReadyError{Reason: err.Error(), RetryAfter: time.Second}
	}
	return nil
}

func newCommandID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	return hex.EncodeToString(b[:])
}
