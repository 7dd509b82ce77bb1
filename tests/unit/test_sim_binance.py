"""Tests of the Binance USD-M futures simulator, with the real python-binance
1.0.37 as the client where the client is the subject, and raw WebSocket
clients where the wire itself is (close codes, pings, malformed frames).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

import aiohttp
import orjson
import pytest
import websockets
from binance import AsyncClient, BinanceSocketManager
from binance.exceptions import BinanceAPIException

from feeds.sim.binance import BinanceSimulator, SimulatorThread
from feeds.sim.binance_market import (
    SymbolMarket,
    aggregate_rows,
    fmt_scaled,
    parse_scaled,
)
from feeds.sim.binance_streams import StreamNameError, category, parse_stream

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("FEEDS_SHARED_DATA") or ROOT / ".." / "shared" / "data")
JULY = SHARED / "binance" / "binance-usdm-2021-07-22.frames"
APRIL = SHARED / "binance" / "binance-usdm-2021-04-05.frames"
need_july = pytest.mark.skipif(not JULY.exists(), reason=f"recording {JULY} not available")
need_april = pytest.mark.skipif(not APRIL.exists(), reason=f"recording {APRIL} not available")

JULY_SYMBOLS = ["sushiusdt", "akrousdt", "keepusdt", "ctkusdt"]


def run(coro, timeout: float = 30.0):
    """Run one test coroutine with an overall time limit."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def recorded_frames(path: Path) -> list[dict]:
    """Every recorded frame of ``path`` as ``{"stream","data"}`` dicts, in order."""
    out = []
    for line in path.read_bytes().splitlines():
        head, sep, body = line.partition(b": ")
        if sep and head.replace(b".", b"").isdigit() and body.startswith(b'{"stream"'):
            out.append(orjson.loads(body))
    return out


def make_client(sim: SimulatorThread, max_queue: int = 1_000_000):
    """python-binance pointed at the simulator (no call to the real Binance)."""
    client = AsyncClient()
    client.FUTURES_URL = sim.fapi_url
    bm = BinanceSocketManager(client, max_queue_size=max_queue)
    bm.FSTREAM_URL = sim.ws_url
    return client, bm


def fast_exit(sock):
    """python-binance leaves a socket only after its read times out (10 s by
    default); a short read timeout keeps the tests quick."""
    sock.TIMEOUT = 0.3
    return sock


async def collect(sock, until, timeout: float = 10.0) -> list[dict]:
    """Messages from a python-binance socket until ``until(messages)`` is true."""
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            got.append(await asyncio.wait_for(sock.recv(), left))
        except asyncio.TimeoutError:
            break
    return got


def post(sim: SimulatorThread, path: str) -> dict:
    req = urllib.request.Request(sim.http_url + path, method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def get(sim: SimulatorThread, path: str):
    with urllib.request.urlopen(sim.http_url + path, timeout=5) as resp:
        return resp.status, dict(resp.headers), json.loads(resp.read())


# --------------------------------------------------------------------- pure parts


def test_scaled_decimal_strings_round_trip():
    assert fmt_scaled(101100, 5) == "1.01100"
    assert fmt_scaled(-5, 2) == "-0.05"
    assert fmt_scaled(7, 0) == "7"
    assert parse_scaled("1.01100") == (101100, 5)
    assert parse_scaled("312") == (312, 0)
    with pytest.raises(ValueError):
        parse_scaled("1e-5")


def test_stream_names_and_categories():
    assert parse_stream("BTCUSDT@aggtrade").name == "btcusdt@aggTrade"
    assert parse_stream("btcusdt@markPrice@1s").kind == "markPrice@1s"
    assert parse_stream("btcusdt@kline_1M").kind == "kline_1M"  # a month, not a minute
    assert category("bookTicker") == "public"
    assert category("depth@100ms") == "public"
    assert category("aggTrade") == "market"
    assert category("kline_1m") == "market"
    for bad in ("btcusdt", "btcusdt@kline_7m", "btc usdt@aggTrade"):
        with pytest.raises(StreamNameError):
            parse_stream(bad)


def test_candle_from_trades_and_interval_aggregation():
    m = SymbolMarket("ABCUSDT", "generated", price_scale=2, qty_scale=1, first_agg_id=1)
    t0 = 1_700_000_100_000  # a 5-minute boundary
    assert m.add_trade(10000, 5, 1, 1, t0 + 1, True) is None
    assert m.add_trade(10100, 10, 2, 3, t0 + 2, False) is None
    closed = m.add_trade(9900, 1, 4, 4, t0 + 60_000, True)
    assert closed is not None
    row = m.closed[-1]
    #      t   T             o         h         l         c         v      q          n  V      Q
    assert row == (t0, t0 + 59_999, "100.00", "101.00", "100.00", "101.00", "1.5", "151.000", 3, "1.0", "101.000")
    # 5m bucket containing both candles
    agg = aggregate_rows(m.closed + [m.current_row()], "5m")
    assert len(agg) == 1 and agg[0][2] == "100.00" and agg[0][5] == "99.00" and agg[0][8] == 4
    assert agg[0][4] == "99.00" and agg[0][6] == "1.6"


# --------------------------------------------------------------------- replay


@pytest.fixture(scope="module")
def july_replay():
    """The 2021-07-22 recording replayed at speed 0 into two python-binance
    sockets: /market (aggTrade + kline_1m) and /public (bookTicker)."""
    if not JULY.exists():
        pytest.skip(f"recording {JULY} not available")
    with SimulatorThread(replay=[JULY], speed=0, replay_wait=1.0) as sim:

        async def main():
            client, bm = make_client(sim)
            market = fast_exit(bm.futures_multiplex_socket(
                [f"{s}@aggTrade" for s in JULY_SYMBOLS] + [f"{s}@kline_1m" for s in JULY_SYMBOLS],
                category="market"))
            public = fast_exit(bm.futures_multiplex_socket(
                [f"{s}@bookTicker" for s in JULY_SYMBOLS], category="public"))
            async with market as ms, public as ps:
                got_m, got_p = await asyncio.gather(
                    collect(ms, lambda g: len(g) >= 91 + 67, timeout=15),
                    collect(ps, lambda g: len(g) >= 613, timeout=15),
                )
                # anything beyond the expected count would be a duplicate
                got_m += await collect(ms, lambda g: False, timeout=0.3)
                got_p += await collect(ps, lambda g: False, timeout=0.3)
            rest = {
                "agg": {s: await client.futures_aggregate_trades(symbol=s.upper(), fromId=0, limit=1000)
                        for s in JULY_SYMBOLS},
                "klines": {s: await client.futures_klines(symbol=s.upper(), interval="1m")
                           for s in JULY_SYMBOLS},
                "klines5": await client.futures_klines(symbol="CTKUSDT", interval="5m", limit=10),
                "info": await client.futures_exchange_info(),
                "depth": await client.futures_order_book(symbol="SUSHIUSDT", limit=5),
            }
            await client.close_connection()
            return got_m, got_p, rest

        got_m, got_p, rest = run(main(), timeout=40)
        yield sim, got_m, got_p, rest, sim.stats()


@need_july
def test_replay_delivers_every_frame_once_and_verbatim(july_replay):
    sim, got_m, got_p, rest, stats = july_replay
    frames = recorded_frames(JULY)
    wanted_m = [f for f in frames if f["stream"].endswith(("@aggTrade", "@kline_1m"))]
    wanted_p = [f for f in frames if f["stream"].endswith("@bookTicker")]
    assert len(wanted_m) == 91 + 67 and len(wanted_p) == 613
    # each connection receives its frames in recorded order, each exactly once
    assert got_m == wanted_m
    assert got_p == wanted_p
    # depth frames are only for depth subscribers: nobody here
    assert stats["streams"]["sushiusdt@depth@100ms"] == {"sent": 0, "unsent": 255, "withheld": 0}
    assert stats["unsent_total"] == 764
    assert stats["sent_total"] == 771
    assert stats["replay_finished"] is True


@need_july
def test_replay_sends_recorded_text_byte_for_byte():
    """A raw reader sees the exact recorded text (prices never re-formatted)."""
    lines = [ln.partition(b": ")[2] for ln in JULY.read_bytes().splitlines()
             if ln[:1].isdigit() and b'"stream":"ctkusdt@aggTrade"' in ln]
    with SimulatorThread(replay=[JULY], speed=0, replay_wait=0.2) as sim:

        async def main():
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(sim.ws_url + "market/stream?streams=ctkusdt@aggTrade") as ws:
                    combined = [(await ws.receive(timeout=10)).data.encode() for _ in lines]
                async with s.ws_connect(sim.ws_url + "market/ws/ctkusdt@aggTrade") as ws:
                    await asyncio.sleep(0.2)  # replay is over: the connection stays idle
                    with pytest.raises(asyncio.TimeoutError):
                        await ws.receive(timeout=0.3)
            return combined

        combined = run(main())
    assert combined == lines


@need_july
def test_rest_agg_trades_klines_depth_and_exchange_info(july_replay):
    sim, got_m, got_p, rest, stats = july_replay
    frames = recorded_frames(JULY)
    for s in JULY_SYMBOLS:
        trades = [f["data"] for f in frames if f["stream"] == f"{s}@aggTrade"]
        expected = [{k: d[k] for k in ("a", "p", "q", "f", "l", "T", "m")} for d in trades]
        assert rest["agg"][s] == expected
        # klines: the closed candle equals the recorded x:true frame, the
        # open one (last, like Binance) the last recorded frame
        kl = [f["data"]["k"] for f in frames if f["stream"] == f"{s}@kline_1m"]
        closed = [k for k in kl if k["x"]]
        rows = rest["klines"][s]
        as_row = lambda k: [k["t"], k["o"], k["h"], k["l"], k["c"], k["v"], k["T"], k["q"], k["n"],
                            k["V"], k["Q"], "0"]
        assert rows[: len(closed)] == [as_row(k) for k in closed]
        if not kl[-1]["x"]:
            assert rows[-1] == as_row(kl[-1])
    # 5m aggregation of CTKUSDT's two 1m candles
    k5 = rest["klines5"]
    rows1 = rest["klines"]["ctkusdt"]
    assert len(k5) == 1 and k5[0][0] == 1626992700000 and k5[0][6] == 1626992999999
    assert Decimal(k5[0][5]) == sum(Decimal(r[5]) for r in rows1)
    assert k5[0][8] == sum(r[8] for r in rows1)
    # exchangeInfo: a client must filter PERPETUAL + TRADING
    info = rest["info"]
    assert {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
            "limit": 2400} in info["rateLimits"]
    usable = sorted(x["symbol"] for x in info["symbols"]
                    if x["contractType"] == "PERPETUAL" and x["status"] == "TRADING")
    assert usable == sorted(s.upper() for s in JULY_SYMBOLS)
    others = [x for x in info["symbols"] if x["symbol"] not in usable]
    assert sum(x["contractType"] != "PERPETUAL" for x in others) == 2
    assert sum(x["status"] == "SETTLING" for x in others) == 1
    assert all(x["quoteAsset"] == "USDT" for x in info["symbols"])
    # depth: the snapshot recorded in the session, cut to the limit
    snap = rest["depth"]
    assert snap["lastUpdateId"] == 600859605926
    assert snap["bids"][0] == ["7.6110", "6"] and len(snap["bids"]) == 5 and len(snap["asks"]) == 5


@need_april
def test_replay_derives_klines_marked_and_closed_once_per_minute():
    """The 2021-04-05 recording has no klines: they are derived from its
    trades, each carries "sim":"derived", and each minute closes exactly once."""
    frames = recorded_frames(APRIL)
    symbols = sorted({f["data"]["s"] for f in frames if f["data"]["e"] == "aggTrade"})
    streams = "/".join(f"{s.lower()}@kline_1m" for s in symbols)
    with SimulatorThread(replay=[APRIL], speed=0, replay_wait=0.2) as sim:

        async def main():
            client, bm = make_client(sim)
            sock = fast_exit(bm.futures_multiplex_socket(streams.split("/"), category="market"))
            async with sock:
                got = await collect(sock, lambda g: False, timeout=1.5)
            rest = {s: await client.futures_klines(symbol=s, interval="1m") for s in symbols}
            await client.close_connection()
            return got, rest

        got, rest = run(main())
    assert got, "no kline message derived"
    assert all(m["data"]["sim"] == "derived" for m in got)
    closes = collections.defaultdict(list)
    for m in got:
        k = m["data"]["k"]
        if k["x"]:
            closes[k["s"]].append(k)
    # candles close once the replay clock (latest recorded E) is 1 s past the minute
    final = max(f["data"]["E"] for f in frames) - 1000
    open_minute = final - final % 60_000
    for s in symbols:
        trades = [f["data"] for f in frames if f["data"]["e"] == "aggTrade" and f["data"]["s"] == s]
        by_minute = collections.defaultdict(list)
        for t in trades:
            by_minute[t["T"] - t["T"] % 60_000].append(t)
        first = min(by_minute)
        expected = list(range(first, open_minute, 60_000))
        assert len(expected) >= 1
        # every minute closes exactly once, in order
        assert [k["t"] for k in closes[s]] == expected, s
        for k in closes[s]:
            ts = by_minute.get(k["t"], [])
            if not ts:  # a minute without trades: empty candle
                assert k["n"] == 0 and (k["f"], k["L"]) == (-1, -1)
                continue
            prices = [Decimal(t["p"]) for t in ts]
            assert Decimal(k["o"]) == prices[0] and Decimal(k["c"]) == prices[-1]
            assert Decimal(k["h"]) == max(prices) and Decimal(k["l"]) == min(prices)
            assert Decimal(k["v"]) == sum(Decimal(t["q"]) for t in ts)
            assert k["n"] == sum(t["l"] - t["f"] + 1 for t in ts)
            assert (k["f"], k["L"]) == (ts[0]["f"], ts[-1]["l"])
        # REST: the closed candles as sent, then the open one
        rows = rest[s]
        assert [r[0] for r in rows] == expected + [open_minute]
        assert [(r[1], r[2], r[3], r[4], r[5], r[8]) for r in rows[:-1]] == [
            (k["o"], k["h"], k["l"], k["c"], k["v"], k["n"]) for k in closes[s]]


# --------------------------------------------------------------------- REST limits


def test_rest_bad_params_and_weight_limit_429():
    # stay inside one weight minute
    if time.time() % 60 > 55:
        time.sleep(60 - time.time() % 60 + 0.1)
    with SimulatorThread(symbols=1, streams=["aggTrade"], rate=50, seed=3, weight_limit=65) as sim:

        async def main():
            client, _ = make_client(sim)
            errors = {}
            for name, kwargs in (("missing", {}), ("invalid", {"symbol": "NOPEUSDT"}),
                                 ("limit", {"symbol": "SYM0000USDT", "limit": 5000})):
                with pytest.raises(BinanceAPIException) as ei:
                    await client.futures_aggregate_trades(**kwargs)
                errors[name] = (ei.value.status_code, ei.value.code)
            # refused requests still weigh 20 each: 60 of 65 used -> the next one is refused
            with pytest.raises(BinanceAPIException) as ei:
                await client.futures_aggregate_trades(symbol="SYM0000USDT")
            too_many = (ei.value.status_code, ei.value.code)
            headers = dict(client.response.headers)
            await client.close_connection()
            return errors, too_many, headers

        errors, too_many, headers = run(main())
        status, hdrs, body = get(sim, "/sim/stats")
    assert errors["missing"] == (400, -1102)
    assert errors["invalid"] == (400, -1121)
    assert errors["limit"] == (400, -1130)
    assert too_many == (429, -1003)
    assert int(headers["Retry-After"]) in range(1, 61)
    assert headers["X-MBX-USED-WEIGHT-1M"] == "60"
    assert body["rest_429"] == 1


def test_rest_weight_header_on_every_reply():
    if time.time() % 60 > 55:
        time.sleep(60 - time.time() % 60 + 0.1)
    with SimulatorThread(symbols=["BTCUSDT"], streams=["aggTrade"], rate=50, seed=1) as sim:
        time.sleep(0.1)  # a few trades, so that there is a candle
        s1, h1, _ = get(sim, "/fapi/v1/ping")
        s2, h2, t = get(sim, "/fapi/v1/time")
        s3, h3, kl = get(sim, "/fapi/v1/klines?symbol=BTCUSDT&interval=1m&limit=100")
    used = [int(h["X-MBX-USED-WEIGHT-1M"]) for h in (h1, h2, h3)]
    assert (s1, s2, s3) == (200, 200, 200)
    # ping 1, time 1, klines with limit 100 -> 2
    assert used == [1, 2, 4]
    assert abs(t["serverTime"] - time.time() * 1000) < 5000
    assert kl and kl[-1][0] % 60_000 == 0


# --------------------------------------------------------------------- faults


def test_skip_fault_gap_on_ws_filled_from_rest():
    with SimulatorThread(symbols=1, streams=["aggTrade"], rate=400, seed=7) as sim:

        async def main():
            client, bm = make_client(sim)
            sock = fast_exit(bm.futures_multiplex_socket(["sym0000usdt@aggTrade"]))
            async with sock:
                before = await collect(sock, lambda g: len(g) >= 20)
                assert post(sim, "/sim/fault/skip?symbol=SYM0000USDT&count=5") == {"ok": True}
                after = await collect(sock, lambda g: len(g) >= 40)
            ids = [m["data"]["a"] for m in before + after]
            gaps = [(x, y) for x, y in zip(ids, ids[1:]) if y != x + 1]
            missing = []
            if len(gaps) == 1:
                lo = gaps[0][0] + 1
                missing = await client.futures_aggregate_trades(symbol="SYM0000USDT", fromId=lo, limit=5)
            await client.close_connection()
            return gaps, missing

        gaps, missing = run(main())
        stats = sim.stats()
    assert len(gaps) == 1 and gaps[0][1] - gaps[0][0] == 6
    assert [t["a"] for t in missing] == list(range(gaps[0][0] + 1, gaps[0][1]))
    assert all(isinstance(t["p"], str) and isinstance(t["q"], str) for t in missing)
    assert stats["agg_ids_skipped"] == 5


def test_drop_fault_closes_only_matching_connections():
    with SimulatorThread(symbols=1, streams=["aggTrade", "bookTicker"], rate=100, seed=2) as sim:

        async def main():
            client, bm = make_client(sim)
            m = fast_exit(bm.futures_multiplex_socket(["sym0000usdt@aggTrade"], category="market"))
            p = fast_exit(bm.futures_multiplex_socket(["sym0000usdt@bookTicker"], category="public"))
            async with m, p:
                await collect(m, lambda g: len(g) >= 2)
                await collect(p, lambda g: len(g) >= 2)
                assert sim.stats()["connections_open"] == 2
                assert post(sim, "/sim/fault/drop?path=market") == {"ok": True, "dropped": 1}
                err = await collect(m, lambda g: any(x.get("e") == "error" for x in g), timeout=5)
                open_after = sim.stats()["connections_open"]
                still = await collect(p, lambda g: len(g) >= 3, timeout=5)
                # python-binance reconnects by itself (after 1-2 s); leaving the
                # socket before that would leave its reconnect running
                back = await collect(m, lambda g: any("data" in x for x in g), timeout=8)
                total = sim.stats()["connections_total"]
            await client.close_connection()
            return err, open_after, still, back, total

        err, open_after, still, back, total = run(main())
    errors = [x for x in err if x.get("e") == "error"]
    assert errors and errors[0]["type"] == "ConnectionClosedError"  # no close frame: abrupt
    assert open_after == 1
    assert len(still) == 3 and all(x["data"]["e"] == "bookTicker" for x in still)
    assert back[-1]["data"]["e"] == "aggTrade" and total == 3


def regular_agg_trade(text: str) -> bool:
    try:
        d = orjson.loads(text)["data"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return False
    return {"a", "p", "q", "f", "l", "T", "m"} <= set(d) and isinstance(d["p"], str) and isinstance(d["a"], int)


def test_malformed_fault_frames_arrive_malformed():
    with SimulatorThread(symbols=1, streams=["aggTrade"], rate=20, seed=4) as sim:

        async def raw():
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(sim.ws_url + "market/stream?streams=sym0000usdt@aggTrade") as ws:
                    await ws.receive(timeout=5)
                    assert post(sim, "/sim/fault/malformed?count=3") == {"ok": True, "sent": 3}
                    texts = []
                    while len(texts) < 3:
                        t = (await ws.receive(timeout=5)).data
                        if not regular_agg_trade(t):
                            texts.append(t)
            return texts

        texts = run(raw())

        async def with_python_binance():
            client, bm = make_client(sim)
            sock = fast_exit(bm.futures_multiplex_socket(["sym0000usdt@aggTrade"]))
            async with sock:
                await collect(sock, lambda g: len(g) >= 1)
                sim.call(sim.sim.fault_malformed, 1)
                got = await collect(sock, lambda g: any(x.get("e") == "error" for x in g), timeout=5)
            await client.close_connection()
            return got

        got = run(with_python_binance())
        stats = sim.stats()
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(texts[0])
    missing = orjson.loads(texts[1])["data"]
    assert missing["e"] == "aggTrade" and "a" not in missing and "p" not in missing
    wrong = orjson.loads(texts[2])["data"]
    assert isinstance(wrong["p"], float) and isinstance(wrong["a"], str) and isinstance(wrong["E"], str)
    # python-binance reports the undecodable frame as an error message
    assert [x["type"] for x in got if x.get("e") == "error"] == ["JSONDecodeError"]
    assert stats["malformed_sent"] == 4


def test_stall_one_stream_and_stall_all():
    with SimulatorThread(symbols=1, streams=["aggTrade", "bookTicker"], rate=400, seed=5) as sim:

        async def main():
            async with aiohttp.ClientSession() as s:
                url = sim.ws_url + "stream?streams=sym0000usdt@aggTrade/sym0000usdt@bookTicker"
                async with s.ws_connect(url) as ws:
                    for _ in range(10):
                        await ws.receive(timeout=5)
                    sim.call(sim.sim.fault_stall, "sym0000usdt@aggTrade", 0.5)
                    t0 = time.monotonic()
                    during = []
                    while time.monotonic() - t0 < 0.4:
                        name = orjson.loads((await ws.receive(timeout=5)).data)["stream"]
                        if time.monotonic() - t0 > 0.05:  # frames already on the way
                            during.append(name)
                    await asyncio.sleep(0.3)
                    after = [orjson.loads((await ws.receive(timeout=5)).data)["stream"] for _ in range(60)]
                    assert post(sim, "/sim/fault/stall_all?seconds=0.6") == {"ok": True}
                    # drain what was already queued, then expect silence
                    t1 = time.monotonic()
                    silent_from = None
                    while time.monotonic() - t1 < 0.5:
                        try:
                            await ws.receive(timeout=0.15)
                        except asyncio.TimeoutError:
                            silent_from = time.monotonic()
                            break
                    resumed = await ws.receive(timeout=2)
                    return during, after, silent_from, resumed

        during, after, silent_from, resumed = run(main())
        stats = sim.stats()
    assert "sym0000usdt@bookTicker" in during
    assert "sym0000usdt@aggTrade" not in during
    assert "sym0000usdt@aggTrade" in after
    assert silent_from is not None, "frames kept coming during stall_all"
    assert resumed.type == aiohttp.WSMsgType.TEXT
    assert stats["streams"]["sym0000usdt@aggTrade"]["withheld"] > 0
    assert stats["streams"]["sym0000usdt@bookTicker"]["withheld"] > 0


# --------------------------------------------------------------------- protocol limits


def test_wrong_category_refused_at_connect_and_on_subscribe():
    with SimulatorThread(symbols=1, streams=["aggTrade", "bookTicker"], rate=10, seed=6) as sim:

        async def main():
            client, bm = make_client(sim)
            with pytest.raises(websockets.exceptions.InvalidStatus) as ei:
                async with bm.futures_multiplex_socket(["sym0000usdt@bookTicker"], category="market"):
                    pass
            status = ei.value.response.status_code
            await client.close_connection()
            replies = []
            async with websockets.connect(sim.ws_url + "market/stream") as ws:
                for req in (
                    {"method": "SUBSCRIBE", "params": ["sym0000usdt@bookTicker"], "id": 1},
                    {"method": "SUBSCRIBE", "params": ["sym0000usdt@aggTrade"], "id": 2},
                    {"method": "LIST_SUBSCRIPTIONS", "id": 3},
                    {"method": "NOPE", "id": 4},
                    "{not json",
                    {"method": "UNSUBSCRIBE", "params": ["sym0000usdt@aggTrade"], "id": 5},
                ):
                    await ws.send(req if isinstance(req, str) else json.dumps(req))
                    while True:
                        msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
                        if "stream" not in msg:
                            replies.append(msg)
                            break
            return status, replies

        status, replies = run(main())
        stats = sim.stats()
    assert status == 400
    assert replies[0]["id"] == 1 and replies[0]["error"]["code"] == 2
    assert replies[1] == {"result": None, "id": 2}
    assert replies[2] == {"result": ["sym0000usdt@aggTrade"], "id": 3}
    assert replies[3]["id"] == 4 and replies[3]["error"]["code"] == 2
    assert replies[4]["error"]["code"] == 3 and replies[4]["id"] is None
    assert replies[5] == {"result": None, "id": 5}
    assert stats["client_errors"] >= 4


def test_stream_count_limit_incoming_rate_ping_and_age():
    with SimulatorThread(symbols=1, streams=["aggTrade"], rate=0, seed=8, max_streams=3,
                         ping_interval=0.2, max_connection_age=1.0) as sim:

        async def main():
            out = {}
            names = [f"s{i}usdt@aggTrade" for i in range(4)]
            with pytest.raises(websockets.exceptions.InvalidStatus) as ei:
                async with websockets.connect(sim.ws_url + "market/stream?streams=" + "/".join(names)):
                    pass
            out["too_many"] = ei.value.response.status_code
            async with aiohttp.ClientSession() as s:
                # server pings, answered by the client; closed at the age limit with 1001
                async with s.ws_connect(sim.ws_url + "market/ws", autoping=False) as ws:
                    t0 = time.monotonic()
                    kinds = []
                    while True:
                        msg = await ws.receive(timeout=3)
                        kinds.append(msg.type)
                        if msg.type == aiohttp.WSMsgType.PING:
                            await ws.pong(msg.data)
                        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                            break
                    out["age"] = (time.monotonic() - t0, ws.close_code, kinds)
                # more than 10 messages in a second: closed with 1008
                async with s.ws_connect(sim.ws_url + "market/ws") as ws:
                    for i in range(11):
                        await ws.send_str(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": i}))
                    while True:
                        msg = await ws.receive(timeout=3)
                        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                            break
                    out["rate"] = ws.close_code
            return out

        out = run(main())
    assert out["too_many"] == 400
    age, code, kinds = out["age"]
    assert code == 1001 and 0.9 <= age <= 2.0
    assert kinds.count(aiohttp.WSMsgType.PING) >= 3
    assert out["rate"] == 1008


# --------------------------------------------------------------------- generator


def test_generator_rate0_contiguous_ids_and_derived_marked():
    syms = ["sym0000usdt", "sym0001usdt", "sym0002usdt"]
    with SimulatorThread(symbols=3, rate=0, seed=9) as sim:

        async def main():
            client, bm = make_client(sim)
            streams = [f"{s}@aggTrade" for s in syms] + [
                "sym0000usdt@markPrice@1s", "sym0000usdt@ticker", "sym0000usdt@kline_1m"]
            sock = fast_exit(bm.futures_multiplex_socket(streams, category="market"))
            async with sock:
                got, seen = [], set()
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline and not (
                        len(got) > 3000 and {"markPrice@1s", "ticker", "kline_1m"} <= seen):
                    msg = await asyncio.wait_for(sock.recv(), 5)
                    got.append(msg)
                    seen.add(msg["stream"].split("@", 1)[1])
            last_rest = await client.futures_aggregate_trades(symbol="SYM0001USDT", limit=3)
            await client.close_connection()
            return got, last_rest

        got, last_rest = run(main())
    by_symbol = collections.defaultdict(list)
    derived = collections.Counter()
    for m in got:
        d = m["data"]
        if d["e"] == "aggTrade":
            assert "sim" not in d
            assert isinstance(d["p"], str) and re.fullmatch(r"\d+(\.\d+)?", d["p"])
            by_symbol[d["s"]].append(d["a"])
        else:
            assert d["sim"] == "derived", d
            derived[d["e"]] += 1
    assert len(got) > 3000
    for s, ids in by_symbol.items():
        assert ids == list(range(ids[0], ids[0] + len(ids))), s
    assert set(by_symbol) == {s.upper() for s in syms}
    assert derived["markPriceUpdate"] >= 1 and derived["24hrTicker"] >= 1 and derived["kline"] >= 1
    # every generated trade is in the REST history, ids continuing the WS ones
    assert last_rest[-1]["a"] >= by_symbol["SYM0001USDT"][-1]


def test_async_client_create_and_raw_ws_frames():
    with SimulatorThread(symbols=1, streams=["aggTrade"], rate=100, seed=11) as sim:

        class SimClient(AsyncClient):
            API_URL = sim.http_url + "/api"
            FUTURES_URL = sim.fapi_url

        async def main():
            client = await SimClient.create()  # pings /api/v3/ping, reads /api/v3/time
            pong = await client.futures_ping()
            await client.close_connection()
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(sim.ws_url + "market/ws/sym0000usdt@aggTrade") as ws:
                    raw = orjson.loads((await ws.receive(timeout=5)).data)
                    await ws.send_str(json.dumps({"method": "SET_PROPERTY", "params": ["combined", True], "id": 7}))
                    while True:
                        msg = orjson.loads((await ws.receive(timeout=5)).data)
                        if msg.get("id") == 7:
                            break
                    combined = orjson.loads((await ws.receive(timeout=5)).data)
            return client.timestamp_offset, pong, raw, msg, combined

        offset, pong, raw, reply, combined = run(main())
    assert abs(offset) < 5000 and pong == {}
    assert raw["e"] == "aggTrade" and "stream" not in raw
    assert reply == {"result": None, "id": 7}
    assert combined["stream"] == "sym0000usdt@aggTrade" and combined["data"]["a"] > raw["a"]


def test_generator_fixed_rate_and_history_without_subscribers():
    with SimulatorThread(symbols=2, streams=["aggTrade"], rate=200, seed=10) as sim:
        time.sleep(0.6)
        stats = sim.stats()
        _, _, trades = get(sim, "/fapi/v1/aggTrades?symbol=SYM0000USDT&limit=1000")
    # ~120 events over two symbols, nobody connected: all unsent, all in history
    assert 60 <= stats["unsent_total"] <= 200 and stats["sent_total"] == 0
    ids = [t["a"] for t in trades]
    assert ids == list(range(ids[0], ids[0] + len(ids))) and len(ids) >= 30


def test_command_line_starts_and_serves():
    cmd = [sys.executable, str(ROOT / "bin" / "feed-sim-binance"), "--port", "0", "--symbols", "1",
           "--rate", "10", "--stats-interval", "0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 20
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
        assert port, "no 'listening on' line"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/fapi/v1/exchangeInfo", timeout=5) as r:
            info = json.loads(r.read())
        assert "SYM0000USDT" in [s["symbol"] for s in info["symbols"]]
    finally:
        proc.terminate()
        proc.wait(10)


def test_bad_options_rejected():
    with pytest.raises(ValueError):
        BinanceSimulator(symbols=1, streams=["depth"])
    if JULY.exists():
        with pytest.raises(ValueError):
            BinanceSimulator(replay=[JULY], symbols=["CTKUSDT"])
