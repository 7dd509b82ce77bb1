"""Kite candles from tick rows: cumulative volume, trades, LTP-only instruments,
history bars; the simulator's minute candles of its generated trades."""
from __future__ import annotations

import json
import threading
from datetime import date, datetime, time as dtime, timedelta, timezone
from decimal import Decimal

import dateutil.parser
import numpy as np
import pytest

from conftest import shared_file
from feeds.kite import history as H
from feeds.candles import CandleSettings, first_missing, sessions_of
from feeds.timetext import ist_text
from feeds.kite.candles import CANDLE_TABLE, KiteCandles, units
from feeds.kite.instruments import HISTORICAL_REQUESTS_PER_SECOND, Subscription
from feeds.kite.session import IST, NseCalendar

UTC = timezone.utc
NS = 1_000_000_000
MIN = 60 * NS
DAY = date(2024, 3, 1)          # an NSE session, 09:15-15:30 IST
NEXT = date(2024, 3, 4)         # the next one (Monday)
EQ, EQ2, IDX = 408065, 738561, 256265
COLS = CANDLE_TABLE.columns


def at(day: date, hh: int, mm: int, ss: float = 0.0) -> int:
    """Epoch ns of an IST wall-clock time."""
    t = datetime.combine(day, dtime(hh, mm), tzinfo=IST) + timedelta(seconds=ss)
    return int(t.timestamp() * 1e6) * 1000


def text(ns: int) -> str:
    return datetime.fromtimestamp(ns // NS, UTC).strftime("%Y-%m-%d %H:%M:%S+00:00")


def quote(tok: int, price: str, vol: int | None) -> tuple:
    return (tok, price, 1, price, vol, 10, 10, price, price, price, price, "recv", 0)


def full(tok: int, price: str, vol: int, ltt: int | None, ets: int | None = None) -> tuple:
    return (tok, price, 1, price, vol, 10, 10, price, price, price, price,
            text(ltt) if ltt else None, 0, 0, 0, text(ets) if ets else None,
            "{}", "{}", "{}", "{}", "{}", "{}", "recv", 0)


def ltp(tok: int, price: str) -> tuple:
    return (tok, price, "recv", 0)


class FakeSink:
    def __init__(self):
        self.rows: list[dict] = []

    def add_many(self, table: str, rows):
        assert table == "kite_candle"
        for r in rows:
            assert len(r) == len(COLS)
            self.rows.append(dict(zip(COLS, r)))


def sub(token: int, mode: str) -> Subscription:
    return Subscription(instrument_token=token, mode=mode, exchange="NSE", tradingsymbol=str(token))


def make(subs=None, since_ns=None, intervals=(1, 5, 15)):
    subs = subs or [sub(EQ, "quote")]
    sink = FakeSink()
    kc = KiteCandles(CandleSettings(intervals=intervals, grace=2.0, lateness=10.0),
                     sessions_of(NseCalendar()), subs, sink, since_ns=since_ns)
    return kc, sink


def feed(kc, t_ns: int, ltp_rows=(), quote_rows=(), full_rows=()):
    kc.ticks((list(ltp_rows), list(quote_rows), list(full_rows)), t_ns)


def candles(sink, tok=EQ, interval=1):
    return {r["bar_start"][:16]: r for r in sink.rows if r["instrument_token"] == tok and r["interval_min"] == interval}


def ist_label(day: date, hh: int, mm: int) -> str:
    return text(at(day, hh, mm))[:16]


# ---------------------------------------------------------------------------- volume


def test_cumulative_volume_resets_at_the_session_open():
    """Kite's volume_traded is the day's running total: the first candle of a
    session counts from 0 at the open (the pre-open ticks make no candle), and
    the next session starts from 0 again, however low its first total is."""
    kc, sink = make()
    feed(kc, at(DAY, 9, 7), quote_rows=[quote(EQ, "100.00", 5_000)])       # pre-open: outside the session
    feed(kc, at(DAY, 9, 15, 10), quote_rows=[quote(EQ, "101.00", 5_400)])
    feed(kc, at(DAY, 9, 15, 40), quote_rows=[quote(EQ, "102.50", 5_600)])
    feed(kc, at(DAY, 9, 16, 5), quote_rows=[quote(EQ, "101.50", 5_650)])
    kc.close_due(at(DAY, 9, 17, 3))
    c = candles(sink)
    assert set(c) == {ist_label(DAY, 9, 15), ist_label(DAY, 9, 16)}
    m15 = c[ist_label(DAY, 9, 15)]
    assert (m15["open"], m15["high"], m15["low"], m15["close"]) == ("101.00", "102.50", "101.00", "102.50")
    assert m15["volume"] == 5_600 and m15["ticks"] == 2 and m15["final"] and m15["source"] == "live"
    assert c[ist_label(DAY, 9, 16)]["volume"] == 50
    # the next session: Kite's total restarts low; the candle counts it from 0, never negative
    feed(kc, at(NEXT, 9, 15, 1), quote_rows=[quote(EQ, "103.00", 300)])
    feed(kc, at(NEXT, 9, 15, 30), quote_rows=[quote(EQ, "103.05", 420)])
    kc.close_due(at(NEXT, 9, 16, 3))
    nxt = candles(sink)[ist_label(NEXT, 9, 15)]
    assert nxt["volume"] == 420 and nxt["open"] == "103.00" and nxt["close"] == "103.05"


def test_a_volume_decrease_is_never_negative():
    kc, sink = make()
    feed(kc, at(DAY, 10, 0, 1), quote_rows=[quote(EQ, "50.00", 1_000)])
    feed(kc, at(DAY, 10, 0, 2), quote_rows=[quote(EQ, "50.05", 900)])     # a correction downwards
    feed(kc, at(DAY, 10, 0, 3), quote_rows=[quote(EQ, "50.10", 1_100)])
    feed(kc, at(DAY, 10, 1, 3), quote_rows=[quote(EQ, "50.15", 1_050)])    # below the high-water mark
    feed(kc, at(DAY, 10, 1, 9), quote_rows=[quote(EQ, "50.20", 1_200)])
    kc.close_due(at(DAY, 10, 2, 5))
    c = candles(sink)
    assert c[ist_label(DAY, 10, 0)]["volume"] == 1_100
    assert c[ist_label(DAY, 10, 1)]["volume"] == 100                      # 1_200 - 1_100, nothing subtracted
    assert all(r["volume"] >= 0 for r in sink.rows)
    assert kc.builder.stats["volume_reset"] == 2


def test_a_tick_without_new_volume_is_not_a_trade():
    """A quote/full tick whose volume_traded did not change (a depth update)
    moves neither the prices nor the tick count of a candle."""
    kc, sink = make()
    feed(kc, at(DAY, 11, 0, 1), quote_rows=[quote(EQ, "200.00", 7_000)])
    feed(kc, at(DAY, 11, 0, 2), quote_rows=[quote(EQ, "250.00", 7_000)])  # same volume: not a trade
    feed(kc, at(DAY, 11, 0, 3), quote_rows=[quote(EQ, "150.00", 7_000)])
    feed(kc, at(DAY, 11, 0, 4), quote_rows=[quote(EQ, "201.00", 7_010)])
    kc.close_due(at(DAY, 11, 1, 5))
    c = candles(sink)[ist_label(DAY, 11, 0)]
    assert (c["open"], c["high"], c["low"], c["close"], c["ticks"]) == ("200.00", "201.00", "200.00", "201.00", 2)
    assert kc.not_trades == 2


def test_an_instrument_that_does_not_trade_for_minutes_has_no_candles_for_them():
    kc, sink = make(subs=[sub(EQ, "quote"), sub(EQ2, "quote")])
    feed(kc, at(DAY, 9, 20, 5), quote_rows=[quote(EQ, "10.00", 100), quote(EQ2, "20.00", 50)])
    for m in range(21, 27):                   # EQ2 trades every minute, EQ not at all
        feed(kc, at(DAY, 9, m, 5), quote_rows=[quote(EQ2, f"20.{m:02d}", 50 + m)])
    feed(kc, at(DAY, 9, 27, 30), quote_rows=[quote(EQ, "10.50", 160)])
    kc.close_due(at(DAY, 9, 31, 0))
    assert set(candles(sink, EQ)) == {ist_label(DAY, 9, 20), ist_label(DAY, 9, 27)}
    assert candles(sink, EQ)[ist_label(DAY, 9, 27)]["volume"] == 60
    assert len(candles(sink, EQ2)) == 7
    five = candles(sink, EQ, 5)
    assert set(five) == {ist_label(DAY, 9, 20), ist_label(DAY, 9, 25)}
    assert (five[ist_label(DAY, 9, 20)]["close"], five[ist_label(DAY, 9, 20)]["volume"]) == ("10.00", 100)
    assert five[ist_label(DAY, 9, 25)]["bar_end"][:16] == ist_label(DAY, 9, 30)
    # the 15-minute candle 09:15-09:30 holds both trades (aligned to the 09:15 open)
    fifteen = candles(sink, EQ, 15)[ist_label(DAY, 9, 15)]
    assert (fifteen["open"], fifteen["close"], fifteen["volume"], fifteen["ticks"]) == ("10.00", "10.50", 160, 2)


def test_ltp_only_instruments_and_indices_have_no_volume_every_tick_counts():
    kc, sink = make(subs=[sub(EQ, "ltp"), sub(IDX, "quote")])
    for i, p in enumerate(("10.00", "10.00", "9.95", "10.10")):
        feed(kc, at(DAY, 12, 0, 5 + i), ltp_rows=[ltp(EQ, p)], quote_rows=[quote(IDX, "22000.00", None)])
    kc.close_due(at(DAY, 12, 1, 5))
    c = candles(sink)[ist_label(DAY, 12, 0)]
    assert c["volume"] is None and c["ticks"] == 4
    assert (c["open"], c["high"], c["low"], c["close"]) == ("10.00", "10.10", "9.95", "10.10")
    idx = candles(sink, IDX)[ist_label(DAY, 12, 0)]
    assert idx["volume"] is None and idx["ticks"] == 4


def test_full_ticks_use_the_exchange_time_not_the_receive_time():
    kc, sink = make(subs=[sub(EQ, "full")])
    # traded at 13:00:59, received at 13:01:00.3: the 13:00 candle
    feed(kc, at(DAY, 13, 1, 0.3), full_rows=[full(EQ, "1573.70", 10_000, at(DAY, 13, 0, 59))])
    # no last_trade_time: the exchange timestamp
    feed(kc, at(DAY, 13, 1, 0.4), full_rows=[full(EQ, "1573.75", 10_010, None, at(DAY, 13, 0, 59))])
    feed(kc, at(DAY, 13, 1, 1), full_rows=[full(EQ, "1573.80", 10_020, at(DAY, 13, 1, 1))])
    kc.close_due(at(DAY, 13, 2, 5))
    c = candles(sink)
    assert c[ist_label(DAY, 13, 0)]["close"] == "1573.75" and c[ist_label(DAY, 13, 0)]["ticks"] == 2
    assert c[ist_label(DAY, 13, 1)]["open"] == "1573.80"


def test_trades_within_one_exchange_second_keep_their_order():
    """Kite's last_trade_time has whole seconds: the open is the first trade of
    the second, the close the last, whatever their prices."""
    kc, sink = make(subs=[sub(EQ, "full")])
    t = at(DAY, 13, 5, 59)
    for i, p in enumerate(("10.05", "10.00", "10.10", "10.02")):
        feed(kc, at(DAY, 13, 6, 0.1 * i), full_rows=[full(EQ, p, 100 + i, t)])
    kc.close_due(at(DAY, 13, 7))
    c = candles(sink)[ist_label(DAY, 13, 5)]
    assert (c["open"], c["high"], c["low"], c["close"], c["ticks"]) == ("10.05", "10.10", "10.00", "10.02", 4)


def test_rows_are_exact_and_in_the_table_column_order():
    kc, sink = make()
    feed(kc, at(DAY, 15, 29, 50), quote_rows=[quote(EQ, "1573.70", 1)])
    kc.close_due(at(DAY, 15, 31))
    r = candles(sink)[ist_label(DAY, 15, 29)]
    assert r["bar_start"] == text(at(DAY, 15, 29))[:19] + ".000000+00:00"
    assert r["bar_end"] == text(at(DAY, 15, 30))[:19] + ".000000+00:00"
    assert Decimal(r["open"]) == Decimal("1573.70") and r["revision"] == 0
    # the last 15-minute candle ends at the close
    assert candles(sink, EQ, 15)[ist_label(DAY, 15, 15)]["bar_end"].startswith(text(at(DAY, 15, 30))[:19])
    assert COLS == ("instrument_token", "interval_min", "bar_start", "bar_end", "open", "high", "low", "close",
                    "volume", "ticks", "final", "revision", "source", "recorded_at")
    assert units("0.05") == 5 and units("83.2500000") == 832500000


def test_shutdown_writes_open_candles_not_final():
    kc, sink = make()
    feed(kc, at(DAY, 10, 3, 1), quote_rows=[quote(EQ, "5.00", 10)])
    feed(kc, at(DAY, 10, 4, 1), quote_rows=[quote(EQ, "5.05", 20)])
    kc.close_due(at(DAY, 10, 4, 30))
    assert candles(sink)[ist_label(DAY, 10, 3)]["final"]
    kc.close_all()
    open1 = candles(sink)[ist_label(DAY, 10, 4)]
    assert open1["final"] is False and open1["volume"] == 10
    five = candles(sink, EQ, 5)[ist_label(DAY, 10, 0)]
    assert five["final"] is False and five["volume"] == 20


def test_late_tick_within_lateness_revises_the_candle():
    kc, sink = make(subs=[sub(EQ, "full")])
    feed(kc, at(DAY, 14, 0, 30), full_rows=[full(EQ, "10.00", 100, at(DAY, 14, 0, 30))])
    kc.close_due(at(DAY, 14, 1, 3))
    feed(kc, at(DAY, 14, 1, 5), full_rows=[full(EQ, "11.00", 110, at(DAY, 14, 0, 59))])    # 5 s late
    assert kc.next_due_ns() <= at(DAY, 14, 1, 10)      # the timer's next call: the revision, then expiry
    kc.close_due(at(DAY, 14, 1, 6))
    kc.close_due(at(DAY, 14, 1, 10))
    feed(kc, at(DAY, 14, 1, 30), full_rows=[full(EQ, "12.00", 120, at(DAY, 14, 0, 58))])   # 30 s late: dropped
    kc.close_due(at(DAY, 14, 1, 31))
    rows = [r for r in sink.rows if r["interval_min"] == 1 and r["bar_start"][:16] == ist_label(DAY, 14, 0)]
    assert [(r["revision"], r["close"], r["volume"]) for r in rows] == [(0, "10.00", 100), (1, "11.00", 110)]
    assert kc.figures()["late revised"] == 1 and kc.figures()["late dropped"] == 1


# ---------------------------------------------------------------------------- history


def test_restart_mid_session_history_bars_replace_the_missed_minutes():
    """Started at 10:32:20: the start minute's live candle is incomplete; once
    it can no longer be revised, history bars from the open of the candles
    holding the first missed minute are seeded; one-minute candles already
    stored final (up to 10:30) are not written again."""
    since = at(DAY, 10, 32, 20)
    kc, sink = make(since_ns=since)
    feed(kc, at(DAY, 10, 32, 30), quote_rows=[quote(EQ, "100.00", 90_000)])     # baseline: volume unknown
    feed(kc, at(DAY, 10, 33, 10), quote_rows=[quote(EQ, "100.10", 90_050)])
    kc.close_due(at(DAY, 10, 33, 3))
    live = candles(sink)[ist_label(DAY, 10, 32)]
    assert live["final"] is False and live["source"] == "live"
    req_from, keep = first_missing(at(DAY, 9, 15), at(DAY, 10, 30), (1, 5, 15))
    assert (req_from, keep) == (at(DAY, 10, 30), at(DAY, 10, 31))
    # intervals that do not nest: from the start of every candle a requested minute falls into
    assert first_missing(at(DAY, 9, 15), at(DAY, 9, 22), (1, 2, 3)) == (at(DAY, 9, 21), at(DAY, 9, 23))
    assert first_missing(at(DAY, 9, 15), at(DAY, 9, 17), (1, 2, 3)) == (at(DAY, 9, 15), at(DAY, 9, 18))
    assert first_missing(at(DAY, 9, 15), None, (1, 5, 15)) == (at(DAY, 9, 15), at(DAY, 9, 15))
    bars = [(at(DAY, 10, m), 9_990 + m, 10_000 + m, 9_980, 9_995 + m, 1_000 + m, 0) for m in (30, 31, 32)]
    n = kc.seed(EQ, bars, keep, at(DAY, 10, 33), now_ns=at(DAY, 10, 33, 13))
    assert n > 0
    hist = [r for r in sink.rows if r["source"] == "history"]
    one = sorted(r["bar_start"][:16] for r in hist if r["interval_min"] == 1)
    assert one == [ist_label(DAY, 10, 31), ist_label(DAY, 10, 32)]
    m32 = [r for r in hist if r["interval_min"] == 1 and r["bar_start"][:16] == ist_label(DAY, 10, 32)][0]
    assert m32["final"] and (m32["open"], m32["close"], m32["volume"]) == ("100.22", "100.27", 1_032)
    # the 5-minute candle 10:30-10:35 is made of the three history minutes and the live 10:33
    kc.close_due(at(DAY, 10, 35, 3))
    five = candles(sink, EQ, 5)[ist_label(DAY, 10, 30)]
    assert five["final"] and five["open"] == "100.20" and five["close"] == "100.10"
    assert five["volume"] == 1_030 + 1_031 + 1_032 + 50


def test_history_records_to_bars_from_the_recorded_response():
    doc = json.loads(shared_file("kite", "historical_minute.json").read_text())
    # what kiteconnect's historical_data makes of it
    recs = [{"date": dateutil.parser.parse(c[0]), "open": c[1], "high": c[2], "low": c[3], "close": c[4],
             "volume": c[5]} for c in doc["data"]["candles"]]
    bars = H.bars_from_records(recs, 408065)
    first = datetime(2017, 12, 15, 9, 15, tzinfo=IST)
    assert bars[0] == (int(first.timestamp()) * NS, 170450, 170500, 169925, 170280, 2499, 0)
    assert [b[0] for b in bars] == [int((first + timedelta(minutes=i)).timestamp()) * NS for i in range(6)]
    no_vol = H.bars_from_records(recs, 408065, with_volume=False, first_ns=bars[1][0], last_ns=bars[2][0])
    assert [b[5] for b in no_vol] == [None, None] and len(no_vol) == 2
    with pytest.raises(ValueError):
        H.bars_from_records([{"date": first, "open": 1}], 408065)
    assert ist_text(bars[0][0]) == "2017-12-15 09:15:00"


def test_pacer_never_allows_more_than_kites_limit_in_a_second():
    now = [0.0]

    class Stop:
        def wait(self, delay):
            now[0] += delay
            return False

    p = H.Pacer(HISTORICAL_REQUESTS_PER_SECOND, margin=0.1, clock=lambda: now[0])
    sent = []
    for _ in range(20):
        assert p.wait(Stop())
        sent.append(now[0])
    assert HISTORICAL_REQUESTS_PER_SECOND == 3
    for i in range(len(sent) - 3):
        assert sent[i + 3] - sent[i] >= 1.0
    stopped = threading.Event()
    stopped.set()
    one = H.Pacer(1, clock=lambda: 0.0)
    assert one.wait(stopped) is True          # the first goes at once
    assert one.wait(stopped) is False         # the second would wait: stopped instead


def test_fill_retries_the_rate_limit_and_skips_refusals():
    from kiteconnect import exceptions as kex

    calls = []

    class Kite:
        def historical_data(self, token, frm, to, interval):
            calls.append((token, frm, to, interval))
            if token == 1 and len([c for c in calls if c[0] == 1]) == 1:
                raise kex.NetworkException("Too many requests", code=429)
            if token == 2:
                raise kex.InputException("invalid token", code=400)
            return [{"date": datetime(2024, 3, 1, 10, 0, tzinfo=IST), "open": 1.5, "high": 2, "low": 1, "close": 1.75,
                     "volume": 9}]

    class Stop(threading.Event):
        def wait(self, timeout=None):
            return self.is_set()

    got = {}
    plan = [(1, at(DAY, 10, 0), at(DAY, 10, 0), True), (2, at(DAY, 10, 0), at(DAY, 10, 0), True),
            (3, at(DAY, 10, 0), at(DAY, 10, 5), False)]
    res = H.fill(Kite(), plan, at(DAY, 10, 2), lambda t, b, k, u: got.setdefault(t, (b, k, u)), Stop(),
                 H.Pacer(clock=iter(range(0, 10**6, 2)).__next__))
    assert (res.instruments, res.failed, res.bars) == (1, 1, 1)
    assert got[1][0] == [(at(DAY, 10, 0), 150, 200, 100, 175, 9, 0)] and got[1][2] == at(DAY, 10, 3)
    assert 3 not in got                       # nothing missed: its first missing minute is after 10:02
    assert calls[0] == (1, "2024-03-01 10:00:00", "2024-03-01 10:02:00", "minute")


# ---------------------------------------------------------------------------- the simulator


def test_simulator_minute_candles_are_those_of_its_generated_trades():
    from feeds.sim.kite_instruments import InstrumentMaster, SessionCalendar, historical_candles
    from feeds.sim.kite_packets import Market

    clock = [at(DAY, 10, 0, 5) / NS]
    master = InstrumentMaster.build(None, min_nse_equities=3)
    insts = master.instruments
    m = Market([i.instrument_token for i in insts], [i.tick_size for i in insts],
               [i.reference_price for i in insts], seed=1, clock=lambda: clock[0])
    row = m.row_of[EQ2]
    trades = []
    for k in range(200):                     # 200 trades over ~3 minutes
        clock[0] += 1
        vol0 = int(m.volume[row])
        m.advance(np.array([row]))
        trades.append((int(clock[0]), int(m.last_price[row]), int(m.volume[row]) - vol0))
    bars = m.bars.bars(row, 0, 2**62)
    want = {}
    for t, p, q in trades:
        mm = t - t % 60
        o, h, lo, c, v, n = want.get(mm, (p, p, p, p, 0, 0))
        want[mm] = (o, max(h, p), min(lo, p), p, v + q, n + 1)
    assert [(b.minute, b.open, b.high, b.low, b.close, b.volume, b.trades) for b in bars] == \
        [(mm, *want[mm]) for mm in sorted(want)]
    inst = master.by_token[EQ2]
    got = historical_candles(inst, 2450.0, "minute", datetime.combine(DAY, dtime(9, 15), tzinfo=IST),
                             datetime.combine(DAY, dtime(15, 29), tzinfo=IST), calendar=SessionCalendar(),
                             now=datetime.fromtimestamp(clock[0], IST),
                             traded=lambda a, b: m.bars.bars(row, a, b), traded_since=m.bars.since)
    mine = [c for c in got if c[0] >= "2024-03-01T10:00"]
    assert [c[0] for c in mine] == [datetime.fromtimestamp(mm, IST).strftime("%Y-%m-%dT%H:%M:%S%z")
                                    for mm in sorted(want)]
    assert [c[1:] for c in mine] == [[want[mm][0] / 100, want[mm][1] / 100, want[mm][2] / 100, want[mm][3] / 100,
                                      want[mm][4]] for mm in sorted(want)]
    # minutes before the simulated market began are the generated ones, up to 10:00
    assert [c[0] for c in got if c[0] < "2024-03-01T10:00"][-1] == "2024-03-01T09:59:00+0530"
    five = historical_candles(inst, 2450.0, "5minute", datetime.combine(DAY, dtime(10, 0), tzinfo=IST),
                              datetime.combine(DAY, dtime(10, 0), tzinfo=IST), calendar=SessionCalendar(),
                              now=datetime.fromtimestamp(clock[0], IST),
                              traded=lambda a, b: m.bars.bars(row, a, b), traded_since=m.bars.since)
    assert five == [["2024-03-01T10:00:00+0530", mine[0][1], max(c[2] for c in mine), min(c[3] for c in mine),
                     mine[-1][4], sum(c[5] for c in mine)]]


def test_simulator_historical_api_limit_and_errors_are_kites():
    """More than 3 historical requests a second answer HTTP 429 "Too many requests"
    (NetworkException); an unknown instrument is an InputException; the
    envelope is Kite's."""
    import time

    import requests
    from kiteconnect import KiteConnect
    from kiteconnect import exceptions as kex

    from feeds.sim.kite import KiteSimulator

    with KiteSimulator(min_nse_equities=5, seed=3).running() as sim:
        kite = KiteConnect(sim.account.api_key, access_token=sim.issue_access_token(), root=sim.base_url)
        day = "2024-03-01"
        deadline = time.monotonic() + 60
        while True:                       # calls in a row: some four of them fall within one second
            try:
                kite.historical_data(EQ, f"{day} 09:15:00", f"{day} 09:20:00", "minute")
            except kex.NetworkException as e:
                exc = e
                break
            assert time.monotonic() < deadline, "historical calls in a row were never refused"
        assert exc.code == 429 and str(exc) == "Too many requests"
        time.sleep(1.2)
        raw = requests.get(f"{sim.base_url}/instruments/historical/12345/minute",
                           params={"from": f"{day} 09:15:00", "to": f"{day} 09:20:00"},
                           headers={"Authorization": f"token {kite.api_key}:{kite.access_token}"}, timeout=5)
        assert raw.status_code == 400
        assert raw.json() == {"status": "error", "message": "invalid token", "data": None,
                              "error_type": "InputException"}
