"""Range checks for venue input, shared by every adapter.  Pure, no I/O.

A message can be well typed and still impossible: a price of ``"-1.5"`` or
``"1e400"``, an event time of 1970 or of the year 33658, an update id of
2**63 (beyond PostgreSQL's ``bigint``) or one that jumps 10**12 ahead of the
previous one.  Stored as sent, such a value either fails the database write
or, worse, becomes the de-duplication state of its symbol so that every later
message counts as a duplicate.  The checks here reject them before they reach
any state; the adapters raise their :class:`Malformed` (a ``ValueError``)
with the reason, and the collectors count and log it.

What is checked
---------------
* **Times** (:class:`Window`): integer epoch milliseconds, not before the
  venue existed (``earliest_ms``) and not more than ``ahead_ms`` after now;
  optionally (``behind_ms``) not more than that before now.  Recorded
  sessions from 2021 replay unchanged with the defaults; tests can inject
  their own clock.
* **Integers** (:func:`id64`, :func:`int64`): PostgreSQL ``bigint`` range;
  ids, counts and sizes are not negative.
* **Decimals** (:func:`decimal`): ASCII text ``[-]digits[.digits][e[+-]digits]``
  with at most :data:`MAX_DIGITS` digits and an exponent of at most
  :data:`MAX_EXPONENT` in magnitude; the sign rule of the field
  (:data:`POSITIVE` for prices, :data:`NON_NEGATIVE` for quantities,
  :data:`SIGNED` for e.g. funding rates and price changes).
* **Sequences** (:class:`SequenceGuard`): an id that should grow (Binance's
  bookTicker ``u``, aggTrade ``a``) may not jump far from the last accepted
  one on the evidence of a single message; see the class for the rule.

The hot paths of the adapters inline the common case of these checks
(integer comparisons and ``str`` methods, which run in C) and call the
functions here only when that quick test fails, so that the reason can be
named.
"""
from __future__ import annotations

import re
import time
from typing import Callable

__all__ = ["Malformed", "Window", "SequenceGuard", "decimal", "id64", "int64", "symbol",
           "INT64_MIN", "INT64_MAX", "MAX_DIGITS", "MAX_EXPONENT", "POSITIVE", "NON_NEGATIVE", "SIGNED",
           "BINANCE_FUTURES_START_MS", "KITE_START_MS", "MINUTE_MS", "DAY_MS"]

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
#: most digits a decimal string may carry (integer and fraction digits together)
MAX_DIGITS = 32
#: largest magnitude of a decimal exponent (``1e20`` passes, ``1e400`` does not)
MAX_EXPONENT = 20

POSITIVE = 1          # > 0: prices
NON_NEGATIVE = 0      # >= 0: quantities, volumes
SIGNED = -1           # any sign: funding rates, price changes

MINUTE_MS = 60_000
DAY_MS = 86_400_000
#: Binance USD-M futures opened on 2019-09-08 (BTCUSDT perpetual); nothing before 2019-09-01 UTC is theirs
BINANCE_FUTURES_START_MS = 1_567_296_000_000
#: Zerodha was founded in 2010; no Kite exchange time predates 2010-01-01 UTC
KITE_START_MS = 1_262_304_000_000

_DECIMAL = re.compile(r"(-?)([0-9]*)(?:\.([0-9]*))?(?:[eE]([-+]?[0-9]{1,6}))?", re.ASCII).fullmatch


class Malformed(ValueError):
    """A message that cannot be turned into a row: a key is missing, a value
    has the wrong type, or a value is outside its plausible range.  The text
    names the field and the reason."""


def decimal(v, what: str = "value", sign: int = POSITIVE) -> str:
    """Check a decimal string; return it unchanged.

    ``v`` must be a ``str`` of ASCII ``[-]digits[.digits][(e|E)[+-]digits]``
    with at least one digit, at most :data:`MAX_DIGITS` digits and an
    exponent of at most :data:`MAX_EXPONENT` in magnitude.  ``sign``:
    :data:`POSITIVE` (> 0), :data:`NON_NEGATIVE` (>= 0, no minus sign) or
    :data:`SIGNED`.  Raises :class:`Malformed` naming ``what``.
    """
    if type(v) is not str:
        raise Malformed(f"{what} not a decimal string: {v!r:.60}")
    m = _DECIMAL(v) if v.isascii() and len(v) <= MAX_DIGITS + 12 else None
    if m is None:
        raise Malformed(f"{what} not an ASCII decimal of at most {MAX_DIGITS} digits: {v!r:.60}")
    neg, whole, frac, exp = m.groups()
    digits = whole + (frac or "")
    if not digits:
        raise Malformed(f"{what} has no digits: {v!r:.60}")
    if len(digits) > MAX_DIGITS:
        raise Malformed(f"{what} has {len(digits)} digits (at most {MAX_DIGITS}): {v!r:.60}")
    if exp is not None and abs(int(exp)) > MAX_EXPONENT:
        raise Malformed(f"{what} exponent beyond {MAX_EXPONENT}: {v!r:.60}")
    if sign >= 0 and neg:
        raise Malformed(f"{what} negative: {v!r:.60}")
    if sign > 0 and not digits.strip("0"):
        raise Malformed(f"{what} not positive: {v!r:.60}")
    return v


def id64(v, what: str = "id") -> int:
    """An id, count or size: an ``int`` in ``0 .. 2**63-1``.  Raises :class:`Malformed`."""
    if type(v) is not int:
        raise Malformed(f"{what} not an integer: {v!r:.60}")
    if not 0 <= v <= INT64_MAX:
        raise Malformed(f"{what} outside 0..2**63-1: {v}")
    return v


def int64(v, what: str = "integer") -> int:
    """A signed 64-bit integer (``bigint``).  Raises :class:`Malformed`."""
    if type(v) is not int:
        raise Malformed(f"{what} not an integer: {v!r:.60}")
    if not INT64_MIN <= v <= INT64_MAX:
        raise Malformed(f"{what} outside the 64-bit range: {v}")
    return v


def symbol(v, what: str = "symbol", max_len: int = 40) -> str:
    """A venue symbol: a non-empty printable ``str`` of at most ``max_len``
    characters without white space or the stream separators ``@`` and ``/``
    (not necessarily ASCII: Binance lists a few symbols in Chinese script).
    Raises :class:`Malformed`."""
    if type(v) is not str or not v or len(v) > max_len or not v.isprintable() \
            or "@" in v or "/" in v or any(c.isspace() for c in v):
        raise Malformed(f"{what} not a symbol: {v!r:.60}")
    return v


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Window:
    """The plausible range of venue times, in integer epoch milliseconds.

    ``earliest_ms``: nothing before it (the venue's start).  ``ahead_ms``: at
    most this far after now (clock skew, a little latency).  ``behind_ms``:
    if set, at most this far before now as well.  ``clock``: now in epoch ms
    (default the wall clock); tests inject a fixed one.

    The upper bound is cached and refreshed only when a value exceeds it
    (time only moves forward, so a stale bound can only be too strict, and
    the refresh then corrects it): in-range values cost two integer
    comparisons, without a clock read.  After replacing ``clock``, call
    :meth:`refresh`.
    """

    __slots__ = ("earliest_ms", "ahead_ms", "behind_ms", "clock", "lo", "hi")

    def __init__(self, earliest_ms: int, ahead_ms: int = 10 * MINUTE_MS, behind_ms: int | None = None,
                 clock: Callable[[], int] | None = None):
        self.earliest_ms = int(earliest_ms)
        self.ahead_ms = int(ahead_ms)
        self.behind_ms = behind_ms
        self.clock = clock or _wall_ms
        self.refresh()

    def refresh(self) -> None:
        """Recompute both bounds from the clock now."""
        now = self.clock()
        self.hi = now + self.ahead_ms
        lo = self.earliest_ms
        if self.behind_ms is not None:
            lo = max(lo, now - self.behind_ms)
        self.lo = lo

    def now_ms(self) -> int:
        """Now according to :attr:`clock`, in epoch milliseconds."""
        return self.clock()

    def ok(self, v: int) -> bool:
        """``v`` (an int) inside the window?  Refreshes the bounds once when
        ``v`` is above the cached upper bound (or below a moving lower one)."""
        if self.lo <= v <= self.hi:
            return True
        self.refresh()
        return self.lo <= v <= self.hi

    def ms(self, v, what: str = "time") -> int:
        """Check one epoch-millisecond time; return it.  Raises :class:`Malformed`."""
        if type(v) is not int:
            raise Malformed(f"{what} not an integer millisecond time: {v!r:.60}")
        if self.lo <= v <= self.hi or self.ok(v):
            return v
        if v < self.lo:
            raise Malformed(f"{what} {v} ms is before {self.lo} ms (the venue's start or the window)")
        raise Malformed(f"{what} {v} ms is more than {self.ahead_ms // 1000} s ahead of now")


# ---------------------------------------------------------------- sequences

ACCEPT = 0      # in line with the state: store it, it is the new state
DUPLICATE = 1   # at or just behind the state: already seen
HELD = 2        # implausible on its own: held until other messages decide


class _Run:
    """Held messages whose ids are consistent with each other."""

    __slots__ = ("ids", "items", "since")

    def __init__(self, x: int, item, since: float):
        self.ids = [x]
        self.items = [item]
        self.since = since

    @property
    def last(self) -> int:
        return self.ids[-1]


class _Pending:
    __slots__ = ("runs", "inline")

    def __init__(self):
        self.runs: list[_Run] = []
        self.inline = 0           # messages accepted in line with the state since the first run opened


class SequenceGuard:
    """De-duplication state of a growing id per key, safe against outliers.

    ``last[key]`` is the last accepted id.  For an id ``x`` of ``key``:

    * ``last < x <= last + max_jump``: **accepted**, ``x`` becomes the state
      (the common case; callers may inline it, see :meth:`inline`).
    * ``last - max_jump <= x <= last``: a **duplicate** (a replay, the
      overlap of two connections).
    * anything else - no state yet, far ahead of it, or far *behind* it -
      is **held**, not stored and not state: a single message never moves the
      state by more than ``max_jump``.  Held messages form runs of mutually
      consistent ids (each within ``max_jump`` after the previous one).  A run
      that reaches ``confirm + 1`` messages is **adopted**: its messages are
      released in order, its last id becomes the state and every other run
      of the key is **rejected**.  Once ``confirm`` messages were accepted in
      line with the state while runs are held, those runs are rejected too
      (the state was right; they were outliers).

    So an outlier (``u + 10**12``, a poisoned row read back at start) never
    becomes state and is rejected as soon as ``confirm`` regular messages
    follow, while a genuine jump (after a long disconnect, or a venue that
    restarted its ids) is accepted on the evidence of ``confirm`` further
    messages that continue it.  Messages far behind a suspicious state are
    not duplicates: they are held and, once confirmed, replace it.
    ``adopt_lone_after`` (seconds): with no state at all, a single run that
    nothing contradicts is adopted after that long (see :meth:`expire`), so
    the first messages of a quiet key are not held forever.

    Memory is bounded: at most ``max_runs`` runs of at most ``confirm + 1``
    messages per key (a further run displaces the oldest, which is rejected).
    """

    __slots__ = ("max_jump", "confirm", "max_runs", "adopt_lone_after", "last", "pending")

    def __init__(self, max_jump: int, confirm: int = 2, max_runs: int = 4, adopt_lone_after: float = 60.0):
        if max_jump < 1 or confirm < 1 or max_runs < 2:
            raise ValueError("max_jump and confirm must be >= 1, max_runs >= 2")
        self.max_jump = int(max_jump)
        self.confirm = int(confirm)
        self.max_runs = int(max_runs)
        self.adopt_lone_after = float(adopt_lone_after)
        self.last: dict = {}
        self.pending: dict = {}

    def classify(self, key, x: int) -> int:
        """:data:`ACCEPT`, :data:`DUPLICATE` or :data:`HELD` for ``x``, without changing anything."""
        last = self.last.get(key)
        if last is not None:
            if last < x <= last + self.max_jump:
                return ACCEPT
            if last - self.max_jump <= x <= last:
                return DUPLICATE
        return HELD

    def inline(self, key) -> list:
        """Note one message of ``key`` accepted in line with the state while
        runs are held (call it only when ``key in self.pending``).  Returns
        the rejected held items, ``[]`` until ``confirm`` such messages came."""
        p = self.pending.get(key)
        if p is None:
            return []
        p.inline += 1
        if p.inline < self.confirm:
            return []
        del self.pending[key]
        return [it for r in p.runs for it in r.items]

    def hold(self, key, x: int, item, now: float | None = None) -> tuple[list | None, int | None, list, bool]:
        """Hold ``item`` (id ``x``, classified :data:`HELD`).

        Returns ``(adopted, previous, rejected, duplicate)``: ``adopted`` is
        the list of items to store now, in order (``None`` while held), and
        ``previous`` the state before the adoption (``None`` if there was
        none); ``rejected`` are held items now known to be implausible;
        ``duplicate`` is true when ``x`` repeats an id already held (the item
        is dropped).  On adoption ``last[key]`` is set to the run's last id.
        """
        if now is None:
            now = time.monotonic()
        p = self.pending.get(key)
        if p is None:
            p = self.pending[key] = _Pending()
        mj = self.max_jump
        run = None
        for r in p.runs:
            y = r.last
            if y < x <= y + mj:
                run = r
                break
            if r.ids[0] <= x <= y or y - mj <= x <= y:
                return None, None, [], True
        if run is None:
            rejected: list = []
            if len(p.runs) >= self.max_runs:
                rejected = p.runs.pop(0).items
            p.runs.append(_Run(x, item, now))
            return None, None, rejected, False
        run.ids.append(x)
        run.items.append(item)
        if len(run.ids) <= self.confirm:
            return None, None, [], False
        del self.pending[key]
        previous = self.last.get(key)
        self.last[key] = run.last
        rejected = [it for r in p.runs if r is not run for it in r.items]
        return run.items, previous, rejected, False

    def expire(self, now: float | None = None) -> list[tuple]:
        """Adopt, for keys without any state, a single run held longer than
        ``adopt_lone_after`` seconds.  Returns ``[(key, items), ...]`` to store
        (in order); ``last[key]`` is set.  Call it now and then (the
        collectors' ``periodic``)."""
        if now is None:
            now = time.monotonic()
        out = []
        for key, p in list(self.pending.items()):
            if key in self.last or len(p.runs) != 1 or now - p.runs[0].since < self.adopt_lone_after:
                continue
            run = p.runs[0]
            del self.pending[key]
            self.last[key] = run.last
            out.append((key, run.items))
        return out

    def held(self) -> int:
        """Number of items held over all keys."""
        return sum(len(r.items) for p in self.pending.values() for r in p.runs)
