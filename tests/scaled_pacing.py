"""Settings for feed-backfill runs against the TWS simulator with IB's windows scaled (tests and
bench/ibkr_pacing_profiles.py).

Every time of IB's is multiplied by the pacing scale, ``slow_answer`` too (feeds.ibkr.pacing), but this
machine's own answer time (the simulator making the bars, the client reading them, PostgreSQL storing
them, on shared cores) is not: at a scale of 0.01 the default threshold of 10 s becomes 0.1 s, inside
that noise, and ``auto`` would fall back on a busy moment rather than on IB's behaviour.  So a scaled run
sets the threshold, in IB's seconds as ``ibkr.toml`` does, far above the noise (``SLOW_ANSWER``), and
the throttle model slows its answers by enough to cross it (``THROTTLE``, the simulator's
``pacing_options``): 10 s more per request beyond its free 60 (0.1 s at 0.01), so ``auto`` sees
answers slower than 200 s of IB's (2 s at 0.01) after some 20 requests beyond, far from the throttle's
limit of 120 requests in its window.
"""
from __future__ import annotations

#: ``backfill.slow_answer`` (IB's seconds) per simulator pacing model, for scales of 0.01 and more.
SLOW_ANSWER = {"strict": 3000.0, "documented": 3000.0, "throttle": 200.0}
#: The simulator's throttle options (IB's seconds) for the ``throttle`` model.
THROTTLE = {"throttle_step": 10.0, "throttle_max_delay": 600.0}


def pacing_options(model: str) -> dict[str, float] | None:
    """The simulator's ``pacing_options`` for ``model``."""
    return dict(THROTTLE) if model == "throttle" else None
