"""The auto pacing profile against the TWS simulator's strict model: what it learns survives a restart
and IB is not probed again within relearn (stored at a scaled run only when asked for:
keep_learned_when_scaled); a scaled run otherwise neither loads nor stores it; after a restart the
requests of the earlier run are counted with the identical-request key they were sent with, whatever
days_per_request; several sessions per request survive a kill -9 with no completed session lost or asked
again, and end equal to one request per session.  Outcomes are read from the database and the
simulator's request log, never from how long anything took."""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import threading

import pytest

from conftest import ROOT
from feeds.ibkr.backfill import Backfill, Selection, Settings, _Resolved, pacing_limiter
from feeds.ibkr.pacing import DOCUMENTED, STRICT, LearnedPacing
from feeds.ibkr.store import BackfillStore
from feeds.migrate import apply
from test_ibkr_backfill import ET, UTC, XNYS, Notes, RecordingSim, contracts, settings, sim_kw, statuses
from scaled_pacing import SLOW_ANSWER
from test_ibkr_kill import (BARS_SQL, STATUS_SQL, SimThread, assert_whole, q, start_backfill, wait_complete,
                            write_config)

pytestmark = pytest.mark.integration

SCALE = 0.05                    # IB's ten minutes become 30 s: a run's first 60 requests all fall in one window


def learned_rows(dsn):
    return q(dsn, "SELECT endpoint, bar_size, profile, concurrency, learned_at, why FROM ibkr_pacing_learned")


def test_learned_profile_survives_a_restart_and_is_not_probed_again(db):
    first, last = dt.date(2024, 1, 2), dt.date(2024, 2, 21)       # 35 sessions x 2: more than 60 requests
    n = 2 * sum(1 for _, s in XNYS.days(first, last) if s is not None)
    assert 60 < n <= 120

    async def main():
        sim = RecordingSim(**sim_kw(generate=("AAPL", "MSFT"), pacing_scale=SCALE, pacing_model="strict"))
        await sim.start()
        try:
            # 1. auto starts as documented, is refused once past 60 in the window, falls back and learns strict
            s = settings(sim, SCALE, pacing_profile="auto", relearn=3600.0, max_attempts=10,
                         keep_learned_when_scaled=True, slow_answer=SLOW_ANSWER["strict"])
            lim1 = pacing_limiter(s, keep_history=True)
            assert lim1.in_force == DOCUMENTED
            bf = Backfill(s, contracts("AAPL", "MSFT"), BackfillStore(db), limiter=lim1, notifier=Notes())
            sm1 = await asyncio.wait_for(bf.run(Selection(first=first, last=last)), 300)
            refused1 = sum(sim.stats()["pacing_violations"].values())
            rows1 = learned_rows(db)
            # 2. a new process: starts from what was learned, sends within strict, learns nothing new
            lim2 = pacing_limiter(s, keep_history=True)
            bf = Backfill(s, contracts("AAPL", "MSFT"), BackfillStore(db), limiter=lim2, notifier=Notes())
            log_mark = len(sim.hist_log)
            # more than 60 requests: a limiter that had learned nothing would be refused again
            sm2 = await asyncio.wait_for(bf.run(Selection(first=dt.date(2024, 2, 22), last=dt.date(2024, 4, 30))),
                                         600)
            refused2 = sum(sim.stats()["pacing_violations"].values()) - refused1
            return sm1, sm2, lim1, lim2, refused1, refused2, rows1, len(sim.hist_log) - log_mark, sim.port
        finally:
            await sim.stop()

    sm1, sm2, lim1, lim2, refused1, refused2, rows1, sent2, port = asyncio.run(main())
    assert sm1.failed is None and sm2.failed is None
    assert refused1 == 1 and lim1.violations == 1 and lim1.in_force == STRICT          # one refusal, then none
    assert len(rows1) == 1
    endpoint, bar_size, profile, concurrency, at, why = rows1[0]
    assert (endpoint, bar_size, profile) == (f"127.0.0.1:{port}", "1 min", STRICT)
    assert "pacing violation" in why
    # the second run: strict from its first request, nothing refused, nothing learned again
    assert refused2 == 0 and lim2.violations == 0 and sent2 == sm2.requests > 60
    assert lim2.in_force == STRICT and lim2.learned is not None and lim2.learned.at == at
    assert learned_rows(db) == rows1
    done = [s for s in statuses(db).values() if s["status"] != "HOLIDAY"]
    assert all(s["status"] == "COMPLETE" for s in done) and len(done) == sm1.planned + sm2.planned
    # once relearn has passed, the same learning no longer holds: auto probes as documented again
    lim3 = pacing_limiter(settings_like(relearn=0.0))
    lim3.resume(lim2.learned)
    assert lim3.in_force == DOCUMENTED


def test_a_scaled_run_neither_loads_nor_stores_what_auto_learns(db, caplog):
    """What auto learns against a simulator with scaled windows describes the simulator: without
    keep_learned_when_scaled it is not stored under the endpoint (a real run would start from it), nor is
    a stored learning loaded; one log line says so."""
    store = BackfillStore(db)
    stored = LearnedPacing(STRICT, 2, dt.datetime.now(UTC), "pacing violation")
    store.save_learned_pacing("127.0.0.1:7497", "1 min", stored)
    scaled = Settings(pacing_profile="auto", pacing_scale=SCALE, relearn=3600.0)
    lim = pacing_limiter(scaled)
    bf = Backfill(scaled, contracts("AAPL"), store, limiter=lim, notifier=Notes())
    assert lim.on_learn is None

    async def go():
        try:
            with caplog.at_level("INFO", logger="feeds.ibkr.backfill"):
                await bf._load_pacing()
        finally:
            bf._shutdown_executor()
    asyncio.run(go())
    assert lim.in_force == DOCUMENTED and lim.learned is None                  # the stored strict not loaded
    said = [r.getMessage() for r in caplog.records if "neither loaded nor stored" in r.getMessage()]
    assert len(said) == 1 and f"pacing_scale {SCALE:g}" in said[0]
    lim.violation()                                                           # IB refused: auto learns strict
    assert learned_rows(db) == [("127.0.0.1:7497", "1 min", STRICT, 2, stored.at, "pacing violation")]
    # at IB's own windows, or when asked for, it is loaded and stored
    for s in (Settings(pacing_profile="auto", relearn=3600.0),
              Settings(pacing_profile="auto", pacing_scale=SCALE, relearn=3600.0, keep_learned_when_scaled=True)):
        lim = pacing_limiter(s)
        bf = Backfill(s, contracts("AAPL"), store, limiter=lim, notifier=Notes())
        assert lim.on_learn is not None

        async def load(bf=bf):
            try:
                await bf._load_pacing()
            finally:
                bf._shutdown_executor()
        asyncio.run(load())
        assert lim.in_force == STRICT and lim.learned == stored


@pytest.mark.parametrize("days", [1, 5])
def test_a_restart_counts_each_earlier_request_under_the_key_it_was_sent_with(db, days):
    """IB's identical-request rule (15 s) across a restart: the request an earlier run sent for Mon 07-08
    .. Fri 07-12 (one "5 D" request ending at Friday's close, or five of "1 D") is counted by a new run's
    limiter under that very key, so sending it again waits; another key does not."""
    store = BackfillStore(db)
    row = contracts("AAPL")[0]
    week = [XNYS.session(dt.date(2024, 7, d)) for d in (12, 11, 10, 9, 8)]
    sent = [week] if days == 5 else [[s] for s in week]
    for chunk in sent:                                     # as _fetch notes a request's sessions, one per request
        store.note_requests([("AAPL", 265598, s) for s in chunk])
    # documented: for one-minute bars only the identical-request rule (and the open limit) holds a request back
    s = Settings(days_per_request=days, pacing_profile=DOCUMENTED)
    bf = Backfill(s, [row], store, limiter=pacing_limiter(s), notifier=Notes())
    bf._resolved["AAPL"] = _Resolved(row, con_id=265598)

    async def go():
        try:
            await bf._seed_pacing()
        finally:
            bf._shutdown_executor()
    asyncio.run(go())

    def key(end: dt.date, duration: str) -> tuple:
        close = XNYS.session(end).close.astimezone(UTC).strftime("%Y%m%d-%H:%M:%S")
        return (265598, row.exchange, close, duration, "1 min", "TRADES", True, 2)

    ckey = (265598, row.exchange, "TRADES")
    lim = bf.limiter
    for chunk in sent:
        ident = key(chunk[0].day, f"{len(chunk)} D")
        assert lim.delay(ident, ckey) > 0.5 * lim.identical_window, ident       # the same request waits
    if days == 5:
        assert lim.delay(key(dt.date(2024, 7, 12), "1 D"), ckey) == 0            # not the key sent
    assert lim.delay(key(dt.date(2024, 7, 15), "1 D"), ckey) == 0


def settings_like(**kw):
    return Settings(pacing_profile="auto", **kw)


class DurationSim(RecordingSim):
    """Also records each request's durationStr: ``dur_log`` of ``(connection, symbol, endDateTime,
    durationStr)``."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.dur_log: list[tuple[object, str, str, str]] = []

    def _historical_data(self, conn, f):
        self.dur_log.append((conn, f[3].upper(), f[15], f[17]))
        return super()._historical_data(conn, f)


class DurationSimThread(SimThread):
    def __init__(self, **kw):
        self.loop = asyncio.new_event_loop()
        self.sim = DurationSim(**kw)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)


def covered(entries) -> list[tuple[str, dt.date]]:
    """The sessions each logged request covers: ``N D`` back from its end (N weekdays, holidays counted)."""
    out = []
    for sym, end, dur in entries:
        day = dt.datetime.strptime(end, "%Y%m%d-%H:%M:%S").replace(tzinfo=UTC).astimezone(ET).date()
        n = int(dur.split()[0])
        while n:
            if day.weekday() < 5:
                n -= 1
                if XNYS.session(day) is not None:
                    out.append((sym, day))
            day -= dt.timedelta(days=1)
    return out


FIRST, LAST = dt.date(2024, 1, 2), dt.date(2024, 4, 30)     # MLK day, Presidents' Day, Good Friday inside


def test_kill_9_mid_run_with_multi_day_requests_loses_no_completed_session(db, pg, tmp_path):
    ref = pg.dsn(pg.create_db())
    apply(ref, ROOT / "sql")
    cs = tmp_path / "contracts.csv"
    cs.write_text("symbol,secType,exchange,currency,primaryExchange,priority\n"
                  "AAPL,STK,SMART,USD,NASDAQ,1\nMSFT,STK,SMART,USD,NASDAQ,0\n")
    out = tmp_path / "backfill.log"
    sessions = {(sym, d) for sym in ("AAPL", "MSFT") for d, s in XNYS.days(FIRST, LAST) if s is not None}
    with DurationSimThread(**sim_kw(generate=("AAPL", "MSFT"), pacing_scale=0.001, latency=0.4)) as st:
        cfg = write_config(tmp_path / "ibkr.toml", st.sim.port, cs, 0.001, profile="strict", days=5)
        # 1. killed with SIGKILL once some requests' sessions are stored
        p = start_backfill(cfg, db, out, str(FIRST), str(LAST))
        wait_complete(db, p, 10, out)
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(10) == -signal.SIGKILL
        stored = {(r[0], r[1]) for r in q(db, "SELECT symbol, session_date FROM ibkr_session_status "
                                              "WHERE status IN ('COMPLETE', 'EARLY_CLOSE')")}
        assert 10 <= len(stored) < len(sessions)
        durations = {d for _, _, _, d in st.sim.dur_log}
        assert "5 D" in durations and durations <= {f"{k} D" for k in range(1, 6)}
        # every stored session whole: its bars all there, as its row says; no bar of a session not stored
        assert_whole(db, stored)
        # the killed run's connections: a request of it the simulator reads only after the kill (still in
        # its socket when the process died) is the killed run's, not the new run's
        killed = {e[0] for e in st.sim.dur_log}

        # 2. a new run asks only for what was not stored: no completed session requested again
        p = start_backfill(cfg, db, out, str(FIRST), str(LAST))
        assert p.wait(180) == 0, out.read_text()[-3000:]
        again = covered([e[1:] for e in st.sim.dur_log if e[0] not in killed])
        assert not set(again) & stored
        assert set(again) == sessions - stored and len(again) == len(set(again))

    # 3. one request per session into another database: the same tables
    with SimThread(**sim_kw(generate=("AAPL", "MSFT"), pacing_scale=0.001)) as st2:
        p = start_backfill(write_config(tmp_path / "ref.toml", st2.sim.port, cs, 0.001, profile="strict"),
                           ref, out, str(FIRST), str(LAST))
        assert p.wait(180) == 0, out.read_text()[-3000:]
    s1, s2 = q(db, STATUS_SQL), q(ref, STATUS_SQL)
    assert s1 == s2 and {r[2] for r in s1} == {"COMPLETE", "HOLIDAY"}
    assert q(db, BARS_SQL) == q(ref, BARS_SQL)
    assert q(db, "SELECT run_id, state FROM ibkr_backfill_run ORDER BY run_id") == [(1, "interrupted"),
                                                                                  (2, "finished")]
