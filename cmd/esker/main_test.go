package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esker-io/esker/internal/benchmark"
	"github.com/esker-io/esker/internal/testlog"
)

// runCLI runs the CLI in-process with a context that is never cancelled.
func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut testlog.Buffer
	code = run(&env{ctx: context.Background(), stdout: &out, stderr: &errOut}, args)
	return code, out.String(), errOut.String()
}

func TestTopLevel(t *testing.T) {
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout []string // substrings
		wantStderr []string
	}{
		{"no arguments", nil, 2, nil, []string{"Usage:", "esker <command>"}},
		{"--help", []string{"--help"}, 0, []string{"Usage:", "Commands:", "dev", "node", "kafka", "bench", "version", "help"}, nil},
		{"-h", []string{"-h"}, 0, []string{"Usage:", "Commands:"}, nil},
		{"-help", []string{"-help"}, 0, []string{"Usage:"}, nil},
		{"help", []string{"help"}, 0, []string{"Usage:", "Commands:", "esker help <command>"}, nil},
		{"help help", []string{"help", "help"}, 0, []string{"Commands:"}, nil},
		{"help --help", []string{"help", "--help"}, 0, []string{"Commands:"}, nil},
		{"help dev", []string{"help", "dev"}, 0, []string{"esker dev [flags]", "-kafka", "-partitions"}, nil},
		{"help node", []string{"help", "node"}, 0, []string{"esker node --brokers", "-at-least-once"}, nil},
		{"help bench", []string{"help", "bench"}, 0, []string{"esker bench [flags]", "-brokers", "DELETES", "scratch cluster"}, nil},
		{"help unknown", []string{"help", "nope"}, 2, nil, []string{`unknown command "nope"`}},
		{"help two", []string{"help", "dev", "node"}, 2, nil, []string{"at most one command"}},
		{"unknown command", []string{"nope"}, 2, nil, []string{`esker: unknown command "nope"`, "esker help"}},
		{"flag before command", []string{"--bogus"}, 2, nil, []string{"--bogus must follow a command"}},
		{"version", []string{"version"}, 0, []string{"esker ", "go1."}, nil},
		{"version extra", []string{"version", "x"}, 2, nil, []string{`unexpected argument "x"`}},
		{"version --help", []string{"version", "--help"}, 0, []string{"Usage:\n  esker version"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runCLI(t, tt.args...)
			if code != tt.wantCode {
				t.Errorf("exit code %d, want %d\nstdout:\n%s\nstderr:\n%s", code, tt.wantCode, stdout, stderr)
			}
			for _, s := range tt.wantStdout {
				if !strings.Contains(stdout, s) {
					t.Errorf("stdout lacks %q:\n%s", s, stdout)
				}
			}
			for _, s := range tt.wantStderr {
				if !strings.Contains(stderr, s) {
					t.Errorf("stderr lacks %q:\n%s", s, stderr)
				}
			}
			if tt.wantCode == 0 && stderr != "" {
				t.Errorf("stderr not empty on success:\n%s", stderr)
			}
			if tt.wantCode == 2 && stdout != "" {
				t.Errorf("stdout not empty on a usage error:\n%s", stdout)
			}
		})
	}
}

// TestTopLevelListsEveryCommand guards the table: every command appears in
// the usage with its summary.
func TestTopLevelListsEveryCommand(t *testing.T) {
	_, stdout, _ := runCLI(t, "help")
	for _, c := range commands {
		if !strings.Contains(stdout, c.name) || !strings.Contains(stdout, c.summary) {
			t.Errorf("usage lacks command %q (%s):\n%s", c.name, c.summary, stdout)
		}
	}
}

// TestSubcommandHelp checks that --help, -h and "esker help <cmd>" print
// the complete usage (every flag) on stdout and exit 0, and that a bad flag
// or a stray argument exits 2 with a message on stderr.
func TestSubcommandHelp(t *testing.T) {
	wantFlags := map[string][]string{
		"dev":   {"-http", "-kafka", "-data", "-partitions", "-alerts-url", "-postgres", "-log-level"},
		"node":  {"-brokers", "-http", "-advertise", "-data", "-app", "-partitions", "-at-least-once", "-alerts-url", "-postgres", "-log-level"},
		"kafka": {"-port", "-data", "-partitions", "-log-level"},
		"bench": {"-commands", "-entities", "-partitions", "-concurrency", "-latency-commands", "-runs",
			"-cpuprofile", "-projections", "-brokers", "-log-level"},
		"dlq":     {"-brokers", "-app", "-limit", "-timeout"},
		"inspect": {"-brokers", "-app", "-json", "-timeout"},
		"rebuild": {"-type", "-node", "-interval", "-timeout", "-api-token"},
		"version": nil,
	}
	for _, c := range commands {
		if c.name == "help" {
			continue
		}
		flags, ok := wantFlags[c.name]
		if !ok {
			t.Errorf("command %q has no expectations in this test; add them", c.name)
		}
		t.Run(c.name, func(t *testing.T) {
			var first string
			for _, args := range [][]string{{c.name, "--help"}, {c.name, "-h"}, {"help", c.name}} {
				code, stdout, stderr := runCLI(t, args...)
				if code != 0 || stderr != "" {
					t.Fatalf("%v: exit %d, stderr %q", args, code, stderr)
				}
				if !strings.HasPrefix(stdout, "Usage:\n  esker "+c.name) {
					t.Errorf("%v: usage does not start with the synopsis:\n%s", args, stdout)
				}
				for _, f := range flags {
					if !regexp.MustCompile(`(?m)^  ` + f + `( |$)`).MatchString(stdout) {
						t.Errorf("%v: usage lacks flag %s:\n%s", args, f, stdout)
					}
				}
				if first == "" {
					first = stdout
				} else if stdout != first {
					t.Errorf("%v: help differs from %s --help", args, c.name)
				}
			}

			code, stdout, stderr := runCLI(t, c.name, "--no-such-flag")
			if code != 2 || stdout != "" || !strings.Contains(stderr, "flag provided but not defined: -no-such-flag") ||
				!strings.Contains(stderr, "esker "+c.name+" --help") {
				t.Errorf("bad flag: exit %d, stdout %q, stderr %q", code, stdout, stderr)
			}
		})
	}
}

// TestUsageErrors covers flag values that are rejected before anything
// starts: no broker or node is started by these cases.
func TestUsageErrors(t *testing.T) {
	tests := []struct {
		args       []string
		wantStderr string
	}{
		{[]string{"dev", "extra"}, `unexpected argument "extra"`},
		{[]string{"dev", "--partitions", "0"}, "--partitions must be between 1 and 100000"},
		{[]string{"dev", "--partitions", "x"}, `invalid value "x" for flag -partitions`},
		{[]string{"dev", "--nodes", "0"}, "run between 1 and 16 nodes"},
		{[]string{"dev", "--nodes", "3", "--http", "127.0.0.1:65534"}, "no room for 3 consecutive ports"},
		{[]string{"dev", "--kafka", "nonsense"}, `--kafka "nonsense" is not host:port`},
		{[]string{"dev", "--kafka", ":9092"}, `--kafka ":9092" is not host:port`},
		{[]string{"dev", "--kafka", "0.0.0.0:9092"}, "give a concrete host"},
		{[]string{"dev", "--kafka", "127.0.0.1:99999"}, "invalid port"},
		{[]string{"dev", "--http", "8080"}, `--http "8080" is not host:port`},
		{[]string{"dev", "--http", "127.0.0.1:0"}, "fixed port"},
		{[]string{"dev", "--data", ""}, "--data must not be empty"},
		{[]string{"dev", "--log-level", "loud"}, "-log-level"},
		{[]string{"node"}, "--brokers is required"},
		{[]string{"node", "--brokers", " , "}, "--brokers is required"},
		{[]string{"node", "--brokers", "kafka"}, `"kafka" is not host:port`},
		{[]string{"node", "--brokers", "k:9092", "--http", "0.0.0.0:8080"}, "set --advertise"},
		{[]string{"node", "--brokers", "k:9092", "--http", ":8080"}, "set --advertise"},
		{[]string{"node", "--brokers", "k:9092", "--advertise", "ftp://x"}, "is not an http:// or https:// URL"},
		{[]string{"node", "--brokers", "k:9092", "--partitions", "-1"}, "--partitions must be between 1 and 100000"},
		{[]string{"node", "--brokers", "k:9092", "--app", "no spaces"}, "invalid application id"},
		{[]string{"node", "--brokers", "k:9092", "--at-least-once=maybe"}, "-at-least-once"},
		{[]string{"kafka", "--port", "70000"}, "--port 70000 is not a TCP port"},
		{[]string{"kafka", "--data", ""}, "--data must not be empty"},
		{[]string{"kafka", "--partitions", "0"}, "--partitions must be between 1 and 100000"},
		{[]string{"kafka", "stray"}, `unexpected argument "stray"`},
		{[]string{"bench", "--commands", "0"}, "--commands must be at least 1, got 0"},
		{[]string{"bench", "--entities", "0"}, "--entities must be at least 1, got 0"},
		{[]string{"bench", "--commands", "10", "--entities", "11"}, "--entities (11) must not exceed --commands (10)"},
		{[]string{"bench", "--partitions", "0"}, "--partitions must be between 1 and 100000"},
		{[]string{"bench", "--concurrency", "0"}, "--concurrency must be at least 1"},
		{[]string{"bench", "--latency-commands", "-1"}, "--latency-commands must be 0"},
		{[]string{"bench", "--runs", "0"}, "--runs must be at least 1, got 0"},
		{[]string{"bench", "--runs", "x"}, `invalid value "x" for flag -runs`},
		{[]string{"bench", "--brokers", "kafka"}, `"kafka" is not host:port`},
		{[]string{"bench", "--log-level", "loud"}, "-log-level"},
		{[]string{"bench", "stray"}, `unexpected argument "stray"`},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			code, stdout, stderr := runCLI(t, tt.args...)
			if code != 2 {
				t.Errorf("exit code %d, want 2 (stderr %q)", code, stderr)
			}
			if stdout != "" {
				t.Errorf("stdout not empty: %q", stdout)
			}
			if !strings.Contains(stderr, tt.wantStderr) {
				t.Errorf("stderr lacks %q:\n%s", tt.wantStderr, stderr)
			}
			if !strings.Contains(stderr, "esker "+tt.args[0]+": ") || !strings.Contains(stderr, "--help' for details") {
				t.Errorf("stderr does not name the command and point to --help:\n%s", stderr)
			}
		})
	}
}

func TestFlagSetHelpIsErrHelp(t *testing.T) {
	// The dispatcher relies on flag.ContinueOnError returning ErrHelp for
	// -h and --help; make sure nothing is printed by the flag package itself.
	fs := newFlagSet("x", "esker x", "about")
	if err := fs.Parse([]string{"-h"}); err != flag.ErrHelp {
		t.Fatalf("Parse(-h) = %v, want flag.ErrHelp", err)
	}
}

func TestLocalURL(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1:8080": "http://127.0.0.1:8080",
		":8080":          "http://127.0.0.1:8080",
		"0.0.0.0:8080":   "http://127.0.0.1:8080",
		"[::]:8080":      "http://127.0.0.1:8080",
		"[::1]:8080":     "http://[::1]:8080",
		"example:80":     "http://example:80",
	} {
		if got := localURL(in); got != want {
			t.Errorf("localURL(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestDevBanner(t *testing.T) {
	var b bytes.Buffer
	printDevBanner(&b, "127.0.0.1:9092", "esker-data/kafka", []string{"http://127.0.0.1:8080"}, []string{"esker-data/state"})
	out := b.String()
	for _, s := range []string{
		"127.0.0.1:9092",
		`curl -sS -X POST http://127.0.0.1:8080/v1/aggregates/account/alice/commands -H 'Content-Type: application/json' -d '{"type":"Open","data":{"owner":"Alice"}}'`,
		`-d '{"type":"Deposit","data":{"amount":500}}'`,
		"curl -sS http://127.0.0.1:8080/v1/aggregates/account/alice\n",
	} {
		if !strings.Contains(out, s) {
			t.Errorf("banner lacks %q:\n%s", s, out)
		}
	}
}

// TestBenchEmbedded runs a small benchmark against the embedded broker.
func TestBenchEmbedded(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a broker and three processors")
	}
	code, stdout, stderr := runCLI(t, "bench", "--commands", "2000", "--entities", "100", "--runs", "1",
		"--latency-commands", "40", "--partitions", "2")
	if code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	t.Log("\n" + stdout)
	if !regexp.MustCompile(`(?m)^.*exactly-once.*vs baseline.*$`).MatchString(stdout) {
		t.Errorf("no line with exactly-once and vs baseline:\n%s", stdout)
	}
	for _, want := range []string{
		"Run 1/1\n", benchmark.NameAtLeastOnce, benchmark.NameBaseline, "Summary (1 run)",
		"command   esker bench --commands 2000 --entities 100 --runs 1 --latency-commands 40 --partitions 2\n",
		"machine   ", "date      ",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("stdout lacks %q:\n%s", want, stdout)
		}
	}
	for _, want := range []string{"run 1/1 · esker exactly-once · starting", "run 1/1 · esker exactly-once · throughput 2000/2000",
		"run 1/1 · kgo transact loop · latency 40/40"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr)
		}
	}
}

func TestBenchMedians(t *testing.T) {
	run := func(eos, base float64, p99 time.Duration) []benchmark.Result {
		return []benchmark.Result{
			{Name: benchmark.NameExactlyOnce, Commands: 10, PerSecond: eos, P99: p99, Samples: 5},
			{Name: benchmark.NameBaseline, Baseline: true, Commands: 10, PerSecond: base, P99: p99, Samples: 5},
		}
	}
	odd := benchMedians([][]benchmark.Result{run(300, 1000, 3), run(100, 400, 1), run(200, 500, 2)})
	if len(odd) != 2 || odd[0].PerSecond != 200 || odd[0].P99 != 2 || odd[1].PerSecond != 500 || !odd[1].Baseline || odd[0].Commands != 10 {
		t.Errorf("odd: %+v", odd)
	}
	even := benchMedians([][]benchmark.Result{run(100, 400, 1), run(300, 1000, 3)})
	if even[0].PerSecond != 200 || even[0].P99 != 2 || even[1].PerSecond != 700 {
		t.Errorf("even: %+v", even)
	}
	var b bytes.Buffer
	writeBenchSummary(&b, [][]benchmark.Result{run(300, 1000, 3), run(100, 400, 1), run(200, 500, 2)})
	// Ratios 0.30, 0.25 and 0.40: the median is 0.30.
	if want := "esker exactly-once vs baseline: 0.30x (median of the runs' ratios 0.30x, 0.25x, 0.40x)"; !strings.Contains(b.String(), want) {
		t.Errorf("summary lacks %q:\n%s", want, b.String())
	}
}

func TestShellQuote(t *testing.T) {
	got := benchCommandLine([]string{"--brokers", "a:9092,b:9092", "--cpuprofile", "my file's.prof", ""})
	if want := `esker bench --brokers a:9092,b:9092 --cpuprofile 'my file'\''s.prof' ''`; got != want {
		t.Errorf("got %s, want %s", got, want)
	}
}

// cliSpec is one command (or command and action) of the CLI, as
// TestCLIProcess checks it.
type cliSpec struct {
	path  string   // "dlq list": what follows "esker"
	flags []string // flags its usage must list
	// bad are arguments after path that miss a required argument or flag
	// (or, for a command with none, give a bad one), and badMsg is part
	// of the message they must print on stderr.
	bad    []string
	badMsg string
}

// cliSpecs lists every command and action of the CLI: adding one is adding
// a line. TestCLIProcess fails when a command or action is missing here.
var cliSpecs = []cliSpec{
	{"dev", []string{"-http", "-kafka", "-data", "-partitions", "-nodes", "-standby-replicas", "-alerts-url", "-postgres", "-log-level"}, []string{"--partitions", "0"}, "--partitions must be between 1 and 100000"},
	{"node", []string{"-brokers", "-http", "-advertise", "-data", "-app", "-partitions", "-at-least-once", "-log-level"}, nil, "--brokers is required"},
	{"kafka", []string{"-port", "-data", "-partitions", "-log-level"}, []string{"--port", "70000"}, "--port 70000 is not a TCP port"},
	{"bench", []string{"-commands", "-entities", "-partitions", "-runs", "-brokers", "-log-level"}, []string{"--runs", "0"}, "--runs must be at least 1"},
	{"dlq", []string{"-brokers", "-app", "-limit", "-timeout"}, nil, "missing action: list or replay"},
	{"dlq list", []string{"-brokers", "-app", "-limit", "-timeout"}, nil, "missing consumer NAME"},
	{"dlq replay", []string{"-brokers", "-app", "-timeout"}, nil, "missing consumer NAME"},
	{"inspect", []string{"-brokers", "-app", "-json", "-timeout"}, nil, "missing what to inspect: topics, group or entity"},
	{"inspect topics", []string{"-brokers", "-app", "-json", "-timeout"}, nil, "--brokers is required"},
	{"inspect group", []string{"-brokers", "-app", "-json", "-timeout"}, nil, "--brokers is required"},
	{"inspect entity", []string{"-brokers", "-app", "-json", "-timeout"}, []string{"account", "--brokers", "127.0.0.1:9092"}, "missing entity ID"},
	{"rebuild", []string{"-type", "-node", "-interval", "-timeout", "-api-token"}, []string{"--node", "http://127.0.0.1:8080"}, "missing --type"},
	{"version", nil, []string{"extra"}, `unexpected argument "extra"`},
	{"help", nil, []string{"nope"}, `unknown command "nope"`},
}

// eskerBin is the esker binary TestCLIProcess runs, built once.
var eskerBin struct {
	once sync.Once
	dir  string
	path string
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if eskerBin.dir != "" {
		os.RemoveAll(eskerBin.dir)
	}
	os.Exit(code)
}

// buildEsker builds this package's binary once per test process.
func buildEsker(t *testing.T) string {
	t.Helper()
	eskerBin.once.Do(func() {
		if eskerBin.dir, eskerBin.err = os.MkdirTemp("", "esker-cli-test"); eskerBin.err != nil {
			return
		}
		eskerBin.path = filepath.Join(eskerBin.dir, "esker")
		out, err := exec.Command("go", "build", "-o", eskerBin.path, ".").CombinedOutput()
		if err != nil {
			eskerBin.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if eskerBin.err != nil {
		t.Fatal(eskerBin.err)
	}
	return eskerBin.path
}

// runEsker runs the built binary and returns its exit status and output.
func runEsker(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	bin := buildEsker(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		code = exit.ExitCode()
	case err != nil:
		t.Fatalf("esker %v: %v", args, err)
	}
	return code, out.String(), errOut.String()
}

// TestCLIProcess runs the esker binary: for every command and action,
// --help and -h print the complete usage (synopsis, description, flags,
// examples) on stdout and exit 0; an unknown flag exits 2 and names the
// flag; missing or bad arguments exit non-zero with a message on stderr.
// Unknown commands and actions exit 2.
func TestCLIProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	listed := map[string]bool{}
	for _, s := range cliSpecs {
		listed[s.path] = true
	}
	for _, c := range commands {
		if !listed[c.name] {
			t.Errorf("command %q is missing from cliSpecs", c.name)
		}
	}
	for cmd, actions := range map[string]map[string]helpText{"dlq": dlqActions, "inspect": inspectActions} {
		for a := range actions {
			if !listed[cmd+" "+a] {
				t.Errorf("action %q of %s is missing from cliSpecs", a, cmd)
			}
		}
	}

	for _, s := range cliSpecs {
		t.Run(s.path, func(t *testing.T) {
			path := strings.Fields(s.path)
			var help string
			for _, h := range []string{"--help", "-h"} {
				code, stdout, stderr := runEsker(t, append(slices.Clone(path), h)...)
				if code != 0 || stderr != "" {
					t.Fatalf("%s %s: exit %d, stderr %q", s.path, h, code, stderr)
				}
				synopsis := "Usage:\n  esker " + s.path
				if s.path == "help" {
					synopsis = "Usage:\n  esker <command>"
				}
				for _, want := range []string{synopsis, "\nExamples:\n  esker "} {
					if !strings.Contains(stdout, want) {
						t.Errorf("%s %s: usage lacks %q:\n%s", s.path, h, want, stdout)
					}
				}
				for _, f := range s.flags {
					if !regexp.MustCompile(`(?m)^  ` + f + `( |$)`).MatchString(stdout) {
						t.Errorf("%s %s: usage lacks flag %s:\n%s", s.path, h, f, stdout)
					}
				}
				if help == "" {
					help = stdout
				} else if stdout != help {
					t.Errorf("%s: -h and --help differ", s.path)
				}
			}
			if len(s.flags) > 0 && !strings.Contains(help, "\nFlags:\n") {
				t.Errorf("%s: usage has no Flags section:\n%s", s.path, help)
			}
			if paragraphs := strings.Count(help, "\n\n"); paragraphs < 2 {
				t.Errorf("%s: usage has no description:\n%s", s.path, help)
			}

			code, stdout, stderr := runEsker(t, append(slices.Clone(path), "--no-such-flag")...)
			if code != 2 || stdout != "" || !strings.Contains(stderr, "-no-such-flag") || !strings.HasPrefix(stderr, "esker "+path[0]) {
				t.Errorf("unknown flag: exit %d, stdout %q, stderr %q", code, stdout, stderr)
			}

			code, stdout, stderr = runEsker(t, append(slices.Clone(path), s.bad...)...)
			if code == 0 || stdout != "" || !strings.Contains(stderr, s.badMsg) || !strings.HasPrefix(stderr, "esker "+path[0]) {
				t.Errorf("%s %q: exit %d, stdout %q, stderr %q; want non-zero and %q", s.path, s.bad, code, stdout, stderr, s.badMsg)
			}
		})
	}

	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"nope"}, `esker: unknown command "nope"`},
		{[]string{"help", "nope"}, `esker help: unknown command "nope"`},
		{[]string{"inspect", "nope"}, `esker inspect: unknown inspect command "nope": use topics, group or entity`},
		{[]string{"dlq", "nope", "mailer"}, `esker dlq: unknown action "nope": use list or replay`},
	} {
		code, stdout, stderr := runEsker(t, tt.args...)
		if code != 2 || stdout != "" || !strings.Contains(stderr, tt.want) {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want 2 and %q", tt.args, code, stdout, stderr, tt.want)
		}
	}
}
