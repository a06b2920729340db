package engine

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/statestore"
)

func TestCommandRecordRoundTrip(t *testing.T) {
	v := int64(7)
	in := aggregate.Command{Type: "Deposit", Data: json.RawMessage(`{"amount":5}`), ExpectedVersion: &v,
		CommandID: "c-1", CorrelationID: "corr", CausationID: "cause"}
	r := CommandRecord("account", "acc-1", 3, in)
	if r.Topic != "account-commands" || r.Partition != 3 || string(r.Key) != "acc-1" || string(r.Value) != `{"amount":5}` {
		t.Fatalf("record %+v", r)
	}
	out, err := ParseCommand(r)
	if err != nil {
		t.Fatal(err)
	}
	if out.Type != in.Type || string(out.Data) != string(in.Data) || *out.ExpectedVersion != 7 ||
		out.CommandID != in.CommandID || out.CorrelationID != in.CorrelationID || out.CausationID != in.CausationID {
		t.Fatalf("parsed %+v", out)
	}
}

func TestParseCommandEnvelopeAndErrors(t *testing.T) {
	out, err := ParseCommand(&kgo.Record{Value: []byte(`{"type":"Open","data":{"owner":"x"},"commandId":"k"}`)})
	if err != nil || out.Type != "Open" || out.CommandID != "k" || string(out.Data) != `{"owner":"x"}` {
		t.Fatalf("envelope: %+v %v", out, err)
	}
	for name, r := range map[string]*kgo.Record{
		"not JSON":         {Value: []byte(`nope`)},
		"no type":          {Value: []byte(`{"data":{}}`)},
		"empty type":       {Headers: []kgo.RecordHeader{{Key: HeaderCommandType}}},
		"bad version":      {Headers: []kgo.RecordHeader{{Key: HeaderCommandType, Value: []byte("A")}, {Key: HeaderExpectedVersion, Value: []byte("x")}}},
		"negative version": {Headers: []kgo.RecordHeader{{Key: HeaderCommandType, Value: []byte("A")}, {Key: HeaderExpectedVersion, Value: []byte("-2")}}},
		// Found by FuzzParseCommand: the envelope form took a negative
		// expected version, which the header form refuses.
		"negative envelope version": {Value: []byte(`{"type":"A","expectedVersion":-2}`)},
		"unknown mode":              {Value: []byte(`{"type":"A","expectedVersion":"sometimes"}`)},
	} {
		if _, err := ParseCommand(r); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestSplitJournal(t *testing.T) {
	j := &statestore.Journal{}
	for v := int64(1); v <= 6; v++ {
		j.Events = append(j.Events, aggregate.Event{Version: v, Data: json.RawMessage(`"` + strings.Repeat("x", 100) + `"`)})
	}
	j.Commands = []statestore.CommandRecord{{CommandID: "a", From: 1, To: 2}, {CommandID: "b", From: 3, To: 5}, {CommandID: "c", From: 6, To: 6}, {CommandID: "none"}}
	if got := splitJournal(j, 1<<20); len(got) != 1 || got[0] != j {
		t.Fatalf("a small journal is not split: %d chunks", len(got))
	}
	chunks := splitJournal(j, 2*(102+128))
	if len(chunks) != 3 {
		t.Fatalf("%d chunks, want 3", len(chunks))
	}
	var versions []int64
	where := map[string]int{}
	for i, c := range chunks {
		for _, e := range c.Events {
			versions = append(versions, e.Version)
		}
		for _, cmd := range c.Commands {
			where[cmd.CommandID] = i
		}
	}
	for i, v := range versions {
		if v != int64(i+1) {
			t.Fatalf("versions %v", versions)
		}
	}
	// A command goes with the chunk of its first event; one without events
	// with the first chunk.
	if where["a"] != 0 || where["b"] != 1 || where["c"] != 2 || where["none"] != 0 {
		t.Fatalf("commands placed %v", where)
	}
}
