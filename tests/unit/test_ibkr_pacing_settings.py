"""The pacing settings of ibkr.toml: shipped defaults, the limiter they build, where auto starts from what it
learned, and what --dry-run prints for a profile (bad values: test_ibkr_main)."""
from __future__ import annotations

import datetime as dt

from feeds.backfill import Plan
from feeds.ibkr.backfill import BAR_SIZE, Settings, pacing_limiter
from feeds.ibkr.main import format_plan, load_settings, pacing_line
from feeds.ibkr.pacing import AUTO, DOCUMENTED, STRICT, LearnedPacing
from feeds.settings import IBKR_FILE, load
from test_ibkr_main import ROOT, write_cfg

UTC = dt.timezone.utc


def test_shipped_pacing_defaults():
    s, _ = load_settings(load(ROOT / "etc" / "ibkr.toml", IBKR_FILE))
    assert (s.pacing_profile, s.concurrency, s.max_concurrency, s.slow_answer) == (AUTO, 4, 16, 10.0)
    assert s.relearn == 168 * 3600.0 and s.days_per_request == 1
    lim = pacing_limiter(s)
    assert (lim.profile, lim.in_force, lim.concurrency, lim.max_in_flight) == (AUTO, DOCUMENTED, 4, 16)
    assert lim.bar_size == BAR_SIZE and lim.relearn == s.relearn and lim.slow_answer == 10.0


def test_settings_given_reach_the_limiter(tmp_path):
    cfg = write_cfg(tmp_path, '[backfill]\npacing_profile = "documented"\nconcurrency = 8\nmax_concurrency = 20\n'
                              'slow_answer = 3.5\nrelearn_hours = 0.5\ndays_per_request = 5\n')
    s, _ = load_settings(load(cfg, IBKR_FILE))
    assert (s.pacing_profile, s.concurrency, s.max_concurrency, s.slow_answer, s.relearn, s.days_per_request) == (
        DOCUMENTED, 8, 20, 3.5, 1800.0, 5)
    lim = pacing_limiter(s)
    assert (lim.in_force, lim.max_in_flight, lim.status().concurrency) == (DOCUMENTED, 8, 8)


def test_auto_with_a_fresh_learning_starts_from_it_and_says_so():
    s = Settings(relearn=3600.0)
    learned = LearnedPacing(STRICT, 2, dt.datetime.now(UTC) - dt.timedelta(minutes=5), "pacing violation")
    lim = pacing_limiter(s)
    lim.resume(learned)
    assert (lim.in_force, lim.concurrency) == (STRICT, 2)
    line = pacing_line(s, learned)
    assert line.startswith("pacing auto (strict), starts with ") and "pacing violation" in line
    old = LearnedPacing(STRICT, 2, dt.datetime.now(UTC) - dt.timedelta(hours=2), "pacing violation")
    lim = pacing_limiter(s)
    lim.resume(old)
    assert (lim.in_force, lim.concurrency) == (DOCUMENTED, 4)
    assert "probed again next run" in pacing_line(s, old)


def test_dry_run_total_names_the_profile_and_its_time():
    plan = Plan([], duration=125.0)
    lim = pacing_limiter(Settings())
    text = format_plan(plan, lim.window, lim.max_requests, lim, {})
    assert text.splitlines()[-1] == ("total: 0 sessions to fetch, 0 requests; pacing (4 in flight) implies about "
                                     "2m05s; profile auto (documented)")
    strict = pacing_limiter(Settings(pacing_profile=STRICT))
    assert "pacing (60 per " in format_plan(plan, strict.window, strict.max_requests, strict, {})
