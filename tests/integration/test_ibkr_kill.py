"""kill -9 in the middle of a feed-backfill run, then a new run: nothing completed is asked again,
the killed run's requests still count for IB's pacing, no half day, no duplicate, and the tables end
equal to an uninterrupted run's.  Outcomes are read from what was stored and from the simulator's
request log, never from how long anything took."""
from __future__ import annotations

import asyncio
import datetime as dt
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
from feeds.ibkr.pacing import max_in_window
from feeds.migrate import apply
from test_ibkr_backfill import HEADER, LINES, XNYS, RecordingSim, requested, sim_kw

pytestmark = pytest.mark.integration

# IB's ten-minute window scaled to 30 s: the first 60 requests go at once, the 61st waits for the window,
# so a run of 70 is always caught with exactly 60 sessions stored and the next request not yet sent, and
# a second run started within those 30 s (it starts in a few) always finds the 60 requests still counting.
SCALE = 0.05
WINDOW = 600 * SCALE
FAST = 0.002              # for runs whose pacing does not matter to the test
FIRST, LAST = "2024-01-02", "2024-02-21"     # 35 NYSE sessions: 70 requests for two contracts


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


def start_backfill(cfg: Path, dsn: str, out: Path, first: str = FIRST, last: str = LAST) -> subprocess.Popen:
    env = dict(os.environ, FEEDS_DSN=dsn, FEEDS_LOG_LEVEL="INFO")
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen([sys.executable, str(ROOT / "bin" / "feed-backfill"), "--config", str(cfg),
                             "--from", first, "--to", last], env=env, stdout=out.open("ab"),
                            stderr=subprocess.STDOUT)


def write_config(path: Path, port: int, contracts: Path, scale: float, profile: str = "strict",
                 days: int = 1) -> Path:
    path.write_text(f'[ibkr]\nport = {port}\ncontracts_file = "{contracts}"\nconnect_timeout = 5\n'
                    f'[backfill]\npacing_profile = "{profile}"\npacing_scale = {scale}\nreconnect_timeout = 10\n'
                    f"days_per_request = {days}\n"
                    '[metrics]\ntextfile_dir = ""\n')
    return path


def wait_complete(dsn: str, p: subprocess.Popen, n: int, out: Path, timeout: float = 120) -> None:
    """Wait until ``n`` sessions are COMPLETE (the run still going)."""
    deadline = time.monotonic() + timeout
    while q(dsn, "SELECT count(*) FROM ibkr_session_status WHERE status = 'COMPLETE'")[0][0] < n:
        assert p.poll() is None, "the run ended early:\n" + out.read_text()[-3000:]
        assert time.monotonic() < deadline, "the run did not store the first sessions:\n" + out.read_text()[-3000:]
        time.sleep(0.01)


def q(dsn: str, sql: str):
    with psycopg.connect(dsn) as c:
        return c.execute(sql).fetchall()


def assert_whole(dsn: str, stored: set) -> None:
    """Bars are stored for exactly the ``stored`` sessions, each with all the bars its status row counts."""
    per_day = dict(((r[0], r[1]), r[2]) for r in q(dsn, """
        SELECT symbol, (bar_start AT TIME ZONE 'America/New_York')::date, count(*) FROM ibkr_bar_1min
         GROUP BY 1, 2"""))
    actual = {(r[0], r[1]): r[2] for r in q(dsn, "SELECT symbol, session_date, actual_bars FROM ibkr_session_status")}
    assert set(per_day) == stored
    assert all(per_day[k] == actual[k] for k in stored)


STATUS_SQL = """SELECT symbol, session_date, status, expected_bars, actual_bars, first_bar, last_bar, note
                  FROM ibkr_session_status ORDER BY 1, 2"""
BARS_SQL = """SELECT symbol, bar_start, con_id, open, high, low, close, volume, wap, bar_count
                FROM ibkr_bar_1min ORDER BY 1, 2"""


def test_kill_9_mid_run_then_resume(db, pg, tmp_path):
    ref = pg.dsn(pg.create_db())
    apply(ref, ROOT / "sql")
    contracts = tmp_path / "contracts.csv"
    contracts.write_text(HEADER + LINES["AAPL"] + "\n" + LINES["MSFT"] + "\n")
    out = tmp_path / "backfill.log"
    days = XNYS.days(dt.date.fromisoformat(FIRST), dt.date.fromisoformat(LAST))
    n_sessions = 2 * sum(1 for _, s in days if s is not None)
    assert 60 < n_sessions <= 2 * 60                  # more than one window's worth, less than two

    with SimThread(**sim_kw(generate=("AAPL", "MSFT"), pacing_scale=SCALE)) as st:
        cfg = write_config(tmp_path / "ibkr.toml", st.sim.port, contracts, SCALE)

        # 1. a run killed with SIGKILL while it waits for the window: 60 sessions stored, no request open
        p = start_backfill(cfg, db, out)
        wait_complete(db, p, 60, out)
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(10) == -signal.SIGKILL
        done = {(r[0], r[1]) for r in q(db, "SELECT symbol, session_date FROM ibkr_session_status "
                                            "WHERE status IN ('COMPLETE', 'EARLY_CLOSE', 'HOLIDAY')")}
        stored = {(r[0], r[1]) for r in q(db, "SELECT symbol, session_date FROM ibkr_session_status "
                                              "WHERE status IN ('COMPLETE', 'EARLY_CLOSE')")}
        assert len(stored) == 60
        # what the simulator was asked (its log spans both runs): exactly the stored sessions, once each
        mark = st.log_len()
        first_run = requested(st.sim.hist_log[:mark])
        assert len(first_run) == 60 and set(first_run) == stored
        # no half day: every session has all its bars or none, as its status row says
        assert_whole(db, stored)

        # 2. a new run: counts the killed run's 60 requests, then asks for exactly the rest
        p = start_backfill(cfg, db, out)
        assert p.wait(180) == 0, out.read_text()[-3000:]
        again = requested(st.sim.hist_log, mark)
        todo = {(sym, d) for sym in ("AAPL", "MSFT") for d, s in days if s is not None} - stored
        assert len(again) == len(set(again)) == n_sessions - 60
        assert set(again) == todo and not set(again) & done
        stats = st.stats()
        seen = [t for t, _, _ in st.sim.hist_log]
    log = out.read_text()
    assert "pacing: 60 requests sent in the last" in log             # the killed run's requests counted ...
    assert stats["pacing_violations"] == {"identical_15s": 0, "same_contract_2s": 0, "max_60_per_10min": 0,
                                          "max_50_open": 0}           # ... so IB saw no violation over both runs
    assert max_in_window(seen, WINDOW) <= 60 and len(seen) == n_sessions

    # 3. the same work without interruption, into another database (its own simulator: pacing aside)
    with SimThread(**sim_kw(generate=("AAPL", "MSFT"), pacing_scale=FAST)) as st2:
        p = start_backfill(write_config(tmp_path / "ref.toml", st2.sim.port, contracts, FAST), ref, out)
        assert p.wait(120) == 0, out.read_text()[-3000:]

    s1, s2 = q(db, STATUS_SQL), q(ref, STATUS_SQL)
    assert s1 == s2 and len(s1) > n_sessions                       # sessions plus holidays
    assert {r[2] for r in s1} == {"COMPLETE", "HOLIDAY"}
    b1, b2 = q(db, BARS_SQL), q(ref, BARS_SQL)
    assert b1 == b2 and len(b1) == n_sessions * 390
    assert q(db, "SELECT count(*) - count(DISTINCT (symbol, bar_start)) FROM ibkr_bar_1min")[0][0] == 0
    runs = q(db, "SELECT run_id, state FROM ibkr_backfill_run ORDER BY run_id")
    assert runs == [(1, "interrupted"), (2, "finished")]


def test_sigterm_ends_the_run_cleanly(db, tmp_path):
    """SIGTERM (systemctl stop) while the run waits for the pacing window: the summary is written,
    the run is recorded as interrupted, exit 0; every stored session is whole."""
    contracts = tmp_path / "contracts.csv"
    contracts.write_text(HEADER + LINES["AAPL"] + "\n" + LINES["MSFT"] + "\n")
    out = tmp_path / "backfill.log"
    with SimThread(**sim_kw(generate=("AAPL", "MSFT"), pacing_scale=SCALE)) as st:
        p = start_backfill(write_config(tmp_path / "ibkr.toml", st.sim.port, contracts, SCALE), db, out)
        wait_complete(db, p, 60, out)
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0, out.read_text()[-3000:]
        assert st.log_len() == 60                                    # nothing sent after the window's 60
    log = out.read_text()
    assert "SIGTERM received" in log and "summary: run 1 stopped in " in log
    assert q(db, "SELECT state, finished_at IS NOT NULL FROM ibkr_backfill_run") == [("interrupted", True)]
    assert q(db, "SELECT count(*) FROM ibkr_session_status WHERE status = 'COMPLETE'") == [(60,)]
    whole = q(db, """SELECT bool_and(n = s.actual_bars) FROM ibkr_session_status s JOIN (
                       SELECT symbol, (bar_start AT TIME ZONE 'America/New_York')::date AS d, count(*) n
                         FROM ibkr_bar_1min GROUP BY 1, 2) b ON b.symbol = s.symbol AND b.d = s.session_date""")
    assert whole == [(True,)]
