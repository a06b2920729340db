package statestore

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"time"
)

// StateRecord is an entity's current state as stored under StateKey and
// written to the changelog: its version, the time of its last event and the
// state encoded by the aggregate's codec.
type StateRecord struct {
	Version   int64
	UpdatedAt time.Time
	State     []byte
}

const stateRecordFormat = 1

// Encode returns the binary form: format byte, uvarint version, varint unix
// nanoseconds, state bytes.
func (r StateRecord) Encode() []byte {
	b := make([]byte, 0, 1+2*binary.MaxVarintLen64+len(r.State))
	b = append(b, stateRecordFormat)
	b = binary.AppendUvarint(b, uint64(r.Version))
	b = binary.AppendVarint(b, r.UpdatedAt.UnixNano())
	return append(b, r.State...)
}

// DecodeStateRecord parses Encode's output.
func DecodeStateRecord(b []byte) (StateRecord, error) {
	if len(b) < 1 || b[0] != stateRecordFormat {
		return StateRecord{}, errors.New("statestore: unknown state record format")
	}
	b = b[1:]
	v, n := binary.Uvarint(b)
	if n <= 0 {
		return StateRecord{}, errors.New("statestore: corrupt state record version")
	}
	b = b[n:]
	ts, n := binary.Varint(b)
	if n <= 0 {
		return StateRecord{}, errors.New("statestore: corrupt state record time")
	}
	return StateRecord{Version: int64(v), UpdatedAt: time.Unix(0, ts).UTC(), State: b[n:]}, nil
}

// CommandRecord is a command's outcome as remembered for idempotency. An
// accepted command points at the versions it wrote (From..To, empty when it
// wrote no event); a rejected one keeps its reason.
type CommandRecord struct {
	CommandID string `json:"c"`
	EntityID  string `json:"e"`
	From      int64  `json:"f,omitempty"`
	To        int64  `json:"t,omitempty"`
	At        int64  `json:"at"` // unix nanoseconds of the outcome
	Rejected  string `json:"r,omitempty"`
	Conflict  bool   `json:"x,omitempty"`
	Current   int64  `json:"v,omitempty"` // version when rejected
}

// Encode returns the JSON form.
func (r CommandRecord) Encode() []byte {
	b, _ := json.Marshal(r)
	return b
}

// DecodeCommandRecord parses Encode's output.
func DecodeCommandRecord(b []byte) (CommandRecord, error) {
	var r CommandRecord
	err := json.Unmarshal(b, &r)
	return r, err
}
