// Package statestore keeps a node's partition-local state in Pebble.
//
// One Pebble database per node holds every task it runs; a task is one
// partition of one aggregate type and owns the key range under its prefix
//
//	"t" 0x00 <type> 0x00 <partition, 4 bytes big-endian> 0x00
//
// so that a revoked task can be dropped with one range deletion and a
// re-assigned one restored independently. Within a task:
//
//	's' 0x00 <entity id>                                current state (StateRecord)
//	'j' 0x00 <entity id> 0x00 <first version, 8 bytes>  a journal: the events one
//	                                                    transaction wrote (the stream index)
//	'c' 0x00 <command id>                               command outcome (idempotency)
//	'm' 0x00 "checkpoint"                               next changelog offset to restore from
//	'm' 0x00 "commands"                                 next command offset (travels on the changelog)
//	'm' 0x00 "in" 0x00 <topic>                          a projection's next input offset (on the changelog)
//	'r' 0x00 <entity id>                                a group-by projection's entity row
//
// A projection task (same prefix, the projection's name as <type>) keeps its
// rows as 's' records: the row key in place of the entity id.
//
// State records and journals are stored exactly as they travel on the
// changelog, so the write path and a restore produce identical stores.
// Invariant: the store only ever holds committed data. The engine stages a
// transaction's writes in a Batch and applies it, with the task checkpoints,
// only after the Kafka transaction has committed; data and checkpoint are in
// the same Pebble batch, so a crash leaves them consistent and the changelog
// tail after the checkpoint repairs whatever the crash lost.
package statestore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync/atomic"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"
	"github.com/cockroachdb/pebble/v2/sstable"

	"github.com/esker-io/esker/aggregate"
)

// Store is a node's state store.
type Store struct {
	db *pebble.DB
	// journalsRead counts the journals Events has decoded: what serving
	// entity streams costs (JournalsRead).
	journalsRead atomic.Int64
}

// JournalsRead returns how many journal records Events has read since the
// store was opened. Reading one entity's stream reads its journals only,
// whatever the size of its partition.
func (s *Store) JournalsRead() int64 { return s.journalsRead.Load() }

// Pebble's memory budget. Pebble reserves the memory of its memtables (the
// mutable one and any being flushed) out of the block cache, so a cache no
// larger than the memtables caches nothing: every bloom filter and index
// block would be read from the file system and checksummed again on every
// lookup. The cache is sized so that blockCacheSize is left for blocks while
// two memtables are reserved; it allocates only what it caches.
const (
	memTableSize   = 64 << 20
	blockCacheSize = 64 << 20
)

// Open opens (creating if needed) the store in dir.
func Open(dir string) (*Store, error) {
	opts := &pebble.Options{
		Logger: quietLogger{},
		// Every command looks up its id (idempotency), and most ids are new:
		// bloom filters answer those misses without reading data blocks.
		Cache: pebble.NewCache(blockCacheSize + 2*memTableSize),
		// No write-ahead log: the changelog is the store's log. Data and
		// checkpoint share every batch, so a crash loses whole recent
		// batches together with their checkpoint, and the restore that
		// follows reads them back from the changelog (Kafka Streams runs
		// RocksDB the same way). Close flushes, so a clean stop loses nothing.
		DisableWAL:   true,
		MemTableSize: memTableSize,
	}
	opts.EnsureDefaults()
	for i := range opts.Levels {
		opts.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
		if i < 3 {
			// Young levels are rewritten soon: compressing them costs
			// write-path CPU for little space.
			opts.Levels[i].Compression = func() *sstable.CompressionProfile { return sstable.NoCompression }
		}
	}
	db, err := pebble.Open(dir, opts)
	opts.Cache.Unref()
	if err != nil {
		return nil, fmt.Errorf("statestore: open %s: %w", dir, err)
	}
	return &Store{db: db}, nil
}

// Close flushes the memtable (there is no write-ahead log) and closes the
// store.
func (s *Store) Close() error {
	flushErr := s.db.Flush()
	return errors.Join(flushErr, s.db.Close())
}

// Task identifies one task's key range.
type Task struct {
	Type      string
	Partition int32
}

func (t Task) String() string { return fmt.Sprintf("%s/%d", t.Type, t.Partition) }

// Prefix returns the task's key prefix.
func (t Task) Prefix() []byte {
	return t.appendPrefix(make([]byte, 0, t.prefixLen()))
}

// prefixLen is the length of the task's key prefix.
func (t Task) prefixLen() int { return len(t.Type) + 8 }

// appendPrefix appends the task's key prefix to b.
func (t Task) appendPrefix(b []byte) []byte {
	b = append(b, 't', 0)
	b = append(b, t.Type...)
	b = append(b, 0)
	b = binary.BigEndian.AppendUint32(b, uint32(t.Partition))
	return append(b, 0)
}

// Key kinds within a task.
const (
	KindState   = 's'
	KindJournal = 'j'
	KindCommand = 'c'
	KindMeta    = 'm'
	KindRow     = 'r'
)

// RowKey is the task-relative key of a group-by projection's entity row.
func RowKey(id string) []byte { return append([]byte{KindRow, 0}, id...) }

// inputOffsetPrefix starts the keys of a projection task's input offsets.
var inputOffsetPrefix = []byte{KindMeta, 0, 'i', 'n', 0}

// InputOffsetKey is the key of a projection task's input offset in topic:
// the offset after the last record of that topic (on the task's partition)
// the store holds the effects of. Like the command offset it travels on the
// changelog.
func InputOffsetKey(topic string) []byte {
	return append(bytes.Clone(inputOffsetPrefix), topic...)
}

// IsInputOffsetKey reports whether key is an InputOffsetKey.
func IsInputOffsetKey(key []byte) bool {
	return len(key) > len(inputOffsetPrefix) && bytes.HasPrefix(key, inputOffsetPrefix)
}

// StateKey is the task-relative key of an entity's state.
func StateKey(id string) []byte { return append([]byte{KindState, 0}, id...) }

// JournalKey is the task-relative key of an entity's journal whose first
// event has version first. A journal without events (its commands wrote
// none) is keyed by its time in unix nanoseconds instead, which sorts after
// every real version.
func JournalKey(id string, first int64) []byte {
	b := make([]byte, 0, len(id)+11)
	b = append(b, KindJournal, 0)
	b = append(b, id...)
	b = append(b, 0)
	return binary.BigEndian.AppendUint64(b, uint64(first))
}

// CommandKey is the task-relative key of a command outcome.
func CommandKey(commandID string) []byte { return append([]byte{KindCommand, 0}, commandID...) }

var checkpointKey = []byte{KindMeta, 0, 'c', 'h', 'e', 'c', 'k', 'p', 'o', 'i', 'n', 't'}

// CommandOffsetKey is the key of a task's command offset: the offset after
// the last command the task's store holds the effects of. Unlike the
// checkpoint it travels on the changelog (changelog.Apply), so every copy of
// the task knows which commands it has processed.
var CommandOffsetKey = []byte{KindMeta, 0, 'c', 'o', 'm', 'm', 'a', 'n', 'd', 's'}

// StateVersionKey is the key of the state version a task's state records
// were folded with (aggregate.StateVersion; 8 bytes big-endian). Like the
// command offset it travels on the changelog, so a copy restored from it
// knows the fold of the state it holds. Absent means version 1; 0 means
// unknown (a rebuild began writing to the changelog and did not finish).
var StateVersionKey = []byte{KindMeta, 0, 's', 't', 'a', 't', 'e', 'v', 'e', 'r', 's', 'i', 'o', 'n'}

// StateVersion returns the state version a task's state was folded with: 1
// when none is recorded.
func (s *Store) StateVersion(t Task) (int64, error) {
	v, ok, err := s.Get(t, StateVersionKey)
	if err != nil || !ok {
		return 1, err
	}
	if len(v) != 8 {
		return 0, fmt.Errorf("statestore: task %s: corrupt state version", t)
	}
	return int64(binary.BigEndian.Uint64(v)), nil
}

func join(prefix, key []byte) []byte {
	out := make([]byte, 0, len(prefix)+len(key))
	return append(append(out, prefix...), key...)
}

// Get returns a copy of the value at a task-relative key; found is false when
// the key is absent.
func (s *Store) Get(t Task, key []byte) (value []byte, found bool, err error) {
	v, closer, err := s.db.Get(join(t.Prefix(), key))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	defer closer.Close()
	return bytes.Clone(v), true, nil
}

// Checkpoint returns the task's next changelog offset to restore from (0
// when the task has never been restored here).
func (s *Store) Checkpoint(t Task) (int64, error) {
	v, ok, err := s.Get(t, checkpointKey)
	if err != nil || !ok {
		return 0, err
	}
	if len(v) != 8 {
		return 0, fmt.Errorf("statestore: task %s: corrupt checkpoint", t)
	}
	return int64(binary.BigEndian.Uint64(v)), nil
}

// CommandOffset returns the task's command offset (0 when none is stored).
func (s *Store) CommandOffset(t Task) (int64, error) {
	v, ok, err := s.Get(t, CommandOffsetKey)
	if err != nil || !ok {
		return 0, err
	}
	if len(v) != 8 {
		return 0, fmt.Errorf("statestore: task %s: corrupt command offset", t)
	}
	return int64(binary.BigEndian.Uint64(v)), nil
}

// InputOffset returns a projection task's input offset in topic (0 when
// none is stored).
func (s *Store) InputOffset(t Task, topic string) (int64, error) {
	v, ok, err := s.Get(t, InputOffsetKey(topic))
	if err != nil || !ok {
		return 0, err
	}
	if len(v) != 8 {
		return 0, fmt.Errorf("statestore: task %s: corrupt input offset of %s", t, topic)
	}
	return int64(binary.BigEndian.Uint64(v)), nil
}

// StateEntry is one state record with its key, as Scan returns it.
type StateEntry struct {
	ID     string
	Record StateRecord
}

// Scan returns the task's state records whose ids start with prefix and
// sort after after (both may be empty), in id order, at most limit of them
// (limit ≤ 0: no limit). The cost is proportional to the records returned.
func (s *Store) Scan(t Task, prefix, after string, limit int) ([]StateEntry, error) {
	tp := t.Prefix()
	lower := join(tp, StateKey(prefix))
	upper := join(tp, []byte{KindState, 1})
	if end, ok := prefixEnd(lower); ok && prefix != "" {
		upper = end
	}
	opts := &pebble.IterOptions{LowerBound: lower, UpperBound: upper}
	it, err := s.db.NewIter(opts)
	if err != nil {
		return nil, err
	}
	defer it.Close()
	valid := it.First()
	if after != "" {
		// The first key strictly after "after": its key with a 0x00 appended.
		valid = it.SeekGE(append(join(tp, StateKey(after)), 0))
	}
	var out []StateEntry
	for ; valid; valid = it.Next() {
		v, err := it.ValueAndErr()
		if err != nil {
			return nil, err
		}
		rec, err := DecodeStateRecord(v)
		if err != nil {
			return nil, fmt.Errorf("statestore: task %s: state of %q: %w", t, it.Key()[len(tp)+2:], err)
		}
		rec.State = bytes.Clone(rec.State)
		out = append(out, StateEntry{ID: string(it.Key()[len(tp)+2:]), Record: rec})
		if limit > 0 && len(out) >= limit {
			break
		}
	}
	return out, it.Error()
}

// prefixEnd returns the smallest key after every key starting with p.
func prefixEnd(p []byte) ([]byte, bool) {
	end := bytes.Clone(p)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1], true
		}
	}
	return nil, false
}

// Events returns the entity's events with version ≥ from, in version
// order, at most limit of them (limit ≤ 0: no limit). It seeks the journal
// holding version from and reads forward: the cost is proportional to the
// events returned, not to the partition.
func (s *Store) Events(t Task, id string, from int64, limit int) ([]aggregate.Event, error) {
	from = max(from, 0)
	prefix := t.Prefix()
	it, err := s.db.NewIter(journalRange(prefix, id))
	if err != nil {
		return nil, err
	}
	defer it.Close()
	// The journal holding version from is the last one starting at or
	// before it.
	valid := it.SeekLT(join(prefix, JournalKey(id, from+1)))
	if !valid {
		valid = it.First()
	}
	var out []aggregate.Event
	for ; valid; valid = it.Next() {
		v, err := it.ValueAndErr()
		if err != nil {
			return nil, err
		}
		s.journalsRead.Add(1)
		j, err := DecodeJournal(id, v)
		if err != nil {
			return nil, fmt.Errorf("statestore: task %s: journal of %q: %w", t, id, err)
		}
		for _, e := range j.Events {
			if e.Version < from {
				continue
			}
			e.Data = bytes.Clone(e.Data) // the iterator reuses its buffers
			out = append(out, e)
			if limit > 0 && len(out) >= limit {
				return out, nil
			}
		}
	}
	return out, it.Error()
}

// journalRange bounds the keys of one entity's journals in a task.
func journalRange(prefix []byte, id string) *pebble.IterOptions {
	lower := join(prefix, JournalKey(id, 0))
	upper := bytes.Clone(lower)
	upper[len(upper)-9] = 1 // the byte after the 0x00 that ends the id
	return &pebble.IterOptions{LowerBound: lower, UpperBound: upper[:len(upper)-8]}
}

// JournalKeys returns the task-relative keys of every journal of the
// entity: what forgetting it deletes.
func (s *Store) JournalKeys(t Task, id string) ([][]byte, error) {
	prefix := t.Prefix()
	it, err := s.db.NewIter(journalRange(prefix, id))
	if err != nil {
		return nil, err
	}
	defer it.Close()
	var keys [][]byte
	for valid := it.First(); valid; valid = it.Next() {
		keys = append(keys, bytes.Clone(it.Key()[len(prefix):]))
	}
	return keys, it.Error()
}

// DropTask deletes every key of a task, checkpoint included.
func (s *Store) DropTask(t Task) error {
	p := t.Prefix()
	end := bytes.Clone(p)
	end[len(end)-1] = 1
	return s.db.DeleteRange(p, end, pebble.NoSync)
}

// DropTypes deletes every key of every task whose type starts with prefix.
func (s *Store) DropTypes(prefix string) error {
	lower := append([]byte{'t', 0}, prefix...)
	upper, ok := prefixEnd(lower)
	if !ok {
		return errors.New("statestore: no upper bound for the prefix")
	}
	return s.db.DeleteRange(lower, upper, pebble.NoSync)
}

// Batch stages writes to one or more tasks; nothing is visible until Commit.
type Batch struct {
	b *pebble.Batch
}

// NewBatch starts a batch.
func (s *Store) NewBatch() *Batch { return &Batch{b: s.db.NewBatch()} }

// Set stages a write of a task-relative key. The full key is written
// straight into the batch: the write path stages several keys per command,
// so no temporary key is built.
func (b *Batch) Set(t Task, key, value []byte) error {
	op := b.b.SetDeferred(t.prefixLen()+len(key), len(value))
	putKey(op.Key, t, key)
	copy(op.Value, value)
	return op.Finish()
}

// Delete stages a deletion of a task-relative key.
func (b *Batch) Delete(t Task, key []byte) error {
	op := b.b.DeleteDeferred(t.prefixLen() + len(key))
	putKey(op.Key, t, key)
	return op.Finish()
}

// putKey writes t's prefix and key into dst, which is exactly as long as
// both. The prefix is appended in place; should appendPrefix and prefixLen
// ever disagree, the append would move to a new array and leave dst
// unwritten, so that is checked.
func putKey(dst []byte, t Task, key []byte) {
	n := t.prefixLen()
	if p := t.appendPrefix(dst[:0:n]); len(p) != n {
		panic(fmt.Sprintf("statestore: prefix of %s is %d bytes, prefixLen says %d", t, len(p), n))
	}
	copy(dst[n:], key)
}

// DeleteStates stages the deletion of every state record of a task (its
// 's' keys; nothing else). Writes staged after it in the batch survive it.
func (b *Batch) DeleteStates(t Task) error {
	p := t.Prefix()
	return b.b.DeleteRange(join(p, []byte{KindState, 0}), join(p, []byte{KindState, 1}), nil)
}

// DropTask stages the deletion of every key of a task, checkpoint included.
func (b *Batch) DropTask(t Task) error {
	p := t.Prefix()
	end := bytes.Clone(p)
	end[len(end)-1] = 1
	return b.b.DeleteRange(p, end, nil)
}

// SetCheckpoint stages the task's next changelog offset.
func (b *Batch) SetCheckpoint(t Task, next int64) error {
	return b.Set(t, checkpointKey, binary.BigEndian.AppendUint64(nil, uint64(next)))
}

// Len reports the number of staged operations.
func (b *Batch) Len() int { return int(b.b.Count()) }

// Commit applies the batch atomically. It does not wait for fsync: a crash
// may lose the last batches, but never half of one, and the changelog after
// the (equally lost) checkpoint restores them.
func (b *Batch) Commit() error {
	defer b.b.Close()
	return b.b.Commit(pebble.NoSync)
}

// Discard drops the staged writes.
func (b *Batch) Discard() { _ = b.b.Close() }

type quietLogger struct{}

func (quietLogger) Infof(string, ...interface{})  {}
func (quietLogger) Errorf(string, ...interface{}) {}
func (quietLogger) Fatalf(format string, args ...interface{}) {
	panic(fmt.Sprintf(format, args...))
}

var _ io.Closer = (*Store)(nil)

// Commands looks up the outcome records of many command ids at once, with
// one iterator seeking in key order: far cheaper than a Get per id when most
// ids are absent, as they are on the write path. The map holds the ids found.
func (s *Store) Commands(t Task, ids []string) (map[string][]byte, error) {
	if len(ids) == 0 {
		return nil, nil
	}
	keys := make([][]byte, len(ids))
	prefix := t.Prefix()
	for i, id := range ids {
		k := make([]byte, 0, len(prefix)+2+len(id)) // join(prefix, CommandKey(id))
		k = append(k, prefix...)
		k = append(k, KindCommand, 0)
		keys[i] = append(k, id...)
	}
	slices.SortFunc(keys, bytes.Compare)
	lower := join(prefix, []byte{KindCommand, 0})
	upper := join(prefix, []byte{KindCommand, 1})
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
	if err != nil {
		return nil, err
	}
	defer it.Close()
	var found map[string][]byte
	skip := len(prefix) + 2
	for i, k := range keys {
		if i > 0 && bytes.Equal(k, keys[i-1]) {
			continue
		}
		if !it.SeekPrefixGE(k) || !bytes.Equal(it.Key(), k) {
			continue
		}
		v, err := it.ValueAndErr()
		if err != nil {
			return nil, err
		}
		if found == nil {
			found = map[string][]byte{}
		}
		found[string(k[skip:])] = bytes.Clone(v)
	}
	return found, it.Error()
}

// SweepCommands deletes the task's command outcomes older than cutoff (unix
// nanoseconds): the idempotency window has passed for them. It scans at most
// maxScan records, starting at the command id resume (empty: from the
// start), and returns the id to resume at next time (empty once it reached
// the end), so a caller can spread a sweep of millions of records over many
// short calls.
func (s *Store) SweepCommands(t Task, cutoff int64, maxScan int, resume string) (deleted int, next string, err error) {
	prefix := t.Prefix()
	lower := join(prefix, []byte{KindCommand, 0})
	it, err := s.db.NewIter(&pebble.IterOptions{
		LowerBound: lower,
		UpperBound: join(prefix, []byte{KindCommand, 1}),
	})
	if err != nil {
		return 0, "", err
	}
	defer it.Close()
	b := s.db.NewBatch()
	defer b.Close()
	valid := it.First()
	if resume != "" {
		valid = it.SeekGE(join(prefix, CommandKey(resume)))
	}
	for scanned := 0; valid; valid = it.Next() {
		if scanned >= maxScan {
			next = string(it.Key()[len(lower):])
			break
		}
		scanned++
		v, err := it.ValueAndErr()
		if err != nil {
			return 0, "", err
		}
		if rec, err := DecodeCommandRecord(v); err == nil && rec.At >= cutoff {
			continue
		}
		if err := b.Delete(it.Key(), nil); err != nil {
			return 0, "", err
		}
		deleted++
	}
	if err := it.Error(); err != nil {
		return 0, "", err
	}
	if deleted > 0 {
		err = b.Commit(pebble.NoSync)
	}
	return deleted, next, err
}
