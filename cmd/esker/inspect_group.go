package main

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/interactive"
)

// groupReport is what "esker inspect group" shows.
type groupReport struct {
	Group       string `json:"group"`
	State       string `json:"state"`
	Protocol    string `json:"protocol,omitempty"`
	Coordinator string `json:"coordinator,omitempty"`
	// Generation is the generation of the newest cluster map the members
	// hold, -1 when none has one (no members, or a rebalance in progress).
	Generation int32            `json:"generation"`
	Members    []groupMember    `json:"members"`
	Partitions []groupPlacement `json:"partitions"`
	Offsets    []partitionLag   `json:"offsets"`
	TotalLag   int64            `json:"totalLag"`
	Notes      []string         `json:"notes,omitempty"`
	clusterMap *interactive.Map // nil when no member holds one
}

type groupMember struct {
	ID         string   `json:"id"`
	InstanceID string   `json:"instanceId,omitempty"`
	ClientID   string   `json:"clientId"`
	Host       string   `json:"host"`
	URL        string   `json:"url"`
	Active     []int32  `json:"active"`
	Pending    []int32  `json:"pending"`
	Standby    []int32  `json:"standby"`
	Topics     []string `json:"topics"`
	// Error is set when the member's JoinGroup metadata is not esker's
	// (another client joined the group).
	Error string `json:"error,omitempty"`
}

type groupPlacement struct {
	Partition   int32    `json:"partition"`
	Active      string   `json:"active,omitempty"` // member id
	ActiveURL   string   `json:"activeUrl,omitempty"`
	Pending     string   `json:"pending,omitempty"`
	PendingURL  string   `json:"pendingUrl,omitempty"`
	Standbys    []string `json:"standbys"`
	StandbyURLs []string `json:"standbyUrls"`
}

type partitionLag struct {
	Topic     string `json:"topic"`
	Partition int32  `json:"partition"`
	// Committed is the group's committed offset, -1 when it has none.
	Committed int64  `json:"committed"`
	Start     int64  `json:"start"`
	End       int64  `json:"end"`
	Lag       int64  `json:"lag"`
	Owner     string `json:"owner,omitempty"` // URL of the partition's active member
}

// errUnknownGroup is returned when the application's group does not exist.
var errUnknownGroup = errors.New("unknown group")

// describeGroup describes the application's consumer group and decodes the
// esker assignor's data of its members. It returns errUnknownGroup (wrapped,
// with a message) when the group does not exist.
func (in *inspector) describeGroup() (*groupReport, error) {
	ctx, cancel := in.ctx()
	defer cancel()
	groups, err := in.adm.DescribeGroups(ctx, in.app)
	if err != nil {
		return nil, in.kafkaErr("describe group "+in.app, err)
	}
	d, ok := groups[in.app]
	if !ok || errors.Is(d.Err, kerr.GroupIDNotFound) || d.Err == nil && d.State == "Dead" {
		return nil, fmt.Errorf("%w %s: no consumer group with this id exists (no node of application %s has run on this cluster; is --app right?)", errUnknownGroup, in.app, in.app)
	}
	if d.Err != nil {
		return nil, in.kafkaErr("describe group "+in.app, d.Err)
	}
	if d.ProtocolType != "" && d.ProtocolType != "consumer" {
		return nil, fmt.Errorf("group %s is a %q group, not a consumer group of esker nodes", in.app, d.ProtocolType)
	}
	r := &groupReport{Group: in.app, State: d.State, Protocol: d.Protocol, Generation: -1,
		Coordinator: fmt.Sprintf("%s:%d", d.Coordinator.Host, d.Coordinator.Port)}
	for _, m := range d.Members {
		gm := groupMember{ID: m.MemberID, ClientID: m.ClientID, Host: strings.TrimPrefix(m.ClientHost, "/")}
		if m.InstanceID != nil {
			gm.InstanceID = *m.InstanceID
		}
		topics, md, err := interactive.DecodeMetadata(memberMetadata(m.Join))
		if err != nil {
			gm.Error = err.Error()
			r.Notes = append(r.Notes, fmt.Sprintf("member %s did not join with esker's assignor data: %v", m.MemberID, err))
		} else {
			gm.URL, gm.Topics = md.URL, topics
		}
		// Every member receives the whole map; keep the newest.
		if _, cm, err := interactive.DecodeAssignment(memberAssignment(m.Assigned)); err == nil {
			if r.clusterMap == nil || cm.Generation > r.clusterMap.Generation {
				r.clusterMap = &cm
			}
		}
		r.Members = append(r.Members, gm)
	}
	if r.clusterMap != nil {
		cm := r.clusterMap
		r.Generation = cm.Generation
		for i := range r.Members {
			m := &r.Members[i]
			m.Active, m.Standby = cm.ActivePartitions(m.ID), cm.StandbyPartitions(m.ID)
			for p, pl := range cm.Partitions {
				if pl.Pending == m.ID {
					m.Pending = append(m.Pending, int32(p))
				}
			}
		}
		for p, pl := range cm.Partitions {
			gp := groupPlacement{Partition: int32(p), Active: pl.Active, ActiveURL: cm.Members[pl.Active],
				Pending: pl.Pending, PendingURL: cm.Members[pl.Pending], Standbys: pl.Standbys, StandbyURLs: cm.StandbyURLs(int32(p))}
			r.Partitions = append(r.Partitions, gp)
		}
	} else if len(d.Members) > 0 {
		r.Notes = append(r.Notes, "no member holds a cluster map yet (the group is rebalancing): owners are unknown")
	}
	return r, nil
}

// memberMetadata is the JoinGroup metadata of a member as sent.
func memberMetadata(m kadm.GroupMemberMetadata) []byte {
	if c, ok := m.AsConsumer(); ok {
		return c.AppendTo(nil)
	}
	b, _ := m.Raw()
	return b
}

// memberAssignment is the SyncGroup assignment of a member as sent.
func memberAssignment(a kadm.GroupMemberAssignment) []byte {
	if c, ok := a.AsConsumer(); ok {
		return c.AppendTo(nil)
	}
	b, _ := a.Raw()
	return b
}

// owner returns the URL of partition p's active member (or "member <id>"
// when it advertises none), "moving to <URL>" while it moves, or "".
func (r *groupReport) owner(p int32) string {
	if r.clusterMap == nil || p < 0 || int(p) >= len(r.clusterMap.Partitions) {
		return ""
	}
	pl := r.clusterMap.Partitions[p]
	name := func(id string) string {
		if u := r.clusterMap.Members[id]; u != "" {
			return u
		}
		return "member " + id
	}
	switch {
	case pl.Active != "":
		return name(pl.Active)
	case pl.Pending != "":
		return "moving to " + name(pl.Pending)
	}
	return ""
}

func (in *inspector) group() (*groupReport, error) {
	r, err := in.describeGroup()
	if err != nil {
		return nil, err
	}
	ctx, cancel := in.ctx()
	defer cancel()
	committed, err := in.adm.FetchOffsets(ctx, in.app)
	if err != nil {
		return nil, in.kafkaErr("fetch the committed offsets of group "+in.app, err)
	}
	if err := committed.Error(); err != nil {
		return nil, in.kafkaErr("fetch the committed offsets of group "+in.app, err)
	}
	topicSet := map[string]bool{}
	for _, m := range r.Members {
		for _, t := range m.Topics {
			topicSet[t] = true
		}
	}
	for t := range committed {
		topicSet[t] = true
	}
	topics := make([]string, 0, len(topicSet))
	for t := range topicSet {
		topics = append(topics, t)
	}
	sort.Strings(topics)
	r.Offsets = []partitionLag{}
	if len(topics) > 0 {
		starts, ends, err := in.offsets(topics)
		if err != nil {
			return nil, err
		}
		for _, t := range topics {
			ps := make([]int32, 0, len(ends[t]))
			for p := range ends[t] {
				ps = append(ps, p)
			}
			slices.Sort(ps)
			for _, p := range ps {
				l := partitionLag{Topic: t, Partition: p, Committed: -1, Start: starts[t][p], End: ends[t][p], Owner: r.owner(p)}
				if o, ok := committed.Lookup(t, p); ok && o.Err == nil && o.At >= 0 {
					l.Committed = o.At
				}
				from := l.Committed
				if from < 0 {
					from = l.Start // reading from the start when nothing is committed
				}
				l.Lag = max(l.End-from, 0)
				r.Offsets = append(r.Offsets, l)
			}
		}
		if err := in.skipMarkers(r.Offsets); err != nil {
			return nil, err
		}
		for _, l := range r.Offsets {
			r.TotalLag += l.Lag
		}
	}
	if r.Members == nil {
		r.Members = []groupMember{}
	}
	if r.Partitions == nil {
		r.Partitions = []groupPlacement{}
	}
	return r, nil
}

// maxMarkerLag bounds the lag skipMarkers looks at: transactions end with
// one marker each, so a caught-up consumer lags by a few at most.
const maxMarkerLag = 100

// skipMarkers sets the lag of a partition to 0 when what lies between the
// committed offset and the end is only transaction markers (and records of
// aborted transactions): a consumer that has read every committed record
// commits the offset after the last one, before the commit marker, so
// end - committed would count the marker as lag. It reads only partitions
// lagging by at most maxMarkerLag, and stops at the first data record of
// each; a partition it gets no answer for within --timeout keeps its lag.
func (in *inspector) skipMarkers(ls []partitionLag) error {
	type tp struct {
		t string
		p int32
	}
	pending := map[tp]int{}
	consume := map[string]map[int32]kgo.Offset{}
	for i, l := range ls {
		if l.Committed < 0 || l.Lag == 0 || l.Lag > maxMarkerLag {
			continue
		}
		pending[tp{l.Topic, l.Partition}] = i
		if consume[l.Topic] == nil {
			consume[l.Topic] = map[int32]kgo.Offset{}
		}
		consume[l.Topic][l.Partition] = kgo.NewOffset().At(l.Committed)
	}
	if len(pending) == 0 {
		return nil
	}
	cl, err := kgo.NewClient(append(slices.Clone(in.opts), kgo.ConsumePartitions(consume),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.KeepControlRecords())...)
	if err != nil {
		return err
	}
	defer cl.Close()
	ctx, cancel := in.ctx()
	defer cancel()
	for len(pending) > 0 && ctx.Err() == nil {
		fetches := cl.PollFetches(ctx)
		if err := in.e.ctx.Err(); err != nil {
			return err
		}
		fetches.EachRecord(func(rec *kgo.Record) {
			i, ok := pending[tp{rec.Topic, rec.Partition}]
			if !ok {
				return
			}
			switch l := &ls[i]; {
			case !rec.Attrs.IsControl() && rec.Offset < l.End:
				delete(pending, tp{rec.Topic, rec.Partition}) // real lag
			case rec.Offset >= l.End-1:
				l.Lag = 0
				delete(pending, tp{rec.Topic, rec.Partition})
			}
		})
	}
	return nil
}

// offsets returns the start offsets and the ends (last stable offsets, what
// a read_committed consumer reaches) of every partition of topics.
func (in *inspector) offsets(topics []string) (starts, ends map[string]map[int32]int64, err error) {
	ctx, cancel := in.ctx()
	defer cancel()
	get := func(what string, list func() (kadm.ListedOffsets, error)) (map[string]map[int32]int64, error) {
		l, err := list()
		if err == nil {
			err = l.Error()
		}
		if err != nil {
			return nil, in.kafkaErr("list "+what+" offsets of "+strings.Join(topics, ", "), err)
		}
		out := map[string]map[int32]int64{}
		l.Each(func(o kadm.ListedOffset) {
			if o.Partition < 0 {
				return
			}
			if out[o.Topic] == nil {
				out[o.Topic] = map[int32]int64{}
			}
			out[o.Topic][o.Partition] = o.Offset
		})
		return out, nil
	}
	if starts, err = get("start", func() (kadm.ListedOffsets, error) { return in.adm.ListStartOffsets(ctx, topics...) }); err != nil {
		return nil, nil, err
	}
	if ends, err = get("end", func() (kadm.ListedOffsets, error) { return in.adm.ListCommittedOffsets(ctx, topics...) }); err != nil {
		return nil, nil, err
	}
	return starts, ends, nil
}

func (r *groupReport) write(w io.Writer) {
	members := fmt.Sprintf("%d members", len(r.Members))
	if len(r.Members) == 1 {
		members = "1 member"
	}
	gen := "no cluster map"
	if r.Generation >= 0 {
		gen = fmt.Sprintf("generation %d", r.Generation)
	}
	fmt.Fprintf(w, "Group %s: %s, %s, %s, coordinator %s\n", r.Group, r.State, gen, members, r.Coordinator)
	if len(r.Members) > 0 {
		fmt.Fprintln(w)
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "MEMBER\tURL\tHOST\tACTIVE\tPENDING\tSTANDBY")
		for _, m := range r.Members {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", m.ID, orDash(m.URL), orDash(m.Host),
				partitionList(m.Active), partitionList(m.Pending), partitionList(m.Standby))
		}
		tw.Flush()
	}
	if len(r.Offsets) > 0 {
		fmt.Fprintln(w)
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "TOPIC\tPARTITION\tCOMMITTED\tEND\tLAG\tOWNER")
		for _, l := range r.Offsets {
			c := "-"
			if l.Committed >= 0 {
				c = strconv.FormatInt(l.Committed, 10)
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%d\t%s\n", l.Topic, l.Partition, c, l.End, l.Lag, orDash(l.Owner))
		}
		tw.Flush()
		fmt.Fprintf(w, "\nTotal lag: %d. END is the last stable offset. LAG is END - COMMITTED (0 when only transaction markers lie\nbetween them); COMMITTED - means nothing is committed yet, and LAG counts from the start.\n", r.TotalLag)
	} else {
		fmt.Fprintln(w, "\nThe group reads no topics and has no committed offsets.")
	}
	for _, n := range r.Notes {
		fmt.Fprintf(w, "Note: %s\n", n)
	}
}

// partitionList writes partition numbers compactly: "0-3,6", or "-".
func partitionList(ps []int32) string {
	if len(ps) == 0 {
		return "-"
	}
	var parts []string
	for i := 0; i < len(ps); {
		j := i
		for j+1 < len(ps) && ps[j+1] == ps[j]+1 {
			j++
		}
		switch {
		case j == i:
			parts = append(parts, strconv.Itoa(int(ps[i])))
		case j == i+1:
			parts = append(parts, strconv.Itoa(int(ps[i])), strconv.Itoa(int(ps[j])))
		default:
			parts = append(parts, fmt.Sprintf("%d-%d", ps[i], ps[j]))
		}
		i = j + 1
	}
	return strings.Join(parts, ",")
}
