#!/usr/bin/env python3
"""Benchmark: feed-zerodha decoding and storing full-mode ticks for 3,000
instruments in one process.

Runs everything on this machine, each in its own process: a throwaway
PostgreSQL cluster (fsync on, default durability), the Kite simulator
(``bin/feed-sim-kite``, full-mode packets with five-level depth) and the
collector (``bin/feed-zerodha``, the program the unit runs, KiteTicker
inside).  The simulator is asked for more than the collector can take
(``--rate`` ticks per second per instrument); TCP back-pressure then lets
it send only what the collector reads, so the stored rate is the
collector's ceiling.  Prints:

* full-mode ticks decoded and stored per second, over a sustained window,
  and the rate the simulator offered;
* ticks lost: the simulator's packets sent on the connection, counted after
  freezing it, minus the rows stored (0 expected);
* the collector's CPU seconds per million ticks and its peak RSS (VmHWM);
* with ``--decoder kiteticker`` the same with KiteTicker's own parser.

Target: >= 20,000 ticks/s with peak RSS < 250 MB.

Usage: bench/kite_collector.py [--instruments 3000] [--rate 25] [--window 30]
                               [--decoder native|kiteticker|both]
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
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from procstats import (durable_cluster, free_port, migrated_database, proc_cpu, proc_hwm_mb,  # noqa: E402
                       stop_processes)
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "lib"))
PY = sys.executable

import psycopg  # noqa: E402


def http_json(url: str, method: str = "GET"):
    req = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")["data"]


def stored(dsn: str) -> int:
    with psycopg.connect(dsn) as c:
        return c.execute("select count(*) from kite_tick_full").fetchone()[0]


def sent_full(base: str) -> int:
    return sum(c["packets_sent"]["full"] for c in http_json(base + "/sim/stats")["connections"])


def run(instruments: int, rate: float, window: float, decoder: str, warmup: float = 8.0,
        extra_toml: str = "[metrics]\nport = 0\n") -> dict:
    """One measured run; ``extra_toml`` is appended to the collector's
    configuration (default: no metrics endpoint)."""
    pg = durable_cluster()
    tmp = Path(tempfile.mkdtemp(prefix="feeds-bench-kite-"))
    sim = col = None
    try:
        dsn = migrated_database(pg)
        from feeds.kite.token import AccessToken, TokenStore, next_expiry
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        sim = subprocess.Popen(
            [PY, str(ROOT / "bin" / "feed-sim-kite"), "--host", "127.0.0.1", "--port", str(port),
             "--rate", str(rate), "--min-nse-equities", str(max(instruments, 100)), "--no-rate-limits",
             "--seed", "1", "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=open(tmp / "sim.log", "w"))
        for _ in range(150):
            try:
                http_json(base + "/sim/stats")
                break
            except OSError:
                time.sleep(0.1)
        token = http_json(base + "/sim/access_token", "POST")["access_token"]
        now = datetime.now(timezone.utc)
        TokenStore(tmp / "token.json").save(AccessToken("simkey", "AB1234", token, now, next_expiry(now)))
        (tmp / "instruments.txt").write_text("".join(f"NSE:SIMEQ{i:05d} full\n" for i in range(1, instruments + 1)))
        (tmp / "kite.toml").write_text(f"""
[kite]
api_key = "simkey"
api_url = "{base}"
ticker_url = "ws://127.0.0.1:{port}/"
login_url = "{base}"
token_file = "{tmp}/token.json"
instruments_file = "{tmp}/instruments.txt"
session_calendar = "none"
decoder = "{decoder}"
silence_timeout = 30
status_interval = 5
[sink]
spool_dir = "{tmp}/spool"
""" + extra_toml)
        env = dict(os.environ, FEEDS_DSN=dsn, FEEDS_LOG_LEVEL="INFO", PYTHONPATH=str(ROOT / "lib"))
        col = subprocess.Popen([PY, str(ROOT / "bin" / "feed-zerodha"), "--config", str(tmp / "kite.toml"),
                                "--unit", "bench-kite"], env=env, stdout=subprocess.DEVNULL,
                               stderr=open(tmp / "collector.log", "w"))
        end = time.monotonic() + 60
        while stored(dsn) < instruments:
            if time.monotonic() > end or col.poll() is not None:
                raise SystemExit(f"no data; see {tmp}/collector.log")
            time.sleep(0.5)
        time.sleep(warmup)
        n0, s0, c0, t0 = stored(dsn), sent_full(base), proc_cpu(col.pid), time.monotonic()
        time.sleep(window)
        n1, s1, c1, t1 = stored(dsn), sent_full(base), proc_cpu(col.pid), time.monotonic()
        # freeze the simulator, let the collector drain, compare sent with stored
        http_json(base + "/sim/fault/silence?seconds=3600", "POST")
        time.sleep(1.0)
        total_sent = sent_full(base)
        last, stable = -1, 0
        while stable < 4:
            n = stored(dsn)
            stable = stable + 1 if n == last else 0
            last = n
            time.sleep(0.5)
        hwm = proc_hwm_mb(col.pid)
        col.send_signal(signal.SIGTERM)
        rc = col.wait(120)
        return {"decoder": decoder, "rate": (n1 - n0) / (t1 - t0), "offered": instruments * rate,
                "sent_rate": (s1 - s0) / (t1 - t0), "lost": total_sent - last,
                "cpu_per_m": (c1 - c0) / max(1, n1 - n0) * 1e6, "cpu_share": (c1 - c0) / (t1 - t0),
                "rss_mb": hwm, "rc": rc, "window": t1 - t0, "log": str(tmp / "collector.log")}
    finally:
        stop_processes((col, sim))
        pg.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instruments", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=25.0, help="ticks/s per instrument asked of the simulator")
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--decoder", choices=("native", "kiteticker", "both"), default="native")
    a = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; {a.instruments} instruments, full mode, one collector process, "
          f"simulator asked for {a.rate:g}/s each ({a.instruments * a.rate:,.0f} ticks/s)")
    for dec in (("native", "kiteticker") if a.decoder == "both" else (a.decoder,)):
        r = run(a.instruments, a.rate, a.window, dec)
        ok = r["rate"] >= 20_000 and r["rss_mb"] < 250 and r["lost"] == 0
        print(f"decoder {dec:10s}: {r['rate']:,.0f} full ticks/s decoded and stored over {r['window']:.0f} s "
              f"(simulator sent {r['sent_rate']:,.0f}/s); lost {r['lost']}; "
              f"collector CPU {r['cpu_per_m']:.1f} s per million ticks ({r['cpu_share'] * 100:.0f}% of a core); "
              f"peak RSS {r['rss_mb']:.0f} MB; exit {r['rc']}"
              f"  [{'meets' if ok else 'misses'} >= 20,000/s, < 250 MB, no loss]")


if __name__ == "__main__":
    main()
