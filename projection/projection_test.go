package projection_test

import (
	"strings"
	"testing"

	"github.com/esker-io/esker/examples/bank"
	"github.com/esker-io/esker/projection"
)

type member struct {
	Name string `json:"name" esker:"pii"`
}

type roster struct {
	Names []member `json:"names"`
}

type count struct{ N int }

// TestPersonalDataRules: a row with personal fields is sealed by its
// entity's key, so it must be one entity's row of one aggregate type: a
// personal state is refused with KeyBy, with a Topic source and in a group
// state; PersonalKeys is refused on rows keyed by entity id. A GroupBy's
// entity rows may hold personal fields, and its keys may be personal.
func TestPersonalDataRules(t *testing.T) {
	src := projection.From(projection.Topic("members", func(_, v []byte) (any, error) { return string(v), nil }))
	account := projection.From(projection.Events(bank.Account))
	mustPanic := func(what, want string, define func()) {
		t.Helper()
		defer func() {
			r := recover()
			if r == nil || !strings.Contains(r.(string), want) {
				t.Fatalf("%s: panic %v, want one that says %q", what, r, want)
			}
		}()
		define()
	}
	mustPanic("New with a personal state from a topic", "one aggregate type", func() {
		projection.New("roster", func(s member, _ projection.Event) member { return s }, src)
	})
	mustPanic("New with a personal state re-keyed", "no KeyBy", func() {
		projection.New("roster", func(s member, _ projection.Event) member { return s }, account,
			projection.KeyBy(func(projection.Event) string { return "all" }))
	})
	if typ := projection.New("members", func(s member, _ projection.Event) member { return s }, account).Definition().PersonalRows(); typ != "account" {
		t.Fatalf("a personal state keyed by account id is sealed by the keys of %q, want account", typ)
	}
	mustPanic("GroupBy with a personal group state", `has fields tagged esker:"pii"`, func() {
		projection.GroupBy("rosters", func(r member, _ projection.Event) member { return r },
			func(member) string { return "all" },
			func(s roster, r member) roster { s.Names = append(s.Names, r); return s },
			func(s roster, _ member) roster { return s }, src)
	})
	mustPanic("PersonalKeys on rows keyed by entity id", "PersonalKeys applies to KeyBy and GroupBy", func() {
		projection.New("counts", func(s count, _ projection.Event) count { s.N++; return s }, src, projection.PersonalKeys())
	})
	g := projection.GroupBy("by-name", func(r member, _ projection.Event) member { return r },
		func(r member) string { return r.Name },
		func(s count, _ member) count { s.N++; return s },
		func(s count, _ member) count { s.N--; return s }, src, projection.PersonalKeys())
	d := g.Definition()
	if !d.PersonalKeys() || d.GroupBy() == nil || !d.GroupBy().Personal() {
		t.Fatalf("GroupBy over a personal row with PersonalKeys: personal keys %v, personal rows %v", d.PersonalKeys(), d.GroupBy() != nil && d.GroupBy().Personal())
	}
}
