#!/usr/bin/env python3
"""Benchmark: replaying a spool left by a database outage.

For spools of 200,000, 1,000,000 and 2,000,000 rows (Binance aggTrade and
bookTicker rows, half each, as the adapter makes them, written with
:class:`feeds.sink.Spool` in batches of 100,000 rows as an outage under load
leaves them), a fresh process starts :class:`feeds.sink.Sink` on the spool
(the code every collector runs) against a throwaway PostgreSQL cluster with
durable defaults (fsync on) and waits until the spool is gone.  Prints per
spool: its size on disk, the replay rate (rows/s, from the sink's start to
the last segment removed) and the replaying process's peak RSS (VmHWM), next
to its RSS before the sink started.  Peak RSS must not grow with the spool
size; feed-binance's unit allows MemoryMax=400M.

Usage: bench/spool_replay.py [--rows 200000,1000000,2000000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from procstats import proc_hwm_mb  # noqa: E402
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "lib"))
PY = sys.executable


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def build_spool(directory: Path, rows: int) -> int:
    """Write ``rows`` rows to a spool in ``directory``; returns its bytes."""
    from feeds.binance import adapter as A
    from feeds.sink import Spool
    sp = Spool(directory)
    t0 = (int(time.time()) - 6 * 3600) * 1000
    recv = A.now_text()
    syms = [f"B{i:02d}USDT" for i in range(50)]
    for start in range(0, rows, 100_000):
        agg, book = [], []
        for j in range(start, min(rows, start + 100_000)):
            s = syms[j % 50]
            t = t0 + j // 50
            px = f"{29000 + j % 9973}.{j % 100:02d}"
            if j % 2 == 0:
                agg.append(A.agg_trade_row({"e": "aggTrade", "E": t + 3, "a": j, "s": s, "p": px,
                                            "q": f"{j % 50}.{j % 1000:03d}", "f": 3 * j, "l": 3 * j + 2, "T": t,
                                            "m": j % 3 == 0}, recv))
            else:
                book.append(A.book_ticker_row({"e": "bookTicker", "u": j, "s": s, "b": px, "B": f"{j % 70}.125",
                                               "a": px, "A": f"{j % 30}.500", "T": t, "E": t + 1}, recv))
        sp.append({"binance_agg_trade": agg, "binance_book_ticker": book})
    sp._close()
    return sum(p.stat().st_size for p in sp.segments())


def child(dsn: str, spool: str) -> None:
    """Replay ``spool`` into ``dsn``; print one JSON line of figures."""
    from feeds.binance import adapter as A
    from feeds.sink import Sink
    before = rss_mb()
    t = time.monotonic()
    sink = Sink(dsn, spool, A.TABLES).start()
    while sink.spool.has_data() and not sink.fatal:
        time.sleep(0.05)
    took = time.monotonic() - t
    ok = sink.close(60)
    out = sink.outcome()
    print(json.dumps({"rows": out.replayed, "committed": out.committed, "rejected": out.rejected, "ok": ok,
                      "seconds": took, "rss_before_mb": before, "hwm_mb": proc_hwm_mb(os.getpid())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="200000,1000000,2000000", help="spool sizes in rows, comma-separated")
    ap.add_argument("--child", nargs=2, metavar=("DSN", "SPOOL"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    from pgserver import PgServer

    from feeds.migrate import apply
    pg = PgServer().init()
    with open(pg.data / "postgresql.conf", "a") as f:   # durable defaults, not the test shortcuts
        f.write("fsync = on\nsynchronous_commit = on\nfull_page_writes = on\nmax_wal_size = 4GB\n")
    pg.start()
    tmp = Path(tempfile.mkdtemp(prefix="feeds-bench-spool-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "lib"), FEEDS_LOG_LEVEL="WARNING")
    try:
        print(f"{'rows':>10} {'spool MB':>9} {'replay s':>9} {'rows/s':>9} {'RSS before':>11} {'peak RSS':>9}")
        for n in (int(x) for x in a.rows.split(",")):
            dsn = pg.dsn(pg.create_db())
            apply(dsn, ROOT / "sql")
            spool = tmp / f"spool-{n}"
            size = build_spool(spool, n)
            r = subprocess.run([PY, __file__, "--child", dsn, str(spool)], env=env, capture_output=True,
                               text=True, timeout=3600)
            if r.returncode != 0:
                raise SystemExit(f"replay of {n} rows failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
            fig = json.loads(r.stdout.strip().splitlines()[-1])
            if fig["rows"] != n or fig["committed"] != n or not fig["ok"]:
                raise SystemExit(f"replay of {n} rows incomplete: {fig}")
            print(f"{n:>10,} {size / 1e6:>9.1f} {fig['seconds']:>9.1f} {n / fig['seconds']:>9,.0f} "
                  f"{fig['rss_before_mb']:>8.0f} MB {fig['hwm_mb']:>6.0f} MB", flush=True)
            for p in spool.glob("*"):
                p.unlink()
    finally:
        pg.destroy()
        for p in tmp.glob("*/*"):
            p.unlink()
        for p in tmp.glob("*"):
            p.rmdir()
        tmp.rmdir()


if __name__ == "__main__":
    main()
