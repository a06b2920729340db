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
	"time"

	"github.com/twmb/franz-go/pkg/kadm"

	"github.com/esker-io/esker/changelog"
	"github.com/esker-io/esker/internal/engine"
)

// topicsReport is what "esker inspect topics" shows.
type topicsReport struct {
	App    string      `json:"app"`
	Topics []topicInfo `json:"topics"`
}

type topicInfo struct {
	Name string `json:"name"`
	// Role is what the topic is to the application: commands, events,
	// changelog, repartition, dlq, redrive, or source (a topic its group
	// reads that is none of these) or other (named <app>-...).
	Role          string `json:"role"`
	Partitions    int    `json:"partitions"`
	CleanupPolicy string `json:"cleanupPolicy"`
	// RetentionMs is retention.ms as configured ("-1": forever; "" when
	// the broker does not say).
	RetentionMs string `json:"retentionMs,omitempty"`
	// Records is the sum of end - start over the partitions.
	Records int64             `json:"records"`
	Offsets []partitionOffset `json:"offsets"`
}

type partitionOffset struct {
	Partition int32 `json:"partition"`
	Start     int64 `json:"start"`
	End       int64 `json:"end"`
	Records   int64 `json:"records"`
}

func (in *inspector) topics() (*topicsReport, error) {
	ctx, cancel := in.ctx()
	all, err := in.adm.ListTopics(ctx)
	cancel()
	if err != nil {
		return nil, in.kafkaErr("list topics", err)
	}
	// The topics the group reads belong to the application too (the
	// sources of its projections); a missing group is no error here.
	var read []string
	if g, err := in.describeGroup(); err == nil {
		for _, m := range g.Members {
			read = append(read, m.Topics...)
		}
	} else if !errors.Is(err, errUnknownGroup) {
		return nil, err
	}
	names := appTopics(in.app, all.Names(), read)
	if len(names) == 0 {
		return nil, fmt.Errorf("no topic of application %s on this cluster: no node of it has run here, or --app is wrong (the application's changelogs are named %s)",
			in.app, changelog.Topic(in.app, "<type>"))
	}

	ctx, cancel = in.ctx()
	configs, err := in.adm.DescribeTopicConfigs(ctx, names...)
	cancel()
	if err != nil {
		return nil, in.kafkaErr("describe topic configs", err)
	}
	starts, ends, err := in.offsets(names)
	if err != nil {
		return nil, err
	}
	r := &topicsReport{App: in.app}
	for _, name := range names {
		t := topicInfo{Name: name, Role: topicRole(in.app, name, read), Partitions: len(all[name].Partitions), Offsets: []partitionOffset{}}
		if rc, err := configs.On(name, nil); err == nil && rc.Err == nil {
			t.CleanupPolicy = topicConfig(rc, "cleanup.policy")
			t.RetentionMs = topicConfig(rc, "retention.ms")
		}
		ps := make([]int32, 0, len(all[name].Partitions))
		for p := range all[name].Partitions {
			ps = append(ps, p)
		}
		slices.Sort(ps)
		for _, p := range ps {
			o := partitionOffset{Partition: p, Start: starts[name][p], End: ends[name][p]}
			o.Records = max(o.End-o.Start, 0)
			t.Records += o.Records
			t.Offsets = append(t.Offsets, o)
		}
		r.Topics = append(r.Topics, t)
	}
	return r, nil
}

// appTopics picks the topics of application app among all: every topic named
// <app>-..., the commands and events topics of every aggregate type T that
// has a changelog <app>-T-changelog, and the topics the group reads.
func appTopics(app string, all, read []string) []string {
	exists := map[string]bool{}
	for _, t := range all {
		exists[t] = true
	}
	set := map[string]bool{}
	for _, t := range all {
		if !strings.HasPrefix(t, app+"-") {
			continue
		}
		set[t] = true
		if typ, ok := strings.CutSuffix(strings.TrimPrefix(t, app+"-"), "-changelog"); ok && exists[engine.CommandsTopic(typ)] {
			set[engine.CommandsTopic(typ)] = true
			if exists[engine.EventsTopic(typ)] {
				set[engine.EventsTopic(typ)] = true
			}
		}
	}
	for _, t := range read {
		if exists[t] {
			set[t] = true
		}
	}
	names := make([]string, 0, len(set))
	for t := range set {
		names = append(names, t)
	}
	sort.Strings(names)
	return names
}

func topicRole(app, name string, read []string) string {
	for _, s := range []string{"commands", "events", "changelog", "repartition", "dlq", "redrive"} {
		if strings.HasSuffix(name, "-"+s) {
			return s
		}
	}
	if slices.Contains(read, name) {
		return "source"
	}
	return "other"
}

func (r *topicsReport) write(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TOPIC\tROLE\tPARTITIONS\tCLEANUP\tRETENTION\tRECORDS")
	for _, t := range r.Topics {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%d\n", t.Name, t.Role, t.Partitions, orDash(t.CleanupPolicy), retention(t.RetentionMs), t.Records)
	}
	tw.Flush()

	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TOPIC\tPARTITION\tSTART\tEND\tRECORDS")
	empty := 0
	for _, t := range r.Topics {
		for _, o := range t.Offsets {
			if o.End == 0 {
				empty++
				continue
			}
			fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\n", t.Name, o.Partition, o.Start, o.End, o.Records)
		}
	}
	tw.Flush()
	if empty > 0 {
		fmt.Fprintf(w, "(%d partitions never written to are not listed.)\n", empty)
	}
	fmt.Fprintln(w, "\nRECORDS is end - start: it counts transaction markers too, and on compacted topics the records compaction removed.")
}

// retention writes retention.ms for a person: "forever", "7d", "36h".
func retention(ms string) string {
	n, err := strconv.ParseInt(ms, 10, 64)
	switch {
	case ms == "":
		return "-"
	case err != nil:
		return ms
	case n < 0:
		return "forever"
	}
	d := time.Duration(n) * time.Millisecond
	switch {
	case d >= 24*time.Hour && d%(24*time.Hour) == 0:
		return fmt.Sprintf("%dd", d/(24*time.Hour))
	case d >= time.Hour && d%time.Hour == 0:
		return fmt.Sprintf("%dh", d/time.Hour)
	}
	return d.String()
}

// topicConfig returns the value of a topic config, or "".
func topicConfig(rc kadm.ResourceConfig, key string) string {
	for _, c := range rc.Configs {
		if c.Key == key {
			return c.MaybeValue()
		}
	}
	return ""
}
