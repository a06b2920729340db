// Package projection defines read models folded from event topics.
//
// A projection has a name, sources (the events of aggregate types, or any
// topic with a decode function), a key per event (the entity id unless
// KeyBy re-keys it) and a fold func(S, Event) S. GroupBy defines a
// projection over groups of entities (accounts by owner) with add and
// subtract functions, so an entity moving between groups leaves one and
// joins the other.
//
// A projection is not a second processing loop: a Node runs it as tasks of
// the same engine that runs the aggregates (one task per partition, assigned
// with the aggregates' partition of the same number). A task folds its
// events into its own Pebble key range and writes each changed row to the
// compacted changelog "<app>-<name>-changelog", together with its input
// offsets, in the node's Kafka transaction: a row is never folded twice and
// never lost across crashes and rebalances, and standbys keep warm copies.
// Rows keyed by anything but the event's entity id (KeyBy, GroupBy) live on
// the partition of their own key: the task that reads the event produces
// the change to the repartition topic "<app>-<name>-repartition", inside
// the same transaction, and the task owning the row's partition folds it.
//
// Rows are JSON and served over HTTP by the node that owns their partition:
//
//	GET /v1/projections/{name}/{key}
//	GET /v1/projections/{name}?prefix=&after=&limit=
//
// A projection added to a running system has no stored progress: it starts
// from the beginning of its sources (or StartAt), catches up, and follows
// live; the node logs its progress and exports its lag.
package projection
