"""bin/feed-binance as a real process: SIGTERM flushes every buffered row and exits 0."""
import os
import re
import signal
import subprocess
import sys

import pytest

from feeds.sim.binance import SimulatorThread

from binance_harness import q, wait_until
from conftest import ROOT

pytestmark = pytest.mark.integration
UNIT = "feed-binance-proc-test"


def received(db) -> int | None:
    """Messages the collector has read, as its latest heartbeat row counts them."""
    rows = q(db, "select (detail->>'messages')::bigint from feed_heartbeat where unit = %s", (UNIT,))
    return rows[0][0] if rows else None


def test_sigterm_flushes_everything_and_exits_zero(db, tmp_path):
    with SimulatorThread(symbols=5, rate=2000, seed=9, streams=["aggTrade", "bookTicker"]) as sim:
        cfg = tmp_path / "binance.toml"
        cfg.write_text(f"""
[binance]
rest_url = "{sim.http_url}"
ws_url = "{sim.ws_url}"
streams = ["aggTrade", "bookTicker"]
[sink]
spool_dir = "{tmp_path}/spool"
flush_interval = 1.0
""")
        env = dict(os.environ, FEEDS_DSN=db, PYTHONPATH=str(ROOT / "lib"))
        p = subprocess.Popen([sys.executable, str(ROOT / "bin" / "feed-binance"), "--config", str(cfg),
                              "--unit", UNIT], env=env, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: q(db, "select count(*) from binance_book_ticker")[0][0] > 500, 120, what="rows")
            # freeze the venue: what was sent is all there is (the count is final once the call returns,
            # the stall and the counter both live on the simulator's loop)
            sim.call(sim.sim.fault_stall_all, 600)
            sent = sim.stats()["sent_total"]
            # SIGTERM once the collector has read every message sent (its heartbeat row counts them)
            wait_until(lambda: received(db) == sent, 120, what=f"the heartbeat to count {sent} messages")
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
    assert p.returncode == 0, err[-2000:]
    stored = q(db, "select (select count(*) from binance_agg_trade) + (select count(*) from binance_book_ticker)")[0][0]
    assert stored == sent
    m = re.search(r"stopped: all rows committed or spooled \(([\d,]+) committed, 0 spooled, 0 rejected, 0 lost; "
                  r"[\d,]+ pending at stop\)", err)
    assert m, err[-2000:]
    assert int(m.group(1).replace(",", "")) == stored              # the stop line counts what the tables hold
    assert q(db, "select count(*) from feed_heartbeat where unit = %s", (UNIT,))[0][0] == 1
    assert received(db) == stored                                     # the final heartbeat: all it read, stored
    assert not list((tmp_path / "spool").glob("spool-*.bin"))
