"""Binance USD-M futures market stream messages -> table rows.  Pure, no I/O.

Venue document: Binance "USDⓈ-M Futures / Websocket Market Streams"
(Aggregate Trade Streams, Individual Symbol Book Ticker Streams, Mark Price
Stream, Individual Symbol Ticker Streams, Kline/Candlestick Streams) and the
REST endpoints ``GET /fapi/v1/aggTrades`` and ``GET /fapi/v1/klines``.

Every ``*_row`` function takes the ``data`` object of one message as decoded
JSON (a dict; prices and quantities are decimal strings, times integer
milliseconds since the epoch) and the receive time (text from
:func:`now_text`), and returns a tuple in the column order of its
:class:`~feeds.sink.Table`.  Prices and quantities are passed through as the
venue's strings so they reach ``numeric`` columns unchanged; times are
rendered as exact UTC timestamp text (``2021-07-22 22:25:41.017+00:00``),
which PostgreSQL reads into ``timestamptz`` several times faster than a
``datetime`` is formatted.

Ranges are checked, not only types (:mod:`feeds.plausible`): times inside
:data:`WINDOW` (not before USD-M futures existed, not more than 10 minutes
ahead of now); ids, counts and trade ids in the ``bigint`` range and not
negative (``-1`` allowed where Binance uses it for "no trade": kline and
24h-ticker trade ids); prices ASCII decimals > 0, quantities and volumes
>= 0, funding rate and price change of any sign, each with at most
:data:`~feeds.plausible.MAX_DIGITS` digits; a kline's open time on its
interval's grid and its close time inside the interval.  A message that
lacks a key, has a wrong type or a value outside its range raises
:class:`Malformed` (a ``ValueError``) naming the field.
"""
from __future__ import annotations

import calendar
import time
from datetime import datetime, timedelta, timezone

from .. import plausible as P
from ..sink import Table

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# channel names (stream suffixes), in one place
AGG_TRADE = "aggTrade"
BOOK_TICKER = "bookTicker"
MARK_PRICE = "markPrice@1s"
TICKER = "ticker"
KLINE = "kline"
KINDS = (AGG_TRADE, BOOK_TICKER, MARK_PRICE, TICKER, KLINE)
#: since 2026-04 Binance serves these under /public, everything else under /market
PUBLIC_KINDS = frozenset({BOOK_TICKER, "depth"})

INTERVAL_MS = {"1m": 60_000, "3m": 180_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000,
               "1h": 3_600_000, "2h": 7_200_000, "4h": 14_400_000, "6h": 21_600_000,
               "8h": 28_800_000, "12h": 43_200_000, "1d": 86_400_000}


#: A message that cannot be turned into a row (missing key, bad type, value out of range)
Malformed = P.Malformed

#: The plausible range of every venue time these functions accept: from the
#: start of USD-M futures (2019-09) to ``ahead_ms`` (10 min) after now.  A
#: module-level policy: the collector sets ``ahead_ms`` from its settings,
#: tests replace ``clock`` (then call ``WINDOW.refresh()``) or the whole object.
WINDOW = P.Window(P.BINANCE_FUTURES_START_MS, ahead_ms=10 * P.MINUTE_MS)
#: a mark price's next funding time lies at most this far ahead of now
FUNDING_AHEAD_MS = 8 * P.DAY_MS


def ms_to_dt(ms: int) -> datetime:
    """Integer epoch milliseconds -> aware UTC datetime (exact, no float)."""
    return EPOCH + timedelta(milliseconds=ms)


_SECONDS: dict[int, str] = {}


def _second_text(sec: int) -> str:
    p = _SECONDS.get(sec)
    if p is None:
        if len(_SECONDS) > 200_000:
            _SECONDS.clear()
        p = _SECONDS[sec] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(sec))
    return p


_FRAC = tuple(f".{i:03d}+00:00" for i in range(1000))


def ms_text(ms: int) -> str:
    """Integer epoch milliseconds -> ``YYYY-MM-DD HH:MM:SS.mmm+00:00`` (exact)."""
    sec, r = divmod(ms, 1000)
    p = _SECONDS.get(sec)
    if p is None:
        p = _second_text(sec)
    return p + _FRAC[r]


def now_text() -> str:
    """The current time as UTC timestamp text with microseconds (a receive time)."""
    sec, r = divmod(time.time_ns() // 1000, 1_000_000)
    p = _SECONDS.get(sec)
    if p is None:
        p = _second_text(sec)
    return f"{p}.{r:06d}+00:00"


def text_to_dt(text: str) -> datetime:
    """Timestamp text from :func:`ms_text` / :func:`now_text` -> aware datetime."""
    return datetime.fromisoformat(text)


def text_ms(text: str) -> int:
    """Timestamp text from :func:`ms_text` (``YYYY-MM-DD HH:MM:SS.mmm+00:00``)
    -> integer epoch milliseconds (exact)."""
    return calendar.timegm(time.strptime(text[:19], "%Y-%m-%d %H:%M:%S")) * 1000 + int(text[20:23])


# Field checks.  Each inlines the common case (str methods and integer
# comparisons, in C) and leaves naming the reason to feeds.plausible.
_MAXD = P.MAX_DIGITS
_I64 = P.INT64_MAX


def _price(v, what="price") -> str:
    """A price: ASCII decimal string > 0."""
    if type(v) is str:
        r = v.replace(".", "", 1)
        if r.isdigit() and v.isascii() and len(r) <= _MAXD and (v[0] in "123456789" or r.strip("0")):
            return v
    return P.decimal(v, what, P.POSITIVE)


def _qty(v, what="quantity") -> str:
    """A quantity or volume: ASCII decimal string >= 0."""
    if type(v) is str:
        r = v.replace(".", "", 1)
        if r.isdigit() and v.isascii() and len(r) <= _MAXD:
            return v
    return P.decimal(v, what, P.NON_NEGATIVE)


def _signed(v, what="value") -> str:
    """A signed decimal string (funding rate, price change)."""
    if type(v) is str:
        r = (v[1:] if v[:1] == "-" else v).replace(".", "", 1)
        if r.isdigit() and v.isascii() and len(r) <= _MAXD:
            return v
    return P.decimal(v, what, P.SIGNED)


def _id(v, what="id") -> int:
    """An id or count: int in 0..2**63-1."""
    if type(v) is int and 0 <= v <= _I64:
        return v
    return P.id64(v, what)


def _int64(v, what="id") -> int:
    """A signed bigint (Binance sends -1 for "no trade" in some id fields)."""
    if type(v) is int and -1 <= v <= _I64:
        return v
    if type(v) is int and v < -1:
        raise Malformed(f"{what} below -1: {v}")
    return P.int64(v, what)


def _ms(v, what="time") -> str:
    """An event/trade time: epoch ms inside :data:`WINDOW` -> timestamp text (as :func:`ms_text`)."""
    w = WINDOW
    if type(v) is int and (w.lo <= v <= w.hi or w.ok(v)):
        sec, r = divmod(v, 1000)
        p = _SECONDS.get(sec)
        if p is None:
            p = _second_text(sec)
        return p + _FRAC[r]
    return ms_text(w.ms(v, what))


def _sym(v) -> str:
    if type(v) is str and v.isalnum() and len(v) <= 40:     # isalnum: non-empty, no space, '@' or '/'
        return v
    return P.symbol(v)


AGG_TRADE_TABLE = Table("binance_agg_trade",
                        ("symbol", "agg_id", "price", "qty", "first_trade_id", "last_trade_id",
                         "trade_time", "is_buyer_maker", "event_time", "recv_time"),
                        partition_column="trade_time", time_column="event_time")
BOOK_TICKER_TABLE = Table("binance_book_ticker",
                          ("symbol", "update_id", "bid_price", "bid_qty", "ask_price", "ask_qty",
                           "transaction_time", "event_time", "recv_time"),
                          partition_column="event_time", time_column="event_time")
MARK_PRICE_TABLE = Table("binance_mark_price",
                         ("symbol", "event_time", "mark_price", "index_price", "est_settle_price",
                          "funding_rate", "next_funding_time", "recv_time"),
                         partition_column="event_time", time_column="event_time")
TICKER_TABLE = Table("binance_ticker_24h",
                     ("symbol", "event_time", "price_change", "price_change_pct", "weighted_avg_price",
                      "last_price", "last_qty", "open_price", "high_price", "low_price", "volume",
                      "quote_volume", "open_time", "close_time", "first_trade_id", "last_trade_id",
                      "trade_count", "recv_time"),
                     partition_column="event_time", time_column="event_time")
KLINE_TABLE = Table("binance_kline",
                    ("symbol", "interval", "open_time", "close_time", "open", "high", "low", "close",
                     "volume", "trade_count", "quote_volume", "taker_buy_volume", "taker_buy_quote_volume",
                     "first_trade_id", "last_trade_id", "event_time", "recv_time", "source"),
                    time_column="event_time")
#: the kline check's findings (rows from :func:`feeds.binance.klinecheck.check_row`)
KLINE_CHECK_TABLE = Table("binance_kline_check",
                          ("symbol", "open_time", "checked_at", "stage", "kline_open", "kline_high", "kline_low",
                           "kline_close", "kline_volume", "kline_trades", "agg_open", "agg_high", "agg_low",
                           "agg_close", "agg_volume", "agg_trades", "differs", "repaired", "basis", "rest_trades",
                           "note"))
TABLES = (AGG_TRADE_TABLE, BOOK_TICKER_TABLE, MARK_PRICE_TABLE, TICKER_TABLE, KLINE_TABLE, KLINE_CHECK_TABLE)


def agg_trade_row(d: dict, recv: str) -> tuple:
    """aggTrade ``{e,E,a,s,p,q,f,l,T,m}`` -> binance_agg_trade row."""
    try:
        m = d["m"]
        if type(m) is not bool:
            raise Malformed(f"m not a boolean: {m!r:.60}")
        f, last = _id(d["f"], "f"), _id(d["l"], "l")
        if f > last:
            raise Malformed(f"first trade id f {f} after last trade id l {last}")
        return (_sym(d["s"]), _id(d["a"], "a"), _price(d["p"], "p"), _qty(d["q"], "q"), f, last,
                _ms(d["T"], "T"), m, _ms(d["E"], "E"), recv)
    except (KeyError, TypeError) as e:
        raise Malformed(f"aggTrade: {e!r}") from None


def rest_agg_trade_row(symbol: str, d: dict, recv: str) -> tuple:
    """REST ``/fapi/v1/aggTrades`` item ``{a,p,q,f,l,T,m}`` -> row (no event time)."""
    try:
        m = d["m"]
        if type(m) is not bool:
            raise Malformed(f"m not a boolean: {m!r:.60}")
        f, last = _id(d["f"], "f"), _id(d["l"], "l")
        if f > last:
            raise Malformed(f"first trade id f {f} after last trade id l {last}")
        return (symbol, _id(d["a"], "a"), _price(d["p"], "p"), _qty(d["q"], "q"), f, last,
                _ms(d["T"], "T"), m, None, recv)
    except (KeyError, TypeError) as e:
        raise Malformed(f"REST aggTrade: {e!r}") from None


def book_ticker_row(d: dict, recv: str) -> tuple:
    """bookTicker ``{e,u,s,b,B,a,A,T,E}`` -> binance_book_ticker row."""
    try:
        return (_sym(d["s"]), _id(d["u"], "u"), _price(d["b"], "b"), _qty(d["B"], "B"), _price(d["a"], "a"),
                _qty(d["A"], "A"), _ms(d["T"], "T"), _ms(d["E"], "E"), recv)
    except (KeyError, TypeError) as e:
        raise Malformed(f"bookTicker: {e!r}") from None


def _funding_ms(t) -> str:
    w = WINDOW
    if type(t) is int and w.lo <= t and (t <= w.hi + FUNDING_AHEAD_MS or w.ok(t - FUNDING_AHEAD_MS)):
        return ms_text(t)
    raise Malformed(f"next funding time T not a time within {FUNDING_AHEAD_MS // P.DAY_MS} days: {t!r:.60}")


def mark_price_row(d: dict, recv: str) -> tuple:
    """markPriceUpdate ``{e,E,s,p,i,P,r,T}`` -> binance_mark_price row.
    ``r`` and ``T`` are empty strings / 0 for delivery contracts: stored NULL.
    ``p`` and ``i`` must be > 0, ``P`` >= 0, ``r`` (funding rate) any sign;
    ``T`` (next funding time) at most 8 days ahead."""
    try:
        r = d.get("r")
        t = d.get("T")
        i = d.get("i")
        est = d.get("P")
        return (_sym(d["s"]), _ms(d["E"], "E"), _price(d["p"], "p"),
                _price(i, "i") if i not in (None, "") else None,
                _qty(est, "P") if est not in (None, "") else None,
                _signed(r, "r") if r not in (None, "") else None,
                _funding_ms(t) if t else None, recv)
    except (KeyError, TypeError) as e:
        raise Malformed(f"markPrice: {e!r}") from None


def ticker_row(d: dict, recv: str) -> tuple:
    """24hrTicker ``{e,E,s,p,P,w,c,Q,o,h,l,v,q,O,C,F,L,n}`` -> binance_ticker_24h row.
    ``p``/``P`` (price change, percent) any sign; ``c``, ``o``, ``h``, ``l`` > 0;
    ``w``, ``Q``, ``v``, ``q`` >= 0; ``F``/``L`` >= -1; ``n`` >= 0."""
    try:
        return (_sym(d["s"]), _ms(d["E"], "E"), _signed(d["p"], "p"), _signed(d["P"], "P"), _qty(d["w"], "w"),
                _price(d["c"], "c"), _qty(d["Q"], "Q"), _price(d["o"], "o"), _price(d["h"], "h"),
                _price(d["l"], "l"), _qty(d["v"], "v"), _qty(d["q"], "q"),
                _ms(d["O"], "O"), _ms(d["C"], "C"), _int64(d["F"], "F"), _int64(d["L"], "L"), _id(d["n"], "n"), recv)
    except (KeyError, TypeError) as e:
        raise Malformed(f"ticker: {e!r}") from None


def kline_times(t, close, interval) -> tuple[str, str, int]:
    """Check a kline's open time ``t`` (inside :data:`WINDOW`, on the grid of
    ``interval``) and close time (after ``t``, inside the interval);
    returns ``(open_text, close_text, step_ms)``.  Raises :class:`Malformed`."""
    step = INTERVAL_MS.get(interval) if type(interval) is str else None
    if step is None:
        raise Malformed(f"kline interval not one of {', '.join(INTERVAL_MS)}: {interval!r:.60}")
    ot = _ms(t, "kline t")
    if t % step:
        raise Malformed(f"kline open time {t} not on the {interval} grid")
    if type(close) is not int or not t < close < t + step:
        raise Malformed(f"kline close time {close!r:.60} not inside [{t}, {t + step})")
    return ot, ms_text(close), step


def kline_row(d: dict, recv: str) -> tuple:
    """kline ``{e,E,s,k:{t,T,s,i,f,L,o,c,h,l,v,n,x,q,V,Q}}`` -> binance_kline row.
    Callers store it only when ``k.x`` is true (the kline is closed)."""
    try:
        k = d["k"]
        iv = k["i"]
        ot, ct, _ = kline_times(k["t"], k["T"], iv)
        return (_sym(k["s"]), iv, ot, ct, _price(k["o"], "o"), _price(k["h"], "h"), _price(k["l"], "l"),
                _price(k["c"], "c"), _qty(k["v"], "v"), _id(k["n"], "n"), _qty(k["q"], "q"), _qty(k["V"], "V"),
                _qty(k["Q"], "Q"), _int64(k["f"], "f"), _int64(k["L"], "L"), _ms(d["E"], "E"), recv, "ws")
    except (KeyError, TypeError) as e:
        raise Malformed(f"kline: {e!r}") from None


def rest_kline_row(symbol: str, interval: str, k: list, recv: str) -> tuple:
    """REST ``/fapi/v1/klines`` item ``[t, o, h, l, c, v, T, q, n, V, Q, ignore]`` -> row."""
    try:
        ot, ct, _ = kline_times(k[0], k[6], interval)
        return (symbol, interval, ot, ct, _price(k[1], "open"), _price(k[2], "high"), _price(k[3], "low"),
                _price(k[4], "close"), _qty(k[5], "volume"), _id(k[8], "count"), _qty(k[7], "quote volume"),
                _qty(k[9], "taker buy volume"), _qty(k[10], "taker buy quote volume"), None, None, None, recv,
                "rest")
    except (IndexError, KeyError, TypeError) as e:
        raise Malformed(f"REST kline: {e!r}") from None


def stream_name(symbol: str, kind: str, interval: str = "1m") -> str:
    """Combined-stream name, e.g. ``btcusdt@aggTrade``, ``btcusdt@kline_1m``."""
    s = symbol.lower()
    return f"{s}@kline_{interval}" if kind == KLINE else f"{s}@{kind}"


def category(kind: str) -> str:
    """URL category of a stream kind: ``public`` (bookTicker, depth) or ``market``."""
    return "public" if kind in PUBLIC_KINDS else "market"
