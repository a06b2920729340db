package chaostest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/esker-io/esker/examples/bank"
)

// The workload: concurrent clients send bank commands and reads to random
// nodes, like clients behind a load balancer that knows nothing of node
// health. A command keeps its command id across retries, so esker's
// idempotency makes retrying safe; a command whose retries all end
// ambiguously is recorded with an unknown outcome. Few accounts, so
// operations on one account overlap and conflict.

// workloadStats counts operations as they complete, for progress lines and
// the summary.
type workloadStats struct {
	Invoked, OK, Rejected, Unknown, NotSent atomic.Int64
	Reads, ReadsOK, ReadsFailed             atomic.Int64
	Attempts, Unexpected                    atomic.Int64
	InFlight                                atomic.Int64
}

type workload struct {
	h        *History
	c        *cluster
	accounts []string
	clients  int
	seed     uint64
	// retryBudget bounds how long a command is retried before its
	// outcome is recorded as unknown.
	retryBudget time.Duration
	http        *http.Client
	stats       workloadStats
	logf        func(format string, args ...any)

	unexpectedOnce sync.Once
}

func newWorkload(h *History, c *cluster, accounts []string, clients int, seed uint64, logf func(string, ...any)) *workload {
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 2 * time.Second}).DialContext,
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     30 * time.Second,
	}
	return &workload{
		h: h, c: c, accounts: accounts, clients: clients, seed: seed,
		retryBudget: 60 * time.Second,
		// Above the node's command timeout (5 s) plus its forwarding
		// slack (2 s), so a slow but alive node answers before the
		// client gives up on the attempt; a paused node is given up on.
		http: &http.Client{Transport: tr, Timeout: 12 * time.Second},
		logf: logf,
	}
}

// run starts the clients; they start no new operation once ctx ends, and
// run returns when the operations in flight have finished (each within its
// retry budget).
func (w *workload) run(ctx context.Context) {
	var wg sync.WaitGroup
	for i := range w.clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.client(ctx, i)
		}()
	}
	wg.Wait()
}

// client is one client's loop. It first opens its share of the accounts,
// then draws operations: mostly deposits, withdrawals (some larger than the
// balance, so they are rejected) and reads, and now and then an Open of an
// account that is already open.
func (w *workload) client(ctx context.Context, id int) {
	rng := rand.New(rand.NewPCG(w.seed, uint64(id)+1))
	seq := 0
	next := func() string {
		seq++
		return fmt.Sprintf("c%d-%d", id, seq)
	}
	for i, acc := range w.accounts {
		if i%w.clients == id && ctx.Err() == nil {
			w.command(id, rng, OpOpen, acc, 0, next())
		}
	}
	for ctx.Err() == nil {
		acc := w.accounts[rng.IntN(len(w.accounts))]
		switch r := rng.Float64(); {
		case r < 0.03:
			w.command(id, rng, OpOpen, acc, 0, next())
		case r < 0.43:
			w.command(id, rng, OpDeposit, acc, 1+rng.Int64N(100), next())
		case r < 0.70:
			w.command(id, rng, OpWithdraw, acc, 1+rng.Int64N(150), next())
		case r < 0.95:
			w.read(id, rng, OpGet, acc)
		default:
			w.read(id, rng, OpGetStale, acc)
		}
		time.Sleep(time.Duration(rng.IntN(20)) * time.Millisecond)
	}
}

// pick draws the node an attempt goes to.
func (w *workload) pick(rng *rand.Rand) *nodeProc {
	ts := w.c.targets()
	return ts[rng.IntN(len(ts))]
}

// command sends one command until it gets a definite answer (200 or 422)
// or the retry budget is spent, always with the same command id.
func (w *workload) command(client int, rng *rand.Rand, kind OpKind, acc string, amount int64, cmdID string) {
	w.stats.Invoked.Add(1)
	w.stats.InFlight.Add(1)
	defer w.stats.InFlight.Add(-1)
	op := w.h.Invoke(Op{Client: client, Kind: kind, Account: acc, CommandID: cmdID, Amount: amount})
	var body map[string]any
	switch kind {
	case OpOpen:
		body = map[string]any{"type": "Open", "data": map[string]any{"owner": acc}}
	case OpDeposit:
		body = map[string]any{"type": "Deposit", "data": map[string]any{"amount": amount}}
	case OpWithdraw:
		body = map[string]any{"type": "Withdraw", "data": map[string]any{"amount": amount}}
	}
	body["commandId"] = cmdID
	raw, _ := json.Marshal(body)
	deadline := time.Now().Add(w.retryBudget)
	// notSent stays true while every answer was 503, which esker gives a
	// command only when it provably did not write it.
	notSent := true
	for {
		n := w.pick(rng)
		op.Attempts++
		op.Node = n.index + 1
		w.stats.Attempts.Add(1)
		status, resp, hdr, err := w.do(http.MethodPost, n.url+"/v1/aggregates/account/"+acc+"/commands", raw)
		op.ServedBy = hdr.Get("Esker-Served-By")
		if err != nil {
			op.Last = err.Error()
			notSent = false
		} else {
			op.Last = strconv.Itoa(status)
		}
		var retryAfter time.Duration
		switch {
		case err != nil:
		case status == http.StatusOK:
			var out struct{ Version int64 }
			if json.Unmarshal(resp, &out) == nil && out.Version > 0 {
				op.Outcome, op.Version = OutcomeOK, out.Version
				w.stats.OK.Add(1)
				w.h.Complete(op)
				return
			}
			op.Last = "200 without a version: " + string(resp)
			notSent = false
		case status == http.StatusUnprocessableEntity:
			op.Outcome = OutcomeRejected
			w.stats.Rejected.Add(1)
			w.h.Complete(op)
			return
		case status == http.StatusServiceUnavailable:
			if s, err := strconv.Atoi(hdr.Get("Retry-After")); err == nil {
				retryAfter = time.Duration(s) * time.Second
			}
		case status == http.StatusGatewayTimeout || status == http.StatusInternalServerError:
			notSent = false
		default:
			// 400, 404, 409, 413: nothing the workload sends should
			// get them. Keep retrying (the outcome is not known), but
			// count and show it.
			notSent = false
			w.stats.Unexpected.Add(1)
			w.unexpectedOnce.Do(func() {
				w.logf("unexpected answer to %s on %s from %s: %d %s", cmdID, acc, n.name, status, resp)
			})
		}
		if time.Now().After(deadline) {
			if notSent {
				op.Outcome = OutcomeNotSent
				w.stats.NotSent.Add(1)
			} else {
				op.Outcome = OutcomeUnknown
				w.stats.Unknown.Add(1)
			}
			w.h.Complete(op)
			return
		}
		wait := time.Duration(100+rng.IntN(300)) * time.Millisecond
		time.Sleep(max(wait, min(retryAfter, time.Second)))
	}
}

// read sends one read, once: a read that fails carries no information and
// is left out of the checks; retrying it would only shorten the window a
// stale answer could show in.
func (w *workload) read(client int, rng *rand.Rand, kind OpKind, acc string) {
	w.stats.Reads.Add(1)
	w.stats.InFlight.Add(1)
	defer w.stats.InFlight.Add(-1)
	n := w.pick(rng)
	op := w.h.Invoke(Op{Client: client, Kind: kind, Account: acc, Node: n.index + 1, Attempts: 1})
	url := n.url + "/v1/aggregates/account/" + acc
	if kind == OpGetStale {
		url += "?stale=true"
	}
	w.stats.Attempts.Add(1)
	status, resp, hdr, err := w.do(http.MethodGet, url, nil)
	op.ServedBy = hdr.Get("Esker-Served-By")
	st, parseErr := parseState(status, resp)
	switch {
	case err != nil:
		op.Outcome, op.Last = OutcomeFailed, err.Error()
	case parseErr != nil:
		op.Outcome, op.Last = OutcomeFailed, parseErr.Error()
	case status == http.StatusNotFound:
		op.Outcome, op.Last = OutcomeNotFound, "404"
	default:
		op.Outcome, op.Last = OutcomeOK, "200"
		op.Version, op.State, op.Standby = st.Version, st.State, st.Standby
	}
	if op.Outcome == OutcomeFailed {
		w.stats.ReadsFailed.Add(1)
	} else {
		w.stats.ReadsOK.Add(1)
	}
	w.h.Complete(op)
}

// stateBody is the answer of GET /v1/aggregates/account/{id}.
type stateBody struct {
	Version int64             `json:"version"`
	State   bank.AccountState `json:"state"`
	Standby bool              `json:"standby"`
}

// parseState reads a state answer: 200 with a state, 404 when the account
// has no events; anything else is an error.
func parseState(status int, body []byte) (stateBody, error) {
	var st stateBody
	switch status {
	case http.StatusOK:
		if err := json.Unmarshal(body, &st); err != nil {
			return st, fmt.Errorf("200 with a body that is not a state: %q", body)
		}
		return st, nil
	case http.StatusNotFound:
		return st, nil
	}
	return st, fmt.Errorf("status %d: %s", status, bytes.TrimSpace(body))
}

// do sends one request and reads the whole answer.
func (w *workload) do(method, url string, body []byte) (int, []byte, http.Header, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(context.Background(), method, url, rd)
	if err != nil {
		return 0, nil, http.Header{}, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := w.http.Do(req)
	if err != nil {
		return 0, nil, http.Header{}, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, nil, resp.Header, errors.Join(errors.New("reading the answer"), err)
	}
	return resp.StatusCode, raw, resp.Header, nil
}
