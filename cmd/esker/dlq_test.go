package main

import (
	"context"
	"errors"
	"net"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/sideeffects"
)

func TestDLQUsageErrors(t *testing.T) {
	tests := []struct {
		args       []string
		wantStderr string
	}{
		{[]string{"dlq"}, "missing action: list or replay"},
		{[]string{"dlq", "show", "mailer"}, `unknown action "show"`},
		{[]string{"dlq", "list"}, "missing consumer NAME"},
		{[]string{"dlq", "replay", "--app", "shop"}, "missing consumer NAME"},
		{[]string{"dlq", "list", "mailer", "extra"}, `unexpected argument "extra"`},
		{[]string{"dlq", "list", "Mailer"}, `invalid consumer name "Mailer"`},
		{[]string{"dlq", "list", "mailer", "--app", "no spaces"}, "invalid application id"},
		{[]string{"dlq", "list", "mailer", "--limit", "-1"}, "--limit must be 0 (all) or more"},
		{[]string{"dlq", "list", "mailer", "--limit", "x"}, `invalid value "x" for flag -limit`},
		{[]string{"dlq", "list", "mailer", "--timeout", "0s"}, "--timeout must be positive"},
		{[]string{"dlq", "list", "mailer", "--brokers", "kafka"}, `"kafka" is not host:port`},
		{[]string{"dlq", "list", "mailer", "--brokers", " , "}, "--brokers is required"},
		{[]string{"dlq", "list", "mailer", "--bogus"}, "flag provided but not defined: -bogus"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			code, stdout, stderr := runCLI(t, tt.args...)
			if code != 2 || stdout != "" {
				t.Errorf("exit %d, stdout %q; want 2 and nothing", code, stdout)
			}
			cmd := "dlq"
			if len(tt.args) > 1 && (tt.args[1] == "list" || tt.args[1] == "replay") {
				cmd += " " + tt.args[1] // the action's usage once it is known
			}
			if !strings.Contains(stderr, tt.wantStderr) || !strings.Contains(stderr, "esker "+cmd+": ") ||
				!strings.Contains(stderr, "Run 'esker "+cmd+" --help' for details.") {
				t.Errorf("stderr lacks %q or the pointer to --help:\n%s", tt.wantStderr, stderr)
			}
		})
	}
}

func TestDLQHelp(t *testing.T) {
	for _, args := range [][]string{{"dlq", "--help"}, {"dlq", "-h"}, {"help", "dlq"}, {"dlq", "--app", "x", "--help", "list"}} {
		code, stdout, stderr := runCLI(t, args...)
		if code != 0 || stderr != "" {
			t.Fatalf("%v: exit %d, stderr %q", args, code, stderr)
		}
		if !strings.HasPrefix(stdout, "Usage:\n  esker dlq list|replay NAME [flags]") {
			t.Errorf("%v: usage does not start with the synopsis:\n%s", args, stdout)
		}
		for _, f := range []string{"-brokers", "-app", "-limit", "-timeout"} {
			if !regexp.MustCompile(`(?m)^  ` + f + `( |$)`).MatchString(stdout) {
				t.Errorf("%v: usage lacks flag %s:\n%s", args, f, stdout)
			}
		}
		for _, s := range []string{"esker dlq list NAME", "esker dlq replay NAME", "<app>-NAME-dlq", "<app>-NAME-redrive"} {
			if !strings.Contains(stdout, s) {
				t.Errorf("%v: usage lacks %q", args, s)
			}
		}
	}
	// After an action, --help is the action's.
	for action, want := range map[string]string{"list": "<app>-NAME-dlq", "replay": "<app>-NAME-redrive"} {
		code, stdout, stderr := runCLI(t, "dlq", action, "x", "--help")
		if code != 0 || stderr != "" || !strings.HasPrefix(stdout, "Usage:\n  esker dlq "+action+" NAME [flags]") ||
			!strings.Contains(stdout, want) || !strings.Contains(stdout, "\nExamples:\n  esker dlq "+action+" mailer") {
			t.Errorf("dlq %s --help: exit %d, stderr %q, stdout:\n%s", action, code, stderr, stdout)
		}
	}
}

// TestDLQListAndReplay runs a side-effect consumer against an in-process
// broker; its handler rejects one event until it is fixed. "esker dlq list"
// shows the dead letter, "esker dlq replay" re-drives it to the running
// consumer, and list then marks it replayed.
func TestDLQListAndReplay(t *testing.T) {
	const topic = "account-events"
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(2, topic))
	if err != nil {
		t.Fatal(err)
	}
	defer cluster.Close()
	addr := cluster.ListenAddrs()[0]

	cl := newClient(t, addr)
	defer cl.Close()
	var recs []*kgo.Record
	for _, id := range []string{"alice", "bob"} {
		for v := int64(1); v <= 3; v++ {
			ev := aggregate.Event{EntityID: id, Version: v, EventID: aggregate.EventID("account", id, v), Type: "Deposited",
				SchemaVersion: 1, Time: time.Now().UTC(), Data: []byte(`{"amount":1}`)}
			rec := &kgo.Record{Topic: topic, Key: []byte(id), Value: ev.Data}
			for _, h := range ev.Headers("application/json") {
				rec.Headers = append(rec.Headers, kgo.RecordHeader{Key: h.Key, Value: h.Value})
			}
			recs = append(recs, rec)
		}
	}
	if err := cl.ProduceSync(context.Background(), recs...).FirstErr(); err != nil {
		t.Fatal(err)
	}

	var fixed atomic.Bool
	var redriven atomic.Int32
	c, err := sideeffects.New("mailer", []string{topic}, func(ctx context.Context, ev sideeffects.Event) error {
		if ev.EntityID == "bob" && ev.Version == 2 && !fixed.Load() {
			return sideeffects.Permanent(errors.New("smtp: 550\nmailbox unavailable"))
		}
		if ev.Redriven() {
			redriven.Add(1)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- c.Run(ctx, sideeffects.Runtime{AppID: "shop", ClientOpts: []kgo.Opt{kgo.SeedBrokers(addr)}, Logger: quietLogger()})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	waitUntil(t, func() bool { return c.Status().DeadLettered == 1 && c.Status().Handled == 5 })

	code, stdout, stderr := runCLI(t, "dlq", "list", "mailer", "--brokers", addr, "--app", "shop")
	if code != 0 || stderr != "" {
		t.Fatalf("list: exit %d, stderr %q", code, stderr)
	}
	t.Log("\n" + stdout)
	row := regexp.MustCompile(`(?m)^0 +\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ +account-events/\d@\d +1 +bob +Deposited +no +smtp: 550 mailbox unavailable$`)
	if !strings.HasPrefix(stdout, "OFFSET  DEAD-LETTERED") || !row.MatchString(stdout) ||
		!strings.Contains(stdout, "1 dead letter in shop-mailer-dlq, 0 replayed.") {
		t.Errorf("list output:\n%s", stdout)
	}

	fixed.Store(true)
	code, stdout, stderr = runCLI(t, "dlq", "--app", "shop", "replay", "mailer", "--brokers", addr)
	if code != 0 || !strings.Contains(stdout, "Replayed 1 dead letter from shop-mailer-dlq to shop-mailer-redrive") ||
		!strings.Contains(stderr, "replayed 1…") {
		t.Fatalf("replay: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	waitUntil(t, func() bool { return redriven.Load() == 1 })

	code, stdout, _ = runCLI(t, "dlq", "list", "mailer", "--brokers", addr, "--app", "shop", "--limit", "1")
	if code != 0 || !regexp.MustCompile(`(?m) yes +smtp`).MatchString(stdout) ||
		!strings.Contains(stdout, "(the newest 1; --limit 0 shows all)") || !strings.Contains(stdout, "1 replayed") {
		t.Errorf("list after replay: exit %d\n%s", code, stdout)
	}
	code, stdout, _ = runCLI(t, "dlq", "replay", "mailer", "--brokers", addr, "--app", "shop")
	if code != 0 || !strings.Contains(stdout, "Nothing to replay") {
		t.Errorf("second replay: exit %d\n%s", code, stdout)
	}

	code, stdout, stderr = runCLI(t, "dlq", "list", "nobody", "--brokers", addr, "--app", "shop")
	if code != 1 || stdout != "" || !strings.Contains(stderr, "esker dlq: dead-letter topic shop-nobody-dlq does not exist") {
		t.Errorf("list of an unknown consumer: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}

func TestDLQUnreachableKafka(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	start := time.Now()
	code, stdout, stderr := runCLI(t, "dlq", "list", "mailer", "--brokers", addr, "--timeout", "1s")
	if code != 1 || stdout != "" || !strings.Contains(stderr, "esker dlq: cannot reach Kafka at "+addr) {
		t.Errorf("exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("gave up after %v", d)
	}
}

func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
