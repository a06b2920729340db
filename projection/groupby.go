package projection

import (
	"bytes"
	"encoding/json"
	"fmt"

	"github.com/esker-io/esker/aggregate"
)

// groupBy is the type-erased core of a GroupBy projection.
type groupBy struct {
	route func(ev Event, prevRow []byte) ([]Change, []byte, bool, error)
	apply func(state any, ch Change) (any, error)
}

// GroupBy defines a projection over groups of entities, as Kafka Streams'
// KTable groupBy/aggregate: every entity has a row R folded from its own
// events (row); group(R) names the group the entity belongs to now ("" for
// none); a group's state S adds the rows that join it and subtracts those
// that leave it. When an event changes an entity's row, its old row is
// subtracted from its old group and the new row added to its new group — so
// an account moving from one owner to another leaves the first owner's
// totals and joins the second's.
//
// The entity rows are kept in the projection's store and changelog,
// partitioned like the events; the group changes travel through the
// repartition topic "<app>-<name>-repartition" in the same transaction. add
// and subtract must be inverse: subtract(add(s, r), r) == s.
func GroupBy[R, S any](name string, row Fold[R], group func(R) string, add, subtract func(S, R) S, opts ...Option) *Projection[S] {
	o := build(name, opts)
	if row == nil || group == nil || add == nil || subtract == nil {
		panic("projection: GroupBy needs row, group, add and subtract functions")
	}
	if o.key != nil {
		panic(fmt.Sprintf("projection %q: GroupBy keys rows by group; KeyBy does not apply", name))
	}
	g := &groupBy{
		route: func(ev Event, prevRow []byte) ([]Change, []byte, bool, error) {
			var prev R
			if prevRow != nil {
				if err := json.Unmarshal(prevRow, &prev); err != nil {
					return nil, nil, false, fmt.Errorf("decode the row of %q: %w", ev.EntityID, err)
				}
			}
			if aggregate.IsForgotten(ev.Event) {
				// The entity leaves its group and its row is deleted.
				if prevRow == nil {
					return nil, nil, false, nil
				}
				var changes []Change
				if key := group(prev); key != "" {
					changes = append(changes, Change{Key: key, Old: prevRow})
				}
				return changes, nil, true, nil
			}
			next := row(prev, ev)
			nextRow, err := json.Marshal(next)
			if err != nil {
				return nil, nil, false, fmt.Errorf("encode the row of %q: %w", ev.EntityID, err)
			}
			if bytes.Equal(prevRow, nextRow) {
				return nil, nil, false, nil
			}
			oldKey, newKey := "", group(next)
			if prevRow != nil {
				oldKey = group(prev)
			}
			var changes []Change
			switch {
			case oldKey != "" && oldKey == newKey:
				changes = append(changes, Change{Key: newKey, Old: prevRow, New: nextRow})
			default:
				if oldKey != "" {
					changes = append(changes, Change{Key: oldKey, Old: prevRow})
				}
				if newKey != "" {
					changes = append(changes, Change{Key: newKey, New: nextRow})
				}
			}
			return changes, nextRow, true, nil
		},
		apply: func(state any, ch Change) (any, error) {
			s := state.(S)
			if ch.Old != nil {
				var r R
				if err := json.Unmarshal(ch.Old, &r); err != nil {
					return nil, fmt.Errorf("decode a row leaving %q: %w", ch.Key, err)
				}
				s = subtract(s, r)
			}
			if ch.New != nil {
				var r R
				if err := json.Unmarshal(ch.New, &r); err != nil {
					return nil, fmt.Errorf("decode a row joining %q: %w", ch.Key, err)
				}
				s = add(s, r)
			}
			return s, nil
		},
	}
	return &Projection[S]{name: name, opts: o, groupBy: g}
}
