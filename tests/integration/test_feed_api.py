"""feed-api against a real PostgreSQL, in process (aiohttp's TestServer), with
a fake systemd manager: the token, /health, /status, /metrics, /config
without secrets, and the control requests (which units may be managed and
what reaches the manager)."""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from feeds.ops.api import Settings, create_app
from feeds.ops.systemd_bus import AccessDenied, NoSuchUnit, UnitState

TOKEN = "tok-" + "9f8e7d6c5b4a" * 3
DSN_SECRET = "PLANTED-dsn-pw-4b1d"
FILE_SECRET = "PLANTED-file-pw-77aa"
MQTT_SECRET = "PLANTED-mqtt-pw-1c2d"
UTC = dt.timezone.utc


class FakeManager:
    """The systemd manager of the tests: known units, the calls made, units
    whose control polkit refuses."""

    def __init__(self, units: dict[str, UnitState], denied: set[str] = frozenset()):
        self.units = dict(units)
        self.denied = set(denied)
        self.calls: list[tuple[str, str]] = []

    async def list_units(self, patterns):
        return sorted(self.units.values(), key=lambda u: u.name)

    async def unit_state(self, name):
        if name not in self.units:
            raise NoSuchUnit(name)
        return self.units[name]

    async def _job(self, action, name):
        if name not in self.units:
            raise NoSuchUnit(name)
        if name in self.denied:
            raise AccessDenied("Interactive authentication required.")
        self.calls.append((action, name))
        active = "inactive" if action == "stop" else "active"
        self.units[name] = UnitState(name, "loaded", active, "dead" if action == "stop" else "running",
                                     "success", self.units[name].n_restarts)
        return f"/org/freedesktop/systemd1/job/{len(self.calls)}"

    async def start(self, name):
        return await self._job("start", name)

    async def stop(self, name):
        return await self._job("stop", name)

    async def restart(self, name):
        return await self._job("restart", name)


FEEDS = ("feed-binance.service", "feed-zerodha.service", "feed-ibkr.service")


def manager() -> FakeManager:
    return FakeManager({
        "feed-binance.service": UnitState("feed-binance.service", "loaded", "active", "running", "success"),
        "feed-zerodha.service": UnitState("feed-zerodha.service", "loaded", "inactive", "dead", "success"),
        "feed-ibkr.service": UnitState("feed-ibkr.service", "loaded", "active", "running", "success"),
        "feed-backfill.service": UnitState("feed-backfill.service", "loaded", "inactive", "dead", "success"),
        "feed-locked.service": UnitState("feed-locked.service", "loaded", "inactive", "dead", "success"),
    }, denied={"feed-locked.service"})


def seed(dsn: str) -> None:
    """Heartbeats of the three feeds and aggTrades over the last two hours."""
    now = dt.datetime.now(UTC)
    detail = {"streams": 4, "messages": 5000, "malformed": 0, "last_message_age": 0.3,
              "lag_ms_hist": {"5": 900, "40": 100},
              "tables": {"binance_agg_trade": {"stored": 4000, "duplicates": 0, "rejected": 0}},
              "spooled_rows": 0, "replayed_rows": 0, "pending": 12, "reconnects": 0}
    with psycopg.connect(dsn, autocommit=True) as c:
        for unit, state, status in (
                ("feed-binance.service", "running",
                 "aggTrade 1,234/s max-age 0.2s; bookTicker 56/s max-age 0.1s; stored 4,000"),
                ("feed-zerodha.service", "stopping", "full 0/s (no data)"),
                ("feed-ibkr.service", "running", "trade 3/s max-age 1.0s; quote 9/s max-age 0.4s")):
            c.execute("INSERT INTO feed_heartbeat (unit, host, pid, started_at, updated_at, state, status, "
                      "detail) VALUES (%s, 'testhost', 4242, now() - interval '1 hour', now() - interval '2 s', "
                      "%s, %s, %s)", (unit, state, status, json.dumps(detail)))
        rows = []
        for k in range(1, 121, 3):
            t = now - dt.timedelta(minutes=k)
            for j in range(k % 5 + 1):
                rows.append(("BTCUSDT", k * 10 + j, t + dt.timedelta(seconds=j)))
        with c.cursor() as cur:
            cur.executemany("INSERT INTO binance_agg_trade (symbol, agg_id, price, qty, first_trade_id, "
                            "last_trade_id, trade_time, is_buyer_maker, event_time, recv_time) VALUES "
                            "(%s, %s, 100.5, 0.01, %s, %s, %s, false, %s, %s)",
                            [(s, a, a, a, t, t, t) for s, a, t in rows])


@pytest.fixture
def config_dir(tmp_path, db):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    pw = secrets / "feeds-ops.password"
    pw.write_text(FILE_SECRET + "\n")
    pw.chmod(0o600)
    mq = secrets / "mqtt.password"
    mq.write_text(MQTT_SECRET + "\n")
    mq.chmod(0o600)
    token = secrets / "feed-api.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    (tmp_path / "ops.toml").write_text(
        f'[database]\ndsn = "host=127.0.0.1 dbname=feeds user=feeds_ops password={DSN_SECRET}"\n'
        f'password_file = "{pw}"\n'
        f'[api]\nport = 9800\ntoken_file = "{token}"\n')
    (tmp_path / "alerts.toml").write_text('[alerts]\nhealth_threshold = 55\n')
    (tmp_path / "binance.toml").write_text(
        '[database]\ndsn = "postgresql://feeds_binance:' + DSN_SECRET + '@127.0.0.1/feeds"\n'
        '[binance]\nrest_url = "https://fapi.binance.com"\nws_url = "wss://fstream.binance.com"\n'
        'symbols = ["BTCUSDT"]\n[mqtt]\nhost = "127.0.0.1"\npassword_file = "' + str(mq) + '"\n')
    (tmp_path / "odd.toml").write_text(f'[x]\ntoken = "{TOKEN}"\nurl = "mqtt://u:{DSN_SECRET}@h/"\n')
    (tmp_path / "broken.toml").write_text("this is [not toml\n")
    return tmp_path


def run(db, config_dir, mgr, body):
    """Run ``body(client)`` against the app (an aiohttp TestClient)."""
    settings = Settings(token=TOKEN, dsn=db, config_dir=str(config_dir), settle=0.0)

    async def go():
        async with TestClient(TestServer(create_app(settings, mgr))) as client:
            return await body(client)
    return asyncio.run(go())


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_token_is_required_except_for_health(db, config_dir):
    seed(db)
    mgr = manager()

    async def body(c):
        r = await c.get("/health")
        assert r.status == 200 and (await r.json())["ok"] is True
        for path in ("/status", "/metrics", "/config", "/"):
            r = await c.get(path)
            assert r.status == 401, path
            assert any(h.startswith("Bearer") for h in r.headers.getall("WWW-Authenticate"))
            r = await c.get(path, headers={"Authorization": "Bearer wrong-" + TOKEN})
            assert r.status == 401, path
            r = await c.get(path, headers={"Authorization": TOKEN})
            assert r.status == 401, path
        # a browser: HTTP Basic with the token as password, GET only
        r = await c.get("/status", headers=basic("ops", TOKEN))
        assert r.status == 200
        r = await c.post("/restart", json={"unit": "feed-binance.service"}, headers=basic("ops", TOKEN))
        assert r.status == 401
        r = await c.post("/restart", json={"unit": "feed-binance.service"})
        assert r.status == 401
        r = await c.post("/stop", json={"unit": "feed-binance.service"},
                         headers={"Authorization": "Bearer nope"})
        assert r.status == 401
    run(db, config_dir, mgr, body)
    assert mgr.calls == []
    assert mgr.units["feed-binance.service"].active_state == "active"


def test_health_is_503_without_database(config_dir):
    settings = Settings(token=TOKEN, dsn="host=127.0.0.1 port=1 dbname=none connect_timeout=2",
                        config_dir=str(config_dir))

    async def go():
        async with TestClient(TestServer(create_app(settings, manager()))) as c:
            r = await c.get("/health")
            assert r.status == 503
            assert (await r.json())["ok"] is False
            r = await c.get("/status", headers=AUTH)      # still answers, says what is missing
            assert r.status == 200
            doc = await r.json()
            assert doc["database"] != "ok" and doc["systemd"] == "ok"
    asyncio.run(go())


def test_status_lists_every_feed(db, config_dir):
    seed(db)

    async def body(c):
        r = await c.get("/status", headers=AUTH)
        assert r.status == 200
        return await r.json()
    doc = run(db, config_dir, manager(), body)
    assert doc["database"] == "ok" and doc["systemd"] == "ok"
    units = {u["unit"]: u for u in doc["units"]}
    for f in FEEDS:
        assert f in units
        assert units[f]["heartbeat"]["age_s"] >= 0
        assert units[f]["health"] is not None and 0 <= units[f]["health"]["total"] <= 100
    b = units["feed-binance.service"]
    assert b["systemd"]["active_state"] == "active"
    assert b["heartbeat"]["state"] == "running"
    assert b["rates"] == {"aggTrade": 1234.0, "bookTicker": 56.0}
    assert b["stored"] == {"binance_agg_trade": 4000}
    assert b["health"]["total"] == 100
    assert units["feed-ibkr.service"]["rates"] == {"trade": 3.0, "quote": 9.0}
    assert units["feed-backfill.service"]["health"] is None      # a oneshot has no score


def test_metrics(db, config_dir):
    seed(db)

    async def body(c):
        r = await c.get("/metrics", headers=AUTH)
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return await r.text()
    text = run(db, config_dir, manager(), body)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    scores = {s.labels["unit"]: s.value for s in fams["feeds_api_unit_health_score"].samples}
    assert set(FEEDS) <= set(scores)
    assert scores["feed-binance.service"] == 100
    ages = {s.labels["unit"]: s.value for s in fams["feeds_api_unit_heartbeat_age_seconds"].samples}
    assert set(FEEDS) <= set(ages)
    states = {(s.labels["unit"], s.labels["state"]): s.value for s in fams["feeds_api_unit_active_state"].samples}
    assert states[("feed-binance.service", "active")] == 1
    assert states[("feed-zerodha.service", "inactive")] == 1
    assert states[("feed-zerodha.service", "active")] == 0
    assert fams["feeds_api_database_up"].samples[0].value == 1


def test_restart_of_a_feed_calls_the_manager(db, config_dir):
    seed(db)
    mgr = manager()

    async def body(c):
        r = await c.post("/restart", json={"unit": "feed-binance.service"}, headers=AUTH)
        assert r.status == 200
        doc = await r.json()
        assert doc["unit"] == "feed-binance.service" and doc["action"] == "restart"
        assert doc["job"].startswith("/org/freedesktop/systemd1/job/")
        assert doc["state"]["active_state"] == "active"
        r = await c.post("/stop?unit=feed-zerodha", headers=AUTH)     # no .service, query string
        assert r.status == 200
        assert (await r.json())["state"]["active_state"] == "inactive"
        r = await c.post("/start", json={"unit": "feed-zerodha"}, headers=AUTH)
        assert r.status == 200
    run(db, config_dir, mgr, body)
    assert mgr.calls == [("restart", "feed-binance.service"), ("stop", "feed-zerodha.service"),
                         ("start", "feed-zerodha.service")]


@pytest.mark.parametrize("unit,status", [
    ("sshd.service", 403), ("sshd", 403), ("dbus.service", 403), ("feed-binance.timer", 403),
    ("feed-api.service", 403),
    ("../etc/passwd", 400), ("feed-binance/../../sshd.service", 400), ("feed-bin ance.service", 400),
    ("feed-binance.service;reboot", 400), ("", 400), ("feed-$(id).service", 400), (42, 400),
    ("feed-nonexistent.service", 404),
])
def test_refused_units_change_nothing(db, config_dir, unit, status):
    mgr = manager()

    async def body(c):
        for action in ("start", "stop", "restart"):
            r = await c.post(f"/{action}", json={"unit": unit}, headers=AUTH)
            assert r.status == status, (action, unit, await r.text())
            assert "error" in await r.json()
    run(db, config_dir, mgr, body)
    assert mgr.calls == []


def test_malformed_requests(db, config_dir):
    mgr = manager()

    async def body(c):
        r = await c.post("/restart", data="{not json", headers={**AUTH, "Content-Type": "application/json"})
        assert r.status == 400
        r = await c.post("/restart", json=["feed-binance.service"], headers=AUTH)
        assert r.status == 400
        r = await c.post("/restart", headers=AUTH)
        assert r.status == 400
        r = await c.get("/restart", headers=AUTH)
        assert r.status == 405
    run(db, config_dir, mgr, body)
    assert mgr.calls == []


def test_access_denied_by_polkit_is_403_with_the_reason(db, config_dir):
    mgr = manager()

    async def body(c):
        r = await c.post("/start", json={"unit": "feed-locked.service"}, headers=AUTH)
        assert r.status == 403
        doc = await r.json()
        assert "Interactive authentication required" in doc["reason"]
    run(db, config_dir, mgr, body)
    assert mgr.calls == []
    assert mgr.units["feed-locked.service"].active_state == "inactive"


def test_config_shows_settings_but_no_secret(db, config_dir):
    async def body(c):
        r = await c.get("/config", headers=AUTH)
        assert r.status == 200
        return await r.text()
    text = run(db, config_dir, manager(), body)
    for secret in (DSN_SECRET, FILE_SECRET, MQTT_SECRET, TOKEN):
        assert secret not in text
    doc = json.loads(text)
    files = doc["files"]
    ops = files["ops.toml"]["values"]
    assert files["alerts.toml"]["values"]["alerts.health_threshold"] == 55      # given
    assert files["alerts.toml"]["values"]["alerts.rate_drop"] == 0.2            # a default filled in
    assert ops["database.password_file"].endswith("feeds-ops.password")   # the path stays
    assert ops["api.token_file"].endswith("feed-api.token")
    assert "password=<redacted>" in ops["database.dsn"] and "user=feeds_ops" in ops["database.dsn"]
    b = files["binance.toml"]
    assert b["schema"] == "binance.toml" and b["error"] is None
    assert b["values"]["binance.symbols"] == ["BTCUSDT"]
    assert b["values"]["mqtt.password_file"].endswith("mqtt.password")
    assert files["odd.toml"]["values"]["x.token"] == "<redacted>"
    assert files["broken.toml"]["values"] is None and files["broken.toml"]["error"]


def test_rows_per_minute_exact_and_sampled(db):
    """The chart's counts: exact on a small table; a table over the byte budget is read
    with TABLESAMPLE and its counts scaled back (here the sample is nearly the whole table)."""
    from feeds.db import connect
    from feeds.ops.api import chart_series, rows_per_minute
    seed(db)
    now = dt.datetime.now(UTC)
    since, until = now - dt.timedelta(hours=24), now + dt.timedelta(minutes=1)
    with connect(db, application_name="test") as conn:
        exact, est = rows_per_minute(conn, "binance_agg_trade", "trade_time", since, until)
        assert not est
        total = conn.execute("SELECT count(*) FROM binance_agg_trade").fetchone()[0]
        assert sum(exact.values()) == total and all(m % 60 == 0 for m in exact)
        size = conn.execute("SELECT sum(pg_relation_size(inhrelid)) FROM pg_inherits "
                            "WHERE inhparent = 'binance_agg_trade'::regclass").fetchone()[0]
        sampled, est = rows_per_minute(conn, "binance_agg_trade", "trade_time", since, until,
                                       exact_bytes=int(size) - 1)
        assert est
        assert sum(sampled.values()) == pytest.approx(total, rel=0.01)
    series = chart_series(db, now)
    assert set(series) == {"binance", "kite", "ibkr", "dhan"}
    assert sum(series["binance"].points.values()) == total
    assert series["kite"].points == {} and series["binance"].error is None
