#!/usr/bin/env python3
"""Benchmark: feed-dhan decoding and storing full-mode packets for 5,000
instruments in one process.

Runs everything on this machine, each in its own process: a throwaway
PostgreSQL cluster (fsync on, default durability), the Dhan simulator
(``bin/feed-sim-dhan``, a virtual session opened now, full-mode packets with
five-level depth, one packet per WebSocket message as Dhan sends them) and
the collector (``bin/feed-dhan``, the program the unit runs).  The simulator
is asked for more than the collector can take (``--rate`` trades per second
per instrument); it writes only what the socket accepts, so TCP
back-pressure lets it send what the collector reads, and the stored rate is
the collector's ceiling.  Prints:

* full-mode packets decoded and stored per second (rows of
  ``dhan_tick_full``) over a sustained window, and the rate the simulator
  sent;
* packets lost: the simulator's full packets sent, counted after freezing
  it, minus the rows stored (0 expected);
* the collector's CPU seconds per million packets and its peak RSS (VmHWM);
* with ``--candles`` the same with the one-minute candles built too (the
  default configuration of the unit);
* with ``--in-process`` (also part of ``--all``) the collector's own ceiling
  without the network and the simulator: the same full packets (5,000
  instruments, prices walking on the 0.05 tick) handed to the collector's
  per-message handler (decode, rows, candles) in this process, stored by
  the real sink into the same kind of PostgreSQL cluster: packets stored per
  second of wall clock and CPU seconds per million packets.  On a machine
  where the simulator and PostgreSQL share the cores with the collector,
  this is the figure that shows what the collector itself costs.

Target: >= 30,000 packets/s with peak RSS < 250 MB.

Usage: bench/dhan_collector.py [--instruments 5000] [--rate 8] [--window 30] [--candles on|off|both]
                               [--in-process | --all] [--packets 300000] [--profile FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from procstats import (durable_cluster, free_port, migrated_database, proc_cpu, proc_hwm_mb,  # noqa: E402
                       stop_processes)
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "lib"))
PY = sys.executable

import psycopg  # noqa: E402

CLIENT = "1000000001"


def http_json(url: str, method: str = "GET"):
    req = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def stored(dsn: str) -> int:
    with psycopg.connect(dsn) as c:
        return c.execute("select count(*) from dhan_tick_full").fetchone()[0]


def sent_full(base: str) -> int:
    return sum(c["packets_sent"]["full"] for c in http_json(base + "/sim/stats")["feed"]["connections"])


def run(instruments: int, rate: float, window: float, candles: bool, warmup: float = 8.0,
        profile: str | None = None) -> dict:
    """One measured run; with ``profile`` the collector runs under cProfile, its statistics written there."""
    pg = durable_cluster()
    tmp = Path(tempfile.mkdtemp(prefix="feeds-bench-dhan-"))
    sim = col = None
    try:
        dsn = migrated_database(pg)
        from feeds.dhan.token import DhanToken, TokenStore
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        sim = subprocess.Popen(
            [PY, str(ROOT / "bin" / "feed-sim-dhan"), "--host", "127.0.0.1", "--port", str(port),
             "--rate", str(rate), "--instruments", str(max(instruments, 100)), "--no-data", "--session-now",
             "--seed", "1", "--token-file", str(tmp / "sim-token")],
            stdout=subprocess.DEVNULL, stderr=open(tmp / "sim.log", "w"))
        for _ in range(300):
            if (tmp / "sim-token").exists() and (tmp / "sim-token").read_text().strip():
                break
            if sim.poll() is not None:
                raise SystemExit(f"simulator exited; see {tmp}/sim.log")
            time.sleep(0.1)
        token = (tmp / "sim-token").read_text().strip()
        now = datetime.now(timezone.utc)
        TokenStore(tmp / "token.json").save(DhanToken(CLIENT, token, now, now + timedelta(hours=20), method="bench"))
        (tmp / "instruments.txt").write_text("".join(f"NSE_EQ:SIMEQ{i:05d} full\n" for i in range(1, instruments + 1)))
        (tmp / "dhan.toml").write_text(f"""
[dhan]
client_id = "{CLIENT}"
api_url = "{base}"
feed_url = "ws://127.0.0.1:{port}"
instrument_list_url = "{base}/api-data/api-scrip-master.csv"
instrument_list_cache = "{tmp}/scrip-master.csv"
token_file = "{tmp}/token.json"
instruments_file = "{tmp}/instruments.txt"
session_calendar = "none"
silence_timeout = 60
status_interval = 5
[candles]
enabled = {"true" if candles else "false"}
[sink]
spool_dir = "{tmp}/spool"
[metrics]
port = 0
""")
        env = dict(os.environ, FEEDS_DSN=dsn, FEEDS_LOG_LEVEL="INFO", PYTHONPATH=str(ROOT / "lib"))
        prof = ["-m", "cProfile", "-o", profile] if profile else []
        col = subprocess.Popen([PY, *prof, str(ROOT / "bin" / "feed-dhan"), "--config", str(tmp / "dhan.toml"),
                                "--unit", "bench-dhan"], env=env, stdout=subprocess.DEVNULL,
                               stderr=open(tmp / "collector.log", "w"))
        end = time.monotonic() + 90
        while stored(dsn) < instruments:
            if time.monotonic() > end or col.poll() is not None:
                raise SystemExit(f"no data; see {tmp}/collector.log")
            time.sleep(0.5)
        time.sleep(warmup)
        n0, s0, c0, t0, k0 = stored(dsn), sent_full(base), proc_cpu(col.pid), time.monotonic(), proc_cpu(sim.pid)
        time.sleep(window)
        n1, s1, c1, t1, k1 = stored(dsn), sent_full(base), proc_cpu(col.pid), time.monotonic(), proc_cpu(sim.pid)
        # freeze the simulator, let the collector drain, compare sent with stored
        http_json(base + "/sim/fault/silence?seconds=3600", "POST")
        time.sleep(1.0)
        total_sent = sent_full(base)
        last, stable = -1, 0
        drain_end = time.monotonic() + 120
        while stable < 4 and time.monotonic() < drain_end:
            n = stored(dsn)
            stable = stable + 1 if n == last else 0
            last = n
            time.sleep(0.5)
        # a reconnect starts the simulator's counters afresh: no loss figure then
        reconnects = http_json(base + "/sim/stats")["feed"]["connections_total"] - 1
        hwm = proc_hwm_mb(col.pid)
        col.send_signal(signal.SIGTERM)
        rc = col.wait(120)
        return {"rate": (n1 - n0) / (t1 - t0), "offered": instruments * rate, "sent_rate": (s1 - s0) / (t1 - t0),
                "lost": total_sent - last if not reconnects and stable >= 4 else None, "reconnects": reconnects,
                "cpu_per_m": (c1 - c0) / max(1, n1 - n0) * 1e6, "sim_share": (k1 - k0) / (t1 - t0),
                "cpu_share": (c1 - c0) / (t1 - t0), "rss_mb": hwm, "rc": rc, "window": t1 - t0,
                "log": str(tmp / "collector.log")}
    finally:
        stop_processes((col, sim))
        pg.destroy()


def make_frames(instruments: int, count: int, seed: int = 1) -> list[bytes]:
    """Full packets (one per message) of ``instruments`` instruments in turn, each
    price walking on the 0.05 tick, cumulative volume rising, 5-level depth."""
    import random
    from feeds.sim import dhan_packets as P
    rnd = random.Random(seed)
    base = [rnd.randint(2_000, 40_000) for _ in range(instruments)]
    vol = [0] * instruments
    ltt = P.ltt_from_utc(time.time())
    out = []
    for j in range(count):
        i = j % instruments
        p = base[i] = base[i] + rnd.randint(-2, 2)
        vol[i] += rnd.randint(1, 50)
        depth = [(rnd.randint(1, 5000), rnd.randint(1, 5000), rnd.randint(1, 50), rnd.randint(1, 50),
                  (p - lvl - 1) * 0.05, (p + lvl + 1) * 0.05) for lvl in range(5)]
        out.append(P.pack_full(1, 100001 + i, p * 0.05, rnd.randint(1, 500), ltt + j // instruments, p * 0.05,
                               vol[i], 1000, 2000, 0, 0, 0, p * 0.05, 0.0, (p + 40) * 0.05, (p - 40) * 0.05, depth))
    return out


def run_in_process(instruments: int, packets: int, candles: bool) -> dict:
    """The collector's handler and the real sink, no network: see the module text."""
    import resource
    from feeds import candles as C
    from feeds.dhan import adapter as A
    from feeds.dhan.candles import CANDLE_TABLE, DhanCandles
    from feeds.dhan.collector import DhanCollector, Settings
    from feeds.dhan.connections import Subscription
    from feeds.health import Health
    from feeds.candles import CandleSettings
    from feeds.runtime import tune_gc
    from feeds.sink import Sink
    frames = make_frames(instruments, packets)
    pg = durable_cluster()
    tmp = Path(tempfile.mkdtemp(prefix="feeds-bench-dhan-inproc-"))
    try:
        dsn = migrated_database(pg)
        health = Health(unit="bench-dhan", flow_timeout=20)
        sink = Sink(dsn, tmp, A.TABLES + (CANDLE_TABLE,), flush_interval=0.2, batch_rows=20_000,
                    max_pending=50_000).start()
        subs = [Subscription(1, 100001 + i, "full") for i in range(instruments)]
        cd = DhanCandles(CandleSettings(), C.always(), subs, sink, since_ns=time.time_ns()) if candles else None
        col = DhanCollector(Settings(), "token", [subs], sink, health, candles=cd)
        on = col.handler(col.conns[0])
        tune_gc()
        t0, c0 = time.perf_counter(), time.process_time()
        for i, f in enumerate(frames):
            on(f)
            if not i % 2000:
                col._flush()
        col._flush()
        assert sink.flush(600)
        t1, c1 = time.perf_counter(), time.process_time()
        assert sink.close(60)
        n = stored(dsn)
        return {"rate": n / (t1 - t0), "stored": n, "cpu_per_m": (c1 - c0) / n * 1e6,
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    finally:
        pg.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instruments", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=8.0, help="trades/s per instrument asked of the simulator")
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--candles", choices=("on", "off", "both"), default="on")
    ap.add_argument("--profile", metavar="FILE", help="run the collector under cProfile, statistics to FILE")
    ap.add_argument("--in-process", action="store_true", help="only the in-process ceiling (no network)")
    ap.add_argument("--all", action="store_true", help="the end-to-end runs and the in-process ceiling")
    ap.add_argument("--packets", type=int, default=300_000, help="packets of the in-process run")
    a = ap.parse_args()
    if a.in_process or a.all:
        for cd in ((True, False) if a.candles == "both" else (a.candles == "on",)):
            r = run_in_process(a.instruments, a.packets, cd)
            print(f"in process, candles {'on ' if cd else 'off'}: {r['rate']:,.0f} full packets/s decoded and stored "
                  f"({r['stored']:,} rows, wall clock, PostgreSQL on the same machine); collector CPU "
                  f"{r['cpu_per_m']:.1f} s per million packets (= {1e6 / r['cpu_per_m']:,.0f}/s on one core); "
                  f"peak RSS {r['rss_mb']:.0f} MB (packets held in memory included)")
        if a.in_process:
            return
    print(f"machine: {os.cpu_count()} CPUs; {a.instruments} instruments, full mode, one collector process, "
          f"simulator asked for {a.rate:g}/s each ({a.instruments * a.rate:,.0f} packets/s)")
    for cd in ((True, False) if a.candles == "both" else (a.candles == "on",)):
        r = run(a.instruments, a.rate, a.window, cd, profile=a.profile)
        ok = r["rate"] >= 30_000 and r["rss_mb"] < 250 and r["lost"] == 0
        lost = (r["lost"] if r["lost"] is not None else
                f"not counted ({r['reconnects']} reconnect(s): the simulator closed a connection it found idle)")
        print(f"candles {'on ' if cd else 'off'}: {r['rate']:,.0f} full packets/s decoded and stored over "
              f"{r['window']:.0f} s (simulator sent {r['sent_rate']:,.0f}/s using {r['sim_share'] * 100:.0f}% of a "
              f"core); lost {lost}; collector CPU {r['cpu_per_m']:.1f} s per million packets "
              f"({r['cpu_share'] * 100:.0f}% of a core); peak RSS {r['rss_mb']:.0f} MB; exit {r['rc']}"
              f"  [{'meets' if ok else 'misses'} >= 30,000/s, < 250 MB, no loss]")


if __name__ == "__main__":
    main()
