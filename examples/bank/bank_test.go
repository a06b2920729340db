package bank

import (
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"
)

func TestDecide(t *testing.T) {
	open := AccountState{Owner: "alice", Balance: 300, Open: true}
	empty := AccountState{Owner: "alice", Open: true}
	closed := AccountState{Owner: "alice", Closed: true}

	tests := []struct {
		name    string
		state   AccountState
		cmd     Command
		want    []Event
		wantErr string
	}{
		{"open new", AccountState{}, Open{Owner: "alice"}, []Event{Opened{Owner: "alice"}}, ""},
		{"open 200 runes", AccountState{}, Open{Owner: strings.Repeat("é", 200)}, []Event{Opened{Owner: strings.Repeat("é", 200)}}, ""},
		{"open twice", open, Open{Owner: "bob"}, nil, "account is already open"},
		{"open closed", closed, Open{Owner: "bob"}, nil, "account is closed"},
		{"open empty owner", AccountState{}, Open{}, nil, "owner is required"},
		{"open blank owner", AccountState{}, Open{Owner: "  \t"}, nil, "owner is required"},
		{"open long owner", AccountState{}, Open{Owner: strings.Repeat("x", 201)}, nil, "owner is 201 characters; the limit is 200"},

		{"deposit", open, Deposit{Amount: 500}, []Event{Deposited{Amount: 500, Currency: "EUR"}}, ""},
		{"deposit zero", open, Deposit{}, nil, "amount must be a positive number of cents"},
		{"deposit negative", open, Deposit{Amount: -5}, nil, "amount must be a positive number of cents"},
		{"deposit not opened", AccountState{}, Deposit{Amount: 5}, nil, "account is not open; send Open first"},
		{"deposit closed", closed, Deposit{Amount: 5}, nil, "account is closed"},
		{"deposit overflow", AccountState{Open: true, Balance: math.MaxInt64 - 1}, Deposit{Amount: 2}, nil, "would overflow"},
		{"deposit to max", AccountState{Open: true, Balance: math.MaxInt64 - 1}, Deposit{Amount: 1}, []Event{Deposited{Amount: 1, Currency: "EUR"}}, ""},

		{"withdraw", open, Withdraw{Amount: 100}, []Event{Withdrawn{Amount: 100}}, ""},
		{"withdraw all", open, Withdraw{Amount: 300}, []Event{Withdrawn{Amount: 300}}, ""},
		{"withdraw overdraw", open, Withdraw{Amount: 500}, nil, "insufficient funds: balance 300, withdrawal 500"},
		{"withdraw zero", open, Withdraw{}, nil, "amount must be a positive number of cents"},
		{"withdraw negative", open, Withdraw{Amount: -1}, nil, "amount must be a positive number of cents"},
		{"withdraw not opened", AccountState{}, Withdraw{Amount: 1}, nil, "account is not open"},
		{"withdraw closed", closed, Withdraw{Amount: 1}, nil, "account is closed"},

		{"close empty", empty, Close{}, []Event{Closed{}}, ""},
		{"close with balance", open, Close{}, nil, "cannot close an account with a balance of 300; withdraw it first"},
		{"close not opened", AccountState{}, Close{}, nil, "account is not open"},
		{"close twice", closed, Close{}, nil, "account is closed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Decide(tt.state, tt.cmd)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Decide() error = %v, want one containing %q", err, tt.wantErr)
				}
				if got != nil {
					t.Fatalf("Decide() rejected but returned events %v", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("Decide() unexpected error: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("Decide() = %#v, want %#v", got, tt.want)
			}
		})
	}
}

func TestDecideSentinels(t *testing.T) {
	if _, err := Decide(AccountState{Open: true}, Deposit{}); !errors.Is(err, ErrNonPositiveAmount) {
		t.Errorf("non-positive deposit: %v, want ErrNonPositiveAmount", err)
	}
	if _, err := Decide(AccountState{Open: true}, Open{Owner: "a"}); !errors.Is(err, ErrAlreadyOpen) {
		t.Errorf("open twice: %v, want ErrAlreadyOpen", err)
	}
	if _, err := Decide(AccountState{}, Close{}); !errors.Is(err, ErrNotOpen) {
		t.Errorf("close unopened: %v, want ErrNotOpen", err)
	}
	if _, err := Decide(AccountState{Closed: true}, Close{}); !errors.Is(err, ErrClosed) {
		t.Errorf("close closed: %v, want ErrClosed", err)
	}
}

func TestEvolve(t *testing.T) {
	tests := []struct {
		name   string
		state  AccountState
		events []Event
		want   AccountState
	}{
		{"nothing", AccountState{}, nil, AccountState{}},
		{"opened", AccountState{}, []Event{Opened{Owner: "alice"}}, AccountState{Owner: "alice", Open: true}},
		{"deposits and withdrawals",
			AccountState{},
			[]Event{Opened{Owner: "alice"}, Deposited{Amount: 500}, Deposited{Amount: 250}, Withdrawn{Amount: 300}},
			AccountState{Owner: "alice", Balance: 450, Open: true}},
		{"closed",
			AccountState{},
			[]Event{Opened{Owner: "alice"}, Deposited{Amount: 5}, Withdrawn{Amount: 5}, Closed{}},
			AccountState{Owner: "alice", Closed: true}},
		{"continues from a state",
			AccountState{Owner: "bob", Balance: 10, Open: true},
			[]Event{Deposited{Amount: 1}},
			AccountState{Owner: "bob", Balance: 11, Open: true}},
		{"nil event is ignored", AccountState{Owner: "bob", Open: true}, []Event{nil}, AccountState{Owner: "bob", Open: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.state
			for _, e := range tt.events {
				got = Evolve(got, e)
			}
			if got != tt.want {
				t.Fatalf("Evolve() = %+v, want %+v", got, tt.want)
			}
			if fold := Account.Fold(tt.state, tt.events...); fold != tt.want {
				t.Fatalf("Account.Fold() = %+v, want %+v", fold, tt.want)
			}
		})
	}
}

// TestLifecycle replays a whole account's life through decide and evolve, as
// the engine does: every accepted command's events are folded in.
func TestLifecycle(t *testing.T) {
	steps := []struct {
		cmd     Command
		wantErr bool
	}{
		{Deposit{Amount: 1}, true},
		{Open{Owner: "alice"}, false},
		{Deposit{Amount: 300}, false},
		{Withdraw{Amount: 500}, true},
		{Close{}, true},
		{Withdraw{Amount: 300}, false},
		{Close{}, false},
		{Deposit{Amount: 1}, true},
		{Open{Owner: "alice"}, true},
	}
	var s AccountState
	for i, st := range steps {
		evs, err := Decide(s, st.cmd)
		if (err != nil) != st.wantErr {
			t.Fatalf("step %d %T: error = %v, wantErr %v", i, st.cmd, err, st.wantErr)
		}
		s = Account.Fold(s, evs...)
	}
	if want := (AccountState{Owner: "alice", Closed: true}); s != want {
		t.Fatalf("final state %+v, want %+v", s, want)
	}
}

// TestDefinition exercises the type-erased view the engine and the HTTP
// layer use: names, JSON decoding, edge validation and state encoding.
func TestDefinition(t *testing.T) {
	def := Account.Untyped()
	if def.Name() != "account" {
		t.Fatalf("Name() = %q", def.Name())
	}
	if got, want := def.CommandNames(), []string{"ChangeOwner", "Close", "CreditForTransfer", "DebitForTransfer", "Deposit", "Open", "Withdraw"}; !reflect.DeepEqual(got, want) {
		t.Errorf("CommandNames() = %v, want %v", got, want)
	}
	if got, want := def.EventNames(), []string{"Closed", "Deposited", "Opened", "OwnerChanged", "TransferCreditDeclined", "TransferCredited", "TransferDebitDeclined", "TransferDebited", "Withdrawn"}; !reflect.DeepEqual(got, want) {
		t.Errorf("EventNames() = %v, want %v", got, want)
	}

	cmd, err := def.DecodeCommand("Deposit", []byte(`{"amount":500}`))
	if err != nil || cmd != (Deposit{Amount: 500}) {
		t.Fatalf("DecodeCommand(Deposit) = %#v, %v", cmd, err)
	}
	if cmd, err := def.DecodeCommand("Close", nil); err != nil || cmd != (Close{}) {
		t.Fatalf("DecodeCommand(Close, nil) = %#v, %v", cmd, err)
	}
	if _, err := def.DecodeCommand("Deposit", []byte(`{"amount":"5"}`)); err == nil {
		t.Error("DecodeCommand accepted a string amount")
	}
	if err := def.ValidateCommand(Withdraw{Amount: 0}); err == nil || err.Error() != "amount must be a positive number of cents" {
		t.Errorf("ValidateCommand(Withdraw{0}) = %v", err)
	}
	if err := def.ValidateCommand(Open{Owner: "alice"}); err != nil {
		t.Errorf("ValidateCommand(Open) = %v", err)
	}

	state := def.NewState()
	evs, err := def.Decide(state, Open{Owner: "alice"})
	if err != nil || len(evs) != 1 {
		t.Fatalf("Decide(Open) = %v, %v", evs, err)
	}
	name, version, data, err := def.EncodeEvent(evs[0])
	if err != nil || name != "Opened" || version != 1 || string(data) != `{"owner":"alice"}` {
		t.Fatalf("EncodeEvent = %q, %d, %s, %v", name, version, data, err)
	}
	state = def.Evolve(state, evs[0])
	enc, err := def.EncodeState(state)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"owner":"alice","balance":0,"open":true,"closed":false}`; string(enc) != want {
		t.Errorf("EncodeState = %s, want %s", enc, want)
	}
	back, err := def.DecodeState(enc)
	if err != nil || back != state {
		t.Errorf("DecodeState = %#v, %v; want %#v", back, err, state)
	}
}
