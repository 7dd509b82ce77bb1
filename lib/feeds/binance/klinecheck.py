"""The kline check: Binance's own closed one-minute klines against the
one-minute candles built from the aggTrades the collector stored.

Pure bookkeeping, no I/O and no asyncio: :class:`KlineCheck` is fed every
stored aggTrade and every closed ``1m`` kline by
:class:`feeds.binance.collector.BinanceCollector` and returns
:class:`Verdict` objects; the collector counts them, writes the
``binance_kline_check`` rows (:func:`check_row`) and, for a mismatch, fills
the minute from REST and compares again (:func:`candle_of`,
:func:`differences`).

Shapes and units
----------------
Times are int epoch milliseconds (Binance's ``T`` of an aggTrade, ``t`` of a
kline); a minute is labelled by its start (``T - T % 60000``).  Prices and
quantities are the venue's decimal strings and are compared as
:class:`decimal.Decimal`, exactly (``"7.6080"`` equals ``"7.608"``).  The
candle of a minute's aggTrades (:class:`Candle`): open = price of the lowest
aggregate id ``a``, close = price of the highest, high/low = the largest and
smallest price, volume = sum of ``q``, trades = sum of ``l - f + 1``.  It is
compared with the kline's ``o h l c v n``; a minute without trades has
``n = 0`` and ``v = 0`` on both sides and its prices (Binance repeats the
previous close) are not compared.

Which minutes are compared
--------------------------
Only minutes whose whole span was observed on the symbol's aggTrade stream:

* not the minute in which the symbol's first aggTrade arrived (the process
  started, or an id jump was accepted, inside it): comparisons start with
  the following minute (:attr:`SymbolState.since`);
* a minute in which the stream's connection was lost (or replaced because
  it was stale) waits until the first aggTrade after the reconnect shows
  that nothing was lost (its id continues the last one) or until the gap
  fill of the ids lost meanwhile has completed; a fill that could not get
  every id makes those minutes not comparable;
* aggTrades filled from REST after an id gap count like streamed ones.

Others are counted as "not comparable", never as mismatches.  A closed kline
is compared as soon as the stream shows that its minute is over - an
aggTrade with a later time arrived, or the last trade id received reached
the kline's ``L`` (the aggTrade of a minute's last trade can arrive shortly
after the kline) - or :data:`WAIT_S` seconds after it arrived.  State is
bounded: a minute's candle is dropped once compared, and minutes more than
:data:`KEEP_MINUTES` behind a symbol's newest trade are dropped uncompared.

Venue document: Binance "USDⓈ-M Futures / Websocket Market Streams"
(Aggregate Trade Streams; Kline/Candlestick Streams: ``k.t k.T k.o k.h k.l
k.c k.v k.n k.f k.L k.x``) and "Market Data Endpoints / Compressed/Aggregate
Trades List" (only market trades are aggregated: insurance-fund and ADL
trades are in no aggTrade, so a minute with such trades differs from its
kline in ``n`` and ``v`` however complete the collection is).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Iterable

MINUTE_MS = 60_000
#: minutes behind a symbol's newest aggTrade for which candles and waiting klines are kept
KEEP_MINUTES = 5
#: seconds a closed kline waits for the stream to show that its minute is over
WAIT_S = 5.0
#: minute fills from REST waiting or running at once; a mismatch beyond them is recorded without a fill
MAX_PENDING_FILLS = 20

#: the compared fields, in the order the check rows name them
FIELDS = ("open", "high", "low", "close", "volume", "trades")

OK, MISMATCH, NOT_COMPARABLE = "ok", "mismatch", "not_comparable"

_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Candle:
    """One minute's values: prices and volume as Decimal (prices None when
    the minute had no trade), ``trades`` an int.  ``first_id``/``last_id``:
    the lowest and highest aggregate id folded (None without trades; always
    None for a kline)."""
    open: Decimal | None
    high: Decimal | None
    low: Decimal | None
    close: Decimal | None
    volume: Decimal
    trades: int
    first_id: int | None = None
    last_id: int | None = None

    def texts(self) -> tuple:
        """``(open, high, low, close, volume, trades)`` as row values: decimal text or None, int."""
        return tuple(None if x is None else str(x) for x in (self.open, self.high, self.low, self.close,
                                                              self.volume)) + (self.trades,)


EMPTY = Candle(None, None, None, None, _ZERO, 0)


def kline_candle(k: dict) -> Candle:
    """The ``k`` object of a kline message (checked by the adapter) -> :class:`Candle`."""
    return Candle(Decimal(k["o"]), Decimal(k["h"]), Decimal(k["l"]), Decimal(k["c"]), Decimal(k["v"]), k["n"])


def candle_of(trades: Iterable[tuple]) -> Candle:
    """The candle of aggTrades given as ``(a, p, q, f, l)`` tuples (ids int,
    price and quantity decimal strings), in any order; duplicates of an id
    count once.  :data:`EMPTY` for none."""
    seen: dict[int, tuple] = {}
    for t in trades:
        seen.setdefault(t[0], t)
    if not seen:
        return EMPTY
    ids = sorted(seen)
    prices = [Decimal(seen[a][1]) for a in ids]
    return Candle(prices[0], max(prices), min(prices), prices[-1],
                  sum((Decimal(seen[a][2]) for a in ids), _ZERO),
                  sum(seen[a][4] - seen[a][3] + 1 for a in ids), ids[0], ids[-1])


def differences(kline: Candle, agg: Candle) -> tuple[str, ...]:
    """Names (of :data:`FIELDS`) of the values in which ``agg`` differs from
    ``kline``; ``()`` when they agree.  Prices are compared only when either
    side has trades."""
    out = []
    if kline.trades or agg.trades:
        for name in ("open", "high", "low", "close"):
            if getattr(kline, name) != getattr(agg, name):
                out.append(name)
    if kline.volume != agg.volume:
        out.append("volume")
    if kline.trades != agg.trades:
        out.append("trades")
    return tuple(out)


class Fold:
    """The running candle of one symbol's minute ``[start, end)``.

    Prices are kept as the venue's strings; high and low are found through
    their floats (``hf``, ``lf``), which is exact: a float of a decimal string
    is larger than another's only when the decimal is, and equal floats are
    decided by :class:`~decimal.Decimal` (:meth:`extreme`).  The collector's
    hot path updates the newest fold of a symbol inline for an aggTrade that
    follows the last one (``n``, ``v``, then :meth:`extreme` when the price
    leaves ``[lf, hf]``, ``c``, ``c_a``); :meth:`add` takes a trade in any
    order (REST fills)."""

    __slots__ = ("start", "end", "o", "o_a", "c", "c_a", "h", "hf", "l", "lf", "v", "n")

    def __init__(self, start: int, a: int, p: str, q: str, f: int, l: int):
        self.start = start
        self.end = start + MINUTE_MS
        self.o = self.c = self.h = self.l = p
        self.hf = self.lf = float(p)
        self.o_a = self.c_a = a
        self.v = Decimal(q)
        self.n = l - f + 1

    def extreme(self, p: str, x: float) -> None:
        """Price ``p`` (``x = float(p)``) as a new high or low when it is one."""
        if x > self.hf or (x == self.hf and Decimal(p) > Decimal(self.h)):
            self.h, self.hf = p, x
        if x < self.lf or (x == self.lf and Decimal(p) < Decimal(self.l)):
            self.l, self.lf = p, x

    def add(self, a: int, p: str, q: str, f: int, l: int) -> None:
        if a < self.o_a:
            self.o, self.o_a = p, a
        if a > self.c_a:
            self.c, self.c_a = p, a
        self.extreme(p, float(p))
        self.v += Decimal(q)
        self.n += l - f + 1

    def candle(self) -> Candle:
        return Candle(Decimal(self.o), Decimal(self.h), Decimal(self.l), Decimal(self.c), self.v, self.n,
                      self.o_a, self.c_a)


@dataclass(slots=True)
class _Waiting:
    """A closed kline waiting for its comparison."""
    k: dict
    last: int           # its L (last trade id; -1 without trades)
    since: float        # monotonic time it arrived


@dataclass(slots=True)
class SymbolState:
    """The check's state of one symbol (see the module doc).

    ``folds``: minute start -> :class:`Fold`; ``newest``: start of the newest
    minute with a streamed aggTrade (-1: none yet); ``since``: the first
    minute that may be compared (None: no aggTrade yet); ``floor``: minutes
    before it were dropped; ``waiting``: minute -> kline waiting;
    ``decided``: minutes compared (or given up) recently; ``unsure_from``:
    after a lost connection, the minute from which trades may be missing
    (None: nothing unsure); ``awaiting_first``: no aggTrade since that
    reconnect yet; ``fills``: first ids of the gap fills that settle it."""
    folds: dict[int, Fold] = field(default_factory=dict)
    newest: int = -1
    since: int | None = None
    floor: int = 0
    waiting: dict[int, _Waiting] = field(default_factory=dict)
    decided: set[int] = field(default_factory=set)
    unsure_from: int | None = None
    awaiting_first: bool = False
    fills: set[int] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome for one symbol's minute: ``outcome`` is :data:`OK`,
    :data:`MISMATCH` or :data:`NOT_COMPARABLE` (then ``kline``/``agg`` are
    None and ``reason`` says why); ``differs``: the fields that disagree."""
    symbol: str
    minute: int
    outcome: str
    kline: Candle | None = None
    agg: Candle | None = None
    differs: tuple[str, ...] = ()
    reason: str = ""


class KlineCheck:
    """Per-symbol folds of one-minute candles and their comparison with the
    closed ``1m`` klines (see the module doc).

    ``cur``: symbol -> its newest :class:`Fold`, for the collector's hot path
    (an aggTrade inside ``[fold.start, fold.end)`` that follows the last one
    is folded inline, see :class:`Fold`; anything else goes to :meth:`trade`).  ``counts``:
    verdicts so far by outcome.  Every method returns the verdicts it
    reached (possibly none)."""

    def __init__(self, *, wait_s: float = WAIT_S, keep_minutes: int = KEEP_MINUTES, clock=time.monotonic):
        self.cur: dict[str, Fold] = {}
        self.syms: dict[str, SymbolState] = {}
        self.counts = {OK: 0, MISMATCH: 0, NOT_COMPARABLE: 0}
        self.wait_s = wait_s
        self.keep_ms = keep_minutes * MINUTE_MS
        self.clock = clock
        self._with_waiting: set[str] = set()

    # ------------------------------------------------------------ aggTrades
    def trade(self, sym: str, a: int, prev: int | None, p: str, q: str, f: int, l: int, t: int) -> list[Verdict]:
        """A streamed (or confirmed held) aggTrade the hot path did not fold:
        the first of a new minute, the first of the symbol or after a
        reconnect, one out of time order.  ``prev``: the aggregate id accepted
        before it (None: none, or not continuous - observation starts anew)."""
        st = self.syms.get(sym)
        if st is None:
            st = self.syms[sym] = SymbolState()
        m = t - t % MINUTE_MS
        out: list[Verdict] = []
        if prev is None:
            out += self._restart(sym, st, m)
        elif st.awaiting_first:
            st.awaiting_first = False
            if a != prev + 1:
                st.fills.add(prev + 1)      # the collector fills prev+1 .. a-1
        if st.since is None:
            st.since = m + MINUTE_MS
        fd = self._fold(st, m, a, p, q, f, l)
        if m > st.newest:
            st.newest = m
            out += self._prune(sym, st, m)
        if m == st.newest:
            if fd is not None:
                self.cur[sym] = fd
            else:
                self.cur.pop(sym, None)
        if st.unsure_from is not None and not st.awaiting_first and not st.fills:
            st.unsure_from = None
        if st.waiting:
            out += self._settle(sym, st, self.clock(), l)
        return out

    def filled(self, sym: str, trades: Iterable[tuple]) -> None:
        """aggTrades filled from REST after an id gap (stored): ``(a, p, q, f, l, T)`` tuples."""
        st = self.syms.get(sym)
        if st is None or st.since is None:
            return
        for a, p, q, f, l, t in trades:
            self._fold(st, t - t % MINUTE_MS, a, p, q, f, l)

    def _fold(self, st: SymbolState, m: int, a: int, p: str, q: str, f: int, l: int) -> Fold | None:
        # minutes before ``since`` are folded too (never compared): the hot path then takes their trades
        if m < st.floor or m in st.decided:
            return None
        fd = st.folds.get(m)
        if fd is None:
            fd = st.folds[m] = Fold(m, a, p, q, f, l)
        else:
            fd.add(a, p, q, f, l)
        return fd

    def _restart(self, sym: str, st: SymbolState, m: int) -> list[Verdict]:
        """Observation of ``sym`` starts anew with a trade in minute ``m``."""
        out = [self._give_up(sym, st, w, "the aggTrade ids of the symbol started anew") for w in sorted(st.waiting)]
        st.folds.clear()
        st.decided.clear()
        st.since = m + MINUTE_MS
        st.newest = -1
        st.unsure_from, st.awaiting_first = None, False
        st.fills.clear()
        self.cur.pop(sym, None)
        return out

    # ------------------------------------------------------------ connections and fills
    def connection_lost(self, symbols: Iterable[str]) -> None:
        """The connection carrying these symbols' aggTrade streams was lost
        or replaced: their newest minute (and later ones) may lack trades
        until the first aggTrade after the reconnect (and any gap fill it
        starts) settles it."""
        for sym in symbols:
            st = self.syms.get(sym)
            if st is None or st.newest < 0:
                continue
            st.unsure_from = st.newest if st.unsure_from is None else min(st.unsure_from, st.newest)
            st.awaiting_first = True
            self.cur.pop(sym, None)        # the next aggTrade goes through trade()

    def gap_filled(self, sym: str, first: int, complete: bool) -> list[Verdict]:
        """The gap fill starting at id ``first`` ended (``complete``: every id
        was filled and stored).  A fill that settles a reconnect and failed
        makes the minutes up to the newest one not comparable."""
        st = self.syms.get(sym)
        if st is None or first not in st.fills:
            return []
        st.fills.discard(first)
        out: list[Verdict] = []
        if not complete and st.since is not None:
            st.since = max(st.since, st.newest + MINUTE_MS)
            for m in [m for m in st.folds if m < st.since]:
                del st.folds[m]
            self.cur.pop(sym, None)
            out += [self._give_up(sym, st, w, "aggTrades lost at a reconnect could not be filled")
                    for w in sorted(x for x in st.waiting if x < st.since)]
        if not st.awaiting_first and not st.fills:
            st.unsure_from = None
        if st.waiting:
            out += self._settle(sym, st, self.clock(), None)
        return out

    # ------------------------------------------------------------ klines
    def kline(self, sym: str, k: dict, last_trade_id: int) -> list[Verdict]:
        """A closed ``1m`` kline (``k`` checked by the adapter, stored).
        ``last_trade_id``: the ``l`` of the last aggTrade received for ``sym``
        (-1: none).  Compared now when its minute is known to be over, else
        kept waiting (:meth:`due`)."""
        m = k["t"]
        st = self.syms.get(sym)
        if st is None or st.since is None or m < st.since:
            if st is not None and m >= st.floor:
                st.folds.pop(m, None)
                st.decided.add(m)
            return [self._verdict_nc(sym, m, "the aggTrade stream was not observed from the minute's start")]
        if m < st.floor:
            return [self._verdict_nc(sym, m, "the minute's aggTrades are no longer kept")]
        if m in st.decided or m in st.waiting:
            return []
        out = self._prune(sym, st, m)         # a quiet symbol's newest trade stays behind: prune by the klines too
        w = _Waiting(k, k["L"], self.clock())
        st.waiting[m] = w
        self._with_waiting.add(sym)
        return out + self._settle(sym, st, w.since, last_trade_id, only=m)

    def due(self, last_trade_ids: dict[str, int]) -> list[Verdict]:
        """Every status interval: klines whose wait (:data:`WAIT_S`) is over
        are compared; those kept unsure by a reconnect longer than
        :data:`KEEP_MINUTES` are given up (not comparable)."""
        now = self.clock()
        out: list[Verdict] = []
        for sym in list(self._with_waiting):
            st = self.syms.get(sym)
            if st is None or not st.waiting:
                self._with_waiting.discard(sym)
                continue
            out += self._settle(sym, st, now, last_trade_ids.get(sym, -1))
        return out

    def _unsure(self, st: SymbolState, m: int) -> bool:
        return st.unsure_from is not None and m + MINUTE_MS > st.unsure_from

    def _settle(self, sym: str, st: SymbolState, now: float, last_trade_id: int | None,
                only: int | None = None) -> list[Verdict]:
        out = []
        for m in sorted(st.waiting) if only is None else (only,):
            w = st.waiting[m]
            if self._unsure(st, m):
                if now - w.since > self.keep_ms / 1000:
                    out.append(self._give_up(sym, st, m, "a reconnect inside the minute was not settled in time"))
                continue
            over = (w.k["n"] == 0 or st.newest > m or (last_trade_id is not None and last_trade_id >= w.last)
                    or now - w.since >= self.wait_s)
            if over:
                out.append(self._decide(sym, st, m))
        if not st.waiting:
            self._with_waiting.discard(sym)
        return out

    def _decide(self, sym: str, st: SymbolState, m: int) -> Verdict:
        w = st.waiting.pop(m)
        fd = st.folds.pop(m, None)
        st.decided.add(m)
        if fd is not None and self.cur.get(sym) is fd:
            del self.cur[sym]
        kl = kline_candle(w.k)
        agg = fd.candle() if fd is not None else EMPTY
        diff = differences(kl, agg)
        outcome = MISMATCH if diff else OK
        self.counts[outcome] += 1
        return Verdict(sym, m, outcome, kl, agg, diff)

    def _give_up(self, sym: str, st: SymbolState, m: int, reason: str) -> Verdict:
        st.waiting.pop(m, None)
        st.folds.pop(m, None)
        st.decided.add(m)
        return self._verdict_nc(sym, m, reason)

    def _verdict_nc(self, sym: str, m: int, reason: str) -> Verdict:
        self.counts[NOT_COMPARABLE] += 1
        return Verdict(sym, m, NOT_COMPARABLE, reason=reason)

    def _prune(self, sym: str, st: SymbolState, ref: int) -> list[Verdict]:
        """Drop what lies more than :data:`KEEP_MINUTES` before minute ``ref``."""
        floor = ref - self.keep_ms
        if floor <= st.floor:
            return []
        st.floor = floor
        for m in [m for m in st.folds if m < floor]:
            del st.folds[m]
        st.decided = {m for m in st.decided if m >= floor}
        return [self._give_up(sym, st, m, "the minute's aggTrades are no longer kept")
                for m in sorted(x for x in st.waiting if x < floor)]


def check_row(symbol: str, minute_text: str, checked_at: str, stage: str, kline: Candle, agg: Candle,
              differs: tuple[str, ...], basis: str, repaired: bool | None = None, rest_trades: int | None = None,
              note: str | None = None) -> tuple:
    """A ``binance_kline_check`` row (column order of
    :data:`feeds.binance.adapter.KLINE_CHECK_TABLE`).  ``minute_text`` and
    ``checked_at``: timestamp text; ``stage``: ``found`` or ``after_fill``;
    ``basis``: what ``agg`` was built from (``stream``, ``stored``, ``rest``)."""
    return (symbol, minute_text, checked_at, stage, *kline.texts(), *agg.texts(), ",".join(differs), repaired,
            basis, rest_trades, note)
