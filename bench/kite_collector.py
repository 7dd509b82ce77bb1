#!/usr/bin/env python3
"""Benchmark: feed-zerodha decoding and storing full-mode ticks for 3,000
instruments in one process.

Runs everything on this machine, each in its own process: a throwaway
PostgreSQL cluster (fsync on, default durability), the Kite simulator
(``bin/feed-sim-kite``, full-mode packets with five-level depth) and the
collector (``bin/feed-zerodha``, the program the unit runs, KiteTicker
inside).  The simulator is asked for more than the collector can take
(``--rate`` ticks per second per instrument); TCP back-pressure then lets
it send only what the collector reads, so the stored rate is the
collector's ceiling.  Prints:

* full-mode ticks decoded and stored per second, over a sustained window,
  and the rate the simulator offered;
* ticks lost: the simulator's packets sent on the connection, counted after
  freezing it, minus the rows stored (0 expected);
* the collector's CPU seconds per million ticks and its peak RSS (VmHWM);
* with ``--decoder kiteticker`` the same with KiteTicker's own parser.

Target: >= 20,000 ticks/s with peak RSS < 250 MB.

Usage: bench/kite_collector.py [--instruments 3000] [--rate 25] [--window 30]
                               [--decoder native|kiteticker|both]
"""
from __future__ import annotations

import argparse
import os
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from collector_bench import PY, full_packets_sent, http_json, measure, setup  # noqa: E402

TABLE = "kite_tick_full"


def _data(url: str, method: str = "GET"):
    return http_json(url, method)["data"]


def run(instruments: int, rate: float, window: float, decoder: str, warmup: float = 8.0,
        extra_toml: str = "[metrics]\nport = 0\n") -> dict:
    """One measured run (:func:`collector_bench.measure`); ``extra_toml`` is appended
    to the collector's configuration (default: no metrics endpoint)."""
    with setup("feeds-bench-kite-") as b:
        from feeds.kite.token import AccessToken, TokenStore, next_expiry
        tmp = b.tmp
        sim, port, base = b.simulator("feed-sim-kite", "--rate", str(rate), "--min-nse-equities",
                                      str(max(instruments, 100)), "--no-rate-limits", "--seed", "1",
                                      "--log-level", "WARNING")
        for _ in range(150):
            try:
                _data(base + "/sim/stats")
                break
            except OSError:
                time.sleep(0.1)
        token = _data(base + "/sim/access_token", "POST")["access_token"]
        now = datetime.now(timezone.utc)
        TokenStore(tmp / "token.json").save(AccessToken("simkey", "AB1234", token, now, next_expiry(now)))
        b.instruments("NSE", instruments)
        (tmp / "kite.toml").write_text(f"""
[kite]
api_key = "simkey"
api_url = "{base}"
ticker_url = "ws://127.0.0.1:{port}/"
login_url = "{base}"
token_file = "{tmp}/token.json"
instruments_file = "{tmp}/instruments.txt"
session_calendar = "none"
decoder = "{decoder}"
silence_timeout = 30
status_interval = 5
[sink]
spool_dir = "{tmp}/spool"
""" + extra_toml)
        col = b.start([PY, str(ROOT / "bin" / "feed-zerodha"), "--config", str(tmp / "kite.toml"),
                       "--unit", "bench-kite"], "collector.log", b.collector_env())
        r = measure(b, TABLE, col, sim, lambda: full_packets_sent(_data(base + "/sim/stats")["connections"]),
                    lambda: _data(base + "/sim/fault/silence?seconds=3600", "POST"), instruments, window, warmup,
                    start_timeout=60)
        r["decoder"] = decoder
        r["offered"] = instruments * rate
        return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instruments", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=25.0, help="ticks/s per instrument asked of the simulator")
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--decoder", choices=("native", "kiteticker", "both"), default="native")
    a = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; {a.instruments} instruments, full mode, one collector process, "
          f"simulator asked for {a.rate:g}/s each ({a.instruments * a.rate:,.0f} ticks/s)")
    for dec in (("native", "kiteticker") if a.decoder == "both" else (a.decoder,)):
        r = run(a.instruments, a.rate, a.window, dec)
        ok = r["rate"] >= 20_000 and r["rss_mb"] < 250 and r["lost"] == 0
        print(f"decoder {dec:10s}: {r['rate']:,.0f} full ticks/s decoded and stored over {r['window']:.0f} s "
              f"(simulator sent {r['sent_rate']:,.0f}/s); lost {r['lost']}; "
              f"collector CPU {r['cpu_per_m']:.1f} s per million ticks ({r['cpu_share'] * 100:.0f}% of a core); "
              f"peak RSS {r['rss_mb']:.0f} MB; exit {r['rc']}"
              f"  [{'meets' if ok else 'misses'} >= 20,000/s, < 250 MB, no loss]")


if __name__ == "__main__":
    main()
