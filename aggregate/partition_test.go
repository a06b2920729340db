package aggregate

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Golden vectors from Kafka's own UtilsTest.testMurmur2 (the Java client's
// reference implementation), as signed 32-bit Java ints.
var javaMurmur2 = []struct {
	in   string
	want int32
}{
	{"21", -973932308},
	{"foobar", -790332482},
	{"a-little-bit-long-string", -985981536},
	{"a-little-bit-longer-string", -1486304829},
	{"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971},
	{"abc", 479470107},
}

func TestMurmur2JavaVectors(t *testing.T) {
	for _, c := range javaMurmur2 {
		if got := int32(murmur2([]byte(c.in))); got != c.want {
			t.Errorf("murmur2(%q) = %d, want %d", c.in, got, c.want)
		}
	}
}

// Partition with a partition count of MaxInt32 exposes the positive hash
// (Java's Utils.toPositive) directly, except for a hash of exactly MaxInt32.
func TestPartitionJavaVectors(t *testing.T) {
	for _, c := range javaMurmur2 {
		want := c.want & 0x7fffffff
		if got := Partition(c.in, math.MaxInt32); got != want%math.MaxInt32 {
			t.Errorf("Partition(%q, MaxInt32) = %d, want %d", c.in, got, want)
		}
	}
	// Pinned placements (toPositive(murmur2(key)) % n, as the Java producer's
	// default partitioner computes them; checked against kgo below).
	pinned := []struct {
		key  string
		n    int32
		want int32
	}{
		{"21", 12, int32((-973932308 & 0x7fffffff) % 12)},
		{"foobar", 7, int32((-790332482 & 0x7fffffff) % 7)},
		{"abc", 4, 479470107 % 4},
		{"a-little-bit-longer-string", 64, int32((-1486304829 & 0x7fffffff) % 64)},
	}
	for _, p := range pinned {
		if got := Partition(p.key, p.n); got != p.want {
			t.Errorf("Partition(%q, %d) = %d, want %d", p.key, p.n, got, p.want)
		}
	}
}

func TestPartitionLiterals(t *testing.T) {
	// Literal placements computed with kgo.StickyKeyPartitioner(nil); they
	// pin the mapping so that a change cannot move existing entities.
	cases := []struct {
		key  string
		n    int32
		want int32
	}{
		{"21", 12, 0},
		{"foobar", 7, 0},
		{"abc", 4, 3},
		{"acc-1", 4, 1},
		{"alice", 4, 1},
		{"bob", 8, 6},
		{"a-little-bit-long-string", 10, 2},
		{"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", 13, 9},
	}
	p := kgo.StickyKeyPartitioner(nil).ForTopic("t")
	for _, c := range cases {
		if kp := int32(p.Partition(&kgo.Record{Key: []byte(c.key)}, int(c.n))); kp != c.want {
			t.Errorf("test vector wrong: kgo puts %q on %d of %d, literal says %d", c.key, kp, c.n, c.want)
		}
		if got := Partition(c.key, c.n); got != c.want {
			t.Errorf("Partition(%q, %d) = %d, want %d", c.key, c.n, got, c.want)
		}
	}
}

// Partition must agree with franz-go's Kafka-compatible key partitioner
// (murmur2, like the Java client) for every key and partition count.
func TestPartitionMatchesKgo(t *testing.T) {
	p := kgo.StickyKeyPartitioner(nil).ForTopic("t")
	rng := rand.New(rand.NewPCG(1, 2))
	keys := []string{"a", "ab", "abc", "abcd", "abcde", "\xff\xff\xff\xff", "ü", "日本語", "acc-1"}
	for len(keys) < 2000 {
		n := 1 + rng.IntN(40)
		b := make([]byte, n)
		for i := range b {
			if rng.IntN(2) == 0 {
				b[i] = byte(rng.IntN(256)) // arbitrary bytes, high bit set half the time
			} else {
				b[i] = "abcdefghijklmnopqrstuvwxyz0123456789-_"[rng.IntN(38)]
			}
		}
		keys = append(keys, string(b))
	}
	mismatches := 0
	for _, key := range keys {
		r := &kgo.Record{Key: []byte(key)}
		for n := 1; n <= 64; n++ {
			want := int32(p.Partition(r, n))
			if got := Partition(key, int32(n)); got != want {
				mismatches++
				if mismatches <= 10 {
					t.Errorf("Partition(%q, %d) = %d, kgo says %d", key, n, got, want)
				}
			}
		}
	}
	if mismatches > 0 {
		t.Fatalf("%d mismatches", mismatches)
	}
}

func TestPartitionRange(t *testing.T) {
	for _, key := range []string{"a", "zzzz", "\xff\xff\xff\xff\xff"} {
		for _, n := range []int32{1, 2, 3, 100, math.MaxInt32} {
			if got := Partition(key, n); got < 0 || got >= n {
				t.Errorf("Partition(%q, %d) = %d: out of range", key, n, got)
			}
		}
		if got := Partition(key, 1); got != 0 {
			t.Errorf("Partition(%q, 1) = %d", key, got)
		}
	}
}
