"""Kite's historical minute candles, for the minutes feed-zerodha missed.

After a start inside a session (a restart, a crash), the one-minute candles
from the session's open -- or from the minute after the instrument's last
stored final one-minute candle of the day -- up to and including the minute
the process started in are requested from Kite's historical candles API
once that minute is over and can no longer be revised by a late tick (its
end + ``candles.lateness`` + ``candles.grace``), and handed to the candle builder
(:meth:`feeds.candles.CandleBuilder.seed`), which stores them with source
``history`` and folds them into the longer intervals.

Venue document: Kite Connect v3 "Historical candle data":
``GET /instruments/historical/{instrument_token}/minute?from=..&to=..``
(IST wall-clock times ``yyyy-mm-dd hh:mm:ss``, both ends inclusive),
answering ``{"status": "success", "data": {"candles": [[timestamp, open,
high, low, close, volume], ...]}}`` with timestamps such as
``2017-12-15T09:15:00+0530`` labelling each candle by its start.  The
requests go through kiteconnect's ``KiteConnect.historical_data``; at most
:data:`~feeds.kite.instruments.HISTORICAL_REQUESTS_PER_SECOND` a second
(Kite's limit; a 429 "Too many requests" is waited out and retried).

Prices come back as JSON numbers (floats); they are turned into the integer
units of the instrument's segment (``round(price * divisor)``, exact for
Kite's prices) like the live ticks.  Kite gives no trade count: history
bars carry ``ticks`` 0.  Instruments whose live candles have no volume
(LTP mode, indices) get history bars without volume too.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from ..timetext import ist_text
from ..candle_writer import Bar
from .adapter import divisor
from .instruments import HISTORICAL_REQUESTS_PER_SECOND

log = logging.getLogger(__name__)

UTC = timezone.utc
MINUTE_NS = 60_000_000_000
NS = 1_000_000_000

#: Kite's interval name of one-minute candles.
INTERVAL = "minute"

class Pacer:
    """At most ``per_second`` calls of :meth:`wait` in any window of one
    second plus ``margin`` seconds (the margin absorbs the jitter between
    leaving here and arriving at Kite).  :meth:`wait` returns False when
    ``stop`` was set while waiting."""

    def __init__(self, per_second: int = HISTORICAL_REQUESTS_PER_SECOND, margin: float = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        if per_second < 1:
            raise ValueError("per_second must be >= 1")
        self.per_second, self.window = per_second, 1.0 + margin
        self.clock = clock
        self._sent: deque[float] = deque()

    def wait(self, stop: threading.Event | None = None) -> bool:
        while True:
            now = self.clock()
            while self._sent and now - self._sent[0] >= self.window - 1e-6:
                self._sent.popleft()
            if len(self._sent) < self.per_second:
                self._sent.append(now)
                return True
            delay = self._sent[0] + self.window - now
            if stop is None:
                time.sleep(delay)
            elif stop.wait(delay):
                return False


def bars_from_records(records: Iterable[dict], instrument_token: int, *, with_volume: bool = True,
                      first_ns: int | None = None, last_ns: int | None = None) -> list[Bar]:
    """``KiteConnect.historical_data`` records (``date`` aware datetime,
    ``open``/``high``/``low``/``close`` rupees as numbers, ``volume``) ->
    :data:`~feeds.candle_writer.Bar` tuples with prices in the token's integer units, ascending,
    only those starting in [first_ns, last_ns].  Raises ValueError for a
    record that is not a candle (missing field, naive date, price not a
    number or negative, high below low)."""
    div = divisor(instrument_token)
    out: list[Bar] = []
    for r in records:
        try:
            when = r["date"]
            if when.tzinfo is None:
                raise ValueError("candle time without a zone")
            start = int(when.timestamp()) * NS
            o, h, lo, c = (int(round(float(r[k]) * div)) for k in ("open", "high", "low", "close"))
            vol = int(r["volume"]) if with_volume else None
        except (KeyError, TypeError, AttributeError, OverflowError) as e:
            raise ValueError(f"not a Kite candle: {r!r:.200} ({e!r})") from None
        if min(o, h, lo, c) < 0 or h < lo or (vol is not None and vol < 0):
            raise ValueError(f"implausible Kite candle: {r!r:.200}")
        if (first_ns is not None and start < first_ns) or (last_ns is not None and start > last_ns):
            continue
        out.append((start, o, h, lo, c, vol, 0))
    out.sort(key=lambda b: b[0])
    return out


def last_final_minutes(dsn: str, tokens: Iterable[int], since_ns: int) -> dict[int, int]:
    """The start (epoch ns) of each instrument's latest stored final
    one-minute candle starting at or after ``since_ns`` (the session's
    open), from ``kite_candle``; instruments without one are absent."""
    from ..db import connect
    with connect(dsn, application_name="feed-zerodha") as conn:
        rows = conn.execute(
            "SELECT instrument_token, max(bar_start) FROM kite_candle WHERE interval_min = 1 AND final "
            "AND bar_start >= %s AND instrument_token = ANY(%s) GROUP BY instrument_token",
            (datetime.fromtimestamp(since_ns / NS, UTC), list(tokens))).fetchall()
    return {int(t): int(ts.timestamp()) * NS for t, ts in rows}


class HistoryError(Exception):
    """Kite refused a historical request (token, input) or kept failing."""


def fetch(kite, instrument_token: int, first_ns: int, last_ns: int, pacer: Pacer,
          stop: threading.Event | None = None, attempts: int = 5) -> list[dict] | None:
    """``kite.historical_data`` for the minutes starting in [first_ns,
    last_ns], paced; a 429 or a network failure is retried (``attempts``
    in all, waiting 1, 2, 4 ... s).  Returns None when stopped.  Raises
    :class:`HistoryError` when Kite refuses the request or it keeps
    failing."""
    from kiteconnect import exceptions as kex
    import requests
    delay = 1.0
    for attempt in range(1, attempts + 1):
        if not pacer.wait(stop):
            return None
        try:
            return kite.historical_data(instrument_token, ist_text(first_ns), ist_text(last_ns), INTERVAL)
        except (kex.NetworkException, kex.GeneralException, kex.DataException, requests.RequestException) as e:
            if getattr(e, "code", 0) in (400, 403) or attempt == attempts:
                raise HistoryError(f"{type(e).__name__}: {e}") from None
            why = "Kite's rate limit (429)" if getattr(e, "code", 0) == 429 else f"{type(e).__name__}: {e}"
            log.info("historical candles of %d: %s; again in %.0f s", instrument_token, why, delay)
        except kex.KiteException as e:          # token, input, permission: retrying does not help
            raise HistoryError(f"{type(e).__name__}: {e}") from None
        if stop is not None and stop.wait(delay):
            return None
        if stop is None:
            time.sleep(delay)
        delay = min(delay * 2, 30.0)
    return None


@dataclass
class FillResult:
    """What a fill did: instruments filled, bars received, failures."""
    instruments: int = 0
    bars: int = 0
    failed: int = 0
    stopped: bool = False


def fill(kite, plan: list[tuple[int, int, int, bool]], last_ns: int,
         seed: Callable[[int, list[Bar], int, int], object], stop: threading.Event | None = None,
         pacer: Pacer | None = None) -> FillResult:
    """Request each instrument's minutes and pass them on.

    ``plan``: ``(instrument_token, request_from_ns, keep_from_ns,
    with_volume)`` per instrument; ``last_ns``: the start of the last
    minute to fill (the minute the process started in).  For each
    instrument ``seed(instrument_token, bars, keep_from_ns, until_ns)`` is
    called with its :data:`~feeds.candle_writer.Bar` list (possibly empty: no trade in those
    minutes) and ``until_ns`` = the end of the last minute.  Runs
    in the calling thread (blocking; a few seconds per 10 instruments at
    Kite's limit); ``stop`` ends it between requests."""
    pacer = pacer or Pacer()
    res = FillResult()
    for token, first_ns, keep_ns, with_volume in plan:
        if stop is not None and stop.is_set():
            res.stopped = True
            break
        if keep_ns > last_ns:
            continue
        try:
            records = fetch(kite, token, first_ns, last_ns, pacer, stop)
            if records is None:
                res.stopped = True
                break
            bars = bars_from_records(records, token, with_volume=with_volume, first_ns=first_ns, last_ns=last_ns)
        except (HistoryError, ValueError) as e:
            res.failed += 1
            log.warning("historical candles of %d (%s .. %s IST) not filled: %s", token, ist_text(first_ns),
                        ist_text(last_ns), e)
            continue
        seed(token, bars, keep_ns, last_ns + MINUTE_NS)
        res.instruments += 1
        res.bars += len(bars)
    return res
