package interactive

// This file holds the pure part of the cluster assignor: what each member
// tells the group leader (Metadata), what the leader sends back (Map), the
// planning function that turns one into the other (Plan), and their wire
// encodings. It has no I/O and no Kafka client; balancer.go adapts it to
// franz-go's kgo.GroupBalancer.
//
// The unit of assignment is the partition NUMBER: partition p of every
// aggregate type's commands topic (and of its events and changelog topics)
// lives on one member, because a command's entity, its events and its
// stored state are all keyed by the same murmur2 partition. So the planner
// never sees topic names, only partition numbers 0..P-1.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"

	"github.com/twmb/franz-go/pkg/kmsg"
)

// Role is what a member did with a partition number in the generation it
// last took part in.
type Role uint8

const (
	// RoleNone: the member holds local state for the partition but was
	// neither its active nor one of its standbys last generation (for
	// example a released standby within its grace period, or a task the
	// member just gave away). The state still counts as a head start:
	// its checkpoint is compared like any other.
	RoleNone Role = iota
	// RoleActive: the member consumed the partition's command topics (it
	// owned the partition in the group).
	RoleActive
	// RoleStandby: the member tailed the partition's changelogs as a
	// standby replica.
	RoleStandby
)

func (r Role) String() string {
	switch r {
	case RoleNone:
		return "none"
	case RoleActive:
		return "active"
	case RoleStandby:
		return "standby"
	}
	return fmt.Sprintf("Role(%d)", uint8(r))
}

// LocalTask is what a member reports about one partition number it holds
// locally.
type LocalTask struct {
	// Role is what the member did with the partition last generation.
	Role Role
	// Checkpoint is how far the member's local store has applied the
	// partition's changelogs: the SUM, over the application's aggregate
	// types T, of the task's checkpoint in <app>-T-changelog partition p
	// (the next offset to restore from; 0 for a type the member has no
	// state for).
	//
	// Why a sum: every member compares the same changelog partitions, so
	// Σ_T end_T(p) is the same for all of them and the records a member
	// still has to restore before it can serve p are
	// Σ_T end_T(p) − Checkpoint. The member with the highest Checkpoint
	// therefore has the least left to restore (exactly, up to compaction
	// gaps, which shrink everyone's work alike). Checkpoints are only ever
	// compared for the same partition number.
	//
	// A Checkpoint of 0 counts as no state at all. A negative Checkpoint
	// is encoded as 0.
	Checkpoint int64
}

// Metadata is what one member sends in its JoinGroup request (inside the
// UserData of a kmsg.ConsumerMemberMetadata, see EncodeMetadata).
type Metadata struct {
	// URL is the member's advertised HTTP base URL, where other members
	// forward requests for the partitions it owns. It may be empty (a node
	// that serves no HTTP); such a member still gets partitions, and other
	// nodes cannot forward to it.
	URL string
	// Generation is the group generation the member last took part in, -1
	// if none. When two members both claim to have been active for a
	// partition (one of them missed a rebalance), the claim with the
	// higher generation wins. It travels in the standard
	// ConsumerMemberMetadata.Generation field.
	Generation int32
	// Tasks maps each partition number the member holds locally to its
	// role and checkpoint. Partition numbers not below the partition
	// count the leader sees are ignored by Plan.
	Tasks map[int32]LocalTask
}

// Member is one group member as the leader sees it: its member id and the
// metadata it joined with.
type Member struct {
	ID string
	Metadata
}

// Placement is where one partition number lives in a generation.
type Placement struct {
	// Active is the member id that consumes the partition's command topics
	// in this generation and answers for its entities. It is empty while
	// the partition moves from one member to another (see Pending), and
	// in a map planned for a group with no members.
	Active string
	// Pending, set only when Active is empty, is the member the partition
	// moves to. The balancer is cooperative (KIP-429): a partition still
	// owned by one member is not handed to another in the same generation.
	// Its owner revokes it when it receives this map and rejoins at once;
	// the next generation makes Pending its Active. Until then nobody owns
	// the partition, and requests for it should be answered with 503 and
	// Retry-After.
	Pending string
	// Standbys are the member ids that keep a standby replica of the
	// partition's state (sorted). Never the Active or Pending member.
	Standbys []string
}

// Map is the cluster map every member receives in its SyncGroup assignment:
// who owns and who replicates each partition number, and where to reach each
// member.
type Map struct {
	// Generation is the group generation this map was planned for. Maps
	// of later generations supersede earlier ones; a member that sees a
	// map older than one it already has should ignore it.
	Generation int32
	// Members maps every member id in the group to its advertised URL.
	Members map[string]string
	// Partitions is indexed by partition number: len(Partitions) is the
	// partition count of every co-partitioned topic.
	Partitions []Placement
}

// ActiveURL returns the URL of the member that owns partition p in this
// generation. ok is false when p is out of range or nobody owns p right now
// (moving between members, or no members); url may be empty with ok true if
// the owner advertised no URL.
func (m Map) ActiveURL(p int32) (url string, ok bool) {
	if p < 0 || int(p) >= len(m.Partitions) || m.Partitions[p].Active == "" {
		return "", false
	}
	return m.Members[m.Partitions[p].Active], true
}

// StandbyURLs returns the URLs of partition p's standbys (nil when p is out
// of range or has none), in the order of their member ids.
func (m Map) StandbyURLs(p int32) []string {
	if p < 0 || int(p) >= len(m.Partitions) {
		return nil
	}
	var urls []string
	for _, id := range m.Partitions[p].Standbys {
		urls = append(urls, m.Members[id])
	}
	return urls
}

// ActivePartitions returns the partition numbers member owns in this
// generation, ascending (not those pending for it).
func (m Map) ActivePartitions(member string) []int32 {
	var ps []int32
	for p := range m.Partitions {
		if m.Partitions[p].Active == member && member != "" {
			ps = append(ps, int32(p))
		}
	}
	return ps
}

// StandbyPartitions returns the partition numbers member keeps a standby
// replica of, ascending.
func (m Map) StandbyPartitions(member string) []int32 {
	var ps []int32
	for p := range m.Partitions {
		if slices.Contains(m.Partitions[p].Standbys, member) {
			ps = append(ps, int32(p))
		}
	}
	return ps
}

// Plan assigns partitions 0..partitions-1 to members. It is a pure,
// deterministic function: the same members (in any order) give the same map.
// Members are identified by ID; if two members share an ID, the first in the
// input is used and the other ignored. The returned map's Generation is 0
// (the caller sets it) and no partition is Pending (Plan returns the target;
// the balancer withholds moves from a current owner, see Placement.Pending).
//
// Rules, in priority order:
//
//  1. Co-partitioning: each partition number has exactly one Active.
//  2. Balance: every member ends with floor(P/N) or ceil(P/N) partitions.
//     Any member may fill up to floor(P/N); the P mod N slots above it go
//     to whoever takes them first in the order of rules 3 and 4.
//  3. Stickiness: a member that was active for p last generation keeps it,
//     up to floor(P/N) of its claims (first those no other member holds
//     state for without a role, then the lowest partition numbers);
//     then, by member id, each member with more claims keeps one more
//     while slots above floor remain. If several members claim p, the
//     claim with the highest Generation wins, then the highest
//     Checkpoint, then the lowest member id; the losers count as holders
//     of state.
//  4. Every other partition goes to the member with the most caught-up
//     local state for it (highest Checkpoint > 0: typically its standby)
//     that still has room, pairs taken by descending Checkpoint, then
//     partition, then member id; what is left goes to the least-loaded
//     member with room, ties by member id.
//  5. Standbys: S = min(standbys, N-1) per partition (none if standbys <=
//     0), never on the partition's Active, each member at most once per
//     partition. Members holding state for p come first (pairs by
//     descending Checkpoint, then partition, then member id), the rest is
//     filled, partition by partition, with the members with the fewest
//     standbys, ties by member id; each member ends with floor or ceil of
//     P·S/N standbys (shares as in rule 2; when the next partition's only
//     members with room are excluded from it, standbys are shifted along
//     an alternating path to make room). Should the shares be impossible
//     to meet, a member takes more than its share rather than a partition
//     getting fewer than S standbys.
//
// These rules make a cooperative rebalance converge: fed with its own
// result (minus the moves withheld from their owners, see holdMoves), Plan
// returns the same actives for every partition it did not have to withhold,
// and places the withheld ones without taking them back to their previous
// owner (whose share is full).
//
// With no members, every Placement is empty; with partitions <= 0 the map
// has no partitions. Members' Tasks entries for partition numbers outside
// 0..partitions-1 are ignored. Plan does not modify its input.
func Plan(members []Member, partitions int32, standbys int) Map {
	ms := sortedMembers(members)
	m := Map{Members: make(map[string]string, len(ms))}
	for _, mem := range ms {
		m.Members[mem.ID] = mem.URL
	}
	if partitions <= 0 {
		return m
	}
	P := int(partitions)
	m.Partitions = make([]Placement, P)
	N := len(ms)
	if N == 0 {
		return m
	}

	// Sticky claims.
	owner := validOwners(ms, P)
	claims := make([][]int, N)
	for p, i := range owner {
		if i >= 0 {
			claims[i] = append(claims[i], p)
		}
	}
	// A member over its share gives up first the partitions another member
	// holds state for without a role (a node back from a restart, which
	// owned them before), so that they go back to it and it restores only
	// their tails. Ties keep the lowest partition numbers.
	warmElsewhere := func(i, p int) bool {
		for j := range ms {
			if t := ms[j].Tasks[int32(p)]; j != i && t.Role == RoleNone && t.Checkpoint > 0 {
				return true
			}
		}
		return false
	}
	for i := range claims {
		slices.SortStableFunc(claims[i], func(a, b int) int {
			wa, wb := warmElsewhere(i, a), warmElsewhere(i, b)
			switch {
			case wa == wb:
				return a - b
			case !wa:
				return -1
			default:
				return 1
			}
		})
	}

	// Shares: every member may reach floor(P/N); P mod N of them may
	// take one more, handed out as they are used (sticky first).
	sh := newShares(N, P)
	active := make([]int, P)
	for p := range active {
		active[p] = -1
	}
	for i := range claims {
		for _, p := range claims[i][:min(len(claims[i]), sh.floor)] {
			active[p] = i
			sh.take(i)
		}
	}
	for i := range claims { // by member id
		if len(claims[i]) > sh.floor && sh.canTake(i) {
			active[claims[i][sh.floor]] = i
			sh.take(i)
		}
	}

	// Free partitions: warm members first.
	var warm []candidate
	for i := range ms {
		for p32, t := range ms[i].Tasks {
			p := int(p32)
			if p32 >= 0 && p < P && active[p] < 0 && t.Checkpoint > 0 {
				warm = append(warm, candidate{p, i, t.Checkpoint})
			}
		}
	}
	sortCandidates(warm)
	for _, c := range warm {
		if active[c.p] < 0 && sh.canTake(c.i) {
			active[c.p] = c.i
			sh.take(c.i)
		}
	}
	// Then the least-loaded member with room. The shares sum to P, so
	// there always is one.
	for p := range active {
		if active[p] >= 0 {
			continue
		}
		best := -1
		for i := range ms {
			if sh.canTake(i) && (best < 0 || sh.load[i] < sh.load[best]) {
				best = i
			}
		}
		active[p] = best
		sh.take(best)
	}
	for p, i := range active {
		m.Partitions[p].Active = ms[i].ID
	}

	S := min(standbys, N-1)
	if S <= 0 {
		return m
	}
	sb := planStandbys(P, N, S, active, ms)
	for p := range sb {
		slices.Sort(sb[p]) // index order is member id order
		ids := make([]string, len(sb[p]))
		for k, i := range sb[p] {
			ids[k] = ms[i].ID
		}
		m.Partitions[p].Standbys = ids
	}
	return m
}

// shares tracks a balanced distribution of total items over n members: each
// may hold floor = total/n, and total%n of them one more, granted to whoever
// takes it first.
type shares struct {
	floor, extra int // extra: slots above floor still open
	load         []int
}

func newShares(n, total int) *shares {
	return &shares{floor: total / n, extra: total % n, load: make([]int, n)}
}

func (s *shares) canTake(i int) bool {
	return s.load[i] < s.floor || s.load[i] == s.floor && s.extra > 0
}

// take counts one more item for i; past its share (a last resort) it simply
// counts.
func (s *shares) take(i int) {
	if s.load[i] == s.floor && s.extra > 0 {
		s.extra--
	}
	s.load[i]++
}

type candidate struct {
	p, i int
	ckpt int64
}

func sortCandidates(cs []candidate) {
	sort.Slice(cs, func(a, b int) bool {
		if cs[a].ckpt != cs[b].ckpt {
			return cs[a].ckpt > cs[b].ckpt
		}
		if cs[a].p != cs[b].p {
			return cs[a].p < cs[b].p
		}
		return cs[a].i < cs[b].i
	})
}

// sortedMembers returns a copy of members sorted by ID, keeping the first of
// members sharing an ID.
func sortedMembers(members []Member) []Member {
	ms := slices.Clone(members)
	sort.SliceStable(ms, func(a, b int) bool { return ms[a].ID < ms[b].ID })
	return slices.CompactFunc(ms, func(a, b Member) bool { return a.ID == b.ID })
}

// validOwners returns, per partition, the index in ms (sorted by ID) of the
// member whose active claim on it wins (highest generation, then checkpoint,
// then lowest id), or -1.
func validOwners(ms []Member, P int) []int {
	owner := make([]int, P)
	for p := range owner {
		owner[p] = -1
	}
	for i := range ms {
		for p32, t := range ms[i].Tasks {
			p := int(p32)
			if p32 < 0 || p >= P || t.Role != RoleActive {
				continue
			}
			j := owner[p]
			if j < 0 {
				owner[p] = i
				continue
			}
			gi, gj := ms[i].Generation, ms[j].Generation
			ci, cj := ms[i].Tasks[p32].Checkpoint, ms[j].Tasks[p32].Checkpoint
			if gi > gj || gi == gj && (ci > cj || ci == cj && i < j) {
				owner[p] = i
			}
		}
	}
	return owner
}

// holdMoves applies the cooperative rule to a planned map: a partition whose
// valid current owner (see validOwners) is a member of the group and is not
// its planned Active is withheld — Active cleared, the planned member moved
// to Pending — so that no partition is consumed by two members at once. The
// owner revokes it on receipt and rejoins, and the next plan assigns it.
func holdMoves(m *Map, members []Member) {
	ms := sortedMembers(members)
	for p, i := range validOwners(ms, len(m.Partitions)) {
		pl := &m.Partitions[p]
		if i >= 0 && pl.Active != "" && pl.Active != ms[i].ID {
			pl.Pending, pl.Active = pl.Active, ""
		}
	}
}

// planStandbys places S standbys per partition, as documented on Plan. It
// returns, per partition, member indices.
func planStandbys(P, N, S int, active []int, ms []Member) [][]int {
	var warm []candidate
	for i := range ms {
		for p32, t := range ms[i].Tasks {
			p := int(p32)
			if p32 >= 0 && p < P && active[p] != i && t.Checkpoint > 0 {
				warm = append(warm, candidate{p, i, t.Checkpoint})
			}
		}
	}
	sh := newShares(N, P*S)
	sb := make([][]int, P)
	eligible := func(p, i int) bool { return active[p] != i && !slices.Contains(sb[p], i) }

	sortCandidates(warm)
	for _, c := range warm {
		if len(sb[c.p]) < S && sh.canTake(c.i) {
			sb[c.p] = append(sb[c.p], c.i)
			sh.take(c.i)
		}
	}

	// augment looks for an alternating path from partition p to a member
	// with room (p takes x from q, q takes y from r, ..., the last takes
	// a member with room) and applies it. Breadth-first, each member and
	// partition visited once: if it fails, no such path exists.
	type step struct{ part, via, from int }
	augment := func(p int) bool {
		queue := []step{{p, -1, -1}}
		seenPart := make([]bool, P)
		seenMember := make([]bool, N)
		seenPart[p] = true
		for h := 0; h < len(queue); h++ {
			q := queue[h].part
			for x := range N {
				if seenMember[x] || !eligible(q, x) {
					continue
				}
				seenMember[x] = true
				if sh.canTake(x) {
					sb[q] = append(sb[q], x)
					sh.take(x)
					for e := queue[h]; e.via >= 0; e = queue[e.from] {
						sb[e.part] = slices.DeleteFunc(sb[e.part], func(i int) bool { return i == e.via })
						prev := queue[e.from].part
						sb[prev] = append(sb[prev], e.via)
					}
					return true
				}
				for r := range P {
					if !seenPart[r] && slices.Contains(sb[r], x) {
						seenPart[r] = true
						queue = append(queue, step{r, x, h})
					}
				}
			}
		}
		return false
	}

	for p := range P {
		for len(sb[p]) < S {
			best := -1
			for i := range N {
				if eligible(p, i) && sh.canTake(i) && (best < 0 || sh.load[i] < sh.load[best]) {
					best = i
				}
			}
			if best < 0 && augment(p) {
				continue
			}
			if best < 0 { // shares cannot be met: exceed one
				for i := range N {
					if eligible(p, i) && (best < 0 || sh.load[i] < sh.load[best]) {
						best = i
					}
				}
			}
			sb[p] = append(sb[p], best)
			sh.take(best)
		}
	}
	return sb
}

// ---- Wire encodings ----

// ErrBadEncoding is wrapped by every error of DecodeMetadata and
// DecodeAssignment: the bytes are not a valid encoding (truncated, an
// unsupported version, inconsistent, or trailing garbage).
var ErrBadEncoding = errors.New("bad encoding")

const (
	// metadataVersion is the version of the member metadata's UserData.
	metadataVersion = 1
	// mapVersion is the version of the cluster map in the assignment's
	// UserData.
	mapVersion = 1
)

// EncodeMetadata returns the JoinGroup protocol metadata of a member that
// subscribes to topics: a kmsg.ConsumerMemberMetadata (version 3) so that
// standard tools (kafka-consumer-groups --describe, kadm) can read the topics,
// the owned partitions (the partitions of md.Tasks with RoleActive, listed for
// every topic since they are co-partitioned) and the generation; md itself
// travels in UserData:
//
//	byte     version (1)
//	uvarint  len(URL), URL bytes
//	uvarint  number of tasks, then per task, by ascending partition:
//	         uvarint partition, byte role, uvarint checkpoint
//
// Varints are minimal. Topics are sorted and deduplicated; tasks with a
// negative partition number are dropped and negative checkpoints encoded as 0.
// A role other than the three defined is encoded as RoleNone.
//
// Versioning: a decoder accepts only the version it knows. A future format
// must ship in two steps (first nodes that read both, then nodes that write
// the new one), or a leader that cannot read a member fails the rebalance.
func EncodeMetadata(topics []string, md Metadata) []byte {
	ps := make([]int32, 0, len(md.Tasks))
	for p := range md.Tasks {
		if p >= 0 {
			ps = append(ps, p)
		}
	}
	slices.Sort(ps)

	ud := []byte{metadataVersion}
	ud = appendString(ud, md.URL)
	ud = binary.AppendUvarint(ud, uint64(len(ps)))
	var owned []int32
	for _, p := range ps {
		t := md.Tasks[p]
		if t.Role > RoleStandby {
			t.Role = RoleNone
		}
		if t.Role == RoleActive {
			owned = append(owned, p)
		}
		ud = binary.AppendUvarint(ud, uint64(p))
		ud = append(ud, byte(t.Role))
		ud = binary.AppendUvarint(ud, uint64(max(t.Checkpoint, 0)))
	}

	meta := kmsg.NewConsumerMemberMetadata()
	meta.Version = 3
	meta.Topics = normTopics(topics)
	meta.UserData = ud
	meta.Generation = md.Generation
	if len(owned) > 0 {
		for _, t := range meta.Topics {
			op := kmsg.NewConsumerMemberMetadataOwnedPartition()
			op.Topic = t
			op.Partitions = owned
			meta.OwnedPartitions = append(meta.OwnedPartitions, op)
		}
	}
	return meta.AppendTo(nil)
}

// DecodeMetadata parses what EncodeMetadata returns: the member's topics
// (sorted, deduplicated) and its metadata. It never panics; any input that is
// not a ConsumerMemberMetadata whose UserData is a valid version-1 encoding
// (truncated, another version, a non-minimal varint, partitions out of order
// or above 2^31-1, an unknown role, a checkpoint above 2^63-1, trailing
// bytes) returns an error wrapping ErrBadEncoding. The standard
// OwnedPartitions field is ignored (the roles in UserData are authoritative);
// a Rack set by the client is ignored too.
func DecodeMetadata(b []byte) (topics []string, md Metadata, err error) {
	var meta kmsg.ConsumerMemberMetadata
	if err := meta.ReadFrom(b); err != nil {
		return nil, Metadata{}, fmt.Errorf("%w: member metadata: %v", ErrBadEncoding, err)
	}
	r := reader{b: meta.UserData, what: "member metadata"}
	if meta.UserData == nil {
		r.fail("no user data (not an esker member)")
	}
	r.version(metadataVersion)
	md.URL = r.string("url")
	n := r.count(3, "task count")
	md.Generation = meta.Generation
	md.Tasks = make(map[int32]LocalTask, n)
	prev := int64(-1)
	for range n {
		p := r.uvarint("partition")
		if r.err == nil && (p > math.MaxInt32 || int64(p) <= prev) {
			r.fail(fmt.Sprintf("partition %d out of order or range", p))
		}
		role := Role(r.byte("role"))
		if r.err == nil && role > RoleStandby {
			r.fail(fmt.Sprintf("unknown role %d", role))
		}
		c := r.uvarint("checkpoint")
		if r.err == nil && c > math.MaxInt64 {
			r.fail("checkpoint out of range")
		}
		if r.err != nil {
			break
		}
		prev = int64(p)
		md.Tasks[int32(p)] = LocalTask{Role: role, Checkpoint: int64(c)}
	}
	r.end()
	if r.err != nil {
		return nil, Metadata{}, r.err
	}
	return normTopics(meta.Topics), md, nil
}

// EncodeAssignment returns the SyncGroup assignment of member: a
// kmsg.ConsumerMemberAssignment (version 0) whose Topics list, for every
// topic, the partitions member is Active for in m (nothing when it has none,
// so franz-go consumes exactly those), with m in UserData:
//
//	byte     version (1)
//	varint   generation (zig-zag)
//	uvarint  number of members, then per member, by ascending id:
//	         uvarint len(id), id, uvarint len(URL), URL
//	uvarint  number of partitions, then per partition p = 0, 1, ...:
//	         uvarint active (member index + 1, 0 for none)
//	         uvarint pending (member index + 1, 0 for none)
//	         uvarint number of standbys, uvarint member index each (ascending)
//
// Varints are minimal. The encoding is canonical, so it normalizes m: member
// ids referenced by a Placement but missing from m.Members are listed with an
// empty URL; an empty member id in Members is dropped; Pending is dropped when
// Active is set; standbys are sorted, deduplicated, and stripped of the
// Active and Pending member.
func EncodeAssignment(topics []string, member string, m Map) []byte {
	return assignmentFor(normTopics(topics), member, m, encodeMap(m))
}

func assignmentFor(topics []string, member string, m Map, userData []byte) []byte {
	var a kmsg.ConsumerMemberAssignment
	if ps := m.ActivePartitions(member); len(ps) > 0 {
		for _, t := range topics {
			at := kmsg.NewConsumerMemberAssignmentTopic()
			at.Topic = t
			at.Partitions = ps
			a.Topics = append(a.Topics, at)
		}
	}
	a.UserData = userData
	return a.AppendTo(nil)
}

func encodeMap(m Map) []byte {
	idx := make(map[string]int, len(m.Members))
	for id := range m.Members {
		if id != "" {
			idx[id] = 0
		}
	}
	for _, pl := range m.Partitions {
		for _, id := range append([]string{pl.Active, pl.Pending}, pl.Standbys...) {
			if id != "" {
				idx[id] = 0
			}
		}
	}
	ids := make([]string, 0, len(idx))
	for id := range idx {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for i, id := range ids {
		idx[id] = i + 1
	}

	b := []byte{mapVersion}
	b = binary.AppendVarint(b, int64(m.Generation))
	b = binary.AppendUvarint(b, uint64(len(ids)))
	for _, id := range ids {
		b = appendString(b, id)
		b = appendString(b, m.Members[id])
	}
	b = binary.AppendUvarint(b, uint64(len(m.Partitions)))
	var sb []int
	for _, pl := range m.Partitions {
		a, pend := idx[pl.Active], idx[pl.Pending]
		if a != 0 {
			pend = 0
		}
		b = binary.AppendUvarint(b, uint64(a))
		b = binary.AppendUvarint(b, uint64(pend))
		sb = sb[:0]
		for _, id := range pl.Standbys {
			if i := idx[id]; i != 0 && i != a && i != pend {
				sb = append(sb, i-1)
			}
		}
		slices.Sort(sb)
		sb = slices.Compact(sb)
		b = binary.AppendUvarint(b, uint64(len(sb)))
		for _, i := range sb {
			b = binary.AppendUvarint(b, uint64(i))
		}
	}
	return b
}

// DecodeAssignment parses what EncodeAssignment returns: the topic →
// partitions assignment (partitions sorted; only topics with partitions) and
// the cluster map. It never panics; on any malformed input it returns an
// error wrapping ErrBadEncoding. Besides the encoding itself (truncated,
// another version, non-minimal varints, trailing bytes, member ids empty or
// out of order, indices out of range, standbys unsorted or equal to the
// active or pending member, both active and pending set) it checks that the
// standard part is consistent with the map: no topic listed twice, no
// partition listed twice or outside the map, every topic lists the same
// partitions, and they are all the partitions one and the same member is
// Active for.
func DecodeAssignment(b []byte) (assigned map[string][]int32, m Map, err error) {
	var a kmsg.ConsumerMemberAssignment
	if err := a.ReadFrom(b); err != nil {
		return nil, Map{}, fmt.Errorf("%w: assignment: %v", ErrBadEncoding, err)
	}
	if a.UserData == nil {
		return nil, Map{}, fmt.Errorf("%w: assignment: no cluster map in user data (not an esker assignment)", ErrBadEncoding)
	}
	if m, err = decodeMap(a.UserData); err != nil {
		return nil, Map{}, err
	}
	bad := func(format string, args ...any) (map[string][]int32, Map, error) {
		return nil, Map{}, fmt.Errorf("%w: assignment: "+format, append([]any{ErrBadEncoding}, args...)...)
	}
	assigned = make(map[string][]int32, len(a.Topics))
	var first []int32
	owner := ""
	for k, t := range a.Topics {
		if _, dup := assigned[t.Topic]; dup {
			return bad("topic %q listed twice", t.Topic)
		}
		ps := slices.Clone(t.Partitions)
		slices.Sort(ps)
		for j, p := range ps {
			if p < 0 || int(p) >= len(m.Partitions) {
				return bad("topic %q: partition %d outside the map's %d partitions", t.Topic, p, len(m.Partitions))
			}
			if j > 0 && ps[j-1] == p {
				return bad("topic %q: partition %d listed twice", t.Topic, p)
			}
			act := m.Partitions[p].Active
			if act == "" || owner != "" && act != owner {
				return bad("topic %q: partition %d is not active for the assigned member in the map", t.Topic, p)
			}
			owner = act
		}
		if k == 0 {
			first = ps
		} else if !slices.Equal(first, ps) {
			return bad("topics %q and %q are assigned different partitions (they are co-partitioned)", a.Topics[0].Topic, t.Topic)
		}
		if len(ps) > 0 {
			assigned[t.Topic] = ps
		}
	}
	// The member consumes what the standard part lists, while every node
	// routes by the map: listing only some of the member's Active
	// partitions would leave the others routed to it and consumed by
	// nobody. EncodeAssignment lists them all.
	if owner != "" {
		if want := m.ActivePartitions(owner); !slices.Equal(first, want) {
			return bad("partitions %v assigned, but the map makes member %q active for %v", first, owner, want)
		}
	}
	return assigned, m, nil
}

func decodeMap(b []byte) (Map, error) {
	r := reader{b: b, what: "cluster map"}
	r.version(mapVersion)
	g := r.varint("generation")
	if r.err == nil && (g < math.MinInt32 || g > math.MaxInt32) {
		r.fail("generation out of range")
	}
	nm := r.count(3, "member count")
	ids := make([]string, 0, nm)
	m := Map{Generation: int32(g), Members: make(map[string]string, nm)}
	for range nm {
		id := r.string("member id")
		url := r.string("member url")
		if r.err == nil && (id == "" || len(ids) > 0 && id <= ids[len(ids)-1]) {
			r.fail(fmt.Sprintf("member id %q empty, duplicate or out of order", id))
		}
		if r.err != nil {
			break
		}
		ids = append(ids, id)
		m.Members[id] = url
	}
	np := r.count(3, "partition count")
	if r.err == nil && np > math.MaxInt32 {
		r.fail("partition count out of range")
	}
	if r.err == nil && np > 0 {
		m.Partitions = make([]Placement, np)
	}
	ref := func(what string) int { // member index + 1, or 0
		v := r.uvarint(what)
		if r.err == nil && v > uint64(len(ids)) {
			r.fail(fmt.Sprintf("%s refers to member %d of %d", what, v, len(ids)))
		}
		if r.err != nil {
			return 0
		}
		return int(v)
	}
	for p := 0; p < np && r.err == nil; p++ {
		pl := &m.Partitions[p]
		a, pend := ref("active"), ref("pending")
		if r.err == nil && a != 0 && pend != 0 {
			r.fail(fmt.Sprintf("partition %d has both an active and a pending member", p))
		}
		if a != 0 {
			pl.Active = ids[a-1]
		}
		if pend != 0 {
			pl.Pending = ids[pend-1]
		}
		ns := r.count(1, "standby count")
		if r.err == nil && ns > len(ids) {
			r.fail(fmt.Sprintf("partition %d has %d standbys, more than the %d members", p, ns, len(ids)))
		}
		prev := -1
		for range ns {
			if r.err != nil {
				break
			}
			v := r.uvarint("standby")
			if r.err == nil && (v >= uint64(len(ids)) || int(v) <= prev || int(v)+1 == a || int(v)+1 == pend) {
				r.fail(fmt.Sprintf("partition %d: standby %d out of range, out of order, or the active or pending member", p, v))
			}
			i := int(v)
			if r.err != nil {
				break
			}
			prev = i
			pl.Standbys = append(pl.Standbys, ids[i])
		}
	}
	r.end()
	if r.err != nil {
		return Map{}, r.err
	}
	return m, nil
}

func normTopics(topics []string) []string {
	ts := slices.Clone(topics)
	slices.Sort(ts)
	return slices.Compact(ts)
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// reader decodes the compact formats. The first failure sticks: later reads
// return zero values, and err says what and where.
type reader struct {
	b    []byte
	off  int
	what string
	err  error
}

func (r *reader) fail(msg string) {
	if r.err == nil {
		r.err = fmt.Errorf("%w: %s: %s at byte %d", ErrBadEncoding, r.what, msg, r.off)
	}
}

func (r *reader) version(want byte) {
	v := r.byte("version")
	if r.err == nil && v != want {
		r.fail(fmt.Sprintf("unsupported version %d (this node reads version %d)", v, want))
	}
}

func (r *reader) byte(what string) byte {
	if r.err != nil {
		return 0
	}
	if r.off >= len(r.b) {
		r.fail("truncated " + what)
		return 0
	}
	r.off++
	return r.b[r.off-1]
}

func (r *reader) uvarint(what string) uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b[r.off:])
	if n <= 0 {
		r.fail("truncated or overflowing " + what)
		return 0
	}
	if n != len(binary.AppendUvarint(nil, v)) {
		r.fail("non-minimal varint for " + what)
		return 0
	}
	r.off += n
	return v
}

func (r *reader) varint(what string) int64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Varint(r.b[r.off:])
	if n <= 0 {
		r.fail("truncated or overflowing " + what)
		return 0
	}
	if n != len(binary.AppendVarint(nil, v)) {
		r.fail("non-minimal varint for " + what)
		return 0
	}
	r.off += n
	return v
}

// count reads an element count; each element takes at least minBytes, so a
// count the remaining bytes cannot hold is rejected before anything is
// allocated for it.
func (r *reader) count(minBytes int, what string) int {
	v := r.uvarint(what)
	if r.err == nil && v > uint64(len(r.b)-r.off)/uint64(minBytes) {
		r.fail(fmt.Sprintf("%s %d exceeds the remaining %d bytes", what, v, len(r.b)-r.off))
	}
	if r.err != nil {
		return 0
	}
	return int(v)
}

func (r *reader) string(what string) string {
	n := r.uvarint(what + " length")
	if r.err == nil && n > uint64(len(r.b)-r.off) {
		r.fail("truncated " + what)
	}
	if r.err != nil {
		return ""
	}
	s := string(r.b[r.off : r.off+int(n)])
	r.off += int(n)
	return s
}

func (r *reader) end() {
	if r.err == nil && r.off != len(r.b) {
		r.fail(fmt.Sprintf("%d trailing bytes", len(r.b)-r.off))
	}
}
