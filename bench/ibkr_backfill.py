#!/usr/bin/env python3
"""Benchmark: feed-backfill pacing utilisation and the cost of one session.

Runs on this machine, each part in its own process as the units run them: a
throwaway PostgreSQL cluster with durable settings (fsync on), the TWS
simulator (``bin/feed-sim-tws``) with IB's pacing windows scaled, and
``bin/feed-backfill`` with the same scale.  Prints:

1. pacing, per scale: requests sent, time, IB pacing violations the
   simulator counted (must be 0), the largest number of requests in any
   (scaled) ten-minute window (must be 60), and the utilisation of the
   allowed rate: the mean over requests k >= 60 of window / (t[k] - t[k-60]),
   where 1.0 means every request waited exactly as long as IB's rules
   require and no longer.  Send times are the ``requested_at`` the backfill
   records (database clock).
2. one 390-bar session, local work only: decoding IB's historical-data
   message (ib_async's decoder with the exact-text handler), the checks,
   and the transaction that stores the bars and the status row (delete,
   COPY, upsert, commit with fsync); median and p99 over many sessions
   (target: under 50 ms).

Usage: bench/ibkr_backfill.py [--scales 0.01,0.005] [--requests 300] [--sessions 500]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PY = sys.executable

import psycopg  # noqa: E402

from procstats import COMMIT_SETTINGS, durable_cluster, migrated_database  # noqa: E402

SYMS = {"AAPL": "NASDAQ", "MSFT": "NASDAQ", "IBM": "NYSE", "SPY": "ARCA"}   # symbol: primaryExchange


def date_range_for(requests: int, n_syms: int) -> tuple[dt.date, dt.date]:
    """A range ending on 2024-12-31 with about ``requests`` sessions over ``n_syms`` contracts."""
    from feeds.ibkr.sessions import SessionCalendar
    cal = SessionCalendar("XNYS")
    need = -(-requests // n_syms)
    last = dt.date(2024, 12, 31)
    day, n = last, 0
    while n < need:
        if cal.session(day):
            n += 1
        day -= dt.timedelta(days=1)
    return day + dt.timedelta(days=1), last


def pacing(scale: float, requests: int) -> dict:
    from feeds.ibkr.pacing import max_in_window, utilisation
    pg = durable_cluster(COMMIT_SETTINGS)
    dsn = migrated_database(pg)
    tmp = Path(tempfile.mkdtemp(prefix="feeds-bench-ibkr-"))
    sim = None
    try:
        heads = [a for s in SYMS for a in ("--head", f"{s}=2015-01-02T09:30")]
        sim = subprocess.Popen([PY, str(ROOT / "bin" / "feed-sim-tws"), "--port", "0", "--generate", ",".join(SYMS),
                                "--pacing-scale", str(scale), "--stats-interval", "3600", *heads],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = sim.stderr.readline()
            m = re.search(r"tws sim listening host=\S+ port=(\d+)", line)
            if m:
                port = int(m.group(1))
        if port is None:
            raise RuntimeError("the simulator did not start")
        (tmp / "contracts.csv").write_text("symbol,secType,exchange,currency,primaryExchange\n" + "".join(
            f"{s},STK,SMART,USD,{p}\n" for s, p in SYMS.items()))
        (tmp / "ibkr.toml").write_text(f'[ibkr]\nport = {port}\ncontracts_file = "{tmp / "contracts.csv"}"\n'
                                       f"[backfill]\npacing_scale = {scale}\nstatus_interval = 3600\n"
                                       '[metrics]\ntextfile_dir = ""\n')
        first, last = date_range_for(requests, len(SYMS))
        t0 = time.monotonic()
        r = subprocess.run([PY, str(ROOT / "bin" / "feed-backfill"), "--config", str(tmp / "ibkr.toml"),
                            "--from", first.isoformat(), "--to", last.isoformat()],
                           env=dict(os.environ, FEEDS_DSN=dsn), capture_output=True, text=True, timeout=3600)
        elapsed = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"feed-backfill exit {r.returncode}: {r.stderr[-2000:]}")
        sim.send_signal(signal.SIGTERM)
        out, _ = sim.communicate(timeout=30)
        stats = json.loads(out.strip().splitlines()[-1])
        with psycopg.connect(dsn) as c:
            times = [row[0] for row in c.execute(
                "SELECT extract(epoch FROM requested_at) FROM ibkr_session_status "
                "WHERE requested_at IS NOT NULL ORDER BY requested_at").fetchall()]
            attempts = c.execute("SELECT coalesce(sum(attempts), 0) FROM ibkr_session_status").fetchone()[0]
        window = 600 * scale
        times = [float(t) for t in times]
        return dict(scale=scale, window=window, requests=stats["requests"].get("reqHistoricalData", 0),
                    attempts=attempts, elapsed=elapsed, violations=sum(stats["pacing_violations"].values()),
                    by_rule=stats["pacing_violations"], max_window=max_in_window(times, window),
                    utilisation=utilisation(times, window), sessions=len(times),
                    summary=next((ln[ln.index("summary:"):] for ln in r.stderr.splitlines() if "summary:" in ln), ""))
    finally:
        if sim is not None and sim.poll() is None:
            sim.kill()
        pg.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


def session_cost(n: int) -> dict:
    """Decode + check + store one 390-bar session, n times (distinct days)."""
    from ib_async import IB

    from feeds.ibkr.bars import check_session, keep_wire_text
    from feeds.ibkr.sessions import SessionCalendar
    from feeds.ibkr.store import BackfillStore
    from feeds.sim.tws_data import BarStore, builtin_contract

    cal = SessionCalendar("XNYS")
    spec = builtin_contract("AAPL")
    bars = BarStore()
    days, day = [], dt.date(2024, 12, 31)
    while len(days) < n:
        s = cal.session(day)
        if s and not s.early_close:
            days.append(s)
        day -= dt.timedelta(days=1)
    messages = []
    for s in days:   # message 17 exactly as the simulator sends it (formatDate 2)
        fields = ["17", "1", "start", "end", "390"]
        for b in bars.day_bars(spec, s.day, "TRADES", True):
            fields += [str(b.t), b.open, b.high, b.low, b.close, b.volume, b.wap, str(b.count)]
        messages.append(fields)

    pg = durable_cluster(COMMIT_SETTINGS)
    dsn = migrated_database(pg)
    decode, check, store, total = [], [], [], []
    try:
        st = BackfillStore(dsn).connect()

        async def run():
            ib = IB()
            keep_wire_text(ib)
            for i, (s, fields) in enumerate(zip(days, messages, strict=True)):
                req = i + 1
                fields[1] = str(req)
                t0 = time.perf_counter()
                fut = ib.wrapper.startReq(req, container=[])
                ib.client.decoder.interpret(fields)
                got = fut.result()
                t1 = time.perf_counter()
                chk = check_session("AAPL", 265598, s, got)
                t2 = time.perf_counter()
                assert chk.failure is None and chk.actual == 390, chk.failure
                st.commit_session("AAPL", 265598, s, "COMPLETE", chk.rows, chk.first, chk.last, None, chk.note)
                t3 = time.perf_counter()
                decode.append(t1 - t0)
                check.append(t2 - t1)
                store.append(t3 - t2)
                total.append(t3 - t0)
        asyncio.run(run())
        st.close()
    finally:
        pg.destroy()

    def pct(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] * 1000

    return {name: (statistics.median(xs) * 1000, pct(xs, 99)) for name, xs in
            (("decode", decode), ("check", check), ("store", store), ("total", total))} | {"n": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="0.01,0.005", help="pacing scales to run (comma-separated)")
    ap.add_argument("--requests", type=int, default=300, help="historical requests per pacing run")
    ap.add_argument("--sessions", type=int, default=500, help="sessions for the per-session cost")
    ap.add_argument("--only", choices=["pacing", "session"], default=None)
    a = ap.parse_args()
    print(f"feed-backfill benchmark, {os.cpu_count()} CPUs", flush=True)
    if a.only in (None, "pacing"):
        for scale in (float(x) for x in a.scales.split(",")):
            r = pacing(scale, a.requests)
            print(f"pacing at scale {r['scale']:g} (10 min = {r['window']:g} s): {r['requests']} requests for "
                  f"{r['sessions']} sessions in {r['elapsed']:.1f} s; violations {r['violations']}; "
                  f"most in any window {r['max_window']}/60 ({r['max_window'] / 60:.0%}); "
                  f"utilisation of the allowed rate {r['utilisation']:.1%}\n  {r['summary']}", flush=True)
    if a.only in (None, "session"):
        c = session_cost(a.sessions)
        print(f"one 390-bar session ({c['n']} sessions, fsync on): "
              f"decode median {c['decode'][0]:.2f} ms p99 {c['decode'][1]:.2f} ms; "
              f"check median {c['check'][0]:.2f} ms p99 {c['check'][1]:.2f} ms; "
              f"store median {c['store'][0]:.2f} ms p99 {c['store'][1]:.2f} ms; "
              f"validate+store median {c['check'][0] + c['store'][0]:.2f} ms; "
              f"total median {c['total'][0]:.2f} ms p99 {c['total'][1]:.2f} ms (target < 50 ms)", flush=True)


if __name__ == "__main__":
    main()
