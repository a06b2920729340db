package sideeffects

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
)

// Event is one record of a consumed topic as a handler receives it.
//
// Records written by esker (they carry the esker-* envelope headers) have
// their envelope decoded into the embedded aggregate.Event: entity id,
// version, event id, type, schema version, time and the payload in Data.
// Records of other producers (no esker-version and no esker-event-type
// header) are delivered too, so that plain topics can be consumed: their
// EntityID is the record key, Data the record value, Time the record
// timestamp, and Type, EventID and Version are empty. A record that carries
// an esker envelope that does not parse is never given to the handler: it
// goes straight to the dead-letter topic with the parse error.
//
// Topic, Partition and Offset locate the record it came from. For an event
// re-driven from the dead-letter topic (see Replay) they are those of the
// original record, so a handler that deduplicates on them (or on EventID)
// sees the same values as the first time; Redriven reports it.
type Event struct {
	aggregate.Event
	Topic     string
	Partition int32
	Offset    int64
	// Headers are all the record's headers, the envelope's included. A
	// re-driven event also carries the esker-dlq-* headers of its dead
	// letter.
	Headers []aggregate.Header

	redriven bool
}

// Redriven reports whether the event comes from the re-drive topic: it was
// dead-lettered before and copied back by Replay.
func (e Event) Redriven() bool { return e.redriven }

// Handler performs the side effect of one event. It is called from one of
// the consumer's workers; the events of one key are handled one at a time, in
// offset order, and events of different keys concurrently.
//
// Returning nil marks the event handled. Returning an error makes the
// consumer call the handler again after a backoff, up to the attempts set by
// Retries; after the last one, or at once for an error wrapped with
// Permanent, the event is written to the dead-letter topic and the consumer
// goes on with the next event. A panic counts as an error (not a permanent
// one). ctx is cancelled when the consumer stops or gives the event's
// partition up and the drain timeout has passed; an error returned after
// that is not a failure of the event (it is neither retried nor
// dead-lettered, and at-least-once it is handled again later).
type Handler func(ctx context.Context, ev Event) error

// permanentError marks an error that retrying cannot fix.
type permanentError struct{ err error }

func (p permanentError) Error() string { return p.err.Error() }
func (p permanentError) Unwrap() error { return p.err }

// Permanent wraps err to tell the consumer that retrying the event is
// pointless (a malformed payload, a request the remote side rejects): the
// event goes to the dead-letter topic after this one attempt. Permanent(nil)
// is nil.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return permanentError{err}
}

// IsPermanent reports whether err, or an error it wraps, was marked by
// Permanent.
func IsPermanent(err error) bool {
	var p permanentError
	return errors.As(err, &p)
}

// kafkaHeaders converts a record's headers to the client-free form.
func kafkaHeaders(hs []kgo.RecordHeader) []aggregate.Header {
	if len(hs) == 0 {
		return nil
	}
	out := make([]aggregate.Header, len(hs))
	for i, h := range hs {
		out[i] = aggregate.Header{Key: h.Key, Value: h.Value}
	}
	return out
}

// hasEnvelope reports whether a record claims to be an esker event.
func hasEnvelope(hs []aggregate.Header) bool {
	for _, h := range hs {
		if h.Key == aggregate.HeaderVersion || h.Key == aggregate.HeaderEventType {
			return true
		}
	}
	return false
}

// decodeEvent builds the Event a handler receives from a record. It fails
// only for a record with a malformed esker envelope; the returned Event is
// then still filled in as for a plain record, for the dead letter.
// redriveTopic names the consumer's re-drive topic, whose records take the
// coordinates of their original record.
func decodeEvent(rec *kgo.Record, redriveTopic string) (Event, error) {
	hs := kafkaHeaders(rec.Headers)
	ev := Event{
		Event:     aggregate.Event{EntityID: string(rec.Key), Data: rec.Value, Time: rec.Timestamp},
		Topic:     rec.Topic,
		Partition: rec.Partition,
		Offset:    rec.Offset,
		Headers:   hs,
	}
	if rec.Topic == redriveTopic {
		if src, ok := sourceOf(hs); ok {
			ev.Topic, ev.Partition, ev.Offset = src.topic, src.partition, src.offset
			ev.redriven = true
		}
	}
	if !hasEnvelope(hs) {
		return ev, nil
	}
	env, err := aggregate.EventFromRecord(rec.Key, hs, rec.Value)
	if err != nil {
		return ev, fmt.Errorf("malformed esker event envelope: %w", err)
	}
	if env.Time.IsZero() {
		env.Time = rec.Timestamp
	}
	ev.Event = env
	return ev, nil
}

// source is where a dead letter's event was first read.
type source struct {
	topic     string
	partition int32
	offset    int64
}

// sourceOf reads the esker-dlq-source-* headers.
func sourceOf(hs []aggregate.Header) (source, bool) {
	var s source
	var haveTopic, havePartition, haveOffset bool
	for _, h := range hs {
		switch h.Key {
		case HeaderDLQSourceTopic:
			s.topic, haveTopic = string(h.Value), len(h.Value) > 0
		case HeaderDLQSourcePartition:
			p, err := strconv.ParseInt(string(h.Value), 10, 32)
			s.partition, havePartition = int32(p), err == nil && p >= 0
		case HeaderDLQSourceOffset:
			o, err := strconv.ParseInt(string(h.Value), 10, 64)
			s.offset, haveOffset = o, err == nil && o >= 0
		}
	}
	return s, haveTopic && havePartition && haveOffset
}

// isDLQHeader reports whether a header is one the consumer adds to dead
// letters; they are replaced, not repeated, when a re-driven event fails
// again.
func isDLQHeader(key string) bool { return strings.HasPrefix(key, "esker-dlq-") }
