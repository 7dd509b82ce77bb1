"""UTC timestamp text as the tick tables receive it (PostgreSQL parses it
into ``timestamptz``): cheap on the hot path, because ticks of one second
share its text.

* :func:`epoch_text`: epoch seconds -> ``YYYY-MM-DD HH:MM:SS+00:00`` (cached);
* :func:`time_text`: epoch nanoseconds -> ``YYYY-MM-DD HH:MM:SS.ffffff+00:00``
  (microseconds, truncated);
* :func:`now_text`: the current time as :func:`time_text` has it (a receive time);
* :func:`ist_text`: epoch nanoseconds -> ``YYYY-MM-DD HH:MM:SS`` in IST (journal lines, Kite's
  historical API).
"""
from __future__ import annotations

import time
from datetime import datetime

from .calendars import IST

#: seconds cached before the cache is emptied (a day of distinct seconds is 86,400)
CACHE_SIZE = 200_000

_SECONDS: dict[int, str] = {}


def epoch_text(sec: int) -> str:
    """Integer epoch seconds -> ``YYYY-MM-DD HH:MM:SS+00:00`` (UTC)."""
    t = _SECONDS.get(sec)
    if t is None:
        if len(_SECONDS) > CACHE_SIZE:
            _SECONDS.clear()
        t = _SECONDS[sec] = time.strftime("%Y-%m-%d %H:%M:%S+00:00", time.gmtime(sec))
    return t


def time_text(ns: int) -> str:
    """Integer epoch nanoseconds -> ``YYYY-MM-DD HH:MM:SS.ffffff+00:00`` (UTC, microseconds)."""
    sec, us = divmod(ns // 1000, 1_000_000)
    return f"{epoch_text(sec)[:19]}.{us:06d}+00:00"


def now_text() -> str:
    """The current time as :func:`time_text` writes it."""
    return time_text(time.time_ns())


def ist_text(ns: int) -> str:
    """Integer epoch nanoseconds -> ``YYYY-MM-DD HH:MM:SS`` in IST (seconds truncated)."""
    return datetime.fromtimestamp(ns // 1_000_000_000, IST).strftime("%Y-%m-%d %H:%M:%S")
