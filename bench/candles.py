#!/usr/bin/env python3
"""Benchmark: candle building (lib/feeds/candles.py) for many instruments.

Synthetic trades for N instruments (default 3,000) over several minutes of
one XNYS session, in exchange-time order with a little jitter, are fed to a
:class:`feeds.candles.CandleBuilder` with intervals (1, 5, 15); the timer is
driven as a collector drives it (``due()`` whenever ``next_due_ns()`` has
passed, on the trades' own clock).  The trades are generated before the
clock starts, so the figures are the builder's alone.  Prints, for the
per-trade call ``trade()`` and the batch call ``trades()``: trades/s (by the
wall clock, and per CPU second in case the machine is busy), the candles
produced per interval, and the target (500,000 trades/s per process); then
the batch call again with Decimal prices and sizes (as feed-ibkr gives them).

Usage: bench/candles.py [--instruments 3000] [--trades 3000000] [--minutes 10] [--repeat 3]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from feeds.calendars import calendar  # noqa: E402
from feeds.candles import MINUTE_NS, CandleBuilder, calendar_sessions  # noqa: E402

TARGET = 500_000
OPEN = int(datetime(2026, 6, 1, 13, 30, tzinfo=timezone.utc).timestamp()) * 1_000_000_000   # 09:30 New York


def make_trades(instruments: int, n: int, minutes: int, seed: int = 1) -> list[tuple]:
    """``n`` trades ``(key, ts_ns, price, size)`` spread evenly over ``minutes`` from the open,
    instruments picked at random, prices as ints (cents) walking around 10,000."""
    rnd = random.Random(seed)
    keys = [f"S{i:04d}" for i in range(instruments)]
    span = minutes * MINUTE_NS
    step = span // n
    price = [10_000 + rnd.randrange(-500, 500) for _ in keys]
    out = []
    for i in range(n):
        k = rnd.randrange(instruments)
        price[k] += rnd.choice((-1, 0, 0, 1))
        ts = OPEN + i * step + rnd.randrange(0, 1_000_000)   # up to 1 ms jitter: a few out of order
        out.append((keys[k], ts, price[k], rnd.randrange(1, 500)))
    return out


def run(trades: list[tuple], sessions, batch: bool, chunk: int = 10_000) -> tuple[float, float, Counter]:
    """Feed the trades; returns (wall seconds, CPU seconds, candles per interval)."""
    b = CandleBuilder(sessions, (1, 5, 15), grace_s=2.0, lateness_s=10.0)
    produced: Counter = Counter()
    due = None
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(trades), chunk):
        part = trades[i:i + chunk]
        if batch:
            b.trades(part)
        else:
            trade = b.trade
            for k, ts, p, s in part:
                trade(k, ts, p, s)
        clock = part[-1][1]                       # the trades' clock stands in for the wall clock
        if due is None or clock >= due:
            for c in b.due(clock):
                produced[c.interval_min] += 1
            due = b.next_due_ns()
    for c in b.due(trades[-1][1] + 20 * MINUTE_NS):
        produced[c.interval_min] += 1
    return time.perf_counter() - t0, time.process_time() - c0, produced


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instruments", type=int, default=3000)
    ap.add_argument("--trades", type=int, default=3_000_000)
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    sessions = calendar_sessions(calendar("XNYS"))
    print(f"candles: {a.instruments} instruments x intervals (1, 5, 15), {a.trades:,} trades "
          f"over {a.minutes} minutes of one session; Python {sys.version.split()[0]}")
    t = time.perf_counter()
    trades = make_trades(a.instruments, a.trades, a.minutes)
    print(f"  generated in {time.perf_counter() - t:.1f} s (not counted)")
    decimals = [(k, ts, Decimal(p).scaleb(-2), Decimal(s)) for k, ts, p, s in trades]
    for name, batch, feed in (("trade() per call", False, trades), ("trades() batch", True, trades),
                              ("trades(), Decimal", True, decimals)):
        best, cpu, produced = None, None, None
        for _ in range(a.repeat):
            secs, cpu_s, produced = run(feed, sessions, batch)
            best = secs if best is None else min(best, secs)
            cpu = cpu_s if cpu is None else min(cpu, cpu_s)
        rate = a.trades / best
        print(f"  {name:18s} {rate:12,.0f} trades/s, {a.trades / cpu:12,.0f} per CPU second "
              f"(best of {a.repeat}: {best:.2f} s)  "
              f"candles: " + ", ".join(f"{k} min {v:,}" for k, v in sorted(produced.items())) +
              f"  [{'meets' if rate >= TARGET else 'BELOW'} the {TARGET:,}/s target]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
