#!/usr/bin/env python3
"""Benchmark: feed-dhan decoding and storing full-mode packets for 5,000
instruments in one process.

Runs everything on this machine, each in its own process: a throwaway
PostgreSQL cluster (fsync on, default durability), the Dhan simulator
(``bin/feed-sim-dhan``, a virtual session opened now, full-mode packets with
five-level depth, one packet per WebSocket message as Dhan sends them) and
the collector (``bin/feed-dhan``, the program the unit runs).  The simulator
is asked for more than the collector can take (``--rate`` trades per second
per instrument); it writes only what the socket accepts, so TCP
back-pressure lets it send what the collector reads, and the stored rate is
the collector's ceiling.  Prints:

* full-mode packets decoded and stored per second (rows of
  ``dhan_tick_full``) over a sustained window, and the rate the simulator
  sent;
* packets lost: the simulator's full packets sent, counted after freezing
  it, minus the rows stored (0 expected);
* the collector's CPU seconds per million packets and its peak RSS (VmHWM);
* with ``--candles`` the same with the one-minute candles built too (the
  default configuration of the unit);
* with ``--in-process`` (also part of ``--all``) the collector's own ceiling
  without the network and the simulator: the same full packets (5,000
  instruments, prices walking on the 0.05 tick) handed to the collector's
  handler (decode, rows, candles) in this process, in batches of
  ``MAX_BATCH_MESSAGES`` as the listener hands over the messages of a
  socket read (one at a time for a build without batches), stored by
  the real sink into the same kind of PostgreSQL cluster: packets stored per
  second of wall clock and CPU seconds per million packets.  On a machine
  where the simulator and PostgreSQL share the cores with the collector,
  this is the figure that shows what the collector itself costs.

``--lib DIR`` runs the collector from another lib/ folder (a copy of the
project's ``lib`` at another revision), so that two builds are measured one
after the other on the same machine.

Target: >= 30,000 packets/s with peak RSS < 250 MB.

Usage: bench/dhan_collector.py [--instruments 5000] [--rate 8] [--window 30] [--candles on|off|both]
                               [--in-process | --all] [--packets 300000] [--profile FILE] [--lib DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from collector_bench import PY, full_packets_sent, http_json, measure, setup, stored  # noqa: E402

CLIENT = "1000000001"
TABLE = "dhan_tick_full"


def run(instruments: int, rate: float, window: float, candles: bool, warmup: float = 8.0,
        profile: str | None = None, lib: Path = ROOT / "lib") -> dict:
    """One measured run (:func:`collector_bench.measure`); with ``profile`` the collector
    runs under cProfile, its statistics written there; ``lib``: the lib/ folder the
    collector runs from."""
    with setup("feeds-bench-dhan-") as b:
        from feeds.dhan.token import DhanToken, TokenStore
        tmp = b.tmp
        sim, port, base = b.simulator("feed-sim-dhan", "--rate", str(rate), "--instruments", str(max(instruments, 100)),
                                      "--no-data", "--session-now", "--seed", "1", "--token-file",
                                      str(tmp / "sim-token"))
        for _ in range(300):
            if (tmp / "sim-token").exists() and (tmp / "sim-token").read_text().strip():
                break
            if sim.poll() is not None:
                raise SystemExit(f"simulator exited; see {tmp}/sim.log")
            time.sleep(0.1)
        token = (tmp / "sim-token").read_text().strip()
        now = datetime.now(timezone.utc)
        TokenStore(tmp / "token.json").save(DhanToken(CLIENT, token, now, now + timedelta(hours=20), method="bench"))
        b.instruments("NSE_EQ", instruments)
        (tmp / "dhan.toml").write_text(f"""
[dhan]
client_id = "{CLIENT}"
api_url = "{base}"
feed_url = "ws://127.0.0.1:{port}"
instrument_list_url = "{base}/api-data/api-scrip-master.csv"
instrument_list_cache = "{tmp}/scrip-master.csv"
token_file = "{tmp}/token.json"
instruments_file = "{tmp}/instruments.txt"
session_calendar = "none"
silence_timeout = 60
status_interval = 5
[candles]
enabled = {"true" if candles else "false"}
[sink]
spool_dir = "{tmp}/spool"
[metrics]
port = 0
""")
        prof = ["-m", "cProfile", "-o", profile] if profile else []
        col = b.start([PY, *prof, str(ROOT / "bin" / "feed-dhan"), "--config", str(tmp / "dhan.toml"),
                       "--unit", "bench-dhan"], "collector.log", dict(b.collector_env(), PYTHONPATH=str(lib)))
        r = measure(b, TABLE, col, sim, lambda: full_packets_sent(http_json(base + "/sim/stats")["feed"]["connections"]),
                    lambda: http_json(base + "/sim/fault/silence?seconds=3600", "POST"), instruments, window, warmup)
        # a reconnect starts the simulator's counters afresh: no loss figure then
        r["reconnects"] = http_json(base + "/sim/stats")["feed"]["connections_total"] - 1
        if r["reconnects"]:
            r["lost"] = None
        r["offered"] = instruments * rate
        return r


def make_frames(instruments: int, count: int, seed: int = 1) -> list[bytes]:
    """Full packets (one per message) of ``instruments`` instruments in turn, each
    price walking on the 0.05 tick, cumulative volume rising, 5-level depth."""
    import random
    from feeds.sim import dhan_packets as P
    rnd = random.Random(seed)
    base = [rnd.randint(2_000, 40_000) for _ in range(instruments)]
    vol = [0] * instruments
    ltt = P.ltt_from_utc(time.time())
    out = []
    for j in range(count):
        i = j % instruments
        p = base[i] = base[i] + rnd.randint(-2, 2)
        vol[i] += rnd.randint(1, 50)
        depth = [(rnd.randint(1, 5000), rnd.randint(1, 5000), rnd.randint(1, 50), rnd.randint(1, 50),
                  (p - lvl - 1) * 0.05, (p + lvl + 1) * 0.05) for lvl in range(5)]
        out.append(P.pack_full(1, 100001 + i, p * 0.05, rnd.randint(1, 500), ltt + j // instruments, p * 0.05,
                               vol[i], 1000, 2000, 0, 0, 0, p * 0.05, 0.0, (p + 40) * 0.05, (p - 40) * 0.05, depth))
    return out


def run_in_process(instruments: int, packets: int, candles: bool) -> dict:
    """The collector's handler and the real sink, no network: see the module text."""
    import resource
    from feeds import candles as C
    from feeds.dhan import adapter as A
    from feeds.dhan.candles import CANDLE_TABLE, DhanCandles
    from feeds.dhan.collector import DhanCollector, Settings
    from feeds.dhan.connections import Subscription
    from feeds.health import Health
    from feeds.candles import CandleSettings
    from feeds.runtime import tune_gc
    from feeds.sink import Sink
    frames = make_frames(instruments, packets)
    with setup("feeds-bench-dhan-inproc-") as b:
        health = Health(unit="bench-dhan", flow_timeout=20)
        sink = Sink(b.dsn, b.tmp, A.TABLES + (CANDLE_TABLE,), flush_interval=0.2, batch_rows=20_000,
                    max_pending=50_000).start()
        subs = [Subscription(1, 100001 + i, "full") for i in range(instruments)]
        cd = DhanCandles(CandleSettings(), C.always(), subs, sink, since_ns=time.time_ns()) if candles else None
        col = DhanCollector(Settings(), "token", [subs], sink, health, candles=cd)
        tune_gc()
        if hasattr(col, "batch_handler"):   # the messages of a socket read together, as the listener hands them
            from feeds.dhan.collector import MAX_BATCH_MESSAGES as per
            on = col.batch_handler(col.conns[0])
            batches = [frames[i:i + per] for i in range(0, len(frames), per)]
        else:                               # a build without it: one message at a time
            on, batches, per = col.handler(col.conns[0]), frames, 1
        every = max(1, 2000 // per)
        t0, c0 = time.perf_counter(), time.process_time()
        for i, f in enumerate(batches):
            on(f)
            if not i % every:
                col._flush()
        col._flush()
        assert sink.flush(600)
        t1, c1 = time.perf_counter(), time.process_time()
        assert sink.close(60)
        n = stored(b.dsn, TABLE)
        return {"rate": n / (t1 - t0), "stored": n, "cpu_per_m": (c1 - c0) / n * 1e6,
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instruments", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=8.0, help="trades/s per instrument asked of the simulator")
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--candles", choices=("on", "off", "both"), default="on")
    ap.add_argument("--profile", metavar="FILE", help="run the collector under cProfile, statistics to FILE")
    ap.add_argument("--in-process", action="store_true", help="only the in-process ceiling (no network)")
    ap.add_argument("--all", action="store_true", help="the end-to-end runs and the in-process ceiling")
    ap.add_argument("--packets", type=int, default=300_000, help="packets of the in-process run")
    ap.add_argument("--lib", metavar="DIR", type=Path, default=ROOT / "lib",
                    help="the lib/ folder the collector runs from (to compare two builds; default: this tree's)")
    a = ap.parse_args()
    a.lib = a.lib.resolve()
    sys.path.insert(0, str(a.lib))
    print(f"collector from {a.lib}")
    if a.in_process or a.all:
        for cd in ((True, False) if a.candles == "both" else (a.candles == "on",)):
            r = run_in_process(a.instruments, a.packets, cd)
            print(f"in process, candles {'on ' if cd else 'off'}: {r['rate']:,.0f} full packets/s decoded and stored "
                  f"({r['stored']:,} rows, wall clock, PostgreSQL on the same machine); collector CPU "
                  f"{r['cpu_per_m']:.1f} s per million packets (= {1e6 / r['cpu_per_m']:,.0f}/s on one core); "
                  f"peak RSS {r['rss_mb']:.0f} MB (packets held in memory included)")
        if a.in_process:
            return
    print(f"machine: {os.cpu_count()} CPUs; {a.instruments} instruments, full mode, one collector process, "
          f"simulator asked for {a.rate:g}/s each ({a.instruments * a.rate:,.0f} packets/s)")
    for cd in ((True, False) if a.candles == "both" else (a.candles == "on",)):
        r = run(a.instruments, a.rate, a.window, cd, profile=a.profile, lib=a.lib)
        ok = r["rate"] >= 30_000 and r["rss_mb"] < 250 and r["lost"] == 0
        lost = (r["lost"] if r["lost"] is not None else
                f"not counted ({r['reconnects']} reconnect(s): the simulator closed a connection it found idle)")
        print(f"candles {'on ' if cd else 'off'}: {r['rate']:,.0f} full packets/s decoded and stored over "
              f"{r['window']:.0f} s (simulator sent {r['sent_rate']:,.0f}/s using {r['sim_share'] * 100:.0f}% of a "
              f"core); lost {lost}; collector CPU {r['cpu_per_m']:.1f} s per million packets "
              f"({r['cpu_share'] * 100:.0f}% of a core); peak RSS {r['rss_mb']:.0f} MB; exit {r['rc']}"
              f"  [{'meets' if ok else 'misses'} >= 30,000/s, < 250 MB, no loss]")


if __name__ == "__main__":
    main()
