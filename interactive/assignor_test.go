package interactive

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"

	"github.com/twmb/franz-go/pkg/kmsg"
)

// ---- helpers ----

func mem(id string, gen int32, tasks map[int32]LocalTask) Member {
	return Member{ID: id, Metadata: Metadata{URL: "http://" + id + ":8080", Generation: gen, Tasks: tasks}}
}

// act returns tasks active on ps with checkpoint 1000.
func act(ps ...int32) map[int32]LocalTask {
	t := make(map[int32]LocalTask)
	for _, p := range ps {
		t[p] = LocalTask{Role: RoleActive, Checkpoint: 1000}
	}
	return t
}

func with(t map[int32]LocalTask, p int32, role Role, ckpt int64) map[int32]LocalTask {
	if t == nil {
		t = make(map[int32]LocalTask)
	}
	t[p] = LocalTask{Role: role, Checkpoint: ckpt}
	return t
}

func activesOf(m Map) []string {
	a := make([]string, len(m.Partitions))
	for p, pl := range m.Partitions {
		a[p] = pl.Active
	}
	return a
}

func cloneMembers(ms []Member) []Member {
	out := make([]Member, len(ms))
	for i, m := range ms {
		out[i] = m
		if m.Tasks != nil {
			out[i].Tasks = make(map[int32]LocalTask, len(m.Tasks))
			for p, t := range m.Tasks {
				out[i].Tasks[p] = t
			}
		}
	}
	return out
}

// checkPlan asserts the invariants every target map satisfies.
func checkPlan(t *testing.T, m Map, members []Member, P int32, standbys int) {
	t.Helper()
	ms := sortedMembers(members)
	N := len(ms)
	if int32(len(m.Partitions)) != max(P, 0) {
		t.Fatalf("%d partitions, want %d", len(m.Partitions), P)
	}
	if len(m.Members) != N {
		t.Fatalf("%d members in map, want %d", len(m.Members), N)
	}
	for _, mb := range ms {
		if u, ok := m.Members[mb.ID]; !ok || u != mb.URL {
			t.Fatalf("member %s: url %q, want %q", mb.ID, u, mb.URL)
		}
	}
	if N == 0 || P <= 0 {
		return
	}
	S := max(min(standbys, N-1), 0)
	load := map[string]int{}
	sload := map[string]int{}
	for p, pl := range m.Partitions {
		if _, ok := m.Members[pl.Active]; !ok {
			t.Fatalf("partition %d: active %q is not a member", p, pl.Active)
		}
		if pl.Pending != "" {
			t.Fatalf("partition %d: pending %q in a target plan", p, pl.Pending)
		}
		load[pl.Active]++
		if len(pl.Standbys) != S {
			t.Fatalf("partition %d: %d standbys %v, want %d", p, len(pl.Standbys), pl.Standbys, S)
		}
		if !slices.IsSorted(pl.Standbys) || len(slices.Compact(slices.Clone(pl.Standbys))) != S {
			t.Fatalf("partition %d: standbys %v not sorted and distinct", p, pl.Standbys)
		}
		for _, s := range pl.Standbys {
			if s == pl.Active {
				t.Fatalf("partition %d: standby on its active %s", p, s)
			}
			if _, ok := m.Members[s]; !ok {
				t.Fatalf("partition %d: standby %q is not a member", p, s)
			}
			sload[s]++
		}
	}
	lo, hi := int(P)/N, (int(P)+N-1)/N
	slo, shi := int(P)*S/N, (int(P)*S+N-1)/N
	for _, mb := range ms {
		if l := load[mb.ID]; l < lo || l > hi {
			t.Fatalf("member %s has %d actives, want %d..%d: %v", mb.ID, l, lo, hi, activesOf(m))
		}
		if l := sload[mb.ID]; l < slo || l > shi {
			t.Fatalf("member %s has %d standbys, want %d..%d", mb.ID, l, slo, shi)
		}
	}
}

// randomMembers builds n members with random ids, generations, claims (some
// of them conflicting), standbys and leftover state.
func randomMembers(r *rand.Rand, n int, P int32) []Member {
	ms := make([]Member, n)
	for i := range ms {
		ms[i] = mem(fmt.Sprintf("m%x-%d", r.Uint32(), i), int32(r.IntN(5)-1), map[int32]LocalTask{})
	}
	for p := range P + 2 { // a few out-of-range partitions too
		if r.IntN(4) > 0 {
			o := r.IntN(n)
			ms[o].Tasks[p] = LocalTask{Role: RoleActive, Checkpoint: r.Int64N(10000)}
			if r.IntN(8) == 0 { // a stale competing claim
				o2 := r.IntN(n)
				ms[o2].Tasks[p] = LocalTask{Role: RoleActive, Checkpoint: r.Int64N(10000)}
			}
		}
		for range r.IntN(3) {
			h := r.IntN(n)
			if _, ok := ms[h].Tasks[p]; !ok {
				ms[h].Tasks[p] = LocalTask{Role: Role(r.IntN(3)), Checkpoint: r.Int64N(10000)}
			}
		}
	}
	return ms
}

// feedBack returns the members as they would rejoin after receiving m in
// generation gen: actives claim what they got, standbys report their role,
// and everyone keeps its other state as RoleNone.
func feedBack(members []Member, m Map, gen int32) []Member {
	out := cloneMembers(members)
	for i := range out {
		id := out[i].ID
		out[i].Generation = gen
		if out[i].Tasks == nil {
			out[i].Tasks = make(map[int32]LocalTask)
		}
		for p, t := range out[i].Tasks {
			t.Role = RoleNone
			out[i].Tasks[p] = t
		}
		for p, pl := range m.Partitions {
			t := out[i].Tasks[int32(p)]
			switch {
			case pl.Active == id:
				t.Role, t.Checkpoint = RoleActive, max(t.Checkpoint, 5000)
			case slices.Contains(pl.Standbys, id):
				t.Role, t.Checkpoint = RoleStandby, max(t.Checkpoint, 4000)
			default:
				continue
			}
			out[i].Tasks[int32(p)] = t
		}
	}
	return out
}

// ---- planner ----

func TestPlanBalanceBounds(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for N := 1; N <= 5; N++ {
		for P := int32(1); P <= 16; P++ {
			for S := 0; S <= 4; S++ {
				for trial := range 6 {
					var members []Member
					if trial == 0 { // cold start
						for i := range N {
							members = append(members, mem(fmt.Sprintf("m%d", i), -1, nil))
						}
					} else {
						members = randomMembers(r, N, P)
					}
					name := fmt.Sprintf("N=%d/P=%d/S=%d/%d", N, P, S, trial)
					before := cloneMembers(members)
					m := Plan(members, P, S)
					if !reflect.DeepEqual(before, members) {
						t.Fatalf("%s: Plan modified its input", name)
					}
					t.Run(name, func(t *testing.T) { checkPlan(t, m, members, P, S) })
				}
			}
		}
	}
}

func TestPlanDeterministic(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for range 300 {
		N := 1 + r.IntN(6)
		P := int32(1 + r.IntN(24))
		S := r.IntN(4)
		members := randomMembers(r, N, P)
		want := Plan(members, P, S)
		for range 4 {
			shuffled := cloneMembers(members)
			r.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
			if got := Plan(shuffled, P, S); !reflect.DeepEqual(got, want) {
				t.Fatalf("N=%d P=%d S=%d: member order changed the plan:\n got %+v\nwant %+v", N, P, S, got, want)
			}
		}
	}
}

func TestPlanSticky(t *testing.T) {
	tests := []struct {
		name    string
		members []Member
		P       int32
		want    []string // active per partition
	}{
		{
			name: "stable group keeps everything",
			members: []Member{
				mem("a", 3, act(0, 3)), mem("b", 3, act(1, 4)), mem("c", 3, act(2, 5)),
			},
			P:    6,
			want: []string{"a", "b", "c", "a", "b", "c"},
		},
		{
			name: "uneven but within bounds is kept",
			members: []Member{
				mem("a", 3, act(0, 1, 2)), mem("b", 3, act(3, 4)),
			},
			P:    5,
			want: []string{"a", "a", "a", "b", "b"},
		},
		{
			name: "restarted node (new member id, state intact) gets its partitions back",
			members: []Member{
				mem("a", 3, act(0, 1)), mem("b", 3, act(2, 3)),
				mem("c2", -1, with(with(nil, 4, RoleNone, 900), 5, RoleNone, 900)),
			},
			P:    6,
			want: []string{"a", "a", "b", "b", "c2", "c2"},
		},
		{
			name: "over-share claimant keeps its lowest partitions",
			members: []Member{
				mem("a", 3, act(0, 1, 2, 3)), mem("b", -1, nil),
			},
			P:    4,
			want: []string{"a", "a", "b", "b"},
		},
		{
			name: "extra slots go to claimants by member id",
			members: []Member{
				mem("a", 3, act(0, 1)), mem("b", 3, act(2, 3)), mem("c", -1, nil),
			},
			P:    5, // shares 2,2,1; partition 4 was nobody's
			want: []string{"a", "a", "b", "b", "c"},
		},
		{
			name: "the claim of the higher generation wins",
			members: []Member{
				mem("a", 3, act(0)), mem("b", 5, act(0)),
			},
			P:    2,
			want: []string{"b", "a"},
		},
		{
			name: "same generation: the higher checkpoint wins",
			members: []Member{
				mem("a", 5, with(nil, 0, RoleActive, 10)), mem("b", 5, with(nil, 0, RoleActive, 20)),
			},
			P:    2,
			want: []string{"b", "a"},
		},
		{
			name: "a sticky owner beats a more caught-up standby",
			members: []Member{
				mem("a", 5, with(nil, 0, RoleActive, 10)), mem("b", 5, with(nil, 0, RoleStandby, 99)),
			},
			P:    2,
			want: []string{"a", "b"},
		},
		{
			name: "claims beyond the partition count are ignored",
			members: []Member{
				mem("a", 5, act(0, 7, 9)), mem("b", 5, act(1, 8)),
			},
			P:    2,
			want: []string{"a", "b"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := Plan(tt.members, tt.P, 0)
			checkPlan(t, m, tt.members, tt.P, 0)
			if got := activesOf(m); !slices.Equal(got, tt.want) {
				t.Fatalf("actives %v, want %v", got, tt.want)
			}
		})
	}
}

func TestPlanMovesTheMinimum(t *testing.T) {
	for N := 1; N <= 5; N++ {
		for P := int32(1); P <= 16; P++ {
			var members []Member
			for i := range N {
				members = append(members, mem(fmt.Sprintf("m%d", i), -1, nil))
			}
			first := Plan(members, P, 1)
			members = feedBack(members, first, 1)

			t.Run(fmt.Sprintf("add/N=%d/P=%d", N, P), func(t *testing.T) {
				grown := append(cloneMembers(members), mem("new", -1, nil))
				m := Plan(grown, P, 1)
				checkPlan(t, m, grown, P, 1)
				moved := 0
				for p, pl := range m.Partitions {
					if pl.Active != first.Partitions[p].Active {
						moved++
						if pl.Active != "new" {
							t.Fatalf("partition %d moved between old members: %s -> %s", p, first.Partitions[p].Active, pl.Active)
						}
					}
				}
				if want := int(P) / (N + 1); moved != want {
					t.Fatalf("moved %d partitions, want %d", moved, want)
				}
			})
			if N == 1 {
				continue
			}
			t.Run(fmt.Sprintf("remove/N=%d/P=%d", N, P), func(t *testing.T) {
				gone := members[N/2].ID
				shrunk := slices.Delete(cloneMembers(members), N/2, N/2+1)
				m := Plan(shrunk, P, 1)
				checkPlan(t, m, shrunk, P, 1)
				for p, pl := range m.Partitions {
					if was := first.Partitions[p].Active; was != gone && pl.Active != was {
						t.Fatalf("partition %d moved from %s (still a member) to %s", p, was, pl.Active)
					}
				}
			})
		}
	}
}

func TestPlanPrefersCaughtUpState(t *testing.T) {
	tests := []struct {
		name     string
		members  []Member
		P        int32
		standbys int
		active   map[int32]string
		standby  map[int32][]string
	}{
		{
			// a (the owner of 0) left; d is 0's standby, e holds old
			// state, c is cold: d takes over.
			name: "a caught-up standby beats a cold node when the active leaves",
			members: []Member{
				mem("b", 4, act(1)),
				mem("c", 4, nil),
				mem("d", 4, with(nil, 0, RoleStandby, 900)),
				mem("e", 4, with(nil, 0, RoleNone, 100)),
			},
			P: 2, standbys: 1,
			active:  map[int32]string{0: "d", 1: "b"},
			standby: map[int32][]string{0: {"e"}, 1: {"c"}},
		},
		{
			name: "the most caught-up of several standbys wins",
			members: []Member{
				mem("x", 4, with(nil, 0, RoleStandby, 500)),
				mem("y", 4, with(nil, 0, RoleStandby, 800)),
				mem("z", 4, nil),
			},
			P:      1,
			active: map[int32]string{0: "y"},
		},
		{
			name: "a caught-up standby with a full share loses to a member with room",
			members: []Member{
				mem("a", 4, with(act(1), 0, RoleStandby, 900)),
				mem("b", 4, nil),
			},
			P:      2,
			active: map[int32]string{0: "b", 1: "a"},
		},
		{
			// a owned 0 and 1 and left; b is 0's standby, c is 1's
			// (and both hold older state of the other).
			name: "each departed partition goes to its own standby",
			members: []Member{
				mem("b", 4, with(with(act(2), 0, RoleStandby, 700), 1, RoleNone, 10)),
				mem("c", 4, with(with(act(3), 1, RoleStandby, 600), 0, RoleNone, 10)),
			},
			P: 4, standbys: 1,
			active:  map[int32]string{0: "b", 1: "c", 2: "b", 3: "c"},
			standby: map[int32][]string{0: {"c"}, 1: {"b"}, 2: {"c"}, 3: {"b"}},
		},
		{
			name: "standbys stay where the state is",
			members: []Member{
				mem("a", 4, with(with(act(0, 1), 2, RoleStandby, 50), 3, RoleStandby, 50)),
				mem("b", 4, with(with(act(2, 3), 4, RoleStandby, 50), 5, RoleStandby, 50)),
				mem("c", 4, with(with(act(4, 5), 0, RoleStandby, 50), 1, RoleStandby, 50)),
			},
			P: 6, standbys: 1,
			active:  map[int32]string{0: "a", 1: "a", 2: "b", 3: "b", 4: "c", 5: "c"},
			standby: map[int32][]string{0: {"c"}, 1: {"c"}, 2: {"a"}, 3: {"a"}, 4: {"b"}, 5: {"b"}},
		},
		{
			name: "a newcomer gets the standbys of nobody's state, not a warm member's",
			members: []Member{
				mem("a", 4, with(act(0, 1), 2, RoleStandby, 50)),
				mem("b", 4, with(act(2, 3), 0, RoleStandby, 50)),
				mem("c", -1, nil),
			},
			P: 4, standbys: 1, // 4 standbys over 3 members: 2,1,1
			standby: map[int32][]string{0: {"b"}, 2: {"a"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := Plan(tt.members, tt.P, tt.standbys)
			checkPlan(t, m, tt.members, tt.P, tt.standbys)
			for p, want := range tt.active {
				if got := m.Partitions[p].Active; got != want {
					t.Errorf("partition %d: active %s, want %s (all: %v)", p, got, want, activesOf(m))
				}
			}
			for p, want := range tt.standby {
				if got := m.Partitions[p].Standbys; !slices.Equal(got, want) {
					t.Errorf("partition %d: standbys %v, want %v", p, got, want)
				}
			}
		})
	}
}

func TestPlanStandbyCount(t *testing.T) {
	for _, tt := range []struct {
		N, standbys, want int
	}{
		{1, 1, 0}, {1, 5, 0}, {2, 1, 1}, {2, 3, 1}, {3, 2, 2}, {3, 5, 2}, {4, 1, 1}, {4, 0, 0}, {4, -1, 0}, {5, 9, 4},
	} {
		var members []Member
		for i := range tt.N {
			members = append(members, mem(fmt.Sprint(i), -1, nil))
		}
		m := Plan(members, 7, tt.standbys)
		checkPlan(t, m, members, 7, tt.standbys)
		for p, pl := range m.Partitions {
			if len(pl.Standbys) != tt.want {
				t.Fatalf("N=%d standbys=%d: partition %d has %d standbys, want %d", tt.N, tt.standbys, p, len(pl.Standbys), tt.want)
			}
		}
	}
}

func TestPlanDegenerate(t *testing.T) {
	m := Plan(nil, 3, 1)
	if len(m.Partitions) != 3 || m.Partitions[0].Active != "" || len(m.Members) != 0 {
		t.Fatalf("no members: %+v", m)
	}
	if _, ok := m.ActiveURL(0); ok {
		t.Fatal("ActiveURL ok without members")
	}
	m = Plan([]Member{mem("a", 1, act(0))}, 0, 1)
	if len(m.Partitions) != 0 || m.Members["a"] == "" {
		t.Fatalf("no partitions: %+v", m)
	}
	m = Plan([]Member{mem("a", 1, act(0))}, -4, 1)
	if len(m.Partitions) != 0 {
		t.Fatalf("negative partitions: %+v", m)
	}
	// duplicate member ids: the first is used
	a1, a2 := mem("a", 1, act(0)), mem("a", 1, act(1))
	a2.URL = "http://other"
	m = Plan([]Member{a1, a2, mem("b", 1, nil)}, 2, 0)
	if m.Members["a"] != a1.URL || m.Partitions[0].Active != "a" {
		t.Fatalf("duplicate ids: %+v", m)
	}
}

func TestMapHelpers(t *testing.T) {
	m := Map{
		Generation: 3,
		Members:    map[string]string{"a": "http://a", "b": "http://b", "c": ""},
		Partitions: []Placement{
			{Active: "a", Standbys: []string{"b", "c"}},
			{Pending: "b", Standbys: []string{"a"}},
			{Active: "c"},
		},
	}
	if u, ok := m.ActiveURL(0); !ok || u != "http://a" {
		t.Fatalf("ActiveURL(0) = %q %v", u, ok)
	}
	if _, ok := m.ActiveURL(1); ok {
		t.Fatal("ActiveURL of a moving partition is ok")
	}
	if u, ok := m.ActiveURL(2); !ok || u != "" {
		t.Fatalf("ActiveURL(2) = %q %v", u, ok)
	}
	for _, p := range []int32{-1, 3} {
		if _, ok := m.ActiveURL(p); ok || m.StandbyURLs(p) != nil {
			t.Fatalf("partition %d out of range answered", p)
		}
	}
	if got := m.StandbyURLs(0); !slices.Equal(got, []string{"http://b", ""}) {
		t.Fatalf("StandbyURLs(0) = %q", got)
	}
	if got := m.ActivePartitions("a"); !slices.Equal(got, []int32{0}) {
		t.Fatalf("ActivePartitions(a) = %v", got)
	}
	if got := m.ActivePartitions("b"); got != nil {
		t.Fatalf("ActivePartitions(b) = %v (pending is not active)", got)
	}
	if got := m.ActivePartitions(""); got != nil {
		t.Fatalf("ActivePartitions(\"\") = %v", got)
	}
	if got := m.StandbyPartitions("a"); !slices.Equal(got, []int32{1}) {
		t.Fatalf("StandbyPartitions(a) = %v", got)
	}
}

// ---- cooperative rounds ----

func TestHoldMovesTwoRounds(t *testing.T) {
	// a owned everything; b (with standby state for 4) joins.
	members := []Member{
		mem("a", 7, act(0, 1, 2, 3, 4, 5)),
		mem("b", -1, with(nil, 4, RoleStandby, 800)),
	}
	m := Plan(members, 6, 1)
	holdMoves(&m, members)
	if got := m.ActivePartitions("a"); !slices.Equal(got, []int32{0, 1, 2}) {
		t.Fatalf("round 1: a keeps %v, want [0 1 2]", got)
	}
	for p := 3; p < 6; p++ {
		if pl := m.Partitions[p]; pl.Active != "" || pl.Pending != "b" {
			t.Fatalf("round 1: partition %d = %+v, want pending for b", p, pl)
		}
		if slices.Contains(m.Partitions[p].Standbys, "b") {
			t.Fatalf("round 1: partition %d has its pending member as standby", p)
		}
	}
	if got := m.ActivePartitions("b"); got != nil {
		t.Fatalf("round 1: b got %v while a still owns them", got)
	}

	// Round 2: a revoked 3..5 and rejoined; b owns nothing yet.
	m2 := Plan(feedBack(members, m, 8), 6, 1)
	holdMoves(&m2, feedBack(members, m, 8))
	if got := m2.ActivePartitions("b"); !slices.Equal(got, []int32{3, 4, 5}) {
		t.Fatalf("round 2: b has %v, want [3 4 5]", got)
	}
	for p, pl := range m2.Partitions {
		if pl.Pending != "" {
			t.Fatalf("round 2: partition %d still pending: %+v", p, pl)
		}
	}
}

func TestHoldMovesRespectsGeneration(t *testing.T) {
	// a missed a rebalance and still claims 0 (generation 3); b owns it
	// at generation 5. The plan gives 0 to b and 1 to a.
	members := []Member{mem("a", 3, act(0)), mem("b", 5, act(0))}
	m := Plan(members, 2, 0)
	holdMoves(&m, members)
	if m.Partitions[0].Active != "b" || m.Partitions[1].Active != "a" {
		t.Fatalf("%+v", m.Partitions)
	}
	// If the plan gave 0 to the stale claimant, it must wait for b.
	m = Map{Partitions: []Placement{{Active: "a"}, {Active: "b"}}}
	holdMoves(&m, members)
	if m.Partitions[0].Active != "" || m.Partitions[0].Pending != "a" {
		t.Fatalf("stale claimant got 0 while b owns it: %+v", m.Partitions[0])
	}
}

// TestCooperativeConvergence: from any state, feeding each round's result
// back converges in two rounds (the second has nothing pending) and then
// stays put; no round gives a partition away from a present owner.
func TestCooperativeConvergence(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	for trial := range 500 {
		N := 1 + r.IntN(5)
		P := int32(1 + r.IntN(16))
		S := r.IntN(3)
		members := randomMembers(r, N, P)
		if r.IntN(2) == 0 { // someone new joins
			members = append(members, mem("zz-new", -1, nil))
		}
		var prev Map
		for round := range 3 {
			m := Plan(members, P, S)
			checkPlan(t, m, members, P, S)
			owners := validOwners(sortedMembers(members), int(P))
			holdMoves(&m, members)
			ms := sortedMembers(members)
			for p, pl := range m.Partitions {
				if o := owners[p]; o >= 0 && pl.Active != "" && pl.Active != ms[o].ID {
					t.Fatalf("trial %d round %d: partition %d given to %s while %s owns it", trial, round, p, pl.Active, ms[o].ID)
				}
				if round >= 1 && pl.Pending != "" {
					t.Fatalf("trial %d round %d: partition %d still pending", trial, round, p)
				}
			}
			if round == 2 && !slices.Equal(activesOf(m), activesOf(prev)) {
				t.Fatalf("trial %d: round 3 moved partitions: %v -> %v", trial, activesOf(prev), activesOf(m))
			}
			prev = m
			members = feedBack(members, m, int32(10+round))
		}
	}
}

// ---- encodings ----

func TestMetadataRoundTrip(t *testing.T) {
	tests := []struct {
		name   string
		topics []string
		md     Metadata
		want   Metadata // after normalization
	}{
		{
			name:   "empty",
			topics: []string{"a-commands"},
			md:     Metadata{Generation: -1},
			want:   Metadata{Generation: -1, Tasks: map[int32]LocalTask{}},
		},
		{
			name:   "typical",
			topics: []string{"shop-commands", "bank-commands", "bank-commands"},
			md: Metadata{URL: "http://10.0.0.7:8080", Generation: 12, Tasks: map[int32]LocalTask{
				0: {RoleActive, 1234}, 3: {RoleStandby, 99}, 7: {RoleNone, 0},
			}},
		},
		{
			name:   "extremes and normalization",
			topics: []string{"t"},
			md: Metadata{URL: "x", Generation: math.MaxInt32, Tasks: map[int32]LocalTask{
				math.MaxInt32: {RoleActive, math.MaxInt64}, -3: {RoleActive, 5}, 1: {RoleStandby, -7}, 2: {Role(9), 4},
			}},
			want: Metadata{URL: "x", Generation: math.MaxInt32, Tasks: map[int32]LocalTask{
				math.MaxInt32: {RoleActive, math.MaxInt64}, 1: {RoleStandby, 0}, 2: {RoleNone, 4},
			}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want := tt.want
			if want.Tasks == nil {
				want = tt.md
			}
			b := EncodeMetadata(tt.topics, tt.md)
			topics, md, err := DecodeMetadata(b)
			if err != nil {
				t.Fatal(err)
			}
			wantTopics := normTopics(tt.topics)
			if !slices.Equal(topics, wantTopics) {
				t.Fatalf("topics %v, want %v", topics, wantTopics)
			}
			if !reflect.DeepEqual(md, want) {
				t.Fatalf("metadata %+v, want %+v", md, want)
			}
			if again := EncodeMetadata(topics, md); !bytes.Equal(again, b) {
				t.Fatal("re-encoding differs")
			}

			// The standard part, as kafka tooling reads it.
			var meta kmsg.ConsumerMemberMetadata
			if err := meta.ReadFrom(b); err != nil {
				t.Fatal(err)
			}
			if meta.Version != 3 || !slices.Equal(meta.Topics, wantTopics) || meta.Generation != tt.md.Generation {
				t.Fatalf("standard part: %+v", meta)
			}
			var owned []int32
			for p, lt := range want.Tasks {
				if lt.Role == RoleActive {
					owned = append(owned, p)
				}
			}
			slices.Sort(owned)
			if len(owned) == 0 && len(meta.OwnedPartitions) != 0 {
				t.Fatalf("owned partitions %+v, want none", meta.OwnedPartitions)
			}
			if len(owned) > 0 {
				if len(meta.OwnedPartitions) != len(wantTopics) {
					t.Fatalf("owned partitions %+v", meta.OwnedPartitions)
				}
				for i, op := range meta.OwnedPartitions {
					if op.Topic != wantTopics[i] || !slices.Equal(op.Partitions, owned) {
						t.Fatalf("owned partitions %+v, want %v on every topic", meta.OwnedPartitions, owned)
					}
				}
			}
		})
	}
}

func TestMetadataDecodeAcceptsClientRack(t *testing.T) {
	// franz-go injects the client's rack into the standard part.
	b := EncodeMetadata([]string{"t"}, Metadata{URL: "u", Tasks: map[int32]LocalTask{1: {RoleActive, 3}}})
	var meta kmsg.ConsumerMemberMetadata
	if err := meta.ReadFrom(b); err != nil {
		t.Fatal(err)
	}
	rack := "eu-1a"
	meta.Rack = &rack
	if _, md, err := DecodeMetadata(meta.AppendTo(nil)); err != nil || md.URL != "u" || md.Tasks[1].Checkpoint != 3 {
		t.Fatalf("%+v %v", md, err)
	}
}

func sampleMap() Map {
	return Map{
		Generation: 42,
		Members:    map[string]string{"m-1": "http://h1:8080", "m-2": "http://h2:8080", "m-3": ""},
		Partitions: []Placement{
			{Active: "m-1", Standbys: []string{"m-2", "m-3"}},
			{Active: "m-2", Standbys: []string{"m-1"}},
			{Pending: "m-3", Standbys: []string{"m-1"}},
			{Active: "m-1"},
		},
	}
}

func TestAssignmentRoundTrip(t *testing.T) {
	topics := []string{"shop-commands", "bank-commands"}
	m := sampleMap()
	for _, tt := range []struct {
		member string
		want   map[string][]int32
	}{
		{"m-1", map[string][]int32{"bank-commands": {0, 3}, "shop-commands": {0, 3}}},
		{"m-2", map[string][]int32{"bank-commands": {1}, "shop-commands": {1}}},
		{"m-3", map[string][]int32{}}, // only pending
		{"stranger", map[string][]int32{}},
	} {
		b := EncodeAssignment(topics, tt.member, m)
		assigned, got, err := DecodeAssignment(b)
		if err != nil {
			t.Fatalf("%s: %v", tt.member, err)
		}
		if !reflect.DeepEqual(assigned, tt.want) {
			t.Fatalf("%s: assigned %v, want %v", tt.member, assigned, tt.want)
		}
		if !reflect.DeepEqual(got, m) {
			t.Fatalf("%s: map %+v, want %+v", tt.member, got, m)
		}
		var a kmsg.ConsumerMemberAssignment
		if err := a.ReadFrom(b); err != nil {
			t.Fatal(err)
		}
		if len(tt.want) > 0 && (len(a.Topics) != 2 || a.Topics[0].Topic != "bank-commands") {
			t.Fatalf("%s: standard topics %+v", tt.member, a.Topics)
		}
		if again := encodeMap(got); !bytes.Equal(again, a.UserData) {
			t.Fatalf("%s: re-encoding differs", tt.member)
		}
	}

	// Edge values and normalization.
	for _, tt := range []struct {
		name    string
		in, out Map
	}{
		{"empty", Map{}, Map{Members: map[string]string{}}},
		{"negative generation", Map{Generation: math.MinInt32, Members: map[string]string{"a": "u"}},
			Map{Generation: math.MinInt32, Members: map[string]string{"a": "u"}}},
		{
			"normalized",
			Map{
				Members: map[string]string{"": "x", "b": "u"},
				Partitions: []Placement{
					{Active: "b", Pending: "b", Standbys: []string{"c", "b", "a", "c"}},
					{Pending: "c", Standbys: []string{"c", "a"}},
					{},
				},
			},
			Map{
				Members: map[string]string{"a": "", "b": "u", "c": ""},
				Partitions: []Placement{
					{Active: "b", Standbys: []string{"a", "c"}},
					{Pending: "c", Standbys: []string{"a"}},
					{},
				},
			},
		},
	} {
		_, got, err := DecodeAssignment(EncodeAssignment(nil, "", tt.in))
		if err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		if !reflect.DeepEqual(got, tt.out) {
			t.Fatalf("%s: %+v, want %+v", tt.name, got, tt.out)
		}
	}
}

// assignmentBytes wraps user data and topics in the standard envelope.
func assignmentBytes(topics []kmsg.ConsumerMemberAssignmentTopic, ud []byte) []byte {
	a := kmsg.ConsumerMemberAssignment{Topics: topics, UserData: ud}
	return a.AppendTo(nil)
}

func metadataBytes(ud []byte) []byte {
	meta := kmsg.NewConsumerMemberMetadata()
	meta.Version = 3
	meta.Topics = []string{"t"}
	meta.UserData = ud
	return meta.AppendTo(nil)
}

func uv(vs ...uint64) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.AppendUvarint(b, v)
	}
	return b
}

func cat(parts ...[]byte) []byte { return slices.Concat(parts...) }

func topic(name string, ps ...int32) kmsg.ConsumerMemberAssignmentTopic {
	return kmsg.ConsumerMemberAssignmentTopic{Topic: name, Partitions: ps}
}

func TestDecodeMetadataRejects(t *testing.T) {
	valid := EncodeMetadata([]string{"t"}, Metadata{URL: "http://a", Generation: 3, Tasks: map[int32]LocalTask{
		0: {RoleActive, 300}, 5: {RoleStandby, 1 << 40},
	}})
	var meta kmsg.ConsumerMemberMetadata
	if err := meta.ReadFrom(valid); err != nil {
		t.Fatal(err)
	}
	ud := meta.UserData
	hdr := cat([]byte{1}, uv(1), []byte("u"))

	cases := map[string][]byte{
		"nil":                        nil,
		"empty":                      {},
		"no user data":               metadataBytes(nil),
		"empty user data":            metadataBytes([]byte{}),
		"version 0":                  metadataBytes(cat([]byte{0}, ud[1:])),
		"version 2":                  metadataBytes(cat([]byte{2}, ud[1:])),
		"version 255":                metadataBytes(cat([]byte{255}, ud[1:])),
		"trailing byte":              metadataBytes(cat(ud, []byte{0})),
		"url longer than data":       metadataBytes(cat([]byte{1}, uv(50), []byte("abc"))),
		"non-minimal varint":         metadataBytes(cat([]byte{1}, []byte{0x80, 0x00}, uv(0))),
		"overflowing varint":         metadataBytes(cat(hdr, bytes.Repeat([]byte{0xff}, 11))),
		"huge task count":            metadataBytes(cat(hdr, uv(1<<40))),
		"partitions out of order":    metadataBytes(cat(hdr, uv(2), uv(5), []byte{1}, uv(1), uv(3), []byte{1}, uv(1))),
		"duplicate partition":        metadataBytes(cat(hdr, uv(2), uv(5), []byte{1}, uv(1), uv(5), []byte{1}, uv(1))),
		"partition above int32":      metadataBytes(cat(hdr, uv(1), uv(1<<31), []byte{1}, uv(1))),
		"unknown role":               metadataBytes(cat(hdr, uv(1), uv(0), []byte{3}, uv(1))),
		"checkpoint above int64":     metadataBytes(cat(hdr, uv(1), uv(0), []byte{1}, uv(1<<63))),
		"task truncated after role":  metadataBytes(cat(hdr, uv(1), uv(0), []byte{1})),
		"standard part garbage":      {0, 3, 0xff, 0xff, 0xff, 0xff},
		"standard part bad version1": {0, 1, 0, 0, 0, 1},
	}
	for i := range valid {
		cases[fmt.Sprintf("truncated to %d of %d", i, len(valid))] = valid[:i]
	}
	for i := range ud {
		cases[fmt.Sprintf("user data truncated to %d of %d", i, len(ud))] = metadataBytes(ud[:i])
	}
	for name, b := range cases {
		if _, _, err := DecodeMetadata(b); err == nil {
			t.Errorf("%s: decoded without error", name)
		} else if !errors.Is(err, ErrBadEncoding) {
			t.Errorf("%s: error %v does not wrap ErrBadEncoding", name, err)
		}
	}
}

func TestDecodeAssignmentRejects(t *testing.T) {
	m := sampleMap()
	valid := EncodeAssignment([]string{"t", "u"}, "m-1", m)
	ud := encodeMap(m)
	// Map header: version, generation 0, members a and b.
	hdr := cat([]byte{1}, uv(0), uv(2), uv(1), []byte("a"), uv(0), uv(1), []byte("b"), uv(0))
	okPart := cat(uv(1), uv(0), uv(0)) // active a, no pending, no standbys
	good := cat(hdr, uv(2), okPart, cat(uv(2), uv(0), uv(1), uv(0)))

	cases := map[string][]byte{
		"nil":                         nil,
		"empty":                       {},
		"no user data":                assignmentBytes(nil, nil),
		"empty user data":             assignmentBytes(nil, []byte{}),
		"version 0":                   assignmentBytes(nil, cat([]byte{0}, ud[1:])),
		"version 2":                   assignmentBytes(nil, cat([]byte{2}, ud[1:])),
		"trailing byte":               assignmentBytes(nil, cat(ud, []byte{0})),
		"generation above int32":      assignmentBytes(nil, cat([]byte{1}, binary.AppendVarint(nil, 1<<31), uv(0), uv(0))),
		"non-minimal generation":      assignmentBytes(nil, cat([]byte{1}, []byte{0x80, 0x00}, uv(0), uv(0))),
		"huge member count":           assignmentBytes(nil, cat([]byte{1}, uv(0), uv(1<<50))),
		"empty member id":             assignmentBytes(nil, cat([]byte{1}, uv(0), uv(1), uv(0), uv(0), uv(0))),
		"members out of order":        assignmentBytes(nil, cat([]byte{1}, uv(0), uv(2), uv(1), []byte("b"), uv(0), uv(1), []byte("a"), uv(0), uv(0))),
		"duplicate member":            assignmentBytes(nil, cat([]byte{1}, uv(0), uv(2), uv(1), []byte("a"), uv(0), uv(1), []byte("a"), uv(0), uv(0))),
		"huge partition count":        assignmentBytes(nil, cat(hdr, uv(1<<40))),
		"active out of range":         assignmentBytes(nil, cat(hdr, uv(1), uv(3), uv(0), uv(0))),
		"pending out of range":        assignmentBytes(nil, cat(hdr, uv(1), uv(0), uv(3), uv(0))),
		"active and pending":          assignmentBytes(nil, cat(hdr, uv(1), uv(1), uv(2), uv(0))),
		"standby is the active":       assignmentBytes(nil, cat(hdr, uv(1), uv(1), uv(0), uv(1), uv(0))),
		"standby is the pending":      assignmentBytes(nil, cat(hdr, uv(1), uv(0), uv(2), uv(1), uv(1))),
		"standby out of range":        assignmentBytes(nil, cat(hdr, uv(1), uv(1), uv(0), uv(1), uv(2))),
		"standbys out of order":       assignmentBytes(nil, cat(hdr, uv(1), uv(0), uv(0), uv(2), uv(1), uv(0))),
		"duplicate standby":           assignmentBytes(nil, cat(hdr, uv(1), uv(0), uv(0), uv(2), uv(0), uv(0))),
		"more standbys than members":  assignmentBytes(nil, cat(hdr, uv(1), uv(0), uv(0), uv(3), uv(0), uv(1), uv(1))),
		"partition truncated":         assignmentBytes(nil, cat(hdr, uv(2), okPart, uv(1))),
		"topic partition outside map": assignmentBytes([]kmsg.ConsumerMemberAssignmentTopic{topic("t", 0, 2)}, good),
		"negative topic partition":    assignmentBytes([]kmsg.ConsumerMemberAssignmentTopic{topic("t", -1)}, good),
		"partition listed twice":      assignmentBytes([]kmsg.ConsumerMemberAssignmentTopic{topic("t", 0, 0)}, good),
		"topic listed twice":          assignmentBytes([]kmsg.ConsumerMemberAssignmentTopic{topic("t", 0), topic("t", 0)}, good),
		"topics differ":               assignmentBytes([]kmsg.ConsumerMemberAssignmentTopic{topic("t", 0), topic("u")}, good),
		"partitions of two members":   assignmentBytes([]kmsg.ConsumerMemberAssignmentTopic{topic("t", 0, 1)}, good),
		"partition with no active": assignmentBytes([]kmsg.ConsumerMemberAssignmentTopic{topic("t", 0)},
			cat(hdr, uv(1), uv(0), uv(0), uv(0))),
		// Found by FuzzDecodeAssignment: a member listed for only some of
		// the partitions the map makes it active for (here a: 0 and 2).
		"some of the member's partitions": assignmentBytes([]kmsg.ConsumerMemberAssignmentTopic{topic("t", 0)},
			cat(hdr, uv(3), okPart, cat(uv(2), uv(0), uv(0)), okPart)),
	}
	if _, _, err := DecodeAssignment(assignmentBytes([]kmsg.ConsumerMemberAssignmentTopic{topic("t", 0)}, good)); err != nil {
		t.Fatalf("the hand-built base case does not decode: %v", err)
	}
	for i := range valid {
		cases[fmt.Sprintf("truncated to %d of %d", i, len(valid))] = valid[:i]
	}
	for i := range ud {
		cases[fmt.Sprintf("user data truncated to %d of %d", i, len(ud))] = assignmentBytes(nil, ud[:i])
	}
	for name, b := range cases {
		if _, _, err := DecodeAssignment(b); err == nil {
			t.Errorf("%s: decoded without error", name)
		} else if !errors.Is(err, ErrBadEncoding) {
			t.Errorf("%s: error %v does not wrap ErrBadEncoding", name, err)
		}
	}
}

// TestDecodeGarbage feeds random bytes and random mutations of valid
// encodings to the decoders: they must never panic, and whatever they accept
// must be canonical (re-encoding gives the same user data).
func TestDecodeGarbage(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	md := EncodeMetadata([]string{"a", "b"}, Metadata{URL: "http://x:1", Generation: 9, Tasks: map[int32]LocalTask{
		0: {RoleActive, 77}, 1: {RoleStandby, 1 << 33}, 9: {RoleNone, 5},
	}})
	as := EncodeAssignment([]string{"a", "b"}, "m-1", sampleMap())
	mutate := func(b []byte) []byte {
		b = slices.Clone(b)
		switch r.IntN(4) {
		case 0:
			b[r.IntN(len(b))] = byte(r.Uint32())
		case 1:
			b[r.IntN(len(b))] ^= 1 << r.IntN(8)
		case 2:
			i := r.IntN(len(b))
			b = slices.Insert(b, i, byte(r.Uint32()))
		case 3:
			i := r.IntN(len(b))
			b = slices.Delete(b, i, i+1)
		}
		return b
	}
	for i := range 20000 {
		var b1, b2 []byte
		switch i % 3 {
		case 0:
			b1 = make([]byte, r.IntN(64))
			for j := range b1 {
				b1[j] = byte(r.Uint32())
			}
			b2 = b1
		case 1:
			b1, b2 = mutate(md), mutate(as)
		case 2:
			var meta kmsg.ConsumerMemberMetadata
			_ = meta.ReadFrom(md)
			meta.UserData = mutate(meta.UserData)
			b1 = meta.AppendTo(nil)
			var a kmsg.ConsumerMemberAssignment
			_ = a.ReadFrom(as)
			a.UserData = mutate(a.UserData)
			b2 = a.AppendTo(nil)
		}
		if topics, got, err := DecodeMetadata(b1); err == nil {
			var meta kmsg.ConsumerMemberMetadata
			_ = meta.ReadFrom(b1)
			var again kmsg.ConsumerMemberMetadata
			_ = again.ReadFrom(EncodeMetadata(topics, got))
			if !bytes.Equal(meta.UserData, again.UserData) {
				t.Fatalf("accepted non-canonical metadata %x", meta.UserData)
			}
		} else if !errors.Is(err, ErrBadEncoding) {
			t.Fatalf("metadata error %v does not wrap ErrBadEncoding", err)
		}
		if _, got, err := DecodeAssignment(b2); err == nil {
			var a kmsg.ConsumerMemberAssignment
			_ = a.ReadFrom(b2)
			if !bytes.Equal(a.UserData, encodeMap(got)) {
				t.Fatalf("accepted non-canonical map %x", a.UserData)
			}
		} else if !errors.Is(err, ErrBadEncoding) {
			t.Fatalf("assignment error %v does not wrap ErrBadEncoding", err)
		}
	}
}

func FuzzDecodeMetadata(f *testing.F) {
	f.Add(EncodeMetadata([]string{"a"}, Metadata{URL: "u", Tasks: map[int32]LocalTask{1: {RoleActive, 2}}}))
	f.Add(EncodeMetadata(nil, Metadata{}))
	f.Add(EncodeMetadata([]string{"shop-commands", "bank-commands", "bank-commands"}, Metadata{URL: "http://h1:8080", Generation: 7,
		Tasks: map[int32]LocalTask{0: {RoleActive, 1000}, 3: {RoleStandby, 5}, 9: {RoleNone, 0}, math.MaxInt32: {RoleActive, math.MaxInt64}}}))
	f.Add([]byte{})
	f.Add([]byte{0, 3})
	f.Fuzz(func(t *testing.T, b []byte) {
		var topics []string
		var md Metadata
		var err error
		checkAllocs(t, len(b), func() { topics, md, err = DecodeMetadata(b) })
		if err != nil {
			if !errors.Is(err, ErrBadEncoding) {
				t.Fatalf("error %v does not wrap ErrBadEncoding", err)
			}
			return
		}
		if !slices.Equal(topics, normTopics(topics)) {
			t.Fatalf("topics not sorted and deduplicated: %v", topics)
		}
		for p, task := range md.Tasks {
			if p < 0 || task.Role > RoleStandby || task.Checkpoint < 0 {
				t.Fatalf("decoded an impossible task %d: %+v", p, task)
			}
		}
		enc := EncodeMetadata(topics, md)
		topics2, md2, err := DecodeMetadata(enc)
		if err != nil || !slices.Equal(topics, topics2) || !reflect.DeepEqual(md, md2) {
			t.Fatalf("round trip: %v %+v, then %v %+v, %v", topics, md, topics2, md2, err)
		}
		// The user data is canonical: what was accepted is exactly what
		// EncodeMetadata writes for the decoded value.
		var in, out kmsg.ConsumerMemberMetadata
		if in.ReadFrom(b) != nil || out.ReadFrom(enc) != nil || !bytes.Equal(in.UserData, out.UserData) {
			t.Fatalf("accepted non-canonical user data % x (canonical: % x)", in.UserData, out.UserData)
		}
	})
}

func FuzzDecodeAssignment(f *testing.F) {
	f.Add(EncodeAssignment([]string{"a", "b"}, "m-1", sampleMap()))
	f.Add(EncodeAssignment([]string{"a", "b"}, "m-3", sampleMap()))
	f.Add(EncodeAssignment(nil, "", Map{}))
	f.Add(assignmentFor([]string{"a"}, "m-1", Map{Partitions: []Placement{{Active: "m-1"}}}, encodeMap(sampleMap()))) // m-1 is also active for 3
	f.Add(EncodeAssignment([]string{"shop-commands"}, "m-2", Map{Generation: -1, Members: map[string]string{"m-2": "http://h2:8080"},
		Partitions: []Placement{{}, {Active: "m-2"}, {Pending: "m-2"}}}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		var assigned map[string][]int32
		var m Map
		var err error
		checkAllocs(t, len(b), func() { assigned, m, err = DecodeAssignment(b) })
		if err != nil {
			if !errors.Is(err, ErrBadEncoding) {
				t.Fatalf("error %v does not wrap ErrBadEncoding", err)
			}
			return
		}
		var a kmsg.ConsumerMemberAssignment
		if err := a.ReadFrom(b); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a.UserData, encodeMap(m)) {
			t.Fatalf("accepted a non-canonical map")
		}
		// The assignment is the member's Active partitions in the map,
		// and encodes back to the same.
		owner := ""
		var topics []string
		for topic, ps := range assigned {
			topics = append(topics, topic)
			if len(ps) == 0 || !slices.IsSorted(ps) {
				t.Fatalf("topic %q: partitions %v", topic, ps)
			}
			owner = m.Partitions[ps[0]].Active
		}
		if owner != "" {
			for _, ps := range assigned {
				if want := m.ActivePartitions(owner); !slices.Equal(ps, want) {
					t.Fatalf("assigned %v, but the map makes %q active for %v", ps, owner, want)
				}
			}
		}
		assigned2, m2, err := DecodeAssignment(EncodeAssignment(topics, owner, m))
		if err != nil || !reflect.DeepEqual(assigned, assigned2) || !reflect.DeepEqual(m, m2) {
			t.Fatalf("round trip: %v %+v, then %v %+v, %v", assigned, m, assigned2, m2, err)
		}
	})
}
