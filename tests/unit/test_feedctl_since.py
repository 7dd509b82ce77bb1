"""feedctl's ``--since``: a date, a time or a span back from the time judged (``--now``)."""
from __future__ import annotations

import datetime as dt

import click
import pytest

from feeds.cli import _since

UTC = dt.timezone.utc
NOON = dt.datetime(2026, 3, 4, 12, 0, tzinfo=UTC)


def test_a_span_counts_back_from_the_time_judged():
    assert _since("1d", NOON) == dt.datetime(2026, 3, 3, 12, 0, tzinfo=UTC)
    assert _since("12h", NOON) == dt.datetime(2026, 3, 4, 0, 0, tzinfo=UTC)
    now = dt.datetime.now(UTC)
    assert now - dt.timedelta(days=7) <= _since("7d") <= dt.datetime.now(UTC) - dt.timedelta(days=7)


def test_dates_and_times_are_utc_unless_an_offset_is_given():
    assert _since("2026-03-01", NOON) == dt.datetime(2026, 3, 1, tzinfo=UTC)
    assert _since("2026-03-01T05:30", NOON) == dt.datetime(2026, 3, 1, 5, 30, tzinfo=UTC)
    assert _since("2026-03-01T05:30+05:30", NOON) == dt.datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
    assert _since("", NOON) is None and _since(None, NOON) is None
    with pytest.raises(click.BadParameter, match="--since|7d"):
        _since("yesterday", NOON)
