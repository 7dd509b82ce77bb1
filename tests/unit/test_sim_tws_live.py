"""Live market data of the TWS API simulator, read by the real ib_async 2.1.0 client."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from decimal import Decimal

import pytest
from ib_async import IB, Index, Stock

from feeds.sim.tws import TwsSimulator, TwsSimulatorThread
from feeds.sim.tws_data import BarStore, LiveRates, bar_trades, builtin_contract
from feeds.sim.tws_live import ERROR_TEXTS, FARM_TEXTS, MAX_TICK_BY_TICK
from tws_session import connected_client, reached, running_simulator

AAPL = Stock("AAPL", "SMART", "USD")
MSFT = Stock("MSFT", "SMART", "USD")
IBM = Stock("IBM", "SMART", "USD")
SPX = Index("SPX", "CBOE", "USD")


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def fast_clock(speed: float):
    """A clock running ``speed`` times faster than real time from now."""
    t0, m0 = time.time(), time.monotonic()
    return lambda: t0 + (time.monotonic() - m0) * speed


def simulator(**kw):
    kw.setdefault("pacing_scale", 0.001)
    kw.setdefault("generate", ("AAPL", "MSFT", "IBM", "SPX"))
    kw.setdefault("live_rate", 600)
    return running_simulator(**kw)


class Recorder:
    """Every tick ib_async hands out: ``(symbol, tickType, price, size)`` and
    tick-by-tick objects, plus errors ``(reqId, code, text)``."""

    def __init__(self, ib: IB) -> None:
        self.ticks: list[tuple[str, int, float, float]] = []
        self.tbt: list[tuple[str, object]] = []
        self.errors: list[tuple[int, int, str]] = []
        ib.pendingTickersEvent += self.on_tickers
        ib.errorEvent += lambda req_id, code, text, contract: self.errors.append((req_id, code, text))

    def on_tickers(self, tickers) -> None:
        for t in tickers:
            for tk in t.ticks:
                self.ticks.append((t.contract.symbol, tk.tickType, tk.price, tk.size))
            for tk in t.tickByTicks:
                self.tbt.append((t.contract.symbol, tk))

    def of(self, symbol: str, tick_type: int) -> list[tuple[float, float]]:
        return [(p, s) for sym, tt, p, s in self.ticks if sym == symbol and tt == tick_type]

    def codes(self) -> list[int]:
        return [c for _, c, _ in self.errors]


def client(sim: TwsSimulator, client_id: int = 1):
    return connected_client(sim, client_id, Recorder)


def until(pred, timeout: float = 10.0):
    return reached(pred, timeout, 0.01)


def sent(sim, symbol: str, kind: str = "trade", req_id: int | None = None) -> list[dict]:
    return [d for d in sim.sent_ticks() if d["symbol"] == symbol and d["kind"] == kind
            and (req_id is None or d["req_id"] == req_id)]


def subs_of(sim, what: str = "mktData") -> int:
    return sim.stats()["live"]["subscriptions"][what]


async def settle(sim, rec: Recorder, symbol: str, tick_type: int, kind: str = "trade"):
    """Wait until ib_async has received every tick the simulator sent."""
    await until(lambda: len(rec.of(symbol, tick_type)) == len(sent(sim, symbol, kind)))


async def market_data(ib: IB, contract, generic_ticks: str):
    """``contract`` qualified and its market data requested: ``(qualified contract, ticker)``."""
    (qualified,) = await ib.qualifyContractsAsync(contract)
    return qualified, ib.reqMktData(qualified, generic_ticks)


async def cancel_and_settle(ib: IB, sim, rec: Recorder, contract, tick_type: int, kind: str = "trade"):
    """Cancel the market data of ``contract``, wait until the simulator holds no subscription,
    then until ib_async has received every tick of ``contract`` the simulator sent."""
    ib.cancelMktData(contract)
    await until(lambda: subs_of(sim) == 0)
    await settle(sim, rec, contract.symbol, tick_type, kind)


# ------------------------------------------------------------ trades from bars


@pytest.mark.parametrize("rate", [1, 2, 3, 4, 7, 60, 2400])
def test_bar_trades_hit_open_high_low_close_volume_and_count(rate):
    store = BarStore()
    store.set_live(LiveRates(rate))
    for sym in ("AAPL", "SPX"):
        spec = builtin_contract(sym)
        bars = store.day_bars(spec, dt.date(2026, 11, 27), "TRADES", False)  # day after Thanksgiving
        assert len(bars) == 1440            # live mode: every minute of the day
        for bar in bars[::97]:
            mt = bar_trades(spec, bar)
            prices = [Decimal(p) for p in mt.texts]
            assert len(mt) == bar.count == rate
            assert mt.texts[0] == bar.open and mt.texts[-1] == bar.close
            assert max(prices) == Decimal(bar.high) and min(prices) == Decimal(bar.low)
            assert sum(mt.sizes) == int(bar.volume)
            assert mt.times_ms == sorted(set(mt.times_ms))
            assert all(bar.t * 1000 <= t < bar.t * 1000 + 60_000 for t in mt.times_ms)
            if sym == "SPX":
                assert set(mt.sizes) == {0} and bar.volume == "0"
            else:
                assert all(s >= 1 for s in mt.sizes)
                assert all(Decimal(b) <= p <= Decimal(a) for b, a, p in zip(mt.bids, mt.asks, prices))
            assert bar_trades(spec, bar) == mt     # deterministic


def test_live_bars_rth_is_the_session_part_of_use_rth_0():
    store = BarStore()
    store.set_live(LiveRates(30))
    spec = builtin_contract("MSFT")
    day = dt.date(2026, 11, 27)                # early close 13:00
    full = {b.t: b for b in store.day_bars(spec, day, "TRADES", False)}
    rth = store.day_bars(spec, day, "TRADES", True)
    assert len(rth) == 210 and all(full[b.t] == b for b in rth)
    assert store.day_bars(spec, dt.date(2026, 11, 26), "TRADES", True) == []   # Thanksgiving
    assert len(store.day_bars(spec, dt.date(2026, 11, 26), "TRADES", False)) == 1440


def test_rate_change_applies_from_the_next_minute():
    rates = LiveRates(10)
    rates.set_from(600, 50)
    assert (rates.at(540), rates.at(600), rates.at(10**9)) == (10, 50, 50)
    with pytest.raises(ValueError):
        LiveRates(0)


# ------------------------------------------------------------- reqMktData


def test_mkt_data_stock_ticks_equal_sent_ticks():
    async def main():
        async with simulator() as sim, client(sim) as (ib, rec):
            ib.reqMarketDataType(1)
            aapl, ticker = await market_data(ib, AAPL, "233,293")
            await until(lambda: len(sent(sim, "AAPL")) >= 15)
            assert sim.subscriptions()[1]["mktData"] == {ticker_req(ib, ticker): "AAPL"}
            await cancel_and_settle(ib, sim, rec, aapl, 48)
            trades = sent(sim, "AAPL")
            as_sent = [(float(d["price"]), float(d["size"])) for d in trades]
            assert rec.of("AAPL", 48) == as_sent            # RTVolume
            assert rec.of("AAPL", 4) == as_sent             # last price with size
            quotes = sent(sim, "AAPL", "bid_ask")
            assert rec.of("AAPL", 1) == [(float(d["bid"]), float(d["bid_size"])) for d in quotes]
            assert rec.of("AAPL", 2) == [(float(d["ask"]), float(d["ask_size"])) for d in quotes]
            assert ticker.marketDataType == 1 and ticker.minTick == 0.01 and ticker.halted == 0
            assert ticker.rtTime == dt.datetime.fromtimestamp(trades[-1]["time_ms"] / 1000, dt.timezone.utc)
            assert ticker.volume > 0 and ticker.tradeCount == len(trades)
            times = [d["time_ms"] for d in trades]
            assert times == sorted(times) and all(d["market_data_type"] == 1 for d in trades)
            assert rec.errors == [e for e in rec.errors if e[1] in (2104, 2106, 2158)]

    run(main())


def ticker_req(ib: IB, ticker) -> int:
    return ib.wrapper.ticker2ReqId["mktData"][ticker]


def test_index_sends_last_price_only():
    async def main():
        async with simulator() as sim, client(sim) as (ib, rec):
            spx, _ = await market_data(ib, SPX, "233")
            await until(lambda: len(sent(sim, "SPX", "index")) >= 10)
            await cancel_and_settle(ib, sim, rec, spx, 4, "index")
            assert {tt for sym, tt, _, _ in rec.ticks if sym == "SPX"} == {4}
            assert rec.of("SPX", 4) == [(float(d["price"]), 0.0) for d in sent(sim, "SPX", "index")]
            assert not sent(sim, "SPX", "trade") and not sent(sim, "SPX", "bid_ask")

    run(main())


def test_live_trades_equal_the_history_bar_of_their_minute():
    async def main():
        # 30x clock: a simulated minute passes in two seconds
        async with simulator(live_rate=40, clock=fast_clock(30.0)) as sim, client(sim) as (ib, rec):
            msft, _ = await market_data(ib, MSFT, "233")
            first = (int(sim.now()) // 60 + 1) * 60            # first minute seen whole
            await until(lambda: sim.now() > first + 125, timeout=20)
            await cancel_and_settle(ib, sim, rec, msft, 48)
            bars = await ib.reqHistoricalDataAsync(msft, "", "600 S", "1 min", "TRADES", False, 2)
            by_t = {int(b.date.timestamp()): b for b in bars}
            trades = sent(sim, "MSFT")
            for m in (first, first + 60):
                mine = [d for d in trades if m * 1000 <= d["time_ms"] < (m + 60) * 1000]
                bar = by_t[m]
                prices = [Decimal(d["price"]) for d in mine]
                assert len(mine) == bar.barCount == 40
                assert (float(prices[0]), float(max(prices)), float(min(prices)), float(prices[-1])) == \
                    (bar.open, bar.high, bar.low, bar.close)
                assert sum(d["size"] for d in mine) == bar.volume
            # what ib_async received is what was sent
            assert rec.of("MSFT", 48) == [(float(d["price"]), float(d["size"])) for d in trades]

    run(main())


def test_market_data_type_request_is_read_and_live_data_wins():
    async def main():
        async with simulator() as sim, client(sim) as (ib, rec):
            ib.reqMarketDataType(3)
            aapl, ticker = await market_data(ib, AAPL, "")
            await until(lambda: ticker.marketDataType == 1 and ticker.last == ticker.last and ticker.last > 0)
            assert sim.stats()["requests"]["reqMarketDataType"] == 1

    run(main())


# ------------------------------------------------------------- errors


@pytest.mark.parametrize("code", [354, 10089, 10168, 10197, 200])
def test_injected_refusal_for_one_contract_others_keep_ticking(code):
    async def main():
        async with simulator() as sim, client(sim) as (ib, rec):
            aapl, msft = await ib.qualifyContractsAsync(AAPL, MSFT)
            sim.inject_error("AAPL", code)
            t_aapl = ib.reqMktData(aapl, "233")
            ib.reqMktData(msft, "233")
            req = ticker_req(ib, t_aapl)
            await until(lambda: (req, code, ERROR_TEXTS[code]) in rec.errors)
            await until(lambda: len(sent(sim, "MSFT")) >= 5)
            assert sent(sim, "AAPL") == [] and rec.of("AAPL", 48) == []
            assert sim.subscriptions()[1]["mktData"] == {ticker_req(ib, ib.ticker(msft)): "MSFT"}
            sim.clear_error("AAPL")
            ib.cancelMktData(aapl)
            ib.reqMktData(aapl, "233")
            await until(lambda: len(sent(sim, "AAPL")) >= 3)

    run(main())


def test_injected_10167_on_a_live_subscription_continues_delayed():
    async def main():
        async with simulator() as sim, client(sim) as (ib, rec):
            ib.reqMarketDataType(3)
            aapl, ticker = await market_data(ib, AAPL, "233")
            await until(lambda: len(sent(sim, "AAPL")) >= 3)
            sim.inject_error("AAPL", 10167)
            req = ticker_req(ib, ticker)
            await until(lambda: (req, 10167, ERROR_TEXTS[10167]) in rec.errors)
            await until(lambda: ticker.marketDataType == 3)
            await until(lambda: any(d["market_data_type"] == 3 for d in sent(sim, "AAPL")))
            ib.cancelMktData(aapl)
            await until(lambda: subs_of(sim) == 0)
            delayed = [d for d in sent(sim, "AAPL") if d["market_data_type"] == 3]
            await until(lambda: len(rec.of("AAPL", 68)) == len(delayed))
            assert rec.of("AAPL", 68) == [(float(d["price"]), float(d["size"])) for d in delayed]
            assert len(rec.of("AAPL", 66)) == len(delayed) and len(rec.of("AAPL", 67)) == len(delayed)
            # no RTVolume on delayed data: only the live trades had one
            assert len(rec.of("AAPL", 48)) == len(sent(sim, "AAPL")) - len(delayed)
            # a new request while the error stands is delayed from the start
            t2 = ib.reqMktData(aapl, "")
            await until(lambda: t2.marketDataType == 3 and rec.codes().count(10167) == 2)

    run(main())


def test_injected_10090_keeps_quotes_and_last_without_rtvolume():
    async def main():
        async with simulator() as sim, client(sim) as (ib, rec):
            (ibm,) = await ib.qualifyContractsAsync(IBM)
            sim.inject_error("IBM", 10090)
            ib.reqMktData(ibm, "233")
            await until(lambda: len(sent(sim, "IBM")) >= 5)
            await cancel_and_settle(ib, sim, rec, ibm, 4)
            assert 10090 in rec.codes() and rec.of("IBM", 48) == []
            assert all(d["rt_volume"] is False for d in sent(sim, "IBM"))

    run(main())


def test_unknown_and_unsubscribed_contracts():
    async def main():
        async with simulator(unsubscribed=["IBM"]) as sim, client(sim) as (ib, rec):
            ibm, t = await market_data(ib, IBM, "")
            await until(lambda: 354 in rec.codes())
            bogus = Stock("NOPE", "SMART", "USD", conId=123)
            ib.reqMktData(bogus, "")
            await until(lambda: 200 in rec.codes())
            assert subs_of(sim) == 0 and t.marketDataType == 1

    run(main())


# ---------------------------------------------------------- tick-by-tick


def test_tick_by_tick_values_and_ibs_limit():
    assert MAX_TICK_BY_TICK == 3

    async def main():
        async with simulator() as sim, client(sim) as (ib, rec):
            aapl, msft, ibm = await ib.qualifyContractsAsync(AAPL, MSFT, IBM)
            ib.reqTickByTickData(aapl, "AllLast")
            ib.reqTickByTickData(msft, "BidAsk")
            ib.reqTickByTickData(ibm, "Last")
            fourth = ib.reqTickByTickData(aapl, "BidAsk")
            req = ib.wrapper.ticker2ReqId["BidAsk"][fourth]
            await until(lambda: (req, 10190, ERROR_TEXTS[10190]) in rec.errors)
            assert sim.stats()["live"]["tbt_limit_refusals"] == 1
            await until(lambda: len(sent(sim, "AAPL", "tbt_last")) >= 5 and len(sent(sim, "MSFT", "tbt_bidask")) >= 5)
            for c in (aapl, msft, ibm):
                ib.cancelTickByTickData(c, {"AAPL": "AllLast", "MSFT": "BidAsk", "IBM": "Last"}[c.symbol])
            await until(lambda: subs_of(sim, "tbt") == 0)
            await until(lambda: len([1 for s, _ in rec.tbt if s == "AAPL"]) == len(sent(sim, "AAPL", "tbt_last")))
            got = [(t.price, t.size, t.exchange) for s, t in rec.tbt if s == "AAPL"]
            assert got == [(float(d["price"]), float(d["size"]), "NASDAQ") for d in sent(sim, "AAPL", "tbt_last")]
            await until(lambda: len([1 for s, _ in rec.tbt if s == "MSFT"]) == len(sent(sim, "MSFT", "tbt_bidask")))
            got = [(t.bidPrice, t.askPrice, t.bidSize, t.askSize) for s, t in rec.tbt if s == "MSFT"]
            assert got == [(float(d["bid"]), float(d["ask"]), float(d["bid_size"]), float(d["ask_size"]))
                           for d in sent(sim, "MSFT", "tbt_bidask")]
            # a line is free again
            ib.reqTickByTickData(aapl, "BidAsk")
            await until(lambda: subs_of(sim, "tbt") == 1)

    run(main())


def test_tick_by_tick_limit_is_configurable_and_counts_every_connection():
    async def main():
        async with simulator(max_tick_by_tick=1) as sim, client(sim, 1) as (ib1, rec1), client(sim, 2) as (ib2, rec2):
            (a1,) = await ib1.qualifyContractsAsync(AAPL)
            (m2,) = await ib2.qualifyContractsAsync(MSFT)
            ib1.reqTickByTickData(a1, "AllLast")
            await until(lambda: subs_of(sim, "tbt") == 1)
            ib2.reqTickByTickData(m2, "AllLast")
            await until(lambda: 10190 in rec2.codes())
            assert 10190 not in rec1.codes()

    run(main())


# ------------------------------------------------------------ real-time bars


def test_real_time_bars_aggregate_the_sent_trades():
    async def main():
        async with simulator(live_rate=120, clock=fast_clock(10.0)) as sim, client(sim) as (ib, rec):
            aapl, _ = await market_data(ib, AAPL, "233")
            bars = ib.reqRealTimeBars(aapl, 5, "TRADES", False)
            await until(lambda: len(bars) >= 4)
            ib.cancelRealTimeBars(bars)
            ib.cancelMktData(aapl)
            await until(lambda: subs_of(sim) == 0 and subs_of(sim, "rtbars") == 0)
            trades = sent(sim, "AAPL")
            for b in list(bars)[1:]:        # the first may start before the mktData subscription
                t = int(b.time.timestamp()) * 1000
                mine = [d for d in trades if t <= d["time_ms"] < t + 5000]
                prices = [float(d["price"]) for d in mine]
                assert b.count == len(mine) > 0
                assert (b.open_, b.high, b.low, b.close) == (prices[0], max(prices), min(prices), prices[-1])
                assert b.volume == sum(d["size"] for d in mine)

    run(main())


# ------------------------------------------------------------ silence, farms, resets


def test_silence_keeps_subscription_and_resubscribe_ends_it():
    async def main():
        async with simulator() as sim, client(sim) as (ib, rec):
            aapl, msft = await ib.qualifyContractsAsync(AAPL, MSFT)
            ib.reqMktData(aapl, "233")
            ib.reqMktData(msft, "233")
            await until(lambda: len(sent(sim, "AAPL")) >= 2)
            sim.silence("AAPL", 3600)
            n_aapl, n_msft = len(sent(sim, "AAPL")), len(sent(sim, "MSFT"))
            await until(lambda: len(sent(sim, "MSFT")) >= n_msft + 10)
            assert len(sent(sim, "AAPL")) <= n_aapl + 1      # at most a batch already on its way
            assert sim.stats()["live"]["ticks_silenced"] > 0
            assert sorted(sim.subscriptions()[1]["mktData"].values()) == ["AAPL", "MSFT"]
            ib.cancelMktData(aapl)
            ib.reqMktData(aapl, "233")
            await until(lambda: len(sent(sim, "AAPL")) >= n_aapl + 5)
            assert sim.stats()["live"]["resubscriptions"] == 1
            assert sim.stats()["live"]["resubscriptions_by_symbol"] == {"AAPL": 1}

    run(main())


def test_farm_messages_with_ibs_texts_and_2103_stops_ticks():
    async def main():
        async with simulator() as sim, client(sim) as (ib, rec):
            (aapl,) = await ib.qualifyContractsAsync(AAPL)
            for code in (2103, 2105, 2107, 2108, 2157, 2106, 2158):
                assert sim.farm_message(code) == 1
            ib.reqMktData(aapl, "")
            await until(lambda: all((-1, c, FARM_TEXTS[c]) in rec.errors for c in (2103, 2105, 2107, 2108, 2157)))
            await until(lambda: sim.stats()["live"]["ticks_offline"] >= 3)
            assert sent(sim, "AAPL") == []
            sim.farm_message(2104)
            await until(lambda: len(sent(sim, "AAPL")) >= 3)
            with pytest.raises(ValueError):
                sim.farm_message(9999)

    run(main())


@pytest.mark.parametrize("data_lost", [True, False])
def test_nightly_reset(data_lost):
    async def main():
        async with simulator() as sim, client(sim) as (ib, rec):
            aapl, _ = await market_data(ib, AAPL, "233")
            await until(lambda: len(sent(sim, "AAPL")) >= 2)
            sim.nightly_reset(gap=0.5, data_lost=data_lost)
            back = 1101 if data_lost else 1102
            await until(lambda: back in rec.codes())
            codes = [c for c in rec.codes() if c in (2103, 2105, 1100, 1101, 1102, 2104, 2106)]
            assert codes[-6:] == [2103, 2105, 1100, back, 2104, 2106]
            n = len(sent(sim, "AAPL"))
            if data_lost:
                assert subs_of(sim) == 0
                await asyncio.sleep(0.3)
                assert len(sent(sim, "AAPL")) == n
                ib.cancelMktData(aapl)
                ib.reqMktData(aapl, "233")
            else:
                assert subs_of(sim) == 1
            await until(lambda: len(sent(sim, "AAPL")) >= n + 3)
            assert sim.stats()["live"]["nightly_resets"] == 1

    run(main())


def test_nightly_reset_with_disconnect_refuses_until_the_gap_is_over():
    async def main():
        async with simulator() as sim:
            async with client(sim) as (ib, rec):
                sim.nightly_reset(gap=1.0, disconnect=True)
                await until(lambda: not ib.isConnected())
                assert 1100 in rec.codes()
            ib2 = IB()
            with pytest.raises((ConnectionError, OSError, asyncio.TimeoutError, TimeoutError)):
                await ib2.connectAsync("127.0.0.1", sim.port, clientId=5, timeout=0.5)
            ib2.disconnect()
            await asyncio.sleep(1.0)
            async with client(sim, 6) as (ib3, rec3):
                assert ib3.isConnected()
            st = sim.stats()
            assert st["live"]["refused_during_reset"] >= 1 and st["connections"]["forced_disconnects"] == 1

    run(main())


def test_connectivity_loss_data_lost_drops_live_subscriptions():
    async def main():
        async with simulator() as sim, client(sim) as (ib, rec):
            aapl, _ = await market_data(ib, AAPL, "")
            await until(lambda: subs_of(sim) == 1)
            sim.connectivity_loss(0.2, data_lost=True)
            await until(lambda: 1101 in rec.codes())
            assert subs_of(sim) == 0

    run(main())


def test_disconnect_all_ends_subscriptions():
    async def main():
        async with simulator() as sim, client(sim) as (ib, rec):
            aapl, _ = await market_data(ib, AAPL, "")
            ib.reqTickByTickData(aapl, "AllLast")
            await until(lambda: subs_of(sim) == 1 and subs_of(sim, "tbt") == 1)
            assert sim.disconnect_all() == 1
            await until(lambda: not ib.isConnected())
            await until(lambda: subs_of(sim) == 0 and subs_of(sim, "tbt") == 0)

    run(main())


# ------------------------------------------------------------ thread runner, recording


def test_thread_runner_controls_with_blocking_client():
    with TwsSimulatorThread(pacing_scale=0.001, generate=("AAPL", "MSFT")) as sim:
        assert sim.live(300) == 300
        ib = IB()
        ib.connect("127.0.0.1", sim.port, clientId=9, timeout=5)
        try:
            (aapl,) = ib.qualifyContracts(AAPL)
            ticker = ib.reqMktData(aapl, "233")
            deadline = time.monotonic() + 10
            while len([d for d in sim.sent_ticks() if d["kind"] == "trade"]) < 3 and time.monotonic() < deadline:
                ib.sleep(0.05)
            assert ticker.last > 0
            subs = sim.subscriptions()
            assert list(subs.values())[0]["mktData"] == {ticker_req(ib, ticker): "AAPL"}
            sim.inject_error("MSFT", 10197)
            sim.clear_error()
            sim.silence("AAPL", 0.01)
            assert sim.farm_message(2108) == 1
            assert sim.stats()["live"]["rate"] == 300
        finally:
            ib.disconnect()


def test_record_counts_only():
    async def main():
        async with simulator(record_ticks="count") as sim, client(sim) as (ib, rec):
            aapl, _ = await market_data(ib, AAPL, "233")
            await until(lambda: sim.stats()["live"]["trades_sent"] >= 5)
            assert sim.sent_ticks() == []
            assert sim.stats()["live"]["quotes_sent"] == sim.stats()["live"]["trades_sent"]

    run(main())


def test_live_off_sends_no_ticks_until_switched_on():
    async def main():
        async with simulator(live_rate=None) as sim, client(sim) as (ib, rec):
            aapl, ticker = await market_data(ib, AAPL, "")
            await until(lambda: ticker.marketDataType == 1)
            await asyncio.sleep(0.2)
            assert sent(sim, "AAPL") == []
            sim.live(600)
            await until(lambda: len(sent(sim, "AAPL")) >= 2)

    run(main())


# ------------------------------------------------------------ snapshots, partial bars, rate changes


def test_snapshot_gives_the_quote_and_last_trade_in_force():
    async def main():
        async with simulator() as sim, client(sim) as (ib, rec):
            aapl, spx = await ib.qualifyContractsAsync(AAPL, SPX)
            t_aapl, t_spx = await ib.reqTickersAsync(aapl, spx)
            assert t_aapl.bid < t_aapl.ask and t_aapl.last > 0 and t_aapl.lastSize > 0
            assert t_spx.last > 0
            assert sim.stats()["live"]["snapshots"] == 2 and subs_of(sim) == 0
            assert sim.sent_ticks() == []

    run(main())


def test_history_bar_of_the_minute_in_progress_has_the_trades_so_far():
    noon = dt.datetime(2026, 11, 30, 17, 0, 30, 500_000, tzinfo=dt.timezone.utc).timestamp()

    async def main():
        async with simulator(live_rate=50, clock=lambda: noon) as sim, client(sim) as (ib, rec):
            (aapl,) = await ib.qualifyContractsAsync(AAPL)
            bars = await ib.reqHistoricalDataAsync(aapl, "", "180 S", "1 min", "TRADES", False, 2)
            assert [int(b.date.timestamp()) for b in bars] == [int(noon) - 150, int(noon) - 90, int(noon) - 30]
            spec = sim.contracts["AAPL"]
            mt = sim.live_engine.minute(spec, int(noon) - 30)
            k = sum(1 for t in mt.times_ms if t <= noon * 1000)
            prices = [Decimal(p) for p in mt.texts[:k]]
            last = bars[-1]
            assert 0 < k < 50 and last.barCount == k
            assert (last.open, last.high, last.low, last.close, last.volume) == (
                float(prices[0]), float(max(prices)), float(min(prices)), float(prices[-1]), sum(mt.sizes[:k]))
            assert bars[0].barCount == bars[1].barCount == 50

    run(main())


def test_rate_change_at_runtime_sets_bar_count_from_the_next_minute():
    noon = dt.datetime(2026, 11, 30, 17, 0, 30, tzinfo=dt.timezone.utc).timestamp()

    async def main():
        async with simulator(live_rate=10, clock=lambda: noon) as sim:
            assert sim.live(25) == 25
            spec = sim.contracts["MSFT"]
            bars = {b.t: b for b in sim.store.day_bars(spec, dt.date(2026, 11, 30), "TRADES", False)}
            m = int(noon) - 30
            assert (bars[m - 60].count, bars[m].count, bars[m + 60].count, bars[m + 3600].count) == (10, 10, 25, 25)
            assert sim.stats()["live"]["rate"] == 25

    run(main())


def test_rt_trade_volume_generic_375():
    async def main():
        async with simulator() as sim, client(sim) as (ib, rec):
            aapl, _ = await market_data(ib, AAPL, "375")
            await until(lambda: len(sent(sim, "AAPL")) >= 3)
            await cancel_and_settle(ib, sim, rec, aapl, 77)
            assert rec.of("AAPL", 77) == [(float(d["price"]), float(d["size"])) for d in sent(sim, "AAPL")]
            assert rec.of("AAPL", 48) == []

    run(main())
