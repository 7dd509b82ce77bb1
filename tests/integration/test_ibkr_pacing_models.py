"""feed-backfill's pacing profiles against the TWS simulator's three pacing models (IB's small-bar rules
for every bar size, the rules as IB's page documents them, a soft throttle): each run backfills 50
contracts x 20 sessions with the real feed-backfill process, every setting its default but the profile,
the pacing scale and the slow-answer threshold (tests/scaled_pacing.py), a fresh database each time.
Outcomes are read from the simulator's pacing log
(arrival times and refusals, in the order the requests arrived), from what the backfill learned and
logged and from the tables, never from how long anything took.  Which requests ``auto`` sent after it
fell back is told by their place, not their time: its log line names how many it had sent by then, and
on its one connection the simulator reads them in the order sent (a request sent just before the fall
back may be read just after it).

* ``strict`` against the strict model and ``documented`` against the documented model: no request
  refused;
* ``auto`` against every model: at most one refusal, before it falls back to ``strict``, none after; from
  the fall back on it sends as ``strict`` (no window of the simulator's holds more than 60 accepted
  requests at any of its later requests);
* every run ends with the same tables as the ``strict`` run;
* ``auto`` against the documented model sends its requests at least five times faster than ``strict``
  (first to last request arrival, on the simulator's clock).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from feeds.ibkr.pacing import DOCUMENTED, STRICT, max_in_window
from feeds.migrate import apply
from feeds.sim.tws import TwsSimulatorThread
from scaled_pacing import SLOW_ANSWER, pacing_options
from test_ibkr_backfill import OLD_HEAD, XNYS
from test_ibkr_kill import q

pytestmark = pytest.mark.integration

# IB's windows scaled.  The strict run and the two runs compared with it for speed: ten minutes become
# 18 s, so that strict's 1000 requests span 16 windows (about 290 s) while what goes faster is bound by
# this machine's work per session.  The runs whose speed is not compared: ten minutes become 6 s.
SCALE = 0.03
FAST = 0.01
MAX_REQUESTS = 60             # IB's small-bar rule: 60 requests in any ten minutes
N_CONTRACTS = 50
FIRST, LAST = dt.date(2024, 1, 3), dt.date(2024, 1, 31)     # 20 NYSE sessions, Martin Luther King day between
SYMBOLS = [f"P{a}{b}" for a, b in itertools.product("ABCDEFGHIJ", "ABCDE")][:N_CONTRACTS]
SESSIONS = [d for d, s in XNYS.days(FIRST, LAST) if s is not None]
# What a run leaves, compared between runs: every column the backfill writes except the record of the
# errors and attempts on the way (error, attempts, requested_at, updated_at).
STATUS_SQL = """SELECT symbol, session_date, con_id, status, session_open, session_close, expected_bars,
                       actual_bars, first_bar, last_bar, note FROM ibkr_session_status ORDER BY 1, 2"""
CONTRACT_SQL = """SELECT symbol, con_id, sec_type, exchange, primary_exchange, currency, time_zone, calendar,
                         head_timestamp FROM ibkr_contract ORDER BY 1"""
BARS_SQL = """SELECT count(*), md5(string_agg(concat_ws(',', symbol, extract(epoch FROM bar_start), con_id, open,
                     high, low, close, volume, wap, bar_count), E'\\n' ORDER BY symbol, bar_start))
                FROM ibkr_bar_1min"""


@dataclasses.dataclass
class Run:
    """One feed-backfill run against a fresh simulator and database: ``log`` is the simulator's pacing
    log (``t`` on the wall clock, epoch seconds), ``learned`` the ``ibkr_pacing_learned`` row
    (profile, concurrency, learned_at) or None; ``status``, ``contracts``, ``bars``: the tables."""

    profile: str
    model: str
    scale: float
    rc: int
    output: str
    log: list[dict]
    stats: dict
    learned: tuple | None
    status: list[tuple]
    contracts: list[tuple]
    bars: tuple
    summary: tuple

    @property
    def window(self) -> float:
        """The simulator's ten-minute window, scaled (seconds)."""
        return 600 * self.scale

    def refused(self) -> list[dict]:
        return [r for r in self.log if r["rule"] is not None]

    def span(self) -> float:
        """Seconds from the first request's arrival to the last's (simulator's clock)."""
        return self.log[-1]["t"] - self.log[0]["t"]


def backfill_run(pg, tmp: Path, profile: str, model: str, scale: float) -> Run:
    """Backfill ``SYMBOLS`` x ``SESSIONS`` with ``bin/feed-backfill`` under pacing ``profile`` (every
    other setting its default) against a simulator applying pacing ``model``, both windows scaled by
    ``scale``; a fresh database, nothing learned before."""
    dsn = pg.dsn(pg.create_db())
    apply(dsn, ROOT / "sql")
    tmp.mkdir(parents=True, exist_ok=True)
    cs = tmp / "contracts.csv"
    cs.write_text("symbol,secType,exchange,currency,primaryExchange,priority\n"
                  + "".join(f"{s},STK,SMART,USD,NYSE,0\n" for s in SYMBOLS))
    out = tmp / f"backfill-{profile}-{model}.log"
    with TwsSimulatorThread(generate=SYMBOLS, head_timestamps={s: OLD_HEAD for s in SYMBOLS}, pacing_scale=scale,
                            pacing_model=model, pacer_clock=time.time,
                            pacing_options=pacing_options(model)) as sim:
        cfg = tmp / f"ibkr-{profile}-{model}.toml"
        cfg.write_text(f'[ibkr]\nport = {sim.port}\ncontracts_file = "{cs}"\nconnect_timeout = 5\n'
                       f'[backfill]\npacing_profile = "{profile}"\npacing_scale = {scale}\n'
                       f"slow_answer = {SLOW_ANSWER[model]}\n"
                       f"reconnect_timeout = 10\nmax_attempts = 10\nkeep_learned_when_scaled = true\n"
                       f'status_interval = 5\n[metrics]\ntextfile_dir = ""\n')
        env = dict(os.environ, FEEDS_DSN=dsn, FEEDS_LOG_LEVEL="INFO")
        env.pop("NOTIFY_SOCKET", None)
        with out.open("wb") as fh:
            rc = subprocess.run([sys.executable, str(ROOT / "bin" / "feed-backfill"), "--config", str(cfg),
                                 "--from", str(FIRST), "--to", str(LAST)], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, timeout=900).returncode
        log, stats = sim.pacing_log(), sim.stats()
    learned = q(dsn, "SELECT profile, concurrency, extract(epoch FROM learned_at)::float8 FROM ibkr_pacing_learned")
    summary = q(dsn, "SELECT state, requests, pacing_violations FROM ibkr_backfill_run ORDER BY run_id")
    return Run(profile, model, scale, rc, out.read_text(), log, stats, learned[0] if learned else None,
               q(dsn, STATUS_SQL), q(dsn, CONTRACT_SQL), q(dsn, BARS_SQL)[0], tuple(summary))


def assert_complete(run: Run) -> None:
    """The run finished, asked each session once it was not refused, and stored every session in full."""
    assert run.rc == 0, run.output[-3000:]
    accepted = [r for r in run.log if r["rule"] is None]
    assert len(accepted) == run.stats["historical"]["served"] == N_CONTRACTS * len(SESSIONS)
    assert {r["contract"] for r in accepted} == set(SYMBOLS)
    st = {(r[0], r[1]): r[3] for r in run.status}
    assert len(st) == N_CONTRACTS * len(XNYS.days(FIRST, LAST))
    assert {k for k, s in st.items() if s == "COMPLETE"} == {(s, d) for s in SYMBOLS for d in SESSIONS}
    assert set(st.values()) == {"COMPLETE", "HOLIDAY"}
    assert run.bars[0] == 390 * N_CONTRACTS * len(SESSIONS)
    assert run.summary == (("finished", len(run.log), len(run.refused())),)


def sent_before_strict(run: Run) -> int | None:
    """How many requests ``auto`` had sent when it fell back to ``strict`` (its log line), None if it
    did not."""
    said = re.findall(r"pacing auto: strict with \d+ in flight \(.*\) after (\d+) requests sent;", run.output)
    return int(said[-1]) if said else None


def assert_same_tables(run: Run, ref: Run) -> None:
    assert run.status == ref.status
    assert run.contracts == ref.contracts
    assert run.bars == ref.bars


@pytest.fixture(scope="module")
def strict_run(pg, tmp_path_factory) -> Run:
    """The reference: the ``strict`` profile against the strict model."""
    return backfill_run(pg, tmp_path_factory.mktemp("strict"), STRICT, "strict", SCALE)


def test_strict_profile_against_the_strict_model_breaks_no_rule(strict_run):
    run = strict_run
    assert_complete(run)
    assert run.refused() == []
    assert sum(run.stats["pacing_violations"].values()) == 0
    assert run.learned is None
    # it did have to wait: 1000 requests, never more than 60 in any of the simulator's windows
    assert max_in_window([r["t"] for r in run.log], run.window) == MAX_REQUESTS


def test_documented_profile_against_the_documented_model_breaks_no_rule(pg, tmp_path, strict_run):
    run = backfill_run(pg, tmp_path, DOCUMENTED, "documented", SCALE)
    assert_complete(run)
    assert run.refused() == []
    assert sum(run.stats["pacing_violations"].values()) == 0
    assert max_in_window([r["t"] for r in run.log], run.window) > MAX_REQUESTS    # IB's 60 did not hold it back
    assert_same_tables(run, strict_run)


@pytest.mark.parametrize("model", ["strict", "documented", "throttle"])
def test_auto_profile_is_refused_at_most_once_then_never(pg, tmp_path, strict_run, model):
    run = backfill_run(pg, tmp_path, "auto", model, SCALE if model == "documented" else FAST)
    assert_complete(run)
    refused = run.refused()
    assert run.stats["connections"]["accepted"] == 1         # one connection: the log is in the order sent
    # the first request auto sent as strict: its place in the simulator's log (len(log): it did not fall back)
    n = sent_before_strict(run)
    fell_back = len(run.log) if n is None else n
    assert (n is not None) == (run.learned is not None and run.learned[0] == STRICT), run.learned
    before = [r for r in run.log[:fell_back] if r["rule"] is not None]
    after = [r for r in run.log[fell_back:] if r["rule"] is not None]
    assert len(before) <= 1 and after == [], (fell_back, before, after)
    assert not refused or n is not None, run.learned          # a refusal makes it fall back
    if model == "strict":
        # the one request sent beyond IB's 60 in ten minutes to learn whether they count: refused
        assert len(before) == 1
    if model == "documented":
        # nothing to fall back from, and at least five times faster than strict on the simulator's clock
        assert refused == [] and n is None
        assert strict_run.span() >= 5 * run.span(), (strict_run.span(), run.span())
    if n is not None:
        # from the fall back on it sends as strict: no window ending at one of its requests holds more
        # than 60 accepted requests (the earlier ones counted too)
        accepted = [r["t"] for r in run.log if r["rule"] is None]
        for k, t in enumerate((r["t"] for r in run.log[n:]), n):
            assert sum(1 for u in accepted if t - run.window < u <= t) <= MAX_REQUESTS, (k, n)
    assert_same_tables(run, strict_run)
