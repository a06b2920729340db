package engine

import (
	"bytes"
	"encoding/json"
	"reflect"
	"testing"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
)

// Command records are read from "<type>-commands", which any Kafka client
// can write to. FuzzParseCommand checks that ParseCommand never panics on
// any value and header values, that what it accepts is a command the engine
// can act on (a type, no negative expected version), and that it survives
// being written by CommandRecord and read again.

// commandHeaders are the header keys FuzzParseCommand sets, in order, when
// the corresponding bit of its mask is set.
var commandHeaders = []string{
	HeaderCommandType,
	aggregate.HeaderCommandID,
	HeaderExpectedVersion,
	aggregate.HeaderCorrelationID,
	aggregate.HeaderCausationID,
}

func FuzzParseCommand(f *testing.F) {
	// The header form, as esker's producers write it.
	f.Add([]byte(`{"amount":5}`), "Deposit", "c-1", "7", "corr", "cause", uint8(0b11111))
	f.Add([]byte(nil), "Open", "", "0", "", "", uint8(0b00101))
	f.Add([]byte("\xff\x00 not JSON"), "A", "", "", "", "", uint8(0b00001))
	// The JSON envelope form, as kcat users write it.
	f.Add([]byte(`{"type":"Open","data":{"owner":"x"},"commandId":"k","expectedVersion":0}`), "", "", "", "", "", uint8(0))
	f.Add([]byte(`{"type":"Deposit","data":{"amount":500},"commandId":"dep-1","correlationId":"c","causationId":"d","extra":1}`), "", "", "", "", "", uint8(0))
	f.Add([]byte(`{"type":"Open","expectedVersion":-2}`), "", "", "", "", "", uint8(0))
	f.Add([]byte(`{"type":"Open"}`), "", "", "-1", "", "", uint8(0b00100))
	f.Add([]byte(`{"data":{}}`), "", "", "", "", "", uint8(0))
	f.Add([]byte(`{"type":"\xff"}`), "", "", "", "", "", uint8(0))
	f.Add([]byte(`{"type":`), "", "", "", "", "", uint8(0))
	f.Add([]byte(`null`), "", "", "", "", "", uint8(0))
	f.Add([]byte{}, "", "", "99999999999999999999", "", "", uint8(0b00101))
	f.Fuzz(func(t *testing.T, value []byte, typ, cmdID, expected, corr, caus string, mask uint8) {
		values := []string{typ, cmdID, expected, corr, caus}
		r := &kgo.Record{Topic: "account-commands", Key: []byte("acc-1"), Value: value}
		for i, k := range commandHeaders {
			if mask&(1<<i) != 0 {
				r.Headers = append(r.Headers, kgo.RecordHeader{Key: k, Value: []byte(values[i])})
			}
		}
		c, err := ParseCommand(r)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("an error without a message")
			}
			return
		}
		if c.Type == "" {
			t.Fatalf("accepted a command without a type: %+v", c)
		}
		if c.ExpectedVersion != nil && *c.ExpectedVersion < aggregate.ExpectExists {
			t.Fatalf("accepted an expected version below -1 (must exist): %d", *c.ExpectedVersion)
		}
		if mask&1 != 0 && !bytes.Equal(c.Data, value) {
			t.Fatalf("header form: data %q, want the record value %q", c.Data, value)
		}
		if mask&1 == 0 && len(c.Data) > 0 && !json.Valid(c.Data) {
			t.Fatalf("envelope form: data %q is not JSON", c.Data)
		}
		again, err := ParseCommand(CommandRecord("account", "acc-1", 0, c))
		if err != nil {
			t.Fatalf("%+v written by CommandRecord does not parse: %v", c, err)
		}
		if !commandsEqual(again, c) {
			t.Fatalf("CommandRecord changed the command: %+v, then %+v", c, again)
		}
	})
}

func FuzzCommandRecordRoundTrip(f *testing.F) {
	f.Add("Deposit", []byte(`{"amount":5}`), true, int64(7), "c-1", "corr", "cause")
	f.Add("Open", []byte(nil), false, int64(0), "", "", "")
	f.Add("\xff", []byte{0, 0xff}, true, int64(1<<62), "\x00", "", "")
	f.Fuzz(func(t *testing.T, typ string, data []byte, hasExpected bool, expected int64, cmdID, corr, caus string) {
		if typ == "" || expected < aggregate.ExpectExists {
			return // not a command esker writes
		}
		want := aggregate.Command{Type: typ, Data: data, CommandID: cmdID, CorrelationID: corr, CausationID: caus}
		if hasExpected {
			want.ExpectedVersion = &expected
		}
		got, err := ParseCommand(CommandRecord("account", "acc-1", 3, want))
		if err != nil {
			t.Fatalf("%+v: %v", want, err)
		}
		if !commandsEqual(got, want) {
			t.Fatalf("round trip: got %+v, want %+v", got, want)
		}
	})
}

func commandsEqual(a, b aggregate.Command) bool {
	if (a.ExpectedVersion == nil) != (b.ExpectedVersion == nil) ||
		a.ExpectedVersion != nil && *a.ExpectedVersion != *b.ExpectedVersion {
		return false
	}
	return a.Type == b.Type && bytes.Equal(a.Data, b.Data) && a.CommandID == b.CommandID &&
		a.CorrelationID == b.CorrelationID && a.CausationID == b.CausationID
}

// Repartition records are read from "<app>-<name>-repartition", which any
// client with write access can write to. FuzzDecodeChange checks that
// decodeChange never panics, and that a change it accepts survives being
// encoded and decoded again.
func FuzzDecodeChange(f *testing.F) {
	f.Add([]byte("2026-11-25"), []byte(`{"event":{"topic":"account-events","partition":3,"offset":17,"entityId":"a","version":2,"type":"Deposited","schemaVersion":1,"time":"2026-11-25T10:00:00Z","data":"eyJhbW91bnQiOjV9"}}`))
	f.Add([]byte("alice"), []byte(`{"old":{"owner":"alice","balance":5,"open":true},"new":{"owner":"alice","balance":7,"open":true}}`))
	f.Add([]byte("bob"), []byte(`{"new":{"owner":"bob"}}`))
	f.Add([]byte("x"), []byte(`{}`))
	f.Add([]byte(""), []byte(`{"event":null,"old":null}`))
	f.Add([]byte("x"), []byte(`not json`))
	f.Fuzz(func(t *testing.T, key, value []byte) {
		ch, err := decodeChange(&kgo.Record{Key: key, Value: value})
		if err != nil {
			return
		}
		if ch.Event == nil && ch.Old == nil && ch.New == nil {
			t.Fatalf("accepted an empty change: %q", value)
		}
		enc, err := encodeChange(ch)
		if err != nil {
			t.Fatalf("an accepted change does not encode: %v", err)
		}
		again, err := decodeChange(&kgo.Record{Key: key, Value: enc})
		if err != nil {
			t.Fatalf("re-encoded change does not decode: %v (%s)", err, enc)
		}
		// Rows are compared as JSON values: encoding may escape them
		// differently ("&" as "\u0026").
		if again.Key != ch.Key || !sameJSON(again.Old, ch.Old) || !sameJSON(again.New, ch.New) || (again.Event == nil) != (ch.Event == nil) {
			t.Fatalf("round trip changed the change: %+v, then %+v", ch, again)
		}
		if ch.Event != nil {
			a, b := *ch.Event, *again.Event
			if a.Topic != b.Topic || a.Partition != b.Partition || a.Offset != b.Offset || a.EntityID != b.EntityID || a.Version != b.Version ||
				a.Type != b.Type || !a.Time.Equal(b.Time) || !bytes.Equal(a.Data, b.Data) {
				t.Fatalf("round trip changed the event: %+v, then %+v", a, b)
			}
		}
	})
}

// sameJSON reports whether a and b are both absent or the same JSON value.
func sameJSON(a, b json.RawMessage) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	return reflect.DeepEqual(x, y)
}
