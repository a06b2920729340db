package aggregate

import "encoding/json"

// Codec encodes event payloads and state snapshots. Implementations must be
// safe for concurrent use. The content type is written to every event's
// "content-type" header so that consumers in other languages know how to
// read the value.
type Codec interface {
	Marshal(v any) ([]byte, error)
	Unmarshal(data []byte, v any) error
	ContentType() string
}

// JSON is the default codec, encoding/json.
type JSON struct{}

func (JSON) Marshal(v any) ([]byte, error)      { return json.Marshal(v) }
func (JSON) Unmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }
func (JSON) ContentType() string                { return "application/json" }
