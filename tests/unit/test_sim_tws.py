"""The TWS API simulator, driven by the real ib_async 2.1.0 client over loopback."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import os
import re
import struct
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from ib_async import IB, Contract, Index, Stock

from feeds.sim.tws import (
    TXT_1100,
    TXT_1102,
    TXT_2174,
    TXT_CANCELLED,
    TXT_DUP_CLIENT,
    TXT_NO_SECDEF,
    TXT_NOT_SUBSCRIBED,
    TXT_PACING,
    TXT_TIME_LENGTH,
    TwsSimulator,
    TwsSimulatorThread,
)
from feeds.sim.tws_data import BarStore, builtin_contract
from feeds.sim.tws_pacing import HistoricalPacer
from tws_session import connected_client, reached, running_simulator

DATA = Path(os.environ.get("FEEDS_SHARED_DATA") or Path(__file__).resolve().parents[2] / ".." / "shared" / "data")
SPX_CSV = DATA / "ib" / "spx-1min-2019-11-05..08.csv"
needs_spx = pytest.mark.skipif(not SPX_CSV.is_file(), reason=f"shared IB recording not found at {SPX_CSV}")

ET = ZoneInfo("US/Eastern")
SPX = Index("SPX", "CBOE", "USD")
AAPL = Stock("AAPL", "SMART", "USD")
OLD_HEAD = {"AAPL": dt.datetime(2015, 1, 2, 9, 30, tzinfo=ET), "MSFT": dt.datetime(2015, 1, 2, 9, 30, tzinfo=ET)}
NO_DATA = "Historical Market Data Service error message:HMDS query returned no data: "


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def simulator(**kw):
    kw.setdefault("pacing_scale", 0.001)
    kw.setdefault("head_timestamps", OLD_HEAD)
    if SPX_CSV.is_file():
        kw.setdefault("csv_files", {"SPX": SPX_CSV})
    else:  # SPX still known (generated bars) so contract tests run
        kw.setdefault("generate", ("AAPL", "MSFT", "SPX"))
    return running_simulator(**kw)


def errors_of(ib: IB) -> list[tuple[int, int, str]]:
    """Every error ib_async reports: ``(reqId, code, text)``."""
    errors: list[tuple[int, int, str]] = []
    ib.errorEvent += lambda req_id, code, text, contract: errors.append((req_id, code, text))
    return errors


def client(sim: TwsSimulator, client_id: int = 1):
    return connected_client(sim, client_id, errors_of)


def until(pred, timeout: float = 5.0):
    return reached(pred, timeout, 0.005)


def csv_rows(day: str, first: str = "09:30:00", last: str = "15:59:00") -> list[dict]:
    with open(SPX_CSV, newline="") as fh:
        return [r for r in csv.DictReader(fh)
                if r["Date"].startswith(day) and first <= r["Date"][11:] <= last]


def assert_valid(bars):
    for b in bars:
        assert b.high >= max(b.open, b.close) and b.low <= min(b.open, b.close), b
        assert b.low > 0, b


# ---------------------------------------------------------------- connect


def test_connect_current_time_and_disconnect():
    async def main():
        async with simulator() as sim:
            async with client(sim, client_id=11) as (ib, errors):
                assert ib.isConnected()
                assert ib.client.serverVersion() == 178
                assert ib.managedAccounts() == ["DU1234567"]
                before = int(time.time())
                now = await asyncio.wait_for(ib.reqCurrentTimeAsync(), 5)
                after = time.time()
                assert before <= now.timestamp() <= after    # the server's clock (whole seconds), read meanwhile
                assert {c for _, c, _ in errors} >= {2104, 2106, 2158}
                st = sim.stats()
                assert st["client_ids_seen"] == [11]
                assert st["connections"]["active"] == 1
                for name in ("startApi", "reqPositions", "reqOpenOrders", "reqCompletedOrders",
                             "reqAccountUpdates", "reqAccountUpdatesMulti", "reqExecutions", "reqCurrentTime"):
                    assert st["requests"][name] == 1, name
            await until(lambda: sim.stats()["connections"]["active"] == 0)
            assert sim.stats()["connections"]["accepted"] == 1

    run(main())


def test_thread_runner_with_blocking_client():
    with TwsSimulatorThread(pacing_scale=0.001) as sim:
        ib = IB()
        ib.connect("127.0.0.1", sim.port, clientId=3, timeout=5)
        try:
            assert ib.isConnected()
            details = ib.reqContractDetails(AAPL)
            assert details[0].contract.conId == 265598
        finally:
            ib.disconnect()
        assert sim.stats()["client_ids_seen"] == [3]
        assert sim.stats()["requests"]["reqContractDetails"] == 1


def test_duplicate_client_id_refused_with_326():
    async def main():
        async with simulator() as sim:
            async with client(sim, client_id=5):
                ib2 = IB()
                errors = []
                ib2.errorEvent += lambda r, c, t, k: errors.append((r, c, t))
                with pytest.raises((asyncio.TimeoutError, ConnectionError)):
                    await ib2.connectAsync("127.0.0.1", sim.port, clientId=5, timeout=1)
                assert (-1, 326, TXT_DUP_CLIENT) in errors
                assert sim.stats()["connections"]["refused_duplicate_client_id"] == 1
                async with client(sim, client_id=6) as (ib3, _):  # another id is fine
                    assert ib3.isConnected()

    run(main())


# --------------------------------------------------------------- contracts


def test_contract_details_spx_and_aapl():
    async def main():
        async with simulator() as sim, client(sim) as (ib, _):
            (spx,) = await ib.reqContractDetailsAsync(Index("SPX", "CBOE", "USD"))
            assert (spx.contract.conId, spx.contract.secType, spx.contract.exchange) == (416904, "IND", "CBOE")
            assert spx.contract.currency == "USD" and spx.timeZoneId == "US/Eastern"
            assert spx.minTick == 0.01
            days = spx.tradingHours.split(";")
            assert len(days) == 7 and all(re.fullmatch(r"\d{8}:(CLOSED|\d{4}-\d{8}:\d{4})", d) for d in days)
            assert any(d.endswith(":1600") or d.endswith(":1300") for d in days)

            (aapl,) = await ib.reqContractDetailsAsync(Stock("AAPL", "SMART", "USD", primaryExchange="NASDAQ"))
            c = aapl.contract
            assert (c.conId, c.symbol, c.secType, c.exchange, c.primaryExchange) == (265598, "AAPL", "STK", "SMART", "NASDAQ")
            assert aapl.timeZoneId == "US/Eastern" and aapl.minTick == 0.01
            assert "ISLAND" in aapl.validExchanges.split(",")
            assert ":0400-" in aapl.tradingHours and ":0930-" in aapl.liquidHours
            (isl,) = await ib.reqContractDetailsAsync(Stock("AAPL", "ISLAND", "USD"))
            assert isl.contract.exchange == "ISLAND"
            (by_id,) = await ib.reqContractDetailsAsync(Contract(conId=265598))
            assert by_id.contract.symbol == "AAPL"
            assert await ib.qualifyContractsAsync(Stock("MSFT", "SMART", "USD")) != [None]

    run(main())


def test_unknown_contract_gets_error_200():
    async def main():
        async with simulator(unknown=["MSFT"]) as sim, client(sim) as (ib, errors):
            for contract in (Stock("NOPE", "SMART", "USD"), Stock("MSFT", "SMART", "USD"),
                             Stock("AAPL", "SMART", "EUR"), Index("AAPL", "CBOE", "USD")):
                errors.clear()
                assert await ib.reqContractDetailsAsync(contract) == []
                assert [(c, t) for _, c, t in errors] == [(200, TXT_NO_SECDEF)]
                assert errors[0][0] >= 0  # the request's reqId
            errors.clear()
            bars = await ib.reqHistoricalDataAsync(Stock("NOPE", "SMART", "USD"), "", "1 D", "1 min", "TRADES", True)
            assert list(bars) == [] and [c for _, c, _ in errors] == [200]
            assert sim.stats()["errors_sent"][200] == 5

    run(main())


# ----------------------------------------------------------- head timestamp


def test_head_timestamp():
    async def main():
        async with simulator(head_timestamps={"AAPL": dt.datetime(2012, 3, 1, 9, 30, tzinfo=ET)}) as sim, \
                client(sim) as (ib, _):
            head = await ib.reqHeadTimeStampAsync(AAPL, "TRADES", True, 2)
            assert head == dt.datetime(2012, 3, 1, 14, 30, tzinfo=dt.timezone.utc)
            head1 = await ib.reqHeadTimeStampAsync(AAPL, "TRADES", True, 1)
            assert head1 == dt.datetime(2012, 3, 1, 14, 30)  # "yyyymmdd-hh:mm:ss", UTC
            # default: the first session two years before today, at the open
            msft = await ib.reqHeadTimeStampAsync(Stock("MSFT", "SMART", "USD"), "TRADES", True, 2)
            two_years = dt.datetime.now(ET).date() - dt.timedelta(days=730)
            assert 0 <= (msft.astimezone(ET).date() - two_years).days < 6
            assert msft.astimezone(ET).time() == dt.time(9, 30)
            if SPX_CSV.is_file():  # recorded contract: first recorded RTH bar
                spx = await ib.reqHeadTimeStampAsync(SPX, "TRADES", True, 2)
                assert spx == dt.datetime(2019, 11, 5, 9, 30, tzinfo=ET)

    run(main())


# ---------------------------------------------------- recorded SPX 1-min bars


@needs_spx
@pytest.mark.parametrize("end", ["20191105 16:00:00 US/Eastern", "20191106 00:00:00 US/Eastern"])
@pytest.mark.parametrize("format_date", [1, 2])
def test_spx_2019_11_05_rth_equals_recording(format_date, end):
    rows = csv_rows("2019-11-05")
    assert len(rows) == 390

    async def main():
        async with simulator() as sim, client(sim) as (ib, errors):
            # the recording has a 16:00 row that IB's useRTH=1 answer does not contain
            bars = await ib.reqHistoricalDataAsync(SPX, end, "1 D", "1 min", "TRADES", True, format_date)
            assert len(bars) == 390, errors
            for bar, row in zip(bars, rows):
                want = dt.datetime.strptime(row["Date"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=ET)
                assert bar.date == want
                if format_date == 1:
                    assert bar.date.tzinfo == ET
                assert (bar.open, bar.high, bar.low, bar.close) == tuple(
                    float(row[k]) for k in ("Open", "High", "Low", "Close"))
                assert bar.volume == float(row["Volume"])
                assert bar.low <= bar.average <= bar.high and bar.barCount > 0
            assert bars[-1].date.astimezone(ET).time() == dt.time(15, 59)
            assert sim.stats()["historical"]["bars_sent"] == 390

    run(main())


@needs_spx
def test_spx_sends_recorded_decimal_text_and_use_rth_0_keeps_1600_row():
    async def main():
        async with simulator() as sim:
            r, w = await raw_session(sim.port)
            contract = [416904, "SPX", "IND", "", "0", "", "", "CBOE", "", "USD", "", ""]
            w.write(msg(20, 7, *contract, 0, "20191105 23:00:00 US/Eastern", "1 min", "1 D", 0, "TRADES", 1, 0, ""))
            f = await read_until(r, lambda f: f[0] == "17")
            n = int(f[4])
            rows = csv_rows("2019-11-05", last="16:00:00")
            assert n == len(rows) == 391
            first = f[5:13]
            assert first[0] == "20191105 09:30:00 US/Eastern"
            assert first[1:6] == [rows[0]["Open"], rows[0]["High"], rows[0]["Low"], rows[0]["Close"], rows[0]["Volume"]]
            last = f[5 + 8 * 390: 5 + 8 * 391]
            assert last[0] == "20191105 16:00:00 US/Eastern"
            w.close()

    run(main())


@needs_spx
def test_end_datetime_forms_agree():
    async def main():
        async with simulator() as sim, client(sim) as (ib, errors):
            et = await ib.reqHistoricalDataAsync(SPX, "20191106 16:00:00 US/Eastern", "1 D", "1 min", "TRADES", True, 2)
            utc = await ib.reqHistoricalDataAsync(SPX, "20191106-21:00:00", "1 D", "1 min", "TRADES", True, 2)
            aware = await ib.reqHistoricalDataAsync(
                SPX, dt.datetime(2019, 11, 6, 16, 0, tzinfo=ET), "1 D", "1 min", "TRADES", True, 2)
            assert not [e for e in errors if e[1] == 2174]
            implied = await ib.reqHistoricalDataAsync(SPX, "20191106 16:00:00", "1 D", "1 min", "TRADES", True, 2)
            assert len(et) == 390 and list(et) == list(utc) == list(aware) == list(implied)
            assert [t for _, c, t in errors if c == 2174] == [TXT_2174]
            two = await ib.reqHistoricalDataAsync(SPX, "20191108 16:00:00 US/Eastern", "2 D", "1 min", "TRADES", True, 2)
            assert len(two) == 780 and two[0].date == dt.datetime(2019, 11, 7, 9, 30, tzinfo=ET)
            sec = await ib.reqHistoricalDataAsync(SPX, "20191108 10:00:00 US/Eastern", "1800 S", "1 min", "TRADES", True, 2)
            assert len(sec) == 30 and sec[-1].date == dt.datetime(2019, 11, 8, 9, 59, tzinfo=ET)

    run(main())


# ----------------------------------------------------------- generated bars


@pytest.mark.parametrize("day,expected", [("20240703", 210), ("20241129", 210), ("20240705", 390)])
def test_generated_sessions(day, expected):
    async def main():
        async with simulator() as sim, client(sim) as (ib, errors):
            bars = await ib.reqHistoricalDataAsync(AAPL, f"{day} 23:59:59 US/Eastern", "1 D", "1 min",
                                                   "TRADES", True, 1)
            assert len(bars) == expected, errors
            assert bars[0].date.time() == dt.time(9, 30)
            assert bars[-1].date.time() == (dt.time(12, 59) if expected == 210 else dt.time(15, 59))
            assert_valid(bars)
            assert all(b.volume >= 0 for b in bars)
            again = await ib.reqHistoricalDataAsync(AAPL, f"{day} 20:00:00 US/Eastern", "1 D", "1 min",
                                                    "TRADES", True, 1)
            assert list(again) == list(bars)  # deterministic per (symbol, date)

    run(main())


def test_generated_holiday_and_weekend_answer_no_data():
    async def main():
        async with simulator() as sim, client(sim) as (ib, errors):
            bars = await ib.reqHistoricalDataAsync(AAPL, "20240704 23:59:59 US/Eastern", "1 D", "1 min",
                                                   "TRADES", True, 1)
            assert list(bars) == []
            assert [(c, t) for _, c, t in errors if c == 162] == [(162, NO_DATA + "AAPL@SMART Trades")]
            # a Sunday end counts back to Friday's session
            sunday = await ib.reqHistoricalDataAsync(AAPL, "20240707 12:00:00 US/Eastern", "1 D", "1 min",
                                                     "TRADES", True, 2)
            assert len(sunday) == 390 and sunday[0].date.astimezone(ET).date() == dt.date(2024, 7, 5)
            assert sim.stats()["historical"]["no_data"] == 1

    run(main())


def test_extended_hours_thin_and_derived_bar_types():
    async def main():
        async with simulator(thin=["MSFT"]) as sim, client(sim) as (ib, _):
            full = await ib.reqHistoricalDataAsync(AAPL, "20240705 20:00:00 US/Eastern", "1 D", "1 min", "TRADES", False, 2)
            assert len(full) == 960 and full[0].date.astimezone(ET).time() == dt.time(4, 0)
            msft = Stock("MSFT", "SMART", "USD")
            thin = await ib.reqHistoricalDataAsync(msft, "20240705 16:00:00 US/Eastern", "1 D", "1 min", "TRADES", True, 2)
            assert 100 < len(thin) < 390  # minutes without trades have no TRADES bar
            assert_valid(thin)
            mid = await ib.reqHistoricalDataAsync(msft, "20240705 16:00:00 US/Eastern", "1 D", "1 min", "MIDPOINT", True, 2)
            assert len(mid) == 390 and all(b.volume == -1 and b.barCount == -1 for b in mid)
            assert_valid(mid)
            ba = await ib.reqHistoricalDataAsync(AAPL, "20240705 16:00:00 US/Eastern", "1 D", "1 min", "BID_ASK", True, 2)
            assert len(ba) == 390 and all(b.average == -1 for b in ba)
            assert_valid(ba)

    run(main())


def test_bar_store_invariants_over_a_month():
    store = BarStore()
    spec = builtin_contract("XYZ", thin=True)
    start = dt.date(2024, 6, 1)
    for i in range(30):
        day = start + dt.timedelta(days=i)
        bars = store.day_bars(spec, day, "TRADES", True)
        if day.weekday() >= 5 or day == dt.date(2024, 6, 19):  # weekend, Juneteenth
            assert len(bars) == 0
        for b in bars:
            o, h, l, c = (float(x) for x in (b.open, b.high, b.low, b.close))
            assert h >= max(o, c) and l <= min(o, c) and l > 0 and int(b.volume) >= 0
            assert l <= float(b.wap) <= h


# ------------------------------------------------------------------ errors


def test_unsubscribed_contract_gets_354():
    async def main():
        async with simulator(unsubscribed=["MSFT"]) as sim, client(sim) as (ib, errors):
            bars = await ib.reqHistoricalDataAsync(Stock("MSFT", "SMART", "USD"), "", "1 D", "1 min", "TRADES", True)
            assert list(bars) == []
            assert [(c, t) for _, c, t in errors if c == 354] == [(354, TXT_NOT_SUBSCRIBED)]

    run(main())


def test_duration_over_one_week_is_refused():
    async def main():
        async with simulator() as sim, client(sim) as (ib, errors):
            bars = await ib.reqHistoricalDataAsync(AAPL, "20240705 16:00:00 US/Eastern", "2 W", "1 min", "TRADES", True)
            assert list(bars) == [] and (162, TXT_TIME_LENGTH) in [(c, t) for _, c, t in errors]
            week = await ib.reqHistoricalDataAsync(AAPL, "20240712 16:00:00 US/Eastern", "1 W", "1 min", "TRADES", True, 2)
            assert len(week) == 5 * 390

    run(main())


def test_cancel_open_request_gets_162_cancelled():
    async def main():
        # the answer would take an hour: the client's 0.1 s timeout cancels it long before
        async with simulator(latency=3600) as sim, client(sim) as (ib, errors):
            bars = await ib.reqHistoricalDataAsync(AAPL, "20240705 16:00:00 US/Eastern", "1 D", "1 min",
                                                   "TRADES", True, timeout=0.1)  # times out, then cancels
            assert list(bars) == []
            await until(lambda: any(c == 162 for _, c, _ in errors), timeout=30)
            (req_id, code, text), = [e for e in errors if e[1] == 162]
            assert text == TXT_CANCELLED.format(req_id=req_id)
            assert text.endswith(f"API historical data query cancelled: {req_id}")
            # the pending answer was dropped with the cancel: nothing open, nothing served
            st = sim.stats()["historical"]
            assert st["cancelled"] == 1 and st["served"] == 0 and st["open"] == 0

    run(main())


def test_pacing_six_identical_requests():
    async def main():
        # the pacer's clock stands still: all six are within 15 s however long they take
        async with simulator(pacing_scale=1.0, pacer_clock=lambda: 1000.0) as sim, client(sim) as (ib, errors):
            results = await asyncio.gather(*[
                ib.reqHistoricalDataAsync(AAPL, "20240705 16:00:00 US/Eastern", "1 D", "1 min", "TRADES", True, 2)
                for _ in range(6)])
            assert sorted(len(r) for r in results) == [0, 0, 0, 0, 0, 390]
            pacing = [t for _, c, t in errors if c == 162]
            assert pacing == [TXT_PACING] * 5
            assert pacing[0] == "Historical Market Data Service error message:Historical data request pacing violation"
            assert sim.stats()["pacing_violations"]["identical_15s"] == 5

    run(main())


def test_pacing_six_requests_same_contract_within_two_seconds_and_recovery():
    now = [1000.0]   # the pacer's clock: moves only when the test moves it

    async def main():
        async with simulator(pacing_scale=0.5, pacer_clock=lambda: now[0]) as sim, \
                client(sim) as (ib, errors):  # 2 s -> 1 s
            ends = [f"2024070{d} 16:00:00 US/Eastern" for d in (1, 2, 3, 5, 8, 9)]
            for end in ends:  # sequential, at one instant of the pacer's clock
                await ib.reqHistoricalDataAsync(AAPL, end, "1 D", "1 min", "TRADES", True, 2)
            assert [t for _, c, t in errors if c == 162] == [TXT_PACING]
            assert sim.stats()["pacing_violations"]["same_contract_2s"] == 1
            now[0] += 0.99
            refused = await ib.reqHistoricalDataAsync(AAPL, ends[-1], "1 D", "1 min", "TRADES", True, 2)
            assert list(refused) == [] and sim.stats()["pacing_violations"]["same_contract_2s"] == 2
            now[0] += 0.02     # the first five requests are now 1.01 s old: out of the 1 s window
            again = await ib.reqHistoricalDataAsync(AAPL, ends[-1], "1 D", "1 min", "TRADES", True, 2)
            assert len(again) == 390

    run(main())


def test_pacer_rules_with_a_fake_clock():
    now = [0.0]
    p = HistoricalPacer(scale=1.0, clock=lambda: now[0])
    for i in range(60):  # 60 distinct contracts, one second apart: allowed
        assert p.check(("id", i), ("c", i)) is None
        now[0] += 1.0
    assert p.check(("id", 60), ("c", 60)) == "max_60_per_10min"
    now[0] = 600.0  # the first request leaves the window
    assert p.check(("id", 61), ("c", 61)) is None
    assert p.check(("id", 62), ("c", 62), weight=2) == "max_60_per_10min"  # BID_ASK counts twice

    q = HistoricalPacer(scale=0.01, clock=lambda: now[0])
    now[0] = 0.0
    assert q.check("a", "k") is None
    assert q.check("a", "k") == "identical_15s"
    now[0] = 0.16
    assert q.check("a", "k") is None  # 15 s * 0.01 passed
    for i in range(4):
        assert q.check(("b", i), "k") is None
    assert q.check(("b", 9), "k") == "same_contract_2s"  # sixth within 0.02 s
    assert q.check(("b", 10), "other") is None
    assert q.check(("b", 11), "k2", open_now=50) == "max_50_open"
    assert q.violations == {"identical_15s": 1, "same_contract_2s": 1, "max_60_per_10min": 0, "max_50_open": 1}


def _ends(n: int) -> list[str]:
    """``n`` distinct endDateTimes (one minute apart) for the pacing tests."""
    start = dt.datetime(2024, 7, 5, 10, 0)
    return [(start + dt.timedelta(minutes=i)).strftime("%Y%m%d %H:%M:%S US/Eastern") for i in range(n)]


def test_pacing_model_strict_through_the_protocol():
    now = [1000.0]

    async def main():
        async with simulator(pacer_clock=lambda: now[0], pacing_scale=1.0, pacing_model="strict") as sim, \
                client(sim) as (ib, errors):
            for end in _ends(61):   # one a second: no burst, no identical request
                await ib.reqHistoricalDataAsync(AAPL, end, "1800 S", "1 min", "TRADES", True, 2)
                now[0] += 1.0
            assert [t for _, c, t in errors if c == 162] == [TXT_PACING]
            st = sim.stats()
            assert st["pacing_violations"] == {"identical_15s": 0, "same_contract_2s": 0,
                                               "max_60_per_10min": 1, "max_50_open": 0}
            assert st["pacing"]["model"] == "strict" and st["pacing"]["refused"] == 1
            plog = sim.pacing_log()
            assert [r["t"] for r in plog] == [1000.0 + i for i in range(61)]
            assert [r["rule"] for r in plog] == [None] * 60 + ["max_60_per_10min"]
            assert {(r["bar_size"], r["contract"], r["what"], r["delay"]) for r in plog} == \
                {("1 min", "AAPL", "TRADES", 0.0)}
            assert sim.pacing_log(since=60) == plog[60:]

    run(main())


def test_pacing_model_documented_through_the_protocol():
    async def main():
        # the pacer's clock stands still: 70 one-minute requests for one contract "at once"
        async with simulator(pacer_clock=lambda: 1000.0, pacing_scale=1.0, pacing_model="documented") as sim, \
                client(sim) as (ib, errors):
            ends = _ends(70)
            results = await asyncio.gather(*[
                ib.reqHistoricalDataAsync(AAPL, end, "1800 S", "1 min", "TRADES", True, 2) for end in ends])
            assert all(len(r) == 30 for r in results)
            assert [c for _, c, _ in errors if c == 162] == []
            again = await ib.reqHistoricalDataAsync(AAPL, ends[0], "1800 S", "1 min", "TRADES", True, 2)
            assert list(again) == [] and [t for _, c, t in errors if c == 162] == [TXT_PACING]
            st = sim.stats()
            assert st["pacing_violations"] == {"identical_15s": 1, "same_contract_2s": 0,
                                               "max_60_per_10min": 0, "max_50_open": 0}
            assert st["pacing"] == {"model": "documented", "requests": 71, "accepted": 70, "refused": 1,
                                    "delayed": 0, "delay_total": 0, "delay_max": 0.0}

    run(main())


def test_pacing_model_throttle_through_the_protocol():
    async def main():
        opts = {"throttle_free": 2, "throttle_step": 0.02, "throttle_limit": 4}
        async with simulator(pacer_clock=lambda: 1000.0, pacing_scale=1.0, pacing_model="throttle",
                             pacing_options=opts) as sim, client(sim) as (ib, errors):
            ends = _ends(6)
            got = [await ib.reqHistoricalDataAsync(AAPL, end, "1800 S", "1 min", "TRADES", True, 2)
                   for end in ends[:5]]
            assert [len(b) for b in got] == [30, 30, 30, 30, 0]          # slowed, then refused
            assert [t for _, c, t in errors if c == 162] == [TXT_PACING]
            plog = sim.pacing_log()
            assert [r["delay"] for r in plog] == pytest.approx([0.0, 0.0, 0.02, 0.04, 0.0])
            assert [r["rule"] for r in plog] == [None] * 4 + ["throttle_rate"]
            assert [r["in_window"] for r in plog] == [0, 1, 2, 3, 4]
            st = sim.stats()
            assert st["pacing_violations"]["throttle_rate"] == 1 and st["historical"]["served"] == 4
            assert st["pacing"]["delayed"] == 2 and st["pacing"]["delay_max"] == pytest.approx(0.04)

        # a throttled answer is held back: the request stays open and can be cancelled meanwhile
        opts = {"throttle_free": 0, "throttle_step": 600.0, "throttle_max_delay": 600.0}
        async with simulator(pacing_model="throttle", pacing_scale=1.0, pacing_options=opts) as sim, \
                client(sim) as (ib, errors):
            held = await ib.reqHistoricalDataAsync(AAPL, ends[0], "1800 S", "1 min", "TRADES", True, 2,
                                                   timeout=0.5)
            assert list(held) == []   # ib_async gave up and sent cancelHistoricalData
            await until(lambda: sim.stats()["historical"]["cancelled"] == 1)
            assert sim.stats()["historical"]["served"] == 0 and sim.pacing_log()[0]["delay"] == 600.0

    run(main())


def test_unknown_pacing_model_or_option_is_refused():
    with pytest.raises(ValueError, match="pacing model"):
        TwsSimulator(pacing_model="lenient")
    with pytest.raises(ValueError, match="throttle_speed"):
        TwsSimulator(pacing_model="throttle", pacing_options={"throttle_speed": 1})


# ------------------------------------------------------------------ faults


def test_disconnect_all_is_seen_by_ib_async():
    async def main():
        async with simulator() as sim, client(sim) as (ib, _):
            gone = asyncio.Event()
            ib.disconnectedEvent += lambda: gone.set()
            assert sim.disconnect_all() == 1
            await asyncio.wait_for(gone.wait(), 5)
            assert not ib.isConnected()
            assert sim.stats()["connections"]["forced_disconnects"] == 1

    run(main())


def test_fail_after_closes_socket_mid_request():
    async def main():
        async with simulator() as sim, client(sim) as (ib, _):
            gone = asyncio.Event()
            ib.disconnectedEvent += lambda: gone.set()
            sim.fail_after(1)
            ok = await ib.reqHistoricalDataAsync(AAPL, "20240705 16:00:00 US/Eastern", "1 D", "1 min", "TRADES", True, 2)
            assert len(ok) == 390
            with pytest.raises(ConnectionError):
                await ib.reqHistoricalDataAsync(AAPL, "20240708 16:00:00 US/Eastern", "1 D", "1 min", "TRADES", True, 2)
            await asyncio.wait_for(gone.wait(), 5)
            assert sim.stats()["historical"]["served"] == 1

    run(main())


def test_connectivity_loss_sends_1100_then_1102():
    async def main():
        async with simulator() as sim, client(sim) as (ib, errors):
            sim.connectivity_loss(gap=0.05)
            await until(lambda: any(c == 1102 for _, c, _ in errors))
            assert [(c, t) for _, c, t in errors if c in (1100, 1102)] == [(1100, TXT_1100), (1102, TXT_1102)]
            assert ib.isConnected()

    run(main())


# ------------------------------------------------------- malformed input


def frame(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def msg(*fields) -> bytes:
    return frame("".join(f"{f}\0" for f in fields).encode())


async def read_msg(r: asyncio.StreamReader) -> list[str]:
    (n,) = struct.unpack(">I", await asyncio.wait_for(r.readexactly(4), 5))
    return (await asyncio.wait_for(r.readexactly(n), 5)).decode().split("\0")[:-1]


async def read_until(r, pred):
    while True:
        f = await read_msg(r)
        if pred(f):
            return f


async def raw_session(port: int, client_id: int = 42):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"API\0" + frame(b"v157..178"))
    version, _conn_time = await read_msg(r)
    assert version == "178"
    w.write(msg(71, 2, client_id, ""))
    await read_until(r, lambda f: f[0] == "9")  # nextValidId
    await read_until(r, lambda f: f[0] == "4" and f[3] == "2158")  # last connect notice
    return r, w


def test_malformed_messages_get_321_and_the_server_keeps_serving():
    async def main():
        async with simulator() as sim:
            r, w = await raw_session(sim.port)
            w.write(msg(20, 9, "too", "few"))  # truncated reqHistoricalData
            f = await read_until(r, lambda f: f[0] == "4")
            assert f[2:4] == ["9", "321"] and f[4].startswith("Error validating request.-'")
            w.write(msg("xyz", 1))  # unreadable message id
            f = await read_until(r, lambda f: f[0] == "4")
            assert f[2:4] == ["-1", "321"]
            w.write(msg(4242, 1, 1))  # a message id this server does not serve
            f = await read_until(r, lambda f: f[0] == "4")
            assert f[3] == "321"
            aapl = [265598, "AAPL", "STK", "", "0", "", "", "SMART", "", "USD", "", ""]
            w.write(msg(20, 10, *aapl, 0, "", "7 mins", "1 D", 1, "TRADES", 1, 0, ""))
            f = await read_until(r, lambda f: f[0] == "4")
            assert f[2:4] == ["10", "321"] and "bar size setting is invalid" in f[4] and "1 min" in f[4]
            w.write(msg(20, 11, *aapl, 0, "2024/07/05", "1 min", "1 D", 1, "TRADES", 1, 0, ""))
            f = await read_until(r, lambda f: f[0] == "4")
            assert f[2:4] == ["11", "321"] and "invalid end date/time" in f[4]
            w.write(msg(20, 12, *aapl, 0, "", "1 min", "1 Q", 1, "TRADES", 1, 0, ""))
            f = await read_until(r, lambda f: f[0] == "4")
            assert f[2:4] == ["12", "321"]
            w.write(msg(20, 13, *aapl, 0, "", "1 min", "1 D", 1, "TRADES", 3, 0, ""))
            f = await read_until(r, lambda f: f[0] == "4")
            assert f[2:4] == ["13", "321"] and "Date formatting selection of 3 rejected" in f[4]
            before = int(time.time())
            w.write(msg(49, 1))  # still served
            f = await read_until(r, lambda f: f[0] == "49")
            assert before <= int(f[2]) <= time.time()
            st = sim.stats()
            assert st["malformed"] == 6 and st["unsupported"] == 1 and st["errors_sent"][321] == 7
            w.close()

    run(main())


def test_bad_handshake_is_closed_and_counted():
    async def main():
        async with simulator() as sim:
            r, w = await asyncio.open_connection("127.0.0.1", sim.port)
            w.write(b"GET / HTTP/1.1\r\n\r\n")
            assert await asyncio.wait_for(r.read(), 5) == b""  # closed without reply
            r2, w2 = await asyncio.open_connection("127.0.0.1", sim.port)
            w2.write(b"API\0" + frame(b"v100..120"))  # versions the server cannot speak
            assert await asyncio.wait_for(r2.read(), 5) == b""
            assert sim.stats()["connections"]["bad_handshake"] == 2
            async with client(sim) as (ib, _):
                assert ib.isConnected()

    run(main())
