package bank

import "github.com/esker-io/esker"

// AddTo registers the whole bank on a node: the account and transfer
// aggregate types, the owners and daily-totals projections, and the
// transfers reactor.
func AddTo(n *esker.Node) error {
	for _, t := range []esker.Registrable{Account, Transfer} {
		if err := n.Register(t); err != nil {
			return err
		}
	}
	for _, p := range []esker.Projection{Owners, DailyTotals} {
		if err := n.AddProjection(p); err != nil {
			return err
		}
	}
	return n.AddReactor(Transfers)
}
