#!/usr/bin/env python3
"""Benchmark: how long feed-ibkr takes to have every subscription back after
TWS/IB Gateway drops them.

Runs on this machine: a throwaway PostgreSQL cluster, the TWS simulator in
this process (a thread; 100 contracts by default, IB's default allowance of
market data lines: the index SPX and generated stocks, ticking at
``--live-rate`` trades per minute each, with their quotes) and the collector
(``bin/feed-ibkr``, the program the unit runs) with one contract also tick by
tick (AllLast and BidAsk).  Three faults, each ``--repeat`` times, in turn:

* ``disconnect``: the simulator resets every socket (TCP RST) mid-session;
  timed from the reset.
* ``reset, data lost``: IB's nightly reset as TWS shows it (2103/2105, 1100,
  no tick for 2 s, then 1101 "data lost" with every subscription dropped,
  2104/2106); timed from the 1101.
* ``reset, sockets closed``: the same with the sockets closed and new
  connections refused for ``--gap`` seconds (a gateway restart); timed from
  the moment the gateway accepts connections again.

"Restored" means the simulator holds, for feed-ibkr's clientId, a
``reqMktData`` for every contract and both tick-by-tick requests (on a new
connection, or re-requested after the 1101), polled every 10 ms.  Prints the
p50 and the maximum per fault.  Target: every subscription back within 10 s.

Usage: bench/ibkr_restore.py [--contracts 100] [--live-rate 600] [--repeat 5] [--gap 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from ibkr_live import Rig, contract_symbols  # noqa: E402

from feeds.sim.tws import TwsSimulatorThread  # noqa: E402

TARGET_S = 10.0
CLIENT_ID = 72          # Rig.write_config
TBT_SYMBOL = "SIM0001"


def held(sim, n_contracts: int, exclude: set[int]) -> int | None:
    """The connection number holding every subscription of feed-ibkr (not one of ``exclude``), or None."""
    for number, conn in sim.subscriptions().items():
        if (number not in exclude and conn["client_id"] == CLIENT_ID and len(conn["mktData"]) == n_contracts
                and len(conn["tbt"]) == 2):
            return number
    return None


def wait_restored(sim, rig: Rig, n: int, t0: float, *, exclude: set[int] = frozenset(),
                  resubscribed_from: int | None = None, timeout: float = 120.0) -> tuple[float, int]:
    """Seconds from ``t0`` (monotonic) until :func:`held` (and, when ``resubscribed_from`` is given,
    the simulator counted ``n`` more re-requests); and the connection number."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        number = held(sim, n, exclude)
        if number is not None and (resubscribed_from is None
                                   or sim.stats()["live"]["resubscriptions"] - resubscribed_from >= n):
            return time.monotonic() - t0, number
        if (why := rig.collector_failed()):
            raise SystemExit(why)
        time.sleep(0.01)
    raise SystemExit(f"subscriptions not restored after {timeout} s: {sim.stats()['live']['subscriptions']}; "
                     "collector log:\n" + rig.col_log.read_text()[-3000:])


def run(contracts: int, live_rate: int, repeat: int, gap: float) -> dict[str, list[float]]:
    symbols = contract_symbols(contracts)
    out: dict[str, list[float]] = {"disconnect": [], "reset, data lost": [], "reset, sockets closed": []}
    with TwsSimulatorThread(generate=symbols, live_rate=live_rate, record_ticks="count", start_timeout=60) as sim:
        rig = Rig(contracts, live_rate, sim_port=sim.port)
        try:
            rig.start_collector(status_interval=5.0, live=f'tick_by_tick = ["{TBT_SYMBOL}"]')
            _, conn = wait_restored(sim, rig, contracts, time.monotonic())
            for _ in range(repeat):
                t0 = time.monotonic()
                sim.disconnect_all(abort=True)
                took, conn = wait_restored(sim, rig, contracts, t0, exclude={conn})
                out["disconnect"].append(took)
                time.sleep(2)

                resub = sim.stats()["live"]["resubscriptions"]
                t0 = time.monotonic() + 2.0
                sim.nightly_reset(2.0, True, False)
                took, conn = wait_restored(sim, rig, contracts, t0, resubscribed_from=resub)
                out["reset, data lost"].append(took)
                time.sleep(2)

                t0 = time.monotonic() + gap
                sim.nightly_reset(gap, True, True)
                took, conn = wait_restored(sim, rig, contracts, t0, exclude={conn})
                out["reset, sockets closed"].append(took)
                time.sleep(2)
            print(f"feed-ibkr stop: {rig.stop_collector()}")
        finally:
            rig.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contracts", type=int, default=100)
    ap.add_argument("--live-rate", type=int, default=600, help="trades per minute and contract")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--gap", type=float, default=20.0, help="seconds the gateway refuses connections")
    a = ap.parse_args()
    res = run(a.contracts, a.live_rate, a.repeat, a.gap)
    print(f"contracts {a.contracts} (+2 tick-by-tick requests), live rate {a.live_rate}/min each, "
          f"{a.repeat} rounds, gateway away {a.gap:g} s in the last fault")
    worst = 0.0
    for name, xs in res.items():
        worst = max(worst, max(xs))
        print(f"  {name:<24} restored in p50 {statistics.median(xs):6.2f} s  max {max(xs):6.2f} s  "
              f"({', '.join(f'{x:.2f}' for x in xs)})")
    print(f"target: every subscription back within {TARGET_S:g} s: {'met' if worst <= TARGET_S else 'NOT met'} "
          f"(worst {worst:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
