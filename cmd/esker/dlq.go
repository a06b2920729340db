package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/sideeffects"
)

// maxErrorColumn bounds the error shown per dead letter in the list table.
const maxErrorColumn = 100

func runDLQ(e *env, args []string) int {
	fs := newFlagSet("dlq", "esker dlq list|replay NAME [flags]", `
Shows or re-drives the dead letters of the side-effect consumer NAME: the
events its handler failed on after its last retry, which it wrote to the
topic <app>-NAME-dlq.

  esker dlq list NAME     prints the newest --limit dead letters, oldest
                          first: offset in the dead-letter topic, when it
                          was dead-lettered, the source record
                          (topic/partition@offset), attempts, entity id,
                          event type, whether it was replayed, and the error.
  esker dlq replay NAME   copies the dead letters not replayed yet to the
                          topic <app>-NAME-redrive; the running consumer
                          hands them to its handler again. Replay once the
                          cause is fixed. What was copied is remembered
                          (consumer group <app>-NAME-dlq-replay), so running
                          it again copies only newer dead letters.

A cluster that requires SASL or TLS takes the flags of 'esker node':
--kafka-sasl-mechanism, --kafka-user (with $ESKER_KAFKA_PASSWORD or
--kafka-password), --kafka-tls and --kafka-ca.

Flags may come before or after NAME.`)
	fs.examples = `
esker dlq list mailer --brokers 127.0.0.1:9092
esker dlq replay mailer --brokers 127.0.0.1:9092 --app shop
esker dlq list mailer --brokers kafka-1:9093 --kafka-sasl-mechanism SCRAM-SHA-512 --kafka-user ops --kafka-ca ca.pem`
	fs.actions = dlqActions
	brokers := fs.String("brokers", "127.0.0.1:9092", "comma-separated Kafka seed `brokers` (the default is where 'esker dev' listens)")
	app := fs.String("app", "bank", "application `id` the consumer runs in (its topics are named <app>-NAME-...)")
	limit := fs.Int("limit", 50, "list: show at most the newest `n` dead letters (0: all)")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to wait for Kafka to answer before giving up (`duration`)")
	kafkaSec := addKafkaSecurityFlags(fs)

	positional, code, ok := parseInterleaved(e, fs, args)
	if !ok {
		return code
	}
	switch {
	case len(positional) == 0:
		return fs.fail(e, "missing action: list or replay")
	case positional[0] != "list" && positional[0] != "replay":
		return fs.fail(e, "unknown action %q: use list or replay", positional[0])
	}
	fs.useAction(positional[0])
	switch {
	case len(positional) == 1:
		return fs.fail(e, "missing consumer NAME")
	case len(positional) > 2:
		return fs.fail(e, "unexpected argument %q", positional[2])
	}
	action, name := positional[0], positional[1]
	if err := sideeffects.ValidateName(name); err != nil {
		return fs.fail(e, "%s", strings.TrimPrefix(err.Error(), "sideeffects: "))
	}
	if err := sideeffects.ValidateAppID(*app); err != nil {
		return fs.fail(e, "%s", strings.TrimPrefix(err.Error(), "sideeffects: "))
	}
	if *limit < 0 {
		return fs.fail(e, "--limit must be 0 (all) or more, got %d", *limit)
	}
	opts, code, ok := connectKafka(e, fs, "dlq", *brokers, *timeout, kafkaSec)
	if !ok {
		return code
	}
	if action == "list" {
		return dlqList(e, opts, *app, name, *limit)
	}
	return dlqReplay(e, opts, *app, name)
}

var dlqActions = map[string]helpText{
	"list": {
		synopsis: "esker dlq list NAME [flags]",
		about: `
Prints the newest --limit dead letters of the side-effect consumer NAME, read
from the topic <app>-NAME-dlq, oldest first: offset in the dead-letter topic,
when it was dead-lettered, the source record (topic/partition@offset),
attempts, entity id, event type, whether it was replayed, and the error.

Flags may come before or after NAME.`,
		examples: `
esker dlq list mailer --brokers 127.0.0.1:9092
esker dlq list mailer --brokers kafka-1:9092 --app shop --limit 0
ESKER_KAFKA_PASSWORD=... esker dlq list mailer --brokers kafka-1:9093 --kafka-sasl-mechanism SCRAM-SHA-512 --kafka-user ops --kafka-tls`,
	},
	"replay": {
		synopsis: "esker dlq replay NAME [flags]",
		about: `
Copies the dead letters of the side-effect consumer NAME that were not
replayed yet from <app>-NAME-dlq to the topic <app>-NAME-redrive; the
running consumer hands them to its handler again. Replay once the cause is
fixed. What was copied is remembered (consumer group <app>-NAME-dlq-replay),
so running it again copies only newer dead letters. --limit is ignored.

Flags may come before or after NAME.`,
		examples: `
esker dlq replay mailer --brokers 127.0.0.1:9092
esker dlq replay mailer --brokers kafka-1:9092 --app shop
esker dlq replay mailer --brokers kafka-1:9093 --kafka-sasl-mechanism SCRAM-SHA-512 --kafka-user ops --kafka-ca ca.pem`,
	},
}

// parseInterleaved parses flags that may come before, between and after
// positional arguments ("list NAME --app x" and "--app x list NAME" alike).
// ok is false when the caller must return code at once (after --help, or
// on a bad flag). --help after an action of fs (see flagSet.actions) prints
// the action's help, and a bad flag after it points to that help.
func parseInterleaved(e *env, fs *flagSet, args []string) (positional []string, code int, ok bool) {
	for {
		err := fs.Parse(args)
		switch {
		case errors.Is(err, flag.ErrHelp):
			if len(positional) > 0 {
				fs.useAction(positional[0])
			}
			fs.usage(e.stdout)
			return nil, 0, false
		case err != nil:
			if len(positional) > 0 {
				fs.useAction(positional[0])
			}
			return nil, fs.fail(e, "%v", err), false
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return positional, 0, true
		}
		// After "--" everything is positional.
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			return append(positional, rest...), 0, true
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
}

// connectKafka checks --timeout, --brokers and the Kafka security flags,
// then that a seed broker answers within the timeout and accepts the
// credentials and TLS handshake, so that a wrong address or a refused
// password is reported at once instead of retried forever. It returns the
// franz-go options of the connection. When ok is false it has reported why
// and code is the exit status: 2 for bad flags, 1 when Kafka cannot be
// used; label names the command in the message.
func connectKafka(e *env, fs *flagSet, label, brokers string, timeout time.Duration, sec *kafkaSecurityFlags) (opts []kgo.Opt, code int, ok bool) {
	if timeout <= 0 {
		return nil, fs.fail(e, "--timeout must be positive, got %v", timeout), false
	}
	seeds, err := parseBrokers(brokers)
	if err != nil {
		return nil, fs.fail(e, "%v", err), false
	}
	secOpts, msg := sec.options()
	if msg != "" {
		return nil, fs.fail(e, "%s", msg), false
	}
	nodeOpts := append([]esker.Option{esker.Brokers(seeds...)}, secOpts...)
	if opts, err = esker.KafkaClientOpts(nodeOpts...); err != nil {
		return nil, fs.fail(e, "%s", trimPrefix(err)), false
	}
	ctx, cancel := context.WithTimeout(e.ctx, timeout)
	defer cancel()
	switch err := esker.PingKafka(ctx, nodeOpts...); {
	case errors.Is(err, esker.ErrKafkaRefused):
		fmt.Fprintf(e.stderr, "esker %s: %s\n", label, trimPrefix(err))
		return nil, 1, false
	case err != nil:
		fmt.Fprintf(e.stderr, "esker %s: cannot reach Kafka at %s within %v: %v\n", label, strings.Join(seeds, ","), timeout, err)
		return nil, 1, false
	}
	return opts, 0, true
}

func dlqList(e *env, opts []kgo.Opt, app, name string, limit int) int {
	dead, err := sideeffects.List(e.ctx, opts, app, name, limit)
	if err != nil {
		fmt.Fprintf(e.stderr, "esker dlq: %s\n", strings.TrimPrefix(err.Error(), "sideeffects: "))
		return 1
	}
	topic := sideeffects.DeadLetterTopic(app, name)
	if len(dead) == 0 {
		fmt.Fprintf(e.stdout, "No dead letters in %s.\n", topic)
		return 0
	}
	writeDeadLetters(e.stdout, dead)
	replayed := 0
	for _, d := range dead {
		if d.Replayed {
			replayed++
		}
	}
	shown := deadLetters(len(dead))
	if limit > 0 && len(dead) == limit {
		shown += fmt.Sprintf(" (the newest %d; --limit 0 shows all)", limit)
	}
	fmt.Fprintf(e.stdout, "\n%s in %s, %d replayed. Replay the others with: esker dlq replay %s --app %s\n",
		shown, topic, replayed, name, app)
	return 0
}

// writeDeadLetters prints dead letters as a table.
func writeDeadLetters(w io.Writer, dead []sideeffects.DeadLetter) {
	multiPartition := false
	for _, d := range dead {
		multiPartition = multiPartition || d.Partition != 0
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "OFFSET\tDEAD-LETTERED\tSOURCE\tATTEMPTS\tENTITY\tTYPE\tREPLAYED\tERROR")
	for _, d := range dead {
		offset := fmt.Sprint(d.Offset)
		if multiPartition {
			offset = fmt.Sprintf("%d/%d", d.Partition, d.Offset)
		}
		replayed := "no"
		if d.Replayed {
			replayed = "yes"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s/%d@%d\t%d\t%s\t%s\t%s\t%s\n",
			offset, d.Time.UTC().Format(time.RFC3339), d.Event.Topic, d.Event.Partition, d.Event.Offset,
			d.Attempts, cell(d.Event.EntityID, 40), cell(orDash(d.Event.Type), 40), replayed, cell(d.Error, maxErrorColumn))
	}
	tw.Flush()
}

// cell makes a value fit one table cell: one line, at most n runes.
func cell(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if r := []rune(s); len(r) > n {
		return string(r[:n-1]) + "…"
	}
	return orDash(s)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func dlqReplay(e *env, opts []kgo.Opt, app, name string) int {
	from, to := sideeffects.DeadLetterTopic(app, name), sideeffects.RedriveTopic(app, name)
	n, err := sideeffects.Replay(e.ctx, opts, app, name, func(n int) {
		fmt.Fprintf(e.stderr, "esker dlq: replayed %d…\n", n)
	})
	if err != nil {
		fmt.Fprintf(e.stderr, "esker dlq: %s (%s replayed before the error; run replay again to continue)\n",
			strings.TrimPrefix(err.Error(), "sideeffects: "), deadLetters(n))
		return 1
	}
	if n == 0 {
		fmt.Fprintf(e.stdout, "Nothing to replay: every dead letter in %s was replayed already.\n", from)
		return 0
	}
	fmt.Fprintf(e.stdout, "Replayed %s from %s to %s; the running consumer %s handles them again.\n", deadLetters(n), from, to, name)
	return 0
}

// deadLetters is "1 dead letter" or "n dead letters".
func deadLetters(n int) string {
	if n == 1 {
		return "1 dead letter"
	}
	return fmt.Sprintf("%d dead letters", n)
}
