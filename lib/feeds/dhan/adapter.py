"""Dhan live feed records -> table rows.  Pure, no I/O.

Venue document: DhanHQ v2 "Live Market Feed" (sections "Ticker Packet",
"Quote Packet", "OI Data", "Prev Close", "Market Status", "Full Packet",
"Feed Disconnect").  The packets are decoded by
:func:`feeds.dhan.wire.decode` into records; :meth:`RowMaker.add` turns the
records of one WebSocket message into rows (tuples in the column order of
the :class:`~feeds.sink.Table` below, ready for the sink's COPY):

=================  ===========================  ===================================
record             table                        sql/0011_dhan_live.sql
=================  ===========================  ===================================
Ticker (code 2)    ``dhan_tick_ticker``         ltp, ltt
Quote (code 4)     ``dhan_tick_quote``          the quote fields
Full (code 8)      ``dhan_tick_full``           quote fields, OI, 5-level depth arrays
OpenInterest (5)   ``dhan_tick_oi``             oi
PrevClose (6)      ``dhan_prev_close``          prev_close, prev_oi
MarketStatus (7)   ``dhan_market_status``       the body (bytes)
Disconnect (50)    ``dhan_disconnect``          (made by the collector:
                                                :func:`disconnect_row`)
=================  ===========================  ===================================

Every tick row ends with ``recv_time`` (text, the message's receive time)
and ``seq`` (the packet's position in its message); with the exchange
segment and the security id they are the natural key.  The exchange
segment is written by its Annexure name (``NSE_EQ``).

Prices: Dhan sends float32 rupees; each is written as decimal text rounded
to :data:`feeds.dhan.wire.PRICE_DECIMALS` of its segment (2, or 4 for the
currency segments): ``1650.449951171875 -> "1650.45"``, exact below
:data:`feeds.dhan.wire.EXACT_BELOW` (the rule of :mod:`feeds.dhan.wire`).
A price never reaches the database as a binary float.

Times: ``ltt`` is epoch seconds of the IST wall clock on the wire
(:func:`feeds.dhan.wire.ltt_to_utc_ns`); rows carry it as UTC timestamp
text (``2024-09-11 03:45:00+00:00`` for 09:15:00 IST); 0 (no trade) is NULL.
"""
from __future__ import annotations

from operator import itemgetter

from ..sink import Table
from ..timetext import epoch_text, time_text
from . import wire

__all__ = ["TICKER_TABLE", "QUOTE_TABLE", "FULL_TABLE", "OI_TABLE", "PREV_CLOSE_TABLE", "MARKET_STATUS_TABLE",
           "DISCONNECT_TABLE", "TICK_TABLES", "TABLES", "TABLE_OF_KIND", "RowMaker", "disconnect_row",
           "epoch_text", "time_text", "ltt_text"]

TICKER_TABLE = Table("dhan_tick_ticker", ("exchange_segment", "security_id", "ltp", "ltt", "recv_time", "seq"),
                     partition_column="recv_time", time_column="recv_time")
_QUOTE_COLS = ("exchange_segment", "security_id", "ltp", "ltq", "ltt", "atp", "volume", "total_sell_qty",
               "total_buy_qty")
QUOTE_TABLE = Table("dhan_tick_quote", _QUOTE_COLS + ("open", "close", "high", "low", "recv_time", "seq"),
                    partition_column="recv_time", time_column="recv_time")
FULL_TABLE = Table("dhan_tick_full", _QUOTE_COLS + (
    "oi", "oi_day_high", "oi_day_low", "open", "close", "high", "low", "bid_quantity", "ask_quantity",
    "bid_orders", "ask_orders", "bid_price", "ask_price", "recv_time", "seq"),
    partition_column="recv_time", time_column="recv_time")
OI_TABLE = Table("dhan_tick_oi", ("exchange_segment", "security_id", "oi", "recv_time", "seq"),
                 partition_column="recv_time", time_column="recv_time")
PREV_CLOSE_TABLE = Table("dhan_prev_close", ("exchange_segment", "security_id", "prev_close", "prev_oi",
                                             "recv_time", "seq"))
MARKET_STATUS_TABLE = Table("dhan_market_status", ("exchange_segment", "security_id", "body", "recv_time", "seq"))
DISCONNECT_TABLE = Table("dhan_disconnect", ("recv_time", "connection", "code", "meaning", "action"))

TICK_TABLES = (TICKER_TABLE, QUOTE_TABLE, FULL_TABLE, OI_TABLE)
TABLES = TICK_TABLES + (PREV_CLOSE_TABLE, MARKET_STATUS_TABLE, DISCONNECT_TABLE)
#: table name per record kind (``Record.kind``), disconnects excepted
TABLE_OF_KIND = {"ticker": TICKER_TABLE.name, "quote": QUOTE_TABLE.name, "full": FULL_TABLE.name,
                 "oi": OI_TABLE.name, "prev_close": PREV_CLOSE_TABLE.name,
                 "market_status": MARKET_STATUS_TABLE.name}

_IST = wire.IST_OFFSET_S
def ltt_text(ltt_ist: int) -> str | None:
    """A packet's ``ltt`` (epoch seconds of the IST wall clock) as UTC text; 0 -> None."""
    return epoch_text(ltt_ist - _IST) if ltt_ist else None


def disconnect_row(recv: str, connection: int, code: int, action: str) -> tuple:
    """A ``dhan_disconnect`` row: the reason ``code`` with its Annexure meaning
    (:func:`feeds.dhan.wire.disconnect_reason`) and the collector's ``action``."""
    return (recv, connection, code, wire.disconnect_reason(code), action)


_NAMES = wire.SEGMENT_NAMES
#: %-format of one price, per segment code (wire.PRICE_DECIMALS: 2 decimals, 4 for currency)
_PRICE = {seg: wire.PRICE_FORMAT[d] for seg, d in wire.PRICE_DECIMALS.items()}
_SEP = "\x00"                   # never in a number's text: splits the texts of one full packet
_INTS = "{%d,%d,%d,%d,%d}"


def _full_format(decimals: int) -> str:
    """The texts of a full packet in one %-format, ``_SEP`` between them: ltp,
    atp, open, close, high, low, then the depth arrays bid_quantity,
    ask_quantity, bid_orders, ask_orders, bid_price, ask_price (its
    arguments: ``_full_head(record) + _depth_columns(record.depth)``).  One
    format and one split cost less than a format per text, or than looking
    the prices up in a cache (a large dict is slow to reach)."""
    p = wire.PRICE_FORMAT[decimals]
    prices = "{" + ",".join([p] * 5) + "}"
    return _SEP.join([p] * 6 + [_INTS] * 4 + [prices] * 2)


#: the full packet's text format per segment code
_FULL_TEXT = {seg: _full_format(d) for seg, d in wire.PRICE_DECIMALS.items()}
#: a Full record's 6 prices, then its flat depth reordered field by field (level 1 first)
_full_head = itemgetter(2, 5, 12, 13, 14, 15)
_depth_columns = itemgetter(*(6 * lvl + k for k in range(6) for lvl in range(5)))
_QUOTE_TEXT = {seg: _SEP.join([f] * 6) for seg, f in _PRICE.items()}
_quote_prices = itemgetter(2, 5, 9, 10, 11, 12)
_TICKER, _QUOTE, _FULL, _OI, _PREV, _STATUS = (TICKER_TABLE.name, QUOTE_TABLE.name, FULL_TABLE.name,
                                              OI_TABLE.name, PREV_CLOSE_TABLE.name, MARKET_STATUS_TABLE.name)
_Full, _Quote, _Ticker, _OpenInterest, _PrevClose, _MarketStatus, _Disconnect = (
    wire.Full, wire.Quote, wire.Ticker, wire.OpenInterest, wire.PrevClose, wire.MarketStatus, wire.Disconnect)


class RowMaker:
    """Rows of decoded records, gathered per table until taken.

    :meth:`add` appends the rows of one message's records (a list from
    :func:`feeds.dhan.wire.decode`) received at ``recv`` (text from
    :func:`time_text`) to :attr:`rows` (table name -> list of tuples) and
    returns the :class:`~feeds.dhan.wire.Disconnect` records, which the
    collector handles (and records with :func:`disconnect_row`);
    :meth:`add_many` does the same for the records of many messages
    (:func:`feeds.dhan.wire.decode_many`).  :meth:`take` hands the gathered
    rows over and starts afresh.  ``pending``: rows gathered since the last
    :meth:`take`; ``counts``: rows made per table since the start."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple]] = {t.name: [] for t in TABLES}
        self.pending = 0
        self.counts: dict[str, int] = {t.name: 0 for t in TABLES}

    def take(self) -> dict[str, list[tuple]]:
        """The rows gathered since the last call (table -> rows; empty tables left out)."""
        out = {k: v for k, v in self.rows.items() if v}
        for k, v in out.items():
            self.counts[k] += len(v)
            self.rows[k] = []
        self.pending = 0
        return out

    def add(self, records: list, recv: str) -> list:
        """Append the rows of ``records`` (one message's); returns the Disconnect records among them."""
        return [d for _, d in self.add_many(records, [0] * len(records), (recv,))]

    def add_many(self, records: list, index: list, recvs) -> list:
        """Append the rows of the records of many messages: ``records`` in
        order, ``index[j]`` the position of the message of ``records[j]``
        (non-decreasing, :attr:`feeds.dhan.wire.DecodedMany.index`),
        ``recvs[i]`` the receive time text of message ``i``.  ``seq`` is a
        record's position among its message's records.  Returns the
        Disconnect records among them as ``(message position, record)``
        pairs."""
        rows = self.rows
        full = rows[_FULL]
        names = _NAMES
        texts = _FULL_TEXT
        head = _full_head
        columns = _depth_columns
        disc: list = []
        prev = -1
        seq = 0
        last_ltt = 0
        ltt_txt = None
        j = -1
        for r in records:
            j += 1
            i = index[j]
            if i == prev:
                seq += 1
            else:
                prev, seq = i, 0
                recv = recvs[i]
            cls = type(r)
            if cls is _Full:
                seg = r[0]
                ltt = r[4]
                if ltt != last_ltt:
                    last_ltt = ltt
                    ltt_txt = ltt_text(ltt)
                (ltp, atp, open_, close, high, low, bid_qty, ask_qty, bid_orders, ask_orders, bid_price,
                 ask_price) = (texts[seg] % (head(r) + columns(r[16]))).split(_SEP)
                full.append((names[seg], r[1], ltp, r[3], ltt_txt, atp, r[6], r[7], r[8], r[9], r[10], r[11],
                             open_, close, high, low, bid_qty, ask_qty, bid_orders, ask_orders, bid_price,
                             ask_price, recv, seq))
            elif cls is _Quote:
                seg = r[0]
                ltp, atp, open_, close, high, low = (_QUOTE_TEXT[seg] % _quote_prices(r)).split(_SEP)
                rows[_QUOTE].append((names[seg], r[1], ltp, r[3], ltt_text(r[4]), atp, r[6], r[7], r[8],
                                     open_, close, high, low, recv, seq))
            elif cls is _Ticker:
                rows[_TICKER].append((names[r[0]], r[1], _PRICE[r[0]] % r[2], ltt_text(r[3]), recv, seq))
            elif cls is _OpenInterest:
                rows[_OI].append((names[r[0]], r[1], r[2], recv, seq))
            elif cls is _PrevClose:
                rows[_PREV].append((names[r[0]], r[1], _PRICE[r[0]] % r[2], r[3], recv, seq))
            elif cls is _MarketStatus:
                rows[_STATUS].append((names[r[0]], r[1], r[2], recv, seq))
            elif cls is _Disconnect:
                disc.append((i, r))
        self.pending += len(records) - len(disc)
        return disc
