"""Dhan instruments: the instruments file and the resolution of a symbol to
Dhan's exchange segment and security id through Dhan's instrument list.

Instruments file (``dhan.instruments_file``), one instrument a line::

    # SEGMENT:SYMBOL [mode] [priority]
    NSE_EQ:HDFCBANK full priority
    NSE_EQ:RELIANCE quote 2
    IDX_I:NIFTY 50 ticker          (a symbol may contain spaces: the words up to a mode or priority)
    NSE_EQ:1333                    (a security id instead of a symbol)

``mode``: ticker, quote or full (default ``dhan.default_mode``);
``priority``: the word ``priority`` (= 1), ``priority=N``, or an integer N
after the mode (default 0; higher first).  Blank lines and ``#`` comments are skipped.
A malformed line stops the program (exit 78) with the file, the line and
the field named: :class:`InstrumentsError`.

Instrument list (Dhan's "Instrument List" document, the compact CSV
``api-scrip-master.csv``): columns ``SEM_EXM_EXCH_ID`` (NSE, BSE, MCX),
``SEM_SEGMENT`` (E equity, D derivatives, C currency, M commodity, I
index), ``SEM_SMST_SECURITY_ID``, ``SEM_INSTRUMENT_NAME`` (EQUITY, INDEX,
FUTIDX, OPTSTK, ...), ``SEM_TRADING_SYMBOL``, ``SEM_LOT_UNITS``,
``SEM_TICK_SIZE`` (paise when >= 1, as Dhan lists equities at 5.0 = 0.05
rupee), ``SEM_SERIES``.  The exchange segment of the APIs
("Annexure"): NSE+E NSE_EQ, NSE+D NSE_FNO, NSE+C NSE_CURRENCY, BSE+E
BSE_EQ, BSE+D BSE_FNO, BSE+C BSE_CURRENCY, MCX+M MCX_COMM, any +I IDX_I.
Where a symbol has several rows (NSE series EQ, BE, ...), series EQ wins.
The list is kept in ``dhan.instrument_list_cache`` and fetched again when
older than a day (:func:`refresh_cache`); without network the cached copy
is used, however old.  Rows it cannot read are counted and skipped.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["InstrumentLine", "InstrumentsError", "Instrument", "InstrumentList", "parse_instruments",
           "load_instruments", "refresh_cache", "SEGMENTS", "MODES"]

MODES = ("ticker", "quote", "full")
SEGMENTS = ("IDX_I", "NSE_EQ", "NSE_FNO", "NSE_CURRENCY", "BSE_EQ", "MCX_COMM", "BSE_CURRENCY", "BSE_FNO")
_SEGMENT_OF = {("NSE", "E"): "NSE_EQ", ("NSE", "D"): "NSE_FNO", ("NSE", "C"): "NSE_CURRENCY",
               ("BSE", "E"): "BSE_EQ", ("BSE", "D"): "BSE_FNO", ("BSE", "C"): "BSE_CURRENCY",
               ("MCX", "M"): "MCX_COMM"}
CACHE_MAX_AGE = 86400.0


class InstrumentsError(ValueError):
    """A malformed instruments file line, or an instrument Dhan's list lacks."""


@dataclass(frozen=True)
class InstrumentLine:
    """One line of the instruments file: ``segment`` (e.g. NSE_EQ),
    ``symbol`` (or a security id in digits), ``mode``, ``priority``, ``line``."""

    segment: str
    symbol: str
    mode: str
    priority: int
    line: int

    @property
    def key(self) -> str:
        """``SEGMENT:SYMBOL``, the key of the status table."""
        return f"{self.segment}:{self.symbol}"


def parse_instruments(text: str, default_mode: str = "full", source: str = "instruments file") -> list[InstrumentLine]:
    """The lines of an instruments file (see the module docstring).  Raises
    :class:`InstrumentsError` naming ``source``, the line and the field."""
    out: list[InstrumentLine] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        head, sep, rest = line.partition(":")
        seg = head.strip().upper()
        if not sep or seg not in SEGMENTS:
            raise InstrumentsError(f"{source} line {n} field 'segment': {head.strip()!r} is not one of "
                                   f"{', '.join(SEGMENTS)} (expected SEGMENT:SYMBOL [mode] [priority])")
        words = rest.split()
        mode, prio, sym_words, tail = default_mode, 0, [], False
        for w in words:
            lw = w.lower()
            if lw in MODES and sym_words:
                mode, tail = lw, True
            elif lw == "priority" and sym_words:
                prio, tail = max(prio, 1), True
            elif lw.startswith("priority=") and sym_words:
                try:
                    prio = int(lw.split("=", 1)[1])
                except ValueError:
                    raise InstrumentsError(f"{source} line {n} field 'priority': {w!r} is not priority=N") from None
                tail = True
            elif tail and w.isdigit():
                prio = int(w)
            elif tail:
                raise InstrumentsError(f"{source} line {n}: {w!r} after the mode/priority")
            else:
                sym_words.append(w)
        symbol = " ".join(sym_words).upper()
        if not symbol:
            raise InstrumentsError(f"{source} line {n} field 'symbol': empty")
        if prio < 0:
            raise InstrumentsError(f"{source} line {n} field 'priority': must be >= 0")
        key = f"{seg}:{symbol}"
        if key in seen:
            raise InstrumentsError(f"{source} line {n}: {key} already on line {seen[key]}")
        seen[key] = n
        out.append(InstrumentLine(seg, symbol, mode, prio, n))
    return out


def load_instruments(path: str, default_mode: str = "full") -> list[InstrumentLine]:
    """:func:`parse_instruments` of the file ``path``.  Raises :class:`InstrumentsError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InstrumentsError(f"instruments file {path}: {e.strerror or e}") from None
    return parse_instruments(text, default_mode, f"instruments file {path}")


@dataclass(frozen=True)
class Instrument:
    """A resolved instrument: ``segment``, ``security_id``, ``symbol``,
    ``instrument`` (the charts API's instrument type, e.g. EQUITY),
    ``tick`` (rupees), ``lot``, and from the file ``priority``, ``mode``,
    ``key`` (``SEGMENT:SYMBOL``)."""

    segment: str
    security_id: int
    symbol: str
    instrument: str
    tick: Decimal = Decimal("0.05")
    lot: Decimal = Decimal(1)
    priority: int = 0
    mode: str = "full"
    key: str = ""


def _dec(text: str, default: Decimal) -> Decimal:
    try:
        d = Decimal(text.strip())
    except (InvalidOperation, AttributeError):
        return default
    return d if d.is_finite() and d > 0 else default


class InstrumentList:
    """Dhan's instrument list, indexed by ``(segment, symbol)`` and ``(segment,
    security id)``.  ``malformed``: rows skipped."""

    def __init__(self, text: str):
        self.by_symbol: dict[tuple[str, str], tuple[Instrument, str]] = {}
        self.by_id: dict[tuple[str, int], Instrument] = {}
        self.malformed = 0
        for row in csv.DictReader(io.StringIO(text)):
            try:
                exch = (row.get("SEM_EXM_EXCH_ID") or "").strip().upper()
                segc = (row.get("SEM_SEGMENT") or "").strip().upper()
                seg = "IDX_I" if segc == "I" else _SEGMENT_OF.get((exch, segc))
                sid = int((row.get("SEM_SMST_SECURITY_ID") or "").strip())
                sym = (row.get("SEM_TRADING_SYMBOL") or "").strip().upper()
                kind = (row.get("SEM_INSTRUMENT_NAME") or "").strip().upper() or ("INDEX" if seg == "IDX_I" else "EQUITY")
            except (ValueError, AttributeError):
                self.malformed += 1
                continue
            if seg is None or not sym:
                self.malformed += 1 if not sym else 0
                continue
            tick = _dec(row.get("SEM_TICK_SIZE") or "", Decimal("0.05"))
            if tick >= 1:
                tick = tick / 100   # listed in paise
            inst = Instrument(seg, sid, sym, kind, tick, _dec(row.get("SEM_LOT_UNITS") or "", Decimal(1)))
            series = (row.get("SEM_SERIES") or "").strip().upper()
            old = self.by_symbol.get((seg, sym))
            if old is None or (series == "EQ" and old[1] != "EQ"):
                self.by_symbol[(seg, sym)] = (inst, series)
            self.by_id[(seg, sid)] = inst

    def resolve(self, line: InstrumentLine) -> Instrument:
        """The instrument of a file line (by symbol, or by security id when
        the symbol is all digits).  Raises :class:`InstrumentsError`."""
        got = None
        if line.symbol.isdigit():
            got = self.by_id.get((line.segment, int(line.symbol)))
        if got is None:
            hit = self.by_symbol.get((line.segment, line.symbol))
            got = hit[0] if hit else None
        if got is None:
            raise InstrumentsError(f"instruments file line {line.line}: {line.key} is not in Dhan's instrument list")
        return Instrument(got.segment, got.security_id, got.symbol, got.instrument, got.tick, got.lot,
                          line.priority, line.mode, line.key)


async def refresh_cache(url: str, path: str, *, max_age: float = CACHE_MAX_AGE, timeout: float = 60.0) -> str:
    """The instrument list's text: the cache file ``path`` when younger than
    ``max_age`` seconds, else fetched from ``url`` (GET, no credentials) and
    written to ``path`` (atomically).  When the fetch fails an older cache
    is used (logged); with no cache at all raises :class:`InstrumentsError`."""
    import aiohttp

    p = Path(path)
    try:
        age = time.time() - p.stat().st_mtime
    except OSError:
        age = None
    if age is not None and age < max_age:
        return p.read_text(encoding="utf-8")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url) as r:
                if r.status != 200:
                    raise InstrumentsError(f"HTTP {r.status}")
                text = await r.text()
    except (aiohttp.ClientError, TimeoutError, InstrumentsError) as e:
        if age is not None:
            log.warning("instrument list not fetched from %s (%s): using the cached copy %s (%.1f days old)",
                        url, e, path, age / 86400)
            return p.read_text(encoding="utf-8")
        raise InstrumentsError(f"instrument list not fetched from {url} ({e}) and no cached copy at {path}") from None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    except OSError as e:
        log.warning("instrument list not cached at %s: %s", path, e)
    return text


def instrument_list(url: str, path: str) -> InstrumentList:
    """Dhan's instrument list (:func:`refresh_cache`: the cache ``path``
    or a fresh copy from ``url``), parsed; rows not understood are skipped
    and counted in one warning.  Raises :class:`InstrumentsError` when no
    copy can be had.  Not for a running event loop (it runs its own)."""
    import asyncio

    master = InstrumentList(asyncio.run(refresh_cache(url, path)))
    if master.malformed:
        log.warning("Dhan's instrument list: %d row(s) not understood, skipped", master.malformed)
    return master
