package aggregate

// Partition returns the partition that owns an entity id: Kafka's default
// partitioner for keyed records (murmur2 of the key, sign bit cleared,
// modulo the partition count), as the Java client computes it. Producers in
// other languages must use the same hash (librdkafka: partitioner=murmur2_random);
// the engine rejects a command that arrives on another partition.
func Partition(id string, partitions int32) int32 {
	return int32(murmur2([]byte(id))&0x7fffffff) % partitions
}

func murmur2(data []byte) uint32 {
	const (
		seed uint32 = 0x9747b28c
		m    uint32 = 0x5bd1e995
		r           = 24
	)
	length := len(data)
	h := seed ^ uint32(length)
	for i := 0; i+4 <= length; i += 4 {
		k := uint32(data[i]) | uint32(data[i+1])<<8 | uint32(data[i+2])<<16 | uint32(data[i+3])<<24
		k *= m
		k ^= k >> r
		k *= m
		h *= m
		h ^= k
	}
	tail := length &^ 3
	switch length & 3 {
	case 3:
		h ^= uint32(data[tail+2]) << 16
		fallthrough
	case 2:
		h ^= uint32(data[tail+1]) << 8
		fallthrough
	case 1:
		h ^= uint32(data[tail])
		h *= m
	}
	h ^= h >> 13
	h *= m
	h ^= h >> 15
	return h
}
