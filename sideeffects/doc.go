// Package sideeffects runs side effects of events — e-mails, HTTP calls,
// search indexing — outside esker's state-update path, with a chosen
// delivery guarantee, bounded retries, a dead-letter topic and re-drive.
//
// A Consumer reads one or more event topics (usually "<type>-events") as the
// Kafka consumer group "<app>-<name>", with read_committed isolation (events
// of aborted transactions are never seen), and calls a Handler for every
// record:
//
//	mailer, err := sideeffects.New("mailer", []string{"account-events"},
//		func(ctx context.Context, ev sideeffects.Event) error {
//			if ev.Type != "Opened" {
//				return nil
//			}
//			return sendWelcome(ctx, ev.EntityID, ev.EventID) // EventID: dedupe key
//		},
//		sideeffects.Retries(5, 200*time.Millisecond, 30*time.Second))
//	...
//	err = mailer.Run(ctx, sideeffects.Runtime{AppID: "bank",
//		ClientOpts: []kgo.Opt{kgo.SeedBrokers("localhost:9092")}})
//
// Several processes may run the same consumer: the group spreads the
// partitions over them.
//
// # Guarantees
//
// AtLeastOnce (the default) commits an offset only once the events below it
// are finished: handled successfully, or written to the dead-letter topic
// and acknowledged by the broker. A crash re-runs the handler for the
// events that were in flight or finished after the last commit (commits
// run every CommitInterval, default 1 s), so handlers should be idempotent;
// Event.EventID (derived from type, entity and version) is a stable
// deduplication key. Nothing is lost.
//
// AtMostOnce commits the offsets of every polled batch synchronously before
// any event of it reaches a handler. A crash after that commit never
// re-runs a handler; the events that were committed but not yet handled (at
// most a poll batch of 500 plus the workers' queues) are not handled at
// all. A commit that fails is retried; if the member lost its group
// generation meanwhile, the batch is rewound instead of handled, and the
// partition's next owner handles it. When Run stops, committed events still
// queued are handled within the DrainTimeout, and Run logs how many it had
// to give up. At-most-once trades those losses for never repeating a side
// effect: use it where a duplicate costs more than a miss (a payment
// reminder, a push notification).
//
// # Ordering and parallelism
//
// Events go to Workers(n) workers (default 16) by a hash of their record
// key, the entity id: one entity's events are handled one at a time, in
// offset order, while other entities' events are handled in parallel. A
// failing event holds back the later events of its key while it is retried
// (they must not overtake it) but not those of other keys. Records without
// a key are ordered per partition.
//
// # The commit rule
//
// Parallel handling finishes events out of offset order. For every assigned
// partition the consumer tracks the offsets it polled and not yet finished,
// and commits only below the lowest unfinished one (or past the last polled
// record when all are finished). So a commit never covers an event that was
// not finished, however the workers interleave; what a crash repeats is the
// events from the lowest unfinished offset on.
//
// # Retries and dead letters
//
// A handler error is retried up to Retries(maxAttempts, base, max) calls in
// all, with exponential backoff (base doubled per attempt, capped at max,
// jittered between half and all of it). An error wrapped with Permanent is
// not retried. After the last attempt the record — original key, value and
// headers — is written to the dead-letter topic "<app>-<name>-dlq" with the
// headers esker-dlq-error, esker-dlq-attempts, esker-dlq-source-topic,
// esker-dlq-source-partition, esker-dlq-source-offset and esker-dlq-time,
// and the stream goes on. The dead letter must be acknowledged before the
// source offset can be committed; while the broker refuses it, the consumer
// retries the write (and that key waits), so no event is ever dropped
// silently. A record that carries a malformed esker envelope goes to the
// dead-letter topic at once, with 0 attempts. Records without an esker
// envelope are delivered as they are (see Event), so plain topics work too.
//
// Each attempt first opens the event's personal fields (Runtime.OpenEvent);
// a failure to open them now (the keys topic cannot be read) is retried
// like a handler error. An event no key opens (aggregate.ErrUnknownKey:
// another application's event, or the keys topic was lost) is handed to
// the handler sealed, as stored, with a warning, rather than retried into
// the dead-letter topic.
//
// # Re-drive
//
// Every consumer also subscribes to its re-drive topic "<app>-<name>-redrive"
// (read from its beginning for a new group, whatever StartAt says). Replay
// copies the dead letters not yet replayed to it (tracked by the committed
// offsets of the group "<app>-<name>-dlq-replay", committed after the copies
// are acknowledged), and the running consumer hands them to its handler
// again — typically after the bug or the outage that made them fail has been
// fixed. A re-driven event keeps its original topic, partition and offset
// (Event.Redriven reports it); if it fails again it becomes a new dead
// letter. List reads the dead letters, and "esker dlq list|replay" does both
// from the command line. Run creates both topics with one partition.
//
// # Rebalances and crashes
//
// The consumer blocks rebalances while it registers a polled batch (and,
// at-most-once, commits it), so a revocation always sees every polled
// record. When partitions are revoked, the events already polled from them
// — running and queued — get up to the DrainTimeout (default 10 s) to
// finish, the finished offsets are committed, and only then does the
// rebalance proceed: the next owner starts right after the last event
// handled here, and a rebalance duplicates nothing. (Leaving the queued
// events to the next owner would not spare work: the commit cannot skip
// them, so events of other keys behind them that finished would be handled
// twice.) Only past the DrainTimeout are events not started left to the next
// owner and running handlers cancelled; the next owner then handles again
// what was not committed. Partitions lost with an expired session cannot
// be committed; at-least-once their running handlers are cancelled and the
// next owner handles those events again. Stopping Run works like a
// revocation of every partition. A crash (kill -9, power loss) commits
// nothing more: at-least-once, the events from the lowest unfinished offset
// at the last commit on are handled again; at-most-once, the committed but
// unfinished ones are lost.
//
// # Reactors
//
// A Consumer is for side effects outside Kafka. Turning events into
// commands for aggregates is a Reactor's job (NewReactor): the node runs it
// inside its processing engine, exactly once, with no handler I/O.
//
// # Observability
//
// Run registers, on Runtime.Registerer, esker_sideeffect_events_total
// {consumer, outcome="handled"|"dead_lettered"}, esker_sideeffect_retries_total
// {consumer}, esker_sideeffect_lag_records{consumer} (records not yet
// handled) and esker_sideeffect_handler_seconds{consumer}. Status returns assigned
// partitions, lags, in-flight events and counters for GET /v1/cluster; Ready
// says whether the consumer is a member of its group and not stuck. While
// the lag is 1000 records or more, Run logs every 5 s how far it has caught
// up and how many events per second it handles.
package sideeffects
