"""feed-maintain: partitions created ahead, those past retention dropped."""
import os
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
    cfg.write_text(f'[database]\ndsn = "{db}"\n[retention]\nbinance_agg_trade = 10\n')
    p = subprocess.run([sys.executable, str(ROOT / "bin" / "feed-maintain"), "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "FEEDS_DSN": ""})
    assert p.returncode == 0, p.stderr
    assert "binance_agg_trade:" in p.stderr
    cfg.write_text(f'[database]\ndsn = "{db}"\n[retention]\nbinance_agg_trade = 0\n')
    p = subprocess.run([sys.executable, str(ROOT / "bin" / "feed-maintain"), "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "FEEDS_DSN": ""})
    assert p.returncode == 78 and "retention.binance_agg_trade" in p.stderr
