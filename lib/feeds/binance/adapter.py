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
``datetime`` is formatted.  A message that lacks a key, has a wrong type,
or carries a price that is not a decimal number raises :class:`Malformed`.
"""
from __future__ import annotations

import re
import time
from datetime import datetime, timedelta, timezone

from ..sink import Table

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_DEC = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?").fullmatch

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


class Malformed(ValueError):
    """A message that cannot be turned into a row (missing key, bad type or value)."""


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


def ms_text(ms: int) -> str:
    """Integer epoch milliseconds -> ``YYYY-MM-DD HH:MM:SS.mmm+00:00`` (exact)."""
    sec, r = divmod(ms, 1000)
    return f"{_second_text(sec)}.{r:03d}+00:00"


def now_text() -> str:
    """The current time as UTC timestamp text with microseconds (a receive time)."""
    sec, r = divmod(time.time_ns() // 1000, 1_000_000)
    return f"{_second_text(sec)}.{r:06d}+00:00"


def text_to_dt(text: str) -> datetime:
    """Timestamp text from :func:`ms_text` / :func:`now_text` -> aware datetime."""
    return datetime.fromisoformat(text)


def _num(v) -> str:
    if type(v) is str:
        r = v.replace(".", "", 1)
        if r.isdigit() and r.isascii():      # the common case, checked in C
            return v
        if _DEC(v):
            return v
    raise Malformed(f"not a decimal string: {v!r}")


def _int(v) -> int:
    if type(v) is not int:
        raise Malformed(f"not an integer: {v!r}")
    return v


def _ms(v) -> str:
    if type(v) is not int or v < 0:
        raise Malformed(f"not a millisecond timestamp: {v!r}")
    return ms_text(v)


def _sym(v) -> str:
    if type(v) is not str or not v:
        raise Malformed(f"not a symbol: {v!r}")
    return v


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
TABLES = (AGG_TRADE_TABLE, BOOK_TICKER_TABLE, MARK_PRICE_TABLE, TICKER_TABLE, KLINE_TABLE)


def agg_trade_row(d: dict, recv: datetime) -> tuple:
    """aggTrade ``{e,E,a,s,p,q,f,l,T,m}`` -> binance_agg_trade row."""
    try:
        m = d["m"]
        if type(m) is not bool:
            raise Malformed(f"m not a boolean: {m!r}")
        return (_sym(d["s"]), _int(d["a"]), _num(d["p"]), _num(d["q"]), _int(d["f"]), _int(d["l"]),
                _ms(d["T"]), m, _ms(d["E"]), recv)
    except (KeyError, TypeError) as e:
        raise Malformed(f"aggTrade: {e!r}") from None


def rest_agg_trade_row(symbol: str, d: dict, recv: datetime) -> tuple:
    """REST ``/fapi/v1/aggTrades`` item ``{a,p,q,f,l,T,m}`` -> row (no event time)."""
    try:
        m = d["m"]
        if type(m) is not bool:
            raise Malformed(f"m not a boolean: {m!r}")
        return (symbol, _int(d["a"]), _num(d["p"]), _num(d["q"]), _int(d["f"]), _int(d["l"]),
                _ms(d["T"]), m, None, recv)
    except (KeyError, TypeError) as e:
        raise Malformed(f"REST aggTrade: {e!r}") from None


def book_ticker_row(d: dict, recv: datetime) -> tuple:
    """bookTicker ``{e,u,s,b,B,a,A,T,E}`` -> binance_book_ticker row."""
    try:
        return (_sym(d["s"]), _int(d["u"]), _num(d["b"]), _num(d["B"]), _num(d["a"]), _num(d["A"]),
                _ms(d["T"]), _ms(d["E"]), recv)
    except (KeyError, TypeError) as e:
        raise Malformed(f"bookTicker: {e!r}") from None


def mark_price_row(d: dict, recv: datetime) -> tuple:
    """markPriceUpdate ``{e,E,s,p,i,P,r,T}`` -> binance_mark_price row.
    ``r`` and ``T`` are empty strings / 0 for delivery contracts: stored NULL."""
    try:
        r = d.get("r")
        t = d.get("T")
        return (_sym(d["s"]), _ms(d["E"]), _num(d["p"]),
                _num(d["i"]) if d.get("i") not in (None, "") else None,
                _num(d["P"]) if d.get("P") not in (None, "") else None,
                _num(r) if r not in (None, "") else None,
                _ms(t) if t else None, recv)
    except (KeyError, TypeError) as e:
        raise Malformed(f"markPrice: {e!r}") from None


def ticker_row(d: dict, recv: datetime) -> tuple:
    """24hrTicker ``{e,E,s,p,P,w,c,Q,o,h,l,v,q,O,C,F,L,n}`` -> binance_ticker_24h row."""
    try:
        return (_sym(d["s"]), _ms(d["E"]), _num(d["p"]), _num(d["P"]), _num(d["w"]), _num(d["c"]),
                _num(d["Q"]), _num(d["o"]), _num(d["h"]), _num(d["l"]), _num(d["v"]), _num(d["q"]),
                _ms(d["O"]), _ms(d["C"]), _int(d["F"]), _int(d["L"]), _int(d["n"]), recv)
    except (KeyError, TypeError) as e:
        raise Malformed(f"ticker: {e!r}") from None


def kline_row(d: dict, recv: datetime) -> tuple:
    """kline ``{e,E,s,k:{t,T,s,i,f,L,o,c,h,l,v,n,x,q,V,Q}}`` -> binance_kline row.
    Callers store it only when ``k.x`` is true (the kline is closed)."""
    try:
        k = d["k"]
        return (_sym(k["s"]), k["i"], _ms(k["t"]), _ms(k["T"]), _num(k["o"]), _num(k["h"]), _num(k["l"]),
                _num(k["c"]), _num(k["v"]), _int(k["n"]), _num(k["q"]), _num(k["V"]), _num(k["Q"]),
                _int(k["f"]), _int(k["L"]), _ms(d["E"]), recv, "ws")
    except (KeyError, TypeError) as e:
        raise Malformed(f"kline: {e!r}") from None


def rest_kline_row(symbol: str, interval: str, k: list, recv: datetime) -> tuple:
    """REST ``/fapi/v1/klines`` item ``[t, o, h, l, c, v, T, q, n, V, Q, ignore]`` -> row."""
    try:
        return (symbol, interval, _ms(k[0]), _ms(k[6]), _num(k[1]), _num(k[2]), _num(k[3]), _num(k[4]),
                _num(k[5]), _int(k[8]), _num(k[7]), _num(k[9]), _num(k[10]), None, None, None, recv, "rest")
    except (IndexError, TypeError) as e:
        raise Malformed(f"REST kline: {e!r}") from None


def stream_name(symbol: str, kind: str, interval: str = "1m") -> str:
    """Combined-stream name, e.g. ``btcusdt@aggTrade``, ``btcusdt@kline_1m``."""
    s = symbol.lower()
    return f"{s}@kline_{interval}" if kind == KLINE else f"{s}@{kind}"


def category(kind: str) -> str:
    """URL category of a stream kind: ``public`` (bookTicker, depth) or ``market``."""
    return "public" if kind in PUBLIC_KINDS else "market"
