"""Gap logic of the collector with a stand-in REST: aggTrade ids and closed klines."""
import asyncio
import time

from feeds.binance import adapter as A
from feeds.binance.collector import BinanceCollector, Settings
from feeds.binance.rest import WeightLimiter, kline_weight
from feeds.health import Health


class Sink:
    def __init__(self):
        self.rows = {}

    def add(self, t, r):
        self.rows.setdefault(t, []).append(r)

    def add_many(self, t, rs):
        self.rows.setdefault(t, []).extend(rs)

    def flush(self, timeout=0):
        return True


class N:
    def notify(self, m):
        pass


class FakeRest:
    def __init__(self, trades=None, klines=None):
        self.trades = trades or []
        self.klines_data = klines or []
        self.calls = []

    async def agg_trades(self, symbol, from_id, limit=1000):
        self.calls.append(("aggTrades", symbol, from_id))
        return [t for t in self.trades if t["a"] >= from_id][:limit]

    async def klines(self, symbol, interval, start, end, limit=1500):
        self.calls.append(("klines", symbol, start, end))
        return [k for k in self.klines_data if start <= k[0] <= end][:limit]


def make(rest):
    c = BinanceCollector(Settings(symbols=["BTCUSDT"]), Sink(), Health(unit="u", notifier=N()))
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
    run(c, go)
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
    c = BinanceCollector(Settings(symbols=[], max_streams_per_connection=3), Sink(), Health(unit="u", notifier=N()))
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
