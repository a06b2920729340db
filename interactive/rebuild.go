package interactive

// This file serves the rebuild admin routes: rebuild an aggregate type's
// state from its events on this node, and follow the rebuild.

import (
	"errors"
	"fmt"
	"net/http"
	"time"
)

// Rebuilder is implemented by a Backend whose node can rebuild aggregate
// state from events; the handler serves /v1/admin/rebuild/{type} only then.
type Rebuilder interface {
	// StartRebuild starts an online rebuild of every partition of the type
	// this node owns (a partition already rebuilding keeps its rebuild) and
	// returns the status. It fails with an error wrapping ErrNotFound for
	// a type not registered here and a *NotReadyError when the node cannot
	// start one now.
	StartRebuild(typ string) (RebuildStatus, error)
	// RebuildStatus returns the newest rebuild of each of the type's
	// partitions this node ran; errors as StartRebuild.
	RebuildStatus(typ string) (RebuildStatus, error)
}

// RebuildStatus is the answer of the rebuild routes.
type RebuildStatus struct {
	Type string `json:"type"`
	// Node is the node's advertised URL.
	Node string `json:"node,omitempty"`
	// StateVersion is the type's state version in this node's code.
	StateVersion int `json:"stateVersion"`
	// InProgress: some partition of the type is rebuilding here now.
	InProgress bool               `json:"inProgress"`
	Partitions []PartitionRebuild `json:"partitions"`
}

// PartitionRebuild is one partition's rebuild.
type PartitionRebuild struct {
	Partition int32 `json:"partition"`
	// ID numbers the rebuilds of the node since it started.
	ID int64 `json:"id"`
	// State is running, swapping, done, failed or cancelled.
	State  string `json:"state"`
	Online bool   `json:"online"`
	Reason string `json:"reason,omitempty"`
	// FromVersion is the state version the old state was folded with,
	// ToVersion the one of the rebuilt state.
	FromVersion int64 `json:"fromVersion"`
	ToVersion   int64 `json:"toVersion"`
	// Replayed of Total records of the partition of "<type>-events" read.
	Replayed        int64     `json:"replayed"`
	Total           int64     `json:"total"`
	Percent         float64   `json:"percent"`
	Events          int64     `json:"events"`
	EventsPerSecond float64   `json:"eventsPerSecond"`
	Error           string    `json:"error,omitempty"`
	StartedAt       time.Time `json:"startedAt"`
	FinishedAt      time.Time `json:"finishedAt,omitzero"`
}

// startRebuild handles POST /v1/admin/rebuild/{type}: 202 with the status.
func (a *api) startRebuild(w http.ResponseWriter, r *http.Request) {
	a.rebuild(w, r, http.StatusAccepted, Rebuilder.StartRebuild)
}

// rebuildStatus handles GET /v1/admin/rebuild/{type}.
func (a *api) rebuildStatus(w http.ResponseWriter, r *http.Request) {
	a.rebuild(w, r, http.StatusOK, Rebuilder.RebuildStatus)
}

func (a *api) rebuild(w http.ResponseWriter, r *http.Request, okStatus int, fn func(Rebuilder, string) (RebuildStatus, error)) {
	typ := pathParam(r, "type")
	rb, ok := a.b.(Rebuilder)
	if !ok {
		writeError(w, http.StatusNotFound, "this node cannot rebuild state")
		return
	}
	st, err := fn(rb, typ)
	var notReady *NotReadyError
	switch {
	case err == nil:
		if a.rt != nil {
			st.Node = a.rt.Self()
		}
		writeJSON(w, okStatus, st)
	case errors.As(err, &notReady):
		writeNotReady(w, notReady, "")
	case errors.Is(err, ErrNotFound):
		writeError(w, http.StatusNotFound, fmt.Sprintf("unknown aggregate type %q: no such type is registered on this node", typ))
	default:
		a.internal(w, r, "rebuild", err, "")
	}
}
