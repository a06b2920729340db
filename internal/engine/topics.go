package engine

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"

	"github.com/esker-io/esker/changelog"
)

// CommandsTopic, EventsTopic and changelog.Topic name an aggregate type's
// topics.
func CommandsTopic(aggregateType string) string { return aggregateType + "-commands" }

// EventsTopic is the public, kept-forever topic of an aggregate type's events.
func EventsTopic(aggregateType string) string { return aggregateType + "-events" }

// TopicSpec is a topic the node needs and the configs it must have.
type TopicSpec struct {
	Name    string
	Configs map[string]string
}

// typeTopics returns the topics of the given aggregate types.
func typeTopics(appID string, types []string, commandRetention time.Duration) []TopicSpec {
	var specs []TopicSpec
	for _, t := range types {
		specs = append(specs,
			TopicSpec{CommandsTopic(t), map[string]string{
				"cleanup.policy": "delete",
				"retention.ms":   strconv.FormatInt(commandRetention.Milliseconds(), 10),
			}},
			TopicSpec{EventsTopic(t), map[string]string{
				"cleanup.policy": "delete",
				"retention.ms":   "-1",
			}},
			TopicSpec{changelog.Topic(appID, t), map[string]string{
				"cleanup.policy": "compact",
			}},
		)
	}
	return specs
}

// AppTopics returns every topic the engine of cfg needs: its aggregate
// types' (commands, events, changelogs) and its projections' (changelogs,
// repartition topics). Only AppID, Types, Projections and CommandRetention
// are read.
func AppTopics(cfg Config) []TopicSpec {
	names := make([]string, len(cfg.Types))
	for i, d := range cfg.Types {
		names[i] = d.Name()
	}
	return append(typeTopics(cfg.AppID, names, cfg.CommandRetention), projectionTopics(cfg)...)
}

// EnsureTopics creates missing topics with the given partition count and
// configs, and checks existing ones: a wrong partition count breaks
// co-partitioning, a wrong cleanup policy loses events (delete on a
// changelog... compaction on events), and the node refuses to start with a
// message that says which topic to fix. retention.ms of an events topic must
// be -1: events are the source of truth.
//
// Every existing topic is checked before any is created: a node started
// with a wrong partition count creates nothing that a corrected one would
// then refuse.
func EnsureTopics(ctx context.Context, adm *kadm.Client, specs []TopicSpec, partitions int32, replication int16) error {
	names := make([]string, len(specs))
	for i, s := range specs {
		names[i] = s.Name
	}
	details, err := adm.ListTopics(ctx, names...)
	if err != nil {
		return fmt.Errorf("list topics: %w", err)
	}
	var existing []string
	var missing []TopicSpec
	for _, s := range specs {
		d, ok := details[s.Name]
		switch {
		case ok && d.Err == nil:
			if got := int32(len(d.Partitions)); got != partitions {
				return fmt.Errorf("topic %s has %d partitions but this node is configured for %d: every topic of an application must have the same partition count (co-partitioning); fix the Partitions option or recreate the topic", s.Name, got, partitions)
			}
			existing = append(existing, s.Name)
		case ok && !errors.Is(d.Err, kerr.UnknownTopicOrPartition):
			return fmt.Errorf("describe topic %s: %w", s.Name, d.Err)
		default:
			missing = append(missing, s)
		}
	}
	if err := checkTopicConfigs(ctx, adm, specs, existing); err != nil {
		return err
	}
	for _, s := range missing {
		cfg := map[string]*string{}
		for k, v := range s.Configs {
			cfg[k] = kadm.StringPtr(v)
		}
		resp, err := adm.CreateTopic(ctx, partitions, replication, cfg, s.Name)
		if err != nil && !errors.Is(err, kerr.TopicAlreadyExists) {
			return fmt.Errorf("create topic %s: %w", s.Name, err)
		}
		if resp.Err != nil && !errors.Is(resp.Err, kerr.TopicAlreadyExists) {
			return fmt.Errorf("create topic %s: %w", s.Name, resp.Err)
		}
	}
	return nil
}

// checkTopicConfigs checks the cleanup policy and retention of the existing
// topics among specs.
func checkTopicConfigs(ctx context.Context, adm *kadm.Client, specs []TopicSpec, existing []string) error {
	if len(existing) == 0 {
		return nil
	}
	configs, err := adm.DescribeTopicConfigs(ctx, existing...)
	if err != nil {
		return fmt.Errorf("describe topic configs: %w", err)
	}
	want := map[string]map[string]string{}
	for _, s := range specs {
		want[s.Name] = s.Configs
	}
	for _, rc := range configs {
		if rc.Err != nil {
			return fmt.Errorf("describe configs of %s: %w", rc.Name, rc.Err)
		}
		have := map[string]string{}
		for _, c := range rc.Configs {
			if c.Value != nil {
				have[c.Key] = *c.Value
			}
		}
		w := want[rc.Name]
		if policy := have["cleanup.policy"]; policy != "" && !samePolicy(policy, w["cleanup.policy"]) {
			return fmt.Errorf("topic %s has cleanup.policy=%s but needs %s; fix it with kafka-configs --alter --entity-type topics --entity-name %s --add-config cleanup.policy=%s",
				rc.Name, policy, w["cleanup.policy"], rc.Name, w["cleanup.policy"])
		}
		if w["retention.ms"] == "-1" {
			if r := have["retention.ms"]; r != "" && r != "-1" {
				return fmt.Errorf("topic %s has retention.ms=%s but events must be kept forever (retention.ms=-1); Kafka would delete them", rc.Name, r)
			}
		}
	}
	return nil
}

func samePolicy(have, want string) bool {
	return strings.ReplaceAll(have, " ", "") == want
}
