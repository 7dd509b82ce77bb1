#!/usr/bin/env python3
"""Throughput of the Binance simulator's generator at rate 0 ("as fast as the
client takes them") into one raw WebSocket reader (no python-binance).

The simulator runs as a separate process (``bin/feed-sim-binance``) so that
it and the reader each have a core. Prints messages per second received,
the simulator's CPU seconds per million messages (from /proc), the reader's
CPU, and event-time latency percentiles (receive time minus ``E``).

Usage: bench/sim_binance_rate.py [--seconds 10] [--symbols 1] [--streams aggTrade]
                                 [--reader aiohttp|websockets] [--raw]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from procstats import free_port, proc_cpu, wait_listening  # noqa: E402








def event_time(msg: bytes) -> int | None:
    i = msg.find(b'"E":')
    if i < 0:
        return None
    j = i + 4
    k = j
    while k < len(msg) and 48 <= msg[k] <= 57:
        k += 1
    return int(msg[j:k]) if k > j else None


async def read_aiohttp(url: str, seconds: float, warmup: float, sample_every: int):
    import aiohttp

    n = 0
    lat = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, max_msg_size=1 << 20, autoping=True) as ws:
            t_end_warm = time.monotonic() + warmup
            while time.monotonic() < t_end_warm:
                await ws.receive()
            t0 = time.monotonic()
            c0 = time.process_time()
            t_end = t0 + seconds
            while True:
                msg = await ws.receive()
                n += 1
                if n % sample_every == 0:
                    e = event_time(msg.data.encode() if isinstance(msg.data, str) else msg.data)
                    if e is not None:
                        lat.append(time.time() * 1000 - e)
                    if time.monotonic() >= t_end:
                        break
            return n, time.monotonic() - t0, time.process_time() - c0, lat


async def read_websockets(url: str, seconds: float, warmup: float, sample_every: int):
    import websockets

    n = 0
    lat = []
    async with websockets.connect(url, max_size=1 << 20, compression=None) as ws:
        t_end_warm = time.monotonic() + warmup
        while time.monotonic() < t_end_warm:
            await ws.recv(decode=False)
        t0 = time.monotonic()
        c0 = time.process_time()
        t_end = t0 + seconds
        while True:
            data = await ws.recv(decode=False)
            n += 1
            if n % sample_every == 0:
                e = event_time(data)
                if e is not None:
                    lat.append(time.time() * 1000 - e)
                if time.monotonic() >= t_end:
                    break
        return n, time.monotonic() - t0, time.process_time() - c0, lat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--symbols", type=int, default=1)
    ap.add_argument("--streams", default="aggTrade", help="kinds per symbol, comma separated")
    ap.add_argument("--reader", choices=("aiohttp", "websockets"), default="aiohttp")
    ap.add_argument("--raw", action="store_true", help="raw /ws stream instead of combined (one stream only)")
    args = ap.parse_args()

    port = free_port()
    kinds = [k for k in args.streams.split(",") if k]
    cmd = [sys.executable, str(ROOT / "bin" / "feed-sim-binance"), "--port", str(port),
           "--symbols", str(args.symbols), "--streams", ",".join(kinds), "--rate", "0",
           "--seed", "1", "--stats-interval", "0", "--log-level", "WARNING"]
    sim = subprocess.Popen(cmd)
    try:
        wait_listening(port)
        names = [f"sym{i:04d}usdt@{k}" for i in range(args.symbols) for k in kinds]
        public = [n for n in names if "bookTicker" in n]
        if public and len(public) != len(names):
            sys.exit("mix of /public and /market kinds: run them separately")
        cat = "public" if public else "market"
        if args.raw:
            url = f"ws://127.0.0.1:{port}/{cat}/ws/{names[0]}"
        else:
            url = f"ws://127.0.0.1:{port}/{cat}/stream?streams={'/'.join(names)}"
        reader = read_aiohttp if args.reader == "aiohttp" else read_websockets
        # CPU of the simulator is sampled around the measured window only
        result = {}

        async def run():
            task = asyncio.create_task(reader(url, args.seconds, args.warmup, 1000))
            await asyncio.sleep(args.warmup)
            result["cpu_sim_start"] = proc_cpu(sim.pid)
            result.update(zip(("n", "elapsed", "cpu_reader", "lat"), await task))
            result["cpu_sim_end"] = proc_cpu(sim.pid)

        asyncio.run(run())
        n, elapsed = result["n"], result["elapsed"]
        cpu_sim = result["cpu_sim_end"] - result["cpu_sim_start"]
        lat = sorted(result["lat"])
        rate = n / elapsed
        print(f"reader={args.reader} symbols={args.symbols} streams={','.join(kinds)} "
              f"{'raw' if args.raw else 'combined'} cores={os.cpu_count()}")
        print(f"messages: {n} in {elapsed:.2f} s -> {rate:,.0f} msg/s")
        print(f"simulator CPU: {cpu_sim:.2f} s -> {cpu_sim / n * 1e6:.2f} CPU s per million messages "
              f"({cpu_sim / elapsed * 100:.0f}% of a core)")
        print(f"reader CPU: {result['cpu_reader']:.2f} s -> "
              f"{result['cpu_reader'] / n * 1e6:.2f} CPU s per million messages")
        if lat:
            def pct(p):
                return lat[min(len(lat) - 1, int(p * len(lat)))]
            print(f"latency E->receive ms: p50={pct(0.5):.1f} p99={pct(0.99):.1f} max={lat[-1]:.1f} "
                  f"(samples={len(lat)})")
    finally:
        sim.terminate()
        try:
            sim.wait(10)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait(10)
    print(f"simulator max RSS: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
