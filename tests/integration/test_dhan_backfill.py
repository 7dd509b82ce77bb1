"""feed-dhan-backfill end to end: Dhan's charts API on loopback (tests/integration/dhan_fake.py,
serving the real HDFCBANK recordings and generated candles), a real PostgreSQL."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from conftest import ROOT, shared_file
from dhan_fake import CLIENT, TOKEN, FakeDhan
from feeds.backfill import Selection
from feeds.calendars import ExchangeCalendar
from feeds.dhan.history import DhanBackfill, DhanStore, Settings, TokenExpired
from feeds.dhan.instruments import InstrumentList, parse_instruments

pytestmark = pytest.mark.integration

XNSE = ExchangeCalendar("XNSE")
UTC = dt.timezone.utc
D1, D3 = dt.date(2024, 9, 11), dt.date(2024, 9, 13)
ONE_MIN = "intraday_1min_hdfcbank_2024-09-11..13.json"


class Notes:
    def __init__(self):
        self.msgs: list[str] = []

    def notify(self, msg: str) -> None:
        self.msgs.append(msg)


@pytest.fixture
def data():
    return shared_file("dhan", ONE_MIN).parent


@pytest.fixture
def token(tmp_path):
    p = tmp_path / "access_token.json"
    p.write_text(json.dumps({"client_id": CLIENT, "access_token": TOKEN,
                             "expires_at": "2999-01-01T00:00:00+00:00"}))
    return str(p)


def scrip(fake: FakeDhan) -> InstrumentList:
    head = "SEM_EXM_EXCH_ID,SEM_SEGMENT,SEM_SMST_SECURITY_ID,SEM_INSTRUMENT_NAME,SEM_TRADING_SYMBOL,SEM_TICK_SIZE\n"
    return InstrumentList(head + "".join(f"{e},{s},{i},{k},{sym},5.0\n" for e, s, i, k, sym in fake.instruments))


def backfill(fake: FakeDhan, dsn: str, token: str, lines_text: str, **kw) -> DhanBackfill:
    kw.setdefault("reconcile", False)
    s = Settings(api_url=fake.url, client_id=CLIENT, token_file=token, request_timeout=10, **kw)
    return DhanBackfill(s, parse_instruments(lines_text), DhanStore(dsn), scrip(fake), notifier=Notes())


def run(coro, timeout=300):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def q(dsn, sql, args=()):
    with psycopg.connect(dsn) as c:
        cur = c.execute(sql, args)
        return cur.fetchall() if cur.description else None


def statuses(dsn):
    return {(r[0], r[1]): r[2:] for r in q(dsn, """SELECT instrument, session_date, status, expected_bars,
                                                          actual_bars, error, note FROM dhan_session_status""")}


def test_hdfcbank_three_sessions_complete_375_bars_values_exact(data, db, token):
    with FakeDhan(data) as fake:
        bf = backfill(fake, db, token, "NSE_EQ:HDFCBANK full priority\n")
        sm = run(bf.run(Selection(first=D1, last=D3)))
        assert sm.failed is None, sm.line()
        assert (sm.planned, sm.done, sm.requests, sm.bars) == (3, 3, 1, 1125)
        # one request for the three sessions, from the first open to the last close (IST)
        assert [b for _, b in fake.log] == [{"securityId": "1333", "exchangeSegment": "NSE_EQ",
                                             "instrument": "EQUITY", "interval": "1", "oi": False,
                                             "fromDate": "2024-09-11 09:15:00", "toDate": "2024-09-13 15:30:00"}]
    st = statuses(db)
    assert st == {("NSE_EQ:HDFCBANK", D1 + dt.timedelta(days=i)): ("COMPLETE", 375, 375, None, None) for i in range(3)}
    rec = json.loads((data / ONE_MIN).read_text(), parse_float=Decimal)["response"]
    rows = q(db, """SELECT bar_start, open, high, low, close, volume, version, symbol, security_id
                      FROM dhan_bar ORDER BY bar_start""")
    want = [(dt.datetime.fromtimestamp(int(t), UTC), o, h, lo, c, v) for t, o, h, lo, c, v in
            zip(rec["timestamp"], rec["open"], rec["high"], rec["low"], rec["close"], rec["volume"], strict=True)]
    assert [r[:6] for r in rows] == want                            # numeric equality, every candle
    assert {r[6:] for r in rows} == {(0, "HDFCBANK", 1333)}
    assert str(rows[0][1]) == "1650.4"                              # the decimal text, not a float's
    # a second run has nothing to do
    with FakeDhan(data) as fake:
        sm = run(backfill(fake, db, token, "NSE_EQ:HDFCBANK\n").run(Selection(first=D1, last=D3)))
        assert fake.requests == 0 and sm.planned == 0 and sm.failed is None


def test_refetch_records_the_bonus_adjustment_and_keeps_both_versions(data, db, token):
    with FakeDhan(data) as fake:
        assert run(backfill(fake, db, token, "NSE_EQ:HDFCBANK\n").run(Selection(first=D1, last=D3))).failed is None
        original = q(db, "SELECT bar_start, open, high, low, close, volume FROM dhan_bar ORDER BY bar_start")
        # the 15-minute recording (recorded after the bonus) against the stored one-minute candles
        from feeds.dhan.backfill_main import compare_run
        run(compare_run(backfill(fake, db, token, "NSE_EQ:HDFCBANK\n"), Selection(first=D1, last=D3), 15))
        assert q(db, "SELECT count(*) FROM dhan_bar")[0][0] == 1125        # nothing stored from 15-minute candles
        # Dhan's one-minute history after the 1:1 bonus: prices halved to the tick, volume doubled
        fake.adjust.add(1333)
        bf = backfill(fake, db, token, "NSE_EQ:HDFCBANK\n")
        sm = run(bf.run(Selection(first=D1, last=D3), refetch=True))
        assert sm.failed is None and sm.adjustments == 3, sm.line()
        # again at 15 minutes: the newest (adjusted) version agrees within a tick, nothing new recorded
        run(compare_run(backfill(fake, db, token, "NSE_EQ:HDFCBANK\n"), Selection(first=D1, last=D3), 15))
    adj = q(db, """SELECT session_date, kind, price_factor, volume_factor, interval_minutes, candles_compared,
                          stored_version, new_version, found_at::date = current_date, stored_first_close,
                          fetched_first_close FROM dhan_adjustment ORDER BY interval_minutes, session_date""")
    assert [a[:9] for a in adj] == (
        [(D1 + dt.timedelta(days=i), "factor", 2, 2, 1, 375, 0, 1, True) for i in range(3)]
        + [(D1 + dt.timedelta(days=i), "factor", 2, 2, 15, 25, 0, None, True) for i in range(3)])
    assert adj[0][9] == original[0][4] and adj[0][10] * 2 - adj[0][9] <= Decimal("0.05")
    # both versions kept: version 0 untouched, version 1 the adjusted answer with its adjustment id
    assert q(db, "SELECT bar_start, open, high, low, close, volume FROM dhan_bar WHERE version = 0 "
                 "ORDER BY bar_start") == original
    v1 = q(db, "SELECT count(*), count(DISTINCT adjustment_id), min(volume) FROM dhan_bar WHERE version = 1")[0]
    assert v1[:2] == (1125, 3) and v1[2] == 2 * min(r[5] for r in original)
    latest = q(db, "SELECT close FROM dhan_bar_latest ORDER BY bar_start LIMIT 1")[0][0]
    assert abs(latest * 2 - original[0][4]) <= Decimal("0.05")
    st = statuses(db)
    assert all(v[0] == "COMPLETE" and "adjusted: prices / 2, volume * 2" in v[4] for v in st.values())


def test_refused_request_is_error_others_complete_and_rate_limit_answers_are_retried(data, db, token):
    with FakeDhan(data) as fake:
        fake.instruments.append(("NSE", "E", 2885, "EQUITY", "RELIANCE"))
        fake.refuse.add(2885)
        fake.force_429 = 2
        # one request at a time, so that the order of arrival is the order of sending
        bf = backfill(fake, db, token, "NSE_EQ:RELIANCE\nNSE_EQ:HDFCBANK priority\nNSE_EQ:NOSUCH\n", concurrency=1)
        sm = run(bf.run(Selection(first=D1, last=D3)))
    st = statuses(db)
    assert {k: v[0] for k, v in st.items()} == {
        **{("NSE_EQ:HDFCBANK", D1 + dt.timedelta(days=i)): "COMPLETE" for i in range(3)},
        **{("NSE_EQ:RELIANCE", D1 + dt.timedelta(days=i)): "ERROR" for i in range(3)},
        **{("NSE_EQ:NOSUCH", D1 + dt.timedelta(days=i)): "ERROR" for i in range(3)}}
    assert "DH-905" in st[("NSE_EQ:RELIANCE", D1)][3]
    assert "not in Dhan's instrument list" in st[("NSE_EQ:NOSUCH", D1)][3]
    assert sm.rate_limited == 2 and sm.failed is None and fake.violations == 0
    # priority first: HDFCBANK was asked before RELIANCE
    assert [b["securityId"] for _, b in fake.log] == ["1333", "1333", "1333", "2885"]


def test_invalid_token_stops_the_run_sessions_stay_pending_and_the_cli_exits_77(data, db, token, tmp_path,
                                                                                 monkeypatch):
    with FakeDhan(data) as fake:
        fake.token_invalid = True
        bf = backfill(fake, db, token, "NSE_EQ:HDFCBANK\n")
        with pytest.raises(TokenExpired):
            run(bf.run(Selection(first=D1, last=D3)))
        assert fake.requests == 1
        assert {v[0] for v in statuses(db).values()} == {"PENDING"}
        assert "DH-906" in statuses(db)[("NSE_EQ:HDFCBANK", D1)][3]
        cfg = write_config(tmp_path, fake, token, "NSE_EQ:HDFCBANK\n")
        monkeypatch.setenv("FEEDS_DSN", db)
        r = cli("--config", str(cfg), "--from", str(D1), "--to", str(D3))
        assert r.exit_code == 77, r.output
    # an expired token file: exit 77 before any request
    Path(token).write_text(json.dumps({"access_token": TOKEN, "expires_at": "2020-01-01T00:00:00+00:00"}))
    with FakeDhan(data) as fake:
        cfg = write_config(tmp_path, fake, token, "NSE_EQ:HDFCBANK\n")
        r = cli("--config", str(cfg), "--from", str(D1), "--to", str(D3))
        assert r.exit_code == 77 and fake.requests == 0, r.output


def write_config(tmp_path: Path, fake: FakeDhan, token: str, lines: str, extra: str = "") -> Path:
    (tmp_path / "instruments.txt").write_text(lines)
    cfg = tmp_path / "dhan.toml"
    cfg.write_text(f'[dhan]\nclient_id = "{CLIENT}"\napi_url = "{fake.url}"\ntoken_file = "{token}"\n'
                   f'instruments_file = "{tmp_path / "instruments.txt"}"\n'
                   f'instrument_list_url = "{fake.url}/api-data/api-scrip-master.csv"\n'
                   f'instrument_list_cache = "{tmp_path / "scrip.csv"}"\nreconcile = false\n{extra}'
                   '[backfill]\nstatus_interval = 1\nrequest_timeout = 10\n[metrics]\ntextfile_dir = ""\n')
    return cfg


def cli(*args):
    from feeds.dhan.backfill_main import main
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_cli_dry_run_run_and_status(data, db, token, tmp_path, monkeypatch):
    monkeypatch.setenv("FEEDS_DSN", db)
    with FakeDhan(data) as fake:
        cfg = write_config(tmp_path, fake, token, "NSE_EQ:HDFCBANK priority\n")
        r = cli("--config", str(cfg), "--dry-run", "--from", "2024-09-09", "--to", "2024-09-15")
        assert r.exit_code == 0, r.output
        lines = r.stdout.splitlines()
        assert lines[1].split() == ["NSE_EQ:HDFCBANK", "1333", "1", "2024-09-09", "2024-09-15", "5", "0", "0",
                                    "0", "1"]
        assert lines[-1].startswith("total: 5 sessions to fetch, 1 requests; the rate limit (5/s)")
        assert fake.requests == 0 and statuses(db) == {}
        r = cli("--config", str(cfg), "--from", str(D1), "--to", str(D3))
        assert r.exit_code == 0, r.output
    r = cli("--config", str(cfg), "--status")
    assert r.exit_code == 0, r.output
    head, row = r.stdout.splitlines()[:2]
    assert row.split() == ["NSE_EQ:HDFCBANK", "3", "0", "0", "0", "0", "0", "0", "2024-09-11", "2024-09-13", "1,125"]
    assert "last run 1: finished" in r.stdout and "1 requests" in r.stdout


LIVE = """CREATE TABLE dhan_candle (
    exchange_segment text NOT NULL, security_id bigint NOT NULL, interval_min smallint NOT NULL,
    bar_start timestamptz NOT NULL, bar_end timestamptz NOT NULL, open numeric NOT NULL, high numeric NOT NULL,
    low numeric NOT NULL, close numeric NOT NULL, volume numeric, ticks integer NOT NULL, final boolean NOT NULL,
    revision integer NOT NULL, source text NOT NULL, recorded_at timestamptz NOT NULL,
    PRIMARY KEY (exchange_segment, security_id, interval_min, bar_start, recorded_at))"""


def test_reconciliation_counts_differences_per_instrument(data, db, token, caplog):
    day = dt.date(2024, 9, 12)
    with FakeDhan(data) as fake:
        bf = backfill(fake, db, token, "NSE_EQ:HDFCBANK\n")
        caplog.set_level(logging.INFO, "feeds.dhan.history")
        sm = run(bf.run(Selection(first=day, last=day)))
        assert sm.failed is None
        bf2 = backfill(fake, db, token, "NSE_EQ:HDFCBANK\n")
        run(bf2._db(bf2.store.connect))
        # without the live collector's table (sql/0011_dhan_live.sql, when present, is moved aside)
        real = bool(q(db, "SELECT to_regclass('dhan_candle') IS NOT NULL")[0][0])
        if real:
            q(db, "ALTER TABLE dhan_candle RENAME TO dhan_candle_aside")
        assert run(bf2.reconcile(Selection(last=day))) == 0
        assert "reconciliation skipped: no table dhan_candle" in caplog.text
        # the live candles of the day (the live collector's table, or one of its shape): 3 minutes
        # missing, 2 differ
        rows = q(db, "SELECT bar_start, open, high, low, close, volume FROM dhan_bar ORDER BY bar_start")
        with psycopg.connect(db) as c:
            c.execute("ALTER TABLE dhan_candle_aside RENAME TO dhan_candle" if real else LIVE)
            for i, (t, o, h, lo, cl, v) in enumerate(rows):
                if i in (0, 100, 374):
                    continue
                if i in (5, 200):
                    cl, h = cl + Decimal("0.05"), max(h, cl + Decimal("0.05"))
                c.execute("INSERT INTO dhan_candle (exchange_segment, security_id, interval_min, bar_start, bar_end, "
                          "open, high, low, close, volume, ticks, final, revision, source, recorded_at) "
                          "VALUES ('NSE_EQ', 1333, 1, %s, %s, %s, %s, %s, %s, %s, 10, true, 0, 'live', now())",
                          (t, t + dt.timedelta(minutes=1), o, h, lo, cl, v))
        before = fake.requests
        assert run(bf2.reconcile(Selection(last=day))) == 1
        assert fake.requests == before                  # Dhan's candles of the day were already stored
        run(bf2._db(bf2.store.close))
        bf2._shutdown_executor()
    got = q(db, """SELECT symbol, session_date, minutes_compared, minutes_differing, missing_live, missing_dhan, detail
                     FROM dhan_reconciliation""")
    assert got[0][:6] == ("HDFCBANK", day, 372, 2, 3, 0)
    assert got[0][6].startswith("09:20 close") and "; 12:35 " in got[0][6]


# ---------------------------------------------------------------------------------- kill and resume

SCALE = 0.1    # the fake's and the limiter's one-second window scaled to 100 ms


def start_cli(cfg: Path, dsn: str, out: Path, *args) -> subprocess.Popen:
    env = dict(os.environ, FEEDS_DSN=dsn, FEEDS_LOG_LEVEL="INFO", FEEDS_DHAN_RATE_SCALE=str(SCALE))
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen([sys.executable, str(ROOT / "bin" / "feed-dhan-backfill"), "--config", str(cfg), *args],
                            env=env, stdout=out.open("ab"), stderr=subprocess.STDOUT)


def test_kill_9_mid_run_then_resume(data, db, token, tmp_path):
    n_sym = 20
    lines = "".join(f"NSE_EQ:SYM{i:02d}\n" for i in range(n_sym))
    first, last = "2024-09-02", "2024-09-13"         # 10 sessions, one request per session (history_days_per_request 1)
    out = tmp_path / "run.log"
    with FakeDhan(data, rate=5, window=SCALE) as fake:
        fake.instruments = [("NSE", "E", 5000 + i, "EQUITY", f"SYM{i:02d}") for i in range(n_sym)]
        cfg = write_config(tmp_path, fake, token, lines, "history_days_per_request = 1\n")
        procs: list[subprocess.Popen] = []

        def killer(n):
            if n == 120 and procs:
                os.kill(procs[0].pid, signal.SIGKILL)
        fake.on_request = killer
        p = start_cli(cfg, db, out, "--from", first, "--to", last)
        procs.append(p)
        assert p.wait(120) == -signal.SIGKILL, out.read_text()[-3000:]
        final = {(r[0], r[1]) for r in q(db, "SELECT instrument, session_date FROM dhan_session_status "
                                             "WHERE status = 'COMPLETE'")}
        assert 0 < len(final) < 200
        # whole sessions only: each COMPLETE session has its 375 candles, nothing else is stored
        per = dict(((r[0], r[1]), r[2]) for r in q(db, """
            SELECT 'NSE_EQ:' || symbol, (bar_start AT TIME ZONE 'Asia/Kolkata')::date, count(*) FROM dhan_bar
             GROUP BY 1, 2"""))
        assert set(per) == final and set(per.values()) == {375}
        fake.on_request = None
        # the second run carries a token of its own, so that a request of the killed run the fake reads
        # after the kill is not taken for one of the second run's
        fake.tokens.add(TOKEN + "-2")
        Path(token).write_text(json.dumps({"client_id": CLIENT, "access_token": TOKEN + "-2",
                                           "expires_at": "2999-01-01T00:00:00+00:00"}))
        p = start_cli(cfg, db, out, "--from", first, "--to", last)
        assert p.wait(120) == 0, out.read_text()[-3000:]
    again = [(f"NSE_EQ:SYM{int(b['securityId']) - 5000:02d}", dt.date.fromisoformat(b["fromDate"][:10]))
             for (_, b), tok in zip(fake.log, fake.log_tokens) if tok == TOKEN + "-2"]
    assert len(again) == len(set(again)) == 200 - len(final)
    assert not set(again) & final                                   # nothing finished is asked again
    assert {r[0] for r in q(db, "SELECT status FROM dhan_session_status")} == {"COMPLETE"}
    assert q(db, "SELECT count(*), count(DISTINCT (security_id, bar_start)) FROM dhan_bar")[0] == (75000, 75000)
    assert fake.violations == 0


# ---------------------------------------------------------------------------------- the simulator


def sim_backfill(sim, dsn: str, tmp_path: Path, lines_text: str, **kw) -> DhanBackfill:
    """A run against feeds.sim.dhan: the token it issued, its instrument list through the cache file."""
    from feeds.dhan.instruments import refresh_cache
    tok = tmp_path / "sim_token.json"
    if not tok.exists():
        tok.write_text(json.dumps({"client_id": sim.auth.client_id if hasattr(sim.auth, "client_id") else CLIENT,
                                   "access_token": sim.issue_token(), "expires_at": "2999-01-01T00:00:00+00:00"}))
    text = run(refresh_cache(f"{sim.base_url}/api-data/api-scrip-master.csv", str(tmp_path / "scrip.csv")))
    kw.setdefault("reconcile", False)
    s = Settings(api_url=sim.base_url, client_id=CLIENT, token_file=str(tok), request_timeout=30, **kw)
    return DhanBackfill(s, parse_instruments(lines_text), DhanStore(dsn), InstrumentList(text), notifier=Notes())


@pytest.fixture
def sim(data):
    sim_mod = pytest.importorskip("feeds.sim.dhan")
    with sim_mod.DhanSimulator(data_dir=data, instruments=600, client_id=CLIENT).running() as s:
        yield s


def test_simulator_hdfcbank_three_sessions_complete_then_the_bonus_recorded_not_overwritten(sim, data, db, tmp_path):
    bf = sim_backfill(sim, db, tmp_path, "NSE_EQ:HDFCBANK priority\n")
    sm = run(bf.run(Selection(first=D1, last=D3)))
    assert sm.failed is None and (sm.planned, sm.done, sm.requests, sm.bars) == (3, 3, 1, 1125), sm.line()
    assert {v[:3] for v in statuses(db).values()} == {("COMPLETE", 375, 375)}
    rec = json.loads((data / ONE_MIN).read_text(), parse_float=Decimal)["response"]
    want = [(dt.datetime.fromtimestamp(int(t), UTC), o, h, lo, c, v) for t, o, h, lo, c, v in
            zip(rec["timestamp"], rec["open"], rec["high"], rec["low"], rec["close"], rec["volume"], strict=True)]
    assert q(db, "SELECT bar_start, open, high, low, close, volume FROM dhan_bar ORDER BY bar_start") == want
    # Dhan adjusts its history for the 1:1 bonus: fetched again, the sessions differ by the factor 2
    sim.set_adjusted(True)
    sm = run(sim_backfill(sim, db, tmp_path, "NSE_EQ:HDFCBANK\n").run(Selection(first=D1, last=D3), refetch=True))
    assert sm.failed is None and sm.adjustments == 3, sm.line()
    assert q(db, "SELECT kind, price_factor, volume_factor, count(*) FROM dhan_adjustment GROUP BY 1, 2, 3") == [
        ("factor", 2, 2, 3)]
    assert q(db, "SELECT bar_start, open, high, low, close, volume FROM dhan_bar WHERE version = 0 "
                 "ORDER BY bar_start") == want                                   # kept, not overwritten
    assert q(db, "SELECT count(*) FROM dhan_bar WHERE version = 1 AND adjustment_id IS NOT NULL")[0][0] == 1125
    assert sim.stats()["rest"]["violations"] == 0


# ---------------------------------------------------------------------------------- rate limits


def test_500_symbols_5_days_within_the_rate_limit_and_using_it(sim, db, tmp_path):
    """500 symbols x 5 days = 500 requests (90 days a request) at Dhan's real 5 a second: about 100 s.
    The simulator counts, on arrival, every request beyond 5 in any sliding second (violations)
    and the share of the allowance used."""
    n = 500
    lines = "".join(f"NSE_EQ:SIMEQ{i:05d}{' priority' if i > 480 else ''}\n" for i in range(1, n + 1))
    bf = sim_backfill(sim, db, tmp_path, lines)
    sim.reset_stats()
    sm = run(bf.run(Selection(first=dt.date(2024, 9, 9), last=D3)), timeout=600)
    rest = sim.stats()["rest"]
    assert sm.failed is None, sm.line()
    assert (sm.planned, sm.done, sm.requests) == (2500, 2500, 500)
    assert rest["violations"] == 0 and sm.rate_limited == 0, rest
    assert rest["max_arrivals_in_any_second"] <= 5, rest
    assert rest["data_accepted"] == 500
    assert rest["allowance_used"] >= 0.9, rest            # the simulator's figure, not the test's clock
    assert q(db, "SELECT count(*) FROM dhan_bar")[0][0] == 2500 * 375
    assert {r[0] for r in q(db, "SELECT status FROM dhan_session_status")} == {"COMPLETE"}
    # priority instruments (the last 20 of the file) were asked first
    first_other, last_prio = q(db, """SELECT min(requested_at) FILTER (WHERE instrument < 'NSE_EQ:SIMEQ00481'),
                                             max(requested_at) FILTER (WHERE instrument >= 'NSE_EQ:SIMEQ00481')
                                        FROM dhan_session_status""")[0]
    assert last_prio <= first_other


# ---------------------------------------------------------------------------------- the database role


def test_feeds_dhan_role_runs_the_whole_backfill_and_writes_nothing_else(data, db, token):
    """As the role feeds_dhan (sql/0009_dhan.sql): the run, the refetch with its adjustment, the
    reconciliation and the heartbeat; never another venue's table."""
    from psycopg.conninfo import make_conninfo
    as_dhan = make_conninfo(db, user="feeds_dhan")
    with FakeDhan(data) as fake:
        sm = run(backfill(fake, as_dhan, token, "NSE_EQ:HDFCBANK\n").run(Selection(first=D1, last=D3)))
        assert sm.failed is None, sm.line()
        fake.adjust.add(1333)
        sm = run(backfill(fake, as_dhan, token, "NSE_EQ:HDFCBANK\n", reconcile=True)
                 .run(Selection(first=D1, last=D3), refetch=True))
        assert sm.failed is None and sm.adjustments == 3, sm.line()
    assert q(db, "SELECT count(*) FROM dhan_bar")[0][0] == 2250
    with psycopg.connect(as_dhan, autocommit=True) as c:
        assert c.execute("SELECT current_user").fetchone()[0] == "feeds_dhan"
        c.execute("""INSERT INTO feed_heartbeat (unit, host, pid, started_at, updated_at, state, status, detail)
                     VALUES ('feed-dhan-backfill.service', 'h', 1, now(), now(), 'running', '', '{}')""")
        for sql in ("DELETE FROM ibkr_session_status", "INSERT INTO ibkr_contract (symbol, sec_type, exchange, "
                    "currency, calendar) VALUES ('X', 'STK', 'SMART', 'USD', 'XNYS')",
                    "UPDATE dhan_adjustment SET price_factor = 1", "DELETE FROM dhan_adjustment",
                    "TRUNCATE dhan_bar", "DROP TABLE dhan_bar", "CREATE TABLE x (a int)",
                    "INSERT INTO feed_heartbeat (unit, host, pid, started_at, updated_at, state, status, detail) "
                    "VALUES ('feed-backfill.service', 'h', 1, now(), now(), 'running', '', '{}')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(sql)
    with psycopg.connect(db, autocommit=True) as c:
        c.execute("SET ROLE feeds_reader")            # NOLOGIN: analysts are granted it
        c.execute("SELECT count(*) FROM dhan_bar_latest").fetchone()
        for t in ("dhan_bar", "dhan_adjustment", "dhan_session_status", "dhan_backfill_run", "dhan_reconciliation",
                  "dhan_instrument"):
            c.execute(f"SELECT count(*) FROM {t}").fetchone()
