"""Per-symbol market state of the Binance simulator: aggTrade history, 1m
candles, and the payloads derived from trades.

Numbers are kept as integers scaled by a per-symbol number of decimals (a
price of ``"1.01100"`` with 5 decimals is ``101100``) and formatted back to
decimal strings; no price ever passes through a binary float. Replayed
trades keep their recorded strings verbatim for the REST history.

Derived payloads (markPriceUpdate, 24hrTicker, and kline when the candle is
built here rather than replayed) follow the USD-M futures "Websocket Market
Streams" document and carry the extra key ``"sim":"derived"``, which Binance
never sends.

Pure state; no I/O.
"""

from __future__ import annotations

import bisect
import calendar
import datetime as _dt
from array import array
from collections import deque
from decimal import ROUND_HALF_UP, Decimal

import orjson

from .binance_streams import KLINE_INTERVALS_MS

MINUTE_MS = 60_000
DAY_MS = 86_400_000
FUNDING_PERIOD_MS = 8 * 3_600_000


# --- decimal strings <-> scaled integers ------------------------------------


def fmt_scaled(value: int, scale: int) -> str:
    """Format integer ``value`` scaled by ``10**scale`` as a decimal string.

    ``fmt_scaled(101100, 5) == "1.01100"``, ``fmt_scaled(-5, 2) == "-0.05"``,
    ``fmt_scaled(7, 0) == "7"``.
    """
    if scale <= 0:
        return str(value)
    sign = "-" if value < 0 else ""
    digits = str(-value if value < 0 else value).rjust(scale + 1, "0")
    return f"{sign}{digits[:-scale]}.{digits[-scale:]}"


def parse_scaled(text: str) -> tuple[int, int]:
    """Parse a plain decimal string into ``(integer, scale)``.

    ``parse_scaled("1.01100") == (101100, 5)``; ``parse_scaled("312") ==
    (312, 0)``. Raises ``ValueError`` for anything else (exponents, empty).
    """
    whole, dot, frac = text.partition(".")
    if not whole.lstrip("-").isdigit() or (dot and not frac.isdigit()):
        raise ValueError(f"not a plain decimal string: {text!r}")
    return int(whole + frac), len(frac)


def next_funding_time(ms: int) -> int:
    """Next 00:00/08:00/16:00 UTC after ``ms`` (epoch milliseconds)."""
    return (ms // FUNDING_PERIOD_MS + 1) * FUNDING_PERIOD_MS


# --- aggTrade history (REST /fapi/v1/aggTrades) -----------------------------


class _HistoryBase:
    """Common query logic over trades ordered by id and by time ``T``."""

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def _ids(self):  # sequence of agg ids, ascending
        raise NotImplementedError

    def _times(self):  # sequence of T, non-decreasing
        raise NotImplementedError

    def _row(self, i: int) -> dict:
        raise NotImplementedError

    def query(
        self,
        from_id: int | None = None,
        start: int | None = None,
        end: int | None = None,
        limit: int = 500,
    ) -> list[dict]:
        """Trades as REST rows ``{"a","p","q","f","l","T","m"}``, ascending.

        ``from_id``: trades with id >= from_id; ``start``/``end``: trades with
        ``start <= T <= end`` (epoch ms, inclusive); none of them: the most
        recent ``limit`` trades; ``end`` alone: the last ``limit`` trades at or
        before ``end``. At most ``limit`` rows.
        """
        n = len(self)
        if n == 0 or limit <= 0:
            return []
        times = self._times()
        if from_id is not None:
            lo = bisect.bisect_left(self._ids(), from_id)
            if start is not None:
                lo = max(lo, bisect.bisect_left(times, start))
            hi = n if end is None else bisect.bisect_right(times, end)
            hi = min(hi, lo + limit)
        elif start is not None:
            lo = bisect.bisect_left(times, start)
            hi = n if end is None else bisect.bisect_right(times, end)
            hi = min(hi, lo + limit)
        elif end is not None:
            hi = bisect.bisect_right(times, end)
            lo = max(0, hi - limit)
        else:
            hi = n
            lo = max(0, n - limit)
        return [self._row(i) for i in range(lo, hi)]


class _IdRange:
    """Sequence view ``first, first+1, ...`` of length ``n`` (for bisect)."""

    __slots__ = ("first", "n")

    def __init__(self, first: int, n: int):
        self.first, self.n = first, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return self.first + i


class GeneratedHistory(_HistoryBase):
    """aggTrades produced by the generator, stored compactly in int arrays.

    Ids are contiguous: the trade at index ``i`` has id ``first_id + i``.
    At most ``limit`` trades are kept; older ones are dropped in chunks.
    """

    def __init__(self, price_scale: int, qty_scale: int, limit: int, first_id: int):
        self.price_scale = price_scale
        self.qty_scale = qty_scale
        self.limit = max(1, int(limit))
        self.first_id = first_id
        self.p = array("q")
        self.q = array("q")
        self.f = array("q")
        self.l = array("q")
        self.t = array("q")
        self.m = array("b")

    def __len__(self) -> int:
        return len(self.t)

    def append(self, p: int, q: int, f: int, l: int, t: int, m: bool) -> None:
        """Append the trade with id ``first_id + len(self)``."""
        self.p.append(p)
        self.q.append(q)
        self.f.append(f)
        self.l.append(l)
        self.t.append(t)
        self.m.append(m)
        if len(self.t) > self.limit + (self.limit >> 3):
            cut = len(self.t) - self.limit
            for arr in (self.p, self.q, self.f, self.l, self.t, self.m):
                del arr[:cut]
            self.first_id += cut

    def _ids(self):
        return _IdRange(self.first_id, len(self.t))

    def _times(self):
        return self.t

    def _row(self, i: int) -> dict:
        return {
            "a": self.first_id + i,
            "p": fmt_scaled(self.p[i], self.price_scale),
            "q": fmt_scaled(self.q[i], self.qty_scale),
            "f": self.f[i],
            "l": self.l[i],
            "T": self.t[i],
            "m": bool(self.m[i]),
        }


class RecordedHistory(_HistoryBase):
    """aggTrades taken from a recording; prices and quantities kept verbatim."""

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self.ids: list[int] = []
        self.times: list[int] = []
        self.rows: list[dict] = []

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, data: dict) -> None:
        """Append one recorded aggTrade data object (keys a,p,q,f,l,T,m)."""
        self.ids.append(data["a"])
        self.times.append(data["T"])
        self.rows.append({k: data[k] for k in ("a", "p", "q", "f", "l", "T", "m")})
        if len(self.rows) > self.limit + (self.limit >> 3):
            cut = len(self.rows) - self.limit
            del self.ids[:cut], self.times[:cut], self.rows[:cut]

    def _ids(self):
        return self.ids

    def _times(self):
        return self.times

    def _row(self, i: int) -> dict:
        return dict(self.rows[i])


# --- candles ------------------------------------------------------------------

# A stored 1m candle: (t, T, o, h, l, c, v, q, n, V, Q) with decimals as str.
KlineRow = tuple


class Candle:
    """The open 1m candle of a symbol, as scaled integers.

    ``f``/``L`` are first/last trade ids (-1 while the candle has no trade),
    ``v``/``V`` base volume (qty scale), ``q``/``Q`` quote volume
    (price scale + qty scale); upper-case ones are the taker-buy parts.
    """

    __slots__ = ("t", "o", "h", "l", "c", "v", "q", "V", "Q", "n", "f", "L", "changed")

    def __init__(self, t: int, price: int):
        self.t = t
        self.o = self.h = self.l = self.c = price
        self.v = self.q = self.V = self.Q = 0
        self.n = 0
        self.f = self.L = -1
        self.changed = True


class SymbolMarket:
    """Market state of one simulated symbol.

    ``source`` is ``"generated"`` or ``"replay"``. Prices/quantities are
    integers scaled by ``price_scale``/``qty_scale`` decimals. Holds the
    aggTrade history, the closed 1m candles (``closed``, oldest first) and the
    open candle (``candle`` when built here from trades, ``recorded_current``
    when klines come from a recording).
    """

    def __init__(
        self,
        symbol: str,
        source: str,
        price_scale: int = 2,
        qty_scale: int = 3,
        history_limit: int = 1_000_000,
        kline_limit: int = 100_000,
        first_agg_id: int = 1,
    ):
        self.symbol = symbol.upper()
        self.lower = symbol.lower()
        self.source = source
        self.price_scale = price_scale
        self.qty_scale = qty_scale
        self.kline_limit = kline_limit
        if source == "generated":
            self.history: _HistoryBase = GeneratedHistory(
                price_scale, qty_scale, history_limit, first_agg_id
            )
        else:
            self.history = RecordedHistory(history_limit)
        self.klines_recorded = False
        self.candle: Candle | None = None
        self.recorded_current: KlineRow | None = None
        self.closed: list[KlineRow] = []
        self.last_price: int | None = None
        self.last_price_text: str | None = None
        self.last_qty_text: str | None = None
        self.last_trade_id = -1
        self.first_trade_id: int | None = None
        self.book: tuple[str, str, str, str] | None = None  # b, B, a, A
        self.book_update_id = 0
        self.depth_snapshot: bytes | None = None
        self.skip_left = 0
        # fault_skip_last: the minute (start, ms) whose last aggTrade is not sent, and the one held back
        self.tail_from: int | None = None
        self.tail_held: bytes | None = None
        self.active = source == "generated"
        self.onboard_ms: int | None = None
        # 24h ticker window over closed candles: (t, o, h, l, v, q, n, f) ints
        self._win: deque = deque()
        self._win_v = self._win_q = self._win_n = 0

    # -- scale handling for replayed text numbers --------------------------

    def _rescale(self, price_delta: int, qty_delta: int) -> None:
        """Raise the price/qty scales, multiplying every held integer."""
        pm, qm = 10**price_delta, 10**qty_delta
        c = self.candle
        if c is not None:
            c.o, c.h, c.l, c.c = c.o * pm, c.h * pm, c.l * pm, c.c * pm
            c.v, c.V = c.v * qm, c.V * qm
            c.q, c.Q = c.q * pm * qm, c.Q * pm * qm
        if self.last_price is not None:
            self.last_price *= pm
        self._win = deque(
            (t, o * pm, h * pm, low * pm, v * qm, q * pm * qm, n, f)
            for (t, o, h, low, v, q, n, f) in self._win
        )
        self._win_v *= qm
        self._win_q *= pm * qm
        self.price_scale += price_delta
        self.qty_scale += qty_delta

    def scaled_price(self, text: str) -> int:
        """Recorded price string -> integer at this symbol's price scale."""
        value, scale = parse_scaled(text)
        if scale > self.price_scale:
            self._rescale(scale - self.price_scale, 0)
        return value * 10 ** (self.price_scale - scale)

    def scaled_qty(self, text: str) -> int:
        """Recorded quantity string -> integer at this symbol's qty scale."""
        value, scale = parse_scaled(text)
        if scale > self.qty_scale:
            self._rescale(0, scale - self.qty_scale)
        return value * 10 ** (self.qty_scale - scale)

    # -- candles -------------------------------------------------------------

    def _store_closed(self, row: KlineRow) -> None:
        closed = self.closed
        if closed and closed[-1][0] == row[0]:
            closed[-1] = row
        elif not closed or closed[-1][0] < row[0]:
            closed.append(row)
        if len(closed) > self.kline_limit + (self.kline_limit >> 3):
            del closed[: len(closed) - self.kline_limit]

    def candle_row(self, c: Candle) -> KlineRow:
        """The candle as a stored row of strings."""
        ps, qs = self.price_scale, self.qty_scale
        return (
            c.t,
            c.t + MINUTE_MS - 1,
            fmt_scaled(c.o, ps),
            fmt_scaled(c.h, ps),
            fmt_scaled(c.l, ps),
            fmt_scaled(c.c, ps),
            fmt_scaled(c.v, qs),
            fmt_scaled(c.q, ps + qs),
            c.n,
            fmt_scaled(c.V, qs),
            fmt_scaled(c.Q, ps + qs),
        )

    def _close_candle(self) -> Candle:
        """Store the open candle as closed; return it (the caller emits x:true)."""
        c = self.candle
        assert c is not None
        self._store_closed(self.candle_row(c))
        self._win.append((c.t, c.o, c.h, c.l, c.v, c.q, c.n, c.f))
        self._win_v += c.v
        self._win_q += c.q
        self._win_n += c.n
        return c

    def roll_candle(self, now_ms: int) -> list[Candle]:
        """Close the open candle if ``now_ms`` is past its minute.

        Returns the candles closed (the open one, at most); a fresh empty
        candle (o=h=l=c=previous close, f=L=-1, n=0) then covers the current
        minute, like Binance's klines for minutes without trades.
        """
        c = self.candle
        if c is None or now_ms < c.t + MINUTE_MS:
            return []
        done = self._close_candle()
        self.candle = Candle(now_ms - now_ms % MINUTE_MS, done.c)
        return [done]

    def add_trade(self, p: int, q: int, f: int, l: int, t: int, m: bool) -> Candle | None:
        """Apply one trade to the derived candle (scaled ints).

        ``t`` is the trade time (ms). Returns the candle it closed when the
        trade starts a new minute, else ``None``.
        """
        self.last_price = p
        self.last_trade_id = l
        if self.first_trade_id is None:
            self.first_trade_id = f
        c = self.candle
        closed = None
        t0 = t - t % MINUTE_MS
        if c is None:
            c = self.candle = Candle(t0, p)
        elif t0 > c.t:
            closed = self._close_candle()
            c = self.candle = Candle(t0, p)
        if c.n == 0:
            c.o = c.h = c.l = p
            c.f = f
        elif p > c.h:
            c.h = p
        elif p < c.l:
            c.l = p
        c.c = p
        c.L = l
        c.n += l - f + 1
        c.v += q
        pq = p * q
        c.q += pq
        if not m:  # buyer is the taker
            c.V += q
            c.Q += pq
        c.changed = True
        return closed

    def kline_payload(self, c: Candle, event_ms: int, closed: bool) -> bytes:
        """kline data object for candle ``c`` (derived; carries ``"sim"``)."""
        ps, qs = self.price_scale, self.qty_scale
        sym = self.symbol
        return (
            f'{{"e":"kline","E":{event_ms},"s":"{sym}","k":{{"t":{c.t},'
            f'"T":{c.t + MINUTE_MS - 1},"s":"{sym}","i":"1m","f":{c.f},"L":{c.L},'
            f'"o":"{fmt_scaled(c.o, ps)}","c":"{fmt_scaled(c.c, ps)}",'
            f'"h":"{fmt_scaled(c.h, ps)}","l":"{fmt_scaled(c.l, ps)}",'
            f'"v":"{fmt_scaled(c.v, qs)}","n":{c.n},"x":{"true" if closed else "false"},'
            f'"q":"{fmt_scaled(c.q, ps + qs)}","V":"{fmt_scaled(c.V, qs)}",'
            f'"Q":"{fmt_scaled(c.Q, ps + qs)}","B":"0"}},"sim":"derived"}}'
        ).encode()

    def apply_recorded_kline(self, k: dict) -> None:
        """Record one replayed kline ``k`` object (1m) as the candle state."""
        if k.get("i") != "1m":
            return
        row = (k["t"], k["T"], k["o"], k["h"], k["l"], k["c"], k["v"], k["q"], k["n"], k["V"], k["Q"])
        cur = self.recorded_current
        if cur is not None and cur[0] < row[0]:
            self._store_closed(cur)  # the recording missed that candle's x:true
        if k.get("x"):
            self._store_closed(row)
            self.recorded_current = None
        else:
            self.recorded_current = row

    def current_row(self) -> KlineRow | None:
        """The open candle as a row, or ``None``."""
        if self.klines_recorded:
            return self.recorded_current
        return self.candle_row(self.candle) if self.candle is not None else None

    def klines(
        self,
        interval: str,
        start: int | None = None,
        end: int | None = None,
        limit: int = 500,
    ) -> list[list]:
        """REST ``/fapi/v1/klines`` rows: closed candles, then the open one.

        Row: ``[t, "o", "h", "l", "c", "v", T, "q", n, "V", "Q", "0"]``.
        ``start``/``end`` filter on open time (ms, inclusive); without
        ``start`` the most recent ``limit`` rows are returned.
        """
        rows = list(self.closed)
        cur = self.current_row()
        if cur is not None and (not rows or rows[-1][0] < cur[0]):
            rows.append(cur)
        if interval != "1m":
            rows = aggregate_rows(rows, interval)
        if start is not None:
            lo = bisect.bisect_left([r[0] for r in rows], start)
            rows = rows[lo:]
            if end is not None:
                rows = [r for r in rows if r[0] <= end]
            rows = rows[:limit]
        else:
            if end is not None:
                rows = [r for r in rows if r[0] <= end]
            rows = rows[-limit:] if limit > 0 else []
        return [[r[0], r[2], r[3], r[4], r[5], r[6], r[1], r[7], r[8], r[9], r[10], "0"] for r in rows]

    # -- derived payloads --------------------------------------------------

    def mark_price_payload(self, event_ms: int) -> bytes | None:
        """markPriceUpdate data object derived from the last trade price.

        Mark, index and estimated settle price are all the last trade price;
        funding rate is a constant ``"0.00010000"``. ``None`` before any trade.
        """
        price = self.last_price_text
        if price is None:
            return None
        return (
            f'{{"e":"markPriceUpdate","E":{event_ms},"s":"{self.symbol}","p":"{price}",'
            f'"i":"{price}","P":"{price}","r":"0.00010000","T":{next_funding_time(event_ms)},'
            f'"sim":"derived"}}'
        ).encode()

    def ticker_payload(self, event_ms: int) -> bytes | None:
        """24hrTicker data object derived from the candles of the last 24 h.

        Open/high/low/volumes/count come from the 1m candles whose open time
        is within 24 h of ``event_ms`` (plus the open one); ``c``/``Q`` are the
        last trade's price and quantity. ``None`` before any trade.
        """
        if self.last_price_text is None:
            return None
        if self.klines_recorded:
            return self._ticker_from_rows(event_ms)
        win = self._win
        cutoff = event_ms - DAY_MS
        while win and win[0][0] < cutoff:
            t, o, h, low, v, q, n, f = win.popleft()
            self._win_v -= v
            self._win_q -= q
            self._win_n -= n
        c = self.candle
        ps, qs = self.price_scale, self.qty_scale
        parts = list(win)
        if c is not None and c.n > 0:
            parts.append((c.t, c.o, c.h, c.l, c.v, c.q, c.n, c.f))
        traded = [x for x in parts if x[6] > 0]
        if not traded:
            return None
        o = traded[0][1]
        h = max(x[2] for x in traded)
        low = min(x[3] for x in traded)
        v = self._win_v + (c.v if c is not None else 0)
        q = self._win_q + (c.q if c is not None else 0)
        n = self._win_n + (c.n if c is not None else 0)
        first = traded[0][7]
        last = self.last_price if self.last_price is not None else o
        return self._ticker_text(
            event_ms,
            change=fmt_scaled(last - o, ps),
            pct=_percent(Decimal(last - o), Decimal(o)),
            wavg=_wavg(q, v, ps, qs),
            open_=fmt_scaled(o, ps),
            high=fmt_scaled(h, ps),
            low=fmt_scaled(low, ps),
            vol=fmt_scaled(v, qs),
            qvol=fmt_scaled(q, ps + qs),
            open_time=max(traded[0][0], cutoff),
            first=first,
            count=n,
        )

    def _ticker_from_rows(self, event_ms: int) -> bytes | None:
        rows = list(self.closed)
        cur = self.recorded_current
        if cur is not None:
            rows.append(cur)
        rows = [r for r in rows if r[0] >= event_ms - DAY_MS and r[8] > 0]
        if not rows:
            return None
        o = Decimal(rows[0][2])
        h = max(Decimal(r[3]) for r in rows)
        low = min(Decimal(r[4]) for r in rows)
        v = sum((Decimal(r[6]) for r in rows), Decimal(0))
        q = sum((Decimal(r[7]) for r in rows), Decimal(0))
        n = sum(r[8] for r in rows)
        last = Decimal(self.last_price_text)
        exp = Decimal(self.last_price_text).as_tuple().exponent
        w = (q / v).quantize(Decimal(1).scaleb(exp), ROUND_HALF_UP) if v else Decimal(0)
        return self._ticker_text(
            event_ms,
            change=format(last - o, "f"),
            pct=_percent(last - o, o),
            wavg=format(w, "f"),
            open_=rows[0][2],
            high=format(h, "f"),
            low=format(low, "f"),
            vol=format(v, "f"),
            qvol=format(q, "f"),
            open_time=max(rows[0][0], event_ms - DAY_MS),
            first=self.first_trade_id if self.first_trade_id is not None else -1,
            count=n,
        )

    def _ticker_text(self, event_ms, *, change, pct, wavg, open_, high, low, vol, qvol,
                     open_time, first, count) -> bytes:
        return (
            f'{{"e":"24hrTicker","E":{event_ms},"s":"{self.symbol}","p":"{change}",'
            f'"P":"{pct}","w":"{wavg}","c":"{self.last_price_text}",'
            f'"Q":"{self.last_qty_text}","o":"{open_}","h":"{high}","l":"{low}",'
            f'"v":"{vol}","q":"{qvol}","O":{open_time},"C":{event_ms},"F":{first},'
            f'"L":{self.last_trade_id},"n":{count},"sim":"derived"}}'
        ).encode()

    # -- depth snapshot (REST /fapi/v1/depth) ----------------------------------

    def depth(self, limit: int, event_ms: int) -> dict:
        """Order book snapshot ``{"lastUpdateId","E","T","bids","asks"}``.

        A recorded snapshot (replay) is cut to ``limit`` levels; otherwise
        ``limit`` synthetic levels one tick apart around the last bookTicker
        or trade price.
        """
        if self.depth_snapshot is not None:
            snap = orjson.loads(self.depth_snapshot)
            snap["bids"] = snap.get("bids", [])[:limit]
            snap["asks"] = snap.get("asks", [])[:limit]
            return snap
        ps, qs = self.price_scale, self.qty_scale
        if self.book is not None:
            bid = self.scaled_price(self.book[0]) if self.source == "replay" else parse_scaled(self.book[0])[0]
        elif self.last_price is not None:
            bid = self.last_price
        else:
            bid = 10**ps
        bids, asks = [], []
        for i in range(limit):
            qty = fmt_scaled((i % 7 + 1) * 10**qs, qs)
            if bid - i > 0:
                bids.append([fmt_scaled(bid - i, ps), qty])
            asks.append([fmt_scaled(bid + 1 + i, ps), qty])
        return {"lastUpdateId": self.book_update_id, "E": event_ms, "T": event_ms,
                "bids": bids, "asks": asks}


def _percent(delta: Decimal, base: Decimal) -> str:
    if not base:
        return "0.000"
    return format((delta * 100 / base).quantize(Decimal("0.001"), ROUND_HALF_UP), "f")


def _wavg(q: int, v: int, ps: int, qs: int) -> str:
    """Volume-weighted average price q/v at price scale, rounded half up."""
    if v <= 0:
        return fmt_scaled(0, ps)
    # q has scale ps+qs, v has scale qs -> q/v has scale ps
    num, den = q, v
    w, rem = divmod(num, den)
    if rem * 2 >= den:
        w += 1
    return fmt_scaled(w, ps)


# --- interval aggregation -------------------------------------------------------


def bucket_start(t: int, interval: str) -> int:
    """Open time (ms) of the ``interval`` candle containing ``t``.

    Fixed intervals align on the epoch, ``1w`` on Mondays 00:00 UTC, ``1M`` on
    the first day of the calendar month (UTC).
    """
    if interval == "1M":
        d = _dt.datetime.fromtimestamp(t / 1000, tz=_dt.timezone.utc)
        return calendar.timegm((d.year, d.month, 1, 0, 0, 0)) * 1000
    size = KLINE_INTERVALS_MS[interval]
    if interval == "1w":
        monday = 4 * DAY_MS  # 1970-01-05 was a Monday
        return (t - monday) // size * size + monday
    return t - t % size


def bucket_end(start: int, interval: str) -> int:
    """Close time (ms, inclusive) of the candle opening at ``start``."""
    if interval == "1M":
        d = _dt.datetime.fromtimestamp(start / 1000, tz=_dt.timezone.utc)
        y, m = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
        return calendar.timegm((y, m, 1, 0, 0, 0)) * 1000 - 1
    return start + KLINE_INTERVALS_MS[interval] - 1


def aggregate_rows(rows: list[KlineRow], interval: str) -> list[KlineRow]:
    """Aggregate 1m rows (oldest first) into ``interval`` rows (same layout)."""
    out: list[KlineRow] = []
    acc = None
    for r in rows:
        b = bucket_start(r[0], interval)
        if acc is None or acc[0] != b:
            if acc is not None:
                out.append(_acc_row(acc))
            acc = [b, bucket_end(b, interval), r[2], Decimal(r[3]), Decimal(r[4]), r[5],
                   Decimal(r[6]), Decimal(r[7]), r[8], Decimal(r[9]), Decimal(r[10])]
        else:
            acc[3] = max(acc[3], Decimal(r[3]))
            acc[4] = min(acc[4], Decimal(r[4]))
            acc[5] = r[5]
            acc[6] += Decimal(r[6])
            acc[7] += Decimal(r[7])
            acc[8] += r[8]
            acc[9] += Decimal(r[9])
            acc[10] += Decimal(r[10])
    if acc is not None:
        out.append(_acc_row(acc))
    return out


def _acc_row(acc: list) -> KlineRow:
    return (acc[0], acc[1], acc[2], format(acc[3], "f"), format(acc[4], "f"), acc[5],
            format(acc[6], "f"), format(acc[7], "f"), acc[8], format(acc[9], "f"),
            format(acc[10], "f"))
