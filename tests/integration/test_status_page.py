"""The status page of feed-api in real headless Chromium (Debian's
/usr/bin/chromium through playwright): it loads with no console error and
no page error, shows a row for every feed, and its chart has data points.
A screenshot is kept in $FEEDS_TEST_ARTIFACTS (default tests/artifacts/)."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import threading
from pathlib import Path

import psycopg
import pytest
from aiohttp import web
from pgserver import free_port

from feeds.kite.login import CHROMIUM_FLAGS
from feeds.ops.api import Settings, create_app
from feeds.ops.systemd_bus import NoSuchUnit, UnitState

CHROMIUM = "/usr/bin/chromium"
TOKEN = "page-token-" + "0a1b2c3d4e5f" * 2
UTC = dt.timezone.utc
FEEDS = ("feed-binance.service", "feed-zerodha.service", "feed-ibkr.service")
ARTIFACTS = Path(os.environ.get("FEEDS_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "artifacts")


class Manager:
    """A systemd manager that knows the three feeds and a oneshot."""

    units = {
        "feed-binance.service": UnitState("feed-binance.service", "loaded", "active", "running", "success"),
        "feed-zerodha.service": UnitState("feed-zerodha.service", "loaded", "inactive", "dead", "success"),
        "feed-ibkr.service": UnitState("feed-ibkr.service", "loaded", "failed", "failed", "exit-code", 3),
        "feed-maintain.service": UnitState("feed-maintain.service", "loaded", "inactive", "dead", "success"),
    }

    async def list_units(self, patterns):
        return list(self.units.values())

    async def unit_state(self, name):
        if name not in self.units:
            raise NoSuchUnit(name)
        return self.units[name]

    async def start(self, name):
        raise AssertionError("the page never starts a unit")

    stop = restart = start


def seed(dsn: str) -> None:
    now = dt.datetime.now(UTC)
    detail = {"streams": 2, "messages": 900, "malformed": 0, "last_message_age": 0.5,
              "tables": {"binance_agg_trade": {"stored": 800, "duplicates": 0, "rejected": 0}},
              "spooled_rows": 0, "pending": 0}
    with psycopg.connect(dsn, autocommit=True) as c:
        for unit, state, status in (("feed-binance.service", "running", "aggTrade 12/s max-age 0.4s; stored 800"),
                                    ("feed-zerodha.service", "stopping", "full 0/s (no data)"),
                                    ("feed-ibkr.service", "running", "trade 2/s max-age 30.0s")):
            c.execute("INSERT INTO feed_heartbeat (unit, host, pid, started_at, updated_at, state, status, detail) "
                      "VALUES (%s, 'testhost', 7, now() - interval '3 hours', now() - interval '5 s', %s, %s, %s)",
                      (unit, state, status, json.dumps(detail)))
        trades, ticks = [], []
        for k in range(1, 600, 7):                      # every 7 minutes over the last 10 hours
            t = now - dt.timedelta(minutes=k)
            for j in range(k % 4 + 1):
                trades.append(("ETHUSDT", k * 10 + j, t + dt.timedelta(seconds=j)))
            ticks.append((256265, t, k))
        with c.cursor() as cur:
            cur.executemany("INSERT INTO binance_agg_trade (symbol, agg_id, price, qty, first_trade_id, "
                            "last_trade_id, trade_time, is_buyer_maker, event_time, recv_time) VALUES "
                            "(%s, %s, 2500.1, 0.5, %s, %s, %s, true, %s, %s)",
                            [(s, a, a, a, t, t, t) for s, a, t in trades])
            cur.executemany("INSERT INTO kite_tick_ltp (instrument_token, last_price, recv_time, seq) "
                            "VALUES (%s, 24000.05, %s, %s)", ticks)


class ServerThread:
    """The app on 127.0.0.1:<free port> in a thread of its own."""

    def __init__(self, app: web.Application):
        self.app, self.port = app, free_port()
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def __enter__(self):
        self.thread.start()
        assert self.started.wait(30)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed")
    from playwright.sync_api import sync_playwright
    flags = [f for f in CHROMIUM_FLAGS if f != "--headless"]
    if os.geteuid() != 0:
        flags = [f for f in flags if f != "--no-sandbox"]
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        yield b
        b.close()


def test_status_page_in_chromium(db, tmp_path, browser):
    seed(db)
    settings = Settings(token=TOKEN, dsn=db, config_dir=str(tmp_path))
    with ServerThread(create_app(settings, Manager())) as base:
        ctx = browser.new_context(extra_http_headers={"Authorization": f"Bearer {TOKEN}"},
                                  viewport={"width": 1400, "height": 1000})
        page = ctx.new_page()
        console, errors, requests = [], [], []
        page.on("console", lambda m: console.append((m.type, m.text)))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        resp = page.goto(base + "/", wait_until="load")
        assert resp.status == 200
        rows = page.locator("tr.feed")
        units = [rows.nth(i).get_attribute("data-unit") for i in range(rows.count())]
        for f in FEEDS:
            assert f in units
        assert "feed-maintain.service" in units
        # the chart: one series per venue with rows, each with data points
        series = page.locator("svg#chart polyline.series")
        venues = {series.nth(i).get_attribute("data-venue"): int(series.nth(i).get_attribute("data-points"))
                  for i in range(series.count())}
        assert venues.get("binance", 0) > 0 and venues.get("kite", 0) > 0
        pts = series.first.get_attribute("points").split()
        assert len(pts) == 24 * 60
        assert page.locator('tr.feed[data-unit="feed-binance.service"] svg.spark').get_attribute(
            "data-points") != "0"
        assert page.locator('tr.feed[data-unit="feed-binance.service"] .score').inner_text() == "100"
        box = page.locator("svg#chart").bounding_box()
        assert box and box["width"] > 0 and box["height"] > 0
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
        # without a token the page is refused
        anon = browser.new_context()
        assert anon.request.get(base + "/").status == 401
        anon.close()
        ctx.close()
    assert errors == []
    assert [c for c in console if c[0] in ("error", "warning")] == []
    assert all(u.startswith(base) or u.startswith("data:") for u in requests), requests
