package keyring

import (
	"errors"
	"log/slog"

	"github.com/cockroachdb/pebble/v2"
	"github.com/twmb/franz-go/pkg/kgo"
)

// WithCacheSize returns cfg with the memory cache bounded to n entities.
func WithCacheSize(cfg Config, n int) Config {
	cfg.cacheSize = n
	return cfg
}

// Applied returns how many key records, tombstones and markers k has read
// from the topic since New.
func Applied(k *Keyring) int64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.applied
}

// Cached returns how many entities k holds in memory.
func Cached(k *Keyring) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.entities)
}

// StoreDir returns the directory of k's local store; "" in memory.
func StoreDir(k *Keyring) string { return k.dir }

// NewKeyRecord returns the record of a new data key of the entity, as Seal
// writes it, without writing it.
func NewKeyRecord(k *Keyring, typ, id string) *kgo.Record {
	rec, err := k.newKeyRecord(entityName(typ, id))
	if err != nil {
		panic(err)
	}
	return rec
}

// NewKeyRecordID is NewKeyRecord with the given key id (16 hex digits).
func NewKeyRecordID(k *Keyring, typ, id, kid string) *kgo.Record {
	rec, err := k.newKeyRecordID(entityName(typ, id), kid)
	if err != nil {
		panic(err)
	}
	return rec
}

// PseudonymType is the keyring type of pseudonym secrets.
const PseudonymType = pseudonymType

// DropStoredTopicID deletes the topic id from the closed store in dir, as
// a store written while the brokers gave no topic ids would have it.
func DropStoredTopicID(dir string) error {
	db, err := openStore(dir, slog.Default())
	if err != nil {
		return err
	}
	if err := db.Delete([]byte{kindTopicID}, pebble.NoSync); err != nil {
		return err
	}
	return errors.Join(db.Flush(), db.Close())
}
