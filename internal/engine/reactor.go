package engine

import (
	"errors"
	"strconv"

	"github.com/esker-io/esker/aggregate"
	"github.com/esker-io/esker/projection"
)

// Reactor is a process manager the engine runs (a *sideeffects.Reactor):
// each event of its sources becomes commands, produced in the transaction
// that consumes the event.
type Reactor interface {
	Name() string
	Sources() []projection.Source
	Start() projection.Start
	Decode(ev *projection.Event) error
	React(ev projection.Event) ([]aggregate.Addressed, error)
}

// reactorTask runs a reactor as a projection task without rows: it shares
// the projections' inputs, input offsets, changelog, restore and standbys,
// and its handle sends commands instead of folding (projCycle.react).
type reactorTask struct{ Reactor }

func (reactorTask) Rekeys() bool                  { return false }
func (reactorTask) PersonalKeys() bool            { return false }
func (reactorTask) PersonalRows() string          { return "" }
func (reactorTask) GroupBy() projection.GroupRows { return nil }
func (reactorTask) NewState() any                 { return nil }
func (reactorTask) Empty(any) bool                { return false }

func (reactorTask) Route(projection.Event) ([]projection.Change, error) { return nil, nil }

func (reactorTask) Apply(any, projection.Change) (any, error) {
	return nil, errors.New("a reactor has no rows")
}
func (reactorTask) EncodeState(any) ([]byte, error) { return nil, errors.New("a reactor has no rows") }
func (reactorTask) DecodeState([]byte) (any, error) { return nil, errors.New("a reactor has no rows") }

// react sends the commands one event causes. Their ids derive from the
// event (its id, or its position for records without one), the reactor and
// the command's index, so a re-processed event sends the same ids.
func (pc *projCycle) react(rt reactorTask, ev projection.Event) {
	sends, err := rt.React(ev)
	if err != nil {
		pc.count("failed")
		pc.c.e.log.Error("reactor failed on an event; skipped", "reactor", rt.Name(), "topic", ev.Topic, "partition", ev.Partition, "offset", ev.Offset, "err", err)
		return
	}
	if len(sends) == 0 {
		pc.count("skipped")
		return
	}
	cause := ev.EventID
	if cause == "" {
		cause = ev.Topic + "-" + strconv.Itoa(int(ev.Partition)) + "-" + strconv.FormatInt(ev.Offset, 10)
	}
	sent := 0
	for i, s := range sends {
		if err := aggregate.ValidateEntityID(s.ID); err != nil || s.Type == "" || s.Command.Type == "" {
			pc.count("failed")
			pc.c.e.log.Error("reactor sent an invalid command; not sent", "reactor", rt.Name(), "type", s.Type, "id", s.ID, "command", s.Command.Type, "err", err)
			continue
		}
		cmd := s.Command
		cmd.CommandID = cause + "/" + rt.Name() + "/" + strconv.Itoa(i)
		cmd.CausationID = orDefault(ev.EventID, cause)
		cmd.CorrelationID = orDefault(ev.CorrelationID, cmd.CausationID)
		if def, ok := pc.c.e.types[s.Type]; ok && pc.c.e.cfg.Keys != nil && def.Personal() {
			// A plaintext copy on the commands topic would outlive forgetting.
			data, err := def.SealCommand(cmd.Type, cmd.Data, pc.c.e.cfg.Keys.Cipher(pc.c.ctx, s.Type, s.ID))
			if err != nil {
				pc.count("failed")
				pc.c.e.log.Error("reactor command's personal fields cannot be sealed; not sent", "reactor", rt.Name(), "type", s.Type, "id", s.ID, "command", cmd.Type, "err", err)
				continue
			}
			cmd.Data = data
		}
		rec := CommandRecord(s.Type, s.ID, aggregate.Partition(s.ID, pc.c.e.cfg.Partitions), cmd)
		rec.Timestamp = pc.c.now
		pc.produce(rec, false)
		sent++
	}
	pc.countN("sent", sent)
}
