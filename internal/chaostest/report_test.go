package chaostest

import (
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/anishathalye/porcupine"
)

// Summary is a run's figures: printed at the end, and appended as one JSON
// line to ESKER_CHAOS_REPORT so runs can be compared.
type Summary struct {
	Seed           uint64   `json:"seed"`
	Duration       string   `json:"duration"`
	Race           bool     `json:"race"`
	FaultKinds     []string `json:"faultKinds"`
	Clients        int      `json:"clients"`
	Accounts       int      `json:"accounts"`
	Partitions     int      `json:"partitions"`
	SessionTimeout string   `json:"sessionTimeout"`
	RunDir         string   `json:"runDir"`
	// Tree is the commit the nodes were built from.
	Tree string `json:"tree"`

	Ops struct {
		Invoked    int64 `json:"invoked"`
		OK         int64 `json:"ok"`
		Rejected   int64 `json:"rejected"`
		Unknown    int64 `json:"unknown"`
		NotSent    int64 `json:"notSent"`
		Reads      int64 `json:"reads"`
		ReadsOK    int64 `json:"readsOk"`
		ReadsFail  int64 `json:"readsFailed"`
		Attempts   int64 `json:"httpAttempts"`
		Unexpected int64 `json:"unexpectedStatuses"`
		// UnknownApplied and UnknownNotApplied split the unknown
		// commands by what the events topic says.
		UnknownApplied    int `json:"unknownApplied"`
		UnknownNotApplied int `json:"unknownNotApplied"`
		Events            int `json:"events"`
	} `json:"ops"`

	Faults struct {
		Kills            int64          `json:"kills"`
		KillWipes        int64          `json:"killsWithWipedState"`
		Restarts         int64          `json:"restarts"`
		UnexpectedExits  int64          `json:"unexpectedExits"`
		Pauses           int64          `json:"pauses"`
		LeaderMoves      int64          `json:"leaderMoves"`
		BrokerBounces    int64          `json:"brokerBounces"`
		CoordinatorMoves int64          `json:"coordinatorMoves"`
		Joins            int64          `json:"joins"`
		Leaves           int64          `json:"leaves"`
		BrokerFaults     map[string]int `json:"brokerFaults"`
		BrokerFaultHits  map[string]int `json:"brokerFaultHits"`
	} `json:"faults"`

	Anomalies map[string]int `json:"anomalies"`
	// Linearizability counts accounts per porcupine verdict.
	Linearizability map[string]int `json:"linearizability"`
	Passed          bool           `json:"passed"`
	Error           string         `json:"error,omitempty"`
}

func (s *Summary) fill(w *workload, fs *faultStats, r *CheckResult) {
	s.Ops.Invoked = w.stats.Invoked.Load()
	s.Ops.OK = w.stats.OK.Load()
	s.Ops.Rejected = w.stats.Rejected.Load()
	s.Ops.Unknown = w.stats.Unknown.Load()
	s.Ops.NotSent = w.stats.NotSent.Load()
	s.Ops.Reads = w.stats.Reads.Load()
	s.Ops.ReadsOK = w.stats.ReadsOK.Load()
	s.Ops.ReadsFail = w.stats.ReadsFailed.Load()
	s.Ops.Attempts = w.stats.Attempts.Load()
	s.Ops.Unexpected = w.stats.Unexpected.Load()
	s.Faults.Kills = fs.Kills.Load()
	s.Faults.KillWipes = fs.KillWipes.Load()
	s.Faults.Restarts = fs.Restarts.Load()
	s.Faults.UnexpectedExits = fs.UnexpectedExits.Load()
	s.Faults.Pauses = fs.Pauses.Load()
	s.Faults.LeaderMoves = fs.LeaderMoves.Load()
	s.Faults.BrokerBounces = fs.BrokerBounces.Load()
	s.Faults.CoordinatorMoves = fs.CoordinatorMoves.Load()
	s.Faults.Joins = fs.Joins.Load()
	s.Faults.Leaves = fs.Leaves.Load()
	fs.mu.Lock()
	s.Faults.BrokerFaults = clone(fs.BrokerFaults)
	s.Faults.BrokerFaultHits = clone(fs.BrokerFaultHits)
	fs.mu.Unlock()
	if r != nil {
		s.Ops.UnknownApplied, s.Ops.UnknownNotApplied, s.Ops.Events = r.UnknownApplied, r.UnknownNotApplied, r.Events
		for k, n := range r.ByKind() {
			s.Anomalies[k] += n
		}
		for _, v := range r.Linearizability {
			s.Linearizability[string(v)]++
		}
	}
}

func clone(m map[string]int) map[string]int {
	out := make(map[string]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// text renders the summary for a person.
func (s *Summary) text() string {
	var b strings.Builder
	verdict := "PASSED"
	if !s.Passed {
		verdict = "FAILED"
	}
	fmt.Fprintf(&b, "chaos run %s: seed %d, %s of faults, race %t, %d clients, %d accounts, %d partitions, session timeout %s\n",
		verdict, s.Seed, s.Duration, s.Race, s.Clients, s.Accounts, s.Partitions, s.SessionTimeout)
	fmt.Fprintf(&b, "  code: %s; fault kinds: %s\n", s.Tree, strings.Join(s.FaultKinds, ", "))
	fmt.Fprintf(&b, "  commands: %d invoked, %d ok, %d rejected, %d unknown (%d applied, %d not), %d not sent (all 503)\n",
		s.Ops.Invoked, s.Ops.OK, s.Ops.Rejected, s.Ops.Unknown, s.Ops.UnknownApplied, s.Ops.UnknownNotApplied, s.Ops.NotSent)
	fmt.Fprintf(&b, "  reads: %d, %d answered, %d failed; %d HTTP attempts in all, %d unexpected statuses; %d events written\n",
		s.Ops.Reads, s.Ops.ReadsOK, s.Ops.ReadsFail, s.Ops.Attempts, s.Ops.Unexpected, s.Ops.Events)
	fmt.Fprintf(&b, "  nodes: %d kills (%d with the state wiped), %d restarts, %d pauses, %d unexpected exits, 4th node %d joins / %d leaves\n",
		s.Faults.Kills, s.Faults.KillWipes, s.Faults.Restarts, s.Faults.Pauses, s.Faults.UnexpectedExits, s.Faults.Joins, s.Faults.Leaves)
	fmt.Fprintf(&b, "  brokers: %d leader moves, %d broker bounces, %d coordinator moves\n",
		s.Faults.LeaderMoves, s.Faults.BrokerBounces, s.Faults.CoordinatorMoves)
	if len(s.Faults.BrokerFaults) > 0 {
		b.WriteString("  broker faults (installed × requests answered):")
		for _, k := range sortedKeys(s.Faults.BrokerFaults) {
			fmt.Fprintf(&b, " %s %d×%d;", k, s.Faults.BrokerFaults[k], s.Faults.BrokerFaultHits[k])
		}
		b.WriteString("\n")
	}
	fmt.Fprintf(&b, "  linearizability: %s\n", describeCounts(s.Linearizability, []string{string(porcupine.Ok), string(porcupine.Illegal), string(porcupine.Unknown)}))
	kinds := []string{KindLost, KindDuplicated, KindNonLinearizable, KindStaleRead, KindNegative, KindStateMismatch}
	for k := range s.Anomalies {
		if !slices.Contains(kinds, k) {
			kinds = append(kinds, k)
		}
	}
	slices.Sort(kinds[6:])
	fmt.Fprintf(&b, "  anomalies: %s\n", describeCounts(s.Anomalies, kinds))
	if s.Error != "" {
		fmt.Fprintf(&b, "  error: %s\n", s.Error)
	}
	fmt.Fprintf(&b, "  run directory: %s", s.RunDir)
	return b.String()
}

func describeCounts(m map[string]int, order []string) string {
	var parts []string
	for _, k := range order {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}

// appendJSON appends the summary as one JSON line to path.
func (s *Summary) appendJSON(path string) error {
	raw, err := json.Marshal(s)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(append(raw, '\n')); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
