package interactive

import (
	"encoding/json"
	"math"
	"net/http"
	"strconv"
	"time"
)

// errorBody is the JSON body of every error answer. Error is always set; the
// other fields appear where the route documents them.
type errorBody struct {
	Error          string `json:"error"`
	CommandID      string `json:"commandId,omitempty"`
	CurrentVersion *int64 `json:"currentVersion,omitempty"`
}

// writeJSON writes v as a JSON answer with the given status. Encoding v
// cannot fail for the types this package writes; if it does, the client gets
// a 500 with a JSON error instead of a half-written body.
func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		body, _ = json.Marshal(errorBody{Error: "internal error: cannot encode the answer as JSON: " + err.Error()})
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
}

// writeError writes {"error": msg} with the given status.
func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, errorBody{Error: msg})
}

// writeNotReady answers 503 with a Retry-After header taken from e and body
// {"error": reason}, plus commandId when one is given.
func writeNotReady(w http.ResponseWriter, e *NotReadyError, commandID string) {
	w.Header().Set("Retry-After", strconv.Itoa(retryAfterSeconds(e.RetryAfter)))
	msg := "this node is not ready"
	if e.Reason != "" {
		msg += ": " + e.Reason
	}
	msg += "; retry after the Retry-After delay"
	writeJSON(w, http.StatusServiceUnavailable, errorBody{Error: msg, CommandID: commandID})
}

// writeRetry answers status (503) with Retry-After: 1 and a JSON error,
// with the command id when there is one.
func writeRetry(w http.ResponseWriter, status int, msg, commandID string) {
	w.Header().Set("Retry-After", "1")
	writeJSON(w, status, errorBody{Error: msg, CommandID: commandID})
}

// retryAfterSeconds rounds d up to whole seconds, at least 1, as the
// Retry-After header needs.
func retryAfterSeconds(d time.Duration) int {
	s := math.Ceil(d.Seconds())
	if s < 1 || math.IsNaN(s) {
		return 1
	}
	if s > math.MaxInt32 {
		return math.MaxInt32
	}
	return int(s)
}
