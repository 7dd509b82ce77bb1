"""A bad configuration stops a program with one line naming the key and file, exit 78."""
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
    assert p.returncode == 78 and "key 'shard'" in p.stderr
