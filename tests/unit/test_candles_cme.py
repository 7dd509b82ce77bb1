"""Candles from real CME Globex trades (E-mini S&P 500 ESU4, ../shared/data/cme) equal the venue's own
one-minute OHLCV bars, across midnight UTC, in any arrival order."""
from __future__ import annotations

import csv
import datetime as dt
import random
from decimal import Decimal

import pytest

from feeds.candles import MINUTE_NS, CandleBuilder, always, rollup

from conftest import shared_file

S = 1_000_000_000
MINUTES = ["2024-07-01 23:58:00+00:00", "2024-07-01 23:59:00+00:00", "2024-07-02 00:00:00+00:00",
           "2024-07-02 00:01:00+00:00"]


def ns(text: str) -> int:
    """``2024-07-01 23:58:01.218218853+00:00`` as epoch ns, exactly (no float on the way)."""
    assert text.endswith("+00:00"), text
    whole, _, frac = text[:-6].partition(".")
    t = dt.datetime.fromisoformat(whole).replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp()) * S + int((frac + "000000000")[:9])


@pytest.fixture(scope="module")
def trades() -> list[tuple]:
    with open(shared_file("cme", "esu4-trades-2024-07-01T2358.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 120
    return [("ESU4", ns(r["ts_event"]), Decimal(r["price"]), int(r["size"])) for r in rows]


@pytest.fixture(scope="module")
def venue_bars() -> dict[int, tuple]:
    with open(shared_file("cme", "esu4-ohlcv-1m-2024-07-01T2340.csv"), newline="") as f:
        rows = {r["bar_start"]: r for r in csv.DictReader(f)}
    return {ns(m): (Decimal(rows[m]["open"]), Decimal(rows[m]["high"]), Decimal(rows[m]["low"]),
                    Decimal(rows[m]["close"]), int(rows[m]["volume"])) for m in MINUTES}


def build(trades, order_seed: int | None = None):
    b = CandleBuilder(always(), (1, 5), grace_s=2.0, lateness_s=10.0)
    feed = list(trades)
    if order_seed is not None:
        random.Random(order_seed).shuffle(feed)
    for t in feed:
        assert b.trade(*t)
    return b.due(feed[-1][1] + 3600 * S)


def test_trades_give_exactly_the_venues_one_minute_bars_across_midnight(trades, venue_bars):
    out = build(trades)
    ones = [c for c in out if c.interval_min == 1]
    assert {c.start_ns: (c.open, c.high, c.low, c.close, c.volume) for c in ones} == venue_bars
    assert [c.end_ns - c.start_ns for c in ones] == [MINUTE_NS] * 4
    assert sum(c.ticks for c in ones) == 120 and all(c.final and c.source == "live" for c in ones)
    # midnight UTC is a window edge of always(): the 5-minute candles are cut there
    fives = [(c.start_ns, c.end_ns) for c in out if c.interval_min == 5]
    midnight = ns("2024-07-02 00:00:00+00:00")
    assert fives == [(midnight - 5 * MINUTE_NS, midnight), (midnight, midnight + 5 * MINUTE_NS)]
    assert [c for c in out if c.interval_min == 5] == rollup(ones, always(), 5)


@pytest.mark.parametrize("order_seed", [1, 2, 3])
def test_any_arrival_order_gives_the_same_bars(trades, venue_bars, order_seed):
    ones = [c for c in build(trades, order_seed) if c.interval_min == 1]
    assert {c.start_ns: (c.open, c.high, c.low, c.close, c.volume) for c in ones} == venue_bars
