"""feedctl's gathering of the check's facts: a faked systemctl, a real PostgreSQL, real files."""
import datetime as dt
import json
import shutil
from pathlib import Path

import pytest

from feeds.db import connect
from feeds.health import status_rates
from feeds.ops import gather as G
from feeds.ops.checks import Gap, UnitFacts

UTC = dt.timezone.utc
ROOT = Path(__file__).resolve().parents[2]
BIN, KITE = "feed-binance.service", "feed-zerodha.service"
STATUS = "aggTrade 1,234/s max-age 0.1s; bookTicker 50/s max-age 0.2s; stored 10,000; lag p50 3ms p99 9ms"


class FakeSystemd:
    """systemctl (list-units, list-unit-files, show) and journalctl answering from dicts."""

    def __init__(self, loaded, files=None, journal=()):
        self.loaded = loaded            # {unit: (ActiveState, SubState, Result, NRestarts)}
        self.files = files or {}        # {unit file: state}
        self.journal = list(journal)
        self.calls = []

    def __call__(self, argv):
        self.calls.append(list(argv))
        if argv[:2] == ["systemctl", "list-units"]:
            return 0, "".join(f"{u} loaded {a} {s} a feed\n" for u, (a, s, _, _) in self.loaded.items())
        if argv[:2] == ["systemctl", "list-unit-files"]:
            return 0, "".join(f"{u} {st} enabled\n" for u, st in self.files.items())
        if argv[:2] == ["systemctl", "show"]:
            units = argv[argv.index("--") + 1:]
            blocks = []
            for u in units:
                a, s, r, n = self.loaded.get(u, ("inactive", "dead", "success", 0))
                blocks.append(f"Id={u}\nActiveState={a}\nSubState={s}\nResult={r}\nNRestarts={n}\n"
                              "ExecMainStatus=0\n")
            return 0, "\n".join(blocks)
        if argv[0] == "journalctl":
            return 0, "".join(ln + "\n" for ln in self.journal)
        return 1, ""


def no_systemctl(argv):
    raise FileNotFoundError(2, "No such file or directory", argv[0])


def beat(conn, unit, updated_at, status=STATUS, state="running", messages=10_000, started=None):
    detail = {"streams": 2, "messages": messages, "malformed": 0, "last_message_age": 0.2,
              "tables": {"binance_agg_trade": {"stored": 9000, "duplicates": 0, "rejected": 0}},
              "spooled_rows": 0, "replayed_rows": 0, "pending": 0}
    conn.execute("""INSERT INTO feed_heartbeat (unit, host, pid, started_at, updated_at, state, status, detail)
                    VALUES (%s, 'box1', 42, %s, %s, %s, %s, %s)
                    ON CONFLICT (unit) DO UPDATE SET updated_at = EXCLUDED.updated_at, state = EXCLUDED.state,
                      status = EXCLUDED.status, detail = EXCLUDED.detail""",
                 (unit, started or updated_at - dt.timedelta(hours=1), updated_at, state, status,
                  json.dumps(detail)))


@pytest.fixture
def spools(tmp_path):
    root = tmp_path / "feeds"
    (root / "binance").mkdir(parents=True)
    (root / "binance" / "spool-000001.bin").write_bytes(b"x" * 100)
    (root / "binance" / "spool-000002.bin").write_bytes(b"x" * 50)
    (root / "binance" / "rejects.jsonl").write_text("{}\n")
    (root / "zerodha").mkdir()
    return root


def test_units_spools_heartbeats_gaps_klines_backfill_migrations(db, tmp_path, spools):
    now = dt.datetime.now(UTC).replace(microsecond=0)
    sd = FakeSystemd(
        {BIN: ("active", "running", "success", 2), KITE: ("inactive", "dead", "success", 0),
         "feed-binance@.service": ("inactive", "dead", "success", 0)},
        files={BIN: "enabled", KITE: "disabled", "feed-zerodha.timer": "enabled", "feed-old.service": "disabled",
               "feed-binance@.service": "disabled", "feed-maintain.service": "static",
               "feed-maintain.timer": "enabled"})
    sql = tmp_path / "sql"
    shutil.copytree(ROOT / "sql", sql)
    (sql / "0099_more.sql").write_text("SELECT 1;\n")
    with connect(db, application_name="test") as conn:
        beat(conn, BIN, now - dt.timedelta(seconds=5))
        conn.execute("INSERT INTO binance_agg_gap (symbol, first_id, last_id, detected_at) VALUES "
                     "('BTCUSDT', 100, 109, %s), ('ETHUSDT', 5, 5, %s)",
                     (now - dt.timedelta(hours=1), now - dt.timedelta(seconds=30)))
        minute = (now - dt.timedelta(hours=2)).replace(second=0)
        for stage, repaired in (("found", None), ("after_fill", False)):
            conn.execute("""INSERT INTO binance_kline_check (symbol, open_time, checked_at, stage, kline_open,
                              kline_high, kline_low, kline_close, kline_volume, kline_trades, agg_volume,
                              agg_trades, differs, repaired, basis, note)
                            VALUES ('BTCUSDT', %s, %s, %s, 1, 1, 1, 1, 2, 3, 1, 2, 'volume,trades', %s,
                                    %s, 'ADL trade')""",
                         (minute, now - dt.timedelta(minutes=100 if stage == "found" else 90), stage, repaired,
                          "stream" if stage == "found" else "stored"))
        conn.execute("""INSERT INTO ibkr_session_status (symbol, session_date, status, expected_bars, actual_bars,
                          error) VALUES ('AAPL', '2026-11-27', 'ERROR', 210, 0, '162 no data')""")
        mem = G.Memory(tmp_path / "mem.json")
        g = G.gather(now, conn, memory=mem, runner=sd, spool_root=spools, kite_config=tmp_path / "no-kite.toml",
                     sql_dir=sql)
    f = g.facts
    assert g.systemd
    assert set(f.units) == {BIN, KITE, "feed-maintain.service"}         # no template, no disabled unit
    assert f.units[BIN] == UnitFacts("active", "running", "success", 2)
    assert f.heartbeats[BIN].status == STATUS and f.heartbeats[BIN].detail["messages"] == 10_000
    sp = {s.unit: s for s in f.spools}
    assert (sp[BIN].files, sp[BIN].bytes, sp[BIN].path) == (2, 150, str(spools / "binance"))
    assert (sp[KITE].files, sp[KITE].bytes) == (0, 0)
    assert [(x.symbol, x.first, x.last, x.filled) for x in f.gaps] == [("BTCUSDT", 100, 109, False)]
    assert [(x.symbol, x.first) for x in g.gaps_filling] == [("ETHUSDT", 5)]       # young: being filled
    (k,) = f.kline_mismatches
    assert (k.symbol, k.repaired, k.differs, k.note) == ("BTCUSDT", False, "volume,trades", "ADL trade")
    (b,) = f.backfill_errors
    assert (b.symbol, b.day, b.error) == ("AAPL", dt.date(2026, 11, 27), "162 no data")
    assert list(f.pending_migrations) == ["0099_more.sql"]
    assert f.token is None                                               # no kite.toml here
    assert g.rates[(BIN, "aggTrade")] == 1234.0 and g.rates[(BIN, "bookTicker")] == 50.0
    assert g.up[BIN] == (True, True)
    assert any(d.path for d in f.disks) and all(0.0 <= d.free_fraction <= 1.0 for d in f.disks)
    assert f.previous is None


def test_a_gap_that_left_the_table_was_filled(db, tmp_path, spools):
    now = dt.datetime.now(UTC).replace(microsecond=0)
    mem = G.Memory(tmp_path / "mem.json")
    with connect(db, application_name="test") as conn:
        conn.execute("INSERT INTO binance_agg_gap (symbol, first_id, last_id, detected_at) VALUES "
                     "('BTCUSDT', 100, 109, %s)", (now - dt.timedelta(hours=1),))
        G.gather(now, conn, memory=mem, runner=None, spool_root=spools, kite_config=tmp_path / "x.toml")
        mem.save()
        conn.execute("DELETE FROM binance_agg_gap")
        mem = G.Memory(tmp_path / "mem.json")
        g = G.gather(now + dt.timedelta(minutes=1), conn, memory=mem, runner=None, spool_root=spools,
                     kite_config=tmp_path / "x.toml")
    assert list(g.facts.gaps) == [Gap("binance_agg_trade", "BTCUSDT", 100, 109, True,
                                      now - dt.timedelta(hours=1))]
    assert [(x["symbol"], x["first"], x["last"]) for x in mem.gaps_filled] == [("BTCUSDT", 100, 109)]


def test_failing_sources_are_notes(db, tmp_path, spools):
    now = dt.datetime.now(UTC)
    with connect(db, application_name="test") as conn:
        conn.execute("DROP TABLE ibkr_session_status CASCADE")
        g = G.gather(now, conn, runner=no_systemctl, systemd=True, spool_root=spools,
                     kite_config=tmp_path / "x.toml")
    assert g.facts.units == {} and g.facts.backfill_errors == []
    assert any(n.startswith("systemd: units not read") for n in g.notes), g.notes
    assert any(n.startswith("backfill sessions: not read") for n in g.notes), g.notes
    # without systemd as PID 1: no units, said so
    g = G.gather(now, None, runner=G.run_command, systemd=False, spool_root=spools, kite_config=tmp_path / "x.toml")
    assert g.facts.units == {} and g.facts.heartbeats == {}
    assert any("not available here" in n for n in g.notes) and any(n.startswith("database: unreachable")
                                                                    for n in g.notes)


def test_unreadable_spool_is_a_note(open_tmp):
    from conftest import as_unprivileged
    root = open_tmp / "feeds"
    (root / "ibkr").mkdir(parents=True)
    (root / "ibkr" / "spool-00000001.bin").write_bytes(b"x")
    root.chmod(0o755)
    (root / "ibkr").chmod(0o700)                 # the collector's own spool: others cannot read it

    def check():
        notes = []
        assert G.gather_spools(["feed-ibkr.service"], notes, root) == []
        assert any("not readable" in n for n in notes), notes
    assert as_unprivileged(check) == 0


def test_kite_token_expiry_and_renewal_result(tmp_path):
    tok = tmp_path / "token.json"
    exp = dt.datetime(2026, 12, 2, 0, 30, tzinfo=UTC)
    tok.write_text(json.dumps({"api_key": "k", "user_id": "u", "access_token": "secret",
                               "obtained_at": "2026-12-01T03:00:00+00:00", "expires_at": exp.isoformat()}))
    kite = tmp_path / "kite.toml"
    kite.write_text(f'[kite]\napi_key = "k"\ntoken_file = "{tok}"\n')
    units = {G.KITE_TOKEN_UNIT: UnitFacts("inactive", "dead", "exit-code", 0)}
    t = G.gather_token(None, units, [], kite)
    assert (t.expires_at, t.renewal_result) == (exp, "exit-code")
    tok.unlink()
    t = G.gather_token(None, {}, [], kite)
    assert t.expires_at is None and t.renewal_result is None
    assert G.gather_token(None, {}, [], tmp_path / "absent.toml") is None


def test_spool_dirs_of_units():
    root = Path("/var/lib/feeds")
    assert G.spool_dir_of("feed-binance.service") == root / "binance"
    assert G.spool_dir_of("feed-binance@1of2.service") == root / "binance-1of2"
    assert G.spool_dir_of("feed-zerodha.service") == root / "zerodha"
    assert G.spool_dir_of("feed-ibkr.service") == root / "ibkr"
    assert G.spool_dir_of("feed-backfill.service") is None


def test_status_line_rates():
    assert status_rates(STATUS) == {"aggTrade": 1234.0, "bookTicker": 50.0}
    assert status_rates("full 12/s max-age 0.4s; ltp 0/s (no data); stored 5") == {"full": 12.0, "ltp": 0.0}
    assert status_rates("") == {}


def test_usual_rates_are_learnt_per_hour_of_the_week(tmp_path):
    mem = G.Memory(tmp_path / "m.json")
    monday_10 = dt.datetime(2026, 11, 30, 10, 5, tzinfo=UTC)
    for i in range(G.USUAL_MIN_SAMPLES - 1):
        mem.learn_rates(monday_10 + dt.timedelta(minutes=i), {(BIN, "aggTrade"): 100.0})
    assert mem.usual_rates(monday_10) == {}                 # too few samples yet
    mem.learn_rates(monday_10, {(BIN, "aggTrade"): 100.0})
    assert mem.usual_rates(monday_10) == {(BIN, "aggTrade"): 100.0}
    assert mem.usual_rates(monday_10 + dt.timedelta(hours=1)) == {}      # another hour of the week
    mem.save()
    assert G.Memory(tmp_path / "m.json").usual_rates(monday_10) == {(BIN, "aggTrade"): 100.0}
    (tmp_path / "bad.json").write_text("{not json")
    assert G.Memory(tmp_path / "bad.json").doc["alerts"] == []


# -- Dhan and feed-indicators ---------------------------------------------------------------------

DHAN = "feed-dhan.service"


@pytest.fixture
def db_before_dhan(pg, tmp_path):
    """A database with the migrations before Dhan's (0001..0008) applied: no dhan_* table, no
    indicator_value; yields its DSN and the directory of those migrations."""
    from feeds.migrate import apply
    sql = tmp_path / "sql-before-dhan"
    sql.mkdir()
    for f in sorted((ROOT / "sql").glob("*.sql")):
        if f.name < "0009":
            shutil.copy(f, sql / f.name)
    dsn = pg.dsn(pg.create_db())
    apply(dsn, sql)
    return dsn, sql


def dhan_files(tmp_path, *, client="1000000001", expires=None, token_client=None):
    """A dhan.toml naming a token file; the token (DhanToken's JSON) when ``expires`` is given."""
    from feeds.dhan.token import DhanToken
    tok = tmp_path / "dhan" / "access_token.json"
    tok.parent.mkdir(parents=True, exist_ok=True)
    if expires is not None:
        tok.write_text(DhanToken(client_id=token_client or client, access_token="eyJ0eXAi.test-token",
                                 obtained_at=expires - dt.timedelta(hours=24), expires_at=expires,
                                 method="renew").to_json())
    cfg = tmp_path / "dhan.toml"
    cfg.write_text(f'[dhan]\nclient_id = "{client}"\ntoken_file = "{tok}"\n')
    return cfg, tok


def test_spool_dirs_of_dhan_and_indicators(tmp_path):
    root = Path("/var/lib/feeds")
    assert G.spool_dir_of(DHAN) == root / "dhan"
    assert G.spool_dir_of("feed-indicators.service") == root / "indicators"
    for u in ("feed-dhan-token.service", "feed-dhan-backfill.service", "feed-sim-dhan.service"):
        assert G.spool_dir_of(u) is None, u
    # the settings' defaults agree (sink.spool_dir of dhan.toml and indicators.toml)
    from feeds.settings import DHAN_FILE, INDICATORS_FILE
    assert DHAN_FILE.defaults["sink.spool_dir"] == str(root / "dhan")
    assert INDICATORS_FILE.defaults["sink.spool_dir"] == str(root / "indicators")
    # spools left behind are found without their unit being named; the token file is not a spool
    sp = tmp_path / "feeds"
    (sp / "dhan").mkdir(parents=True)
    (sp / "dhan" / "spool-00000001.bin").write_bytes(b"x" * 10)
    (sp / "dhan" / "access_token.json").write_text("{}")
    (sp / "indicators").mkdir()
    got = {s.unit: (s.files, s.bytes, s.path) for s in G.gather_spools([], [], sp)}
    assert got == {DHAN: (1, 10, str(sp / "dhan")), "feed-indicators.service": (0, 0, str(sp / "indicators"))}


def test_dhan_token_expiry_renewal_result_and_client(tmp_path):
    exp = dt.datetime(2026, 12, 2, 2, 30, tzinfo=UTC)
    cfg, tok = dhan_files(tmp_path, expires=exp)
    units = {G.DHAN_TOKEN_UNIT: UnitFacts("inactive", "dead", "exit-code", 0)}
    notes = []
    t = G.gather_dhan_token(units, notes, cfg)
    assert (t.expires_at, t.renewal_result, t.problem) == (exp, "exit-code", None) and notes == []
    assert G.gather_dhan_token({}, notes, cfg).renewal_result is None          # never run
    # a token of another client id: kept, its problem said
    cfg2, _ = dhan_files(tmp_path / "other", expires=exp, token_client="2000000002")
    assert "belongs to client 2000000002" in G.gather_dhan_token({}, notes, cfg2).problem
    # no token file yet, or not a token document: no usable token
    tok.write_text("not json")
    assert G.gather_dhan_token({}, notes, cfg).expires_at is None
    tok.unlink()
    t = G.gather_dhan_token({}, notes, cfg)
    assert t.expires_at is None and t.problem is None and notes == []
    # Dhan not configured here
    assert G.gather_dhan_token({}, notes, tmp_path / "absent.toml") is None
    # a dhan.toml with an error: a note, no crash
    bad = tmp_path / "bad.toml"
    bad.write_text('[dhan]\ntoken_file = "/x"\n')                 # no client_id
    assert G.gather_dhan_token({}, notes, bad) is None
    assert len(notes) == 1 and notes[0].startswith(f"dhan token: {bad} not usable") and "client_id" in notes[0]


def test_dhan_token_unreadable_is_a_note(open_tmp):
    from conftest import as_unprivileged
    cfg, tok = dhan_files(open_tmp, expires=dt.datetime(2026, 12, 2, 2, 30, tzinfo=UTC))
    cfg.chmod(0o644)
    tok.parent.chmod(0o755)
    tok.chmod(0o600)                              # feeds_dhan's: others may not read it

    def check():
        notes = []
        assert G.gather_dhan_token({}, notes, cfg) is None
        assert notes == [f"dhan token: {tok} not readable by this user; token not checked"], notes
    assert as_unprivileged(check) == 0


def test_gather_reads_dhan_sessions_in_error_and_the_dhan_token(db, tmp_path, spools):
    now = dt.datetime(2026, 11, 30, 3, 0, tzinfo=UTC)          # 08:30 IST
    cfg, _ = dhan_files(tmp_path, expires=now - dt.timedelta(hours=1))
    sd = FakeSystemd({BIN: ("active", "running", "success", 0), DHAN: ("inactive", "dead", "success", 0)},
                     files={"feed-dhan-token.timer": "enabled", "feed-dhan-token.service": "static"})
    with connect(db, application_name="test") as conn:
        conn.execute("""INSERT INTO dhan_session_status (instrument, session_date, status, expected_bars,
                          actual_bars, error) VALUES
                          ('NSE_EQ:HDFCBANK', '2026-11-27', 'ERROR', 375, 0, 'DH-905 input exception'),
                          ('NSE_EQ:TCS', '2026-11-27', 'COMPLETE', 375, 375, NULL)""")
        conn.execute("""INSERT INTO ibkr_session_status (symbol, session_date, status, expected_bars, actual_bars,
                          error) VALUES ('AAPL', '2026-11-27', 'ERROR', 210, 0, '162 no data')""")
        g = G.gather(now, conn, runner=sd, spool_root=spools, kite_config=tmp_path / "no-kite.toml",
                     dhan_config=cfg)
    f = g.facts
    assert sorted((b.venue, b.symbol, b.day, b.error) for b in f.backfill_errors) == [
        ("dhan", "NSE_EQ:HDFCBANK", dt.date(2026, 11, 27), "DH-905 input exception"),
        ("ibkr", "AAPL", dt.date(2026, 11, 27), "162 no data")]
    assert G.DHAN_TOKEN_UNIT in f.units                      # asked of systemd, started by its timer
    assert f.dhan_token is not None and f.dhan_token.expires_at == now - dt.timedelta(hours=1)
    assert f.token is None
    from feeds.calendars import ExchangeCalendar
    from feeds.ops.checks import evaluate
    cals = {"XNSE": ExchangeCalendar("XNSE"), "XNYS": ExchangeCalendar("XNYS")}
    h = evaluate(f, calendars=cals).holding
    assert {"token:dhan", "backfill-error:dhan:NSE_EQ:HDFCBANK", "backfill-error:AAPL"} <= set(h)


def test_dhan_tables_missing_are_notes(db_before_dhan, tmp_path, spools):
    dsn, sql = db_before_dhan
    now = dt.datetime.now(UTC)
    with connect(dsn, application_name="test") as conn:
        conn.execute("""INSERT INTO ibkr_session_status (symbol, session_date, status, expected_bars, actual_bars,
                          error) VALUES ('AAPL', '2026-11-27', 'ERROR', 210, 0, '162 no data')""")
        g = G.gather(now, conn, runner=None, spool_root=spools, kite_config=tmp_path / "x.toml",
                     dhan_config=tmp_path / "x.toml")
    assert [(b.venue, b.symbol) for b in g.facts.backfill_errors] == [("ibkr", "AAPL")]     # IBKR still read
    (n,) = [n for n in g.notes if n.startswith("dhan backfill sessions")]
    assert "dhan_session_status not there yet" in n and "0009_dhan.sql" in n
    assert g.facts.dhan_token is None


def test_feed_of_alert_keys_and_units():
    from feeds.ops.report import feed_of
    assert feed_of("token:kite") == "feed-zerodha" and feed_of("token:dhan") == "feed-dhan"
    assert feed_of("backfill-error:AAPL") == "feed-backfill"
    assert feed_of("backfill-error:dhan:NSE_EQ:HDFCBANK") == "feed-dhan-backfill"
    assert feed_of("stale:feed-dhan.service") == "feed-dhan"
    assert feed_of("health:feed-indicators.service") == "feed-indicators"
    assert feed_of("spool:feed-indicators.service") == "feed-indicators"
    assert feed_of("rejected:feed-dhan.service:dhan_tick_full") == "feed-dhan"
    assert feed_of("feed-dhan-token.service") == "feed-dhan-token"
    assert feed_of("feed-dhan-backfill.service") == "feed-dhan-backfill"
    assert feed_of("gap:binance_agg_trade:BTCUSDT") == "feed-binance"
    assert feed_of("migrations") == "system" and feed_of("disk:/var/lib/feeds") == "system"
