package interactive

import (
	"encoding/json"
	"net/http/httptest"
	"reflect"
	"testing"
)

func testMap() *Map {
	return &Map{
		Generation: 7,
		Members:    map[string]string{"m-b": "http://b:8080", "m-a": "http://a:8080", "m-c": ""},
		Partitions: []Placement{
			{Active: "m-a", Standbys: []string{"m-b", "m-c"}},
			{Pending: "m-b", Standbys: []string{"m-a"}},
			{Active: "m-b"},
			{Active: "m-c", Pending: "ignored while there is an active"},
		},
	}
}

func TestClusterBeforeAssignment(t *testing.T) {
	n := newTestNode(t, newTestCluster())
	res := do(t, "GET", n.url+"/v1/cluster", "")
	res.want(t, 503)
	res.errorLike(t, "not received a cluster assignment yet")
	if res.header.Get("Retry-After") != "1" || res.header.Get("Content-Type") != "application/json" {
		t.Errorf("headers %v", res.header)
	}
}

func TestCluster(t *testing.T) {
	c := newTestCluster()
	c.m = testMap()
	n := newTestNode(t, c)
	res := do(t, "GET", n.url+"/v1/cluster", "")
	res.want(t, 200)
	want := `{
		"generation": 7,
		"self": "` + n.url + `",
		"partitions": 4,
		"aggregateTypes": [],
		"members": [
			{"id": "m-a", "url": "http://a:8080"},
			{"id": "m-b", "url": "http://b:8080"},
			{"id": "m-c", "url": ""}
		],
		"tasks": [
			{"partition": 0, "active": "m-a", "standbys": ["m-b", "m-c"]},
			{"partition": 1, "active": "", "pending": "m-b", "standbys": ["m-a"]},
			{"partition": 2, "active": "m-b", "standbys": []},
			{"partition": 3, "active": "m-c", "standbys": []}
		]
	}`
	sameJSON(t, res.body, want)
	if res.header.Get(ServedByHeader) != n.url {
		t.Errorf("%s = %q", ServedByHeader, res.header.Get(ServedByHeader))
	}
}

// TestClusterLocalTasks: a Router that is a TaskReporter adds this node's
// view of its own tasks.
func TestClusterLocalTasks(t *testing.T) {
	c := newTestCluster()
	c.m = testMap()
	rt := reporterRouter{&fakeRouter{c: c, self: "http://a:8080", status: map[int32]TaskStatus{
		0: {Role: RoleActive, Restored: true},
		1: {Role: RoleStandby, Restored: false, Lag: 12},
	}}}
	h := NewHandler(&fakeBackend{def: counterType()}, Routing(rt), Logger(quietLogger()))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/v1/cluster", nil))
	if rec.Code != 200 {
		t.Fatalf("status %d: %s", rec.Code, rec.Body)
	}
	var got struct {
		Self  string           `json:"self"`
		Tasks []map[string]any `json:"tasks"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if got.Self != "http://a:8080" {
		t.Errorf("self %q", got.Self)
	}
	wantLocal := []string{`{"role":"active","restored":true,"lag":0}`, `{"role":"standby","restored":false,"lag":12}`, ``, ``}
	for i, w := range wantLocal {
		l, ok := got.Tasks[i]["local"]
		switch {
		case w == "" && ok:
			t.Errorf("task %d: local %v, want none", i, l)
		case w != "":
			sameJSON(t, mustJSON(l), w)
		}
	}
}

type typedBackend struct{ *fakeBackend }

func (typedBackend) AggregateTypes() []string { return []string{"order", "account"} }

// TestClusterAggregateTypes: a Backend that is a TypeLister has its
// aggregate types listed, sorted.
func TestClusterAggregateTypes(t *testing.T) {
	c := newTestCluster()
	c.m = testMap()
	h := NewHandler(typedBackend{&fakeBackend{def: counterType()}}, Routing(&fakeRouter{c: c, self: "http://a:8080"}), Logger(quietLogger()))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/v1/cluster", nil))
	if rec.Code != 200 {
		t.Fatalf("status %d: %s", rec.Code, rec.Body)
	}
	var got struct {
		AggregateTypes []string `json:"aggregateTypes"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.AggregateTypes, []string{"account", "order"}) {
		t.Errorf("aggregateTypes %q, want [account order]", got.AggregateTypes)
	}
}

func sameJSON(t *testing.T, got []byte, want string) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("not JSON: %v: %s", err, got)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("bad want: %v", err)
	}
	if !reflect.DeepEqual(g, w) {
		t.Errorf("got  %s\nwant %s", got, mustJSON(w))
	}
}
