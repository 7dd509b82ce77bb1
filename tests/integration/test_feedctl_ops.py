"""feedctl check, status, gaps, report and alert --unit: the commands themselves, against a real
PostgreSQL, real alert receivers (SMTP and a webhook on loopback) and a faked systemctl."""
import datetime as dt
import json

import pytest
from click.testing import CliRunner

from feeds import cli
from feeds.db import connect
from feeds.ops import gather as G
from test_alerts_channels import SmtpReceiver, WebhookReceiver, running, url_file   # noqa: F401 (fixtures)

UTC = dt.timezone.utc
BIN, KITE = "feed-binance.service", "feed-zerodha.service"
SUNDAY_0300 = dt.datetime(2026, 11, 29, 3, 0, tzinfo=UTC)           # Binance trades, NSE closed
MONDAY_NSE_OPEN = dt.datetime(2026, 11, 30, 6, 0, tzinfo=UTC)        # 11:30 IST
STATUS = "aggTrade 1,234/s max-age 0.1s; bookTicker 50/s max-age 0.2s; stored 10,000"


@pytest.fixture
def smtp():
    yield from running(SmtpReceiver())


@pytest.fixture
def hook():
    yield from running(WebhookReceiver())


class FakeSystemd:
    def __init__(self, units):
        self.units = units              # {unit: (ActiveState, SubState, Result, NRestarts)}
        self.journal = {}

    def __call__(self, argv):
        if argv[:2] == ["systemctl", "list-units"]:
            return 0, "".join(f"{u} loaded {a} {s} x\n" for u, (a, s, _, _) in self.units.items())
        if argv[:2] == ["systemctl", "list-unit-files"]:
            return 0, "".join(f"{u} enabled enabled\n" for u in self.units)
        if argv[:2] == ["systemctl", "show"]:
            out = []
            for u in argv[argv.index("--") + 1:]:
                a, s, r, n = self.units.get(u, ("inactive", "dead", "success", 0))
                out.append(f"Id={u}\nActiveState={a}\nSubState={s}\nResult={r}\nNRestarts={n}\nExecMainStatus=1\n")
            return 0, "\n".join(out)
        if argv[0] == "journalctl":
            unit = argv[argv.index("-u") + 1]
            lines = self.journal.get(unit, [])
            if "-n" in argv:
                lines = lines[-int(argv[argv.index("-n") + 1]):]
            return 0, "".join(ln + "\n" for ln in lines)
        return 1, ""


@pytest.fixture
def env(db, tmp_path, monkeypatch):
    """FEEDS_DSN, a faked systemctl with feed-binance and feed-zerodha active, spools in tmp."""
    monkeypatch.setenv("FEEDS_DSN", db)
    sd = FakeSystemd({BIN: ("active", "running", "success", 0), KITE: ("active", "running", "success", 0)})
    monkeypatch.setattr(cli, "RUNNER", sd)
    monkeypatch.setattr(G, "SPOOL_ROOT", tmp_path / "spools")
    monkeypatch.setattr(G, "KITE_CONFIG", tmp_path / "no-kite.toml")
    (tmp_path / "spools" / "binance").mkdir(parents=True)
    return sd


def alerts_toml(path, files=(), **alerts):
    lines = ["[alerts]", f'url_files = [{", ".join(json.dumps(f) for f in files)}]',
             f'state_file = "{path.parent / "state" / "state.json"}"', "send_timeout = 5.0",
             "disk_min_free = 0.0"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in alerts.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def ops_toml(tmp_path, files=(), **alerts):
    """An ops.toml (the database from FEEDS_DSN) with its alerts.toml beside it."""
    alerts_toml(tmp_path / "alerts.toml", files, **alerts)
    p = tmp_path / "ops.toml"
    p.write_text("[api]\n")
    return str(p)


def beat(db, unit, updated_at, status=STATUS, state="running", messages=10_000):
    detail = {"streams": 2, "messages": messages, "malformed": 0, "last_message_age": 0.2,
              "tables": {"binance_agg_trade": {"stored": 9000, "duplicates": 0, "rejected": 0}},
              "spooled_rows": 0, "replayed_rows": 0, "pending": 0}
    with connect(db, application_name="test") as conn:
        conn.execute("""INSERT INTO feed_heartbeat (unit, host, pid, started_at, updated_at, state, status, detail)
                        VALUES (%s, 'box1', 42, %s, %s, %s, %s, %s)
                        ON CONFLICT (unit) DO UPDATE SET updated_at = EXCLUDED.updated_at,
                          state = EXCLUDED.state, status = EXCLUDED.status, detail = EXCLUDED.detail""",
                     (unit, dt.datetime(2026, 11, 20, tzinfo=UTC), updated_at, state, status, json.dumps(detail)))


def feedctl(*args):
    return CliRunner().invoke(cli.feedctl, list(args), catch_exceptions=False)


def test_check_alerts_once_per_start_and_once_per_clear(env, db, tmp_path, smtp, hook):
    cfg = ops_toml(tmp_path, [url_file(tmp_path, "mail.url", smtp.url), url_file(tmp_path, "hook.url", hook.url)],
                   health_threshold=0)
    t = SUNDAY_0300
    beat(db, BIN, t - dt.timedelta(seconds=300))                    # stale
    beat(db, KITE, t - dt.timedelta(hours=30))                      # stale, but NSE is closed
    r = feedctl("--config", cfg, "check", "--now", t.isoformat())
    assert r.exit_code == 1, r.output
    assert f"holds [critical] stale:{BIN}" in r.output and f"sent firing stale:{BIN}: accepted" in r.output
    assert [s for s, _ in smtp.box.mails()] == [f"[critical] feeds: {BIN} heartbeat stale"]
    assert [p["title"] for _, p in hook.posts] == [f"[critical] feeds: {BIN} heartbeat stale"]
    assert "journalctl -u feed-binance.service -e" in smtp.box.mails()[0][1]

    r = feedctl("--config", cfg, "check", "--now", (t + dt.timedelta(minutes=1)).isoformat())
    assert r.exit_code == 1 and "sent " not in r.output, r.output               # still holds: nothing new
    assert len(smtp.box.messages) == 1 and len(hook.posts) == 1

    t2 = t + dt.timedelta(minutes=2)
    beat(db, BIN, t2 - dt.timedelta(seconds=5))                                # fresh again
    r = feedctl("--config", cfg, "check", "--now", t2.isoformat())
    assert r.exit_code == 0, r.output
    assert f"sent resolved stale:{BIN}: accepted" in r.output
    assert [s for s, _ in smtp.box.mails()][1:] == [f"[resolved] feeds: {BIN} heartbeat stale"]
    assert [p["title"] for _, p in hook.posts][1:] == [f"[resolved] feeds: {BIN} heartbeat stale"]
    # nothing about Kite, stale all along outside NSE hours
    assert not any(KITE in s for s, _ in smtp.box.mails())

    beat(db, BIN, t2 + dt.timedelta(seconds=55))
    r = feedctl("--config", cfg, "check", "--now", (t2 + dt.timedelta(minutes=1)).isoformat())
    assert r.exit_code == 0 and len(smtp.box.messages) == 2 and len(hook.posts) == 2

    # the memory beside the state: alerts sent, uptime samples
    mem = json.loads((tmp_path / "state" / "check-memory.json").read_text())
    assert [(a["key"], a["status"]) for a in mem["alerts"]] == [(f"stale:{BIN}", "firing"),
                                                                 (f"stale:{BIN}", "resolved")]
    assert mem["uptime"][BIN] == {"2026-11-29": [2, 4]}
    assert KITE not in mem["uptime"]                                          # never expected on a Sunday


def test_kite_stale_in_nse_hours_alerts(env, db, tmp_path, smtp, hook):
    cfg = ops_toml(tmp_path, [url_file(tmp_path, "hook.url", hook.url)], health_threshold=0)
    t = MONDAY_NSE_OPEN
    beat(db, BIN, t - dt.timedelta(seconds=5))
    beat(db, KITE, t - dt.timedelta(minutes=10), status="full 0/s (no data)")
    r = feedctl("--config", cfg, "check", "--now", t.isoformat())
    assert r.exit_code == 1, r.output
    assert [p["title"] for _, p in hook.posts] == [f"[critical] feeds: {KITE} heartbeat stale"]


def test_check_database_unreachable_exit_2(env, tmp_path, monkeypatch, hook):
    from pgserver import free_port
    monkeypatch.setenv("FEEDS_DSN", f"host=127.0.0.1 port={free_port()} dbname=none connect_timeout=2")
    cfg = ops_toml(tmp_path, [url_file(tmp_path, "hook.url", hook.url)])
    r = feedctl("--config", cfg, "check", "--now", SUNDAY_0300.isoformat())
    assert r.exit_code == 2
    assert [p["title"] for _, p in hook.posts] == ["[critical] feeds: database unreachable"]
    r = feedctl("--config", cfg, "status")
    assert r.exit_code == 2 and r.output.count("database unreachable") == 1


def test_bad_config_exit_78(env, tmp_path):
    p = tmp_path / "ops.toml"
    p.write_text("[api]\n")
    (tmp_path / "alerts.toml").write_text("[alerts]\nhealth_treshold = 10\n")
    r = feedctl("--config", str(p), "check")
    assert r.exit_code == 78 and "alerts.health_treshold" in r.output and f"{tmp_path / 'alerts.toml'}" in r.output
    # the alerts' settings belong in alerts.toml: an [alerts] section in ops.toml is refused, naming it
    p.write_text("[alerts]\nhealth_threshold = 10\n")
    r = feedctl("--config", str(p), "check")
    assert r.exit_code == 78 and f"configuration error in {p}: key 'alerts'" in r.output, r.output


def test_alerts_toml_beside_ops_toml_or_named_by_option(env, db, tmp_path, hook):
    """Channels come from the alerts.toml beside the ops.toml in use, or from
    the one --alerts-config (FEEDS_ALERTS_CONFIG) names."""
    cfg = ops_toml(tmp_path)                                   # beside it: no channel
    other = alerts_toml(tmp_path / "elsewhere.toml", [url_file(tmp_path, "hook.url", hook.url)])
    r = feedctl("--config", cfg, "alert", "--test")
    assert r.exit_code == 1 and f"alerts.url_files is empty in {tmp_path / 'alerts.toml'}" in r.output
    r = feedctl("--config", cfg, "--alerts-config", other, "alert", "--test")
    assert r.exit_code == 0 and "hook.url: accepted" in r.output, r.output
    r = CliRunner(env={"FEEDS_ALERTS_CONFIG": other}).invoke(cli.feedctl, ["--config", cfg, "alert", "--test"])
    assert r.exit_code == 0 and "hook.url: accepted" in r.output, r.output
    assert len(hook.posts) == 2


def test_status_text_and_json(env, db, tmp_path):
    cfg = ops_toml(tmp_path)
    now = dt.datetime.now(UTC)
    beat(db, BIN, now - dt.timedelta(seconds=3))
    beat(db, KITE, now - dt.timedelta(seconds=3), state="spooling", status="full 3/s max-age 0.5s; SPOOLING (db down)")
    (tmp_path / "spools" / "binance" / "spool-000001.bin").write_bytes(b"x" * 2048)
    r = feedctl("--config", cfg, "status", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    units = {u["unit"]: u for u in doc["units"]}
    b = units[BIN]
    assert b["systemd"] == "active/running" and b["state"] == "running" and not b["stale"]
    assert isinstance(b["health"]["total"], int) and set(b["health"]["parts"]) == \
        {"running", "compliance", "errors", "freshness", "performance"}
    assert b["rates"] == {"aggTrade": 1234.0, "bookTicker": 50.0}
    assert b["spool"]["bytes"] == 2048 and b["spool"]["files"] == 1
    assert units[KITE]["last_error"] == "full 3/s max-age 0.5s; SPOOLING (db down)"
    r = feedctl("--config", cfg, "status")
    assert r.exit_code == 0
    line = next(ln for ln in r.output.splitlines() if ln.startswith(BIN))
    assert "active/running" in line and f"health {b['health']['total']:>3}" in line
    assert "rates: aggTrade 1,234.0/s, bookTicker 50.0/s" in r.output and "spool: 1 file(s), 2.0 kB" in r.output
    # a stale active unit: exit 1
    beat(db, BIN, now - dt.timedelta(seconds=600))
    r = feedctl("--config", cfg, "status", "--json")
    assert r.exit_code == 1 and {u["unit"]: u for u in json.loads(r.output)["units"]}[BIN]["stale"]


def seed_gaps(db, now):
    with connect(db, application_name="test") as conn:
        conn.execute("INSERT INTO binance_agg_gap (symbol, first_id, last_id, detected_at) VALUES "
                     "('BTCUSDT', 100, 109, %s), ('ETHUSDT', 7, 8, %s)",
                     (now - dt.timedelta(hours=2), now - dt.timedelta(hours=1)))
        minute = now.replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=3)
        for stage, rep in (("found", None), ("after_fill", False)):
            conn.execute("""INSERT INTO binance_kline_check (symbol, open_time, checked_at, stage, kline_open,
                              kline_high, kline_low, kline_close, kline_volume, kline_trades, agg_volume,
                              agg_trades, differs, repaired, basis)
                            VALUES ('BTCUSDT', %s, %s, %s, 1, 1, 1, 1, 2, 3, 1, 2, 'volume,trades', %s, 'stream')""",
                         (minute, minute + dt.timedelta(minutes=2 if stage == "found" else 5), stage, rep))
        conn.execute("""INSERT INTO ibkr_session_status (symbol, session_date, status, session_open, session_close,
                          expected_bars, actual_bars, error) VALUES
                          ('AAPL', %s, 'ERROR', %s, %s, 390, 0, '162 HMDS query returned no data'),
                          ('MSFT', %s, 'COMPLETE', %s, %s, 390, 390, NULL)""",
                     (now.date(), now, now, now.date(), now, now))
        conn.cursor().executemany("""INSERT INTO binance_agg_trade (symbol, agg_id, price, qty, first_trade_id, last_trade_id,
                              trade_time, is_buyer_maker, recv_time) VALUES ('BTCUSDT', %s, 1, 1, %s, %s, %s, true, %s)""",
                         [(i, i, i, now - dt.timedelta(seconds=i), now) for i in range(1, 26)])


def test_gaps_and_report_on_seeded_data(env, db, tmp_path):
    cfg = ops_toml(tmp_path)
    # judged as at noon yesterday (UTC), so that every row seeded (up to three hours before) lies in one
    # UTC day whatever the time of the run
    now = (dt.datetime.now(UTC) - dt.timedelta(days=1)).replace(hour=12, minute=0, second=0, microsecond=0)
    at = ("--now", now.isoformat())
    seed_gaps(db, now)
    beat(db, BIN, now - dt.timedelta(seconds=5))
    r = feedctl("--config", cfg, "check", "--now", now.isoformat())       # remembers the gaps it sees
    assert r.exit_code == 1 and "holds [warning] gap:binance_agg_trade:BTCUSDT" in r.output, r.output
    with connect(db, application_name="test") as conn:
        conn.execute("DELETE FROM binance_agg_gap WHERE symbol = 'BTCUSDT'")    # the fill ended
    beat(db, BIN, now + dt.timedelta(seconds=55))
    r = feedctl("--config", cfg, "check", "--now", (now + dt.timedelta(minutes=1)).isoformat())
    assert "gap:binance_agg_trade:BTCUSDT" not in r.output.split("sent")[0]

    r = feedctl("--config", cfg, "gaps", "--json", "--since", "1d", *at)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    got = {(e["stream"], e["symbol"], str(e["first"])): e for e in doc["entries"]}
    assert got[("binance_agg_trade", "BTCUSDT", "100")]["state"] == "filled"
    assert got[("binance_agg_trade", "BTCUSDT", "100")]["missing"] == 10
    assert got[("binance_agg_trade", "ETHUSDT", "7")]["state"] == "not filled"
    (k,) = [e for e in doc["entries"] if e["stream"] == "binance_kline"]
    assert k["state"] == "not repaired" and "volume,trades" in k["detail"]
    (ib,) = [e for e in doc["entries"] if e["stream"] == "ibkr_bar_1min"]
    assert (ib["symbol"], ib["missing"], ib["state"]) == ("AAPL", 390, "not filled (ERROR)")
    assert any("not a gap" in n for n in doc["notes"])
    r = feedctl("--config", cfg, "gaps", "--stream", "binance_agg_trade", "--since", "1d", *at)
    assert r.exit_code == 0 and "binance_agg_trade" in r.output and "ibkr" not in r.output.split("note:")[0]
    assert "filled" in r.output and "100 .. 109" in r.output

    r = feedctl("--config", cfg, "report", "--daily", "--date", now.date().isoformat(), "--json", "--exact", *at)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    feeds = {f["feed"]: f for f in rep["feeds"]}
    b = feeds["feed-binance"]
    assert b["rows"]["binance_agg_trade"] == 25 and b["rows"]["binance_book_ticker"] == 0
    assert b["gaps"]["agg_trade_gaps_open"] == 1 and b["gaps"]["agg_trade_gaps_filled"] == 1
    assert b["gaps"]["kline_minutes_not_repaired"] == 1
    assert b["uptime"] == {"up_runs": 2, "expected_runs": 2, "percent": 100.0}
    assert b["alerts"]["firing"] >= 2 and "gap:binance_agg_trade:BTCUSDT" in b["alerts"]["keys"]
    assert b["health"]["units"][BIN]["runs"] == 2
    bf = feeds["feed-backfill"]["gaps"]
    assert (bf["sessions"], bf["sessions_ok"], bf["sessions_error"], bf["minutes_missing"]) == (2, 1, 1, 390)
    r = feedctl("--config", cfg, "report", "--weekly", "--date", now.date().isoformat(), *at)
    assert r.exit_code == 0 and "weekly report" in r.output and "rows stored: 25" in r.output.replace(",", "")


def test_alert_unit_sends_journal_lines_and_what_to_do(env, tmp_path, smtp, hook):
    env.units["feed-binance.service"] = ("failed", "failed", "start-limit-hit", 5)
    env.journal[BIN] = [f"2026-12-01T04:00:{i:02d}+0000 box1 feed-binance[7]: line {i}" for i in range(50)]
    cfg = ops_toml(tmp_path, [url_file(tmp_path, "mail.url", smtp.url), url_file(tmp_path, "hook.url", hook.url)],
                   journal_lines=20)
    r = feedctl("--config", cfg, "alert", "--unit", BIN)
    assert r.exit_code == 0, r.output
    ((subject, body),) = smtp.box.mails()
    assert BIN in subject
    assert "line 49" in body and "line 30" in body and "line 29" not in body
    assert f"systemctl reset-failed {BIN}" in body and f"systemctl status {BIN}" in body
    assert hook.posts[0][1]["type"] == "failure"
    hook.stop()
    smtp.stop()
    r = feedctl("--config", cfg, "alert", "--unit", BIN)
    assert r.exit_code == 1
    r = feedctl("--config", cfg, "alert")
    assert r.exit_code == 2 and "--test or --unit" in r.output


def test_maintain_writes_its_textfile_only_where_the_file_says(db, tmp_path, monkeypatch):
    monkeypatch.setenv("FEEDS_DSN", db)
    cfg = tmp_path / "feeds.toml"
    cfg.write_text(f'[metrics]\ntextfile_dir = "{tmp_path / "absent"}"\n')
    r = CliRunner().invoke(cli.maintain, ["--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "absent").exists()
    cfg.write_text('[metrics]\ntextfile_dir = ""\n')
    r = CliRunner().invoke(cli.maintain, ["--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert list(tmp_path.glob("**/*.prom")) == []


def test_maintain_textfile_parses(db, tmp_path, monkeypatch):
    from prometheus_client.parser import text_string_to_metric_families
    monkeypatch.setenv("FEEDS_DSN", db)
    cfg = tmp_path / "feeds.toml"
    cfg.write_text(f'[metrics]\ntextfile_dir = "{tmp_path}"\n')
    r = CliRunner().invoke(cli.maintain, ["--config", str(cfg)])
    assert r.exit_code == 0, r.output
    samples = {s.name: s for fam in text_string_to_metric_families((tmp_path / "feeds_maintain.prom").read_text())
               for s in fam.samples}
    assert samples["feeds_job_last_exit_code"].value == 0
    assert samples["feeds_job_last_exit_code"].labels == {"job": "maintain"}
    assert samples["feeds_job_tables_failed"].value == 0
    assert "feeds_job_last_success_timestamp_seconds" in samples


def test_check_fails_with_73_when_its_alert_state_cannot_be_written(env, db, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    cfg = tmp_path / "ops.toml"
    cfg.write_text("[api]\n")
    (tmp_path / "alerts.toml").write_text(f'[alerts]\nstate_file = "{blocker / "state.json"}"\n')
    beat(db, BIN, SUNDAY_0300)
    r = feedctl("--config", str(cfg), "check", "--now", SUNDAY_0300.isoformat())
    assert r.exit_code == cli.EX_STATE == 73, r.output
    assert "alert state not" in r.output


def test_a_user_outside_the_operators_group_is_told_how_to_join(tmp_path, open_tmp):
    from conftest import as_unprivileged
    cfg = open_tmp / "ops.toml"
    cfg.write_text("[api]\n")
    cfg.chmod(0o640)                             # root's group: nobody may not read it
    alerts = open_tmp / "alerts.toml"
    alerts.write_text("[alerts]\n")
    alerts.chmod(0o640)

    def run(unreadable):
        r = CliRunner().invoke(cli.feedctl, ["--config", str(cfg), "status"])
        assert r.exit_code == cli.EX_NOPERM == 77, r.output
        assert f"cannot read {unreadable}" in r.output and "usermod -aG feeds_ops" in r.output
    assert as_unprivileged(lambda: run(cfg)) == 0
    cfg.chmod(0o644)                             # ops.toml readable, alerts.toml still not
    assert as_unprivileged(lambda: run(alerts)) == 0


# -- Dhan (feed-dhan, feed-dhan-backfill, feed-dhan-token) and feed-indicators ----------------------

FRIDAY = dt.date(2026, 11, 27)
F_OPEN, F_CLOSE = dt.datetime(2026, 11, 27, 3, 45, tzinfo=UTC), dt.datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


def seed_dhan(db):
    """History sessions of Friday 2026-11-27 in every state, adjustments found that day and before,
    the reconciliation of that session and of the day before, and a few rows of the Dhan tables."""
    with connect(db, application_name="test") as conn:
        conn.execute(
            """INSERT INTO dhan_session_status (instrument, session_date, security_id, status, session_open,
                 session_close, expected_bars, actual_bars, error, note) VALUES
                 ('NSE_EQ:HDFCBANK', %(d)s, 1333, 'COMPLETE', %(o)s, %(c)s, 375, 375, NULL, NULL),
                 ('NSE_EQ:TCS', %(d)s, 11536, 'THIN', %(o)s, %(c)s, 375, 370, NULL,
                  'thin: 5 minutes without a trade'),
                 ('NSE_EQ:INFY', %(d)s, 1594, 'ERROR', %(o)s, %(c)s, 375, 0,
                  'DH-905 Input_Exception: invalid securityId', NULL),
                 ('NSE_EQ:SBIN', %(d)s, 3045, 'PARTIAL', %(o)s, %(c)s, 375, 200, NULL,
                  'fetched before the session settled (200 of 375 bars)'),
                 ('NSE_EQ:SBIN', '2026-11-10', 3045, 'ERROR', NULL, NULL, 375, 0, 'DH-908 internal error', NULL)""",
            {"d": FRIDAY, "o": F_OPEN, "c": F_CLOSE})
        conn.execute(
            """INSERT INTO dhan_adjustment (exchange_segment, security_id, symbol, session_date, kind, price_factor,
                 volume_factor, interval_minutes, candles_compared, stored_first_close, fetched_first_close,
                 stored_version, new_version, found_at, detail) VALUES
                 ('NSE_EQ', 1333, 'HDFCBANK', '2026-11-20', 'factor', 2.000, 2, 1, 375, 1650.40, 825.20, 0, 1,
                  '2026-11-27 14:30+00', '1:1 bonus'),
                 ('NSE_EQ', 11536, 'TCS', '2026-11-19', 'revision', NULL, NULL, 15, 25, 4100, 4101, 0, NULL,
                  '2026-11-25 14:30+00', NULL)""")
        conn.execute(
            """INSERT INTO dhan_reconciliation (exchange_segment, security_id, symbol, session_date, minutes_compared,
                 minutes_differing, missing_live, missing_dhan, detail) VALUES
                 ('NSE_EQ', 1333, 'HDFCBANK', %(d)s, 374, 2, 1, 0, '09:31 close 1650.4/1650.45'),
                 ('NSE_EQ', 11536, 'TCS', %(d)s, 370, 0, 0, 0, NULL),
                 ('NSE_EQ', 1594, 'INFY', '2026-11-26', 300, 5, 75, 0, NULL)""", {"d": FRIDAY})
        conn.cursor().executemany(
            """INSERT INTO dhan_bar (exchange_segment, security_id, symbol, bar_start, open, high, low, close, volume)
               VALUES ('NSE_EQ', 1333, 'HDFCBANK', %s, 1650.4, 1651, 1650, 1650.5, 1200)""",
            [(F_OPEN + dt.timedelta(minutes=i),) for i in range(3)])
        conn.execute("""INSERT INTO dhan_candle (exchange_segment, security_id, interval_min, bar_start, bar_end,
                          open, high, low, close, volume, ticks, final, revision, source, recorded_at)
                        VALUES ('NSE_EQ', 1333, 1, %s, %s, 1650.4, 1651, 1650, 1650.5, 1200, 12, true, 0,
                                'live', %s)""",
                     (F_OPEN, F_OPEN + dt.timedelta(minutes=1), F_OPEN + dt.timedelta(minutes=1)))
        conn.cursor().executemany(
            """INSERT INTO indicator_value (venue, instrument, interval_min, bar_start, indicator, output, value,
                 computed_at) VALUES ('dhan', '1333', 1, %s, 'SMA(timeperiod=20)', 'real', 1650.1, %s)""",
            [(F_OPEN, F_OPEN + dt.timedelta(minutes=1)),
             (F_OPEN + dt.timedelta(minutes=1), F_OPEN + dt.timedelta(minutes=2)),
             # a value of Friday's bar computed again on Saturday (a revised candle): Saturday's row
             (F_OPEN, F_OPEN + dt.timedelta(days=1))])


def test_report_shows_dhan_sessions_adjustments_and_reconciliation(env, db, tmp_path):
    cfg = ops_toml(tmp_path)
    seed_dhan(db)
    r = feedctl("--config", cfg, "report", "--daily", "--date", FRIDAY.isoformat(), "--json", "--exact")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    feeds = {f["feed"]: f for f in rep["feeds"]}
    assert {"feed-dhan", "feed-dhan-backfill", "feed-indicators"} <= set(feeds)
    assert feeds["feed-dhan"]["rows"] == {"dhan_tick_ticker": 0, "dhan_tick_quote": 0, "dhan_tick_full": 0,
                                          "dhan_tick_oi": 0, "dhan_prev_close": 0, "dhan_candle": 1}
    assert feeds["feed-indicators"]["rows"] == {"indicator_value": 2}          # by computed_at
    bf = feeds["feed-dhan-backfill"]
    assert bf["rows"] == {"dhan_bar": 3}
    assert bf["gaps"] == {"sessions": 4, "sessions_ok": 2, "sessions_error": 1, "minutes_missing": 375 + 175,
                          "sessions_thin": 1, "minutes_thin": 5}
    assert bf["adjustments"]["found"] == 1                                     # the TCS one was found before
    (a,) = bf["adjustments"]["entries"]
    assert (a["instrument"], a["session_date"], a["kind"], a["price_factor"], a["volume_factor"],
            a["stored_version"], a["new_version"]) == ("NSE_EQ:HDFCBANK", "2026-11-20", "factor", "2", "2", 0, 1)
    rec = {x["instrument"]: x for x in bf["reconciliation"]}
    assert set(rec) == {"NSE_EQ:HDFCBANK", "NSE_EQ:TCS"}                       # INFY's session is Thursday's
    h = rec["NSE_EQ:HDFCBANK"]
    assert (h["symbol"], h["sessions"], h["minutes_compared"], h["minutes_differing"], h["missing_live"],
            h["missing_dhan"], h["detail"]) == ("HDFCBANK", 1, 374, 2, 1, 0, "09:31 close 1650.4/1650.45")
    assert (rec["NSE_EQ:TCS"]["minutes_compared"], rec["NSE_EQ:TCS"]["minutes_differing"]) == (370, 0)
    assert not [n for n in rep["notes"] if "not there yet" in n]
    # IBKR's backfill keeps its own figures
    assert feeds["feed-backfill"]["gaps"]["sessions"] == 0

    r = feedctl("--config", cfg, "report", "--daily", "--date", FRIDAY.isoformat(), "--exact")
    assert r.exit_code == 0, r.output
    text = r.output.split("\nfeed-dhan-backfill")[1].split("\n\n")[0]
    assert "rows stored: 3: dhan_bar 3" in text
    assert ("gaps: sessions 4, sessions ok 2, sessions error 1, minutes missing 550, sessions thin 1, "
            "minutes thin 5") in text
    assert "adjustments found: 1" in text
    assert "NSE_EQ:HDFCBANK session 2026-11-20: factor, prices / 2, volume x 2 (1-minute candles, 375 compared; " \
           "version 0 kept, new version 1)" in text
    assert ("reconciliation (live candles vs Dhan's): 2 instrument(s), 744 minutes compared, 2 differing, "
            "1 missing live, 0 missing at Dhan") in text
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("NSE_EQ:HDFCBANK ") and "compared," in ln)
    assert "1 session(s): 374 compared, 2 differing, 1 missing live, 0 missing at Dhan; 09:31 close" in line
    assert "1 other instrument(s) agree on every compared minute" in text
    # the weekly report adds the Thursday reconciliation and the Tuesday-before ERROR is outside the week
    r = feedctl("--config", cfg, "report", "--weekly", "--date", FRIDAY.isoformat(), "--json")
    bf = {f["feed"]: f for f in json.loads(r.output)["feeds"]}["feed-dhan-backfill"]
    assert bf["adjustments"]["found"] == 2 and bf["gaps"]["sessions"] == 4
    infy = {x["instrument"]: x for x in bf["reconciliation"]}["NSE_EQ:INFY"]
    assert (infy["minutes_differing"], infy["missing_live"]) == (5, 75)


def test_gaps_list_dhan_history_sessions(env, db, tmp_path):
    from feeds.ops import report as R
    cfg = ops_toml(tmp_path)
    seed_dhan(db)
    r = feedctl("--config", cfg, "gaps", "--json", "--since", "2026-11-20")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    got = {(e["symbol"], e["day"]): e for e in doc["entries"] if e["stream"] == "dhan_bar"}
    assert set(got) == {("NSE_EQ:INFY", "2026-11-27"), ("NSE_EQ:SBIN", "2026-11-27"), ("NSE_EQ:TCS", "2026-11-27")}
    infy = got[("NSE_EQ:INFY", "2026-11-27")]
    assert (infy["missing"], infy["unit"], infy["state"], infy["first"], infy["last"]) == \
        (375, "minutes", "not filled (ERROR)", F_OPEN.isoformat(), F_CLOSE.isoformat())
    assert "0/375 candles" in infy["detail"] and "DH-905" in infy["detail"]
    assert (got[("NSE_EQ:SBIN", "2026-11-27")]["missing"], got[("NSE_EQ:SBIN", "2026-11-27")]["state"]) == \
        (175, "partial (fetched again)")
    assert (got[("NSE_EQ:TCS", "2026-11-27")]["missing"], got[("NSE_EQ:TCS", "2026-11-27")]["state"]) == \
        (5, "thin (no trade; final)")
    r = feedctl("--config", cfg, "gaps", "--since", "2026-11-01")
    assert r.exit_code == 0, r.output
    assert "dhan_bar 2026-11-27:" in r.output and "dhan_bar 2026-11-10:" in r.output
    line = next(ln for ln in r.output.splitlines() if "NSE_EQ:INFY" in ln)
    assert "03:45-10:00 UTC" in line and "375 minutes" in line and "not filled (ERROR)" in line
    # one stream only (feedctl gaps --stream dhan_bar)
    with connect(db, application_name="test") as conn:
        doc = R.gaps(conn, dt.datetime.now(UTC), since=dt.datetime(2026, 11, 20, tzinfo=UTC), stream="dhan_bar")
    assert {e["stream"] for e in doc["entries"]} == {"dhan_bar"} and len(doc["entries"]) == 3


def test_check_tells_dhan_backfill_errors_and_the_dhan_token(env, db, tmp_path, monkeypatch, hook):
    from feeds.dhan.token import DhanToken
    seed_dhan(db)
    tok = tmp_path / "dhan-state" / "access_token.json"
    tok.parent.mkdir()
    t = SUNDAY_0300 + dt.timedelta(minutes=45)          # 09:15 IST: Monday's open (03:45 UTC) 45 min away
    tok.write_text(DhanToken(client_id="1000000001", access_token="eyJ0eXAi.test-token",
                             obtained_at=t - dt.timedelta(hours=30), expires_at=t - dt.timedelta(hours=6)).to_json())
    dcfg = tmp_path / "dhan.toml"
    dcfg.write_text(f'[dhan]\nclient_id = "1000000001"\ntoken_file = "{tok}"\n')
    monkeypatch.setattr(G, "DHAN_CONFIG", dcfg)
    env.units["feed-dhan.service"] = ("inactive", "dead", "success", 0)
    env.units["feed-dhan-token.service"] = ("inactive", "dead", "exit-code", 0)
    cfg = ops_toml(tmp_path, [url_file(tmp_path, "hook.url", hook.url)], health_threshold=0)
    beat(db, BIN, t - dt.timedelta(seconds=5))
    r = feedctl("--config", cfg, "check", "--now", t.isoformat())
    assert r.exit_code == 1, r.output
    assert "holds [critical] token:dhan" in r.output
    assert "holds [warning] backfill-error:dhan:NSE_EQ:INFY" in r.output
    assert "holds [warning] backfill-error:dhan:NSE_EQ:SBIN" in r.output
    assert "stale:feed-dhan" not in r.output                 # Sunday; and feed-dhan-token is a oneshot
    titles = sorted(p["title"] for _, p in hook.posts)
    assert "[critical] feeds: Dhan access token not renewed" in titles
    assert "[warning] feeds: Dhan backfill of NSE_EQ:INFY failed" in titles
    body = next(p["message"] for _, p in hook.posts if "Dhan access token" in p["title"])
    assert "feed-dhan-token.service" in body and "eyJ0eXAi" not in body          # never the token itself
    # the report files the alerts under their feeds
    r = feedctl("--config", cfg, "report", "--daily", "--date", t.date().isoformat(), "--json")
    feeds = {f["feed"]: f for f in json.loads(r.output)["feeds"]}
    assert feeds["feed-dhan"]["alerts"]["keys"] == ["token:dhan"]
    assert sorted(feeds["feed-dhan-backfill"]["alerts"]["keys"]) == ["backfill-error:dhan:NSE_EQ:INFY",
                                                                     "backfill-error:dhan:NSE_EQ:SBIN"]
    assert feeds["feed-zerodha"]["alerts"]["keys"] == [] and feeds["feed-backfill"]["alerts"]["keys"] == []
    # status: feed-dhan-token is a oneshot (never stale), feed-dhan has its session rule
    r = feedctl("--config", cfg, "status", "--json", "--now", t.isoformat())
    units = {u["unit"]: u for u in json.loads(r.output)["units"]}
    assert not units["feed-dhan-token.service"]["stale"] and not units["feed-dhan.service"]["stale"]


@pytest.fixture
def db_before_dhan(pg, tmp_path):
    """A database with only the migrations before Dhan's (0001..0008) applied."""
    import shutil
    from pathlib import Path
    from feeds.migrate import apply
    root = Path(__file__).resolve().parents[2]
    sql = tmp_path / "sql-before-dhan"
    sql.mkdir()
    for f in sorted((root / "sql").glob("*.sql")):
        if f.name < "0009":
            shutil.copy(f, sql / f.name)
    dsn = pg.dsn(pg.create_db())
    apply(dsn, sql)
    return dsn


def test_feedctl_works_before_the_dhan_and_indicator_migrations(env, db_before_dhan, tmp_path, monkeypatch):
    monkeypatch.setenv("FEEDS_DSN", db_before_dhan)
    cfg = ops_toml(tmp_path, health_threshold=0)
    now = dt.datetime.now(UTC).replace(microsecond=0)
    beat(db_before_dhan, BIN, now - dt.timedelta(seconds=5))
    r = feedctl("--config", cfg, "report", "--daily", "--date", now.date().isoformat(), "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    feeds = {f["feed"]: f for f in rep["feeds"]}
    assert feeds["feed-dhan"]["rows"] == {} and feeds["feed-indicators"]["rows"] == {}
    assert feeds["feed-dhan-backfill"]["gaps"] == {} and "reconciliation" not in feeds["feed-dhan-backfill"]
    assert "binance_agg_trade" in feeds["feed-binance"]["rows"]                 # the rest as before
    notes = "\n".join(rep["notes"])
    for table, mig in (("dhan_tick_full", "0011_dhan_live.sql"), ("dhan_bar", "0009_dhan.sql"),
                       ("dhan_session_status", "0009_dhan.sql"), ("dhan_reconciliation", "0009_dhan.sql"),
                       ("dhan_adjustment", "0009_dhan.sql"), ("indicator_value", "0010_indicators.sql")):
        assert f"table {table} not there yet (sql/{mig} not applied" in notes, table
    r = feedctl("--config", cfg, "report", "--weekly", "--date", now.date().isoformat())
    assert r.exit_code == 0 and "note: rows of dhan_candle: table dhan_candle not there yet" in r.output, r.output
    r = feedctl("--config", cfg, "gaps", "--json")
    assert r.exit_code == 0, r.output
    gnotes = json.loads(r.output)["notes"]
    assert any(n.startswith("dhan_bar: table dhan_session_status not there yet") for n in gnotes), gnotes
    r = feedctl("--config", cfg, "check", "--now", now.isoformat())
    assert r.exit_code == 1 and "holds [warning] migrations" in r.output, r.output       # told, not a crash
    assert "backfill-error" not in r.output
    beat(db_before_dhan, KITE, dt.datetime.now(UTC))
    r = feedctl("--config", cfg, "status", "--json")
    assert r.exit_code == 0, r.output
    assert any("dhan_session_status not there yet" in n for n in json.loads(r.output)["notes"])
