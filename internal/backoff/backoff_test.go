package backoff

import (
	"context"
	"testing"
	"time"
)

func TestDelay(t *testing.T) {
	p := Policy{Min: 100 * time.Millisecond, Max: time.Second}
	for n, nominal := range map[int]time.Duration{0: 100, 1: 100, 2: 200, 3: 400, 4: 800, 5: 1000, 40: 1000} {
		nominal *= time.Millisecond
		for range 200 {
			if d := p.Delay(n); d < nominal/2 || d > nominal {
				t.Fatalf("Delay(%d) = %v, want between %v and %v", n, d, nominal/2, nominal)
			}
		}
	}
	if d := (Policy{}).Delay(3); d != 0 {
		t.Fatalf("zero policy waits %v", d)
	}
	r := Retry{Policy: p}
	if d := r.Next(); d > 100*time.Millisecond {
		t.Fatalf("first wait %v", d)
	}
	if d := r.Next(); d < 100*time.Millisecond {
		t.Fatalf("second wait %v, want at least half of 200ms", d)
	}
}

func TestSleep(t *testing.T) {
	if !Sleep(context.Background(), time.Millisecond, nil) {
		t.Fatal("a short sleep did not pass")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if Sleep(ctx, time.Hour, nil) || Sleep(ctx, 0, nil) {
		t.Fatal("a sleep passed on a done context")
	}
	abort := make(chan struct{})
	close(abort)
	if Sleep(context.Background(), time.Hour, abort) {
		t.Fatal("a sleep passed although aborted")
	}
}
