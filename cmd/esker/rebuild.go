package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"
)

func runRebuild(e *env, args []string) int {
	fs := newFlagSet("rebuild", "esker rebuild --type TYPE --node URL [--node URL ...] [flags]", `
Rebuilds the state of the aggregate type TYPE from its events on every node
of the application: each node folds "<TYPE>-events" through the type's
current evolve into a fresh generation of its partitions' state, tailing the
commands that arrive meanwhile, then swaps it in and writes it to the
changelog. The old state keeps serving reads and commands until the swap.

The nodes are the members of the cluster map (GET /v1/cluster) of the
--node URLs. esker rebuild starts the rebuild on each (POST
/v1/admin/rebuild/TYPE), then shows its progress per partition (records of
the events partition replayed of total, percent, events folded, rate) until
every partition is done. It exits 1
when a rebuild fails or a partition had no owner to rebuild it.

A node rebuilds by itself, before it serves, when the type's state version
(aggregate.StateVersion) differs from the one its stored state was folded
with; esker rebuild is for a fold that changed without a version bump, or to
repair state.`)
	fs.examples = `
esker rebuild --type account --node http://127.0.0.1:8080
esker rebuild --type account --node http://bank1:8080,http://bank2:8080 --interval 5s`
	typ := fs.String("type", "", "aggregate `type` to rebuild (required)")
	var nodes stringList
	fs.Var(&nodes, "node", "`URL` of a node's HTTP API; repeat or separate with commas (required)")
	interval := fs.Duration("interval", time.Second, "how often to show progress (`duration`)")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to wait for a node's answer to one request (`duration`)")
	ca := fs.String("tls-ca", "", "PEM `file` of the authority that signs the nodes' certificates, for https nodes (default: the system's roots)")
	apiToken := fs.String("api-token", "", "bearer `token` for nodes that require one (default: the first of $ESKER_API_TOKEN)")
	if code, ok := fs.parse(e, args); !ok {
		return code
	}
	switch {
	case *typ == "":
		return fs.fail(e, "missing --type")
	case len(nodes) == 0:
		return fs.fail(e, "missing --node")
	case *interval <= 0:
		return fs.fail(e, "--interval must be positive, got %v", *interval)
	case *timeout <= 0:
		return fs.fail(e, "--timeout must be positive, got %v", *timeout)
	}
	for _, n := range nodes {
		if u, err := url.Parse(n); err != nil || u.Scheme == "" || u.Host == "" {
			return fs.fail(e, "--node %q is not a URL like http://127.0.0.1:8080", n)
		}
	}
	token, _, _ := strings.Cut(cmp.Or(*apiToken, os.Getenv("ESKER_API_TOKEN")), ",")
	client := &http.Client{Timeout: *timeout}
	if *ca != "" {
		pool, msg := readCAFile("--tls-ca", *ca)
		if msg != "" {
			return fs.fail(e, "%s", msg)
		}
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool}
		client.Transport = tr
	}
	c := &rebuildClient{http: client, typ: *typ, token: strings.TrimSpace(token)}
	return c.run(e, nodes, *interval)
}

// stringList is a repeatable, comma-separated string flag.
type stringList []string

func (s *stringList) String() string { return strings.Join(*s, ",") }

func (s *stringList) Set(v string) error {
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*s = append(*s, strings.TrimRight(p, "/"))
		}
	}
	return nil
}

var _ flag.Value = (*stringList)(nil)

type rebuildClient struct {
	http  *http.Client
	typ   string
	token string // sent as a bearer token when the nodes require one
}

// rebuildStatus mirrors interactive.RebuildStatus.
type rebuildStatus struct {
	Type         string `json:"type"`
	StateVersion int    `json:"stateVersion"`
	InProgress   bool   `json:"inProgress"`
	Partitions   []struct {
		Partition       int32   `json:"partition"`
		ID              int64   `json:"id"`
		State           string  `json:"state"`
		Replayed        int64   `json:"replayed"`
		Total           int64   `json:"total"`
		Events          int64   `json:"events"`
		Percent         float64 `json:"percent"`
		EventsPerSecond float64 `json:"eventsPerSecond"`
		Error           string  `json:"error"`
	} `json:"partitions"`
}

type clusterInfo struct {
	Partitions int `json:"partitions"`
	Members    []struct {
		URL string `json:"url"`
	} `json:"members"`
}

// call sends a request and decodes the JSON answer; a non-2xx answer is an
// error with the node's message.
func (c *rebuildClient) call(ctx context.Context, method, u string, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return err
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(body, &e) == nil && e.Error != "" {
			return fmt.Errorf("%s %s: %s (HTTP %d)", method, u, e.Error, resp.StatusCode)
		}
		return fmt.Errorf("%s %s: HTTP %d: %s", method, u, resp.StatusCode, bytes.TrimSpace(body))
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("%s %s: the answer is not the expected JSON: %v", method, u, err)
	}
	return nil
}

type tracked struct {
	node      string
	partition int32
	id        int64
}

func (c *rebuildClient) run(e *env, given []string, interval time.Duration) int {
	ctx := e.ctx
	// The members, from the cluster map of the nodes given.
	var members []string
	partitions := 0
	var lastErr error
	for _, n := range given {
		var ci clusterInfo
		if err := c.call(ctx, http.MethodGet, n+"/v1/cluster", &ci); err != nil {
			lastErr = err
			continue
		}
		partitions = max(partitions, ci.Partitions)
		for _, m := range ci.Members {
			if u := strings.TrimRight(m.URL, "/"); u != "" && !slices.Contains(members, u) {
				members = append(members, u)
			}
		}
	}
	if len(members) == 0 {
		fmt.Fprintf(e.stderr, "esker rebuild: cannot read the cluster map from %s: %v\n", strings.Join(given, ", "), lastErr)
		return 1
	}
	slices.Sort(members)

	// Start the rebuild on every member.
	var work []tracked
	covered := map[int32]bool{}
	for _, m := range members {
		var st rebuildStatus
		if err := c.call(ctx, http.MethodPost, m+"/v1/admin/rebuild/"+url.PathEscape(c.typ), &st); err != nil {
			fmt.Fprintf(e.stderr, "esker rebuild: starting the rebuild on %s: %v\n", m, err)
			return 1
		}
		n := 0
		for _, p := range st.Partitions {
			if p.State == "running" || p.State == "swapping" {
				work = append(work, tracked{m, p.Partition, p.ID})
				covered[p.Partition] = true
				n++
			}
		}
		fmt.Fprintf(e.stdout, "%s: rebuilding %d partition(s) of %s (state version %d)\n", m, n, c.typ, st.StateVersion)
	}
	var missing []int32
	for p := range int32(partitions) {
		if !covered[p] {
			missing = append(missing, p)
		}
	}

	// Follow them until all have ended.
	tick := time.NewTicker(interval)
	defer tick.Stop()
	start := time.Now()
	for {
		type line struct {
			t        tracked
			state    string
			replayed int64
			total    int64
			events   int64
			percent  float64
			rate     float64
			err      string
		}
		var lines []line
		ended := 0
		for _, m := range members {
			mine := slices.DeleteFunc(slices.Clone(work), func(w tracked) bool { return w.node != m })
			if len(mine) == 0 {
				continue
			}
			var st rebuildStatus
			if err := c.call(ctx, http.MethodGet, m+"/v1/admin/rebuild/"+url.PathEscape(c.typ), &st); err != nil {
				fmt.Fprintf(e.stderr, "esker rebuild: reading the progress on %s: %v\n", m, err)
				return 1
			}
			for _, w := range mine {
				l := line{t: w, state: "cancelled", err: "the node no longer reports this rebuild (it restarted?)"}
				for _, p := range st.Partitions {
					if p.Partition == w.partition && p.ID == w.id {
						l = line{t: w, state: p.State, replayed: p.Replayed, total: p.Total, events: p.Events, percent: p.Percent, rate: p.EventsPerSecond, err: p.Error}
					}
				}
				if l.state != "running" && l.state != "swapping" {
					ended++
				}
				lines = append(lines, l)
			}
		}
		slices.SortFunc(lines, func(a, b line) int { return int(a.t.partition - b.t.partition) })
		var replayed, total, events int64
		for _, l := range lines {
			replayed += l.replayed
			total += l.total
			events += l.events
			msg := fmt.Sprintf("  %s/%d  %-9s %d/%d records  %5.1f%%  %d events folded  %.0f events/s",
				c.typ, l.t.partition, l.state, l.replayed, l.total, l.percent, l.events, l.rate)
			if l.err != "" && l.state != "done" {
				msg += "  (" + l.err + ")"
			}
			fmt.Fprintln(e.stdout, msg)
		}
		pct := 100.0
		if total > 0 {
			pct = 100 * float64(replayed) / float64(total)
		}
		fmt.Fprintf(e.stdout, "%s: %d/%d records  %.1f%%  %d events folded  %d of %d partitions done  (%s)\n",
			c.typ, replayed, total, pct, events, ended, len(lines), time.Since(start).Round(time.Second))
		if ended == len(lines) {
			var failed []string
			for _, l := range lines {
				if l.state != "done" {
					failed = append(failed, fmt.Sprintf("%s/%d on %s: %s: %s", c.typ, l.t.partition, l.t.node, l.state, l.err))
				}
			}
			for _, p := range missing {
				failed = append(failed, fmt.Sprintf("%s/%d: no node owned it when the rebuild started (the group was rebalancing); run esker rebuild again", c.typ, p))
			}
			if len(failed) > 0 {
				fmt.Fprintf(e.stderr, "esker rebuild: %d partition(s) not rebuilt:\n  %s\n", len(failed), strings.Join(failed, "\n  "))
				return 1
			}
			fmt.Fprintf(e.stdout, "rebuild of %s done: %d partition(s), %d events\n", c.typ, len(lines), events)
			return 0
		}
		select {
		case <-ctx.Done():
			fmt.Fprintln(e.stderr, "esker rebuild: interrupted; the rebuilds go on on the nodes (follow them with GET /v1/admin/rebuild/"+c.typ+")")
			return 1
		case <-tick.C:
		}
	}
}
