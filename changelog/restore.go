package changelog

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/statestore"
)

// Target is one task to restore and the changelog topic that backs it.
type Target struct {
	Task  statestore.Task
	Topic string
}

// RestoreResult reports what a restore read, per task.
type RestoreResult struct {
	Records  map[statestore.Task]int64 // changelog records applied
	Duration time.Duration
}

// Restore brings the tasks' stores up to the end of their changelog
// partitions: it reads each partition, read_committed, from the task's local
// checkpoint (0 for a fresh store) to the last stable offset taken when the
// restore began, applies every record with Apply and advances the checkpoint
// in the same batch. A restart with an intact store therefore reads only the
// tail. It logs progress every few seconds.
//
// clientOpts must hold at least the seed brokers; Restore adds its own
// consumer options. On error the store holds a consistent prefix (whole
// batches with their checkpoint) and a later Restore resumes from there.
func Restore(ctx context.Context, store *statestore.Store, clientOpts []kgo.Opt, targets []Target, log *slog.Logger) (RestoreResult, error) {
	start := time.Now()
	res := RestoreResult{Records: map[statestore.Task]int64{}}
	if len(targets) == 0 {
		return res, nil
	}
	admCl, err := kgo.NewClient(clientOpts...)
	if err != nil {
		return res, err
	}
	adm := kadm.NewClient(admCl)
	defer adm.Close()

	topics := map[string]bool{}
	for _, t := range targets {
		topics[t.Topic] = true
	}
	names := make([]string, 0, len(topics))
	for t := range topics {
		names = append(names, t)
	}
	ends, highs, err := stableEnds(ctx, adm, names, targets, log)
	if err != nil {
		return res, err
	}
	starts, err := adm.ListStartOffsets(ctx, names...)
	if err != nil {
		return res, fmt.Errorf("changelog: list start offsets: %w", err)
	}

	type progress struct {
		target   Target
		from     int64
		end      int64
		next     int64
		finished bool
	}
	work := map[string]map[int32]*progress{}
	consume := map[string]map[int32]kgo.Offset{}
	var total, pending int64
	for _, t := range targets {
		cp, err := store.Checkpoint(t.Task)
		if err != nil {
			return res, err
		}
		end, _ := ends.Lookup(t.Topic, t.Task.Partition)
		if high, _ := highs.Lookup(t.Topic, t.Task.Partition); cp > high.Offset {
			// The changelog is shorter than what this store restored:
			// the topic was recreated. The local state is not its state.
			if log != nil {
				log.Warn("local checkpoint is past the changelog's end; the topic was recreated: dropping the local state of the task and restoring it anew",
					"task", t.Task.String(), "checkpoint", cp, "end", end.Offset)
			}
			if err := store.DropTask(t.Task); err != nil {
				return res, err
			}
			cp = 0
		}
		from := cp
		if s, ok := starts.Lookup(t.Topic, t.Task.Partition); ok && s.Err == nil && s.Offset > from {
			from = s.Offset // older records were deleted; compaction keeps what matters
		}
		res.Records[t.Task] = 0
		if from >= end.Offset {
			continue
		}
		p := &progress{target: t, from: from, end: end.Offset, next: from}
		if work[t.Topic] == nil {
			work[t.Topic] = map[int32]*progress{}
			consume[t.Topic] = map[int32]kgo.Offset{}
		}
		work[t.Topic][t.Task.Partition] = p
		consume[t.Topic][t.Task.Partition] = kgo.NewOffset().At(from)
		total += end.Offset - from
		pending++
	}
	if pending == 0 {
		res.Duration = time.Since(start)
		return res, nil
	}

	opts := append(append([]kgo.Opt{}, clientOpts...),
		kgo.ConsumePartitions(consume),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		// Transaction markers tell us we have passed the end even when the
		// last records before it belong to an aborted transaction.
		kgo.KeepControlRecords(),
	)
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return res, err
	}
	defer cl.Close()

	var done int64
	lastLog := time.Now()
	for pending > 0 {
		fetches := cl.PollFetches(ctx)
		if err := ctx.Err(); err != nil {
			return res, err
		}
		var fetchErr error
		fetches.EachError(func(topic string, p int32, err error) {
			fetchErr = fmt.Errorf("changelog: fetch %s[%d]: %w", topic, p, err)
		})
		if fetchErr != nil {
			return res, fetchErr
		}
		b := store.NewBatch()
		fetches.EachPartition(func(fp kgo.FetchTopicPartition) {
			p := work[fp.Topic][fp.Partition]
			if p == nil || p.finished {
				return
			}
			if fetchErr != nil {
				return
			}
			next, applied, reached, err := applyFetched(b, p.target.Task, fp.Records, p.next, p.end)
			if err != nil {
				fetchErr = err
				return
			}
			done += next - p.next
			p.next = next
			res.Records[p.target.Task] += applied
			if reached {
				p.finished = true
				pending--
			}
		})
		if fetchErr != nil {
			b.Discard()
			return res, fetchErr
		}
		if err := b.Commit(); err != nil {
			return res, fmt.Errorf("changelog: apply restored records: %w", err)
		}
		if log != nil && time.Since(lastLog) > 3*time.Second {
			lastLog = time.Now()
			log.Info("restoring state from changelog", "done", done, "total", total,
				"percent", fmt.Sprintf("%.1f", 100*float64(done)/float64(total)))
		}
	}
	res.Duration = time.Since(start)
	return res, nil
}

// stableEnds returns the offsets to restore up to: the last stable offsets
// once every transaction open on the changelogs when the restore began has
// ended. A task changes owner while its previous owner's last transaction
// may still be open (its commit markers not yet written, or a zombie about
// to abort); restoring only to the last stable offset of that moment would
// miss a committed transaction whose commands' offsets the group then
// resumes after. Waiting until the last stable offset reaches the high
// watermark seen at the start closes that gap; the broker ends any open
// transaction within its transaction timeout. It also returns the high
// watermarks.
func stableEnds(ctx context.Context, adm *kadm.Client, topics []string, targets []Target, log *slog.Logger) (ends, highs kadm.ListedOffsets, err error) {
	highs, err = adm.ListEndOffsets(ctx, topics...)
	if err != nil {
		return nil, nil, fmt.Errorf("changelog: list high watermarks: %w", err)
	}
	started := time.Now()
	lastLog := started
	for {
		ends, err = adm.ListCommittedOffsets(ctx, topics...)
		if err != nil {
			return nil, nil, fmt.Errorf("changelog: list last stable offsets: %w", err)
		}
		var waiting []string
		for _, t := range targets {
			high, ok := highs.Lookup(t.Topic, t.Task.Partition)
			if !ok || high.Err != nil {
				return nil, nil, fmt.Errorf("changelog: no high watermark for %s[%d]: %v", t.Topic, t.Task.Partition, high.Err)
			}
			end, ok := ends.Lookup(t.Topic, t.Task.Partition)
			if !ok || end.Err != nil {
				return nil, nil, fmt.Errorf("changelog: no last stable offset for %s[%d]: %v", t.Topic, t.Task.Partition, end.Err)
			}
			if end.Offset < high.Offset {
				waiting = append(waiting, fmt.Sprintf("%s[%d]", t.Topic, t.Task.Partition))
			}
		}
		if len(waiting) == 0 {
			return ends, highs, nil
		}
		if log != nil && time.Since(lastLog) > 2*time.Second {
			lastLog = time.Now()
			log.Info("waiting for open transactions on changelogs to end before restoring",
				"partitions", waiting, "waited", time.Since(started).Round(time.Millisecond))
		}
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}
