"""feed-backfill end to end: the real ib_async 2.1.0 client against the TWS simulator, a real PostgreSQL."""
from __future__ import annotations

import asyncio
import csv
import datetime as dt
import re
import json
import os
import itertools
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest
from click.testing import CliRunner
from ib_async import IB

from feeds.ibkr.backfill import Backfill, RunSummary, Selection, Settings
from feeds.ibkr.contracts import parse_contracts
from feeds.ibkr.pacing import PacingLimiter
from feeds.ibkr.sessions import SessionCalendar
from feeds.ibkr.store import BackfillStore
from feeds.sim.tws import TwsSimulator

pytestmark = pytest.mark.integration

DATA = Path(os.environ.get("FEEDS_SHARED_DATA") or Path(__file__).resolve().parents[2] / ".." / "shared" / "data")
SPX_CSV = DATA / "ib" / "spx-1min-2019-11-05..08.csv"
needs_spx = pytest.mark.skipif(not SPX_CSV.is_file(), reason=f"shared IB recording not found at {SPX_CSV}")
ET = ZoneInfo("US/Eastern")
UTC = dt.timezone.utc
OLD_HEAD = dt.datetime(2015, 1, 2, 9, 30, tzinfo=ET)
XNYS = SessionCalendar("XNYS")
HEADER = "symbol,secType,exchange,currency,primaryExchange,priority\n"
LINES = {
    "AAPL": "AAPL,STK,SMART,USD,NASDAQ,1",
    "MSFT": "MSFT,STK,SMART,USD,NASDAQ,0",
    "IBM": "IBM,STK,SMART,USD,NYSE,0",
    "SPX": "SPX,IND,CBOE,USD,,1",
    "THIN": "THIN,STK,SMART,USD,NYSE,0",
    "ZZZZ": "ZZZZ,STK,SMART,USD,NYSE,0",
    "NOSUB": "NOSUB,STK,SMART,USD,NYSE,0",
}


class RecordingSim(TwsSimulator):
    """The simulator, also recording every reqHistoricalData it reads:
    ``(time read (monotonic s), symbol, endDateTime)``; ``on_request(n)``, when set,
    is called with the number read so far, before the request is answered."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.hist_log: list[tuple[float, str, str]] = []
        self.on_request: Callable[[int], None] | None = None

    def _historical_data(self, conn, f):
        self.hist_log.append((time.monotonic(), f[3].upper(), f[15]))
        if self.on_request is not None:
            self.on_request(len(self.hist_log))
        return super()._historical_data(conn, f)


class Notes:
    """Collects sd_notify messages."""

    def __init__(self):
        self.msgs: list[str] = []

    def notify(self, msg: str) -> None:
        self.msgs.append(msg)


def contracts(*symbols: str):
    return parse_contracts(HEADER + "\n".join(LINES[s] for s in symbols) + "\n")


def requested(log, since: int = 0) -> list[tuple[str, dt.date]]:
    """(symbol, session date) of recorded requests (endDateTime is the session close in UTC)."""
    out = []
    for _, sym, end in log[since:]:
        t = dt.datetime.strptime(end, "%Y%m%d-%H:%M:%S").replace(tzinfo=UTC)
        out.append((sym, t.astimezone(ET).date()))
    return out


def statuses(dsn: str) -> dict[tuple[str, dt.date], dict]:
    with psycopg.connect(dsn) as c:
        cur = c.execute("""SELECT symbol, session_date, status, expected_bars, actual_bars, first_bar, last_bar,
                                  error, note, attempts FROM ibkr_session_status""")
        names = [d.name for d in cur.description]
        return {(r[0], r[1]): dict(zip(names, r, strict=True)) for r in cur.fetchall()}


def bar_counts(dsn: str) -> dict[tuple[str, dt.date], int]:
    with psycopg.connect(dsn) as c:
        rows = c.execute("""SELECT symbol, (bar_start AT TIME ZONE 'America/New_York')::date, count(*)
                              FROM ibkr_bar_1min GROUP BY 1, 2""").fetchall()
    return {(r[0], r[1]): r[2] for r in rows}


def settings(sim, scale: float, **kw) -> Settings:
    kw.setdefault("connect_timeout", 5)
    kw.setdefault("request_timeout", 10)
    kw.setdefault("reconnect_timeout", 15)
    return Settings(port=sim.port, pacing_scale=scale, **kw)


async def backfill(dsn, rows, sel, sim, scale=0.001, timeout=300, notes=None, **kw) -> tuple[RunSummary, Backfill]:
    lim = PacingLimiter(scale=scale, keep_history=True)
    bf = Backfill(settings(sim, scale, **kw), rows, BackfillStore(dsn), limiter=lim, notifier=notes or Notes())
    sm = await asyncio.wait_for(bf.run(sel), timeout)
    return sm, bf


async def backfill_service(dsn, rows, sel, sim, notes, scale=0.001, timeout=300, **kw) -> tuple[RunSummary, int]:
    """The run as feed-backfill makes it: through the collector runtime, whose
    status lines (the progress) and sd_notify messages go to ``notes``."""
    from feeds.ibkr.main import BackfillJob
    from feeds.service import Service

    lim = PacingLimiter(scale=scale, keep_history=True)
    s = settings(sim, scale, **kw)
    svc = Service(UNIT, dsn, status_interval=s.status_interval, notifier=notes)
    made = []

    def prepare(svc):
        made.append(Backfill(s, rows, BackfillStore(dsn), limiter=lim, notifier=svc.health))
        return BackfillJob(made[0], sel, "")
    rc = await asyncio.wait_for(svc.serve(prepare), timeout)
    return made[0].summary, rc


UNIT = "feed-backfill-test.service"


def run(coro, timeout=600):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def sim_kw(**kw):
    kw.setdefault("pacing_scale", 0.001)
    kw.setdefault("head_timestamps", {s: OLD_HEAD for s in ("AAPL", "MSFT", "IBM", "THIN", "NOSUB")})
    return kw


# ------------------------------------------------------------------ the recording


@needs_spx
def test_spx_recording_four_sessions_complete_and_equal_to_the_file(db):
    """The four recorded SPX sessions: COMPLETE, 390 bars each, equal to the
    file's 09:30-15:59 rows (IB's useRTH=1 answer); the file's 16:00 rows of
    2019-11-05..07 are outside the session and not stored."""
    async def main():
        sim = RecordingSim(**sim_kw(csv_files={"SPX": SPX_CSV}, generate=()))
        await sim.start()
        try:
            sel = Selection(first=dt.date(2019, 11, 5), last=dt.date(2019, 11, 8))
            sm, _ = await backfill(db, contracts("SPX"), sel, sim)
            again, _ = await backfill(db, contracts("SPX"), sel, sim)
            return sm, again, sim.stats(), requested(sim.hist_log)
        finally:
            await sim.stop()

    sm, again, stats, reqs = run(main())
    days = [dt.date(2019, 11, d) for d in (5, 6, 7, 8)]
    st = statuses(db)
    assert sorted(st) == [("SPX", d) for d in days]
    for d in days:
        s = st[("SPX", d)]
        assert (s["status"], s["expected_bars"], s["actual_bars"]) == ("COMPLETE", 390, 390)
        assert s["error"] is None and s["note"] is None
        assert s["first_bar"].astimezone(ET).time() == dt.time(9, 30)
        assert s["last_bar"].astimezone(ET).time() == dt.time(15, 59)
        assert s["attempts"] == 1
    assert sorted(reqs) == [("SPX", d) for d in days]            # one request per session, once
    assert again.requests == 0 and again.planned == 0             # nothing requested again
    assert sm.requests == 4 and sm.bars == 1560 and sm.statuses["COMPLETE"] == 4 and sm.failed is None

    with open(SPX_CSV, newline="") as fh:
        recs = list(csv.DictReader(fh))
    want = {}
    for r in recs:
        t = dt.datetime.strptime(r["Date"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=ET)
        if dt.time(9, 30) <= t.time() <= dt.time(15, 59):
            want[t] = tuple(Decimal(r[k]) for k in ("Open", "High", "Low", "Close", "Volume"))
    assert len(want) == 1560 and len(recs) == 1563               # 3 rows at 16:00 in the file
    with psycopg.connect(db) as c:
        got = {r[0]: r[1:6] for r in c.execute(
            "SELECT bar_start, open, high, low, close, volume, wap, bar_count, con_id FROM ibkr_bar_1min").fetchall()}
        wap_ok = c.execute("""SELECT bool_and(wap = round((high + low + close) / 3, 2)),
                                     bool_and(con_id = 416904) FROM ibkr_bar_1min""").fetchone()
        at_1600 = c.execute("""SELECT count(*) FROM ibkr_bar_1min
                                WHERE (bar_start AT TIME ZONE 'America/New_York')::time >= '16:00'""").fetchone()[0]
    assert got == want                                           # exact decimals, every minute
    assert wap_ok == (True, True) and at_1600 == 0


# ------------------------------------------------------------------ a generated year


def test_generated_year_matches_the_nyse_calendar(db):
    """2024 for three contracts: every weekday's status matches XNYS: 390-bar
    sessions COMPLETE, the three 13:00 closes EARLY_CLOSE with 210 bars,
    holidays HOLIDAY without a request; requests newest first."""
    syms = ("AAPL", "MSFT", "IBM")
    notes = Notes()

    async def main():
        sim = RecordingSim(**sim_kw(generate=syms))
        await sim.start()
        try:
            sel = Selection(first=dt.date(2024, 1, 1), last=dt.date(2024, 12, 31))
            sm, rc = await backfill_service(db, contracts(*syms), sel, sim, notes, status_interval=0.5, concurrency=6)
            assert rc == 0
            return sm, sim.stats(), requested(sim.hist_log)
        finally:
            await sim.stop()

    sm, stats, reqs = run(main())
    st = statuses(db)
    counts = bar_counts(db)
    days = XNYS.days(dt.date(2024, 1, 1), dt.date(2024, 12, 31))
    assert len(st) == 3 * len(days)
    for sym in syms:
        for day, session in days:
            s = st[(sym, day)]
            if session is None:
                assert (s["status"], s["actual_bars"], s["attempts"]) == ("HOLIDAY", 0, 0), (sym, day)
                assert (sym, day) not in counts
            elif session.early_close:
                assert (s["status"], s["expected_bars"], s["actual_bars"]) == ("EARLY_CLOSE", 210, 210), (sym, day)
                assert counts[(sym, day)] == 210
            else:
                assert (s["status"], s["expected_bars"], s["actual_bars"]) == ("COMPLETE", 390, 390), (sym, day)
                assert counts[(sym, day)] == 390
    early = sorted(d.isoformat() for (sym, d), s in st.items() if s["status"] == "EARLY_CLOSE" and sym == "AAPL")
    assert early == ["2024-07-03", "2024-11-29", "2024-12-24"]
    assert sum(1 for (sym, _), s in st.items() if s["status"] == "HOLIDAY" and sym == "IBM") == 10
    # one request per session, none for a holiday, newest date first (then priority: AAPL first)
    assert len(reqs) == len(set(reqs)) == 3 * 252 == sm.requests
    assert all(XNYS.session(d) is not None for _, d in reqs)
    order = [d for _, d in reqs]
    assert order == sorted(order, reverse=True)
    assert reqs[0][0] == "AAPL" and reqs[0][1] == dt.date(2024, 12, 31)
    assert sm.bars == 3 * (249 * 390 + 3 * 210) and sm.holidays == 30 and sm.failed is None
    assert stats["historical"]["served"] == 756
    progress = [m for m in notes.msgs if m.startswith("STATUS=progress: sessions ")]
    assert progress and "ETA" in progress[-1]
    # ... and the pacing: the profile in force, the requests in flight, the rate
    assert re.search(r"; pacing \w+( \(\w+\))?, \d+/\d+ in flight, [\d.]+ requests/min$", progress[-1]), progress[-1]
    last = [m for m in notes.msgs if m.startswith("STATUS=")][-1]
    assert last.startswith("STATUS=summary: run ") and "756 sessions planned, 756 done" in last
    assert notes.msgs[-1] == "STOPPING=1"
    # the heartbeat row, as feedctl status shows it: the run's summary, stopped
    with psycopg.connect(db) as c:
        state, status, detail = c.execute("SELECT state, status, detail FROM feed_heartbeat WHERE unit = %s",
                                          (UNIT,)).fetchone()
    assert (state, status) == ("stopped", last[len("STATUS="):])
    assert detail["done"] == 756 and detail["bars"] == sm.bars


# ------------------------------------------------------------------ thin, errors


def test_thin_contract_recorded_complete_with_fewer_bars_and_not_refetched(db):
    async def main():
        sim = RecordingSim(**sim_kw(generate=("THIN", "AAPL"), thin=("THIN",)))
        await sim.start()
        try:
            sel = Selection(first=dt.date(2024, 7, 1), last=dt.date(2024, 7, 12))
            first, _ = await backfill(db, contracts("THIN", "AAPL"), sel, sim)
            n = len(sim.hist_log)
            second, _ = await backfill(db, contracts("THIN", "AAPL"), sel, sim)
            return first, second, requested(sim.hist_log, n)
        finally:
            await sim.stop()

    first, second, again = run(main())
    st = statuses(db)
    thin = [s for (sym, _), s in st.items() if sym == "THIN" and s["status"] != "HOLIDAY"]
    assert len(thin) == 9
    for s in thin:
        assert s["status"] in ("COMPLETE", "EARLY_CLOSE") and 0 < s["actual_bars"] < s["expected_bars"]
        assert s["note"].startswith(f"thin: {s['expected_bars'] - s['actual_bars']} of {s['expected_bars']} minutes")
    counts = bar_counts(db)
    assert all(counts[(sym, d)] == s["actual_bars"] for (sym, d), s in st.items() if s["actual_bars"])
    assert first.requests == 18 and second.requests == 0 and again == []


def test_unsettled_session_is_partial_and_fetched_again(db):
    """Fetched at 12:00 New York during the session (an explicit --date):
    PARTIAL with the bars so far; the next run, after the close, replaces
    them with the whole session (COMPLETE)."""
    noon = dt.datetime(2024, 7, 2, 12, 0, tzinfo=ET)
    day = dt.date(2024, 7, 2)

    async def main():
        sim = RecordingSim(**sim_kw(generate=("AAPL",), clock=noon.timestamp))
        await sim.start()
        try:
            lim = PacingLimiter(scale=0.001)
            bf = Backfill(settings(sim, 0.001), contracts("AAPL"), BackfillStore(db), limiter=lim, notifier=Notes(),
                          now=lambda: noon)
            first = await bf.run(Selection(first=day, last=day))
        finally:
            await sim.stop()
        mid = statuses(db)[("AAPL", day)], bar_counts(db)[("AAPL", day)]
        sim = RecordingSim(**sim_kw(generate=("AAPL",)))
        await sim.start()
        try:
            second, _ = await backfill(db, contracts("AAPL"), Selection(first=day, last=day), sim)
            third, _ = await backfill(db, contracts("AAPL"), Selection(first=day, last=day), sim)
        finally:
            await sim.stop()
        return first, mid, second, third

    first, (mid, mid_bars), second, third = run(main())
    assert mid["status"] == "PARTIAL" and mid["actual_bars"] == mid_bars == 151      # 09:30..12:00 (in progress)
    assert mid["note"] == "fetched before the session settled (151 of 390 bars)"
    assert first.statuses["PARTIAL"] == 1 and first.failed is None
    s = statuses(db)[("AAPL", day)]
    assert (s["status"], s["actual_bars"], s["attempts"], s["note"]) == ("COMPLETE", 390, 2, None)
    assert bar_counts(db)[("AAPL", day)] == 390
    assert (second.requests, third.requests) == (1, 0)


def test_unknown_symbol_is_error_with_ib_message_and_others_complete(db):
    async def main():
        sim = RecordingSim(**sim_kw(generate=("AAPL", "MSFT")))
        await sim.start()
        try:
            sel = Selection(first=dt.date(2024, 3, 4), last=dt.date(2024, 3, 8))
            return (await backfill(db, contracts("AAPL", "ZZZZ", "MSFT"), sel, sim))[0]
        finally:
            await sim.stop()

    sm = run(main())
    st = statuses(db)
    for d in range(4, 9):
        day = dt.date(2024, 3, d)
        z = st[("ZZZZ", day)]
        assert z["status"] == "ERROR" and z["actual_bars"] == 0 and z["attempts"] == 0
        assert z["error"] == "IB error 200: No security definition has been found for the request"
        assert st[("AAPL", day)]["status"] == st[("MSFT", day)]["status"] == "COMPLETE"
    assert sm.contract_errors == {"ZZZZ": "IB error 200: No security definition has been found for the request"}
    assert sm.requests == 10 and sm.failed is None
    with psycopg.connect(db) as c:
        assert c.execute("SELECT count(*) FROM ibkr_bar_1min WHERE symbol = 'ZZZZ'").fetchone()[0] == 0
        assert c.execute("SELECT con_id FROM ibkr_contract WHERE symbol = 'ZZZZ'").fetchone()[0] is None


@needs_spx
def test_no_data_error_is_recorded_never_holiday_or_complete_and_retried_on_request(db):
    """2019-11-11 is a trading day the recording does not cover: IB answers
    162 "HMDS query returned no data"; the session is ERROR with that text,
    not requested again unless --retry-failed."""
    async def main():
        sim = RecordingSim(**sim_kw(csv_files={"SPX": SPX_CSV}, generate=()))
        await sim.start()
        try:
            sel = Selection(first=dt.date(2019, 11, 11), last=dt.date(2019, 11, 11))
            a, _ = await backfill(db, contracts("SPX"), sel, sim)
            b, _ = await backfill(db, contracts("SPX"), sel, sim)
            sel.retry_failed = True
            c, _ = await backfill(db, contracts("SPX"), sel, sim)
            return a, b, c
        finally:
            await sim.stop()

    a, b, c = run(main())
    s = statuses(db)[("SPX", dt.date(2019, 11, 11))]
    assert s["status"] == "ERROR" and s["actual_bars"] == 0 and s["attempts"] == 2
    assert s["error"] == ("IB error 162: Historical Market Data Service error message:"
                          "HMDS query returned no data: SPX@CBOE Trades")
    assert (a.requests, b.requests, c.requests) == (1, 0, 1)
    assert a.statuses["ERROR"] == 1 and a.errors == 1


def test_unsubscribed_contract_354_recorded_as_error(db):
    async def main():
        sim = RecordingSim(**sim_kw(generate=("NOSUB", "AAPL"), unsubscribed=("NOSUB",)))
        await sim.start()
        try:
            return (await backfill(db, contracts("NOSUB", "AAPL"), Selection(first=dt.date(2024, 3, 8),
                                                                            last=dt.date(2024, 3, 8)), sim))[0]
        finally:
            await sim.stop()

    sm = run(main())
    st = statuses(db)
    assert st[("NOSUB", dt.date(2024, 3, 8))]["status"] == "ERROR"
    assert st[("NOSUB", dt.date(2024, 3, 8))]["error"] == "IB error 354: Requested market data is not subscribed."
    assert st[("AAPL", dt.date(2024, 3, 8))]["status"] == "COMPLETE"
    assert sm.requests == 1


# ------------------------------------------------------------------ pacing violations


def test_pacing_violations_recognised_backed_off_and_recorded(db):
    """IB's clock disagrees with ours: the simulator's pacing clock advances a
    fixed 0.0395 s per historical request, whatever the real time, so its
    ten-minute window (2.4 s at scale 0.004) holds 61 requests and the 61st
    request is refused with 162 pacing violation however the limiter spaced
    them.  The run backs off, records the error on the session, retries, and
    every session completes."""
    first, last = dt.date(2024, 1, 2), dt.date(2024, 2, 29)
    n_sessions = sum(1 for _, s in XNYS.days(first, last) if s is not None)
    assert 2 * n_sessions > 60                          # more requests than one window allows
    step = 0.0395                                       # 60 steps: 2.37 s < 2.4 s; 61 steps: 2.41 s
    ticks = itertools.count(1)

    async def main():
        sim = RecordingSim(**sim_kw(generate=("AAPL", "MSFT"), pacing_scale=0.004,
                                    pacer_clock=lambda: next(ticks) * step))
        await sim.start()
        try:
            lim = PacingLimiter(scale=0.002, keep_history=True)
            bf = Backfill(settings(sim, 0.002, max_attempts=30), contracts("AAPL", "MSFT"), BackfillStore(db),
                          limiter=lim, notifier=Notes())
            sm = await asyncio.wait_for(bf.run(Selection(first=first, last=last)), 300)
            return sm, sim.stats()
        finally:
            await sim.stop()

    sm, stats = run(main())
    refused = sum(stats["pacing_violations"].values())
    assert refused >= 1 and stats["pacing_violations"]["max_60_per_10min"] == refused
    assert sm.pacing_violations == refused
    assert stats["historical"]["served"] == 2 * n_sessions
    st = statuses(db)
    done = [s for s in st.values() if s["status"] != "HOLIDAY"]
    assert len(done) == 2 * n_sessions and all(s["status"] == "COMPLETE" for s in done)
    hit = [s for s in done if s["error"] and "pacing violation" in s["error"]]
    assert len(hit) >= 1 and all(s["attempts"] >= 2 for s in hit)
    assert sum(s["attempts"] for s in done) == sm.requests == 2 * n_sessions + refused
    assert sm.failed is None


# ------------------------------------------------------------------ connection


def test_forced_disconnect_mid_run_reconnects_and_finishes(db):
    async def main():
        sim = RecordingSim(**sim_kw(generate=("AAPL", "MSFT")))
        await sim.start()
        try:
            sim.fail_after(15)   # the 16th historical request: connection closed without an answer
            sm, bf = await backfill(db, contracts("AAPL", "MSFT"), Selection(first=dt.date(2024, 4, 1),
                                                                            last=dt.date(2024, 4, 30)), sim)
            return sm, sim.stats(), requested(sim.hist_log)
        finally:
            await sim.stop()

    sm, stats, reqs = run(main())
    assert stats["connections"]["accepted"] == 2 and stats["connections"]["forced_disconnects"] == 1
    assert sm.reconnects == 1 and sm.failed is None
    st = statuses(db)
    assert len(st) == 2 * 22 and all(s["status"] == "COMPLETE" for s in st.values())
    counts = bar_counts(db)
    assert len(counts) == 44 and set(counts.values()) == {390}
    # only the unanswered request(s) were sent twice
    assert len(reqs) - len(set(reqs)) <= 4
    with psycopg.connect(db) as c:
        assert c.execute("SELECT reconnects, state FROM ibkr_backfill_run").fetchone() == (1, "finished")


def test_disconnect_while_resolving_contracts_reconnects(db):
    async def main():
        sim = RecordingSim(**sim_kw(generate=("AAPL", "MSFT")))
        await sim.start()
        try:
            sim.fail_after(1, "reqHeadTimeStamp")   # the second head timestamp request: connection closed
            sm, _ = await backfill(db, contracts("AAPL", "MSFT"), Selection(first=dt.date(2024, 3, 4),
                                                                           last=dt.date(2024, 3, 8)), sim)
            return sm, sim.stats()
        finally:
            await sim.stop()

    sm, stats = run(main())
    assert stats["connections"]["accepted"] == 2 and stats["connections"]["forced_disconnects"] == 1
    assert stats["requests"]["reqHeadTimeStamp"] == 3          # AAPL once (kept), MSFT twice
    assert sm.failed is None and sm.statuses["COMPLETE"] == 10


def test_connectivity_1100_pauses_requests_until_1102(db):
    """1100 (connectivity lost) while requests flow: no request is sent from
    the moment the client reads it until it reads 1102 (restored); then the
    run goes on and finishes with every session complete."""
    gap = 0.6

    async def main():
        sim = RecordingSim(**sim_kw(generate=("AAPL", "MSFT"), pacing_scale=0.002))
        await sim.start()
        lim = PacingLimiter(scale=0.002, keep_history=True)
        bf = Backfill(settings(sim, 0.002), contracts("AAPL", "MSFT"), BackfillStore(db), limiter=lim,
                      notifier=Notes())
        sent_when: dict[int, int] = {}      # IB code -> requests the client had sent when it read that code

        def on_error(req_id, code, text, contract):
            if code in (1100, 1102):
                sent_when.setdefault(code, bf.summary.requests)

        def cut(n: int) -> None:
            if n == 20:                     # mid-run: the 20th request read, more to come
                bf.ib.errorEvent += on_error
                sim.connectivity_loss(gap=gap, data_lost=False)

        sim.on_request = cut
        try:
            sm = await asyncio.wait_for(bf.run(Selection(first=dt.date(2024, 1, 2), last=dt.date(2024, 2, 15))),
                                        300)
            return sm, sim.stats(), sent_when
        finally:
            await sim.stop()

    sm, stats, sent_when = run(main())
    assert stats["connections"]["connectivity_losses"] == 1 and sm.connectivity_losses == 1
    assert set(sent_when) == {1100, 1102}, sent_when
    assert sent_when[1102] == sent_when[1100]           # nothing sent while connectivity was lost
    assert sm.requests > sent_when[1102]                # requests went on after 1102
    assert sm.failed is None and sm.reconnects == 0
    assert all(s["status"] == "COMPLETE" for s in statuses(db).values() if s["status"] != "HOLIDAY")


def test_connectivity_1101_data_lost_resends_open_requests(db):
    """1100 then 1101 ("data lost") while requests are open: the open requests
    are cancelled and sent again, the run finishes with every session
    complete.  The simulator answers after 50 ms, but after 30 s from the
    10th request on until the client has read 1101, so requests are certainly
    open then (and a client ignoring 1101 would wait for those answers: the
    request timeout is longer)."""
    async def main():
        sim = RecordingSim(**sim_kw(generate=("AAPL", "MSFT"), latency=0.05))
        await sim.start()
        lim = PacingLimiter(scale=0.001, keep_history=True)
        bf = Backfill(settings(sim, 0.001, request_timeout=60), contracts("AAPL", "MSFT"), BackfillStore(db),
                      limiter=lim, notifier=Notes())

        def on_error(req_id, code, text, contract):
            if code == 1101:                # after the client's own handling of it
                sim.latency = 0.05

        def cut(n: int) -> None:
            if n == 10:
                sim.latency = 30.0          # this request (and any before 1101 is read) stays open
                bf.ib.errorEvent += on_error
                sim.connectivity_loss(gap=0.01, data_lost=True)

        sim.on_request = cut
        try:
            sm = await asyncio.wait_for(bf.run(Selection(first=dt.date(2024, 3, 4), last=dt.date(2024, 3, 22))),
                                        300)
            return sm, sim.stats(), requested(sim.hist_log)
        finally:
            await sim.stop()

    sm, stats, reqs = run(main())
    assert stats["errors_sent"].get(1101) == 1 and sm.connectivity_losses == 1
    resent = len(reqs) - len(set(reqs))
    assert resent >= 1 and stats["historical"]["cancelled"] >= 1
    assert sm.failed is None and sm.reconnects == 0 and len(set(reqs)) == 30
    assert all(s["status"] == "COMPLETE" for s in statuses(db).values())
    assert set(bar_counts(db).values()) == {390}


def test_client_id_in_use_takes_the_next_one(db):
    async def main():
        sim = RecordingSim(**sim_kw(generate=("AAPL",)))
        await sim.start()
        other = IB()
        try:
            await other.connectAsync("127.0.0.1", sim.port, clientId=71, timeout=5)
            sm, bf = await backfill(db, contracts("AAPL"), Selection(first=dt.date(2024, 3, 8),
                                                                    last=dt.date(2024, 3, 8)), sim)
            return sm, bf.client_id, sim.stats()
        finally:
            other.disconnect()
            await sim.stop()

    sm, cid, stats = run(main())
    assert cid == 72 and stats["connections"]["refused_duplicate_client_id"] == 1
    assert stats["client_ids_seen"] == [71, 72] and sm.statuses["COMPLETE"] == 1


# ------------------------------------------------------------------ command line


@pytest.fixture
def cli_env(tmp_path, db, monkeypatch):
    """A TWS simulator in a thread, an ibkr.toml and contracts file pointing at it."""
    from feeds.sim.tws import TwsSimulatorThread

    with TwsSimulatorThread(**sim_kw(generate=("AAPL", "MSFT"), pacing_scale=0.001)) as sim:
        (tmp_path / "contracts.csv").write_text(
            "symbol,secType,exchange,currency,primaryExchange,priority,lastTradeDateOrContractMonth\n"
            "AAPL,STK,SMART,USD,NASDAQ,1,\nMSFT,STK,SMART,USD,NASDAQ,0,\nES,FUT,CME,USD,,0,202703\n")
        cfg = tmp_path / "ibkr.toml"
        cfg.write_text(f'[ibkr]\nport = {sim.port}\ncontracts_file = "{tmp_path / "contracts.csv"}"\n'
                       f'connect_timeout = 5\n[backfill]\npacing_profile = "strict"\npacing_scale = 0.001\n'
                       f'status_interval = 1\n'
                       f'reconnect_timeout = 5\n[metrics]\ntextfile_dir = ""\n')
        monkeypatch.setenv("FEEDS_DSN", db)
        yield cfg, sim


def cli(*args):
    from feeds.ibkr.main import main
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_cli_dry_run_status_and_test_connection(cli_env, db):
    cfg, sim = cli_env
    # dry run: the plan back to the head timestamp, nothing fetched or written
    r = cli("--config", str(cfg), "--dry-run", "--symbols", "AAPL", "MSFT", "--from", "2024-01-01", "--to",
            "2024-12-31")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    aapl = next(ln for ln in lines if ln.startswith("AAPL "))
    assert aapl.split()[-5:] == ["252", "0", "10", "0", "252"], aapl
    assert "2015-01-02 14:30" in aapl                                   # IB's head timestamp
    assert lines[-1].startswith("total: 504 sessions to fetch, 504 requests; pacing (60 per ")
    assert "implies at least" in lines[-1]
    assert sim.stats()["requests"].get("reqHistoricalData", 0) == 0
    assert statuses(db) == {}

    # dry run without --from: from the last finished session back to the head timestamp
    r = cli("--config", str(cfg), "--dry-run", "--symbols", "MSFT")
    msft = next(ln for ln in r.stdout.splitlines() if ln.startswith("MSFT "))
    last = XNYS.last_finished(dt.datetime.now(UTC), dt.timedelta(minutes=30)).day
    n = sum(1 for _, s in XNYS.days(dt.date(2015, 1, 2), last) if s is not None)
    assert f"2015-01-02 {last}" in " ".join(msft.split()) and msft.split()[-1] == str(n), msft

    # a real run for one week, then the status table
    r = cli("--config", str(cfg), "--symbols", "AAPL,MSFT", "--from", "2024-07-01", "--to", "2024-07-05")
    assert r.exit_code == 0, r.output
    # its heartbeat row is what feedctl status shows
    from feeds.cli import feedctl
    r = CliRunner().invoke(feedctl, ["status", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    row = next(x for x in json.loads(r.stdout)["units"] if x["unit"] == "feed-backfill.service")
    assert row["state"] == "stopped" and row["status"].startswith("summary: run 1 finished in "), row
    # a second feed-backfill while one runs: exit 75, and the running one's heartbeat row is left alone
    from feeds.ibkr.store import _LOCK_KEY
    beat = "SELECT updated_at, state FROM feed_heartbeat WHERE unit = 'feed-backfill.service'"
    with psycopg.connect(db, autocommit=True) as running:
        running.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        before = running.execute(beat).fetchone()
        r = cli("--config", str(cfg), "--symbols", "AAPL", "--from", "2024-07-08", "--to", "2024-07-08")
        assert r.exit_code == 75 and "another feed-backfill is running" in r.output, r.output
        assert running.execute(beat).fetchone() == before
    r = cli("--config", str(cfg), "--status")
    assert r.exit_code == 0, r.output
    head, aapl = r.stdout.splitlines()[:2]
    assert head.split()[:8] == ["symbol", "complete", "early_close", "thin", "partial", "error", "pending", "holiday"]
    assert aapl.split() == ["AAPL", "3", "1", "0", "0", "0", "0", "1", "2024-07-01", "2024-07-05", "1,380"]
    assert "last run 1: finished" in r.stdout and "8 requests (" in r.stdout    # and the rate achieved
    assert "now (" not in r.stdout                                       # no run going on
    # while a run goes on: its progress line from the heartbeat row (pacing in force, in flight, rate)
    progress = ("progress: sessions 3/10 (30%), requests 3, bars 1,170, errors 0, pacing waits 0.0s, ETA 5s; "
                "pacing auto (documented), 2/4 in flight, 12.5 requests/min")
    with psycopg.connect(db, autocommit=True) as c:
        c.execute("INSERT INTO ibkr_backfill_run (host, pid, arguments, requests, started_at) "
                  "VALUES ('h', 1, 'x', 300, now() - interval '200 minutes')")
        c.execute("UPDATE feed_heartbeat SET state = 'running', status = %s, updated_at = now() "
                  "WHERE unit = 'feed-backfill.service'", (progress,))
    r = cli("--config", str(cfg), "--status")
    assert r.exit_code == 0, r.output
    assert "last run 2: running" in r.stdout and "300 requests (1.5/min)" in r.stdout, r.stdout
    now = next(ln for ln in r.stdout.splitlines() if ln.startswith("now ("))
    assert now.startswith("now (running, heartbeat ") and now.endswith(" ago): " + progress), now

    # --priority-only: only contracts with priority > 0 (AAPL)
    r = cli("--config", str(cfg), "--dry-run", "--priority-only", "--from", "2024-07-01", "--to", "2024-07-05")
    assert r.exit_code == 0, r.output
    assert [ln.split()[0] for ln in r.stdout.splitlines()[1:-1]] == ["AAPL"]

    r = cli("--config", str(cfg), "--test-connection")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"connected to 127.0.0.1:{sim.port} clientId 71, server version 178")
    assert "ok   AAPL conId 265598 STK SMART/NASDAQ US/Eastern calendar XNYS head timestamp 2015-01-02" in r.stdout
    assert "ES" not in r.stdout                                        # FUT rows are not resolved


def test_cli_bad_contracts_file_exits_78(tmp_path, monkeypatch):
    (tmp_path / "contracts.csv").write_text("symbol,secType,exchange,currency\nAAPL,STK,SMART,USD\nX,BOND,SMART,USD\n")
    cfg = tmp_path / "ibkr.toml"
    cfg.write_text(f'[ibkr]\ncontracts_file = "{tmp_path / "contracts.csv"}"\n')
    monkeypatch.setenv("FEEDS_DSN", "host=127.0.0.1 port=1 dbname=none")
    from feeds.ibkr.main import main
    r = CliRunner().invoke(main, ["--config", str(cfg), "--status"])
    assert r.exit_code == 78
    assert r.stderr.strip() == (f"contracts file {tmp_path / 'contracts.csv'} line 3 field 'secType': "
                                "'BOND' is not one of STK, IND, FUT, OPT")
