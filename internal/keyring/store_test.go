package keyring_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/internal/keyring"
	"github.com/esker-io/esker/internal/testlog"
)

// keysCluster is a kfake cluster with an "app-keys" topic.
type keysCluster struct {
	t       testing.TB
	brokers []string
	adm     *kadm.Client
	client  *kgo.Client
	master  keyring.MasterKey
}

const testPartitions = 4

func newKeysCluster(t testing.TB) *keysCluster {
	t.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	brokers := c.ListenAddrs()
	client, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.Close)
	kc := &keysCluster{t: t, brokers: brokers, adm: kadm.NewClient(client), client: client,
		master: keyring.MasterKey{ID: "m1", Key: bytes.Repeat([]byte{7}, 32)}}
	kc.createTopic()
	return kc
}

func (kc *keysCluster) createTopic() {
	kc.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := kc.adm.CreateTopic(ctx, testPartitions, 1, map[string]*string{"cleanup.policy": ptr("compact")}, keyring.Topic("app")); err != nil {
		kc.t.Fatal(err)
	}
}

func (kc *keysCluster) config(dir string) keyring.Config {
	return keyring.Config{AppID: "app", Partitions: testPartitions, Masters: []keyring.MasterKey{kc.master},
		Dir: dir, ClientOpts: []kgo.Opt{kgo.SeedBrokers(kc.brokers...)}}
}

// start starts a keyring and waits until it has read the topic; it is
// closed when the test ends (closing it earlier is fine).
func (kc *keysCluster) start(cfg keyring.Config) *keyring.Keyring {
	kc.t.Helper()
	k, err := keyring.New(cfg)
	if err != nil {
		kc.t.Fatal(err)
	}
	kc.t.Cleanup(k.Close)
	go func() { _ = k.Run(context.Background()) }()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := k.Sync(ctx); err != nil {
		kc.t.Fatal(err)
	}
	return k
}

// produce writes records and returns how many.
func (kc *keysCluster) produce(recs []*kgo.Record) int {
	kc.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := kc.client.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		kc.t.Fatal(err)
	}
	return len(recs)
}

// forget writes the records that forget the entity, as the engine does,
// and returns how many.
func (kc *keysCluster) forget(k *keyring.Keyring, id string) int {
	kc.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := k.Sync(ctx); err != nil {
		kc.t.Fatal(err)
	}
	return kc.produce(k.ForgetRecords("acct", id, time.Now()))
}

// sealAll seals one field of each entity id, eight at a time, and returns
// the sealed fields by id.
func sealAll(t testing.TB, k *keyring.Keyring, ids []string) map[string]string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	sealed := make(map[string]string, len(ids))
	var mu sync.Mutex
	var wg sync.WaitGroup
	work := make(chan string)
	for range 8 {
		wg.Go(func() {
			for id := range work {
				s, err := k.Cipher(ctx, "acct", id).Seal("owner of " + id)
				if err != nil {
					t.Error(err)
					continue
				}
				mu.Lock()
				sealed[id] = s
				mu.Unlock()
			}
		})
	}
	for _, id := range ids {
		work <- id
	}
	close(work)
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	return sealed
}

func ids(from, to int) []string {
	var out []string
	for i := from; i < to; i++ {
		out = append(out, strconv.Itoa(i))
	}
	return out
}

// TestRestartResumesFromStore: a keyring restarted on its directory opens
// every key it had read, reports the entities forgotten then and since as
// forgotten, and reads only the records written while it was stopped.
// Deleting the directory costs a full read, nothing else.
func TestRestartResumesFromStore(t *testing.T) {
	kc := newKeysCluster(t)
	dir := filepath.Join(t.TempDir(), "keys")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	first := kc.start(kc.config(dir))
	sealed := sealAll(t, first, ids(0, 2000))
	total := 2000
	forgotten := map[string]bool{}
	for i := 0; i < 2000; i += 10 {
		id := strconv.Itoa(i)
		total += kc.forget(first, id)
		forgotten[id] = true
	}
	if err := first.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if !first.Forgotten("acct", "0") {
		t.Fatal("acct 0 is not forgotten on the keyring that forgot it")
	}
	first.Close()

	// While it is stopped, another node creates keys and forgets more.
	other := kc.start(kc.config(""))
	for id, s := range sealAll(t, other, ids(2000, 2050)) {
		sealed[id] = s
	}
	since := 50
	for _, id := range []string{"5", "15", "25", "2001"} {
		since += kc.forget(other, id)
		forgotten[id] = true
	}
	total += since

	restarted := kc.start(kc.config(dir))
	if got := keyring.Applied(restarted); got != int64(since) {
		t.Fatalf("the restarted keyring read %d records; want the %d written since it stopped (%d in all)", got, since, total)
	}
	checkOpens(ctx, t, restarted, sealed, forgotten)
	restarted.Close()

	// The store is a cache: without it, the keyring reads everything.
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	fresh := kc.start(kc.config(dir))
	if got := keyring.Applied(fresh); got != int64(total) {
		t.Fatalf("a keyring on a deleted directory read %d records; want all %d", got, total)
	}
	checkOpens(ctx, t, fresh, sealed, forgotten)
}

// checkOpens opens every sealed field: a forgotten entity's opens as "" and
// reports forgotten, every other one opens.
func checkOpens(ctx context.Context, t *testing.T, k *keyring.Keyring, sealed map[string]string, forgotten map[string]bool) {
	t.Helper()
	for id, s := range sealed {
		got, err := k.Cipher(ctx, "acct", id).Open(s)
		if err != nil {
			t.Fatalf("open acct %s: %v", id, err)
		}
		want := "owner of " + id
		if forgotten[id] {
			want = ""
		}
		if got != want {
			t.Fatalf("acct %s opens as %q; want %q", id, got, want)
		}
		if k.Forgotten("acct", id) != forgotten[id] {
			t.Fatalf("acct %s: Forgotten is %v; want %v", id, !forgotten[id], forgotten[id])
		}
	}
}

// TestCacheBound: with room for 50 entities in memory, a keyring seals and
// opens the fields of 300 (in another order, twice), reports the forgotten
// ones, and never holds more than 50.
func TestCacheBound(t *testing.T) {
	for _, withDir := range []bool{false, true} {
		t.Run(fmt.Sprintf("dir=%v", withDir), func(t *testing.T) {
			kc := newKeysCluster(t)
			dir := ""
			if withDir {
				dir = t.TempDir()
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			k := kc.start(keyring.WithCacheSize(kc.config(dir), 50))
			sealed := sealAll(t, k, ids(0, 300))
			forgotten := map[string]bool{}
			for i := 0; i < 300; i += 30 {
				kc.forget(k, strconv.Itoa(i))
				forgotten[strconv.Itoa(i)] = true
			}
			if err := k.Sync(ctx); err != nil {
				t.Fatal(err)
			}
			for range 2 {
				for i := 299; i >= 0; i-- {
					id := strconv.Itoa(i)
					checkOpens(ctx, t, k, map[string]string{id: sealed[id]}, forgotten)
					if n := keyring.Cached(k); n > 50 {
						t.Fatalf("%d entities in memory; the cache holds 50", n)
					}
				}
			}
			// A sealing key is the same after its entity left memory.
			for _, id := range []string{"1", "299"} {
				s, err := k.Cipher(ctx, "acct", id).Seal("x")
				if err != nil {
					t.Fatal(err)
				}
				if kid, want := s[:len(aggregate.SealedPrefix)+16], sealed[id][:len(aggregate.SealedPrefix)+16]; kid != want {
					t.Fatalf("acct %s seals with %s, earlier with %s", id, kid, want)
				}
			}
		})
	}
}

// TestRecreatedTopicWipesStore: when the keys topic was deleted and created
// again, a keyring restarted on its directory drops what it had read of the
// old topic (its keys no longer open) and reads the new one from its start:
// when the new topic is shorter than the stored offsets (told by the
// offsets alone, as with brokers that give no topic ids) and when it has
// grown past them (told by the topic id).
func TestRecreatedTopicWipesStore(t *testing.T) {
	for _, tc := range []struct {
		name        string
		grown, noID bool
	}{{"shorter", false, false}, {"shorter-without-topic-id", false, true}, {"grown", true, false}} {
		t.Run(tc.name, func(t *testing.T) {
			grown := tc.grown
			kc := newKeysCluster(t)
			dir := t.TempDir()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			old := kc.start(kc.config(dir))
			oldSealed := sealAll(t, old, ids(0, 20))
			old.Close()
			if tc.noID {
				if err := keyring.DropStoredTopicID(dir); err != nil {
					t.Fatal(err)
				}
			}
			oldEnds, err := kc.adm.ListEndOffsets(ctx, keyring.Topic("app"))
			if err != nil {
				t.Fatal(err)
			}

			if _, err := kc.adm.DeleteTopic(ctx, keyring.Topic("app")); err != nil {
				t.Fatal(err)
			}
			kc.createTopic()
			writer := kc.start(kc.config(""))
			newSealed := sealAll(t, writer, ids(100, 102))
			written := 2
			if grown {
				// Past the old topic's end on every partition.
				for i := 0; ; i++ {
					ends, err := kc.adm.ListEndOffsets(ctx, keyring.Topic("app"))
					if err != nil {
						t.Fatal(err)
					}
					past := true
					oldEnds.Each(func(o kadm.ListedOffset) {
						if e, _ := ends.Lookup(o.Topic, o.Partition); e.Offset < o.Offset {
							past = false
						}
					})
					if past {
						break
					}
					written += kc.produce([]*kgo.Record{keyring.NewKeyRecord(writer, "acct", "filler"+strconv.Itoa(i))})
				}
			}

			logs := &testlog.Buffer{}
			cfg := kc.config(dir)
			cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
			k := kc.start(cfg)
			if got := keyring.Applied(k); got != int64(written) {
				t.Fatalf("read %d records of the new topic; want all %d", got, written)
			}
			if !strings.Contains(logs.String(), "wiping") {
				t.Fatalf("no warning that the store was wiped; log:\n%s", logs.String())
			}
			for id, s := range oldSealed {
				if _, err := k.Cipher(ctx, "acct", id).Open(s); !errors.Is(err, aggregate.ErrUnknownKey) {
					t.Fatalf("a key of the deleted topic (acct %s) still opens: err %v", id, err)
				}
			}
			checkOpens(ctx, t, k, newSealed, nil)
		})
	}
}

// TestUnusableDirKeepsKeysInMemory: a directory that cannot be a store
// (here a file) leaves the keyring working in memory, with a warning.
func TestUnusableDirKeepsKeysInMemory(t *testing.T) {
	kc := newKeysCluster(t)
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, []byte("not a directory"), 0o644); err != nil {
		t.Fatal(err)
	}
	logs := &testlog.Buffer{}
	cfg := kc.config(file)
	cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
	k := kc.start(cfg)
	if d := keyring.StoreDir(k); d != "" {
		t.Fatalf("store in %q; want memory", d)
	}
	if !strings.Contains(logs.String(), "in memory") {
		t.Fatalf("no warning; log:\n%s", logs.String())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sealed := sealAll(t, k, ids(0, 3))
	checkOpens(ctx, t, k, sealed, nil)
}
