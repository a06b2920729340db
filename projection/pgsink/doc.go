// Package pgsink writes events from Kafka into PostgreSQL exactly once: a
// sink consumes one or more event topics ("<type>-events") and hands each
// poll batch to the user's ApplyFunc inside a database transaction that also
// stores the batch's offsets.
//
//	sink, err := pgsink.New("accounts-sink", []string{"account-events"}, apply,
//		pgsink.ConnString("postgres://app@db/app"),
//		pgsink.Setup(createTables))
//	...
//	err = sink.Run(ctx, pgsink.Runtime{AppID: "bank", ClientOpts: []kgo.Opt{kgo.SeedBrokers(brokers...)}})
//
// examples/bank.AccountsSink is a complete sink.
//
// # Exactly once: offsets in the same transaction
//
// The sink's position lives in PostgreSQL, in the table
//
//	esker_sink_offsets(sink text, topic text, partition int, next_offset bigint,
//	                   primary key (sink, topic, partition))
//
// (in the schema set by Schema, else the one the search_path names). Each
// poll batch is written in one transaction: the offset rows of the batch's
// partitions move to the offset after the batch, then ApplyFunc writes the
// batch's effects, then COMMIT. The effects and the position become visible
// together or not at all, so after a crash, a lost connection or a
// rebalance the sink resumes exactly after the last committed batch: no
// event is applied twice and none is skipped, whatever ApplyFunc does
// (it need not be idempotent). Kafka's committed offsets are never read;
// the sink commits them too (KafkaCommits, best-effort, at most once a
// second) only so that Kafka lag tooling shows the group's progress.
//
// The offsets move past transaction markers as well (the sink reads with
// read_committed and keeps control records), so a caught-up sink's stored
// offset equals the partition's last stable offset and its lag is 0.
//
// # Consumer group and resume after a rebalance
//
// The sink is a member of the consumer group "<AppID>-<name>", so N nodes
// running the same sink share the partitions. Auto-commit is off. When the
// group assigns partitions (at start and at every rebalance), the sink reads
// their stored offsets from PostgreSQL before any of their records are
// fetched (franz-go's AdjustFetchOffsetsFn, which replaces the offsets the
// group fetched from Kafka), and fetching starts there. A partition without
// a row starts at StartAt (Earliest, Latest or AtTime), resolved to a
// number and stored at once, so the row exists from the first assignment
// on. Records below the stored offset, should any be fetched, are dropped.
//
// The client blocks rebalances while the sink holds a polled batch
// (BlockRebalanceOnPoll): a partition is revoked only after its in-flight
// batch was committed, so in a clean hand-over the next owner starts where
// the last batch ended.
//
// # The fence: a conditional offset update
//
// A member can still write for a partition it no longer owns: a zombie that
// was frozen (a long GC pause, a paused VM) past its session timeout, or a
// COMMIT whose answer was lost. Every batch therefore moves each offset
// conditionally:
//
//	UPDATE esker_sink_offsets SET next_offset = <after the batch>
//	WHERE sink = $1 AND topic = $2 AND partition = $3 AND next_offset = <where the batch starts>
//
// If another writer moved the offset, the update matches no row, the
// transaction is rolled back before ApplyFunc runs, and the sink rewinds its
// client to the stored offset. The update also takes the row lock, so two
// writers of one partition are serialized: the second waits for the first
// to end, then finds the offset moved. Two writers can therefore never both
// apply the same batch. A retry after a lost COMMIT answer is resolved the
// same way: if the COMMIT had gone through, the offset already moved and the
// batch is not written again.
//
// A writer that freezes inside its transaction would hold the row locks, and
// so block the partition's next owner, until its connection died. Each
// batch's transaction sets idle_in_transaction_session_timeout to TxTimeout,
// so the server ends such a transaction after at most TxTimeout.
//
// # Failures, retries and readiness
//
// When PostgreSQL is unreachable (or a transaction fails with a
// serialization failure, deadlock or similar conflict), the sink rolls the
// batch back and retries the same events with exponential backoff and
// jitter (Backoff, 100ms to 10s by default), forever; it never moves past
// them. Ready reports not ready with the cause from the first failure until
// the next success; while idle the sink checks the database every two
// seconds, so readiness also follows an outage without traffic. Each failed
// attempt is logged (with the batch's partitions and offsets) and counted
// in esker_sink_retries_total. If a rebalance waits for the member while it
// retries, the batch is given back (the client rewinds to the stored
// offsets) so the partitions can move instead of the member being expelled.
//
// Loading the stored offsets of newly assigned partitions retries the same
// way; those partitions are not consumed until their offsets are known.
//
// # Personal fields
//
// When Runtime.OpenEvent is set (an esker node sets it), the sink opens the
// personal fields of a batch's events before the batch's transaction. If
// they cannot be opened now (the keys topic cannot be read, a timeout: any
// error that does not wrap aggregate.ErrUnknownKey), nothing of the batch
// is written and the same events are retried like a database outage: with
// the same backoff, forever, each failed attempt logged and counted in
// esker_sink_retries_total, the sink not ready meanwhile, and the batch
// given back if a rebalance waits. If no key opens an event's fields
// (aggregate.ErrUnknownKey: another application's event, or the keys topic
// was lost), no retry ever will: the event is passed to ApplyFunc sealed,
// as stored, like the engine's projections fold it, with a warning naming
// its topic, partition and offset, and counted in Status.Sealed.
//
// An error that is not transient (an SQL error in ApplyFunc, a constraint
// violation, an error ApplyFunc made up, a panic, a record that is not an
// esker event) stops the sink: Run returns it, naming the batch's topic,
// partitions and offsets. Nothing of that batch was written, so running the
// sink again after fixing the cause resumes at the same events.
//
// # What ApplyFunc must and must not do
//
// It must write only through the transaction it is given, must not commit
// or roll it back, and must have no effect outside the database, because a
// batch can be passed again after a rolled-back attempt (use a side-effect
// consumer for e-mails or HTTP calls). It must wrap errors with %w so that
// connection failures are recognized and retried. It should be fast enough
// for MaxBatch events within TxTimeout, and must not keep the transaction or
// the events after it returns. It does not have to be idempotent.
//
// Events of one entity arrive in order (one entity, one partition), and the
// partition has a single writer at a time, so read-modify-write of an
// entity's rows is safe at the default READ COMMITTED isolation. Rows that
// several partitions update (totals across entities) must be updated with
// atomic statements (SET n = n + $1), since sinks on other nodes write other
// partitions concurrently.
//
// # Metrics and status
//
// On Runtime.Registerer: esker_sink_events_total, esker_sink_batch_seconds
// (BEGIN to COMMIT of a written batch), esker_sink_lag_records (offsets
// between the stored positions and the partitions' last stable offsets),
// esker_sink_retries_total and esker_sink_fenced_total, each labelled by
// sink name only. Status returns the assigned partitions with their stored
// and end offsets, the lag, the last batch's latency and whether the
// database is reachable, for the node's GET /v1/cluster. While the lag is
// above 1000 offsets, the sink logs its catch-up progress every five
// seconds (percent done and events per second).
package pgsink
