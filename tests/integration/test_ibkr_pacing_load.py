"""Pacing under load: three windows' worth of requests on a scaled window, counted from the simulator's
log: zero violations, never more than 60 in any window, each session asked once.  (How much of the
allowed rate a run uses is a measurement: bench/ibkr_backfill.py prints it.)"""
from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from feeds.ibkr.backfill import Backfill, Selection
from feeds.ibkr.pacing import PacingLimiter, max_in_window
from feeds.ibkr.store import BackfillStore
from test_ibkr_backfill import XNYS, Notes, RecordingSim, contracts, requested, settings, sim_kw, statuses

pytestmark = pytest.mark.integration

SCALE = 0.01          # ten minutes become 6 s, 15 s 0.15 s, 2 s 0.02 s
WINDOW = 600 * SCALE  # the simulator's window


def test_run_of_180_requests_never_breaks_the_pacing_rules(db):
    first, last = dt.date(2024, 1, 2), dt.date(2024, 5, 8)
    sessions = [(sym, d) for sym in ("AAPL", "MSFT") for d, s in XNYS.days(first, last) if s is not None]
    n_requests = len(sessions)
    assert 170 <= n_requests <= 180   # three windows' worth: the limiter has to wait for the window twice

    async def main():
        sim = RecordingSim(**sim_kw(generate=("AAPL", "MSFT"), pacing_scale=SCALE))
        await sim.start()
        try:
            lim = PacingLimiter(scale=SCALE, keep_history=True)
            bf = Backfill(settings(sim, SCALE), contracts("AAPL", "MSFT"), BackfillStore(db), limiter=lim,
                          notifier=Notes())
            sm = await asyncio.wait_for(bf.run(Selection(first=first, last=last)), 300)
            return sm, sim.stats(), list(sim.hist_log), lim
        finally:
            await sim.stop()

    sm, stats, log, lim = asyncio.run(main())
    seen, sent = [t for t, _, _ in log], lim.history
    # IB's view: no rule broken, every request answered
    assert stats["pacing_violations"] == {"identical_15s": 0, "same_contract_2s": 0, "max_60_per_10min": 0,
                                          "max_50_open": 0}
    assert stats["historical"]["served"] == n_requests
    # each session asked exactly once, as the simulator's log says; stored complete
    assert sorted(requested(log)) == sorted(sessions)
    assert sm.pacing_violations == 0 and sm.requests == n_requests == len(seen) == len(sent)
    assert all(s["status"] == "COMPLETE" for s in statuses(db).values() if s["status"] != "HOLIDAY")
    # never more than 60 in any window: as the simulator read them and as the limiter sent them
    assert max_in_window(seen, WINDOW) <= 60 and max_in_window(sent, WINDOW) <= 60
    # the limiter did hold requests back: each request k waited for request k - 60 to leave the window
    assert all(sent[k] - sent[k - 60] >= lim.window for k in range(60, len(sent)))
    assert lim.waited > 0
