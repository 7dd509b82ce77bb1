"""A bad configuration stops a program with one line naming the key and file, exit 78."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

FEED_BINANCE = [sys.executable, str(ROOT / "bin" / "feed-binance")]
GOOD = """
[database]
dsn = "host=127.0.0.1 port=1 dbname=x"
[binance]
rest_url = "http://127.0.0.1:1"
ws_url = "ws://127.0.0.1:1"
"""


def run(tmp_path, text, *args):
    cfg = tmp_path / "binance.toml"
    cfg.write_text(text)
    return subprocess.run([*FEED_BINANCE, "--config", str(cfg), *args], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("text,key", [
    (GOOD.replace('rest_url = "http://127.0.0.1:1"\n', ""), "binance.rest_url"),
    (GOOD.replace('"ws://127.0.0.1:1"', '"http://x"'), "binance.ws_url"),
    (GOOD + "max_streams_per_connection = 5000\n", "binance.max_streams_per_connection"),
    (GOOD + 'streams = ["aggTrade", "trades"]\n', "binance.streams"),
    (GOOD + "[binance.stale_after]\nfoo = 3\n", "binance.stale_after.foo"),
    (GOOD + "[sink]\nflush_interval = 5\n", "sink.flush_interval"),
    (GOOD.replace('dsn = "host=127.0.0.1 port=1 dbname=x"', "dsn = 5"), "database.dsn"),
])
def test_bad_key_exits_78_with_one_line(tmp_path, text, key):
    p = run(tmp_path, text)
    assert p.returncode == 78, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert f"key '{key}'" in lines[0] and str(tmp_path / "binance.toml") in lines[0]


def test_missing_file_and_invalid_toml(tmp_path):
    p = subprocess.run([*FEED_BINANCE, "--config", str(tmp_path / "nope.toml")], capture_output=True, text=True)
    assert p.returncode == 78 and "file not found" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run(tmp_path, "[binance\nrest_url=")
    assert p.returncode == 78 and "not valid TOML" in p.stderr


def test_bad_shard_exits_78(tmp_path):
    p = run(tmp_path, GOOD, "--shard", "3of2")
    assert p.returncode == 78 and p.stderr.strip() == ("configuration error in the command line: key '--shard': "
                                                       "expected KofN with 1 <= K <= N (e.g. 1of2), got '3of2'")
    p = run(tmp_path, GOOD + 'shard = "0of2"\n')
    assert p.returncode == 78 and "key 'binance.shard'" in p.stderr and str(tmp_path) in p.stderr


# ----------------------------------------------------------------------------- every program, real entry points

KITE = """[kite]
api_key = "k"
[kite.login]
user_id = "AB1234"
api_secret_file = "{tmp}/api"
password_file = "{tmp}/pw"
totp_secret_file = "{tmp}/totp"
[metrics]
textfile_dir = ""
"""
IBKR = '[ibkr]\nport = 1\ncontracts_file = "{tmp}/contracts.csv"\n'
DB = '[database]\ndsn = "host=127.0.0.1 port=1 dbname=x"\n'

# (case, program and arguments, files {name: text}, environment, key, file named, words of the reason)
CASES = [
    ("unknown key", ["feed-binance", "--config", "{tmp}/binance.toml"],
     {"binance.toml": GOOD + "[sink]\nflush_intervall = 0.5\n"}, {},
     "sink.flush_intervall", "{tmp}/binance.toml", "unknown key (did you mean 'sink.flush_interval'?)"),
    ("unhashable streams entry", ["feed-binance", "--config", "{tmp}/binance.toml"],
     {"binance.toml": GOOD + 'streams = [["aggTrade"]]\n'}, {},
     "binance.streams", "{tmp}/binance.toml", "expected list[str], got list [['aggTrade']]"),
    ("secret path is a directory", ["feed-binance", "--config", "{tmp}/binance.toml"],
     {"binance.toml": GOOD.replace("dbname=x\"", 'dbname=x"\npassword_file = "{tmp}/secrets"')}, {},
     "database.password_file", "{tmp}/binance.toml", "secret file {tmp}/secrets is a directory, not a file"),
    ("malformed DSN", ["feed-binance", "--config", "{tmp}/binance.toml"],
     {"binance.toml": GOOD.replace("port=1 dbname=x", "port=1 dbname")}, {},
     "database.dsn", "{tmp}/binance.toml", "not a valid libpq connection string"),
    ("wrong type", ["feed-binance", "--config", "{tmp}/binance.toml"],
     {"binance.toml": GOOD + '[sink]\nbatch_rows = "20000"\n'}, {},
     "sink.batch_rows", "{tmp}/binance.toml", "expected int, got str '20000'"),
    ("unknown key in feeds.toml beside", ["feed-binance", "--config", "{tmp}/binance.toml"],
     {"binance.toml": '[binance]\nrest_url = "http://127.0.0.1:1"\nws_url = "ws://127.0.0.1:1"\n',
      "feeds.toml": '[database]\ndsn = "dbname=x"\nport = 5432\n'}, {},
     "database.port", "{tmp}/feeds.toml", "unknown key"),
    ("unknown key", ["feed-zerodha", "--config", "{tmp}/kite.toml"],
     {"kite.toml": DB + '[kite]\napi_kee = "k"\n'}, {},
     "kite.api_kee", "{tmp}/kite.toml", "did you mean 'kite.api_key'?"),
    ("missing secret file", ["feed-zerodha", "--config", "{tmp}/kite.toml"],
     {"kite.toml": DB + 'password_file = "{tmp}/nope"\n' + KITE}, {},
     "database.password_file", "{tmp}/kite.toml", "secret file {tmp}/nope not found"),
    ("bad session hours", ["feed-zerodha", "--config", "{tmp}/kite.toml"],
     {"kite.toml": KITE + '[kite.extra_sessions]\n"2025-10-21" = ["14:45"]\n'}, {"FEEDS_DSN": "dbname=x"},
     "kite.extra_sessions.2025-10-21", "{tmp}/kite.toml", 'expected ["HH:MM", "HH:MM"]'),
    ("group-readable secret", ["feed-kite-token", "--config", "{tmp}/kite.toml"],
     {"kite.toml": KITE.replace("{tmp}/pw", "{tmp}/group")}, {},
     "kite.login.password_file", "{tmp}/kite.toml", "secret file {tmp}/group is readable by group/others"),
    ("secret path is a directory", ["feed-kite-token", "--config", "{tmp}/kite.toml"],
     {"kite.toml": KITE.replace("{tmp}/api", "{tmp}/secrets")}, {},
     "kite.login.api_secret_file", "{tmp}/kite.toml", "is a directory, not a file"),
    ("unknown section", ["feed-backfill", "--config", "{tmp}/ibkr.toml", "--status"],
     {"ibkr.toml": IBKR + "[backfil]\nconcurrency = 2\n"}, {"FEEDS_DSN": "dbname=x"},
     "backfil", "{tmp}/ibkr.toml", "unknown key (did you mean 'backfill'?)"),
    ("wrong type", ["feed-backfill", "--config", "{tmp}/ibkr.toml", "--status"],
     {"ibkr.toml": IBKR.replace("port = 1", 'port = "7497"')}, {"FEEDS_DSN": "dbname=x"},
     "ibkr.port", "{tmp}/ibkr.toml", "expected int, got str '7497'"),
    ("malformed DSN in the environment", ["feed-backfill", "--config", "{tmp}/ibkr.toml", "--status"],
     {"ibkr.toml": IBKR}, {"FEEDS_DSN": "host=127.0.0.1 dbname"},
     "FEEDS_DSN", "the environment", "not a valid libpq connection string"),
    ("retention of a wrong type", ["feed-maintain", "--config", "{tmp}/feeds.toml"],
     {"feeds.toml": DB + '[retention]\nbinance_agg_trade = "30"\n'}, {},
     "retention.binance_agg_trade", "{tmp}/feeds.toml", "expected int, got str '30'"),
    ("bad value", ["feed-maintain", "--config", "{tmp}/feeds.toml"],
     {"feeds.toml": DB + "[maintain]\nlock_timeout = 0\n"}, {},
     "maintain.lock_timeout", "{tmp}/feeds.toml", "must be > 0"),
    ("unknown key", ["feed-migrate", "--config", "{tmp}/feeds.toml"],
     {"feeds.toml": '[database]\ndns = "dbname=x"\n'}, {},
     "database.dns", "{tmp}/feeds.toml", "did you mean 'database.dsn'?"),
    ("malformed DSN", ["feedctl", "status", "--config", "{tmp}/ops.toml"],
     {"ops.toml": '[database]\ndsn = "dbname"\n'}, {},
     "database.dsn", "{tmp}/ops.toml", "not a valid libpq connection string"),
    ("unknown key", ["feedctl", "--config", "{tmp}/ops.toml", "check"],
     {"ops.toml": "[api]\n", "alerts.toml": '[alerts]\nrate_dorp = 0.5\n'}, {"FEEDS_DSN": "dbname=x"},
     "alerts.rate_dorp", "{tmp}/alerts.toml", "did you mean 'alerts.rate_drop'?"),
]


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-config")
    (tmp / "secrets").mkdir(mode=0o700)
    for name, text, mode in (("api", "apisecret", 0o600), ("pw", "hunter2", 0o600), ("group", "hunter2", 0o640),
                             ("totp", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", 0o600)):
        (tmp / name).write_text(text + "\n")
        (tmp / name).chmod(mode)
    (tmp / "contracts.csv").write_text("symbol,secType,exchange,currency\nAAPL,STK,SMART,USD\n")
    return tmp


@pytest.mark.parametrize("case, argv, files, env, key, file, words", CASES,
                         ids=[f"{c[1][0]}: {c[0]}" for c in CASES])
def test_bad_configuration_of_every_program(secrets_dir, tmp_path, case, argv, files, env, key, file, words):
    """Run through the program itself: exit 78 and exactly one line naming the key and the file."""
    fill = {"tmp": str(tmp_path)}
    for name in ("secrets", "api", "pw", "group", "totp", "contracts.csv"):
        os.symlink(secrets_dir / name, tmp_path / name)
    for name, text in files.items():
        (tmp_path / name).write_text(text.format(**fill))
    prog, *args = argv
    p = subprocess.run([sys.executable, str(ROOT / "bin" / prog), *(a.format(**fill) for a in args)],
                       capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin", **env})
    out = p.stdout + p.stderr
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert p.returncode == 78 and len(lines) == 1, out[-3000:]
    assert lines[0].startswith(f"configuration error in {file.format(**fill)}: key '{key}': "), lines[0]
    assert words.format(**fill) in lines[0]


def test_a_shared_secret_may_be_read_by_its_group_but_never_by_others_or_written_by_the_group(tmp_path):
    from feeds.config import ConfigError, read_secret
    f = tmp_path / "feeds-ops.password"
    f.write_text("s3cret\n")
    f.chmod(0o640)
    assert read_secret(f, "database.password_file", "ops.toml", shared=True) == "s3cret"
    with pytest.raises(ConfigError) as e:
        read_secret(f, "database.password_file", "ops.toml")
    assert "chmod 600" in str(e.value) and "s3cret" not in str(e.value)
    for mode in (0o644, 0o660, 0o604):
        f.chmod(mode)
        with pytest.raises(ConfigError) as e:
            read_secret(f, "database.password_file", "ops.toml", shared=True)
        assert "chmod 640" in str(e.value) and "database.password_file" in str(e.value)
