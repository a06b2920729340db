package esker

import (
	"errors"
	"fmt"
	"time"

	"github.com/esker-io/esker/interactive"
	"github.com/esker-io/esker/internal/engine"
)

// StartRebuild implements interactive.Rebuilder: POST
// /v1/admin/rebuild/{type} rebuilds, online, the type's state on the
// partitions this node owns (see docs/ARCHITECTURE.md, "Rebuild").
func (b backend) StartRebuild(typ string) (interactive.RebuildStatus, error) {
	eng, err := b.started()
	if err != nil {
		return interactive.RebuildStatus{}, err
	}
	if _, err := eng.Rebuild(typ); err != nil {
		if errors.Is(err, engine.ErrUnknownType) {
			return interactive.RebuildStatus{}, fmt.Errorf("%w: %v", interactive.ErrNotFound, err)
		}
		return interactive.RebuildStatus{}, err
	}
	return b.RebuildStatus(typ)
}

// RebuildStatus implements interactive.Rebuilder.
func (b backend) RebuildStatus(typ string) (interactive.RebuildStatus, error) {
	def, ok := b.Definition(typ)
	if !ok {
		return interactive.RebuildStatus{}, fmt.Errorf("%w: unknown aggregate type %q", interactive.ErrNotFound, typ)
	}
	eng, err := b.started()
	if err != nil {
		return interactive.RebuildStatus{}, err
	}
	out := interactive.RebuildStatus{Type: typ, StateVersion: def.StateVersion(), Partitions: []interactive.PartitionRebuild{}}
	for _, s := range eng.RebuildStatuses(typ) {
		if s.State == engine.RebuildRunning || s.State == engine.RebuildSwapping {
			out.InProgress = true
		}
		out.Partitions = append(out.Partitions, interactive.PartitionRebuild{
			Partition: s.Partition, ID: s.ID, State: s.State, Online: s.Online, Reason: s.Reason,
			FromVersion: s.FromVersion, ToVersion: s.ToVersion,
			Replayed: s.Replayed, Total: s.Total, Percent: s.Percent(),
			Events: s.Events, EventsPerSecond: s.EventsPerSecond, Error: s.Error,
			StartedAt: s.StartedAt, FinishedAt: s.FinishedAt,
		})
	}
	return out, nil
}

// rebuildingError is the answer for a task that waits for its rebuild.
func rebuildingError(s engine.RebuildStatus) *interactive.NotReadyError {
	reason := fmt.Sprintf("partition %d of %s is rebuilding its state from %s-events (state version %d → %d): %.0f%% done (%d of %d records)",
		s.Partition, s.Type, s.Type, s.FromVersion, s.ToVersion, s.Percent(), s.Replayed, s.Total)
	if s.Error != "" {
		reason += "; the last attempt failed: " + s.Error
	}
	return &interactive.NotReadyError{Reason: reason, RetryAfter: 2 * time.Second}
}
