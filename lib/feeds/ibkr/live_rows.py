"""feed-ibkr's adapter: TWS live market-data messages -> rows.  Pure, no I/O.

Input is each message's text fields as TWS sent them (see
:func:`feeds.ibkr.wire.tap_messages`), so prices and sizes are stored from
IB's own decimal text, never through a binary float.  Output rows, in the
column order of the tables of ``sql/0007_ibkr_live.sql``:

* :data:`TRADE_TABLE` ``ibkr_trade``: one row per trade of a stock, from
  RTVolume (generic tick 233, tickString type 48 ``price;size;ms;total
  volume;VWAP;single trade``; ``source`` ``rtvolume``) or tick-by-tick
  AllLast (``source`` ``alllast``; IB's time in whole seconds); with delayed
  market data, which has no RTVolume, the last price and its size (tick
  type 68; ``source`` ``last``, no IB time).
* :data:`QUOTE_TABLE` ``ibkr_quote``: the bid and ask (price and size) of a
  stock after each change, from reqMktData tick types 1/2 (price with size)
  and 0/3 (size), delayed 66/67/69/70 (``source`` ``mktdata``; IB gives no
  time), or tick-by-tick BidAsk (``source`` ``bidask``, with IB's time).
  A run of consecutive bid/ask messages of a contract is one change (TWS
  sends the bid and the ask of a new quote one after the other): the row is
  emitted at the contract's next other message or at the end of the socket
  read (:meth:`Quotes.take`, :meth:`Quotes.flush`).
  A bid or ask price of -1 is IB's "no quote on that side" and is stored as
  NULL.
* :data:`INDEX_TABLE` ``ibkr_index_tick``: the last price of an index (tick
  type 4, delayed 68), with IB's last timestamp (tickString 45/88, epoch
  seconds) when it came in the same read.
* :data:`ERROR_TABLE` ``ibkr_live_error``: IB's error messages about a
  contract's subscription.

Every row carries the market data type IB reported for the subscription
(message 58: 1 real-time, 2 frozen, 3 delayed, 4 delayed-frozen; NULL
before IB said), the receive time (UTC) and ``seq``, a per-process counter:
``(symbol, recv_time, seq)`` is each tick table's natural key, so a spool
replayed after a crash never duplicates a row.

Implausible values (a price not a positive decimal, a negative size, a time
before :data:`EARLIEST_MS` or more than 10 minutes ahead) raise
:class:`~feeds.plausible.Malformed`; nothing of such a message is applied.

Venue document: TWS API "Market Data: Top of Book" (tick types, generic tick
233 RTVolume), "Tick-by-Tick Data", "Market Data Types".
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import count

from .. import plausible as P
from ..sink import Table

__all__ = ["TRADE_TABLE", "QUOTE_TABLE", "INDEX_TABLE", "ERROR_TABLE", "TABLES", "EARLIEST_MS", "Trade", "Quotes",
           "parse_rtvolume", "parse_all_last", "parse_bid_ask", "price_text", "size_text", "ms_time",
           "utc_from_ms", "Seq", "MARKET_DATA_TYPES"]

UTC = dt.timezone.utc
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)

#: IB's market data type codes (reqMarketDataType / message 58) by the names of ``live.market_data_type``.
MARKET_DATA_TYPES = {"realtime": 1, "frozen": 2, "delayed": 3, "delayed-frozen": 4}

#: No IB market-data time is older than this (1990-01-01 UTC: before the TWS API existed).
EARLIEST_MS = 631_152_000_000

TRADE_TABLE = Table("ibkr_trade", ("symbol", "con_id", "source", "price", "size", "ib_time", "recv_time", "seq",
                                   "market_data_type", "total_volume", "vwap", "exchange", "conditions"),
                    partition_column="recv_time", time_column="recv_time")
QUOTE_TABLE = Table("ibkr_quote", ("symbol", "con_id", "source", "bid", "bid_size", "ask", "ask_size", "ib_time",
                                   "recv_time", "seq", "market_data_type"),
                    partition_column="recv_time", time_column="recv_time")
INDEX_TABLE = Table("ibkr_index_tick", ("symbol", "con_id", "price", "ib_time", "recv_time", "seq",
                                        "market_data_type"),
                    partition_column="recv_time", time_column="recv_time")
ERROR_TABLE = Table("ibkr_live_error", ("symbol", "con_id", "request", "code", "text", "error_time", "seq"))
TABLES = (TRADE_TABLE, QUOTE_TABLE, INDEX_TABLE, ERROR_TABLE)

# reqMktData tick types (TWS API "Available Tick Types")
BID_SIZE, BID, ASK, ASK_SIZE, LAST = 0, 1, 2, 3, 4
DELAYED_BID, DELAYED_ASK, DELAYED_LAST, DELAYED_BID_SIZE, DELAYED_ASK_SIZE = 66, 67, 68, 69, 70
LAST_TIMESTAMP, DELAYED_LAST_TIMESTAMP = 45, 88
RT_VOLUME, RT_TRADE_VOLUME = 48, 77
BID_TYPES = frozenset({BID, DELAYED_BID})
ASK_TYPES = frozenset({ASK, DELAYED_ASK})
BID_SIZE_TYPES = frozenset({BID_SIZE, DELAYED_BID_SIZE})
ASK_SIZE_TYPES = frozenset({ASK_SIZE, DELAYED_ASK_SIZE})
LAST_TYPES = frozenset({LAST, DELAYED_LAST})
LAST_TIME_TYPES = frozenset({LAST_TIMESTAMP, DELAYED_LAST_TIMESTAMP})
RTV_TYPES = frozenset({RT_VOLUME, RT_TRADE_VOLUME})

_WINDOW = P.Window(EARLIEST_MS)


class Seq:
    """The per-process row counter (``seq`` column); ``next()`` is the next value."""

    def __init__(self, start: int = 1):
        self._c = count(start)

    def next(self) -> int:
        return next(self._c)


def price_text(v: str, what: str = "price") -> str:
    """IB's price text, checked (a positive decimal).  Raises Malformed."""
    return P.decimal(v, what, P.POSITIVE)


def size_text(v: str, what: str = "size") -> str:
    """IB's size text, checked (a decimal >= 0).  Raises Malformed."""
    return P.decimal(v, what, P.NON_NEGATIVE)


def ms_time(v: str, what: str = "time") -> int:
    """Epoch milliseconds from IB's text, checked against the plausible
    window.  Raises Malformed."""
    try:
        ms = int(v)
    except (TypeError, ValueError):
        raise P.Malformed(f"{what} not an integer: {v!r:.60}") from None
    return _WINDOW.ms(ms, what)


def utc_from_ms(ms: int) -> dt.datetime:
    """Aware UTC datetime of epoch milliseconds ``ms`` (exact)."""
    return _EPOCH + dt.timedelta(milliseconds=ms)


@dataclass(slots=True)
class Trade:
    """One trade: IB's price and size text, IB's time (epoch ms), and the
    RTVolume extras (total volume, VWAP text; None for AllLast) or the
    AllLast extras (exchange, special conditions)."""
    price: str
    size: str
    time_ms: int
    total_volume: str | None = None
    vwap: str | None = None
    exchange: str | None = None
    conditions: str | None = None

    def decimal_price(self) -> Decimal:
        return Decimal(self.price)

    def decimal_size(self) -> Decimal:
        return Decimal(self.size)


def parse_rtvolume(value: str) -> Trade | None:
    """RTVolume text ``price;size;ms;total volume;VWAP;single trade`` ->
    :class:`Trade`; None for a volume-only update (empty price, IB's way of
    reporting trades it does not attribute).  Raises Malformed."""
    parts = value.split(";")
    if len(parts) != 6:
        raise P.Malformed(f"RTVolume has {len(parts)} fields, not 6: {value!r:.80}")
    price, size, ms, total, vwap, _single = parts
    if price == "":
        return None
    return Trade(price_text(price), size_text(size), ms_time(ms, "RTVolume time"),
                 size_text(total, "RTVolume total volume") if total else None,
                 price_text(vwap, "RTVolume VWAP") if vwap and vwap.strip("0.") else None)


def parse_all_last(fields: list[str]) -> Trade:
    """Tick-by-tick AllLast/Last message fields (``99, reqId, tickType,
    time, price, size, mask, exchange, conditions``) -> :class:`Trade`.
    Raises Malformed."""
    if len(fields) < 9:
        raise P.Malformed(f"tick-by-tick trade has {len(fields)} fields: {fields!r:.120}")
    t = ms_time(str(int(fields[3]) * 1000) if fields[3].isdigit() else fields[3], "tick-by-tick time")
    return Trade(price_text(fields[4]), size_text(fields[5]), t, exchange=fields[7] or None,
                 conditions=fields[8] or None)


def parse_bid_ask(fields: list[str]) -> tuple[int, str | None, str | None, str | None, str | None]:
    """Tick-by-tick BidAsk fields (``99, reqId, 3, time, bidPrice, askPrice,
    bidSize, askSize, mask``) -> ``(time_ms, bid, bid_size, ask, ask_size)``
    (a side priced -1 or 0 is None).  Raises Malformed."""
    if len(fields) < 9:
        raise P.Malformed(f"tick-by-tick BidAsk has {len(fields)} fields: {fields!r:.120}")
    t = ms_time(str(int(fields[3]) * 1000) if fields[3].isdigit() else fields[3], "tick-by-tick time")
    bid, ask = _side_price(fields[4], "bid"), _side_price(fields[5], "ask")
    return (t, bid, size_text(fields[6], "bid size") if bid is not None else None,
            ask, size_text(fields[7], "ask size") if ask is not None else None)


def _side_price(v: str, what: str) -> str | None:
    """A bid or ask price: None for IB's "no quote" (-1, 0), else a positive decimal."""
    if v in ("-1", "-1.0", "0", "0.0", "-1.00", "0.00"):
        return None
    return price_text(v, what)


@dataclass(slots=True)
class _Book:
    bid: str | None = None
    bid_size: str | None = None
    ask: str | None = None
    ask_size: str | None = None
    dirty: bool = False


@dataclass
class Quotes:
    """Top of book per subscription key from reqMktData messages; one row
    per changed key at :meth:`flush` (the end of a socket read)."""
    books: dict = field(default_factory=dict)
    changed: list = field(default_factory=list)

    def _book(self, key) -> _Book:
        b = self.books.get(key)
        if b is None:
            b = self.books[key] = _Book()
        return b

    def price(self, key, tick_type: int, price: str, size: str | None) -> None:
        """A tickPrice of type bid or ask (with its size text, or None).  Raises Malformed."""
        p = _side_price(price, "bid" if tick_type in BID_TYPES else "ask")
        s = size_text(size) if size not in (None, "") and p is not None else None
        b = self._book(key)
        if tick_type in BID_TYPES:
            b.bid, b.bid_size = p, s if s is not None else (b.bid_size if p is not None else None)
        else:
            b.ask, b.ask_size = p, s if s is not None else (b.ask_size if p is not None else None)
        self._mark(key, b)

    def size(self, key, tick_type: int, size: str) -> None:
        """A tickSize of type bid size or ask size.  Raises Malformed."""
        s = size_text(size)
        b = self._book(key)
        if tick_type in BID_SIZE_TYPES:
            if b.bid_size == s:
                return
            b.bid_size = s
        else:
            if b.ask_size == s:
                return
            b.ask_size = s
        self._mark(key, b)

    def _mark(self, key, b: _Book) -> None:
        if not b.dirty:
            b.dirty = True
            self.changed.append(key)

    def forget(self, key) -> None:
        """Drop a key's book (its subscription was cancelled or lost)."""
        self.books.pop(key, None)

    def take(self, key) -> tuple | None:
        """``(bid, bid_size, ask, ask_size)`` when ``key`` changed since it
        was last taken (and has a quote on some side), else None."""
        b = self.books.get(key)
        if b is None or not b.dirty:
            return None
        b.dirty = False
        if b.bid is None and b.ask is None:
            return None
        return b.bid, b.bid_size, b.ask, b.ask_size

    def flush(self) -> list[tuple]:
        """``[(key, bid, bid_size, ask, ask_size), ...]`` for every key
        changed since the last flush (a side without a quote is None)."""
        out = []
        for key in self.changed:
            b = self.books.get(key)
            if b is None or not b.dirty:
                continue
            b.dirty = False
            if b.bid is None and b.ask is None:
                continue
            out.append((key, b.bid, b.bid_size, b.ask, b.ask_size))
        self.changed.clear()
        return out
