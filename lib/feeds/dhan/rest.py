"""Dhan's charts REST API, within the data API rate limits.

Venue documents: DhanHQ v2 "Historical Data" (``POST /v2/charts/intraday``
and ``POST /v2/charts/historical``), "Rate Limit" (data APIs: 5 requests a
second, 100,000 a day) and "Annexure" ("Trading API error" codes DH-901 to
DH-910).

Requests carry the headers ``access-token`` and ``client-id`` and a JSON
body::

    intraday:   {securityId (str), exchangeSegment, instrument, interval ("1", "5", "15", "25", "60"),
                 oi, fromDate, toDate}       dates "YYYY-MM-DD" or "YYYY-MM-DD HH:MM:SS" (IST)
    historical: {securityId, exchangeSegment, instrument, expiryCode, oi, fromDate, toDate}

and the answer is columnar: ``{open[], high[], low[], close[], volume[],
timestamp[] (epoch seconds), open_interest[]?}``.  Numbers are parsed from
the JSON text as :class:`~decimal.Decimal` (``parse_float``), so a price is
stored exactly as Dhan wrote it, never through a binary float.

Why aiohttp and not the official ``dhanhq`` 2.3.0 client: its
``DhanHTTP`` lets the base URL be set (an attribute), but it sends with a
synchronous ``requests.Session`` (each call would block the event loop or
need a thread of its own), parses the answer into binary floats, and folds
every failure into a ``{"status": "failure", "remarks": ...}`` dict that
drops the HTTP status (429) and the exception type.  The endpoints, headers
and body fields here are the ones that client and the document use.

Errors (Dhan's envelope ``{"errorType", "errorCode", "errorMessage"}``),
mapped to exceptions of :class:`DhanError`:

* HTTP 429 or DH-904 (rate limit): :class:`RateLimited`; the client backs
  off (the limiter pauses every request) and retries, at most
  ``max_attempts`` times;
* DH-901 (invalid authentication: the token expired) and DH-906 with an
  "Invalid Token" message (HTTP 400, as recorded): :class:`TokenError`,
  which the programs turn into exit status 77 like Kite's expired token;
* DH-905 (input), DH-907 (data: no candle for the range, bad parameters),
  DH-902 (no access to the data APIs) and other 4xx: :class:`InputError`,
  the sessions of the request become ERROR;
* DH-908, DH-909, DH-910, 5xx, timeouts and lost connections:
  :class:`Transient`, the sessions stay PENDING and are retried.

Rate limit: :func:`data_limiter` makes the shared
:class:`feeds.ibkr.pacing.PacingLimiter` (the pattern IB's pacing uses) with
one rule: at most ``floor(requests_per_second)`` requests in any window of
one second (plus a 2 % margin and 20 ms of slack), a request counting from
its send time until answered and from its answer time afterwards, so no
one-second sliding window ever holds more than the limit however late the
server reads them.  ``scale`` shortens the window for simulators with a
scaled clock (1 = Dhan's real limit).  :class:`DailyBudget` counts requests
per IST calendar day and refuses (:class:`BudgetExhausted`) beyond
``requests_per_day``.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

import aiohttp

from ..calendars import IST
from ..config import EX_NOPERM
from ..ibkr.pacing import PacingLimiter, PacingRules
from . import limits

log = logging.getLogger(__name__)

__all__ = ["DhanError", "RateLimited", "TokenError", "InputError", "Transient", "BudgetExhausted", "Candle",
           "DhanRest", "DailyBudget", "data_limiter", "read_token", "parse_candles", "error_from", "IST"]

INTRADAY_PATH = "/v2/charts/intraday"
HISTORICAL_PATH = "/v2/charts/historical"
INTERVALS = ("1", "5", "15", "25", "60")
#: Exit status for an expired or invalid token (as feed-zerodha's).
EX_TOKEN = EX_NOPERM


class DhanError(Exception):
    """A Dhan error answer: ``status`` (HTTP), ``code`` (e.g. ``DH-904``), ``text``."""

    def __init__(self, status: int, code: str, text: str):
        super().__init__(f"{code or 'HTTP ' + str(status)}: {text}".strip())
        self.status, self.code, self.text = status, code, text


class RateLimited(DhanError):
    """HTTP 429 / DH-904: too many requests."""


class TokenError(DhanError):
    """DH-901 / DH-906 Invalid Token: the access token expired or is wrong (exit 77)."""


class InputError(DhanError):
    """The request was refused for good (DH-902, DH-905, DH-907, other 4xx): the sessions are ERROR."""


class Transient(DhanError):
    """A failure worth retrying (DH-908..910, 5xx, timeout, connection lost, malformed answer)."""


class BudgetExhausted(Exception):
    """The day's data API request budget (``dhan.requests_per_day``) is used."""


def error_from(status: int, body) -> DhanError:
    """The exception for an error answer (HTTP ``status``, decoded ``body``:
    Dhan's envelope, or anything else)."""
    code = text = ""
    if isinstance(body, dict):
        code = str(body.get("errorCode") or "")
        text = str(body.get("errorMessage") or body.get("errorType") or "")
    elif body is not None:
        text = str(body)[:200]
    if status == 429 or code == "DH-904":
        return RateLimited(status, code, text or "rate limit")
    if code == "DH-901" or (code == "DH-906" and "token" in text.lower()) or status == 401:
        return TokenError(status, code, text or "invalid authentication")
    if code in ("DH-908", "DH-909", "DH-910") or status >= 500:
        return Transient(status, code, text)
    if 400 <= status < 500 or code:
        return InputError(status, code, text)
    return Transient(status, code, text or "unexpected answer")


@dataclass(frozen=True, slots=True)
class Candle:
    """One candle: ``start`` (aware UTC), prices and volume as Decimal
    exactly as Dhan wrote them (an integral volume as an integral Decimal),
    ``oi`` (None when not asked)."""

    start: dt.datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    oi: Decimal | None = None


def _num(x) -> Decimal:
    if isinstance(x, bool) or not isinstance(x, (int, Decimal)):
        raise ValueError(f"not a number: {x!r:.40}")
    d = Decimal(x)
    if not d.is_finite():
        raise ValueError(f"not a finite number: {x!r:.40}")
    return d


def _integral(d: Decimal) -> Decimal:
    return d.to_integral_value() if d == d.to_integral_value() else d


def parse_candles(body) -> tuple[list[Candle], int]:
    """The candles of a columnar answer (numbers already Decimal/int) and
    the count of malformed entries skipped (arrays of unequal length, a
    non-number, a timestamp not an integral second).  Raises
    :class:`Transient` when ``body`` is not a columnar answer at all."""
    if not isinstance(body, dict) or not all(isinstance(body.get(k), list) for k in
                                             ("open", "high", "low", "close", "volume", "timestamp")):
        raise Transient(200, "", f"not a columnar candle answer: {str(body)[:120]}")
    cols = [body[k] for k in ("timestamp", "open", "high", "low", "close", "volume")]
    ois = body.get("open_interest") if isinstance(body.get("open_interest"), list) else None
    n = min(len(c) for c in cols)
    bad = max(len(c) for c in cols) - n
    out = []
    for i in range(n):
        try:
            t = _num(cols[0][i])
            if t != t.to_integral_value():
                raise ValueError("timestamp not a whole second")
            start = dt.datetime.fromtimestamp(int(t), dt.timezone.utc)
            o, h, lo, c = (_num(col[i]) for col in cols[1:5])
            v = _integral(_num(cols[5][i]))
            oi = _integral(_num(ois[i])) if ois is not None and i < len(ois) else None
        except (ValueError, ArithmeticError, OverflowError, OSError):
            bad += 1
            continue
        out.append(Candle(start, o, h, lo, c, v, oi))
    return out, bad


def read_token(path: str) -> tuple[str, dt.datetime | None]:
    """``(access_token, expiry)`` from the token file feed-dhan-token writes
    (JSON; only ``access_token`` and the expiry, ``expires_at`` or
    ``expiry`` as ISO 8601, naive = IST, are read).  Raises
    :class:`TokenError` when the file is missing, unreadable, has no token
    or the token has expired."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenError(0, "", f"token file {path}: {e}") from None
    tok = data.get("access_token") if isinstance(data, dict) else None
    if not isinstance(tok, str) or not tok.strip():
        raise TokenError(0, "", f"token file {path}: no access_token")
    exp = None
    raw = next((data[k] for k in ("expires_at", "expiry", "expiryTime") if data.get(k)), None)
    if isinstance(raw, str):
        try:
            exp = dt.datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
        except ValueError:
            exp = None
        if exp is not None and exp.tzinfo is None:
            exp = exp.replace(tzinfo=IST)
    if exp is not None and exp <= dt.datetime.now(dt.timezone.utc):
        raise TokenError(0, "", f"token file {path}: the access token expired at {exp.isoformat()}")
    return tok.strip(), exp


def data_limiter(requests_per_second: float = limits.DATA_REQUESTS_PER_SECOND, *, max_open: int = 8,
                 scale: float = 1.0, keep_history: bool = False, clock=None, sleep=None) -> PacingLimiter:
    """The limiter of Dhan's data APIs: at most ``floor(requests_per_second)``
    (at least 1) requests in any one-second window (scaled by ``scale``),
    ``max_open`` requests open at once.  Raises ValueError for a rate above
    Dhan's documented limit."""
    if not 0 < requests_per_second <= limits.DATA_REQUESTS_PER_SECOND:
        raise ValueError(f"requests_per_second must be > 0 and <= {limits.DATA_REQUESTS_PER_SECOND}")
    n = max(1, math.floor(requests_per_second))
    window = 1.0 if requests_per_second >= 1 else 1.0 / requests_per_second
    # identical requests and per-instrument bursts are no rule of Dhan's: the window itself bounds them
    rules = PacingRules(max_requests=n, window=window, identical_window=window, burst_requests=10 ** 9,
                        burst_window=window, max_open=max_open)
    kw = {}
    if clock is not None:
        kw["clock"] = clock
    if sleep is not None:
        kw["sleep"] = sleep
    return PacingLimiter(scale=scale, rules=rules, margin=0.02, slack=0.02, keep_history=keep_history, **kw)


class DailyBudget:
    """Data API requests per IST calendar day: :meth:`take` counts one or
    raises :class:`BudgetExhausted` at ``per_day``.  ``used`` may be seeded
    with the requests earlier runs sent today."""

    def __init__(self, per_day: int = limits.DATA_REQUESTS_PER_DAY, used: int = 0,
                 today: Callable[[], dt.date] | None = None):
        self.per_day = per_day
        self.today = today or (lambda: dt.datetime.now(IST).date())
        self.day = self.today()
        self.used = used

    def take(self) -> None:
        d = self.today()
        if d != self.day:
            self.day, self.used = d, 0
        if self.used >= self.per_day:
            raise BudgetExhausted(f"{self.per_day} data API requests used today ({self.day}, IST)")
        self.used += 1

    @property
    def left(self) -> int:
        return max(0, self.per_day - self.used) if self.today() == self.day else self.per_day


_loads = functools.partial(json.loads, parse_float=Decimal)


class DhanRest:
    """Dhan's charts API on one aiohttp session, every request through the
    limiter and the daily budget.

    ``api_url``: base URL (``dhan.api_url``); ``client_id``; ``token``: the
    access token, or a callable returning it (read again before each
    request, so a token renewed meanwhile is used); ``limiter``:
    :func:`data_limiter`; ``budget``: :class:`DailyBudget`; ``timeout``
    (s, per request); ``max_attempts``: tries of one request on 429 /
    DH-904 and transient failures.  Use from one event loop; ``await
    close()`` at the end.  Counters: ``requests``, ``rate_limited``,
    ``errors``, ``malformed``.
    """

    def __init__(self, api_url: str, client_id: str, token, *, limiter: PacingLimiter | None = None,
                 budget: DailyBudget | None = None, timeout: float = 60.0, max_attempts: int = 4):
        self.base = api_url.rstrip("/")
        if self.base.endswith("/v2"):
            self.base = self.base[:-3]
        self.client_id = client_id
        self._token = token if callable(token) else (lambda: token)
        self.limiter = limiter or data_limiter()
        self.budget = budget or DailyBudget()
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0
        self.rate_limited = 0
        self.errors = 0
        self.malformed = 0

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=max(4, self.limiter.max_open)))
        return self._session

    async def intraday(self, security_id: int | str, segment: str, instrument: str, first: str, last: str,
                       interval: str = "1", oi: bool = False) -> tuple[list[Candle], int]:
        """Candles of ``interval`` minutes from ``first`` to ``last``
        (``YYYY-MM-DD[ HH:MM:SS]`` IST) at most 90 days apart: ``(candles,
        malformed entries skipped)``.  Raises :class:`DhanError`
        subclasses, :class:`BudgetExhausted`."""
        if str(interval) not in INTERVALS:
            raise ValueError(f"interval must be one of {', '.join(INTERVALS)}")
        body = {"securityId": str(security_id), "exchangeSegment": segment, "instrument": instrument,
                "interval": str(interval), "oi": oi, "fromDate": first, "toDate": last}
        return parse_candles(await self.post(INTRADAY_PATH, body))

    async def historical(self, security_id: int | str, segment: str, instrument: str, first: str, last: str,
                         expiry_code: int = 0, oi: bool = False) -> tuple[list[Candle], int]:
        """Daily candles from ``first`` to ``last`` (``YYYY-MM-DD``): as :meth:`intraday`."""
        body = {"securityId": str(security_id), "exchangeSegment": segment, "instrument": instrument,
                "expiryCode": expiry_code, "oi": oi, "fromDate": first, "toDate": last}
        return parse_candles(await self.post(HISTORICAL_PATH, body))

    async def post(self, path: str, body: dict):
        """POST ``body`` to ``path`` within the limits; retries 429/DH-904
        (after the limiter's back-off) and transient failures up to
        ``max_attempts``; returns the decoded answer (numbers as Decimal).
        Raises :class:`DhanError` subclasses, :class:`BudgetExhausted`."""
        last: DhanError | None = None
        for attempt in range(1, self.max_attempts + 1):
            try:
                return await self._post_once(path, body)
            except RateLimited as e:
                last = e
                pause = self.limiter.violation()
                log.warning("%s %s: %s; pausing requests %.2fs (attempt %d of %d)", path, body.get("securityId"),
                            e, pause, attempt, self.max_attempts)
            except Transient as e:
                last = e
                log.info("%s %s: %s (attempt %d of %d)", path, body.get("securityId"), e, attempt,
                         self.max_attempts)
                await asyncio.sleep(min(2.0 ** (attempt - 1), 10.0) * self.limiter.scale)
        assert last is not None
        raise last

    async def _post_once(self, path: str, body: dict):
        ident = (path, json.dumps(body, sort_keys=True))
        ticket = await self.limiter.acquire(ident, None)
        try:
            self.budget.take()
        except BudgetExhausted:
            self.limiter.release(ticket)
            raise
        self.requests += 1
        headers = {"access-token": self._token(), "client-id": self.client_id,
                   "Content-Type": "application/json", "Accept": "application/json"}
        try:
            async with self._http().post(self.base + path, data=json.dumps(body), headers=headers) as r:
                text = await r.text()
                status = r.status
        except asyncio.TimeoutError:
            self.errors += 1
            raise Transient(0, "", f"no answer within {self.timeout:g}s") from None
        except aiohttp.ClientError as e:
            self.errors += 1
            raise Transient(0, "", f"{type(e).__name__}: {e}") from None
        finally:
            self.limiter.release(ticket)
        try:
            decoded = _loads(text) if text else None
        except ValueError:
            decoded = None
            if status == 200:
                self.malformed += 1
                raise Transient(status, "", f"answer is not JSON: {text[:80]!r}") from None
        if status == 200 and not (isinstance(decoded, dict) and "errorCode" in decoded):
            self.limiter.success()
            return decoded
        err = error_from(status, decoded if decoded is not None else text)
        if isinstance(err, RateLimited):
            self.rate_limited += 1
        else:
            self.errors += 1
        raise err

