"""Dhan candles: decoded feed records -> :class:`feeds.candles.CandleBuilder`
-> ``dhan_candle`` rows (sql/0011_dhan_live.sql).

Venue documents: DhanHQ v2 "Live Market Feed" (packet fields), "Annexure"
(exchange segments).
"""
from __future__ import annotations

import time
from collections.abc import Iterable

from .. import candles as C
from ..sink import Sink, Table
from ..timetext import time_text
from . import wire
from .connections import Subscription

NS = 1_000_000_000


class _Key(int):
    """A candle key, ``segment << 32 | security_id`` (an int, hashed as one),
    shown in the builder's log lines as ``NSE_EQ:1333``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{wire.SEGMENT_NAMES.get(self >> 32, self >> 32)}:{self & 0xFFFFFFFF}"


#: ``dhan_candle`` (sql/0011_dhan_live.sql), every column but ``stored_at``.
CANDLE_TABLE = Table("dhan_candle", ("exchange_segment", "security_id", "interval_min", "bar_start", "bar_end",
                                     "open", "high", "low", "close", "volume", "ticks", "final", "revision",
                                     "source", "recorded_at"))


class DhanCandles:
    """Candles of the collected instruments (the builder's key is
    ``segment << 32 | security_id``), written through ``sink`` into
    ``dhan_candle``.

    What counts as a trade (the rule of :mod:`feeds.kite.candles`, for
    Dhan's packets): the price is the packet's LTP, the time its LTT
    (:func:`feeds.dhan.wire.ltt_to_utc_ns`; the receive time when the packet
    has none); quote and full packets carry the day's cumulative volume: a
    packet whose volume did not change since the instrument's previous one
    is no trade (a quote or depth change) and never moves a candle, and the
    candle's volume is the rise of that cumulative volume
    (``volume="cumulative"`` of the builder).  Ticker packets and every
    packet of an index (IDX_I) carry no volume: each is a price, counted in
    the candle, whose volume is NULL.  LTTs are whole seconds: packets of one
    instrument in the same second keep their order of arrival (1 ns apart),
    so open and close are the first and last trade of the minute.

    Prices go through the builder as integers of 10**-d rupees (d =
    :data:`feeds.dhan.wire.PRICE_DECIMALS` of the segment: paise for
    equities) and are written as exact decimal text.  Not thread-safe: the
    collector calls it from its event loop.

    ``records(records, recv_ns)`` folds the records of one message;
    ``close_due(now_ns)`` writes the candles the clock closes;
    ``close_all()`` the open ones (``final`` false) at the stop;
    ``seed(key, bars, keep_from_ns)`` history bars.  Each returns the number
    of rows written."""

    def __init__(self, settings, sessions: C.Sessions, subs: Iterable[Subscription], sink: Sink,
                 since_ns: int | None = None):
        self.s = settings
        self.sink = sink
        self.builder = C.CandleBuilder(sessions, settings.intervals, grace_s=settings.grace,
                                       lateness_s=settings.lateness, volume="cumulative", since_ns=since_ns)
        # the builder's key of an instrument: segment << 32 | security id
        subs = list(subs)
        self._keys = {s.segment << 32 | s.security_id: _Key(s.segment << 32 | s.security_id) for s in subs}
        self.volumeless = {s.segment << 32 | s.security_id for s in subs if s.volumeless}
        self._last_volume: dict[int, int] = {}
        self._last_ts: dict[int, int] = {}
        self._scale = {seg: 10 ** d for seg, d in wire.PRICE_DECIMALS.items()}
        self.not_trades = 0
        self.rows_written = 0
        self.history_rows = 0
        self.sink_failure: str | None = None

    def key_of(self, segment: int, security_id: int) -> int:
        """The builder's key of an instrument."""
        raw = segment << 32 | security_id
        key = self._keys.get(raw)
        if key is None:
            key = self._keys[raw] = _Key(raw)
        return key

    def records(self, records: list, recv_ns: int) -> None:
        cum = self.builder.cumulative
        last = self._last_volume
        last_ts = self._last_ts
        scale = self._scale
        quiet = self.volumeless
        keys = self._keys
        ist = wire.IST_OFFSET_S
        for r in records:
            k = r.kind
            if k == "full" or k == "quote":
                key = keys.get(r[0] << 32 | r[1])
                if key is None:
                    key = keys[r[0] << 32 | r[1]] = _Key(r[0] << 32 | r[1])
                if key in quiet:
                    vol = None
                else:
                    vol = r[6]
                    if last.get(key) == vol:
                        self.not_trades += 1
                        continue
                    last[key] = vol
                ltt = r[4]
            elif k == "ticker":
                key = keys.get(r[0] << 32 | r[1])
                if key is None:
                    key = keys[r[0] << 32 | r[1]] = _Key(r[0] << 32 | r[1])
                vol = None
                ltt = r[3]
            else:
                continue
            ts = (ltt - ist) * NS if ltt else recv_ns
            # LTTs are whole seconds: the packets of one second keep their order of arrival
            prev = last_ts.get(key)
            if prev is not None and ts <= prev < ts + NS:
                ts = prev + 1
            if prev is None or ts > prev:
                last_ts[key] = ts
            cum(key, ts, round(r[2] * scale[r[0]]), vol, recv_ns)

    def _rows(self, candles: Iterable[C.Candle], recorded_ns: int) -> list[tuple]:
        rec = time_text(recorded_ns)
        names = wire.SEGMENT_NAMES
        out = []
        for c in candles:
            seg, sid = c.key >> 32, c.key & 0xFFFFFFFF
            d = wire.PRICE_DECIMALS[seg]
            out.append((names[seg], sid, c.interval_min, time_text(c.start_ns), time_text(c.end_ns),
                        _units_text(c.open, d), _units_text(c.high, d), _units_text(c.low, d),
                        _units_text(c.close, d), c.volume, c.ticks, c.final, c.revision, c.source, rec))
        return out

    def _write(self, rows: list[tuple]) -> int:
        if rows:
            try:
                self.sink.add_many(CANDLE_TABLE.name, rows)
            except RuntimeError as e:
                self.sink_failure = f"sink refused candle rows: {e}"
                return 0
            self.rows_written += len(rows)
        return len(rows)

    def next_due_ns(self) -> int | None:
        return self.builder.next_due_ns()

    def close_due(self, now_ns: int | None = None) -> int:
        now_ns = time.time_ns() if now_ns is None else now_ns
        return self._write(self._rows(self.builder.due(now_ns), now_ns))

    def close_all(self) -> int:
        return self._write(self._rows(self.builder.close_all(), time.time_ns()))

    def seed(self, key: int, bars: list[tuple], keep_from_ns: int, until_ns: int | None = None,
             now_ns: int | None = None) -> int:
        """Write the history one-minute ``bars`` of ``key`` (``(start_ns, open,
        high, low, close, volume or None, ticks)``, prices in integer units)
        and the larger candles they complete
        (:meth:`feeds.candles.CandleBuilder.seed`); one-minute candles before
        ``keep_from_ns`` (stored already) are not written again.  The candles
        due now are closed first, so that a live minute past its lateness
        gives way to its history bar."""
        now = time.time_ns() if now_ns is None else now_ns
        due = self.builder.due(now)
        done = self.builder.seed(key, bars, until_ns=until_ns)
        n = self._write(self._rows(due, now))
        # a microsecond later: never the key (instrument, interval, start, recorded_at) of a row just written
        h = self._write(self._rows([c for c in done if c.interval_min != 1 or c.start_ns >= keep_from_ns],
                                   now + 1000))
        self.history_rows += h
        return n + h

    def figures(self) -> dict[str, int]:
        st = self.builder.stats
        return {"candles": self.rows_written, "candles from history": self.history_rows,
                "late revised": st.get("late_revised", 0), "late dropped": st.get("late_dropped", 0)}


def _units_text(units: int, decimals: int) -> str:
    """Integer units of 10**-decimals (>= 0) as exact decimal text (165045, 2 -> "1650.45")."""
    whole, frac = divmod(units, 10 ** decimals)
    return f"{whole}.{frac:0{decimals}d}"
