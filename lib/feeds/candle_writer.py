"""A collector's candles: its trades -> :class:`feeds.candles.CandleBuilder`
-> rows of the venue's candle table, written through the collector's sink.

:class:`CandleWriter` is what every venue's candles do alike; a venue's
subclass (:class:`feeds.kite.candles.KiteCandles`,
:class:`feeds.dhan.candles.DhanCandles`) decides which of its packets are
trades, passes each one's key, time, price and volume to
:meth:`CandleWriter._fold`, and names its table, the leading
columns of a row and the price decimals of an instrument.

The rules of a trade shared by the venues whose packets carry the day's
cumulative volume:

* a packet whose cumulative volume did not change since the instrument's
  previous one is no trade (a quote or depth change) and never moves a
  candle (counted in ``not_trades``);
* exchange times are whole seconds: trades of one instrument within the
  same second keep their order of arrival, 1 ns apart, so open and close
  are the first and last trade of the minute.

Both are :meth:`CandleWriter._fold`, through which a subclass passes each
packet.

Rows: the subclass's leading columns, then ``interval_min, bar_start,
bar_end, open, high, low, close, volume, ticks, final, revision, source,
recorded_at``; times as :func:`feeds.timetext.time_text`, prices (integer
units of 10**-d of the currency) as exact decimal text (:func:`units_text`).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Iterable
from contextlib import nullcontext

from . import candles as C
from .sink import Sink, Table
from .timetext import time_text

NS = 1_000_000_000

#: A history bar as :meth:`CandleWriter.seed` takes it:
#: ``(start_ns, open, high, low, close, volume or None, ticks)``, prices in integer units.
Bar = tuple


def units_text(units: int, decimals: int) -> str:
    """Integer units of 10**-decimals (>= 0) as exact decimal text (165045, 2 -> "1650.45")."""
    whole, frac = divmod(units, 10 ** decimals)
    return f"{whole}.{frac:0{decimals}d}"


class CandleWriter:
    """Candles of one collector's instruments, written through ``sink`` into
    :attr:`table` (cumulative volume: ``volume="cumulative"`` of the
    builder).  ``since_ns``: when the process started (candles begun before
    it are not final).

    ``close_due(now_ns)`` writes the candles the clock closes;
    ``close_all()`` the open ones (``final`` false) at the stop;
    ``seed(key, bars, keep_from_ns)`` history bars.  Each returns the number
    of rows written.  A sink that refuses rows (closed, or its writer died)
    raises nothing here: the rows are not counted and ``sink_failure`` says
    why, for the collector to stop on.

    Subclasses set :attr:`table` and :attr:`locked`, and give
    :meth:`lead` and :meth:`decimals`.  ``locked``: the builder is used
    from more than one thread (a ticker thread and the event loop); every
    method here then holds ``_lock`` while it touches the builder, and so
    must the subclass around :meth:`_fold`.  Rows go to the sink (whose
    ``add_many`` may block: back-pressure) outside the lock."""

    #: the candle table, every column but ``stored_at``
    table: Table
    #: True when the builder is used from more than one thread
    locked: bool = False

    def __init__(self, settings: C.CandleSettings, sessions: C.Sessions, sink: Sink, since_ns: int | None = None):
        self.s = settings
        self.sink = sink
        self.since_ns = since_ns
        self.builder = C.CandleBuilder(sessions, settings.intervals, grace_s=settings.grace,
                                       lateness_s=settings.lateness, volume="cumulative", since_ns=since_ns)
        self._cumulative = self.builder.cumulative
        self._lock = threading.Lock() if self.locked else nullcontext()
        self._last_volume: dict[Hashable, int] = {}
        self._last_ts: dict[Hashable, int] = {}
        self.not_trades = 0          # packets whose cumulative volume did not change
        self.rows_written = 0
        self.history_rows = 0
        self.sink_failure: str | None = None

    # ------------------------------------------------------------ a venue's part
    def lead(self, key: Hashable) -> tuple:
        """The leading columns of a row of the instrument ``key``."""
        raise NotImplementedError

    def decimals(self, key: Hashable) -> int:
        """The price decimals of ``key``: its prices are integer units of 10**-decimals."""
        raise NotImplementedError

    # ------------------------------------------------------------ the rules of a trade
    def _fold(self, key: Hashable, ts_ns: int, price: int, volume: int | None, now_ns: int | None = None) -> None:
        """Fold a packet of ``key`` at ``ts_ns`` (epoch ns, the exchange's
        whole second or the receive time) with ``price`` (integer units) and
        the day's cumulative ``volume`` (None: the packet carries none) into
        the builder (:meth:`feeds.candles.CandleBuilder.cumulative`, with
        ``now_ns``).  Not a trade, and left out (counted in ``not_trades``):
        a volume equal to the instrument's previous one.  A time not after
        the instrument's previous trade and less than a second before it
        (the same whole second) becomes 1 ns after that trade, so that the
        trades of one second keep their order of arrival."""
        if volume is not None:
            last = self._last_volume
            if last.get(key) == volume:
                self.not_trades += 1
                return
            last[key] = volume
        last_ts = self._last_ts
        prev = last_ts.get(key)
        if prev is not None and ts_ns <= prev < ts_ns + NS:
            ts_ns = prev + 1
        if prev is None or ts_ns > prev:
            last_ts[key] = ts_ns
        self._cumulative(key, ts_ns, price, volume, now_ns)

    # ------------------------------------------------------------ writing
    def _rows(self, candles: Iterable[C.Candle], recorded_ns: int) -> list[tuple]:
        rec = time_text(recorded_ns)
        lead, decimals = self.lead, self.decimals
        out = []
        for c in candles:
            d = decimals(c.key)
            out.append(lead(c.key) + (c.interval_min, time_text(c.start_ns), time_text(c.end_ns),
                                      units_text(c.open, d), units_text(c.high, d), units_text(c.low, d),
                                      units_text(c.close, d), c.volume, c.ticks, c.final, c.revision, c.source,
                                      rec))
        return out

    def _write(self, rows: list[tuple]) -> int:
        if rows:
            try:
                self.sink.add_many(self.table.name, rows)
            except RuntimeError as e:       # the sink is closed or its writer died
                self.sink_failure = f"sink refused candle rows: {e}"
                return 0
            self.rows_written += len(rows)
        return len(rows)

    def next_due_ns(self) -> int | None:
        """When the next candle is due (epoch ns), None when none is open."""
        with self._lock:
            return self.builder.next_due_ns()

    def close_due(self, now_ns: int | None = None) -> int:
        """Write the candles due at ``now_ns`` (default: now)."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            done = self.builder.due(now_ns)
        return self._write(self._rows(done, now_ns))

    def close_all(self) -> int:
        """Write every open candle, ``final`` false (at the stop)."""
        with self._lock:
            done = self.builder.close_all()
        return self._write(self._rows(done, time.time_ns()))

    def seed(self, key: Hashable, bars: list[Bar], keep_from_ns: int, until_ns: int | None = None,
             now_ns: int | None = None) -> int:
        """Write the history one-minute ``bars`` of ``key`` (:data:`Bar`) and
        the larger candles they complete
        (:meth:`feeds.candles.CandleBuilder.seed`); one-minute candles before
        ``keep_from_ns`` (stored final already) are not written again.
        ``until_ns``: the history covers every minute before it.  The
        candles due now are closed first, so that a live minute past its
        lateness gives way to its history bar (``now_ns``: default now)."""
        now = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            due = self.builder.due(now)
            done = self.builder.seed(key, bars, until_ns=until_ns)
        n = self._write(self._rows(due, now))
        # a microsecond later: never the key (instrument, interval, start, recorded_at) of a row just written
        h = self._write(self._rows([c for c in done if c.interval_min != 1 or c.start_ns >= keep_from_ns],
                                   now + 1000))
        self.history_rows += h
        return n + h

    def figures(self) -> dict[str, int]:
        """Candle counters for STATUS= and the heartbeat."""
        with self._lock:
            st = dict(self.builder.stats)
        return {"candles": self.rows_written, "candles from history": self.history_rows,
                "late revised": st.get("late_revised", 0), "late dropped": st.get("late_dropped", 0)}
