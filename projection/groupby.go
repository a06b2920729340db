package projection

import (
	"encoding/json"
	"fmt"
	"reflect"

	"github.com/esker-io/esker/aggregate"
)

// GroupRows is the per-entity side of a GroupBy projection, as the engine
// drives it: the engine keeps each entity's row (sealed) with the key of
// the group it belongs to, and turns a row that changes into the changes
// that leave the old group and join the new one.
type GroupRows interface {
	// Row folds one event into its entity's row. prev is the row before
	// it (nil: none), its personal fields opened. next is the row after
	// it (nil: the entity was forgotten and its row goes), group the group
	// it then belongs to ("": none).
	Row(ev Event, prev []byte) (next []byte, group string, err error)
	// Group returns the group of a stored row (rows stored before the
	// engine kept their group beside them).
	Group(row []byte) (string, error)
	// Personal reports whether rows have personal fields (tagged
	// esker:"pii"); Seal and Open seal and open them with a cipher: the
	// entity's, for the rows kept in the store and changelog, or one that
	// empties them, for the rows a group folds.
	Personal() bool
	Seal(row []byte, c aggregate.FieldCipher) ([]byte, error)
	Open(row []byte, c aggregate.FieldCipher) ([]byte, error)
}

// groupBy is the type-erased GroupRows of a GroupBy projection over rows R.
type groupBy[R any] struct {
	row      Fold[R]
	group    func(R) string
	personal bool
}

// GroupBy defines a projection over groups of entities, as Kafka Streams'
// KTable groupBy/aggregate: every entity has a row R folded from its own
// events (row); group(R) names the group the entity belongs to now ("" for
// none); a group's state S adds the rows that join it and subtracts those
// that leave it. When an event changes an entity's row, its old row is
// subtracted from its old group and the new row added to its new group — so
// an account moving from one owner to another leaves the first owner's
// totals and joins the second's. add and subtract must be inverse:
// subtract(add(s, r), r) == s.
//
// The entity rows are kept in the projection's store and changelog,
// partitioned like the events; the group changes travel through the
// repartition topic "<app>-<name>-repartition" in the same transaction.
//
// Personal data: string fields of R tagged `esker:"pii"` are sealed with
// the entity's data key in the entity rows (store and changelog), so
// forgetting the entity makes every copy unreadable; row and group see them
// opened. add and subtract see them empty (and so does the repartition
// topic): a group mixes entities, so its fold must not depend on one
// entity's personal data, and a forgotten entity's row, whose fields no
// longer open, is subtracted as it was added. When group keys are personal
// (an owner's name), add PersonalKeys. The group state S must not hold
// personal fields (a group mixes entities, so no entity's key could seal
// it); GroupBy panics when it does.
func GroupBy[R, S any](name string, row Fold[R], group func(R) string, add, subtract func(S, R) S, opts ...Option) *Projection[S] {
	o := build(name, opts)
	if row == nil || group == nil || add == nil || subtract == nil {
		panic("projection: GroupBy needs row, group, add and subtract functions")
	}
	if o.key != nil {
		panic(fmt.Sprintf("projection %q: GroupBy keys rows by group; KeyBy does not apply", name))
	}
	noPersonalState[S](name)
	decodeRow := func(data []byte, what, key string) (R, error) {
		var r R
		err := json.Unmarshal(data, &r)
		if err != nil {
			err = fmt.Errorf("decode %s %q: %w", what, key, err)
		}
		return r, err
	}
	g := &groupBy[R]{row: row, group: group, personal: aggregate.HasPersonal(reflect.TypeFor[R]())}
	apply := func(state any, ch Change) (any, error) {
		s := state.(S)
		if ch.Old != nil {
			r, err := decodeRow(ch.Old, "a row leaving", ch.Key)
			if err != nil {
				return nil, err
			}
			s = subtract(s, r)
		}
		if ch.New != nil {
			r, err := decodeRow(ch.New, "a row joining", ch.Key)
			if err != nil {
				return nil, err
			}
			s = add(s, r)
		}
		return s, nil
	}
	return &Projection[S]{name: name, opts: o, groupBy: g, apply: apply}
}

func (g *groupBy[R]) Row(ev Event, prevRow []byte) (next []byte, group string, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("panicked folding the row of %q: %v", ev.EntityID, r)
		}
	}()
	if aggregate.IsForgotten(ev.Event) {
		return nil, "", nil
	}
	var prev R
	if prevRow != nil {
		if err := json.Unmarshal(prevRow, &prev); err != nil {
			return nil, "", fmt.Errorf("decode the row of %q: %w", ev.EntityID, err)
		}
	}
	r := g.row(prev, ev)
	if next, err = json.Marshal(r); err != nil {
		return nil, "", fmt.Errorf("encode the row of %q: %w", ev.EntityID, err)
	}
	return next, g.group(r), nil
}

func (g *groupBy[R]) Group(row []byte) (group string, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("panicked naming the group of a row: %v", r)
		}
	}()
	var r R
	if err := json.Unmarshal(row, &r); err != nil {
		return "", err
	}
	return g.group(r), nil
}

func (g *groupBy[R]) Personal() bool { return g.personal }

func (g *groupBy[R]) Seal(row []byte, c aggregate.FieldCipher) ([]byte, error) {
	return g.transform(row, c, aggregate.SealPersonal)
}

func (g *groupBy[R]) Open(row []byte, c aggregate.FieldCipher) ([]byte, error) {
	return g.transform(row, c, aggregate.OpenPersonal)
}

func (g *groupBy[R]) transform(row []byte, c aggregate.FieldCipher, fn func(any, aggregate.FieldCipher) (any, error)) ([]byte, error) {
	if !g.personal || row == nil {
		return row, nil
	}
	var r R
	if err := json.Unmarshal(row, &r); err != nil {
		return nil, err
	}
	out, err := fn(r, c)
	if err != nil {
		return nil, err
	}
	return json.Marshal(out)
}

// noPersonalState panics when a group state type has personal fields: a
// group mixes entities, so no one entity's key could seal it, and such a
// field would sit in plaintext in the changelog after its entity was
// forgotten.
func noPersonalState[S any](name string) {
	if aggregate.HasPersonal(reflect.TypeFor[S]()) {
		panic(fmt.Sprintf("projection %q: the group state %s has fields tagged esker:\"pii\"; a group mixes entities, so no entity's key can seal it: keep personal data in the entity rows", name, reflect.TypeFor[S]()))
	}
}
