"""Instrument lists, resolution to instrument_token, the split over connections."""
from __future__ import annotations

import pytest

from feeds.kite.instruments import (InstrumentSpec, SpecError, Subscription, TooManyInstruments, merge_specs,
                                    parse_spec, parse_specs, plan_connections, read_spec_file, resolve)


def test_spec_forms():
    assert parse_spec("NSE:INFY", "full") == InstrumentSpec("NSE", "INFY", "full")
    assert parse_spec(" nse:INFY  quote ", "full") == InstrumentSpec("NSE", "INFY", "quote")
    assert parse_spec("NSE:INFY=LTP", "full") == InstrumentSpec("NSE", "INFY", "ltp")
    assert parse_spec("NSE:NIFTY 50", "quote") == InstrumentSpec("NSE", "NIFTY 50", "quote")
    assert parse_spec("NSE:NIFTY 50 full", "quote") == InstrumentSpec("NSE", "NIFTY 50", "full")
    assert parse_spec("NFO:NIFTY24NOV24000CE = quote", "full").tradingsymbol == "NIFTY24NOV24000CE"
    assert parse_spec("NSE:M&M", "ltp") == InstrumentSpec("NSE", "M&M", "ltp")


@pytest.mark.parametrize("text, reason", [
    ("INFY", "expected EXCHANGE:TRADINGSYMBOL"),
    ("NSE:", "expected EXCHANGE:TRADINGSYMBOL"),
    ("N S E:INFY", "not an exchange name"),
    ("NSE:INFY fast", None),            # "fast" is no mode: it stays part of the symbol
])
def test_bad_specs(text, reason):
    if reason is None:
        assert parse_spec(text, "full").tradingsymbol == "INFY fast"
        return
    with pytest.raises(SpecError, match=reason):
        parse_spec(text, "full")


def test_default_mode_must_be_a_mode():
    with pytest.raises(SpecError, match="mode must be one of"):
        parse_spec("NSE:INFY", "depth")


def test_file_with_comments_blank_lines_and_repeats(tmp_path):
    p = tmp_path / "i.txt"
    p.write_text("# list\n\nNSE:INFY full  # Infosys\nNSE:NIFTY 50 quote\nNSE:INFY ltp\n")
    specs = read_spec_file(p, "full")
    assert specs == [InstrumentSpec("NSE", "INFY", "ltp"), InstrumentSpec("NSE", "NIFTY 50", "quote")]


def test_bad_line_is_named():
    with pytest.raises(SpecError) as e:
        parse_specs(["NSE:INFY", "", "INFY"], "full")
    assert e.value.line == 3 and "line 3" in str(e.value)


def test_merge_later_mode_wins():
    a = [InstrumentSpec("NSE", "INFY", "full"), InstrumentSpec("NSE", "TCS", "full")]
    b = [InstrumentSpec("NSE", "INFY", "ltp")]
    assert merge_specs(a, b) == [InstrumentSpec("NSE", "INFY", "ltp"), InstrumentSpec("NSE", "TCS", "full")]


def test_resolve_through_the_instrument_master():
    master = [{"exchange": "NSE", "tradingsymbol": "INFY", "instrument_token": 408065},
              {"exchange": "BSE", "tradingsymbol": "INFY", "instrument_token": 128053508},
              {"exchange": "NSE", "tradingsymbol": "NIFTY 50", "instrument_token": 256265}]
    specs = [InstrumentSpec("BSE", "INFY", "quote"), InstrumentSpec("NSE", "NIFTY 50", "full"),
             InstrumentSpec("NSE", "NOPE", "full")]
    subs, unknown = resolve(specs, master)
    assert subs == [Subscription(128053508, "quote", "BSE", "INFY"), Subscription(256265, "full", "NSE", "NIFTY 50")]
    assert unknown == [InstrumentSpec("NSE", "NOPE", "full")]


def _subs(n, mode="full"):
    return [Subscription((100_000 + i) << 8 | 1, mode, "NSE", f"SIMEQ{i:05d}") for i in range(n)]


@pytest.mark.parametrize("n, sizes", [(1, [1]), (3000, [3000]), (3001, [1501, 1500]), (7000, [2334, 2333, 2333]),
                                      (9000, [3000, 3000, 3000])])
def test_split_over_the_fewest_connections_evenly(n, sizes):
    plan = plan_connections(_subs(n))
    assert [len(c) for c in plan] == sizes
    tokens = [s.instrument_token for c in plan for s in c]
    assert len(tokens) == len(set(tokens)) == n


def test_more_than_9000_refused_with_the_message():
    with pytest.raises(TooManyInstruments) as e:
        plan_connections(_subs(10_000))
    assert str(e.value).startswith("10000 instruments requested, but one API key carries at most 9000 "
                                   "(3 connections x 3000 instruments, Kite's limits); remove 1000")


def test_lower_limits_and_duplicate_tokens():
    subs = _subs(10) + [Subscription((100_000) << 8 | 1, "ltp", "NSE", "SIMEQ00000")]
    plan = plan_connections(subs, per_connection=4, max_connections=3)
    assert [len(c) for c in plan] == [4, 3, 3]
    assert [s.mode for c in plan for s in c if s.instrument_token == 100_000 << 8 | 1] == ["ltp"]
    with pytest.raises(TooManyInstruments):
        plan_connections(_subs(10), per_connection=3, max_connections=3)
    with pytest.raises(ValueError):
        plan_connections(_subs(1), per_connection=3001)
    with pytest.raises(ValueError):
        plan_connections(_subs(1), max_connections=4)
    with pytest.raises(ValueError, match="no instruments"):
        plan_connections([])
