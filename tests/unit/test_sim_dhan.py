"""Dhan simulator: REST on real sockets (requests), the live feed with aiohttp's
WebSocket client and the feed decoder of :mod:`feeds.dhan.wire`.

The recordings come from ``../shared/data/dhan`` (or ``$FEEDS_SHARED_DATA/dhan``)
and are read, never copied; the tests that need them are skipped without them.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
from pathlib import Path

import aiohttp
import numpy as np
import pyotp
import pytest
import requests

from feeds.calendars import calendar
from feeds.dhan import limits, wire
from feeds.sim import dhan_packets as P
from feeds.sim.dhan import DhanSimulator
from feeds.sim.dhan_feed import FULL, QUOTE, TICKER, pack_frames, strip_frames
from feeds.sim.dhan_market import IST, MinutePaths, ScripMaster, SimSession, adjust_price, fold, generate_minutes

DATA = Path(os.environ.get("FEEDS_SHARED_DATA") or Path(__file__).resolve().parents[2] / ".." / "shared" / "data")
DHAN = DATA / "dhan"
HAVE_DATA = (DHAN / "intraday_1min_hdfcbank_2024-09-11..13.json").is_file()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="no Dhan recordings in ../shared/data/dhan")

GEN = 100_001          # the first generated NSE equity


def recorded(name: str) -> dict:
    return json.loads((DHAN / name).read_text())


def ist(*args) -> dt.datetime:
    return dt.datetime(*args, tzinfo=IST)


def post(sim: DhanSimulator, path: str, body: dict, token: str | None = None) -> requests.Response:
    headers = {"access-token": token or sim.access_token, "client-id": sim.auth.client_id}
    return requests.post(sim.base_url + path, json=body, headers=headers, timeout=30)


def intraday(sim, sid, seg, interval, start, end, token=None) -> requests.Response:
    return post(sim, "/v2/charts/intraday", {"securityId": str(sid), "exchangeSegment": seg,
                                             "instrument": "INDEX" if seg == "IDX_I" else "EQUITY",
                                             "interval": str(interval), "fromDate": start, "toDate": end}, token)


@pytest.fixture(scope="module")
def rest_sim():
    """REST tests: limits not enforced here (they have their own test)."""
    with DhanSimulator(rate_limits=False, instruments=50,
                       corporate_actions=["1333:2025-08-26:2", f"{GEN}:2024-06-12:2"]).running() as sim:
        yield sim


@pytest.fixture()
def plain(rest_sim):
    rest_sim.set_adjusted(False)
    yield rest_sim
    rest_sim.set_adjusted(False)


# =============================================================================== REST: recordings


@needs_data
def test_intraday_one_minute_equals_the_recording(plain):
    rec = recorded("intraday_1min_hdfcbank_2024-09-11..13.json")
    body = rec["request"]["body"]
    r = intraday(plain, body["securityId"], body["exchangeSegment"], body["interval"], body["fromDate"],
                 body["toDate"])
    assert r.status_code == 200
    got = r.json()
    assert got == rec["response"]
    assert len(got["open"]) == 1125
    days = {}
    for t in got["timestamp"]:
        days.setdefault(dt.datetime.fromtimestamp(t, IST).date(), []).append(t)
    assert [len(v) for v in days.values()] == [375, 375, 375]
    assert dt.datetime.fromtimestamp(days[dt.date(2024, 9, 11)][0], IST).time() == dt.time(9, 15)
    assert dt.datetime.fromtimestamp(days[dt.date(2024, 9, 11)][-1], IST).time() == dt.time(15, 29)


@needs_data
def test_fifteen_minutes_raw_and_adjusted(plain):
    raw = recorded("intraday_1min_hdfcbank_2024-09-11..13.json")["response"]
    rec15 = recorded("intraday_15min_hdfcbank_2024-09-11..13.json")["response"]
    r = intraday(plain, 1333, "NSE_EQ", 15, "2024-09-11", "2024-09-13").json()
    assert len(r["open"]) == 75
    # raw: the one-minute recording rolled up
    for k in range(75):
        s = slice(15 * k, 15 * k + 15)
        assert r["timestamp"][k] == raw["timestamp"][15 * k]
        assert (r["open"][k], r["high"][k], r["low"][k], r["close"][k], r["volume"][k]) == (
            raw["open"][s][0], max(raw["high"][s]), min(raw["low"][s]), raw["close"][s][-1], sum(raw["volume"][s]))
    assert r != rec15
    plain.set_adjusted(True)
    assert intraday(plain, 1333, "NSE_EQ", 15, "2024-09-11", "2024-09-13").json() == rec15
    # the one-minute candles adjusted the same way roll up into the 15-minute recording
    adj = intraday(plain, 1333, "NSE_EQ", 1, "2024-09-11", "2024-09-13").json()
    assert adj["open"][:3] == [adjust_price(p, 2) for p in raw["open"][:3]]
    assert adj["volume"] == [v * 2 for v in raw["volume"]]
    for k in range(75):
        s = slice(15 * k, 15 * k + 15)
        assert (adj["open"][s][0], max(adj["high"][s]), min(adj["low"][s]), adj["close"][s][-1],
                sum(adj["volume"][s])) == (rec15["open"][k], rec15["high"][k], rec15["low"][k], rec15["close"][k],
                                           rec15["volume"][k])


@needs_data
def test_daily_and_index_recordings(plain):
    rec = recorded("daily_hdfcbank_2024-01.json")
    body = rec["request"]["body"]
    r = post(plain, "/v2/charts/historical", body)
    assert r.status_code == 200 and r.json() == rec["response"]
    days = [dt.datetime.fromtimestamp(t, IST).date() for t in r.json()["timestamp"]]
    cal = calendar("XNSE")
    assert days == [s.day for s in cal.sessions(dt.date(2024, 1, 1), dt.date(2024, 1, 30))]
    assert dt.date(2024, 1, 20) in days and dt.date(2024, 1, 22) not in days      # Saturday session, holiday
    nifty = recorded("intraday_5min_nifty50_2024-01-15..16.json")
    b = nifty["request"]["body"]
    got = intraday(plain, b["securityId"], b["exchangeSegment"], 5, b["fromDate"], b["toDate"]).json()
    assert got == nifty["response"]
    one = intraday(plain, 13, "IDX_I", 1, "2024-01-15", "2024-01-15").json()
    assert len(one["open"]) == 376          # 375 minutes and the recording's 15:30 bar
    # the one-minute candles made for the recorded five-minute bars roll up into them
    for k in range(75):
        s = slice(5 * k, 5 * k + 5)
        assert (one["open"][s][0], max(one["high"][s]), min(one["low"][s]), one["close"][s][-1]) == (
            got["open"][k], got["high"][k], got["low"][k], got["close"][k])


# =============================================================================== REST: generated


def test_generated_sessions_follow_the_calendar(plain):
    r = intraday(plain, GEN + 3, "NSE_EQ", 1, "2024-01-18", "2024-01-23").json()
    by_day: dict = {}
    for t in r["timestamp"]:
        by_day.setdefault(dt.datetime.fromtimestamp(t, IST).date(), 0)
        by_day[dt.datetime.fromtimestamp(t, IST).date()] += 1
    assert by_day == {dt.date(2024, 1, 18): 375, dt.date(2024, 1, 19): 375, dt.date(2024, 1, 20): 375,
                      dt.date(2024, 1, 23): 375}
    for name in ("open", "high", "low", "close"):
        assert all(abs(round(p * 20) - p * 20) < 1e-6 for p in r[name])             # the 0.05 tick
    assert all(lo <= min(o, c) and max(o, c) <= h for o, h, lo, c in zip(r["open"], r["high"], r["low"], r["close"]))
    assert r["open"][1:375] == r["close"][0:374]
    assert intraday(plain, GEN + 3, "NSE_EQ", 1, "2024-01-22", "2024-01-22").json()["open"] == []
    muhurat = intraday(plain, GEN + 3, "NSE_EQ", 1, "2024-11-01", "2024-11-01").json()
    assert len(muhurat["open"]) == 60
    assert dt.datetime.fromtimestamp(muhurat["timestamp"][0], IST).time() == dt.time(18, 0)
    # same question, same answer; rolled up intervals aligned to 09:15
    again = intraday(plain, GEN + 3, "NSE_EQ", 1, "2024-01-18", "2024-01-23").json()
    assert again == r
    r60 = intraday(plain, GEN + 3, "NSE_EQ", 60, "2024-01-18", "2024-01-18").json()
    assert [dt.datetime.fromtimestamp(t, IST).strftime("%H:%M") for t in r60["timestamp"]] == [
        "09:15", "10:15", "11:15", "12:15", "13:15", "14:15", "15:15"]
    assert sum(r60["volume"]) == sum(r["volume"][:375])
    r25 = intraday(plain, GEN + 3, "NSE_EQ", 25, "2024-01-18", "2024-01-18").json()
    assert len(r25["open"]) == 15 and r25["high"][0] == max(r["high"][:25])
    daily = post(plain, "/v2/charts/historical", {"securityId": str(GEN + 3), "exchangeSegment": "NSE_EQ",
                                                  "instrument": "EQUITY", "fromDate": "2024-01-18",
                                                  "toDate": "2024-01-23"}).json()
    assert len(daily["open"]) == 3                                                  # toDate not included
    assert daily["high"][0] == max(r["high"][:375]) and daily["volume"][0] == sum(r["volume"][:375])


def test_adjustment_switch_on_generated_history(plain):
    before = intraday(plain, GEN, "NSE_EQ", 1, "2024-06-10", "2024-06-12").json()
    plain.set_adjusted(True)
    after = intraday(plain, GEN, "NSE_EQ", 1, "2024-06-10", "2024-06-12").json()
    n = 375 * 2                       # 10 and 11 June are before the ex-date, 12 June is not
    assert after["open"][:n] == [adjust_price(p, 2) for p in before["open"][:n]]
    assert after["volume"][:n] == [v * 2 for v in before["volume"][:n]]
    assert after["open"][n:] == before["open"][n:] and after["volume"][n:] == before["volume"][n:]
    # raw prices halve at the ex-date; adjusted ones run on
    assert before["close"][n - 1] > 1.6 * before["open"][n]
    assert 0.9 < after["close"][n - 1] / after["open"][n] < 1.1
    r = requests.get(plain.base_url + "/sim/adjust", timeout=10).json()
    assert r["applied"] is True and {"securityId": GEN, "exDate": "2024-06-12", "factor": 2} in r["corporate_actions"]
    requests.post(plain.base_url + "/sim/adjust?applied=0", timeout=10)
    assert intraday(plain, GEN, "NSE_EQ", 1, "2024-06-10", "2024-06-12").json() == before


def test_scrip_master_and_errors(plain):
    r = requests.get(plain.base_url + "/api-data/api-scrip-master.csv", timeout=10)
    lines = r.text.splitlines()
    assert lines[0].split(",") == ["SEM_EXM_EXCH_ID", "SEM_SEGMENT", "SEM_SMST_SECURITY_ID", "SEM_INSTRUMENT_NAME",
                                   "SEM_EXPIRY_CODE", "SEM_TRADING_SYMBOL", "SEM_LOT_UNITS", "SEM_CUSTOM_SYMBOL",
                                   "SEM_EXPIRY_DATE", "SEM_STRIKE_PRICE", "SEM_OPTION_TYPE", "SEM_TICK_SIZE",
                                   "SEM_EXPIRY_FLAG", "SEM_EXCH_INSTRUMENT_TYPE", "SEM_SERIES", "SM_SYMBOL_NAME"]
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == 52
    assert ["NSE", "I", "13", "INDEX"] == rows[0][:4] and rows[0][5] == "NIFTY"
    assert ["NSE", "E", "1333", "EQUITY"] == rows[1][:4] and rows[1][5] == "HDFCBANK"
    assert rows[2][5] == "SIMEQ00001" and rows[2][2] == str(GEN)
    bad = intraday(plain, 1333, "NSE_EQ", 1, "2024-01-01", "2024-04-02").json()          # 92 days
    assert bad["errorCode"] == "DH-905" and "90 days" in bad["errorMessage"]
    ok = intraday(plain, 1333, "NSE_EQ", 60, "2024-01-01", "2024-03-31")
    assert ok.status_code == 200
    assert intraday(plain, 1333, "NSE_EQ", 7, "2024-01-01", "2024-01-02").json()["errorCode"] == "DH-905"
    assert intraday(plain, 999, "NSE_EQ", 1, "2024-01-01", "2024-01-02").json()["errorCode"] == "DH-907"
    r = intraday(plain, 1333, "NSE_EQ", 1, "2024-01-01", "2024-01-02", token="not-a-token")
    assert r.status_code == 400
    if HAVE_DATA:
        assert r.json() == recorded("error_invalid_token.json")["response"]
    r = intraday(plain, 1333, "NSE_EQ", 1, "2024-09-11 10:00:00", "2024-09-11 10:04:00").json()
    assert len(r["open"]) == 5 and dt.datetime.fromtimestamp(r["timestamp"][0], IST).time() == dt.time(10, 0)


# =============================================================================== REST: limits and tokens


def test_rate_limit_answers_429_and_counts_violations():
    with DhanSimulator(instruments=5, data_dir=False).running() as sim:
        url = sim.base_url + "/v2/charts/intraday"
        body = {"securityId": "1333", "exchangeSegment": "NSE_EQ", "instrument": "EQUITY", "interval": "60",
                "fromDate": "2024-01-02", "toDate": "2024-01-02"}
        headers = {"access-token": sim.access_token, "client-id": sim.auth.client_id}
        with requests.Session() as s:
            answers = [s.post(url, json=body, headers=headers, timeout=10) for _ in range(15)]
        refused = [a for a in answers if a.status_code == 429]
        assert refused and all(a.json() == {"errorType": "Rate_Limit", "errorCode": "DH-904", "errorMessage":
                                            "Too many requests on server from single user breaching rate limits. "
                                            "Try throttling API calls."} for a in refused)
        st = requests.get(sim.base_url + "/sim/stats", timeout=10).json()["rest"]
        assert st["violations"] == len(refused)
        assert st["data_accepted"] == 15 - len(refused) and st["data_requests"] == 15
        assert st["max_accepted_in_any_second"] <= limits.DATA_REQUESTS_PER_SECOND
        # a client that keeps to the limit: no violation, the allowance used
        requests.post(sim.base_url + "/sim/stats/reset", timeout=10)
        time.sleep(1.1)
        with requests.Session() as s:
            for _ in range(12):
                assert s.post(url, json=body, headers=headers, timeout=10).status_code == 200
                time.sleep(1.0 / limits.DATA_REQUESTS_PER_SECOND + 0.01)
        st = sim.stats()["rest"]
        assert st["violations"] == 0 and st["data_accepted"] == 12
        assert 0 < st["allowance_used"] <= 1.0
        assert sum(st["per_second"].values()) == 12


def test_token_renewal_generation_and_expiry():
    with DhanSimulator(instruments=5, data_dir=False, token_ttl=3600).running() as sim:
        old = sim.access_token
        r = requests.get(sim.base_url + "/v2/RenewToken",
                         headers={"access-token": old, "dhanClientId": sim.auth.client_id}, timeout=10)
        assert r.status_code == 200
        ans = r.json()
        assert set(ans) == {"dhanClientId", "dhanClientName", "dhanClientUcc", "givenPowerOfAttorney", "accessToken",
                            "expiryTime"}
        new = ans["accessToken"]
        assert new != old and new.count(".") == 2
        expiry = dt.datetime.strptime(ans["expiryTime"], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=IST)
        assert abs(expiry.timestamp() - (time.time() + 3600)) < 5
        r = intraday(sim, 1333, "NSE_EQ", 60, "2024-01-02", "2024-01-02", token=old)
        assert r.status_code == 401 and r.json()["errorCode"] == "DH-901"
        assert intraday(sim, 1333, "NSE_EQ", 60, "2024-01-02", "2024-01-02", token=new).status_code == 200
        prof = requests.get(sim.base_url + "/v2/profile", headers={"access-token": new}, timeout=10).json()
        assert prof["dhanClientId"] == sim.auth.client_id and prof["dataPlan"] == "Active"
        # PIN + TOTP
        gen = sim.base_url + "/app/generateAccessToken"
        totp = pyotp.TOTP("JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP").now()
        r = requests.post(gen, params={"dhanClientId": sim.auth.client_id, "pin": "123456", "totp": totp}, timeout=10)
        assert r.status_code == 200
        third = r.json()["accessToken"]
        bad = "000000" if totp != "000000" else "111111"
        r = requests.post(gen, params={"dhanClientId": sim.auth.client_id, "pin": "123456", "totp": bad}, timeout=10)
        assert r.status_code == 401 and r.json()["errorCode"] == "DH-901"
        r = requests.post(gen, params={"dhanClientId": sim.auth.client_id, "pin": "999999", "totp": totp}, timeout=10)
        assert r.status_code == 401
        # expiry on demand and by lifetime
        assert requests.post(sim.base_url + "/sim/fault/expire_token", params={"token": third},
                             timeout=10).json()["affected"] == 1
        assert intraday(sim, 1333, "NSE_EQ", 60, "2024-01-02", "2024-01-02", token=third).status_code == 401
        short = requests.post(sim.base_url + "/sim/access_token?ttl=1", timeout=10).json()["accessToken"]
        assert intraday(sim, 1333, "NSE_EQ", 60, "2024-01-02", "2024-01-02", token=short).status_code == 200
        time.sleep(1.2)
        r = intraday(sim, 1333, "NSE_EQ", 60, "2024-01-02", "2024-01-02", token=short)
        assert r.status_code == 401 and r.json()["errorCode"] == "DH-901"
        assert intraday(sim, 1333, "NSE_EQ", 60, "2024-01-02", "2024-01-02", token=new).status_code == 200


# =============================================================================== ticks and packets (pure)


def test_trades_of_a_minute_fold_into_its_candle():
    master = ScripMaster(300, seed=3)
    session = SimSession(dt.date(2026, 3, 2), int(ist(2026, 3, 2, 9, 15).timestamp()),
                         int(ist(2026, 3, 2, 15, 30).timestamp()))
    insts = master.instruments
    arrays = generate_minutes(insts, session, 3)
    for minute in (0, 1, 200, 374):
        for tpm in (4, 60, 600):
            p = MinutePaths.build(session.open + 60 * minute, [i.security_id for i in insts],
                                  [i.tick for i in insts], *(arrays[n][:, minute] for n in
                                                             ("open", "high", "low", "close", "volume")), tpm, 3)
            for row in range(0, len(insts), 7):
                trades = p.trades(row)
                o, h, lo, c, v = fold(trades)
                assert (o, h, lo, c, v) == tuple(int(arrays[n][row, minute]) for n in
                                                 ("open", "high", "low", "close", "volume"))
                times = [t for t, _, _ in trades]
                assert times == sorted(times) and session.open + 60 * minute <= times[0] and times[-1] < \
                    session.open + 60 * (minute + 1)
                assert all(q >= 1 for _, _, q in trades) or insts[row].is_index
                assert all(pr % insts[row].tick == 0 for _, pr, _ in trades)
    # one row alone gives the same candles as in a crowd
    alone = generate_minutes([insts[9]], session, 3)
    assert all((alone[n][0] == arrays[n][9]).all() for n in alone)


def test_vectorised_frames_equal_the_packet_encoder():
    sid = np.array([1333, 100001])
    seg = np.array([1, 1])
    ltp = np.array([165045, 25005])
    ltt = np.array([1_726_046_100, 1_726_046_101])
    qty = np.array([7, 300])
    atp = np.array([164980.5, 25001.25])
    vol = np.array([123456, 999])
    opn, high, low = np.array([164000, 25000]), np.array([166000, 25010]), np.array([163900, 24990])
    tick = np.array([5, 5])
    got = [strip_frames(pack_frames(code, seg, sid, ltp, ltt, qty, atp, vol, opn, high, low, tick))
           for code in (TICKER, QUOTE, FULL)]
    for i in range(2):
        assert got[0][i] == P.pack_ticker(1, int(sid[i]), ltp[i] / 100, int(ltt[i]))
        q = wire.decode(got[1][i], now=float(ltt[i])).records[0]
        assert got[1][i] == P.pack_quote(1, int(sid[i]), ltp[i] / 100, int(qty[i]), int(ltt[i]), atp[i] / 100,
                                         int(vol[i]), q.total_sell_qty, q.total_buy_qty, opn[i] / 100, 0.0,
                                         high[i] / 100, low[i] / 100)
        f = wire.decode(got[2][i], now=float(ltt[i])).records[0]
        levels = [f.depth[6 * k:6 * k + 6] for k in range(5)]
        assert got[2][i] == P.pack_full(1, int(sid[i]), ltp[i] / 100, int(qty[i]), int(ltt[i]), atp[i] / 100,
                                        int(vol[i]), f.total_sell_qty, f.total_buy_qty, 0, 0, 0, opn[i] / 100,
                                        0.0, high[i] / 100, low[i] / 100, levels)
        assert wire.price_text(f.ltp) == f"{ltp[i] / 100:.2f}" and f.volume == vol[i] and f.ltq == qty[i]
        assert levels[0][4] < f.ltp < levels[0][5]                    # best bid below, best ask above


# =============================================================================== the feed


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


async def collect(ws, seconds: float, until=None) -> tuple[list, list, int | None]:
    """Decoded records and the close code seen within ``seconds``."""
    records, errors = [], []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            # (not receive(timeout=): aiohttp restarts that timer at every ping it answers)
            msg = await asyncio.wait_for(ws.receive(), max(0.05, end - time.monotonic()))
        except asyncio.TimeoutError:
            break
        if msg.type == aiohttp.WSMsgType.BINARY:
            d = wire.decode(msg.data)
            records.extend(d.records)
            errors.extend(d.errors)
            if until is not None and until(records):
                break
        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                          aiohttp.WSMsgType.ERROR):
            return records, errors, ws.close_code
    return records, errors, None


def kinds(records) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[r.kind] = out.get(r.kind, 0) + 1
    return out


@pytest.fixture()
def feed_sim():
    with DhanSimulator(instruments=30, data_dir=False, rate=2, session_now=True, session_elapsed=5,
                       ping_interval=0.5, idle_timeout=2.0).running() as sim:
        yield sim


def test_subscribe_gets_every_packet_kind(feed_sim):
    sim = feed_sim

    async def go():
        async with aiohttp.ClientSession() as s, s.ws_connect(sim.feed_url()) as ws:
            for mode, sid in (("ticker", GEN), ("quote", GEN + 1), ("full", GEN + 2)):
                for m in wire.subscribe_messages(mode, [("NSE_EQ", sid)]):
                    await ws.send_str(m)
            recs, errors, closed = await collect(ws, 2.5)
            assert not errors and closed is None
            k = kinds(recs)
            assert k["market_status"] == 1 and k["prev_close"] == 3 and k["oi"] == 1
            assert k["ticker"] >= 2 and k["quote"] >= 2 and k["full"] >= 2
            by = {(r.kind, r.security_id) for r in recs}
            assert {("ticker", GEN), ("quote", GEN + 1), ("full", GEN + 2), ("oi", GEN + 1)} <= by
            now = time.time()
            for r in recs:
                if r.kind in ("ticker", "quote", "full"):
                    assert abs(wire.ltt_to_utc_ns(r.ltt_ist) / 1e9 - now) < 10
                    assert round(r.ltp * 100) % 5 == 0
                if r.kind == "prev_close":
                    assert r.prev_close > 0
            # unsubscribe: no more packets of that instrument
            for m in wire.unsubscribe_messages("ticker", [("NSE_EQ", GEN)]):
                await ws.send_str(m)
            await collect(ws, 0.5)
            recs, _, _ = await collect(ws, 1.5)
            assert not [r for r in recs if r.security_id == GEN]
            assert [r for r in recs if r.security_id == GEN + 2]
            stats = sim.stats()["feed"]["connections"][0]
            assert stats["modes"] == {"ticker": 0, "quote": 1, "full": 1}
            # malformed message and market status on demand
            requests.post(sim.base_url + "/sim/fault/malformed?kind=unknown_code", timeout=10)
            requests.post(sim.base_url + "/sim/fault/market_status", timeout=10)
            recs, errors, _ = await collect(ws, 1.0)
            assert [e for e in errors if e.reason == "unknown-code"]
            assert kinds(recs).get("market_status") == 1
            # a disconnect fault with a code
            requests.post(sim.base_url + "/sim/fault/disconnect?code=800", timeout=10)
            recs, _, closed = await collect(ws, 3.0)
            assert [r.reason for r in recs if r.kind == "disconnect"] == [800] and closed is not None
    run(go())


def test_bad_credentials_get_their_disconnect_code(feed_sim):
    sim = feed_sim
    expired = sim.issue_token()
    sim.fault_expire_token(expired)

    async def one(url):
        async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
            recs, _, closed = await collect(ws, 3.0)
            return [r.reason for r in recs if r.kind == "disconnect"], closed

    async def go():
        assert (await one(sim.feed_url("no-such-token")))[0] == [809]
        assert (await one(sim.feed_url(expired)))[0] == [807]
        assert (await one(sim.feed_url(client_id="999")))[0] == [810]
        assert (await one(sim.feed_url().replace("version=2", "version=1")))[0] == [814]
        # a token that expires while connected
        tok = sim.issue_token()
        async with aiohttp.ClientSession() as s, s.ws_connect(sim.feed_url(tok)) as ws:
            await collect(ws, 0.3)
            requests.post(sim.base_url + "/sim/fault/expire_token", params={"token": tok}, timeout=10)
            recs, _, closed = await collect(ws, 3.0)
            assert [r.reason for r in recs if r.kind == "disconnect"] == [807] and closed is not None
    run(go())
    assert sim.stats()["feed"]["disconnects_sent"] == {"809": 1, "807": 2, "810": 1, "814": 1}


def test_instrument_limits_disconnect_with_804():
    with DhanSimulator(instruments=5100, data_dir=False, rate=0.1, session_now=True).running() as sim:
        ids = [("NSE_EQ", GEN + i) for i in range(5001)]

        async def go():
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(sim.feed_url()) as ws:          # 101 in one message
                    await ws.send_str(json.dumps({"RequestCode": 15, "InstrumentCount": 101, "InstrumentList": [
                        {"ExchangeSegment": "NSE_EQ", "SecurityId": str(GEN + i)} for i in range(101)]}))
                    recs, _, closed = await collect(ws, 5.0)
                    assert [r.reason for r in recs if r.kind == "disconnect"] == [804] and closed is not None
                async with s.ws_connect(sim.feed_url()) as ws:          # 5,000 fine, one more is not
                    for m in wire.subscribe_messages("ticker", ids[:limits.MAX_INSTRUMENTS_PER_CONNECTION]):
                        await ws.send_str(m)
                    recs, _, closed = await collect(ws, 3.0)
                    assert closed is None and not [r for r in recs if r.kind == "disconnect"]
                    for m in wire.subscribe_messages("ticker", ids[limits.MAX_INSTRUMENTS_PER_CONNECTION:]):
                        await ws.send_str(m)
                    recs, _, closed = await collect(ws, 30.0, until=lambda rs: rs and rs[-1].kind == "disconnect")
                    assert [r.reason for r in recs if r.kind == "disconnect"] == [804]
        run(go())


def test_sixth_connection_closes_the_oldest_with_805():
    with DhanSimulator(instruments=5, data_dir=False, session_now=True).running() as sim:
        run(_sixth_connection(sim))


async def _sixth_connection(sim):
    if True:
        async with aiohttp.ClientSession() as s:
            conns = []
            for _ in range(limits.MAX_CONNECTIONS_PER_USER):
                conns.append(await s.ws_connect(sim.feed_url()))
            for ws in conns:
                await collect(ws, 0.2)
            sixth = await s.ws_connect(sim.feed_url())
            recs, _, closed = await collect(conns[0], 3.0)
            assert [r.reason for r in recs if r.kind == "disconnect"] == [805] and closed is not None
            for ws in conns[1:] + [sixth]:
                recs, _, closed = await collect(ws, 0.3)
                assert closed is None and not [r for r in recs if r.kind == "disconnect"]
            assert sim.stats()["feed"]["active_connections"] == limits.MAX_CONNECTIONS_PER_USER
            for ws in conns[1:] + [sixth]:
                await ws.close()


def test_pings_and_the_idle_close(feed_sim):
    sim = feed_sim

    async def go():
        async with aiohttp.ClientSession() as s:
            # a client that answers pings stays, past the idle timeout
            async with s.ws_connect(sim.feed_url(), autoping=True) as ws:
                _, _, closed = await collect(ws, 3.0)
                assert closed is None
                assert sim.stats()["feed"]["connections"][0]["pongs"] >= 2
            # one that never answers is closed after the idle timeout
            async with s.ws_connect(sim.feed_url(), autoping=False) as ws:
                pings, t0 = 0, time.monotonic()
                while True:
                    msg = await asyncio.wait_for(ws.receive(), 10)
                    if msg.type == aiohttp.WSMsgType.PING:
                        pings += 1
                    elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                        break
                assert pings >= 2 and time.monotonic() - t0 >= sim.idle_timeout - 0.1
        assert sim.stats()["feed"]["idle_closed"] == 1
        # silence: no packets and no pings while the socket stays open
        async with aiohttp.ClientSession() as s, s.ws_connect(sim.feed_url(), autoping=True) as ws:
            for m in wire.subscribe_messages("full", [("NSE_EQ", GEN)]):
                await ws.send_str(m)
            await collect(ws, 0.8)
            requests.post(sim.base_url + "/sim/fault/silence?seconds=1.5", timeout=10)
            await collect(ws, 0.2)                  # what was on its way
            recs, errors, closed = await collect(ws, 1.0)
            assert recs == [] and errors == [] and closed is None
            recs, _, closed = await collect(ws, 2.0)
            assert recs and closed is None          # and then it speaks again
    run(go())


def test_live_trades_fold_into_the_served_candles():
    """One whole minute of the feed against the intraday answer (takes up to two minutes)."""
    with DhanSimulator(instruments=10, data_dir=False, rate=1, session_now=True, session_elapsed=2).running() as sim:
        sids = [GEN + i for i in range(3)] + [1333]

        async def go():
            async with aiohttp.ClientSession() as s, s.ws_connect(sim.feed_url()) as ws:
                for m in wire.subscribe_messages("quote", [("NSE_EQ", sid) for sid in sids]):
                    await ws.send_str(m)
                first_full = (int(time.time()) // 60 + 1) * 60
                recs, errors, closed = await collect(ws, first_full + 63 - time.time(),
                                                     until=lambda rs: rs[-1].kind == "quote" and wire.ltt_to_utc_ns(
                                                         rs[-1].ltt_ist) / 1e9 >= first_full + 61)
                assert not errors and closed is None
                return recs, first_full
        recs, minute = run(go())
        candles = {sid: sim.candles(sid, "NSE_EQ", minute, minute) for sid in sids}
        for sid in sids:
            trades = [r for r in recs if r.kind == "quote" and r.security_id == sid
                      and minute <= wire.ltt_to_utc_ns(r.ltt_ist) // 10**9 < minute + 60]
            c = candles[sid]
            assert len(c["open"]) == 1 and len(trades) >= 4
            prices = [float(wire.price_text(r.ltp)) for r in trades]
            assert (prices[0], max(prices), min(prices), prices[-1], float(sum(r.ltq for r in trades))) == (
                c["open"][0], c["high"][0], c["low"][0], c["close"][0], c["volume"][0])
            # the day volume runs with the trades
            assert trades[-1].volume - trades[0].volume == sum(r.ltq for r in trades[1:])
            r = intraday(sim, sid, "NSE_EQ", 1, time.strftime("%Y-%m-%d", time.gmtime(minute + 19800)),
                         time.strftime("%Y-%m-%d", time.gmtime(minute + 19800))).json()
            i = r["timestamp"].index(float(minute))
            assert (r["open"][i], r["high"][i], r["low"][i], r["close"][i], r["volume"][i]) == (
                c["open"][0], c["high"][0], c["low"][0], c["close"][0], c["volume"][0])


# =============================================================================== the official client and the CLI


@needs_data
def test_official_dhanhq_client_against_the_simulator(plain):
    """dhanhq 2.3.0 unmodified: its REST class and its MarketFeed (pointed at the simulator)."""
    from dhanhq import DhanContext, dhanhq
    ctx = DhanContext(plain.auth.client_id, plain.access_token)
    ctx.get_dhan_http().base_url = plain.base_url + "/v2"
    r = dhanhq(ctx).intraday_minute_data("1333", "NSE_EQ", "EQUITY", "2024-09-11", "2024-09-13", 1)
    assert r["status"] == "success"
    assert r["data"] == recorded("intraday_1min_hdfcbank_2024-09-11..13.json")["response"]


def test_official_market_feed_reads_the_packets(feed_sim):
    from dhanhq import DhanContext, MarketFeed
    old = MarketFeed.market_feed_wss
    MarketFeed.market_feed_wss = feed_sim.ws_url
    try:
        feed = MarketFeed(DhanContext(feed_sim.auth.client_id, feed_sim.access_token),
                          [(MarketFeed.NSE, str(GEN), MarketFeed.Full),
                           (MarketFeed.NSE, str(GEN + 1), MarketFeed.Quote)],
                          version="v2")
        feed.run_forever()
        seen = [feed.get_data() for _ in range(12)]
        feed.close_connection()
    finally:
        MarketFeed.market_feed_wss = old
    types = {d["type"] for d in seen if isinstance(d, dict) and "type" in d}
    assert {"Previous Close", "Full Data", "Quote Data", "OI Data"} <= types
    full = next(d for d in seen if isinstance(d, dict) and d.get("type") == "Full Data")
    assert full["security_id"] == GEN and float(full["LTP"]) > 0 and len(full["depth"]) == 5


def test_command_line_starts_and_serves(tmp_path):
    import subprocess
    import sys
    token_file = tmp_path / "token"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[2] / "bin" / "feed-sim-dhan"),
                             "--port", "0", "--no-data", "--instruments", "10", "--session-now",
                             "--token-file", str(token_file), "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("dhan simulator listening on http://127.0.0.1:")
        base = line.split()[4]
        token = token_file.read_text().strip()
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        st = requests.get(base + "/sim/stats", timeout=10).json()
        assert st["instruments"] == 12 and st["session"]["open"] is True and st["session"]["kind"] == "virtual"
        r = requests.post(base + "/v2/charts/historical", headers={"access-token": token},
                          json={"securityId": "1333", "exchangeSegment": "NSE_EQ", "instrument": "EQUITY",
                                "fromDate": "2024-01-01", "toDate": "2024-01-31"}, timeout=10)
        assert r.status_code == 200 and len(r.json()["open"]) == 21     # generated, on the calendar's sessions
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
