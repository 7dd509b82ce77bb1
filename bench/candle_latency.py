#!/usr/bin/env python3
"""Benchmark: candle close latency of feed-ibkr, from the candle's end plus the grace to the commit.

The same rig as ``bench/ibkr_live.py`` (a throwaway PostgreSQL with fsync on, the
TWS simulator in its own process generating live trades, ``bin/feed-ibkr`` as the
unit runs it, no exchange calendar), with 400 contracts (SPX + 399 stocks) and
candles of 1, 5 and 15 minutes, for a few whole minutes.  Then, for every candle
the timer closed (``source = 'live'``, ``revision = 0``, ``final``: the first
write of a complete candle), the latency is ``stored_at - (bar_end + grace)``:
``stored_at`` is PostgreSQL's ``clock_timestamp()`` when the row was inserted
(the column default), ``grace`` the configured ``candles.grace`` (2 s by
default).  Candles the process started inside of (``final = false``) and
revisions by late trades are left out.  Prints p50, p99 and the maximum over
every candle and per interval, the number of candles, and the share of candles
stored before ``bar_end + grace`` (negative latency: should be none).

Target: p99 < 500 ms over at least 1,000 candles.

The default 3 minutes give 1,200 one-minute candles; a 5-minute candle the
process saw whole needs up to 9 minutes (--minutes 10), a 15-minute one up
to 29 (--minutes 30).

Usage: bench/candle_latency.py [--contracts 400] [--minutes 3] [--live-rate 120]
"""
from __future__ import annotations

import argparse
import math
import os
import time

import psycopg

from ibkr_live import Rig, wait_ticks

TARGET_P99_MS = 500
MIN_CANDLES = 1_000
GRACE_S = 2.0          # candles.grace: the shipped default, which the rig's configuration leaves as is


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``xs`` (nearest rank)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s) - 1e-9) - 1))]


def latencies(dsn: str) -> dict[int, list[float]]:
    """{interval_min: [latency ms, ...]} of the timer-closed candles."""
    with psycopg.connect(dsn) as c:
        rows = c.execute(
            "select interval_min, extract(epoch from stored_at - (bar_end + make_interval(secs => %s))) * 1000 "
            "from ibkr_candle where source = 'live' and revision = 0 and final", (GRACE_S,)).fetchall()
    out: dict[int, list[float]] = {}
    for iv, ms in rows:
        out.setdefault(int(iv), []).append(float(ms))
    return out


def run(contracts: int, minutes: int, live_rate: int) -> dict:
    rig = Rig(contracts, live_rate)
    try:
        rig.start_collector(intervals=(1, 5, 15))
        wait_ticks(rig, 1_000, 120)
        # whole minutes after the first boundary (the first candles are incomplete: final = false),
        # then past the last boundary + grace + a little, so that the last minute's candles are in
        now = time.time()
        first = (int(now // 60) + 1) * 60
        end = first + minutes * 60 + GRACE_S + 3
        while time.time() < end:
            if (why := rig.collector_failed()):
                raise SystemExit(why)
            time.sleep(1)
        stop = rig.stop_collector()
        return {"lat": latencies(rig.dsn), "stop": stop, "rc": rig.col.returncode}
    finally:
        rig.close()


def fmt(xs: list[float]) -> str:
    return f"p50 {pct(xs, 0.5):.0f} ms, p99 {pct(xs, 0.99):.0f} ms, max {max(xs):.0f} ms ({len(xs):,} candles)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contracts", type=int, default=400)
    ap.add_argument("--minutes", type=int, default=3, help="whole minutes of candles measured")
    ap.add_argument("--live-rate", type=int, default=120, help="simulated trades per minute and contract")
    a = ap.parse_args()
    print(f"candle close latency: feed-ibkr, {a.contracts} contracts x intervals 1, 5, 15 min, {a.minutes} min, "
          f"{a.live_rate} trades/min per contract, grace {GRACE_S:g} s, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    r = run(a.contracts, a.minutes, a.live_rate)
    every = [x for xs in r["lat"].values() for x in xs]
    if not every:
        raise SystemExit(f"no timer-closed candle stored; stop: {r['stop']}")
    print(f"all intervals: {fmt(every)} (target p99 < {TARGET_P99_MS} ms over >= {MIN_CANDLES:,} candles)",
          flush=True)
    for iv in sorted(r["lat"]):
        print(f"  {iv:>2}-min: {fmt(r['lat'][iv])}", flush=True)
    early = sum(x < 0 for x in every)
    print(f"stored before end + grace: {early} of {len(every):,}", flush=True)
    if len(every) < MIN_CANDLES:
        print(f"note: fewer than {MIN_CANDLES:,} candles: raise --minutes or --contracts", flush=True)
    print(f"stop after SIGTERM (exit status {r['rc']}): {r['stop']}", flush=True)


if __name__ == "__main__":
    main()
