"""Technical indicators on closed candles, one bar at a time (the engine of ``feed-indicators``).

Specifications
--------------
``indicators.functions`` lists ``NAME`` or ``NAME(param=value, ...)``: any TA-Lib
function by its name and parameters (TA-Lib's Function API names, e.g.
``MACD(fastperiod=12, slowperiod=26, signalperiod=9)``), or ``VWAP`` (below).
:func:`load_specs` checks each against the installed TA-Lib at start: an
unknown function, an unknown parameter, a value TA-Lib refuses, or an input a
candle does not have (``MAVP``'s ``periods``) is a
:class:`feeds.config.ConfigError` naming ``indicators.functions`` (exit 78).
A spec is stored under its normalised text: every parameter of the function,
defaults included, sorted by name, without spaces
(``MACD(fastperiod=12,signalperiod=9,slowperiod=26)``, ``SMA(timeperiod=20)``,
``OBV``), so that ``RSI`` and ``RSI(timeperiod=14)`` are one indicator.  Each
output of the function is one value (TA-Lib's output names: ``real``; MACD
``macd``, ``macdsignal``, ``macdhist``; BBANDS ``upperband``, ``middleband``,
``lowerband``).

Inputs are the candle's open, high, low, close and volume as IEEE doubles
(TA-Lib computes in double; PostgreSQL's ``numeric::float8`` is the correctly
rounded double).  During a function's lookback TA-Lib has no value: nothing is
written for that bar and output (no NULL rows); a non-finite result is likewise
not written, and counted.

Incremental computation
-----------------------
Every (series, indicator) holds one TA-Lib stream handle (``talib.stream``,
TA-Lib 0.8: ``open`` on history, then ``update`` with one closed bar, O(1)).
TA-Lib documents, and :mod:`tests.unit.test_indicators` checks bar for bar,
that a handle's values are bit-identical to the Function API's batch result on
the same series (``talib.SMA(close)`` and so on): the comparison is exact
equality, no tolerance.  A series is (venue, instrument, interval in minutes);
:class:`Series` keeps its last ``capacity`` closed bars (at least
``indicators.warmup_bars``) in compact arrays.

Volume: a candle without volume (an index, a Kite LTP-mode instrument; volume
NULL) gets no value from a function that reads volume (OBV, AD, VWAP, ...):
the bar is skipped for those functions and counted (``no_volume``), and their
handles start again after it.

VWAP (ours)
-----------
``VWAP`` is the session's volume-weighted average price::

    typical price  tp_i = (high_i + low_i + close_i) / 3
    VWAP_n = sum(tp_i * volume_i) / sum(volume_i),  i over the session's bars up to n

reset at each session start.  A session is, per venue (:data:`SESSION_ZONE`):
Binance, the UTC day of the candle's start; Kite and Dhan (NSE), the candle's
trading day in Asia/Kolkata; IBKR (US exchanges), the candle's trading day in
America/New_York.  It is computed by TA-Lib's own VWAP handle (the same
formula, cumulative from its first bar) opened anew on each session's first
bar, so the test's batch reference is ``talib.VWAP`` applied to each session.
A session whose volume so far is zero has no VWAP (not written; TA-Lib says
0.0 there).  TA-Lib's VWAP alone, cumulative from the series' first bar, is
not offered: in ``indicators.functions`` the name means the session VWAP.

Restarts and revisions
----------------------
Stream handles cannot be saved (TA-Lib's handles point into the C library and
do not cross a process boundary), so a restart opens them on the last
``indicators.warmup_bars`` stored closed candles of each series (for VWAP, back
to the session's first bar), and a revised or late past candle (a candle
rewritten with revision + 1, a gap filled from REST) reopens its series'
handles on the bars kept in memory and writes the values from that bar on
again.  What that reproduces, measured on real HDFCBANK one-minute candles
(1,125 bars) with 500 bars of warm-up and checked by the tests:

* exactly (bit for bit) the values a never-restarted engine gives: EMA and
  MACD (their unstable period has died out well within 500 bars), VWAP (the
  warm-up reaches the session start) and OBV (cumulative: its handle is
  re-based on the stored OBV value of the warm-up's first bar, which makes the
  sums identical);
* within a few units in the last place (relative difference at most 7e-15
  measured, 1e-13 asserted): SMA, BBANDS and ADX, whose TA-Lib implementations
  keep running sums whose rounding depends on the whole path since the
  series' first bar, and RSI and ATR (Wilder's smoothing has converged, but a
  last-place difference comes and goes on some bars);
* other path-dependent TA-Lib functions (AD, ADOSC, WAD, SAR, PVT, ...,
  :data:`PATH_DEPENDENT`) restart from the warm-up window: their values after a
  restart are TA-Lib's on the series that starts there (logged at start).

In every case the values after a restart are exactly TA-Lib's batch values on
the series the engine holds (the warm-up bars and what followed).
"""
from __future__ import annotations

import math
import re
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import numpy as np

from .config import ConfigError

UTC = timezone.utc
KEY = "indicators.functions"
VWAP = "VWAP"
COLUMNS = ("open", "high", "low", "close", "volume")

#: The zone whose calendar day is a venue's VWAP session (see the module docstring).
SESSION_ZONE = {"binance": "UTC", "kite": "Asia/Kolkata", "dhan": "Asia/Kolkata", "ibkr": "America/New_York"}

#: Functions a restart re-bases exactly on a stored value (OBV: out[0] = volume[0]).
REBASED = frozenset({"OBV"})

_SPEC = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s*(?:\((.*)\))?\s*$", re.S)
_PARAM = re.compile(r"^\s*([a-z_]+)\s*=\s*([-+0-9.eE]+)\s*$")


class SpecError(ValueError):
    """An indicator specification that is not valid; the text says why."""


@dataclass(frozen=True)
class Spec:
    """One configured indicator.

    ``name``: TA-Lib function name (or ``VWAP``); ``params``: every parameter
    with its value, sorted by name; ``text``: the normalised specification
    (the ``indicator`` column); ``inputs``: candle columns in the order the
    function takes them; ``outputs``: output names (the ``output`` column);
    ``lookback``: bars before the first value; ``volume``: reads volume;
    ``path_dependent``: TA-Lib says its output depends on the whole path.
    """

    name: str
    params: tuple[tuple[str, int | float], ...]
    text: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    lookback: int
    volume: bool
    path_dependent: bool

    @property
    def kwargs(self) -> dict:
        return dict(self.params)

    def stream_class(self):
        from talib import stream
        return getattr(stream, self.name)

    def batch(self, cols: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        """TA-Lib's Function API on whole columns (``{"close": array, ...}``):
        one float64 array per output.  For VWAP: TA-Lib's cumulative VWAP on
        the given bars (one session)."""
        import talib
        out = getattr(talib, self.name)(*(cols[c] for c in self.inputs), **self.kwargs)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(np.asarray(o, dtype=np.float64) for o in out)


def _fmt(v: int | float) -> str:
    if isinstance(v, int):
        return str(v)
    s = repr(float(v))
    return s[:-2] if s.endswith(".0") else s


def _talib_function(name: str):
    import talib
    from talib import abstract
    if name not in set(talib.get_functions()):
        return None
    return abstract.Function(name)


def parse_spec(text: str) -> Spec:
    """One ``NAME`` / ``NAME(param=value, ...)`` checked against the installed
    TA-Lib.  Raises :class:`SpecError`."""
    m = _SPEC.match(text)
    if not m:
        raise SpecError(f"{text!r} is not NAME or NAME(param=value, ...)")
    name, body = m.group(1), m.group(2)
    given: dict[str, str] = {}
    if body is not None and body.strip():
        for part in body.split(","):
            pm = _PARAM.match(part)
            if not pm:
                raise SpecError(f"{text!r}: {part.strip()!r} is not param=value")
            if pm.group(1) in given:
                raise SpecError(f"{text!r}: {pm.group(1)} given twice")
            given[pm.group(1)] = pm.group(2)
    f = _talib_function(name)
    if f is None:
        raise SpecError(f"{text!r}: {name} is not a TA-Lib function")
    info = f.info
    defaults = dict(f.parameters)
    if name == VWAP and given:
        raise SpecError(f"{text!r}: VWAP takes no parameters")
    params: dict[str, int | float] = {}
    for k, v in defaults.items():
        params[k] = v
    for k, raw in given.items():
        if k not in defaults:
            raise SpecError(f"{text!r}: {name} has no parameter {k} (it has: {', '.join(defaults) or 'none'})")
        try:
            num = float(raw)
        except ValueError:
            raise SpecError(f"{text!r}: {k}={raw} is not a number") from None
        if not math.isfinite(num):
            raise SpecError(f"{text!r}: {k}={raw} is not finite")
        if isinstance(defaults[k], int):
            if num != int(num):
                raise SpecError(f"{text!r}: {k} must be an integer, not {raw}")
            params[k] = int(num)
        else:
            params[k] = num
    inputs: list[str] = []
    for val in info["input_names"].values():
        for col in (val if isinstance(val, list) else [val]):
            if col not in COLUMNS:
                raise SpecError(f"{text!r}: {name} needs an input a candle does not have ({col})")
            inputs.append(col)
    flags = info.get("function_flags") or []
    if "Function has a streaming API" not in flags:
        raise SpecError(f"{text!r}: {name} has no TA-Lib stream handle")
    ordered = tuple(sorted(params.items()))
    # TA-Lib refuses out-of-range parameters (TA_BAD_PARAM): ask it once, on one bar
    import talib
    one = {c: np.ones(1) for c in COLUMNS}
    try:
        getattr(talib, name)(*(one[c] for c in inputs), **dict(ordered))
    except Exception as e:
        reason = str(e).split(": ", 1)[-1] if "Bad Parameter" in str(e) else str(e)
        raise SpecError(f"{text!r}: TA-Lib refuses these parameters ({reason})") from None
    f.set_parameters(dict(ordered))
    norm = name if not ordered else name + "(" + ",".join(f"{k}={_fmt(v)}" for k, v in ordered) + ")"
    return Spec(name=name, params=ordered, text=norm, inputs=tuple(inputs),
                outputs=tuple(info["output_names"]), lookback=int(f.lookback),
                volume="volume" in inputs, path_dependent="Output is path-dependent" in flags)


def load_specs(texts: Sequence[str], file: str) -> list[Spec]:
    """Every spec of ``indicators.functions`` (read from ``file``), checked.
    Raises ConfigError naming the key and the file; also for two entries
    that normalise to the same indicator."""
    specs: list[Spec] = []
    seen: dict[str, str] = {}
    for t in texts:
        try:
            s = parse_spec(t)
        except SpecError as e:
            raise ConfigError(KEY, file, str(e)) from None
        if s.text in seen:
            raise ConfigError(KEY, file, f"{t!r} and {seen[s.text]!r} are the same indicator ({s.text})")
        seen[s.text] = t
        specs.append(s)
    if not specs:
        raise ConfigError(KEY, file, "no indicator configured")
    return specs


def _path_dependent() -> frozenset[str]:
    try:
        import talib
        from talib import abstract
        return frozenset(n for n in talib.get_functions()
                         if "Output is path-dependent" in (abstract.Function(n).function_flags or []))
    except Exception:                       # pragma: no cover - TA-Lib is a dependency
        return frozenset()


#: TA-Lib functions whose output depends on the whole series (flag "Output is path-dependent").
PATH_DEPENDENT: frozenset[str] = _path_dependent()


# ----------------------------------------------------------------------------- bars and values

@dataclass(frozen=True, slots=True)
class Bar:
    """One closed candle: ``start`` (aware UTC), prices and volume as floats
    (volume NaN: the candle has none), ``version`` (an increasing int: the
    candle row's recorded_at in microseconds; 0 for a venue without
    revisions)."""
    start: datetime
    open: float
    high: float
    low: float
    close: float
    volume: float
    version: int = 0


@dataclass(frozen=True, slots=True)
class Value:
    """One computed value: the bar's start, the indicator (normalised spec),
    the output name, the value."""
    bar_start: datetime
    indicator: str
    output: str
    value: float


def _us(t: datetime) -> int:
    return (t - _EPOCH) // _US


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def _dt(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def session_key(zone: ZoneInfo | None) -> Callable[[int], int]:
    """The VWAP session of a bar start (µs since the epoch): the ordinal of
    its calendar day in ``zone`` (None: UTC)."""
    if zone is None:
        return lambda us: us // 86_400_000_000

    def key(us: int) -> int:
        return _dt(us).astimezone(zone).date().toordinal()
    return key


@dataclass
class Counters:
    """What the engine did: values emitted, bars applied (new, revised or
    late), applications that reopened a series (revisions, late bars), values not written (non-finite),
    bars skipped by volume functions for lack of volume, stale rows
    (a version not newer than the one held), bars too old to apply."""
    values: int = 0
    bars: int = 0
    rebuilds: int = 0
    nonfinite: int = 0
    no_volume: int = 0
    stale: int = 0
    too_old: int = 0


class Series:
    """The closed bars of one series and its indicators' stream handles.

    Args:
        specs: the indicators.
        capacity: bars kept (the warm-up and revision window).
        session: ``session(bar_start_us) -> int`` (VWAP sessions).
        counters: shared :class:`Counters`.

    :meth:`warm` loads history; :meth:`apply` takes new or revised bars; both
    return the :class:`Value` objects to store.
    """

    def __init__(self, specs: Sequence[Spec], capacity: int, session: Callable[[int], int],
                 counters: Counters | None = None):
        self.specs = list(specs)
        self.capacity = max(1, capacity)
        self.session = session
        self.c = counters or Counters()
        self.t = array("q")
        self.ver = array("q")
        self.cols = {k: array("d") for k in COLUMNS}
        self.handles: dict[str, object | None] = {s.text: None for s in self.specs}
        # re-based functions (OBV): their output at each kept bar (NaN unknown)
        self.kept = {s.text: array("d") for s in self.specs if s.name in REBASED}
        self.vwap_volume = 0.0                # the current VWAP session's volume so far
        self._start: tuple[int, datetime | None] = (-1, None)     # the last bar start converted
        self._whole: int | None = None        # a VWAP session the kept bars cannot be cut into

    # ------------------------------------------------------------ state
    def __len__(self) -> int:
        return len(self.t)

    @property
    def last_start(self) -> datetime | None:
        return _dt(self.t[-1]) if self.t else None

    @property
    def first_start(self) -> datetime | None:
        return _dt(self.t[0]) if self.t else None

    def _trim(self) -> None:
        n = len(self.t) - 2 * self.capacity
        if n > 0:
            n = len(self.t) - self.capacity
            # never cut into the current VWAP session (its handle's history must stay whole)
            if any(s.name == VWAP for s in self.specs):
                cur = self.session(self.t[-1])
                if cur == self._whole:
                    return                      # the kept bars begin at this session's start already
                while n > 0 and self.session(self.t[n]) == cur and self.session(self.t[n - 1]) == cur:
                    n -= 1
                if n <= 0:
                    self._whole = cur
            if n <= 0:
                return
            for a in (self.t, self.ver, *self.cols.values(), *self.kept.values()):
                del a[:n]

    def _np(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        return {k: np.frombuffer(a, dtype=np.float64)[lo:hi].copy() for k, a in self.cols.items()}

    def _run_start(self, spec: Spec, end: int) -> int:
        """First bar of the history a handle of ``spec`` covering bar ``end``
        (index) is opened on: 0, after the last bar without volume (volume
        functions), at the session's first bar (VWAP)."""
        lo = 0
        if spec.volume:
            vol = self.cols["volume"]
            for i in range(end, -1, -1):
                if vol[i] != vol[i]:
                    lo = i + 1
                    break
        if spec.name == VWAP:
            s = self.session(self.t[end])
            i = end
            while i > lo and self.session(self.t[i - 1]) == s:
                i -= 1
            lo = max(lo, i)
        return lo

    # ------------------------------------------------------------ output
    def _emit(self, out: list[Value], spec: Spec, i: int, res) -> None:
        us = self.t[i]
        if self._start[0] != us:
            self._start = (us, _dt(us))
        start = self._start[1]
        vals = res if isinstance(res, tuple) else (res,)
        for name, v in zip(spec.outputs, vals):
            v = float(v)
            if v != v:
                continue                       # lookback: no value
            if not math.isfinite(v):
                self.c.nonfinite += 1
                continue
            out.append(Value(start, spec.text, name, v))
            self.c.values += 1
        if spec.name in REBASED:
            self.kept[spec.text][i] = float(vals[0])

    # ------------------------------------------------------------ opening
    def _fill(self, spec: Spec, lo: int, hi: int, emit_from: int, out: list[Value]) -> object | None:
        """Open a handle on bars [lo, hi) and emit its values for bars >= emit_from."""
        from talib import InsufficientHistory
        cols = self._np(lo, hi)
        if spec.name in REBASED and lo == 0:
            seed = self.kept[spec.text][0]
            if math.isfinite(seed):
                cols["volume"][0] = seed        # OBV's first value is its first volume: re-base it
        if hi - lo < spec.lookback + 1:
            if spec.name in REBASED:
                for i in range(lo, hi):
                    self.kept[spec.text][i] = math.nan
            return None
        try:
            handle, series = spec.stream_class().open_and_fill(*(cols[c] for c in spec.inputs), **spec.kwargs)
        except InsufficientHistory:
            return None
        series = series if isinstance(series, tuple) else (series,)
        if spec.name == VWAP:
            cum = np.cumsum(cols["volume"])
            self.vwap_volume = float(cum[-1])
            for i in range(max(lo, emit_from), hi):
                if cum[i - lo] > 0:
                    self._emit(out, spec, i, tuple(s[i - lo] for s in series))
                else:
                    self.c.no_volume += 1      # no volume in the session yet: no VWAP
            return handle
        for i in range(max(lo, emit_from), hi):
            self._emit(out, spec, i, tuple(s[i - lo] for s in series))
        if spec.name in REBASED:
            arr = self.kept[spec.text]
            for i in range(lo, min(hi, emit_from)):
                arr[i] = float(series[0][i - lo])
        return handle

    def _rebuild(self, spec: Spec, emit_from: int, out: list[Value]) -> None:
        """Reopen ``spec`` over the kept bars, emitting values from index
        ``emit_from``: one handle per run (runs split by bars without
        volume and, for VWAP, by sessions)."""
        n = len(self.t)
        handle = None
        if n == 0:
            self.handles[spec.text] = None
            return
        end = n - 1
        runs: list[tuple[int, int]] = []
        while end >= 0:
            if spec.volume and self.cols["volume"][end] != self.cols["volume"][end]:
                if end >= emit_from:
                    self.c.no_volume += 1
                end -= 1
                continue
            lo = self._run_start(spec, end)
            runs.append((lo, end + 1))
            if lo <= emit_from:
                break
            end = lo - 1
        for k, (lo, hi) in enumerate(reversed(runs)):
            h = self._fill(spec, lo, hi, emit_from, out)
            if k == len(runs) - 1:
                handle = h if hi == n else None
        self.handles[spec.text] = handle

    # ------------------------------------------------------------ public
    def warm(self, bars: Sequence[Bar], emit_from: dict[str, datetime] | None = None,
             seeds: dict[str, float] | None = None) -> list[Value]:
        """Load ``bars`` (closed, ascending by start) as the series' history
        and open every handle on them.  Returns the values of the bars that
        start at or after ``emit_from[spec.text]`` (a spec missing from the
        dict: none; the catch-up after a restart).  ``seeds``: the stored
        value of a re-based function (OBV) at the first bar."""
        self.t, self.ver = array("q"), array("q")
        self.cols = {k: array("d") for k in COLUMNS}
        self.kept = {s.text: array("d") for s in self.specs if s.name in REBASED}
        for b in bars:
            self._append_raw(b)
        for text, v in (seeds or {}).items():
            if text in self.kept and len(self.t) and v is not None and math.isfinite(v):
                self.kept[text][0] = float(v)
        out: list[Value] = []
        emit_from = emit_from or {}
        for s in self.specs:
            frm = emit_from.get(s.text)
            idx = len(self.t) if frm is None else self._index_from(_us(frm))
            self._rebuild(s, idx, out)
        return out

    def _index_from(self, us: int) -> int:
        import bisect
        return bisect.bisect_left(self.t, us)

    def _append_raw(self, b: Bar) -> None:
        self.t.append(_us(b.start))
        self.ver.append(b.version)
        c = self.cols
        c["open"].append(b.open)
        c["high"].append(b.high)
        c["low"].append(b.low)
        c["close"].append(b.close)
        c["volume"].append(b.volume)
        for a in self.kept.values():
            a.append(math.nan)

    def apply(self, bars: Iterable[Bar]) -> list[Value]:
        """Take closed bars (any order): a bar after the last one is appended
        and every handle updated (O(1) per indicator); a bar at or before it
        with a newer version (a revision), or a missing past bar (a late
        candle), replaces or inserts it and reopens the handles over the kept
        bars, emitting values from that bar on; an older or equal version is
        ignored (``stale``), and a bar before the kept window too
        (``too_old``).  Returns the values to store."""
        import bisect
        out: list[Value] = []
        changed: int | None = None
        appended_from: int | None = None
        for b in sorted(bars, key=lambda b: b.start):
            us = _us(b.start)
            self.c.bars += 1                    # less the stale and too old ones below
            if not self.t or us > self.t[-1]:
                if appended_from is None:
                    appended_from = len(self.t)
                self._append_raw(b)
                continue
            i = bisect.bisect_left(self.t, us)
            if i < len(self.t) and self.t[i] == us:
                if b.version <= self.ver[i]:
                    self.c.stale += 1
                    self.c.bars -= 1
                    continue
                self.ver[i] = b.version
                for k in COLUMNS:
                    self.cols[k][i] = getattr(b, k)
            elif i == 0:
                self.c.too_old += 1
                self.c.bars -= 1
                continue
            else:
                for a, v in ((self.t, us), (self.ver, b.version), *((self.cols[k], getattr(b, k)) for k in COLUMNS),
                             *((a, math.nan) for a in self.kept.values())):
                    a.insert(i, v)
                if appended_from is not None:
                    appended_from += 1
            changed = i if changed is None else min(changed, i)
        if changed is not None:
            self.c.rebuilds += 1
            for s in self.specs:
                self._rebuild(s, changed, out)
        elif appended_from is not None:
            for i in range(appended_from, len(self.t)):
                self._step(i, out)
        self._trim()
        return out

    def _step(self, i: int, out: list[Value]) -> None:
        vol = self.cols["volume"][i]
        cols = self.cols
        for s in self.specs:
            h = self.handles[s.text]
            if s.volume and vol != vol:
                self.c.no_volume += 1
                self.handles[s.text] = None
                if s.name in REBASED:
                    self.kept[s.text][i] = math.nan
                continue
            if s.name == VWAP and h is not None and i > 0 and self.session(self.t[i]) != self.session(self.t[i - 1]):
                h = None                        # a new session: VWAP starts again
            if h is None:
                lo = self._run_start(s, i)
                h = self._fill(s, lo, i + 1, i, out)
                self.handles[s.text] = h
                continue
            try:
                res = h.update(*(cols[c][i] for c in s.inputs))
            except Exception:                   # a non-finite bar: TA-Lib left the handle as it was
                self.c.nonfinite += 1
                continue
            if s.name == VWAP:
                self.vwap_volume += vol
                if not self.vwap_volume > 0:
                    self.c.no_volume += 1       # no volume in the session yet: no VWAP
                    continue
            self._emit(out, s, i, res)


def batch_reference(spec: Spec, cols: dict[str, np.ndarray], sessions: np.ndarray | None = None
                    ) -> tuple[np.ndarray, ...]:
    """What the engine must give for ``spec`` on whole columns, from TA-Lib's
    Function API: the batch function on the series; for VWAP, on each
    session (``sessions``: one key per bar; None: one session).  Used by the
    tests and the benchmark."""
    n = len(cols["close"])
    if spec.name != VWAP:
        return spec.batch(cols)
    if sessions is None:
        sessions = np.zeros(n)
    out = np.full(n, np.nan)
    i = 0
    while i < n:
        j = i
        while j < n and sessions[j] == sessions[i]:
            j += 1
        part = spec.batch({k: v[i:j] for k, v in cols.items()})[0]
        part[np.cumsum(cols["volume"][i:j]) <= 0] = np.nan     # no volume in the session yet
        out[i:j] = part
        i = j
    return (out,)
