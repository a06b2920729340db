package engine

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
)

// Command record headers. A command on "<type>-commands" takes one of two
// forms, both keyed by entity id:
//
//   - headers: esker-command-type (required), esker-command-id,
//     esker-expected-version, esker-correlation-id, esker-causation-id; the
//     value is the command's data. This is what esker's own producers write:
//     the engine decodes the data once.
//   - a JSON envelope as the value, {"type","data","expectedVersion",
//     "commandId",…} (aggregate.Command), for clients that cannot set
//     headers easily (kcat, scripts).
const (
	HeaderCommandType     = "esker-command-type"
	HeaderExpectedVersion = "esker-expected-version"
)

// CommandRecord builds the record esker produces for a command.
func CommandRecord(aggregateType, id string, partition int32, cmd aggregate.Command) *kgo.Record {
	headers := make([]kgo.RecordHeader, 0, 5)
	headers = append(headers, kgo.RecordHeader{Key: HeaderCommandType, Value: []byte(cmd.Type)})
	if cmd.CommandID != "" {
		headers = append(headers, kgo.RecordHeader{Key: aggregate.HeaderCommandID, Value: []byte(cmd.CommandID)})
	}
	if cmd.ExpectedVersion != nil {
		headers = append(headers, kgo.RecordHeader{Key: HeaderExpectedVersion, Value: strconv.AppendInt(nil, *cmd.ExpectedVersion, 10)})
	}
	if cmd.CorrelationID != "" {
		headers = append(headers, kgo.RecordHeader{Key: aggregate.HeaderCorrelationID, Value: []byte(cmd.CorrelationID)})
	}
	if cmd.CausationID != "" {
		headers = append(headers, kgo.RecordHeader{Key: aggregate.HeaderCausationID, Value: []byte(cmd.CausationID)})
	}
	return &kgo.Record{
		Topic:     CommandsTopic(aggregateType),
		Partition: partition,
		Key:       []byte(id),
		Value:     cmd.Data,
		Headers:   headers,
	}
}

// ParseCommand reads a command record in either form.
func ParseCommand(r *kgo.Record) (aggregate.Command, error) {
	var c aggregate.Command
	typed := false
	for _, h := range r.Headers {
		switch h.Key {
		case HeaderCommandType:
			c.Type, typed = string(h.Value), true
		case aggregate.HeaderCommandID:
			c.CommandID = string(h.Value)
		case HeaderExpectedVersion:
			v, err := strconv.ParseInt(string(h.Value), 10, 64)
			if err != nil || v < aggregate.ExpectExists {
				return c, fmt.Errorf("header %s: %q is not a version (or -1: must exist)", HeaderExpectedVersion, h.Value)
			}
			c.ExpectedVersion = &v
		case aggregate.HeaderCorrelationID:
			c.CorrelationID = string(h.Value)
		case aggregate.HeaderCausationID:
			c.CausationID = string(h.Value)
		}
	}
	if typed {
		c.Data = r.Value
		if c.Type == "" {
			return c, fmt.Errorf("header %s is empty", HeaderCommandType)
		}
		return c, nil
	}
	var raw aggregate.CommandJSON
	if err := json.Unmarshal(r.Value, &raw); err != nil {
		return c, fmt.Errorf("command record is neither headers plus data nor a JSON command envelope: %w", err)
	}
	// An expected version that names no mode is malformed input, not a
	// version conflict.
	c, err := raw.Command()
	if err != nil {
		return c, fmt.Errorf("command envelope: %w", err)
	}
	if c.Type == "" {
		return c, errors.New(`command envelope has no "type"`)
	}
	return c, nil
}
