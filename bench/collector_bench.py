"""The measuring run of the end-to-end collector benchmarks (bench/dhan_collector.py,
bench/kite_collector.py): a durable PostgreSQL cluster with a migrated database, the
simulator and the collector each in its own process, the sustained rate of rows stored,
the packets lost after freezing the simulator, the collector's CPU and peak RSS.

:func:`setup` gives the database and a scratch folder and stops the processes started
with :meth:`Bench.start` (:meth:`Bench.simulator`) at the end; :func:`measure` runs the
window and the drain.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from procstats import (durable_cluster, free_port, migrated_database, proc_cpu, proc_hwm_mb,  # noqa: E402
                       stop_processes)
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "lib"))
PY = sys.executable

import psycopg  # noqa: E402


def http_json(url: str, method: str = "GET"):
    """The JSON answer of ``url`` (None for an empty body); 10 s at most."""
    req = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def stored(dsn: str, table: str) -> int:
    """Rows of ``table``."""
    with psycopg.connect(dsn) as c:
        return c.execute(f"select count(*) from {table}").fetchone()[0]


def full_packets_sent(connections: list[dict]) -> int:
    """Full packets sent over the simulator's ``connections`` (its /sim/stats entries)."""
    return sum(c["packets_sent"]["full"] for c in connections)


@dataclass
class Bench:
    """One run's database (``dsn``), scratch folder (``tmp``) and processes."""
    dsn: str
    tmp: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, argv: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        """Start ``argv`` (stdout dropped, stderr to ``tmp/log``); stopped at the end of :func:`setup`."""
        p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=open(self.tmp / log, "w"))
        self.procs.append(p)
        return p

    def simulator(self, script: str, *args: str) -> tuple[subprocess.Popen, int, str]:
        """Start the simulator ``bin/<script>`` on a free loopback port with ``args``
        (stderr to ``tmp/sim.log``); returns the process, the port and its base URL."""
        port = free_port()
        sim = self.start([PY, str(ROOT / "bin" / script), "--host", "127.0.0.1", "--port", str(port), *args],
                         "sim.log")
        return sim, port, f"http://127.0.0.1:{port}"

    def instruments(self, exchange: str, n: int) -> Path:
        """Write ``tmp/instruments.txt``: the simulators' equities ``<exchange>:SIMEQ00001``
        to ``SIMEQ<n>``, full mode; returns its path."""
        path = self.tmp / "instruments.txt"
        path.write_text("".join(f"{exchange}:SIMEQ{i:05d} full\n" for i in range(1, n + 1)))
        return path

    def collector_env(self) -> dict:
        """The collector's environment: this run's database, INFO logs, the project's lib/."""
        return dict(os.environ, FEEDS_DSN=self.dsn, FEEDS_LOG_LEVEL="INFO", PYTHONPATH=str(ROOT / "lib"))


@contextmanager
def setup(prefix: str) -> Iterator[Bench]:
    """A throwaway durable cluster with every migration applied and a scratch folder
    named ``prefix``...; at the end the processes started are stopped, the last one
    first, and the cluster destroyed."""
    pg = durable_cluster()
    bench = None
    try:
        bench = Bench(migrated_database(pg), Path(tempfile.mkdtemp(prefix=prefix)))
        yield bench
    finally:
        if bench is not None:
            stop_processes(bench.procs[::-1])
        pg.destroy()


def measure(bench: Bench, table: str, col: subprocess.Popen, sim: subprocess.Popen, sent: Callable[[], int],
            freeze: Callable[[], None], first_rows: int, window: float, warmup: float = 8.0,
            start_timeout: float = 90.0, drain_timeout: float = 120.0) -> dict:
    """Wait for ``first_rows`` rows of ``table`` (SystemExit naming the collector's log
    if none come within ``start_timeout`` s or it exits), let it run ``warmup`` s,
    measure over ``window`` s, then ``freeze()`` the simulator, wait until the rows
    stop growing (at most ``drain_timeout`` s), read the peak RSS and stop the
    collector with SIGTERM.  ``sent()``: the packets the simulator sent so far.

    Returns ``rate`` (rows/s in the window), ``sent_rate``, ``lost`` (packets sent
    minus rows stored after the drain; None when the rows never settled),
    ``cpu_per_m`` (collector CPU seconds per million rows), ``cpu_share`` and
    ``sim_share`` (cores used), ``rss_mb``, ``rc`` (the collector's exit status),
    ``window`` (s) and ``log``."""
    end = time.monotonic() + start_timeout
    while stored(bench.dsn, table) < first_rows:
        if time.monotonic() > end or col.poll() is not None:
            raise SystemExit(f"no data; see {bench.tmp}/collector.log")
        time.sleep(0.5)
    time.sleep(warmup)
    n0, s0, c0, t0, k0 = stored(bench.dsn, table), sent(), proc_cpu(col.pid), time.monotonic(), proc_cpu(sim.pid)
    time.sleep(window)
    n1, s1, c1, t1, k1 = stored(bench.dsn, table), sent(), proc_cpu(col.pid), time.monotonic(), proc_cpu(sim.pid)
    freeze()
    time.sleep(1.0)
    total_sent = sent()
    last, stable = -1, 0
    drain_end = time.monotonic() + drain_timeout
    while stable < 4 and time.monotonic() < drain_end:
        n = stored(bench.dsn, table)
        stable = stable + 1 if n == last else 0
        last = n
        time.sleep(0.5)
    hwm = proc_hwm_mb(col.pid)
    col.send_signal(signal.SIGTERM)
    rc = col.wait(120)
    return {"rate": (n1 - n0) / (t1 - t0), "sent_rate": (s1 - s0) / (t1 - t0),
            "lost": total_sent - last if stable >= 4 else None,
            "cpu_per_m": (c1 - c0) / max(1, n1 - n0) * 1e6, "cpu_share": (c1 - c0) / (t1 - t0),
            "sim_share": (k1 - k0) / (t1 - t0), "rss_mb": hwm, "rc": rc, "window": t1 - t0,
            "log": str(bench.tmp / "collector.log")}
