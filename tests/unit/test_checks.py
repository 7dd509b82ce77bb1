"""feedctl check's pure core: constructed situations -> the conditions that hold."""
import datetime as dt
import json
from dataclasses import replace

import pytest

from feeds.calendars import ExchangeCalendar
from feeds.ops.checks import (ALWAYS, NO_RULE, NSE, NYSE, BackfillError, Disk, Facts, Gap, Heartbeat,
                              KlineMismatch, Params, Spool, TokenFacts, UnitFacts, evaluate, holding,
                              rule_of_unit)

UTC = dt.timezone.utc
CALS = {"XNYS": ExchangeCalendar("XNYS"), "XNSE": ExchangeCalendar("XNSE")}

BIN, KITE, IB = "feed-binance.service", "feed-zerodha.service", "feed-ibkr.service"

SUNDAY_0300 = dt.datetime(2026, 11, 29, 3, 0, tzinfo=UTC)          # Sunday
MONDAY_NSE_OPEN = dt.datetime(2026, 11, 30, 6, 0, tzinfo=UTC)       # 11:30 IST
MONDAY_NSE_CLOSED = dt.datetime(2026, 11, 30, 12, 0, tzinfo=UTC)    # 17:30 IST
MONDAY_NYSE_OPEN = dt.datetime(2026, 11, 30, 16, 0, tzinfo=UTC)     # 11:00 New York
THANKSGIVING = dt.datetime(2026, 11, 26, 16, 0, tzinfo=UTC)         # NYSE holiday, 11:00 New York
BLACK_FRIDAY_1330 = dt.datetime(2026, 11, 27, 18, 30, tzinfo=UTC)   # 13:30 New York, early close 13:00
START = dt.datetime(2026, 11, 20, tzinfo=UTC)                      # the collectors' process start


def hb(now, age=5.0, **detail):
    d = {"streams": 3, "messages": 10_000, "malformed": 0, "last_message_age": 0.5,
         "tables": {"binance_agg_trade": {"stored": 9_000, "duplicates": 0, "rejected": 0}},
         "spooled_rows": 0, "replayed_rows": 0, "pending": 10}
    d.update(detail)
    return Heartbeat(updated_at=now - dt.timedelta(seconds=age), state="running", status="ok", detail=d,
                     started_at=START)


ACTIVE = UnitFacts("active", "running", "success", 0)
INACTIVE = UnitFacts("inactive", "dead", "success", 0)


def quiet(now, **over):
    """A healthy system at ``now``: Binance running, Kite and IBKR stopped (outside their hours)."""
    f = Facts(now=now, units={BIN: ACTIVE, KITE: INACTIVE, IB: INACTIVE}, heartbeats={BIN: hb(now)},
              spools=[Spool(BIN, "/var/lib/feeds/binance/spool")],
              token=TokenFacts(expires_at=now + dt.timedelta(days=10), renewal_result="success"),
              disks=[Disk("/var/lib/postgresql", 0.5)])
    return replace(f, **over)


def check(facts, params=Params()):
    return holding(facts, params, CALS)


def test_calendar_facts_used_here():
    assert CALS["XNYS"].session(THANKSGIVING.date()) is None
    s = CALS["XNYS"].session(BLACK_FRIDAY_1330.date())
    assert s is not None and s.early_close
    assert CALS["XNSE"].session(MONDAY_NSE_OPEN.date()) is not None
    assert CALS["XNYS"].session(MONDAY_NYSE_OPEN.date()) is not None


def test_rules_of_units():
    assert rule_of_unit(BIN) is ALWAYS and rule_of_unit("feed-binance@eth.service") is ALWAYS
    assert rule_of_unit(KITE) is NSE and rule_of_unit(IB) is NYSE
    for u in ("feed-backfill.service", "feed-kite-token.service", "feed-maintain.service", "feed-migrate"):
        assert rule_of_unit(u) is NO_RULE


def test_quiet_healthy_system_holds_nothing():
    for now in (SUNDAY_0300, MONDAY_NSE_CLOSED, THANKSGIVING):
        assert check(quiet(now)) == {}, now
    # during the NSE session with Kite running and fresh
    now = MONDAY_NSE_OPEN
    f = quiet(now, units={BIN: ACTIVE, KITE: ACTIVE, IB: INACTIVE}, heartbeats={BIN: hb(now), KITE: hb(now)})
    assert check(f) == {}


def test_binance_stale_on_sunday_night_alerts():
    now = SUNDAY_0300
    h = check(quiet(now, heartbeats={BIN: hb(now, age=300)}))
    assert set(h) == {f"stale:{BIN}"}                   # its low health score is the same failure
    title, body, sev = h[f"stale:{BIN}"]
    assert sev == "critical" and "journalctl -u feed-binance.service" in body and "5m 0s" in body


def test_binance_not_active_alerts():
    h = check(quiet(SUNDAY_0300, units={BIN: UnitFacts("failed", "failed", "exit-code", 5)}))
    assert h[f"stale:{BIN}"][2] == "critical"
    assert "failed" in h[f"stale:{BIN}"][1] and "systemctl start feed-binance.service" in h[f"stale:{BIN}"][1]


def test_kite_stale_only_inside_nse_hours():
    now = MONDAY_NSE_CLOSED
    assert check(quiet(now, units={BIN: ACTIVE, KITE: ACTIVE},
                       heartbeats={BIN: hb(now), KITE: hb(now, age=3600)})) == {}
    now = MONDAY_NSE_OPEN
    h = check(quiet(now, units={BIN: ACTIVE, KITE: ACTIVE},
                    heartbeats={BIN: hb(now), KITE: hb(now, age=3600)}))
    assert f"stale:{KITE}" in h and h[f"stale:{KITE}"][2] == "critical"
    assert "NSE" in h[f"stale:{KITE}"][1]
    # stopped during the session
    h = check(quiet(now, units={BIN: ACTIVE, KITE: INACTIVE}))
    assert f"stale:{KITE}" in h


def test_kite_grace_after_open():
    s = CALS["XNSE"].session(MONDAY_NSE_OPEN.date())
    now = s.open + dt.timedelta(seconds=30)
    f = quiet(now, units={BIN: ACTIVE, KITE: INACTIVE})
    assert f"stale:{KITE}" not in check(f, Params(grace_s=120))
    assert f"stale:{KITE}" in check(replace(f, now=s.open + dt.timedelta(seconds=121)), Params(grace_s=120))
    # before the open: stopped (the timer has not started it yet) or already running, nothing holds
    before = s.open - dt.timedelta(minutes=5)
    assert check(replace(f, now=before)) == {}
    assert check(quiet(before, units={BIN: ACTIVE, KITE: ACTIVE},
                       heartbeats={BIN: hb(before), KITE: hb(before)})) == {}


def test_ibkr_stale_on_holiday_and_after_early_close_alerts_nothing():
    for now in (THANKSGIVING, BLACK_FRIDAY_1330):
        f = quiet(now, units={BIN: ACTIVE, IB: ACTIVE}, heartbeats={BIN: hb(now), IB: hb(now, age=7200)})
        assert check(f) == {}, now
        assert check(replace(f, units={BIN: ACTIVE, IB: INACTIVE})) == {}, now
    now = MONDAY_NYSE_OPEN
    h = check(quiet(now, units={BIN: ACTIVE, IB: ACTIVE}, heartbeats={BIN: hb(now), IB: hb(now, age=7200)}))
    assert f"stale:{IB}" in h
    # 12:30 New York on the early-close day is still in session
    now = dt.datetime(2026, 11, 27, 17, 30, tzinfo=UTC)
    assert f"stale:{IB}" in check(quiet(now, units={BIN: ACTIVE, IB: INACTIVE}))


def test_spool_exists_and_grows():
    now = SUNDAY_0300
    path = "/var/lib/feeds/binance/spool"
    f = quiet(now, spools=[Spool(BIN, path, files=2, bytes=1000)])
    ev = evaluate(f, Params(), CALS)
    assert ev.holding[f"spool:{BIN}"][2] == "warning"
    assert path in ev.holding[f"spool:{BIN}"][1]
    # a minute later it grew
    later = now + dt.timedelta(minutes=1)
    f2 = quiet(later, spools=[Spool(BIN, path, files=3, bytes=5000)],
               previous=json.loads(json.dumps(ev.memory)))
    h2 = check(f2)
    assert h2[f"spool:{BIN}"][2] == "critical" and "growing" in h2[f"spool:{BIN}"][1]
    # the heartbeat's spooled rows grew (same process)
    ev3 = evaluate(quiet(now, spools=[Spool(BIN, path)]), Params(), CALS)
    f4 = quiet(later, heartbeats={BIN: hb(later, spooled_rows=500)}, spools=[Spool(BIN, path, 1, 10)],
               previous=ev3.memory)
    assert check(f4)[f"spool:{BIN}"][2] == "critical"
    # empty spool: nothing
    assert f"spool:{BIN}" not in check(quiet(now))


def test_new_rejects_hold_then_clear():
    now = SUNDAY_0300
    tables = {"binance_agg_trade": {"stored": 9_000, "duplicates": 0, "rejected": 0}}
    ev = evaluate(quiet(now, heartbeats={BIN: hb(now, tables=tables)}), Params(), CALS)
    assert ev.holding == {}
    later = now + dt.timedelta(minutes=1)
    rej = {"binance_agg_trade": {"stored": 9_000, "duplicates": 0, "rejected": 7}}
    ev2 = evaluate(quiet(later, heartbeats={BIN: hb(later, tables=rej)}, previous=ev.memory), Params(), CALS)
    key = f"rejected:{BIN}:binance_agg_trade"
    assert key in ev2.holding and "7 row(s)" in ev2.holding[key][1]
    # no new rejects: still holds within hold_new_for_s, clears after it
    t3 = later + dt.timedelta(minutes=30)
    ev3 = evaluate(quiet(t3, heartbeats={BIN: hb(t3, tables=rej)}, previous=ev2.memory), Params(), CALS)
    assert key in ev3.holding
    t4 = later + dt.timedelta(minutes=61)
    ev4 = evaluate(quiet(t4, heartbeats={BIN: hb(t4, tables=rej)}, previous=ev3.memory), Params(), CALS)
    assert key not in ev4.holding
    # a new process (counters from 0) that rejects again holds again
    t5 = t4 + dt.timedelta(minutes=1)
    new = replace(hb(t5, tables={"binance_agg_trade": {"stored": 5, "duplicates": 0, "rejected": 2}}),
                  started_at=t4)
    ev5 = evaluate(quiet(t5, heartbeats={BIN: new}, previous=ev4.memory), Params(), CALS)
    assert key in ev5.holding and "2 row(s)" in ev5.holding[key][1]


def test_gaps():
    f = quiet(SUNDAY_0300, gaps=[Gap("binance_agg_trade", "BTCUSDT", 100, 120, filled=False),
                                 Gap("binance_agg_trade", "ETHUSDT", 5, 9, filled=True)])
    h = check(f)
    assert set(h) == {"gap:binance_agg_trade:BTCUSDT"}
    assert "100 .. 120" in h["gap:binance_agg_trade:BTCUSDT"][1]
    assert "feedctl status" in h["gap:binance_agg_trade:BTCUSDT"][1]


def test_kline_mismatch():
    now = SUNDAY_0300
    old = now - dt.timedelta(minutes=20)
    fresh = now - dt.timedelta(minutes=2)
    f = quiet(now, kline_mismatches=[KlineMismatch("BTCUSDT", old, "volume,trades", False),
                                     KlineMismatch("ETHUSDT", old, "close", True),
                                     KlineMismatch("SOLUSDT", fresh, "high", None)])
    h = check(f)
    assert set(h) == {"kline:BTCUSDT"}
    assert "feedctl kline-check --symbol BTCUSDT" in h["kline:BTCUSDT"][1]


def test_token_expiring_before_next_nse_session():
    now = dt.datetime(2026, 11, 30, 3, 0, tzinfo=UTC)            # 08:30 IST, open 09:15
    expired = TokenFacts(expires_at=dt.datetime(2026, 11, 30, 0, 30, tzinfo=UTC))   # 06:00 IST today
    h = check(quiet(now, token=expired))
    assert h["token:kite"][2] == "critical" and "feed-kite-token" in h["token:kite"][1]
    ok = TokenFacts(expires_at=dt.datetime(2026, 12, 1, 0, 30, tzinfo=UTC))
    assert "token:kite" not in check(quiet(now, token=ok))
    # the evening before: today's token expires before tomorrow's session, but the renewal is not due yet
    evening = dt.datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
    assert "token:kite" not in check(quiet(evening, token=ok))
    # no token at all, an hour before the open
    assert "token:kite" in check(quiet(now, token=TokenFacts(expires_at=None)))
    # the renewal failed
    failed = TokenFacts(expires_at=dt.datetime(2026, 12, 1, 0, 30, tzinfo=UTC), renewal_result="exit-code")
    h = check(quiet(evening, token=failed))
    assert "exit-code" in h["token:kite"][1]


def test_backfill_errors():
    f = quiet(SUNDAY_0300, backfill_errors=[BackfillError("AAPL", dt.date(2026, 11, 20), "162 pacing"),
                                            BackfillError("AAPL", dt.date(2026, 11, 19), "162 pacing")])
    h = check(f)
    assert set(h) == {"backfill-error:AAPL"}
    assert "2 session(s)" in h["backfill-error:AAPL"][1] and "--retry-failed" in h["backfill-error:AAPL"][1]


def test_disk_under_threshold():
    f = quiet(SUNDAY_0300, disks=[Disk("/var/lib/postgresql", 0.08), Disk("/var/lib/feeds", 0.5)])
    h = check(f, Params(disk_min_free=10.0))
    assert set(h) == {"disk:/var/lib/postgresql"}
    assert h["disk:/var/lib/postgresql"][2] == "warning" and "8.0%" in h["disk:/var/lib/postgresql"][1]
    h = check(replace(f, disks=[Disk("/var/lib/postgresql", 0.02)]))
    assert h["disk:/var/lib/postgresql"][2] == "critical"


def test_pending_migrations():
    h = check(quiet(SUNDAY_0300, pending_migrations=["0009_x.sql"]))
    assert set(h) == {"migrations"} and "0009_x.sql" in h["migrations"][1]


def test_health_under_threshold():
    now = SUNDAY_0300
    before = now - dt.timedelta(minutes=30)
    ev = evaluate(quiet(before, heartbeats={BIN: hb(before)}), Params(), CALS)
    units = {BIN: UnitFacts("active", "running", "success", 3), KITE: INACTIVE, IB: INACTIVE}
    h = evaluate(quiet(now, units=units, heartbeats={BIN: hb(now, messages=12_000, malformed=1_000)},
                       previous=ev.memory), Params(health_threshold=60), CALS)
    assert h.scores[BIN].total < 60
    title, body, sev = h.holding[f"health:{BIN}"]
    assert sev == "warning" and "restart" in body and "malformed" in body
    assert set(h.holding) == {f"health:{BIN}"}


def test_rate_drop_on_two_runs_in_a_row_is_one_condition_that_clears_with_a_margin():
    now = SUNDAY_0300
    p = Params(rate_drop=0.2)
    usual = {(BIN, "aggTrade"): 100.0, (BIN, "bookTicker"): 320.0}

    def run(minute, agg, previous):
        t = now + dt.timedelta(minutes=minute)
        return evaluate(quiet(t, rates={(BIN, "aggTrade"): agg, (BIN, "bookTicker"): 300.0}, usual_rates=usual,
                              previous=previous), p, CALS)
    first = run(0, 5.0, None)
    assert first.holding == {}                          # one low window is not enough
    second = run(1, 5.0, first.memory)
    assert set(second.holding) == {f"rate:{BIN}"}
    assert "aggTrade: 5.00 msg/s now, usually 100.00" in second.holding[f"rate:{BIN}"][1]
    # 30 msg/s: above 20 % but under 40 % of usual -> still holds; 45 msg/s -> clears
    third = run(2, 30.0, second.memory)
    assert set(third.holding) == {f"rate:{BIN}"}
    assert run(3, 45.0, third.memory).holding == {}
    # low, then normal, then low again: never two in a row, nothing holds
    a = run(0, 5.0, None)
    b = run(1, 90.0, a.memory)
    c = run(2, 5.0, b.memory)
    assert a.holding == b.holding == c.holding == {}
    # Kite outside its hours is not judged, however long
    f = quiet(MONDAY_NSE_CLOSED, rates={(KITE, "full"): 0.0}, usual_rates={(KITE, "full"): 50.0})
    k1 = evaluate(f, p, CALS)
    assert k1.holding == {} and evaluate(replace(f, previous=k1.memory), p, CALS).holding == {}


def test_keys_stable_and_no_secrets():
    now = MONDAY_NSE_OPEN
    f = quiet(now, units={BIN: ACTIVE, KITE: ACTIVE}, heartbeats={BIN: hb(now, age=400), KITE: hb(now, age=900)},
              disks=[Disk("/d", 0.01)], pending_migrations=["0009.sql"],
              gaps=[Gap("binance_agg_trade", "BTCUSDT", 1, 2, False)])
    a = check(f)
    b = check(replace(f, now=now + dt.timedelta(minutes=3), disks=[Disk("/d", 0.02)],
                      heartbeats={BIN: hb(now, age=600), KITE: hb(now, age=1100)}))
    assert set(a) == set(b) and a
    for title, body, sev in a.values():
        assert sev in ("critical", "warning") and "\n" not in title
    assert json.loads(json.dumps(evaluate(f, Params(), CALS).memory))


def test_naive_now_refused():
    with pytest.raises(ValueError):
        check(Facts(now=dt.datetime(2026, 1, 1)))


def test_a_running_unit_that_receives_nothing_is_stale_and_that_alone_is_told():
    now = SUNDAY_0300
    usual = {(BIN, "aggTrade"): 100.0}
    silent = quiet(now, heartbeats={BIN: hb(now, age=5, last_message_age=240.0)},
                   rates={(BIN, "aggTrade"): 0.0}, usual_rates=usual)
    first = evaluate(silent, Params(), CALS)
    second = evaluate(replace(silent, now=now + dt.timedelta(minutes=1), previous=first.memory,
                              heartbeats={BIN: hb(now + dt.timedelta(minutes=1), age=5, last_message_age=300.0)}),
                      Params(), CALS)
    assert set(second.holding) == {f"stale:{BIN}"}      # not also rate: and health:
    title, body, sev = second.holding[f"stale:{BIN}"]
    assert "receives no data" in title and "5m 5s old" in body and sev == "critical"
    # fresh data: nothing
    assert check(quiet(now, heartbeats={BIN: hb(now, age=5, last_message_age=1.0)})) == {}
    # a collector waiting for its session (or just starting) is not judged by its data
    ib_now = MONDAY_NYSE_OPEN
    waiting = Heartbeat(updated_at=ib_now, state="waiting", status="waiting for the session",
                        detail={"last_message_age": None}, started_at=START)
    assert f"stale:{IB}" not in check(quiet(ib_now, units={BIN: ACTIVE, IB: ACTIVE},
                                            heartbeats={BIN: hb(ib_now), IB: waiting}))


# -- Dhan and feed-indicators ---------------------------------------------------------------------

DHAN, IND = "feed-dhan.service", "feed-indicators.service"


def test_rules_of_dhan_and_indicator_units():
    from feeds.ops.checks import INDICATORS, NSE_DHAN
    assert rule_of_unit(DHAN) is NSE_DHAN and rule_of_unit("feed-dhan@part2.service") is NSE_DHAN
    assert NSE_DHAN.kind == "calendar" and NSE_DHAN.calendar == "XNSE"
    assert rule_of_unit(IND) is INDICATORS and rule_of_unit("feed-indicators") is INDICATORS
    assert INDICATORS.kind == "always"
    # a name continued by "-" is another unit: the oneshots next to feed-dhan have no rule
    for u in ("feed-dhan-token.service", "feed-dhan-backfill.service", "feed-dhan-token", "feed-dhan-backfill",
              "feed-dhanx.service", "feed-indicators-bench.service"):
        assert rule_of_unit(u) is NO_RULE, u
    assert rule_of_unit("feed-binance@eth.service") is ALWAYS and rule_of_unit(KITE) is NSE


def test_dhan_stale_only_inside_nse_hours_and_its_oneshots_never():
    now = MONDAY_NSE_CLOSED
    f = quiet(now, units={BIN: ACTIVE, DHAN: ACTIVE, "feed-dhan-token.service": INACTIVE,
                          "feed-dhan-backfill.service": INACTIVE},
              heartbeats={BIN: hb(now), DHAN: hb(now, age=3600), "feed-dhan-backfill.service": hb(now, age=9000)})
    assert check(f) == {}
    now = MONDAY_NSE_OPEN
    h = check(replace(f, now=now, heartbeats={BIN: hb(now), DHAN: hb(now, age=3600),
                                              "feed-dhan-backfill.service": hb(now, age=9000)}))
    assert set(h) == {f"stale:{DHAN}"} and "NSE (Dhan) session" in h[f"stale:{DHAN}"][1]
    h = check(quiet(now, units={BIN: ACTIVE, DHAN: INACTIVE, "feed-dhan-token.service": INACTIVE}))
    assert set(h) == {f"stale:{DHAN}"} and "systemctl start feed-dhan.service" in h[f"stale:{DHAN}"][1]


def test_indicators_must_run_around_the_clock():
    now = SUNDAY_0300
    assert check(quiet(now, units={BIN: ACTIVE, IND: ACTIVE}, heartbeats={BIN: hb(now), IND: hb(now)})) == {}
    h = check(quiet(now, units={BIN: ACTIVE, IND: ACTIVE}, heartbeats={BIN: hb(now), IND: hb(now, age=600)}))
    assert set(h) == {f"stale:{IND}"} and "feed-indicators runs around the clock" in h[f"stale:{IND}"][1]
    h = check(quiet(now, units={BIN: ACTIVE, IND: UnitFacts("failed", "failed", "exit-code", 4)}))
    assert set(h) == {f"stale:{IND}"} and h[f"stale:{IND}"][2] == "critical"


def test_dhan_token_condition():
    now = dt.datetime(2026, 11, 30, 3, 0, tzinfo=UTC)            # 08:30 IST, open 09:15
    expired = TokenFacts(expires_at=dt.datetime(2026, 11, 30, 0, 30, tzinfo=UTC))
    h = check(quiet(now, dhan_token=expired))
    assert set(h) == {"token:dhan"}                               # Kite's token (quiet) is fine
    title, body, sev = h["token:dhan"]
    assert sev == "critical" and title == "feeds: Dhan access token not renewed"
    assert "feed-dhan cannot connect" in body and "journalctl -u feed-dhan-token.service" in body
    assert "feed-dhan-token --check" in body and "Kite" not in body
    # both venues at once: two conditions, two keys
    assert set(check(quiet(now, token=expired, dhan_token=expired))) == {"token:kite", "token:dhan"}
    ok = TokenFacts(expires_at=dt.datetime(2026, 12, 1, 3, 0, tzinfo=UTC))       # 24 h from 08:30 IST
    assert check(quiet(now, dhan_token=ok)) == {}
    # the evening before: the token ends before tomorrow's close, but the session is not token_lead_s away
    evening = MONDAY_NSE_CLOSED                                  # 17:30 IST, NYSE not open yet
    assert check(quiet(evening, dhan_token=ok)) == {}
    assert "token:dhan" in check(quiet(dt.datetime(2026, 12, 1, 3, 0, tzinfo=UTC), dhan_token=ok))
    # no token an hour before the open; a token of another client
    assert "no usable token" in check(quiet(now, dhan_token=TokenFacts(expires_at=None)))["token:dhan"][1]
    other = replace(ok, problem="it belongs to client 2, not dhan.client_id 1")
    assert "belongs to client 2" in check(quiet(now, dhan_token=other))["token:dhan"][1]
    # the last renewal failed (exit 77: Dhan refused), told whatever the hour; not while it runs again
    failed = replace(ok, renewal_result="exit-code")
    assert "ended with result exit-code" in check(quiet(evening, dhan_token=failed))["token:dhan"][1]
    assert check(quiet(evening, dhan_token=replace(failed, renewal_active_state="activating"))) == {}
    # no dhan.toml: nothing
    assert check(quiet(now, dhan_token=None)) == {}


def test_dhan_backfill_errors_have_keys_of_their_own():
    f = quiet(SUNDAY_0300, backfill_errors=[
        BackfillError("NSE_EQ:HDFCBANK", dt.date(2026, 11, 27), "DH-905 input exception", venue="dhan"),
        BackfillError("NSE_EQ:HDFCBANK", dt.date(2026, 11, 26), "no candle inside the session", venue="dhan"),
        BackfillError("HDFCBANK", dt.date(2026, 11, 27), "162 no data")])
    h = check(f)
    assert set(h) == {"backfill-error:dhan:NSE_EQ:HDFCBANK", "backfill-error:HDFCBANK"}
    title, body, sev = h["backfill-error:dhan:NSE_EQ:HDFCBANK"]
    assert sev == "warning" and title == "feeds: Dhan backfill of NSE_EQ:HDFCBANK failed"
    assert "2 session(s)" in body and "dhan_session_status" in body and "DH-905" in body
    assert "feed-dhan-backfill --symbols NSE_EQ:HDFCBANK --retry-failed" in body
    assert body.index("2026-11-26") < body.index("2026-11-27")
    assert "ibkr_session_status" in h["backfill-error:HDFCBANK"][1]
