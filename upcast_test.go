package esker_test

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/projection"
	"github.com/esker-io/esker/sideeffects"
)

// A wallet whose Credited event gained a currency in schema version 2.
type walletState struct {
	Balance int64 `json:"balance"`
}

type walletCommand interface{ isWalletCommand() }

type Credit struct {
	Amount   int64  `json:"amount"`
	Currency string `json:"currency,omitempty"`
}

func (Credit) isWalletCommand() {}

// creditedV1 is Credited as the first version of the code wrote it.
type creditedV1 struct {
	Amount int64 `json:"amount"`
}

func (creditedV1) TypeName() string { return "Credited" }

// creditedV2 is Credited now.
type creditedV2 struct {
	Amount   int64  `json:"amount"`
	Currency string `json:"currency"`
}

func (creditedV2) TypeName() string   { return "Credited" }
func (creditedV2) SchemaVersion() int { return 2 }

func walletTypes() (v1, v2 *aggregate.Type[walletState, walletCommand, any]) {
	v1 = aggregate.New("wallet",
		func(_ walletState, c walletCommand) ([]any, error) {
			return []any{creditedV1{Amount: c.(Credit).Amount}}, nil
		},
		func(s walletState, e any) walletState { s.Balance += e.(creditedV1).Amount; return s }).
		Commands(Credit{}).Events(creditedV1{})
	v2 = aggregate.New("wallet",
		func(_ walletState, c walletCommand) ([]any, error) {
			cr := c.(Credit)
			return []any{creditedV2{Amount: cr.Amount, Currency: cr.Currency}}, nil
		},
		func(s walletState, e any) walletState { s.Balance += e.(creditedV2).Amount; return s }).
		Commands(Credit{}).Events(creditedV2{}).
		Upcast("Credited", 1, aggregate.UpcastJSON(func(old creditedV1) creditedV2 {
			return creditedV2{Amount: old.Amount, Currency: "EUR"}
		}))
	return v1, v2
}

// TestUpcastingOnEveryReadPath: events written at schema version 1 by an
// earlier registration of the type are read at version 2 — with the
// upcaster's default currency — by the events API, a projection and a
// side-effect consumer, next to events written at version 2.
func TestUpcastingOnEveryReadPath(t *testing.T) {
	c := newCluster(t)
	brokers := c.ListenAddrs()
	dir := t.TempDir()
	v1, v2 := walletTypes()
	tn := startTypesNode(t, brokers, dir, []any{v1})
	for range 3 {
		code, body := do(t, tn, "POST", "/v1/aggregates/wallet/w1/commands", cmd("Credit", map[string]any{"amount": 10}))
		mustStatus(t, 200, code, body, "credit v1")
	}
	tn.stop()

	perCurrency := projection.New("wallet-currencies", func(m map[string]int64, ev projection.Event) map[string]int64 {
		if cr, ok := ev.Value.(creditedV2); ok {
			if m == nil {
				m = map[string]int64{}
			}
			m[cr.Currency] += cr.Amount
		}
		return m
	}, projection.From(projection.Events(v2)))
	var mu sync.Mutex
	var handled []creditedV2
	consumer, err := sideeffects.New("wallet-audit", []string{"wallet-events"}, func(_ context.Context, ev sideeffects.Event) error {
		v, err := v2.DecodeEvent(ev.Event)
		if err != nil {
			return sideeffects.Permanent(err)
		}
		mu.Lock()
		defer mu.Unlock()
		handled = append(handled, v.(creditedV2))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	tn = startTypesNode(t, brokers, dir, []any{v2, perCurrency, consumer})
	code, body := do(t, tn, "POST", "/v1/aggregates/wallet/w1/commands", cmd("Credit", map[string]any{"amount": 7, "currency": "USD"}))
	mustStatus(t, 200, code, body, "credit v2")

	// The events API.
	code, body = do(t, tn, "GET", "/v1/aggregates/wallet/w1/events", nil)
	mustStatus(t, 200, code, body, "events")
	var got []string
	for _, e := range anySlice(body["events"]) {
		e := e.(map[string]any)
		d := e["data"].(map[string]any)
		got = append(got, fmt.Sprintf("v%v schema %v %v %v", e["version"], e["schemaVersion"], d["amount"], d["currency"]))
	}
	want := []string{"v1 schema 2 10 EUR", "v2 schema 2 10 EUR", "v3 schema 2 10 EUR", "v4 schema 2 7 USD"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("events API: %v, want %v", got, want)
	}

	// The projection and the side effect.
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, body := do(t, tn, "GET", "/v1/projections/wallet-currencies/w1", nil)
		mu.Lock()
		n := len(handled)
		mu.Unlock()
		if code == 200 && reflect.DeepEqual(body["value"], map[string]any{"EUR": float64(30), "USD": float64(7)}) && n == 4 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("projection %d %v, side effect handled %d; want EUR 30 and USD 7, 4 events", code, body, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if !reflect.DeepEqual(handled, []creditedV2{{10, "EUR"}, {10, "EUR"}, {10, "EUR"}, {7, "USD"}}) {
		t.Fatalf("side effect decoded %v", handled)
	}
	// Without the upcaster, a version-1 event is refused, not misread.
	bare := aggregate.New("wallet", func(walletState, walletCommand) ([]any, error) { return nil, nil },
		func(s walletState, _ any) walletState { return s }).Commands(Credit{}).Events(creditedV2{})
	if _, err := bare.DecodeEvent(aggregate.Event{Type: "Credited", SchemaVersion: 1, Data: []byte(`{"amount":1}`)}); !errors.Is(err, aggregate.ErrMalformed) {
		t.Fatalf("decoding version 1 without an upcaster: %v", err)
	}
}
