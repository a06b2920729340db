package aggregate_test

import (
	"bytes"
	"strings"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/esker-io/esker/aggregate"
)

// Event records are read from "<type>-events", which any Kafka client can
// write to, and entity ids come from URLs and record keys: the fuzz targets
// check that EventFromRecord and ValidateEntityID never panic and that what
// they accept is consistent with what esker writes.

// envelopeHeaders are the header keys FuzzEventFromRecord sets, in order,
// when the corresponding bit of its mask is set.
var envelopeHeaders = []string{
	aggregate.HeaderEntityID,
	aggregate.HeaderVersion,
	aggregate.HeaderEventID,
	aggregate.HeaderEventType,
	aggregate.HeaderSchemaVersion,
	aggregate.HeaderCommandID,
	aggregate.HeaderTime,
	aggregate.HeaderCorrelationID,
	aggregate.HeaderCausationID,
	aggregate.HeaderContentType,
}

func FuzzEventFromRecord(f *testing.F) {
	all := uint16(1<<len(envelopeHeaders) - 1)
	f.Add([]byte("acc-1"), []byte(`{"amount":5}`), "acc-1", "42", "44a2bb1a-8337-5de8-8261-0f7345ed64ce", "Deposited", "3", "cmd-7",
		"2024-02-29T18:29:58.123456789Z", "corr-1", "cause-1", all, false)
	f.Add([]byte("from-key"), []byte("payload"), "", "5", "", "Opened", "", "", "", "", "", uint16(1<<1|1<<3), false)
	f.Add([]byte{}, []byte{}, "", "", "", "", "", "", "", "", "", uint16(0), false)
	f.Add([]byte("k"), []byte(nil), "\xff\xfe", "9223372036854775807", "\x00", "\xc3", "2147483647", "", "2024-01-01T00:00:00+23:59", "", "", all, true)
	f.Add([]byte("k"), []byte(nil), "e", "1", "", "T", "1", "", "0000-01-01T00:00:00+01:00", "", "", all, false)
	f.Add([]byte("k"), []byte(nil), "e", "1", "", "T", "1", "", "9999-12-31T23:59:59-01:00", "", "", all, false)
	f.Fuzz(func(t *testing.T, key, value []byte, entityID, version, eventID, eventType, schema, commandID, tm, corr, caus string, mask uint16, dup bool) {
		values := []string{entityID, version, eventID, eventType, schema, commandID, tm, corr, caus, "application/json"}
		var hs []aggregate.Header
		for i, k := range envelopeHeaders {
			if mask&(1<<i) != 0 {
				hs = append(hs, aggregate.Header{Key: k, Value: []byte(values[i])})
			}
		}
		if dup && len(hs) > 0 {
			// A repeated header: the last one counts.
			hs = append(hs, aggregate.Header{Key: hs[0].Key, Value: key})
		}
		e, err := aggregate.EventFromRecord(key, hs, value)
		if err != nil {
			return
		}
		if e.Version < 1 || e.Type == "" || e.SchemaVersion < 1 || !bytes.Equal(e.Data, value) {
			t.Fatalf("accepted an impossible event: %+v", e)
		}
		// What was read must be writable again, and read back the same.
		back, err := aggregate.EventFromRecord(key, e.Headers("application/json"), e.Data)
		if err != nil {
			t.Fatalf("headers of the accepted event %+v do not decode: %v", e, err)
		}
		if !eventsEqual(back, e) {
			t.Fatalf("re-encoding changed the event:\n got %+v\nwant %+v", back, e)
		}
	})
}

func FuzzEventHeadersRoundTrip(f *testing.F) {
	f.Add("acc-1", int64(42), "Deposited", 3, "cmd-7", "corr-1", "cause-1", int64(1709231398123456789), []byte(`{"amount":5}`))
	f.Add("e", int64(1), "Opened", 1, "", "", "", int64(0), []byte(nil))
	f.Add("日本", int64(1<<62), "\xff", 1<<30, "\x00", "", "", int64(-1<<62), []byte{0xff})
	f.Fuzz(func(t *testing.T, id string, version int64, typ string, schema int, cmdID, corr, caus string, nanos int64, data []byte) {
		if version < 1 || typ == "" || schema < 1 {
			return // what the engine writes: versions and schema versions from 1, a type
		}
		want := aggregate.Event{EntityID: id, Version: version, EventID: aggregate.EventID("t", id, version), Type: typ,
			SchemaVersion: schema, CommandID: cmdID, CorrelationID: corr, CausationID: caus,
			Time: time.Unix(0, nanos).UTC(), Data: data}
		got, err := aggregate.EventFromRecord([]byte(id), want.Headers("application/json"), want.Data)
		if err != nil {
			t.Fatalf("%+v: %v", want, err)
		}
		if !eventsEqual(got, want) {
			t.Fatalf("round trip:\n got %+v\nwant %+v", got, want)
		}
	})
}

func FuzzValidateEntityID(f *testing.F) {
	for _, id := range []string{"acc-1", "unicode-ü-日本", "slash/and?query#frag", "", "nul\x00byte", "bad\xffutf8", "\xc3",
		"nel\u0085", "\u2028", strings.Repeat("é", aggregate.MaxEntityIDBytes/2), strings.Repeat("x", aggregate.MaxEntityIDBytes+1)} {
		f.Add(id, int32(12))
	}
	f.Fuzz(func(t *testing.T, id string, partitions int32) {
		err := aggregate.ValidateEntityID(id)
		valid := id != "" && len(id) <= aggregate.MaxEntityIDBytes && utf8.ValidString(id) &&
			strings.IndexFunc(id, unicode.IsControl) < 0
		if (err == nil) != valid {
			t.Fatalf("ValidateEntityID(%q) = %v, want valid=%v", id, err, valid)
		}
		if err == nil && strings.IndexByte(id, 0) >= 0 {
			// Store keys end the id with a 0x00.
			t.Fatalf("ValidateEntityID accepted %q, which holds a 0x00", id)
		}
		if err != nil && err.Error() == "" {
			t.Fatalf("ValidateEntityID(%q): an error without a message", id)
		}
		if partitions > 0 {
			if p := aggregate.Partition(id, partitions); p < 0 || p >= partitions {
				t.Fatalf("Partition(%q, %d) = %d", id, partitions, p)
			}
		}
	})
}
