"""feed-maintain: partitions created ahead, those past retention dropped."""
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import psycopg

from feeds.cli import run_maintenance

from conftest import ROOT


def partitions(dsn, table):
    with psycopg.connect(dsn) as c:
        return sorted(r[0] for r in c.execute(
            "select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid "
            "where i.inhparent = %s::regclass", (table,)))


def test_maintenance_creates_ahead_and_drops_past_retention(db):
    today = datetime.now(timezone.utc).date()
    old = today - timedelta(days=40)
    recent = today - timedelta(days=5)
    with psycopg.connect(db, autocommit=True) as c:
        for d in (old, recent):
            c.execute("select feeds_ensure_day_partitions('binance_agg_trade', %s, 1)", (d,))
        c.execute("insert into binance_agg_trade values ('X', 1, '1', '1', 1, 1, %s, true, null, now())",
                  (datetime(old.year, old.month, old.day, 12, tzinfo=timezone.utc),))
    res = dict((t, (c, d)) for t, c, d in run_maintenance(db, {"binance_agg_trade": 30, "binance_book_ticker": 7}))
    names = partitions(db, "binance_agg_trade")
    assert f"binance_agg_trade_p{old:%Y%m%d}" not in names          # past 30 days: dropped
    assert f"binance_agg_trade_p{recent:%Y%m%d}" in names           # within retention: kept
    for k in range(4):                                              # today and 3 days ahead exist
        assert f"binance_agg_trade_p{today + timedelta(days=k):%Y%m%d}" in names
    assert res["binance_agg_trade"][1] == 1
    with psycopg.connect(db) as c:
        assert c.execute("select keep_days from feed_partitioned_table "
                         "where table_name = 'binance_book_ticker'::regclass").fetchone()[0] == 7
    # idempotent
    again = run_maintenance(db)
    assert all(created == 0 and dropped == 0 for _, created, dropped in again)


def test_feed_maintain_command_and_bad_retention(db, tmp_path):
    cfg = tmp_path / "feeds.toml"
    cfg.write_text(f'[database]\ndsn = "{db}"\n[retention]\nbinance_agg_trade = 10\n[metrics]\ntextfile_dir = ""\n')
    p = subprocess.run([sys.executable, str(ROOT / "bin" / "feed-maintain"), "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "FEEDS_DSN": ""})
    assert p.returncode == 0, p.stderr
    assert "binance_agg_trade:" in p.stderr
    cfg.write_text(f'[database]\ndsn = "{db}"\n[retention]\nbinance_agg_trade = 0\n[metrics]\ntextfile_dir = ""\n')
    p = subprocess.run([sys.executable, str(ROOT / "bin" / "feed-maintain"), "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "FEEDS_DSN": ""})
    assert p.returncode == 78 and "retention.binance_agg_trade" in p.stderr


def maintain_cmd(cfg):
    return [sys.executable, str(ROOT / "bin" / "feed-maintain"), "--config", str(cfg)]


def test_retention_of_a_table_that_is_not_partitioned_is_a_configuration_error(db, tmp_path):
    cfg = tmp_path / "feeds.toml"
    for table in ("no_such_table", "feed_heartbeat"):
        cfg.write_text(f'[database]\ndsn = "{db}"\n[retention]\nbinance_book_ticker = 3\n{table} = 10\n[metrics]\ntextfile_dir = ""\n')
        p = subprocess.run(maintain_cmd(cfg), capture_output=True, text=True, timeout=60,
                           env={**os.environ, "FEEDS_DSN": ""})
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 78 and len(lines) == 1, p.stderr
        assert lines[0].startswith(f"configuration error in {cfg}: key 'retention.{table}': not a partitioned "
                                   "table (feed-maintain manages: binance_agg_trade, ")
    with psycopg.connect(db) as c:                                  # nothing was changed
        assert c.execute("select keep_days from feed_partitioned_table "
                         "where table_name = 'binance_book_ticker'::regclass").fetchone()[0] == 30


class Maintain:
    """bin/feed-maintain as a child process; its journal lines are collected as they come."""

    def __init__(self, db, tmp_path, attempts: int):
        import threading
        cfg = tmp_path / "feeds.toml"
        cfg.write_text(f'[database]\ndsn = "{db}"\n[maintain]\nlock_timeout = 0.2\nattempts = {attempts}\n'
                       f'retry_delay = 0.2\n[metrics]\ntextfile_dir = ""\n')
        self.p = subprocess.Popen(maintain_cmd(cfg), stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "FEEDS_DSN": ""})
        self.lines: list[str] = []
        self._t = threading.Thread(target=lambda: self.lines.extend(self.p.stderr), daemon=True)
        self._t.start()

    def wait_line(self, text: str, timeout: float = 30.0) -> None:
        import time
        deadline = time.monotonic() + timeout
        while not any(text in ln for ln in list(self.lines)):
            assert time.monotonic() < deadline and self.p.poll() is None, "".join(self.lines)
            time.sleep(0.05)

    def wait(self) -> tuple[int, str]:
        rc = self.p.wait(60)                    # never hangs on a held lock
        self._t.join(10)
        return rc, "".join(self.lines)


def old_partition(db) -> str:
    old = datetime.now(timezone.utc).date() - timedelta(days=40)
    with psycopg.connect(db, autocommit=True) as c:
        c.execute("select feeds_ensure_day_partitions('binance_agg_trade', %s, 1)", (old,))
    return f"binance_agg_trade_p{old:%Y%m%d}"


def test_a_held_lock_is_waited_for_briefly_then_retried_until_released(db, tmp_path):
    """A reader holds binance_agg_trade (its partitions cannot be dropped meanwhile): feed-maintain's
    DDL gives up waiting after lock_timeout, tries again later and succeeds once the reader is done."""
    name = old_partition(db)
    with psycopg.connect(db) as reader:
        reader.execute("select count(*) from binance_agg_trade")           # a transaction left open
        m = Maintain(db, tmp_path, attempts=20)
        m.wait_line("binance_agg_trade: canceling statement due to lock timeout; attempt 1 of 20")
        reader.rollback()
        rc, err = m.wait()
    assert rc == 0, err
    assert re.search(r"binance_agg_trade: \d+ partition\(s\) created, 1 dropped", err), err
    assert name not in partitions(db, "binance_agg_trade")


def test_a_lock_never_released_names_the_table_and_the_others_are_maintained(db, tmp_path):
    name = old_partition(db)
    with psycopg.connect(db) as reader:
        reader.execute("select count(*) from binance_agg_trade")
        rc, err = Maintain(db, tmp_path, attempts=2).wait()
        reader.rollback()
    assert rc == 1, err
    assert "binance_agg_trade: not maintained: canceling statement due to lock timeout (2 attempt(s))" in err
    for other in ("binance_book_ticker", "binance_mark_price", "binance_ticker_24h", "kite_tick_full"):
        assert re.search(rf"{other}: \d+ partition\(s\) created, 0 dropped", err), err     # the others went on
    assert name in partitions(db, "binance_agg_trade")
