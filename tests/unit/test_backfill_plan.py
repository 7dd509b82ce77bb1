"""The backfill planner shared by feed-backfill (IBKR, XNYS) and feed-dhan-backfill (Dhan, XNSE):
which sessions, in which order, what is skipped, and the status of a fetched session."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import click
import pytest

from feeds import backfill as B
from feeds.calendars import ExchangeCalendar
from feeds.dhan import history as DH
from feeds.ibkr import backfill as IB
from feeds.ibkr import store as IS
from feeds.ibkr.sessions import SessionCalendar

UTC = dt.timezone.utc
XNYS = ExchangeCalendar("XNYS")
XNSE = ExchangeCalendar("XNSE")


def st(sym, day, status):
    return {(sym, day): B.StatusRow(sym, day, status, 1, None)}


def test_both_venues_use_the_one_planner_not_a_copy():
    # the IBKR backfill's names are the shared ones
    assert IB.Selection is B.Selection and IB.fmt_duration is B.fmt_duration
    assert IS.DONE_STATUSES is B.DONE_STATUSES
    assert issubclass(IS.BackfillStore, B.StatusStore) and issubclass(DH.DhanStore, B.StatusStore)
    assert IB.plan_sessions is B.plan_sessions and DH.plan_sessions is B.plan_sessions
    assert IB.session_status is B.session_status and DH.session_status is B.session_status
    from feeds.ibkr import main as IM
    from feeds.dhan import backfill_main as DM
    assert IM.format_status is B.format_status is DM.format_status


def test_xnys_week_newest_first_with_holiday_and_early_close():
    now = dt.datetime(2024, 7, 8, 12, tzinfo=UTC)
    p = B.plan_sessions(XNYS, "AAPL", dt.date(2024, 7, 1), dt.date(2024, 7, 5), {}, now=now)
    assert [s.day.isoformat() for s in p.sessions] == ["2024-07-05", "2024-07-03", "2024-07-02", "2024-07-01"]
    assert p.holidays == [dt.date(2024, 7, 4)]
    assert [s.expected_bars for s in p.sessions] == [390, 210, 390, 390]


def test_xnse_saturday_session_included_and_the_holiday_recorded():
    now = dt.datetime(2024, 2, 1, tzinfo=UTC)
    p = B.plan_sessions(XNSE, "NSE_EQ:HDFCBANK", dt.date(2024, 1, 19), dt.date(2024, 1, 23), {}, now=now)
    # Saturday 2024-01-20 was a full session; Monday 2024-01-22 a holiday; Sunday not a day of the week
    assert [s.day.isoformat() for s in p.sessions] == ["2024-01-23", "2024-01-20", "2024-01-19"]
    assert p.holidays == [dt.date(2024, 1, 22)]
    assert all(s.expected_bars == 375 for s in p.sessions)
    # IBKR's calendar view lists weekend sessions the same way
    assert [d for d, _ in SessionCalendar("XNSE").days(dt.date(2024, 1, 19), dt.date(2024, 1, 23))] == [
        dt.date(2024, 1, 23), dt.date(2024, 1, 22), dt.date(2024, 1, 20), dt.date(2024, 1, 19)]


def test_muhurat_session_has_its_own_length():
    s = XNSE.session(dt.date(2024, 11, 1))
    assert s.kind == "special" and s.expected_bars == 60
    p = B.plan_sessions(XNSE, "X", dt.date(2024, 11, 1), dt.date(2024, 11, 1), {}, now=dt.datetime(2024, 12, 1, tzinfo=UTC))
    assert p.sessions == [s]


def test_done_error_holiday_and_finished_are_skipped_and_retry_failed_takes_errors():
    now = dt.datetime(2024, 7, 8, 12, tzinfo=UTC)
    d = dt.date
    stats = {**st("A", d(2024, 7, 5), "COMPLETE"), **st("A", d(2024, 7, 3), "ERROR"),
             **st("A", d(2024, 7, 2), "THIN"), **st("A", d(2024, 7, 4), "HOLIDAY"), **st("A", d(2024, 7, 1), "PARTIAL")}
    p = B.plan_sessions(XNYS, "A", d(2024, 7, 1), d(2024, 7, 5), stats, now=now)
    assert [s.day for s in p.sessions] == [d(2024, 7, 1)]          # PARTIAL fetched again
    assert (p.done, p.skipped_errors, p.holidays) == (2, 1, [])     # HOLIDAY already recorded
    p = B.plan_sessions(XNYS, "A", d(2024, 7, 1), d(2024, 7, 5), stats, now=now, retry_failed=True)
    assert [s.day for s in p.sessions] == [d(2024, 7, 3), d(2024, 7, 1)]
    p = B.plan_sessions(XNYS, "A", d(2024, 7, 1), d(2024, 7, 5), stats, now=now, retry_failed=True,
                        finished={("A", d(2024, 7, 3))})
    assert [s.day for s in p.sessions] == [d(2024, 7, 1)]


def test_sessions_not_yet_opened_are_not_planned_and_the_range_ends_at_the_last_settled_one():
    # Friday 2024-09-13 15:45 IST: the session closed 15 minutes ago, settle is 30 minutes
    now = dt.datetime(2024, 9, 13, 10, 15, tzinfo=UTC)
    first, last = B.plan_range(XNSE, now, dt.timedelta(minutes=30), B.Selection(), [dt.date(2024, 9, 10)])
    assert (first, last) == (dt.date(2024, 9, 10), dt.date(2024, 9, 12))
    first, last = B.plan_range(XNSE, now, dt.timedelta(0), B.Selection(first=dt.date(2024, 9, 11)),
                               [dt.date(2024, 9, 1), None])
    assert (first, last) == (dt.date(2024, 9, 11), dt.date(2024, 9, 13))
    later = B.plan_sessions(XNSE, "X", dt.date(2024, 9, 16), dt.date(2024, 9, 16), {}, now=now)
    assert later.sessions == [] and later.holidays == []


def test_fetch_order_newest_then_priority_then_symbol():
    d = dt.date
    jobs = [(d(2024, 1, 2), 0, "B"), (d(2024, 1, 3), 0, "Z"), (d(2024, 1, 2), 1, "Z"), (d(2024, 1, 2), 0, "A"),
            (d(2024, 1, 3), 2, "M")]
    assert sorted(jobs, key=lambda j: B.fetch_order(*j)) == [
        (d(2024, 1, 3), 2, "M"), (d(2024, 1, 3), 0, "Z"), (d(2024, 1, 2), 1, "Z"), (d(2024, 1, 2), 0, "A"),
        (d(2024, 1, 2), 0, "B")]


@dataclass
class Chk:
    actual: int
    expected: int
    failure: str | None = None
    dropped: list = field(default_factory=list)
    note: str = ""


@pytest.mark.parametrize("chk,settled,thin,want", [
    (Chk(375, 375), True, "THIN", "COMPLETE"),
    (Chk(300, 375, note="thin: 75 of 375"), True, "THIN", "THIN"),
    (Chk(300, 375, note="thin: 75 of 375"), True, None, "COMPLETE"),     # IBKR: COMPLETE with the note
    (Chk(0, 375), True, "THIN", "ERROR"),
    (Chk(0, 375, dropped=[1, 2]), True, "THIN", "ERROR"),
    (Chk(0, 375, failure="bad bar"), True, "THIN", "ERROR"),
    (Chk(100, 375, note="thin: 275 of 375"), False, "THIN", "PARTIAL"),
])
def test_session_status_rules(chk, settled, thin, want):
    s = XNSE.session(dt.date(2024, 9, 12))
    now = s.close + (dt.timedelta(hours=1) if settled else dt.timedelta(minutes=5))
    status, error, note = B.session_status(chk, s, now, dt.timedelta(minutes=30), thin_status=thin)
    assert status == want
    assert (error is not None) == (want == "ERROR")
    if want == "PARTIAL":
        assert note.startswith("fetched before the session settled (100 of 375 bars)") and "thin:" not in note


def test_early_close_status():
    s = XNYS.session(dt.date(2024, 7, 3))
    status, _, _ = B.session_status(Chk(210, 210), s, s.close + dt.timedelta(hours=1), dt.timedelta(0))
    assert status == "EARLY_CLOSE"


def test_command_line_pieces():
    today = dt.date(2024, 9, 30)
    assert B.parse_date("30d", "--from", today) == dt.date(2024, 8, 31)
    assert B.parse_date("2024-01-20", "--from", today) == dt.date(2024, 1, 20)
    assert B.parse_date(None, "--from", today) is None
    with pytest.raises(click.BadParameter):
        B.parse_date("yesterday", "--from", today)
    assert B.parse_symbols("a,b", ("c",)) == ["A", "B", "C"]
    assert B.parse_symbols(None, ()) is None
    assert B.fmt_duration(3725) == "1h02m" and B.fmt_duration(float("inf")) == "?"
    text = B.format_status([{"symbol": "NSE_EQ:HDFCBANK", "COMPLETE": 3, "EARLY_CLOSE": 0, "thin": 1,
                             "PARTIAL": 0, "ERROR": 0, "PENDING": 0, "HOLIDAY": 1, "first": dt.date(2024, 9, 11),
                             "last": dt.date(2024, 9, 13), "bars": 1125}], [], None, width=22)
    head, row = text.splitlines()
    assert head.split()[:8] == ["symbol", "complete", "early_close", "thin", "partial", "error", "pending", "holiday"]
    assert row.split() == ["NSE_EQ:HDFCBANK", "3", "0", "1", "0", "0", "0", "1", "2024-09-11", "2024-09-13", "1,125"]


def test_dhan_requests_span_at_most_the_configured_days():
    sessions = XNSE.sessions(dt.date(2024, 1, 1), dt.date(2024, 6, 30))[::-1]
    chunks = DH.request_chunks(sessions, 90)
    assert sum(len(c) for c in chunks) == len(sessions)
    assert all((c[0].day - c[-1].day).days + 1 <= 90 for c in chunks)
    assert [s for c in chunks for s in c] == sessions                 # newest first, nothing lost
    assert len(chunks) == 2                                           # 2024-01-01..06-28: 180 days
    assert [len(c) for c in DH.request_chunks(sessions[:5], 1)] == [1] * 5


def test_the_shared_request_planner_takes_the_venues_rule():
    """feeds.backfill.request_chunks: the venue passes how a request's span is measured and which sessions
    may share one; Dhan's grouping is it with calendar days and no adjacency rule."""
    sessions = XNSE.sessions(dt.date(2024, 1, 1), dt.date(2024, 1, 31))[::-1]
    assert B.request_chunks(sessions, 1) == [[s] for s in sessions]
    assert DH.request_chunks(sessions, 7) == B.request_chunks(sessions, 7, B.calendar_span)
    weekly = B.request_chunks(sessions, 7, B.calendar_span)
    assert all(B.calendar_span(c[0], c[-1]) <= 7 for c in weekly) and [s for c in weekly for s in c] == sessions
    # an adjacency rule: only sessions on consecutive days share a request
    consecutive = B.request_chunks(sessions, 7, B.calendar_span, lambda older, newer: (newer.day - older.day).days == 1)
    assert all((c[i].day - c[i + 1].day).days == 1 for c in consecutive for i in range(len(c) - 1))
    assert consecutive != weekly and [s for c in consecutive for s in c] == sessions
    # a span measured in sessions: at most three a request
    assert {len(c) for c in B.request_chunks(sessions, 3, lambda newest, oldest: sessions.index(oldest)
                                             - sessions.index(newest) + 1)} == {3, len(sessions) % 3 or 3}
