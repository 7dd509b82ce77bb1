"""kill -9 in the middle of a feed-backfill run, then a new run: nothing completed is asked again,
no half day, no duplicate, and the tables end equal to an uninterrupted run's."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from conftest import ROOT
from feeds.migrate import apply
from test_ibkr_backfill import HEADER, LINES, XNYS, RecordingSim, requested, sim_kw

pytestmark = pytest.mark.integration

SCALE = 0.002
FIRST, LAST = "2024-01-02", "2024-05-31"


class SimThread:
    """A :class:`RecordingSim` on its own event loop in a thread."""

    def __init__(self, **kw):
        self.loop = asyncio.new_event_loop()
        self.sim = RecordingSim(**kw)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.sim.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.sim.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def log_len(self) -> int:
        return len(self.sim.hist_log)

    def stats(self) -> dict:
        async def get():
            return self.sim.stats()
        return asyncio.run_coroutine_threadsafe(get(), self.loop).result(10)


def start_backfill(cfg: Path, dsn: str, out: Path) -> subprocess.Popen:
    env = dict(os.environ, FEEDS_DSN=dsn, FEEDS_LOG_LEVEL="INFO")
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen([sys.executable, str(ROOT / "bin" / "feed-backfill"), "--config", str(cfg),
                             "--from", FIRST, "--to", LAST], env=env, stdout=out.open("ab"),
                            stderr=subprocess.STDOUT)


def q(dsn: str, sql: str):
    with psycopg.connect(dsn) as c:
        return c.execute(sql).fetchall()


STATUS_SQL = """SELECT symbol, session_date, status, expected_bars, actual_bars, first_bar, last_bar, note
                  FROM ibkr_session_status ORDER BY 1, 2"""
BARS_SQL = """SELECT symbol, bar_start, con_id, open, high, low, close, volume, wap, bar_count
                FROM ibkr_bar_1min ORDER BY 1, 2"""


def test_kill_9_mid_run_then_resume(db, pg, tmp_path):
    ref = pg.dsn(pg.create_db())
    apply(ref, ROOT / "sql")
    (tmp_path / "contracts.csv").write_text(HEADER + LINES["AAPL"] + "\n" + LINES["MSFT"] + "\n")
    out = tmp_path / "backfill.log"
    n_sessions = 2 * sum(1 for _, s in XNYS.days(*(__import__("datetime").date.fromisoformat(d)
                                                    for d in (FIRST, LAST))) if s is not None)

    with SimThread(**sim_kw(generate=("AAPL", "MSFT"), pacing_scale=SCALE)) as st:
        cfg = tmp_path / "ibkr.toml"
        cfg.write_text(f'[ibkr]\nport = {st.sim.port}\ncontracts_file = "{tmp_path / "contracts.csv"}"\n'
                       f"connect_timeout = 5\n[backfill]\npacing_scale = {SCALE}\nreconnect_timeout = 10\n")

        # 1. a run killed with SIGKILL once some sessions are stored
        p = start_backfill(cfg, db, out)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            n = q(db, "SELECT count(*) FROM ibkr_session_status WHERE status = 'COMPLETE'")[0][0]
            if n >= 60 or p.poll() is not None:
                break
            time.sleep(0.01)
        assert p.poll() is None, "the run ended before it could be killed:\n" + out.read_text()
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(10) == -signal.SIGKILL
        done = {(r[0], r[1]) for r in q(db, "SELECT symbol, session_date FROM ibkr_session_status "
                                            "WHERE status IN ('COMPLETE', 'EARLY_CLOSE', 'HOLIDAY')")}
        stored = {(r[0], r[1]) for r in q(db, "SELECT symbol, session_date FROM ibkr_session_status "
                                              "WHERE status IN ('COMPLETE', 'EARLY_CLOSE')")}
        assert 60 <= len(stored) < n_sessions
        # no half day: every session has all its bars or none, as its status row says
        per_day = dict(((r[0], r[1]), r[2]) for r in q(db, """
            SELECT symbol, (bar_start AT TIME ZONE 'America/New_York')::date, count(*) FROM ibkr_bar_1min
             GROUP BY 1, 2"""))
        actual = {(r[0], r[1]): r[2]
                  for r in q(db, "SELECT symbol, session_date, actual_bars FROM ibkr_session_status")}
        assert set(per_day) == stored
        assert all(per_day[k] == actual[k] for k in stored)

        # 2. a new run: goes on from the status table
        mark = st.log_len()
        p = start_backfill(cfg, db, out)
        assert p.wait(90) == 0, out.read_text()[-3000:]
        again = requested(st.sim.hist_log, mark)
        assert again, "the second run requested nothing"
        assert not set(again) & done, f"completed sessions requested again: {sorted(set(again) & done)[:5]}"
        assert {k for k in actual if k not in done} <= set(again)    # and everything else was

        # 3. the same work without interruption, into another database
        time.sleep(600 * SCALE * 1.1)              # let the simulator's ten-minute window pass
        p = start_backfill(cfg, ref, out)
        assert p.wait(90) == 0, out.read_text()[-3000:]
        stats = st.stats()

    s1, s2 = q(db, STATUS_SQL), q(ref, STATUS_SQL)
    assert s1 == s2 and len(s1) > n_sessions                       # sessions plus holidays
    assert {r[2] for r in s1} == {"COMPLETE", "HOLIDAY"}
    b1, b2 = q(db, BARS_SQL), q(ref, BARS_SQL)
    assert b1 == b2 and len(b1) == n_sessions * 390
    assert q(db, "SELECT count(*) - count(DISTINCT (symbol, bar_start)) FROM ibkr_bar_1min")[0][0] == 0
    runs = q(db, "SELECT run_id, state FROM ibkr_backfill_run ORDER BY run_id")
    assert runs == [(1, "interrupted"), (2, "finished")]
    log = out.read_text()
    assert "requests sent in the last" in log                       # the killed run's requests are counted
    assert stats["pacing_violations"] == {"identical_15s": 0, "same_contract_2s": 0, "max_60_per_10min": 0,
                                          "max_50_open": 0}


def test_sigterm_ends_the_run_cleanly(db, tmp_path):
    """SIGTERM (systemctl stop): the summary is written, the run is recorded
    as interrupted, exit 0; every stored session is whole."""
    (tmp_path / "contracts.csv").write_text(HEADER + LINES["AAPL"] + "\n" + LINES["MSFT"] + "\n")
    out = tmp_path / "backfill.log"
    with SimThread(**sim_kw(generate=("AAPL", "MSFT"), pacing_scale=SCALE)) as st:
        cfg = tmp_path / "ibkr.toml"
        cfg.write_text(f'[ibkr]\nport = {st.sim.port}\ncontracts_file = "{tmp_path / "contracts.csv"}"\n'
                       f"[backfill]\npacing_scale = {SCALE}\n")
        p = start_backfill(cfg, db, out)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:
            if q(db, "SELECT count(*) FROM ibkr_session_status WHERE status = 'COMPLETE'")[0][0] >= 20:
                break
            time.sleep(0.01)
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0, out.read_text()[-3000:]
    log = out.read_text()
    assert "SIGTERM received" in log and "summary: run 1 stopped in " in log
    assert q(db, "SELECT state, finished_at IS NOT NULL FROM ibkr_backfill_run") == [("interrupted", True)]
    whole = q(db, """SELECT bool_and(n = s.actual_bars) FROM ibkr_session_status s JOIN (
                       SELECT symbol, (bar_start AT TIME ZONE 'America/New_York')::date AS d, count(*) n
                         FROM ibkr_bar_1min GROUP BY 1, 2) b ON b.symbol = s.symbol AND b.d = s.session_date""")
    assert whole == [(True,)]
