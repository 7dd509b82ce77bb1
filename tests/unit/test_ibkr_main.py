"""feed-backfill's command line, configuration and units (no network, no database)."""
from __future__ import annotations

import configparser
import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from feeds.settings import IBKR_FILE, load
from feeds.ibkr.backfill import RunSummary, fmt_duration
from feeds.ibkr.main import format_status, load_settings, main

ROOT = Path(__file__).resolve().parents[2]


def write_cfg(tmp_path, extra: str = "", contracts: str | None = None) -> Path:
    c = tmp_path / "contracts.csv"
    c.write_text(contracts or "symbol,secType,exchange,currency,primaryExchange\nAAPL,STK,SMART,USD,NASDAQ\n"
                 "MSFT,STK,SMART,USD,NASDAQ\n")
    cfg = tmp_path / "ibkr.toml"
    cfg.write_text(f'[ibkr]\ncontracts_file = "{c}"\nport = 1\nconnect_timeout = 0.2\n' + extra)
    return cfg


def invoke(*args, env=None):
    return CliRunner().invoke(main, list(args), env={"FEEDS_DSN": "host=127.0.0.1 port=1 dbname=x", **(env or {})})


def test_shipped_config_loads_with_documented_defaults():
    s, contracts = load_settings(load(ROOT / "etc" / "ibkr.toml", IBKR_FILE))
    assert (s.host, s.port, s.client_id, s.concurrency, s.pacing_scale) == ("127.0.0.1", 7497, 71, 4, 1.0)
    assert s.settle == dt.timedelta(minutes=30) and s.status_interval == 30 and s.earliest is None
    assert s.what_to_show == "TRADES" and s.use_rth is True
    assert contracts == "/etc/feeds/contracts.csv"


@pytest.mark.parametrize("extra, key, words", [
    ("[backfill]\nconcurrency = 80\n", "backfill.concurrency", "must be 1..50"),
    ("[backfill]\npacing_scale = 2.0\n", "backfill.pacing_scale", "<= 1"),
    ("[backfill]\nearliest = \"2020-13-01\"\n", "backfill.earliest", "YYYY-MM-DD"),
    ("[backfill]\nwhat_to_show = \"BID_ASK\"\n", "backfill.what_to_show", "only TRADES"),
    ("[backfill]\nuse_rth = \"yes\"\n", "backfill.use_rth", "expected bool"),
    ('[backfill]\npacing_profile = "fast"\n', "backfill.pacing_profile", "must be one of strict, documented, auto"),
    ("[backfill]\nmax_concurrency = 51\n", "backfill.max_concurrency", "must be 1..50"),
    ("[backfill]\nslow_answer = 0\n", "backfill.slow_answer", "must be > 0"),
    ("[backfill]\nrelearn_hours = -1\n", "backfill.relearn_hours", "must be >= 0"),
    ("[backfill]\ndays_per_request = 6\n", "backfill.days_per_request", "must be 1..5"),
    ("[backfill]\nconcurrency = 20\nmax_concurrency = 16\n", "backfill.concurrency", "max_concurrency"),
])
def test_bad_configuration_exits_78_naming_the_key(tmp_path, extra, key, words):
    cfg = write_cfg(tmp_path, extra)
    r = invoke("--config", str(cfg), "--status")
    assert r.exit_code == 78
    assert f"configuration error in {cfg}: key '{key}': " in r.stderr and words in r.stderr


def test_bad_contracts_file_exits_78(tmp_path):
    cfg = write_cfg(tmp_path, contracts="symbol,secType,exchange,currency\nAAPL,STK,SMART,USD\nAAPL,STK,SMART,USD\n")
    r = invoke("--config", str(cfg), "--dry-run")
    assert r.exit_code == 78 and "line 3 field 'symbol': same contract as line 2" in r.stderr


def test_option_checks(tmp_path):
    cfg = write_cfg(tmp_path)
    r = invoke("--config", str(cfg), "--symbols", "AAPL", "TSLA", "--dry-run")
    assert r.exit_code == 2 and "not in" in r.output and "TSLA" in r.output
    r = invoke("--config", str(cfg), "--date", "2024-07-03", "--from", "2024-07-01")
    assert r.exit_code == 2 and "--date excludes --from/--to" in r.output
    r = invoke("--config", str(cfg), "--from", "2024-07-05", "--to", "2024-07-01")
    assert r.exit_code == 2 and "is after --to" in r.output
    r = invoke("--config", str(cfg), "--from", "yesterday")
    assert r.exit_code == 2 and "YYYY-MM-DD" in r.output
    r = invoke("--config", str(cfg), "AAPL")
    assert r.exit_code == 2 and "symbols follow --symbols" in r.output


def test_unreachable_tws_fails_with_one_line(tmp_path):
    """--test-connection against a closed port: exit 1 and a FAIL line, quickly."""
    cfg = write_cfg(tmp_path)
    r = invoke("--config", str(cfg), "--test-connection")
    assert r.exit_code == 1
    assert r.stdout.startswith("FAIL cannot connect to TWS/IB Gateway at 127.0.0.1:1: ")


def test_symbols_and_relative_dates_parsed(monkeypatch, tmp_path):
    from feeds.ibkr import main as m

    assert m._symbols("AAPL", ("MSFT", "ibm,spy")) == ["AAPL", "MSFT", "IBM", "SPY"]
    assert m._symbols(None, ()) is None
    today = dt.date(2024, 7, 10)
    assert m._date("30d", "--from", today) == dt.date(2024, 6, 10)
    assert m._date("2024-01-02", "--from", today) == dt.date(2024, 1, 2)


def test_status_table_format():
    rows = [dict(symbol="AAPL", COMPLETE=249, EARLY_CLOSE=3, HOLIDAY=10, PARTIAL=0, ERROR=1, PENDING=2, thin=4,
                 first=dt.date(2024, 1, 2), last=dt.date(2024, 12, 31), bars=97740, updated=None)]
    out = format_status(rows, [("AAPL", dt.date(2024, 5, 1), "IB error 162: no data")], None)
    lines = out.splitlines()
    assert lines[1].split() == ["AAPL", "249", "3", "4", "0", "1", "2", "10", "2024-01-02", "2024-12-31", "97,740"]
    assert lines[2] == "latest errors:" and lines[3] == "  AAPL 2024-05-01: IB error 162: no data"
    assert "(no sessions recorded yet)" in format_status([], [], None)


def test_status_gives_the_rate_achieved_and_a_running_runs_progress_line():
    t0 = dt.datetime(2024, 7, 1, 1, 0, tzinfo=dt.timezone.utc)
    finished = (7, t0, t0 + dt.timedelta(minutes=10), "finished", 120, 46800, 0, "summary")
    out = format_status([], [], finished, now=t0 + dt.timedelta(hours=5)).splitlines()
    assert out[-1] == "last run 7: finished, started 2024-07-01 01:00:00 UTC, finished 01:10:00; " \
                      "120 requests (12.0/min), 46,800 bars, 0 errors"
    progress = "progress: sessions 3/10 (30%), ETA 5s; pacing auto (documented), 3/8 in flight, 41.2 requests/min"
    beat = ("running", progress, t0 + dt.timedelta(minutes=4, seconds=57))
    running = (8, t0, None, "running", 30, 11700, 1, None)
    out = format_status([], [], running, heartbeat=beat, now=t0 + dt.timedelta(minutes=5)).splitlines()
    assert out[-2].endswith("; 30 requests (6.0/min), 11,700 bars, 1 errors")
    assert out[-1] == "now (running, heartbeat 3.0s ago): " + progress
    # a finished run, or a heartbeat row saying stopped: no "now" line
    assert "now (" not in format_status([], [], finished, heartbeat=beat, now=t0)
    assert "now (" not in format_status([], [], running, heartbeat=("stopped", "summary", t0), now=t0)


def test_summary_line_and_durations():
    sm = RunSummary(run_id=3, planned=10, done=9, requests=11, bars=3510, errors=2, elapsed=75)
    sm.statuses.update(COMPLETE=8, ERROR=1)
    sm.left_pending = 1
    assert sm.line() == ("summary: run 3 finished in 1m15s: 10 sessions planned, 9 done (COMPLETE 8, ERROR 1), "
                         "1 left PENDING, 0 HOLIDAY recorded, 11 requests, 3,510 bars stored, 2 IB errors, "
                         "0 pacing violations, 0 reconnects")
    assert [fmt_duration(x) for x in (3.21, 42, 3700, 90000, float("inf"))] == ["3.2s", "42s", "1h01m", "1d01h", "?"]


def _unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(ROOT / "systemd" / name)
    return cp


def test_units():
    svc = _unit("feed-backfill.service")
    assert svc["Service"]["Type"] == "oneshot" and svc["Service"]["NotifyAccess"] == "main"
    assert svc["Service"]["ExecStart"].startswith("/opt/feeds/bin/feed-backfill")
    assert "78" in svc["Service"]["RestartPreventExitStatus"].split()
    assert svc["Service"]["User"] == "feeds_ibkr" and svc["Unit"]["StartLimitBurst"]
    timer = _unit("feed-backfill.timer")
    assert timer["Timer"]["OnCalendar"] == "Mon..Fri *-*-* 18:00:00 America/New_York"
    assert timer["Timer"]["Persistent"] == "true" and timer["Install"]["WantedBy"] == "timers.target"
    sim = _unit("feed-sim-tws.service")
    assert "--pacing-scale" in sim["Service"]["Environment"] and sim["Service"]["IPAddressDeny"] == "any"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_timer_fires_at_18_new_york_all_year():
    """Winter (EST) and summer (EDT): 18:00 in New York is 23:00 and 22:00 UTC."""
    expr = _unit("feed-backfill.timer")["Timer"]["OnCalendar"]
    for base, want in (("2024-01-05 12:00 UTC", "Fri 2024-01-05 23:00:00 UTC"),
                       ("2024-07-05 12:00 UTC", "Fri 2024-07-05 22:00:00 UTC"),
                       ("2024-07-06 12:00 UTC", "Mon 2024-07-08 22:00:00 UTC")):
        out = subprocess.run(["systemd-analyze", "calendar", f"--base-time={base}", expr],
                             capture_output=True, text=True, env={"TZ": "UTC", "PATH": "/usr/bin:/bin"}).stdout
        if "--base-time" in out or "Unknown" in out:
            pytest.skip("systemd-analyze too old for --base-time")
        assert f"Next elapse: {want}" in out, out


def test_database_down_is_one_line_and_exit_1(tmp_path):
    cfg = write_cfg(tmp_path)
    r = invoke("--config", str(cfg), "--status")
    assert r.exit_code == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot connect to the database" in lines[0]
