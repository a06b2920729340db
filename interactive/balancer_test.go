package interactive

import (
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// node is one simulated group member: its balancer and what it last saw.
type node struct {
	id       string
	url      string
	local    map[int32]LocalTask
	b        *Balancer
	maps     []Map
	assigned map[string][]int32 // what kgo would consume
}

func newNode(id string, standbys int, local map[int32]LocalTask) *node {
	n := &node{id: id, url: "http://" + id + ":8080", local: local}
	n.b = NewBalancer(n.url, standbys, func() map[int32]LocalTask { return n.local }, func(m Map) { n.maps = append(n.maps, m) })
	return n
}

// rebalance drives one generation the way franz-go does: every member's
// JoinGroupMetadata, the leader's MemberBalancer → SetBalanceInfo →
// BalanceOrError → IntoSyncAssignment, then every member's
// ParseSyncAssignment. It returns the leader's plan as members received it.
func rebalance(t *testing.T, leader *node, nodes []*node, topics []string, partitions int32, gen int32) {
	t.Helper()
	var members []kmsg.JoinGroupResponseMember
	for _, n := range nodes {
		jm := kmsg.NewJoinGroupResponseMember()
		jm.MemberID = n.id
		jm.ProtocolMetadata = n.b.JoinGroupMetadata(topics, n.assigned, gen-1)
		members = append(members, jm)
	}
	gmb, interests, err := leader.b.MemberBalancer(members)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]struct{}{}
	for _, tp := range topics {
		want[tp] = struct{}{}
	}
	if !reflect.DeepEqual(interests, want) {
		t.Fatalf("MemberBalancer topics %v, want %v", interests, want)
	}
	info, ok := gmb.(kgo.GroupMemberBalancerInfo)
	if !ok {
		t.Fatal("member balancer does not take BalanceInfo (the generation)")
	}
	info.SetBalanceInfo(kgo.BalanceInfo{Group: "bank", Generation: gen, LeaderID: leader.id})
	counts := map[string]int32{}
	for _, tp := range topics {
		counts[tp] = partitions
	}
	withErr, ok := gmb.(kgo.GroupMemberBalancerOrError)
	if !ok {
		t.Fatal("member balancer cannot report errors")
	}
	into, err := withErr.BalanceOrError(counts)
	if err != nil {
		t.Fatal(err)
	}
	assignments := into.IntoSyncAssignment()
	if len(assignments) != len(nodes) {
		t.Fatalf("%d assignments for %d members", len(assignments), len(nodes))
	}
	if !slices.IsSortedFunc(assignments, func(a, b kmsg.SyncGroupRequestGroupAssignment) int { return strings.Compare(a.MemberID, b.MemberID) }) {
		t.Fatal("assignments not ordered by member id")
	}
	byID := map[string][]byte{}
	for _, a := range assignments {
		byID[a.MemberID] = a.MemberAssignment
	}
	for _, n := range nodes {
		got, err := n.b.ParseSyncAssignment(byID[n.id])
		if err != nil {
			t.Fatalf("%s: %v", n.id, err)
		}
		n.assigned = got
	}
}

func TestBalancerThroughKgoInterface(t *testing.T) {
	topics := []string{"account-commands", "transfer-commands"} // sorted, as kgo passes them
	const P = 6

	// a owned everything in generation 4 and holds all state; b keeps
	// standbys of 3 and 4; c is new and cold.
	a := newNode("a", 1, map[int32]LocalTask{
		0: {RoleActive, 900}, 1: {RoleActive, 900}, 2: {RoleActive, 900},
		3: {RoleActive, 900}, 4: {RoleActive, 900}, 5: {RoleActive, 900},
	})
	all := []int32{0, 1, 2, 3, 4, 5}
	a.assigned = map[string][]int32{"account-commands": all, "transfer-commands": all}
	b := newNode("b", 1, map[int32]LocalTask{3: {RoleStandby, 880}, 4: {RoleStandby, 870}})
	c := newNode("c", 1, nil)
	nodes := []*node{a, b, c}

	// The standard part of the JoinGroup metadata, as tooling reads it.
	var meta kmsg.ConsumerMemberMetadata
	if err := meta.ReadFrom(a.b.JoinGroupMetadata(topics, a.assigned, 4)); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(meta.Topics, topics) || meta.Generation != 4 || len(meta.OwnedPartitions) != 2 ||
		!slices.Equal(meta.OwnedPartitions[1].Partitions, all) {
		t.Fatalf("standard member metadata: %+v", meta)
	}

	// Generation 5: a keeps 0 and 1; the others are withheld until a has
	// revoked them.
	rebalance(t, b, nodes, topics, P, 5)
	want := map[string][]int32{"account-commands": {0, 1}, "transfer-commands": {0, 1}}
	if !reflect.DeepEqual(a.assigned, want) {
		t.Fatalf("gen 5: a assigned %v, want %v", a.assigned, want)
	}
	if len(b.assigned) != 0 || len(c.assigned) != 0 {
		t.Fatalf("gen 5: b %v, c %v: partitions handed over before a revoked them", b.assigned, c.assigned)
	}
	for _, n := range nodes {
		if len(n.maps) != 1 || n.maps[0].Generation != 5 || !reflect.DeepEqual(n.maps[0], a.maps[0]) {
			t.Fatalf("gen 5: %s received maps %+v", n.id, n.maps)
		}
	}
	m := a.maps[0]
	if !reflect.DeepEqual(m.Members, map[string]string{"a": a.url, "b": b.url, "c": c.url}) {
		t.Fatalf("gen 5: members %v", m.Members)
	}
	for p, wantPending := range map[int32]string{2: "c", 3: "b", 4: "b", 5: "c"} {
		if pl := m.Partitions[p]; pl.Active != "" || pl.Pending != wantPending {
			t.Fatalf("gen 5: partition %d = %+v, want pending for %s", p, pl, wantPending)
		}
	}

	// a revokes 2..5 (keeping their state), b and c rejoin empty-handed:
	// generation 6 hands the withheld partitions over, b taking the ones
	// it has standbys for.
	for p := int32(2); p < P; p++ {
		a.local[p] = LocalTask{RoleActive, 950} // stale role: the balancer must not claim it
	}
	rebalance(t, a, nodes, topics, P, 6)
	for n, ps := range map[*node][]int32{a: {0, 1}, b: {3, 4}, c: {2, 5}} {
		want := map[string][]int32{"account-commands": ps, "transfer-commands": ps}
		if !reflect.DeepEqual(n.assigned, want) {
			t.Fatalf("gen 6: %s assigned %v, want %v", n.id, n.assigned, want)
		}
	}
	m = c.maps[1]
	if m.Generation != 6 {
		t.Fatalf("gen 6: map generation %d", m.Generation)
	}
	for p, pl := range m.Partitions {
		if pl.Pending != "" || pl.Active == "" || len(pl.Standbys) != 1 || pl.Standbys[0] == pl.Active {
			t.Fatalf("gen 6: partition %d = %+v", p, pl)
		}
	}
	// a holds the freshest state of 2..5 and becomes the standby of as
	// many of them as its balanced share allows (6 standbys / 3 members).
	for _, p := range []int32{2, 3} {
		if !slices.Equal(m.Partitions[p].Standbys, []string{"a"}) {
			t.Fatalf("gen 6: partition %d standbys %v, want [a]", p, m.Partitions[p].Standbys)
		}
	}
	for _, id := range []string{"a", "b", "c"} {
		if n := len(m.StandbyPartitions(id)); n != 2 {
			t.Fatalf("gen 6: %s has %d standbys, want 2", id, n)
		}
	}
	if u, ok := m.ActiveURL(3); !ok || u != b.url {
		t.Fatalf("gen 6: ActiveURL(3) = %q %v", u, ok)
	}

	// Generation 7 with nothing changed: nothing moves.
	rebalance(t, c, nodes, topics, P, 7)
	if got := c.maps[2]; !reflect.DeepEqual(activesOf(got), activesOf(m)) {
		t.Fatalf("gen 7 moved partitions: %v -> %v", activesOf(m), activesOf(got))
	}
}

func TestBalancerProtocol(t *testing.T) {
	var gb kgo.GroupBalancer = NewBalancer("u", 1, nil, nil)
	if gb.ProtocolName() != "esker" || !gb.IsCooperative() {
		t.Fatalf("%s cooperative=%v", gb.ProtocolName(), gb.IsCooperative())
	}
}

func TestBalancerJoinGroupMetadata(t *testing.T) {
	local := map[int32]LocalTask{
		0:  {RoleActive, 10},  // still owned: active
		1:  {RoleActive, 20},  // no longer owned: none
		2:  {RoleStandby, 30}, // standby
		3:  {RoleNone, 40},
		4:  {Role(7), 50}, // unknown: none
		-1: {RoleStandby, 1},
	}
	b := NewBalancer("http://me", 1, func() map[int32]LocalTask { return local }, nil)
	raw := b.JoinGroupMetadata([]string{"t1", "t2"}, map[string][]int32{"t1": {0, 5}, "t2": {0}}, 9)
	topics, md, err := DecodeMetadata(raw)
	if err != nil {
		t.Fatal(err)
	}
	want := Metadata{URL: "http://me", Generation: 9, Tasks: map[int32]LocalTask{
		0: {RoleActive, 10}, 1: {RoleNone, 20}, 2: {RoleStandby, 30}, 3: {RoleNone, 40}, 4: {RoleNone, 50},
		5: {RoleActive, 0}, // owned but unknown to local
	}}
	if !slices.Equal(topics, []string{"t1", "t2"}) || !reflect.DeepEqual(md, want) {
		t.Fatalf("%v %+v", topics, md)
	}
	if _, md, err := DecodeMetadata(NewBalancer("", 0, nil, nil).JoinGroupMetadata(nil, nil, -1)); err != nil || len(md.Tasks) != 0 || md.Generation != -1 {
		t.Fatalf("without local: %+v %v", md, err)
	}
}

func joinMember(id string, b []byte) kmsg.JoinGroupResponseMember {
	jm := kmsg.NewJoinGroupResponseMember()
	jm.MemberID = id
	jm.ProtocolMetadata = b
	return jm
}

func TestBalancerErrors(t *testing.T) {
	bal := NewBalancer("http://me", 1, nil, nil)
	md := func(topics ...string) []byte { return bal.JoinGroupMetadata(topics, nil, 1) }

	t.Run("members disagree on topics", func(t *testing.T) {
		_, _, err := bal.MemberBalancer([]kmsg.JoinGroupResponseMember{
			joinMember("m1", md("a", "b")), joinMember("m2", md("a")),
		})
		if err == nil || !strings.Contains(err.Error(), "m1") || !strings.Contains(err.Error(), "m2") || !strings.Contains(err.Error(), "a,b") {
			t.Fatalf("error %v", err)
		}
	})
	t.Run("member metadata garbage", func(t *testing.T) {
		kafkaMeta := kmsg.NewConsumerMemberMetadata() // a plain consumer, no esker user data
		kafkaMeta.Topics = []string{"a"}
		for name, raw := range map[string][]byte{"random": {1, 2, 3}, "plain consumer": kafkaMeta.AppendTo(nil)} {
			_, _, err := bal.MemberBalancer([]kmsg.JoinGroupResponseMember{joinMember("m1", md("a")), joinMember("bad", raw)})
			if err == nil || !errors.Is(err, ErrBadEncoding) || !strings.Contains(err.Error(), "bad") {
				t.Fatalf("%s: error %v", name, err)
			}
		}
	})
	t.Run("duplicate members are taken once", func(t *testing.T) {
		gmb, _, err := bal.MemberBalancer([]kmsg.JoinGroupResponseMember{
			joinMember("m1", md("a")), joinMember("m1", md("a")), joinMember("m2", md("a")),
		})
		if err != nil {
			t.Fatal(err)
		}
		into, err := gmb.(kgo.GroupMemberBalancerOrError).BalanceOrError(map[string]int32{"a": 4})
		if err != nil {
			t.Fatal(err)
		}
		if n := len(into.IntoSyncAssignment()); n != 2 {
			t.Fatalf("%d assignments", n)
		}
	})

	gmb, _, err := bal.MemberBalancer([]kmsg.JoinGroupResponseMember{joinMember("m1", md("a", "b"))})
	if err != nil {
		t.Fatal(err)
	}
	for name, counts := range map[string]map[string]int32{
		"missing partition count":  {"a": 3},
		"not co-partitioned":       {"a": 3, "b": 4},
		"missing, with extra ones": {"a": 3, "c": 3},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := gmb.(kgo.GroupMemberBalancerOrError).BalanceOrError(counts); err == nil {
				t.Fatal("no error")
			}
			// Balance reports failure as an untyped nil, which kgo
			// turns into an error.
			if into := gmb.Balance(counts); into != nil {
				t.Fatalf("Balance returned %#v", into)
			}
		})
	}
	t.Run("generation without balance info", func(t *testing.T) {
		into, err := gmb.(kgo.GroupMemberBalancerOrError).BalanceOrError(map[string]int32{"a": 2, "b": 2})
		if err != nil {
			t.Fatal(err)
		}
		_, m, err := DecodeAssignment(into.IntoSyncAssignment()[0].MemberAssignment)
		if err != nil || m.Generation != 2 { // member generation 1, plus one
			t.Fatalf("%+v %v", m, err)
		}
	})

	t.Run("garbage assignment", func(t *testing.T) {
		called := false
		b := NewBalancer("u", 0, nil, func(Map) { called = true })
		for name, raw := range map[string][]byte{
			"nil":                 nil,
			"random":              {0, 0, 0, 0, 0, 1, 9},
			"plain kafka assignm": (&kmsg.ConsumerMemberAssignment{Topics: []kmsg.ConsumerMemberAssignmentTopic{{Topic: "a", Partitions: []int32{0}}}}).AppendTo(nil),
		} {
			if got, err := b.ParseSyncAssignment(raw); err == nil || got != nil || !errors.Is(err, ErrBadEncoding) {
				t.Fatalf("%s: %v %v", name, got, err)
			}
		}
		if called {
			t.Fatal("onMap called for a bad assignment")
		}
	})
}
