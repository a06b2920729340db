package esker

import (
	"context"
	"errors"
	"fmt"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/interactive"
)

// Load returns an entity's committed state, decoded into the aggregate's
// state type, and its version: the typed Go form of GET
// /v1/aggregates/{type}/{id}. An entity without events has the zero state
// and version 0 (no error). It fails like Node.State: with a
// *interactive.NotReadyError when this node does not serve the entity's
// partition now (owned elsewhere, restoring, or its membership unconfirmed).
// The type must be registered on n.
//
//	acct, version, err := esker.Load(ctx, node, bank.Account, "acc-1")
func Load[S, C, E any](ctx context.Context, n *Node, t *aggregate.Type[S, C, E], id string) (S, int64, error) {
	var zero S
	st, err := n.State(ctx, t.Name(), id, 0, 0)
	if errors.Is(err, interactive.ErrNotFound) {
		return zero, 0, nil
	}
	if err != nil {
		return zero, 0, err
	}
	v, err := t.Untyped().DecodeState(st.State)
	if err != nil {
		return zero, 0, fmt.Errorf("esker: %s %q: %w", t.Name(), id, err)
	}
	return v.(S), st.Version, nil
}
