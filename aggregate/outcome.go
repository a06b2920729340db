package aggregate

// Outcome is the result of one command, reported to whoever submitted it
// once the transaction that holds it has committed.
type Outcome struct {
	CommandID string `json:"commandId"`
	EntityID  string `json:"id"`
	// Accepted is true when decide returned events (possibly none) and they
	// were committed.
	Accepted bool `json:"accepted"`
	// Version is the entity's version after the command when accepted, and
	// its current version when rejected.
	Version int64 `json:"version"`
	// Events are the events the command wrote, in order.
	Events []Event `json:"events,omitempty"`
	// Reason explains a rejection.
	Reason string `json:"reason,omitempty"`
	// Conflict marks a rejection by optimistic concurrency: the command's
	// expected version did not match Version.
	Conflict bool `json:"conflict,omitempty"`
	// Gone marks a rejection because the entity was forgotten (HTTP 410).
	Gone bool `json:"gone,omitempty"`
	// NotFound marks a forget of an entity that never existed (HTTP 404).
	NotFound bool `json:"notFound,omitempty"`
}
