package esker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/projection"
)

// BenchmarkGroupByPersonal measures what personal data costs a GroupBy
// projection: the bank's owners projection as it is (owner names sealed in
// the entity rows, rows keyed by pseudonyms) against the same projection
// with a row type without the tag and plain keys. Both fold the same
// account-events (400 accounts of 20 owners, 20 000 deposits) from the
// beginning on a fresh node; each iteration is a whole catch-up. Report
// events/s and compare the medians:
//
//	go test -run '^$' -bench GroupByPersonal -benchtime 1x -count 5 .
func BenchmarkGroupByPersonal(b *testing.B) {
	const accounts, owners, deposits = 400, 20, 20_000
	c := newCluster(b)
	brokers := c.ListenAddrs()
	tn := startTypesNode(b, brokers, b.TempDir(), []any{bank.Account})
	ctx := context.Background()
	for i := range accounts {
		raw, _ := json.Marshal(bank.Open{Owner: fmt.Sprintf("Owner Number %d", i%owners)})
		if o, err := tn.Submit(ctx, "account", fmt.Sprintf("acc-%d", i), aggregate.Command{Type: "Open", Data: raw}); err != nil || !o.Accepted {
			b.Fatalf("open: %v %+v", err, o)
		}
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.DefaultProduceTopic("account-commands"))
	if err != nil {
		b.Fatal(err)
	}
	var recs []*kgo.Record
	for i := range deposits {
		recs = append(recs, &kgo.Record{Key: []byte(fmt.Sprintf("acc-%d", i%accounts)),
			Value: []byte(`{"type":"Deposit","data":{"amount":1},"commandId":"d-` + strconv.Itoa(i) + `"}`)})
	}
	if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		b.Fatal(err)
	}
	cl.Close()
	waitUntil(b, "the deposits to be applied", func() bool {
		_, version, err := esker.Load(ctx, tn.Node, bank.Account, fmt.Sprintf("acc-%d", accounts-1))
		return err == nil && version == 1+deposits/accounts
	})
	tn.stop()
	events := float64(accounts + deposits)

	run := 0
	fold := func(b *testing.B, personal bool) {
		for range b.N {
			run++
			p := ownersVariant(fmt.Sprintf("owners-bench-%d", run), personal)
			n := startTypesNode(b, brokers, b.TempDir(), []any{bank.Account, p})
			start := time.Now()
			waitUntil(b, "the projection to fold every event", func() bool {
				total := int64(0)
				for o := range owners {
					row, err := n.ProjectionRow(ctx, p.Name(), fmt.Sprintf("Owner Number %d", o))
					if err != nil {
						return false
					}
					var t bank.OwnerTotals
					_ = json.Unmarshal(row.Value, &t)
					total += t.Balance
				}
				return total == deposits
			})
			b.ReportMetric(events/time.Since(start).Seconds(), "events/s")
			n.stop()
		}
	}
	b.Run("plain", func(b *testing.B) { fold(b, false) })
	b.Run("personal", func(b *testing.B) { fold(b, true) })
}

// plainAccountRow is bank.AccountRow without the personal tag.
type plainAccountRow struct {
	Owner   string `json:"owner"`
	Balance int64  `json:"balance"`
	Open    bool   `json:"open"`
}

// ownersVariant is the bank's owners projection under another name; the
// plain variant keeps owner names as they are.
func ownersVariant(name string, personal bool) *projection.Projection[bank.OwnerTotals] {
	add := func(t bank.OwnerTotals, balance int64) bank.OwnerTotals {
		t.Accounts++
		t.Balance += balance
		return t
	}
	sub := func(t bank.OwnerTotals, balance int64) bank.OwnerTotals {
		t.Accounts--
		t.Balance -= balance
		return t
	}
	from := projection.From(projection.Events(bank.Account))
	if personal {
		return projection.GroupBy(name, bank.FoldAccountRow,
			func(r bank.AccountRow) string { return map[bool]string{true: r.Owner}[r.Open] },
			func(t bank.OwnerTotals, r bank.AccountRow) bank.OwnerTotals { return add(t, r.Balance) },
			func(t bank.OwnerTotals, r bank.AccountRow) bank.OwnerTotals { return sub(t, r.Balance) },
			from, projection.PersonalKeys())
	}
	return projection.GroupBy(name,
		func(r plainAccountRow, ev projection.Event) plainAccountRow {
			return plainAccountRow(bank.FoldAccountRow(bank.AccountRow(r), ev))
		},
		func(r plainAccountRow) string { return map[bool]string{true: r.Owner}[r.Open] },
		func(t bank.OwnerTotals, r plainAccountRow) bank.OwnerTotals { return add(t, r.Balance) },
		func(t bank.OwnerTotals, r plainAccountRow) bank.OwnerTotals { return sub(t, r.Balance) },
		from)
}
