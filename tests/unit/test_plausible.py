"""Shared range checks: decimals, 64-bit ids, the time window and the id-jump rule."""
from __future__ import annotations

import pytest

from feeds import plausible as P
from feeds.plausible import ACCEPT, DUPLICATE, HELD, Malformed, SequenceGuard, Window


@pytest.mark.parametrize("text, sign", [
    ("7.6110", P.POSITIVE), ("0.00000001", P.POSITIVE), ("12", P.POSITIVE), ("1e-5", P.POSITIVE),
    ("0", P.NON_NEGATIVE), ("0.000", P.NON_NEGATIVE), ("1" * 32, P.NON_NEGATIVE),
    ("-0.00012000", P.SIGNED), ("-120.50", P.SIGNED), ("2.5E+3", P.SIGNED),
])
def test_decimal_accepts_venue_numbers(text, sign):
    assert P.decimal(text, "x", sign) is text


@pytest.mark.parametrize("value, sign, words", [
    ("-1.5", P.POSITIVE, "negative"),
    ("-0", P.NON_NEGATIVE, "negative"),
    ("0", P.POSITIVE, "not positive"),
    ("0e5", P.POSITIVE, "not positive"),
    (".0", P.POSITIVE, "not positive"),
    ("1e400", P.SIGNED, "exponent"),
    ("1e-21", P.SIGNED, "exponent"),
    ("9" * 100, P.SIGNED, "ASCII decimal"),
    ("1" * 33, P.SIGNED, "digits"),
    ("\u0667.\u0666", P.SIGNED, "ASCII"),          # Arabic-Indic digits: str.isdigit() says yes
    ("\uff17", P.SIGNED, "ASCII"),                 # a full-width 7
    ("", P.SIGNED, "no digits"),
    (".", P.SIGNED, "no digits"),
    ("1.2.3", P.SIGNED, "ASCII decimal"),
    ("nan", P.SIGNED, "ASCII decimal"),
    ("inf", P.SIGNED, "ASCII decimal"),
    (" 1", P.SIGNED, "ASCII decimal"),
    ("+1", P.SIGNED, "ASCII decimal"),
    (1.5, P.SIGNED, "not a decimal string"),
    (None, P.SIGNED, "not a decimal string"),
])
def test_decimal_rejects_with_a_reason(value, sign, words):
    with pytest.raises(Malformed, match=words):
        P.decimal(value, "price", sign)


def test_integers_stay_in_bigint():
    assert P.id64(0) == 0 and P.id64(P.INT64_MAX) == P.INT64_MAX
    assert P.int64(P.INT64_MIN) == P.INT64_MIN
    for bad in (2 ** 63, -1, True, 1.0, "5"):
        with pytest.raises(Malformed):
            P.id64(bad)
    for bad in (2 ** 63, -(2 ** 63) - 1, "5"):
        with pytest.raises(Malformed):
            P.int64(bad)


def test_symbol():
    assert P.symbol("BTCUSDT") == "BTCUSDT" and P.symbol("BTCUSDT_240329") and P.symbol("\u5e01\u5b89USDT")
    for bad in ("", "BTC USDT", "btcusdt@aggTrade", "A/B", "X" * 41, ["BTCUSDT"], None, "A\x00"):
        with pytest.raises(Malformed):
            P.symbol(bad)


def test_window_bounds_and_injected_clock():
    now = [1_700_000_000_000]
    w = Window(P.BINANCE_FUTURES_START_MS, ahead_ms=600_000, clock=lambda: now[0])
    assert w.ms(now[0]) == now[0] and w.ms(now[0] + 600_000) and w.ms(P.BINANCE_FUTURES_START_MS)
    with pytest.raises(Malformed, match="ahead of now"):
        w.ms(now[0] + 600_001)
    with pytest.raises(Malformed, match="before"):
        w.ms(P.BINANCE_FUTURES_START_MS - 1)
    with pytest.raises(Malformed, match="before"):
        w.ms(0)
    with pytest.raises(Malformed, match="integer"):
        w.ms("1700000000000")
    # the cached upper bound follows the clock: a value once too far ahead is fine later
    now[0] += 3600_000
    assert w.ms(now[0] + 1000)
    # an optional bound into the past
    w2 = Window(P.BINANCE_FUTURES_START_MS, behind_ms=60_000, clock=lambda: now[0])
    with pytest.raises(Malformed):
        w2.ms(now[0] - 61_000)


def test_window_default_clock_is_the_wall_clock():
    import time
    w = Window(P.BINANCE_FUTURES_START_MS)
    assert w.ok(time.time_ns() // 1_000_000)
    assert not w.ok(10 ** 15)


# ---------------------------------------------------------------- SequenceGuard

def feed(g: SequenceGuard, key, ids, now=0.0):
    """Push ids through the guard as a collector does; returns (stored, duplicates, rejected)."""
    stored, dups, rejected = [], [], []
    for x in ids:
        c = g.classify(key, x)
        if c == ACCEPT:
            if key in g.pending:
                rejected += g.inline(key)
            g.last[key] = x
            stored.append(x)
        elif c == DUPLICATE:
            dups.append(x)
        else:
            adopted, _prev, rej, dup = g.hold(key, x, x, now)
            rejected += rej
            if dup:
                dups.append(x)
            if adopted:
                stored += adopted
    return stored, dups, rejected


def test_far_ahead_outlier_never_becomes_state_and_is_rejected():
    g = SequenceGuard(max_jump=1000, confirm=2)
    stored, dups, rejected = feed(g, "S", [100, 101, 102, 102 + 10 ** 12, 103, 104, 105])
    assert stored == [100, 101, 102, 103, 104, 105] and dups == [] and rejected == [102 + 10 ** 12]
    assert g.last["S"] == 105 and not g.pending


def test_outlier_before_any_state_is_outvoted_by_the_real_ids():
    g = SequenceGuard(max_jump=1000, confirm=2)
    stored, dups, rejected = feed(g, "S", [500 + 10 ** 12, 500, 501, 502, 503])
    assert stored == [500, 501, 502, 503] and rejected == [500 + 10 ** 12] and dups == []


def test_genuine_jump_is_accepted_once_confirmed():
    g = SequenceGuard(max_jump=1000, confirm=2)
    j = 10 ** 9
    stored, dups, rejected = feed(g, "S", [1, 2, 3, j, j + 1, j + 5, j + 6])
    assert stored == [1, 2, 3, j, j + 1, j + 5, j + 6] and rejected == [] and dups == []
    # and the old ids, replayed late, are now far behind: held, not stored, not state
    assert g.classify("S", 3) == HELD


def test_ids_far_behind_a_bad_state_are_not_duplicates():
    g = SequenceGuard(max_jump=1000, confirm=2)
    g.last["S"] = 10 ** 12 + 7                    # e.g. read back from the database
    stored, dups, rejected = feed(g, "S", [7, 8, 9, 10])
    assert stored == [7, 8, 9, 10] and dups == [] and g.last["S"] == 10


def test_duplicates_near_the_state_and_among_held_ids():
    g = SequenceGuard(max_jump=1000, confirm=2)
    stored, dups, _ = feed(g, "S", [5, 5, 6, 7, 7, 3, 8])
    assert stored == [5, 6, 7, 8] and dups == [5, 7, 3]


def test_runs_are_bounded_and_lone_first_run_adopted_after_a_while():
    g = SequenceGuard(max_jump=10, confirm=2, max_runs=3, adopt_lone_after=60.0)
    _, _, rejected = feed(g, "S", [1000, 2000, 3000, 4000], now=0.0)    # four inconsistent ids
    assert rejected == [1000] and g.held() == 3
    g2 = SequenceGuard(max_jump=10, confirm=2, adopt_lone_after=60.0)
    feed(g2, "Q", [42], now=0.0)
    assert g2.expire(now=30.0) == []
    assert g2.expire(now=61.0) == [("Q", [42])] and g2.last["Q"] == 42
    # a key with state never adopts by time alone
    g3 = SequenceGuard(max_jump=10, confirm=2, adopt_lone_after=60.0)
    g3.last["S"] = 5
    feed(g3, "S", [10 ** 6], now=0.0)
    assert g3.expire(now=1e9) == [] and g3.last["S"] == 5


def test_guard_rejects_nonsense_settings():
    with pytest.raises(ValueError):
        SequenceGuard(max_jump=0)
