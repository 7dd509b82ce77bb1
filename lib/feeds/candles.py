"""Candles (OHLCV bars) built from trades, aligned to the exchange's sessions.

Pure: no I/O, no asyncio, no clock of its own.  The collector feeds trades
(:meth:`CandleBuilder.trade`, :meth:`~CandleBuilder.trades`,
:meth:`~CandleBuilder.cumulative`), arms a timer for
:meth:`~CandleBuilder.next_due_ns` and calls :meth:`~CandleBuilder.due` when
it fires; each call returns the candles to store.  Every time is an ``int``
of epoch nanoseconds UTC.  Prices are whatever comparable numbers the
collector gives (int paise, float, Decimal) and are never converted, except
by :meth:`Candle.decimal`.

Rules
-----
* **Buckets.**  The one-minute candle of a trade is the minute containing its
  exchange time.  Every interval is aligned to the session's open (09:30
  New York for XNYS, 09:15 IST for XNSE, 00:00 UTC for :func:`always`), never
  to the process start; the first and last candle of a session are cut at
  its edges (a 60-minute interval on 09:15-15:30 ends with 15:15-15:30; an
  early close at 13:00 ends the day's last candle at 13:00).  A trade outside
  every session makes no candle (``stats["outside_session"]``).
* **Closing.**  A candle is closed by the caller's wall-clock timer, ``grace``
  seconds after its end (:meth:`~CandleBuilder.due`), not by the next trade;
  an instrument that does not trade in a minute has no candle for it.
  Candles of 5, 15, ... minutes are rolled up from the closed one-minute
  candles they contain (:func:`rollup`), so that per trade only the
  instrument's current one-minute state is touched.
* **Lateness.**  A trade for a closed candle that arrives before the
  candle's end + ``lateness`` is applied (the builder's clock, against which
  "arrives" is judged, is the latest ``now_ns`` given to
  :meth:`~CandleBuilder.due` or with a trade): the candle is returned
  again by the next ``due()`` with ``revision`` + 1, and so is every closed
  larger candle containing it (``stats["late_revised"]``).  A later trade is
  never applied: it is counted (``stats["late_dropped"]``) and logged, one
  line a minute at most, with the count.
* **OHLC.**  Open = the price of the earliest exchange time, close = the
  price of the latest; at equal times the lower price opens and the higher
  closes, so any order of the same trades gives the same candle.
* **Volume.**  ``"size"``: the sum of trade sizes (None when no trade had a
  size: an index); ``"cumulative"``: the increase of a cumulative day volume
  (Kite's ``volume_traded``) over its high-water mark, the baseline being 0
  at the session open (a decrease is counted in ``stats["volume_reset"]``,
  never subtracted); ``"none"``: always None.
* **Completeness.**  ``final`` is False for a candle that began before the
  process started (``since_ns``) and is not covered by history bars
  (:meth:`~CandleBuilder.seed`), and for candles written by
  :meth:`~CandleBuilder.close_all` at shutdown while still open.

A design in the spirit of nautilus_trader's time-bar aggregator (bars closed
by a clock timer, partial bars at session edges, no bars across closed
markets).
"""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Protocol

__all__ = ["MINUTE_NS", "DAY_NS", "VOLUME_MODES", "Sessions", "calendar_sessions", "always", "Candle",
           "CandleBuilder", "rollup"]

log = logging.getLogger(__name__)

MINUTE_NS = 60_000_000_000
DAY_NS = 86_400 * 1_000_000_000
SECOND_NS = 1_000_000_000
#: Volume modes of :class:`CandleBuilder`.
VOLUME_MODES = ("size", "cumulative", "none")
#: At most one log line about dropped late trades in this many nanoseconds (of the builder's clock).
LATE_LOG_INTERVAL_NS = MINUTE_NS


class Sessions(Protocol):
    """Trading sessions: where candles may exist and what they are aligned to.

    ``window(ts_ns)`` returns ``(open_ns, close_ns)`` of the session
    containing ``ts_ns`` (``open <= ts < close``), or None outside every
    session.  An implementation may also have ``anchor(window) -> int``: the
    time the intervals are aligned to (default: the window's open), for
    windows extended beyond the regular session (pre/post market).
    """

    def window(self, ts_ns: int) -> tuple[int, int] | None: ...


def _ns(t: dt.datetime) -> int:
    """An aware datetime as epoch nanoseconds (exact: whole microseconds)."""
    return ((t - _EPOCH) // dt.timedelta(microseconds=1)) * 1000


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


class _CalendarSessions:
    """Sessions of a :class:`feeds.calendars.ExchangeCalendar`, each widened by ``pre_ns``/``post_ns``."""

    def __init__(self, cal, pre_ns: int = 0, post_ns: int = 0):
        if pre_ns < 0 or post_ns < 0:
            raise ValueError("pre_ns and post_ns must be >= 0")
        self.calendar = cal
        self.pre_ns, self.post_ns = pre_ns, post_ns
        self._days: dict[dt.date, tuple[int, int, int] | None] = {}

    def _day(self, day: dt.date) -> tuple[int, int, int] | None:
        try:
            return self._days[day]
        except KeyError:
            pass
        s = self.calendar.session(day)
        got = None
        if s is not None:
            o, c = _ns(s.open), _ns(s.close)
            got = (o - self.pre_ns, c + self.post_ns, o)
        self._days[day] = got
        return got

    def _find(self, ts_ns: int) -> tuple[int, int, int] | None:
        day = dt.datetime.fromtimestamp(ts_ns // SECOND_NS, self.calendar.tz).date()
        for d in (day, day - dt.timedelta(days=1), day + dt.timedelta(days=1)):
            w = self._day(d)
            if w is not None and w[0] <= ts_ns < w[1]:
                return w
        return None

    def window(self, ts_ns: int) -> tuple[int, int] | None:
        w = self._find(ts_ns)
        return None if w is None else (w[0], w[1])

    def anchor(self, window: tuple[int, int]) -> int:
        """The regular open of the (possibly extended) ``window``: intervals are aligned to it.
        The session is the one whose window this is, exactly: a pre-market that begins on the
        evening before (a session opening before 05:30 New York) belongs to its own day, not to
        the previous day's session."""
        day = dt.datetime.fromtimestamp(window[0] // SECOND_NS, self.calendar.tz).date()
        for d in (day, day + dt.timedelta(days=1), day - dt.timedelta(days=1)):
            w = self._day(d)
            if w is not None and (w[0], w[1]) == (window[0], window[1]):
                return w[2]
        return window[0]

    def __repr__(self) -> str:
        return f"calendar_sessions({self.calendar.name}, pre_ns={self.pre_ns}, post_ns={self.post_ns})"


def calendar_sessions(cal, *, pre_ns: int = 0, post_ns: int = 0) -> Sessions:
    """The sessions of the exchange calendar ``cal`` (a
    :class:`feeds.calendars.ExchangeCalendar`, e.g. ``calendar("XNYS")``):
    regular sessions, early closes and special sessions as the calendar knows
    them; holidays and weekends have none.  ``pre_ns``/``post_ns`` (>= 0,
    nanoseconds) widen each session (extended hours); candles stay aligned to
    the regular open.  Raises ValueError for a negative widening."""
    return _CalendarSessions(cal, pre_ns, post_ns)


class _Always:
    """One window per UTC day."""

    def window(self, ts_ns: int) -> tuple[int, int]:
        d = ts_ns - ts_ns % DAY_NS
        return d, d + DAY_NS

    def __repr__(self) -> str:
        return "always()"


def always() -> Sessions:
    """No calendar: one window per UTC day, ``[00:00, 24:00)`` (Binance, or
    ``session_calendar = "none"``); every time is inside a session."""
    return _Always()


def _to_decimal(x: Any, scale: int) -> Any:
    if x is None or isinstance(x, Decimal) and not scale:
        return x
    if isinstance(x, int):
        return Decimal(x).scaleb(-scale) if scale else Decimal(x)
    d = x if isinstance(x, Decimal) else Decimal(str(x))
    return d.scaleb(-scale) if scale else d


@dataclass(slots=True)
class Candle:
    """One candle of one instrument.

    ``key``: the instrument as the collector names it; ``interval_min``:
    minutes; ``start_ns``/``end_ns``: the bar's start (its label, aligned to
    the session open) and end (exclusive; cut at the session close), epoch
    ns UTC; ``open``/``high``/``low``/``close``: prices as given;
    ``volume``: see :class:`CandleBuilder` (None = no volume: an index, an
    LTP-only instrument); ``ticks``: trades folded in (for history bars: the
    venue's trade count); ``final``: False when written at shutdown while
    open or when incomplete (began before the process started);
    ``revision``: 0 for the first write, +1 for each revision by late
    trades; ``source``: ``"live"`` or ``"history"``.
    """

    key: Hashable
    interval_min: int
    start_ns: int
    end_ns: int
    open: Any
    high: Any
    low: Any
    close: Any
    volume: Any
    ticks: int
    final: bool
    revision: int
    source: str

    def decimal(self, scale: int = 0) -> "Candle":
        """A copy with prices and volume as :class:`~decimal.Decimal`: ints
        are divided by ``10**scale`` (prices only; ``scale=2`` for paise),
        floats go through their shortest repr (``0.1`` -> ``Decimal("0.1")``),
        Decimals are kept.  Volume None stays None."""
        return replace(self, open=_to_decimal(self.open, scale), high=_to_decimal(self.high, scale),
                       low=_to_decimal(self.low, scale), close=_to_decimal(self.close, scale),
                       volume=_to_decimal(self.volume, 0))


class _Bar:
    """Mutable state of one candle while it may still change.

    One-minute bars hold the OHLCV themselves (``to``/``tc``: exchange times
    of the open and close prices); larger ones hold their one-minute
    ``parts`` ({start_ns: _Bar}) and are computed from them when written."""

    __slots__ = ("key", "interval", "start", "end", "o", "h", "l", "c", "v", "n", "to", "tc", "final",
                 "history", "closed", "written", "revision", "parts", "window", "anchor")

    def __init__(self, key, interval, start, end, window, anchor):
        self.key = key
        self.interval = interval
        self.start = start
        self.end = end
        self.window = window
        self.anchor = anchor
        self.final = True
        self.history = False
        self.closed = False
        self.written = False
        self.revision = 0
        self.parts = None
        self.n = 0
        self.v = None


def _apply(b: _Bar, ts: int, price, size) -> None:
    """Fold one trade into the one-minute bar ``b`` (order-independent)."""
    if ts > b.tc or (ts == b.tc and price > b.c):
        b.c = price
        b.tc = ts
    if ts < b.to or (ts == b.to and price < b.o):
        b.o = price
        b.to = ts
    if price > b.h:
        b.h = price
    elif price < b.l:
        b.l = price
    if size is not None:
        v = b.v
        b.v = size if v is None else v + size
    b.n += 1


def _first(b: _Bar, ts: int, price, size) -> None:
    b.o = b.h = b.l = b.c = price
    b.to = b.tc = ts
    b.v = size
    b.n = 1


def _fold(parts: Iterable) -> tuple:
    """(open, high, low, close, volume, ticks) of one-minute parts (objects
    with o/h/l/c/v/n and start), in any order."""
    first = last = None
    h = l = None
    v = None
    n = 0
    for p in parts:
        if first is None:
            first = last = p
            h, l = p.h, p.l
        else:
            if p.start < first.start:
                first = p
            if p.start > last.start:
                last = p
            if p.h > h:
                h = p.h
            if p.l < l:
                l = p.l
        if p.v is not None:
            v = p.v if v is None else v + p.v
        n += p.n
    return first.o, h, l, last.c, v, n


class _Part:
    """A Candle seen as a one-minute part (for :func:`rollup`)."""

    __slots__ = ("start", "o", "h", "l", "c", "v", "n")

    def __init__(self, c: Candle):
        self.start, self.o, self.h, self.l, self.c, self.v, self.n = (
            c.start_ns, c.open, c.high, c.low, c.close, c.volume, c.ticks)


def _grid(start_ns: int, window: tuple[int, int], anchor: int, width: int) -> tuple[int, int]:
    """The bucket of width ``width`` ns containing ``start_ns``, aligned to ``anchor`` and cut to ``window``."""
    s = anchor + (start_ns - anchor) // width * width
    e = s + width
    if s < window[0]:
        s = window[0]
    if e > window[1]:
        e = window[1]
    return s, e


def _anchor_of(sessions) -> Any:
    f = getattr(sessions, "anchor", None)
    return f if f is not None else (lambda w: w[0])


def rollup(candles_1min: Iterable[Candle], sessions: Sessions, interval_min: int) -> list[Candle]:
    """The ``interval_min`` candles made of one-minute ``candles_1min`` (any
    order, any keys), aligned to the session open and cut at its edges like
    :class:`CandleBuilder`'s: open of the earliest minute, close of the
    latest, high/low the extremes, volume the sum (None when every part has
    None), ticks the sum, final when every part is, revision 0, source
    ``"history"`` when every part is history.  Sorted by (start, key repr).
    A candle outside every session raises ValueError."""
    if interval_min < 1:
        raise ValueError(f"interval_min must be >= 1, not {interval_min}")
    anchor = _anchor_of(sessions)
    width = interval_min * MINUTE_NS
    groups: dict[tuple, list[Candle]] = {}
    for c in candles_1min:
        w = sessions.window(c.start_ns)
        if w is None:
            raise ValueError(f"candle {c.key!r} at {c.start_ns} is outside every session")
        s, e = _grid(c.start_ns, w, anchor(w), width)
        groups.setdefault((c.key, s, e), []).append(c)
    out = []
    for (key, s, e), cs in groups.items():
        o, h, l, cl, v, n = _fold(_Part(c) for c in cs)
        out.append(Candle(key, interval_min, s, e, o, h, l, cl, v, n, all(c.final for c in cs), 0,
                          "history" if all(c.source == "history" for c in cs) else "live"))
    out.sort(key=lambda c: (c.start_ns, repr(c.key)))
    return out


class CandleBuilder:
    """Candles of many instruments from their trades; see the module's rules.

    ``sessions``: where candles exist and what they align to
    (:func:`calendar_sessions`, :func:`always`); ``intervals_min``: minutes,
    each >= 1 (one-minute candles are built anyway, returned only when 1 is
    listed); ``grace_s``: seconds after a candle's end before ``due()``
    closes it; ``lateness_s``: seconds after a candle's end during which a
    late trade still revises it; ``volume``: ``"size"``, ``"cumulative"`` or
    ``"none"``; ``since_ns``: the process start (candles that began before
    it are incomplete, final=False; trades for candles that ended more than
    ``lateness`` before it are dropped as late).  Raises ValueError for a
    bad interval, mode or negative duration.

    ``stats`` (a fresh dict each read): ``ticks`` (trades applied),
    ``outside_session``, ``late_revised`` (late trades applied),
    ``late_dropped``, ``closed`` (candles closed by ``due()``, every
    interval), ``revisions`` (revised candles returned), ``volume_reset``
    (a cumulative volume went down inside a session), ``history_bars``
    (seeded), ``history_replaced`` (incomplete live minutes completed by a
    history bar), ``history_skipped`` (history bars for minutes that have a
    complete live candle), ``history_ignored`` (live trades for a seeded minute, not
    applied), ``open`` (one-minute candles open now).

    Not thread-safe: call it from one thread (the collector's event loop).
    """

    def __init__(self, sessions: Sessions, intervals_min: Iterable[int] = (1, 5, 15), *, grace_s: float = 2.0,
                 lateness_s: float = 10.0, volume: str = "size", since_ns: int | None = None):
        intervals = sorted(set(int(i) for i in intervals_min))
        if not intervals or intervals[0] < 1:
            raise ValueError(f"candle intervals must be whole minutes >= 1, not {list(intervals_min)}")
        if volume not in VOLUME_MODES:
            raise ValueError(f"volume must be one of {', '.join(VOLUME_MODES)}, not {volume!r}")
        if grace_s < 0 or lateness_s < 0:
            raise ValueError("grace_s and lateness_s must be >= 0")
        self.sessions = sessions
        self.intervals = tuple(intervals)
        self.volume = volume
        self.since_ns = since_ns
        self._emit1 = intervals[0] == 1
        self._larger = tuple(i for i in intervals if i > 1)
        self._grace = int(round(grace_s * SECOND_NS))
        self._lateness = int(round(lateness_s * SECOND_NS))
        self._anchor = _anchor_of(sessions)
        self._now = since_ns if since_ns is not None else _NEVER   # the builder's clock
        self._cur: dict[Hashable, _Bar] = {}               # key -> its latest open one-minute bar
        self._live: dict[tuple, _Bar] = {}                 # (key, interval, start) -> bar, until expired
        self._close1: dict[int, list[_Bar]] = {}           # end -> open one-minute bars
        self._closeN: dict[int, list[_Bar]] = {}           # end -> open larger bars
        self._expire: dict[int, list[_Bar]] = {}           # end -> closed bars still revisable
        self._dirty: dict[int, _Bar] = {}                  # id -> closed bar revised since the last due()
        self._win: tuple[int, int, int] = (0, 0, 0)        # the last session window found, with its anchor
        self._hwm: dict[Hashable, list] = {}               # key -> [session open, high-water mark]
        self._covered: dict[Hashable, int] = {}            # key -> history covers every minute before this
        self._ticks_closed = 0
        self._late_pending = 0
        self._late_logged = -(1 << 63)
        self._s = dict(outside_session=0, late_revised=0, late_dropped=0, closed=0, revisions=0,
                       volume_reset=0, history_bars=0, history_replaced=0, history_skipped=0, history_ignored=0)
        if volume == "none":
            self.trade = self._trade_no_volume  # type: ignore[method-assign]

    # ------------------------------------------------------------------ trades

    def trade(self, key: Hashable, ts_ns: int, price, size=None, now_ns: int | None = None) -> bool:
        """Fold one trade: ``ts_ns`` its exchange time, ``price`` as given,
        ``size`` a quantity or None (no volume: an index).  ``now_ns``: when
        it was received (the wall clock), if known: it advances the
        builder's clock, so that lateness is judged on it even between
        :meth:`due` calls.  Returns False when not applied: outside every
        session, too late (its candle's end + lateness has passed), or for a
        minute seeded from history."""
        b = self._cur.get(key)
        if b is not None and b.start <= ts_ns < b.end:
            _apply(b, ts_ns, price, size)
            return True
        return self._slow(key, ts_ns, price, size, now_ns)

    def _trade_no_volume(self, key: Hashable, ts_ns: int, price, size=None, now_ns: int | None = None) -> bool:
        return CandleBuilder.trade(self, key, ts_ns, price, None, now_ns)

    def trades(self, items: Iterable[tuple], now_ns: int | None = None) -> int:
        """Fold many ``(key, ts_ns, price, size)`` trades received at
        ``now_ns`` (each as :meth:`trade`); returns how many were applied."""
        trade = self.trade
        applied = 0
        for key, ts, price, size in items:
            if trade(key, ts, price, size, now_ns):
                applied += 1
        return applied

    def cumulative(self, key: Hashable, ts_ns: int, price, cum_volume, now_ns: int | None = None) -> bool:
        """Fold one tick carrying a cumulative day volume (Kite's
        ``volume_traded``; None for an LTP-only instrument, whose candles
        have volume None).  The candle's volume is the increase of the
        session's high-water mark, from 0 at the session open; when the
        process started inside the session (``since_ns``) the first value
        seen is the baseline and the candle holding it is incomplete.
        ``now_ns`` and the result as for :meth:`trade`."""
        if cum_volume is None:
            return self.trade(key, ts_ns, price, None, now_ns)
        w = self._window(ts_ns)
        if w is None:
            self._s["outside_session"] += 1
            return False
        hw = self._hwm.get(key)
        baseline = False
        if hw is None or hw[0] != w[0]:
            if self.since_ns is not None and w[0] < self.since_ns:
                hw = self._hwm[key] = [w[0], cum_volume]
                baseline = True
            else:
                hw = self._hwm[key] = [w[0], 0]
        mark = hw[1]
        if cum_volume > mark:
            size = cum_volume - mark
            hw[1] = cum_volume
        else:
            size = 0
            if cum_volume < mark:
                self._s["volume_reset"] += 1
        seeded = self._s["history_ignored"]
        if not self.trade(key, ts_ns, price, size, now_ns):
            if self._s["history_ignored"] == seeded:
                hw[1] = mark        # dropped as late: the next tick applied carries its volume
            return False            # (a seeded minute's history bar holds it already)
        if baseline:
            b = self._live.get((key, 1, _grid(ts_ns, (w[0], w[1]), w[2], MINUTE_NS)[0]))
            if b is not None:
                b.final = False
        return True

    def _window(self, ts: int) -> tuple[int, int, int] | None:
        w = self._win
        if w[0] <= ts < w[1]:
            return w
        got = self.sessions.window(ts)
        if got is None:
            return None
        w = self._win = (got[0], got[1], self._anchor(got))
        return w

    def _slow(self, key, ts: int, price, size, now_ns: int | None = None) -> bool:
        """A trade outside its instrument's current minute."""
        if now_ns is not None and now_ns > self._now:
            self._now = now_ns
        w = self._window(ts)
        if w is None:
            self._s["outside_session"] += 1
            return False
        window = (w[0], w[1])
        start, end = _grid(ts, window, w[2], MINUTE_NS)
        b = self._live.get((key, 1, start))
        now = self._now
        if b is None:
            if end + self._lateness <= now:
                self._drop(key, start)
                return False
            b = _Bar(key, 1, start, end, window, w[2])
            _first(b, ts, price, size)
            if self.since_ns is not None and start < self.since_ns:
                b.final = False
            self._live[(key, 1, start)] = b
            if end + self._grace <= now:      # its minute is closed already: a late candle
                b.closed = True
                self._expire.setdefault(end, []).append(b)
                self._dirty[id(b)] = b
                self._ticks_closed += 1
                self._s["late_revised"] += 1
                for nb in self._attach(b, closed_ok=True):
                    self._dirty[id(nb)] = nb
            else:
                self._close1.setdefault(end, []).append(b)
                cur = self._cur.get(key)
                if cur is None or start > cur.start:
                    self._cur[key] = b
            return True
        if b.history:
            self._s["history_ignored"] += 1
            return False
        if b.closed and b.end + self._lateness <= now:     # due() has not expired it yet
            self._drop(key, start)
            return False
        _apply(b, ts, price, size)
        if b.closed:
            self._ticks_closed += 1
            self._s["late_revised"] += 1
            self._revise(b)
        else:
            cur = self._cur.get(key)
            if cur is None or start > cur.start:
                self._cur[key] = b
        return True

    def _drop(self, key, start: int) -> None:
        self._s["late_dropped"] += 1
        self._late_pending += 1
        self._log_late(key, start)

    def _log_late(self, key=None, start: int | None = None) -> None:
        """One warning line with the count of late trades dropped, at most once a minute of the builder's clock."""
        t = self._now
        if self._late_pending and t - self._late_logged >= LATE_LOG_INTERVAL_NS:
            what = "" if key is None else f" (latest: {key!r}, candle {_iso(start)})"
            log.warning("candles: %d late trade(s) dropped, later than %.1f s after their candle's end%s",
                        self._late_pending, self._lateness / SECOND_NS, what)
            self._late_pending = 0
            self._late_logged = t

    def _revise(self, b: _Bar) -> None:
        """``b`` (closed) changed: it and every closed larger bar holding it are written again."""
        self._dirty[id(b)] = b
        for n in self._larger:
            s, _ = _grid(b.start, b.window, b.anchor, n * MINUTE_NS)
            nb = self._live.get((b.key, n, s))
            if nb is not None and nb.closed:
                self._dirty[id(nb)] = nb

    def _attach(self, b: _Bar, closed_ok: bool) -> list[_Bar]:
        """Add the one-minute bar ``b`` to its larger bars (created when
        missing).  ``closed_ok``: ``b`` arrives after its time (late or
        history), so a larger bar whose time has passed is created closed;
        closed larger bars holding it are marked revised.  Returns the
        larger bars created closed."""
        made = []
        for n in self._larger:
            s, e = _grid(b.start, b.window, b.anchor, n * MINUTE_NS)
            k = (b.key, n, s)
            nb = self._live.get(k)
            if nb is None:
                nb = self._live[k] = _Bar(b.key, n, s, e, b.window, b.anchor)
                nb.parts = {}
                if closed_ok and e <= self._closed_until():
                    nb.closed = True
                    self._expire.setdefault(e, []).append(nb)
                    made.append(nb)
                else:
                    self._closeN.setdefault(e, []).append(nb)
            nb.parts[b.start] = b
            if nb.closed and nb not in made:
                self._dirty[id(nb)] = nb
        return made

    def _closed_until(self) -> int:
        """Candles that end at or before this are closed (their time has passed)."""
        return self._now - self._grace

    # ------------------------------------------------------------------ output

    def _final(self, b: _Bar) -> bool:
        if b.parts is None:
            return b.final
        if not all(p.final for p in b.parts.values()):
            return False
        since = self.since_ns
        if since is None or b.start >= since:
            return True
        return self._covered.get(b.key, b.start) >= min(b.end, since)

    def _candle(self, b: _Bar, final: bool | None = None) -> Candle:
        if b.parts is None:
            o, h, l, c, v, n = b.o, b.h, b.l, b.c, b.v, b.n
            history = b.history
        else:
            o, h, l, c, v, n = _fold(b.parts.values())
            history = all(p.history for p in b.parts.values())
        if b.written:
            b.revision += 1
        b.written = True
        return Candle(b.key, b.interval, b.start, b.end, o, h, l, c, v, n,
                      self._final(b) if final is None else final, b.revision, "history" if history else "live")

    def _emit(self, b: _Bar) -> bool:
        return b.interval > 1 or self._emit1

    def due(self, now_ns: int) -> list[Candle]:
        """The candles to write at ``now_ns`` (epoch ns, the wall clock):
        every candle of every interval whose end + grace <= now, closed,
        then the candles revised by late trades since the last call
        (``revision`` > 0), each once.  Candles whose end + lateness <= now
        can no longer be revised afterwards.  Order: by end, one-minute
        before larger at the same end, revisions last."""
        if now_ns > self._now:
            self._now = now_ns
        now = self._now
        limit = now - self._grace
        out: list[Candle] = []
        s = self._s
        while True:     # larger bars are created while their minutes close: look again each time
            end = min(min(self._close1, default=limit + 1), min(self._closeN, default=limit + 1))
            if end > limit:
                break
            for b in self._close1.pop(end, ()):
                b.closed = True
                if self._cur.get(b.key) is b:
                    del self._cur[b.key]
                if not b.history:
                    self._ticks_closed += b.n
                self._expire.setdefault(end, []).append(b)
                self._attach(b, closed_ok=False)
                if self._emit1:
                    out.append(self._candle(b))
                    s["closed"] += 1
            for b in sorted(self._closeN.pop(end, ()), key=_by_interval):
                b.closed = True
                self._expire.setdefault(end, []).append(b)
                out.append(self._candle(b))
                s["closed"] += 1
        out.extend(self._revisions())
        horizon = now - self._lateness
        for end in [e for e in self._expire if e <= horizon]:
            for b in self._expire.pop(end):
                self._live.pop((b.key, b.interval, b.start), None)
        self._log_late()
        return out

    def _revisions(self) -> list[Candle]:
        out = []
        for b in self._dirty.values():
            if self._emit(b):
                c = self._candle(b)
                out.append(c)
                if c.revision:
                    self._s["revisions"] += 1
        self._dirty.clear()
        out.sort(key=lambda c: (c.end_ns, c.interval_min))
        return out

    def next_due_ns(self) -> int | None:
        """When :meth:`due` next has something to do (epoch ns): the earliest
        end + grace of an open candle, end + lateness of a revisable one, or
        the builder's clock when revisions are waiting; None when idle."""
        t = []
        if self._close1:
            t.append(min(self._close1) + self._grace)
        if self._closeN:
            t.append(min(self._closeN) + self._grace)
        if self._expire:
            t.append(min(self._expire) + self._lateness)
        if self._dirty:
            t.append(self._now)
        return min(t) if t else None

    def close_all(self) -> list[Candle]:
        """At shutdown: every candle still open, of every interval, with
        final=False (larger ones made of the minutes seen so far; a minute
        completed from history keeps final=True), then any
        revisions not yet written.  The builder is empty afterwards."""
        out: list[Candle] = []
        open1 = [b for bs in self._close1.values() for b in bs]
        for b in open1:
            if not b.history:
                self._ticks_closed += b.n
            self._attach(b, closed_ok=False)
        open1.sort(key=lambda b: (b.end, b.start))
        if self._emit1:     # a minute completed from history stays final
            out.extend(self._candle(b, final=None if b.history else False) for b in open1)
        openN = sorted((b for bs in self._closeN.values() for b in bs), key=lambda b: (b.end, b.interval))
        out.extend(self._candle(b, final=False) for b in openN)
        for b in open1 + openN:
            self._dirty.pop(id(b), None)
        out.extend(self._revisions())
        self._cur.clear()
        self._live.clear()
        self._close1.clear()
        self._closeN.clear()
        self._expire.clear()
        self._late_logged = -(1 << 63)      # the count not yet logged, now
        self._log_late()
        return out

    # ------------------------------------------------------------------ history

    def bucket_start(self, ts_ns: int, interval_min: int) -> int | None:
        """Start (epoch ns) of the ``interval_min`` candle that holds the
        minute at ``ts_ns`` on this builder's grid (aligned to the session's
        anchor, cut to its window); None outside every session.  A history
        fill fetches from the earliest of these, so that :meth:`seed` makes
        each larger candle from all of its minutes."""
        w = self._window(ts_ns)
        if w is None:
            return None
        return _grid(ts_ns, (w[0], w[1]), w[2], interval_min * MINUTE_NS)[0]

    def seed(self, key: Hashable, bars: Iterable[tuple], *, until_ns: int | None = None) -> list[Candle]:
        """History one-minute bars ``(start_ns, open, high, low, close,
        volume, ticks)`` of ``key`` for minutes the process missed, each
        minute over (volume may be None; ticks an int, 0 when unknown).

        Returns them as Candles (source ``"history"``, final=True), plus the
        completed larger candles made only of history bars; a larger candle
        still open takes them in and is closed by :meth:`due`, and a closed
        one that also holds live minutes is revised (returned by the next
        ``due()``).  A bar for a minute whose live candle is incomplete (the
        process started inside it) replaces it (``history_replaced``; written
        again with revision + 1 if it was written).  Bars outside every
        session are skipped (``outside_session``), so are bars for a minute
        that has a complete live candle still revisable
        (``history_skipped``); live trades for a seeded minute are not
        applied.  Pass only minutes the process missed: a live candle
        already written and past its lateness is not known any more.
        ``until_ns``: the history covers every minute of ``key`` before it
        (default: the end of the last bar), which makes larger candles that
        began before ``since_ns`` complete."""
        out: list[Candle] = []
        made: list[_Bar] = []
        s = self._s
        last_end = None
        for start, o, h, l, c, v, n in bars:
            w = self._window(start)
            if w is None:
                s["outside_session"] += 1
                continue
            window = (w[0], w[1])
            bs, be = _grid(start, window, w[2], MINUTE_NS)
            live = self._live.get((key, 1, bs))
            if live is not None and (live.history or live.final):
                s["history_skipped"] += 1       # a complete live candle has it
                continue
            last_end = be if last_end is None or be > last_end else last_end
            if live is not None:                # an incomplete live minute: history completes it
                if not live.closed:             # its trades stay counted; history's count replaces them
                    self._ticks_closed += live.n
                live.o, live.h, live.l, live.c, live.v, live.n = o, h, l, c, v, int(n or 0)
                live.history, live.final = True, True
                if self._cur.get(key) is live:
                    del self._cur[key]
                s["history_replaced"] += 1
                if live.closed:
                    self._revise(live)
                    self._dirty.pop(id(live), None)
                    if self._emit1:
                        out.append(self._candle(live))
                continue
            b = _Bar(key, 1, bs, be, window, w[2])
            b.o, b.h, b.l, b.c, b.v, b.n = o, h, l, c, v, int(n or 0)
            b.to = b.tc = bs
            b.history = b.closed = True
            self._live[(key, 1, bs)] = b
            self._expire.setdefault(be, []).append(b)
            s["history_bars"] += 1
            if self._emit1:
                out.append(self._candle(b))
            made.extend(self._attach(b, closed_ok=True))
        cover = until_ns if until_ns is not None else last_end
        if cover is not None and cover > self._covered.get(key, cover - 1):
            self._covered[key] = cover
        for nb in made:
            if all(p.history for p in nb.parts.values()):
                out.append(self._candle(nb))
                self._dirty.pop(id(nb), None)
            else:
                self._dirty[id(nb)] = nb
        out.sort(key=lambda c: (c.end_ns, c.interval_min))
        return out

    # ------------------------------------------------------------------ figures

    @property
    def stats(self) -> dict[str, int]:
        """Counters (a fresh dict): see the class docstring."""
        open1 = [b for bs in self._close1.values() for b in bs]
        return dict(self._s, ticks=self._ticks_closed + sum(b.n for b in open1 if not b.history), open=len(open1))


_NEVER = -(1 << 62)


def _by_interval(b: _Bar) -> int:
    return b.interval


def _iso(ns: int | None) -> str:
    if ns is None:
        return "?"
    return dt.datetime.fromtimestamp(ns // SECOND_NS, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- collectors' shared pieces

@dataclass
class CandleSettings:
    """``[candles]`` of a collector's configuration (see :data:`feeds.settings.CANDLES`)."""
    enabled: bool = True
    intervals: tuple[int, ...] = (1, 5, 15)
    grace: float = 2.0
    lateness: float = 10.0
    fill_from_history: bool = True


def candle_settings(cfg) -> CandleSettings:
    """:class:`CandleSettings` from a loaded configuration holding :data:`feeds.settings.CANDLES`."""
    return CandleSettings(enabled=cfg["candles.enabled"], intervals=tuple(sorted(cfg["candles.intervals"])),
                          grace=cfg["candles.grace"], lateness=cfg["candles.lateness"],
                          fill_from_history=cfg["candles.fill_from_history"])


def sessions_of(calendar) -> Sessions:
    """The builder's sessions: the exchange calendar's (early closes and special
    sessions included), or one window per UTC day without a calendar."""
    return always() if calendar is None else calendar_sessions(calendar)


def first_missing(open_ns: int, last_final_ns: int | None, intervals_min: Iterable[int]) -> tuple[int, int]:
    """``(request_from_ns, keep_from_ns)`` for one instrument: the first
    missing minute (``keep_from_ns``) is the session's open or the minute
    after the last final one-minute candle stored; history is requested
    from the earliest start of a candle (of any interval, aligned to the
    open) holding that minute or another requested one, so that every
    candle the history bars fall into is complete, and one-minute candles
    are stored from ``keep_from_ns`` on."""
    keep = open_ns if last_final_ns is None else max(open_ns, last_final_ns + MINUTE_NS)
    widths = [m * MINUTE_NS for m in intervals_min]
    first = keep
    while True:            # every candle holding a requested minute starts at or after ``first``
        earlier = min(open_ns + (first - open_ns) // w * w for w in widths)
        if earlier == first:
            return first, keep
        first = earlier
