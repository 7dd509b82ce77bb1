"""Bar checks per session, the 16:00 row of the SPX recording, thin sessions, exact wire text."""
from __future__ import annotations

import asyncio
import csv
import datetime as dt
import os
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from ib_async import IB, BarData

from feeds.ibkr.bars import WireBar, check_session, keep_wire_text
from feeds.ibkr.sessions import SessionCalendar

DATA = Path(os.environ.get("FEEDS_SHARED_DATA") or Path(__file__).resolve().parents[2] / ".." / "shared" / "data")
SPX_CSV = DATA / "ib" / "spx-1min-2019-11-05..08.csv"
ET = ZoneInfo("US/Eastern")
UTC = dt.timezone.utc
XNYS = SessionCalendar("XNYS")
DAY = dt.date(2019, 11, 5)
SESSION = XNYS.session(DAY)


def bar(minute: int, o="10.00", h="10.50", lo="9.50", c="10.20", v="100", wap="10.1", n=3, t=None) -> WireBar:
    t = t or SESSION.open + dt.timedelta(minutes=minute)
    return WireBar(date=t, open=float(o), high=float(h), low=float(lo), close=float(c), volume=float(v),
                   average=float(wap), barCount=n, text=(o, h, lo, c, v, wap))


def full_day():
    return [bar(i) for i in range(390)]


def test_full_regular_session():
    chk = check_session("AAPL", 265598, SESSION, full_day())
    assert chk.failure is None and chk.actual == chk.expected == 390 and chk.note == ""
    assert chk.first == SESSION.open and chk.last == SESSION.close - dt.timedelta(minutes=1)
    assert chk.rows[0] == ("AAPL", SESSION.open, 265598, "10.00", "10.50", "9.50", "10.20", "100", "10.1", 3)


@pytest.mark.parametrize("mutate, words", [
    (lambda b: setattr(b, "high", 10.1), "high 10.1 < max(open 10.0, close 10.2)"),
    (lambda b: setattr(b, "low", 10.1), "low 10.1 > min(open 10.0, close 10.2)"),
    (lambda b: setattr(b, "open", 0.0), "price not positive"),
    (lambda b: setattr(b, "low", -1.0), "price not positive"),
    (lambda b: setattr(b, "volume", -5.0), "negative volume"),
    (lambda b: setattr(b, "barCount", -1), "negative barCount"),
    (lambda b: setattr(b, "date", b.date + dt.timedelta(seconds=30)), "not on a whole minute"),
])
def test_bad_bar_fails_the_session(mutate, words):
    bars = full_day()
    mutate(bars[100])
    chk = check_session("AAPL", 1, SESSION, bars)
    assert chk.failure is not None and words in chk.failure
    assert "2019-11-05 11:10" in chk.failure              # names the bar in exchange time
    assert chk.rows == [] and chk.first is None          # nothing of that session is stored


def test_duplicate_and_out_of_order():
    bars = full_day()
    bars.insert(11, bar(10))
    chk = check_session("AAPL", 1, SESSION, bars)
    assert "duplicate bar start" in chk.failure and "09:40" in chk.failure
    bars = full_day()
    bars[20], bars[21] = bars[21], bars[20]
    assert "not after the previous bar" in check_session("AAPL", 1, SESSION, bars).failure


def test_thin_session_is_final_with_a_note():
    bars = [b for i, b in enumerate(full_day()) if i % 3 != 1]   # no trade in every third minute
    chk = check_session("THIN", 1, SESSION, bars)
    assert chk.failure is None and chk.actual == 260 and chk.expected == 390
    assert chk.note == "thin: 130 of 390 minutes without a TRADES bar (first 09:31)"


def test_bars_outside_the_session_are_dropped_and_noted():
    bars = [bar(-1)] + full_day() + [bar(390)]   # 09:29 and 16:00
    chk = check_session("X", 1, SESSION, bars)
    assert chk.failure is None and chk.actual == 390
    assert [t.astimezone(ET).strftime("%H:%M") for t in chk.dropped] == ["09:29", "16:00"]
    assert chk.note == "2 bar(s) outside the session dropped (09:29, 16:00)"


def test_early_close_session_expects_210():
    s = XNYS.session(dt.date(2024, 7, 3))
    bars = [bar(i, t=s.open + dt.timedelta(minutes=i)) for i in range(211)]   # one at 13:00
    chk = check_session("X", 1, s, bars)
    assert chk.expected == 210 and chk.actual == 210 and "13:00" in chk.note


@pytest.mark.skipif(not SPX_CSV.is_file(), reason=f"shared IB recording not found at {SPX_CSV}")
def test_spx_recording_with_its_1600_row():
    """The recording's 2019-11-05 has 391 rows (a 16:00 row after 15:59); the
    session stores 390, the 16:00 row is outside the session and noted."""
    with open(SPX_CSV, newline="") as fh:
        recs = [r for r in csv.DictReader(fh) if r["Date"].startswith("2019-11-05")]
    assert len(recs) == 391
    bars = []
    for r in recs:
        t = dt.datetime.strptime(r["Date"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=ET)
        o, h, lo, c, v = r["Open"], r["High"], r["Low"], r["Close"], r["Volume"]
        bars.append(WireBar(date=t.astimezone(UTC), open=float(o), high=float(h), low=float(lo), close=float(c),
                            volume=float(v), average=0.0, barCount=1, text=(o, h, lo, c, v, "0")))
    chk = check_session("SPX", 416904, SESSION, bars)
    assert chk.failure is None and chk.actual == 390
    assert chk.note == "1 bar(s) outside the session dropped (16:00)"
    assert chk.last.astimezone(ET).strftime("%H:%M") == "15:59"
    assert [r[3] for r in chk.rows[:2]] == [recs[0]["Open"], recs[1]["Open"]]   # the file's text


def test_keep_wire_text_through_the_client_decoder():
    fields = ["17", "7", "20191105 09:30:00 US/Eastern", "20191105 16:00:00 US/Eastern", "2",
              "1572964200", "3080.8", "3081.47", "3080.3", "3080.49", "2209795", "3080.75", "22098",
              "1572964260", "0.1", "0.30", "0.1", "0.2999999999999999999", "12.5", "0.2", "2"]

    async def main():
        ib = IB()
        keep_wire_text(ib)
        keep_wire_text(ib)                              # idempotent
        fut = ib.wrapper.startReq(7, container=[])
        ib.client.decoder.interpret(fields)             # message 17 as TWS sends it
        assert fut.done()
        return fut.result()
    got = asyncio.run(main())
    assert [type(b) for b in got] == [WireBar, WireBar] and isinstance(got[0], BarData)
    assert got[0].date == dt.datetime(2019, 11, 5, 14, 30, tzinfo=UTC)
    assert got[0].text == ("3080.8", "3081.47", "3080.3", "3080.49", "2209795", "3080.75")
    assert got[0].high == 3081.47 and got[0].barCount == 22098
    # the stored text is what TWS sent, even where a double cannot hold it
    assert got[1].text[3] == "0.2999999999999999999" and Decimal(got[1].text[3]) != Decimal(got[1].close)


def test_plain_bardata_falls_back_to_shortest_float_text():
    b = BarData(date=SESSION.open, open=3080.8, high=3081.47, low=3080.3, close=3080.49, volume=10.0,
                average=3080.75, barCount=2)
    chk = check_session("SPX", 1, SESSION, [b])
    assert chk.rows[0][3:9] == ("3080.8", "3081.47", "3080.3", "3080.49", "10.0", "3080.75")


@pytest.mark.parametrize("kw, words", [
    ({"o": "1e400"}, "open exponent"),                     # float() reads it as inf: passes the float checks
    ({"h": "inf"}, "high not an ASCII decimal"),
    ({"c": "\u0661\u0660.\u0662"}, "close not an ASCII decimal"),   # float() reads Arabic-Indic digits
    ({"lo": "9." + "5" * 100}, "low not an ASCII decimal"),
    ({"v": "1e30"}, "volume exponent"),
    ({"wap": "nan"}, "WAP not an ASCII decimal"),
    ({"n": 2 ** 63}, "barCount"),
])
def test_bar_texts_and_counts_out_of_range_fail_the_session(kw, words):
    bars = full_day()
    b = bars[100]
    text = dict(zip(("o", "h", "lo", "c", "v", "wap"), b.text))
    text.update({k: v for k, v in kw.items() if k != "n"})
    bars[100] = WireBar(date=b.date, open=b.open, high=b.high, low=b.low, close=b.close, volume=b.volume,
                        average=b.average, barCount=kw.get("n", b.barCount),
                        text=(text["o"], text["h"], text["lo"], text["c"], text["v"], text["wap"]))
    chk = check_session("AAPL", 1, SESSION, bars)
    assert chk.failure is not None and words in chk.failure and "2019-11-05 11:10" in chk.failure
    assert chk.rows == []


def test_bar_in_the_future_fails_the_session():
    """'now' is injectable: the 2019 session seen from its own 12:00 has no 12:11 bar yet."""
    noon = SESSION.open + dt.timedelta(minutes=150)
    chk = check_session("AAPL", 1, SESSION, full_day(), now=noon)
    assert chk.failure is not None and "in the future" in chk.failure and "12:11" in chk.failure
    assert check_session("AAPL", 1, SESSION, full_day()[:160], now=noon).failure is None
    assert check_session("AAPL", 1, SESSION, full_day()).failure is None        # the wall clock: long past
