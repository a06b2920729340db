package chaostest

import (
	"testing"
	"time"
)

// TestScheduleIsSeeded checks that a seed names one sequence of faults, so
// that ESKER_CHAOS_SEED reproduces a failing run's schedule.
func TestScheduleIsSeeded(t *testing.T) {
	draw := func(seed uint64, kinds []faultKind) []string {
		nm := newNemesis(nil, kinds, seed, time.Second, 6, "bank", newFaultStats(), t.Logf)
		var out []string
		for range 50 {
			out = append(out, nm.plan().String())
		}
		return out
	}
	all, err := parseFaultKinds("")
	if err != nil {
		t.Fatal(err)
	}
	a, b, c := draw(42, all), draw(42, all), draw(43, all)
	for i := range a {
		if a[i] != b[i] {
			t.Fatalf("seed 42 drew %q then %q at step %d", a[i], b[i], i)
		}
	}
	same := true
	for i := range a {
		same = same && a[i] == c[i]
	}
	if same {
		t.Fatal("seeds 42 and 43 drew the same 50 faults")
	}
	only, err := parseFaultKinds("pause, kill")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range draw(7, only) {
		if p[:5] != "pause" && p[:4] != "kill" {
			t.Fatalf("ESKER_CHAOS_FAULTS=pause,kill drew %q", p)
		}
	}
	if _, err := parseFaultKinds("kill,flood"); err == nil {
		t.Fatal("an unknown fault kind was accepted")
	}
}
