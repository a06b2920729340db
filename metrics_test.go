package esker_test

import (
	"context"
	"fmt"
	"io/fs"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/proto"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/internal/engine"
	"github.com/esker-io/esker/projection/pgsink"
)

// marker is in every entity id and command id the metrics test sends: no
// label value may contain it.
const marker = "zqmark"

// allowedLabels are the label names esker metrics may have: each takes
// values from a set fixed by the code or the node's configuration
// (aggregate types, partitions, projection, consumer and sink names).
var allowedLabels = map[string]bool{
	"type": true, "outcome": true, "result": true, "partition": true, "projection": true,
	"consumer": true, "sink": true, "kind": true, "route": true, "reason": true,
}

var (
	metricNameRE = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)
	// timeWords in a metric's help mean it measures time: its name must
	// end in _seconds. byteWords likewise for _bytes.
	timeWords = regexp.MustCompile(`(?i)\b(duration|durations|time|latency|elapsed|how long)\b`)
	byteWords = regexp.MustCompile(`(?i)\bbytes?\b`)
	// badUnits are unit spellings Prometheus' conventions replace by base
	// units (seconds, bytes, ratios).
	badUnits = regexp.MustCompile(`_(ms|millis|milliseconds|micros|microseconds|nanos|nanoseconds|minutes|hours|kb|mb|kilobytes|megabytes|percent)(_|$)`)
)

// checkFamilies checks gathered metric families against Prometheus' naming
// conventions and esker's label rules, and returns what violates them.
// The families of the Go and process collectors and of promhttp (go_,
// process_, promhttp_) are Prometheus' own and not checked.
func checkFamilies(mfs []*dto.MetricFamily) []error {
	var errs []error
	for _, mf := range mfs {
		name, typ := mf.GetName(), mf.GetType()
		if strings.HasPrefix(name, "go_") || strings.HasPrefix(name, "process_") || strings.HasPrefix(name, "promhttp_") {
			continue
		}
		if !metricNameRE.MatchString(name) {
			errs = append(errs, fmt.Errorf("%s: not a lower-case snake_case name", name))
		}
		if !strings.HasPrefix(name, "esker_") {
			errs = append(errs, fmt.Errorf("%s: no esker_ prefix", name))
		}
		if typ == dto.MetricType_COUNTER && !strings.HasSuffix(name, "_total") {
			errs = append(errs, fmt.Errorf("%s: a counter whose name does not end in _total", name))
		}
		if typ != dto.MetricType_COUNTER && strings.HasSuffix(name, "_total") {
			errs = append(errs, fmt.Errorf("%s: a %s whose name ends in _total (reserved for counters)", name, typ))
		}
		if badUnits.MatchString(name) {
			errs = append(errs, fmt.Errorf("%s: use base units (_seconds, _bytes, _ratio)", name))
		}
		if typ != dto.MetricType_COUNTER {
			if timeWords.MatchString(mf.GetHelp()) && !strings.HasSuffix(name, "_seconds") {
				errs = append(errs, fmt.Errorf("%s: measures time (%q) but does not end in _seconds", name, mf.GetHelp()))
			}
			if byteWords.MatchString(mf.GetHelp()) && !strings.HasSuffix(name, "_bytes") {
				errs = append(errs, fmt.Errorf("%s: measures bytes (%q) but does not end in _bytes", name, mf.GetHelp()))
			}
			if strings.Contains(name, "_lag") && !strings.HasSuffix(name, "_records") && !strings.HasSuffix(name, "_seconds") {
				errs = append(errs, fmt.Errorf("%s: a lag without its unit (_records or _seconds)", name))
			}
		}
		if n := len(mf.GetMetric()); n > 200 {
			errs = append(errs, fmt.Errorf("%s: %d series: labels are not bounded", name, n))
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if !allowedLabels[l.GetName()] {
					errs = append(errs, fmt.Errorf("%s: label %q is not one of the bounded labels %v", name, l.GetName(), slices.Sorted(maps.Keys(allowedLabels))))
				}
				v := l.GetValue()
				if strings.Contains(v, marker) || strings.Contains(v, "/") || strings.HasPrefix(v, "http") {
					errs = append(errs, fmt.Errorf("%s: label %s=%q looks like an entity id, command id or URL", name, l.GetName(), v))
				}
			}
		}
	}
	return errs
}

// declaredMetrics returns the esker_ metric names declared in the
// repository's Go code (collector options' Name and prometheus.NewDesc),
// outside tests.
func declaredMetrics(t *testing.T) []string {
	t.Helper()
	decl := regexp.MustCompile(`(?:Name:\s*|NewDesc\(\s*)"(esker_[A-Za-z0-9_]*)"`)
	seen := map[string]bool{}
	err := filepath.WalkDir(".", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && p != "." && strings.HasPrefix(d.Name(), ".") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		for _, m := range decl.FindAllSubmatch(b, -1) {
			seen[string(m[1])] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return slices.Sorted(maps.Keys(seen))
}

// gatherAll gathers the families of every node, merged by name.
func gatherAll(t *testing.T, nodes ...*testNode) map[string]*dto.MetricFamily {
	t.Helper()
	out := map[string]*dto.MetricFamily{}
	for _, n := range nodes {
		mfs, err := n.Registry().Gather()
		if err != nil {
			t.Fatalf("gather: %v", err)
		}
		for _, mf := range mfs {
			if have, ok := out[mf.GetName()]; ok {
				have.Metric = append(have.Metric, mf.Metric...)
				continue
			}
			out[mf.GetName()] = proto.Clone(mf).(*dto.MetricFamily)
		}
	}
	return out
}

// TestMetricConventions starts two bank nodes (standbys, projections, a
// side-effect consumer and the PostgreSQL sink), sends commands, and
// checks every metric family they export: the esker_ prefix, counters in
// _total, time in _seconds, bytes in _bytes, bounded labels with no entity
// id, command id or URL as a value. Every metric declared in the code must
// show up, so none escapes the check; every metric the alert rules use must
// exist, so a rename breaks this test.
func TestMetricConventions(t *testing.T) {
	dsn := pgSchema(t)
	var posts atomic.Int64
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if posts.Add(1)%2 == 0 {
			w.WriteHeader(http.StatusBadRequest) // permanent: dead-lettered
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	defer hook.Close()
	parts := func() []any {
		alerts, err := bank.WithdrawalAlerts(hook.URL, 100, nil)
		if err != nil {
			t.Fatal(err)
		}
		sink, err := bank.AccountsSink(pgsink.ConnString(dsn))
		if err != nil {
			t.Fatal(err)
		}
		return []any{bank.Account, bank.Owners, bank.DailyTotals, alerts, sink}
	}
	c := newCluster(t)
	n1 := startTypesNode(t, c.ListenAddrs(), t.TempDir(), parts(), esker.StandbyReplicas(1))
	n2 := startTypesNode(t, c.ListenAddrs(), t.TempDir(), parts(), esker.StandbyReplicas(1))
	for i := range 8 {
		id := fmt.Sprintf("%s-acct-%d", marker, i)
		for j, command := range []map[string]any{
			cmd("Open", map[string]any{"owner": "o" + id}),
			cmd("Deposit", map[string]any{"amount": 5000}),
			cmd("Withdraw", map[string]any{"amount": 1000}),
		} {
			command["commandId"] = fmt.Sprintf("%s-cmd-%d-%d", marker, i, j)
			// Through both nodes: half the requests are forwarded.
			via := []*testNode{n1, n2}[(i+j)%2]
			code, body := do(t, via, "POST", "/v1/aggregates/account/"+id+"/commands", command)
			mustStatus(t, 200, code, body, "command")
		}
	}

	declared := declaredMetrics(t)
	if len(declared) < 20 {
		t.Fatalf("found only %d declared metrics (%v): is the declaration pattern still right?", len(declared), declared)
	}
	// Some families appear only after a cycle, a tick or a scrape of a
	// consumer: wait until every declared one is there.
	var families map[string]*dto.MetricFamily
	deadline := time.Now().Add(30 * time.Second)
	for {
		families = gatherAll(t, n1, n2)
		var missing []string
		for _, name := range declared {
			if families[name] == nil {
				missing = append(missing, name)
			}
		}
		if len(missing) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics declared in the code but not exported by the running nodes: %v", missing)
		}
		time.Sleep(100 * time.Millisecond)
	}
	mfs := make([]*dto.MetricFamily, 0, len(families))
	for _, mf := range families {
		mfs = append(mfs, mf)
	}
	sort.Slice(mfs, func(i, j int) bool { return mfs[i].GetName() < mfs[j].GetName() })
	for _, err := range checkFamilies(mfs) {
		t.Error(err)
	}

	// The alert rules read only metrics a node exports (or Prometheus'
	// own up).
	rf := loadRules(t, alertsPath)
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			for _, m := range alertMetrics(r.Expr) {
				if err := metricExists(families, m); err != nil {
					t.Errorf("alert %s: %v", r.Alert, err)
				}
			}
		}
	}
}

// metricExists returns nil if the series name m (a family, or a
// histogram's _bucket, _sum or _count series) is exported, or is
// Prometheus' up.
func metricExists(families map[string]*dto.MetricFamily, m string) error {
	if m == "up" || families[m] != nil {
		return nil
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(m, suffix); ok {
			if mf := families[base]; mf != nil {
				if t := mf.GetType(); t == dto.MetricType_HISTOGRAM || (t == dto.MetricType_SUMMARY && suffix != "_bucket") {
					return nil
				}
			}
		}
	}
	return fmt.Errorf("metric %s is not exported by a running node", m)
}

// TestMetricChecksFail: checkFamilies and metricExists reject families
// that break the rules.
func TestMetricChecksFail(t *testing.T) {
	fam := func(name string, typ dto.MetricType, help string, labels ...string) *dto.MetricFamily {
		m := &dto.Metric{}
		for i := 0; i+1 < len(labels); i += 2 {
			m.Label = append(m.Label, &dto.LabelPair{Name: proto.String(labels[i]), Value: proto.String(labels[i+1])})
		}
		return &dto.MetricFamily{Name: proto.String(name), Type: typ.Enum(), Help: proto.String(help), Metric: []*dto.Metric{m}}
	}
	counter, gauge, histogram := dto.MetricType_COUNTER, dto.MetricType_GAUGE, dto.MetricType_HISTOGRAM
	good := []*dto.MetricFamily{
		fam("esker_commands_total", counter, "Commands.", "type", "account", "outcome", "accepted"),
		fam("esker_restore_seconds", histogram, "Duration of restores."),
		fam("esker_command_lag_records", gauge, "Commands not processed.", "type", "account"),
		fam("go_goroutines", gauge, "Goroutines."),
	}
	if errs := checkFamilies(good); len(errs) != 0 {
		t.Fatalf("good families rejected: %v", errs)
	}
	for _, bad := range []struct {
		mf   *dto.MetricFamily
		want string
	}{
		{fam("commands_total", counter, "x"), "esker_ prefix"},
		{fam("esker_commands", counter, "x"), "does not end in _total"},
		{fam("esker_open_total", gauge, "x"), "reserved for counters"},
		{fam("esker_restore_duration", histogram, "Duration of restores."), "_seconds"},
		{fam("esker_restore_ms", histogram, "x"), "base units"},
		{fam("esker_batch_size", histogram, "Size of a batch in bytes."), "_bytes"},
		{fam("esker_sink_lag", gauge, "x"), "unit"},
		{fam("esker_commands_total", counter, "x", "entity", "a"), "bounded labels"},
		{fam("esker_commands_total", counter, "x", "type", marker+"-acct-1"), "entity id"},
		{fam("esker_forwarded_total", counter, "x", "reason", "http://node:8080"), "URL"},
	} {
		errs := checkFamilies([]*dto.MetricFamily{bad.mf})
		if len(errs) == 0 || !strings.Contains(fmt.Sprint(errs), bad.want) {
			t.Errorf("%s: errors %v, want one mentioning %q", bad.mf.GetName(), errs, bad.want)
		}
	}
	families := map[string]*dto.MetricFamily{}
	for _, mf := range good {
		families[mf.GetName()] = mf
	}
	for m, ok := range map[string]bool{
		"up": true, "esker_restore_seconds_bucket": true, "esker_restore_seconds_count": true,
		"esker_commands_total": true, "esker_command_lag_records_bucket": false, "esker_renamed_total": false,
	} {
		if err := metricExists(families, m); (err == nil) != ok {
			t.Errorf("metricExists(%s) = %v, want ok %v", m, err, ok)
		}
	}
}

// TestCommandLagMetric: esker_command_lag_records{type} counts the commands
// on the node's partitions not processed yet: it rises while a backlog is
// worked off (here one record per fetch, so many cycles) and returns to 0.
func TestCommandLagMetric(t *testing.T) {
	c := newCluster(t)
	const backlog = 1500
	// The backlog exists before the node starts, each record in its own
	// batch (a synchronous produce each).
	cl, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...), kgo.AllowAutoTopicCreation(),
		kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx := context.Background()
	adm := kadm.NewClient(cl)
	if _, err := adm.CreateTopic(ctx, 4, 1, nil, engine.CommandsTopic("account")); err != nil {
		t.Fatal(err)
	}
	id := "lag-account"
	p := aggregate.Partition(id, 4)
	if err := cl.ProduceSync(ctx, engine.CommandRecord("account", id, p, aggregate.Command{Type: "Open", Data: []byte(`{"owner":"lag"}`)})).FirstErr(); err != nil {
		t.Fatal(err)
	}
	for range backlog {
		if err := cl.ProduceSync(ctx, engine.CommandRecord("account", id, p, aggregate.Command{Type: "Deposit", Data: []byte(`{"amount":1}`)})).FirstErr(); err != nil {
			t.Fatal(err)
		}
	}
	n := startBankNode(t, c.ListenAddrs(), t.TempDir(),
		esker.CommitInterval(time.Millisecond),
		esker.KafkaOptions(kgo.FetchMaxPartitionBytes(1)))
	var peak float64
	deadline := time.Now().Add(60 * time.Second)
	for {
		lag, ok := metricValue(t, n.Node, "esker_command_lag_records", "type", "account")
		peak = max(peak, lag)
		if ok && lag == 0 && metricSum(t, n.Node, "esker_commands_total") == backlog+1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("lag %v (exported %v), %v commands processed of %d", lag, ok, metricSum(t, n.Node, "esker_commands_total"), backlog+1)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("peak lag %v", peak)
	if peak <= 0 || peak > backlog {
		t.Errorf("peak lag %v while %d commands were worked off, want between 1 and %d", peak, backlog+1, backlog)
	}
}

// TestReadinessMetrics: esker_ready follows Ready, esker_consumer_ready
// each consumer's Ready (a sink whose database is unreachable is not ready
// while the node is), and both transaction results are exported from 0.
func TestReadinessMetrics(t *testing.T) {
	sink, err := bank.AccountsSink(pgsink.ConnString("postgres://nobody@127.0.0.1:1/none?connect_timeout=1"))
	if err != nil {
		t.Fatal(err)
	}
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) }))
	defer hook.Close()
	alerts, err := bank.WithdrawalAlerts(hook.URL, 100, nil)
	if err != nil {
		t.Fatal(err)
	}

	idle, err := esker.NewNode(esker.Brokers("127.0.0.1:1"), esker.StateDir(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := metricValue(t, idle, "esker_ready"); !ok || v != 0 {
		t.Errorf("esker_ready of a node that is not running = %v (exported %v), want 0", v, ok)
	}

	c := newCluster(t)
	n := startTypesNode(t, c.ListenAddrs(), t.TempDir(), []any{bank.Account, sink, alerts})
	if v, ok := metricValue(t, n.Node, "esker_ready"); !ok || v != 1 {
		t.Errorf("esker_ready of a ready node = %v (exported %v), want 1", v, ok)
	}
	for _, result := range []string{"committed", "aborted"} {
		if _, ok := metricValue(t, n.Node, "esker_transactions_total", "result", result); !ok {
			t.Errorf("esker_transactions_total{result=%q} not exported", result)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		sinkReady, ok1 := metricValue(t, n.Node, "esker_consumer_ready", "consumer", sink.Name(), "kind", "sink")
		alertsReady, ok2 := metricValue(t, n.Node, "esker_consumer_ready", "consumer", alerts.Name(), "kind", "sideeffect")
		if !ok1 || !ok2 {
			t.Fatalf("esker_consumer_ready not exported for both consumers (sink %v, side effect %v)", ok1, ok2)
		}
		if sinkReady != 0 {
			t.Fatalf("esker_consumer_ready of a sink whose database is unreachable = %v, want 0", sinkReady)
		}
		if alertsReady == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("esker_consumer_ready of the side-effect consumer still %v: %v", alertsReady, alerts.Ready())
		}
		time.Sleep(50 * time.Millisecond)
	}
}
