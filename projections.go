package esker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/interactive"
	"github.com/esker-io/esker/projection"
	"github.com/esker-io/esker/statestore"
)

var _ interactive.Projections = backend{}

// ProjectionRow returns one row of a projection from this node's store: the
// Go form of GET /v1/projections/{name}/{key}. For a projection with
// personal keys (projection.PersonalKeys), key is the key itself; the row
// is found under its pseudonym. It fails with a
// *interactive.NotReadyError when the key's partition is not owned and
// restored here, and with interactive.ErrNotFound when the row does not
// exist.
func (n *Node) ProjectionRow(ctx context.Context, name, key string) (interactive.Row, error) {
	return backend{n}.ProjectionRow(ctx, name, key)
}

func (b backend) HasProjection(name string) bool {
	_, ok := b.projection(name)
	return ok
}

// projection returns a registered projection.
func (b backend) projection(name string) (projection.Definition, bool) {
	b.n.mu.Lock()
	defer b.n.mu.Unlock()
	p, ok := b.n.projections[name]
	return p, ok
}

func (b backend) PersonalKeys(name string) bool {
	p, ok := b.projection(name)
	return ok && p.PersonalKeys()
}

func (b backend) ProjectionRowKey(ctx context.Context, name, key string) (string, error) {
	if !b.PersonalKeys(name) {
		return key, nil
	}
	if _, err := b.started(); err != nil {
		return "", err
	}
	return b.n.keys.Pseudonym(ctx, name, key)
}

func (b backend) ProjectionRow(ctx context.Context, name, key string) (interactive.Row, error) {
	if !b.HasProjection(name) {
		return interactive.Row{}, fmt.Errorf("unknown projection %q", name)
	}
	rowKey, err := b.ProjectionRowKey(ctx, name, key)
	if err != nil {
		return interactive.Row{}, err
	}
	t, err := b.task(name, rowKey)
	if err != nil {
		return interactive.Row{}, err
	}
	rec, found, err := b.stateRecord(t, rowKey)
	if err != nil {
		return interactive.Row{}, err
	}
	if !found {
		return interactive.Row{}, interactive.ErrNotFound
	}
	value, err := b.openRow(ctx, name, rowKey, rec.State)
	if err != nil {
		return interactive.Row{}, err
	}
	return interactive.Row{Key: key, Version: rec.Version, Value: value, UpdatedAt: rec.UpdatedAt}, nil
}

// openRow opens the personal fields of a row of a projection whose rows
// are sealed by their entities' keys (projection.Definition.PersonalRows).
// A field no key opens is served sealed, as events are.
func (b backend) openRow(ctx context.Context, name, key string, state []byte) ([]byte, error) {
	p, ok := b.projection(name)
	if !ok || p.PersonalRows() == "" || b.n.keys == nil {
		return state, nil
	}
	v, err := p.DecodeState(state)
	if err != nil {
		return nil, err
	}
	opened, err := aggregate.OpenPersonal(v, b.n.keys.Cipher(ctx, p.PersonalRows(), key))
	switch {
	case errors.Is(err, aggregate.ErrUnknownKey):
		b.n.cfg.logger.Warn("a projection row's personal fields cannot be opened; served sealed", "projection", name, "id", key, "err", err)
		return state, nil
	case err != nil:
		return nil, err
	}
	return p.EncodeState(opened)
}

func (b backend) ProjectionScan(ctx context.Context, name string, partitions []int32, prefix, after string, limit int) ([]interactive.Row, error) {
	if !b.HasProjection(name) {
		return nil, fmt.Errorf("unknown projection %q", name)
	}
	if _, err := b.started(); err != nil {
		return nil, err
	}
	if partitions == nil {
		for p := range b.n.cfg.partitions {
			partitions = append(partitions, p)
		}
	}
	var rows []interactive.Row
	for _, p := range partitions {
		if p < 0 || p >= b.n.cfg.partitions {
			return nil, fmt.Errorf("partition %d does not exist", p)
		}
		t := statestore.Task{Type: name, Partition: p}
		if err := b.serves(t); err != nil {
			return nil, err
		}
		var entries []statestore.StateEntry
		err := b.withStore(func(s *statestore.Store) (err error) {
			entries, err = s.Scan(t, prefix, after, limit)
			return err
		})
		if err != nil {
			return nil, err
		}
		for _, e := range entries {
			value, err := b.openRow(ctx, name, e.ID, e.Record.State)
			if err != nil {
				return nil, err
			}
			rows = append(rows, interactive.Row{Key: e.ID, Version: e.Record.Version, Value: value, UpdatedAt: e.Record.UpdatedAt})
		}
		if err := ctx.Err(); err != nil {
			return nil, errors.Join(interactive.ErrTimeout, err)
		}
	}
	slices.SortFunc(rows, func(x, y interactive.Row) int { return strings.Compare(x.Key, y.Key) })
	if len(rows) > limit {
		rows = rows[:limit]
	}
	return rows, nil
}

// Processors lists this node's projections, reactors, side-effect
// consumers and sinks for GET /v1/cluster.
func (r router) Processors() []interactive.ProcessorStatus {
	eng := r.n.runningEngine()
	if eng == nil {
		return nil
	}
	var out []interactive.ProcessorStatus
	for _, name := range eng.ProjectionNames() {
		reactor, parts, restored, lag := eng.ProjectionStatus(name)
		st := interactive.ProcessorStatus{Kind: "projection", Name: name, Partitions: parts, Lag: lag}
		if reactor {
			st.Kind = "reactor"
		}
		if st.Partitions == nil {
			st.Partitions = []int32{}
		}
		if restored < len(parts) {
			st.Error = fmt.Sprintf("restoring %d of %d partitions", len(parts)-restored, len(parts))
		}
		out = append(out, st)
	}
	return append(out, r.n.consumerStatuses()...)
}
