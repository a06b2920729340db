package keyring_test

import (
	"context"
	"encoding/base64"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/internal/keyring"
)

// TestPseudonymsAgree: nodes that ask for a scope's first pseudonym at the
// same time each may create the scope's secret, yet all of them, and a
// node started later, give every value the same pseudonym; another scope
// gives other pseudonyms. With local stores, a secret written later still
// loses to the first, and a node restarted on its store agrees too.
func TestPseudonymsAgree(t *testing.T) {
	for _, withDirs := range []bool{false, true} {
		t.Run(fmt.Sprintf("dirs=%v", withDirs), func(t *testing.T) { testPseudonymsAgree(t, withDirs) })
	}
}

func testPseudonymsAgree(t *testing.T, withDirs bool) {
	c, err := kfake.NewCluster(kfake.NumBrokers(1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close) // after the keyrings close
	brokers := c.ListenAddrs()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	adm, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	defer adm.Close()
	if _, err := kadm.NewClient(adm).CreateTopic(ctx, 4, 1, map[string]*string{"cleanup.policy": ptr("compact")}, keyring.Topic("app")); err != nil {
		t.Fatal(err)
	}
	master := keyring.MasterKey{ID: "m1", Key: make([]byte, 32)}
	startIn := func(dir string) *keyring.Keyring {
		k, err := keyring.New(keyring.Config{AppID: "app", Partitions: 4, Masters: []keyring.MasterKey{master},
			Dir: dir, ClientOpts: []kgo.Opt{kgo.SeedBrokers(brokers...)}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(k.Close)
		go func() { _ = k.Run(context.Background()) }()
		if err := k.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		return k
	}
	var dirs []string
	start := func() *keyring.Keyring {
		dir := ""
		if withDirs {
			dir = t.TempDir()
		}
		dirs = append(dirs, dir)
		return startIn(dir)
	}
	nodes := []*keyring.Keyring{start(), start(), start()}
	values := []string{"Ada Lovelace", "Grace Hopper", "Alan Turing"}
	got := make([][]string, len(nodes))
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i, k := range nodes {
		got[i] = make([]string, len(values))
		for j, v := range values {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p, err := k.Pseudonym(ctx, "owners", v)
				if err != nil {
					t.Error(err)
				}
				mu.Lock()
				got[i][j] = p
				mu.Unlock()
			}()
		}
	}
	wg.Wait()
	var restarted *keyring.Keyring
	if withDirs {
		// A secret written after the first is never used, by a node that
		// reads it from the topic or from its store, even with the lowest
		// key id.
		rec := keyring.NewKeyRecordID(nodes[0], keyring.PseudonymType, "owners", "0000000000000000")
		if err := adm.ProduceSync(ctx, rec).FirstErr(); err != nil {
			t.Fatal(err)
		}
		nodes[1].Close()
		restarted = startIn(dirs[1])
	}
	late := start()
	seen := map[string]bool{}
	for j, v := range values {
		want, err := late.Pseudonym(ctx, "owners", v)
		if err != nil {
			t.Fatal(err)
		}
		if len(want) != 32 || seen[want] {
			t.Fatalf("pseudonym %q of %q: want 32 hex digits, distinct per value", want, v)
		}
		seen[want] = true
		for i := range nodes {
			if got[i][j] != want {
				t.Fatalf("node %d gives %q the pseudonym %s, a later node %s", i, v, got[i][j], want)
			}
		}
		if restarted != nil {
			p, err := restarted.Pseudonym(ctx, "owners", v)
			if err != nil {
				t.Fatal(err)
			}
			if p != want {
				t.Fatalf("a node restarted on its store gives %q the pseudonym %s, a later node %s", v, p, want)
			}
		}
		other, err := late.Pseudonym(ctx, "payees", v)
		if err != nil {
			t.Fatal(err)
		}
		if other == want {
			t.Fatalf("scopes owners and payees give %q the same pseudonym", v)
		}
	}
	// Not a plain hash: without the secret, the pseudonym is not the
	// value's.
	if fmt.Sprint(base64.RawStdEncoding.EncodeToString([]byte(values[0]))) == got[0][0] {
		t.Fatal("pseudonym is an encoding of the value")
	}
}

func ptr(s string) *string { return &s }
