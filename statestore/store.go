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
//	's' 0x00 <entity id>                          current state (StateRecord)
//	'e' 0x00 <entity id> 0x00 <version, 8 bytes>  one event (the entity's stream index)
//	'c' 0x00 <command id>                         command outcome (idempotency)
//	'm' 0x00 "checkpoint"                         next changelog offset to restore from
//
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

	"github.com/cockroachdb/pebble/v2"
)

// Store is a node's state store.
type Store struct {
	db *pebble.DB
}

// Open opens (creating if needed) the store in dir.
func Open(dir string) (*Store, error) {
	db, err := pebble.Open(dir, &pebble.Options{Logger: quietLogger{}})
	if err != nil {
		return nil, fmt.Errorf("statestore: open %s: %w", dir, err)
	}
	return &Store{db: db}, nil
}

// Close flushes and closes the store.
func (s *Store) Close() error { return s.db.Close() }

// Task identifies one task's key range.
type Task struct {
	Type      string
	Partition int32
}

func (t Task) String() string { return fmt.Sprintf("%s/%d", t.Type, t.Partition) }

// Prefix returns the task's key prefix.
func (t Task) Prefix() []byte {
	b := make([]byte, 0, len(t.Type)+8)
	b = append(b, 't', 0)
	b = append(b, t.Type...)
	b = append(b, 0)
	b = binary.BigEndian.AppendUint32(b, uint32(t.Partition))
	return append(b, 0)
}

// Key kinds within a task.
const (
	KindState   = 's'
	KindEvent   = 'e'
	KindCommand = 'c'
	KindMeta    = 'm'
)

// StateKey is the task-relative key of an entity's state.
func StateKey(id string) []byte { return append([]byte{KindState, 0}, id...) }

// EventKey is the task-relative key of one event of an entity.
func EventKey(id string, version int64) []byte {
	b := make([]byte, 0, len(id)+11)
	b = append(b, KindEvent, 0)
	b = append(b, id...)
	b = append(b, 0)
	return binary.BigEndian.AppendUint64(b, uint64(version))
}

// CommandKey is the task-relative key of a command outcome.
func CommandKey(commandID string) []byte { return append([]byte{KindCommand, 0}, commandID...) }

var checkpointKey = []byte{KindMeta, 0, 'c', 'h', 'e', 'c', 'k', 'p', 'o', 'i', 'n', 't'}

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

// Events calls fn for the entity's events with version ≥ from, in version
// order, at most limit of them (limit ≤ 0: no limit). It reads the index
// only: cost is proportional to the events returned, not to the partition.
func (s *Store) Events(t Task, id string, from int64, limit int, fn func(version int64, value []byte) error) error {
	prefix := t.Prefix()
	lower := join(prefix, EventKey(id, from))
	upper := join(prefix, EventKey(id, 0))
	upper = upper[:len(upper)-9]
	upper = append(upper, 1) // the byte after the 0x00 separator
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
	if err != nil {
		return err
	}
	defer it.Close()
	n := 0
	for valid := it.First(); valid; valid = it.Next() {
		k := it.Key()
		version := int64(binary.BigEndian.Uint64(k[len(k)-8:]))
		v, err := it.ValueAndErr()
		if err != nil {
			return err
		}
		if err := fn(version, v); err != nil {
			return err
		}
		n++
		if limit > 0 && n >= limit {
			break
		}
	}
	return it.Error()
}

// DropTask deletes every key of a task, checkpoint included.
func (s *Store) DropTask(t Task) error {
	p := t.Prefix()
	end := bytes.Clone(p)
	end[len(end)-1] = 1
	return s.db.DeleteRange(p, end, pebble.Sync)
}

// Batch stages writes to one or more tasks; nothing is visible until Commit.
type Batch struct {
	b *pebble.Batch
}

// NewBatch starts a batch.
func (s *Store) NewBatch() *Batch { return &Batch{b: s.db.NewBatch()} }

// Set stages a write of a task-relative key.
func (b *Batch) Set(t Task, key, value []byte) error {
	return b.b.Set(join(t.Prefix(), key), value, nil)
}

// Delete stages a deletion of a task-relative key.
func (b *Batch) Delete(t Task, key []byte) error {
	return b.b.Delete(join(t.Prefix(), key), nil)
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
