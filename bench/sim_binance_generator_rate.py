#!/usr/bin/env python3
"""How closely the Binance simulator's generator keeps a fixed ``rate``.

Runs the simulator in this process (``SimulatorThread``) with ``--symbols``
generated symbols and only aggTrade, nobody connected, for ``--seconds``
per rate, and prints per rate: events generated, events per second
achieved, and achieved/asked.  The unit tests only check what the generator
does (events made, all unsent without subscribers, contiguous ids in the
REST history); this is where its pace is measured.

Usage: bench/sim_binance_generator_rate.py [--rates 200,2000,20000] [--seconds 5] [--symbols 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

from feeds.sim.binance import SimulatorThread  # noqa: E402


def measure(rate: float, seconds: float, symbols: int) -> tuple[int, float]:
    """(events generated, seconds measured) at ``rate`` events/s, after a 0.5 s warm-up."""
    with SimulatorThread(symbols=symbols, streams=["aggTrade"], rate=rate, seed=1) as sim:
        time.sleep(0.5)
        n0, t0 = sim.stats()["generated_events"], time.monotonic()
        time.sleep(seconds)
        n1, t1 = sim.stats()["generated_events"], time.monotonic()
    return n1 - n0, t1 - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="200,2000,20000", help="comma-separated events per second to ask for")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--symbols", type=int, default=2)
    a = ap.parse_args()
    for rate in (float(r) for r in a.rates.split(",") if r):
        n, took = measure(rate, a.seconds, a.symbols)
        print(f"rate {rate:>9,.0f}/s asked: {n:>9,} events in {took:.2f} s = {n / took:>10,.0f}/s "
              f"({n / took / rate:.3f} of asked)")


if __name__ == "__main__":
    main()
