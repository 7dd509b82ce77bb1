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


async def start_replay_once_connected(sim: SimulatorThread, connections: int, timeout: float = 10.0) -> None:
    """Start the replay as soon as ``connections`` WebSocket connections are open (and subscribed)."""
    deadline = time.monotonic() + timeout
    while sim.stats()["connections_open"] < connections:
        assert time.monotonic() < deadline, "the clients did not connect"
        await asyncio.sleep(0.01)
    sim.call(sim.sim.start_replay)


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

        got_m, got_p, rest = run(main(), timeout=60)
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
    final = max(f["data"]["E"] for f in frames) - 1000
    open_minute = final - final % 60_000
    n_closes = sum(len(range(min(f["data"]["T"] - f["data"]["T"] % 60_000 for f in frames
                                 if f["data"]["e"] == "aggTrade" and f["data"]["s"] == s), open_minute, 60_000))
                   for s in symbols)
    with SimulatorThread(replay=[APRIL], speed=0, replay_wait=60) as sim:

        async def main():
            client, bm = make_client(sim)
            sock = fast_exit(bm.futures_multiplex_socket(streams.split("/"), category="market"))
            async with sock:
                await start_replay_once_connected(sim, 1)
                got = await collect(sock, lambda g: sum(1 for m in g if m["data"]["k"]["x"]) >= n_closes,
                                    timeout=30)
                deadline = time.monotonic() + 30
                while not sim.stats()["replay_finished"] and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            rest = {s: await client.futures_klines(symbol=s, interval="1m") for s in symbols}
            await client.close_connection()
            return got, rest

        got, rest = run(main(), timeout=90)
    assert got, "no kline message derived"
    assert all(m["data"]["sim"] == "derived" for m in got)
    closes = collections.defaultdict(list)
    for m in got:
        k = m["data"]["k"]
        if k["x"]:
            closes[k["s"]].append(k)
    # candles close once the replay clock (latest recorded E) is 1 s past the minute
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


# --------------------------------------------------------------------- replay formats

T0_NS = 1_714_521_600_000_000_000  # 2024-05-01 00:00:00 UTC


def agg_text(a: int, price: str, symbol: str = "BTCUSDT", e_ms: int = 1_714_521_600_100) -> bytes:
    return (f'{{"e":"aggTrade","E":{e_ms},"a":{a},"s":"{symbol}","p":"{price}","q":"0.005",'
            f'"f":{a * 2},"l":{a * 2 + 1},"T":{e_ms - 1},"m":true}}').encode()


def book_text(u: int, symbol: str = "BTCUSDT") -> bytes:
    return (f'{{"e":"bookTicker","u":{u},"s":"{symbol}","b":"60000.10","B":"1.250","a":"60000.20",'
            f'"A":"0.800","T":1714521600200,"E":1714521600201}}').encode()


RAW_EVENTS = [
    agg_text(100, "60000.10"),
    book_text(7),
    (b'{"e":"kline","E":1714521600300,"s":"BTCUSDT","k":{"t":1714521600000,"T":1714521659999,"s":"BTCUSDT",'
     b'"i":"1m","f":200,"L":201,"o":"60000.10","c":"60000.10","h":"60000.10","l":"60000.10","v":"0.005",'
     b'"n":2,"x":false,"q":"300.0005","V":"0.005","Q":"300.0005","B":"0"}}'),
    (b'{"e":"depthUpdate","E":1714521600400,"T":1714521600399,"s":"BTCUSDT","U":10,"u":12,"pu":9,'
     b'"b":[["60000.00","1.000"]],"a":[["60000.30","0.500"]]}'),
    (b'{"e":"markPriceUpdate","E":1714521601000,"s":"BTCUSDT","p":"60000.15000000","i":"60001.00000000",'
     b'"P":"60002.00000000","r":"0.00010000","T":1714550400000}'),
    (b'{"e":"forceOrder","E":1714521601100,"o":{"s":"ETHUSDT","S":"SELL","o":"LIMIT","f":"IOC","q":"0.100",'
     b'"p":"3000.00","ap":"3000.10","X":"FILLED","l":"0.100","z":"0.100","T":1714521601099}}'),
]
RAW_STREAMS = ["btcusdt@aggTrade", "btcusdt@bookTicker", "btcusdt@kline_1m", "btcusdt@depth",
               "btcusdt@markPrice", "ethusdt@forceOrder"]
COMBINED = b'{"stream":"ethusdt@aggTrade","data":' + agg_text(5, "3000.25", "ETHUSDT") + b"}"


def ns_recording() -> tuple[bytes, list[float]]:
    """A ``<recv ns> <frame>`` recording: six raw events, one combined frame, and lines that are no frames."""
    lines, stamps = [], []
    for i, ev in enumerate(RAW_EVENTS + [COMBINED]):
        ns = T0_NS + i * 1_500_000  # 1.5 ms apart
        stamps.append(ns / 1e9)
        lines.append(b"%d %s" % (ns, ev))
    lines.insert(3, b"%d {\"result\":null,\"id\":1}" % T0_NS)                     # a subscription reply
    lines.insert(5, b"%d {\"e\":\"ACCOUNT_UPDATE\",\"E\":1,\"a\":{}}" % T0_NS)  # no market stream
    lines.insert(6, b"")
    lines.append(b"%d {not json" % (T0_NS + 10**9))
    return b"\n".join(lines) + b"\n", stamps


def frames_recording() -> bytes:
    """A ``*.frames`` recording (``<recv s>: <frame>``) with a depth snapshot REST line."""
    return b"\n".join([
        b"wss://fstream.binance.com/stream?streams=btcusdt@aggTrade/btcusdt@bookTicker <-> 1714521600",
        b'1714521600.101: {"stream":"btcusdt@aggTrade","data":' + agg_text(100, "60000.10") + b"}",
        b'1714521600.202: {"stream":"btcusdt@bookTicker","data":' + book_text(7) + b"}",
        b'1714521600.303: {"stream":"btcusdt@aggTrade","data":' + agg_text(101, "60000.2") + b"}",
    ]) + b"\n"


def item_view(rec) -> list[tuple]:
    return [(it.ts, it.stream, it.symbol, it.body, it.data_raw, it.rest_path) for it in rec.items]


def test_replay_reads_receive_time_prefixed_raw_and_combined_frames(tmp_path):
    from feeds.sim.binance_replay import Recording
    text, stamps = ns_recording()
    path = tmp_path / "btcusdt.ns"
    path.write_bytes(text)
    rec = Recording.load(path)
    assert [it.stream for it in rec.frames] == RAW_STREAMS + ["ethusdt@aggTrade"]
    assert [it.ts for it in rec.frames] == stamps                     # seconds from the ns receive times
    assert rec.frames[-1].ts - rec.frames[0].ts == pytest.approx(0.009, abs=1e-6)
    # raw events: the data is the recorded text, byte for byte, wrapped as Binance combines it
    for it, raw, name in zip(rec.frames, RAW_EVENTS, RAW_STREAMS):
        assert it.data_raw == raw
        assert it.body == b'{"stream":"' + name.encode() + b'","data":' + raw + b"}"
        assert it.data == orjson.loads(raw)
    # a combined frame is kept as recorded
    assert rec.frames[-1].body == COMBINED and rec.frames[-1].data_raw == agg_text(5, "3000.25", "ETHUSDT")
    assert rec.symbols == {"BTCUSDT", "ETHUSDT"} and rec.kline_symbols == {"BTCUSDT"}
    assert rec.price_scale == {"BTCUSDT": 2, "ETHUSDT": 2} and rec.qty_scale["BTCUSDT"] == 3
    assert rec.skipped == 3 and rec.unknown_events == {"ACCOUNT_UPDATE"}
    # a timestamp too small for nanoseconds is read by its magnitude (milliseconds here)
    ms = tmp_path / "ms.ns"
    ms.write_bytes(b"1714521600100 " + RAW_EVENTS[0] + b"\n")
    assert Recording.load(ms).frames[0].ts == pytest.approx(1_714_521_600.1)


def test_replay_reads_gzip_in_both_formats(tmp_path):
    import gzip

    from feeds.sim.binance_replay import Recording
    ns_text, _ = ns_recording()
    for name, text in (("a.ns", ns_text), ("b.frames", frames_recording())):
        plain = tmp_path / name
        plain.write_bytes(text)
        gz = tmp_path / (name + ".gz")
        gz.write_bytes(gzip.compress(text))
        hidden = tmp_path / ("gzip-" + name)                          # gzip whatever the file is called
        hidden.write_bytes(gzip.compress(text))
        want = Recording.load(plain)
        assert want.frame_count >= 3
        for other in (gz, hidden):
            got = Recording.load(other)
            assert item_view(got) == item_view(want) and got.skipped == want.skipped, other
    assert [it.ts for it in Recording.load(tmp_path / "b.frames.gz").items] == [1714521600.101, 1714521600.202,
                                                                                1714521600.303]


def test_replay_gzip_rest_sibling_truncation_and_empty(tmp_path, caplog):
    import gzip

    from feeds.sim.binance_replay import Recording
    (tmp_path / "s.frames.gz").write_bytes(gzip.compress(frames_recording()))
    (tmp_path / "s.rest").write_bytes(
        b"https://fapi.binance.com/fapi/v1/depth?symbol=BTCUSDT&limit=5 -> 1714521600.150: "
        b'{"lastUpdateId":11,"E":1714521600149,"T":1714521600148,"bids":[["60000.00","1.000"]],'
        b'"asks":[["60000.30","0.500"]]}\n')
    rec = Recording.load(tmp_path / "s.frames.gz")
    assert [(it.rest_path, it.symbol) for it in rec.items if it.rest_path] == [("/fapi/v1/depth", "BTCUSDT")]
    assert [it.ts for it in rec.items][:3] == [1714521600.101, 1714521600.150, 1714521600.202]
    # a gzip file cut short: the frames before the cut are read, with a warning
    lines = [b"%d %s" % (T0_NS + i * 1000, agg_text(1000 + i, f"{60000 + i * 7 % 97}.{i % 89:02d}"))
             for i in range(3000)]
    packed = gzip.compress(b"\n".join(lines) + b"\n")
    cut = tmp_path / "cut.ns.gz"
    cut.write_bytes(packed[: len(packed) // 2])
    with caplog.at_level("WARNING", logger="feeds.sim.binance_replay"):
        rec = Recording.load(cut)
    assert 0 < rec.frame_count < 3000
    assert [it.data["a"] for it in rec.frames] == list(range(1000, 1000 + rec.frame_count))
    assert "gzip data ends early" in caplog.text
    # no frame at all
    empty = tmp_path / "empty.ns.gz"
    empty.write_bytes(gzip.compress(b"%d {\"result\":null,\"id\":1}\n" % T0_NS))
    with pytest.raises(ValueError, match="no frames"):
        Recording.load(empty)


def test_replay_of_raw_events_serves_them_verbatim_on_their_streams(tmp_path):
    import gzip
    events = [agg_text(100 + i, f"60000.{i}0") for i in range(3)] + [book_text(7), book_text(8)]
    path = tmp_path / "raw.ns.gz"
    path.write_bytes(gzip.compress(b"".join(b"%d %s\n" % (T0_NS + i, ev) for i, ev in enumerate(events))))
    with SimulatorThread(replay=[path], speed=0, replay_wait=60) as sim:

        async def main():
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(sim.ws_url + "market/stream?streams=btcusdt@aggTrade") as comb, \
                        s.ws_connect(sim.ws_url + "public/ws/btcusdt@bookTicker") as raw:
                    # the replay starts once every recorded stream has a subscriber
                    combined = [(await comb.receive(timeout=10)).data.encode() for _ in range(3)]
                    plain = [(await raw.receive(timeout=10)).data.encode() for _ in range(2)]
            return combined, plain

        combined, plain = run(main())
        stats = sim.stats()
    assert combined == [b'{"stream":"btcusdt@aggTrade","data":' + ev + b"}" for ev in events[:3]]
    assert plain == events[3:]
    assert stats["replayed_frames"] == 5 and stats["replay_finished"] is True


def test_replay_is_paced_by_the_receive_times(tmp_path):
    """Frames 1 ms apart go together; one received an hour later waits for its time (scaled by speed)."""
    stamps = [T0_NS, T0_NS + 1_000_000, T0_NS + 3600 * 10**9]
    path = tmp_path / "paced.ns"
    path.write_bytes(b"".join(b"%d %s\n" % (ns, agg_text(100 + i, "60000.10")) for i, ns in enumerate(stamps)))

    def replay(speed: float, wait_for_third: float):
        with SimulatorThread(replay=[path], speed=speed, replay_wait=60) as sim:

            async def main():
                async with aiohttp.ClientSession() as s:
                    async with s.ws_connect(sim.ws_url + "market/ws/btcusdt@aggTrade") as ws:
                        first = [orjson.loads((await ws.receive(timeout=10)).data)["a"] for _ in range(2)]
                        try:
                            third = orjson.loads((await ws.receive(timeout=wait_for_third)).data)["a"]
                        except asyncio.TimeoutError:
                            third = None
                return first, third

            return run(main(), timeout=60), sim.stats()["replay_finished"]

    # at the recorded pace the third frame is an hour away: not sent while the first two are
    (first, third), finished = replay(1.0, 0.5)
    assert first == [100, 101] and third is None and not finished
    # 14400 times faster the hour takes 0.25 s; as fast as possible it follows at once
    for speed in (14_400.0, 0.0):
        (first, third), finished = replay(speed, 30)
        assert (first, third, finished) == ([100, 101], 102, True), speed


# --------------------------------------------------------------------- REST limits


def in_one_weight_minute(scenario):
    """Run ``scenario()`` until one run falls inside one wall-clock minute
    (the simulator counts request weight per minute, as Binance does)."""
    for _ in range(3):
        minute = int(time.time() // 60)
        result = scenario()
        if int(time.time() // 60) == minute:
            return result
    pytest.fail("three runs in a row crossed a minute boundary")


def test_rest_bad_params_and_weight_limit_429():
    errors, too_many, headers, body = in_one_weight_minute(weight_limit_scenario)
    assert errors["missing"] == (400, -1102)
    assert errors["invalid"] == (400, -1121)
    assert errors["limit"] == (400, -1130)
    assert too_many == (429, -1003)
    assert int(headers["Retry-After"]) in range(1, 61)
    assert headers["X-MBX-USED-WEIGHT-1M"] == "60"
    assert body["rest_429"] == 1


def weight_limit_scenario():
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
    return errors, too_many, headers, body


def test_rest_weight_header_on_every_reply():
    def scenario():
        with SimulatorThread(symbols=["BTCUSDT"], streams=["aggTrade"], rate=50, seed=1) as sim:
            deadline = time.monotonic() + 10
            while sim.stats()["generated_events"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)          # a trade, so that there is a candle
            s1, h1, _ = get(sim, "/fapi/v1/ping")
            before = int(time.time() * 1000)
            s2, h2, t = get(sim, "/fapi/v1/time")
            after = int(time.time() * 1000)
            s3, h3, kl = get(sim, "/fapi/v1/klines?symbol=BTCUSDT&interval=1m&limit=100")
        return (s1, s2, s3), [int(h["X-MBX-USED-WEIGHT-1M"]) for h in (h1, h2, h3)], (before, t, after), kl

    statuses, used, (before, t, after), kl = in_one_weight_minute(scenario)
    assert statuses == (200, 200, 200)
    # ping 1, time 1, klines with limit 100 -> 2
    assert used == [1, 2, 4]
    assert before <= t["serverTime"] <= after     # the server's clock, read while the request was open
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
                back = await collect(m, lambda g: any("data" in x for x in g), timeout=20)
                total = sim.stats()["connections_total"]
            await client.close_connection()
            return err, open_after, still, back, total

        err, open_after, still, back, total = run(main(), timeout=60)
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
    """Frames made during a stall are withheld, never sent; other streams go on; the end of the stall resumes."""
    with SimulatorThread(symbols=1, streams=["aggTrade", "bookTicker"], rate=400, seed=5) as sim:

        def stall(stream: str | None, seconds: float):
            """Stall (or end a stall) and return, at that instant: the last aggTrade id and bookTicker
            update id made, and the withheld counters."""
            s = sim.sim
            if stream is None:
                s.fault_stall_all(seconds)
            else:
                s.fault_stall(stream, seconds)
            g = s._gen[0]
            withheld = {n: v["withheld"] for n, v in s.stats()["streams"].items()}
            return g.next_a - 1, g.u, withheld

        async def main():
            async with aiohttp.ClientSession() as session:
                url = sim.ws_url + "stream?streams=sym0000usdt@aggTrade/sym0000usdt@bookTicker"
                async with session.ws_connect(url) as ws:

                    async def frame(timeout: float = 10.0):
                        msg = orjson.loads((await ws.receive(timeout=timeout)).data)
                        return msg["stream"].split("@", 1)[1], msg["data"]

                    for _ in range(10):
                        await frame()
                    # 1. aggTrade stalled: bookTicker goes on
                    last_a, _, _ = sim.call(stall, "sym0000usdt@aggTrade", 3600.0)
                    during = []
                    while sum(k == "bookTicker" for k, _ in during) < 50:
                        during.append(await frame())
                    _, _, held = sim.call(stall, "sym0000usdt@aggTrade", 0.0)     # the stall ends
                    after = []
                    while not any(k == "aggTrade" and d["a"] > last_a for k, d in after):
                        after.append(await frame())
                    # 2. everything stalled: what was on its way arrives, nothing made later
                    last_a2, last_u2, held0 = sim.call(stall, None, 3600.0)
                    drained = []
                    while True:
                        try:
                            drained.append(await frame(timeout=0.3))
                        except asyncio.TimeoutError:
                            break
                    deadline = time.monotonic() + 10
                    while True:             # frames keep being made (and withheld) meanwhile
                        held2 = sim.stats()["streams"]
                        if all(held2[n]["withheld"] > held0[n] for n in held0) or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.01)
                    sim.call(stall, None, 0.0)
                    resumed = await frame()
            return last_a, during, held, after, (last_a2, last_u2, held0), drained, held2, resumed

        last_a, during, held, after, (last_a2, last_u2, held0), drained, held2, resumed = run(main())
    # 1. no aggTrade made during the stall was sent; the first one after it follows the withheld ones
    assert all(d["a"] <= last_a for k, d in during if k == "aggTrade")
    assert held["sym0000usdt@aggTrade"] > 0 and held["sym0000usdt@bookTicker"] == 0
    first_new = next(d["a"] for k, d in after if k == "aggTrade" and d["a"] > last_a)
    assert first_new == last_a + held["sym0000usdt@aggTrade"] + 1
    # 2. stall_all: only frames made before it, while both streams' frames were withheld
    assert all((d["a"] <= last_a2) if k == "aggTrade" else (d["u"] <= last_u2) for k, d in drained)
    assert all(held2[n]["withheld"] > held0[n] for n in held0)
    kind, data = resumed
    assert (data["a"] > last_a2) if kind == "aggTrade" else (data["u"] > last_u2)


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
                    kinds, reason = [], None
                    while True:
                        msg = await ws.receive(timeout=30)
                        kinds.append(msg.type)
                        if msg.type == aiohttp.WSMsgType.PING:
                            await ws.pong(msg.data)
                        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                            reason = msg.extra
                            break
                    out["age"] = (reason, ws.close_code, kinds)
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

        out = run(main(), timeout=60)
    assert out["too_many"] == 400
    reason, code, kinds = out["age"]
    assert code == 1001 and reason == "connection age limit"
    # pinged (and answered) while open, then closed for its age
    assert kinds[0] == aiohttp.WSMsgType.PING and kinds[-1] == aiohttp.WSMsgType.CLOSE
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
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not (
                        len(got) > 3000 and {"markPrice@1s", "ticker", "kline_1m"} <= seen):
                    msg = await asyncio.wait_for(sock.recv(), 5)
                    got.append(msg)
                    seen.add(msg["stream"].split("@", 1)[1])
            last_rest = await client.futures_aggregate_trades(symbol="SYM0001USDT", limit=3)
            await client.close_connection()
            return got, last_rest

        got, last_rest = run(main(), timeout=60)
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
            before = int(time.time() * 1000)
            client = await SimClient.create()  # pings /api/v3/ping, reads /api/v3/time
            took_ms = int(time.time() * 1000) - before
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
            return (client.timestamp_offset, took_ms), pong, raw, msg, combined

        (offset, took_ms), pong, raw, reply, combined = run(main())
    # server time minus local time after the answer: the same clock, read during the call
    assert -took_ms <= offset <= 0 and pong == {}
    assert raw["e"] == "aggTrade" and "stream" not in raw
    assert reply == {"result": None, "id": 7}
    assert combined["stream"] == "sym0000usdt@aggTrade" and combined["data"]["a"] > raw["a"]


def test_generator_fixed_rate_and_history_without_subscribers():
    """At a fixed rate the generator runs with nobody connected: every event unsent, every trade in
    the REST history.  (How close it keeps to the rate: bench/sim_binance_generator_rate.py.)"""
    with SimulatorThread(symbols=2, streams=["aggTrade"], rate=200, seed=10) as sim:
        deadline = time.monotonic() + 20
        while sim.stats()["generated_events"] < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = sim.stats()
        _, _, trades = get(sim, "/fapi/v1/aggTrades?symbol=SYM0000USDT&limit=1000")
    assert stats["generated_events"] >= 60 and stats["sent_total"] == 0
    assert stats["unsent_total"] == stats["generated_events"]
    ids = [t["a"] for t in trades]
    assert len(ids) >= 1 and ids == list(range(ids[0], ids[0] + len(ids)))
    assert set(stats["streams"]) == {"sym0000usdt@aggTrade", "sym0001usdt@aggTrade"}


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
