package aggregate_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/esker-io/esker/aggregate"
)

// A small aggregate used across the tests.

type acct struct {
	Owner   string `json:"owner"`
	Balance int64  `json:"balance"`
}

type cmd interface{ isCmd() }

type Open struct {
	Owner string `json:"owner"`
}

type Deposit struct {
	Amount int64  `json:"amount"`
	Note   string `json:"note"`
}

// withdrawCmd is unexported and named through TypeName.
type withdrawCmd struct {
	Amount int64 `json:"amount"`
}

func (withdrawCmd) TypeName() string { return "Withdraw" }

// Boom makes decide panic; Sneaky makes it return an unregistered event.
type Boom struct{}
type Sneaky struct{}

// Validated has a Validate method.
type Validated struct {
	N int `json:"n"`
}

func (v Validated) Validate() error {
	if v.N <= 0 {
		return errors.New("n must be positive")
	}
	return nil
}

func (Open) isCmd()        {}
func (Deposit) isCmd()     {}
func (withdrawCmd) isCmd() {}
func (Boom) isCmd()        {}
func (Sneaky) isCmd()      {}
func (Validated) isCmd()   {}

type evt interface{ isEvt() }

type Opened struct {
	Owner string `json:"owner"`
}

type Deposited struct {
	Amount int64 `json:"amount"`
}

// SchemaVersion overrides the default schema version 1.
func (Deposited) SchemaVersion() int { return 3 }

type withdrawn struct {
	Amount int64 `json:"amount"`
}

func (withdrawn) TypeName() string { return "Withdrawn" }

type notRegistered struct{}

func (Opened) isEvt()        {}
func (Deposited) isEvt()     {}
func (withdrawn) isEvt()     {}
func (notRegistered) isEvt() {}

var errInsufficient = errors.New("insufficient funds")

func decide(s acct, c cmd) ([]evt, error) {
	switch c := c.(type) {
	case Open:
		return []evt{Opened{Owner: c.Owner}}, nil
	case Deposit:
		return []evt{Deposited{Amount: c.Amount}}, nil
	case withdrawCmd:
		if c.Amount > s.Balance {
			return nil, errInsufficient
		}
		return []evt{withdrawn{Amount: c.Amount}}, nil
	case Boom:
		panic("kaboom")
	case Sneaky:
		return []evt{Deposited{Amount: 1}, notRegistered{}}, nil
	case Validated:
		return nil, nil
	}
	return nil, fmt.Errorf("unhandled %T", c)
}

func evolve(s acct, e evt) acct {
	switch e := e.(type) {
	case Opened:
		s.Owner = e.Owner
	case Deposited:
		s.Balance += e.Amount
	case withdrawn:
		s.Balance -= e.Amount
	}
	return s
}

func newAccount() *aggregate.Type[acct, cmd, evt] {
	return aggregate.New("account", decide, evolve).
		Commands(Open{}, Deposit{}, withdrawCmd{}, Boom{}, Sneaky{}, Validated{}).
		Events(Opened{}, Deposited{}, withdrawn{})
}

func mustPanic(t *testing.T, want string, fn func()) {
	t.Helper()
	defer func() {
		t.Helper()
		r := recover()
		if r == nil {
			t.Fatalf("no panic; want one containing %q", want)
		}
		if !strings.Contains(fmt.Sprint(r), want) {
			t.Fatalf("panic %q does not contain %q", r, want)
		}
	}()
	fn()
}

func TestRegistryNames(t *testing.T) {
	a := newAccount()
	if got, want := a.Name(), "account"; got != want {
		t.Errorf("Name() = %q, want %q", got, want)
	}
	wantCmds := []string{"Boom", "Deposit", "Open", "Sneaky", "Validated", "Withdraw"}
	if got := a.CommandNames(); !slices.Equal(got, wantCmds) {
		t.Errorf("CommandNames() = %v, want %v", got, wantCmds)
	}
	wantEvts := []string{"Deposited", "Opened", "Withdrawn"}
	if got := a.EventNames(); !slices.Equal(got, wantEvts) {
		t.Errorf("EventNames() = %v, want %v", got, wantEvts)
	}
	u := a.Untyped()
	if got := u.CommandNames(); !slices.Equal(got, wantCmds) {
		t.Errorf("Untyped().CommandNames() = %v, want %v", got, wantCmds)
	}
	if got := u.EventNames(); !slices.Equal(got, wantEvts) {
		t.Errorf("Untyped().EventNames() = %v, want %v", got, wantEvts)
	}
	if u.Name() != "account" {
		t.Errorf("Untyped().Name() = %q", u.Name())
	}
	if got := u.ContentType(); got != "application/json" {
		t.Errorf("ContentType() = %q, want application/json", got)
	}
}

func TestRegistryDuplicatePanics(t *testing.T) {
	t.Run("same command type twice", func(t *testing.T) {
		a := aggregate.New("account", decide, evolve).Commands(Open{})
		mustPanic(t, `"Open" registered twice`, func() { a.Commands(Open{}) })
	})
	t.Run("TypeName collides with a Go type name", func(t *testing.T) {
		a := aggregate.New("account", decide, evolve).Commands(withdrawCmd{})
		mustPanic(t, `"Withdraw" registered twice`, func() { a.Commands(Withdraw{}) })
	})
	t.Run("same event type twice", func(t *testing.T) {
		a := aggregate.New("account", decide, evolve).Events(Deposited{})
		mustPanic(t, `"Deposited" registered twice`, func() { a.Events(Deposited{}) })
	})
	t.Run("commands and events are separate namespaces", func(t *testing.T) {
		type S struct{}
		a := aggregate.New("x", func(S, any) ([]any, error) { return nil, nil }, func(s S, _ any) S { return s })
		a.Commands(Open{}).Events(Open{}) // must not panic
		if !slices.Equal(a.CommandNames(), []string{"Open"}) || !slices.Equal(a.EventNames(), []string{"Open"}) {
			t.Fatalf("names: %v %v", a.CommandNames(), a.EventNames())
		}
	})
}

// Withdraw is a second Go type whose name collides with withdrawCmd's TypeName.
type Withdraw struct{}

func (Withdraw) isCmd() {}

func TestRegistryRejectsNilAndUnnamed(t *testing.T) {
	type S struct{}
	noop := func(S, any) ([]any, error) { return nil, nil }
	ev := func(s S, _ any) S { return s }
	t.Run("nil example", func(t *testing.T) {
		a := aggregate.New("x", noop, ev)
		mustPanic(t, "nil example", func() { a.Commands(nil) })
	})
	t.Run("anonymous struct", func(t *testing.T) {
		a := aggregate.New("x", noop, ev)
		mustPanic(t, "has no name", func() { a.Commands(struct{ A int }{}) })
	})
}

func TestDecodeCommand(t *testing.T) {
	u := newAccount().Untyped()

	t.Run("by Go type name", func(t *testing.T) {
		v, err := u.DecodeCommand("Deposit", []byte(`{"amount":500,"note":"hi"}`))
		if err != nil {
			t.Fatal(err)
		}
		if got, want := v, any(Deposit{Amount: 500, Note: "hi"}); got != want {
			t.Fatalf("got %#v, want %#v", got, want)
		}
	})
	t.Run("by TypeName override", func(t *testing.T) {
		v, err := u.DecodeCommand("Withdraw", []byte(`{"amount":7}`))
		if err != nil {
			t.Fatal(err)
		}
		if got, want := v, any(withdrawCmd{Amount: 7}); got != want {
			t.Fatalf("got %#v, want %#v", got, want)
		}
		// The Go name of an overridden type is not registered.
		if _, err := u.DecodeCommand("withdrawCmd", nil); !errors.Is(err, aggregate.ErrUnknownCommand) {
			t.Fatalf("Go name of an overridden type: err = %v, want ErrUnknownCommand", err)
		}
	})
	t.Run("null and empty data give the zero value", func(t *testing.T) {
		for _, data := range [][]byte{nil, {}, []byte("null"), []byte("{}")} {
			v, err := u.DecodeCommand("Deposit", data)
			if err != nil {
				t.Fatalf("data %q: %v", data, err)
			}
			if v != any(Deposit{}) {
				t.Fatalf("data %q: got %#v, want zero Deposit", data, v)
			}
		}
	})
	t.Run("unknown name", func(t *testing.T) {
		_, err := u.DecodeCommand("Transfer", []byte(`{}`))
		if !errors.Is(err, aggregate.ErrUnknownCommand) {
			t.Fatalf("err = %v, want ErrUnknownCommand", err)
		}
		if errors.Is(err, aggregate.ErrMalformed) {
			t.Fatalf("unknown command also matches ErrMalformed: %v", err)
		}
		msg := err.Error()
		for _, want := range []string{`"Transfer"`, `"account"`, "Deposit", "Open", "Withdraw"} {
			if !strings.Contains(msg, want) {
				t.Errorf("error %q does not mention %s", msg, want)
			}
		}
	})
	t.Run("wrong field types", func(t *testing.T) {
		cases := []struct {
			name, data, field string
		}{
			{"Deposit", `{"amount":"lots"}`, "amount"},
			{"Deposit", `{"amount":1,"note":42}`, "note"},
			{"Deposit", `{"amount":1.5}`, "amount"},
			{"Withdraw", `{"amount":true}`, "amount"},
		}
		for _, c := range cases {
			_, err := u.DecodeCommand(c.name, []byte(c.data))
			if !errors.Is(err, aggregate.ErrMalformed) {
				t.Errorf("%s %s: err = %v, want ErrMalformed", c.name, c.data, err)
				continue
			}
			if errors.Is(err, aggregate.ErrUnknownCommand) {
				t.Errorf("%s %s: malformed data also matches ErrUnknownCommand", c.name, c.data)
			}
			if msg := err.Error(); !strings.Contains(msg, "field "+c.field) || !strings.Contains(msg, c.name) {
				t.Errorf("%s %s: error %q does not name the command and field %q", c.name, c.data, msg, c.field)
			}
		}
	})
	t.Run("not an object", func(t *testing.T) {
		_, err := u.DecodeCommand("Deposit", []byte(`[1,2]`))
		if !errors.Is(err, aggregate.ErrMalformed) {
			t.Fatalf("err = %v, want ErrMalformed", err)
		}
		if !strings.Contains(err.Error(), "(value)") {
			t.Errorf("error %q: want the whole value named as (value)", err)
		}
	})
	t.Run("invalid JSON", func(t *testing.T) {
		_, err := u.DecodeCommand("Deposit", []byte(`{"amount":`))
		if !errors.Is(err, aggregate.ErrMalformed) {
			t.Fatalf("err = %v, want ErrMalformed", err)
		}
	})
}

// Pointer-receiver commands: the command interface is implemented by *T.

type pcmd interface{ isP() }

type SetLimit struct {
	Limit int `json:"limit"`
}

func (*SetLimit) isP()             {}
func (*SetLimit) TypeName() string { return "SetLimit" }

type Freeze struct{}

func (*Freeze) isP() {}

func newPointerType() *aggregate.Type[int, pcmd, evt] {
	return aggregate.New("limits",
		func(s int, c pcmd) ([]evt, error) { return nil, nil },
		func(s int, e evt) int { return s })
}

func TestPointerExamples(t *testing.T) {
	a := newPointerType().Commands(&SetLimit{}).Events(Deposited{})
	u := a.Untyped()
	if got := a.CommandNames(); !slices.Equal(got, []string{"SetLimit"}) {
		t.Fatalf("CommandNames() = %v", got)
	}
	v, err := u.DecodeCommand("SetLimit", []byte(`{"limit":9}`))
	if err != nil {
		t.Fatal(err)
	}
	p, ok := v.(*SetLimit)
	if !ok || p == nil || p.Limit != 9 {
		t.Fatalf("got %#v, want &SetLimit{Limit: 9}", v)
	}
	// null data still gives a usable (non-nil) pointer to the zero value.
	v, err = u.DecodeCommand("SetLimit", []byte("null"))
	if err != nil {
		t.Fatal(err)
	}
	if p, ok := v.(*SetLimit); !ok || p == nil || *p != (SetLimit{}) {
		t.Fatalf("null: got %#v, want &SetLimit{}", v)
	}
	// Each decode returns a fresh value.
	v2, _ := u.DecodeCommand("SetLimit", nil)
	if v2.(*SetLimit) == v.(*SetLimit) {
		t.Fatal("two decodes share one pointer")
	}
	_, err = u.DecodeCommand("SetLimit", []byte(`{"limit":"x"}`))
	if !errors.Is(err, aggregate.ErrMalformed) || !strings.Contains(err.Error(), "limit") {
		t.Fatalf("err = %v, want ErrMalformed naming limit", err)
	}
}

// A pointer example without a TypeName method: the registered name should be
// the pointed-to type's name, as the documentation promises ("the Go type
// name"), and as decode's "unless the registered example was a pointer"
// implies.
func TestPointerExampleWithoutTypeName(t *testing.T) {
	a := newPointerType().Commands(&Freeze{})
	if got := a.CommandNames(); !slices.Equal(got, []string{"Freeze"}) {
		t.Fatalf("CommandNames() = %v, want [Freeze]", got)
	}
	v, err := a.Untyped().DecodeCommand("Freeze", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := v.(*Freeze); !ok {
		t.Fatalf("got %T, want *Freeze", v)
	}
}

func TestValidateCommand(t *testing.T) {
	u := newAccount().Untyped()
	if err := u.ValidateCommand(Validated{N: 1}); err != nil {
		t.Errorf("valid: %v", err)
	}
	if err := u.ValidateCommand(Validated{N: 0}); err == nil || !strings.Contains(err.Error(), "positive") {
		t.Errorf("invalid: err = %v", err)
	}
	if err := u.ValidateCommand(Deposit{}); err != nil {
		t.Errorf("no Validate method: %v", err)
	}
}

func TestDecide(t *testing.T) {
	u := newAccount().Untyped()
	t.Run("events", func(t *testing.T) {
		evs, err := u.Decide(acct{}, Deposit{Amount: 5})
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(evs, []any{Deposited{Amount: 5}}) {
			t.Fatalf("got %#v", evs)
		}
	})
	t.Run("no events", func(t *testing.T) {
		evs, err := u.Decide(acct{}, Validated{N: 1})
		if err != nil || len(evs) != 0 {
			t.Fatalf("got %v, %v; want no events", evs, err)
		}
	})
	t.Run("rejection passes through", func(t *testing.T) {
		evs, err := u.Decide(acct{Balance: 1}, withdrawCmd{Amount: 2})
		if !errors.Is(err, errInsufficient) || evs != nil {
			t.Fatalf("got %v, %v; want errInsufficient", evs, err)
		}
	})
	t.Run("panic becomes an error", func(t *testing.T) {
		evs, err := u.Decide(acct{}, Boom{})
		if err == nil || !strings.Contains(err.Error(), "decide panicked") || !strings.Contains(err.Error(), "kaboom") {
			t.Fatalf("err = %v, want decide panicked: kaboom", err)
		}
		if evs != nil {
			t.Fatalf("events %v returned with a panic", evs)
		}
	})
	t.Run("wrong state or command type becomes an error", func(t *testing.T) {
		if _, err := u.Decide("not a state", Deposit{}); err == nil || !strings.Contains(err.Error(), "decide panicked") {
			t.Errorf("bad state: err = %v", err)
		}
		if _, err := u.Decide(acct{}, "not a command"); err == nil || !strings.Contains(err.Error(), "decide panicked") {
			t.Errorf("bad command: err = %v", err)
		}
	})
	t.Run("unregistered event type", func(t *testing.T) {
		evs, err := u.Decide(acct{}, Sneaky{})
		if err == nil || !strings.Contains(err.Error(), "notRegistered") || !strings.Contains(err.Error(), "unregistered event type") {
			t.Fatalf("err = %v, want unregistered event type naming notRegistered", err)
		}
		if evs != nil {
			t.Fatalf("events %v returned with an error", evs)
		}
	})
}

func TestEncodeDecodeEvent(t *testing.T) {
	u := newAccount().Untyped()
	cases := []struct {
		ev      any
		name    string
		version int
	}{
		{Opened{Owner: "ann"}, "Opened", 1},
		{Deposited{Amount: 42}, "Deposited", 3},
		{withdrawn{Amount: 2}, "Withdrawn", 1},
	}
	for _, c := range cases {
		name, version, data, err := u.EncodeEvent(c.ev)
		if err != nil {
			t.Fatalf("%T: %v", c.ev, err)
		}
		if name != c.name || version != c.version {
			t.Errorf("%T: name, version = %q, %d; want %q, %d", c.ev, name, version, c.name, c.version)
		}
		if !json.Valid(data) {
			t.Errorf("%T: payload %q is not JSON", c.ev, data)
		}
		back, err := u.DecodeEvent(name, version, data)
		if err != nil {
			t.Fatalf("%T: decode: %v", c.ev, err)
		}
		if back != c.ev {
			t.Errorf("round trip: got %#v, want %#v", back, c.ev)
		}
	}
	if _, _, _, err := u.EncodeEvent(notRegistered{}); !errors.Is(err, aggregate.ErrUnknownEvent) {
		t.Errorf("unregistered: err = %v, want ErrUnknownEvent", err)
	}
	if _, err := u.DecodeEvent("Closed", 1, []byte(`{}`)); !errors.Is(err, aggregate.ErrUnknownEvent) || !strings.Contains(err.Error(), `"Closed"`) {
		t.Errorf("unknown name: err = %v, want ErrUnknownEvent naming Closed", err)
	}
	if _, err := u.DecodeEvent("Deposited", 3, []byte(`{"amount":"x"}`)); !errors.Is(err, aggregate.ErrMalformed) {
		t.Errorf("malformed: err = %v, want ErrMalformed", err)
	}
	v, err := u.DecodeEvent("Deposited", 3, nil)
	if err != nil || v != any(Deposited{}) {
		t.Errorf("empty payload: got %#v, %v; want zero Deposited", v, err)
	}
}

// upperCodec wraps JSON to show the codec is used for events and state.
type upperCodec struct{ aggregate.JSON }

func (upperCodec) ContentType() string { return "application/x-test" }
func (c upperCodec) Marshal(v any) ([]byte, error) {
	b, err := c.JSON.Marshal(v)
	return append([]byte("T"), b...), err
}
func (c upperCodec) Unmarshal(data []byte, v any) error {
	if len(data) == 0 || data[0] != 'T' {
		return errors.New("not a test payload")
	}
	return c.JSON.Unmarshal(data[1:], v)
}

func TestCodec(t *testing.T) {
	a := aggregate.New("account", decide, evolve, aggregate.WithCodec(upperCodec{})).
		Commands(Deposit{}).Events(Deposited{})
	u := a.Untyped()
	if got := u.ContentType(); got != "application/x-test" {
		t.Errorf("ContentType() = %q", got)
	}
	_, _, data, err := u.EncodeEvent(Deposited{Amount: 3})
	if err != nil || string(data) != `T{"amount":3}` {
		t.Fatalf("EncodeEvent: %q, %v", data, err)
	}
	if v, err := u.DecodeEvent("Deposited", 3, data); err != nil || v != any(Deposited{Amount: 3}) {
		t.Fatalf("DecodeEvent: %#v, %v", v, err)
	}
	// Commands stay JSON whatever the codec.
	if v, err := u.DecodeCommand("Deposit", []byte(`{"amount":4}`)); err != nil || v != any(Deposit{Amount: 4}) {
		t.Fatalf("DecodeCommand: %#v, %v", v, err)
	}
	st, err := u.EncodeState(acct{Owner: "bo", Balance: 9})
	if err != nil || st[0] != 'T' {
		t.Fatalf("EncodeState: %q, %v", st, err)
	}
	back, err := u.DecodeState(st)
	if err != nil || back != any(acct{Owner: "bo", Balance: 9}) {
		t.Fatalf("DecodeState: %#v, %v", back, err)
	}
	if _, err := u.DecodeState([]byte(`{}`)); err == nil || !strings.Contains(err.Error(), "account") {
		t.Fatalf("DecodeState of foreign bytes: err = %v", err)
	}
}

func TestStateAndEvolve(t *testing.T) {
	a := newAccount()
	u := a.Untyped()
	if got := u.NewState(); got != any(acct{}) {
		t.Fatalf("NewState() = %#v", got)
	}
	s := u.Evolve(u.NewState(), Opened{Owner: "ann"})
	s = u.Evolve(s, Deposited{Amount: 10})
	if s != any(acct{Owner: "ann", Balance: 10}) {
		t.Fatalf("Evolve: %#v", s)
	}
	b, err := u.EncodeState(s)
	if err != nil {
		t.Fatal(err)
	}
	back, err := u.DecodeState(b)
	if err != nil || back != s {
		t.Fatalf("state round trip: %#v, %v", back, err)
	}
	if _, err := u.DecodeState([]byte(`{"balance":"x"}`)); err == nil {
		t.Fatal("DecodeState of malformed state: no error")
	}
}

func TestFold(t *testing.T) {
	a := newAccount()
	if got := a.Fold(acct{Balance: 3}); got != (acct{Balance: 3}) {
		t.Errorf("Fold with no events changed the state: %#v", got)
	}
	got := a.Fold(acct{}, Opened{Owner: "ann"}, Deposited{Amount: 10}, withdrawn{Amount: 4}, Deposited{Amount: 1})
	if want := (acct{Owner: "ann", Balance: 7}); got != want {
		t.Errorf("Fold = %#v, want %#v", got, want)
	}
	// Order matters: Fold applies events left to right.
	ord := aggregate.New("log", func(s []string, c any) ([]string, error) { return nil, nil },
		func(s []string, e string) []string { return append(s, e) })
	if got := ord.Fold(nil, "a", "b", "c"); !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Errorf("Fold order = %v", got)
	}
}

func TestNewPanics(t *testing.T) {
	bad := []string{"", "Account", "1account", "-account", "ac_count", "ac count", "acc.ount", "accoünt", strings.Repeat("a", 64)}
	for _, name := range bad {
		mustPanic(t, "invalid type name", func() { aggregate.New(name, decide, evolve) })
	}
	good := []string{"a", "account", "bank-account", "a1", "a-", strings.Repeat("a", 63)}
	for _, name := range good {
		if got := aggregate.New(name, decide, evolve).Name(); got != name {
			t.Errorf("New(%q).Name() = %q", name, got)
		}
	}
	mustPanic(t, "decide and an evolve", func() { aggregate.New[acct, cmd, evt]("account", nil, evolve) })
	mustPanic(t, "decide and an evolve", func() { aggregate.New[acct, cmd, evt]("account", decide, nil) })
}

func TestTypedDecodeEvent(t *testing.T) {
	a := newAccount()
	got, err := a.DecodeEvent(aggregate.Event{Type: "Deposited", SchemaVersion: 3, Data: []byte(`{"amount":3}`)})
	if d, ok := got.(Deposited); err != nil || !ok || d.Amount != 3 {
		t.Fatalf("DecodeEvent: %#v, %v", got, err)
	}
	if _, err := a.DecodeEvent(aggregate.Event{Type: "Nope", Data: []byte(`{}`)}); !errors.Is(err, aggregate.ErrUnknownEvent) {
		t.Fatalf("unknown type: %v", err)
	}
	if _, err := a.DecodeEvent(aggregate.Event{Type: "Deposited", Data: []byte(`{"amount":"x"}`)}); !errors.Is(err, aggregate.ErrMalformed) {
		t.Fatalf("malformed: %v", err)
	}
}
