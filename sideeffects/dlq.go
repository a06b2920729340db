package sideeffects

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"github.com/esker-io/esker/internal/backoff"
	"slices"
	"strconv"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
)

// Headers a dead letter carries besides its original record's headers.
const (
	// HeaderDLQError is the last error the handler returned (at most 4 kB).
	HeaderDLQError = "esker-dlq-error"
	// HeaderDLQAttempts is how many attempts were made (decimal): each
	// opens the event's personal fields, if Runtime.OpenEvent is set, and
	// calls the handler; 0 for a record with a malformed envelope, which
	// no handler saw.
	HeaderDLQAttempts = "esker-dlq-attempts"
	// HeaderDLQSourceTopic, -Partition and -Offset locate the original
	// record (for a re-driven event: still the original, not the copy).
	HeaderDLQSourceTopic     = "esker-dlq-source-topic"
	HeaderDLQSourcePartition = "esker-dlq-source-partition"
	HeaderDLQSourceOffset    = "esker-dlq-source-offset"
	// HeaderDLQTime is when the event was dead-lettered (RFC 3339, UTC).
	HeaderDLQTime = "esker-dlq-time"
	// HeaderDLQValueDropped is set, to the original value's size, on a
	// dead letter whose value had to be left out because the record with
	// the dead-letter headers was too large for the broker.
	HeaderDLQValueDropped = "esker-dlq-value-dropped"
)

// maxErrorHeaderBytes bounds the error message kept in a dead letter.
const maxErrorHeaderBytes = 4096

// deadLetterRecord builds the dead letter of rec: its key, value and
// headers (without the dead-letter headers of an earlier failure), plus the
// headers that say why, how often and from where.
func deadLetterRecord(topic string, rec *kgo.Record, ev Event, cause error, attempts int, now time.Time) *kgo.Record {
	msg := cause.Error()
	if len(msg) > maxErrorHeaderBytes {
		msg = msg[:maxErrorHeaderBytes-3] + "..."
	}
	headers := make([]kgo.RecordHeader, 0, len(rec.Headers)+6)
	for _, h := range rec.Headers {
		if !isDLQHeader(h.Key) {
			headers = append(headers, h)
		}
	}
	headers = append(headers,
		kgo.RecordHeader{Key: HeaderDLQError, Value: []byte(msg)},
		kgo.RecordHeader{Key: HeaderDLQAttempts, Value: []byte(strconv.Itoa(attempts))},
		kgo.RecordHeader{Key: HeaderDLQSourceTopic, Value: []byte(ev.Topic)},
		kgo.RecordHeader{Key: HeaderDLQSourcePartition, Value: []byte(strconv.FormatInt(int64(ev.Partition), 10))},
		kgo.RecordHeader{Key: HeaderDLQSourceOffset, Value: []byte(strconv.FormatInt(ev.Offset, 10))},
		kgo.RecordHeader{Key: HeaderDLQTime, Value: []byte(now.UTC().Format(time.RFC3339Nano))},
	)
	return &kgo.Record{Topic: topic, Key: rec.Key, Value: rec.Value, Headers: headers}
}

// produceDeadLetter writes a dead letter and waits until the broker has
// acknowledged it; only then may the source offset be committed. It retries
// failed produces with backoff (up to 10 s apart) until ctx is done, and
// reports each failure through onFail. A record the broker refuses as too
// large is written once more without its value (HeaderDLQValueDropped), so
// that the failure is still recorded.
func produceDeadLetter(ctx context.Context, cl *kgo.Client, dl *kgo.Record, onFail func(error)) error {
	retry := backoff.Retry{Policy: backoff.Policy{Min: 100 * time.Millisecond, Max: 10 * time.Second}}
	for {
		attempt := *dl // the client owns a record until its produce returns
		attempt.Headers = slices.Clone(dl.Headers)
		err := cl.ProduceSync(ctx, &attempt).FirstErr()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if (errors.Is(err, kerr.MessageTooLarge) || errors.Is(err, kerr.RecordListTooLarge)) && dl.Value != nil {
			dl.Headers = append(slices.Clone(dl.Headers), kgo.RecordHeader{Key: HeaderDLQValueDropped, Value: []byte(strconv.Itoa(len(dl.Value)))})
			dl.Value = nil
			continue
		}
		onFail(err)
		if !backoff.Sleep(ctx, retry.Next(), nil) {
			return ctx.Err()
		}
	}
}

// DeadLetter is one record of a consumer's dead-letter topic.
type DeadLetter struct {
	// Event is the event as the handler saw it; its Topic, Partition and
	// Offset are those of the original record, and its Headers include the
	// dead-letter headers.
	Event Event
	// Error is the last error of the handler.
	Error string
	// Attempts is how many attempts were made for the event (see
	// HeaderDLQAttempts; 0: its envelope was malformed and no handler saw
	// it).
	Attempts int
	// Time is when the event was dead-lettered.
	Time time.Time
	// Partition and Offset locate the dead letter in the dead-letter topic.
	Partition int32
	Offset    int64
	// Replayed is true once Replay has copied the dead letter to the
	// re-drive topic. It says nothing about the outcome of that second
	// attempt: an event that fails again is dead-lettered again, as a new
	// dead letter.
	Replayed bool
}

// deadLetterFromRecord reads a record of the dead-letter topic.
func deadLetterFromRecord(rec *kgo.Record) DeadLetter {
	// A malformed envelope (the reason for some dead letters) leaves the
	// raw record in ev.
	ev, _ := decodeEvent(rec, "")
	dl := DeadLetter{Partition: rec.Partition, Offset: rec.Offset, Time: rec.Timestamp}
	if src, ok := sourceOf(ev.Headers); ok {
		ev.Topic, ev.Partition, ev.Offset = src.topic, src.partition, src.offset
	}
	for _, h := range ev.Headers {
		switch h.Key {
		case HeaderDLQError:
			dl.Error = string(h.Value)
		case HeaderDLQAttempts:
			dl.Attempts, _ = strconv.Atoi(string(h.Value))
		case HeaderDLQTime:
			if t, err := time.Parse(time.RFC3339Nano, string(h.Value)); err == nil {
				dl.Time = t
			}
		}
	}
	dl.Event = ev
	return dl
}

// adminClient is a plain client for List and Replay.
func adminClient(clientOpts []kgo.Opt) (*kgo.Client, *kadm.Client, error) {
	cl, err := kgo.NewClient(clientOpts...)
	if err != nil {
		return nil, nil, fmt.Errorf("sideeffects: kafka client: %w", err)
	}
	return cl, kadm.NewClient(cl), nil
}

// dlqRange is what List and Replay read of one dead-letter partition.
type dlqRange struct {
	partition int32
	from, end int64
}

// dlqBounds returns the start and end offsets of the dead-letter topic and
// the offsets Replay has committed, per partition.
func dlqBounds(ctx context.Context, adm *kadm.Client, appID, name string) (starts, ends kadm.ListedOffsets, replayed kadm.OffsetResponses, err error) {
	topic := DeadLetterTopic(appID, name)
	details, err := adm.ListTopics(ctx, topic)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("sideeffects: %w: %w", errUnreachable, err)
	}
	if d, ok := details[topic]; !ok || d.Err != nil {
		return nil, nil, nil, fmt.Errorf("sideeffects: dead-letter topic %s does not exist: is the application id right, and has consumer %q run?", topic, name)
	}
	if starts, err = adm.ListStartOffsets(ctx, topic); err == nil {
		err = starts.Error()
	}
	if err == nil {
		if ends, err = adm.ListEndOffsets(ctx, topic); err == nil {
			err = ends.Error()
		}
	}
	if err == nil {
		replayed, err = adm.FetchOffsets(ctx, ReplayGroupID(appID, name))
		if errors.Is(err, kerr.GroupIDNotFound) { // nothing replayed yet
			replayed, err = nil, nil
		}
	}
	if err != nil {
		return nil, nil, nil, fmt.Errorf("sideeffects: offsets of %s: %w", topic, err)
	}
	return starts, ends, replayed, nil
}

// replayedBelow is the offset below which Replay has copied a partition.
func replayedBelow(replayed kadm.OffsetResponses, topic string, partition int32) int64 {
	if o, ok := replayed.Lookup(topic, partition); ok && o.Err == nil && o.At >= 0 {
		return o.At
	}
	return 0
}

// readRanges reads the given ranges of topic and calls fn for every record,
// in offset order per partition, until each range is read or fn fails.
// fn may be called with a batch spanning several partitions.
func readRanges(ctx context.Context, clientOpts []kgo.Opt, topic string, ranges []dlqRange, fn func([]*kgo.Record) error) error {
	offsets := map[int32]kgo.Offset{}
	remaining := map[int32]int64{}
	for _, r := range ranges {
		if r.from < r.end {
			offsets[r.partition] = kgo.NewOffset().At(r.from)
			remaining[r.partition] = r.end
		}
	}
	if len(offsets) == 0 {
		return nil
	}
	cl, err := kgo.NewClient(append(slices.Clone(clientOpts),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: offsets}),
		// Control records of transactions mark the end of a range too.
		kgo.KeepControlRecords(),
		kgo.FetchMaxWait(500*time.Millisecond),
	)...)
	if err != nil {
		return fmt.Errorf("sideeffects: kafka client: %w", err)
	}
	defer cl.Close()
	for len(remaining) > 0 {
		fetches := cl.PollFetches(ctx)
		if err := ctx.Err(); err != nil {
			return err
		}
		var ferr error
		fetches.EachError(func(t string, p int32, err error) {
			ferr = fmt.Errorf("sideeffects: read %s/%d: %w", t, p, err)
		})
		if ferr != nil {
			return ferr
		}
		var batch []*kgo.Record
		fetches.EachRecord(func(rec *kgo.Record) {
			end, ok := remaining[rec.Partition]
			if !ok || rec.Offset >= end {
				return
			}
			if rec.Offset >= end-1 {
				delete(remaining, rec.Partition)
			}
			if !rec.Attrs.IsControl() {
				batch = append(batch, rec)
			}
		})
		if len(batch) > 0 {
			if err := fn(batch); err != nil {
				return err
			}
		}
	}
	return nil
}

// List reads the dead letters of consumer name in application appID: the
// newest limit of them (all when limit <= 0), oldest first (in offset
// order; merged by dead-letter time if the topic has several partitions), as
// the dead-letter topic holds them when List is called. clientOpts configure the
// connection (seed brokers, TLS, SASL). Replayed tells which of them Replay
// has copied already. It fails when the dead-letter topic does not exist or
// Kafka cannot be reached before ctx is done.
func List(ctx context.Context, clientOpts []kgo.Opt, appID, name string, limit int) ([]DeadLetter, error) {
	if err := ValidateAppID(appID); err != nil {
		return nil, err
	}
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	cl, adm, err := adminClient(clientOpts)
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	topic := DeadLetterTopic(appID, name)
	starts, ends, replayed, err := dlqBounds(ctx, adm, appID, name)
	if err != nil {
		return nil, err
	}
	var ranges []dlqRange
	ends.Each(func(e kadm.ListedOffset) {
		from := int64(0)
		if s, ok := starts.Lookup(topic, e.Partition); ok {
			from = s.Offset
		}
		if limit > 0 {
			from = max(from, e.Offset-int64(limit))
		}
		ranges = append(ranges, dlqRange{e.Partition, from, e.Offset})
	})
	var out []DeadLetter
	err = readRanges(ctx, clientOpts, topic, ranges, func(recs []*kgo.Record) error {
		for _, rec := range recs {
			dl := deadLetterFromRecord(rec)
			dl.Replayed = rec.Offset < replayedBelow(replayed, topic, rec.Partition)
			out = append(out, dl)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	// One partition (as Run creates it) is in the order the events were
	// dead-lettered; records of several partitions are merged by time.
	slices.SortStableFunc(out, func(a, b DeadLetter) int {
		if len(ranges) > 1 {
			if c := a.Time.Compare(b.Time); c != 0 {
				return c
			}
		}
		return cmp.Or(cmp.Compare(a.Partition, b.Partition), cmp.Compare(a.Offset, b.Offset))
	})
	if limit > 0 && len(out) > limit {
		out = out[len(out)-limit:]
	}
	return out, nil
}

// Replay copies the dead letters of consumer name in application appID that
// were not replayed yet to its re-drive topic, where the running consumer
// (which always subscribes to it) hands them to its handler again. It copies
// what the dead-letter topic holds when Replay starts, and returns how many
// it copied; progress, if not nil, is called with the running count after
// every acknowledged batch.
//
// What was copied is recorded as the committed offsets of the consumer
// group "<app>-<name>-dlq-replay", committed only after the broker
// acknowledged the copies. A Replay that fails or is cancelled midway
// therefore loses nothing: the next Replay continues after the last
// committed batch, and at worst copies the last uncommitted batch a second
// time (the consumer then handles those events twice). Run one Replay at a
// time per consumer. The re-drive topic is created if missing. It fails
// when the dead-letter topic does not exist, or on any Kafka error (the
// count returned is then what was copied and committed before it).
func Replay(ctx context.Context, clientOpts []kgo.Opt, appID, name string, progress func(n int)) (int, error) {
	if err := ValidateAppID(appID); err != nil {
		return 0, err
	}
	if err := ValidateName(name); err != nil {
		return 0, err
	}
	cl, adm, err := adminClient(clientOpts)
	if err != nil {
		return 0, err
	}
	defer cl.Close()
	topic, redrive, group := DeadLetterTopic(appID, name), RedriveTopic(appID, name), ReplayGroupID(appID, name)
	starts, ends, replayed, err := dlqBounds(ctx, adm, appID, name)
	if err != nil {
		return 0, err
	}
	if _, err := ensureTopics(ctx, adm, consumerTopics(appID, name), nil); err != nil {
		return 0, fmt.Errorf("sideeffects: %w", err)
	}
	var ranges []dlqRange
	ends.Each(func(e kadm.ListedOffset) {
		from := replayedBelow(replayed, topic, e.Partition)
		if s, ok := starts.Lookup(topic, e.Partition); ok {
			from = max(from, s.Offset)
		}
		ranges = append(ranges, dlqRange{e.Partition, from, e.Offset})
	})
	n := 0
	err = readRanges(ctx, clientOpts, topic, ranges, func(recs []*kgo.Record) error {
		copies := make([]*kgo.Record, len(recs))
		commit := kadm.Offsets{}
		for i, rec := range recs {
			copies[i] = &kgo.Record{Topic: redrive, Key: rec.Key, Value: rec.Value, Headers: rec.Headers}
			commit.AddOffset(topic, rec.Partition, rec.Offset+1, -1)
		}
		if err := cl.ProduceSync(ctx, copies...).FirstErr(); err != nil {
			return fmt.Errorf("sideeffects: copy dead letters to %s: %w", redrive, err)
		}
		if err := adm.CommitAllOffsets(ctx, group, commit); err != nil {
			return fmt.Errorf("sideeffects: commit replay progress of group %s: %w", group, err)
		}
		n += len(recs)
		if progress != nil {
			progress(n)
		}
		return nil
	})
	return n, err
}
