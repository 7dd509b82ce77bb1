"""Which instruments to collect, their instrument_token, and the split over
ticker connections.

Instruments are named as ``EXCHANGE:TRADINGSYMBOL`` (``NSE:INFY``,
``NSE:NIFTY 50``, ``NFO:NIFTY24NOV24000CE``), each with a mode: ``full``,
``quote`` or ``ltp`` (Kite Connect v3 "WebSocket streaming", section
"Modes").  They come from a file (one per line, see :func:`parse_specs`), the
command line, or the ``kite_subscription`` table, and are resolved to
instrument_token through the instrument master (Kite Connect v3 "Market
quotes and instruments", section "Instrument list": ``GET /instruments/
{exchange}``).

Kite's limits (same document, "WebSocket streaming"): at most 3000
instruments on one WebSocket connection and 3 connections per API key.
:func:`plan_connections` splits a list over the fewest connections, evenly,
and refuses more than 9000 with :class:`TooManyInstruments`.  Kite's REST
limits used by feed-zerodha (historical candles, quotes) are here too.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .adapter import MODES

log = logging.getLogger(__name__)

MAX_INSTRUMENTS_PER_CONNECTION = 3000
MAX_CONNECTIONS_PER_API_KEY = 3

#: Historical candle requests per second per API key (Kite Connect v3 "Exceptions and errors",
#: section "API rate limit": historical candle data 3 requests/second; beyond it HTTP 429).
HISTORICAL_REQUESTS_PER_SECOND = 3
#: Quote requests (``/quote``, ``/quote/ohlc``, ``/quote/ltp``) per second per API key (same section).
QUOTE_REQUESTS_PER_SECOND = 1
#: Instruments in one ``GET /quote/ltp`` request (Kite Connect v3 "Market quotes and instruments").
LTP_MAX_INSTRUMENTS = 1000


class SpecError(ValueError):
    """An instrument line that is not ``EXCHANGE:TRADINGSYMBOL [mode]``.

    Attributes ``line`` (1-based, 0 for the command line) and ``text``."""

    def __init__(self, line: int, text: str, reason: str):
        self.line, self.text, self.reason = line, text, reason
        where = f"line {line}: " if line else ""
        super().__init__(f"{where}{reason}: {text!r}")


class TooManyInstruments(ValueError):
    """More instruments than the connections of one API key can carry."""


@dataclass(frozen=True, slots=True)
class InstrumentSpec:
    """One configured instrument: exchange (upper case), tradingsymbol (as in
    the instrument master) and mode (``full``/``quote``/``ltp``)."""
    exchange: str
    tradingsymbol: str
    mode: str

    @property
    def key(self) -> str:
        return f"{self.exchange}:{self.tradingsymbol}"


@dataclass(frozen=True, slots=True)
class Subscription:
    """A resolved instrument: ``instrument_token`` with its mode and name."""
    instrument_token: int
    mode: str
    exchange: str
    tradingsymbol: str

    @property
    def key(self) -> str:
        return f"{self.exchange}:{self.tradingsymbol}"


_EXCHANGE = re.compile(r"[A-Z][A-Z0-9_]{1,9}")
_MODE_SUFFIX = re.compile(r"^(.*?)(?:\s*=\s*|\s+)(full|quote|ltp)$", re.IGNORECASE)


def parse_spec(text: str, default_mode: str, line: int = 0) -> InstrumentSpec:
    """Parse ``EXCHANGE:TRADINGSYMBOL``, optionally followed by a mode after
    whitespace or ``=`` (``NSE:INFY full``, ``NSE:NIFTY 50=ltp``).

    The exchange is upper-cased; the symbol keeps its spelling (inner spaces
    included).  Raises :class:`SpecError`.
    """
    raw = text.strip()
    mode = default_mode
    m = _MODE_SUFFIX.match(raw)
    if m and ":" in m.group(1):
        raw, mode = m.group(1).strip(), m.group(2).lower()
    exch, sep, sym = raw.partition(":")
    exch, sym = exch.strip().upper(), sym.strip()
    if not sep or not sym:
        raise SpecError(line, text, "expected EXCHANGE:TRADINGSYMBOL")
    if not _EXCHANGE.fullmatch(exch):
        raise SpecError(line, text, f"not an exchange name: {exch!r}")
    if mode not in MODES:
        raise SpecError(line, text, f"mode must be one of {', '.join(MODES)}")
    return InstrumentSpec(exch, sym, mode)


def parse_specs(lines: Iterable[str], default_mode: str) -> list[InstrumentSpec]:
    """Parse an instrument list: one spec per line, ``#`` starts a comment,
    blank lines ignored.  A repeated instrument keeps its last mode.
    Raises :class:`SpecError` naming the line."""
    out: dict[str, InstrumentSpec] = {}
    for i, line in enumerate(lines, 1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        spec = parse_spec(body, default_mode, i)
        out[spec.key] = spec
    return list(out.values())


def read_spec_file(path: str | Path, default_mode: str) -> list[InstrumentSpec]:
    """Instruments listed in a file (see :func:`parse_specs`).  Raises
    OSError when unreadable and :class:`SpecError` for a bad line."""
    with open(path, encoding="utf-8") as f:
        return parse_specs(f, default_mode)


def merge_specs(*groups: Iterable[InstrumentSpec]) -> list[InstrumentSpec]:
    """Union of spec lists in order; a later mode for the same instrument wins."""
    out: dict[str, InstrumentSpec] = {}
    for g in groups:
        for s in g:
            out[s.key] = s
    return list(out.values())


def read_spec_table(dsn: str, default_mode: str) -> list[InstrumentSpec]:
    """Enabled rows of ``kite_subscription`` (exchange, tradingsymbol, mode).
    Raises psycopg errors when the database cannot be read."""
    from ..db import connect
    with connect(dsn, application_name="feed-zerodha") as conn:
        rows = conn.execute("SELECT exchange, tradingsymbol, coalesce(mode, %s) FROM kite_subscription "
                            "WHERE enabled ORDER BY exchange, tradingsymbol", (default_mode,)).fetchall()
    return [InstrumentSpec(e.upper(), s, m) for e, s, m in rows]


def resolve(specs: list[InstrumentSpec], master: Iterable[dict]) -> tuple[list[Subscription], list[InstrumentSpec]]:
    """Map specs to instrument_tokens through instrument master rows (dicts
    with ``exchange``, ``tradingsymbol``, ``instrument_token`` as
    ``KiteConnect.instruments()`` returns them).  Returns ``(resolved,
    unknown)``, resolved in the order of ``specs``."""
    wanted = {s.key: s for s in specs}
    found: dict[str, int] = {}
    for row in master:
        key = f"{row['exchange']}:{row['tradingsymbol']}"
        if key in wanted and key not in found:
            found[key] = int(row["instrument_token"])
    resolved, unknown = [], []
    for s in specs:
        tok = found.get(s.key)
        if tok is None:
            unknown.append(s)
        else:
            resolved.append(Subscription(tok, s.mode, s.exchange, s.tradingsymbol))
    return resolved, unknown


def plan_connections(subs: list[Subscription], per_connection: int = MAX_INSTRUMENTS_PER_CONNECTION,
                     max_connections: int = MAX_CONNECTIONS_PER_API_KEY) -> list[list[Subscription]]:
    """Split subscriptions over the fewest connections of at most
    ``per_connection`` instruments, sizes differing by at most one.

    A token listed twice is subscribed once (the last mode wins).  Raises
    :class:`TooManyInstruments` (message for the operator) beyond
    ``per_connection * max_connections``, and ValueError for an empty list
    or limits outside Kite's (1..3000, 1..3).
    """
    if not 1 <= per_connection <= MAX_INSTRUMENTS_PER_CONNECTION:
        raise ValueError(f"per_connection must be 1..{MAX_INSTRUMENTS_PER_CONNECTION}")
    if not 1 <= max_connections <= MAX_CONNECTIONS_PER_API_KEY:
        raise ValueError(f"max_connections must be 1..{MAX_CONNECTIONS_PER_API_KEY}")
    unique = list({s.instrument_token: s for s in subs}.values())
    n = len(unique)
    if n == 0:
        raise ValueError("no instruments to collect")
    cap = per_connection * max_connections
    if n > cap:
        raise TooManyInstruments(
            f"{n} instruments requested, but one API key carries at most {cap} "
            f"({max_connections} connections x {per_connection} instruments, Kite's limits); "
            f"remove {n - cap} or run a second collector with another API key")
    k = -(-n // per_connection)
    size, extra = divmod(n, k)
    out, i = [], 0
    for c in range(k):
        j = i + size + (1 if c < extra else 0)
        out.append(unique[i:j])
        i = j
    return out
