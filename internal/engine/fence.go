package engine

import (
	"context"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker/changelog"
	"github.com/esker-io/esker/statestore"
)

// Fencing a dead owner's transaction. A node killed in the middle of a
// cycle leaves its transaction open; until the broker aborts it at the
// transaction timeout, it holds back the last stable offset of the
// partitions it wrote (so the next owner's restore cannot finish) and the
// group's committed offsets (so the next owner cannot fetch). Under load
// that would make fail-over last the transaction timeout, not the session
// timeout.
//
// So before restoring newly assigned tasks, the engine looks for ongoing
// transactions of this application that write to those tasks' events or
// changelog partitions, and fences each one: it initializes a producer with
// that transactional id, which makes the broker abort the transaction and
// bump its epoch at once.
//
// Why this never fences a live owner's work: a partition moves only after
// its previous owner revoked it, which it does only between cycles, after
// its transaction ended (BlockRebalanceOnPoll); a transaction still ongoing
// on a partition this node now owns therefore belongs to an owner the group
// dropped (dead, or a zombie that was paused or cut off). A zombie that
// wakes up finds its producer fenced and rejoins with a new session (see
// run).
//
// Fencing needs the Describe and Write ACLs on the application's
// transactional ids ("<app>-*"); without them it is skipped, and fail-over
// falls back to the transaction timeout.

// fenceStaleTransactions fences the ongoing transactions of other nodes of
// this application that write to the tasks' events or changelog
// partitions. Failures are logged, never returned: the restore that follows
// also works without fencing, only slower.
func (e *Engine) fenceStaleTransactions(ctx context.Context, tasks []statestore.Task) {
	if !e.cfg.Transactional || len(tasks) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	cl, err := kgo.NewClient(e.cfg.ClientOpts...)
	if err != nil {
		return
	}
	adm := kadm.NewClient(cl)
	defer adm.Close()

	listed, err := adm.ListTransactions(ctx, nil, []string{"Ongoing"})
	if err != nil {
		e.log.Debug("listing transactions to fence a dead owner's", "err", err)
		return
	}
	var candidates []string
	for id := range listed {
		if strings.HasPrefix(id, e.cfg.AppID+"-") && id != e.cfg.TransactionalID {
			candidates = append(candidates, id)
		}
	}
	if len(candidates) == 0 {
		return
	}
	described, err := adm.DescribeTransactions(ctx, candidates...)
	if err != nil {
		e.log.Debug("describing transactions to fence a dead owner's", "err", err)
		return
	}
	mine := map[string]map[int32]bool{}
	for _, t := range tasks {
		for _, topic := range []string{EventsTopic(t.Type), changelog.Topic(e.cfg.AppID, t.Type)} {
			if mine[topic] == nil {
				mine[topic] = map[int32]bool{}
			}
			mine[topic][t.Partition] = true
		}
	}
	for _, d := range described.Sorted() {
		if d.Err != nil || d.State != "Ongoing" || !touches(d.Topics, mine) {
			continue
		}
		if err := e.fence(ctx, d.TxnID); err != nil {
			e.log.Warn("fencing a dead owner's open transaction", "transactional_id", d.TxnID, "err", err)
			continue
		}
		e.log.Info("fenced a dead owner's open transaction on newly assigned partitions",
			"transactional_id", d.TxnID, "open_for", time.Since(time.UnixMilli(d.StartTimestamp)).Round(time.Millisecond))
		if e.cfg.Metrics != nil {
			e.cfg.Metrics.Fenced.Inc()
		}
	}
}

func touches(ts kadm.TopicsSet, mine map[string]map[int32]bool) bool {
	for topic, ps := range ts {
		for p := range ps {
			if mine[topic][p] {
				return true
			}
		}
	}
	return false
}

// fence initializes a producer id for transactionalID, which aborts its
// ongoing transaction and fences its current producer.
func (e *Engine) fence(ctx context.Context, transactionalID string) error {
	cl, err := kgo.NewClient(append(append([]kgo.Opt{}, e.cfg.ClientOpts...),
		kgo.TransactionalID(transactionalID),
		kgo.TransactionTimeout(10*time.Second))...)
	if err != nil {
		return err
	}
	defer cl.Close()
	_, _, err = cl.ProducerID(ctx)
	return err
}
