"""Several sessions per request: how sessions are grouped into requests (only sessions on consecutive
weekdays, so that IB's "N D" covers the same sessions whether it counts calendar days, weekdays or trading
sessions), and how one answer is split into its sessions, each checked and committed with its own status
exactly as a one-session answer would be (a holiday, an early close and a thin session inside one answer)."""
from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from feeds import backfill as B
from feeds.backfill import session_status
from feeds.dhan import history as DH
from feeds.ibkr.backfill import Backfill, Settings, _Job, _Resolved
from feeds.ibkr.bars import WireBar, check_session
from feeds.ibkr.contracts import parse_contracts
from feeds.ibkr.pacing import MAX_DAYS_PER_REQUEST, PacingLimiter
from feeds.ibkr.sessions import SessionCalendar, duration_days, request_chunks
from feeds.sim.tws_data import request_window_start

XNYS = SessionCalendar("XNYS")
UTC = dt.timezone.utc
# Mon 2024-07-01, Tue 07-02, Wed 07-03 (early close 13:00), Thu 07-04 (Independence Day), Fri 07-05
WEEK = [XNYS.session(dt.date(2024, 7, d)) for d in (5, 3, 2, 1)]          # newest first, as planned
LATER = dt.datetime(2025, 1, 1, tzinfo=UTC)                                 # every session settled
# Mon 2024-07-08 .. Fri 07-12: no holiday
FULL = [XNYS.session(dt.date(2024, 7, d)) for d in (12, 11, 10, 9, 8)]


def test_a_holiday_splits_a_request():
    assert XNYS.session(dt.date(2024, 7, 4)) is None and WEEK[1].early_close
    assert request_chunks(WEEK, 5) == [WEEK[:1], WEEK[1:]]                # Fri alone; Mon..Wed (early close)
    assert [duration_days(c) for c in request_chunks(WEEK, 5)] == [1, 3]


def test_chunks_respect_days_weekends_and_sessions_not_to_fetch():
    assert request_chunks(WEEK, 1) == [[s] for s in WEEK]
    assert request_chunks(WEEK[1:], 2) == [WEEK[1:3], WEEK[3:]]           # Wed+Tue, then Mon
    # Mon 07-08 .. Fri 07-12: five consecutive weekdays, one request of "5 D"
    assert request_chunks(FULL, 5) == [FULL] and duration_days(FULL) == 5
    # Mon 07-15 and Fri 07-12 are never requested together: a weekend lies between them
    mon = XNYS.session(dt.date(2024, 7, 15))
    assert request_chunks([mon, *FULL], 5) == [[mon], FULL]
    # Wed 07-10 already stored: Thu 07-11 and Tue 07-09 are not requested together (it would be asked again)
    gap = [FULL[0], FULL[1], FULL[3], FULL[4]]
    assert request_chunks(gap, 5) == [gap[:2], gap[2:]]


def test_ibkr_and_dhan_group_sessions_with_the_shared_planner():
    sessions = [s for _, s in XNYS.days(dt.date(2024, 1, 1), dt.date(2024, 12, 31)) if s is not None]
    for days in (1, 3, 5):
        assert request_chunks(sessions, days) == B.request_chunks(sessions, days, B.calendar_span,
                                                                  lambda older, newer: (newer.day - older.day).days
                                                                  == 1)
    for days in (1, 5, 90):
        assert DH.request_chunks(sessions, days) == B.request_chunks(sessions, days, B.calendar_span)


def readings(chunk) -> dict[str, list]:
    """The sessions a request for ``chunk`` (ending at its newest session's close, durationStr
    ``duration_days(chunk)`` D) covers under each reading of "N D": calendar days, weekdays, trading
    sessions, N times 24 hours back from the end, and the TWS simulator's (weekdays)."""
    n, end = duration_days(chunk), chunk[0].close
    newest = chunk[0].day
    cal = [newest - dt.timedelta(days=k) for k in range(n)]
    weekdays, d = [], newest
    while len(weekdays) < n:
        if d.weekday() < 5:
            weekdays.append(d)
        d -= dt.timedelta(days=1)
    trading = [s.day for _, s in XNYS.days(newest - dt.timedelta(days=3 * n + 7), newest) if s is not None][:n]
    # the TWS simulator's reading (feeds.sim.tws_data.request_window_start)
    start = dt.datetime.fromtimestamp(request_window_start(end.timestamp(), n, "D", chunk[0].tz), UTC)
    sim = [s.day for _, s in XNYS.days(start.astimezone(chunk[0].tz).date(), newest) if s is not None
           and s.open >= start]
    hours = [s.day for _, s in XNYS.days(newest - dt.timedelta(days=n + 1), newest) if s is not None
             and s.open >= end - dt.timedelta(days=n)]
    keep = lambda days: sorted(d for d in days if XNYS.session(d) is not None)  # noqa: E731
    return {"calendar days": keep(cal), "weekdays": keep(weekdays), "sessions": sorted(trading),
            "N x 24 h": sorted(hours), "simulator": sorted(sim)}


@pytest.mark.parametrize("days", [1, 2, 3, 4, 5])
def test_every_reading_of_n_d_covers_exactly_the_chunk(days):
    """A session a request should have covered can never be missing from the answer because of how IB
    counts "N D": every reading covers exactly the chunk's sessions (so a day without bars in a multi-day
    answer is a day IB has no bars for, as in a one-session request)."""
    sessions = [s for _, s in XNYS.days(dt.date(2023, 1, 1), dt.date(2024, 12, 31)) if s is not None]
    for chunk in request_chunks(sessions, days):
        want = sorted(s.day for s in chunk)
        assert len(chunk) == duration_days(chunk) <= days
        for reading, got in readings(chunk).items():
            assert got == want, (reading, want, got)


def test_a_request_across_a_weekend_is_never_built():
    """Why: Fri 07-05, Mon 07-08 and Tue 07-09 as one request of "3 D" (three weekdays) ending Tuesday,
    read as calendar days, covers Sunday to Tuesday: Friday would come back without bars and be stored
    as ERROR.  The planner cuts such sessions into two requests, each read the same way by every reading."""
    fri, mon, tue = (XNYS.session(dt.date(2024, 7, d)) for d in (5, 8, 9))
    weekend_span = [tue, mon, fri]
    calendar_read = {tue.day - dt.timedelta(days=k) for k in range(3)}
    assert fri.day not in calendar_read
    chunks = request_chunks(weekend_span, 5)
    assert chunks == [[tue, mon], [fri]]
    for chunk in chunks:
        assert len({tuple(v) for v in readings(chunk).values()}) == 1


def test_days_per_request_is_bounded_by_ibs_bars_per_request():
    assert MAX_DAYS_PER_REQUEST * 390 <= 2000 < (MAX_DAYS_PER_REQUEST + 1) * 390


def bar(t: dt.datetime) -> WireBar:
    return WireBar(date=t, open=10.0, high=10.5, low=9.5, close=10.2, volume=100.0, average=10.1, barCount=3,
                   text=("10.00", "10.50", "9.50", "10.20", "100", "10.1"))


def day_bars(session, skip=()) -> list[WireBar]:
    n = int((session.close - session.open).total_seconds() // 60)
    return [bar(session.open + dt.timedelta(minutes=i)) for i in range(n) if i not in skip]


class FakeStore:
    """Records what the run commits."""

    def __init__(self):
        self.commits: list[tuple] = []

    def commit_session(self, symbol, con_id, session, status, rows, first, last, error, note, attempts=0):
        self.commits.append((symbol, session.day, status, len(rows), error, note))


class Notes:
    def notify(self, msg):
        pass


def store_answer(bars, sessions):
    store = FakeStore()
    row = parse_contracts("symbol,secType,exchange,currency,primaryExchange,priority\n"
                          "AAPL,STK,SMART,USD,NASDAQ,1\n")[0]
    bf = Backfill(Settings(days_per_request=5), [row], store, limiter=PacingLimiter(), notifier=Notes(),
                  now=lambda: LATER)
    job = _Job(_Resolved(row, con_id=265598), list(sessions), 1)

    async def go():
        try:
            await bf._store(job, bars)
        finally:
            bf._shutdown_executor()
    asyncio.run(go())
    return store.commits, bf


def single(session, bars):
    """What a one-session request's answer gives: (status, rows, error, note)."""
    chk = check_session("AAPL", 265598, session, bars, now=LATER)
    status, error, note = session_status(chk, session, LATER, dt.timedelta(minutes=30), thin_status=None)
    return status, len(chk.rows), error, note


def test_one_answer_split_into_sessions_each_with_its_own_status():
    fri, wed, tue, mon = WEEK
    per_day = {fri: day_bars(fri), wed: day_bars(wed), tue: day_bars(tue, skip=range(100, 160)), mon: day_bars(mon)}
    answer = [b for s in reversed(WEEK) for b in per_day[s]]                # IB's order: oldest first
    commits, bf = store_answer(answer, WEEK)
    assert [c[1] for c in commits] == [s.day for s in WEEK]                  # no row for the holiday
    got = {c[1]: (c[2], c[3], c[4], c[5]) for c in commits}
    for s in WEEK:
        assert got[s.day] == single(s, per_day[s]), s.day                    # exactly as one request each
    assert got[wed.day][:2] == ("EARLY_CLOSE", 210)
    assert got[tue.day][0] == "COMPLETE" and got[tue.day][1] == 330 and got[tue.day][3].startswith("thin:")
    assert got[fri.day][:2] == got[mon.day][:2] == ("COMPLETE", 390)
    assert bf.summary.done == 4 and bf.summary.bars == 390 + 210 + 330 + 390


def test_bars_of_a_day_not_requested_are_not_stored_and_a_missing_day_is_an_error():
    fri, wed, tue, mon = WEEK
    july4 = dt.datetime(2024, 7, 4, 13, 30, tzinfo=UTC)
    answer = day_bars(mon) + [bar(july4)] + day_bars(wed) + day_bars(fri)   # nothing for Tuesday
    commits, _ = store_answer(answer, WEEK)
    got = {c[1]: c for c in commits}
    assert sum(c[3] for c in commits) == 390 + 210 + 390                     # the 07-04 bar is left out
    assert got[tue.day][2] == "ERROR" and got[tue.day][3] == 0
    assert got[wed.day][2] == "EARLY_CLOSE" and got[mon.day][2] == got[fri.day][2] == "COMPLETE"


@pytest.mark.parametrize("days", [1, 3, 5])
def test_every_planned_session_in_exactly_one_request(days):
    sessions = [s for _, s in XNYS.days(dt.date(2024, 1, 1), dt.date(2024, 12, 31)) if s is not None]
    chunks = request_chunks(sessions, days)
    assert [s for c in chunks for s in c] == sessions
    assert all(duration_days(c) <= days for c in chunks)
