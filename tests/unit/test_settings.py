"""Every setting declared once; every shipped configuration file checked against the declarations."""
from __future__ import annotations

import os
import typing

import pytest

from conftest import ROOT
from feeds.config import Config, ConfigError
from feeds.settings import (ALERTS_FILE, DHAN_FILE, INDICATORS_FILE, OPS_FILE, BINANCE_FILE, FEEDS_FILE, IBKR_FILE, KITE_FILE, REQUIRED, SCHEMAS, check_document,
                            database_dsn, load)
from feeds.settings import _conform, _value

#: Which kind of file each shipped etc/*.toml is.
SHIPPED = {"feeds.toml": FEEDS_FILE, "binance.toml": BINANCE_FILE, "binance-demo.toml": BINANCE_FILE,
           "kite.toml": KITE_FILE, "kite-demo.toml": KITE_FILE, "ibkr.toml": IBKR_FILE, "ibkr-demo.toml": IBKR_FILE,
           "ops.toml": OPS_FILE, "alerts.toml": ALERTS_FILE, "indicators.toml": INDICATORS_FILE,
           "dhan.toml": DHAN_FILE}


def test_every_shipped_file_has_a_kind():
    assert sorted(p.name for p in (ROOT / "etc").glob("*.toml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_file_matches_the_declarations(name):
    """Every key known, of its declared type, accepted by its check."""
    cfg = load(ROOT / "etc" / name, SHIPPED[name])
    assert cfg.given, name                                  # the file sets something
    for key in cfg.given:
        assert SHIPPED[name].setting(key) is not None


def test_each_setting_is_declared_once():
    """A key shared by several kinds of file (database, sink) is one declaration."""
    seen: dict[str, object] = {}
    for schema in SCHEMAS.values():
        for s in schema.settings:
            assert seen.setdefault(s.key, s) is s, f"{s.key} declared twice"
            assert s.meaning and "\n" not in s.meaning, s.key


@pytest.mark.parametrize("schema", list(SCHEMAS.values()), ids=list(SCHEMAS))
def test_defaults_fit_their_own_declarations(schema):
    for s in schema.settings:
        d = schema.default(s.key)
        if d is REQUIRED or d is None:
            continue
        if typing.get_origin(s.type) is dict:
            assert isinstance(d, dict) and not d, s.key       # entries are the operator's
            continue
        ok, v = _conform(d, s.type)
        assert ok, (s.key, d)
        assert _value(s, s.key, d, "defaults") == v


def doc(tmp_path, schema, text: str) -> Config:
    p = tmp_path / schema.name
    p.write_text(text)
    return load(p, schema)


BIN = '[binance]\nrest_url = "http://127.0.0.1:1"\nws_url = "ws://127.0.0.1:1"\n'


@pytest.mark.parametrize("text, key, reason", [
    ("[sink]\nflush_intervall = 0.5\n", "sink.flush_intervall", "unknown key (did you mean 'sink.flush_interval'?)"),
    ("[sinks]\nflush_interval = 0.5\n", "sinks", "unknown key (did you mean 'sink'?)"),
    ("^colour = 1\n", "colour", "unknown key (binance.toml (feed-binance) has no such setting)"),
    ("^sink = 5\n", "sink", "expected a table [sink], got int 5"),
    ('streams = [["aggTrade"]]\n', "binance.streams", "expected list[str], got list [['aggTrade']]"),
    ('streams = ["aggTrade", "trades"]\n', "binance.streams", "('trades' is not)"),
    ("streams = []\n", "binance.streams", "must be a non-empty subset"),
    ('symbols = ["BTC-USDT"]\n', "binance.symbols", "not a symbol: 'BTC-USDT'"),
    ("status_interval = true\n", "binance.status_interval", "expected float, got bool True"),
    ("max_streams_per_connection = 2.5\n", "binance.max_streams_per_connection", "expected int, got float 2.5"),
    ('[binance.stale_after]\naggTrade = "10"\n', "binance.stale_after.aggTrade", "expected float, got str '10'"),
    ("[binance.stale_after]\ndepth = 10\n", "binance.stale_after.depth", "unknown stream kind"),
    ("[sink]\nspool_max_bytes = 1024\n", "sink.spool_max_bytes", "must be >= 1048576"),
    ('[database]\ndsn = "host=x port"\n', "database.dsn", "not a valid libpq connection string"),
    ("id_confirmations = 0\n", "binance.id_confirmations", "must be 1..20"),
    ("max_future_s = 0\n", "binance.max_future_s", "must be 1..86400 s"),
    ("id_adopt_lone_after = -1\n", "binance.id_adopt_lone_after", "must be 0..3600 s"),
    ("[binance.max_id_jump]\naggTrade = 0\n", "binance.max_id_jump.aggTrade", "must be 1.."),
    ("[binance.max_id_jump]\nticker = 5\n", "binance.max_id_jump.ticker", "no id to guard"),
])
def test_bad_binance_settings_name_the_key(tmp_path, text, key, reason):
    """Lines go into [binance] unless they open a table; ``^``: at the top level."""
    with pytest.raises(ConfigError) as e:
        doc(tmp_path, BINANCE_FILE, text[1:] + BIN if text.startswith("^") else BIN + text)
    assert (e.value.key, e.value.file) == (key, str(tmp_path / "binance.toml"))
    assert reason in e.value.reason and "\n" not in str(e.value)


def test_required_keys_and_defaults(tmp_path):
    with pytest.raises(ConfigError) as e:
        doc(tmp_path, BINANCE_FILE, '[binance]\nws_url = "ws://x"\n')
    assert (e.value.key, e.value.reason) == ("binance.rest_url", "missing")
    cfg = doc(tmp_path, BINANCE_FILE, BIN + "max_streams_per_connection = 100\n[sink]\nflow_timeout = 5\n")
    assert cfg["binance.max_streams_per_connection"] == 100 and cfg["sink.flow_timeout"] == 5.0
    assert isinstance(cfg["sink.flow_timeout"], float)
    assert cfg["sink.spool_dir"] == "/var/lib/feeds/binance" and cfg["sink.max_pending"] == 200_000
    assert cfg["sink.statement_timeout"] == 10.0 and cfg["sink.lock_timeout"] == 5.0
    assert cfg["sink.spool_max_bytes"] == 2 << 30
    assert cfg.given == {"binance.rest_url", "binance.ws_url", "binance.max_streams_per_connection",
                         "sink.flow_timeout"}
    kite = doc(tmp_path, KITE_FILE, '[kite]\napi_key = "k"\n')
    assert kite["sink.spool_dir"] == "/var/lib/feeds/zerodha" and kite["sink.max_pending"] == 50_000


def test_a_dsn_with_a_password_is_not_echoed(tmp_path):
    with pytest.raises(ConfigError) as e:
        doc(tmp_path, FEEDS_FILE, '[database]\ndsn = "host=x password=secret words"\n')
    assert e.value.key == "database.dsn" and "secret" not in str(e.value) and "words" not in str(e.value)


def secret_file(tmp_path, name: str, text: str, mode: int = 0o600):
    p = tmp_path / name
    p.write_text(text)
    p.chmod(mode)
    return p


def test_secret_files(tmp_path, monkeypatch):
    monkeypatch.delenv("FEEDS_DSN", raising=False)
    d = tmp_path / "secrets"
    d.mkdir(mode=0o700)
    cases = {
        secret_file(tmp_path, "ok", "pw with space\nsecond line\n"): None,
        d: "is a directory, not a file",
        tmp_path / "missing": "not found",
        secret_file(tmp_path, "group", "pw\n", 0o640): "is readable by group/others (chmod 600)",
        secret_file(tmp_path, "empty", "\n"): "is empty",
    }
    for path, reason in cases.items():
        cfg = doc(tmp_path, FEEDS_FILE, f'[database]\ndsn = "host=/run/postgresql dbname=feeds"\n'
                                        f'password_file = "{path}"\n')
        if reason is None:
            assert "password='pw with space'" in database_dsn(cfg)
            continue
        with pytest.raises(ConfigError) as e:
            database_dsn(cfg)
        assert e.value.key == "database.password_file" and e.value.file == cfg.file
        assert f"secret file {path} {reason}" == e.value.reason


def test_database_dsn_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("FEEDS_DSN", raising=False)
    (tmp_path / "feeds.toml").write_text('[database]\ndsn = "dbname=common"\n')
    cfg = doc(tmp_path, IBKR_FILE, "[ibkr]\nport = 1\n")
    assert database_dsn(cfg) == "dbname=common"                      # from feeds.toml beside it
    cfg = doc(tmp_path, IBKR_FILE, '[database]\ndsn = "dbname=own"\n')
    assert database_dsn(cfg) == "dbname=own"
    (tmp_path / "feeds.toml").write_text('[database]\ndsn = "dbname=common"\nuser = "x"\n')
    cfg = doc(tmp_path, IBKR_FILE, "[ibkr]\nport = 1\n")
    with pytest.raises(ConfigError) as e:                             # feeds.toml is checked too
        database_dsn(cfg)
    assert (e.value.key, e.value.file) == ("database.user", str(tmp_path / "feeds.toml"))
    monkeypatch.setenv("FEEDS_DSN", "dbname=env")
    assert database_dsn(cfg) == "dbname=env"
    monkeypatch.setenv("FEEDS_DSN", "dbname")
    with pytest.raises(ConfigError) as e:
        database_dsn(cfg)
    assert (e.value.key, e.value.file) == ("FEEDS_DSN", "the environment")
    monkeypatch.delenv("FEEDS_DSN")
    os.remove(tmp_path / "feeds.toml")
    with pytest.raises(ConfigError) as e:
        database_dsn(cfg)
    assert (e.value.key, e.value.reason) == ("database.dsn", "missing")


def test_table_entries_are_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        doc(tmp_path, FEEDS_FILE, "[retention]\nbinance_agg_trade = 0\n")
    assert e.value.key == "retention.binance_agg_trade" and "days >= 1" in e.value.reason
    with pytest.raises(ConfigError) as e:
        doc(tmp_path, FEEDS_FILE, '[retention]\n"drop table x" = 3\n')
    assert e.value.key == "retention.drop table x" and e.value.reason == "not a table name"
    with pytest.raises(ConfigError) as e:
        doc(tmp_path, KITE_FILE, '[kite]\napi_key = "k"\n[kite.extra_sessions]\n"2025-13-01" = ["10:00", "11:00"]\n')
    assert e.value.key == "kite.extra_sessions.2025-13-01"
    cfg = doc(tmp_path, FEEDS_FILE, "[retention]\nbinance_agg_trade = 9\n[maintain]\nlock_timeout = 1\n")
    assert cfg["retention"] == {"binance_agg_trade": 9} and cfg["maintain.lock_timeout"] == 1.0


def test_check_document_fills_values_of_a_parsed_document(tmp_path):
    cfg = check_document(Config({"ibkr": {"port": 4002}}, tmp_path / "ibkr.toml"), IBKR_FILE)
    assert cfg["ibkr.port"] == 4002 and cfg["backfill.concurrency"] == 4
    with pytest.raises(KeyError):
        cfg["binance.symbols"]                  # not a setting of ibkr.toml


def uncommented(text: str) -> str:
    """``text`` with its commented-out settings (``#key = ...``, ``#[table]``) made active."""
    return "".join(line[1:] if line.startswith("#") and line[1:2] not in (" ", "#", "") else line
                   for line in text.splitlines(keepends=True))


def test_commented_binance_plausibility_settings_are_valid_and_show_the_defaults(tmp_path):
    """etc/binance.toml documents the id/time plausibility keys commented out: made
    active they load, and feed-binance then runs with exactly its defaults."""
    from feeds.binance.collector import Settings
    from feeds.binance.main import load_settings
    text = (ROOT / "etc" / "binance.toml").read_text()
    active = uncommented(text)
    assert active != text
    cfg = doc(tmp_path, BINANCE_FILE, active)
    keys = {"binance.max_future_s", "binance.max_id_jump", "binance.id_confirmations",
            "binance.id_adopt_lone_after"}
    assert keys <= cfg.given
    got, default = load_settings(cfg), Settings()
    for k in keys:
        name = k.split(".", 1)[1]
        assert getattr(got, name) == getattr(default, name), name
    assert load_settings(load(ROOT / "etc" / "binance.toml", BINANCE_FILE)).max_id_jump == default.max_id_jump


def test_binance_plausibility_settings_reach_the_collector(tmp_path):
    from feeds.binance.main import load_settings
    cfg = doc(tmp_path, BINANCE_FILE, BIN + "max_future_s = 30\nid_confirmations = 5\nid_adopt_lone_after = 0\n"
                                          "[binance.max_id_jump]\nbookTicker = 1000\n")
    s = load_settings(cfg)
    assert (s.max_future_s, s.id_confirmations, s.id_adopt_lone_after) == (30.0, 5, 0.0)
    assert s.max_id_jump == {"aggTrade": 1_000_000, "bookTicker": 1000}       # unset kinds keep their default
