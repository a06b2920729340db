package esker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
)

// BenchmarkPersonalFields measures the cost of crypto-shredding on the
// write path: the same account-like aggregate with and without personal
// fields (the owner in the state, a note in every command and event, all
// tagged esker:"pii" in the personal variant), driven through Node.Submit
// with 16 concurrent clients on one node and kfake. Each iteration is a
// whole run; report commands/s and compare the medians:
//
//	go test -run '^$' -bench PersonalFields -benchtime 1x -count 5 .
func BenchmarkPersonalFields(b *testing.B) {
	b.Run("plain", func(b *testing.B) { benchPersonal(b, plainType()) })
	b.Run("personal", func(b *testing.B) { benchPersonal(b, personalType()) })
}

type (
	plainState struct {
		Owner, Note string
		Balance     int64
	}
	plainOpen    struct{ Owner string }
	plainDeposit struct {
		Amount int64
		Note   string
	}
	plainOpened    struct{ Owner string }
	plainDeposited struct {
		Amount int64
		Note   string
	}
	piiState struct {
		Owner   string `esker:"pii"`
		Note    string `esker:"pii"`
		Balance int64
	}
	piiOpen struct {
		Owner string `esker:"pii"`
	}
	piiDeposit struct {
		Amount int64
		Note   string `esker:"pii"`
	}
	piiOpened struct {
		Owner string `esker:"pii"`
	}
	piiDeposited struct {
		Amount int64
		Note   string `esker:"pii"`
	}
)

func (plainOpen) TypeName() string      { return "Open" }
func (plainDeposit) TypeName() string   { return "Deposit" }
func (plainOpened) TypeName() string    { return "Opened" }
func (plainDeposited) TypeName() string { return "Deposited" }
func (piiOpen) TypeName() string        { return "Open" }
func (piiDeposit) TypeName() string     { return "Deposit" }
func (piiOpened) TypeName() string      { return "Opened" }
func (piiDeposited) TypeName() string   { return "Deposited" }

func plainType() esker.Registrable {
	return aggregate.New[plainState, any, any]("plainacct",
		func(s plainState, c any) ([]any, error) {
			switch c := c.(type) {
			case plainOpen:
				return []any{plainOpened(c)}, nil
			case plainDeposit:
				return []any{plainDeposited(c)}, nil
			}
			return nil, fmt.Errorf("unknown %T", c)
		},
		func(s plainState, e any) plainState {
			switch e := e.(type) {
			case plainOpened:
				s.Owner = e.Owner
			case plainDeposited:
				s.Balance += e.Amount
				s.Note = e.Note
			}
			return s
		}).Commands(plainOpen{}, plainDeposit{}).Events(plainOpened{}, plainDeposited{})
}

func personalType() esker.Registrable {
	return aggregate.New[piiState, any, any]("piiacct",
		func(s piiState, c any) ([]any, error) {
			switch c := c.(type) {
			case piiOpen:
				return []any{piiOpened(c)}, nil
			case piiDeposit:
				return []any{piiDeposited(c)}, nil
			}
			return nil, fmt.Errorf("unknown %T", c)
		},
		func(s piiState, e any) piiState {
			switch e := e.(type) {
			case piiOpened:
				s.Owner = e.Owner
			case piiDeposited:
				s.Balance += e.Amount
				s.Note = e.Note
			}
			return s
		}).Commands(piiOpen{}, piiDeposit{}).Events(piiOpened{}, piiDeposited{})
}

func benchPersonal(b *testing.B, typ esker.Registrable) {
	const entities, commands, clients = 200, 4000, 16
	for range b.N {
		b.StopTimer()
		c := newCluster(b)
		tn := startTypesNode(b, c.ListenAddrs(), b.TempDir(), []any{typ})
		name := typ.(interface{ Name() string }).Name()
		ctx := context.Background()
		submit := func(id, cmdType string, data any) {
			raw, _ := json.Marshal(data)
			o, err := tn.Submit(ctx, name, id, aggregate.Command{Type: cmdType, Data: raw})
			if err != nil || !o.Accepted {
				b.Fatalf("%s %s: %v %+v", cmdType, id, err, o)
			}
		}
		for i := range entities {
			submit(fmt.Sprintf("acc-%d", i), "Open", map[string]any{"Owner": fmt.Sprintf("Owner Number %d", i)})
		}
		var next atomic.Int64
		var wg sync.WaitGroup
		b.StartTimer()
		start := time.Now()
		for range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					i := next.Add(1)
					if i > commands {
						return
					}
					submit(fmt.Sprintf("acc-%d", i%entities), "Deposit", map[string]any{"Amount": 1, "Note": "rent for flat 4b"})
				}
			}()
		}
		wg.Wait()
		elapsed := time.Since(start)
		b.StopTimer()
		b.ReportMetric(float64(commands)/elapsed.Seconds(), "commands/s")
		tn.stop()
	}
}
