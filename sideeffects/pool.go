package sideeffects

import (
	"context"
	"sync"
	"time"
)

// workerQueueDepth is how many events may wait for one worker. With the
// poll batch it bounds the events held in memory (and, at-most-once, the
// events committed but not yet handled).
const workerQueueDepth = 64

// pool runs events on a fixed set of workers. An event goes to the worker
// chosen by a hash of its record key, so the events of one key run one at a
// time in the order they were submitted (offset order within a partition),
// while different keys spread over the workers and run in parallel.
type pool struct {
	queues []chan *item
	wg     sync.WaitGroup
}

func startPool(workers int, work func(*item)) *pool {
	p := &pool{queues: make([]chan *item, workers)}
	for i := range p.queues {
		q := make(chan *item, workerQueueDepth)
		p.queues[i] = q
		p.wg.Go(func() {
			for it := range q {
				work(it)
			}
		})
	}
	return p
}

// route picks the worker of a record: FNV-1a of its key. Records without a
// key have no entity to keep in order; they are routed by partition, which
// keeps them in partition order among themselves.
func (p *pool) route(it *item) int {
	const offset32, prime32 = 2166136261, 16777619
	h := uint32(offset32)
	if it.rec.Key != nil {
		for _, c := range it.rec.Key {
			h = (h ^ uint32(c)) * prime32
		}
	} else {
		for i := 0; i < len(it.rec.Topic); i++ {
			h = (h ^ uint32(it.rec.Topic[i])) * prime32
		}
		h = (h ^ uint32(it.rec.Partition)) * prime32
	}
	return int(h % uint32(len(p.queues)))
}

// submit queues an event on its worker, waiting while that worker's queue
// is full. It returns false, without queueing, when ctx is done first.
func (p *pool) submit(ctx context.Context, it *item) bool {
	q := p.queues[p.route(it)]
	select {
	case q <- it:
		return true
	default:
	}
	select {
	case q <- it:
		return true
	case <-ctx.Done():
		return false
	}
}

// close stops accepting events and waits up to timeout for the workers to
// finish the queued ones. It reports whether they did; a handler that
// ignores its cancelled context can keep its worker beyond that.
func (p *pool) close(timeout time.Duration) bool {
	for _, q := range p.queues {
		close(q)
	}
	done := make(chan struct{})
	go func() {
		p.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-time.After(timeout):
		return false
	}
}
