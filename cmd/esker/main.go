// Command esker runs esker nodes and the tools around them.
//
//	esker dev      embedded Kafka-protocol broker plus the bank demo node
//	esker node     a bank demo node against any Kafka cluster
//	esker kafka    the embedded broker alone
//	esker bench    esker's write path against a raw Kafka transactional loop
//	esker dlq      dead letters of a side-effect consumer
//	esker inspect  an application's topics, consumer group and entities, read from Kafka
//	esker rebuild  rebuild an aggregate type's state from its events on every node
//	esker version  the build's module version
//
// Run "esker help" or "esker <command> --help" for the flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
)

// env is what a subcommand gets from the process: a context cancelled on
// SIGINT/SIGTERM and the output streams. Tests pass their own.
type env struct {
	ctx    context.Context
	stdout io.Writer
	stderr io.Writer
}

// command is one subcommand. Adding one is adding an entry to commands.
// run returns the exit status: 0 success, 1 failure at run time, 2 bad usage.
type command struct {
	name    string
	summary string
	run     func(e *env, args []string) int
}

// commands is the subcommand table, in the order "esker help" lists it. It
// is filled in init because the help command reads it.
var commands []command

func init() {
	commands = []command{
		{"dev", "run an embedded Kafka broker and the bank demo node: no set-up needed", runDev},
		{"node", "run a bank demo node against a Kafka cluster", runNode},
		{"kafka", "run the embedded Kafka-protocol broker alone", runKafka},
		{"bench", "benchmark esker against a raw Kafka transactional loop", runBench},
		{"dlq", "list or replay the dead letters of a side-effect consumer", runDLQ},
		{"inspect", "show an application's topics, consumer group or one entity, read from Kafka", runInspect},
		{"rebuild", "rebuild an aggregate type's state from its events on every node", runRebuild},
		{"version", "print the version of this build", runVersion},
		{"help", "show help for esker or one of its commands", runHelp},
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// After the first signal, restore the default handling so that a
	// second Ctrl-C stops a shutdown that hangs.
	context.AfterFunc(ctx, stop)
	os.Exit(run(&env{ctx: ctx, stdout: os.Stdout, stderr: os.Stderr}, os.Args[1:]))
}

// run dispatches to a subcommand and returns the exit status.
func run(e *env, args []string) int {
	if len(args) == 0 {
		usage(e.stderr)
		return 2
	}
	name := args[0]
	switch name {
	case "-h", "-help", "--help":
		usage(e.stdout)
		return 0
	}
	if strings.HasPrefix(name, "-") {
		fmt.Fprintf(e.stderr, "esker: flag %s must follow a command\nRun 'esker help' for usage.\n", name)
		return 2
	}
	c := lookup(name)
	if c == nil {
		fmt.Fprintf(e.stderr, "esker: unknown command %q\nRun 'esker help' for usage.\n", name)
		return 2
	}
	return c.run(e, args[1:])
}

func lookup(name string) *command {
	for i := range commands {
		if commands[i].name == name {
			return &commands[i]
		}
	}
	return nil
}

func usage(w io.Writer) {
	fmt.Fprint(w, `esker runs event-sourced services on Apache Kafka.

Usage:
  esker <command> [flags]

Commands:
`)
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	for _, c := range commands {
		fmt.Fprintf(tw, "  %s\t%s\n", c.name, c.summary)
	}
	tw.Flush()
	fmt.Fprint(w, `
Start here:
  esker dev       (or: go run ./cmd/esker dev)

Examples:
  esker dev --data /tmp/esker
  esker inspect group --brokers 127.0.0.1:9092
  esker help node

Run 'esker help <command>' or 'esker <command> --help' for a command's flags.
`)
}

func runHelp(e *env, args []string) int {
	switch {
	case len(args) == 0:
		usage(e.stdout)
		return 0
	case len(args) > 1:
		fmt.Fprintf(e.stderr, "esker help: want at most one command, got %q\nRun 'esker help' for usage.\n", args)
		return 2
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		usage(e.stdout)
		return 0
	}
	c := lookup(args[0])
	if c == nil && strings.HasPrefix(args[0], "-") {
		fmt.Fprintf(e.stderr, "esker help: unknown flag %s (help takes no flags)\nRun 'esker help' for usage.\n", args[0])
		return 2
	}
	if c == nil {
		fmt.Fprintf(e.stderr, "esker help: unknown command %q\nRun 'esker help' for usage.\n", args[0])
		return 2
	}
	return c.run(e, []string{"--help"})
}

// flagSet is a subcommand's flag.FlagSet with its usage text.
type flagSet struct {
	*flag.FlagSet
	name     string // subcommand name
	synopsis string // "esker dev [flags]"
	about    string // what the command does, one or more paragraphs
	examples string // example command lines, one a line
	// actions, when set, is the help of the actions the command takes as
	// its first argument ("esker inspect group"): --help after an action
	// prints the action's help, with the command's flags (see
	// parseInterleaved and useAction).
	actions map[string]helpText
}

func newFlagSet(name, synopsis, about string) *flagSet {
	fs := flag.NewFlagSet("esker "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // parse reports errors itself
	fs.Usage = func() {}
	return &flagSet{FlagSet: fs, name: name, synopsis: synopsis, about: strings.TrimSpace(about)}
}

// usage writes the complete help text: synopsis, description and flags.
func (f *flagSet) usage(w io.Writer) {
	fmt.Fprintf(w, "Usage:\n  %s\n\n%s\n", f.synopsis, f.about)
	hasFlags := false
	f.VisitAll(func(*flag.Flag) { hasFlags = true })
	if hasFlags {
		fmt.Fprint(w, "\nFlags:\n")
		f.SetOutput(w)
		f.PrintDefaults()
		f.SetOutput(io.Discard)
	}
	if f.examples != "" {
		fmt.Fprintf(w, "\nExamples:\n%s\n", indent(strings.TrimSpace(f.examples)))
	}
}

// parse parses args. ok is false when the caller must return code at once:
// after --help (0, usage on stdout) or on a bad flag or argument (2, message
// on stderr).
func (f *flagSet) parse(e *env, args []string) (code int, ok bool) {
	err := f.Parse(args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		f.usage(e.stdout)
		return 0, false
	case err != nil:
		return f.fail(e, "%v", err), false
	case f.NArg() > 0:
		return f.fail(e, "unexpected argument %q", f.Arg(0)), false
	}
	return 0, true
}

// fail reports a usage error and returns exit status 2.
func (f *flagSet) fail(e *env, format string, args ...any) int {
	fmt.Fprintf(e.stderr, "esker %s: %s\nUsage: %s\nRun 'esker %s --help' for details.\n",
		f.name, fmt.Sprintf(format, args...), f.synopsis, f.name)
	return 2
}

// logLevel adds the --log-level flag.
func (f *flagSet) logLevel() *slog.Level {
	var l slog.Level
	f.TextVar(&l, "log-level", slog.LevelInfo, "log `level`: debug, info, warn or error")
	return &l
}

func newLogger(w io.Writer, level slog.Level) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

// onShutdown tells the user that a signal was received; the returned func
// cancels the notice.
func onShutdown(e *env, what string) (cancel func() bool) {
	return context.AfterFunc(e.ctx, func() {
		fmt.Fprintf(e.stderr, "\nesker %s: shutting down (press Ctrl-C again to force)\n", what)
	})
}
