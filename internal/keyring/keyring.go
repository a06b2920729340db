// Package keyring keeps the data keys that seal entities' personal fields
// (crypto-shredding; see aggregate.PersonalTag).
//
// Every entity with personal data gets its own random 256-bit data key. The
// key is wrapped (AES-256-GCM) by a master key that never leaves the nodes
// and is kept, wrapped, in the compacted topic "<app>-keys": one record per
// data key, keyed "<type>/<id>#<key id>", its value plain JSON
// {"master": master key id, "key": base64 wrapped key}. Every node reads the
// whole topic into memory (a global table, as Kafka Streams' GlobalKTable),
// so any node can seal a command for any entity and open any event.
//
// Forgetting an entity writes, in the engine's transaction, a tombstone for
// each of its data keys and a marker record "<type>/<id>" =
// {"forgotten": time}. Once compaction has removed the keys, nothing can
// open the entity's sealed fields, not even with the master key; the marker
// stays so that no node ever creates a new key for it.
//
// Invariants:
//   - A data key record is never overwritten: its record key names the key
//     id, so compaction keeps every key an entity ever had until the entity
//     is forgotten, and every ciphertext stays readable.
//   - Two nodes may create a key for the same entity at once; both keys are
//     valid. Sealing uses the entity's first key in log order (the same on
//     every node once both are read), so at most a few fields use another.
//   - A pseudonym secret ("esker.pseudonym/<scope>", see Pseudonym) is a
//     data key used as an HMAC key instead of a cipher, and every node must
//     use the same one. All secrets of a scope go to the partition of the
//     scope's name (an entity's keys go to the partitions of their own
//     record keys, so "first" may differ between nodes there), and a node
//     uses the first in that partition's order only after reading the
//     topic past the one it wrote: all nodes agree.
//   - The master key id travels with every wrapped key: keys wrapped by an
//     older master key open as long as that master key is configured, which
//     is how a master key is rotated.
package keyring

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
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
	// ClientOpts connect to Kafka (seed brokers, TLS, SASL).
	ClientOpts []kgo.Opt
	Logger     *slog.Logger
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

	mu        sync.Mutex
	entities  map[string]*entry // "<type>/<id>"
	positions map[int32]int64   // next offset read per partition
	progress  chan struct{}     // closed and replaced whenever positions move
	aeads     map[string]cipher.AEAD
	creating  map[string]chan struct{}
	secrets   map[string][]byte // pseudonym secrets, by scope
}

type entry struct {
	keys      map[string]keyValue // key id → wrapped key
	first     string              // the key id first in log order
	forgotten bool
}

type keyValue struct {
	Master string `json:"master"`
	Key    []byte `json:"key"`
}

type marker struct {
	Forgotten time.Time `json:"forgotten"`
}

// maxCachedKeys bounds the unwrapped keys kept in memory.
const maxCachedKeys = 100_000

// New validates the master keys and connects; Run must be called to read
// the keys topic. The topic must exist (EnsureTopic).
func New(cfg Config) (*Keyring, error) {
	if cfg.Partitions < 1 {
		return nil, errors.New("keyring: the partition count is not set")
	}
	if len(cfg.Masters) == 0 {
		return nil, errors.New("keyring: no master key is configured")
	}
	k := &Keyring{
		cfg: cfg, topic: Topic(cfg.AppID), masters: map[string]cipher.AEAD{},
		current: cfg.Masters[0].ID, log: cfg.Logger,
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
	opts := append(append([]kgo.Opt(nil), cfg.ClientOpts...),
		kgo.ConsumeTopics(k.topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.KeepControlRecords(),
		kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.RecordPartitioner(kgo.ManualPartitioner()),
	)
	client, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("keyring: %w", err)
	}
	k.client = client
	return k, nil
}

// Close stops reading and closes the client.
func (k *Keyring) Close() { k.client.Close() }

// Run reads the keys topic until ctx ends.
func (k *Keyring) Run(ctx context.Context) error {
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
		k.mu.Lock()
		fetches.EachRecord(func(r *kgo.Record) {
			if !r.Attrs.IsControl() {
				k.apply(r)
			}
			if r.Offset+1 > k.positions[r.Partition] {
				k.positions[r.Partition] = r.Offset + 1
			}
		})
		close(k.progress)
		k.progress = make(chan struct{})
		k.mu.Unlock()
	}
}

// apply folds one keys record into the table; k.mu is held.
func (k *Keyring) apply(r *kgo.Record) {
	key := string(r.Key)
	if r.Value == nil { // a destroyed data key
		name, kid, ok := splitKeyID(key)
		if !ok {
			return
		}
		if e := k.entities[name]; e != nil {
			delete(e.keys, kid)
			delete(k.aeads, kid)
			if e.first == kid {
				e.first = ""
			}
		}
		return
	}
	name, kid, isKey := splitKeyID(key)
	if isKey {
		var v keyValue
		if err := json.Unmarshal(r.Value, &v); err == nil && v.Key != nil {
			e := k.entry(name)
			e.keys[kid] = v
			if e.first == "" {
				e.first = kid
			}
			return
		}
	}
	var m marker
	if err := json.Unmarshal(r.Value, &m); err == nil && !m.Forgotten.IsZero() {
		e := k.entry(key)
		e.forgotten = true
		for kid := range e.keys {
			delete(k.aeads, kid)
		}
		clear(e.keys)
		e.first = ""
	}
}

func (k *Keyring) entry(name string) *entry {
	e := k.entities[name]
	if e == nil {
		e = &entry{keys: map[string]keyValue{}}
		k.entities[name] = e
	}
	return e
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
// before the call: a key another node just created is then known.
func (k *Keyring) Sync(ctx context.Context) error {
	ends, err := kadm.NewClient(k.client).ListCommittedOffsets(ctx, k.topic)
	if err != nil {
		return fmt.Errorf("keyring: list offsets of %s: %w", k.topic, err)
	}
	if err := ends.Error(); err != nil {
		return fmt.Errorf("keyring: list offsets of %s: %w", k.topic, err)
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
		case <-ctx.Done():
			return fmt.Errorf("keyring: reading %s: %w", k.topic, ctx.Err())
		}
	}
}

// Forgotten reports whether the entity was forgotten (as far as this node
// has read).
func (k *Keyring) Forgotten(typ, id string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	e := k.entities[entityName(typ, id)]
	return e != nil && e.forgotten
}

// ForgetRecords returns the records that forget the entity: a tombstone for
// each data key this node knows of, and the marker. The engine produces them
// in the transaction that writes the Forgotten event. Call Sync first so
// that a key just created elsewhere is included.
func (k *Keyring) ForgetRecords(typ, id string, at time.Time) []*kgo.Record {
	name := entityName(typ, id)
	k.mu.Lock()
	defer k.mu.Unlock()
	var recs []*kgo.Record
	if e := k.entities[name]; e != nil {
		for kid := range e.keys {
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
	kid, a, err := c.k.sealingKey(c.ctx, c.typ, c.id)
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

// sealingKey returns the entity's sealing key, creating it when it has none.
func (k *Keyring) sealingKey(ctx context.Context, typ, id string) (string, cipher.AEAD, error) {
	name := entityName(typ, id)
	for attempt := 0; ; attempt++ {
		k.mu.Lock()
		e := k.entities[name]
		if e != nil && e.forgotten {
			k.mu.Unlock()
			return "", nil, fmt.Errorf("%w: %s %q", aggregate.ErrForgotten, typ, id)
		}
		if e != nil && e.first != "" {
			kid := e.first
			a, err := k.unwrapLocked(name, kid, e.keys[kid])
			k.mu.Unlock()
			return kid, a, err
		}
		if attempt == 0 {
			// The key may have been created by another node a moment ago.
			k.mu.Unlock()
			if err := k.Sync(ctx); err != nil {
				return "", nil, err
			}
			continue
		}
		if wait, busy := k.creating[name]; busy {
			k.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return "", nil, ctx.Err()
			}
		}
		done := make(chan struct{})
		k.creating[name] = done
		k.mu.Unlock()
		err := k.create(ctx, name)
		k.mu.Lock()
		delete(k.creating, name)
		close(done)
		k.mu.Unlock()
		if err != nil {
			return "", nil, err
		}
		if err := k.Sync(ctx); err != nil {
			return "", nil, err
		}
		if attempt > 3 {
			return "", nil, fmt.Errorf("keyring: the data key of %s %q was written but is not readable from %s", typ, id, k.topic)
		}
	}
}

// create writes a new data key for the entity.
func (k *Keyring) create(ctx context.Context, name string) error {
	var dataKey [32]byte
	var kidBytes [8]byte
	if _, err := rand.Read(dataKey[:]); err != nil {
		return err
	}
	if _, err := rand.Read(kidBytes[:]); err != nil {
		return err
	}
	kid := hex.EncodeToString(kidBytes[:])
	master := k.masters[k.current]
	nonce := make([]byte, master.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return err
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
	if err := k.client.ProduceSync(ctx, rec).FirstErr(); err != nil {
		return fmt.Errorf("keyring: write the data key of %s to %s: %w", name, k.topic, err)
	}
	return nil
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
		e := k.entities[name]
		if e != nil && e.forgotten {
			k.mu.Unlock()
			return nil, true, nil
		}
		if e != nil {
			if v, ok := e.keys[kid]; ok {
				a, err := k.unwrapLocked(name, kid, v)
				k.mu.Unlock()
				return a, false, err
			}
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
		kid, _, err := k.sealingKey(ctx, pseudonymType, scope)
		if err != nil {
			return "", fmt.Errorf("keyring: the pseudonym secret of %s: %w", scope, err)
		}
		name := entityName(pseudonymType, scope)
		k.mu.Lock()
		secret, err = k.unwrapRawLocked(name, kid, k.entities[name].keys[kid])
		if err == nil {
			k.secrets[scope] = secret
		}
		k.mu.Unlock()
		if err != nil {
			return "", err
		}
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
	dataKey, err := k.unwrapRawLocked(name, kid, v)
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

// unwrapRawLocked unwraps a data key with its master key; k.mu is held.
func (k *Keyring) unwrapRawLocked(name, kid string, v keyValue) ([]byte, error) {
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
