"""Dhan history, pure pieces, on the real recordings (../shared/data/dhan): the session check against
the XNSE calendar, the bonus adjustment, the daily recording's special days; the REST answer parsing,
error mapping, the rate limiter, the instruments file and Dhan's instrument list."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
from decimal import Decimal

import pytest

from conftest import shared_file
from feeds.backfill import session_status
from feeds.calendars import ExchangeCalendar
from feeds.dhan import history as H
from feeds.dhan import rest as R
from feeds.dhan.instruments import InstrumentList, InstrumentsError, parse_instruments
from feeds.dhan.instruments import Instrument
from feeds.ibkr.pacing import max_in_window

UTC = dt.timezone.utc
XNSE = ExchangeCalendar("XNSE")
HDFC = Instrument("NSE_EQ", 1333, "HDFCBANK", "EQUITY", key="NSE_EQ:HDFCBANK")
LATER = dt.datetime(2025, 6, 1, tzinfo=UTC)


def recording(name: str):
    rec = json.loads(shared_file("dhan", name).read_text(), parse_float=Decimal)
    return rec["request"], rec["status"], rec["response"]


def candles(name: str) -> list[R.Candle]:
    _, status, body = recording(name)
    assert status == 200
    got, bad = R.parse_candles(body)
    assert bad == 0
    return got


def test_hdfcbank_one_minute_three_sessions_complete_375_values_exact():
    raw = recording("intraday_1min_hdfcbank_2024-09-11..13.json")[2]
    by_day = H.split_by_day(candles("intraday_1min_hdfcbank_2024-09-11..13.json"), XNSE.tz)
    assert sorted(by_day) == [dt.date(2024, 9, 11), dt.date(2024, 9, 12), dt.date(2024, 9, 13)]
    rows = []
    for day, cs in sorted(by_day.items()):
        s = XNSE.session(day)
        chk = H.check_session(HDFC, s, cs, LATER)
        status, error, note = session_status(chk, s, LATER, dt.timedelta(minutes=30))
        assert (status, error, note, chk.actual, chk.expected) == ("COMPLETE", None, "", 375, 375)
        assert chk.first == s.open and chk.last == s.close - dt.timedelta(minutes=1)     # 09:15 .. 15:29 IST
        assert chk.first.astimezone(XNSE.tz).time() == dt.time(9, 15)
        rows += chk.rows
    # values exact: every row equals the recording's decimal text, in order
    assert len(rows) == 1125
    for i, r in enumerate(rows):
        assert r[3] == dt.datetime.fromtimestamp(int(raw["timestamp"][i]), UTC)
        assert r[5:10] == (raw["open"][i], raw["high"][i], raw["low"][i], raw["close"][i], raw["volume"][i])
        assert r[:3] == ("NSE_EQ", 1333, "HDFCBANK") and r[4] == 0
    assert str(rows[0][5]) == "1650.4" and str(rows[0][9]) == "75094"


def test_fifteen_minute_recording_shows_the_bonus_adjustment_factor_2():
    one = H.split_by_day(candles("intraday_1min_hdfcbank_2024-09-11..13.json"), XNSE.tz)
    fifteen = H.split_by_day(candles("intraday_15min_hdfcbank_2024-09-11..13.json"), XNSE.tz)
    for day in sorted(one):
        s = XNSE.session(day)
        up = H.rollup(one[day], 15, s)
        assert len(up) == 25 and up[-1].start.astimezone(XNSE.tz).time() == dt.time(15, 15)
        cmp = H.compare(up, fifteen[day], HDFC.tick)
        assert cmp.kind == "factor" and cmp.compared == 25
        assert cmp.price_factor == 2 and cmp.volume_factor == 2
        assert cmp.fetched_first_close * 2 - cmp.stored_first_close <= Decimal("0.10")
    # the same candles are "same"; a single changed candle is a revision, not an adjustment
    s = XNSE.session(dt.date(2024, 9, 11))
    up = H.rollup(one[dt.date(2024, 9, 11)], 15, s)
    assert H.compare(up, up).kind == "same"
    bent = list(up)
    bent[3] = R.Candle(bent[3].start, bent[3].open, bent[3].high + 5, bent[3].low, bent[3].close, bent[3].volume)
    assert H.compare(up, bent).kind == "revision"


def test_daily_recording_special_saturday_and_holiday_agree_with_the_calendar():
    req = recording("daily_hdfcbank_2024-01.json")[0]["body"]
    days = [c.start.astimezone(XNSE.tz).date() for c in candles("daily_hdfcbank_2024-01.json")]
    first, to = dt.date.fromisoformat(req["fromDate"]), dt.date.fromisoformat(req["toDate"])
    # Dhan's daily answer ends the day before toDate (2024-01-31 is not in it): toDate is exclusive there
    sessions = [s.day for s in XNSE.sessions(first, to - dt.timedelta(days=1))]
    assert days == sessions
    assert dt.date(2024, 1, 20) in days and dt.date(2024, 1, 20).weekday() == 5       # Saturday session
    assert XNSE.session(dt.date(2024, 1, 20)).expected_bars == 375
    assert dt.date(2024, 1, 22) not in days and XNSE.is_holiday(dt.date(2024, 1, 22))
    assert dt.date(2024, 1, 26) not in days and XNSE.is_holiday(dt.date(2024, 1, 26))   # Republic Day


def test_nifty_index_five_minute_bars_include_a_1530_bar_outside_the_session():
    by_day = H.split_by_day(candles("intraday_5min_nifty50_2024-01-15..16.json"), XNSE.tz)
    nifty = Instrument("IDX_I", 13, "NIFTY 50", "INDEX", key="IDX_I:NIFTY 50")
    for day, cs in by_day.items():
        assert len(cs) == 76
        s = XNSE.session(day)
        assert H.rollup(cs, 1, s) == cs[:-1]                      # the 15:30 bar is outside [09:15, 15:30)
        assert cs[-1].volume == 0 and cs[-1].start.astimezone(XNSE.tz).time() == dt.time(15, 30)
        chk = H.check_session(nifty, s, cs, LATER)
        assert len(chk.dropped) == 1 and "outside the session dropped (15:30)" in chk.note


def test_check_session_failures_and_thin():
    s = XNSE.session(dt.date(2024, 9, 12))
    cs = H.split_by_day(candles("intraday_1min_hdfcbank_2024-09-11..13.json"), XNSE.tz)[dt.date(2024, 9, 12)]
    thin = cs[:100] + cs[101:]
    chk = H.check_session(HDFC, s, thin, LATER)
    assert chk.actual == 374 and chk.note == "thin: 1 of 375 minutes without a candle (first 10:55)"
    assert session_status(chk, s, LATER, dt.timedelta(0))[0] == "THIN"
    dup = cs[:10] + [cs[9]] + cs[10:]
    assert "duplicate candle" in H.check_session(HDFC, s, dup, LATER).failure
    c = cs[5]
    bad_hi = cs[:5] + [R.Candle(c.start, c.open, c.low - 1, c.low, c.close, c.volume)] + cs[6:]
    assert "high" in H.check_session(HDFC, s, bad_hi, LATER).failure
    neg = cs[:5] + [R.Candle(c.start, c.open, c.high, c.low, c.close, Decimal(-1))] + cs[6:]
    chk = H.check_session(HDFC, s, neg, LATER)
    assert "negative volume" in chk.failure and chk.rows == []
    assert H.check_session(HDFC, s, cs, s.open).failure.endswith("in the future")


def test_parse_candles_counts_malformed_entries_and_refuses_non_columnar():
    body = {"open": [Decimal("1.5"), "x", Decimal("2")], "high": [Decimal("2")] * 3, "low": [Decimal(1)] * 3,
            "close": [Decimal("1.5")] * 3, "volume": [Decimal("10.0")] * 3,
            "timestamp": [Decimal("1726026300.0"), Decimal("1726026360.0"), Decimal("1726026420.5")]}
    got, bad = R.parse_candles(body)
    assert bad == 2 and len(got) == 1 and got[0].volume == 10 and str(got[0].volume) == "10"
    with pytest.raises(R.Transient):
        R.parse_candles({"errorCode": "DH-905"})


def test_error_envelope_mapping_and_the_recorded_invalid_token():
    _, status, body = recording("error_invalid_token.json")
    err = R.error_from(status, body)
    assert isinstance(err, R.TokenError) and err.code == "DH-906" and "Invalid Token" in str(err)
    assert isinstance(R.error_from(429, None), R.RateLimited)
    assert isinstance(R.error_from(400, {"errorCode": "DH-904", "errorMessage": "Too many requests"}), R.RateLimited)
    assert isinstance(R.error_from(401, {"errorCode": "DH-901", "errorMessage": "expired"}), R.TokenError)
    assert isinstance(R.error_from(400, {"errorCode": "DH-905", "errorMessage": "Missing fromDate"}), R.InputError)
    assert isinstance(R.error_from(400, {"errorCode": "DH-907", "errorMessage": "No data"}), R.InputError)
    assert isinstance(R.error_from(500, {"errorCode": "DH-908"}), R.Transient)
    assert isinstance(R.error_from(502, "<html>"), R.Transient)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    async def sleep(self, d):
        self.t += d
        await asyncio.sleep(0)


def test_limiter_never_exceeds_the_rate_in_any_one_second_window_and_uses_over_90_percent():
    clock = FakeClock()
    lim = R.data_limiter(5, max_open=12, clock=clock, sleep=clock.sleep, keep_history=True)

    async def one(i):
        t = await lim.acquire(("x", i), None)
        clock.t += 0.003                      # the answer comes 3 ms later
        lim.release(t)

    async def main():
        for i in range(500):
            await one(i)
    asyncio.run(main())
    sent = lim.history
    assert len(sent) == 500 and max_in_window(sent, 1.0) <= 5
    rate = (len(sent) - 1) / (sent[-1] - sent[0])
    assert rate >= 0.9 * 5, rate
    # a lower setting is honoured; a fractional rate keeps a one-request window of 1/rate seconds
    assert R.data_limiter(2).max_requests == 2
    half = R.data_limiter(0.5)
    assert half.max_requests == 1 and half.window > 2.0
    with pytest.raises(ValueError):
        R.data_limiter(6)


def test_rate_limit_answer_pauses_every_request():
    clock = FakeClock()
    lim = R.data_limiter(5, clock=clock, sleep=clock.sleep)
    pause = lim.violation()
    assert pause >= 1.0 and lim.delay(("a",), None) >= 1.0


def test_daily_budget():
    today = [dt.date(2024, 9, 12)]
    b = R.DailyBudget(3, used=1, today=lambda: today[0])
    b.take()
    b.take()
    with pytest.raises(R.BudgetExhausted):
        b.take()
    today[0] = dt.date(2024, 9, 13)
    b.take()
    assert b.left == 2


def test_token_file(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"client_id": "100", "access_token": "abc", "expires_at": "2999-01-01T00:00:00+00:00"}))
    tok, exp = R.read_token(str(p))
    assert tok == "abc" and exp.year == 2999
    p.write_text(json.dumps({"access_token": "abc", "expires_at": "2020-01-01T00:00:00+00:00"}))
    with pytest.raises(R.TokenError, match="expired"):
        R.read_token(str(p))
    with pytest.raises(R.TokenError):
        R.read_token(str(tmp_path / "missing.json"))


def test_instruments_file_lines_and_errors():
    lines = parse_instruments("# list\nNSE_EQ:HDFCBANK full priority\nNSE_EQ:reliance quote 2\n"
                              "IDX_I:NIFTY 50 ticker\nNSE_EQ:1333\nNSE_EQ:TCS priority=3\n\n", "full")
    assert [(ln.key, ln.mode, ln.priority, ln.line) for ln in lines] == [
        ("NSE_EQ:HDFCBANK", "full", 1, 2), ("NSE_EQ:RELIANCE", "quote", 2, 3), ("IDX_I:NIFTY 50", "ticker", 0, 4),
        ("NSE_EQ:1333", "full", 0, 5), ("NSE_EQ:TCS", "full", 3, 6)]
    for text, what in (("NSE:HDFCBANK", "field 'segment'"), ("HDFCBANK", "field 'segment'"),
                       ("NSE_EQ:A full\nNSE_EQ:A", "already on line 1"), ("NSE_EQ:A full X", "after the mode"),
                       ("NSE_EQ:", "field 'symbol'"), ("NSE_EQ:A priority=x", "field 'priority'")):
        with pytest.raises(InstrumentsError, match=what):
            parse_instruments(text, source="f.txt")


SCRIP = """SEM_EXM_EXCH_ID,SEM_SEGMENT,SEM_SMST_SECURITY_ID,SEM_INSTRUMENT_NAME,SEM_EXPIRY_CODE,SEM_TRADING_SYMBOL,SEM_LOT_UNITS,SEM_CUSTOM_SYMBOL,SEM_EXPIRY_DATE,SEM_STRIKE_PRICE,SEM_OPTION_TYPE,SEM_TICK_SIZE,SEM_EXPIRY_FLAG,SEM_EXCH_INSTRUMENT_TYPE,SEM_SERIES,SM_SYMBOL_NAME
NSE,E,99999,EQUITY,,HDFCBANK,1.0,HDFC Bank BE,,,,5.0000,NA,ES,BE,HDFC BANK LTD
NSE,E,1333,EQUITY,,HDFCBANK,1.0,HDFC Bank,,,,5.0000,NA,ES,EQ,HDFC BANK LTD
BSE,E,500180,EQUITY,,HDFCBANK,1.0,HDFC Bank,,,,5.0000,NA,ES,A,HDFC BANK LTD
NSE,I,13,INDEX,,NIFTY 50,1.0,Nifty 50,,,,0.0500,NA,INDEX,NA,NIFTY
NSE,E,notanumber,EQUITY,,BROKEN,1.0,,,,,5.0000,NA,ES,EQ,
"""


def test_instrument_list_resolves_symbols_and_ids():
    il = InstrumentList(SCRIP)
    assert il.malformed == 1
    lines = parse_instruments("NSE_EQ:HDFCBANK priority\nBSE_EQ:HDFCBANK\nIDX_I:NIFTY 50\nNSE_EQ:99999\nNSE_EQ:NOPE\n")
    got = [il.resolve(ln) for ln in lines[:4]]
    assert [(i.segment, i.security_id, i.instrument, i.tick, i.priority) for i in got] == [
        ("NSE_EQ", 1333, "EQUITY", Decimal("0.05"), 1), ("BSE_EQ", 500180, "EQUITY", Decimal("0.05"), 0),
        ("IDX_I", 13, "INDEX", Decimal("0.05"), 0), ("NSE_EQ", 99999, "EQUITY", Decimal("0.05"), 0)]
    assert got[0].key == "NSE_EQ:HDFCBANK"
    with pytest.raises(InstrumentsError, match="NSE_EQ:NOPE is not in Dhan's instrument list"):
        il.resolve(lines[4])
