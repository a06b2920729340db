package chaostest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/internal/keyring"
)

// Reading the truth from Kafka once the cluster has settled.

// idleState says how far the cluster is from idle: commands not yet
// consumed by the group, and partitions with a transaction still open.
type idleState struct {
	lag     int64 // account-commands records past the group's committed offsets
	openTxn int   // partitions of the events and changelog topics whose last stable offset is behind their end
}

func (s idleState) idle() bool { return s.lag == 0 && s.openTxn == 0 }

func (s idleState) String() string {
	return fmt.Sprintf("%d commands not consumed, %d partitions with an open transaction", s.lag, s.openTxn)
}

// checkIdle measures idleState once.
func checkIdle(ctx context.Context, brokers []string, app string) (idleState, error) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		return idleState{}, err
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	var s idleState
	ends, err := adm.ListEndOffsets(ctx, "account-commands", "account-events", app+"-account-changelog")
	if err != nil {
		return s, err
	}
	stable, err := adm.ListCommittedOffsets(ctx, "account-events", app+"-account-changelog")
	if err != nil {
		return s, err
	}
	committed, err := adm.FetchOffsets(ctx, app)
	if err != nil {
		return s, err
	}
	var firstErr error
	ends.Each(func(o kadm.ListedOffset) {
		if o.Err != nil && firstErr == nil {
			firstErr = o.Err
		}
		if o.Topic == "account-commands" {
			c, ok := committed.Lookup(o.Topic, o.Partition)
			at := int64(0)
			if ok && c.Err == nil {
				at = c.At
			}
			if o.Offset > at {
				s.lag += o.Offset - at
			}
			return
		}
		if st, ok := stable.Lookup(o.Topic, o.Partition); ok && st.Offset < o.Offset {
			s.openTxn++
		}
	})
	return s, firstErr
}

// waitIdle waits until every command was consumed and no transaction is
// open, so the events topic read next is final.
func waitIdle(ctx context.Context, brokers []string, app string) (idleState, error) {
	for {
		s, err := checkIdle(ctx, brokers, app)
		if err == nil && s.idle() {
			return s, nil
		}
		select {
		case <-ctx.Done():
			if err != nil {
				return s, err
			}
			return s, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// readEvents reads every committed record of account-events up to its last
// stable offset, read_committed, as the checker's truth. ownerKeys maps
// every owner named in them to the key the owners projection lists the
// owner under (the owner's pseudonym: PersonalKeys).
func readEvents(ctx context.Context, brokers []string, partitions int) (events []EventRecord, ownerKeys map[string]string, err error) {
	adm, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		return nil, nil, err
	}
	ends, err := kadm.NewClient(adm).ListCommittedOffsets(ctx, "account-events")
	adm.Close()
	if err != nil {
		return nil, nil, err
	}
	pending := map[int32]int64{}
	ends.Each(func(o kadm.ListedOffset) {
		if o.Offset > 0 {
			pending[o.Partition] = o.Offset
		}
	})
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...),
		kgo.ConsumeTopics("account-events"),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.FetchMaxWait(200*time.Millisecond),
		kgo.KeepControlRecords())
	if err != nil {
		return nil, nil, err
	}
	defer cl.Close()
	// The owner is sealed on the events; the nodes' master key opens it.
	master, err := keyring.ParseMasterKey(os.Getenv("ESKER_MASTER_KEY"))
	if err != nil {
		return nil, nil, err
	}
	kr, err := keyring.New(keyring.Config{AppID: "bank", Partitions: int32(partitions), Masters: []keyring.MasterKey{master},
		ClientOpts: []kgo.Opt{kgo.SeedBrokers(brokers...)}})
	if err != nil {
		return nil, nil, err
	}
	defer kr.Close()
	go func() { _ = kr.Run(ctx) }()
	if err := kr.Sync(ctx); err != nil {
		return nil, nil, err
	}
	var out []EventRecord
	var decodeErr error
	for len(pending) > 0 {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			return nil, nil, fmt.Errorf("reading account-events: partitions %v unread: %w", pending, ctx.Err())
		}
		fs.EachRecord(func(r *kgo.Record) {
			end, ok := pending[r.Partition]
			if !ok || r.Offset >= end {
				return
			}
			if !r.Attrs.IsControl() {
				value, err := kr.OpenJSON(ctx, "account", string(r.Key), r.Value)
				if err != nil && decodeErr == nil {
					decodeErr = err
				}
				e, err := eventRecord(r, value)
				if err != nil && decodeErr == nil {
					decodeErr = err
				}
				out = append(out, e)
			}
			if r.Offset+1 >= end {
				delete(pending, r.Partition)
			}
		})
	}
	ownerKeys = map[string]string{}
	for _, e := range out {
		if _, ok := ownerKeys[e.Owner]; e.Owner != "" && !ok {
			if ownerKeys[e.Owner], err = kr.Pseudonym(ctx, "owners", e.Owner); err != nil {
				return nil, nil, err
			}
		}
	}
	return out, ownerKeys, decodeErr
}

// eventRecord decodes one record of account-events whose payload, its
// personal fields opened, is value.
func eventRecord(r *kgo.Record, value []byte) (EventRecord, error) {
	e := EventRecord{Account: string(r.Key), Partition: r.Partition, Offset: r.Offset}
	for _, h := range r.Headers {
		switch h.Key {
		case aggregate.HeaderVersion:
			e.Version, _ = strconv.ParseInt(string(h.Value), 10, 64)
		case aggregate.HeaderCommandID:
			e.CommandID = string(h.Value)
		case aggregate.HeaderEventID:
			e.EventID = string(h.Value)
		case aggregate.HeaderEventType:
			e.Type = string(h.Value)
		}
	}
	var payload struct {
		Amount int64  `json:"amount"`
		Owner  string `json:"owner"`
	}
	if len(value) > 0 {
		if err := json.Unmarshal(value, &payload); err != nil {
			return e, fmt.Errorf("account-events partition %d offset %d: payload %q: %w", r.Partition, r.Offset, value, err)
		}
	}
	e.Amount, e.Owner = payload.Amount, payload.Owner
	return e, nil
}
