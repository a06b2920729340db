package chaostest

import (
	"cmp"
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/esker-io/esker/examples/bank"
)

// Anomaly kinds: each is a broken guarantee, named the way the summary
// counts it.
const (
	// Written data.
	KindLost            = "lost"                 // acknowledged (200) but not in the events topic
	KindDuplicated      = "duplicated"           // one command id applied more than once
	KindRejectedApplied = "rejected-applied"     // answered 422 but in the events topic
	KindNotSentApplied  = "applied-after-503"    // every attempt answered 503 ("not written") but applied
	KindAckVersion      = "ack-version-mismatch" // acknowledged at another version than the one written
	KindVersionGap      = "version-gap"          // an account's versions are not 1..n in topic order
	KindPhantom         = "phantom-event"        // an event whose command id no client sent
	KindSplit           = "partition-split"      // one account's events on two partitions
	KindNegative        = "negative-balance"     // a fold or a read with a balance below zero
	// Reads.
	KindStateMismatch   = "state-mismatch"      // a node's settled answer differs from the fold of the events
	KindUnavailable     = "unavailable"         // a node gave no answer for an account within 30 s once the cluster settled
	KindImpossibleRead  = "impossible-read"     // a read returned a version/state pair no prefix of the events has
	KindStandbyMismatch = "standby-mismatch"    // a stale=true read returned a state the account never had
	KindEventsAPI       = "events-api-mismatch" // the events route lists other events than the topic holds
	KindStaleRead       = "stale-read"          // a read older than a write acknowledged before it began
	KindNonLinearizable = "non-linearizable"    // an account's history has no linearization
	KindLinTimeout      = "linearizability-timeout"
	// Projections.
	KindProjection = "projection-mismatch" // a settled owners row differs from the fold of the events
	// The processes (found by the harness, not by Check).
	KindNodeExit = "node-exit" // a node process stopped without being told to
	KindDataRace = "data-race" // the race detector reported in a node's log
	KindPanic    = "panic"     // a node's log holds a Go panic
	KindNoSettle = "no-settle" // the cluster did not become ready and idle after the faults stopped
	// KindStalledCycle: a node's transaction end waited longer than the
	// engine's bound on it (about a session timeout, 10 s at most): the
	// node held its partitions without processing them that long.
	KindStalledCycle = "stalled-cycle"
	// KindEndGivenUp: a node gave up waiting for its transaction to end
	// within the bound (a group rejoin or coordinator trouble); its outcome
	// was then unknown and its tasks restored again. Reported, not fatal:
	// the checks of the history say whether anything went wrong.
	KindEndGivenUp = "end-given-up"
)

// nonFatalKinds are reported but do not fail the run: a linearizability
// check that ran out of time has found nothing; a transaction end given up
// is the engine's bounded, safe way out of a stuck end.
var nonFatalKinds = map[string]bool{KindLinTimeout: true, KindEndGivenUp: true}

// EventRecord is one record of the account-events topic.
type EventRecord struct {
	Account   string
	Version   int64
	CommandID string
	EventID   string
	Type      string // Opened, Deposited, Withdrawn, Closed
	Amount    int64
	Owner     string
	Partition int32
	Offset    int64
}

// event returns the bank event the record holds.
func (e EventRecord) event() bank.Event {
	switch e.Type {
	case "Opened":
		return bank.Opened{Owner: e.Owner}
	case "Deposited":
		return bank.Deposited{Amount: e.Amount}
	case "Withdrawn":
		return bank.Withdrawn{Amount: e.Amount}
	case "Closed":
		return bank.Closed{}
	}
	return nil
}

// NodeRead is one read of an account from one node after the cluster
// settled: the "every node answers the fold of the events" check.
type NodeRead struct {
	Node    int
	Account string
	// Stale marks a ?stale=true read, which a standby copy may answer.
	Stale   bool
	Status  int // 0: no HTTP answer (Err says why)
	Err     string
	Version int64
	State   bank.AccountState
	Standby bool
}

// CheckInput is everything the checker looks at. It is plain data, so the
// unit tests can hand-make it.
type CheckInput struct {
	History []Op
	// Events is the events topic read with read_committed, in offset
	// order within each partition.
	Events     []EventRecord
	FinalReads []NodeRead
	// EventsAPI is, per account, the events a node's events route lists
	// (nil: not checked).
	EventsAPI map[string][]EventRecord
	// ResolveUnknown replaces each command of unknown outcome by what the
	// events topic says happened to it before the linearizability check:
	// applied at version v (acknowledged at v, at an unknown time after
	// its invocation) or never applied (left out). The events topic is
	// read after the cluster settled and consumed every command, so this
	// is exact, and stronger than modelling the command as "maybe": a
	// read that shows a write which never committed cannot be explained
	// by an unknown command that did not happen.
	ResolveUnknown bool
	// LinearizabilityTimeout bounds the check of one account (0: none).
	LinearizabilityTimeout time.Duration
	// Owners is the owners projection as a node lists it after the
	// cluster settled, without rows left empty (nil: not checked).
	Owners map[string]bank.OwnerTotals
	// OwnerKeys maps an owner's name to the key its row is listed under
	// (a pseudonym); nil: the name itself.
	OwnerKeys map[string]string
	// VisualizeDir receives porcupine's HTML rendering of every account
	// that is not linearizable ("" writes none).
	VisualizeDir string
}

// Anomaly is one broken guarantee, with the evidence a person needs.
type Anomaly struct {
	Kind      string `json:"kind"`
	Account   string `json:"account,omitempty"`
	CommandID string `json:"commandId,omitempty"`
	Detail    string `json:"detail"`
}

func (a Anomaly) String() string {
	var b strings.Builder
	b.WriteString(a.Kind)
	if a.Account != "" {
		b.WriteString(" " + a.Account)
	}
	if a.CommandID != "" {
		b.WriteString(" [" + a.CommandID + "]")
	}
	b.WriteString(": " + a.Detail)
	return b.String()
}

// CheckResult is what Check found.
type CheckResult struct {
	Anomalies []Anomaly
	// Linearizability is porcupine's verdict per account.
	Linearizability map[string]porcupine.CheckResult
	// Visualizations maps a non-linearizable account to its HTML file.
	Visualizations map[string]string
	// Applied is the number of distinct commands in the events topic;
	// UnknownApplied and UnknownNotApplied split the unknown commands.
	Applied, UnknownApplied, UnknownNotApplied int
	Events                                     int
}

// Count returns the number of anomalies of a kind.
func (r CheckResult) Count(kind string) int {
	n := 0
	for _, a := range r.Anomalies {
		if a.Kind == kind {
			n++
		}
	}
	return n
}

// ByKind counts the anomalies per kind.
func (r CheckResult) ByKind() map[string]int {
	m := map[string]int{}
	for _, a := range r.Anomalies {
		m[a.Kind]++
	}
	return m
}

// Fatal reports whether any anomaly fails the run.
func (r CheckResult) Fatal() bool {
	for _, a := range r.Anomalies {
		if !nonFatalKinds[a.Kind] {
			return true
		}
	}
	return false
}

// application is one application of a command: where its event is.
type application struct {
	account   string
	version   int64
	offset    int64
	partition int32
}

// accountTruth is what the events topic says about one account.
type accountTruth struct {
	events []EventRecord // topic order
	// prefix[v] is the state after the first v events (prefix[0] absent).
	prefix []bank.AccountState
}

// Check checks a history against the events topic and the nodes' settled
// answers. It never stops at the first anomaly: a run's figures count them
// all.
func Check(in CheckInput) CheckResult {
	res := CheckResult{
		Linearizability: map[string]porcupine.CheckResult{},
		Visualizations:  map[string]string{},
		Events:          len(in.Events),
	}
	add := func(kind, account, commandID, format string, args ...any) {
		res.Anomalies = append(res.Anomalies, Anomaly{Kind: kind, Account: account, CommandID: commandID, Detail: fmt.Sprintf(format, args...)})
	}

	// The events topic, per account.
	truth := map[string]*accountTruth{}
	for _, e := range in.Events {
		t := truth[e.Account]
		if t == nil {
			t = &accountTruth{}
			truth[e.Account] = t
		}
		if len(t.events) > 0 && t.events[0].Partition != e.Partition {
			add(KindSplit, e.Account, e.CommandID, "events on partitions %d and %d", t.events[0].Partition, e.Partition)
		}
		t.events = append(t.events, e)
	}
	for _, acc := range sortedKeys(truth) {
		t := truth[acc]
		for i, e := range t.events {
			if e.Version != int64(i+1) {
				add(KindVersionGap, acc, e.CommandID, "event %d of the topic (partition %d offset %d) has version %d, want %d; versions: %s",
					i+1, e.Partition, e.Offset, e.Version, i+1, versionList(t.events))
				break
			}
		}
		// The fold, in topic order: what each version's state is.
		t.prefix = make([]bank.AccountState, 0, len(t.events)+1)
		var s bank.AccountState
		t.prefix = append(t.prefix, s)
		negative := false
		for _, e := range t.events {
			ev := e.event()
			if ev == nil {
				add(KindPhantom, acc, e.CommandID, "event type %q at version %d is not a bank event", e.Type, e.Version)
			} else {
				s = bank.Evolve(s, ev)
			}
			if s.Balance < 0 && !negative {
				negative = true
				add(KindNegative, acc, e.CommandID, "balance %d after version %d (%s)", s.Balance, e.Version, e.Type)
			}
			t.prefix = append(t.prefix, s)
		}
	}

	// The owners projection equals the group-by of the final states.
	if in.Owners != nil {
		want := map[string]bank.OwnerTotals{}
		for _, acc := range sortedKeys(truth) {
			s := truth[acc].prefix[len(truth[acc].prefix)-1]
			if s.Open {
				key := s.Owner
				if in.OwnerKeys != nil {
					key = in.OwnerKeys[s.Owner]
				}
				o := want[key]
				o.Accounts++
				o.Balance += s.Balance
				want[key] = o
			}
		}
		keys := sortedKeys(want)
		for k := range in.Owners {
			if _, ok := want[k]; !ok {
				keys = append(keys, k)
			}
		}
		for _, k := range keys {
			if got := in.Owners[k]; got != want[k] {
				add(KindProjection, "", "", "owners row %q is %+v; the fold of the events gives %+v", k, got, want[k])
			}
		}
	}

	// Applications per command id. Every bank command writes exactly one
	// event, so each event is one application (a generic domain, whose
	// commands write several events, would need the acknowledged event
	// count to tell a second application from a command's second event).
	apps := map[string][]application{}
	for _, acc := range sortedKeys(truth) {
		for _, e := range truth[acc].events {
			apps[e.CommandID] = append(apps[e.CommandID], application{account: acc, version: e.Version, offset: e.Offset, partition: e.Partition})
		}
	}
	res.Applied = len(apps)
	issued := map[string]Op{}
	for _, op := range in.History {
		if op.Kind.isCommand() {
			issued[op.CommandID] = op
		}
	}
	for _, id := range sortedKeys(apps) {
		list := apps[id]
		if _, ok := issued[id]; !ok {
			add(KindPhantom, list[0].account, id, "applied at version %d but no client sent this command id", list[0].version)
		}
		if len(list) > 1 {
			var where []string
			for _, a := range list {
				where = append(where, fmt.Sprintf("%s v%d (partition %d offset %d)", a.account, a.version, a.partition, a.offset))
			}
			add(KindDuplicated, list[0].account, id, "applied %d times: %s", len(list), strings.Join(where, ", "))
		}
	}
	for _, op := range in.History {
		if !op.Kind.isCommand() {
			continue
		}
		list := apps[op.CommandID]
		switch op.Outcome {
		case OutcomeOK:
			switch {
			case len(list) == 0:
				add(KindLost, op.Account, op.CommandID, "%s acknowledged at version %d (client %d, %s) is not in the events topic",
					describeCall(op), op.Version, op.Client, span(op))
			case list[0].account != op.Account || list[0].version != op.Version:
				add(KindAckVersion, op.Account, op.CommandID, "%s acknowledged at %s v%d, written at %s v%d",
					describeCall(op), op.Account, op.Version, list[0].account, list[0].version)
			}
		case OutcomeRejected:
			if len(list) > 0 {
				add(KindRejectedApplied, op.Account, op.CommandID, "%s answered 422 (%s) but written at version %d",
					describeCall(op), span(op), list[0].version)
			}
		case OutcomeNotSent:
			if len(list) > 0 {
				add(KindNotSentApplied, op.Account, op.CommandID, "%s: all %d attempts answered 503 (not written) but written at version %d",
					describeCall(op), op.Attempts, list[0].version)
			}
		case OutcomeUnknown:
			if len(list) > 0 {
				res.UnknownApplied++
			} else {
				res.UnknownNotApplied++
			}
		}
	}

	// Reads during the run: every state a read returns must be one the
	// account had, and never one with a negative balance.
	for _, op := range in.History {
		if !op.Kind.isRead() || op.Outcome != OutcomeOK {
			continue
		}
		if op.State.Balance < 0 {
			add(KindNegative, op.Account, "", "read %d returned balance %d at version %d (node %d, %s)", op.ID, op.State.Balance, op.Version, op.Node, op.ServedBy)
		}
		if !stateAt(truth[op.Account], op.Version, op.State) {
			kind := KindImpossibleRead
			if op.Kind == OpGetStale {
				kind = KindStandbyMismatch
			}
			add(kind, op.Account, "", "read %d (client %d, node %d, served by %s, standby %t, %s) returned v%d %s; the events say %s",
				op.ID, op.Client, op.Node, op.ServedBy, op.Standby, span(op), op.Version, describeAccount(op.State), describeTruth(truth[op.Account], op.Version))
		}
	}

	// The settled answers.
	for _, r := range in.FinalReads {
		t := truth[r.Account]
		n := int64(0)
		if t != nil {
			n = int64(len(t.events))
		}
		switch {
		case r.Stale:
			if r.Status == 200 && (r.Version > n || !stateAt(t, r.Version, r.State)) {
				add(KindStandbyMismatch, r.Account, "", "node %d (stale=true, standby %t) answers v%d %s; the events say %s",
					r.Node, r.Standby, r.Version, describeAccount(r.State), describeTruth(t, r.Version))
			}
		case r.Status == 404 && n == 0:
		case r.Status == 200 && r.Version == n && stateAt(t, n, r.State):
		case r.Status == 200:
			add(KindStateMismatch, r.Account, "", "node %d answers v%d %s; the events topic has v%d %s",
				r.Node, r.Version, describeAccount(r.State), n, describeTruth(t, n))
		default:
			add(KindUnavailable, r.Account, "", "node %d answers status %d %s; the events topic has v%d", r.Node, r.Status, r.Err, n)
		}
	}
	for _, acc := range sortedKeys(in.EventsAPI) {
		got := in.EventsAPI[acc]
		var want []EventRecord
		if t := truth[acc]; t != nil {
			want = t.events
		}
		if d := diffEvents(want, got); d != "" {
			add(KindEventsAPI, acc, "", "%s", d)
		}
	}

	// Stale reads: a read that began after a write was acknowledged to
	// some client must see at least that write's version.
	byAccount := map[string][]Op{}
	for _, op := range in.History {
		byAccount[op.Account] = append(byAccount[op.Account], op)
	}
	for _, acc := range sortedKeys(byAccount) {
		ops := byAccount[acc]
		var acks []Op
		for _, op := range ops {
			if op.Kind.isCommand() && op.Outcome == OutcomeOK {
				acks = append(acks, op)
			}
		}
		slices.SortFunc(acks, func(a, b Op) int { return cmp.Compare(a.End, b.End) })
		// newest[i] is the acknowledgement with the highest version among
		// acks[:i+1].
		newest := make([]int, len(acks))
		for i := range acks {
			newest[i] = i
			if i > 0 && acks[newest[i-1]].Version >= acks[i].Version {
				newest[i] = newest[i-1]
			}
		}
		for _, op := range ops {
			if op.Kind != OpGet || (op.Outcome != OutcomeOK && op.Outcome != OutcomeNotFound) {
				continue
			}
			// The acknowledgements that ended before the read began.
			n, _ := slices.BinarySearchFunc(acks, op.Start, func(a Op, start int64) int {
				if a.End < start {
					return -1
				}
				return 1
			})
			if n == 0 {
				continue
			}
			w := acks[newest[n-1]]
			if w.Version > op.Version {
				add(KindStaleRead, acc, w.CommandID, "read %d (client %d, node %d, served by %s, %s) returned v%d; v%d (%s by client %d) was acknowledged %s before the read began",
					op.ID, op.Client, op.Node, op.ServedBy, span(op), op.Version, w.Version, describeCall(w), w.Client,
					time.Duration(op.Start-w.End).Round(time.Millisecond))
			}
		}
	}

	// Linearizability, per account.
	type verdict struct {
		account string
		result  porcupine.CheckResult
		info    porcupine.LinearizationInfo
		ops     []porcupine.Operation
	}
	accounts := sortedKeys(byAccount)
	verdicts := make([]verdict, len(accounts))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 2)
	for i, acc := range accounts {
		ops := porcupineOps(byAccount[acc], apps, in.ResolveUnknown)
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			r, info := porcupine.CheckOperationsVerbose(accountModel, ops, in.LinearizabilityTimeout)
			verdicts[i] = verdict{account: acc, result: r, info: info, ops: ops}
		}()
	}
	wg.Wait()
	for _, v := range verdicts {
		res.Linearizability[v.account] = v.result
		switch v.result {
		case porcupine.Illegal:
			detail := fmt.Sprintf("%d operations; %s", len(v.ops), illegalExcerpt(v.ops, v.info))
			if in.VisualizeDir != "" {
				path := filepath.Join(in.VisualizeDir, "linearizability-"+v.account+".html")
				if err := porcupine.VisualizePath(accountModel, v.info, path); err != nil {
					detail += fmt.Sprintf("; visualization failed: %v", err)
				} else {
					res.Visualizations[v.account] = path
					detail += "; visualization: " + path
				}
			}
			add(KindNonLinearizable, v.account, "", "%s", detail)
		case porcupine.Unknown:
			add(KindLinTimeout, v.account, "", "%d operations not decided within %s", len(v.ops), in.LinearizabilityTimeout)
		}
	}
	return res
}

// porcupineOps turns one account's operations into porcupine's form.
// Commands of unknown outcome get a return time after every other
// operation: they may have taken effect at any point after they were
// invoked. With resolve, the events topic decides them instead (see
// CheckInput.ResolveUnknown). Reads that failed carry no information and
// stale=true reads may legitimately be old, so both are left out.
func porcupineOps(ops []Op, apps map[string][]application, resolve bool) []porcupine.Operation {
	const never = math.MaxInt64
	var out []porcupine.Operation
	for _, op := range ops {
		in := modelInput{Kind: op.Kind, Account: op.Account, Amount: op.Amount, CommandID: op.CommandID}
		o := modelOutput{Outcome: op.Outcome, Version: op.Version, State: op.State}
		ret := op.End
		switch {
		case op.Kind == OpGet:
			if op.Outcome != OutcomeOK && op.Outcome != OutcomeNotFound {
				continue
			}
		case op.Kind.isCommand():
			if op.Outcome == OutcomeUnknown || op.Outcome == OutcomeNotSent {
				ret = never
				if resolve {
					list := apps[op.CommandID]
					if len(list) == 0 {
						continue // never applied: no effect to place
					}
					o = modelOutput{Outcome: OutcomeOK, Version: list[0].version}
				}
			}
		default:
			continue
		}
		out = append(out, porcupine.Operation{ClientId: op.Client, Input: in, Output: o, Call: op.Start, Return: ret, Metadata: opMetadata(op)})
	}
	return out
}

func opMetadata(op Op) string {
	return fmt.Sprintf("op %d, node %d, served by %s, %d attempts, last %s", op.ID, op.Node, op.ServedBy, op.Attempts, op.Last)
}

// illegalExcerpt names the operation porcupine could not place: the
// earliest-invoked one outside its longest partial linearization, with the
// operations that overlap it.
func illegalExcerpt(ops []porcupine.Operation, info porcupine.LinearizationInfo) string {
	parts := info.PartialLinearizations()
	if len(parts) == 0 || len(parts[0]) == 0 {
		return "no partial linearization"
	}
	longest := parts[0][0]
	for _, p := range parts[0] {
		if len(p) > len(longest) {
			longest = p
		}
	}
	in := map[int]bool{}
	for _, i := range longest {
		in[i] = true
	}
	culprit := -1
	for i, op := range ops {
		if !in[i] && (culprit < 0 || op.Call < ops[culprit].Call) {
			culprit = i
		}
	}
	if culprit < 0 {
		return fmt.Sprintf("longest partial linearization has %d of %d operations", len(longest), len(ops))
	}
	c := ops[culprit]
	var b strings.Builder
	fmt.Fprintf(&b, "longest partial linearization has %d of %d operations; first operation outside it: %s (%s, %s)",
		len(longest), len(ops), accountModel.DescribeOperation(c.Input, c.Output), c.Metadata, spanNs(c.Call, c.Return))
	// The state just before the culprit, following the partial
	// linearization.
	s := accountModel.Init()
	for _, i := range longest {
		if ops[i].Call > c.Call && ops[i].Return != math.MaxInt64 {
			break
		}
		_, s = accountModel.Step(s, ops[i].Input, ops[i].Output)
	}
	fmt.Fprintf(&b, "; model state then: %s; overlapping:", accountModel.DescribeState(s))
	n := 0
	for i, op := range ops {
		if i == culprit || op.Return < c.Call-int64(time.Second) || op.Call > c.Return {
			continue
		}
		if n == 8 {
			b.WriteString(" …")
			break
		}
		fmt.Fprintf(&b, " [%s (%s, %s)]", accountModel.DescribeOperation(op.Input, op.Output), op.Metadata, spanNs(op.Call, op.Return))
		n++
	}
	return b.String()
}

// stateAt reports whether the account's events say it was in state s at
// version v.
func stateAt(t *accountTruth, v int64, s bank.AccountState) bool {
	if t == nil {
		return v == 0 && s == bank.AccountState{}
	}
	if v < 0 || v >= int64(len(t.prefix)) {
		return false
	}
	return t.prefix[v] == s
}

func describeTruth(t *accountTruth, v int64) string {
	if t == nil {
		return "no events"
	}
	if v < 0 || v >= int64(len(t.prefix)) {
		return fmt.Sprintf("only %d events", len(t.events))
	}
	return fmt.Sprintf("v%d is %s", v, describeAccount(t.prefix[v]))
}

// diffEvents compares the events route's list with the topic's.
func diffEvents(want, got []EventRecord) string {
	for i := 0; i < max(len(want), len(got)); i++ {
		switch {
		case i >= len(want):
			return fmt.Sprintf("the events route lists %d events, the topic has %d (extra v%d %s)", len(got), len(want), got[i].Version, got[i].Type)
		case i >= len(got):
			return fmt.Sprintf("the events route lists %d events, the topic has %d (missing v%d %s)", len(got), len(want), want[i].Version, want[i].Type)
		}
		w, g := want[i], got[i]
		if w.Version != g.Version || w.Type != g.Type || w.CommandID != g.CommandID || w.EventID != g.EventID || w.Amount != g.Amount {
			return fmt.Sprintf("event %d: route says v%d %s %d [%s] %s, topic says v%d %s %d [%s] %s",
				i+1, g.Version, g.Type, g.Amount, g.CommandID, g.EventID, w.Version, w.Type, w.Amount, w.CommandID, w.EventID)
		}
	}
	return ""
}

func versionList(evs []EventRecord) string {
	var b strings.Builder
	for i, e := range evs {
		if i == 40 {
			fmt.Fprintf(&b, " … (%d in all)", len(evs))
			break
		}
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprint(&b, e.Version)
	}
	return b.String()
}

func describeCall(op Op) string {
	switch op.Kind {
	case OpOpen:
		return "open"
	case OpDeposit, OpWithdraw:
		return fmt.Sprintf("%s(%d)", op.Kind, op.Amount)
	}
	return string(op.Kind)
}

func span(op Op) string { return spanNs(op.Start, op.End) }

func spanNs(start, end int64) string {
	if end == math.MaxInt64 {
		return fmt.Sprintf("%.3fs–∞", float64(start)/1e9)
	}
	return fmt.Sprintf("%.3fs–%.3fs", float64(start)/1e9, float64(end)/1e9)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
