// Package changelog writes and restores the compacted changelog topics that
// back the state stores ("<app>-<type>-changelog", one partition per task).
//
// Two kinds of record travel on a changelog, keyed by task-relative store
// keys (see package statestore):
//
//	's' 0x00 <id>               the entity's state (statestore.StateRecord);
//	                            compaction keeps only the newest one.
//	'j' 0x00 <id> 0x00 <version> a journal: the events one transaction wrote
//	                            for one entity (first version in the key) and
//	                            the ids of the commands that wrote them.
//
// A journal key is unique, so compaction never drops one: the journals are
// the entity's stream index and the idempotency memory. Both the live write
// path and restore go through Apply, so a restored store is byte-for-byte the
// store the owner had.
package changelog

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/statestore"
)

// Topic returns the changelog topic of an aggregate type.
func Topic(appID, aggregateType string) string {
	return appID + "-" + aggregateType + "-changelog"
}

const kindJournal = 'j'

// Journal is what one transaction wrote for one entity.
type Journal struct {
	Events   []aggregate.Event          `json:"events"`
	Commands []statestore.CommandRecord `json:"commands"`
}

// StateRecord returns the changelog key and value of an entity's state.
func StateRecord(id string, rec statestore.StateRecord) (key, value []byte) {
	return statestore.StateKey(id), rec.Encode()
}

// JournalRecord returns the changelog key and value of a journal. The journal
// must hold at least one event or command.
func JournalRecord(id string, j Journal) (key, value []byte, err error) {
	var first int64
	if len(j.Events) > 0 {
		first = j.Events[0].Version
	} else if len(j.Commands) > 0 {
		first = j.Commands[0].At // no events: key by time to stay unique
	} else {
		return nil, nil, errors.New("changelog: empty journal")
	}
	key = make([]byte, 0, len(id)+11)
	key = append(key, kindJournal, 0)
	key = append(key, id...)
	key = append(key, 0)
	key = binary.BigEndian.AppendUint64(key, uint64(first))
	value, err = json.Marshal(j)
	return key, value, err
}

// Apply stages one changelog record into the batch: a state record is stored
// as is (a nil value deletes it), a journal is expanded into event index
// entries and command outcomes.
func Apply(b *statestore.Batch, t statestore.Task, key, value []byte) error {
	if len(key) < 2 || key[1] != 0 {
		return fmt.Errorf("changelog: task %s: malformed key %q", t, key)
	}
	switch key[0] {
	case statestore.KindState:
		if value == nil {
			return b.Delete(t, key)
		}
		return b.Set(t, key, value)
	case kindJournal:
		if value == nil {
			return nil // journals are never tombstoned today
		}
		var j Journal
		if err := json.Unmarshal(value, &j); err != nil {
			return fmt.Errorf("changelog: task %s: corrupt journal %q: %w", t, key, err)
		}
		for i := range j.Events {
			e := &j.Events[i]
			v, err := json.Marshal(e)
			if err != nil {
				return err
			}
			if err := b.Set(t, statestore.EventKey(e.EntityID, e.Version), v); err != nil {
				return err
			}
		}
		for _, c := range j.Commands {
			if err := b.Set(t, statestore.CommandKey(c.CommandID), c.Encode()); err != nil {
				return err
			}
		}
		return nil
	default:
		return fmt.Errorf("changelog: task %s: unknown record kind %q", t, key[0])
	}
}
