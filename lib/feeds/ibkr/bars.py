"""IB one-minute bars: exact wire values and the per-session checks.

Exact values
------------
Prices are stored exactly as TWS sent them: :func:`feeds.ibkr.wire.keep_wire_text`
(the one place that patches ib_async's decoder; re-exported here) makes
the client yield :class:`~feeds.ibkr.wire.WireBar` objects, ordinary
``BarData`` (floats) that also carry the decimal text of TWS API message
HISTORICAL_DATA.  The floats are used only for the checks: a decimal with
at most 15 significant digits converts to the nearest double, which
preserves order and equality, so comparing the floats decides exactly as
comparing the decimals would.

Checks (:func:`check_session`)
------------------------------
Each bar: high >= max(open, close), low <= min(open, close), prices
positive, volume not negative, barCount not negative and within ``bigint``,
start on a whole minute, not more than :data:`MAX_AHEAD` after now, inside
the session ``[open, close)``, strictly increasing (so no duplicates); the
stored texts are ASCII decimals of bounded size (:func:`feeds.plausible.decimal`:
no ``inf``/``nan``, no ``1e400``, no non-ASCII digits), prices > 0, volume
>= 0, WAP of any sign.  A bar that fails any of these, except "inside the session",
makes the whole answer unusable: the session is recorded as ERROR with the
first failure and none of its bars are stored.

A bar outside the session is dropped, not stored, and the drop is noted: a
bar starting at the close belongs to no minute of the session.  This is how
a 16:00 bar is handled (the SPX recording has one after 15:59 on three of
its four days; IB's ``useRTH=1`` answer ends with the 15:59 bar, 390 bars).

Thinly traded contracts
-----------------------
IB sends no TRADES bar for a minute without a trade.  When IB answered a
request in full (historicalDataEnd, no error), every bar passed the checks
and the session had settled (see ``settle_minutes``), the answer is final:
asking again returns the same bars.  Such a session is recorded COMPLETE
(EARLY_CLOSE on a half day) with ``actual_bars < expected_bars`` and a note
``thin: N of M minutes without a TRADES bar``, and it is never requested
again.  A session answered with no bars at all (error 162 "HMDS query
returned no data") is an error, recorded as ERROR with IB's text, never as
COMPLETE or HOLIDAY.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from ib_async import BarData

from .. import plausible as P
from ..backfill import SessionCheck
from .sessions import Session
from .wire import WireBar, keep_wire_text

__all__ = ["WireBar", "keep_wire_text", "SessionCheck", "check_session", "BAR_COLUMNS", "fmt_local"]

#: Columns of ibkr_bar_1min in row-tuple order.
BAR_COLUMNS = ("symbol", "bar_start", "con_id", "open", "high", "low", "close", "volume", "wap", "bar_count")

_UTC = dt.timezone.utc
#: a bar may start at most this far after the wall clock (clock skew); later is implausible
MAX_AHEAD = dt.timedelta(minutes=10)


def _texts(bar: BarData) -> tuple[str, str, str, str, str, str]:
    t = getattr(bar, "text", None)
    if t and t[0]:
        return t
    # A plain BarData (handler not installed): the shortest text that reads back as the same double.
    return tuple(repr(float(x)) for x in (bar.open, bar.high, bar.low, bar.close, bar.volume, bar.average))  # type: ignore[return-value]


def _utc(d) -> dt.datetime:
    if isinstance(d, dt.datetime):
        if d.tzinfo is _UTC:
            return d
        return d.astimezone(_UTC) if d.tzinfo else d.replace(tzinfo=_UTC)
    raise ValueError(f"bar date {d!r} is a date, not a time (a daily bar?)")


def fmt_local(t: dt.datetime, tz) -> str:
    """``yyyy-mm-dd hh:mm`` of ``t`` in ``tz`` (for messages)."""
    return t.astimezone(tz).strftime("%Y-%m-%d %H:%M")


def check_session(symbol: str, con_id: int, session: Session, bars: Sequence[BarData],
                  now: dt.datetime | None = None) -> SessionCheck:
    """Check IB's bars for one session and build the rows to store.

    ``bars``: BarData/WireBar with aware ``date`` (formatDate 2 gives UTC).
    ``now``: the wall clock (aware; default the current time), for the
    "not in the future" check.  Never raises for bad bars: the failure is in
    the result.
    """
    latest = (now or dt.datetime.now(_UTC)) + MAX_AHEAD
    out = SessionCheck(expected=session.expected_bars)
    tz = session.tz
    open_, close_ = session.open, session.close
    rows = out.rows
    prev: dt.datetime | None = None
    for bar in bars:
        try:
            t = _utc(bar.date)
        except ValueError as e:
            return out.fail(str(e))
        o, h, lo, c, v, n = bar.open, bar.high, bar.low, bar.close, bar.volume, bar.barCount
        if prev is not None and t <= prev:
            if t == prev:
                return out.fail(f"bar {fmt_local(t, tz)}: duplicate bar start")
            return out.fail(f"bar {fmt_local(t, tz)}: not after the previous bar {fmt_local(prev, tz)}")
        prev = t
        if t.second or t.microsecond:
            return out.fail(f"bar {fmt_local(t, tz)}:{t.second:02d}: not on a whole minute")
        if not (o > 0 and h > 0 and lo > 0 and c > 0):
            return out.fail(f"bar {fmt_local(t, tz)}: price not positive (O {o} H {h} L {lo} C {c})")
        if h < (o if o > c else c):
            return out.fail(f"bar {fmt_local(t, tz)}: high {h} < max(open {o}, close {c})")
        if lo > (c if o > c else o):
            return out.fail(f"bar {fmt_local(t, tz)}: low {lo} > min(open {o}, close {c})")
        if v < 0:
            return out.fail(f"bar {fmt_local(t, tz)}: negative volume {v}")
        if n < 0:
            return out.fail(f"bar {fmt_local(t, tz)}: negative barCount {n}")
        if type(n) is not int or n > P.INT64_MAX:
            return out.fail(f"bar {fmt_local(t, tz)}: barCount {n!r:.40} not a 64-bit integer")
        if t > latest:
            return out.fail(f"bar {fmt_local(t, tz)}: in the future")
        if not (open_ <= t < close_):
            out.dropped.append(t)
            continue
        to, th, tl, tc, tv, tw = _texts(bar)
        try:
            for text, what, sign in ((to, "open", P.POSITIVE), (th, "high", P.POSITIVE), (tl, "low", P.POSITIVE),
                                     (tc, "close", P.POSITIVE), (tv, "volume", P.NON_NEGATIVE),
                                     (tw, "WAP", P.SIGNED)):
                P.decimal(text, what, sign)
        except P.Malformed as e:
            return out.fail(f"bar {fmt_local(t, tz)}: {e}")
        rows.append((symbol, t, con_id, to, th, tl, tc, tv, tw, n))
    return out.finish(session, 1, "bar", "a TRADES bar")
