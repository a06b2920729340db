// Package fuzzcheck holds checks shared by the module's fuzz targets.
package fuzzcheck

import (
	"runtime"
	"testing"
)

// Allocs runs fn, a decoding of n input bytes, and fails t if it allocates
// more than budget(n) bytes: a decoder must allocate a small multiple of its
// input, never what a length field in the input claims. The count is
// process-wide and the fuzzing worker's own goroutines allocate now and
// then, so a run over budget is measured again: a decoder that
// over-allocates does it every time.
func Allocs(t testing.TB, n int, budget func(n int) uint64, fn func()) {
	t.Helper()
	var got uint64
	for range 3 {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		fn()
		runtime.ReadMemStats(&after)
		if got = after.TotalAlloc - before.TotalAlloc; got <= budget(n) {
			return
		}
	}
	t.Fatalf("decoding %d bytes allocated %d bytes (budget %d)", n, got, budget(n))
}
