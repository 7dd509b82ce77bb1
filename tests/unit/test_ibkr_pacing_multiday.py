"""Several sessions per request: how sessions are grouped into requests (IB's "N D" counting weekdays),
and how one answer is split into its sessions, each checked and committed with its own status exactly as
a one-session answer would be (a holiday, an early close and a thin session inside one request)."""
from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from feeds.backfill import session_status
from feeds.ibkr.backfill import Backfill, Settings, _Job, _Resolved
from feeds.ibkr.bars import WireBar, check_session
from feeds.ibkr.contracts import parse_contracts
from feeds.ibkr.pacing import MAX_DAYS_PER_REQUEST, PacingLimiter
from feeds.ibkr.sessions import SessionCalendar, duration_days, request_chunks

XNYS = SessionCalendar("XNYS")
UTC = dt.timezone.utc
# Mon 2024-07-01, Tue 07-02, Wed 07-03 (early close 13:00), Thu 07-04 (Independence Day), Fri 07-05
WEEK = [XNYS.session(dt.date(2024, 7, d)) for d in (5, 3, 2, 1)]          # newest first, as planned
LATER = dt.datetime(2025, 1, 1, tzinfo=UTC)                                 # every session settled


def test_the_july_4_week_is_one_five_day_request():
    assert XNYS.session(dt.date(2024, 7, 4)) is None and WEEK[1].early_close
    assert request_chunks(WEEK, 5, XNYS) == [WEEK]
    assert duration_days(WEEK) == 5                    # the holiday counts as one of IB's days


def test_chunks_respect_days_weekends_and_sessions_not_to_fetch():
    assert request_chunks(WEEK, 1, XNYS) == [[s] for s in WEEK]
    assert request_chunks(WEEK, 4, XNYS) == [WEEK[:3], WEEK[3:]]          # Jul 2..5 is four weekdays
    # Fri 07-12 .. Mon 07-08 spans a weekend: five weekdays, one request
    nxt = [XNYS.session(dt.date(2024, 7, d)) for d in (12, 11, 10, 9, 8)]
    assert request_chunks(nxt, 5, XNYS) == [nxt] and duration_days(nxt) == 5
    # Jul 2 already stored: Jul 3 and Jul 1 are not requested together (Jul 2 would be asked again)
    gap = [WEEK[0], WEEK[1], WEEK[3]]
    assert request_chunks(gap, 5, XNYS) == [gap[:2], gap[2:]]


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
    chunks = request_chunks(sessions, days, XNYS)
    assert [s for c in chunks for s in c] == sessions
    assert all(duration_days(c) <= days for c in chunks)
