// Package changelog writes and restores the compacted changelog topics that
// back the state stores ("<app>-<type>-changelog", one partition per task).
//
// Three kinds of record travel on a changelog, keyed by task-relative store
// keys and valued with the store's own record formats (package statestore):
//
//	's' 0x00 <id>                 the entity's state (statestore.StateRecord);
//	                              compaction keeps only the newest one.
//	'j' 0x00 <id> 0x00 <version>  a journal (statestore.Journal): the events one
//	                              transaction wrote for one entity and the ids
//	                              of the commands that wrote them.
//
//	'm' 0x00 "commands"           the task's command offset: the offset after
//	                              the last command whose effects the store
//	                              holds (8 bytes, big-endian); one key per task.
//	'm' 0x00 "stateversion"       the aggregate's state version the state records
//	                              were folded with (8 bytes; absent: 1). A
//	                              rebuild writes 0 first, then every rebuilt
//	                              state record, then the new version: the newest
//	                              record wins, so a copy restored from an
//	                              interrupted rebuild knows its state is mixed.
//
// A journal key is unique, so compaction never drops one: the journals are
// the entity's stream index and the idempotency memory. Apply stores both
// kinds verbatim and expands a journal's command ids into outcome records;
// the live write path stages exactly the same writes (StageJournal), so a
// restored store is the store the owner had.
package changelog

import (
	"bytes"
	"errors"
	"fmt"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/statestore"
)

// Topic returns the changelog topic of an aggregate type or projection.
func Topic(appID, name string) string {
	return appID + "-" + name + "-changelog"
}

// StateRecord returns the changelog key and value of an entity's state.
func StateRecord(id string, rec statestore.StateRecord) (key, value []byte) {
	return statestore.StateKey(id), rec.Encode()
}

// JournalRecord returns the changelog key and value of a journal. The journal
// must hold at least one event or command.
func JournalRecord(id string, j *statestore.Journal) (key, value []byte, err error) {
	var first int64
	switch {
	case len(j.Events) > 0:
		first = j.Events[0].Version
	case len(j.Commands) > 0:
		first = j.Commands[0].At // no events: key by time to stay unique
	default:
		return nil, nil, errors.New("changelog: empty journal")
	}
	return statestore.JournalKey(id, first), j.Encode(), nil
}

// Apply stages one changelog record read by a restore into the batch.
func Apply(b *statestore.Batch, t statestore.Task, key, value []byte) error {
	if len(key) < 2 || key[1] != 0 {
		return fmt.Errorf("changelog: task %s: malformed key %q", t, key)
	}
	switch key[0] {
	case statestore.KindMeta:
		// The only metadata a changelog carries are the command offset,
		// the state version and a projection's input offsets (the
		// checkpoint is local: it is the changelog's own offset).
		if !bytes.Equal(key, statestore.CommandOffsetKey) && !bytes.Equal(key, statestore.StateVersionKey) && !statestore.IsInputOffsetKey(key) || len(value) != 8 {
			return fmt.Errorf("changelog: task %s: malformed metadata record %q", t, key)
		}
		return b.Set(t, key, value)
	case statestore.KindState, statestore.KindRow:
		if value == nil {
			return b.Delete(t, key)
		}
		return b.Set(t, key, value)
	case statestore.KindJournal:
		if value == nil {
			return b.Delete(t, key)
		}
		id, ok := journalEntity(key)
		if !ok {
			return fmt.Errorf("changelog: task %s: malformed journal key %q", t, key)
		}
		// The write path only writes journals of valid entity ids. One
		// holding a 0x00 would also sit in the key range of another
		// entity's journals ("a\x00b" among "a"'s) and join its stream.
		if err := aggregate.ValidateEntityID(id); err != nil {
			return fmt.Errorf("changelog: task %s: journal key %q: %w", t, key, err)
		}
		j, err := statestore.DecodeJournal(id, value)
		if err != nil {
			return fmt.Errorf("changelog: task %s: journal %q: %w", t, key, err)
		}
		return StageJournal(b, t, key, value, &j)
	default:
		return fmt.Errorf("changelog: task %s: unknown record kind %q", t, key[0])
	}
}

// StageJournal stages a journal already in memory: the encoded journal under
// its key and one outcome record per command.
func StageJournal(b *statestore.Batch, t statestore.Task, key, value []byte, j *statestore.Journal) error {
	if err := b.Set(t, key, value); err != nil {
		return err
	}
	for _, c := range j.Commands {
		if err := b.Set(t, statestore.CommandKey(c.CommandID), c.Encode()); err != nil {
			return err
		}
	}
	return nil
}

// journalEntity extracts the entity id from 'j' 0x00 <id> 0x00 <8 bytes>.
func journalEntity(key []byte) (string, bool) {
	if len(key) < 2+1+8 || key[len(key)-9] != 0 {
		return "", false
	}
	return string(key[2 : len(key)-9]), true
}

// applyFetched stages one partition's fetched records into b for task: the
// records at or after next (earlier ones are already applied) and before end
// (end < 0: no bound), skipping transaction markers, and moves the task's
// checkpoint in the same batch. It returns the new next offset, the number
// of data records applied, and whether end was reached. A record at or past
// end also reaches it: compaction may have removed the records just before
// it. Restore and the standby Tailer both apply through it, so a restored
// store and a standby's store are written the same way.
func applyFetched(b *statestore.Batch, task statestore.Task, records []*kgo.Record, next, end int64) (newNext, applied int64, reached bool, err error) {
	start := next
	for _, r := range records {
		if end >= 0 && r.Offset >= end {
			next = end
			break
		}
		if r.Offset < next {
			continue
		}
		if !r.Attrs.IsControl() {
			if err := Apply(b, task, r.Key, r.Value); err != nil {
				return start, 0, false, err
			}
			applied++
		}
		next = r.Offset + 1
	}
	if next != start {
		if err := b.SetCheckpoint(task, next); err != nil {
			return start, 0, false, err
		}
	}
	return next, applied, end >= 0 && next >= end, nil
}
