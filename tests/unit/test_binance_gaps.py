"""Gap logic of the collector with a stand-in REST: aggTrade ids and closed klines."""
import asyncio
import time

import pytest

from collector_stubs import Notifier, Sink
from feeds.binance import adapter as A
from feeds.binance.collector import BinanceCollector, Settings
from feeds.binance.rest import WeightLimiter, kline_weight
from feeds.health import Health


class FakeRest:
    def __init__(self, trades=None, klines=None):
        self.trades = trades or []
        self.klines_data = klines or []
        self.calls = []
        self.limiter = WeightLimiter(1200)

    async def agg_trades(self, symbol, from_id, limit=1000):
        self.calls.append(("aggTrades", symbol, from_id))
        return [t for t in self.trades if t["a"] >= from_id][:limit]

    async def klines(self, symbol, interval, start, end, limit=1500):
        self.calls.append(("klines", symbol, start, end))
        return [k for k in self.klines_data if start <= k[0] <= end][:limit]


def make(rest):
    c = BinanceCollector(Settings(symbols=["BTCUSDT"]), Sink(), Health(unit="u", notifier=Notifier()))
    c.plan(["BTCUSDT"])
    c.rest = rest
    return c


def agg(a, t=1_700_000_000_000):
    return {"e": "aggTrade", "E": t, "a": a, "s": "BTCUSDT", "p": "1.5", "q": "2", "f": a, "l": a, "T": t, "m": False}


def run(c, coro_fn):
    async def main():
        c._stop = asyncio.Event()
        await coro_fn()
        await asyncio.gather(*list(c._tasks))
    asyncio.run(main())


def test_agg_id_jump_is_filled_from_rest_and_duplicates_skipped():
    rest = FakeRest(trades=[{k: v for k, v in agg(a).items() if k not in ("e", "E", "s")} for a in range(1, 30)])
    c = make(rest)

    async def go():
        for a in (1, 2, 3, 10, 11, 11, 4):        # 4..9 missing; 11 twice; 4 late (older): skipped
            c.handle({"stream": "btcusdt@aggTrade", "data": agg(a)})
        assert c.gaps_open == {("BTCUSDT", 4)}    # open until its fill has ended
    run(c, go)
    assert not c.gaps_open
    ids = sorted(r[1] for r in c.sink.rows["binance_agg_trade"])
    assert ids == list(range(1, 12))
    assert c.counters["gaps"] == 1 and c.counters["gap_trades_filled"] == 6
    assert c.counters["duplicates_skipped"] == 2
    assert rest.calls == [("aggTrades", "BTCUSDT", 4)]


def kmsg(t, closed, e=None):
    return {"stream": "btcusdt@kline_1m", "data": {"e": "kline", "E": e or t + 1000, "s": "BTCUSDT", "k": {
        "t": t, "T": t + 59_999, "s": "BTCUSDT", "i": "1m", "f": 1, "L": 2, "o": "1", "c": "2", "h": "3", "l": "0.5",
        "v": "10", "n": 2, "x": closed, "q": "15", "V": "5", "Q": "7", "B": "0"}}}


def rest_kline(t):
    return [t, "1", "3", "0.5", "2", "10", t + 59_999, "15", 2, "5", "7", "0"]


def test_klines_missed_while_disconnected_are_filled_from_rest():
    m0 = (int(time.time() * 1000) // 60_000 - 10) * 60_000
    rest = FakeRest(klines=[rest_kline(m0 + i * 60_000) for i in range(0, 12)])
    c = make(rest)

    async def go():
        c.handle(kmsg(m0, False))
        c.handle(kmsg(m0, True))                 # closed: stored from the stream
        # ... disconnected for 5 minutes: the next message is for m0 + 6 min
        c.handle(kmsg(m0 + 6 * 60_000, False))
        c.handle(kmsg(m0 + 6 * 60_000, True))
    run(c, go)
    rows = c.sink.rows["binance_kline"]
    opens = sorted(A.text_to_dt(r[2]).timestamp() * 1000 for r in rows)
    assert opens == [m0 + i * 60_000 for i in range(0, 7)]
    assert [r[-1] for r in rows].count("rest") == 5
    assert rest.calls[0][2:] == (m0 + 60_000, m0 + 6 * 60_000 - 1)


def test_weight_limiter_waits_instead_of_exceeding_the_budget(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    slept = []

    async def fake_sleep(s):
        slept.append(s)
        clock[0] += s
    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    lim = WeightLimiter(100)

    async def go():
        for _ in range(5):
            await lim.acquire(20)
        assert slept == [] and lim.used == 100
        await lim.acquire(20)                      # the sixth must wait for the window to roll
        assert len(slept) == 1 and 59 < slept[0] <= 60.1
        lim.penalise(30)                           # after a 429: pause everything
        await lim.acquire(1)
        assert slept[-1] >= 29.9
    asyncio.run(go())


def test_kline_weights_follow_binance_table():
    assert [kline_weight(n) for n in (50, 100, 499, 500, 1000, 1500)] == [1, 2, 2, 5, 5, 10]


def test_reconnect_backoff_is_capped_exponential_with_full_jitter():
    c = make(FakeRest())
    c.s.backoff_base, c.s.backoff_max = 1.0, 60.0
    for attempt in range(12):
        cap = min(60.0, 2.0 ** attempt)
        waits = [c._backoff(attempt) for _ in range(300)]
        assert all(0 <= w <= cap for w in waits)
        assert max(waits) > cap * 0.8 and min(waits) < cap * 0.2      # spread over the whole range
    assert max(c._backoff(30) for _ in range(300)) <= 60.0


def test_exchange_info_refresh_adds_connections_and_retires_delisted(monkeypatch):
    listings = [["AAAUSDT", "BBBUSDT"], ["AAAUSDT", "CCCUSDT", "DDDUSDT"]]

    class Rest(FakeRest):
        async def perpetual_symbols(self, quote_assets=None):
            return listings.pop(0)
    c = BinanceCollector(Settings(symbols=[], max_streams_per_connection=3), Sink(),
                         Health(unit="u", notifier=Notifier()))
    c.rest = Rest()
    started = []

    async def fake_slot(slot):
        started.append(slot)

    monkeypatch.setattr(c, "_run_slot", fake_slot)

    async def go():
        c._stop = asyncio.Event()
        c.symbols = await c.discover_symbols()
        c.slots = c.plan(c.symbols)
        n0 = len(c.slots)
        added, removed = await c.refresh_symbols()
        await asyncio.gather(*c._slot_tasks)
        assert added == ["CCCUSDT", "DDDUSDT"] and removed == ["BBBUSDT"]
        assert c.symbols == ["AAAUSDT", "CCCUSDT", "DDDUSDT"]
        assert len(started) == len(c.slots) - n0 > 0
        assert [s.index for s in c.slots] == list(range(len(c.slots)))
        new_streams = {n for s in started for n in s.streams}
        assert "cccusdt@aggTrade" in new_streams and "dddusdt@bookTicker" in new_streams
        assert all(r.retired for r in c.routes.values() if r.symbol == "BBBUSDT")
        assert not any(r.retired for r in c.routes.values() if r.symbol != "BBBUSDT")
    asyncio.run(go())


# ---------------------------------------------------------------- implausible input

def book(u, e=1_700_000_000_000, **kw):
    d = {"e": "bookTicker", "u": u, "s": "BTCUSDT", "b": "1.5", "B": "2", "a": "1.6", "A": "3", "T": e, "E": e}
    d.update(kw)
    return {"stream": "btcusdt@bookTicker", "data": d}


def stored(c, table, col=1):
    return [r[col] for r in c.sink.rows.get(table, [])]


def test_far_ahead_book_ticker_ids_do_not_make_later_messages_duplicates():
    """u = 2**63 (beyond bigint) and u + 10**12, before any state and in mid-stream."""
    c = make(FakeRest())
    u = 600_859_600_576
    ids = [2 ** 63, u + 10 ** 12] + list(range(u, u + 5)) + [u + 5 + 10 ** 12] + list(range(u + 5, u + 10))
    for x in ids:
        c.handle({"stream": "btcusdt@bookTicker", "data": book(x)["data"]})
    assert stored(c, "binance_book_ticker") == list(range(u, u + 10))
    assert c.counters["duplicates_skipped"] == 0
    assert c.health.malformed == 3
    assert c.last_book["BTCUSDT"] == u + 9


def test_far_ahead_agg_trade_id_is_not_state_not_a_gap_and_not_stored():
    rest = FakeRest()
    c = make(rest)

    async def go():
        for a in [1, 2, 3, 10 ** 12 + 4, 4, 5, 6, 2 ** 63]:
            c.handle({"stream": "btcusdt@aggTrade", "data": agg(a)})
    run(c, go)
    assert stored(c, "binance_agg_trade") == [1, 2, 3, 4, 5, 6]
    assert c.counters["gaps"] == 0 and rest.calls == []
    assert c.counters["duplicates_skipped"] == 0 and c.health.malformed == 2


def test_genuine_agg_trade_jump_is_accepted_when_confirmed_and_its_gap_filled():
    j = 3_000_000                                    # beyond max_id_jump (1,000,000): a long disconnect
    rest = FakeRest(trades=[{k: v for k, v in agg(a).items() if k not in ("e", "E", "s")}
                            for a in range(j - 10, j)])
    c = make(rest)
    c.s.gap_fill_max_trades = 10

    async def go():
        for a in [1, 2, 3, j, j + 1, j + 2, j + 3]:
            c.handle({"stream": "btcusdt@aggTrade", "data": agg(a)})
    run(c, go)
    ids = stored(c, "binance_agg_trade")
    assert ids[:3] == [1, 2, 3] and [a for a in ids if a >= j] == [j, j + 1, j + 2, j + 3]
    assert c.counters["id_jumps_accepted"] == 1 and c.counters["gaps"] == 1
    assert rest.calls == [("aggTrades", "BTCUSDT", j - 10)]       # the newest gap_fill_max_trades
    assert c.health.malformed == 0


@pytest.mark.parametrize("bad", [
    {"E": 0}, {"E": 10 ** 15}, {"T": 10 ** 15}, {"p": "-1.5"}, {"p": "1e400"}, {"p": "9" * 100},
    {"p": "\u0661.\u0665"}, {"q": "-1"}, {"s": "ETHUSDT"},
])
def test_out_of_range_agg_trade_is_malformed_and_leaves_no_state(bad):
    c = make(FakeRest())
    c.handle({"stream": "btcusdt@aggTrade", "data": dict(agg(10 ** 12), **bad)})
    assert c.health.malformed == 1 and c.sink.rows == {} and not c.agg_ids.pending and not c.last_agg
    for a in (1, 2, 3, 4):
        c.handle({"stream": "btcusdt@aggTrade", "data": agg(a)})
    assert stored(c, "binance_agg_trade") == [1, 2, 3, 4] and c.counters["duplicates_skipped"] == 0


def test_kline_with_wrong_types_or_far_future_is_malformed_and_handle_does_not_raise():
    m0 = (int(time.time() * 1000) // 60_000 - 3) * 60_000
    rest = FakeRest(klines=[rest_kline(m0 + i * 60_000) for i in range(3)])
    c = make(rest)

    async def go():
        for change in ({"s": ["BTCUSDT"]}, {"i": ["1m"]}, {"s": {"x": 1}}, {"t": 4102444800000},
                       {"t": 10 ** 15}, {"x": "true"}):
            msg = kmsg(m0, True)
            msg["data"]["k"].update(change)
            c.handle(msg)                                # never raises out of handle()
        far = kmsg(4102444800000, True, e=4102444800000 + 1000)      # 2100-01-01, closed
        c.handle(far)
        c.handle(kmsg(m0, True))
        c.handle(kmsg(m0 + 60_000, True))
    run(c, go)
    assert c.health.malformed == 7
    opens = sorted(A.text_to_dt(r[2]).timestamp() * 1000 for r in c.sink.rows["binance_kline"])
    assert opens == [m0, m0 + 60_000] and c.counters["duplicates_skipped"] == 0
    assert rest.calls == []


def test_frame_decoding_and_count_malformed_of_the_runtime_health():
    """Messages are recorded with StreamHealth.seen and bad input with Health.count_malformed."""
    from feeds.binance import wire

    class SH:
        def __init__(self):
            self.count, self.last, self.window_count = 0, 0.0, 0

        def seen(self):
            self.count += 1
            self.last = time.monotonic()

    class H:
        def __init__(self):
            self.calls, self.streams, self.malformed = [], {}, 0

        def stream(self, name):
            return self.streams.setdefault(name, SH())

        def count_malformed(self, where, reason):
            self.calls.append((where, reason))
            self.malformed += 1
            return self.malformed

    h = H()
    c = BinanceCollector(Settings(symbols=["BTCUSDT"]), Sink(), h)
    c.plan(["BTCUSDT"])
    c.handle(wire.Frame('{"stream":"btcusdt@bookTicker","data":{"e":"bookTicker","u":5'))   # cut short
    c.handle(wire.Frame(b'{"stream":"btcusdt@bookTicker","data":' + repr(book(2 ** 63)["data"]).replace(
        "'", '"').encode() + b"}"))
    assert [w for w, _ in h.calls] == ["frame", "btcusdt@bookTicker"] and "2**63-1" in h.calls[1][1]
    assert h.streams["btcusdt@bookTicker"].count == 1


def test_runtime_interface_kind_figures_periodic():
    c = make(FakeRest())
    assert c.stream_kind("btcusdt@aggTrade") == "aggTrade" and c.stream_kind("btcusdt@kline_1m") == "kline"
    assert c.stream_kind("nope") == "?"
    c.handle(book(7))                                 # the first id of a symbol: held for confirmation
    f = c.figures()
    assert f["ids_held"] == 1 and f["duplicates_skipped"] == 0 and "gaps" in f and "rest_weight_1m" in f
    c.s.id_adopt_lone_after = 0.0
    c.book_ids.adopt_lone_after = 0.0
    c.periodic()                                      # nothing contradicted it: stored
    assert stored(c, "binance_book_ticker") == [7] and c.figures()["ids_held"] == 0


def test_rest_retry_after_and_weight_header_stay_in_range():
    from feeds.binance.rest import retry_after, used_weight
    assert [retry_after(v) for v in ("30", "0", "-5", "1e400", "nan", "inf", None, "Wed, 21 Oct 2015 07:28:00 GMT",
                                     "86400")] == [30.0, 1.0, 1.0, 60.0, 60.0, 60.0, 60.0, 60.0, 600.0]
    assert [used_weight(v) for v in ("1200", "\u0661\u0662", "-1", "9" * 30, None, "")] == [1200, None, None, None,
                                                                                             None, None]


def test_exchange_info_symbols_that_cannot_be_stream_names_are_skipped():
    from feeds.binance.rest import BinanceRest

    async def go():
        r = BinanceRest("http://127.0.0.1:1")
        try:
            async def info():
                return {"symbols": [
                    {"symbol": "BTCUSDT", "contractType": "PERPETUAL", "status": "TRADING", "quoteAsset": "USDT"},
                    {"symbol": "BAD/USDT", "contractType": "PERPETUAL", "status": "TRADING", "quoteAsset": "USDT"},
                    {"symbol": ["X"], "contractType": "PERPETUAL", "status": "TRADING", "quoteAsset": "USDT"},
                    {"symbol": "\u5e01\u5b89USDT", "contractType": "PERPETUAL", "status": "TRADING",
                     "quoteAsset": "USDT"},
                    "not an object"]}
            r.exchange_info = info
            return await r.perpetual_symbols()
        finally:
            await r.close()
    assert asyncio.run(go()) == ["BTCUSDT", "\u5e01\u5b89USDT"]


def test_held_first_ids_are_stored_at_stop_and_unconfirmed_outliers_are_counted():
    """A stop ends the wait of a symbol's first, not yet confirmed ids: they are
    stored; a far-ahead id that contradicts an accepted state is counted, not stored."""
    c = make(FakeRest())
    u = 600_859_600_576
    c.handle({"stream": "btcusdt@bookTicker", "data": book(u)["data"]})     # first id: held
    assert stored(c, "binance_book_ticker") == []
    c._settle_held_at_stop()
    assert stored(c, "binance_book_ticker") == [u]
    for x in (u + 1, u + 2, u + 1 + 10 ** 12):                               # the last one is held
        c.handle({"stream": "btcusdt@bookTicker", "data": book(x)["data"]})
    before = c.health.malformed
    c._settle_held_at_stop()
    assert stored(c, "binance_book_ticker") == [u, u + 1, u + 2]
    assert c.health.malformed == before + 1


class Notes:
    def __init__(self):
        self.sent = []

    def notify(self, m):
        self.sent.append(m)


def test_under_the_runtime_status_lines_figures_and_periodic_replace_a_stale_connection():
    """feeds.service supervises the collector: per-stream messages reach Health, the
    status line groups them by kind, periodic() replaces the connection of a stream
    gone silent, the figures reach Health, and the stop is clean."""
    from feeds import service
    notes = Notes()
    svc = service.Service("feed-binance-unit.service", "", status_interval=0.05, notifier=notes)
    svc.watchdog_interval = 0.01
    s = Settings(symbols=["BTCUSDT"], streams=["bookTicker"], connect_stagger=0.0)
    s.stale_after = {"bookTicker": 0.2}
    replaced = []

    def prepare(svc):
        c = BinanceCollector(s, Sink(), svc.health)

        async def fake_slot(slot):
            slot.opened_at = time.monotonic() - 10.0          # past the grace after opening
            for u in (1, 2, 3):
                c.handle(book(u))
            try:
                await asyncio.wait_for(slot.replace.wait(), 30)
                replaced.append(slot.replace_reason)
            finally:
                svc.stop.set()
        c._run_slot = fake_slot
        made.append(c)
        return c
    made = []
    assert svc.run(prepare) == 0
    c = made[0]
    assert replaced == ["stream btcusdt@bookTicker stale"] and c.counters["stale"] == 1
    assert svc.health.stream("btcusdt@bookTicker").count == 3
    assert stored(c, "binance_book_ticker") == [1, 2, 3]
    assert any(m.startswith("STATUS=bookTicker ") for m in notes.sent)
    assert svc.health.figures["stale"] == 1 and "READY=1" in notes.sent


def test_waiting_for_exchange_info_stays_the_status_until_collecting():
    notes = Notes()
    c = BinanceCollector(Settings(symbols=[]), Sink(), Health(unit="u", notifier=notes))
    c._wait_status("waiting for exchangeInfo: connection refused")
    c.health.status_line(c.stream_kind)               # the runtime's status line (no streams yet)
    c.periodic()
    assert c.health.last_status == "waiting for exchangeInfo: connection refused"
    assert notes.sent[-1] == "STATUS=waiting for exchangeInfo: connection refused"
