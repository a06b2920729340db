package interactive

import (
	"net/http"
	"slices"
	"strings"
)

// clusterResponse is the answer of GET /v1/cluster.
type clusterResponse struct {
	// Generation is the group generation of the map.
	Generation int32 `json:"generation"`
	// Self is this node's advertised URL (Router.Self).
	Self string `json:"self"`
	// Partitions is the partition count (the number of tasks).
	Partitions int `json:"partitions"`
	// AggregateTypes are the aggregate types registered on this node
	// (TypeLister), sorted.
	AggregateTypes []string        `json:"aggregateTypes"`
	Members        []clusterMember `json:"members"`
	Tasks          []clusterTask   `json:"tasks"`
	// Processors are this node's projections, reactors, side-effect
	// consumers and sinks (ProcessorReporter).
	Processors []ProcessorStatus `json:"processors,omitempty"`
}

// ProcessorStatus is this node's view of one projection, reactor,
// side-effect consumer or sink.
type ProcessorStatus struct {
	// Kind is "projection", "reactor", "sideeffect" or "sink".
	Kind string `json:"kind"`
	Name string `json:"name"`
	// Partitions are the partitions of its inputs this node runs.
	Partitions []int32 `json:"partitions"`
	// Lag is how many input records this node has not processed yet.
	Lag int64 `json:"lag"`
	// Error says why it is not processing, if it is not ("" when it is).
	Error string `json:"error,omitempty"`
	// Details are kind-specific figures (handled, retried, dead-lettered…).
	Details any `json:"details,omitempty"`
}

// TypeLister may be implemented by a Backend to list its registered
// aggregate types in GET /v1/cluster.
type TypeLister interface {
	AggregateTypes() []string
}

// ProcessorReporter may be implemented by a Router to list the node's
// processors in GET /v1/cluster.
type ProcessorReporter interface {
	Processors() []ProcessorStatus
}

type clusterMember struct {
	ID  string `json:"id"`
	URL string `json:"url"`
}

// clusterTask is one partition number: its members by id (see Members for
// their URLs).
type clusterTask struct {
	Partition int32 `json:"partition"`
	// Active is the owner's member id; "" while the partition moves.
	Active string `json:"active"`
	// Pending is the member the partition moves to, while Active is "".
	Pending  string   `json:"pending,omitempty"`
	Standbys []string `json:"standbys"`
	// Local is this node's own task for the partition, when it holds one
	// and the Router reports it (TaskReporter). Other nodes' lag and
	// restore state are in their own GET /v1/cluster.
	Local *localTaskJSON `json:"local,omitempty"`
}

type localTaskJSON struct {
	Role     string `json:"role"`
	Restored bool   `json:"restored"`
	Lag      int64  `json:"lag"`
}

// cluster handles GET /v1/cluster (with Routing only).
func (a *api) cluster(w http.ResponseWriter, _ *http.Request) {
	m, ok := a.rt.Map()
	if !ok {
		writeRetry(w, http.StatusServiceUnavailable, "this node has not received a cluster assignment yet (joining the group); retry after the Retry-After delay", "")
		return
	}
	out := clusterJSON(m, a.rt)
	if tl, ok := a.b.(TypeLister); ok {
		out.AggregateTypes = slices.Sorted(slices.Values(tl.AggregateTypes()))
	}
	writeJSON(w, http.StatusOK, out)
}

func clusterJSON(m Map, rt Router) clusterResponse {
	out := clusterResponse{
		Generation:     m.Generation,
		Self:           rt.Self(),
		Partitions:     len(m.Partitions),
		AggregateTypes: []string{},
		Members:        make([]clusterMember, 0, len(m.Members)),
		Tasks:          make([]clusterTask, 0, len(m.Partitions)),
	}
	for id, u := range m.Members {
		out.Members = append(out.Members, clusterMember{ID: id, URL: u})
	}
	slices.SortFunc(out.Members, func(x, y clusterMember) int { return strings.Compare(x.ID, y.ID) })
	reporter, _ := rt.(TaskReporter)
	for i, pl := range m.Partitions {
		t := clusterTask{
			Partition: int32(i),
			Active:    pl.Active,
			Standbys:  append([]string{}, pl.Standbys...),
		}
		if pl.Active == "" {
			t.Pending = pl.Pending
		}
		if reporter != nil {
			if st, ok := reporter.TaskStatus(int32(i)); ok {
				t.Local = &localTaskJSON{Role: st.Role.String(), Restored: st.Restored, Lag: st.Lag}
			}
		}
		out.Tasks = append(out.Tasks, t)
	}
	if pr, ok := rt.(ProcessorReporter); ok {
		out.Processors = pr.Processors()
	}
	return out
}
