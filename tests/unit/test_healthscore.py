"""Health score 0-100: constructed situations, and every part within its bounds."""
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feeds.ops.healthscore import (DEFAULT_PARAMS, MAX_POINTS, Measures, Params, Score, alerting,
                               heartbeat_stale, score)

# A healthy feed during its session: active, fresh heartbeat, data flowing.
HEALTHY = Measures(
    unit_active=True, expected_running=True, in_session=True, restarts_last_hour=0,
    heartbeat_age_s=4.0, heartbeat_interval_s=10.0, messages=100_000, malformed=0,
    rejected_rows=0, spooled_rows=0, pending=120, errors=0, last_message_age_s=0.3,
    expected_max_age_s=30.0, lag_p99_ms=400.0, lag_target_ms=2000.0, rate=300.0, usual_rate=320.0)


def test_running_and_healthy_scores_100():
    s = score(HEALTHY)
    assert s.total == 100
    assert s.parts == MAX_POINTS
    assert s.reasons == []
    assert not alerting(s, 70)


def test_unknown_lag_and_rate_score_full():
    s = score(replace(HEALTHY, lag_p99_ms=None, rate=None, usual_rate=None))
    assert s.total == 100


def test_stale_heartbeat_during_session_counts_as_not_running():
    # 31 s > 3 intervals of 10 s: a hung process
    s = score(replace(HEALTHY, heartbeat_age_s=31.0, last_message_age_s=31.0))
    assert s.running == 0 and s.compliance == 0
    assert any("heartbeat stale" in r for r in s.reasons)
    assert alerting(s, 70)
    # exactly 3 intervals is still fresh
    assert score(replace(HEALTHY, heartbeat_age_s=30.0)).running == 30


def test_missing_heartbeat_is_stale():
    assert heartbeat_stale(replace(HEALTHY, heartbeat_age_s=None))
    assert score(replace(HEALTHY, heartbeat_age_s=None)).running == 0


def test_stopped_during_session():
    m = replace(HEALTHY, unit_active=False, heartbeat_age_s=600.0, last_message_age_s=None,
                messages=0, lag_p99_ms=None, rate=0.0)
    s = score(m)
    assert s.running == 0
    assert s.compliance == 0
    assert s.freshness == 0
    # errors and performance cannot be measured on a stopped unit: full, the loss is above
    assert s.errors == 25 and s.performance == 10
    assert s.total == 35
    assert "not running" in s.reasons and "stopped during its hours" in s.reasons
    assert alerting(s, 70)


def test_stopped_outside_session_scores_100():
    # a Kite collector after the NSE close: stopped, no heartbeat, no data, usual rate 0
    m = Measures(unit_active=False, expected_running=False, in_session=False,
                 heartbeat_age_s=None, last_message_age_s=None, rate=None, usual_rate=0.0)
    s = score(m)
    assert s.total == 100 and s.reasons == []


def test_stopped_outside_session_with_stale_heartbeat_row_scores_100():
    m = replace(HEALTHY, unit_active=False, expected_running=False, in_session=False,
                heartbeat_age_s=50_000.0, last_message_age_s=50_000.0, rate=0.0)
    assert score(m).total == 100


def test_running_outside_session_loses_compliance():
    m = replace(HEALTHY, expected_running=False, in_session=False, last_message_age_s=5000.0)
    s = score(m)
    assert s.compliance == 0 and s.running == 30 and s.freshness == 15
    assert "running outside its hours" in s.reasons


def test_active_but_stale_heartbeat_outside_hours_is_still_running():
    # a unit left running after the close is judged by systemd, not by its heartbeat
    m = replace(HEALTHY, expected_running=False, in_session=False, heartbeat_age_s=None)
    assert score(m).compliance == 0


@pytest.mark.parametrize("bad, expected", [
    (0, 25),        # 0 %
    (10, 25),       # 0.01 %: 24.975 rounds to 25
    (100, 23),      # 0.1 %: 22.5 rounds half up to 23
    (250, 19),      # 0.25 %: 18.75
    (500, 13),      # 0.5 %: 12.5 rounds half up
    (999, 0),       # 0.999 %: 0.025 rounds to 0
    (1000, 0),      # 1 %: zero
    (50_000, 0),    # 50 %: floor 0
])
def test_error_ratio_scale(bad, expected):
    s = score(replace(HEALTHY, messages=100_000, errors=bad))
    assert s.errors == expected
    assert (s.total < 100) == (expected < 25)


def test_error_ratio_counts_malformed_rejected_and_venue_errors_together():
    s = score(replace(HEALTHY, messages=100_000, malformed=100, rejected_rows=100, errors=50))
    assert s.errors == _half_up(25 * (1 - 0.0025 / 0.01))
    assert any("error ratio 0.25%" in r for r in s.reasons)


def test_malformed_burst():
    # 2 000 malformed in 10 000 messages: 20 %
    s = score(replace(HEALTHY, messages=10_000, malformed=2_000))
    assert s.errors == 0
    assert s.total == 75
    assert any("2000 malformed" in r for r in s.reasons)
    assert alerting(s, 80) and not alerting(s, 75)


def test_errors_without_messages():
    # reconnecting over and over, nothing received: ratio 3 / max(1, 0)
    s = score(replace(HEALTHY, messages=0, errors=3))
    assert s.errors == 0


@pytest.mark.parametrize("lag, expected", [
    (2000.0, 10),   # at target
    (11000.0, 8),   # 9 000 over, span 18 000: lag half 2.5 -> 7.5 rounds to 8
    (20000.0, 5),   # 10x target: lag half 0
    (60000.0, 5),
])
def test_slow_lag(lag, expected):
    s = score(replace(HEALTHY, lag_p99_ms=lag))
    assert s.performance == expected
    if expected < 10:
        assert any("lag p99" in r for r in s.reasons)


def test_spooling_costs_the_lag_half():
    s = score(replace(HEALTHY, spooled_rows=5000))
    assert s.performance == 5
    assert any("spooling" in r for r in s.reasons)


def test_rate_far_below_usual():
    s = score(replace(HEALTHY, rate=20.0, usual_rate=320.0))
    assert s.performance == 5
    assert any("below 50% of usual" in r for r in s.reasons)
    # exactly at rate_drop is not below it
    assert score(replace(HEALTHY, rate=160.0, usual_rate=320.0)).performance == 10
    # a custom rate_drop
    assert score(replace(HEALTHY, rate=200.0), Params(rate_drop=0.8)).performance == 5


def test_slow_lag_and_low_rate_together():
    s = score(replace(HEALTHY, lag_p99_ms=30000.0, rate=1.0))
    assert s.performance == 0 and s.total == 90


@pytest.mark.parametrize("restarts, expected", [(0, 30), (1, 20), (2, 10), (3, 0), (9, 0)])
def test_restarts(restarts, expected):
    s = score(replace(HEALTHY, restarts_last_hour=restarts))
    assert s.running == expected
    assert s.compliance == 20
    if restarts:
        assert any(f"{restarts} restart(s)" in r for r in s.reasons)


def test_restarts_count_after_a_stop_outside_session_too():
    m = Measures(unit_active=False, expected_running=False, in_session=False, restarts_last_hour=1)
    assert score(m).total == 90


@pytest.mark.parametrize("age, expected", [
    (10.0, 15),      # within the bound
    (30.0, 15),      # at the bound
    (165.0, 8),      # 135 over, span 270: 7.5 rounds to 8
    (300.0, 0),      # 10x
    (3000.0, 0),
])
def test_freshness(age, expected):
    s = score(replace(HEALTHY, last_message_age_s=age))
    assert s.freshness == expected


def test_freshness_no_message_during_session():
    s = score(replace(HEALTHY, last_message_age_s=None))
    assert s.freshness == 0
    assert "no message during the session" in s.reasons


def test_freshness_full_outside_session():
    m = replace(HEALTHY, in_session=False, last_message_age_s=None)
    assert score(m).freshness == 15


def test_as_dict_is_json_ready():
    import json
    d = score(replace(HEALTHY, errors=500)).as_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["total"] == sum(d["parts"].values())


def _half_up(x):
    return int(x + 0.5)


# ------------------------------------------------------------------ property: bounds
_opt_float = st.one_of(st.none(), st.floats(min_value=0, max_value=1e7, allow_nan=False))
_count = st.integers(min_value=0, max_value=10**9)
_pos = st.floats(min_value=1e-3, max_value=1e5, allow_nan=False)

measures = st.builds(
    Measures,
    unit_active=st.booleans(), expected_running=st.booleans(), in_session=st.booleans(),
    restarts_last_hour=st.integers(min_value=0, max_value=1000),
    heartbeat_age_s=_opt_float, heartbeat_interval_s=_pos,
    messages=_count, malformed=_count, rejected_rows=_count, spooled_rows=_count,
    pending=_count, errors=_count, last_message_age_s=_opt_float, expected_max_age_s=_pos,
    lag_p99_ms=_opt_float, lag_target_ms=_pos, rate=_opt_float, usual_rate=_opt_float)

params = st.builds(
    Params,
    restart_penalty=st.integers(min_value=0, max_value=40),
    stale_intervals=st.floats(min_value=0.5, max_value=20, allow_nan=False),
    error_ratio_zero=st.floats(min_value=1e-6, max_value=1.0, allow_nan=False),
    zero_factor=st.floats(min_value=1.0, max_value=100.0, allow_nan=False),
    rate_drop=st.floats(min_value=0.0, max_value=1.0, allow_nan=False))


@settings(max_examples=500, deadline=None)
@given(measures, st.one_of(st.just(DEFAULT_PARAMS), params))
def test_every_part_within_bounds(m, p):
    s = score(m, p)
    assert isinstance(s, Score)
    assert list(s.parts) == list(MAX_POINTS)
    for name, pts in s.parts.items():
        assert isinstance(pts, int)
        assert 0 <= pts <= MAX_POINTS[name], (name, pts)
    assert s.total == sum(s.parts.values())
    assert 0 <= s.total <= 100
    # reasons name what cost points: none exactly when nothing was lost
    assert (s.total < 100) == bool(s.reasons), s.reasons


@settings(max_examples=300, deadline=None)
@given(measures)
def test_correctly_stopped_outside_session_is_100(m):
    m = replace(m, unit_active=False, expected_running=False, in_session=False, restarts_last_hour=0)
    assert score(m).total == 100


@settings(max_examples=300, deadline=None)
@given(measures)
def test_worse_counts_never_score_higher(m):
    worse = replace(m, errors=m.errors + 1, restarts_last_hour=m.restarts_last_hour + 1)
    assert score(worse).total <= score(m).total


def _process(state="running", messages=1000, malformed=0, rejected=0, spooled=0, spooling=False, figures=None,
             age=0.5):
    from types import SimpleNamespace
    from feeds.health import LagHistogram, StreamHealth
    h = SimpleNamespace(state=state, malformed=malformed, figures=dict(figures or {}), flow_timeout=20.0,
                        streams={"btcusdt@aggTrade": StreamHealth(count=messages)},
                        lag_total=LagHistogram(), last_message_age=lambda: age)
    sink = SimpleNamespace(pending=0, spooling=spooling,
                           stats=SimpleNamespace(tables={"t": SimpleNamespace(rejected=rejected)},
                                                 spooled_rows=spooled))
    return h, sink


def test_a_collector_scores_itself_over_its_lifetime_or_over_a_window():
    from feeds.ops.healthscore import process_score
    h, sink = _process(messages=1000, malformed=20, figures={"reconnects": 5, "gaps": 9})
    s, first = process_score(h, sink)
    assert (first.messages, first.malformed, first.errors) == (1000, 20, 5)     # gaps are not errors
    assert s.errors < 25 and any("error ratio" in r for r in s.reasons)
    # the next window: 1,000 more messages, nothing bad -> full errors part, and a rate
    h.streams["btcusdt@aggTrade"].count = 2000
    s2, second = process_score(h, sink, first)
    assert s2.errors == 25 and second.messages == 2000


def test_a_collector_waiting_for_its_session_is_not_judged_on_freshness_and_spooling_counts_only_while_it_lasts():
    from feeds.ops.healthscore import process_score
    h, sink = _process(state="waiting", messages=0, age=None)
    s, _ = process_score(h, sink)
    assert s.total == 100
    h, sink = _process(spooled=500, spooling=False)
    assert process_score(h, sink)[0].performance == 10
    h, sink = _process(spooled=500, spooling=True)
    s, _ = process_score(h, sink)
    assert s.performance == 5 and any("spooling" in r for r in s.reasons)


def test_a_unit_left_failed_outside_its_hours_loses_the_running_part():
    ok = Measures(unit_active=False, expected_running=False, in_session=False)
    assert score(ok).total == 100
    failed = score(replace(ok, unit_failed=True))
    assert failed.total == 70 and failed.running == 0 and "failed (systemd)" in failed.reasons
