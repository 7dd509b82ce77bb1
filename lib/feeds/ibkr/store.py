"""PostgreSQL side of feed-backfill: bars, session status, contracts, run log.

Tables are created by ``sql/0003_ibkr.sql`` (and ``sql/0012_ibkr_pacing.sql``:
what the ``auto`` pacing profile learned, :meth:`BackfillStore.learned_pacing`).  The collectors' batching
:class:`feeds.sink.Sink` is not used here: a session's bars and its status
row must commit in one transaction (a crash never leaves half a day), so
each session is one transaction on this module's own connection:

1. delete the session's bars (a refetch of a PARTIAL or ERROR session
   replaces what was there),
2. ``COPY`` the checked bars,
3. upsert the status row.

The status table, the run log and the lock are the shared backfill's
(:class:`feeds.backfill.StatusStore`); this module adds the bars and the
contracts.  One feed-backfill at a time: :meth:`BackfillStore.try_lock`
takes a session-level advisory lock.  Not thread-safe: use from one thread.
"""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence

from ..backfill import DONE_STATUSES as _SHARED_DONE
from ..backfill import StatusRow, StatusStore
from .bars import BAR_COLUMNS
from .pacing import LearnedPacing
from .sessions import Session

log = logging.getLogger(__name__)

__all__ = ["BackfillStore", "StatusRow", "DONE_STATUSES", "STATUSES"]

#: The statuses ``ibkr_session_status`` holds (a thin session is COMPLETE with a ``thin:`` note).
STATUSES = ("PENDING", "COMPLETE", "EARLY_CLOSE", "HOLIDAY", "PARTIAL", "ERROR")
#: Statuses a run never requests again.
DONE_STATUSES = _SHARED_DONE
_LOCK_KEY = 0x666565647342  # "feedsB"

_COPY = "COPY ibkr_bar_1min ({}) FROM STDIN".format(", ".join(BAR_COLUMNS))


class BackfillStore(StatusStore):
    """Database access for one feed-backfill process.

    ``dsn``: libpq connection string.  Methods raise ``psycopg.Error`` when
    the database fails.  Status and run-log methods: :class:`feeds.backfill.StatusStore`.
    """

    status_table = "ibkr_session_status"
    run_table = "ibkr_backfill_run"
    key_column = "symbol"
    id_column = "con_id"
    lock_key = _LOCK_KEY
    application_name = "feed-backfill"

    def connect(self) -> "BackfillStore":
        """Open the connection (see :meth:`feeds.backfill.StatusStore.connect`)."""
        return super().connect()

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

    # -------------------------------------------------------------- bars
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
            self.write_status(symbol, con_id, session, status, len(rows), first, last, error, note, attempts)

    # ------------------------------------------------------------ pacing
    def learned_pacing(self, endpoint: str, bar_size: str) -> LearnedPacing | None:
        """What ``auto`` pacing learned for TWS ``endpoint`` ("host:port")
        and ``bar_size`` (IB's barSizeSetting), or None.  A row that does
        not read back as a :class:`~feeds.ibkr.pacing.LearnedPacing` is
        logged and ignored (None)."""
        row = self.c.execute("SELECT profile, concurrency, learned_at, why FROM ibkr_pacing_learned "
                             "WHERE endpoint = %s AND bar_size = %s", (endpoint, bar_size)).fetchone()
        if row is None:
            return None
        try:
            return LearnedPacing.from_dict({"profile": row[0], "concurrency": row[1], "at": row[2], "why": row[3]})
        except ValueError as e:
            log.warning("ignoring the learned pacing of %s %s: %s", endpoint, bar_size, e)
            return None

    def save_learned_pacing(self, endpoint: str, bar_size: str, learned: LearnedPacing) -> None:
        """Replace the learned pacing of ``endpoint`` and ``bar_size``."""
        d = learned.to_dict()
        self.c.execute(
            """INSERT INTO ibkr_pacing_learned (endpoint, bar_size, profile, concurrency, learned_at, why,
                   updated_at) VALUES (%s, %s, %s, %s, %s, %s, now())
               ON CONFLICT (endpoint, bar_size) DO UPDATE SET profile = EXCLUDED.profile,
                   concurrency = EXCLUDED.concurrency, learned_at = EXCLUDED.learned_at, why = EXCLUDED.why,
                   updated_at = now()""",
            (endpoint, bar_size, d["profile"], d["concurrency"], learned.at, d["why"]))
