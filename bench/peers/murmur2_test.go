package peers

import (
	"hash"
	"testing"

	"github.com/esker-io/esker/aggregate"
)

// kafkaHasher makes goka partition keys as Kafka's Java client, franz-go
// and esker do: murmur2 of the key, masked to 31 bits (goka's default is
// FNV-1a, which puts a key's table record and Processor.Get on a partition
// other than the one its murmur2-partitioned input record is on). goka
// computes abs(int32(Sum32())) % partitions; masking makes that
// (murmur2 & 0x7fffffff) % partitions.
func kafkaHasher() hash.Hash32 { return &murmur2{} }

type murmur2 struct{ buf []byte }

func (h *murmur2) Write(p []byte) (int, error) { h.buf = append(h.buf, p...); return len(p), nil }
func (h *murmur2) Sum(b []byte) []byte {
	s := h.Sum32()
	return append(b, byte(s>>24), byte(s>>16), byte(s>>8), byte(s))
}
func (h *murmur2) Reset()         { h.buf = h.buf[:0] }
func (h *murmur2) Size() int      { return 4 }
func (h *murmur2) BlockSize() int { return 4 }

func (h *murmur2) Sum32() uint32 {
	const (
		seed uint32 = 0x9747b28c
		m    uint32 = 0x5bd1e995
		r           = 24
	)
	data := h.buf
	length := len(data)
	x := seed ^ uint32(length)
	for i := 0; i+4 <= length; i += 4 {
		k := uint32(data[i]) | uint32(data[i+1])<<8 | uint32(data[i+2])<<16 | uint32(data[i+3])<<24
		k *= m
		k ^= k >> r
		k *= m
		x *= m
		x ^= k
	}
	switch tail := data[length&^3:]; len(tail) {
	case 3:
		x ^= uint32(tail[2]) << 16
		fallthrough
	case 2:
		x ^= uint32(tail[1]) << 8
		fallthrough
	case 1:
		x ^= uint32(tail[0])
		x *= m
	}
	x ^= x >> 13
	x *= m
	x ^= x >> 15
	return x & 0x7fffffff
}

func TestKafkaHasherMatchesEsker(t *testing.T) {
	for i := range accounts {
		id := accountID(i)
		h := kafkaHasher()
		h.Write([]byte(id))
		if got, want := int32(h.Sum32())%partitions, aggregate.Partition(id, partitions); got != want {
			t.Fatalf("%s: goka partition %d, esker %d", id, got, want)
		}
	}
	for _, id := range []string{"", "a", "ab", "abc", "abcd", "abcde", "some-longer-key-1234567"} {
		h := kafkaHasher()
		h.Write([]byte(id))
		if got, want := int32(h.Sum32())%7, aggregate.Partition(id, 7); got != want {
			t.Fatalf("%q: goka partition %d, esker %d", id, got, want)
		}
	}
}
