"""The indicator engine (feeds.indicators): specs checked against TA-Lib, incremental values equal to
TA-Lib's batch functions bar for bar, restarts, revisions, VWAP and candles without volume.

Equality is exact (``==`` on doubles, NaN where TA-Lib has no value yet): TA-Lib documents its
stream handles as bit-identical to its Function API on the same series.  Only the comparison of a
restarted engine with one that never stopped allows, for SMA, BBANDS, ADX, RSI and ATR, a
relative difference of 1e-13 (a few units in the last place): TA-Lib's running sums round along
the whole path since the first bar (see the module docstring of feeds.indicators).
"""
from __future__ import annotations

import csv
import json
import math
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import talib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import shared_file
from feeds import indicators as I
from feeds.config import ConfigError
from feeds.settings import INDICATORS

UTC = timezone.utc
IST = ZoneInfo("Asia/Kolkata")
DEFAULTS = INDICATORS[0].default
SPECS = I.load_specs(DEFAULTS, "etc/indicators.toml")
#: exact after a 500-bar warm-up on the real data; the others within 1e-13 (running sums; RSI
#: and ATR differ in the last place on a few bars)
RESTART_EXACT = {"EMA", "MACD", "OBV", "VWAP"}


# ----------------------------------------------------------------------------- data

def hdfcbank() -> tuple[list[datetime], dict[str, np.ndarray]]:
    """Real one-minute NSE candles: HDFCBANK, 3 sessions, 1,125 bars (Dhan's intraday charts)."""
    d = json.loads(shared_file("dhan", "intraday_1min_hdfcbank_2024-09-11..13.json").read_text())["response"]
    ts = [datetime.fromtimestamp(t, UTC) for t in d["timestamp"]]
    return ts, {k: np.array(d[k], dtype=np.float64) for k in I.COLUMNS}


def esu4() -> tuple[list[datetime], dict[str, np.ndarray]]:
    """Real one-minute CME bars (E-mini S&P ESU4), 30 bars across midnight UTC."""
    rows = list(csv.DictReader(shared_file("cme", "esu4-ohlcv-1m-2024-07-01T2340.csv").open()))
    ts = [datetime.fromisoformat(r["bar_start"]) for r in rows]
    return ts, {k: np.array([float(r[k]) for r in rows]) for k in I.COLUMNS}


def bars_of(ts, cols, version: int = 0) -> list[I.Bar]:
    return [I.Bar(ts[i], *(float(cols[k][i]) for k in I.COLUMNS), version=version) for i in range(len(ts))]


def feed(series: I.Series, bars, one_by_one: bool = True) -> dict:
    """(bar_start, indicator, output) -> value of everything the engine emitted (the last one wins)."""
    out = {}
    for chunk in ([b] for b in bars) if one_by_one else [bars]:
        for v in series.apply(chunk):
            out[(v.bar_start, v.indicator, v.output)] = v.value
    return out


def expected(spec: I.Spec, ts, cols, zone=IST) -> dict:
    """TA-Lib's batch values (VWAP: per session), NaN dropped."""
    sess = I.session_key(zone)
    keys = np.array([sess(I._us(t)) for t in ts])
    out = {}
    for name, arr in zip(spec.outputs, I.batch_reference(spec, cols, keys)):
        for i, t in enumerate(ts):
            if not math.isnan(arr[i]):
                out[(t, spec.text, name)] = float(arr[i])
    return out


def assert_equal_to_batch(got: dict, specs, ts, cols, zone=IST, first: datetime | None = None) -> int:
    n = 0
    for spec in specs:
        want = expected(spec, ts, cols, zone)
        mine = {k: v for k, v in got.items() if k[1] == spec.text}
        if first is not None:
            want = {k: v for k, v in want.items() if k[0] >= first}
            mine = {k: v for k, v in mine.items() if k[0] >= first}
        assert mine.keys() == want.keys(), spec.text
        bad = [(k, mine[k], want[k]) for k in want if mine[k] != want[k]]
        assert not bad, f"{spec.text}: {len(bad)} values differ, first {bad[0]}"
        n += len(want)
    return n


# ----------------------------------------------------------------------------- specs

def test_specs_are_normalised_with_every_parameter():
    s = I.parse_spec("MACD(fastperiod=12, slowperiod=26, signalperiod=9)")
    assert s.text == "MACD(fastperiod=12,signalperiod=9,slowperiod=26)"
    assert s.outputs == ("macd", "macdsignal", "macdhist") and s.inputs == ("close",)
    assert I.parse_spec("RSI").text == I.parse_spec("RSI(timeperiod=14)").text == "RSI(timeperiod=14)"
    b = I.parse_spec("BBANDS(timeperiod=20, nbdevup=2, nbdevdn=2.5)")
    assert b.text == "BBANDS(matype=0,nbdevdn=2.5,nbdevup=2,timeperiod=20)"
    assert b.outputs == ("upperband", "middleband", "lowerband")
    assert I.parse_spec("OBV").inputs == ("close", "volume") and I.parse_spec("OBV").volume
    assert I.parse_spec("ATR(timeperiod=14)").inputs == ("high", "low", "close")
    assert I.parse_spec("VWAP").inputs == ("high", "low", "close", "volume")
    assert [s.text for s in SPECS] == [
        "SMA(timeperiod=20)", "EMA(timeperiod=20)", "RSI(timeperiod=14)",
        "MACD(fastperiod=12,signalperiod=9,slowperiod=26)", "BBANDS(matype=0,nbdevdn=2,nbdevup=2,timeperiod=20)",
        "ATR(timeperiod=14)", "ADX(timeperiod=14)", "OBV", "VWAP"]


@pytest.mark.parametrize("text, reason", [
    ("SMAX(timeperiod=20)", "SMAX is not a TA-Lib function"),
    ("SMA(period=20)", "SMA has no parameter period"),
    ("SMA(timeperiod=2.5)", "timeperiod must be an integer"),
    ("SMA(timeperiod=0)", "TA-Lib refuses these parameters"),
    ("RSI(timeperiod=14, timeperiod=15)", "timeperiod given twice"),
    ("MAVP", "needs an input a candle does not have (periods)"),
    ("VWAP(timeperiod=3)", "VWAP takes no parameters"),
    ("sma(timeperiod=20)", "is not NAME or NAME(param=value, ...)"),
    ("SMA(timeperiod=)", "is not param=value"),
])
def test_bad_specs_name_the_key_and_file(text, reason):
    with pytest.raises(ConfigError) as e:
        I.load_specs(["EMA(timeperiod=20)", text], "/etc/feeds/indicators.toml")
    line = str(e.value)
    assert "indicators.functions" in line and "/etc/feeds/indicators.toml" in line and reason in line, line


def test_two_spellings_of_one_indicator_are_refused():
    with pytest.raises(ConfigError, match="same indicator"):
        I.load_specs(["RSI", "RSI(timeperiod=14)"], "x.toml")


def test_every_setting_default_is_a_valid_spec():
    assert len(SPECS) == len(DEFAULTS)


# ----------------------------------------------------------------------------- incremental == batch

@pytest.mark.parametrize("one_by_one", [True, False], ids=["bar-by-bar", "in-one-batch"])
def test_real_nse_candles_incremental_equals_batch(one_by_one):
    ts, cols = hdfcbank()
    s = I.Series(SPECS, 500, I.session_key(IST))
    got = feed(s, bars_of(ts, cols), one_by_one)
    n = assert_equal_to_batch(got, SPECS, ts, cols)
    assert n > 9 * 1000 and s.c.rebuilds == 0
    assert len(s) <= 1000                     # bars kept stay bounded


def test_real_cme_bars_incremental_equals_batch():
    ts, cols = esu4()
    specs = I.load_specs(DEFAULTS + ["SMA(timeperiod=5)", "CCI(timeperiod=5)", "STOCH"], "x.toml")
    s = I.Series(specs, 500, I.session_key(None))
    got = feed(s, bars_of(ts, cols))
    assert_equal_to_batch(got, specs, ts, cols, zone=None)
    # the window crosses midnight UTC: VWAP starts again at 00:00 (a Binance-style UTC session)
    midnight = datetime(2024, 7, 2, tzinfo=UTC)
    first = next(i for i, t in enumerate(ts) if t >= midnight)
    tp = (cols["high"][first] + cols["low"][first] + cols["close"][first]) / 3
    assert got[(midnight, "VWAP", "real")] == pytest.approx(tp, rel=1e-15)


@st.composite
def random_walk(draw):
    n = draw(st.integers(min_value=1, max_value=400))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.002, n)))
    open_ = np.concatenate([[close[0]], close[:-1]])
    spread = np.abs(rng.normal(0, 0.001, n)) * close
    high = np.maximum(open_, close) + spread
    low = np.minimum(open_, close) - spread
    volume = np.floor(rng.exponential(1000, n)) * draw(st.sampled_from([1.0, 0.001]))
    step = draw(st.sampled_from([1, 5, 60]))
    t0 = datetime(2024, 3, 1, 20, 0, tzinfo=UTC) + timedelta(minutes=draw(st.integers(0, 1440)))
    ts = [t0 + timedelta(minutes=step * i) for i in range(n)]
    return ts, {"open": open_, "high": high, "low": low, "close": close, "volume": volume}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_walk(), st.sampled_from(["UTC", "Asia/Kolkata", "America/New_York"]))
def test_random_walks_incremental_equals_batch(walk, zone):
    ts, cols = walk
    z = None if zone == "UTC" else ZoneInfo(zone)
    s = I.Series(SPECS, 120, I.session_key(z))
    got = feed(s, bars_of(ts, cols))
    assert_equal_to_batch(got, SPECS, ts, cols, zone=z)


# ----------------------------------------------------------------------------- restart

def never_stopped(ts, cols, specs=SPECS, capacity=500):
    s = I.Series(specs, capacity, I.session_key(IST))
    return feed(s, bars_of(ts, cols))


@pytest.mark.parametrize("cut", [520, 612, 700, 871, 1093])
def test_restart_in_the_middle_with_warm_up(cut):
    """A restart at bar ``cut`` warms up from the last 500 stored bars (back to the session's first
    bar for VWAP, OBV re-based on its stored value), as feed-indicators does."""
    ts, cols = hdfcbank()
    before = never_stopped(ts, cols)
    W = 500
    warm_from = cut - W
    sess = I.session_key(IST)
    while warm_from > 0 and sess(I._us(ts[warm_from - 1])) == sess(I._us(ts[cut - 1])):
        warm_from -= 1
    bars = bars_of(ts, cols)
    seeds = {"OBV": before[(ts[warm_from], "OBV", "real")]}
    s = I.Series(SPECS, W, sess)
    # the program was down for the bars cut-10 .. cut-1: their values are written at the warm-up
    caught = s.warm(bars[warm_from:cut], {x.text: ts[cut - 10] for x in SPECS}, seeds)
    after = {(v.bar_start, v.indicator, v.output): v.value for v in caught}
    assert min(k[0] for k in after) == ts[cut - 10]
    after.update(feed(s, bars[cut:]))
    # 1. exactly TA-Lib's batch values on the series the engine holds (warm-up bars and after),
    #    OBV's first volume being its stored value there
    window = {k: v[warm_from:].copy() for k, v in cols.items()}
    window_obv = window["volume"].copy()
    window_obv[0] = seeds["OBV"]
    for spec in SPECS:
        c = dict(window, volume=window_obv) if spec.name == "OBV" else window
        want = expected(spec, ts[warm_from:], c)
        want = {k: v for k, v in want.items() if k[0] >= ts[cut - 10]}
        assert {k: v for k, v in after.items() if k[1] == spec.text} == want, spec.text
    # 2. against the engine that never stopped
    for spec in SPECS:
        keys = [k for k in after if k[1] == spec.text]
        assert keys and all(k in before for k in keys)
        if spec.name in RESTART_EXACT:
            assert all(after[k] == before[k] for k in keys), spec.text
        else:
            worst = max(abs(after[k] - before[k]) / abs(before[k]) for k in keys if before[k])
            assert worst < 1e-13, (spec.text, worst)


def test_restart_without_a_stored_obv_starts_obv_from_the_warm_up():
    ts, cols = hdfcbank()
    s = I.Series(SPECS, 500, I.session_key(IST))
    got = {(v.bar_start, v.indicator, v.output): v.value for v in s.warm(bars_of(ts, cols)[100:600],
                                                                         {"OBV": ts[100]})}
    assert got[(ts[599], "OBV", "real")] == talib.OBV(cols["close"][100:600], cols["volume"][100:600])[-1]


# ----------------------------------------------------------------------------- revisions

def test_a_revised_candle_recomputes_from_that_bar():
    ts, cols = hdfcbank()
    ts, cols = ts[:300], {k: v[:300].copy() for k, v in cols.items()}
    s = I.Series(SPECS, 500, I.session_key(IST))
    feed(s, bars_of(ts, cols, version=1))
    r = 250
    cols["close"][r] += 0.35
    cols["high"][r] = max(cols["high"][r], cols["close"][r])
    cols["volume"][r] += 1234
    revised = I.Bar(ts[r], *(float(cols[k][r]) for k in I.COLUMNS), version=2)
    got = feed(s, [revised])
    assert s.c.rebuilds == 1 and min(k[0] for k in got) == ts[r]
    assert_equal_to_batch(got, SPECS, ts, cols, first=ts[r])
    # the same revision read again (the poll's overlap), or an older one: nothing
    assert s.apply([revised]) == [] and s.apply([I.Bar(ts[r], 1, 1, 1, 1, 1, version=1)]) == []
    assert s.c.stale == 2
    # later bars go on from the rebuilt handles
    nxt = I.Bar(ts[-1] + timedelta(minutes=1), 1600.0, 1601.0, 1599.0, 1600.5, 1000.0)
    got = feed(s, [nxt])
    ts2 = ts + [nxt.start]
    cols2 = {k: np.append(cols[k], getattr(nxt, k)) for k in I.COLUMNS}
    assert_equal_to_batch(got, SPECS, ts2, cols2, first=nxt.start)


def test_a_late_candle_is_inserted_and_recomputed():
    ts, cols = hdfcbank()
    ts, cols = ts[:200], {k: v[:200] for k, v in cols.items()}
    bars = bars_of(ts, cols)
    s = I.Series(SPECS, 500, I.session_key(IST))
    feed(s, bars[:150] + bars[151:])
    got = feed(s, [bars[150]])
    assert_equal_to_batch(got, SPECS, ts, cols, first=ts[150])
    assert s.c.rebuilds == 1


def test_a_candle_before_the_kept_bars_is_too_old():
    ts, cols = hdfcbank()
    bars = bars_of(ts[:400], {k: v[:400] for k, v in cols.items()})
    s = I.Series(SPECS, 100, I.session_key(IST))
    feed(s, bars[1:])
    assert s.apply([bars[0]]) == [] and s.c.too_old == 1


# ----------------------------------------------------------------------------- VWAP and volume

def test_vwap_against_a_hand_computation():
    """VWAP = sum(tp * volume) / sum(volume), tp = (high + low + close) / 3, reset at each session
    (Kite: the IST trading day; 18:30 UTC is IST midnight)."""
    t0 = datetime(2024, 9, 11, 18, 27, tzinfo=UTC)
    hlcv = [(101.0, 99.0, 100.0, 10.0), (102.0, 100.0, 101.0, 30.0), (103.0, 101.0, 103.0, 0.0),
            (104.0, 98.0, 101.0, 20.0),                          # 18:30 UTC = 00:00 IST: a new session
            (105.0, 103.0, 104.0, 5.0)]
    bars = [I.Bar(t0 + timedelta(minutes=i), h - 0.5, h, l, c, v) for i, (h, l, c, v) in enumerate(hlcv)]
    got = feed(I.Series([I.parse_spec("VWAP")], 10, I.session_key(IST)), bars)
    tp = [(h + l + c) / 3 for h, l, c, _ in hlcv]
    want = [tp[0],
            (tp[0] * 10 + tp[1] * 30) / 40,
            (tp[0] * 10 + tp[1] * 30 + tp[2] * 0) / 40,
            tp[3],
            (tp[3] * 20 + tp[4] * 5) / 25]
    assert [got[(b.start, "VWAP", "real")] for b in bars] == pytest.approx(want, rel=1e-15, abs=0)
    # hand values: 100, 100.75, 100.75, 101, 101.6
    assert want == pytest.approx([100.0, 100.75, 100.75, 101.0, 101.6])
    # the same bars under the UTC day (Binance): one session
    got = feed(I.Series([I.parse_spec("VWAP")], 10, I.session_key(None)), bars)
    assert got[(bars[3].start, "VWAP", "real")] == pytest.approx((tp[0] * 10 + tp[1] * 30 + tp[3] * 20) / 60)


def test_a_session_without_volume_yet_has_no_vwap():
    t0 = datetime(2024, 9, 12, 3, 45, tzinfo=UTC)
    bars = [I.Bar(t0, 10, 11, 9, 10, 0.0), I.Bar(t0 + timedelta(minutes=1), 10, 12, 10, 11, 3.0)]
    s = I.Series([I.parse_spec("VWAP")], 10, I.session_key(IST))
    got = feed(s, bars)
    assert list(got) == [(bars[1].start, "VWAP", "real")] and got[(bars[1].start, "VWAP", "real")] == 11.0
    assert s.c.no_volume == 1                 # TA-Lib's VWAP says 0.0 there: not a price, not written


def test_candles_without_volume_get_no_volume_indicators():
    """An index (volume NULL): OBV and VWAP are skipped and counted; the others are computed."""
    ts, cols = hdfcbank()
    ts, cols = ts[:200], dict(cols)
    cols = {k: v[:200].copy() for k, v in cols.items()}
    cols["volume"][:] = np.nan
    s = I.Series(SPECS, 500, I.session_key(IST))
    got = feed(s, bars_of(ts, cols))
    assert not [k for k in got if k[1] in ("OBV", "VWAP")]
    assert s.c.no_volume == 2 * 200
    assert_equal_to_batch(got, [x for x in SPECS if not x.volume], ts, cols)


def test_a_bar_without_volume_restarts_the_volume_indicators_after_it():
    ts, cols = hdfcbank()
    n, gap = 150, 60
    ts = ts[:n]
    cols = {k: v[:n].copy() for k, v in cols.items()}
    cols["volume"][gap] = np.nan
    s = I.Series(SPECS, 500, I.session_key(IST))
    got = feed(s, bars_of(ts, cols))
    assert not [k for k in got if k[0] == ts[gap] and k[1] in ("OBV", "VWAP")]
    after = {k: v[gap + 1:] for k, v in cols.items()}
    vol = [x for x in SPECS if x.volume]
    assert_equal_to_batch({k: v for k, v in got.items() if k[0] > ts[gap]}, vol, ts[gap + 1:], after)
    assert_equal_to_batch(got, [x for x in SPECS if not x.volume], ts, cols)
    # a revision elsewhere rebuilds the same way
    bars = bars_of(ts, cols, version=1)
    again = feed(s, [I.Bar(ts[100], *(float(cols[k][100]) for k in I.COLUMNS), version=5)])
    assert again == {k: v for k, v in got.items() if k[0] >= ts[100]}
    assert bars


def test_trimming_keeps_the_current_vwap_session_whole():
    """Binance one-minute klines: a UTC day has 1,440 bars, more than the bars kept; a revision
    late in the day still has the whole session for VWAP."""
    rng = np.random.default_rng(7)
    n = 1400
    t0 = datetime(2024, 3, 2, 0, 0, tzinfo=UTC)
    ts = [t0 + timedelta(minutes=i) for i in range(n)]
    close = 100 + np.cumsum(rng.normal(0, 0.1, n))
    cols = {"open": close, "high": close + 0.2, "low": close - 0.2, "close": close,
            "volume": np.floor(rng.exponential(50, n)) + 1}
    spec = I.parse_spec("VWAP")
    s = I.Series([spec], 100, I.session_key(None))
    feed(s, bars_of(ts, cols, version=1))
    assert s.first_start == t0 and len(s) == n
    r = n - 5
    cols["volume"] = cols["volume"].copy()
    cols["volume"][r] += 100
    got = feed(s, [I.Bar(ts[r], *(float(cols[k][r]) for k in I.COLUMNS), version=2)])
    assert_equal_to_batch(got, [spec], ts, cols, zone=None, first=ts[r])
