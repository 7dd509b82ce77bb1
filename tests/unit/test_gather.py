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
