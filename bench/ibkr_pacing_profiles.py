#!/usr/bin/env python3
"""Benchmark: feed-backfill's pacing profiles against the TWS simulator's pacing models.

For every simulator model (``strict``: IB's small-bar rules for every bar
size; ``documented``: IB's page as written; ``throttle``: answers slow down
as the rate rises, refused past a threshold) and every profile (``strict``,
``documented``, ``auto``), two runs of ``bin/feed-backfill`` (its own
process, every setting its default but the profile, the scale and the
slow-answer threshold, with the throttle's steps of tests/scaled_pacing.py,
a fresh database each time, so nothing learned carries over):

1. the backfill of N contracts x one year of one-minute bars (default 100 x
   2024, 252 sessions each): sessions backfilled per hour, requests sent,
   pacing violations the simulator counted (by rule), what ``auto`` learned;
2. the nightly top-up of M contracts, one session each (default 300): the
   time from the first request to the last.

IB's windows are scaled as in bench/ibkr_backfill.py (``--scale``, default
0.01: ten minutes become 6 s) and the simulator runs in this process (its
pacing log gives every request's arrival time).  Times are measured on the
simulator's clock, first request arrival to last, and converted back to real
time by dividing by the scale.  That conversion is exact for a run held back
by the pacing windows all along: no ten-minute window ever held more than 60
of its requests (column max/10min) and every window was full (column "IB
held": the least time IB's 60-in-ten-minutes rule allows for the requests
IB accepted, as a share of the time taken; 100 % when the rule alone held
the run).  Below 100 %, or with more than 60 in a window, the run was (also)
held by the time this machine and the simulator take per answer, which does
not scale: its converted time is an upper bound and its converted rate a
lower bound; the column "as run" gives the rate of the scaled run itself,
unconverted (what this machine sustained: the most such a run reaches,
whatever IB's answer time).

Usage: bench/ibkr_pacing_profiles.py [--contracts 100] [--from 2024-01-01 --to 2024-12-31]
       [--topup 300] [--scale 0.01] [--models strict,documented,throttle]
       [--profiles strict,documented,auto] [--only year|topup]
A smaller case: --contracts 20 --from 2024-12-02 --to 2024-12-31 --topup 100.
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PY = sys.executable

import psycopg  # noqa: E402

from feeds.ibkr.pacing import MAX_REQUESTS, WINDOW, max_in_window  # noqa: E402

from procstats import COMMIT_SETTINGS, durable_cluster, migrated_database  # noqa: E402
from scaled_pacing import SLOW_ANSWER, pacing_options  # noqa: E402

MODELS = ("strict", "documented", "throttle")
PROFILES = ("strict", "documented", "auto")
HEAD = dt.datetime(2015, 1, 2, 9, 30, tzinfo=ZoneInfo("US/Eastern"))   # every contract's head timestamp


def symbols(n: int) -> list[str]:
    """``n`` distinct generated stock symbols (QAAA, QAAB, ...)."""
    return ["Q" + "".join(p) for p in itertools.islice(itertools.product("ABCDEFGHIJKLMNOPQRSTUVWXYZ", repeat=3), n)]


def run(pg, model: str, profile: str, syms: list[str], first: dt.date, last: dt.date, scale: float) -> dict:
    """One feed-backfill run of ``syms`` x ``first``..``last`` under ``profile`` against ``model``."""
    from feeds.sim.tws import TwsSimulatorThread

    dsn = migrated_database(pg)
    tmp = Path(tempfile.mkdtemp(prefix="feeds-bench-pacing-"))
    try:
        (tmp / "contracts.csv").write_text("symbol,secType,exchange,currency,primaryExchange\n"
                                           + "".join(f"{s},STK,SMART,USD,NYSE\n" for s in syms))
        with TwsSimulatorThread(generate=syms, head_timestamps={s: HEAD for s in syms}, pacing_scale=scale,
                                pacing_model=model, pacer_clock=time.time,
                                pacing_options=pacing_options(model)) as sim:
            (tmp / "ibkr.toml").write_text(
                f'[ibkr]\nport = {sim.port}\ncontracts_file = "{tmp / "contracts.csv"}"\n'
                f'[backfill]\npacing_profile = "{profile}"\npacing_scale = {scale}\nstatus_interval = 3600\n'
                f'slow_answer = {SLOW_ANSWER[model]}\nkeep_learned_when_scaled = true\n'
                '[metrics]\ntextfile_dir = ""\n')
            t0 = time.monotonic()
            r = subprocess.run([PY, str(ROOT / "bin" / "feed-backfill"), "--config", str(tmp / "ibkr.toml"),
                                "--from", first.isoformat(), "--to", last.isoformat()],
                               env=dict(os.environ, FEEDS_DSN=dsn), capture_output=True, text=True)
            wall = time.monotonic() - t0
            log, stats = sim.pacing_log(), sim.stats()
        if r.returncode != 0 and "left PENDING" not in r.stderr:   # else: refused max_attempts times, counted
            raise RuntimeError(f"feed-backfill exit {r.returncode}: {r.stderr[-2000:]}")
        with psycopg.connect(dsn) as c:
            done = c.execute("SELECT count(*) FROM ibkr_session_status "
                             "WHERE status IN ('COMPLETE', 'EARLY_CLOSE')").fetchone()[0]
            learned = c.execute("SELECT profile, concurrency FROM ibkr_pacing_learned").fetchone()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with psycopg.connect(pg.dsn(), autocommit=True) as c:      # a year of bars is gigabytes
            c.execute(f'DROP DATABASE IF EXISTS "{dsn.split("dbname=")[1].split()[0]}"')
    accepted = [x["t"] for x in log if x["rule"] is None]
    span = log[-1]["t"] - log[0]["t"] if log else 0.0
    most = max_in_window(accepted, WINDOW * scale)
    return dict(model=model, profile=profile, rc=r.returncode, sessions=done, requests=len(log), span=span, wall=wall,
                refused={k: v for k, v in stats["pacing_violations"].items() if v}, most=most,
                held=ib_held(len(accepted), span, scale) if most <= MAX_REQUESTS else None,
                learned=f"{learned[0]} x{learned[1]}" if learned else "-")


def ib_held(accepted: int, span: float, scale: float) -> float:
    """The least span IB's 60-in-ten-minutes rule allows for ``accepted``
    requests (request k and k+60 at least one window apart), as a share of
    ``span`` (seconds, scaled): 1.0 when the rule alone held the run."""
    least = (accepted - 1) // MAX_REQUESTS * WINDOW * scale if accepted else 0.0
    return least / span if span > 0 else 1.0


def fmt_held(held: float | None) -> str:
    return "-" if held is None else f"{100 * held:.0f} %"


def sessions_between(first: dt.date, last: dt.date) -> int:
    from feeds.ibkr.sessions import SessionCalendar
    return sum(1 for _, s in SessionCalendar("XNYS").days(first, last) if s is not None)


def fmt_hours(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contracts", type=int, default=100, help="contracts of the year's backfill")
    ap.add_argument("--from", dest="first", type=dt.date.fromisoformat, default=dt.date(2024, 1, 1))
    ap.add_argument("--to", dest="last", type=dt.date.fromisoformat, default=dt.date(2024, 12, 31))
    ap.add_argument("--topup", type=int, default=300, help="contracts of the nightly top-up (one session each)")
    ap.add_argument("--scale", type=float, default=0.01, help="pacing scale of the simulator and the backfill")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--only", choices=["year", "topup"], default=None)
    a = ap.parse_args()
    models, profiles = a.models.split(","), a.profiles.split(",")
    n_sessions = sessions_between(a.first, a.last)
    print(f"feed-backfill pacing profiles, {os.cpu_count()} CPUs; IB's windows scaled by {a.scale:g} "
          f"(10 min = {WINDOW * a.scale:g} s); times on the simulator's clock (first request to last), 'real' = "
          f"divided by {a.scale:g}; fresh database per run, every other setting its default", flush=True)
    pg = durable_cluster(COMMIT_SETTINGS)
    try:
        if a.only in (None, "year"):
            print(f"\nbackfill: {a.contracts} contracts x {a.first}..{a.last} ({n_sessions} sessions each, "
                  f"{a.contracts * n_sessions} requests)", flush=True)
            print(f"{'model':<11}{'profile':<11}{'sessions':>9}{'requests':>9}{'refused':>8}  {'scaled':>9}"
                  f"{'real':>9}{'sessions/h real':>16}{'as run':>10}  {'max/10min':>9}{'IB held':>8}  learned    "
                  "refused by rule",
                  flush=True)
            for model, profile in itertools.product(models, profiles):
                r = run(pg, model, profile, symbols(a.contracts), a.first, a.last, a.scale)
                real = r["span"] / a.scale
                rate = r["sessions"] / real * 3600 if real > 0 else float("inf")
                as_run = r["sessions"] / r["span"] * 3600 if r["span"] > 0 else float("inf")
                print(f"{model:<11}{profile:<11}{r['sessions']:>9}{r['requests']:>9}{sum(r['refused'].values()):>8}  "
                      f"{r['span']:>8.1f}s{fmt_hours(real):>9}{rate:>16,.0f}{as_run:>10,.0f}  {r['most']:>9}"
                      f"{fmt_held(r['held']):>8}  {r['learned']:<10} {r['refused'] or '-'}", flush=True)
        if a.only in (None, "topup"):
            day = a.last
            while sessions_between(day, day) == 0:
                day -= dt.timedelta(days=1)
            print(f"\nnightly top-up: {a.topup} contracts x 1 session ({day})", flush=True)
            print(f"{'model':<11}{'profile':<11}{'sessions':>9}{'requests':>9}{'refused':>8}  {'scaled':>9}"
                  f"{'real':>9}  {'process wall':>12}  {'max/10min':>9}{'IB held':>8}  learned", flush=True)
            for model, profile in itertools.product(models, profiles):
                r = run(pg, model, profile, symbols(a.topup), day, day, a.scale)
                print(f"{model:<11}{profile:<11}{r['sessions']:>9}{r['requests']:>9}{sum(r['refused'].values()):>8}  "
                      f"{r['span']:>8.1f}s{fmt_hours(r['span'] / a.scale):>9}  {r['wall']:>11.1f}s  {r['most']:>9}"
                      f"{fmt_held(r['held']):>8}  {r['learned']}", flush=True)
    finally:
        pg.destroy()
    print("\nmax/10min: most requests IB accepted in any (scaled) ten minutes; IB held: the least time IB's "
          "60-in-ten-minutes rule allows for the requests IB accepted, as a share of the time taken ('-' above "
          "60).  At 60 and 100 % the run was held by that rule alone and its 'real' time is exact; below 100 % "
          "or above 60 it was (also) held by this machine's and the simulator's time per answer, which is not "
          "scaled: 'real' is then an upper bound of the time, 'sessions/h real' a lower bound of the rate; "
          "'as run' is the rate of the scaled run itself (sessions per hour, not converted): what this machine "
          "sustained, the most such a run can reach whatever IB's answer time.", flush=True)


if __name__ == "__main__":
    main()
