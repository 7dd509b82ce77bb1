#!/usr/bin/env python3
"""Benchmark: feed-binance storing aggTrade + bookTicker for 600 symbols.

Runs everything on this machine, each in its own process: a throwaway
PostgreSQL cluster (fsync on, default durability), the simulator
(``bin/feed-sim-binance``) and the collector (``bin/feed-binance``, the same
program the units run).  Prints:

1. saturation: the simulator generates as fast as the collector takes them;
   messages/s stored over a sustained window, messages lost (sent by the
   simulator but not stored, counted per stream after the run), aggTrade gaps
   the collector had to fill, collector CPU seconds per million messages,
   collector peak RSS;
2. latency: at a fixed 5,000 msg/s, p50/p99 from the simulator's send time
   (the messages' event time) to the commit, from the collector's histogram;
3. the ceiling of plain COPY of the same rows from a prepared list, and the ratio;
4. two collector processes as the template unit runs them
   (``feed-binance --shard 1of2`` and ``--shard 2of2``): total messages/s stored.

Usage: bench/binance_collector.py [--symbols 600] [--window 60] [--skip-pair]
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
PY = sys.executable

import psycopg  # noqa: E402


def http_json(url: str, method: str = "GET"):
    req = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def stored(dsn: str) -> int:
    with psycopg.connect(dsn) as c:
        return c.execute("select (select count(*) from binance_agg_trade) + "
                         "(select count(*) from binance_book_ticker)").fetchone()[0]


#: Appended to the collector's configuration: no metrics endpoint, unless a caller asks for one.
NO_OPS = "[metrics]\nport = 0\n"


class Rig:
    def __init__(self, symbols: int, rate: float, extra_toml: str = NO_OPS):
        self.extra_toml = extra_toml
        self.pg = durable_cluster()
        self.dsn = migrated_database(self.pg)
        self.port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="feeds-bench-"))
        self.sim = subprocess.Popen(
            [PY, str(ROOT / "bin" / "feed-sim-binance"), "--host", "127.0.0.1", "--port", str(self.port),
             "--symbols", str(symbols), "--streams", "aggTrade,bookTicker", "--rate", str(rate),
             "--seed", "1", "--stats-interval", "3600", "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=open(self.tmp / "sim.log", "w"))
        self.base = f"http://127.0.0.1:{self.port}"
        for _ in range(100):
            try:
                http_json(self.base + "/sim/stats")
                break
            except OSError:
                time.sleep(0.1)
        self.collectors: list[subprocess.Popen] = []

    def start_collector(self, shard: str | None = None) -> subprocess.Popen:
        cfg = self.tmp / "binance.toml"
        cfg.write_text(f"""
[binance]
rest_url = "{self.base}"
ws_url = "ws://127.0.0.1:{self.port}"
streams = ["aggTrade", "bookTicker"]
max_streams_per_connection = 200
[binance.stale_after]
bookTicker = 0
[sink]
spool_dir = "{self.tmp}/spool-{shard or 'all'}"
""" + self.extra_toml)
        env = dict(os.environ, FEEDS_DSN=self.dsn, FEEDS_LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT / "lib"))
        args = [PY, str(ROOT / "bin" / "feed-binance"), "--config", str(cfg)]
        if shard:
            args += ["--shard", shard, "--unit", f"bench@{shard}"]
        else:
            args += ["--unit", "bench"]
        p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                             stderr=open(self.tmp / f"collector-{shard or 'all'}.log", "w"))
        self.collectors.append(p)
        return p

    def stop_collectors(self) -> None:
        for p in self.collectors:
            p.send_signal(signal.SIGTERM)
        for p in self.collectors:
            p.wait(120)

    def close(self) -> None:
        for p in self.collectors:
            if p.poll() is None:
                p.kill()
        stop_processes((self.sim,))
        self.pg.destroy()


def wait_rows(dsn: str, n: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while stored(dsn) < n:
        if time.monotonic() > end:
            raise SystemExit(f"no data: fewer than {n} rows after {timeout}s")
        time.sleep(0.5)


def loss(rig: Rig) -> tuple[int, int, int]:
    """Freeze the simulator, let the collector drain, compare sent with stored."""
    http_json(rig.base + "/sim/fault/stall_all?seconds=3600", "POST")
    time.sleep(1.0)
    sent = http_json(rig.base + "/sim/stats")["sent_total"]
    last, stable = -1, 0
    while stable < 4:
        n = stored(rig.dsn)
        stable = stable + 1 if n == last else 0
        last = n
        time.sleep(0.5)
    with psycopg.connect(rig.dsn) as c:
        gaps = c.execute("select coalesce(sum(mx - mn + 1 - n), 0) from (select symbol, min(agg_id) mn, "
                         "max(agg_id) mx, count(*) n from binance_agg_trade group by symbol) s").fetchone()[0]
        rest = c.execute("select count(*) from binance_agg_trade where event_time is null").fetchone()[0]
    return sent - last, int(gaps), rest


def saturation(symbols: int, window: float, warmup: float = 15.0, extra_toml: str = NO_OPS) -> dict:
    """Stored msg/s with the simulator generating as fast as the collector
    takes them; ``extra_toml`` is appended to the collector's configuration."""
    rig = Rig(symbols, 0, extra_toml)
    try:
        p = rig.start_collector()
        wait_rows(rig.dsn, 10_000, 90)
        time.sleep(warmup)
        n0, c0, t0 = stored(rig.dsn), proc_cpu(p.pid), time.monotonic()
        time.sleep(window)
        n1, c1, t1 = stored(rig.dsn), proc_cpu(p.pid), time.monotonic()
        lost, gaps, from_rest = loss(rig)
        hwm = proc_hwm_mb(p.pid)
        rig.stop_collectors()
        return {"rate": (n1 - n0) / (t1 - t0), "cpu_per_m": (c1 - c0) / max(1, n1 - n0) * 1e6,
                "rss_mb": hwm, "lost": lost, "gaps": gaps, "from_rest": from_rest, "rc": p.returncode,
                "window": t1 - t0}
    finally:
        rig.close()


def pair(symbols: int, window: float, warmup: float = 15.0) -> dict:
    rig = Rig(symbols, 0)
    try:
        ps = [rig.start_collector("1of2"), rig.start_collector("2of2")]
        wait_rows(rig.dsn, 10_000, 90)
        time.sleep(warmup)
        n0, t0 = stored(rig.dsn), time.monotonic()
        cpu0 = [proc_cpu(p.pid) for p in ps]
        time.sleep(window)
        n1, t1 = stored(rig.dsn), time.monotonic()
        cpu1 = [proc_cpu(p.pid) for p in ps]
        lost, gaps, from_rest = loss(rig)
        hwm = [proc_hwm_mb(p.pid) for p in ps]
        rig.stop_collectors()
        return {"rate": (n1 - n0) / (t1 - t0), "lost": lost, "gaps": gaps, "rss_mb": hwm,
                "cpu": [b - a for a, b in zip(cpu0, cpu1)]}
    finally:
        rig.close()


def latency(symbols: int, window: float, rate: float = 5000.0) -> dict:
    rig = Rig(symbols, rate)
    try:
        rig.start_collector()
        wait_rows(rig.dsn, 5_000, 90)
        time.sleep(5)
        # histogram of commit - event time, cumulative since start; take the difference over the window
        def hist():
            with psycopg.connect(rig.dsn) as c:
                row = c.execute("select detail->'lag_ms_hist' from feed_heartbeat where unit = 'bench'").fetchone()
            return {int(k): v for k, v in (row[0] or {}).items()} if row else {}
        h0, n0, t0 = hist(), stored(rig.dsn), time.monotonic()
        time.sleep(window)
        time.sleep(11)      # one more heartbeat
        h1, n1, t1 = hist(), stored(rig.dsn), time.monotonic()
        diff = {k: h1.get(k, 0) - h0.get(k, 0) for k in h1}
        total = sum(diff.values())

        def pct(q):
            acc = 0
            for k in sorted(diff):
                acc += diff[k]
                if acc >= total * q:
                    return k
            return None
        lost, gaps, _ = loss(rig)
        rig.stop_collectors()
        return {"p50": pct(0.50), "p99": pct(0.99), "max": max((k for k, v in diff.items() if v), default=None),
                "samples": total, "rate": (n1 - n0) / (t1 - t0), "lost": lost, "gaps": gaps}
    finally:
        rig.close()


def copy_ceiling(n: int = 600_000) -> float:
    """Plain COPY of the same rows (aggTrade and bookTicker tuples) from a prepared list."""
    from feeds.binance import adapter as A
    pg = durable_cluster("fsync = on\nsynchronous_commit = on\nfull_page_writes = on\nmax_wal_size = 4GB\n")
    try:
        dsn = migrated_database(pg)
        now = datetime.now(timezone.utc)
        aggs, books = [], []
        for i in range(n // 2):
            t = now + timedelta(milliseconds=i)
            s = f"SYM{i % 600:04d}USDT"
            aggs.append((s, i, "101.25", "0.013", i, i, t, i % 2 == 0, t, t))
            books.append((s, i, "101.25", "7", "101.26", "3", t, t, t))
        batch = 20_000
        with psycopg.connect(dsn) as c:
            t0 = time.perf_counter()
            for j in range(0, len(aggs), batch):
                with c.transaction():
                    for table, rows in ((A.AGG_TRADE_TABLE, aggs), (A.BOOK_TICKER_TABLE, books)):
                        with c.cursor().copy(f"COPY {table.name} ({', '.join(table.columns)}) FROM STDIN") as cp:
                            for r in rows[j:j + batch]:
                                cp.write_row(r)
            dt = time.perf_counter() - t0
        return n / dt
    finally:
        pg.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--symbols", type=int, default=600)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--skip-pair", action="store_true")
    ap.add_argument("--only", choices=["saturation", "latency", "copy", "pair"], default=None)
    a = ap.parse_args()
    print(f"feed-binance benchmark: {a.symbols} symbols, aggTrade + bookTicker, {os.cpu_count()} CPUs", flush=True)
    sat = lat = cc = pr = None
    if a.only in (None, "saturation"):
        sat = saturation(a.symbols, a.window)
        print(f"saturation: {sat['rate']:,.0f} msg/s stored over {sat['window']:.0f} s; lost {sat['lost']}; "
              f"aggTrade gaps {sat['gaps']} ({sat['from_rest']} filled from REST); "
              f"collector CPU {sat['cpu_per_m']:.1f} s per million messages; peak RSS {sat['rss_mb']:.0f} MB; "
              f"exit status after SIGTERM {sat['rc']}", flush=True)
    if a.only in (None, "latency"):
        lat = latency(a.symbols, a.window)
        print(f"latency at 5,000 msg/s: p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms "
              f"({lat['samples']:,} messages, {lat['rate']:,.0f} msg/s stored; lost {lat['lost']}, "
              f"gaps {lat['gaps']})", flush=True)
    if a.only in (None, "copy"):
        cc = copy_ceiling()
        print(f"plain COPY ceiling: {cc:,.0f} rows/s", flush=True)
        if sat:
            print(f"collector / COPY ratio: {sat['rate'] / cc:.2f}", flush=True)
    if not a.skip_pair and a.only in (None, "pair"):
        pr = pair(a.symbols, a.window)
        print(f"two instances (--shard 1of2, 2of2): {pr['rate']:,.0f} msg/s stored in total; lost {pr['lost']}; "
              f"gaps {pr['gaps']}; peak RSS {pr['rss_mb'][0]:.0f}/{pr['rss_mb'][1]:.0f} MB; "
              f"CPU s {pr['cpu'][0]:.0f}/{pr['cpu'][1]:.0f}", flush=True)


if __name__ == "__main__":
    main()
