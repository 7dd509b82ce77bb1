"""Kite candles: ticks -> :class:`feeds.candles.CandleBuilder` -> ``kite_candle`` rows.

What counts as a trade, per tick (decided here, one rule for every mode):

* the price is the tick's ``last_price``; the time its exchange time when the
  tick carries one (full mode: ``last_trade_time``, else
  ``exchange_timestamp``), otherwise the frame's receive time;
* quote and full ticks carry Kite's cumulative day volume (``volume_traded``):
  a tick whose ``volume_traded`` did not change since the instrument's
  previous tick is not a trade (a depth or order-book update) and never
  moves a candle; the builder takes the volume as the rise of
  ``volume_traded`` (``volume="cumulative"``: the baseline is 0 at the
  session's open, a decrease is counted, never subtracted);
* LTP-mode ticks and index packets carry no volume: each of them is a
  price, counted in the candle, whose volume is NULL;
* exchange times are whole seconds: ticks of one instrument within the same
  second keep their order of arrival, so open and close are the first and
  last trade of the minute as Kite's own minute candles have them.

Candles are keyed by ``instrument_token``, aligned to the session's open
(09:15 IST) from the NSE calendar (:class:`feeds.kite.session.NseCalendar`
with ``kite.extra_sessions``); without a calendar (``session_calendar =
"none"``) one window per UTC day.  Prices travel as integer units of the
instrument's segment (paise for NSE equities) and are written as exact
decimal text, like the tick tables.

Threads: ticks arrive in the ticker's reactor thread (:meth:`KiteCandles.ticks`),
the close timer and the history fill run elsewhere; one lock guards the
builder.  Rows go to the collector's sink (``add_many`` may block:
back-pressure) outside the lock.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timezone

from .. import candles as C
from ..sink import Sink, Table
from ..timetext import time_text
from .adapter import SEGMENT_INDICES, divisor, price_text
from .instruments import Subscription

log = logging.getLogger(__name__)
UTC = timezone.utc
NS = 1_000_000_000

#: ``kite_candle`` (sql/0006_candles.sql), every column but ``stored_at``.
CANDLE_TABLE = Table("kite_candle", ("instrument_token", "interval_min", "bar_start", "bar_end", "open", "high",
                                     "low", "close", "volume", "ticks", "final", "revision", "source",
                                     "recorded_at"))


_TS: dict[str, int] = {}


def _ts_ns(text: str) -> int:
    """Exchange time text of a tick row (``2021-07-05 05:11:27+00:00``) -> epoch ns."""
    ns = _TS.get(text)
    if ns is None:
        if len(_TS) > 100_000:
            _TS.clear()
        ns = _TS[text] = int(datetime.fromisoformat(text).timestamp()) * NS
    return ns


def units(text: str) -> int:
    """Exact price text of a tick row (``"1573.70"``) -> integer units (157370)."""
    whole, _, frac = text.partition(".")
    return int(whole + frac)


def volumeless(sub: Subscription) -> bool:
    """True for an instrument whose ticks carry no volume: LTP mode, or an index."""
    return sub.mode == "ltp" or sub.instrument_token & 0xFF == SEGMENT_INDICES


class KiteCandles:
    """Candles of the collected instruments, written through ``sink``.

    ``ticks(rows, recv_ns)`` takes the rows of one frame (as the adapter
    made them for the three tick tables); ``close_due(now_ns)`` writes the
    candles the timer closes; ``close_all()`` writes the open ones
    (``final`` false) at shutdown; ``seed(token, bars, keep_from_ns)``
    writes history bars.  Each returns the number of rows written.
    ``since_ns``: when the process started (candles begun before it are not
    final).
    """

    def __init__(self, settings: C.CandleSettings, sessions: C.Sessions, subs: Iterable[Subscription], sink: Sink,
                 since_ns: int | None = None):
        self.s = settings
        self.sink = sink
        self.since_ns = since_ns
        self.builder = C.CandleBuilder(sessions, settings.intervals, grace_s=settings.grace,
                                       lateness_s=settings.lateness, volume="cumulative", since_ns=since_ns)
        self.subs = list(subs)
        self._last_volume: dict[int, int] = {}
        self._last_ts: dict[int, int] = {}
        self._lock = threading.Lock()
        self.not_trades = 0          # quote/full ticks whose volume_traded did not change
        self.rows_written = 0
        self.history_rows = 0
        self.sink_failure: str | None = None

    # ------------------------------------------------------------ ticks (reactor thread)
    def _time(self, tok: int, ts: int) -> int:
        """Kite's exchange times are whole seconds: ticks of one instrument
        in the same second keep their order of arrival (1 ns apart), so the
        candle's open and close are the first and last trade, as at Kite."""
        prev = self._last_ts.get(tok)
        if prev is not None and ts <= prev < ts + NS:
            ts = prev + 1
        if prev is None or ts > prev:
            self._last_ts[tok] = ts
        return ts

    def ticks(self, rows: tuple[list, list, list], recv_ns: int) -> None:
        ltp, quote, full = rows
        last = self._last_volume
        at = self._time
        with self._lock:
            cum = self.builder.cumulative
            for r in ltp:
                cum(r[0], at(r[0], recv_ns), units(r[1]), None)
            for r in (*quote, *full):
                tok, vol = r[0], r[4]
                if vol is not None:
                    if last.get(tok) == vol:        # no trade since the last tick: a quote change
                        self.not_trades += 1
                        continue
                    last[tok] = vol
                t = r[11] or r[15] if len(r) > 15 else None      # full mode: last trade or exchange time
                cum(tok, at(tok, _ts_ns(t) if t else recv_ns), units(r[1]), vol)

    # ------------------------------------------------------------ writing
    def _rows(self, candles: Iterable[C.Candle], recorded_ns: int, keep=None) -> list[tuple]:
        rec = time_text(recorded_ns)
        out = []
        for c in candles:
            if keep is not None and not keep(c):
                continue
            div = divisor(c.key)
            out.append((c.key, c.interval_min, time_text(c.start_ns), time_text(c.end_ns),
                        price_text(c.open, div), price_text(c.high, div), price_text(c.low, div),
                        price_text(c.close, div), c.volume, c.ticks, c.final, c.revision, c.source, rec))
        return out

    def _write(self, rows: list[tuple]) -> int:
        if rows:
            try:
                self.sink.add_many(CANDLE_TABLE.name, rows)
            except RuntimeError as e:       # the sink is closed or its writer died
                self.sink_failure = f"sink refused candle rows: {e}"
                return 0
            self.rows_written += len(rows)
        return len(rows)

    def next_due_ns(self) -> int | None:
        with self._lock:
            return self.builder.next_due_ns()

    def close_due(self, now_ns: int | None = None) -> int:
        """Write the candles due at ``now_ns`` (default: now)."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            done = self.builder.due(now_ns)
        return self._write(self._rows(done, now_ns))

    def close_all(self) -> int:
        """Write every open candle, ``final`` false (at shutdown)."""
        with self._lock:
            done = self.builder.close_all()
        return self._write(self._rows(done, time.time_ns()))

    def seed(self, token: int, bars: list[tuple], keep_from_ns: int, until_ns: int | None = None,
             now_ns: int | None = None) -> int:
        """Write history ``bars`` of ``token`` (see :mod:`feeds.kite.history`)
        and the larger candles they complete; one-minute candles before
        ``keep_from_ns`` (stored final already) are not written again.
        ``until_ns``: the history covers every minute before it.  The
        candles due now are closed first, so that a live minute past its
        lateness gives way to its history bar (``now_ns``: default now)."""
        now = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            due = self.builder.due(now)
            done = self.builder.seed(token, bars, until_ns=until_ns)
        n = self._write(self._rows(due, now))
        # a microsecond later: never the same key (token, interval, start, recorded_at) as a row just written
        h = self._write(self._rows(done, now + 1000,
                                   keep=lambda c: c.interval_min != 1 or c.start_ns >= keep_from_ns))
        self.history_rows += h
        return n + h

    def figures(self) -> dict[str, int]:
        """Candle counters for STATUS= and the heartbeat."""
        with self._lock:
            st = dict(self.builder.stats)
        return {"candles": self.rows_written, "candles from history": self.history_rows,
                "late revised": st.get("late_revised", 0), "late dropped": st.get("late_dropped", 0)}
