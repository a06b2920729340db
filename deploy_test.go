package esker_test

import (
	"bytes"
	"fmt"
	"net"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/prometheus/common/model"
	"go.yaml.in/yaml/v3"
)

// The files the deployment tests read, relative to the repository root.
const (
	composePath = "docker-compose.yml"
	alertsPath  = "deploy/prometheus/alerts.yml"
)

// composeFile is the part of a Compose file the tests read.
type composeFile struct {
	Services map[string]composeService `yaml:"services"`
	Volumes  map[string]any            `yaml:"volumes"`
}

type composeService struct {
	Image       string            `yaml:"image"`
	Hostname    string            `yaml:"hostname"`
	Command     []string          `yaml:"command"`
	Environment map[string]string `yaml:"environment"`
	Ports       []string          `yaml:"ports"`
	Volumes     []string          `yaml:"volumes"`
	DependsOn   any               `yaml:"depends_on"`
	Healthcheck *struct {
		Test []string `yaml:"test"`
	} `yaml:"healthcheck"`
}

// prometheusConfig is the part of a Prometheus configuration the tests read.
type prometheusConfig struct {
	RuleFiles     []string `yaml:"rule_files"`
	ScrapeConfigs []struct {
		JobName       string `yaml:"job_name"`
		MetricsPath   string `yaml:"metrics_path"`
		StaticConfigs []struct {
			Targets []string `yaml:"targets"`
		} `yaml:"static_configs"`
	} `yaml:"scrape_configs"`
}

// ruleFile is a Prometheus rule file; decoded with KnownFields, so a
// misspelt key is an error, as it is for Prometheus.
type ruleFile struct {
	Groups []struct {
		Name     string `yaml:"name"`
		Interval string `yaml:"interval"`
		Rules    []struct {
			Alert       string            `yaml:"alert"`
			Record      string            `yaml:"record"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

// broker is a Kafka broker service of the Compose file.
type broker struct {
	service  string
	nodeID   string
	internal string // host:port of the inter-broker listener as advertised
	voters   []string
}

// bankNode is an esker node service of the Compose file.
type bankNode struct {
	service   string
	brokers   []string
	advertise string
	listen    string // --http
	data      string
	standbys  string
	ports     []string
	volumes   []string
}

func readYAML(t *testing.T, file string, v any, strict bool) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(strict)
	if err := dec.Decode(v); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
}

// flagValue returns the value of a Go flag (-name or --name, "value" as the
// next argument or after '='), and whether it is given.
func flagValue(args []string, name string) (string, bool) {
	for i, a := range args {
		for _, p := range []string{"-" + name, "--" + name} {
			if a == p && i+1 < len(args) {
				return args[i+1], true
			}
			if v, ok := strings.CutPrefix(a, p+"="); ok {
				return v, true
			}
		}
	}
	return "", false
}

// splitList splits a comma-separated list, dropping spaces and empty items.
func splitList(s string) []string {
	var out []string
	for _, x := range strings.Split(s, ",") {
		if x = strings.TrimSpace(x); x != "" {
			out = append(out, x)
		}
	}
	return out
}

func sorted(xs []string) []string {
	out := slices.Clone(xs)
	sort.Strings(out)
	return out
}

// listenerAddr returns the host:port of the named listener in a Kafka
// listeners list ("NAME://host:port,...").
func listenerAddr(list, name string) (string, bool) {
	for _, l := range splitList(list) {
		if rest, ok := strings.CutPrefix(l, name+"://"); ok {
			return rest, true
		}
	}
	return "", false
}

// deployment is the Compose file's services sorted into brokers, nodes and
// Prometheus, with the checks of their relations as errors.
type deployment struct {
	compose    composeFile
	brokers    []broker
	nodes      []bankNode
	prometheus *composeService
}

func loadDeployment(t *testing.T, file string) deployment {
	t.Helper()
	var d deployment
	readYAML(t, file, &d.compose, false)
	names := make([]string, 0, len(d.compose.Services))
	for name := range d.compose.Services {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		s := d.compose.Services[name]
		switch {
		case strings.HasPrefix(s.Image, "apache/kafka"):
			env := s.Environment
			b := broker{service: name, nodeID: env["KAFKA_NODE_ID"], voters: splitList(env["KAFKA_CONTROLLER_QUORUM_VOTERS"])}
			b.internal, _ = listenerAddr(env["KAFKA_ADVERTISED_LISTENERS"], env["KAFKA_INTER_BROKER_LISTENER_NAME"])
			d.brokers = append(d.brokers, b)
		case len(s.Command) > 0 && s.Command[0] == "node":
			n := bankNode{service: name, ports: s.Ports, volumes: s.Volumes}
			bs, _ := flagValue(s.Command, "brokers")
			n.brokers = splitList(bs)
			n.advertise, _ = flagValue(s.Command, "advertise")
			n.listen, _ = flagValue(s.Command, "http")
			n.data, _ = flagValue(s.Command, "data")
			n.standbys, _ = flagValue(s.Command, "standby-replicas")
			d.nodes = append(d.nodes, n)
		case strings.HasPrefix(s.Image, "prom/prometheus"):
			d.prometheus = &s
		}
	}
	return d
}

// checkBrokers: three brokers, distinct node ids, the same cluster id, and
// on every broker the quorum voters are exactly the brokers' controller
// listeners.
func (d deployment) checkBrokers() []error {
	var errs []error
	if len(d.brokers) != 3 {
		errs = append(errs, fmt.Errorf("%d Kafka brokers, want 3", len(d.brokers)))
	}
	ids := map[string]string{}
	var want []string
	clusterIDs := map[string]bool{}
	for _, b := range d.brokers {
		s := d.compose.Services[b.service]
		env := s.Environment
		if b.nodeID == "" {
			errs = append(errs, fmt.Errorf("broker %s has no KAFKA_NODE_ID", b.service))
		} else if other, dup := ids[b.nodeID]; dup {
			errs = append(errs, fmt.Errorf("brokers %s and %s have the same node id %s", other, b.service, b.nodeID))
		}
		ids[b.nodeID] = b.service
		clusterIDs[env["CLUSTER_ID"]] = true
		roles := splitList(env["KAFKA_PROCESS_ROLES"])
		if !slices.Contains(roles, "broker") || !slices.Contains(roles, "controller") {
			errs = append(errs, fmt.Errorf("broker %s: KAFKA_PROCESS_ROLES %q, want broker,controller", b.service, env["KAFKA_PROCESS_ROLES"]))
		}
		ctl, ok := listenerAddr(env["KAFKA_LISTENERS"], env["KAFKA_CONTROLLER_LISTENER_NAMES"])
		_, port, err := net.SplitHostPort(ctl)
		if !ok || err != nil {
			errs = append(errs, fmt.Errorf("broker %s: no controller listener %q in KAFKA_LISTENERS %q", b.service, env["KAFKA_CONTROLLER_LISTENER_NAMES"], env["KAFKA_LISTENERS"]))
		}
		want = append(want, b.nodeID+"@"+net.JoinHostPort(b.service, port))
		host, _, err := net.SplitHostPort(b.internal)
		if err != nil || host != b.service {
			errs = append(errs, fmt.Errorf("broker %s advertises its inter-broker listener as %q, want %s:<port>", b.service, b.internal, b.service))
		}
		for k, v := range map[string]string{
			"KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR":         "3",
			"KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "3",
			"KAFKA_TRANSACTION_STATE_LOG_MIN_ISR":            "2",
			"KAFKA_DEFAULT_REPLICATION_FACTOR":               "3",
			"KAFKA_MIN_INSYNC_REPLICAS":                      "2",
		} {
			if env[k] != v {
				errs = append(errs, fmt.Errorf("broker %s: %s = %q, want %s", b.service, k, env[k], v))
			}
		}
		if s.Healthcheck == nil || len(s.Healthcheck.Test) == 0 {
			errs = append(errs, fmt.Errorf("broker %s has no healthcheck", b.service))
		}
	}
	if len(clusterIDs) != 1 || clusterIDs[""] {
		errs = append(errs, fmt.Errorf("the brokers' CLUSTER_IDs differ or are empty: %v", clusterIDs))
	}
	for _, b := range d.brokers {
		if got := sorted(b.voters); !slices.Equal(got, sorted(want)) {
			errs = append(errs, fmt.Errorf("broker %s: quorum voters %v, want %v", b.service, got, sorted(want)))
		}
	}
	return errs
}

// checkNodes: every node lists every broker's inter-broker listener,
// advertises its own service name and HTTP port, publishes a distinct host
// port, keeps a standby and has its own data volume.
func (d deployment) checkNodes() []error {
	var errs []error
	if len(d.nodes) != 3 {
		errs = append(errs, fmt.Errorf("%d esker nodes, want 3", len(d.nodes)))
	}
	var internal []string
	for _, b := range d.brokers {
		internal = append(internal, b.internal)
	}
	advertised := map[string]string{}
	hostPorts := map[string]string{}
	volumes := map[string]string{}
	for _, n := range d.nodes {
		if got := sorted(n.brokers); !slices.Equal(got, sorted(internal)) {
			errs = append(errs, fmt.Errorf("node %s: --brokers %v, want every broker's internal listener %v", n.service, got, sorted(internal)))
		}
		if other, dup := advertised[n.advertise]; dup {
			errs = append(errs, fmt.Errorf("nodes %s and %s advertise the same URL %s", other, n.service, n.advertise))
		}
		advertised[n.advertise] = n.service
		_, port, err := net.SplitHostPort(n.listen)
		if err != nil {
			errs = append(errs, fmt.Errorf("node %s: --http %q: %v", n.service, n.listen, err))
		}
		u, err := url.Parse(n.advertise)
		if err != nil || u.Scheme != "http" || u.Hostname() != n.service || u.Port() != port {
			errs = append(errs, fmt.Errorf("node %s: --advertise %q, want http://%s:%s (its service name and --http port)", n.service, n.advertise, n.service, port))
		}
		if n.standbys != "1" {
			errs = append(errs, fmt.Errorf("node %s: --standby-replicas %q, want 1", n.service, n.standbys))
		}
		published := false
		for _, p := range n.ports {
			host, container, ok := strings.Cut(p, ":")
			if !ok || container != port {
				continue
			}
			published = true
			if other, dup := hostPorts[host]; dup {
				errs = append(errs, fmt.Errorf("nodes %s and %s publish the same host port %s", other, n.service, host))
			}
			hostPorts[host] = n.service
		}
		if !published {
			errs = append(errs, fmt.Errorf("node %s does not publish its HTTP port %s: ports %v", n.service, port, n.ports))
		}
		mounted := false
		for _, v := range n.volumes {
			src, dst, _ := strings.Cut(v, ":")
			if dst != n.data {
				continue
			}
			mounted = true
			if _, named := d.compose.Volumes[src]; !named {
				errs = append(errs, fmt.Errorf("node %s: data directory %s is mounted from %s, not a named volume", n.service, n.data, src))
			}
			if other, dup := volumes[src]; dup {
				errs = append(errs, fmt.Errorf("nodes %s and %s share the data volume %s", other, n.service, src))
			}
			volumes[src] = n.service
		}
		if !mounted || n.data == "" {
			errs = append(errs, fmt.Errorf("node %s: no volume mounted at its --data directory %q", n.service, n.data))
		}
	}
	return errs
}

// repoFile returns the repository file mounted at the container path p of
// the Prometheus service ("" if none is).
func (d deployment) repoFile(p string) string {
	for _, v := range d.prometheus.Volumes {
		parts := strings.Split(v, ":")
		if len(parts) < 2 || !strings.HasPrefix(parts[0], ".") {
			continue
		}
		src, dst := parts[0], parts[1]
		if dst == p {
			return filepath.Clean(src)
		}
		if rel, ok := strings.CutPrefix(p, strings.TrimSuffix(dst, "/")+"/"); ok {
			return filepath.Join(src, rel)
		}
	}
	return ""
}

// checkPrometheus: the configuration and every rule file it names are
// repository files mounted into the container, and the scrape targets are
// exactly the nodes' HTTP addresses. It returns the repository paths of the
// rule files.
func (d deployment) checkPrometheus(t *testing.T) (ruleFiles []string, errs []error) {
	if d.prometheus == nil {
		return nil, []error{fmt.Errorf("no prom/prometheus service")}
	}
	cfgPath := "/etc/prometheus/prometheus.yml"
	if v, ok := flagValue(d.prometheus.Command, "config.file"); ok {
		cfgPath = v
	}
	cfgFile := d.repoFile(cfgPath)
	if cfgFile == "" {
		return nil, []error{fmt.Errorf("prometheus: no repository file is mounted at its configuration %s", cfgPath)}
	}
	var cfg prometheusConfig
	readYAML(t, cfgFile, &cfg, false)
	var want []string
	for _, n := range d.nodes {
		_, port, _ := net.SplitHostPort(n.listen)
		want = append(want, net.JoinHostPort(n.service, port))
	}
	var got []string
	for _, sc := range cfg.ScrapeConfigs {
		if sc.MetricsPath != "" && sc.MetricsPath != "/metrics" {
			errs = append(errs, fmt.Errorf("prometheus job %s scrapes %s, want /metrics", sc.JobName, sc.MetricsPath))
		}
		for _, st := range sc.StaticConfigs {
			got = append(got, st.Targets...)
		}
	}
	if !slices.Equal(sorted(got), sorted(want)) {
		errs = append(errs, fmt.Errorf("prometheus scrapes %v, want the nodes %v", sorted(got), sorted(want)))
	}
	if len(cfg.RuleFiles) == 0 {
		errs = append(errs, fmt.Errorf("%s names no rule file", cfgFile))
	}
	for _, rf := range cfg.RuleFiles {
		if !path.IsAbs(rf) {
			rf = path.Join(path.Dir(cfgPath), rf)
		}
		f := d.repoFile(rf)
		if f == "" {
			errs = append(errs, fmt.Errorf("prometheus rule file %s is not mounted from the repository", rf))
			continue
		}
		if _, err := os.Stat(f); err != nil {
			errs = append(errs, fmt.Errorf("prometheus rule file %s: %v", rf, err))
			continue
		}
		ruleFiles = append(ruleFiles, f)
	}
	return ruleFiles, errs
}

// checkDeployment runs every check of the Compose file.
func checkDeployment(t *testing.T, file string) []error {
	d := loadDeployment(t, file)
	errs := d.checkBrokers()
	errs = append(errs, d.checkNodes()...)
	rules, perrs := d.checkPrometheus(t)
	errs = append(errs, perrs...)
	if !slices.Contains(rules, filepath.Clean(alertsPath)) {
		errs = append(errs, fmt.Errorf("prometheus does not load %s (it loads %v)", alertsPath, rules))
	}
	return errs
}

// TestDeployCompose: docker-compose.yml's brokers, nodes and Prometheus
// agree with each other.
func TestDeployCompose(t *testing.T) {
	for _, err := range checkDeployment(t, composePath) {
		t.Error(err)
	}
}

// TestDeployComposeChecksFail: each check fails on a Compose file broken in
// the way it guards against.
func TestDeployComposeChecksFail(t *testing.T) {
	orig, err := os.ReadFile(composePath)
	if err != nil {
		t.Fatal(err)
	}
	breaks := []struct{ name, old, new, want string }{
		{"duplicate node id", `KAFKA_NODE_ID: "3"`, `KAFKA_NODE_ID: "2"`, "same node id"},
		{"a voter missing", `"1@kafka1:9093,2@kafka2:9093,3@kafka3:9093"`, `"1@kafka1:9093,2@kafka2:9093"`, "quorum voters"},
		{"a broker missing from a node", `["node", "--brokers", "kafka1:9092,kafka2:9092,kafka3:9092", "--http", "0.0.0.0:8080",
              "--advertise", "http://bank2:8080"`, `["node", "--brokers", "kafka1:9092,kafka2:9092", "--http", "0.0.0.0:8080",
              "--advertise", "http://bank2:8080"`, "bank2: --brokers"},
		{"advertised URL of another node", `"--advertise", "http://bank3:8080"`, `"--advertise", "http://bank1:8080"`, "advertise the same URL"},
		{"advertised port not the listener's", `"--advertise", "http://bank2:8080"`, `"--advertise", "http://bank2:9999"`, "bank2: --advertise"},
		{"a fourth broker", "  bank1:\n", "  kafka4:\n    image: apache/kafka:3.9.0\n    environment:\n      KAFKA_NODE_ID: \"4\"\n  bank1:\n", "4 Kafka brokers"},
		{"rule file not mounted", "      - ./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro\n", "", "not mounted"},
		{"shared data volume", "      - bank3-data:/data", "      - bank2-data:/data", "share the data volume"},
	}
	dir := t.TempDir()
	for _, b := range breaks {
		t.Run(b.name, func(t *testing.T) {
			if !bytes.Contains(orig, []byte(b.old)) {
				t.Fatalf("%s no longer contains %q: update this test", composePath, b.old)
			}
			broken := bytes.Replace(orig, []byte(b.old), []byte(b.new), 1)
			// The checks resolve relative mounts against the working
			// directory, the repository root, wherever the file is.
			f := filepath.Join(dir, "compose.yml")
			if err := os.WriteFile(f, broken, 0o644); err != nil {
				t.Fatal(err)
			}
			errs := checkDeployment(t, f)
			if len(errs) == 0 {
				t.Fatalf("no check failed")
			}
			var msgs []string
			for _, err := range errs {
				msgs = append(msgs, err.Error())
			}
			if !strings.Contains(strings.Join(msgs, "\n"), b.want) {
				t.Errorf("errors %q do not mention %q", msgs, b.want)
			}
		})
	}
	t.Run("scrape target missing", func(t *testing.T) {
		d := loadDeployment(t, composePath)
		d.nodes = append(d.nodes, bankNode{service: "bank4", listen: "0.0.0.0:8080"})
		_, errs := d.checkPrometheus(t)
		if len(errs) == 0 || !strings.Contains(errs[0].Error(), "bank4:8080") {
			t.Errorf("errors %v, want the missing target bank4:8080 named", errs)
		}
	})
}

// loadRules parses a Prometheus rule file strictly and checks the shape of
// every alerting rule: a name, an expression, a valid for, a severity and a
// summary and description.
func loadRules(t *testing.T, file string) ruleFile {
	t.Helper()
	var rf ruleFile
	readYAML(t, file, &rf, true)
	if len(rf.Groups) == 0 {
		t.Fatalf("%s: no rule groups", file)
	}
	names := map[string]bool{}
	for _, g := range rf.Groups {
		if g.Name == "" || len(g.Rules) == 0 {
			t.Errorf("%s: group %q without a name or rules", file, g.Name)
		}
		for _, r := range g.Rules {
			if r.Alert == "" || r.Record != "" {
				t.Errorf("%s: group %s: a rule that is not an alert (%q)", file, g.Name, r.Record)
				continue
			}
			if names[r.Alert] {
				t.Errorf("%s: alert %s defined twice", file, r.Alert)
			}
			names[r.Alert] = true
			if strings.TrimSpace(r.Expr) == "" {
				t.Errorf("%s: alert %s has no expr", file, r.Alert)
			}
			if r.For != "" {
				if _, err := model.ParseDuration(r.For); err != nil {
					t.Errorf("%s: alert %s: for %q: %v", file, r.Alert, r.For, err)
				}
			}
			if s := r.Labels["severity"]; s != "warning" && s != "critical" {
				t.Errorf("%s: alert %s: severity %q, want warning or critical", file, r.Alert, s)
			}
			if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("%s: alert %s needs a summary and a description annotation", file, r.Alert)
			}
		}
	}
	return rf
}

// promQLIdent matches identifiers in a PromQL expression; strings, label
// matchers, ranges and grouping label lists are removed before.
var (
	promQLIdent   = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*`)
	promQLStrings = regexp.MustCompile(`"(\\.|[^"\\])*"|'(\\.|[^'\\])*'|\{[^}]*\}|\[[^\]]*\]|\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	// promQLWords are the functions, aggregations and keywords the rules
	// use (extend it when a rule uses another).
	promQLWords = map[string]bool{
		"sum": true, "max": true, "min": true, "avg": true, "count": true, "by": true, "without": true,
		"rate": true, "irate": true, "increase": true, "delta": true, "histogram_quantile": true,
		"and": true, "or": true, "unless": true, "on": true, "ignoring": true, "group_left": true,
		"absent": true, "max_over_time": true, "min_over_time": true, "avg_over_time": true,
		"changes": true, "resets": true, "le": true, "bool": true, "offset": true,
	}
)

// alertMetrics returns the metric names an expression reads, e.g.
// esker_restore_seconds_bucket.
func alertMetrics(expr string) []string {
	var out []string
	for _, id := range promQLIdent.FindAllString(promQLStrings.ReplaceAllString(expr, " "), -1) {
		if !promQLWords[id] && !slices.Contains(out, id) {
			out = append(out, id)
		}
	}
	return out
}

// TestAlertRulesParse: the alert rule file is well-formed and names no
// unknown function (every identifier of an expression is a PromQL word or
// a metric name).
func TestAlertRulesParse(t *testing.T) {
	rf := loadRules(t, alertsPath)
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			for _, m := range alertMetrics(r.Expr) {
				if m != "up" && !strings.HasPrefix(m, "esker_") {
					t.Errorf("alert %s: %q is neither an esker metric, up nor a known PromQL word", r.Alert, m)
				}
			}
		}
	}
	if got := alertMetrics(`histogram_quantile(0.9, sum by (instance, le) (rate(esker_restore_seconds_bucket{job="x"}[15m]))) > 30 and up == 1`); !slices.Equal(got, []string{"esker_restore_seconds_bucket", "up"}) {
		t.Errorf("alertMetrics = %v", got)
	}
}
