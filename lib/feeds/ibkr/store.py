"""PostgreSQL side of feed-backfill: bars, session status, contracts, run log.

Tables are created by ``sql/0003_ibkr.sql``.  The collectors' batching
:class:`feeds.sink.Sink` is not used here: a session's bars and its status
row must commit in one transaction (a crash never leaves half a day), so
each session is one transaction on this module's own connection:

1. delete the session's bars (a refetch of a PARTIAL or ERROR session
   replaces what was there),
2. ``COPY`` the checked bars,
3. upsert the status row.

One feed-backfill at a time: :meth:`BackfillStore.try_lock` takes a
session-level advisory lock.  Not thread-safe: use from one thread.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psycopg

from ..db import connect
from .bars import BAR_COLUMNS
from .sessions import Session

log = logging.getLogger(__name__)

__all__ = ["BackfillStore", "StatusRow", "DONE_STATUSES", "STATUSES"]

STATUSES = ("PENDING", "COMPLETE", "EARLY_CLOSE", "HOLIDAY", "PARTIAL", "ERROR")
#: Statuses a run never requests again.
DONE_STATUSES = frozenset({"COMPLETE", "EARLY_CLOSE", "HOLIDAY"})
_LOCK_KEY = 0x666565647342  # "feedsB"

_COPY = "COPY ibkr_bar_1min ({}) FROM STDIN".format(", ".join(BAR_COLUMNS))
_UPSERT = """
INSERT INTO ibkr_session_status AS s (symbol, session_date, con_id, status, session_open, session_close,
    expected_bars, actual_bars, first_bar, last_bar, error, note, attempts, updated_at)
VALUES (%(symbol)s, %(day)s, %(con_id)s, %(status)s, %(open)s, %(close)s, %(expected)s, %(actual)s,
    %(first)s, %(last)s, %(error)s, %(note)s, %(attempts)s, now())
ON CONFLICT (symbol, session_date) DO UPDATE SET
    con_id = COALESCE(EXCLUDED.con_id, s.con_id), status = EXCLUDED.status,
    session_open = EXCLUDED.session_open, session_close = EXCLUDED.session_close,
    expected_bars = EXCLUDED.expected_bars, actual_bars = EXCLUDED.actual_bars,
    first_bar = EXCLUDED.first_bar, last_bar = EXCLUDED.last_bar,
    error = COALESCE(EXCLUDED.error, s.error), note = EXCLUDED.note,
    attempts = s.attempts + EXCLUDED.attempts, updated_at = now()
"""


@dataclass(frozen=True)
class StatusRow:
    """One ``ibkr_session_status`` row (the fields a plan needs)."""

    symbol: str
    day: dt.date
    status: str
    attempts: int
    error: str | None


class BackfillStore:
    """Database access for one feed-backfill process.

    ``dsn``: libpq connection string.  Methods raise ``psycopg.Error`` when
    the database fails.
    """

    def __init__(self, dsn: str, connect_timeout: int = 10):
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.conn: psycopg.Connection | None = None

    def connect(self) -> "BackfillStore":
        """Open the connection (:func:`feeds.db.connect`: autocommit, transactions
        are explicit; statements limited to 60 s, lock waits to 10 s).  Idempotent."""
        if self.conn is None or self.conn.closed:
            # A session's delete, COPY and status upsert take well under a second; the limits only
            # keep a stuck server or a held lock from stalling the run forever.
            self.conn = connect(self.dsn, application_name="feed-backfill", statement_timeout=60.0,
                                lock_timeout=10.0, connect_timeout=self.connect_timeout)
        return self

    def close(self) -> None:
        """Close the connection (which also releases the advisory lock)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    @property
    def c(self) -> psycopg.Connection:
        """The open connection (reconnects when it was closed)."""
        if self.conn is None or self.conn.closed:
            self.connect()
        assert self.conn is not None
        return self.conn

    # ---------------------------------------------------------------- lock
    def try_lock(self) -> bool:
        """Take the advisory lock that makes this the only running
        feed-backfill; False when another session holds it (this session may
        take it again: the lock counts)."""
        return bool(self.c.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_KEY,)).fetchone()[0])

    # ------------------------------------------------------------- run log
    def start_run(self, arguments: str, client_id: int | None) -> int:
        """Insert a run row (state running); runs left ``running`` by a
        killed process are marked ``interrupted`` first.  Returns run_id."""
        with self.c.transaction():
            self.c.execute("""UPDATE ibkr_backfill_run SET state = 'interrupted'
                               WHERE state = 'running' AND finished_at IS NULL""")
            row = self.c.execute(
                """INSERT INTO ibkr_backfill_run (host, pid, client_id, arguments)
                   VALUES (%s, %s, %s, %s) RETURNING run_id""",
                (socket.gethostname(), os.getpid(), client_id, arguments)).fetchone()
        return int(row[0])

    def update_run(self, run_id: int, *, finished: bool = False, state: str | None = None, **counts) -> None:
        """Update counters (sessions_planned, sessions_done, requests,
        bars_stored, errors, pacing_violations, reconnects, summary,
        client_id); ``finished`` sets finished_at."""
        sets, vals = [], []
        for k, v in counts.items():
            sets.append(f"{k} = %s")
            vals.append(v)
        if state:
            sets.append("state = %s")
            vals.append(state)
        if finished:
            sets.append("finished_at = now()")
        if not sets:
            return
        self.c.execute(f"UPDATE ibkr_backfill_run SET {', '.join(sets)} WHERE run_id = %s", (*vals, run_id))

    # ----------------------------------------------------------- contracts
    def save_contract(self, symbol: str, con_id: int | None, sec_type: str, exchange: str, primary: str,
                      currency: str, time_zone: str | None, calendar: str,
                      head: dt.datetime | None) -> None:
        """Upsert the contract as IB resolved it (NULL con_id/head keep the stored values)."""
        self.c.execute(
            """INSERT INTO ibkr_contract AS c (symbol, con_id, sec_type, exchange, primary_exchange, currency,
                   time_zone, calendar, head_timestamp, updated_at)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, now())
               ON CONFLICT (symbol) DO UPDATE SET con_id = COALESCE(EXCLUDED.con_id, c.con_id),
                   sec_type = EXCLUDED.sec_type, exchange = EXCLUDED.exchange,
                   primary_exchange = EXCLUDED.primary_exchange, currency = EXCLUDED.currency,
                   time_zone = COALESCE(EXCLUDED.time_zone, c.time_zone), calendar = EXCLUDED.calendar,
                   head_timestamp = COALESCE(EXCLUDED.head_timestamp, c.head_timestamp), updated_at = now()""",
            (symbol, con_id, sec_type, exchange, primary, currency, time_zone, calendar, head))

    def cached_heads(self) -> dict[str, tuple[int | None, dt.datetime | None]]:
        """``{symbol: (con_id, head_timestamp)}`` from earlier runs."""
        return {r[0]: (r[1], r[2]) for r in
                self.c.execute("SELECT symbol, con_id, head_timestamp FROM ibkr_contract").fetchall()}

    # -------------------------------------------------------------- status
    def statuses(self, symbols: Iterable[str], first: dt.date, last: dt.date) -> dict[tuple[str, dt.date], StatusRow]:
        """Existing status rows of ``symbols`` between ``first`` and ``last``."""
        rows = self.c.execute(
            """SELECT symbol, session_date, status, attempts, error FROM ibkr_session_status
                WHERE symbol = ANY(%s) AND session_date BETWEEN %s AND %s""",
            (list(symbols), first, last)).fetchall()
        return {(r[0], r[1]): StatusRow(*r) for r in rows}

    def mark_pending(self, items: Sequence[tuple[str, int | None, Session]]) -> int:
        """Insert PENDING rows for planned sessions that have none yet
        (``(symbol, con_id, session)``); returns the rows inserted."""
        if not items:
            return 0
        with self.c.transaction():
            with self.c.cursor() as cur:
                cur.executemany(
                    """INSERT INTO ibkr_session_status (symbol, session_date, con_id, status, session_open,
                           session_close, expected_bars)
                       VALUES (%s, %s, %s, 'PENDING', %s, %s, %s) ON CONFLICT DO NOTHING""",
                    [(sym, s.day, cid, s.open, s.close, s.expected_bars) for sym, cid, s in items])
                return cur.rowcount if cur.rowcount >= 0 else 0

    def mark_holidays(self, items: Sequence[tuple[str, int | None, dt.date]]) -> None:
        """Record HOLIDAY rows (``(symbol, con_id, day)``); no bars, no request."""
        if not items:
            return
        with self.c.transaction():
            with self.c.cursor() as cur:
                cur.executemany(
                    """INSERT INTO ibkr_session_status AS s (symbol, con_id, session_date, status, note)
                       VALUES (%s, %s, %s, 'HOLIDAY', 'exchange calendar: no session')
                       ON CONFLICT (symbol, session_date) DO UPDATE SET status = 'HOLIDAY',
                           note = EXCLUDED.note, updated_at = now()
                       WHERE s.status <> 'HOLIDAY'""",
                    list(items))

    def commit_session(self, symbol: str, con_id: int | None, session: Session, status: str,
                       rows: Sequence[tuple], first: dt.datetime | None, last: dt.datetime | None,
                       error: str | None, note: str | None, attempts: int = 0) -> None:
        """Replace the session's bars with ``rows`` and write its status, in
        one transaction.  ``attempts`` is added to the stored count
        (requests are counted by :meth:`note_request`)."""
        with self.c.transaction():
            self.c.execute("DELETE FROM ibkr_bar_1min WHERE symbol = %s AND bar_start >= %s AND bar_start < %s",
                           (symbol, session.open, session.close))
            if rows:
                with self.c.cursor().copy(_COPY) as cp:
                    for r in rows:
                        cp.write_row(r)
            self.c.execute(_UPSERT, dict(symbol=symbol, day=session.day, con_id=con_id, status=status,
                                         open=session.open, close=session.close,
                                         expected=session.expected_bars, actual=len(rows), first=first,
                                         last=last, error=error, note=note or None, attempts=attempts))

    def record_error(self, symbol: str, con_id: int | None, session: Session, status: str, error: str,
                     attempts: int = 0) -> None:
        """Record an error against a session without touching its bars:
        ``status`` PENDING (transient, will be retried) or ERROR."""
        self.c.execute(
            """INSERT INTO ibkr_session_status AS s (symbol, session_date, con_id, status, session_open,
                   session_close, expected_bars, error, attempts)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (symbol, session_date) DO UPDATE SET status = EXCLUDED.status,
                   con_id = COALESCE(EXCLUDED.con_id, s.con_id), error = EXCLUDED.error,
                   expected_bars = EXCLUDED.expected_bars,
                   attempts = s.attempts + EXCLUDED.attempts, updated_at = now()
               WHERE s.status NOT IN ('COMPLETE', 'EARLY_CLOSE', 'HOLIDAY')""",
            (symbol, session.day, con_id, status, session.open, session.close, session.expected_bars, error,
             attempts))

    def note_request(self, symbol: str, con_id: int | None, session: Session) -> None:
        """Count a historical request about to be sent for the session and
        remember when (``requested_at``)."""
        self.c.execute(
            """INSERT INTO ibkr_session_status AS s (symbol, session_date, con_id, status, session_open,
                   session_close, expected_bars, attempts, requested_at)
               VALUES (%s, %s, %s, 'PENDING', %s, %s, %s, 1, now())
               ON CONFLICT (symbol, session_date) DO UPDATE SET attempts = s.attempts + 1, requested_at = now()""",
            (symbol, session.day, con_id, session.open, session.close, session.expected_bars))

    def recent_requests(self, seconds: float) -> list[tuple[str, dt.date, float]]:
        """Requests sent in the last ``seconds`` (by any run):
        ``(symbol, session_date, age in seconds)``, oldest first."""
        return [(r[0], r[1], float(r[2])) for r in self.c.execute(
            """SELECT symbol, session_date, extract(epoch FROM now() - requested_at) FROM ibkr_session_status
                WHERE requested_at > now() - make_interval(secs => %s) ORDER BY requested_at""",
            (seconds,)).fetchall()]

    # -------------------------------------------------------------- status report
    def summary(self, symbols: Sequence[str] | None = None) -> list[dict]:
        """Per-symbol counts by status, first/last session and bars stored
        (for ``--status``), sorted by symbol."""
        where = "WHERE symbol = ANY(%(s)s)" if symbols else ""
        rows = self.c.execute(f"""
            SELECT symbol,
                   count(*) FILTER (WHERE status = 'COMPLETE'),
                   count(*) FILTER (WHERE status = 'EARLY_CLOSE'),
                   count(*) FILTER (WHERE status = 'HOLIDAY'),
                   count(*) FILTER (WHERE status = 'PARTIAL'),
                   count(*) FILTER (WHERE status = 'ERROR'),
                   count(*) FILTER (WHERE status = 'PENDING'),
                   count(*) FILTER (WHERE status IN ('COMPLETE', 'EARLY_CLOSE') AND actual_bars < expected_bars),
                   min(session_date) FILTER (WHERE status IN ('COMPLETE', 'EARLY_CLOSE', 'PARTIAL')),
                   max(session_date) FILTER (WHERE status IN ('COMPLETE', 'EARLY_CLOSE', 'PARTIAL')),
                   coalesce(sum(actual_bars), 0),
                   max(updated_at)
              FROM ibkr_session_status {where} GROUP BY symbol ORDER BY symbol""",
                              {"s": list(symbols or [])}).fetchall()
        keys = ("symbol", "COMPLETE", "EARLY_CLOSE", "HOLIDAY", "PARTIAL", "ERROR", "PENDING", "thin",
                "first", "last", "bars", "updated")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def last_errors(self, symbols: Sequence[str] | None = None, limit: int = 10) -> list[tuple]:
        """The newest ERROR rows: (symbol, session_date, error)."""
        where = "AND symbol = ANY(%(s)s)" if symbols else ""
        return self.c.execute(f"""SELECT symbol, session_date, error FROM ibkr_session_status
                                   WHERE status = 'ERROR' {where}
                                   ORDER BY session_date DESC, symbol LIMIT %(n)s""",
                              {"s": list(symbols or []), "n": limit}).fetchall()

    def last_run(self) -> tuple | None:
        """(run_id, started_at, finished_at, state, requests, bars_stored, errors, summary) of the newest run."""
        return self.c.execute("""SELECT run_id, started_at, finished_at, state, requests, bars_stored, errors,
                                        summary FROM ibkr_backfill_run ORDER BY run_id DESC LIMIT 1""").fetchone()
