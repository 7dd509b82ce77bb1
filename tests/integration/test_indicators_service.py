"""feed-indicators against a real PostgreSQL: candles seeded in kite_candle, ibkr_candle and
binance_kline, the program run as a process logging in as feeds_indicators, new closed candles
inserted as the collectors do, the indicator rows compared with TA-Lib's batch functions on the
same series (exact equality); a revision; a restart in the middle; an index without volume; a
source table that does not exist yet; a bad indicator (exit 78)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import numpy as np
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from collector_process import CollectorProcess, collector_env, collectors_of, q, wait_for, write_config
from conftest import ROOT, shared_file
from feeds import indicators as I
from feeds.settings import INDICATORS

UTC = timezone.utc
SPECS = I.load_specs(INDICATORS[0].default, "x.toml")
WARMUP = 300
KITE, INDEX, IBKR, BINANCE, DHAN = "341249", "256265", "AAPL", "BTCUSDT", "NSE_EQ:1333"
ZONES = {"kite": ZoneInfo("Asia/Kolkata"), "ibkr": ZoneInfo("America/New_York"), "binance": None,
         "dhan": ZoneInfo("Asia/Kolkata")}


def hdfcbank():
    d = json.loads(shared_file("dhan", "intraday_1min_hdfcbank_2024-09-11..13.json").read_text())["response"]
    return ([datetime.fromtimestamp(t, UTC) for t in d["timestamp"]],
            {k: np.array(d[k], dtype=np.float64) for k in I.COLUMNS})


def walk(n: int, seed: int = 3):
    rng = np.random.default_rng(seed)
    close = np.round(60000 * np.exp(np.cumsum(rng.normal(0, 0.001, n))), 1)
    open_ = np.concatenate([[close[0]], close[:-1]])
    high = np.maximum(open_, close) + np.round(np.abs(rng.normal(0, 5, n)), 1)
    low = np.minimum(open_, close) - np.round(np.abs(rng.normal(0, 5, n)), 1)
    volume = np.round(rng.exponential(20, n), 3)
    t0 = datetime(2024, 9, 11, 0, 0, tzinfo=UTC)
    return [t0 + timedelta(minutes=i) for i in range(n)], {"open": open_, "high": high, "low": low,
                                                             "close": close, "volume": volume}


def num(x: float) -> str | None:
    return None if math.isnan(x) else repr(float(x))


def insert_candles(dsn, table, key, ts, cols, idx, revision=0, volume=True):
    rows = []
    for i in idx:
        end = ts[i] + timedelta(minutes=1)
        vals = [num(cols[k][i]) for k in ("open", "high", "low", "close")]
        vol = num(cols["volume"][i]) if volume else None
        rows.append((key, 1, ts[i], end, *vals, vol, 10, True, revision, "live",
                     datetime.now(UTC) + timedelta(microseconds=revision)))
    col = {"kite_candle": "instrument_token", "ibkr_candle": "symbol", "dhan_candle": "security_id"}[table]
    if table == "dhan_candle":
        col, key = "exchange_segment, security_id", key.split(":")[1]
        rows = [("NSE_EQ", *r) for r in rows]
        rows = [(r[0], int(key), *r[2:]) for r in rows]
    with psycopg.connect(dsn, autocommit=True) as c:
        c.cursor().executemany(
            f"INSERT INTO {table} ({col}, interval_min, bar_start, bar_end, open, high, low, close, volume, ticks, "
            f"final, revision, source, recorded_at) VALUES ({'%s, ' if table == 'dhan_candle' else ''}%s, %s, %s, %s, %s::numeric, %s::numeric, %s::numeric, "
            f"%s::numeric, %s::numeric, %s, %s, %s, %s, %s)", rows)


def insert_klines(dsn, ts, cols, idx):
    with psycopg.connect(dsn, autocommit=True) as c:
        c.cursor().executemany(
            "INSERT INTO binance_kline (symbol, interval, open_time, close_time, open, high, low, close, volume, "
            "trade_count, quote_volume, taker_buy_volume, taker_buy_quote_volume, recv_time, source) "
            "VALUES (%s, '1m', %s, %s, %s::numeric, %s::numeric, %s::numeric, %s::numeric, %s::numeric, 5, 0, 0, 0, "
            "now(), 'ws')",
            [(BINANCE, ts[i], ts[i] + timedelta(seconds=59.999), *(num(cols[k][i]) for k in I.COLUMNS)) for i in idx])


def stored(dsn, venue, instrument) -> dict:
    return {(r[0], r[1], r[2]): r[3] for r in q(
        dsn, "SELECT bar_start, indicator, output, value FROM indicator_latest WHERE venue = %s AND instrument = %s",
        venue, instrument)}


def expected(ts, cols, zone, specs=SPECS, first=None, obv_seed=None) -> dict:
    sess = I.session_key(zone)
    keys = np.array([sess(I._us(t)) for t in ts])
    out = {}
    for spec in specs:
        c = cols
        if spec.name == "OBV" and obv_seed is not None:
            c = dict(cols, volume=cols["volume"].copy())
            c["volume"][0] = obv_seed
        for name, arr in zip(spec.outputs, I.batch_reference(spec, c, keys)):
            for i, t in enumerate(ts):
                if not math.isnan(arr[i]) and (first is None or t >= first):
                    out[(t, spec.text, name)] = float(arr[i])
    return out


def diff(got: dict, want: dict) -> list:
    keys = sorted(set(got) | set(want), key=str)
    return [(k, got.get(k), want.get(k)) for k in keys if got.get(k) != want.get(k)][:5]


class Indicators(CollectorProcess):
    output_tail = 20000

    def __init__(self, tmp_path, dsn, functions=None):
        cfg = write_config(tmp_path / "indicators.toml", {
            "indicators": {"functions": functions or INDICATORS[0].default, "warmup_bars": WARMUP,
                           "poll_interval": 0.5, "status_interval": 2.0},
            "sink": {"spool_dir": str(tmp_path / "spool"), "flush_interval": 0.1},
            "metrics": {"port": 0}})
        self.start([sys.executable, str(ROOT / "bin" / "feed-indicators"), "--config", str(cfg)],
                   {**collector_env(dsn), "PYTHONPATH": str(ROOT / "lib")})


def cut(cols, lo, hi):
    return {k: v[lo:hi] for k, v in cols.items()}


@pytest.fixture
def programs():
    yield from collectors_of(Indicators)


SERIES = (("kite", KITE, "kite_candle"), ("ibkr", IBKR, "ibkr_candle"), ("dhan", DHAN, "dhan_candle"))


def test_feed_indicators_end_to_end(db, tmp_path, programs):
    role = make_conninfo(db, user="feeds_indicators")
    ts, cols = hdfcbank()
    bts, bcols = walk(400)
    # 1. stored before the start: 250 one-minute candles of each series, an index without volume
    insert_candles(db, "kite_candle", 341249, ts, cols, range(250))
    insert_candles(db, "kite_candle", 256265, ts, cols, range(250), volume=False)
    insert_candles(db, "ibkr_candle", IBKR, ts, cols, range(250))
    insert_candles(db, "dhan_candle", DHAN, ts, cols, range(250))
    insert_klines(db, bts, bcols, range(250))
    p = programs(tmp_path, role)
    p.wait_line("warmed up 5 series")
    p.wait_line("reading binance_kline, kite_candle, ibkr_candle, dhan_candle")
    # every stored bar gets its values (nothing was stored before): TA-Lib's batch values
    for venue, inst, t, c in (("kite", KITE, ts, cols), ("ibkr", IBKR, ts, cols), ("dhan", DHAN, ts, cols),
                              ("binance", BINANCE, bts, bcols)):
        want = expected(t[:250], cut(c, 0, 250), ZONES[venue])
        got = wait_for(lambda: (lambda g: g if len(g) >= len(want) else None)(stored(db, venue, inst)), 60)
        assert got and not diff(got, want), (venue, diff(got or {}, want))
    index = stored(db, "kite", INDEX)
    assert {k[1] for k in index} == {s.text for s in SPECS if not s.volume}

    # 2. new closed candles, a few a second as the collectors commit them
    for i in range(250, 280, 3):
        for venue, inst, table in SERIES:
            insert_candles(db, table, int(inst) if venue == "kite" else inst, ts, cols, range(i, i + 3))
        insert_klines(db, bts, bcols, range(i, i + 3))
        time.sleep(0.05)
    for venue, inst, t, c in (("kite", KITE, ts, cols), ("ibkr", IBKR, ts, cols), ("dhan", DHAN, ts, cols),
                              ("binance", BINANCE, bts, bcols)):
        want = expected(t[:280], cut(c, 0, 280), ZONES[venue])
        got = wait_for(lambda: (lambda g: g if (t[279], "SMA(timeperiod=20)", "real") in g else None)(
            stored(db, venue, inst)), 60)
        assert got and not diff(got, want), (venue, diff(got or {}, want))

    # 3. a revision: kite's candle 270 written again with revision 1 (a late trade)
    rcols = {k: v.copy() for k, v in cols.items()}
    rcols["close"][270] += 0.5
    rcols["high"][270] = max(rcols["high"][270], rcols["close"][270])
    rcols["volume"][270] += 777
    insert_candles(db, "kite_candle", 341249, ts, rcols, [270], revision=1)
    want = expected(ts[:280], cut(rcols, 0, 280), ZONES["kite"])
    got = wait_for(lambda: (lambda g: g if g[(ts[279], "OBV", "real")] == want[(ts[279], "OBV", "real")] else None)(
        stored(db, "kite", KITE)), 60)
    assert got and not diff(got, want), diff(got or {}, want)
    n270 = q(db, "SELECT count(DISTINCT computed_at) FROM indicator_value WHERE venue = 'kite' AND instrument = %s "
                 "AND bar_start = %s AND indicator = 'OBV'", KITE, ts[270])[0][0]
    assert n270 == 2                                        # both kept; indicator_latest shows the newest
    assert p.stop() == 0
    assert "stopped: all rows committed or spooled" in p.output

    # 4. candles stored while feed-indicators is down, a restart, then live candles again
    insert_candles(db, "kite_candle", 341249, ts, rcols, range(280, 300))
    insert_candles(db, "ibkr_candle", IBKR, ts, cols, range(280, 300))
    insert_candles(db, "dhan_candle", DHAN, ts, cols, range(280, 300))
    insert_klines(db, bts, bcols, range(280, 300))
    p = programs(tmp_path, role)
    p.wait_line("warmed up 5 series")
    for i in range(300, 330, 5):
        insert_candles(db, "kite_candle", 341249, ts, rcols, range(i, i + 5))
        insert_candles(db, "ibkr_candle", IBKR, ts, cols, range(i, i + 5))
        insert_candles(db, "dhan_candle", DHAN, ts, cols, range(i, i + 5))
        insert_klines(db, bts, bcols, range(i, i + 5))
        time.sleep(0.05)
    last = (ts[329], "SMA(timeperiod=20)", "real")
    for venue, inst, t, c in (("kite", KITE, ts, rcols), ("ibkr", IBKR, ts, cols), ("dhan", DHAN, ts, cols),
                              ("binance", BINANCE, bts, bcols)):
        got = wait_for(lambda: (lambda g: g if (t[329], *last[1:]) in g else None)(stored(db, venue, inst)), 60)
        assert got, venue
        full = expected(t[:330], cut(c, 0, 330), ZONES[venue])
        # the restarted program warmed up from the last 300 stored bars, back to the first bar of the
        # newest bar's VWAP session; its values are TA-Lib's on that series (OBV re-based on its
        # stored value at the first warm-up bar)
        sess = I.session_key(ZONES[venue])
        lo = 300 - WARMUP
        while lo > 0 and sess(I._us(t[lo - 1])) == sess(I._us(t[299])):
            lo -= 1
        seed = full.get((t[lo], "OBV", "real"))
        want = expected(t[lo:330], cut(c, lo, 330), ZONES[venue], first=t[280], obv_seed=seed)
        mine = {k: v for k, v in got.items() if k[0] >= t[280]}
        assert not diff(mine, want), (venue, lo, diff(mine, want))
        # and they agree with the program that never stopped: exactly where the warm-up reached the
        # series' first bar, else within a few units in the last place (tests/unit/test_indicators.py)
        for k, v in mine.items():
            assert v == pytest.approx(full[k], rel=1e-13, abs=1e-9), (venue, k)
        if lo == 0:
            assert mine == {k: v for k, v in full.items() if k[0] >= t[280]}
    # its heartbeat row, written as feeds_indicators (row-level security lets it write only its own)
    assert wait_for(lambda: q(db, "SELECT state FROM feed_heartbeat WHERE unit = 'feed-indicators.service'")
                    == [("running",)], 30)
    assert p.stop() == 0
    assert q(db, "SELECT state FROM feed_heartbeat WHERE unit = 'feed-indicators.service'") == [("stopped",)]


def test_a_missing_source_table_is_skipped_with_one_line(db, caplog):
    from feeds.indicators_main import SOURCES, Engine, Settings, Source
    st = Settings(specs=SPECS, venues=["kite", "dhan"], intervals=[], warmup_bars=WARMUP, poll_interval=1.0,
                  status_interval=10.0)
    later = Source("dhan", "dhan_candle_v9", instrument="security_id::text", minutes="interval_min",
                   series="security_id = %(instrument)s::bigint AND interval_min = %(minutes)s")
    eng = Engine(db, st, emit=lambda rows: None, sources=[*SOURCES, later])
    with psycopg.connect(db, autocommit=True) as c, caplog.at_level("INFO", "feeds.indicators"):
        eng.start(c)
        eng.poll(c)
    assert [s.table for s in eng.present] == ["kite_candle", "dhan_candle"]
    lines = [r.getMessage() for r in caplog.records if "does not exist" in r.getMessage()]
    assert lines == ["dhan: table dhan_candle_v9 does not exist (yet): its candles are not read"]


def test_an_unknown_indicator_stops_with_exit_78(db, tmp_path, programs):
    p = programs(tmp_path, db, functions=["SMA(timeperiod=20)", "SUPERSMOOTHER(timeperiod=5)"])
    assert p.wait(60) == 78
    assert "indicators.functions" in p.output and "indicators.toml" in p.output
    assert "SUPERSMOOTHER is not a TA-Lib function" in p.output


def test_check_config_lists_the_normalised_indicators(tmp_path, db):
    cfg = write_config(tmp_path / "indicators.toml", {"indicators": {"functions": ["MACD", "VWAP"]}})
    out = subprocess.run([sys.executable, str(ROOT / "bin" / "feed-indicators"), "--config", str(cfg),
                          "--check-config"], env={**collector_env(db), "PYTHONPATH": str(ROOT / "lib")},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "MACD(fastperiod=12,signalperiod=9,slowperiod=26): macd, macdsignal, macdhist" in out.stdout


def test_a_lost_database_session_is_reopened_and_nothing_is_missed(db, tmp_path, programs):
    """The reading session killed by the server (a restart of PostgreSQL, a cut connection): the
    program logs it, reconnects and reads the candles stored meanwhile; the series stay warm."""
    ts, cols = hdfcbank()
    insert_candles(db, "ibkr_candle", IBKR, ts, cols, range(100))
    p = programs(tmp_path, db)
    p.wait_line("warmed up 1 series")
    wait_for(lambda: stored(db, "ibkr", IBKR).get((ts[99], "SMA(timeperiod=20)", "real")), 60)
    killed = q(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'feed-indicators'")
    assert killed and all(r[0] for r in killed)
    insert_candles(db, "ibkr_candle", IBKR, ts, cols, range(100, 120))
    p.wait_line("database: ")
    want = expected(ts[:120], cut(cols, 0, 120), ZONES["ibkr"])
    got = wait_for(lambda: (lambda g: g if len(g) >= len(want) else None)(stored(db, "ibkr", IBKR)), 60)
    assert got and not diff(got, want), diff(got or {}, want)
    assert p.stop() == 0
