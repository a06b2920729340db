package keyring_test

import (
	"context"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/internal/keyring"
)

const benchKeys = 100_000

// BenchmarkSyncAtStart measures a start (New, Run, Sync, Close) over a keys
// topic holding 100,000 data keys: "local-store" resumes from a directory
// that already holds them, "topic" keeps no directory and reads the whole
// topic, and "topic-to-new-dir" reads it into an empty directory (a node's
// first start).
func BenchmarkSyncAtStart(b *testing.B) {
	kc := newKeysCluster(b)
	writer := kc.start(kc.config(""))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	recs := make([]*kgo.Record, 0, 1000)
	for i := range benchKeys {
		recs = append(recs, keyring.NewKeyRecord(writer, "acct", strconv.Itoa(i)))
		if len(recs) == cap(recs) {
			if err := kc.client.ProduceSync(ctx, recs...).FirstErr(); err != nil {
				b.Fatal(err)
			}
			recs = recs[:0]
		}
	}
	writer.Close()
	dir := b.TempDir()
	kc.start(kc.config(dir)).Close()

	start := func(b *testing.B, dir string, wantApplied int64) {
		k, err := keyring.New(kc.config(dir))
		if err != nil {
			b.Fatal(err)
		}
		defer k.Close()
		go func() { _ = k.Run(ctx) }()
		if err := k.Sync(ctx); err != nil {
			b.Fatal(err)
		}
		if got := keyring.Applied(k); got != wantApplied {
			b.Fatalf("read %d records; want %d", got, wantApplied)
		}
	}
	b.Run("local-store", func(b *testing.B) {
		for b.Loop() {
			start(b, dir, 0)
		}
	})
	b.Run("topic", func(b *testing.B) {
		for b.Loop() {
			start(b, "", benchKeys)
		}
	})
	b.Run("topic-to-new-dir", func(b *testing.B) {
		parent := b.TempDir()
		for b.Loop() {
			d, err := os.MkdirTemp(parent, "keys")
			if err != nil {
				b.Fatal(err)
			}
			start(b, d, benchKeys)
		}
	})
}
