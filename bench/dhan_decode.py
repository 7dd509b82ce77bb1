#!/usr/bin/env python3
"""Benchmark: decoding Dhan full packets (lib/feeds/dhan/wire.py) in one thread.

Builds a pool of distinct full packets (162 bytes each, 5-level depth, random
tick-aligned prices) for N instruments with the simulator's encoder, then
times ``wire.decode`` on them: one packet per message (what Dhan sends) and,
with ``--per-message``, several packets back to back.  Also times the price
conversion a collector does when it builds a row (``price_text`` of the 16
prices of a full packet, one by one and with ``format_prices``), since that is part of the per-packet cost.  Prints
packets/s by the wall clock and per CPU second (the machine may be busy).

Context: feed-dhan's target is 30,000 full packets/s decoded *and stored* in
one process, so decoding should take a small fraction of a second per
30,000 packets.

Usage: bench/dhan_decode.py [--instruments 5000] [--packets 300000] [--per-message 1] [--repeat 3]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from feeds.dhan import wire  # noqa: E402
from feeds.sim import dhan_packets  # noqa: E402


def make_packets(instruments: int, count: int, seed: int = 1) -> list[bytes]:
    rnd = random.Random(seed)
    ltt = dhan_packets.ltt_from_utc(time.time())
    pool = []
    for i in range(min(count, instruments * 4)):
        base = rnd.randint(2_000, 400_000) * 0.05
        depth = [(rnd.randint(1, 5000), rnd.randint(1, 5000), rnd.randint(1, 50), rnd.randint(1, 50),
                  base - 0.05 * (lvl + 1), base + 0.05 * (lvl + 1)) for lvl in range(5)]
        pool.append(dhan_packets.pack_full(
            1, 1000 + i % instruments, base, rnd.randint(1, 500), ltt, base, rnd.randint(0, 10**8),
            rnd.randint(0, 10**6), rnd.randint(0, 10**6), 0, 0, 0, base - 5, 0.0, base + 7, base - 9, depth))
    return [pool[i % len(pool)] for i in range(count)]


def run(frames: list[bytes], packets: int, now: float) -> tuple[float, float, int]:
    decode = wire.decode
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for f in frames:
        n += len(decode(f, now).records)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert n == packets, (n, packets)
    return packets / wall, packets / cpu, n


def run_text(records: list, now: float) -> tuple[float, float]:
    text = wire.price_text
    t0, c0 = time.perf_counter(), time.process_time()
    for r in records:
        d = r.depth
        (text(r.ltp), text(r.atp), text(r.open), text(r.close), text(r.high), text(r.low),
         text(d[4]), text(d[5]), text(d[10]), text(d[11]), text(d[16]), text(d[17]),
         text(d[22]), text(d[23]), text(d[28]), text(d[29]))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return len(records) / wall, len(records) / cpu


def run_format(records: list) -> tuple[float, float]:
    fmt = wire.format_prices
    pick = wire._full_prices
    t0, c0 = time.perf_counter(), time.process_time()
    for r in records:
        fmt(pick(r[:16] + r[16]))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return len(records) / wall, len(records) / cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instruments", type=int, default=5000)
    ap.add_argument("--packets", type=int, default=300_000)
    ap.add_argument("--per-message", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    packets = make_packets(a.instruments, a.packets)
    k = max(1, a.per_message)
    frames = [b"".join(packets[i:i + k]) for i in range(0, len(packets), k)]
    now = time.time()
    print(f"{len(packets):,} full packets (162 bytes), {a.instruments:,} instruments, "
          f"{k} packet(s) per message, {len(frames):,} messages")
    best = (0.0, 0.0)
    for r in range(a.repeat):
        wall, cpu, _ = run(frames, len(packets), now)
        best = max(best, (wall, cpu))
        print(f"  run {r + 1}: decode {wall:,.0f} packets/s wall, {cpu:,.0f} per CPU second")
    records = [rec for f in frames[:50_000] for rec in wire.decode(f, now).records]
    twall, tcpu = run_text(records, now)
    print(f"decode: best {best[0]:,.0f} packets/s ({1e6 / best[0]:.2f} us a packet); "
          f"30,000 packets/s would take {30_000 / best[0] * 100:.1f}% of one core")
    fwall, fcpu = run_format(records)
    print(f"format_prices of the 16 prices of a full packet: {fwall:,.0f} packets/s wall, {fcpu:,.0f} per CPU "
          f"second ({1e6 / fwall:.2f} us a packet)")
    print(f"price_text of the 16 prices of a full packet: {twall:,.0f} packets/s wall, {tcpu:,.0f} per CPU "
          f"second ({1e6 / twall:.2f} us a packet)")


if __name__ == "__main__":
    main()
