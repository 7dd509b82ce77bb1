"""The pacing settings of ibkr.toml: shipped defaults, the limiter they build, where auto starts from what it
learned, and what --dry-run prints for a profile (bad values: test_ibkr_main)."""
from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

from feeds.backfill import Plan
from feeds.ibkr.backfill import BAR_SIZE, Settings, pacing_limiter
from feeds.ibkr.main import format_plan, load_settings, pacing_line
from feeds.ibkr.pacing import AUTO, DOCUMENTED, MAX_OPEN, STRICT, LearnedPacing
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


class StatusStore:
    """What ``--status`` uses of a BackfillStore, with its connection rule: ``c`` opens the connection
    again after ``close``."""

    def __init__(self, dsn, learned=None):
        self.opened = 0
        self.is_open = False
        self.learned = learned
        self.asked: list[tuple] = []

    @property
    def c(self):
        if not self.is_open:
            self.connect()
        return self

    def connect(self):
        if not self.is_open:
            self.is_open, self.opened = True, self.opened + 1
        return self

    def close(self):
        self.is_open = False

    def summary(self, symbols=None):
        return self.c and []

    def last_errors(self, symbols=None, limit=10):
        return self.c and []

    def last_run(self):
        return self.c and None

    def heartbeat(self, unit):
        return self.c and None

    def learned_pacing(self, endpoint, bar_size):
        self.asked.append((endpoint, bar_size))
        return self.c and self.learned


def run_status(monkeypatch, capsys, settings, learned=None) -> tuple[StatusStore, str]:
    """``feed-backfill --status`` (main._act) on a :class:`StatusStore`; the store and what it printed."""
    import feeds.ibkr.main as M

    stores = []
    monkeypatch.setattr(M, "BackfillStore", lambda dsn: stores.append(StatusStore(dsn, learned)) or stores[-1])
    M._act(settings, [], "dbname=x", M.Selection(), True, False, False, "ibkr.toml", "contracts.csv", "u")
    return stores[0], capsys.readouterr().out


def test_status_reads_what_was_learned_before_the_store_is_closed(monkeypatch, capsys):
    learned = LearnedPacing(STRICT, 2, dt.datetime.now(UTC) - dt.timedelta(minutes=5), "pacing violation")
    store, out = run_status(monkeypatch, capsys, Settings(relearn=3600.0), learned)
    assert store.asked == [("127.0.0.1:7497", BAR_SIZE)]
    assert "learned " in out and "pacing violation" in out
    assert not store.is_open and store.opened == 1            # one connection, closed at the end


def test_status_of_a_scaled_configuration_reads_nothing_learned(monkeypatch, capsys):
    learned = LearnedPacing(STRICT, 2, dt.datetime.now(UTC), "pacing violation")
    store, out = run_status(monkeypatch, capsys, Settings(pacing_scale=0.01), learned)
    assert store.asked == [] and not store.is_open
    assert "pacing_scale 0.01: nothing learned is loaded or stored" in out
    _, out = run_status(monkeypatch, capsys, Settings(pacing_scale=0.01, keep_learned_when_scaled=True), learned)
    assert "pacing violation" in out


def test_the_concurrency_setting_is_bounded_by_ibs_open_limit_constant():
    """backfill.concurrency's bound is feeds.ibkr.pacing.MAX_OPEN, not a copy of IB's 50."""
    code = ("import feeds.ibkr.pacing as P; P.MAX_OPEN = 7\n"
            "from feeds.settings import IBKR\n"
            "s = next(x for x in IBKR if x.key == 'backfill.concurrency')\n"
            "print(s.check(7) is None, s.check(8) is not None)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.stdout.split() == ["True", "True"], r.stderr[-2000:]
    from feeds.settings import IBKR
    s = next(x for x in IBKR if x.key == "backfill.concurrency")
    assert s.check(MAX_OPEN) is None and s.check(MAX_OPEN + 1) is not None


def test_keep_learned_when_scaled_is_a_setting_off_by_default(tmp_path):
    s, _ = load_settings(load(ROOT / "etc" / "ibkr.toml", IBKR_FILE))
    assert s.keep_learned_when_scaled is False and s.keeps_learned
    cfg = write_cfg(tmp_path, '[backfill]\npacing_scale = 0.01\nkeep_learned_when_scaled = true\n')
    s, _ = load_settings(load(cfg, IBKR_FILE))
    assert s.keep_learned_when_scaled is True and s.keeps_learned
    assert not Settings(pacing_scale=0.01).keeps_learned
