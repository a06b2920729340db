package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/statestore"
)

// startTestBroker starts an in-process broker that accepts the nodes' short
// session timeouts, closed after the test's nodes stop; it returns its
// address.
func startTestBroker(t *testing.T) string {
	t.Helper()
	broker, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.GroupMinSessionTimeout(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(broker.Close)
	return broker.ListenAddrs()[0]
}

// startTestNode runs a bank node (application "bank", 4 partitions) on
// the broker at addr, with its HTTP API on a test server whose URL it
// advertises, and waits until it is ready. stop ends it and waits.
func startTestNode(t *testing.T, addr string, opts ...esker.Option) (url string, stop func()) {
	t.Helper()
	var handler atomic.Pointer[http.Handler]
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		(*handler.Load()).ServeHTTP(w, r)
	}))
	n, err := esker.NewNode(append([]esker.Option{
		esker.AdvertisedURL(srv.URL),
		esker.Brokers(addr),
		esker.ApplicationID("bank"),
		esker.StateDir(t.TempDir()),
		esker.HTTPListen(""),
		esker.Partitions(4),
		esker.SessionTimeout(3 * time.Second),
		esker.Logger(quietLogger()),
		testMasterKey(),
	}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	if err := bank.AddTo(n); err != nil {
		t.Fatal(err)
	}
	h := n.Handler()
	handler.Store(&h)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Run(ctx) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil && ctx.Err() == nil {
			t.Errorf("node: %v", err)
		}
		srv.Close()
	}
	t.Cleanup(stop)
	deadline := time.Now().Add(30 * time.Second)
	for n.Ready() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("node not ready: %v", n.Ready())
		}
		select {
		case err := <-done:
			stopped = true // Run returned: the cleanup has nothing to wait for
			srv.Close()
			t.Fatalf("node stopped: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	return srv.URL, stop
}

// sendCommand posts a command to the node and fails the test unless it is
// accepted.
func sendCommand(t *testing.T, url, id, body string) {
	t.Helper()
	resp, err := http.Post(url+"/v1/aggregates/account/"+id+"/commands", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusCreated {
		t.Fatalf("%s %s: %d %s", id, body, resp.StatusCode, b)
	}
}

// inspectJSON runs an inspect command with --json and decodes its output.
func inspectJSON[T any](t *testing.T, args ...string) T {
	t.Helper()
	code, stdout, stderr := runCLI(t, append(args, "--json")...)
	if code != 0 {
		t.Fatalf("%v: exit %d, stderr %q", args, code, stderr)
	}
	var v T
	if err := json.Unmarshal([]byte(stdout), &v); err != nil {
		t.Fatalf("%v: %v\n%s", args, err, stdout)
	}
	return v
}

// TestInspect runs a bank node on an in-process broker, sends it commands,
// and checks what "esker inspect topics", "group" and "entity" show, as
// tables and as JSON; then it stops the node, writes commands nobody
// processes, and checks the lag and the owner again.
func TestInspect(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a broker and a node")
	}
	addr := startTestBroker(t)
	url, stop := startTestNode(t, addr)

	for _, c := range []struct{ id, body string }{
		{"alice", `{"type":"Open","data":{"owner":"Alice"}}`},
		{"alice", `{"type":"Deposit","data":{"amount":100}}`},
		{"bob", `{"type":"Open","data":{"owner":"Bob"}}`},
		{"alice", `{"type":"Deposit","data":{"amount":250}}`},
		{"alice", `{"type":"Withdraw","data":{"amount":30}}`},
		{"bob", `{"type":"Deposit","data":{"amount":7}}`},
	} {
		sendCommand(t, url, c.id, c.body)
	}
	alicePart := aggregate.Partition("alice", 4)

	t.Run("topics", func(t *testing.T) {
		code, stdout, stderr := runCLI(t, "inspect", "topics", "--brokers", addr)
		if code != 0 || stderr != "" {
			t.Fatalf("exit %d, stderr %q", code, stderr)
		}
		t.Log("\n" + stdout)
		for _, re := range []string{
			`(?m)^TOPIC +ROLE +PARTITIONS +CLEANUP +RETENTION +RECORDS$`,
			`(?m)^account-commands +commands +4 +delete +7d +6$`,
			`(?m)^account-events +events +4 +delete +forever +\d+$`,
			`(?m)^bank-account-changelog +changelog +4 +compact +\S+ +\d+$`,
			`(?m)^bank-daily-totals-repartition +repartition +4 +delete +`,
			`(?m)^transfer-commands +commands +4 +delete +7d +0$`,
			`(?m)^TOPIC +PARTITION +START +END +RECORDS$`,
			fmt.Sprintf(`(?m)^account-events +%d +0 +\d+ +\d+$`, alicePart),
		} {
			if !regexp.MustCompile(re).MatchString(stdout) {
				t.Errorf("no line matches %s", re)
			}
		}
		r := inspectJSON[topicsReport](t, "inspect", "topics", "--brokers", addr)
		byName := map[string]topicInfo{}
		for _, ti := range r.Topics {
			byName[ti.Name] = ti
		}
		cmds, events := byName["account-commands"], byName["account-events"]
		if cmds.Records != 6 || len(cmds.Offsets) != 4 || cmds.CleanupPolicy != "delete" {
			t.Errorf("account-commands: %+v", cmds)
		}
		// Six events in transactions: at least one marker per transaction.
		if events.RetentionMs != "-1" || events.Records < 6 || events.Offsets[alicePart].End < 4 {
			t.Errorf("account-events: %+v", events)
		}
		if c := byName["bank-account-changelog"]; c.CleanupPolicy != "compact" || c.Role != "changelog" {
			t.Errorf("changelog: %+v", c)
		}
		if _, ok := byName["bank-owners-changelog"]; !ok {
			t.Errorf("no projection changelog in %v", r.Topics)
		}
	})

	t.Run("group", func(t *testing.T) {
		code, stdout, stderr := runCLI(t, "inspect", "group", "--brokers", addr)
		if code != 0 || stderr != "" {
			t.Fatalf("exit %d, stderr %q", code, stderr)
		}
		t.Log("\n" + stdout)
		for _, re := range []string{
			`(?m)^Group bank: Stable, generation \d+, 1 member, coordinator 127\.0\.0\.1:\d+$`,
			`(?m)^MEMBER +URL +HOST +ACTIVE +PENDING +STANDBY$`,
			`(?m)^\S+ +` + regexp.QuoteMeta(url) + ` +\S+ +0-3 +- +-$`,
			fmt.Sprintf(`(?m)^account-commands +%d +\d+ +\d+ +0 +%s$`, alicePart, regexp.QuoteMeta(url)),
		} {
			if !regexp.MustCompile(re).MatchString(stdout) {
				t.Errorf("no line matches %s", re)
			}
		}
		// The projections fold the events in the node's next cycles: wait
		// for them to catch up.
		var r groupReport
		waitUntil(t, func() bool {
			r = inspectJSON[groupReport](t, "inspect", "group", "--brokers", addr)
			return r.TotalLag == 0
		})
		if len(r.Members) != 1 || r.Members[0].URL != url || fmt.Sprint(r.Members[0].Active) != "[0 1 2 3]" {
			t.Errorf("members: %+v", r.Members)
		}
		var committed int64
		for _, l := range r.Offsets {
			if l.Lag != 0 || l.Committed > l.End || l.Owner != url {
				t.Errorf("offsets: %+v", l)
			}
			if l.Topic == "account-commands" && l.Committed > 0 {
				committed += l.Committed
			}
		}
		if committed != 6 {
			t.Errorf("committed %d commands, want 6: %+v", committed, r.Offsets)
		}
	})

	t.Run("entity", func(t *testing.T) {
		code, stdout, stderr := runCLI(t, "inspect", "entity", "account", "alice", "--brokers", addr)
		if code != 0 || stderr != "" {
			t.Fatalf("exit %d, stderr %q", code, stderr)
		}
		t.Log("\n" + stdout)
		for _, re := range []string{
			`(?m)^Entity account/alice$`,
			fmt.Sprintf(`(?m)^  partition  %d of 4 \(account-events/%d, bank-account-changelog/%d\)$`, alicePart, alicePart, alicePart),
			`(?m)^  owner      ` + regexp.QuoteMeta(url) + ` \(member \S+\)$`,
			`(?m)^VERSION +TYPE +SCHEMA +TIME +OFFSET +DATA$`,
			`(?m)^1 +Opened +1 +\S+Z +\d+ +\{"owner":"Alice"\}$`,
			`(?m)^2 +Deposited +2 +\S+Z +\d+ +\{"amount":100,"currency":"EUR"\}$`,
			`(?m)^3 +Deposited +2 +\S+Z +\d+ +\{"amount":250,"currency":"EUR"\}$`,
			`(?m)^4 +Withdrawn +\d +\S+Z +\d+ +\{"amount":30[,}]`,
			`(?m)^State \(bank-account-changelog/\d offset \d+\): version 4, updated \S+Z$`,
			`(?m)^\{"owner":"Alice","balance":320,`,
		} {
			if !regexp.MustCompile(re).MatchString(stdout) {
				t.Errorf("no line matches %s", re)
			}
		}
		r := inspectJSON[entityReport](t, "inspect", "entity", "account", "alice", "--brokers", addr)
		if r.Partition != alicePart || r.Owner != url || r.State == nil || r.State.Version != 4 {
			t.Errorf("report: %+v", r)
		}
		var amounts []string
		for i, e := range r.Events {
			var d struct{ Amount int64 }
			if err := json.Unmarshal(e.Data, &d); err != nil {
				t.Fatal(err)
			}
			amounts = append(amounts, fmt.Sprintf("%d:%s:%d", e.Version, e.Type, d.Amount))
			if e.Version != int64(i+1) || (i > 0 && e.Offset <= r.Events[i-1].Offset) {
				t.Errorf("event %d out of order: %+v", i, e)
			}
		}
		if got := strings.Join(amounts, " "); got != "1:Opened:0 2:Deposited:100 3:Deposited:250 4:Withdrawn:30" {
			t.Errorf("events %s", got)
		}

		// A scan reports its progress on stderr from scanProgressMin
		// offsets on.
		defer func(old int64) { scanProgressMin = old }(scanProgressMin)
		scanProgressMin = 1
		code, _, stderr = runCLI(t, "inspect", "entity", "account", "alice", "--brokers", addr)
		want := fmt.Sprintf("esker inspect entity: scanning account-events/%d: ", alicePart)
		if code != 0 || !strings.Contains(stderr, want) || !strings.Contains(stderr, "(100%)\n") {
			t.Errorf("exit %d, stderr lacks %q and 100%%:\n%s", code, want, stderr)
		}
	})

	t.Run("errors", func(t *testing.T) {
		for _, tt := range []struct {
			args []string
			want string
		}{
			{[]string{"group", "--app", "shop"}, "esker inspect group: unknown group shop: no consumer group with this id exists"},
			{[]string{"topics", "--app", "shop"}, "esker inspect topics: no topic of application shop on this cluster"},
			{[]string{"entity", "ledger", "x"}, "esker inspect entity: no such topic ledger-events"},
		} {
			code, stdout, stderr := runCLI(t, append(append([]string{"inspect"}, tt.args...), "--brokers", addr)...)
			if code != 1 || stdout != "" || !strings.Contains(stderr, tt.want) {
				t.Errorf("%v: exit %d, stdout %q, stderr %q; want 1 and %q", tt.args, code, stdout, stderr, tt.want)
			}
		}
		// An events topic of a type the application does not have: no
		// owner, and the note says why.
		adm := kadm.NewClient(newClient(t, addr))
		defer adm.Close()
		if _, err := adm.CreateTopic(context.Background(), 4, 1, nil, "ledger-events"); err != nil {
			t.Fatal(err)
		}
		code, stdout, stderr := runCLI(t, "inspect", "entity", "ledger", "x", "--brokers", addr)
		if code != 0 || !strings.Contains(stdout, "  owner      -; no member of group bank reads ledger-commands: ledger is not an aggregate type of application bank\n") ||
			!strings.Contains(stdout, "No events in ledger-events/") {
			t.Errorf("exit %d, stderr %q, stdout:\n%s", code, stderr, stdout)
		}
	})

	// Stop the node and write two commands for alice that nobody
	// processes: the group is empty, alice's partition lags by 2 and has
	// no owner.
	stop()
	cl := newClient(t, addr)
	defer cl.Close()
	for range 2 {
		rec := &kgo.Record{Topic: "account-commands", Key: []byte("alice"), Value: []byte(`{"type":"Deposit","data":{"amount":1}}`)}
		if err := cl.ProduceSync(context.Background(), rec).FirstErr(); err != nil {
			t.Fatal(err)
		}
	}
	t.Run("stopped", func(t *testing.T) {
		r := inspectJSON[groupReport](t, "inspect", "group", "--brokers", addr)
		if r.State != "Empty" || len(r.Members) != 0 || r.TotalLag != 2 {
			t.Errorf("group: state %s, %d members, total lag %d; want Empty, 0, 2", r.State, len(r.Members), r.TotalLag)
		}
		for _, l := range r.Offsets {
			want := int64(0)
			if l.Topic == "account-commands" && l.Partition == alicePart {
				want = 2
			}
			if l.Lag != want || l.Owner != "" {
				t.Errorf("%s/%d: lag %d owner %q, want %d and none", l.Topic, l.Partition, l.Lag, l.Owner, want)
			}
		}
		code, stdout, _ := runCLI(t, "inspect", "group", "--brokers", addr)
		if code != 0 || !regexp.MustCompile(fmt.Sprintf(`(?m)^account-commands +%d +\d+ +\d+ +2 +-$`, alicePart)).MatchString(stdout) ||
			!strings.Contains(stdout, "Total lag: 2.") {
			t.Errorf("exit %d, table:\n%s", code, stdout)
		}
		code, stdout, _ = runCLI(t, "inspect", "entity", "account", "alice", "--brokers", addr)
		if code != 0 || !strings.Contains(stdout, "  owner      -; group bank has no members: no node runs\n") {
			t.Errorf("exit %d, entity:\n%s", code, stdout)
		}
	})

	// Only the latest state record counts: an undecodable record followed
	// by a tombstone shows the entity deleted, not a decoding error.
	t.Run("tombstone after an undecodable record", func(t *testing.T) {
		p := aggregate.Partition("carol", 4)
		pcl := newClient(t, addr, kgo.RecordPartitioner(kgo.ManualPartitioner()))
		defer pcl.Close()
		key := statestore.StateKey("carol")
		for _, v := range [][]byte{[]byte("not a state record"), nil} {
			rec := &kgo.Record{Topic: "bank-account-changelog", Partition: p, Key: key, Value: v}
			if err := pcl.ProduceSync(context.Background(), rec).FirstErr(); err != nil {
				t.Fatal(err)
			}
		}
		r := inspectJSON[entityReport](t, "inspect", "entity", "account", "carol", "--brokers", addr)
		if r.State == nil || !r.State.Deleted {
			t.Errorf("state %+v (note %q), want deleted", r.State, r.StateNote)
		}
	})
}

// TestInspectStandbys runs two nodes with a standby replica each: the
// group shows every member with two active and two standby partitions, and
// the entity's owner and standby are the two nodes.
func TestInspectStandbys(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a broker and two nodes")
	}
	addr := startTestBroker(t)
	url1, _ := startTestNode(t, addr, esker.StandbyReplicas(1))
	url2, _ := startTestNode(t, addr, esker.StandbyReplicas(1))

	var r groupReport
	waitUntil(t, func() bool {
		r = inspectJSON[groupReport](t, "inspect", "group", "--brokers", addr)
		if r.State != "Stable" || len(r.Members) != 2 {
			return false
		}
		for _, m := range r.Members {
			if len(m.Active) != 2 || len(m.Standby) != 2 || len(m.Pending) != 0 {
				return false
			}
		}
		return true
	})
	urls := map[string]bool{url1: true, url2: true}
	owned := map[int32]string{}
	for _, m := range r.Members {
		if !urls[m.URL] {
			t.Errorf("member URL %q is neither node's", m.URL)
		}
		for _, p := range m.Active {
			owned[p] = m.URL
		}
		if slices.ContainsFunc(m.Standby, func(p int32) bool { return slices.Contains(m.Active, p) }) {
			t.Errorf("member %s is standby of a partition it owns: %+v", m.URL, m)
		}
	}
	if len(owned) != 4 {
		t.Errorf("owned partitions %v, want 0-3", owned)
	}
	code, stdout, _ := runCLI(t, "inspect", "group", "--brokers", addr)
	t.Log("\n" + stdout)
	for _, m := range r.Members {
		re := `(?m)^` + regexp.QuoteMeta(m.ID) + ` +` + regexp.QuoteMeta(m.URL) + ` +\S+ +` +
			regexp.QuoteMeta(partitionList(m.Active)) + ` +- +` + regexp.QuoteMeta(partitionList(m.Standby)) + `$`
		if code != 0 || !regexp.MustCompile(re).MatchString(stdout) {
			t.Errorf("no line matches %s", re)
		}
	}

	p := aggregate.Partition("alice", 4)
	sendCommand(t, owned[p], "alice", `{"type":"Open","data":{"owner":"Alice"}}`)
	e := inspectJSON[entityReport](t, "inspect", "entity", "account", "alice", "--brokers", addr)
	other := url1
	if owned[p] == url1 {
		other = url2
	}
	if e.Owner != owned[p] || fmt.Sprint(e.Standbys) != "["+other+"]" || len(e.Events) != 1 {
		t.Errorf("entity: owner %s standbys %v events %d; want %s, [%s], 1", e.Owner, e.Standbys, len(e.Events), owned[p], other)
	}
	_, stdout, _ = runCLI(t, "inspect", "entity", "account", "alice", "--brokers", addr)
	if !strings.Contains(stdout, "  standbys   "+other+"\n") {
		t.Errorf("entity lacks the standby line:\n%s", stdout)
	}

	// A forgotten entity shows as such, not as a state without data.
	req, err := http.NewRequest("DELETE", owned[p]+"/v1/aggregates/account/alice", nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("forget alice: %d %s", res.StatusCode, body)
	}
	e = inspectJSON[entityReport](t, "inspect", "entity", "account", "alice", "--brokers", addr)
	if e.State == nil || !e.State.Forgotten || e.State.Version != 2 || len(e.Events) != 2 {
		t.Errorf("forgotten entity: state %+v, %d events; want forgotten at version 2 and 2 events", e.State, len(e.Events))
	}
	code, stdout, stderr := runCLI(t, "inspect", "entity", "account", "alice", "--brokers", addr)
	if code != 0 || !regexp.MustCompile(`(?m)^State: forgotten at version 2, \S+Z \(marker at bank-account-changelog/\d offset \d+\)\.$`).MatchString(stdout) {
		t.Errorf("exit %d, stderr %q, stdout:\n%s", code, stderr, stdout)
	}
}

// TestInspectUnreachable checks that a broker nobody listens on is reported
// within --timeout.
func TestInspectUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	for _, action := range [][]string{{"topics"}, {"group"}, {"entity", "account", "alice"}} {
		start := time.Now()
		code, stdout, stderr := runCLI(t, append(append([]string{"inspect"}, action...), "--brokers", addr, "--timeout", "1s")...)
		want := "esker inspect " + action[0] + ": cannot reach Kafka at " + addr + " within 1s"
		if code != 1 || stdout != "" || !strings.Contains(stderr, want) {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", action, code, stdout, stderr)
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Errorf("%v: gave up after %v", action, d)
		}
	}
}

func TestPartitionList(t *testing.T) {
	for _, tt := range []struct {
		in   []int32
		want string
	}{
		{nil, "-"}, {[]int32{3}, "3"}, {[]int32{0, 1}, "0,1"}, {[]int32{0, 1, 2, 3}, "0-3"}, {[]int32{0, 2, 3, 4, 7, 8}, "0,2-4,7,8"},
	} {
		if got := partitionList(tt.in); got != tt.want {
			t.Errorf("partitionList(%v) = %q, want %q", tt.in, got, tt.want)
		}
	}
	for in, want := range map[string]string{"-1": "forever", "604800000": "7d", "3600000": "1h", "90000": "1m30s", "": "-", "x": "x"} {
		if got := retention(in); got != want {
			t.Errorf("retention(%q) = %q, want %q", in, got, want)
		}
	}
	var b bytes.Buffer
	(&entityReport{Type: "t", ID: "x", Events: []entityEvent{{Version: 1, Type: "E", SchemaVersion: 1, payload: newPayload([]byte("{\n \"a\": 1\n}"))},
		{Version: 2, Type: "E", SchemaVersion: 1, payload: newPayload([]byte{0xff, 0x00})}}}).write(&b)
	if !strings.Contains(b.String(), ` {"a":1}`+"\n") || !strings.Contains(b.String(), " base64:/wA=\n") {
		t.Errorf("payloads:\n%s", b.String())
	}
}
