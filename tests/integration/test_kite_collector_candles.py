"""feed-zerodha's candles end to end: the real program against the Kite
simulator and a throwaway PostgreSQL.

The simulator keeps the minute candles of the trades it generated and sent
as ticks, and serves them from its historical candles API; the candles the
collector stores in ``kite_candle`` are compared with them.  A session
around now comes from ``kite.extra_sessions`` (the XNSE calendar plus an
operator's extra session), opening on the minute boundary just after the
simulator started, so every session minute is one of the simulator's own.
The intervals are 1, 2 and 3 minutes (aligned to the session's open like
the default 1, 5, 15) so that larger candles complete within the test.
"""
from __future__ import annotations

import asyncio
import json
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import aiohttp
import pytest

from test_kite_collector import collectors, q, sim_for, wait_for  # noqa: F401  (collectors: a fixture)
from feeds.kite.session import IST

pytestmark = pytest.mark.integration

UTC = timezone.utc
FULL = ("SIMEQ00031", "SIMEQ00032")
LTP = "SIMEQ00033"
INTERVALS = (1, 2, 3)
CANDLES = {"intervals": list(INTERVALS), "grace": 1.0, "lateness": 3.0}


def session_today(sim_started: datetime) -> tuple[datetime, datetime]:
    """A session opening at the start of the minute the simulator started in
    (its first minute of generated trades), two hours long or to 23:59 IST
    when that comes first: the collector starts inside it."""
    open_ = sim_started.astimezone(IST).replace(second=0, microsecond=0)
    close = min(open_ + timedelta(hours=2), open_.replace(hour=23, minute=59))
    if close - open_ < timedelta(minutes=10):
        pytest.skip("fewer than ten minutes to midnight IST: too short a session today")
    return open_, close


def tokens_of(db: str, names) -> dict[str, int]:
    rows = q(db, "select tradingsymbol, instrument_token from kite_instrument where tradingsymbol = any(%s)",
             list(names))
    return dict(rows)


def sim_candles(sim, token: int, open_: datetime, interval: int) -> dict[datetime, tuple]:
    """The simulator's candles of ``interval`` minutes (aligned to the session open) from its minute candles
    of the trades it generated: bar start -> (open, high, low, close, volume, trades, minutes)."""
    out: dict[datetime, list] = {}
    for b in sim.minute_bars(token):
        t = datetime.fromtimestamp(b.minute, UTC)
        if t < open_:
            continue
        k = open_ + timedelta(minutes=(t - open_) // timedelta(minutes=1) // interval * interval)
        c = out.get(k)
        p = [Decimal(x) / 100 for x in (b.open, b.high, b.low, b.close)]
        if c is None:
            out[k] = [p[0], p[1], p[2], p[3], b.volume, b.trades, {t}]
        else:
            c[1], c[2], c[3] = max(c[1], p[1]), min(c[2], p[2]), p[3]
            c[4] += b.volume
            c[5] += b.trades
            c[6].add(t)
    return {k: tuple(v) for k, v in out.items()}


def latest(db: str, token: int, interval: int) -> dict[datetime, tuple]:
    rows = q(db, "select bar_start, open, high, low, close, volume, ticks, final, source, bar_end from candle_latest "
                 "where venue = 'kite' and instrument = %s and interval_min = %s", str(token), interval)
    return {r[0]: r[1:] for r in rows}


class Observer:
    """Another ticker client subscribed to ``tokens`` (full mode): the simulator
    keeps trading them while the collector is down."""

    def __init__(self, sim, tokens: list[int]):
        self.sim, self.tokens = sim, tokens
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.frames = 0
        asyncio.run_coroutine_threadsafe(self._open(), self.loop).result(15)

    async def _open(self):
        self.http = aiohttp.ClientSession()
        token = self.sim.issue_access_token()
        self.ws = await self.http.ws_connect(f"{self.sim.ws_url}?api_key={self.sim.account.api_key}"
                                             f"&access_token={token}")
        await self.ws.send_str(json.dumps({"a": "subscribe", "v": self.tokens}))
        await self.ws.send_str(json.dumps({"a": "mode", "v": ["full", self.tokens]}))
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self):
        async for _ in self.ws:
            self.frames += 1

    async def _close(self):
        await self.ws.close()
        self.reader.cancel()
        await self.http.close()

    def close(self):
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


def test_live_candles_match_the_venue_stop_writes_open_ones_and_a_restart_fills_from_history(
        tmp_path, db, collectors):
    instruments = [f"NSE:{s} full" for s in FULL] + [f"NSE:{LTP} ltp"]
    with sim_for(rate=4).running() as sim:
        sim_started = datetime.now(UTC)
        open_, close = session_today(sim_started)
        session = {"kite.extra_sessions": {open_.date().isoformat(): [f"{open_:%H:%M}", f"{close:%H:%M}"]},
                   "candles": CANDLES}
        kite = {"session_calendar": "XNSE"}
        a = collectors(tmp_path / "a", db, sim, instruments, kite=kite, sections=session)
        tok = wait_for(lambda: len(tokens_of(db, FULL + (LTP,))) == 3 and tokens_of(db, FULL + (LTP,)))
        assert tok, a.output[-3000:]
        full_tokens = [tok[s] for s in FULL]
        # ticks flow from here on: the minute it is in was seen only in part (the collector leaves that
        # one to the history fill), every later one completely
        a.wait_line("first batch stored; READY")
        a_start = datetime.now(UTC)
        # two complete minutes after the one it subscribed in, closed by the timer (no tick needed)
        first_full = _minute(a_start) + timedelta(minutes=1)
        final_live = lambda: q(db, "select count(*) from kite_candle where instrument_token = %s and interval_min = 1 "
                                   "and final and source = 'live' and bar_start >= %s", full_tokens[0], first_full)[0][0]
        assert wait_for(lambda: final_live() >= 2, timeout=240), a.output[-3000:]
        a.wait_line("candles: history fill")
        assert a.stop() == 0
        a_stop = datetime.now(UTC)
        assert "candles: " in a.output and "written at the stop (open ones not final)" in a.output

        # --- the live candles are the venue's: every final one-minute candle of the full-mode instruments
        for t in full_tokens:
            venue = sim_candles(sim, t, open_, 1)
            live = q(db, "select bar_start, open, high, low, close, volume, ticks from kite_candle where "
                         "instrument_token = %s and interval_min = 1 and final and source = 'live'", t)
            assert len(live) >= 2
            for bar_start, o, h, lo, c, v, n in live:
                assert (o, h, lo, c, v, n) == venue[bar_start][:6], (bar_start, venue.get(bar_start))
            # and no complete minute the collector saw is missing
            seen = {r[0] for r in live}
            for m in venue:
                if first_full <= m and m + timedelta(minutes=1) <= _minute(a_stop):
                    assert m in seen, m
        # the LTP-only instrument: volume NULL, every tick counted
        ltp_rows = q(db, "select volume, ticks, low <= open and open <= high from kite_candle "
                         "where instrument_token = %s and source = 'live'", tok[LTP])
        assert ltp_rows and all(v is None and n > 0 and ok for v, n, ok in ltp_rows)
        # the stop wrote the open candles with final = false: the stop minute's of every interval
        for t in full_tokens:
            for n in INTERVALS:
                last = q(db, "select final from kite_candle where instrument_token = %s and interval_min = %s "
                             "order by bar_start desc, recorded_at desc limit 1", t, n)
                assert last == [(False,)], (t, n)

        # --- down for a while; the venue keeps trading (another client is subscribed)
        obs = Observer(sim, list(tok.values()))
        gap_until = _minute(a_stop) + timedelta(minutes=2)
        assert wait_for(lambda: datetime.now(UTC) >= gap_until + timedelta(seconds=1), timeout=200)
        obs.close()
        assert obs.frames > 0

        # --- the restart fills the missed minutes from the historical API, source 'history'
        b = collectors(tmp_path / "b", db, sim, instruments, kite=kite, sections=session)
        b_start = datetime.now(UTC)
        done = b.wait_line("candles: history fill done", timeout=240)
        assert "3 instrument(s) filled" in done and "0 failed" in done, b.output[-3000:]
        assert b.stop() == 0
        venues = {(t, n): sim_candles(sim, t, open_, n) for t in full_tokens for n in INTERVALS}
    last_live_final = max(r[0] for r in q(db, "select bar_start from kite_candle where instrument_token = %s and "
                                             "interval_min = 1 and final and source = 'live' and bar_start < %s",
                                          full_tokens[0], a_stop))
    missed = [last_live_final + timedelta(minutes=i) for i in range(1, 10)
              if last_live_final + timedelta(minutes=i) <= _minute(b_start)]
    assert len(missed) >= 3                    # the stop minute, the gap minute(s), the restart minute
    for t in full_tokens:
        venue = venues[(t, 1)]
        now = latest(db, t, 1)
        for m in missed:
            assert m in venue, m               # the venue traded in every missed minute
            o, h, lo, c, v, n, final, source, _ = now[m]
            assert (final, source) == (True, "history"), m
            assert (o, h, lo, c, v) == venue[m][:5], (m, now[m], venue[m])
        # final larger candles made of history minutes only equal the venue's
        checked = 0
        for n_min in (2, 3):
            venue_n = venues[(t, n_min)]
            for start, row in latest(db, t, n_min).items():
                if row[7] == "history" and row[6]:
                    assert row[:5] == venue_n[start][:5], (n_min, start, row, venue_n[start])
                    checked += 1
        assert checked >= 1
    # the LTP-only instrument's history minutes have no volume either
    assert all(v is None for (v,) in q(db, "select volume from kite_candle where instrument_token = %s and "
                                           "source = 'history'", tok[LTP]))
    assert q(db, "select count(*) from kite_candle where source = 'history' and instrument_token = %s",
             tok[LTP])[0][0] >= 3


# ---------------------------------------------------------------------------------- --test-connection

def test_test_connection_prints_the_plan_and_each_answer_and_writes_nothing(tmp_path, db, collectors):
    with sim_for(rate=0).running() as sim:
        ok = collectors(tmp_path / "ok", db, sim, ["NSE:INFY full", "NSE:SIMEQ00041 quote", "NSE:NIFTY 50 ltp"],
                        args=("--test-connection",))
        assert ok.wait() == 0, ok.output[-3000:]
        bad = collectors(tmp_path / "bad", db, sim, ["NSE:INFY full", "NSE:NO_SUCH_THING quote"],
                         args=("--test-connection",))
        assert bad.wait() == 1, bad.output[-3000:]
        notok = collectors(tmp_path / "tok", db, sim, ["NSE:INFY"], token="none", args=("--test-connection",))
        assert notok.wait() == 1
        assert sim.stats()["connections_total"] == 0         # no ticker connection
    out = ok.output
    assert "would subscribe 3 instrument(s) over 1 connection(s)" in out
    assert "full 1, quote 1, ltp 1" in out
    assert "connection 1: 3 instrument(s)" in out
    assert "NSE:INFY (token 408065, full, connection 1): ok, last price 1573.7" in out
    assert "NSE:NIFTY 50 (token 256265, ltp, connection 1): ok, last price" in out
    assert "access token: valid" in out and "connection test: ok" in out
    assert "NSE:NO_SUCH_THING (quote): FAILED: not in Kite's instrument list" in bad.output
    assert "connection test: FAILED" in bad.output
    assert "access token: FAILED: no access token" in notok.output
    # nothing written
    assert q(db, "select (select count(*) from kite_instrument), (select count(*) from kite_candle), "
                 "(select count(*) from feed_heartbeat)")[0] == (0, 0, 0)
