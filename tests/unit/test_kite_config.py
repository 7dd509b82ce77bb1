"""kite.toml validation: one line naming the key and file, exit status 78."""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import date, time as dtime

import pytest

from conftest import ROOT
from feeds.config import Config, ConfigError
from feeds.kite.main import gather_specs, load_login, load_settings
from feeds.settings import KITE_FILE, load

SHIPPED = ROOT / "etc" / "kite.toml"


def cfg(tmp_path, text: str) -> Config:
    p = tmp_path / "kite.toml"
    p.write_text(text)
    return load(p, KITE_FILE)


def test_shipped_default_is_valid_and_uses_kite_limits():
    kc = load_settings(load(SHIPPED, KITE_FILE))
    assert (kc.max_connections, kc.max_instruments_per_connection, kc.capacity) == (3, 3000, 9000)
    assert kc.session_calendar == "XNSE" and kc.default_mode == "full" and kc.collector.decoder == "native"
    assert (kc.connect_before_open, kc.stop_after_close) == (300.0, 300.0)
    assert kc.token_file == "/var/lib/feeds/kite/access_token.json"
    shipped_list = (ROOT / "etc" / "kite-instruments.txt").read_text().splitlines()
    from feeds.kite.instruments import parse_specs
    assert {s.key for s in parse_specs(shipped_list, "full")} == {"NSE:INFY", "NSE:RELIANCE", "NSE:NIFTY 50",
                                                                   "NSE:NIFTY BANK"}


@pytest.mark.parametrize("line, key, reason", [
    ('api_key = ""', "kite.api_key", "must not be empty"),
    ('api_key = "k"\nticker_url = "http://x"', "kite.ticker_url", "not a ws/wss URL"),
    ('api_key = "k"\ndefault_mode = "depth"', "kite.default_mode", "must be one of ltp, quote, full"),
    ('api_key = "k"\nmax_connections = 4', "kite.max_connections", "must be 1..3 (Kite's limit per API key)"),
    ('api_key = "k"\nmax_instruments_per_connection = 3001', "kite.max_instruments_per_connection",
     "must be 1..3000"),
    ('api_key = "k"\nsession_calendar = "XBOM"', "kite.session_calendar", "must be one of XNSE, none"),
    ('api_key = "k"\nreconnect_max_delay = 2', "kite.reconnect_max_delay", "must be 5..300"),
    ('api_key = "k"\nextra_holidays = ["2024-13-01"]', "kite.extra_holidays", "not a date"),
    ('api_key = "k"\n[kite.extra_sessions]\n"2025-10-21" = ["14:45", "13:45"]', "kite.extra_sessions.2025-10-21",
     "expected"),
])
def test_bad_values_name_the_key(tmp_path, line, key, reason):
    with pytest.raises(ConfigError) as e:
        load_settings(cfg(tmp_path, "[kite]\n" + line + "\n"))
    assert e.value.key == key and reason in e.value.reason and str(tmp_path) in str(e.value)


def test_extra_sessions_parsed(tmp_path):
    kc = load_settings(cfg(tmp_path, '[kite]\napi_key = "k"\nextra_holidays = ["2025-12-25"]\n'
                                     '[kite.extra_sessions]\n"2025-10-21" = ["13:45", "14:45"]\n'))
    assert kc.extra_sessions == {date(2025, 10, 21): (dtime(13, 45), dtime(14, 45))}
    assert kc.extra_holidays == [date(2025, 12, 25)]


def test_instrument_sources(tmp_path):
    inst = tmp_path / "i.txt"
    inst.write_text("NSE:INFY\nNSE:TCS ltp\n")
    kc = load_settings(cfg(tmp_path, f'[kite]\napi_key = "k"\ninstruments_file = "{inst}"\n'))
    specs, src = gather_specs(kc, (), None, None)
    assert [(s.key, s.mode) for s in specs] == [("NSE:INFY", "full"), ("NSE:TCS", "ltp")] and src == str(inst)
    specs, src = gather_specs(kc, ("NSE:SBIN=quote,NSE:INFY", "BSE:INFY"), None, None)
    assert [(s.key, s.mode) for s in specs] == [("NSE:SBIN", "quote"), ("NSE:INFY", "full"), ("BSE:INFY", "full")]
    assert src == "the command line"
    inst.write_text("NSE:INFY\nINFY\n")
    with pytest.raises(ConfigError) as e:
        gather_specs(kc, (), None, None)
    assert e.value.key == "line 2" and e.value.file == str(inst)
    inst.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no instruments to collect"):
        gather_specs(kc, (), None, None)
    with pytest.raises(ConfigError, match="not found"):
        gather_specs(kc, (), str(tmp_path / "missing.txt"), None)


def test_too_many_instruments_refused_before_any_network(tmp_path):
    inst = tmp_path / "i.txt"
    inst.write_text("".join(f"NSE:SIMEQ{i:05d}\n" for i in range(1, 10_001)))
    kc = load_settings(cfg(tmp_path, f'[kite]\napi_key = "k"\ninstruments_file = "{inst}"\n'))
    with pytest.raises(ConfigError) as e:
        gather_specs(kc, (), None, None)
    assert e.value.reason.startswith("10000 instruments requested, but one API key carries at most 9000")
    kc = load_settings(cfg(tmp_path, f'[kite]\napi_key = "k"\ninstruments_file = "{inst}"\nmax_connections = 1\n'))
    with pytest.raises(ConfigError, match="at most 3000 \\(1 connections x 3000"):
        gather_specs(kc, (), None, None)


def test_login_secrets_must_be_private_files(tmp_path):
    sec = tmp_path / "secrets"
    sec.mkdir()
    for name, value in (("api", "apisecret"), ("pw", "hunter2"), ("totp", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")):
        (sec / name).write_text(value + "\n")
        (sec / name).chmod(0o600)
    text = (f'[kite]\napi_key = "k"\n[kite.login]\nuser_id = "AB1234"\napi_secret_file = "{sec}/api"\n'
            f'password_file = "{sec}/pw"\ntotp_secret_file = "{sec}/totp"\n')
    creds, settings, attempts, delays = load_login(c := cfg(tmp_path, text), load_settings(c))
    assert (creds.password, creds.totp_secret, creds.api_secret) == ("hunter2", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", "apisecret")
    assert settings.browser == "/usr/bin/chromium" and settings.use_browser and settings.http_fallback
    assert attempts == 4 and delays == [15.0, 60.0, 180.0]
    (sec / "pw").chmod(0o640)
    with pytest.raises(ConfigError, match="readable by group/others"):
        load_login(c, load_settings(c))
    (sec / "pw").chmod(0o600)
    (sec / "totp").write_text("not-base32!\n")
    with pytest.raises(ConfigError, match="not a usable base32 secret"):
        load_login(c, load_settings(c))


@pytest.mark.parametrize("prog", ["feed-zerodha", "feed-kite-token"])
def test_programs_exit_78_with_one_line(tmp_path, prog):
    p = tmp_path / "kite.toml"
    p.write_text('[kite]\napi_key = "k"\ndefault_mode = "depth"\n')
    env = {**os.environ, "FEEDS_DSN": "host=/nonexistent dbname=x"}
    r = subprocess.run([sys.executable, str(ROOT / "bin" / prog), "--config", str(p)], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 78
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert lines == [f"configuration error in {p}: key 'kite.default_mode': must be one of ltp, quote, full"]


def test_sink_defaults_bound_the_buffer(tmp_path):
    from feeds.service import sink_settings
    sk = sink_settings(cfg(tmp_path, '[kite]\napi_key = "k"\n'))
    assert sk["max_pending"] == 50_000 and sk["spool_dir"] == "/var/lib/feeds/zerodha"
    assert sink_settings(cfg(tmp_path, '[kite]\napi_key = "k"\n[sink]\nmax_pending = 5000\n'))["max_pending"] == 5000
    with pytest.raises(ConfigError, match="sink.flush_interval"):
        sink_settings(cfg(tmp_path, '[kite]\napi_key = "k"\n[sink]\nflush_interval = 2.0\n'))


def test_unreadable_subscription_table_is_not_a_configuration_error(tmp_path):
    from feeds.kite.main import SourceUnavailable
    kc = load_settings(cfg(tmp_path, '[kite]\napi_key = "k"\ninstruments_file = ""\ninstruments_from_table = true\n'))
    with pytest.raises(SourceUnavailable, match="cannot read the instruments from table kite_subscription"):
        gather_specs(kc, (), None, f"host={tmp_path}/no-socket-here dbname=feeds connect_timeout=2")
