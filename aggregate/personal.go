package aggregate

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"time"
)

// Personal data and forgetting (crypto-shredding).
//
// A string field tagged `esker:"pii"` in a command, event or state type holds
// personal data (also a slice of strings, and fields of structs inside
// slices; not inside maps or recursive types, which registration refuses). esker never writes such a field to Kafka in plaintext: the
// node seals it with the entity's own data key (AES-256-GCM) before a
// command, event or state leaves the process, and opens it on every read
// path. Forgetting an entity destroys its data key, so every copy of its
// personal fields (in "<type>-events", "<type>-commands", the changelog and
// any consumer's log) becomes unreadable at once, while the other fields and
// all headers stay plain for consumers in any language.
//
// A sealed field is a string "esker:pii:1:<key id>:<base64 ciphertext>". An
// empty string stays empty: there is nothing to hide and zero values keep
// their meaning. A field that does not carry the prefix (written before the
// field was tagged) is read as it is.

// PersonalTag is the struct tag value that marks a personal field:
// `esker:"pii"`. Only string fields and slices of strings (at any depth of
// nested structs, pointers and slices, not maps) may carry it.
const PersonalTag = "pii"

// SealedPrefix starts every sealed personal field.
const SealedPrefix = "esker:pii:1:"

// ForgetCommand is the command type of a forget request on
// "<type>-commands" (DELETE /v1/aggregates/{type}/{id} produces it). It is
// reserved: an aggregate cannot register a command of that name.
const ForgetCommand = "Forget"

// ForgottenEvent is the event type esker writes when it forgets an entity.
// Its payload is plain JSON {"forgottenAt": time}. Projections drop the
// entity's rows when they see it; other consumers should delete whatever
// they hold about the entity. The name is reserved.
const ForgottenEvent = "Forgotten"

// Forgotten is the payload of a ForgottenEvent, and the Value a projection
// fold sees for it.
type Forgotten struct {
	ForgottenAt time.Time `json:"forgottenAt"`
}

// IsForgotten reports whether ev is the event that forgets its entity.
func IsForgotten(ev Event) bool { return ev.Type == ForgottenEvent }

// FieldCipher seals and opens the personal fields of one entity. The node
// gives the engine and its read paths one per entity; Open of a field whose
// entity was forgotten returns "" and no error.
type FieldCipher interface {
	Seal(plaintext string) (string, error)
	Open(sealed string) (string, error)
}

// ErrUnknownKey is returned by FieldCipher.Open for a field sealed with a
// data key the node's keyring does not hold (another application's, or a
// keys topic that was lost): it will not open on a retry either.
var ErrUnknownKey = errors.New("the field's data key is unknown")

// ErrForgotten is returned for an entity that was forgotten: its commands,
// state and events answer 410 Gone.
var ErrForgotten = errors.New("the entity was forgotten")

// HasPersonal reports whether values of t carry fields tagged personal.
func HasPersonal(t reflect.Type) bool { return len(personalPlan(t)) > 0 }

// SealPersonal returns a copy of v with every non-empty personal field
// sealed by c; v is not modified. A value without personal fields is
// returned as it is, without a copy.
func SealPersonal(v any, c FieldCipher) (any, error) { return transformPersonal(v, c.Seal) }

// OpenPersonal returns a copy of v with every sealed personal field opened
// by c (see SealPersonal).
func OpenPersonal(v any, c FieldCipher) (any, error) {
	return transformPersonal(v, func(s string) (string, error) {
		if !strings.HasPrefix(s, SealedPrefix) {
			return s, nil
		}
		return c.Open(s)
	})
}

func transformPersonal(v any, fn func(string) (string, error)) (any, error) {
	if v == nil {
		return nil, nil
	}
	rv := reflect.ValueOf(v)
	plan := personalPlan(rv.Type())
	if len(plan) == 0 {
		return v, nil
	}
	out := reflect.New(rv.Type()).Elem()
	out.Set(rv)
	if rv.Kind() == reflect.Pointer {
		if rv.IsNil() {
			return v, nil
		}
		cp := reflect.New(rv.Type().Elem())
		cp.Elem().Set(rv.Elem())
		out.Set(cp)
	}
	for _, path := range plan {
		if err := transformPath(out, path, fn); err != nil {
			return nil, err
		}
	}
	return out.Interface(), nil
}

// each in a plan path stands for every element of a slice or array.
const each = -1

// transformPath rewrites the string field at path inside v (addressable),
// copying any struct or slice a pointer or slice on the way leads to so the
// caller's value stays untouched.
func transformPath(v reflect.Value, path []int, fn func(string) (string, error)) error {
	for k, i := range path {
		if v.Kind() == reflect.Pointer {
			if v.IsNil() {
				return nil
			}
			cp := reflect.New(v.Type().Elem())
			cp.Elem().Set(v.Elem())
			v.Set(cp)
			v = cp.Elem()
		}
		if i == each {
			if v.Kind() == reflect.Slice {
				if v.IsNil() {
					return nil
				}
				cp := reflect.MakeSlice(v.Type(), v.Len(), v.Len())
				reflect.Copy(cp, v)
				v.Set(cp)
			}
			for j := range v.Len() {
				if err := transformPath(v.Index(j), path[k+1:], fn); err != nil {
					return err
				}
			}
			return nil
		}
		v = v.Field(i)
	}
	if v.Kind() == reflect.Pointer { // *string
		if v.IsNil() {
			return nil
		}
		s, err := fn(v.Elem().String())
		if err != nil {
			return err
		}
		v.Set(reflect.ValueOf(&s))
		return nil
	}
	if v.String() == "" {
		return nil
	}
	s, err := fn(v.String())
	if err != nil {
		return err
	}
	v.SetString(s)
	return nil
}

var plans sync.Map // reflect.Type → [][]int

// personalPlan lists the field index paths of t's personal fields (each:
// every element of a slice or array). It panics on a tag on a field that
// cannot hold a sealed string, on personal fields inside a map, and on a
// recursive type with personal fields (a tree or list of people: a fixed
// list of paths cannot reach every depth): programming errors found when
// the type is registered, rather than personal data left in plaintext.
func personalPlan(t reflect.Type) [][]int {
	if p, ok := plans.Load(t); ok {
		return p.([][]int)
	}
	p := buildPlan(t, nil, map[reflect.Type]bool{})
	plans.Store(t, p)
	return p
}

// buildPlan walks t. inside holds the struct types being walked, and is
// set to true for one that the walk met again inside itself.
func buildPlan(t reflect.Type, prefix []int, inside map[reflect.Type]bool) [][]int {
	switch t.Kind() {
	case reflect.Pointer:
		return buildPlan(t.Elem(), prefix, inside)
	case reflect.Slice, reflect.Array:
		return buildPlan(t.Elem(), append(append([]int(nil), prefix...), each), inside)
	case reflect.Map:
		if len(buildPlan(t.Elem(), nil, inside)) > 0 {
			panic(fmt.Sprintf("aggregate: %s holds fields tagged esker:%q inside a map, which cannot be sealed; use a slice of structs", t, PersonalTag))
		}
		return nil
	case reflect.Struct:
	default:
		return nil
	}
	if _, walking := inside[t]; walking {
		inside[t] = true // recursive: decided when its walk ends
		return nil
	}
	inside[t] = false
	var out [][]int
	for i := range t.NumField() {
		f := t.Field(i)
		path := append(append([]int(nil), prefix...), i)
		if tag, ok := f.Tag.Lookup("esker"); ok && tag == PersonalTag {
			ft, elems := f.Type, 0
			for ft.Kind() == reflect.Slice || ft.Kind() == reflect.Array {
				ft, elems = ft.Elem(), elems+1
			}
			if ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if ft.Kind() != reflect.String || !f.IsExported() {
				panic(fmt.Sprintf("aggregate: field %s.%s is tagged esker:%q but is not an exported string (or slice of strings); personal data must be kept in string fields", t.Name(), f.Name, PersonalTag))
			}
			for range elems {
				path = append(path, each)
			}
			out = append(out, path)
			continue
		}
		if !f.IsExported() {
			continue
		}
		out = append(out, buildPlan(f.Type, path, inside)...)
	}
	if inside[t] && len(out) > 0 {
		panic(fmt.Sprintf("aggregate: %s is recursive and has fields tagged esker:%q, which cannot be sealed at every depth; keep personal data out of recursive types", t, PersonalTag))
	}
	delete(inside, t)
	return out
}

// ForgottenEventData returns the payload of the ForgottenEvent written at t.
func ForgottenEventData(t time.Time) []byte {
	b, _ := json.Marshal(Forgotten{ForgottenAt: t.UTC()})
	return b
}
