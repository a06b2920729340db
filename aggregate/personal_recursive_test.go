package aggregate_test

import (
	"reflect"
	"testing"

	"github.com/esker-io/esker/aggregate"
)

// treeNode is a recursive type: its children's names are personal too.
type treeNode struct {
	Name     string `esker:"pii"`
	Children []treeNode
}

type linked struct {
	Name string `esker:"pii"`
	Next *linked
}

type mapTree struct {
	Name  string `esker:"pii"`
	ByKey map[string]mapTree
}

// TestSealPersonalRecursiveTypes: a recursive type with personal fields (a
// tree through a slice, a list through a pointer, a map of itself) is
// refused: its deeper personal fields would otherwise stay in plaintext. A
// recursive type without personal fields is fine.
func TestSealPersonalRecursiveTypes(t *testing.T) {
	for _, typ := range []reflect.Type{reflect.TypeFor[treeNode](), reflect.TypeFor[linked](), reflect.TypeFor[mapTree](), reflect.TypeFor[[]holder]()} {
		func() {
			defer func() {
				if r := recover(); r == nil {
					t.Errorf("%s: a recursive type with personal fields is not refused", typ)
				}
			}()
			aggregate.HasPersonal(typ)
		}()
	}
	if aggregate.HasPersonal(reflect.TypeFor[plainTree]()) {
		t.Fatal("a recursive type without personal fields has personal fields")
	}
	c := upperCipher{plain: map[string]string{}}
	if _, err := aggregate.SealPersonal(plainTree{Kids: []plainTree{{}}}, c); err != nil {
		t.Fatal(err)
	}
}

// holder reaches a recursive type with personal fields through another type.
type holder struct {
	Family []treeNode
}

type plainTree struct {
	Label string
	Kids  []plainTree
}
