"""The instruments of feed-dhan split over Dhan's feed connections.  Pure, no I/O.

Venue document: DhanHQ v2 "Live Market Feed": a user may open up to
:data:`~feeds.dhan.limits.MAX_CONNECTIONS_PER_USER` (5) WebSocket
connections, each subscribing up to
:data:`~feeds.dhan.limits.MAX_INSTRUMENTS_PER_CONNECTION` (5,000)
instruments, in subscribe messages of at most
:data:`~feeds.dhan.limits.MAX_INSTRUMENTS_PER_MESSAGE` (100) instruments
each.  The settings ``dhan.max_connections`` and
``dhan.max_instruments_per_connection`` may lower the first two, never
raise them.

:func:`plan_connections` uses as few connections as the instruments need
(``ceil(n / per_connection)``) and spreads the instruments over them
evenly, dealt out one by one in priority order (highest first, then the
order given): the priority instruments are shared by every connection, so
that losing one connection (Dhan drops the oldest when a sixth one opens,
code 805) never takes all of them.  More instruments than
``max_connections * per_connection`` raise :class:`TooManyInstruments`,
whose text is the one line the program prints before exit 78.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from . import limits
from . import wire

__all__ = ["Subscription", "TooManyInstruments", "capacity", "too_many_message", "plan_connections",
           "subscribe_messages", "MODES"]

#: feed modes, in the order of their size on the wire
MODES = ("ticker", "quote", "full")


@dataclass(frozen=True)
class Subscription:
    """One instrument to collect.

    ``segment``: the Annexure exchange segment code (NSE_EQ = 1, IDX_I = 0,
    ...); ``security_id``: Dhan's security id; ``mode``: ``ticker``,
    ``quote`` or ``full``; ``priority``: higher first (0 = none); ``key``:
    how the operator named it (``NSE_EQ:HDFCBANK``); ``tick``: the
    instrument's tick in rupees, when known; ``instrument``: the charts
    API's instrument type (``EQUITY``, ``INDEX``, ...; empty: unknown)."""

    segment: int
    security_id: int
    mode: str = "full"
    priority: int = 0
    key: str = ""
    tick: Decimal | None = None
    instrument: str = ""

    @property
    def segment_name(self) -> str:
        """The segment's name in Dhan's requests (``NSE_EQ``)."""
        return wire.SEGMENT_NAMES[self.segment]

    @property
    def ident(self) -> tuple[int, int]:
        """``(segment, security_id)``: what identifies the instrument on the feed."""
        return self.segment, self.security_id

    @property
    def volumeless(self) -> bool:
        """True when its packets carry no volume: ticker mode, or an index (IDX_I)."""
        return self.mode == "ticker" or self.segment == wire.ExchangeSegment.IDX_I


class TooManyInstruments(ValueError):
    """More instruments than the connections carry (the message is the refusal line)."""


def capacity(max_connections: int = limits.MAX_CONNECTIONS_PER_USER,
             per_connection: int = limits.MAX_INSTRUMENTS_PER_CONNECTION) -> int:
    """Instruments ``max_connections`` connections of ``per_connection`` carry."""
    return max_connections * per_connection


def too_many_message(n: int, max_connections: int, per_connection: int) -> str:
    """The refusal for ``n`` instruments beyond the capacity, naming the settings."""
    cap = capacity(max_connections, per_connection)
    return (f"{n} instruments requested, but feed-dhan carries at most {cap} "
            f"(dhan.max_connections = {max_connections} x dhan.max_instruments_per_connection = "
            f"{per_connection}; Dhan allows {limits.MAX_CONNECTIONS_PER_USER} connections of "
            f"{limits.MAX_INSTRUMENTS_PER_CONNECTION} per user): remove {n - cap}")


def _check_limits(per_connection: int, max_connections: int) -> None:
    if not 1 <= per_connection <= limits.MAX_INSTRUMENTS_PER_CONNECTION:
        raise ValueError(f"per_connection must be 1..{limits.MAX_INSTRUMENTS_PER_CONNECTION}, not {per_connection}")
    if not 1 <= max_connections <= limits.MAX_CONNECTIONS_PER_USER:
        raise ValueError(f"max_connections must be 1..{limits.MAX_CONNECTIONS_PER_USER}, not {max_connections}")


def plan_connections(subs: Iterable[Subscription],
                     per_connection: int = limits.MAX_INSTRUMENTS_PER_CONNECTION,
                     max_connections: int = limits.MAX_CONNECTIONS_PER_USER) -> list[list[Subscription]]:
    """Split ``subs`` over connections: a list of connections, each a list of
    subscriptions (the priority order kept within each).

    An instrument listed twice (same segment and security id) is kept once,
    with its first mode and its highest priority.  Returns [] for no
    instruments.  Raises :class:`TooManyInstruments` for more than
    ``max_connections * per_connection`` instruments, ValueError for limits
    beyond Dhan's."""
    _check_limits(per_connection, max_connections)
    seen: dict[tuple[int, int], Subscription] = {}
    for s in subs:
        old = seen.get(s.ident)
        if old is None:
            seen[s.ident] = s
        elif s.priority > old.priority:
            seen[s.ident] = Subscription(old.segment, old.security_id, old.mode, s.priority, old.key, old.tick,
                                         old.instrument)
    unique = list(seen.values())
    n = len(unique)
    if n > capacity(max_connections, per_connection):
        raise TooManyInstruments(too_many_message(n, max_connections, per_connection))
    if not n:
        return []
    ordered = sorted(unique, key=lambda s: -s.priority)        # stable: the given order within a priority
    k = math.ceil(n / per_connection)
    return [ordered[i::k] for i in range(k)]


def subscribe_messages(conn: Sequence[Subscription],
                       per_message: int = limits.MAX_INSTRUMENTS_PER_MESSAGE) -> list[str]:
    """The JSON subscribe messages of one connection: per mode (ticker, quote,
    full) RequestCode 15, 17 or 21 with at most ``per_message`` (100)
    instruments each (:func:`feeds.dhan.wire.subscribe_messages`)."""
    out: list[str] = []
    for mode in MODES:
        pairs = [(s.segment, s.security_id) for s in conn if s.mode == mode]
        if pairs:
            out += wire.subscribe_messages(mode, pairs, per_message)
    return out
