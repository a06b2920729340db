package pgsink

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"

	"github.com/jackc/pgx/v5/pgconn"
)

// transient reports whether err is a failure of the database connection or
// a conflict that a new attempt can get past: the batch is retried. Any
// other error (an SQL error in the user's statements, a constraint
// violation, an error the ApplyFunc made up) is permanent: retrying would
// fail the same way.
func transient(err error) bool {
	if err == nil {
		return false
	}
	if errors.As(err, new(connLost)) {
		return true
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		code := pgErr.Code
		switch {
		case pgErr.Severity == "FATAL" || pgErr.Severity == "PANIC": // the server ended the session
			return true
		case code == "25P03": // idle_in_transaction_session_timeout
			return true
		case strings.HasPrefix(code, "08"): // connection exception
			return true
		case strings.HasPrefix(code, "40"): // serialization failure, deadlock
			return true
		case strings.HasPrefix(code, "53"): // insufficient resources (too many connections, disk full)
			return true
		case strings.HasPrefix(code, "57P"): // admin shutdown, crash shutdown, cannot connect now
			return true
		case code == "57014": // query canceled (statement_timeout, our TxTimeout)
			return true
		case strings.HasPrefix(code, "58"): // system error (I/O)
			return true
		case code == "55P03": // lock not available (lock_timeout)
			return true
		case code == "25006": // read-only transaction: a fail-over to a standby is under way
			return true
		}
		return false
	}
	var connectErr *pgconn.ConnectError
	var netErr net.Error
	switch {
	case errors.As(err, &connectErr),
		errors.As(err, &netErr),
		errors.Is(err, io.EOF),
		errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, net.ErrClosed),
		errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, syscall.ECONNREFUSED),
		errors.Is(err, syscall.EPIPE),
		errors.Is(err, context.DeadlineExceeded),
		pgconn.SafeToRetry(err),
		pgconn.Timeout(err):
		return true
	}
	// pgx reports a connection that died earlier as "conn closed".
	return strings.Contains(err.Error(), "conn closed")
}

// conflict reports whether err is a conflict with another transaction
// (serialization failure, deadlock, lock timeout): retried like a
// connection failure, but the database is reachable.
func conflict(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (strings.HasPrefix(pgErr.Code, "40") || pgErr.Code == "55P03")
}

// connLost wraps an error after which the transaction's connection was
// closed: whatever the error says, the database connection failed.
type connLost struct{ error }

func (c connLost) Unwrap() error { return c.error }
