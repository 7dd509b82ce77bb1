"""Binance USD-M REST access with request-weight budgeting, via python-binance.

Venue documents: "USDⓈ-M Futures / General Info / LIMITS" (request weight,
``X-MBX-USED-WEIGHT-1M``, HTTP 429 with ``Retry-After``, 418 ban) and the
market-data endpoints ``exchangeInfo``, ``aggTrades`` (weight 20),
``klines`` (weight 1/2/5/10 by ``limit``) and ``ticker/price`` (v2, weight 2
for every symbol).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque

from binance import AsyncClient
from binance.exceptions import BinanceAPIException

from .. import plausible as P

log = logging.getLogger(__name__)

#: a pause asked for by ``Retry-After`` is kept within these seconds
RETRY_AFTER_MIN, RETRY_AFTER_MAX, RETRY_AFTER_DEFAULT = 1.0, 600.0, 60.0


def retry_after(value) -> float:
    """Seconds to pause from a ``Retry-After`` header: a finite number of
    seconds clamped to 1 .. 600; 60 when absent or not a number (``"1e400"``,
    ``"nan"``, an HTTP date)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return RETRY_AFTER_DEFAULT
    if not math.isfinite(v):
        return RETRY_AFTER_DEFAULT
    return min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, v))


def used_weight(value) -> int | None:
    """``X-MBX-USED-WEIGHT-1M`` -> int, or None unless ASCII digits (at most 9)."""
    if type(value) is str and value.isascii() and value.isdigit() and len(value) <= 9:
        return int(value)
    return None


def kline_weight(limit: int) -> int:
    """Weight of ``GET /fapi/v1/klines`` for a ``limit`` (Binance's table)."""
    if limit < 100:
        return 1
    if limit < 500:
        return 2
    if limit <= 1000:
        return 5
    return 10


class WeightLimiter:
    """Sliding one-minute window of request weight kept under ``budget``.

    ``budget`` should be a fraction of the venue's REQUEST_WEIGHT limit
    (2400/min for USD-M), leaving room for other clients on the same IP.
    :meth:`observe` folds in the venue's own count from
    ``X-MBX-USED-WEIGHT-1M`` and :meth:`penalise` pauses all requests after a
    429/418.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self._events: deque[tuple[float, int]] = deque()
        self._used = 0
        self._paused_until = 0.0
        self._lock = asyncio.Lock()
        self.waited = 0.0

    def _expire(self, now: float) -> None:
        while self._events and now - self._events[0][0] >= 60.0:
            self._used -= self._events.popleft()[1]

    async def acquire(self, weight: int) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self._expire(now)
                if now < self._paused_until:
                    wait = self._paused_until - now
                elif self._used + weight <= self.budget or not self._events:
                    self._events.append((now, weight))
                    self._used += weight
                    return
                else:
                    wait = 60.0 - (now - self._events[0][0]) + 0.01
                self.waited += wait
                await asyncio.sleep(wait)

    def observe(self, used_1m: int | None) -> None:
        """Venue-reported weight used this minute: pause if above budget."""
        if used_1m is not None and used_1m >= self.budget:
            now = time.monotonic()
            self._paused_until = max(self._paused_until, now + 60.0 - (time.time() % 60.0))

    def penalise(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    @property
    def used(self) -> int:
        self._expire(time.monotonic())
        return self._used


class BinanceRest:
    """Weight-budgeted wrapper of python-binance's ``AsyncClient`` futures calls.

    ``base_url``: ``https://fapi.binance.com`` (or a simulator's
    ``http://127.0.0.1:PORT``).  Methods return python-binance's decoded JSON.
    Raises ``BinanceAPIException`` for venue errors other than 429/418 (which
    are waited out and retried) and ``aiohttp.ClientError`` / ``OSError`` for
    network failures.
    """

    def __init__(self, base_url: str, weight_budget: int = 1200):
        self.client = AsyncClient()          # no network at construction (create() would ping spot)
        self.client.FUTURES_URL = base_url.rstrip("/") + "/fapi"
        self.limiter = WeightLimiter(weight_budget)
        self.requests = 0

    async def close(self) -> None:
        await self.client.close_connection()

    async def _call(self, weight: int, fn, **params):
        for attempt in range(8):
            await self.limiter.acquire(weight)
            self.requests += 1
            try:
                res = await fn(**params)
            except BinanceAPIException as e:
                if e.status_code in (429, 418):
                    headers = getattr(e.response, "headers", None) or {}
                    retry = retry_after(headers.get("Retry-After"))
                    log.warning("REST %s answered %s (%s); pausing %ss", fn.__name__, e.status_code, e.message, retry)
                    self.limiter.penalise(retry)
                    continue
                raise
            resp = self.client.response
            if resp is not None:
                used = resp.headers.get("X-MBX-USED-WEIGHT-1M") or resp.headers.get("x-mbx-used-weight-1m")
                self.limiter.observe(used_weight(used))
            return res
        raise RuntimeError(f"REST {fn.__name__} still rate limited after retries")

    async def exchange_info(self) -> dict:
        return await self._call(1, self.client.futures_exchange_info)

    async def agg_trades(self, symbol: str, from_id: int, limit: int = 1000) -> list[dict]:
        return await self._call(20, self.client.futures_aggregate_trades, symbol=symbol, fromId=from_id, limit=limit)

    async def agg_trades_between(self, symbol: str, start_ms: int, end_ms: int, limit: int = 1000) -> list[dict]:
        """aggTrades with ``start_ms <= T <= end_ms`` (the first ``limit``;
        Binance: less than one hour apart, and not combined with ``fromId``)."""
        return await self._call(20, self.client.futures_aggregate_trades, symbol=symbol, startTime=start_ms,
                                endTime=end_ms, limit=limit)

    async def ticker_prices(self) -> list[dict]:
        """``GET /fapi/v2/ticker/price`` for every symbol (weight 2):
        ``[{"symbol", "price", "time"}, ...]``."""
        return await self._call(2, self.client.futures_symbol_ticker)

    async def klines(self, symbol: str, interval: str, start_ms: int, end_ms: int, limit: int = 1500) -> list[list]:
        return await self._call(kline_weight(limit), self.client.futures_klines, symbol=symbol, interval=interval,
                                startTime=start_ms, endTime=end_ms, limit=limit)

    async def perpetual_symbols(self, quote_assets: list[str] | None = None) -> list[str]:
        """Symbols with contractType PERPETUAL and status TRADING, sorted.
        A listed name that is not a plausible symbol (see
        :func:`feeds.plausible.symbol`: it would become a stream name) is
        skipped with a warning."""
        info = await self.exchange_info()
        out = []
        for s in info.get("symbols", []):
            if not isinstance(s, dict) or s.get("contractType") != "PERPETUAL" or s.get("status") != "TRADING":
                continue
            if quote_assets and s.get("quoteAsset") not in quote_assets:
                continue
            try:
                out.append(P.symbol(s.get("symbol")))
            except P.Malformed as e:
                log.warning("exchangeInfo: %s; skipped", e)
        return sorted(out)
