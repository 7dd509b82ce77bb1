#!/usr/bin/env python3
"""Benchmark: feed-ibkr decoding and storing live ticks for 500 contracts.

Runs everything on this machine, each in its own process: a throwaway
PostgreSQL cluster (fsync on, default durability), the TWS simulator
(``bin/feed-sim-tws --live-rate N``: N generated trades per minute and
contract, with their quotes; 499 stocks and the index SPX) and the collector
(``bin/feed-ibkr``, the program the unit runs, ib_async inside, candles
built as configured), with no exchange calendar so that it runs at any hour.
The simulator is asked for more than the collector can take: what the
collector does not read waits in the simulator's socket buffer (up to 64 MB,
then the simulator skips ticks for that connection), so the stored rate is
the collector's ceiling (or the simulator's, when that is lower: the
simulator's own rate is printed beside it).  Prints:

* ticks stored per second (rows of ``ibkr_trade`` + ``ibkr_quote`` +
  ``ibkr_index_tick``) over a sustained window, per table, and the
  simulator's rate written to the socket over the same window, with the
  ticks it skipped;
* the collector's CPU seconds per million ticks and its peak RSS (VmHWM);
* the stop line of a clean SIGTERM (every row committed or spooled).

Target: >= 20,000 ticks/s with peak RSS < 250 MB.

The rig (:class:`Rig`) is also used by ``bench/candle_latency.py``.

Usage: bench/ibkr_live.py [--contracts 500] [--live-rate 6000] [--window 30] [--warmup 10]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from procstats import (durable_cluster, free_port, migrated_database, proc_cpu, proc_hwm_mb,  # noqa: E402
                       stop_processes, wait_listening)
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "lib"))
PY = sys.executable

import psycopg  # noqa: E402


TICK_TABLES = ("ibkr_trade", "ibkr_quote", "ibkr_index_tick")
TARGET_RATE = 20_000
TARGET_RSS_MB = 250


def contract_symbols(n: int) -> list[str]:
    """``n`` contracts: the index SPX and ``n - 1`` generated stocks (SIM0001, ...)."""
    return ["SPX"] + [f"SIM{i:04d}" for i in range(1, n)]


def counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as c:
        return {t: c.execute(f"select count(*) from {t}").fetchone()[0] for t in TICK_TABLES}


class Rig:
    """PostgreSQL, the TWS simulator and (:meth:`start_collector`) feed-ibkr, in a temporary directory."""

    STATS_INTERVAL = 5.0

    def __init__(self, contracts: int, live_rate: int, sim_port: int | None = None):
        """``sim_port``: a TWS simulator already listening there (its contracts must be
        :func:`contract_symbols` of ``contracts``); otherwise ``bin/feed-sim-tws`` is started."""
        self.tmp = Path(tempfile.mkdtemp(prefix="feeds-bench-ibkr-"))
        self.sim = self.col = None
        self.pg = durable_cluster()
        self.dsn = migrated_database(self.pg)
        self.symbols = contract_symbols(contracts)
        self.csv = self.tmp / "ibkr-live.csv"      # served by the simulator, collected by feed-ibkr
        rows = ["symbol,secType,exchange,currency,primaryExchange"]
        rows += ["SPX,IND,CBOE,USD," if s == "SPX" else f"{s},STK,SMART,USD,NYSE" for s in self.symbols]
        self.csv.write_text("\n".join(rows) + "\n")
        if sim_port is not None:
            self.port = sim_port
            return
        self.port = free_port()
        self.sim = subprocess.Popen(
            [PY, str(ROOT / "bin" / "feed-sim-tws"), "--host", "127.0.0.1", "--port", str(self.port),
             "--generate", "", "--contracts", str(self.csv), "--live-rate", str(live_rate),
             "--record-ticks", "count", "--stats-interval", str(self.STATS_INTERVAL), "--log-level", "INFO"],
            env=dict(os.environ, PYTHONPATH=str(ROOT / "lib")),
            stdout=subprocess.DEVNULL, stderr=open(self.tmp / "sim.log", "w"))
        try:
            wait_listening(self.port, 60)
        except RuntimeError:
            self.close()
            raise SystemExit(f"feed-sim-tws did not start: {(self.tmp / 'sim.log').read_text()[-2000:]}")

    def write_config(self, intervals=(1, 5, 15), status_interval: float = 5.0, live: str = "") -> Path:
        """feed-ibkr's configuration; ``live``: more ``[live]`` lines (TOML)."""
        cfg = self.tmp / "ibkr.toml"
        cfg.write_text(f"""
[ibkr]
host = "127.0.0.1"
port = {self.port}
live_client_id = 72
[live]
contracts_file = "{self.csv}"
session_calendar = "none"
status_interval = {status_interval}
{live}
[candles]
intervals = [{", ".join(str(i) for i in intervals)}]
[sink]
spool_dir = "{self.tmp}/spool"
[metrics]
port = 0
""")
        return cfg

    def start_collector(self, **cfg) -> subprocess.Popen:
        config = self.write_config(**cfg)
        env = dict(os.environ, FEEDS_DSN=self.dsn, FEEDS_LOG_LEVEL="INFO", PYTHONPATH=str(ROOT / "lib"),
                   FEEDS_IBKR_CONFIG=str(config), FEEDS_UNIT="feed-ibkr-bench")
        self.col_log = self.tmp / "collector.log"
        self.col = subprocess.Popen([PY, str(ROOT / "bin" / "feed-ibkr"), "--config", str(config)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=open(self.col_log, "w"))
        return self.col

    def collector_failed(self) -> str | None:
        if self.col is not None and self.col.poll() is not None:
            return f"feed-ibkr exited with {self.col.returncode}:\n" + self.col_log.read_text()[-3000:]
        return None

    def stop_collector(self) -> str:
        """SIGTERM, wait, and return feed-ibkr's stop line (or its last log lines)."""
        self.col.send_signal(signal.SIGTERM)
        self.col.wait(120)
        log = self.col_log.read_text()
        stops = [ln for ln in log.splitlines() if "stopped: " in ln]
        return stops[-1].split("stopped: ", 1)[1] if stops else "no stop line:\n" + log[-1500:]

    def sim_sent(self) -> tuple[int, int, int] | None:
        """(statistics lines so far, live ticks sent, ticks skipped) as of the latest statistics line
        of the simulator (every :attr:`STATS_INTERVAL` seconds): trades, quotes and index ticks
        written to the collector's socket, and those it skipped because 64 MB were already waiting
        there unread (``slow_client_skips``); None before the first line."""
        lines = [ln for ln in (self.tmp / "sim.log").read_text(errors="replace").splitlines()
                 if "tws sim stats " in ln]
        if not lines:
            return None
        live = json.loads(lines[-1].split("tws sim stats ", 1)[1]).get("live", {})
        return (len(lines), sum(live.get(k, 0) for k in ("trades_sent", "quotes_sent", "index_ticks_sent")),
                live.get("slow_client_skips", 0))

    def close(self) -> None:
        stop_processes((self.col, self.sim))
        self.pg.destroy()
        shutil.rmtree(self.tmp, ignore_errors=True)


def wait_ticks(rig: Rig, n: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while sum(counts(rig.dsn).values()) < n:
        if (why := rig.collector_failed()):
            raise SystemExit(why)
        if time.monotonic() > end:
            raise SystemExit(f"no data: fewer than {n} ticks stored after {timeout}s; collector log:\n"
                             + rig.col_log.read_text()[-2000:])
        time.sleep(0.5)


def run(contracts: int, live_rate: int, window: float, warmup: float) -> dict:
    rig = Rig(contracts, live_rate)
    try:
        p = rig.start_collector()
        wait_ticks(rig, 10_000, 120)
        time.sleep(warmup)
        n0, c0, s0, t0 = counts(rig.dsn), proc_cpu(p.pid), rig.sim_sent(), time.monotonic()
        sc0 = proc_cpu(rig.sim.pid)
        time.sleep(window)
        n1, c1, s1, t1 = counts(rig.dsn), proc_cpu(p.pid), rig.sim_sent(), time.monotonic()
        sc1 = proc_cpu(rig.sim.pid)
        if (why := rig.collector_failed()):
            raise SystemExit(why)
        hwm = proc_hwm_mb(p.pid)
        stop = rig.stop_collector()
        dt = t1 - t0
        stored = sum(n1.values()) - sum(n0.values())
        return {"rate": stored / dt, "per_table": {t: (n1[t] - n0[t]) / dt for t in TICK_TABLES},
                "sent_rate": ((s1[1] - s0[1]) / ((s1[0] - s0[0]) * rig.STATS_INTERVAL)
                              if s0 and s1 and s1[0] > s0[0] else None),
                "sim_skips": s1[2] - s0[2] if s0 and s1 else None,
                "cpu_per_m": (c1 - c0) / max(1, stored) * 1e6, "cpu_share": (c1 - c0) / dt,
                "sim_cpu_share": (sc1 - sc0) / dt,
                "rss_mb": hwm, "window": dt, "stop": stop, "rc": p.returncode, "total": sum(n1.values())}
    finally:
        rig.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contracts", type=int, default=500)
    ap.add_argument("--live-rate", type=int, default=6000, help="simulated trades per minute and contract")
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    a = ap.parse_args()
    print(f"feed-ibkr benchmark: {a.contracts} contracts (SPX + {a.contracts - 1} stocks), simulator asked for "
          f"{a.live_rate:,} trades/min per contract ({a.live_rate * a.contracts / 60:,.0f} trades/s), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    r = run(a.contracts, a.live_rate, a.window, a.warmup)
    per = ", ".join(f"{t} {v:,.0f}/s" for t, v in r["per_table"].items())
    sent = ""
    if r["sent_rate"] is not None:
        sent = f"; simulator wrote {r['sent_rate']:,.0f} ticks/s to the socket"
        if r["sim_skips"]:
            sent += (f" and skipped {r['sim_skips']:,} (64 MB unread: the collector is the bottleneck, "
                     "the stored rate its ceiling)")
    print(f"ticks decoded and stored: {r['rate']:,.0f} ticks/s over {r['window']:.0f} s "
          f"(target >= {TARGET_RATE:,}/s) [{per}]{sent}", flush=True)
    print(f"feed-ibkr peak RSS {r['rss_mb']:.0f} MB (target < {TARGET_RSS_MB} MB); CPU {r['cpu_per_m']:.1f} s per "
          f"million ticks ({r['cpu_share'] * 100:.0f}% of one CPU; the simulator took "
          f"{r['sim_cpu_share'] * 100:.0f}%): one whole CPU for feed-ibkr would be "
          f"{1e6 / max(r['cpu_per_m'], 1e-9):,.0f} ticks/s", flush=True)
    print(f"stop after SIGTERM (exit status {r['rc']}): {r['stop']}; {r['total']:,} ticks stored in all", flush=True)


if __name__ == "__main__":
    main()
