#!/usr/bin/env python3
"""Benchmark: feed-indicators, 500 symbols x 20 indicators on one-minute candles.

A throwaway PostgreSQL with fsync on (bench/procstats.py), ``bin/feed-indicators`` as the unit
runs it (its own process, the shipped sink settings, LISTEN plus a 1 s poll), and a writer that
plays the candle collector: each "minute" it commits the 500 symbols' one-minute candles for
that minute into ``kite_candle`` (COPY, in --batches transactions, as the sink would), then waits
--every seconds before the next minute (the candles are one-minute bars; the minutes are played
faster than real time so that a run takes a couple of minutes; a minute's work must end before
the next one starts, which the p99 shows).  Every symbol first has --history stored candles, so
the program starts warm.

Figures, from the rows' ``stored_at`` (PostgreSQL's clock_timestamp() at insert, the column
default of both tables):

* per minute: the time from the minute's last candle commit to its last indicator commit
  (max stored_at of the minute's indicator rows - max stored_at of its candles), p50 and p99
  (target p99 < 2 s);
* per symbol and minute: from that symbol's candle to its last indicator row, p50 and p99;
* CPU seconds of the feed-indicators process (user + system, /proc) per 1,000 indicator values,
  over the measured minutes only (the warm-up excluded); and its peak RSS.

Usage: bench/indicators_latency.py [--symbols 500] [--minutes 30] [--every 4] [--batches 2]
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from procstats import durable_cluster, migrated_database, proc_cpu, proc_hwm_mb, stop_processes  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "lib"))

import numpy as np  # noqa: E402
import psycopg  # noqa: E402

from feeds import indicators as I  # noqa: E402

TARGET_P99_S = 2.0
UTC = timezone.utc

#: 20 indicators (the shipped nine and eleven more), 29 outputs a bar
FUNCTIONS = ["SMA(timeperiod=20)", "EMA(timeperiod=20)", "RSI(timeperiod=14)",
             "MACD(fastperiod=12, slowperiod=26, signalperiod=9)", "BBANDS(timeperiod=20, nbdevup=2, nbdevdn=2)",
             "ATR(timeperiod=14)", "ADX(timeperiod=14)", "OBV", "VWAP",
             "SMA(timeperiod=50)", "EMA(timeperiod=50)", "DEMA(timeperiod=20)", "STOCH", "CCI(timeperiod=20)",
             "MFI(timeperiod=14)", "WILLR(timeperiod=14)", "ROC(timeperiod=10)", "MOM(timeperiod=10)",
             "AROON(timeperiod=14)", "NATR(timeperiod=14)"]

COLUMNS = ("instrument_token", "interval_min", "bar_start", "bar_end", "open", "high", "low", "close", "volume",
           "ticks", "final", "revision", "source", "recorded_at")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s) - 1e-9) - 1))]


class Market:
    """Random-walk one-minute candles for ``n`` symbols (prices to 0.05, integer volumes)."""

    def __init__(self, n: int, seed: int = 11):
        self.rng = np.random.default_rng(seed)
        self.close = np.round(self.rng.uniform(100, 3000, n) / 0.05) * 0.05
        self.n = n

    def minute(self, start: datetime) -> list[tuple]:
        r = self.rng
        o = self.close
        c = np.maximum(0.05, np.round(o * np.exp(r.normal(0, 0.001, self.n)) / 0.05) * 0.05)
        h = np.maximum(o, c) + np.round(np.abs(r.normal(0, 0.0005, self.n)) * o / 0.05) * 0.05
        lo = np.maximum(0.05, np.minimum(o, c) - np.round(np.abs(r.normal(0, 0.0005, self.n)) * o / 0.05) * 0.05)
        v = np.floor(r.exponential(2000, self.n)) + 1
        self.close = c
        end = start + timedelta(minutes=1)
        now = datetime.now(UTC)
        return [(1000 + i, 1, start, end, f"{o[i]:.2f}", f"{h[i]:.2f}", f"{lo[i]:.2f}", f"{c[i]:.2f}", f"{v[i]:.0f}",
                 10, True, 0, "live", now) for i in range(self.n)]


def copy(dsn: str, rows: list[tuple], batches: int) -> None:
    per = max(1, math.ceil(len(rows) / batches))
    with psycopg.connect(dsn) as c:
        for k in range(0, len(rows), per):
            with c.transaction():
                with c.cursor().copy(f"COPY kite_candle ({', '.join(COLUMNS)}) FROM STDIN") as cp:
                    for r in rows[k:k + per]:
                        cp.write_row(r)


def write_config(path: Path, spool: Path, warmup: int) -> None:
    fn = ", ".join(f'"{f}"' for f in FUNCTIONS)
    path.write_text(f"[indicators]\nfunctions = [{fn}]\nvenues = [\"kite\"]\nwarmup_bars = {warmup}\n"
                    f"poll_interval = 1.0\nstatus_interval = 10\n[sink]\nspool_dir = \"{spool}\"\n"
                    f"[metrics]\nport = 0\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--symbols", type=int, default=500)
    ap.add_argument("--minutes", type=int, default=30, help="minutes measured")
    ap.add_argument("--every", type=float, default=4.0, help="seconds between two minutes' candles")
    ap.add_argument("--batches", type=int, default=2, help="transactions per minute's candles")
    ap.add_argument("--history", type=int, default=120, help="candles stored per symbol before the start")
    a = ap.parse_args()
    specs = I.load_specs(FUNCTIONS, "bench")
    outputs = sum(len(s.outputs) for s in specs)
    print(f"feed-indicators latency: {a.symbols} symbols x {len(specs)} indicators ({outputs} outputs a bar), "
          f"one-minute candles, {a.minutes} minutes one every {a.every:g} s, {a.batches} transactions a minute, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    pg = durable_cluster()
    proc = None
    tmp = Path(tempfile.mkdtemp(prefix="bench-indicators-"))
    try:
        dsn = migrated_database(pg)
        market = Market(a.symbols)
        t0 = datetime(2024, 9, 11, 3, 45, tzinfo=UTC)           # 09:15 IST
        for m in range(a.history):
            copy(dsn, market.minute(t0 + timedelta(minutes=m)), 1)
        cfg = tmp / "indicators.toml"
        write_config(cfg, tmp / "spool", max(a.history, 100))
        env = {**os.environ, "FEEDS_DSN": dsn, "PYTHONPATH": str(ROOT / "lib"), "FEEDS_LOG_LEVEL": "INFO"}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        log = open(tmp / "feed-indicators.log", "w")
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, str(ROOT / "bin" / "feed-indicators"), "--config", str(cfg)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        while "warmed up" not in (tmp / "feed-indicators.log").read_text():
            if proc.poll() is not None:
                raise SystemExit("feed-indicators exited:\n" + (tmp / "feed-indicators.log").read_text()[-3000:])
            time.sleep(0.2)
        warm_s = time.monotonic() - started
        # let the warm-up's rows be committed before measuring
        first = t0 + timedelta(minutes=a.history)
        time.sleep(3)
        cpu0 = proc_cpu(proc.pid)
        for m in range(a.minutes):
            tick = time.monotonic()
            copy(dsn, market.minute(first + timedelta(minutes=m)), a.batches)
            time.sleep(max(0.0, a.every - (time.monotonic() - tick)))
        last = first + timedelta(minutes=a.minutes - 1)
        # wait until the last minute's values are in
        with psycopg.connect(dsn, autocommit=True) as c:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                n = c.execute("SELECT count(DISTINCT instrument) FROM indicator_value WHERE bar_start = %s "
                              "AND indicator = 'VWAP'", (last,)).fetchone()[0]
                if n >= a.symbols:
                    break
                time.sleep(0.2)
            time.sleep(1.0)
            cpu = proc_cpu(proc.pid) - cpu0
            hwm = proc_hwm_mb(proc.pid)
            per_minute = c.execute(
                """WITH cd AS (SELECT bar_start, max(stored_at) AS t FROM kite_candle
                                WHERE bar_start >= %(f)s GROUP BY bar_start),
                        iv AS (SELECT bar_start, max(stored_at) AS t, count(*) AS n FROM indicator_value
                                WHERE bar_start >= %(f)s GROUP BY bar_start)
                   SELECT extract(epoch FROM iv.t - cd.t), iv.n FROM cd JOIN iv USING (bar_start)""",
                {"f": first}).fetchall()
            per_symbol = [r[0] for r in c.execute(
                """WITH cd AS (SELECT instrument_token::text AS instrument, bar_start, stored_at AS t FROM kite_candle
                                WHERE bar_start >= %(f)s),
                        iv AS (SELECT instrument, bar_start, max(stored_at) AS t FROM indicator_value
                                WHERE bar_start >= %(f)s GROUP BY instrument, bar_start)
                   SELECT extract(epoch FROM iv.t - cd.t) FROM cd JOIN iv USING (instrument, bar_start)""",
                {"f": first}).fetchall()]
            values = sum(r[1] for r in per_minute)
        lat = [float(r[0]) for r in per_minute]
        per_symbol = [float(x) for x in per_symbol]
        if not lat:
            raise SystemExit("no indicator rows for the measured minutes:\n" +
                             (tmp / "feed-indicators.log").read_text()[-3000:])
        print(f"warm-up: {a.symbols} series x {a.history} stored candles in {warm_s:.1f} s (to READY)", flush=True)
        print(f"minute's last candle commit -> its last indicator commit: p50 {pct(lat, .5) * 1000:.0f} ms, "
              f"p99 {pct(lat, .99) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms over {len(lat)} minutes "
              f"(target p99 < {TARGET_P99_S:g} s)", flush=True)
        print(f"per symbol, candle -> its last indicator row: p50 {pct(per_symbol, .5) * 1000:.0f} ms, "
              f"p99 {pct(per_symbol, .99) * 1000:.0f} ms over {len(per_symbol):,} candles", flush=True)
        print(f"indicator values stored: {values:,} ({values / max(1, len(lat)):,.0f} a minute); "
              f"CPU {cpu:.2f} s = {cpu / max(1, values) * 1000:.3f} CPU s per 1,000 values; "
              f"peak RSS {hwm:.0f} MB", flush=True)
        rc = None
        stop_processes([proc])
        rc = proc.returncode
        tail = [ln for ln in (tmp / "feed-indicators.log").read_text().splitlines() if "stopped:" in ln]
        print(f"stop (exit status {rc}): {tail[-1] if tail else '?'}", flush=True)
    finally:
        stop_processes([proc])
        pg.destroy()


if __name__ == "__main__":
    main()
