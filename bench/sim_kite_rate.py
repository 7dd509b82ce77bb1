#!/usr/bin/env python3
"""Throughput of the Kite simulator's ticker: full-mode packets for N
instruments on one WebSocket connection, read by a raw aiohttp client that
only walks the frame headers (KiteTicker itself decodes in pure Python and
is far slower than the feed).

The simulator runs as a separate process (``bin/feed-sim-kite``) so that it
and the reader each have a core.  Prints ticks (packets) per second
received, MB/s, frames per second and packets per frame, the simulator's
CPU seconds per million ticks (from /proc) and the reader's CPU.

Usage: bench/sim_kite_rate.py [--instruments 3000] [--rate 15] [--seconds 10]
                              [--mode full|quote|ltp]

The target is >= 40,000 full-mode ticks/s for 3000 instruments on one
connection (rate 15 per instrument asks for 45,000/s; raise --rate to find
the ceiling).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
from procstats import free_port, proc_cpu, wait_listening  # noqa: E402
LENGTHS = {"full": 184, "quote": 44, "ltp": 8}








async def run(args: argparse.Namespace, port: int, sim_pid: int) -> dict:
    base = f"http://127.0.0.1:{port}"
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.post(f"{base}/sim/access_token") as r:
            token = (await r.json())["data"]
        async with http.get(f"{base}/instruments/NSE") as r:
            rows = csv.DictReader(io.StringIO(await r.text()))
            tokens = [int(row["instrument_token"]) for row in rows
                      if row["instrument_type"] == "EQ" and row["segment"] == "NSE"][:args.instruments]
        if len(tokens) < args.instruments:
            raise RuntimeError(f"only {len(tokens)} NSE equities in the instrument master")
        url = f"ws://127.0.0.1:{port}/?api_key={token['api_key']}&access_token={token['access_token']}"
        expected = LENGTHS[args.mode]
        async with http.ws_connect(url, max_msg_size=0, compress=0) as ws:
            await ws.send_json({"a": "subscribe", "v": tokens})
            await ws.send_json({"a": "mode", "v": [args.mode, tokens]})
            packets = frames = nbytes = bad = 0
            warm_until = time.monotonic() + args.warmup
            started = None
            end = warm_until + args.seconds
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                try:
                    msg = await ws.receive(timeout=max(0.01, end - now))
                except asyncio.TimeoutError:
                    break
                if msg.type != aiohttp.WSMsgType.BINARY:
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        raise RuntimeError(f"connection closed: {msg}")
                    continue
                data = msg.data
                if started is None and now >= warm_until:
                    started = now
                    cpu0_sim, cpu0_self = proc_cpu(sim_pid), resource.getrusage(resource.RUSAGE_SELF)
                if started is None or len(data) < 2:
                    continue
                n = struct.unpack_from(">H", data, 0)[0]
                j = 2
                for _ in range(n):
                    length = struct.unpack_from(">H", data, j)[0]
                    if length != expected:
                        bad += 1
                    j += 2 + length
                packets += n
                frames += 1
                nbytes += len(data)
            elapsed = time.monotonic() - (started or time.monotonic())
            cpu_sim = proc_cpu(sim_pid) - cpu0_sim if started else 0.0
            ru = resource.getrusage(resource.RUSAGE_SELF)
            cpu_self = (ru.ru_utime + ru.ru_stime - cpu0_self.ru_utime - cpu0_self.ru_stime) if started else 0.0
    return {"packets": packets, "frames": frames, "bytes": nbytes, "bad": bad, "elapsed": elapsed,
            "cpu_sim": cpu_sim, "cpu_reader": cpu_self}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instruments", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=15.0, help="ticks per second per instrument")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--mode", choices=sorted(LENGTHS), default="full")
    args = ap.parse_args()
    port = free_port()
    cmd = [sys.executable, str(ROOT / "bin" / "feed-sim-kite"), "--port", str(port), "--rate", str(args.rate),
           "--no-rate-limits", "--log-level", "WARNING"]
    sim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        wait_listening(port)
        res = asyncio.run(run(args, port, sim.pid))
    finally:
        sim.terminate()
        try:
            sim.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sim.kill()
    secs = res["elapsed"] or 1e-9
    rate = res["packets"] / secs
    millions = res["packets"] / 1e6 or 1e-9
    print(f"instruments={args.instruments} mode={args.mode} rate/instrument={args.rate:g}/s "
          f"asked={args.instruments * args.rate:,.0f} ticks/s")
    print(f"received {res['packets']:,} ticks in {res['frames']:,} frames over {secs:.2f}s: "
          f"{rate:,.0f} ticks/s, {res['bytes'] / secs / 1e6:.1f} MB/s, "
          f"{res['frames'] / secs:.1f} frames/s, {res['packets'] / max(res['frames'], 1):.0f} ticks/frame")
    print(f"simulator CPU {res['cpu_sim']:.2f}s ({res['cpu_sim'] / secs * 100:.0f}% of a core), "
          f"{res['cpu_sim'] / millions:.2f} CPU-s per million ticks; "
          f"reader CPU {res['cpu_reader']:.2f}s; wrong-length packets {res['bad']}")


if __name__ == "__main__":
    main()
