// Package keyring keeps the data keys that seal entities' personal fields
// (crypto-shredding; see aggregate.PersonalTag).
//
// Every entity with personal data gets its own random 256-bit data key. The
// key is wrapped (AES-256-GCM) by a master key that never leaves the nodes
// and is kept, wrapped, in the compacted topic "<app>-keys": one record per
// data key, keyed "<type>/<id>#<key id>", its value plain JSON
// {"master": master key id, "key": base64 wrapped key}. Every node reads the
// whole topic (a global table, as Kafka Streams' GlobalKTable), so any node
// can seal a command for any entity and open any event.
//
// What a node has read is kept in a local store (Config.Dir), as Kafka
// Streams keeps a global table in a local store with a checkpoint: a Pebble
// database holding every key record (wrapped, as in the topic), the
// forgotten markers and the next offset of every partition (see store.go). A
// restart resumes reading at the stored offsets instead of at the start of
// the topic, and memory holds only a bounded cache of entities, loaded from
// the store on a miss, so it does not grow with the number of entities.
// Without a Dir the store is kept in memory and every start reads the whole
// topic. The store is only a cache of the topic: deleting its directory
// costs one full read at the next start, and a store that does not match
// the topic (an offset beyond a partition's end, or another topic id: the
// topic was deleted and recreated, or this is another cluster) is wiped and
// read again from the start, with a warning.
//
// Forgetting an entity writes, in the engine's transaction, a tombstone for
// each of its data keys and a marker record "<type>/<id>" =
// {"forgotten": time}. Once compaction has removed the keys, nothing can
// open the entity's sealed fields, not even with the master key; the marker
// stays so that no node ever creates a new key for it. A tombstone deletes
// the key from the local store, and a marker all of the entity's keys.
//
// Invariants:
//   - A data key record is never overwritten: its record key names the key
//     id, so compaction keeps every key an entity ever had until the entity
//     is forgotten, and every ciphertext stays readable.
//   - Two nodes may create a key for the same entity at once; both keys are
//     valid. Sealing uses the entity's first key: the lowest (offset,
//     partition) of its key records, which the local store keeps with every
//     key, so it is the same on every node once both are read and at most a
//     few fields use another.
//   - A pseudonym secret ("esker.pseudonym/<scope>", see Pseudonym) is a
//     data key used as an HMAC key instead of a cipher, and every node must
//     use the same one. All secrets of a scope go to the partition of the
//     scope's name (an entity's keys go to the partitions of their own
//     record keys, so another partition's lower offset may not be read yet
//     there), and a node uses the one with the lowest offset only after
//     reading that partition past the one it wrote: all nodes agree.
//   - The master key id travels with every wrapped key: keys wrapped by an
//     older master key open as long as that master key is configured, which
//     is how a master key is rotated. The local store holds keys wrapped, as
//     the topic does, so it needs nothing when master keys change.
//   - The local store's offsets never run ahead of its records (one Pebble
//     batch per fetch; see store.go), and the memory cache is updated only
//     after that batch is written: an entry loaded from the store on a miss
//     is never older than what Sync has reported read.
package keyring

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/internal/backoff"
)

// Topic names an application's keys topic.
func Topic(appID string) string { return appID + "-keys" }

// MasterKey is a key-encryption key: 32 bytes and the id under which wrapped
// keys name it.
type MasterKey struct {
	ID  string
	Key []byte
}

// Config configures a Keyring.
type Config struct {
	AppID string
	// Partitions is the keys topic's partition count; a record goes to
	// the partition of its key (murmur2), so a tombstone meets its key.
	Partitions int32
	// Masters are the master keys; the first wraps new data keys, all of
	// them open existing ones.
	Masters []MasterKey
	// Dir is the directory of the local store, which the keyring owns
	// (see the package doc); "" keeps the store in memory, and every start
	// then reads the whole topic. When the directory cannot be opened (not
	// writable, or in use by another process), New logs a warning and
	// keeps the store in memory; a store Pebble finds corrupt is deleted
	// and read again from the topic.
	Dir string
	// ClientOpts connect to Kafka (seed brokers, TLS, SASL).
	ClientOpts []kgo.Opt
	Logger     *slog.Logger

	// cacheSize bounds the entities kept in memory; 0 means
	// maxCachedEntities (tests lower it).
	cacheSize int
}

// Keyring seals and opens entities' personal fields. It is safe for
// concurrent use.
type Keyring struct {
	cfg     Config
	topic   string
	masters map[string]cipher.AEAD
	current string
	client  *kgo.Client
	log     *slog.Logger
	dir     string // the local store's directory; "" in memory
	// db is the local store. Run is its only writer; readers use it
	// under mu, and Close sets it to nil once Run has returned.
	db *pebble.DB

	ready   chan struct{} // closed once Run has settled where reading resumes
	closing chan struct{} // closed by Close
	runDone chan struct{} // closed when Run returns

	mu        sync.Mutex
	running   bool
	closed    bool
	entities  map[string]*entry // a cache of the store, by "<type>/<id>"
	positions map[int32]int64   // next offset in the store per partition
	progress  chan struct{}     // closed and replaced whenever positions move
	aeads     map[string]cipher.AEAD
	creating  map[string]chan struct{}
	secrets   map[string][]byte // pseudonym secrets, by scope
	applied   int64             // key records and markers applied since New
}

// entry is what the keyring knows of one entity: the cached form of its
// records in the store.
type entry struct {
	keys      map[string]storedKey // key id → wrapped key
	forgotten bool
}

// storedKey is a wrapped data key and where its record is in the topic.
type storedKey struct {
	v    keyValue
	part int32
	off  int64
}

// first returns the id of the entity's first key in log order: the lowest
// (offset, partition, key id) of its key records; "" when it has none.
func (e *entry) first() string {
	var kid string
	var best storedKey
	for id, sk := range e.keys {
		if kid == "" || sk.off < best.off || sk.off == best.off && (sk.part < best.part || sk.part == best.part && id < kid) {
			kid, best = id, sk
		}
	}
	return kid
}

type keyValue struct {
	Master string `json:"master"`
	Key    []byte `json:"key"`
}

type marker struct {
	Forgotten time.Time `json:"forgotten"`
}

const (
	// maxCachedKeys bounds the unwrapped keys kept in memory.
	maxCachedKeys = 100_000
	// maxCachedEntities bounds the entities kept in memory.
	maxCachedEntities = 100_000
)

var errClosed = errors.New("keyring: closed")

// New validates the master keys, opens the local store and connects; Run
// must be called to read the keys topic. The topic must exist
// (EnsureTopic).
func New(cfg Config) (*Keyring, error) {
	if cfg.Partitions < 1 {
		return nil, errors.New("keyring: the partition count is not set")
	}
	if len(cfg.Masters) == 0 {
		return nil, errors.New("keyring: no master key is configured")
	}
	if cfg.cacheSize <= 0 {
		cfg.cacheSize = maxCachedEntities
	}
	k := &Keyring{
		cfg: cfg, topic: Topic(cfg.AppID), masters: map[string]cipher.AEAD{},
		current: cfg.Masters[0].ID, log: cfg.Logger,
		ready: make(chan struct{}), closing: make(chan struct{}), runDone: make(chan struct{}),
		entities: map[string]*entry{}, positions: map[int32]int64{},
		progress: make(chan struct{}), aeads: map[string]cipher.AEAD{}, creating: map[string]chan struct{}{},
		secrets: map[string][]byte{},
	}
	if k.log == nil {
		k.log = slog.Default()
	}
	for _, m := range cfg.Masters {
		if m.ID == "" || strings.ContainsAny(m.ID, " \t\n") {
			return nil, fmt.Errorf("keyring: master key id %q: use a non-empty id without spaces", m.ID)
		}
		if len(m.Key) != 32 {
			return nil, fmt.Errorf("keyring: master key %q is %d bytes; it must be 32 (AES-256)", m.ID, len(m.Key))
		}
		if _, dup := k.masters[m.ID]; dup {
			return nil, fmt.Errorf("keyring: master key id %q is given twice", m.ID)
		}
		a, err := newAEAD(m.Key)
		if err != nil {
			return nil, err
		}
		k.masters[m.ID] = a
	}
	k.dir = cfg.Dir
	db, err := openStore(k.dir, k.log)
	if err != nil && k.dir != "" {
		// The store is only a cache: without it the node works as it
		// did before it had one.
		k.log.Warn("keyring: cannot open the local key store; keeping keys in memory, so every start reads the whole keys topic", "dir", k.dir, "err", err)
		k.dir = ""
		db, err = openStore("", k.log)
	}
	if err != nil {
		return nil, fmt.Errorf("keyring: open the local key store: %w", err)
	}
	k.db = db
	// No topic to consume yet: Run adds the partitions at the offsets the
	// store holds, once it has checked them against the topic.
	opts := append(append([]kgo.Opt(nil), cfg.ClientOpts...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.KeepControlRecords(),
		kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.RecordPartitioner(kgo.ManualPartitioner()),
	)
	client, err := kgo.NewClient(opts...)
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("keyring: %w", err)
	}
	k.client = client
	return k, nil
}

// Close stops reading, closes the client, waits for Run to return and then
// flushes and closes the local store (a failure to flush is logged: the
// next start reads again what was lost). Afterwards the keyring's methods
// fail. Close may be called more than once.
func (k *Keyring) Close() {
	k.mu.Lock()
	if k.closed {
		k.mu.Unlock()
		return
	}
	k.closed = true
	close(k.closing)
	running := k.running
	k.mu.Unlock()
	k.client.Close()
	if running {
		<-k.runDone
	}
	k.mu.Lock()
	db := k.db
	k.db = nil
	k.mu.Unlock()
	var err error
	if k.dir != "" {
		err = db.Flush()
	}
	if err = errors.Join(err, db.Close()); err != nil {
		k.log.Warn("keyring: close the local key store", "dir", k.dir, "err", err)
	}
}

// Run reads the keys topic until ctx ends or the keyring is closed: first
// it checks the stored offsets against the topic (wiping the store when they
// do not match it), then it reads on from them. A failure to write the
// store is logged and the batch read again a second later.
func (k *Keyring) Run(ctx context.Context) error {
	k.mu.Lock()
	if k.running {
		k.mu.Unlock()
		return errors.New("keyring: Run called twice")
	}
	if k.closed {
		k.mu.Unlock()
		return nil
	}
	k.running = true
	k.mu.Unlock()
	defer close(k.runDone)
	for {
		err := k.resume(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil || errors.Is(err, kgo.ErrClientClosed) {
			return nil
		}
		k.log.Warn("keyring: describe the keys topic; retrying", "topic", k.topic, "err", err)
		if !backoff.Sleep(ctx, time.Second, k.closing) {
			return nil
		}
	}
	for {
		fetches := k.client.PollFetches(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if fetches.IsClientClosed() {
			return nil
		}
		fetches.EachError(func(t string, p int32, err error) {
			k.log.Warn("read keys topic", "topic", t, "partition", p, "err", err)
		})
		if err := k.applyFetches(fetches); err != nil {
			k.log.Error("keyring: write to the local key store; reading the batch again", "dir", k.dir, "err", err)
			if !backoff.Sleep(ctx, time.Second, k.closing) {
				return nil
			}
		}
	}
}

// resume checks the store's offsets against the topic, wipes the store when
// they do not belong to it, and starts consuming every partition at its
// stored offset (or at its start).
func (k *Keyring) resume(ctx context.Context) error {
	adm := kadm.NewClient(k.client)
	topics, err := adm.ListTopics(ctx, k.topic)
	if err != nil {
		return err
	}
	detail, ok := topics[k.topic]
	if !ok {
		return fmt.Errorf("topic %s does not exist", k.topic)
	}
	if detail.Err != nil {
		return detail.Err
	}
	ends, err := adm.ListEndOffsets(ctx, k.topic)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		return err
	}
	positions, storedID, err := readOffsets(k.db)
	id := [16]byte(detail.ID)
	reason := ""
	switch {
	case err != nil:
		reason = fmt.Sprintf("its offsets do not read: %v", err)
	case storedID != [16]byte{} && id != [16]byte{} && storedID != id:
		reason = "it was written for another topic of that name (deleted and recreated, or on another cluster)"
	default:
		for _, p := range slices.Sorted(maps.Keys(positions)) {
			end, ok := ends.Lookup(k.topic, p)
			if !ok {
				reason = fmt.Sprintf("it has an offset for partition %d, which the topic does not have", p)
				break
			}
			if positions[p] > end.Offset {
				reason = fmt.Sprintf("its offset %d of partition %d is beyond the partition's end %d (the topic was recreated, or this is another cluster)", positions[p], p, end.Offset)
				break
			}
		}
	}
	wiped := reason != ""
	if wiped {
		k.log.Warn("keyring: the local key store does not match the keys topic; wiping it and reading the topic from the start",
			"topic", k.topic, "dir", k.dir, "reason", reason)
		positions = map[int32]int64{}
	}
	if wiped || storedID != id {
		if err := resetStore(k.db, id, wiped); err != nil {
			return fmt.Errorf("local key store: %w", err)
		}
	}
	offsets := map[int32]kgo.Offset{}
	for p := range detail.Partitions {
		if off, ok := positions[p]; ok {
			offsets[p] = kgo.NewOffset().At(off)
		} else {
			offsets[p] = kgo.NewOffset().AtStart()
		}
	}
	k.mu.Lock()
	if wiped {
		clear(k.entities)
		clear(k.aeads)
		clear(k.secrets)
	}
	k.positions = positions
	close(k.ready)
	k.mu.Unlock()
	k.client.AddConsumePartitions(map[string]map[int32]kgo.Offset{k.topic: offsets})
	return nil
}

// op is one keys record, parsed.
type op struct {
	kind      opKind
	name, kid string
	key       storedKey // opKey
	raw       []byte    // the record's value (opKey, opForget)
}

type opKind int

const (
	opNone    opKind = iota // not a keys record: ignored
	opKey                   // a data key
	opDestroy               // a data key's tombstone
	opForget                // a forgotten marker
)

// parseRecord parses one keys record.
func parseRecord(r *kgo.Record) op {
	key := string(r.Key)
	name, kid, isKey := splitKeyID(key)
	if r.Value == nil {
		if isKey {
			return op{kind: opDestroy, name: name, kid: kid}
		}
		return op{}
	}
	if isKey {
		if v, ok := parseKeyValue(r.Value); ok {
			return op{kind: opKey, name: name, kid: kid, key: storedKey{v: v, part: r.Partition, off: r.Offset}, raw: r.Value}
		}
	}
	var m marker
	if err := json.Unmarshal(r.Value, &m); err == nil && !m.Forgotten.IsZero() {
		return op{kind: opForget, name: key, raw: r.Value}
	}
	return op{}
}

func parseKeyValue(b []byte) (keyValue, bool) {
	var v keyValue
	if err := json.Unmarshal(b, &v); err != nil || v.Key == nil {
		return keyValue{}, false
	}
	return v, true
}

// apply folds one record into a cached entry and returns the ids of the
// keys it destroys. Applying records again to an entry that already holds
// them changes nothing (applyFetches relies on it).
func (e *entry) apply(o op) []string {
	switch o.kind {
	case opKey:
		e.keys[o.kid] = o.key
	case opDestroy:
		delete(e.keys, o.kid)
		return []string{o.kid}
	case opForget:
		e.forgotten = true
		kids := slices.Collect(maps.Keys(e.keys))
		clear(e.keys)
		return kids
	}
	return nil
}

// stage writes one record's effect into the store batch and returns the ids
// of the stored keys it destroys.
func (k *Keyring) stage(b *pebble.Batch, o op) ([]string, error) {
	switch o.kind {
	case opKey:
		return nil, b.Set(keyStoreKey(o.name, o.kid), encodeKey(o.key.part, o.key.off, o.raw), nil)
	case opDestroy:
		return []string{o.kid}, b.Delete(keyStoreKey(o.name, o.kid), nil)
	case opForget:
		// Run is the store's only writer: what it reads is what the
		// batch's earlier commits left.
		kids, err := storedKids(k.db, o.name)
		if err != nil {
			return nil, err
		}
		lower, upper := keyRange(o.name)
		if err := b.DeleteRange(lower, upper, nil); err != nil {
			return nil, err
		}
		return kids, b.Set(entityPrefix(kindMarker, o.name), o.raw, nil)
	}
	return nil, nil
}

// applyFetches writes one fetch's records and the offsets after them to the
// store in one batch (the store's invariant), then updates the cached
// entries and the positions. When the batch cannot be written, the
// partitions are rewound to the stored positions to read it again.
func (k *Keyring) applyFetches(fetches kgo.Fetches) error {
	var ops []op
	var destroyed []string
	next := map[int32]int64{}
	b := k.db.NewBatch()
	defer b.Close()
	var err error
	fetches.EachRecord(func(r *kgo.Record) {
		next[r.Partition] = max(next[r.Partition], r.Offset+1)
		if err != nil || r.Attrs.IsControl() {
			return
		}
		o := parseRecord(r)
		if o.kind == opNone {
			return
		}
		var kids []string
		kids, err = k.stage(b, o)
		destroyed = append(destroyed, kids...)
		ops = append(ops, o)
	})
	if len(next) == 0 {
		return nil
	}
	for p, off := range next {
		if err == nil {
			err = b.Set(offsetStoreKey(p), binary.BigEndian.AppendUint64(nil, uint64(off)), nil)
		}
	}
	if err == nil {
		err = b.Commit(pebble.NoSync)
	}
	if err != nil {
		rewind := map[int32]kgo.EpochOffset{}
		k.mu.Lock()
		for p := range next {
			rewind[p] = kgo.EpochOffset{Epoch: -1, Offset: k.positions[p]}
		}
		k.mu.Unlock()
		k.client.SetOffsets(map[string]map[int32]kgo.EpochOffset{k.topic: rewind})
		return err
	}
	// A reader that loaded an entry between the commit and here has these
	// records already; applying them again changes nothing.
	k.mu.Lock()
	for _, o := range ops {
		if e := k.entities[o.name]; e != nil {
			destroyed = append(destroyed, e.apply(o)...)
		}
	}
	for _, kid := range destroyed {
		delete(k.aeads, kid)
	}
	for p, off := range next {
		if off > k.positions[p] {
			k.positions[p] = off
		}
	}
	k.applied += int64(len(ops))
	close(k.progress)
	k.progress = make(chan struct{})
	k.mu.Unlock()
	return nil
}

// lookupLocked returns the entity's entry, loading it from the store when it
// is not cached (an entity without records gets an empty entry, cached too);
// k.mu is held.
func (k *Keyring) lookupLocked(name string) (*entry, error) {
	if e := k.entities[name]; e != nil {
		return e, nil
	}
	if k.db == nil {
		return nil, errClosed
	}
	e, err := readEntry(k.db, name)
	if err != nil {
		return nil, fmt.Errorf("keyring: read the keys of %s from the local key store: %w", name, err)
	}
	if len(k.entities) >= k.cfg.cacheSize {
		for n := range k.entities { // evict one at random
			delete(k.entities, n)
			break
		}
	}
	k.entities[name] = e
	return e, nil
}

// splitKeyID splits "<type>/<id>#<16 hex>" into "<type>/<id>" and the key id.
func splitKeyID(key string) (name, kid string, ok bool) {
	i := len(key) - 17
	if i < 1 || key[i] != '#' {
		return "", "", false
	}
	if _, err := hex.DecodeString(key[i+1:]); err != nil {
		return "", "", false
	}
	return key[:i], key[i+1:], true
}

func entityName(typ, id string) string { return typ + "/" + id }

// Sync waits until the keyring has read every key committed to the topic
// before the call: a key another node just created is then known. It fails
// when the offsets cannot be listed, ctx ends first or the keyring is
// closed.
func (k *Keyring) Sync(ctx context.Context) error {
	ends, err := kadm.NewClient(k.client).ListCommittedOffsets(ctx, k.topic)
	if err != nil {
		return fmt.Errorf("keyring: list offsets of %s: %w", k.topic, err)
	}
	if err := ends.Error(); err != nil {
		return fmt.Errorf("keyring: list offsets of %s: %w", k.topic, err)
	}
	// Until Run has checked the stored offsets against the topic, they
	// may belong to another topic.
	select {
	case <-k.ready:
	case <-k.closing:
		return errClosed
	case <-ctx.Done():
		return fmt.Errorf("keyring: reading %s: %w", k.topic, ctx.Err())
	}
	for {
		k.mu.Lock()
		behind := false
		ends.Each(func(o kadm.ListedOffset) {
			if k.positions[o.Partition] < o.Offset {
				behind = true
			}
		})
		wait := k.progress
		k.mu.Unlock()
		if !behind {
			return nil
		}
		select {
		case <-wait:
		case <-k.closing:
			return errClosed
		case <-ctx.Done():
			return fmt.Errorf("keyring: reading %s: %w", k.topic, ctx.Err())
		}
	}
}

// Forgotten reports whether the entity was forgotten (as far as this node
// has read). When the local store cannot be read (or the keyring is
// closed), it logs the error and reports false.
func (k *Keyring) Forgotten(typ, id string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	e, err := k.lookupLocked(entityName(typ, id))
	if err != nil {
		k.log.Warn("keyring: cannot tell whether an entity was forgotten", "type", typ, "id", id, "err", err)
		return false
	}
	return e.forgotten
}

// ForgetRecords returns the records that forget the entity: a tombstone for
// each data key this node knows of, and the marker. The engine produces them
// in the transaction that writes the Forgotten event. Call Sync first so
// that a key just created elsewhere is included. When the local store cannot
// be read (or the keyring is closed), it logs the error and returns the
// marker alone: the entity reads as forgotten everywhere, but its keys stay
// in the topic.
func (k *Keyring) ForgetRecords(typ, id string, at time.Time) []*kgo.Record {
	name := entityName(typ, id)
	k.mu.Lock()
	defer k.mu.Unlock()
	var recs []*kgo.Record
	e, err := k.lookupLocked(name)
	if err != nil {
		k.log.Error("keyring: the data keys of a forgotten entity stay in the keys topic", "type", typ, "id", id, "err", err)
	} else {
		for _, kid := range slices.Sorted(maps.Keys(e.keys)) {
			recs = append(recs, k.record(name+"#"+kid, nil))
		}
	}
	v, _ := json.Marshal(marker{Forgotten: at.UTC()})
	return append(recs, k.record(name, v))
}

// Cipher returns the field cipher of one entity. Its Seal creates the
// entity's data key on first use (writing it to the keys topic before it
// returns); its Open returns "" for a forgotten entity.
func (k *Keyring) Cipher(ctx context.Context, typ, id string) aggregate.FieldCipher {
	return entityCipher{k: k, ctx: ctx, typ: typ, id: id}
}

type entityCipher struct {
	k       *Keyring
	ctx     context.Context
	typ, id string
}

func (c entityCipher) Seal(plaintext string) (string, error) {
	kid, _, a, err := c.k.sealingKey(c.ctx, c.typ, c.id)
	if err != nil {
		return "", err
	}
	nonce := make([]byte, a.NonceSize(), a.NonceSize()+len(plaintext)+a.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return "", err
	}
	sealed := a.Seal(nonce, nonce, []byte(plaintext), []byte(entityName(c.typ, c.id)))
	return aggregate.SealedPrefix + kid + ":" + base64.RawURLEncoding.EncodeToString(sealed), nil
}

func (c entityCipher) Open(sealed string) (string, error) {
	rest, ok := strings.CutPrefix(sealed, aggregate.SealedPrefix)
	kid, b64, ok2 := strings.Cut(rest, ":")
	if !ok || !ok2 {
		return "", fmt.Errorf("keyring: malformed sealed field")
	}
	raw, err := base64.RawURLEncoding.DecodeString(b64)
	if err != nil {
		return "", fmt.Errorf("keyring: malformed sealed field: %w", err)
	}
	a, forgotten, err := c.k.openingKey(c.ctx, c.typ, c.id, kid)
	if err != nil || forgotten {
		return "", err
	}
	if len(raw) < a.NonceSize() {
		return "", errors.New("keyring: malformed sealed field: too short")
	}
	plain, err := a.Open(nil, raw[:a.NonceSize()], raw[a.NonceSize():], []byte(entityName(c.typ, c.id)))
	if err != nil {
		return "", fmt.Errorf("keyring: sealed field of %s %q does not open with its key %s: %w", c.typ, c.id, kid, err)
	}
	return string(plain), nil
}

// sealingKey returns the entity's sealing key (its id, wrapped value and
// cipher), creating it when it has none.
func (k *Keyring) sealingKey(ctx context.Context, typ, id string) (string, keyValue, cipher.AEAD, error) {
	name := entityName(typ, id)
	for attempt := 0; ; attempt++ {
		k.mu.Lock()
		e, err := k.lookupLocked(name)
		if err != nil {
			k.mu.Unlock()
			return "", keyValue{}, nil, err
		}
		if e.forgotten {
			k.mu.Unlock()
			return "", keyValue{}, nil, fmt.Errorf("%w: %s %q", aggregate.ErrForgotten, typ, id)
		}
		if kid := e.first(); kid != "" {
			v := e.keys[kid].v
			a, err := k.unwrapLocked(name, kid, v)
			k.mu.Unlock()
			return kid, v, a, err
		}
		if attempt == 0 {
			// The key may have been created by another node a moment ago.
			k.mu.Unlock()
			if err := k.Sync(ctx); err != nil {
				return "", keyValue{}, nil, err
			}
			continue
		}
		if wait, busy := k.creating[name]; busy {
			k.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return "", keyValue{}, nil, ctx.Err()
			}
		}
		done := make(chan struct{})
		k.creating[name] = done
		k.mu.Unlock()
		err = k.create(ctx, name)
		k.mu.Lock()
		delete(k.creating, name)
		close(done)
		k.mu.Unlock()
		if err != nil {
			return "", keyValue{}, nil, err
		}
		if err := k.Sync(ctx); err != nil {
			return "", keyValue{}, nil, err
		}
		if attempt > 3 {
			return "", keyValue{}, nil, fmt.Errorf("keyring: the data key of %s %q was written but is not readable from %s", typ, id, k.topic)
		}
	}
}

// create writes a new data key for the entity.
func (k *Keyring) create(ctx context.Context, name string) error {
	rec, err := k.newKeyRecord(name)
	if err != nil {
		return err
	}
	if err := k.client.ProduceSync(ctx, rec).FirstErr(); err != nil {
		return fmt.Errorf("keyring: write the data key of %s to %s: %w", name, k.topic, err)
	}
	return nil
}

// newKeyRecord returns the record of a new data key for the entity.
func (k *Keyring) newKeyRecord(name string) (*kgo.Record, error) {
	var kidBytes [8]byte
	if _, err := rand.Read(kidBytes[:]); err != nil {
		return nil, err
	}
	return k.newKeyRecordID(name, hex.EncodeToString(kidBytes[:]))
}

// newKeyRecordID returns the record of a new data key with the given id.
func (k *Keyring) newKeyRecordID(name, kid string) (*kgo.Record, error) {
	var dataKey [32]byte
	if _, err := rand.Read(dataKey[:]); err != nil {
		return nil, err
	}
	master := k.masters[k.current]
	nonce := make([]byte, master.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	wrapped := master.Seal(nonce, nonce, dataKey[:], wrapAAD(name, kid))
	v, _ := json.Marshal(keyValue{Master: k.current, Key: wrapped})
	rec := k.record(name+"#"+kid, v)
	if strings.HasPrefix(name, pseudonymType+"/") {
		// Every secret of a scope on one partition: "first in log order"
		// is then one offset order, the same for every node (see the
		// invariants). Such records are never tombstoned.
		rec.Partition = aggregate.Partition(name, k.cfg.Partitions)
	}
	return rec, nil
}

// record is a keys record, on the partition of its key.
func (k *Keyring) record(key string, value []byte) *kgo.Record {
	return &kgo.Record{Topic: k.topic, Partition: aggregate.Partition(key, k.cfg.Partitions), Key: []byte(key), Value: value}
}

func wrapAAD(name, kid string) []byte { return []byte("esker-data-key|" + name + "#" + kid) }

// openingKey returns the key kid of the entity; forgotten is true (and the
// key nil) when the entity was forgotten.
func (k *Keyring) openingKey(ctx context.Context, typ, id, kid string) (a cipher.AEAD, forgotten bool, err error) {
	name := entityName(typ, id)
	for attempt := 0; attempt < 2; attempt++ {
		k.mu.Lock()
		e, err := k.lookupLocked(name)
		if err != nil {
			k.mu.Unlock()
			return nil, false, err
		}
		if e.forgotten {
			k.mu.Unlock()
			return nil, true, nil
		}
		if sk, ok := e.keys[kid]; ok {
			a, err := k.unwrapLocked(name, kid, sk.v)
			k.mu.Unlock()
			return a, false, err
		}
		k.mu.Unlock()
		if attempt == 0 {
			if err := k.Sync(ctx); err != nil {
				return nil, false, err
			}
		}
	}
	return nil, false, fmt.Errorf("keyring: %w: the data key %s of %s %q is not in %s (was the topic deleted, or the event written by another application?)", aggregate.ErrUnknownKey, kid, typ, id, k.topic)
}

// pseudonymType is the keyring type of pseudonym secrets; aggregate type
// names cannot contain a dot, so it names no entity.
const pseudonymType = "esker.pseudonym"

// Pseudonym returns the pseudonym of a personal value within a scope (a
// projection's name): 32 hex digits of HMAC-SHA256(secret, value), the
// same on every node and across restarts and master key rotations. The
// scope's secret is a data key created on first use; it is never
// forgotten, since the values it hides belong to many entities.
func (k *Keyring) Pseudonym(ctx context.Context, scope, value string) (string, error) {
	k.mu.Lock()
	secret := k.secrets[scope]
	k.mu.Unlock()
	if secret == nil {
		// sealingKey creates the secret if needed and settles on the
		// first in log order.
		kid, v, _, err := k.sealingKey(ctx, pseudonymType, scope)
		if err != nil {
			return "", fmt.Errorf("keyring: the pseudonym secret of %s: %w", scope, err)
		}
		secret, err = k.unwrapRaw(entityName(pseudonymType, scope), kid, v)
		if err != nil {
			return "", err
		}
		k.mu.Lock()
		k.secrets[scope] = secret
		k.mu.Unlock()
	}
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(value))
	return hex.EncodeToString(mac.Sum(nil)[:16]), nil
}

// unwrapLocked returns the AEAD of a data key; k.mu is held.
func (k *Keyring) unwrapLocked(name, kid string, v keyValue) (cipher.AEAD, error) {
	if a, ok := k.aeads[kid]; ok {
		return a, nil
	}
	dataKey, err := k.unwrapRaw(name, kid, v)
	if err != nil {
		return nil, err
	}
	a, err := newAEAD(dataKey)
	if err != nil {
		return nil, err
	}
	if len(k.aeads) >= maxCachedKeys {
		for kid := range k.aeads { // evict one at random
			delete(k.aeads, kid)
			break
		}
	}
	k.aeads[kid] = a
	return a, nil
}

// unwrapRaw unwraps a data key with its master key.
func (k *Keyring) unwrapRaw(name, kid string, v keyValue) ([]byte, error) {
	master, ok := k.masters[v.Master]
	if !ok {
		return nil, fmt.Errorf("keyring: the data key %s of %s is wrapped by master key %q, which this node does not have; configure it (old master keys stay configured after a rotation)", kid, name, v.Master)
	}
	if len(v.Key) < master.NonceSize() {
		return nil, fmt.Errorf("keyring: the data key %s of %s is malformed", kid, name)
	}
	dataKey, err := master.Open(nil, v.Key[:master.NonceSize()], v.Key[master.NonceSize():], wrapAAD(name, kid))
	if err != nil {
		return nil, fmt.Errorf("keyring: the data key %s of %s does not open with master key %q: %w", kid, name, v.Master, err)
	}
	return dataKey, nil
}

func newAEAD(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// ReadMasterKeys parses a master key file (see MasterKeyFile).
func ReadMasterKeys(path string) ([]MasterKey, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("master key file: %w", err)
	}
	var keys []MasterKey
	for i, line := range strings.Split(string(raw), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, err := ParseMasterKey(line)
		if err != nil {
			return nil, fmt.Errorf("master key file %s, line %d: %w", path, i+1, err)
		}
		keys = append(keys, k)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("master key file %s holds no key", path)
	}
	return keys, nil
}

// ParseMasterKey parses "<id>:<base64 of 32 bytes>".
func ParseMasterKey(s string) (MasterKey, error) {
	id, b64, ok := strings.Cut(strings.TrimSpace(s), ":")
	if !ok || id == "" {
		return MasterKey{}, errors.New(`a master key is written "<id>:<base64 of 32 bytes>"`)
	}
	key, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return MasterKey{}, fmt.Errorf("master key %q: not base64: %w", id, err)
	}
	if len(key) != 32 {
		return MasterKey{}, fmt.Errorf("master key %q is %d bytes; it must be 32 (AES-256)", id, len(key))
	}
	return MasterKey{ID: id, Key: key}, nil
}

// NewMasterKey returns a new random master key in the form ParseMasterKey
// reads.
func NewMasterKey(id string) string {
	var key [32]byte
	_, _ = rand.Read(key[:]) // never fails (crypto/rand)
	return id + ":" + base64.StdEncoding.EncodeToString(key[:])
}

// sealedJSON matches a sealed field as a JSON string (the sealed form has
// no character JSON escapes).
var sealedJSON = regexp.MustCompile(`"` + regexp.QuoteMeta(aggregate.SealedPrefix) + `[0-9a-f]{16}:[A-Za-z0-9_-]+"`)

// OpenJSON opens every sealed field in a JSON document of one entity,
// whatever its Go type, keeping the document's bytes otherwise: for tools
// that read topics raw (esker inspect). Fields of a forgotten entity open
// as "".
func (k *Keyring) OpenJSON(ctx context.Context, typ, id string, doc []byte) ([]byte, error) {
	c := k.Cipher(ctx, typ, id)
	var firstErr error
	out := sealedJSON.ReplaceAllFunc(doc, func(quoted []byte) []byte {
		plain, err := c.Open(string(quoted[1 : len(quoted)-1]))
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			return quoted
		}
		b, _ := json.Marshal(plain)
		return b
	})
	return out, firstErr
}
