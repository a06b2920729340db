package aggregate_test

import (
	"reflect"
	"strings"
	"testing"

	"github.com/esker-io/esker/aggregate"
)

// upperCipher "seals" by prefixing and upper-casing: enough to see which
// fields were sealed and that opening restores them.
type upperCipher struct{ plain map[string]string }

func (c upperCipher) Seal(p string) (string, error) {
	s := aggregate.SealedPrefix + strings.ToUpper(p)
	c.plain[s] = p
	return s, nil
}

func (c upperCipher) Open(s string) (string, error) { return c.plain[s], nil }

type guest struct {
	Name  string `esker:"pii"`
	Table int
}

type party struct {
	Host    *guest
	Guests  []guest
	Emails  []string `esker:"pii"`
	Pair    [2]guest
	Note    string
	Nothing []guest
}

// TestSealPersonalInSlices: personal fields inside slices, arrays and
// pointers are sealed and opened, the value passed in is not modified, and
// a tag inside a map is refused.
func TestSealPersonalInSlices(t *testing.T) {
	c := upperCipher{plain: map[string]string{}}
	in := party{
		Host:   &guest{Name: "ann", Table: 1},
		Guests: []guest{{Name: "bob", Table: 2}, {Name: "", Table: 3}},
		Emails: []string{"a@x", "b@x"},
		Pair:   [2]guest{{Name: "cy"}, {Name: "di"}},
		Note:   "plain",
	}
	orig := party{Host: &guest{Name: "ann", Table: 1}, Guests: []guest{{Name: "bob", Table: 2}, {Name: "", Table: 3}},
		Emails: []string{"a@x", "b@x"}, Pair: [2]guest{{Name: "cy"}, {Name: "di"}}, Note: "plain"}
	if !aggregate.HasPersonal(reflect.TypeFor[party]()) {
		t.Fatal("party has personal fields")
	}
	out, err := aggregate.SealPersonal(in, c)
	if err != nil {
		t.Fatal(err)
	}
	sealed := out.(party)
	p := aggregate.SealedPrefix
	if sealed.Host.Name != p+"ANN" || sealed.Guests[0].Name != p+"BOB" || sealed.Guests[1].Name != "" ||
		sealed.Emails[0] != p+"A@X" || sealed.Emails[1] != p+"B@X" || sealed.Pair[0].Name != p+"CY" || sealed.Pair[1].Name != p+"DI" ||
		sealed.Note != "plain" || sealed.Guests[1].Table != 3 || sealed.Nothing != nil {
		t.Fatalf("sealed: %+v (host %+v)", sealed, sealed.Host)
	}
	if !reflect.DeepEqual(in, orig) {
		t.Fatalf("SealPersonal modified its argument: %+v", in)
	}
	back, err := aggregate.OpenPersonal(sealed, c)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, orig) {
		t.Fatalf("opened: %+v, want %+v", back, orig)
	}
	defer func() {
		if r := recover(); r == nil || !strings.Contains(r.(string), "inside a map") {
			t.Fatalf("a tag inside a map: panic %v", r)
		}
	}()
	aggregate.HasPersonal(reflect.TypeFor[struct{ ByName map[string]guest }]())
}
