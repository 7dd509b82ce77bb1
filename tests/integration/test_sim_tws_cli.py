"""bin/feed-sim-tws in live mode, as a separate process, read by the real ib_async client."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ib_async import IB, Index, Stock

ROOT = Path(__file__).resolve().parents[2]


def start_sim(*args: str) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([sys.executable, str(ROOT / "bin" / "feed-sim-tws"), "--port", "0", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        m = re.search(r"tws sim listening host=\S+ port=(\d+)", line)
        if m:
            # keep reading the log so that the simulator never blocks on a full pipe
            threading.Thread(target=p.stderr.read, daemon=True).start()
            return p, int(m.group(1))
    p.kill()
    raise AssertionError(f"simulator did not start: {p.stderr.read()}")


def test_cli_live_mode_with_contracts_file_and_synthetic_stocks():
    p, port = start_sim("--contracts", str(ROOT / "etc" / "ibkr-live.csv"), "--synthetic", "3",
                        "--live-rate", "600", "--generate", "", "--log-level", "INFO")
    try:
        async def main():
            ib = IB()
            raw: list[tuple[str, str]] = []
            orig = ib.wrapper.tickString

            def tick_string(req_id, tick_type, value):
                if tick_type == 48:
                    raw.append((ib.wrapper.reqId2Ticker[req_id].contract.symbol, value))
                orig(req_id, tick_type, value)

            ib.wrapper.tickString = tick_string
            await ib.connectAsync("127.0.0.1", port, clientId=4, timeout=10)
            try:
                spy, syn, spx = await ib.qualifyContractsAsync(
                    Stock("SPY", "SMART", "USD", primaryExchange="ARCA"), Stock("SYN0002", "SMART", "USD"),
                    Index("SPX", "CBOE", "USD"))
                assert spy.conId == 756733 and spx.conId == 416904 and syn.conId > 0
                ib.reqMktData(spy, "233")
                ib.reqMktData(syn, "233")
                t_spx = ib.reqMktData(spx, "")
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not (
                        {s for s, _ in raw} == {"SPY", "SYN0002"} and t_spx.last == t_spx.last):
                    await asyncio.sleep(0.05)
                assert {s for s, _ in raw} == {"SPY", "SYN0002"} and t_spx.last > 0
                price, size, ms, total, vwap, single = raw[-1][1].split(";")
                assert float(price) > 0 and int(size) > 0 and abs(int(ms) / 1000 - time.time()) < 30
                # the minute in progress is served from the same trades
                bars = await ib.reqHistoricalDataAsync(spy, "", "120 S", "1 min", "TRADES", False, 2)
                assert bars and 0 < bars[-1].barCount <= 600
                ib.disconnect()
            finally:
                ib.disconnect()

        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=30)
    stats = json.loads(out.strip().splitlines()[-1])
    assert p.returncode == 0
    assert stats["live"]["rate"] == 600 and stats["live"]["trades_sent"] > 0
    assert stats["live"]["index_ticks_sent"] > 0


def test_cli_rejects_a_bad_contracts_file(tmp_path):
    bad = tmp_path / "c.csv"
    bad.write_text("symbol,secType,exchange,currency\nAAPL,XXX,SMART,USD\n")
    p = subprocess.run([sys.executable, str(ROOT / "bin" / "feed-sim-tws"), "--port", "0", "--contracts", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 78 and "c.csv" in p.stderr
