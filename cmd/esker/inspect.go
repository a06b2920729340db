package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/internal/keyring"
	"github.com/esker-io/esker/sideeffects"
)

const inspectAbout = `
Shows what an esker application keeps in Kafka, read from the brokers
directly: no node has to run, and nothing is written.

  esker inspect topics        the application's topics: role, partitions,
                              cleanup policy, retention, records, and the
                              start and end offsets of every partition
  esker inspect group         the application's consumer group: its state,
                              every node in it with its advertised URL and
                              the partitions it owns and keeps standbys of,
                              committed offsets and lag per partition
  esker inspect entity TYPE ID
                              one entity: its partition, the node that owns
                              it, its events and its latest stored state

A cluster that requires SASL or TLS takes the flags of 'esker node':
--kafka-sasl-mechanism, --kafka-user (with $ESKER_KAFKA_PASSWORD or
--kafka-password), --kafka-tls and --kafka-ca.

Run 'esker inspect <topics|group|entity> --help' for details. Flags may come
before or after the arguments.`

var inspectActions = map[string]helpText{
	"topics": {
		synopsis: "esker inspect topics --brokers HOST:PORT[,HOST:PORT...] [flags]",
		about: `
Lists the topics of the application --app: the commands and events topics of
its aggregate types (<type>-commands, <type>-events), its changelogs
(<app>-<name>-changelog, compacted), the repartition topics of its
projections (<app>-<name>-repartition), the dead-letter and re-drive topics
of its side-effect consumers (<app>-<name>-dlq, <app>-<name>-redrive), every
other topic named <app>-..., and the topics the application's consumer group
reads.

The first table has one row per topic: its role, partition count,
cleanup.policy (delete or compact), retention.ms and record count. The
second one has the start and end offsets of every non-empty partition.
RECORDS is end - start: on topics written in Kafka transactions it includes
the transaction markers, and on compacted topics the records compaction has
removed since the start offset.`,
		examples: `
esker inspect topics --brokers 127.0.0.1:9092
esker inspect topics --brokers kafka-1:9092,kafka-2:9092 --app shop --json
ESKER_KAFKA_PASSWORD=... esker inspect topics --brokers kafka-1:9093 --kafka-sasl-mechanism SCRAM-SHA-512 --kafka-user ops --kafka-ca ca.pem`,
	},
	"group": {
		synopsis: "esker inspect group --brokers HOST:PORT[,HOST:PORT...] [flags]",
		about: `
Shows the consumer group of the application --app (its group id is the
application id): its state, the generation of its cluster map and every
member (one per running node) with the HTTP URL it advertises, the
partitions it owns (ACTIVE), is about to own (PENDING: the partition moves
to it at the next rebalance) and keeps a standby replica of (STANDBY), all
decoded from esker's assignor data in the group.

Then, for every topic the group reads (the command topics, and the sources
of projections and reactors), the committed offset of every partition, the
partition's end (last stable offset), the lag between them and the URL of
the partition's owner.`,
		examples: `
esker inspect group --brokers 127.0.0.1:9092
esker inspect group --brokers 127.0.0.1:9092 --app shop --json | jq .totalLag
esker inspect group --brokers kafka-1:9093 --kafka-tls --kafka-sasl-mechanism SCRAM-SHA-256 --kafka-user ops`,
	},
	"entity": {
		synopsis: "esker inspect entity TYPE ID --brokers HOST:PORT[,HOST:PORT...] [flags]",
		about: `
Shows the entity ID of the aggregate type TYPE: the partition it lives on
(Kafka's murmur2 partitioner, as the node computes it), the node that owns
that partition now and its standbys, every event of the entity read from
TYPE-events (offset, version, event type, schema version, time and the
payload as stored), and its latest state in the changelog
<app>-TYPE-changelog (version, time, state as stored).

The events are found by reading the entity's partition of TYPE-events from
its start: on a large partition that takes a while, and the progress is
shown on stderr.`,
		examples: `
esker inspect entity account alice --brokers 127.0.0.1:9092
esker inspect entity account alice --brokers 127.0.0.1:9092 --json | jq '.events[].data'`,
	},
}

// typeNamePattern is the aggregate type name rule (aggregate.New).
var typeNamePattern = regexp.MustCompile(`^[a-z][a-z0-9-]{0,62}$`)

func runInspect(e *env, args []string) int {
	fs := newFlagSet("inspect", "esker inspect topics|group|entity [TYPE ID] --brokers HOST:PORT[,HOST:PORT...] [flags]", inspectAbout)
	fs.examples = `
esker inspect topics --brokers 127.0.0.1:9092
esker inspect group --brokers 127.0.0.1:9092 --app bank
esker inspect entity account alice --brokers 127.0.0.1:9092 --json
esker inspect topics --brokers kafka-1:9093 --kafka-sasl-mechanism SCRAM-SHA-512 --kafka-user ops --kafka-ca ca.pem`
	fs.actions = inspectActions
	brokers := fs.String("brokers", "", "comma-separated Kafka seed `brokers` (required)")
	app := fs.String("app", "bank", "application `id`: the consumer group and the prefix of the application's topics")
	asJSON := fs.Bool("json", false, "print one JSON document instead of tables")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to `wait` for Kafka to answer a request before giving up")
	kafkaSec := addKafkaSecurityFlags(fs)
	masterKeyFile := fs.String("master-key-file", "", "`file` of the application's master keys (default: $ESKER_MASTER_KEY, if set): inspect entity then shows personal fields opened instead of sealed")

	positional, code, ok := parseInterleaved(e, fs, args)
	if !ok {
		return code
	}
	if len(positional) == 0 {
		return fs.fail(e, "missing what to inspect: topics, group or entity")
	}
	action, rest := positional[0], positional[1:]
	if _, ok := inspectActions[action]; !ok {
		return fs.fail(e, "unknown inspect command %q: use topics, group or entity", action)
	}
	fs.useAction(action)
	var typ, id string
	switch {
	case action != "entity" && len(rest) > 0:
		return fs.fail(e, "unexpected argument %q", rest[0])
	case action == "entity" && len(rest) == 0:
		return fs.fail(e, "missing aggregate TYPE and entity ID")
	case action == "entity" && len(rest) == 1:
		return fs.fail(e, "missing entity ID")
	case action == "entity" && len(rest) > 2:
		return fs.fail(e, "unexpected argument %q", rest[2])
	case action == "entity":
		typ, id = rest[0], rest[1]
		if !typeNamePattern.MatchString(typ) {
			return fs.fail(e, "invalid aggregate type %q: lower-case letters, digits and dashes, starting with a letter", typ)
		}
		if err := aggregate.ValidateEntityID(id); err != nil {
			return fs.fail(e, "invalid entity id %q: %v", id, err)
		}
	}
	if err := sideeffects.ValidateAppID(*app); err != nil {
		return fs.fail(e, "%s", strings.TrimPrefix(err.Error(), "sideeffects: "))
	}
	opts, code, ok := connectKafka(e, fs, fs.name, *brokers, *timeout, kafkaSec)
	if !ok {
		return code
	}
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		fmt.Fprintf(e.stderr, "esker %s: %v\n", fs.name, err)
		return 1
	}
	defer cl.Close()
	in := &inspector{e: e, opts: opts, adm: kadm.NewClient(cl), app: *app, timeout: *timeout, name: fs.name}
	if action == "entity" && (*masterKeyFile != "" || os.Getenv("ESKER_MASTER_KEY") != "") {
		if in.masterKeys, err = loadMasterKeys(*masterKeyFile, os.Getenv("ESKER_MASTER_KEY")); err != nil {
			return fs.fail(e, "%v", err)
		}
	}

	var report any
	var write func(io.Writer)
	switch action {
	case "topics":
		r, err := in.topics()
		if err != nil {
			return in.fail(err)
		}
		report, write = r, r.write
	case "group":
		r, err := in.group()
		if err != nil {
			return in.fail(err)
		}
		report, write = r, r.write
	case "entity":
		r, err := in.entity(typ, id)
		if err != nil {
			return in.fail(err)
		}
		report, write = r, r.write
	}
	if *asJSON {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(report); err != nil {
			return in.fail(err)
		}
		return 0
	}
	write(e.stdout)
	return 0
}

// inspector reads what the inspect commands show.
type inspector struct {
	e       *env
	opts    []kgo.Opt // the connection: seed brokers, SASL, TLS
	adm     *kadm.Client
	app     string
	timeout time.Duration
	name    string // "inspect group", for messages
	// masterKeys, when set, open the personal fields inspect entity shows.
	masterKeys []keyring.MasterKey
}

// fail reports a run-time error and returns exit status 1.
func (in *inspector) fail(err error) int {
	if errors.Is(err, context.Canceled) && in.e.ctx.Err() != nil {
		err = errors.New("interrupted")
	}
	fmt.Fprintf(in.e.stderr, "esker %s: %v\n", in.name, err)
	return 1
}

// ctx returns a context for one round of requests to Kafka, bounded by
// --timeout.
func (in *inspector) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(in.e.ctx, in.timeout)
}

// kafkaErr names a request that failed, and says so when it timed out.
func (in *inspector) kafkaErr(what string, err error) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: Kafka did not answer within %v", what, in.timeout)
	}
	return fmt.Errorf("%s: %w", what, err)
}
