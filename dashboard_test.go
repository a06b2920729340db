package esker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/examples/bank"
)

// chromium returns the path of a Chromium (or Chrome) binary: $ESKER_CHROMIUM,
// or the first one on $PATH. Without one the test skips, except under CI
// (the CI script installs it), where it fails.
func chromium(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("ESKER_CHROMIUM"); p != "" {
		return p
	}
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("no Chromium found (chromium on $PATH, or $ESKER_CHROMIUM): CI must install it (apt-get install chromium)")
	}
	t.Skip("no Chromium found (chromium on $PATH, or $ESKER_CHROMIUM); install it to run the dashboard test")
	return ""
}

// browser starts a headless Chromium with a fresh profile and returns a tab
// context. Exceptions the page throws are collected; check them with the
// returned func.
func browser(t *testing.T, timeout time.Duration) (ctx context.Context, pageErrors func() []string, authSent func(path string) string) {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium(t)),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1400, 1000),
	)
	ctx, cancelTimeout := context.WithTimeout(context.Background(), timeout)
	ctx, cancelAlloc := chromedp.NewExecAllocator(ctx, opts...)
	ctx, cancelTab := chromedp.NewContext(ctx)
	t.Cleanup(func() { cancelTab(); cancelAlloc(); cancelTimeout() })

	var mu sync.Mutex
	var errs []string
	auth := map[string]string{} // path → Authorization of its last request
	err := chromedp.Listen(ctx, func(ev any) {
		var msg string
		switch ev := ev.(type) {
		case *network.EventRequestWillBeSent:
			u, err := url.Parse(ev.Request.URL)
			if err != nil {
				return
			}
			var a string
			for k, v := range ev.Request.Headers {
				if strings.EqualFold(k, "Authorization") {
					a, _ = v.(string)
				}
			}
			mu.Lock()
			auth[u.Path] = a
			mu.Unlock()
			return
		case *runtime.EventExceptionThrown:
			msg = ev.ExceptionDetails.Text
			if ex := ev.ExceptionDetails.Exception; ex != nil {
				msg += " " + ex.Description
			}
		case *runtime.EventConsoleAPICalled:
			if ev.Type != runtime.ConsoleAPICalledTypeError {
				return
			}
			for _, a := range ev.Args {
				msg += string(a.Value) + a.Description + " "
			}
		default:
			return
		}
		mu.Lock()
		errs = append(errs, msg)
		mu.Unlock()
	})
	if err != nil {
		t.Fatalf("starting Chromium: %v", err)
	}
	return ctx, func() []string {
			mu.Lock()
			defer mu.Unlock()
			return append([]string(nil), errs...)
		}, func(path string) string {
			mu.Lock()
			defer mu.Unlock()
			return auth[path]
		}
}

// TestDashboard loads the dashboard from node 1 of a 2-node bank cluster in
// headless Chromium: the cluster map shows both nodes; looking up an
// account owned by node 2 shows its state and history (forwarded by node
// 1); a command sent over HTTP appears on the page through the live watch,
// without a reload; a projection row and the command rates show too; the
// API token goes with every call; when node 2 stops, the watch resumes on
// node 1. With
// ESKER_UPDATE_SCREENSHOT=1 it saves docs/dashboard.png.
func TestDashboard(t *testing.T) {
	ctx, pageErrors, authSent := browser(t, 3*time.Minute)
	c := newCluster(t)
	brokers := c.ListenAddrs()
	n1 := startBankNode(t, brokers, t.TempDir(), esker.StandbyReplicas(1))
	n2 := startBankNode(t, brokers, t.TempDir(), esker.StandbyReplicas(1))
	waitTwoMembers(t, n1, n2)

	// The JSON API keeps answering unknown routes with JSON 404s.
	for _, path := range []string{"/v1/nope", "/nope", "/ui/nope.js"} {
		code, body := do(t, n1, "GET", path, nil)
		if code != 404 || body["error"] == nil {
			t.Errorf("GET %s: %d %v, want a JSON 404", path, code, body)
		}
	}

	id := idOwnedBy(t, n1, n2.srv.URL)
	send(t, n1, id, "open-"+id, cmd("Open", bank.Open{Owner: "ada"}))
	send(t, n1, id, "deposit-1-"+id, cmd("Deposit", bank.Deposit{Amount: 100}))
	// Rates are the serving node's: give node 1 a command of its own.
	local := idOwnedBy(t, n1, n1.srv.URL)
	send(t, n1, local, "open-"+local, cmd("Open", bank.Open{Owner: "grace"}))

	if err := chromedp.Do(ctx, chromedp.Navigate(n1.srv.URL+"/")); err != nil {
		t.Fatal(err)
	}
	waitPage(t, ctx, "the cluster map with both nodes and 4 partitions", fmt.Sprintf(
		`document.querySelectorAll('#members tbody tr').length === 2 &&
		 document.querySelectorAll('#members tbody tr.self').length === 1 &&
		 document.querySelectorAll('#partitions .part').length === 4 &&
		 document.getElementById('self').textContent === %q`, n1.srv.URL))
	// Node 1 holds every partition, as active or standby, and says so.
	waitPage(t, ctx, "node 1's own view of every partition", `[...document.querySelectorAll('#partitions .part')].every(p =>
		/standby 127\.0\.0\.1:\d+/.test(p.textContent) && /here: (active|standby), restored/.test(p.textContent))`)

	// Look the account up.
	waitPage(t, ctx, "the account type in the type list", `[...document.querySelectorAll('#entity-type option')].some(o => o.value === 'account')`)
	if err := chromedp.Do(ctx,
		chromedp.SetValue(chromedp.ID("entity-type"), "account"),
		chromedp.SetValue(chromedp.ID("entity-id"), id),
		chromedp.Click(chromedp.CSS("#entity-form button")),
	); err != nil {
		t.Fatal(err)
	}
	waitEntity(t, ctx, 2, 100, []string{"Deposited", "Opened"})
	waitPage(t, ctx, "the watch to be live", `document.getElementById('watch-status').classList.contains('ok')`)

	// A command from elsewhere shows up through the watch.
	send(t, n2, id, "deposit-2-"+id, cmd("Deposit", bank.Deposit{Amount: 50}))
	waitEntity(t, ctx, 3, 150, []string{"Deposited", "Deposited", "Opened"})

	// The projection row of the owner, and the command rates.
	waitPage(t, ctx, "the owners projection in the list", `[...document.querySelectorAll('#projection-name option')].some(o => o.value === 'owners')`)
	if err := chromedp.Do(ctx,
		chromedp.SetValue(chromedp.ID("projection-name"), "owners"),
		chromedp.SetValue(chromedp.ID("projection-key"), "ada"),
		chromedp.Click(chromedp.CSS("#projection-form button")),
	); err != nil {
		t.Fatal(err)
	}
	waitPage(t, ctx, "the owners row of ada", `(() => {
		const row = document.querySelector('#rows:not([hidden]) tbody tr');
		return row !== null && row.cells[0].textContent === 'ada' && JSON.parse(row.cells[2].textContent).balance === 150;
	})()`)
	waitPage(t, ctx, "the accepted account commands among the rates", `[...document.querySelectorAll('#rate-table tbody tr')].some(r => r.dataset.counter === 'commands\taccount · accepted')`)

	if os.Getenv("ESKER_UPDATE_SCREENSHOT") == "1" {
		screenshot(t, ctx, n1, n2)
	}

	// With an API token, every call carries it, the watch's too.
	if err := chromedp.Do(ctx,
		chromedp.SetValue(chromedp.ID("token"), "s3cret"),
		chromedp.Click(chromedp.CSS("#token-form button")),
		chromedp.Click(chromedp.CSS("#entity-form button")),
	); err != nil {
		t.Fatal(err)
	}
	entity := "/v1/aggregates/account/" + id
	for _, path := range []string{"/v1/cluster", "/metrics", entity, entity + "/events", entity + "/watch"} {
		deadline := time.Now().Add(20 * time.Second)
		for authSent(path) != "Bearer s3cret" {
			if time.Now().After(deadline) {
				t.Fatalf("%s: the page sent Authorization %q, want the saved token", path, authSent(path))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitPage(t, ctx, "the token kept in localStorage", `localStorage.getItem('esker.apiToken') === 's3cret'`)

	// Node 2 stops: the watch ends or fails, node 1 takes the account's
	// partition over, and the page resumes the watch after the version it
	// has (Last-Event-ID) and shows the next command.
	n2.stop()
	waitPage(t, ctx, "the cluster map with node 1 alone", `document.querySelectorAll('#members tbody tr').length === 1`)
	send(t, n1, id, "deposit-3-"+id, cmd("Deposit", bank.Deposit{Amount: 25}))
	waitEntity(t, ctx, 4, 175, []string{"Deposited", "Deposited", "Deposited", "Opened"})
	waitPage(t, ctx, "the watch to be live again", `document.getElementById('watch-status').classList.contains('ok')`)
	if errs := pageErrors(); len(errs) > 0 {
		t.Errorf("the page reported errors: %q", errs)
	}
}

// waitTwoMembers waits until both nodes' cluster maps hold both nodes and
// every partition has an active owner.
func waitTwoMembers(t *testing.T, nodes ...*testNode) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for _, n := range nodes {
		for {
			var m struct {
				Members []struct{ URL string }
				Tasks   []struct{ Active string }
			}
			code, raw := getRaw(t, n, "/v1/cluster")
			ok := code == 200 && json.Unmarshal(raw, &m) == nil && len(m.Members) == 2 && len(m.Tasks) == 4
			for _, task := range m.Tasks {
				ok = ok && task.Active != ""
			}
			if ok {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: cluster map without 2 members and 4 owned partitions: %d %s", n.srv.URL, code, raw)
			}
			time.Sleep(50 * time.Millisecond)
		}
		waitReady(t, n)
	}
}

func getRaw(t *testing.T, n *testNode, path string) (int, []byte) {
	t.Helper()
	resp, err := httpClient.Get(n.srv.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var raw json.RawMessage
	_ = jsonDecode(resp.Body, &raw)
	return resp.StatusCode, raw
}

// idOwnedBy returns an account id whose partition url owns in n's map.
func idOwnedBy(t *testing.T, n *testNode, url string) string {
	t.Helper()
	var m struct {
		Members []struct{ ID, URL string }
		Tasks   []struct{ Active string }
	}
	code, raw := getRaw(t, n, "/v1/cluster")
	if code != 200 || json.Unmarshal(raw, &m) != nil {
		t.Fatalf("cluster: %d %s", code, raw)
	}
	owner := ""
	for _, mb := range m.Members {
		if mb.URL == url {
			owner = mb.ID
		}
	}
	for i := range 1000 {
		id := fmt.Sprintf("acct-%d", i)
		if p := aggregate.Partition(id, int32(len(m.Tasks))); m.Tasks[p].Active == owner {
			return id
		}
	}
	t.Fatalf("no id owned by %s in %s", url, raw)
	return ""
}

// send submits a command (with a fixed command id, so a retry after a 503
// cannot apply it twice) and waits for it to be accepted.
func send(t *testing.T, n *testNode, id, commandID string, c map[string]any) {
	t.Helper()
	c["commandId"] = commandID
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, body := do(t, n, "POST", "/v1/aggregates/account/"+id+"/commands", c)
		if code == 200 {
			return
		}
		if code != 503 || time.Now().After(deadline) {
			t.Fatalf("%s %s: %d %v", c["type"], id, code, body)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitPage waits until the JavaScript condition holds on the page.
func waitPage(t *testing.T, ctx context.Context, what, condition string) {
	t.Helper()
	if err := chromedp.Do(ctx, chromedp.Poll[chromedp.Void](condition, chromedp.WithPollingInterval(50*time.Millisecond), chromedp.WithPollingTimeout(30*time.Second))); err != nil {
		html, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.querySelector('main').innerText`))
		t.Fatalf("waiting for %s: %v; the page shows:\n%s", what, err, html)
	}
}

// waitEntity waits until the entity box shows the version, the balance and
// the history's event types (newest first).
func waitEntity(t *testing.T, ctx context.Context, version, balance int, history []string) {
	t.Helper()
	types, _ := json.Marshal(history)
	waitPage(t, ctx, fmt.Sprintf("version %d, balance %d and history %s", version, balance, types), fmt.Sprintf(`(() => {
		const doc = document;
		if (doc.getElementById('entity-version').textContent !== '%d') return false;
		if (JSON.parse(doc.getElementById('entity-state').textContent).balance !== %d) return false;
		const rows = [...doc.querySelectorAll('#history tbody tr')];
		return JSON.stringify(rows.map(r => r.cells[1].textContent)) === %q &&
			rows.every((r, i) => r.cells[0].textContent === String(%d - i));
	})()`, version, balance, types, version))
}

// screenshot gives the page some traffic to show, then saves it to
// docs/dashboard.png.
func screenshot(t *testing.T, ctx context.Context, nodes ...*testNode) {
	t.Helper()
	for i := range 12 {
		id := fmt.Sprintf("shot-%d", i)
		send(t, nodes[i%2], id, "open-"+id, cmd("Open", bank.Open{Owner: []string{"ada", "grace", "edsger"}[i%3]}))
		send(t, nodes[i%2], id, "deposit-"+id, cmd("Deposit", bank.Deposit{Amount: int64(100 * (i + 1))}))
	}
	if err := chromedp.Do(ctx,
		chromedp.Evaluate[chromedp.Void](`document.getElementById('projection-key').value = ''`),
		chromedp.Click(chromedp.CSS("#projection-form button")),
	); err != nil {
		t.Fatal(err)
	}
	waitPage(t, ctx, "the owners listing", `document.querySelectorAll('#rows tbody tr').length === 3`)
	// Two samples of /metrics with commands in between make the rates.
	done := time.Now().Add(5 * time.Second)
	for i := 0; time.Now().Before(done); i++ {
		send(t, nodes[i%2], fmt.Sprintf("shot-%d", i%12), fmt.Sprintf("more-%d", i), cmd("Deposit", bank.Deposit{Amount: 10}))
	}
	buf, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join("docs", "dashboard.png")
	if err := os.WriteFile(path, buf, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %s (%d bytes)", path, len(buf))
}
