package bank

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/esker-io/esker/sideeffects"
)

// Alert is the JSON body WithdrawalAlerts posts.
type Alert struct {
	Account string    `json:"account"`
	Amount  int64     `json:"amount"`
	Kind    string    `json:"kind"` // "withdrawal" or "transfer"
	EventID string    `json:"eventId"`
	Time    time.Time `json:"time"`
}

// WithdrawalAlerts is the "withdrawal-alerts" side effect: it posts an
// Alert to url for every withdrawal or outgoing transfer of at least
// threshold cents. It runs at least once (an alert may be posted again after
// a crash or a rebalance), so every post carries the event id in the
// Idempotency-Key header for the receiver to deduplicate. A 4xx answer
// other than 408 and 429 is permanent (the event goes to the dead-letter
// topic at once); other failures are retried with backoff, then
// dead-lettered. client nil uses a client with a 10 s timeout.
func WithdrawalAlerts(url string, threshold int64, client *http.Client, opts ...sideeffects.Option) (*sideeffects.Consumer, error) {
	if client == nil {
		client = &http.Client{Timeout: 10 * time.Second}
	}
	handle := func(ctx context.Context, ev sideeffects.Event) error {
		v, err := Account.DecodeEvent(ev.Event)
		if err != nil {
			return nil // not an account event this code knows: nothing to alert on
		}
		alert := Alert{Account: ev.EntityID, EventID: ev.EventID, Time: ev.Time}
		switch e := v.(type) {
		case Withdrawn:
			alert.Kind, alert.Amount = "withdrawal", e.Amount
		case TransferDebited:
			alert.Kind, alert.Amount = "transfer", e.Amount
		default:
			return nil
		}
		if alert.Amount < threshold {
			return nil
		}
		body, _ := json.Marshal(alert)
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
		if err != nil {
			return sideeffects.Permanent(err)
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", ev.EventID)
		res, err := client.Do(req)
		if err != nil {
			return err
		}
		defer res.Body.Close()
		msg, _ := io.ReadAll(io.LimitReader(res.Body, 512))
		switch {
		case res.StatusCode < 300:
			return nil
		case res.StatusCode < 500 && res.StatusCode != http.StatusRequestTimeout && res.StatusCode != http.StatusTooManyRequests:
			return sideeffects.Permanent(fmt.Errorf("the alert receiver refused the alert: %s: %s", res.Status, msg))
		default:
			return errors.New("the alert receiver failed: " + res.Status)
		}
	}
	return sideeffects.New("withdrawal-alerts", []string{"account-events"}, handle, opts...)
}
