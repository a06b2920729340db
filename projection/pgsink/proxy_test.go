package pgsink_test

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// pgProxy is a TCP proxy in front of PostgreSQL that a test can stop (the
// database becomes unreachable: connections are cut and new ones refused)
// and start again on the same address. When armed, it forwards the next
// COMMIT to the server, waits for the server's answer and cuts the
// connection instead of passing it on: the transaction is committed and the
// client does not know.
type pgProxy struct {
	t      testing.TB
	target string
	addr   string

	mu    sync.Mutex
	ln    net.Listener
	conns map[net.Conn]bool

	armed        atomic.Bool
	lostCommits  atomic.Int32
	sawSSLorGSS  atomic.Bool
	acceptedConn atomic.Int32
}

func newProxy(t testing.TB, target string) *pgProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &pgProxy{t: t, target: target, addr: ln.Addr().String(), conns: map[net.Conn]bool{}}
	p.serve(ln)
	t.Cleanup(p.stop)
	return p
}

func (p *pgProxy) serve(ln net.Listener) {
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.acceptedConn.Add(1)
			go p.pipe(c)
		}
	}()
}

// stop closes the listener and cuts every connection.
func (p *pgProxy) stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for c := range p.conns {
		c.Close()
	}
	p.conns = map[net.Conn]bool{}
}

// start listens again on the same address.
func (p *pgProxy) start() {
	p.t.Helper()
	var ln net.Listener
	var err error
	for range 100 {
		if ln, err = net.Listen("tcp", p.addr); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		p.t.Fatalf("proxy: listening again on %s: %v", p.addr, err)
	}
	p.serve(ln)
}

func (p *pgProxy) track(cs ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln == nil {
		for _, c := range cs {
			c.Close()
		}
		return false
	}
	for _, c := range cs {
		p.conns[c] = true
	}
	return true
}

func (p *pgProxy) pipe(client net.Conn) {
	server, err := net.Dial("tcp", p.target)
	if err != nil {
		client.Close()
		return
	}
	if !p.track(client, server) {
		return
	}
	var swallow atomic.Bool         // the server's answers are no longer forwarded
	answered := make(chan struct{}) // closed when the server answers the swallowed COMMIT
	var answeredOnce sync.Once
	closeBoth := func() { client.Close(); server.Close() }
	go func() { // server -> client
		defer closeBoth()
		defer answeredOnce.Do(func() { close(answered) }) // no answer will come
		buf := make([]byte, 32<<10)
		for {
			n, err := server.Read(buf)
			if n > 0 && swallow.Load() {
				// The client sends COMMIT after reading every earlier
				// answer, so these bytes answer it: the server is done.
				answeredOnce.Do(func() { close(answered) })
			} else if n > 0 {
				if _, werr := client.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	// client -> server, message by message.
	defer closeBoth()
	// Untyped messages first: SSL or GSS encryption requests, then the
	// startup message.
	for {
		var hdr [8]byte
		if _, err := io.ReadFull(client, hdr[:]); err != nil {
			return
		}
		n := int(binary.BigEndian.Uint32(hdr[:4]))
		body := make([]byte, n-8)
		if _, err := io.ReadFull(client, body); err != nil {
			return
		}
		if _, err := server.Write(append(hdr[:], body...)); err != nil {
			return
		}
		code := binary.BigEndian.Uint32(hdr[4:])
		if code == 80877103 || code == 80877104 { // SSLRequest, GSSENCRequest
			p.sawSSLorGSS.Store(true)
			continue
		}
		break
	}
	for {
		var hdr [5]byte
		if _, err := io.ReadFull(client, hdr[:]); err != nil {
			return
		}
		n := int(binary.BigEndian.Uint32(hdr[1:]))
		body := make([]byte, n-4)
		if _, err := io.ReadFull(client, body); err != nil {
			return
		}
		isCommit := hdr[0] == 'Q' && strings.EqualFold(strings.TrimSpace(string(bytes.TrimRight(body, "\x00"))), "commit")
		if isCommit && p.armed.CompareAndSwap(true, false) {
			swallow.Store(true)
			server.Write(append(hdr[:], body...))
			select { // the server commits and answers
			case <-answered:
			case <-time.After(30 * time.Second):
				p.t.Errorf("proxy: PostgreSQL did not answer a COMMIT within 30s")
			}
			p.lostCommits.Add(1)
			return
		}
		if _, err := server.Write(append(hdr[:], body...)); err != nil {
			return
		}
	}
}
