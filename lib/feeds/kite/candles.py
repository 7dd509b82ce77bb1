"""Kite candles: ticks -> :class:`feeds.candles.CandleBuilder` -> ``kite_candle`` rows.

What counts as a trade, per tick (decided here, one rule for every mode):

* the price is the tick's ``last_price``; the time its exchange time when the
  tick carries one (full mode: ``last_trade_time``, else
  ``exchange_timestamp``), otherwise the frame's receive time;
* quote and full ticks carry Kite's cumulative day volume (``volume_traded``);
  the builder takes the volume as its rise (``volume="cumulative"``: the
  baseline is 0 at the session's open, a decrease is counted, never
  subtracted);
* LTP-mode ticks and index packets carry no volume: each of them is a
  price, counted in the candle, whose volume is NULL;
* the rules of :mod:`feeds.candle_writer`: a tick whose ``volume_traded``
  did not change since the instrument's previous tick is not a trade (a
  depth or order-book update); exchange times are whole seconds, and ticks
  of one instrument within the same second keep their order of arrival, so
  open and close are the first and last trade of the minute as Kite's own
  minute candles have them.

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

from collections.abc import Iterable
from datetime import datetime, timezone

from .. import candles as C
from ..candle_writer import NS, CandleWriter
from ..sink import Sink, Table
from .adapter import SEGMENT_INDICES, divisor
from .instruments import Subscription

UTC = timezone.utc

#: ``kite_candle`` (sql/0006_candles.sql), every column but ``stored_at``.
CANDLE_TABLE = Table("kite_candle", ("instrument_token", "interval_min", "bar_start", "bar_end", "open", "high",
                                     "low", "close", "volume", "ticks", "final", "revision", "source",
                                     "recorded_at"))

#: price decimals of a segment's divisor (:func:`feeds.kite.adapter.divisor`)
_DECIMALS = {100: 2, 10_000: 4, 10_000_000: 7}


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


class KiteCandles(CandleWriter):
    """Candles of the collected instruments (keyed by ``instrument_token``),
    written through ``sink`` into ``kite_candle``
    (:class:`feeds.candle_writer.CandleWriter`: its methods; history bars
    for ``seed`` come from :mod:`feeds.kite.history`).

    ``ticks(rows, recv_ns)`` takes the rows of one frame (as the adapter
    made them for the three tick tables), in the ticker's thread.
    """

    table = CANDLE_TABLE
    locked = True

    def __init__(self, settings: C.CandleSettings, sessions: C.Sessions, subs: Iterable[Subscription], sink: Sink,
                 since_ns: int | None = None):
        super().__init__(settings, sessions, sink, since_ns=since_ns)
        self.subs = list(subs)

    def lead(self, key: int) -> tuple:
        """``(instrument_token,)``."""
        return (key,)

    def decimals(self, key: int) -> int:
        return _DECIMALS[divisor(key)]

    # ------------------------------------------------------------ ticks (reactor thread)
    def ticks(self, rows: tuple[list, list, list], recv_ns: int) -> None:
        ltp, quote, full = rows
        fold = self._fold
        with self._lock:
            for r in ltp:
                fold(r[0], recv_ns, units(r[1]), None)
            for r in (*quote, *full):
                t = r[11] or r[15] if len(r) > 15 else None      # full mode: last trade or exchange time
                fold(r[0], _ts_ns(t) if t else recv_ns, units(r[1]), r[4])
