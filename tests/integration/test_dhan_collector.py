"""feed-dhan end to end: the real program (bin/feed-dhan) against the Dhan
simulator (lib/feeds/sim/dhan.py, in this process, on loopback) or, where
every value sent must be known, a scripted feed server built on the
simulator's packet encoder (lib/feeds/sim/dhan_packets.py); storing into a
throwaway PostgreSQL.

Every test asserts what a user would check: rows in the tables equal to what
was sent, the simulator's view of the connections, the exit status and the
journal lines.
"""
from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve

from collector_process import CollectorProcess, collector_env, collectors_of, q, wait_for, write_config
from conftest import ROOT
from feeds.dhan.token import DhanToken, TokenStore
from feeds.sim import dhan_packets as P
from feeds.sim.dhan import DhanSimulator

pytestmark = pytest.mark.integration

UTC = timezone.utc
BIN = ROOT / "bin" / "feed-dhan"
CLIENT = "1000000001"


def store_token(path: Path, token: str, *, expired: bool = False) -> None:
    now = datetime.now(UTC)
    exp = now - timedelta(hours=1) if expired else now + timedelta(hours=20)
    TokenStore(path).save(DhanToken(CLIENT, token, now - timedelta(hours=2), exp, method="test"))


class Collector(CollectorProcess):
    """bin/feed-dhan as a child process; its log lines are kept in ``lines``."""

    def __init__(self, tmp: Path, dsn: str, feed_url: str, api_url: str, token: str, instruments: list[str], *,
                 dhan: dict | None = None, expired: bool = False, sections: dict | None = None,
                 args: tuple[str, ...] = (), notify: bool = False):
        tmp.mkdir(parents=True, exist_ok=True)
        self.token_file = tmp / "state" / "access_token.json"
        store_token(self.token_file, token, expired=expired)
        inst = tmp / "dhan-instruments.txt"
        inst.write_text("\n".join(instruments) + "\n")
        cfg = {"client_id": CLIENT, "api_url": api_url, "feed_url": feed_url,
               "instrument_list_url": api_url + "/api-data/api-scrip-master.csv",
               "instrument_list_cache": str(tmp / "state" / "api-scrip-master.csv"),
               "token_file": str(self.token_file), "instruments_file": str(inst), "session_calendar": "none",
               "status_interval": 1.0, "silence_timeout": 5.0, "reconnect_max_delay": 2.0}
        cfg.update(dhan or {})
        sec = {"dhan": cfg, "sink": {"spool_dir": str(tmp / "spool"), "flush_interval": 0.1},
               "metrics": {"port": 0}}
        for k, v in (sections or {}).items():
            sec[k] = {**sec.get(k, {}), **v}
        self.config = write_config(tmp / "dhan.toml", sec)
        self.start([sys.executable, str(BIN), "--config", str(self.config), *args], collector_env(dsn, notify=notify))


@pytest.fixture
def collectors():
    yield from collectors_of(Collector)


def sim_for(**kw) -> DhanSimulator:
    kw.setdefault("session_now", True)
    kw.setdefault("ping_interval", 1.0)
    kw.setdefault("seed", 3)
    kw.setdefault("data_dir", False)
    return DhanSimulator(**kw)


def on_sim(collectors, tmp, db, sim: DhanSimulator, instruments, **kw) -> Collector:
    return collectors(tmp, db, sim.ws_url, sim.base_url, sim.access_token, instruments, **kw)


def feed_conns(sim: DhanSimulator) -> list[dict]:
    return sim.stats()["feed"]["connections"]


def count(db: str, table: str, where: str = "true", *args) -> int:
    return q(db, f"select count(*) from {table} where {where}", *args)[0][0]


# ---------------------------------------------------------------------------------- a scripted feed

class ScriptedFeed:
    """A feed server that checks the connection's query and subscribe
    messages, then sends ``script`` (a list of WebSocket messages, bytes or
    text) once and keeps the connection open, pinging every second."""

    def __init__(self, script: list, token: str = "scripted-token"):
        self.script, self.token = script, token
        self.queries: list[dict] = []
        self.requests: list[dict] = []
        self.sent = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handler(self, ws):
        self.queries.append(parse_qs(urlparse(ws.request.path).query))
        want = None

        async def reader():
            async for m in ws:
                self.requests.append(json.loads(m))
        rd = asyncio.ensure_future(reader())
        await asyncio.sleep(0.5)              # the subscribe messages arrive first
        for m in self.script:
            await ws.send(m)
        self.sent.set()
        try:
            while True:
                await asyncio.sleep(1.0)
                await ws.ping()
        except Exception:
            pass
        finally:
            rd.cancel()
        return want

    async def _start(self):
        self.server = await serve(self._handler, "127.0.0.1", 0, ping_interval=None, compression=None)
        self.port = self.server.sockets[0].getsockname()[1]

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.url = f"ws://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        async def stop():
            self.server.close()
            await self.server.wait_closed()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_every_packet_kind_lands_as_sent(tmp_path, db, collectors):
    """Ticker, quote, full (five-level depth), OI, prev close, market status
    and a message of several packets are stored with exactly the values
    sent (prices from float32 to the paisa, LTT from IST to UTC);
    malformed packets are counted and logged, never fatal; a disconnect
    packet is recorded with its meaning."""
    now = int(time.time())
    ltt = P.ltt_from_utc(now - 5)
    depth = [(1000 + i, 2000 + i, 10 + i, 20 + i, 1650.40 - 0.05 * i, 1650.50 + 0.05 * i) for i in range(5)]
    script = [
        P.pack_prev_close(1, 1333, 1644.85, 0),
        P.pack_ticker(0, 13, 24512.35, ltt),
        P.pack_quote(1, 2885, 2915.6, 12, ltt, 2911.35, 4_500_123, 70_000, 80_000, 2900.0, 0.0, 2921.95, 2898.1),
        P.pack_full(1, 1333, 1650.45, 25, ltt, 1649.87, 12_345_678, 600_000, 700_000, 0, 0, 0,
                    1640.05, 0.0, 1655.95, 1638.0, depth),
        P.pack_oi(2, 35001, 1_250_000),
        P.pack_market_status(),
        P.pack_frame(P.pack_ticker(0, 13, 24513.0, ltt + 1), P.pack_ticker(0, 13, 24513.65, ltt + 1)),
        bytes((99,)) + (16).to_bytes(2, "little") + bytes((1,)) + (1333).to_bytes(4, "little") + bytes(8),
        P.pack_full(1, 1333, 1.0, 1, 0, 1.0, 1, 0, 0, 0, 0, 0, 1.0, 0.0, 1.0, 1.0)[:100],
        P.pack_ticker(1, 1333, float("nan"), ltt),
        json.dumps({"note": "a text message"}),
        P.pack_disconnect(800),
    ]
    with ScriptedFeed(script) as feed:
        c = collectors(tmp_path, db, feed.url, "http://127.0.0.1:9", feed.token,
                       ["NSE_EQ:1333 full", "IDX_I:13 ticker", "NSE_EQ:2885 quote", "NSE_FNO:35001 quote"])
        assert wait_for(lambda: count(db, "dhan_disconnect") >= 1 and count(db, "dhan_tick_ticker") >= 3,
                        timeout=60), c.output[-3000:]
        assert c.wait_line("connection 1: Dhan disconnected it with code 800")
        assert c.proc.poll() is None                  # malformed input and code 800 are not fatal
        assert c.stop() == 0
    # the query and the subscribe messages
    qs = feed.queries[0]
    assert (qs["version"], qs["token"], qs["clientId"], qs["authType"]) == (["2"], ["scripted-token"], [CLIENT], ["2"])
    subs = {(r["RequestCode"], x["ExchangeSegment"], x["SecurityId"]) for r in feed.requests for x in r["InstrumentList"]}
    assert subs == {(21, "NSE_EQ", "1333"), (15, "IDX_I", "13"), (17, "NSE_EQ", "2885"), (17, "NSE_FNO", "35001")}
    t = datetime.fromtimestamp(now - 5, UTC)
    D = Decimal
    assert q(db, "select exchange_segment, security_id, prev_close, prev_oi from dhan_prev_close") == \
        [("NSE_EQ", 1333, D("1644.85"), 0)]
    assert q(db, "select ltp, ltt, seq from dhan_tick_ticker order by recv_time, seq") == [
        (D("24512.35"), t, 0), (D("24513.00"), t + timedelta(seconds=1), 0), (D("24513.65"), t + timedelta(seconds=1), 1)]
    assert q(db, "select exchange_segment, security_id, ltp, ltq, ltt, atp, volume, total_sell_qty, total_buy_qty, "
                 "open, close, high, low from dhan_tick_quote") == [
        ("NSE_EQ", 2885, D("2915.60"), 12, t, D("2911.35"), 4_500_123, 70_000, 80_000, D("2900.00"), D("0.00"),
         D("2921.95"), D("2898.10"))]
    full = q(db, "select ltp, ltq, ltt, atp, volume, total_sell_qty, total_buy_qty, oi, oi_day_high, oi_day_low, "
                 "open, close, high, low, bid_quantity, ask_quantity, bid_orders, ask_orders, bid_price, ask_price "
                 "from dhan_tick_full")
    assert full == [(D("1650.45"), 25, t, D("1649.87"), 12_345_678, 600_000, 700_000, 0, 0, 0, D("1640.05"), D("0.00"),
                     D("1655.95"), D("1638.00"), [1000, 1001, 1002, 1003, 1004], [2000, 2001, 2002, 2003, 2004],
                     [10, 11, 12, 13, 14], [20, 21, 22, 23, 24],
                     [D("1650.40"), D("1650.35"), D("1650.30"), D("1650.25"), D("1650.20")],
                     [D("1650.50"), D("1650.55"), D("1650.60"), D("1650.65"), D("1650.70")])]
    assert q(db, "select exchange_segment, security_id, oi from dhan_tick_oi") == [("NSE_FNO", 35001, 1_250_000)]
    assert q(db, "select exchange_segment, security_id, body from dhan_market_status") == [("IDX_I", 0, b"")]
    assert q(db, "select connection, code, meaning, action from dhan_disconnect") == [
        (1, 800, "internal server error", "reconnect")]
    out = c.output
    assert out.count("malformed input from connection 1 skipped") == 3
    assert "unknown-code" in out and "truncated" in out and "price" in out
    assert "text message from Dhan" in out
    assert "stopped: all rows committed or spooled" in out


# ---------------------------------------------------------------------------------- against the simulator

def test_instruments_of_every_mode_from_the_instrument_list(tmp_path, db, collectors):
    """Symbols resolved through the simulator's scrip master; each mode's
    table fills; the status line and heartbeat row report."""
    with sim_for(rate=2, instruments=20).running() as sim:
        c = on_sim(collectors, tmp_path, db, sim, ["NSE_EQ:SIMEQ00001 full priority", "NSE_EQ:SIMEQ00002 quote",
                                                   "NSE_EQ:SIMEQ00003 ticker", "IDX_I:NIFTY quote",
                                                   "NSE_EQ:NO_SUCH_SYMBOL"])
        tables = ("dhan_tick_full", "dhan_tick_quote", "dhan_tick_ticker", "dhan_prev_close", "dhan_tick_oi")
        assert wait_for(lambda: all(count(db, t) for t in tables), timeout=60), \
            ({t: count(db, t) for t in tables}, c.output[-3000:])
        assert wait_for(lambda: q(db, "select status from feed_heartbeat where unit = 'feed-dhan.service'"))
        status = c.wait_line("status: ")
        assert c.stop() == 0
    assert q(db, "select symbol from dhan_instrument order by security_id") == [
        ("NIFTY",), ("SIMEQ00001",), ("SIMEQ00002",), ("SIMEQ00003",)]
    assert q(db, "select distinct security_id from dhan_tick_full") == [(100001,)]
    assert q(db, "select distinct exchange_segment, security_id from dhan_tick_quote order by 2") == [
        ("IDX_I", 13), ("NSE_EQ", 100002)]
    assert "1 instrument(s) not in Dhan's instrument list, skipped: NSE_EQ:NO_SUCH_SYMBOL" in c.output
    assert "frames" in status and "stored" in status
    # prices on the 0.05 tick, exact (float32 on the wire)
    assert q(db, "select count(*) from dhan_tick_full where ltp * 20 <> round(ltp * 20)")[0][0] == 0


def test_1000_instruments_over_the_needed_connections(tmp_path, db, collectors):
    names = [f"NSE_EQ:SIMEQ{i:05d} quote" for i in range(1, 1001)]
    with sim_for(rate=0.2, instruments=1000).running() as sim:
        c = on_sim(collectors, tmp_path, db, sim, names, dhan={"max_instruments_per_connection": 300})
        conns = wait_for(lambda: len(feed_conns(sim)) == 4 and sum(x["subscribed"] for x in feed_conns(sim)) == 1000
                         and feed_conns(sim), timeout=120)
        assert conns, (feed_conns(sim), c.output[-3000:])
        assert sorted(x["subscribed"] for x in conns) == [250, 250, 250, 250]
        st = sim.stats()["feed"]
        assert st["bad_messages"] == 0 and st["disconnects_sent"] == {}
        assert wait_for(lambda: q(db, "select count(distinct security_id) from dhan_tick_quote")[0][0] == 1000,
                        timeout=120), q(db, "select count(distinct security_id) from dhan_tick_quote")
        assert c.stop() == 0
    assert "1000 instruments from" in c.wait_line("feed-dhan starting") and "over 4 connection(s)" in c.output


def test_more_instruments_than_the_connections_carry_are_refused(tmp_path, db, collectors):
    names = [f"NSE_EQ:SIMEQ{i:05d}" for i in range(1, 25_002)]
    c = collectors(tmp_path, db, "ws://127.0.0.1:9", "http://127.0.0.1:9", "tok", names)
    assert c.wait() == 78
    err = [ln for ln in c.lines if "configuration error" in ln]
    assert len(err) == 1, c.output
    assert "dhan.instruments_file" in err[0] and "25001 instruments requested" in err[0]
    assert "dhan.max_instruments_per_connection" in err[0]


def test_one_more_connection_than_allowed_backs_off_as_dhan_does(tmp_path, db, collectors):
    """The collector holds all 5 connections; another program of the same
    client opens a sixth: Dhan closes the oldest with 805.  The collector
    records it, says so in one line, waits, reconnects, and keeps collecting."""
    names = [f"NSE_EQ:SIMEQ{i:05d} ticker" for i in range(1, 11)]
    with sim_for(rate=1, instruments=20).running() as sim:
        c = on_sim(collectors, tmp_path, db, sim, names,
                   dhan={"max_instruments_per_connection": 2, "reconnect_max_delay": 3.0})
        assert wait_for(lambda: len(feed_conns(sim)) == 5, timeout=60), c.output[-3000:]
        first = min(x["id"] for x in feed_conns(sim))
        got: list = []

        async def sixth():
            async with ws_connect(sim.feed_url(), ping_interval=None) as ws:
                try:
                    async for m in ws:
                        got.append(m)
                except Exception:
                    pass
        t = threading.Thread(target=lambda: asyncio.run(asyncio.wait_for(sixth(), 30)), daemon=True)
        t.start()
        assert wait_for(lambda: count(db, "dhan_disconnect", "code = 805") >= 1, timeout=60), c.output[-3000:]
        assert q(db, "select connection, meaning, action from dhan_disconnect where code = 805 limit 1")[0][1:] == \
            (q(db, "select meaning from dhan_disconnect where code = 805")[0][0], "backoff")
        line = c.wait_line("Dhan disconnected it with code 805")
        assert "too many" in line and "waiting before reconnecting" in line
        assert first not in {x["id"] for x in feed_conns(sim)}
        # reconnected after the wait, and collecting on every connection again
        assert c.wait_line("open (generation 2)", timeout=60)
        n0 = count(db, "dhan_tick_ticker")
        assert wait_for(lambda: count(db, "dhan_tick_ticker") > n0 + 20, timeout=60)
        assert c.proc.poll() is None
        t.join(40)
        assert c.stop() == 0
    # one line per 805 received, never a flood
    n805 = count(db, "dhan_disconnect", "code = 805")
    assert sum("code 805" in ln for ln in c.lines) == n805 >= 1


def test_silent_connection_is_dropped_and_reconnected(tmp_path, db, collectors):
    with sim_for(rate=2, instruments=20).running() as sim:
        c = on_sim(collectors, tmp_path, db, sim, ["NSE_EQ:SIMEQ00001 full", "NSE_EQ:SIMEQ00002 quote"],
                   dhan={"silence_timeout": 3.0})
        assert wait_for(lambda: count(db, "dhan_tick_full") > 5, timeout=60), c.output[-3000:]
        old = feed_conns(sim)[0]["id"]
        # pings keep an idle connection alive: no false alarm before the fault
        assert not any("silent for" in ln for ln in c.lines)
        sim.fault_silence(60, connection=old)
        assert c.wait_line("connection 1 silent for", timeout=30)
        assert wait_for(lambda: any(x["id"] != old for x in feed_conns(sim)), timeout=30), feed_conns(sim)
        n0 = count(db, "dhan_tick_full")
        assert wait_for(lambda: count(db, "dhan_tick_full") > n0 + 5, timeout=60)
        assert c.wait_line("open (generation 2)")
        assert c.stop() == 0
    assert "reconnects 1" in c.output and "silent 1" in c.output


def test_token_expired_during_the_session_stops_with_77(tmp_path, db, collectors):
    with sim_for(rate=2, instruments=20).running() as sim:
        c = on_sim(collectors, tmp_path, db, sim, ["NSE_EQ:SIMEQ00001 full", "NSE_EQ:SIMEQ00002 full"],
                   dhan={"max_instruments_per_connection": 1})
        assert wait_for(lambda: count(db, "dhan_tick_full") > 5, timeout=60), c.output[-3000:]
        sim.fault_expire_token()
        assert c.wait(60) == 77
        n_conns = sim.stats()["feed"]["connections_total"]
    assert n_conns == 2                   # not reconnected
    rows = q(db, "select code, meaning, action from dhan_disconnect")
    assert rows and all(r == (807, "access token is expired", "exit") for r in rows)
    err = [ln for ln in c.lines if "feed-dhan-token" in ln]
    assert err and "code 807 (access token is expired)" in c.output
    assert "stopped: all rows committed or spooled" in c.output


def test_expired_or_unknown_token_at_start_exits_77(tmp_path, db, collectors):
    with sim_for(rate=1, instruments=5).running() as sim:
        c = on_sim(collectors, tmp_path / "a", db, sim, ["NSE_EQ:SIMEQ00001"], expired=True)
        assert c.wait(60) == 77
        assert "expired at" in c.output and "run feed-dhan-token" in c.output
        c = collectors(tmp_path / "b", db, sim.ws_url, sim.base_url, "not-a-token-of-the-simulator",
                       ["NSE_EQ:SIMEQ00001"])
        assert c.wait(60) == 77
        assert "code 809 (access token is invalid)" in c.output
        assert sim.stats()["feed"]["connections_total"] == 0        # refused at the handshake


# ---------------------------------------------------------------------------------- candles

def test_live_candles_equal_the_simulators_one_minute_candles(tmp_path, db, collectors):
    """The one-minute candles built from the ticks equal the simulator's own
    one-minute candles (its intraday charts answer) for every minute the
    collector saw whole."""
    sids = (100001, 100002)
    with sim_for(rate=2, instruments=10).running() as sim:
        c = on_sim(collectors, tmp_path, db, sim, ["NSE_EQ:SIMEQ00001 full", "NSE_EQ:SIMEQ00002 quote"],
                   sections={"candles": {"intervals": [1], "grace": 1.0, "lateness": 3.0}})
        assert wait_for(lambda: count(db, "dhan_tick_full") and count(db, "dhan_tick_quote"), timeout=60), \
            c.output[-3000:]
        # both instruments' packets flow from here on: the minute of an instrument's first packet holds the
        # baseline of its cumulative volume (not whole), every later minute is whole
        started = time.time()
        first_whole = (int(started) // 60 + 1) * 60
        want_minutes = 2
        deadline = first_whole + 60 * want_minutes + 8
        time.sleep(max(0.0, deadline - time.time()))
        assert c.stop() == 0
        sim_c = {sid: sim.candles(sid, "NSE_EQ", first_whole, first_whole + 60 * want_minutes - 1) for sid in sids}
    for sid in sids:
        live = q(db, "select extract(epoch from bar_start)::bigint, open, high, low, close, volume, final "
                     "from dhan_candle where security_id = %s and interval_min = 1 and bar_start >= to_timestamp(%s) "
                     "and bar_start < to_timestamp(%s) and final order by bar_start, recorded_at", sid, first_whole,
                 first_whole + 60 * want_minutes)
        s = sim_c[sid]
        want = [(int(t), Decimal(str(o)), Decimal(str(h)), Decimal(str(lo)), Decimal(str(cl)), Decimal(str(v)), True)
                for t, o, h, lo, cl, v in zip(s["timestamp"], s["open"], s["high"], s["low"], s["close"], s["volume"])]
        assert len(want) == want_minutes
        assert live == want, (sid, live, want)
    view = q(db, "select count(*) from candle_latest where venue = 'dhan' and instrument = 'NSE_EQ:100001'")[0][0]
    assert view >= want_minutes


def test_start_inside_the_session_fills_the_missed_minutes_from_history(tmp_path, db, collectors):
    """Started four minutes into a session (the XNSE calendar with the
    session as an extra one): once the minute it started in is over, the
    minutes it missed come from the simulator's intraday charts, stored
    with source 'history' and equal to them; later minutes are live."""
    from feeds.dhan.token import IST
    # two hours, or to a minute before midnight IST when that comes first (the session is one IST day's)
    now = datetime.now(IST)
    midnight = datetime(now.year, now.month, now.day, tzinfo=IST) + timedelta(days=1)
    minutes = min(120, int((midnight - now).total_seconds() // 60) + 4 - 1)
    if minutes < 4 + 10:
        pytest.skip("fewer than ten minutes to midnight IST: too short a session today")
    with sim_for(rate=2, instruments=10, session_elapsed=4, session_minutes=minutes).running() as sim:
        sess = sim.stats()["session"]
        open_ = datetime.fromtimestamp(sess["open_at"], UTC)
        close = datetime.fromtimestamp(sess["close_at"], UTC)
        if open_.astimezone(IST).date() != close.astimezone(IST).date():
            pytest.skip("a session opened before midnight IST")
        day = open_.astimezone(IST).date().isoformat()
        hours = [open_.astimezone(IST).strftime("%H:%M"), close.astimezone(IST).strftime("%H:%M")]
        started = time.time()
        c = on_sim(collectors, tmp_path, db, sim, ["NSE_EQ:SIMEQ00001 full", "NSE_EQ:SIMEQ00002 quote priority"],
                   dhan={"session_calendar": "XNSE"},
                   sections={"candles": {"intervals": [1, 2], "grace": 1.0, "lateness": 3.0},
                             "dhan.extra_sessions": {day: hours}})
        assert c.wait_line("started inside the session", timeout=60)
        done = c.wait_line("candles: history fill done", timeout=150)
        assert "2 instrument(s) filled" in done and "0 failed" in done
        start_min = int(started) // 60 * 60
        n_hist = (start_min - int(open_.timestamp())) // 60 + 1
        time.sleep(1.0)
        assert c.stop() == 0
        want = {sid: sim.candles(sid, "NSE_EQ", int(open_.timestamp()), start_min + 59) for sid in (100001, 100002)}
    assert "Dhan's intraday charts at" in c.output
    for sid, s in want.items():
        rows = q(db, "select extract(epoch from bar_start)::bigint, open, high, low, close, volume, final, source "
                     "from candle_latest where venue = 'dhan' and instrument = %s and interval_min = 1 "
                     "and bar_start <= to_timestamp(%s) order by bar_start", f"NSE_EQ:{sid}", start_min)
        exp = [(int(t), Decimal(str(o)), Decimal(str(h)), Decimal(str(lo)), Decimal(str(cl)), Decimal(str(v)), True,
                "history")
               for t, o, h, lo, cl, v in zip(s["timestamp"], s["open"], s["high"], s["low"], s["close"], s["volume"])]
        assert len(exp) == n_hist >= 4
        assert rows == exp, (sid, rows, exp)
    # the larger interval made of history minutes is stored too
    assert q(db, "select count(*) from dhan_candle where interval_min = 2 and source = 'history'")[0][0] >= 2


@pytest.mark.parametrize("at, want", [
    ("2024-11-01T09:10+05:30", "session 2024-11-01 18:00-19:00 IST (special): connect at 2024-11-01 17:55 IST, "
                               "stop at 2024-11-01 19:05 IST"),
    ("2024-10-31T09:00+05:30", "session 2024-10-31 09:15-15:30 IST (regular): connect at 2024-10-31 09:10 IST, "
                               "stop at 2024-10-31 15:35 IST"),
    ("2024-11-02T09:00+05:30", "no NSE session on Saturday 2024-11-02 (weekend): nothing to collect"),
    ("2024-11-04T16:00+05:30", "today's session 2024-11-04 09:15-15:30 IST (regular) has ended: nothing to collect"),
])
def test_session_plan_from_the_xnse_calendar(tmp_path, db, collectors, at, want):
    """--at prints what a start at that time would do (the timer starts it at 09:10 IST every weekday)."""
    c = collectors(tmp_path, db, "ws://127.0.0.1:9", "http://127.0.0.1:9", "tok", ["NSE_EQ:HDFCBANK"],
                   dhan={"session_calendar": "XNSE"}, args=("--at", at))
    assert c.wait(60) == 0
    assert c.lines[-1] == want, c.output


def test_watchdog_follows_dhans_pings_before_the_open_and_stops_on_silence(tmp_path, db, collectors, monkeypatch):
    """Connected before the open (the session ended earlier today: no packet
    flows, only Dhan's pings): READY, and WATCHDOG=1 keeps coming, since the
    pings show the connection alive; a connection gone silent stops the pings."""
    from test_kite_collector import NotifySocket
    flow_timeout = 2.0
    ns = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", ns.path)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    try:
        with sim_for(rate=2, instruments=5, session_elapsed=300, session_minutes=60).running() as sim:
            if sim.stats()["session"]["open"]:
                pytest.skip("a session is open in the simulator")
            c = on_sim(collectors, tmp_path / "c", db, sim, ["NSE_EQ:SIMEQ00001 full"],
                       dhan={"silence_timeout": 300.0}, sections={"sink": {"flow_timeout": flow_timeout}},
                       notify=True)
            assert wait_for(lambda: ns.times("READY=1"), timeout=60), c.output[-3000:]
            ready = ns.times("READY=1")[0]
            time.sleep(3 * flow_timeout)
            assert count(db, "dhan_tick_full") == 0 and count(db, "dhan_prev_close") == 1
            late = [t for t in ns.times("WATCHDOG=1") if t > ready + 2 * flow_timeout]
            assert len(late) >= 2, ns.msgs[-10:]
            sim.fault_silence(600)
            mark = time.monotonic()
            time.sleep(2 * flow_timeout + 3)
            assert not [t for t in ns.times("WATCHDOG=1") if t > mark + flow_timeout + 1.5], ns.msgs[-10:]
            assert c.stop() == 0
    finally:
        ns.close()


def test_instruments_from_the_file_and_the_subscription_table(tmp_path, db, collectors):
    """dhan.instruments_from_table adds the enabled rows of dhan_subscription to the file's list
    (an instrument in both is taken once, as the file has it)."""
    q(db, "insert into dhan_subscription (exchange_segment, symbol, mode, priority, enabled) values "
          "('NSE_EQ', 'SIMEQ00001', 'ticker', 0, true), ('NSE_EQ', 'SIMEQ00002', NULL, 1, true), "
          "('NSE_EQ', 'SIMEQ00003', 'quote', 0, false)")
    with sim_for(rate=1, instruments=10).running() as sim:
        c = on_sim(collectors, tmp_path, db, sim, ["NSE_EQ:SIMEQ00001 quote"],
                   dhan={"instruments_from_table": True, "default_mode": "full"})
        conns = wait_for(lambda: sum(x["subscribed"] for x in feed_conns(sim)) == 2 and feed_conns(sim), timeout=60)
        assert conns, c.output[-3000:]
        assert conns[0]["modes"] == {"ticker": 0, "quote": 1, "full": 1}, conns[0]["modes"]
        assert c.stop() == 0
    assert "2 instruments from " in c.output and "table dhan_subscription" in c.output
