"""A small stand-in for Dhan's charts REST API on loopback (aiohttp, its own thread and event
loop), for the feed-dhan-backfill tests: the real HDFCBANK recordings for security id 1333,
generated candles for every other id, Dhan's error envelope, the data API rate limit checked on
arrival (a request beyond ``rate`` in any window of ``window`` seconds gets Dhan's 429 / DH-904 and
is counted as a violation), and the instrument list CSV."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

from aiohttp import web

from feeds.calendars import ExchangeCalendar

IST = ZoneInfo("Asia/Kolkata")
XNSE = ExchangeCalendar("XNSE")
TOKEN = "TEST-TOKEN"
CLIENT = "1000000001"
TICK = Decimal("0.05")


def _parse(text: str, end: bool) -> dt.datetime:
    text = text.strip()
    if len(text) == 10:
        d = dt.date.fromisoformat(text)
        t = dt.datetime.combine(d + dt.timedelta(days=1) if end else d, dt.time(0), IST)
        return t
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=IST)


def generated(sid: int, first: dt.datetime, last: dt.datetime) -> list[tuple]:
    """Candles (epoch, o, h, l, c, v) of every XNSE session minute in [first, last)."""
    out = []
    for s in XNSE.sessions(first.astimezone(IST).date(), last.astimezone(IST).date()):
        t = s.open
        m = 0
        while t < s.close:
            if first <= t < last:
                base = Decimal(100 + sid % 900) + TICK * ((m * 7 + sid) % 40)
                o, c = base, base + TICK * (m % 5 - 2)
                out.append((int(t.timestamp()), o, max(o, c) + 2 * TICK, min(o, c) - 2 * TICK, c,
                            Decimal(100 + (m * 13 + sid) % 1000)))
            t += dt.timedelta(minutes=1)
            m += 1
    return out


def columnar(rows: list[tuple]) -> str:
    cols = list(zip(*rows)) if rows else [()] * 6
    names = ("timestamp", "open", "high", "low", "close", "volume")
    return "{" + ",".join(f'"{n}":[' + ",".join(str(x) for x in col) + "]" for n, col in zip(names, cols)) + "}"


class FakeDhan:
    """Start with ``with FakeDhan(data_dir) as f:``; ``f.url`` is the base URL.

    Knobs: ``rate``/``window`` (the limit), ``adjust`` (security ids answered with prices halved
    to the tick and volume doubled, as after a 1:1 bonus), ``refuse`` (ids answered DH-905),
    ``token_invalid`` (every request answered with the recorded DH-906), ``tokens`` (the access
    tokens accepted), ``force_429`` (the next N requests answered 429), ``on_request(n)`` (called
    with the count of chart requests on arrival).  Stats: ``requests`` (chart requests arrived),
    ``served``, ``violations``, ``log`` (arrival time, body), ``log_tokens`` (the access token of
    each request of ``log``), ``served_times``."""

    def __init__(self, data: Path, rate: int = 5, window: float = 1.0):
        self.data = data
        self.rate, self.window = rate, window
        self.adjust: set[int] = set()
        self.refuse: set[int] = set()
        self.token_invalid = False
        self.tokens = {TOKEN}
        self.force_429 = 0
        self.on_request: Callable[[int], None] | None = None
        self.requests = 0
        self.served = 0
        self.violations = 0
        self.log: list[tuple[float, dict]] = []
        self.log_tokens: list[str | None] = []
        self.served_times: list[float] = []
        self._recent: deque[float] = deque()
        self.instruments: list[tuple[str, str, int, str, str]] = [("NSE", "E", 1333, "EQUITY", "HDFCBANK")]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _start(self):
        app = web.Application()
        app.router.add_post("/v2/charts/intraday", self._intraday)
        app.router.add_get("/api-data/api-scrip-master.csv", self._scrip)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def recording(self, name: str) -> dict:
        return json.loads((self.data / name).read_text(), parse_float=Decimal)

    async def _scrip(self, request):
        head = "SEM_EXM_EXCH_ID,SEM_SEGMENT,SEM_SMST_SECURITY_ID,SEM_INSTRUMENT_NAME,SEM_TRADING_SYMBOL,SEM_LOT_UNITS,SEM_TICK_SIZE,SEM_SERIES\n"
        body = "".join(f"{e},{s},{i},{k},{sym},1.0,5.0000,EQ\n" for e, s, i, k, sym in self.instruments)
        return web.Response(text=head + body, content_type="text/csv")

    def _error(self, status: int, code: str, text: str, kind: str = "Data_Error"):
        return web.Response(status=status, text=json.dumps({"errorType": kind, "errorCode": code,
                                                            "errorMessage": text}),
                            content_type="application/json")

    async def _intraday(self, request):
        now = time.monotonic()
        self.requests += 1
        if self.on_request is not None:
            self.on_request(self.requests)
        body = json.loads(await request.text())
        self.log.append((now, body))
        self.log_tokens.append(request.headers.get("access-token"))
        while self._recent and now - self._recent[0] >= self.window:
            self._recent.popleft()
        if len(self._recent) >= self.rate:
            self.violations += 1
            return self._error(429, "DH-904", "Too many requests", "Rate_Limit")
        self._recent.append(now)
        if self.force_429 > 0:
            self.force_429 -= 1
            return self._error(429, "DH-904", "Too many requests", "Rate_Limit")
        if self.token_invalid or request.headers.get("access-token") not in self.tokens:
            rec = json.loads((self.data / "error_invalid_token.json").read_text())
            return web.Response(status=rec["status"], text=json.dumps(rec["response"]), content_type="application/json")
        if request.headers.get("client-id") != CLIENT:
            return self._error(400, "DH-901", "Client ID or user generated access token is invalid or expired.",
                               "Invalid_Authentication")
        sid = int(body["securityId"])
        if sid in self.refuse:
            return self._error(400, "DH-905", "Missing required fields, bad values for parameters", "Input_Exception")
        first, last = _parse(body["fromDate"], False), _parse(body["toDate"], True)
        interval = str(body.get("interval", "1"))
        if sid == 1333:
            name = ("intraday_15min_hdfcbank_2024-09-11..13.json" if interval == "15"
                    else "intraday_1min_hdfcbank_2024-09-11..13.json")
            r = self.recording(name)["response"]
            rows = [(int(t), o, h, lo, c, v) for t, o, h, lo, c, v in
                    zip(r["timestamp"], r["open"], r["high"], r["low"], r["close"], r["volume"], strict=True)
                    if first <= dt.datetime.fromtimestamp(int(t), IST) < last]
        else:
            rows = generated(sid, first, last)
        if sid in self.adjust and interval == "1":
            half = lambda p: (p / 2 / TICK).quantize(Decimal(1)) * TICK     # noqa: E731
            rows = [(t, half(o), half(h), half(lo), half(c), v * 2) for t, o, h, lo, c, v in rows]
        self.served += 1
        self.served_times.append(now)
        return web.Response(text=columnar(rows), content_type="application/json")

    def stats(self) -> dict:
        """requests, served, violations, and the served rate over the run against the allowance."""
        ts = self.served_times
        span = (ts[-1] - ts[0]) if len(ts) > 1 else 0.0
        rate = (len(ts) - 1) / span if span > 0 else 0.0
        return {"requests": self.requests, "served": self.served, "violations": self.violations,
                "rate": rate, "allowed": self.rate / self.window, "used": rate / (self.rate / self.window)}
