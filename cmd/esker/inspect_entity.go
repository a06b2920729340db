package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/changelog"
	"github.com/esker-io/esker/internal/engine"
	"github.com/esker-io/esker/internal/keyring"
	"github.com/esker-io/esker/statestore"
)

// entityReport is what "esker inspect entity" shows.
type entityReport struct {
	Type           string `json:"type"`
	ID             string `json:"id"`
	Partition      int32  `json:"partition"`
	Partitions     int32  `json:"partitions"`
	EventsTopic    string `json:"eventsTopic"`
	ChangelogTopic string `json:"changelogTopic"`
	// Owner is the URL of the node that owns the partition now ("" when
	// nobody does); OwnerNote says why there is none, or that the
	// partition is moving.
	Owner       string        `json:"owner"`
	OwnerMember string        `json:"ownerMember,omitempty"`
	OwnerNote   string        `json:"ownerNote,omitempty"`
	Standbys    []string      `json:"standbys"`
	Events      []entityEvent `json:"events"`
	// Skipped counts records with the entity's key that are not esker
	// events (written by something else).
	Skipped int          `json:"skipped,omitempty"`
	State   *entityState `json:"state"`
	// StateNote says why State is null.
	StateNote string `json:"stateNote,omitempty"`
}

type entityEvent struct {
	Offset        int64     `json:"offset"`
	Version       int64     `json:"version"`
	Type          string    `json:"type"`
	SchemaVersion int       `json:"schemaVersion"`
	Time          time.Time `json:"time"`
	EventID       string    `json:"eventId"`
	CommandID     string    `json:"commandId,omitempty"`
	ContentType   string    `json:"contentType,omitempty"`
	payload
}

type entityState struct {
	Offset    int64     `json:"offset"`
	Version   int64     `json:"version"`
	UpdatedAt time.Time `json:"updatedAt"`
	// Deleted is true when the latest changelog record of the state is a
	// tombstone.
	Deleted bool `json:"deleted,omitempty"`
	// Forgotten is true when the entity was forgotten (DELETE): its state
	// record is a marker without a state.
	Forgotten bool `json:"forgotten,omitempty"`
	payload
}

// payload is bytes as stored: JSON as is, anything else in base64.
type payload struct {
	Data       json.RawMessage `json:"data,omitempty"`
	DataBase64 []byte          `json:"dataBase64,omitempty"`
}

func newPayload(b []byte) payload {
	if len(b) > 0 && json.Valid(b) {
		return payload{Data: slices.Clone(b)}
	}
	if len(b) == 0 {
		return payload{}
	}
	return payload{DataBase64: slices.Clone(b)}
}

// String is the payload on one line: JSON (compacted only when it spans
// lines), text, or base64 marked as such.
func (p payload) String() string {
	switch {
	case p.Data != nil:
		if bytes.ContainsAny(p.Data, "\r\n") {
			var b bytes.Buffer
			if json.Compact(&b, p.Data) == nil {
				return b.String()
			}
		}
		return string(p.Data)
	case p.DataBase64 != nil:
		if utf8.Valid(p.DataBase64) && !bytes.ContainsAny(p.DataBase64, "\r\n\t") {
			return fmt.Sprintf("%q", p.DataBase64)
		}
		return "base64:" + base64.StdEncoding.EncodeToString(p.DataBase64)
	}
	return "-"
}

func (in *inspector) entity(typ, id string) (*entityReport, error) {
	r := &entityReport{Type: typ, ID: id, EventsTopic: engine.EventsTopic(typ), ChangelogTopic: changelog.Topic(in.app, typ),
		Events: []entityEvent{}, Standbys: []string{}}
	ctx, cancel := in.ctx()
	details, err := in.adm.ListTopics(ctx, r.EventsTopic, r.ChangelogTopic)
	cancel()
	if err != nil {
		return nil, in.kafkaErr("list topics", err)
	}
	ev, ok := details[r.EventsTopic]
	if !ok || errors.Is(ev.Err, kerr.UnknownTopicOrPartition) {
		return nil, fmt.Errorf("no such topic %s: %q is not an aggregate type of an application on this cluster", r.EventsTopic, typ)
	}
	if ev.Err != nil {
		return nil, in.kafkaErr("describe topic "+r.EventsTopic, ev.Err)
	}
	r.Partitions = int32(len(ev.Partitions))
	if r.Partitions == 0 {
		return nil, fmt.Errorf("topic %s has no partitions", r.EventsTopic)
	}
	r.Partition = aggregate.Partition(id, r.Partitions)

	switch g, err := in.describeGroup(); {
	case errors.Is(err, errUnknownGroup):
		r.OwnerNote = fmt.Sprintf("no consumer group %s: no node of the application runs (is --app right?)", in.app)
	case err != nil:
		return nil, err
	case g.clusterMap == nil && len(g.Members) == 0:
		r.OwnerNote = fmt.Sprintf("group %s has no members: no node runs", in.app)
	case !readsTopic(g, engine.CommandsTopic(typ)):
		r.OwnerNote = fmt.Sprintf("no member of group %s reads %s: %s is not an aggregate type of application %s", in.app, engine.CommandsTopic(typ), typ, in.app)
	case g.clusterMap == nil:
		r.OwnerNote = fmt.Sprintf("group %s is rebalancing: the owner is not decided yet", in.app)
	default:
		cm := g.clusterMap
		if int(r.Partition) < len(cm.Partitions) {
			pl := cm.Partitions[r.Partition]
			r.Owner, r.OwnerMember = cm.Members[pl.Active], pl.Active
			r.Standbys = append(r.Standbys, cm.StandbyURLs(r.Partition)...)
			switch {
			case pl.Pending != "":
				r.OwnerNote = fmt.Sprintf("moving to %s (member %s): nobody serves it until the next rebalance", cm.Members[pl.Pending], pl.Pending)
			case pl.Active == "":
				r.OwnerNote = "nobody owns the partition"
			}
		} else {
			r.OwnerNote = fmt.Sprintf("the group's cluster map has %d partitions, %s has %d", len(cm.Partitions), r.EventsTopic, r.Partitions)
		}
	}

	key := []byte(id)
	err = in.scan(r.EventsTopic, r.Partition, func(rec *kgo.Record) {
		if !bytes.Equal(rec.Key, key) {
			return
		}
		hs := make([]aggregate.Header, len(rec.Headers))
		contentType := ""
		for i, h := range rec.Headers {
			hs[i] = aggregate.Header{Key: h.Key, Value: h.Value}
			if h.Key == aggregate.HeaderContentType {
				contentType = string(h.Value)
			}
		}
		e, err := aggregate.EventFromRecord(rec.Key, hs, rec.Value)
		if err != nil {
			r.Skipped++
			return
		}
		r.Events = append(r.Events, entityEvent{Offset: rec.Offset, Version: e.Version, Type: e.Type, SchemaVersion: e.SchemaVersion,
			Time: e.Time, EventID: e.EventID, CommandID: e.CommandID, ContentType: contentType, payload: newPayload(rec.Value)})
	})
	if err != nil {
		return nil, err
	}

	cd, ok := details[r.ChangelogTopic]
	switch {
	case !ok || errors.Is(cd.Err, kerr.UnknownTopicOrPartition):
		r.StateNote = fmt.Sprintf("no changelog topic %s (is --app right?)", r.ChangelogTopic)
		return r, nil
	case cd.Err != nil:
		return nil, in.kafkaErr("describe topic "+r.ChangelogTopic, cd.Err)
	case int32(len(cd.Partitions)) != r.Partitions:
		r.StateNote = fmt.Sprintf("%s has %d partitions, %s %d: not co-partitioned", r.ChangelogTopic, len(cd.Partitions), r.EventsTopic, r.Partitions)
		return r, nil
	}
	stateKey := statestore.StateKey(id)
	var decodeErr error
	err = in.scan(r.ChangelogTopic, r.Partition, func(rec *kgo.Record) {
		if !bytes.Equal(rec.Key, stateKey) {
			return
		}
		// Only the latest record counts: a later one clears an earlier
		// record's decoding error.
		decodeErr = nil
		if rec.Value == nil {
			r.State = &entityState{Offset: rec.Offset, Deleted: true}
			return
		}
		s, err := statestore.DecodeStateRecord(rec.Value)
		if err != nil {
			decodeErr = fmt.Errorf("%s/%d offset %d: %w", r.ChangelogTopic, r.Partition, rec.Offset, err)
			return
		}
		r.State = &entityState{Offset: rec.Offset, Version: s.Version, UpdatedAt: s.UpdatedAt, Forgotten: s.Forgotten, payload: newPayload(s.State)}
	})
	if err != nil {
		return nil, err
	}
	if decodeErr != nil {
		return nil, fmt.Errorf("cannot decode the latest state record: %w", decodeErr)
	}
	if r.State == nil {
		r.StateNote = fmt.Sprintf("no state record in %s/%d", r.ChangelogTopic, r.Partition)
	}
	if len(in.masterKeys) > 0 {
		if err := in.openPersonal(r); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// openPersonal opens the sealed personal fields of the report's payloads
// with the application's keys topic and master keys.
func (in *inspector) openPersonal(r *entityReport) error {
	kr, err := keyring.New(keyring.Config{AppID: in.app, Partitions: 1, Masters: in.masterKeys, ClientOpts: in.opts})
	if err != nil {
		return err
	}
	defer kr.Close()
	go func() { _ = kr.Run(in.e.ctx) }()
	ctx, cancel := in.ctx()
	defer cancel()
	if err := kr.Sync(ctx); err != nil {
		return in.kafkaErr("read "+keyring.Topic(in.app), err)
	}
	open := func(p *payload) error {
		if p.Data == nil {
			return nil
		}
		data, err := kr.OpenJSON(ctx, r.Type, r.ID, p.Data)
		p.Data = data
		return err
	}
	for i := range r.Events {
		if err := open(&r.Events[i].payload); err != nil {
			return fmt.Errorf("open the personal fields of version %d: %w", r.Events[i].Version, err)
		}
	}
	if r.State != nil {
		if err := open(&r.State.payload); err != nil {
			return fmt.Errorf("open the personal fields of the state: %w", err)
		}
	}
	return nil
}

// readsTopic reports whether a member of the group reads topic.
func readsTopic(g *groupReport, topic string) bool {
	for _, m := range g.Members {
		if slices.Contains(m.Topics, topic) {
			return true
		}
	}
	return false
}

// scanProgressMin is the number of offsets from which a scan reports its
// progress on stderr.
var scanProgressMin int64 = 100_000

// scanProgressEvery is how often a long scan reports its progress.
var scanProgressEvery = time.Second

// scan reads partition p of topic from its start to its last stable offset
// (read_committed: records of aborted transactions are skipped) and calls
// each for every data record, in offset order. It fails when Kafka sends
// nothing for --timeout before the end is reached.
func (in *inspector) scan(topic string, p int32, each func(*kgo.Record)) error {
	starts, ends, err := in.offsets([]string{topic})
	if err != nil {
		return err
	}
	start, end := starts[topic][p], ends[topic][p]
	if end <= start {
		return nil
	}
	cl, err := kgo.NewClient(append(slices.Clone(in.opts),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: {p: kgo.NewOffset().At(start)}}),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		// Markers are delivered, so that the scan sees the last offset
		// even when it is a transaction's commit marker.
		kgo.KeepControlRecords(),
	)...)
	if err != nil {
		return err
	}
	defer cl.Close()

	total := end - start
	report := total >= scanProgressMin
	where := fmt.Sprintf("%s/%d", topic, p)
	progress := func(at int64) {
		done := at - start
		fmt.Fprintf(in.e.stderr, "esker %s: scanning %s: %d of %d offsets (%d%%)\n", in.name, where, done, total, done*100/total)
	}
	if report {
		progress(start)
	}
	last := time.Now()
	next := start
	for next < end {
		ctx, cancel := context.WithTimeout(in.e.ctx, in.timeout)
		fetches := cl.PollFetches(ctx)
		cancel()
		if err := in.e.ctx.Err(); err != nil {
			return err
		}
		var ferr error
		fetches.EachError(func(_ string, _ int32, err error) {
			if !errors.Is(err, context.DeadlineExceeded) && ferr == nil {
				ferr = err
			}
		})
		if ferr != nil {
			return fmt.Errorf("read %s: %w", where, ferr)
		}
		got := false
		fetches.EachRecord(func(rec *kgo.Record) {
			if rec.Offset < next || rec.Offset >= end {
				return
			}
			got = true
			next = rec.Offset + 1
			if !rec.Attrs.IsControl() {
				each(rec)
			}
		})
		if !got && ctx.Err() != nil {
			return fmt.Errorf("read %s: no record for %v at offset %d (the end is %d): Kafka stopped answering, or the records up to the end were removed", where, in.timeout, next, end)
		}
		if report && time.Since(last) >= scanProgressEvery {
			progress(next)
			last = time.Now()
		}
	}
	if report {
		progress(end)
	}
	return nil
}

func (r *entityReport) write(w io.Writer) {
	fmt.Fprintf(w, "Entity %s/%s\n", r.Type, r.ID)
	fmt.Fprintf(w, "  partition  %d of %d (%s/%d, %s/%d)\n", r.Partition, r.Partitions, r.EventsTopic, r.Partition, r.ChangelogTopic, r.Partition)
	owner := orDash(r.Owner)
	if r.OwnerMember != "" {
		owner += " (member " + r.OwnerMember + ")"
	}
	if r.OwnerNote != "" {
		owner += "; " + r.OwnerNote
	}
	fmt.Fprintf(w, "  owner      %s\n", owner)
	if len(r.Standbys) > 0 {
		fmt.Fprintf(w, "  standbys   %s\n", strings.Join(r.Standbys, ", "))
	}

	if len(r.Events) == 0 {
		fmt.Fprintf(w, "\nNo events in %s/%d.\n", r.EventsTopic, r.Partition)
	} else {
		fmt.Fprintf(w, "\nEvents (%d, from %s/%d):\n", len(r.Events), r.EventsTopic, r.Partition)
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "VERSION\tTYPE\tSCHEMA\tTIME\tOFFSET\tDATA")
		for _, e := range r.Events {
			fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%d\t%s\n", e.Version, e.Type, e.SchemaVersion,
				e.Time.UTC().Format(time.RFC3339Nano), e.Offset, e.payload)
		}
		tw.Flush()
	}
	if r.Skipped > 0 {
		fmt.Fprintf(w, "(%d records with this key are not esker events and were skipped.)\n", r.Skipped)
	}

	switch {
	case r.State == nil:
		fmt.Fprintf(w, "\nState: none (%s).\n", r.StateNote)
	case r.State.Deleted:
		fmt.Fprintf(w, "\nState: deleted (tombstone at %s/%d offset %d).\n", r.ChangelogTopic, r.Partition, r.State.Offset)
	case r.State.Forgotten:
		fmt.Fprintf(w, "\nState: forgotten at version %d, %s (marker at %s/%d offset %d).\n", r.State.Version,
			r.State.UpdatedAt.UTC().Format(time.RFC3339Nano), r.ChangelogTopic, r.Partition, r.State.Offset)
	default:
		fmt.Fprintf(w, "\nState (%s/%d offset %d): version %d, updated %s\n%s\n", r.ChangelogTopic, r.Partition, r.State.Offset,
			r.State.Version, r.State.UpdatedAt.UTC().Format(time.RFC3339Nano), r.State.payload)
	}
}
