package benchmark

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/internal/engine"
)

// reset deletes the topics and groups if they exist and waits until the
// cluster no longer lists the topics.
func reset(ctx context.Context, brokers []string, topics, groups []string) error {
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		return err
	}
	adm := kadm.NewClient(cl)
	defer adm.Close()
	if len(groups) > 0 {
		resp, err := adm.DeleteGroups(ctx, groups...)
		if err != nil {
			return fmt.Errorf("delete groups %v: %w", groups, err)
		}
		for g, r := range resp {
			if r.Err != nil && !errors.Is(r.Err, kerr.GroupIDNotFound) {
				return fmt.Errorf("delete group %s: %w", g, r.Err)
			}
		}
	}
	resp, err := adm.DeleteTopics(ctx, topics...)
	if err != nil {
		return fmt.Errorf("delete topics %v: %w", topics, err)
	}
	for _, r := range resp {
		if r.Err != nil && !errors.Is(r.Err, kerr.UnknownTopicOrPartition) {
			return fmt.Errorf("delete topic %s: %w", r.Topic, r.Err)
		}
	}
	for deadline := time.Now().Add(30 * time.Second); ; {
		details, err := adm.ListTopics(ctx, topics...)
		if err != nil {
			return err
		}
		left := 0
		for _, d := range details {
			if d.Err == nil {
				left++
			}
		}
		if left == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("topics %v still exist 30s after deletion", topics)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// createTopics creates topics with the given partition count and configs.
func createTopics(ctx context.Context, brokers []string, partitions int32, configs map[string]map[string]string) error {
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		return err
	}
	adm := kadm.NewClient(cl)
	defer adm.Close()
	for topic, cfg := range configs {
		c := map[string]*string{}
		for k, v := range cfg {
			c[k] = kadm.StringPtr(v)
		}
		resp, err := adm.CreateTopic(ctx, partitions, -1, c, topic)
		if err == nil {
			err = resp.Err
		}
		if err != nil {
			return fmt.Errorf("create topic %s: %w", topic, err)
		}
	}
	return nil
}

// accountID names the i-th account of a run.
func accountID(i int) string { return "acc-" + strconv.Itoa(100000 + i)[1:] }

// commandRecord builds a command record as esker's own producers (Node.Submit,
// the HTTP API) write it: keyed by account id on its murmur2 partition, the
// command's type and id in headers, its data as the value.
func commandRecord(topic, id, cmdType, data, commandID string, partitions int32) *kgo.Record {
	r := engine.CommandRecord("account", id, aggregate.Partition(id, partitions),
		aggregate.Command{Type: cmdType, Data: json.RawMessage(data), CommandID: commandID})
	r.Topic = topic
	return r
}

// newProducer returns the client that produces the commands: the options of
// esker's own command producer (manual partitioning, defaults otherwise).
func newProducer(brokers []string) (*kgo.Client, error) {
	return kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.RecordPartitioner(kgo.ManualPartitioner()))
}

// produceAll produces the records asynchronously and returns a function
// that waits for their acknowledgements.
func produceAll(ctx context.Context, cl *kgo.Client, recs []*kgo.Record) func() error {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	wg.Add(len(recs))
	for _, r := range recs {
		cl.Produce(ctx, r, func(_ *kgo.Record, err error) {
			if err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
			}
			wg.Done()
		})
	}
	return func() error {
		wg.Wait()
		return first
	}
}

// stableEnds returns the last stable offsets of the topics' partitions.
func stableEnds(ctx context.Context, brokers []string, topics ...string) (map[string]map[int32]int64, error) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		return nil, err
	}
	adm := kadm.NewClient(cl)
	defer adm.Close()
	listed, err := adm.ListCommittedOffsets(ctx, topics...)
	if err != nil {
		return nil, err
	}
	out := map[string]map[int32]int64{}
	var firstErr error
	listed.Each(func(o kadm.ListedOffset) {
		if o.Err != nil && firstErr == nil {
			firstErr = fmt.Errorf("list offsets of %s/%d: %w", o.Topic, o.Partition, o.Err)
		}
		if out[o.Topic] == nil {
			out[o.Topic] = map[int32]int64{}
		}
		out[o.Topic][o.Partition] = o.Offset
	})
	return out, firstErr
}

// topicCount is what a range of a topic holds.
type topicCount struct {
	records int64
	bytes   int64 // keys, values and headers
}

// countRecords reads, read_committed, every partition of the topics from
// the offsets in from to the current last stable offset and counts the data
// records (not transaction markers).
func countRecords(ctx context.Context, brokers []string, from map[string]map[int32]int64) (map[string]topicCount, error) {
	topics := make([]string, 0, len(from))
	for t := range from {
		topics = append(topics, t)
	}
	ends, err := stableEnds(ctx, brokers, topics...)
	if err != nil {
		return nil, err
	}
	consume := map[string]map[int32]kgo.Offset{}
	pending := map[string]map[int32]int64{}
	for t, parts := range ends {
		for p, end := range parts {
			start := from[t][p]
			if end <= start {
				continue
			}
			if consume[t] == nil {
				consume[t], pending[t] = map[int32]kgo.Offset{}, map[int32]int64{}
			}
			consume[t][p] = kgo.NewOffset().At(start)
			pending[t][p] = end
		}
	}
	out := map[string]topicCount{}
	for _, t := range topics {
		out[t] = topicCount{}
	}
	if len(consume) == 0 {
		return out, nil
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...),
		kgo.ConsumePartitions(consume),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.KeepControlRecords())
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for len(pending) > 0 {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			return nil, fmt.Errorf("counting records: %w (unread: %v)", ctx.Err(), pending)
		}
		for _, fe := range fs.Errors() {
			return nil, fmt.Errorf("counting records of %s/%d: %w", fe.Topic, fe.Partition, fe.Err)
		}
		fs.EachRecord(func(r *kgo.Record) {
			end, ok := pending[r.Topic][r.Partition]
			if !ok || r.Offset >= end {
				return
			}
			if !r.Attrs.IsControl() {
				c := out[r.Topic]
				c.records++
				c.bytes += int64(len(r.Key) + len(r.Value))
				for _, h := range r.Headers {
					c.bytes += int64(len(h.Key) + len(h.Value))
				}
				out[r.Topic] = c
			}
			if r.Offset+1 >= end {
				delete(pending[r.Topic], r.Partition)
				if len(pending[r.Topic]) == 0 {
					delete(pending, r.Topic)
				}
			}
		})
	}
	return out, nil
}

// shapeOf derives a Shape from the counts of the events and changelog
// topics.
func shapeOf(commands int, events, changelog topicCount) Shape {
	s := Shape{
		RecordsPerCommand: float64(events.records+changelog.records) / float64(commands),
		EventsPerCommand:  float64(events.records) / float64(commands),
	}
	if events.records > 0 {
		s.EventBytes = int(events.bytes / events.records)
	}
	if changelog.records > 0 {
		s.ChangelogBytes = int(changelog.bytes / changelog.records)
	}
	return s
}

// measureShape counts what a run wrote to its two output topics since from
// and records it in res.
func (cfg Config) measureShape(ctx context.Context, res *Result, from map[string]map[int32]int64, eventsTopic, changelogTopic string) error {
	cfg.progress("count", 0, 1)
	counts, err := countRecords(ctx, cfg.Brokers, from)
	if err != nil {
		return fmt.Errorf("benchmark: %w", err)
	}
	cfg.progress("count", 1, 1)
	res.Shape = shapeOf(cfg.Commands, counts[eventsTopic], counts[changelogTopic])
	res.RecordsPerCommand = res.Shape.RecordsPerCommand
	return nil
}
