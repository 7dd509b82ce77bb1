#!/usr/bin/env python3
"""Benchmark: feed-dhan-backfill against Dhan's data API rate limit.

Runs on this machine: a throwaway PostgreSQL cluster with durable settings
(fsync on), the Dhan simulator (``bin/feed-sim-dhan``, its own process,
Dhan's real limit: 5 data requests in any sliding second) and
``bin/feed-dhan-backfill`` (its own process, as the unit runs it) for N
generated instruments over D sessions.  Prints:

* requests sent and accepted, the simulator's violations (must be 0) and
  the largest number of requests that arrived in any sliding second (<= 5);
* requests a second achieved against the allowance: the simulator's
  ``allowance_used`` (accepted / (rate * (last - first) + rate));
* sessions stored per hour and one-minute candles per second, over the
  whole run (start-up, instrument list, planning and the final summary
  included).

Usage: bench/dhan_backfill_rate.py [--instruments 500] [--days 5] [--days-per-request 90]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "lib"))
PY = sys.executable

import psycopg  # noqa: E402

from procstats import COMMIT_SETTINGS, durable_cluster, free_port, migrated_database, stop_processes  # noqa: E402

CLIENT = "1000000001"


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instruments", type=int, default=500)
    ap.add_argument("--days", type=int, default=5, help="sessions per instrument (the newest before 2024-09-14)")
    ap.add_argument("--days-per-request", type=int, default=90)
    a = ap.parse_args()

    from feeds.calendars import ExchangeCalendar
    cal = ExchangeCalendar("XNSE")
    last = dt.date(2024, 9, 13)
    sessions = [s.day for s in cal.sessions(last - dt.timedelta(days=5 * a.days), last)][-a.days:]
    first = sessions[0]

    pg = durable_cluster(COMMIT_SETTINGS)
    dsn = migrated_database(pg)
    tmp = Path(tempfile.mkdtemp(prefix="dhan-bench-"))
    port = free_port()
    tok = tmp / "token.json"
    sim_tok = tmp / "sim-token.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "lib"))
    env.pop("NOTIFY_SOCKET", None)
    sim = subprocess.Popen([PY, str(ROOT / "bin" / "feed-sim-dhan"), "--port", str(port), "--no-data",
                            "--instruments", str(a.instruments), "--token-file", str(sim_tok),
                            "--client-id", CLIENT], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sim_tok.exists() or not sim_tok.read_text().strip():
            if time.monotonic() > deadline or sim.poll() is not None:
                raise SystemExit("the simulator did not start")
            time.sleep(0.1)
        token = sim_tok.read_text().strip()
        tok.write_text(json.dumps({"client_id": CLIENT, "access_token": token,
                                   "expires_at": "2999-01-01T00:00:00+00:00"}))
        base = f"http://127.0.0.1:{port}"
        (tmp / "instruments.txt").write_text("".join(f"NSE_EQ:SIMEQ{i:05d}\n" for i in range(1, a.instruments + 1)))
        cfg = tmp / "dhan.toml"
        cfg.write_text(f'[dhan]\nclient_id = "{CLIENT}"\napi_url = "{base}"\ntoken_file = "{tok}"\n'
                       f'instruments_file = "{tmp / "instruments.txt"}"\n'
                       f'instrument_list_url = "{base}/api-data/api-scrip-master.csv"\n'
                       f'instrument_list_cache = "{tmp / "scrip.csv"}"\nreconcile = false\n'
                       f"history_days_per_request = {a.days_per_request}\n"
                       '[backfill]\nstatus_interval = 5\n[metrics]\ntextfile_dir = ""\n')
        t0 = time.monotonic()
        rc = subprocess.call([PY, str(ROOT / "bin" / "feed-dhan-backfill"), "--config", str(cfg),
                              "--from", str(first), "--to", str(last)],
                             env=dict(env, FEEDS_DSN=dsn, FEEDS_LOG_LEVEL="WARNING"))
        elapsed = time.monotonic() - t0
        rest = get(f"{base}/sim/stats")["rest"]
        with psycopg.connect(dsn) as c:
            done = c.execute("SELECT count(*) FROM dhan_session_status WHERE status IN "
                             "('COMPLETE', 'EARLY_CLOSE', 'THIN')").fetchone()[0]
            bars = c.execute("SELECT count(*) FROM dhan_bar").fetchone()[0]
        span = (rest["last_at"] - rest["first_at"]) if rest.get("last_at") and rest.get("first_at") else 0
        achieved = (rest["data_accepted"] - 1) / span if span > 0 else float("nan")
        print(f"feed-dhan-backfill: {a.instruments} instruments x {len(sessions)} sessions "
              f"({first}..{last}), {a.days_per_request} days a request; exit {rc}")
        print(f"  requests: {rest['data_requests']} sent, {rest['data_accepted']} accepted, "
              f"violations {rest['violations']}, most in any sliding second {rest['max_arrivals_in_any_second']}")
        print(f"  rate: {achieved:.2f} requests/s achieved vs 5 allowed; allowance used "
              f"{100 * rest['allowance_used']:.1f}% (target >= 90%)")
        print(f"  throughput: {done} sessions in {elapsed:.1f}s = {3600 * done / elapsed:,.0f} sessions/hour, "
              f"{bars / elapsed:,.0f} candles/s")
    finally:
        stop_processes([sim], timeout=10)
        pg.destroy()


if __name__ == "__main__":
    main()
