package keyring

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// The local store is a Pebble database holding what the keyring has read of
// the keys topic, so that a restart resumes reading where it stopped and
// memory holds only a cache (see the package doc). Its layout:
//
//	'k' <uvarint len(name)> <name> <key id, 16 hex>  a data key: partition (4 bytes), offset (8 bytes),
//	                                                 then the record's value as in the topic (the key wrapped)
//	'f' <uvarint len(name)> <name>                   a forgotten marker: the record's value
//	'o' <partition, 4 bytes>                         the next offset to read (8 bytes)
//	'i'                                              the id of the topic the offsets belong to (16 bytes)
//
// The length prefix keeps one entity's keys apart from another's whatever
// their ids hold. Nothing unwrapped is ever stored.
//
// Invariant: the records of one fetch batch and the offsets after them are
// written in one Pebble batch (applyFetches), so the stored offsets never run
// ahead of the stored records: after a crash the keyring resumes at offsets
// whose records are all in the store. There is no write-ahead log (as in the
// statestore): a crash loses whole recent batches together with their
// offsets, which the next start reads again from the topic; Close flushes.
const (
	kindKey     = 'k'
	kindMarker  = 'f'
	kindOffset  = 'o'
	kindTopicID = 'i'
)

// entityPrefix is the store key prefix of one entity's records of a kind.
func entityPrefix(kind byte, name string) []byte {
	b := make([]byte, 0, 1+binary.MaxVarintLen64+len(name)+16)
	b = append(b, kind)
	b = binary.AppendUvarint(b, uint64(len(name)))
	return append(b, name...)
}

func keyStoreKey(name, kid string) []byte { return append(entityPrefix(kindKey, name), kid...) }

func offsetStoreKey(p int32) []byte {
	return binary.BigEndian.AppendUint32([]byte{kindOffset}, uint32(p))
}

// keyRange bounds the store keys of every data key of one entity.
func keyRange(name string) (lower, upper []byte) {
	lower = entityPrefix(kindKey, name)
	// Key ids are hex digits, all below 0xff.
	return lower, append(bytes.Clone(lower), 0xff)
}

// encodeKey is the stored value of a data key record.
func encodeKey(p int32, offset int64, value []byte) []byte {
	b := make([]byte, 0, 12+len(value))
	b = binary.BigEndian.AppendUint32(b, uint32(p))
	b = binary.BigEndian.AppendUint64(b, uint64(offset))
	return append(b, value...)
}

// decodeKey reverses encodeKey.
func decodeKey(b []byte) (storedKey, error) {
	if len(b) < 12 {
		return storedKey{}, errors.New("short data key value")
	}
	sk := storedKey{part: int32(binary.BigEndian.Uint32(b)), off: int64(binary.BigEndian.Uint64(b[4:]))}
	v, ok := parseKeyValue(b[12:])
	if !ok {
		return storedKey{}, errors.New("malformed data key value")
	}
	sk.v = v
	return sk, nil
}

// openStore opens (creating if needed) the local store in dir, or in memory
// when dir is "". A store Pebble finds corrupt is deleted and created anew:
// it holds nothing the topic does not.
func openStore(dir string, log *slog.Logger) (*pebble.DB, error) {
	open := func() (*pebble.DB, error) {
		opts := &pebble.Options{
			Logger: pebbleLogger{log},
			Cache:  pebble.NewCache(8 << 20),
			// No write-ahead log: the keys topic is the store's log
			// (see the invariant above).
			DisableWAL: true,
		}
		if dir == "" {
			opts.FS = vfs.NewMem()
		} else if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, err
		}
		opts.EnsureDefaults()
		db, err := pebble.Open(dir, opts)
		opts.Cache.Unref()
		return db, err
	}
	db, err := open()
	if err != nil && dir != "" && pebble.IsCorruptionError(err) {
		log.Warn("keyring: the local key store is corrupt; deleting it and reading the keys topic from the start", "dir", dir, "err", err)
		if rmErr := os.RemoveAll(dir); rmErr != nil {
			return nil, fmt.Errorf("delete the corrupt store: %w", rmErr)
		}
		db, err = open()
	}
	return db, err
}

// readEntry reads one entity's keys and marker from the store.
func readEntry(db *pebble.DB, name string) (*entry, error) {
	e := &entry{keys: map[string]storedKey{}}
	lower, upper := keyRange(name)
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
	if err != nil {
		return nil, err
	}
	for it.First(); it.Valid(); it.Next() {
		kid := string(it.Key()[len(lower):])
		sk, err := decodeKey(it.Value())
		if err != nil {
			_ = it.Close()
			return nil, fmt.Errorf("data key %s: %w", kid, err)
		}
		e.keys[kid] = sk
	}
	if err := it.Close(); err != nil {
		return nil, err
	}
	_, closer, err := db.Get(entityPrefix(kindMarker, name))
	switch {
	case err == nil:
		e.forgotten = true
		_ = closer.Close()
	case !errors.Is(err, pebble.ErrNotFound):
		return nil, err
	}
	return e, nil
}

// storedKids lists the key ids of an entity the store holds.
func storedKids(db *pebble.DB, name string) ([]string, error) {
	lower, upper := keyRange(name)
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
	if err != nil {
		return nil, err
	}
	var kids []string
	for it.First(); it.Valid(); it.Next() {
		kids = append(kids, string(it.Key()[len(lower):]))
	}
	return kids, it.Close()
}

// readOffsets returns the stored next offsets and topic id.
func readOffsets(db *pebble.DB) (map[int32]int64, [16]byte, error) {
	var id [16]byte
	offsets := map[int32]int64{}
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: []byte{kindOffset}, UpperBound: []byte{kindOffset + 1}})
	if err != nil {
		return nil, id, err
	}
	for it.First(); it.Valid(); it.Next() {
		k, v := it.Key(), it.Value()
		if len(k) != 5 || len(v) != 8 {
			_ = it.Close()
			return nil, id, fmt.Errorf("malformed offset record %x", k)
		}
		offsets[int32(binary.BigEndian.Uint32(k[1:]))] = int64(binary.BigEndian.Uint64(v))
	}
	if err := it.Close(); err != nil {
		return nil, id, err
	}
	v, closer, err := db.Get([]byte{kindTopicID})
	switch {
	case err == nil:
		copy(id[:], v)
		_ = closer.Close()
	case !errors.Is(err, pebble.ErrNotFound):
		return nil, id, err
	}
	return offsets, id, nil
}

// resetStore records the topic id the offsets belong to, deleting
// everything else first when wipe is set.
func resetStore(db *pebble.DB, id [16]byte, wipe bool) error {
	b := db.NewBatch()
	defer b.Close()
	// Every store key starts with a kind byte below 0xff.
	if wipe {
		if err := b.DeleteRange([]byte{0}, []byte{0xff}, nil); err != nil {
			return err
		}
	}
	if err := b.Set([]byte{kindTopicID}, id[:], nil); err != nil {
		return err
	}
	return b.Commit(pebble.NoSync)
}

type pebbleLogger struct{ log *slog.Logger }

func (pebbleLogger) Infof(string, ...any) {}
func (l pebbleLogger) Errorf(format string, args ...any) {
	l.log.Warn("keyring: local key store: " + fmt.Sprintf(format, args...))
}
func (pebbleLogger) Fatalf(format string, args ...any) { panic(fmt.Sprintf(format, args...)) }
