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


class _PriceTexts(dict):
    """``float -> text`` for one number of decimals, filled on first use:
    prices repeat (they sit on the tick grid), so formatting one is mostly a
    dict lookup.  Emptied when it holds :attr:`LIMIT` prices."""

    __slots__ = ("fmt",)
    LIMIT = 200_000

    def __init__(self, decimals: int):
        super().__init__()
        self.fmt = wire.PRICE_FORMAT[decimals]

    def __missing__(self, value: float) -> str:
        if len(self) >= self.LIMIT:
            self.clear()
        t = self[value] = self.fmt % value
        return t


_NAMES = wire.SEGMENT_NAMES
_TEXTS = {d: _PriceTexts(d) for d in set(wire.PRICE_DECIMALS.values())}
#: price texts per segment code
_FMT = {seg: _TEXTS[d] for seg, d in wire.PRICE_DECIMALS.items()}
_Q = "{%d,%d,%d,%d,%d}"
_TICKER, _QUOTE, _FULL, _OI, _PREV, _STATUS = (TICKER_TABLE.name, QUOTE_TABLE.name, FULL_TABLE.name,
                                              OI_TABLE.name, PREV_CLOSE_TABLE.name, MARKET_STATUS_TABLE.name)


class RowMaker:
    """Rows of decoded records, gathered per table until taken.

    :meth:`add` appends the rows of one message's records (a list from
    :func:`feeds.dhan.wire.decode`) received at ``recv`` (text from
    :func:`time_text`) to :attr:`rows` (table name -> list of tuples) and
    returns the :class:`~feeds.dhan.wire.Disconnect` records, which the
    collector handles (and records with :func:`disconnect_row`).
    :meth:`take` hands the gathered rows over and starts afresh.
    ``counts``: rows made per table since the start."""

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
        """Append the rows of ``records``; returns the Disconnect records among them."""
        rows = self.rows
        names = _NAMES
        fmts = _FMT
        lt = ltt_text
        disc: list = []
        seq = 0
        for r in records:
            k = r.kind
            if k == "full":
                P = fmts[r[0]]
                d = r[16]
                ltt = r[4]
                rows[_FULL].append((
                    names[r[0]], r[1], P[r[2]], r[3], lt(ltt) if ltt else None, P[r[5]], r[6], r[7], r[8],
                    r[9], r[10], r[11], P[r[12]], P[r[13]], P[r[14]], P[r[15]],
                    _Q % d[0::6], _Q % d[1::6], _Q % d[2::6], _Q % d[3::6],
                    "{%s,%s,%s,%s,%s}" % (P[d[4]], P[d[10]], P[d[16]], P[d[22]], P[d[28]]),
                    "{%s,%s,%s,%s,%s}" % (P[d[5]], P[d[11]], P[d[17]], P[d[23]], P[d[29]]),
                    recv, seq))
            elif k == "quote":
                P = fmts[r[0]]
                ltt = r[4]
                rows[_QUOTE].append((names[r[0]], r[1], P[r[2]], r[3], lt(ltt) if ltt else None, P[r[5]], r[6],
                                     r[7], r[8], P[r[9]], P[r[10]], P[r[11]], P[r[12]], recv, seq))
            elif k == "ticker":
                ltt = r[3]
                rows[_TICKER].append((names[r[0]], r[1], fmts[r[0]][r[2]], lt(ltt) if ltt else None, recv, seq))
            elif k == "oi":
                rows[_OI].append((names[r[0]], r[1], r[2], recv, seq))
            elif k == "prev_close":
                rows[_PREV].append((names[r[0]], r[1], fmts[r[0]][r[2]], r[3], recv, seq))
            elif k == "market_status":
                rows[_STATUS].append((names[r[0]], r[1], r[2], recv, seq))
            elif k == "disconnect":
                disc.append(r)
            seq += 1
        self.pending += seq - len(disc)
        return disc
