package sideeffects

import (
	"context"
	"errors"
	"fmt"
	"regexp"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
)

var namePattern = regexp.MustCompile(`^[a-z][a-z0-9-]{0,62}$`)

// ValidateName checks a consumer name: like an aggregate type's, 1 to 63
// lower-case letters, digits and dashes, starting with a letter (it becomes
// part of group and topic names). New, List and Replay check it too.
func ValidateName(name string) error {
	if !namePattern.MatchString(name) {
		return fmt.Errorf("sideeffects: invalid consumer name %q: use lower-case letters, digits and dashes, starting with a letter (at most 63)", name)
	}
	return nil
}

// ValidateAppID checks an application id the way an esker node does:
// letters, digits, '.', '_' and '-', at most 200. Run, List and Replay
// check it too.
func ValidateAppID(id string) error {
	ok := id != "" && len(id) <= 200
	for _, r := range id {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			ok = false
		}
	}
	if !ok {
		return fmt.Errorf("sideeffects: invalid application id %q: use letters, digits, '.', '_' and '-'", id)
	}
	return nil
}

// GroupID is the consumer group of the consumer name in application appID:
// "<app>-<name>".
func GroupID(appID, name string) string { return appID + "-" + name }

// DeadLetterTopic is where the consumer writes the events its handler
// failed on: "<app>-<name>-dlq".
func DeadLetterTopic(appID, name string) string { return appID + "-" + name + "-dlq" }

// RedriveTopic is where Replay copies dead letters for the consumer to
// handle again: "<app>-<name>-redrive".
func RedriveTopic(appID, name string) string { return appID + "-" + name + "-redrive" }

// ReplayGroupID is the consumer group whose committed offsets on the
// dead-letter topic mark what Replay has copied: "<app>-<name>-dlq-replay".
func ReplayGroupID(appID, name string) string { return appID + "-" + name + "-dlq-replay" }

// errUnreachable marks a failure of the first request to Kafka.
var errUnreachable = errors.New("cannot reach Kafka")

// topicSpec is a topic the consumer creates when it is missing.
type topicSpec struct {
	name    string
	configs map[string]string
}

// consumerTopics are the topics Run creates: the dead-letter topic, kept
// forever (a dead letter is only gone once someone deletes it on purpose),
// and the re-drive topic, whose records are handled again within minutes
// and kept a week. Both have one partition: dead letters are rare, one
// partition keeps them in the order they failed, and List and Replay read
// them in that order. Records keep their original key, so the consumer's
// workers still keep one key's re-driven events in order.
func consumerTopics(appID, name string) []topicSpec {
	return []topicSpec{
		{DeadLetterTopic(appID, name), map[string]string{"cleanup.policy": "delete", "retention.ms": "-1"}},
		{RedriveTopic(appID, name), map[string]string{"cleanup.policy": "delete", "retention.ms": "604800000"}},
	}
}

// ensureTopics creates the missing topics of specs with one partition and
// the broker's default replication factor, and returns the names in want
// that do not exist (source topics are not created: that is their owner's
// job, and a typo should not create a topic).
func ensureTopics(ctx context.Context, adm *kadm.Client, specs []topicSpec, want []string) (missing []string, err error) {
	names := append([]string(nil), want...)
	for _, s := range specs {
		names = append(names, s.name)
	}
	details, err := adm.ListTopics(ctx, names...)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errUnreachable, err)
	}
	exists := func(topic string) bool {
		d, ok := details[topic]
		return ok && d.Err == nil
	}
	for _, s := range specs {
		if exists(s.name) {
			continue
		}
		cfg := map[string]*string{}
		for k, v := range s.configs {
			cfg[k] = kadm.StringPtr(v)
		}
		_, err := adm.CreateTopic(ctx, 1, -1, cfg, s.name)
		if err != nil && !errors.Is(err, kerr.TopicAlreadyExists) {
			return nil, fmt.Errorf("create topic %s: %w", s.name, err)
		}
	}
	for _, t := range want {
		if !exists(t) {
			missing = append(missing, t)
		}
	}
	return missing, nil
}
