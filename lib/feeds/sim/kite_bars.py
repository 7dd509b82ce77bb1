"""Minute candles of the trades the Kite simulator generated.

Every generated trade (:meth:`feeds.sim.kite_packets.Market.advance`: one
random-walk step of an instrument, whose packet is then sent) is folded into
the one-minute candle of its exchange time, the epoch second the packets
carry as ``last_trade_time`` / ``exchange_timestamp``.  The historical
candles API (Kite Connect v3 "Historical candle data") answers from these
candles for every minute since the simulator started, so candles a client
builds from the ticks it received can be compared with what the venue
serves for the same minutes:

* open = price of the first trade of the minute, close = of the last, high
  and low over the minute's trades, volume = the sum of the traded
  quantities (the increase of ``volume_traded``; 0 for an index);
* a minute without a trade of that instrument has no candle (as Kite's
  minute data has none for a minute without trades).

Prices stay in integer units of the instrument's segment (paise for NSE
equities, see :mod:`feeds.sim.kite_packets`); times are epoch seconds.
The current minute is served as it stands (a forming candle, as on Kite).
Candles older than ``keep_minutes`` are forgotten.

Not thread-safe: use it from the event loop that owns the market.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MinuteBar", "MinuteBars"]


@dataclass(frozen=True, slots=True)
class MinuteBar:
    """One instrument's candle of one minute: ``minute`` is its start in
    epoch seconds (a multiple of 60); prices in integer units; ``volume``
    the traded quantity; ``trades`` the number of trades (ticks sent)."""
    minute: int
    open: int
    high: int
    low: int
    close: int
    volume: int
    trades: int


class MinuteBars:
    """Per-row candles of the current minute (vectorised) plus the closed
    minutes of the rows that traded in them."""

    def __init__(self, n_rows: int, since_s: int, *, keep_minutes: int = 3 * 1440) -> None:
        #: start (epoch s) of the minute the simulated market began: from it on, the candles are these
        self.since = since_s - since_s % 60
        self.keep_minutes = keep_minutes
        self.minute: int | None = None          # start (epoch s) of the current minute
        self._o = np.zeros(n_rows, dtype=np.int64)
        self._h = np.zeros(n_rows, dtype=np.int64)
        self._l = np.zeros(n_rows, dtype=np.int64)
        self._c = np.zeros(n_rows, dtype=np.int64)
        self._v = np.zeros(n_rows, dtype=np.int64)
        self._n = np.zeros(n_rows, dtype=np.int64)
        # closed minutes: minute -> (rows, open, high, low, close, volume, trades) arrays
        self._closed: dict[int, tuple[np.ndarray, ...]] = {}

    def _roll(self, minute: int) -> None:
        if self.minute is not None:
            rows = np.flatnonzero(self._n)
            if rows.size:
                self._closed[self.minute] = (rows, self._o[rows].copy(), self._h[rows].copy(),
                                             self._l[rows].copy(), self._c[rows].copy(),
                                             self._v[rows].copy(), self._n[rows].copy())
            self._n[rows] = 0
            self._v[rows] = 0
            old = [m for m in self._closed if m < minute - 60 * self.keep_minutes]
            for m in old:
                del self._closed[m]
        self.minute = minute

    def record(self, rows: np.ndarray, prices: np.ndarray, quantities: np.ndarray, now_s: int) -> None:
        """Fold one trade per element (``rows[i]`` traded ``quantities[i]`` at
        ``prices[i]`` units) at epoch second ``now_s`` into its minute."""
        if rows.size == 0:
            return
        minute = now_s - now_s % 60
        if minute != self.minute:
            if self.minute is not None and minute < self.minute:
                minute = self.minute             # the clock stepped back: keep the current minute
            else:
                self._roll(minute)
        if np.unique(rows).size != rows.size:    # the same row twice: fold one by one, in order
            for r, p, q in zip(rows.tolist(), prices.tolist(), quantities.tolist()):
                self.record(np.array([r]), np.array([p]), np.array([q]), now_s)
            return
        first = self._n[rows] == 0
        fr = rows[first]
        self._o[fr] = prices[first]
        self._h[fr] = prices[first]
        self._l[fr] = prices[first]
        self._h[rows] = np.maximum(self._h[rows], prices)
        self._l[rows] = np.minimum(self._l[rows], prices)
        self._c[rows] = prices
        self._v[rows] += quantities
        self._n[rows] += 1

    def bars(self, row: int, first_minute: int, last_minute: int) -> list[MinuteBar]:
        """The candles of ``row`` whose minute start is in [first_minute,
        last_minute] (epoch seconds), ascending; the current minute included."""
        out: list[MinuteBar] = []
        for m in sorted(k for k in self._closed if first_minute <= k <= last_minute):
            rows, o, h, lo, c, v, n = self._closed[m]
            i = np.searchsorted(rows, row)
            if i < rows.size and rows[i] == row:
                out.append(MinuteBar(m, int(o[i]), int(h[i]), int(lo[i]), int(c[i]), int(v[i]), int(n[i])))
        m = self.minute
        if m is not None and first_minute <= m <= last_minute and self._n[row]:
            out.append(MinuteBar(m, int(self._o[row]), int(self._h[row]), int(self._l[row]), int(self._c[row]),
                                 int(self._v[row]), int(self._n[row])))
        return out
