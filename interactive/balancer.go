package interactive

import (
	"fmt"
	"slices"
	"strings"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// ProtocolName is the name of esker's group protocol (the classic consumer
// group protocol with esker's assignor). It stays the same across versions
// of the metadata encoding, which carries its own version byte: the broker
// only lets members with a protocol name in common into one group.
const ProtocolName = "esker"

// Balancer is the kgo.GroupBalancer of an esker application's consumer group
// (install it with kgo.Balancers). Each member advertises its HTTP URL and
// the partitions it holds locally with their changelog checkpoints; the
// leader plans the group with Plan and sends every member the whole cluster
// map (partition → active and standby members, member → URL) along with its
// own partitions.
//
// The balancer is cooperative (KIP-429, IsCooperative returns true): members
// keep the partitions they are not losing across a rebalance, so a node
// joining or leaving stops processing only on the partitions that move, and
// nodes keep their open tasks (and their restored state) instead of revoking
// and re-restoring everything on every rebalance, which eager balancing would
// do. Following franz-go's rules for cooperative balancers, the leader never
// hands a partition to a member while another member of the group still owns
// it: such a partition is withheld (Placement.Pending), its owner revokes it
// on receipt and rejoins, and the next generation assigns it; a partition
// whose owner left the group (crashed, or its session expired) is assigned at
// once. Ownership claims follow KIP-792: when two members claim a partition,
// the claim of the higher generation counts.
//
// All members of the group must subscribe to the same topics, all with the
// same partition count (they are co-partitioned); otherwise balancing fails
// with an error (see MemberBalancer).
type Balancer struct {
	url      string
	standbys int
	local    func() map[int32]LocalTask
	onMap    func(Map)
}

var _ kgo.GroupBalancer = (*Balancer)(nil)

// NewBalancer returns the balancer of one member.
//
//   - url is the member's advertised HTTP base URL (may be empty: the member
//     gets partitions but nobody can forward to it).
//   - standbys is the number of standby replicas per partition the member
//     plans when it is the group's leader (capped at the member count minus
//     one; 0 or less for none). Every member should use the same value: only
//     the leader's counts.
//   - local, if not nil, is called on every JoinGroup (on franz-go's group
//     goroutine: it must be quick and must not call back into the client)
//     and returns the partitions this node holds locally, with their roles
//     and checkpoints (see LocalTask). The active role is taken from
//     franz-go's current assignment instead: a partition local reports as
//     active that the client no longer owns is sent as RoleNone, and a
//     partition the client owns is sent as active even if local omits it
//     (with checkpoint 0).
//   - onMap, if not nil, is called with each cluster map this member
//     receives, from ParseSyncAssignment on franz-go's group goroutine,
//     before OnPartitionsAssigned/OnPartitionsRevoked run for that
//     generation. It must not block. It is not called when the assignment
//     cannot be parsed. A map may be older than one received before: when
//     a static member (kgo.InstanceID) that leads the group restarts, the
//     broker tells it not to balance (KIP-814) and every member gets its
//     previous assignment, with its older map, again; compare
//     Map.Generation and keep the newest.
func NewBalancer(url string, standbys int, local func() map[int32]LocalTask, onMap func(Map)) *Balancer {
	return &Balancer{url: url, standbys: max(standbys, 0), local: local, onMap: onMap}
}

// ProtocolName returns "esker".
func (*Balancer) ProtocolName() string { return ProtocolName }

// IsCooperative returns true: see Balancer.
func (*Balancer) IsCooperative() bool { return true }

// JoinGroupMetadata returns this member's metadata (EncodeMetadata): its URL,
// generation, and local tasks, with the partitions of currentAssignment (of
// any topic) as active. The output changes whenever a checkpoint does, so a
// rejoin of a member in a stable group triggers a rebalance (as Kafka
// Streams' subscriptions do); members rejoin only when they mean to.
func (b *Balancer) JoinGroupMetadata(topics []string, currentAssignment map[string][]int32, generation int32) []byte {
	tasks := make(map[int32]LocalTask)
	if b.local != nil {
		for p, t := range b.local() {
			if p < 0 {
				continue
			}
			if t.Role != RoleStandby {
				t.Role = RoleNone
			}
			tasks[p] = t
		}
	}
	for _, ps := range currentAssignment {
		for _, p := range ps {
			if p >= 0 {
				t := tasks[p]
				t.Role = RoleActive
				tasks[p] = t
			}
		}
	}
	return EncodeMetadata(topics, Metadata{URL: b.url, Generation: generation, Tasks: tasks})
}

// ParseSyncAssignment decodes this member's assignment (DecodeAssignment),
// hands the cluster map to onMap, and returns the member's topics and
// partitions. A malformed assignment returns an error wrapping
// ErrBadEncoding; franz-go then logs it, fails this join and sync, and
// rejoins.
func (b *Balancer) ParseSyncAssignment(assignment []byte) (map[string][]int32, error) {
	assigned, m, err := DecodeAssignment(assignment)
	if err != nil {
		return nil, fmt.Errorf("esker balancer: %w", err)
	}
	if b.onMap != nil {
		b.onMap(m)
	}
	return assigned, nil
}

// MemberBalancer decodes every member's metadata and returns the balancer of
// this group generation (franz-go calls it on the leader only) and the
// topics the members subscribe to. Members listed twice (a broker bug) are
// taken once, the first time. It fails when a member's metadata cannot be
// decoded (it is not an esker member of this version; the error names the
// member and wraps ErrBadEncoding), or when members subscribe to different
// topics (the error names both members and the topics they differ in); a
// failure fails the rebalance, and franz-go retries the join.
func (b *Balancer) MemberBalancer(members []kmsg.JoinGroupResponseMember) (kgo.GroupMemberBalancer, map[string]struct{}, error) {
	mb := &memberBalancer{standbys: b.standbys}
	seen := make(map[string]bool, len(members))
	var first string
	for _, jm := range members {
		if seen[jm.MemberID] {
			continue
		}
		seen[jm.MemberID] = true
		topics, md, err := DecodeMetadata(jm.ProtocolMetadata)
		if err != nil {
			return nil, nil, fmt.Errorf("esker balancer: member %s: %w", jm.MemberID, err)
		}
		if len(mb.members) == 0 {
			mb.topics, first = topics, jm.MemberID
		} else if !slices.Equal(topics, mb.topics) {
			return nil, nil, fmt.Errorf("esker balancer: members subscribe to different topics: %s to %s, %s to %s (every node of an application must register the same aggregate types)",
				first, strings.Join(mb.topics, ","), jm.MemberID, strings.Join(topics, ","))
		}
		mb.members = append(mb.members, Member{ID: jm.MemberID, Metadata: md})
	}
	set := make(map[string]struct{}, len(mb.topics))
	for _, t := range mb.topics {
		set[t] = struct{}{}
	}
	return mb, set, nil
}

// memberBalancer balances one generation.
type memberBalancer struct {
	standbys   int
	members    []Member
	topics     []string // sorted
	generation int32
	haveInfo   bool
}

var (
	_ kgo.GroupMemberBalancerOrError = (*memberBalancer)(nil)
	_ kgo.GroupMemberBalancerInfo    = (*memberBalancer)(nil)
)

// SetBalanceInfo records the generation being balanced into (franz-go calls
// it before balancing); the map carries it.
func (mb *memberBalancer) SetBalanceInfo(info kgo.BalanceInfo) {
	mb.generation, mb.haveInfo = info.Generation, true
}

// Balance is BalanceOrError without the error: nil when balancing fails
// (franz-go calls BalanceOrError instead, and fails the rebalance on nil).
func (mb *memberBalancer) Balance(topics map[string]int32) kgo.IntoSyncAssignment {
	p, err := mb.BalanceOrError(topics)
	if err != nil {
		return nil
	}
	return p
}

// BalanceOrError plans the group. topics holds the partition count of each
// topic as the leader knows it. It fails when a subscribed topic has no count
// (its metadata did not load) or the topics have different partition counts
// (they must be co-partitioned); franz-go then fails the rebalance and
// retries the join. Without SetBalanceInfo, the map's generation is one more
// than the highest member generation.
func (mb *memberBalancer) BalanceOrError(topics map[string]int32) (kgo.IntoSyncAssignment, error) {
	var partitions int32 = -1
	for _, t := range mb.topics {
		n, ok := topics[t]
		if !ok {
			return nil, fmt.Errorf("esker balancer: no partition count for topic %s (its metadata did not load)", t)
		}
		if partitions >= 0 && n != partitions {
			return nil, fmt.Errorf("esker balancer: topics are not co-partitioned: %s has %d partitions, %s has %d", mb.topics[0], partitions, t, n)
		}
		partitions = n
	}
	m := Plan(mb.members, max(partitions, 0), mb.standbys)
	if mb.haveInfo {
		m.Generation = mb.generation
	} else {
		m.Generation = 0
		for _, mem := range mb.members {
			m.Generation = max(m.Generation, mem.Generation+1)
		}
	}
	holdMoves(&m, mb.members)
	return &syncPlan{topics: mb.topics, m: m}, nil
}

// syncPlan is a planned map ready to be sent.
type syncPlan struct {
	topics []string
	m      Map
}

// IntoSyncAssignment returns one assignment per member (EncodeAssignment),
// ordered by member id; the map is encoded once and shared.
func (s *syncPlan) IntoSyncAssignment() []kmsg.SyncGroupRequestGroupAssignment {
	ud := encodeMap(s.m)
	ids := make([]string, 0, len(s.m.Members))
	for id := range s.m.Members {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	out := make([]kmsg.SyncGroupRequestGroupAssignment, 0, len(ids))
	for _, id := range ids {
		a := kmsg.NewSyncGroupRequestGroupAssignment()
		a.MemberID = id
		a.MemberAssignment = assignmentFor(s.topics, id, s.m, ud)
		out = append(out, a)
	}
	return out
}
