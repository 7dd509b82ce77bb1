"""Pacing under load: at least 120 requests on a scaled window, zero violations, >= 95 % of the allowed rate."""
from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from feeds.ibkr.backfill import Backfill, Selection
from feeds.ibkr.pacing import PacingLimiter, max_in_window, utilisation
from feeds.ibkr.store import BackfillStore
from test_ibkr_backfill import XNYS, Notes, RecordingSim, contracts, settings, sim_kw, statuses

pytestmark = pytest.mark.integration

SCALE = 0.01          # ten minutes become 6 s, 15 s 0.15 s, 2 s 0.02 s
WINDOW = 600 * SCALE  # the simulator's window


def test_run_of_180_requests_uses_the_allowed_rate_without_violation(db):
    first, last = dt.date(2024, 1, 2), dt.date(2024, 5, 8)
    n_sessions = sum(1 for _, s in XNYS.days(first, last) if s is not None)
    n_requests = 2 * n_sessions
    assert 170 <= n_requests <= 180   # three windows' worth: two waits for the window to move on

    async def main():
        sim = RecordingSim(**sim_kw(generate=("AAPL", "MSFT"), pacing_scale=SCALE))
        await sim.start()
        try:
            lim = PacingLimiter(scale=SCALE, keep_history=True)
            bf = Backfill(settings(sim, SCALE), contracts("AAPL", "MSFT"), BackfillStore(db), limiter=lim,
                          notifier=Notes())
            sm = await asyncio.wait_for(bf.run(Selection(first=first, last=last)), 120)
            return sm, sim.stats(), [t for t, _, _ in sim.hist_log], lim.history
        finally:
            await sim.stop()

    sm, stats, seen, sent = asyncio.run(main())
    assert stats["pacing_violations"] == {"identical_15s": 0, "same_contract_2s": 0, "max_60_per_10min": 0,
                                          "max_50_open": 0}
    assert sm.pacing_violations == 0 and sm.requests == n_requests == len(seen) == len(sent)
    assert stats["historical"]["served"] == n_requests
    assert all(s["status"] == "COMPLETE" for s in statuses(db).values() if s["status"] != "HOLIDAY")
    # never more than 60 in any window, and the window is used to the full
    assert max_in_window(seen, WINDOW) == 60
    # each request 60 after another waits one window and no more; as the simulator saw them and as sent
    u_seen, u_sent = utilisation(seen, WINDOW), utilisation(sent, WINDOW)
    print(f"pacing utilisation: {u_seen:.3f} (simulator clock), {u_sent:.3f} (limiter clock), "
          f"{n_requests} requests in {seen[-1] - seen[0]:.2f} s, window {WINDOW:g} s")
    assert u_seen >= 0.95 and u_sent >= 0.95
