"""Dhan candles: decoded feed records -> :class:`feeds.candles.CandleBuilder`
-> ``dhan_candle`` rows (sql/0011_dhan_live.sql).

Venue documents: DhanHQ v2 "Live Market Feed" (packet fields), "Annexure"
(exchange segments).
"""
from __future__ import annotations

from collections.abc import Iterable

from .. import candles as C
from ..candle_writer import NS, CandleWriter
from ..sink import Sink, Table
from . import wire
from .connections import Subscription


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


class DhanCandles(CandleWriter):
    """Candles of the collected instruments (the builder's key is
    ``segment << 32 | security_id``), written through ``sink`` into
    ``dhan_candle`` (:class:`feeds.candle_writer.CandleWriter`: its
    methods, and the rules of cumulative volume and of one second's
    trades).

    What counts as a trade in Dhan's packets: the price is the packet's
    LTP, the time its LTT (:func:`feeds.dhan.wire.ltt_to_utc_ns`, whole
    seconds; the receive time when the packet has none); quote and full
    packets carry the day's cumulative volume.  Ticker packets and every
    packet of an index (IDX_I) carry no volume (``volumeless``: the keys of
    such subscriptions): each is a price, counted in the candle, whose
    volume is NULL.

    Prices go through the builder as integers of 10**-d rupees (d =
    :data:`feeds.dhan.wire.PRICE_DECIMALS` of the segment: paise for
    equities).  Not thread-safe: the collector calls it from its event
    loop.  ``records(records, recv_ns)`` folds the records of one
    message, or of the messages of one socket read."""

    table = CANDLE_TABLE

    def __init__(self, settings, sessions: C.Sessions, subs: Iterable[Subscription], sink: Sink,
                 since_ns: int | None = None):
        super().__init__(settings, sessions, sink, since_ns=since_ns)
        # the builder's key of an instrument: segment << 32 | security id
        subs = list(subs)
        self._keys = {s.segment << 32 | s.security_id: _Key(s.segment << 32 | s.security_id) for s in subs}
        self.volumeless = {s.segment << 32 | s.security_id for s in subs if s.volumeless}
        self._scale = {seg: 10 ** d for seg, d in wire.PRICE_DECIMALS.items()}

    def key_of(self, segment: int, security_id: int) -> int:
        """The builder's key of an instrument."""
        raw = segment << 32 | security_id
        key = self._keys.get(raw)
        if key is None:
            key = self._keys[raw] = _Key(raw)
        return key

    def lead(self, key: int) -> tuple:
        """``(exchange_segment name, security_id)``."""
        return wire.SEGMENT_NAMES[key >> 32], key & 0xFFFFFFFF

    def decimals(self, key: int) -> int:
        return wire.PRICE_DECIMALS[key >> 32]

    def records(self, records: list, recv_ns: int) -> None:
        """Fold ``records`` (decoded feed records, of one message or of many
        received together) received at ``recv_ns`` (epoch ns): each quote,
        full or ticker packet is a trade (see the class); the rest are
        skipped."""
        fold = self._fold
        scale = self._scale
        quiet = self.volumeless
        keys = self._keys
        ist = wire.IST_OFFSET_S
        full, quote, ticker = wire.Full, wire.Quote, wire.Ticker
        for r in records:
            cls = type(r)
            if cls is full or cls is quote:
                seg = r[0]
                key = keys.get(seg << 32 | r[1]) or self.key_of(seg, r[1])
                ltt = r[4]
                fold(key, (ltt - ist) * NS if ltt else recv_ns, round(r[2] * scale[seg]),
                     None if key in quiet else r[6], recv_ns)
            elif cls is ticker:
                seg = r[0]
                key = keys.get(seg << 32 | r[1]) or self.key_of(seg, r[1])
                ltt = r[3]
                fold(key, (ltt - ist) * NS if ltt else recv_ns, round(r[2] * scale[seg]), None, recv_ns)
