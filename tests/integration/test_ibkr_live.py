"""feed-ibkr end to end: the real program (bin/feed-ibkr, ib_async 2.1.0 inside) against the TWS
simulator's live data, storing into a throwaway PostgreSQL.

The collector runs as a child process; the simulator runs in this process (its own thread), on
loopback, on an ephemeral port, generating trades for AAPL, MSFT (stocks) and SPX (index) at a high
rate.  The session is today's, given as ``live.extra_sessions`` around now, so the tests run at any
hour.  Every test asserts what a user would check: rows equal to what the simulator sent, candles
equal to the simulator's one-minute bars, subscriptions in the simulator, exit status and journal lines.
"""
from __future__ import annotations

import datetime as dt
import sys
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from collector_process import CollectorProcess, collector_env, collectors_of, q, write_config
from collector_process import wait_for as poll
from conftest import ROOT
from feeds.calendars import ExchangeCalendar
from feeds.candles import Candle, calendar_sessions, rollup
from feeds.sim.tws import TwsSimulatorThread

pytestmark = pytest.mark.integration

UTC = dt.timezone.utc
NY = ZoneInfo("America/New_York")
BIN = ROOT / "bin" / "feed-ibkr"
MINUTE = 60
HEADER = "symbol,secType,exchange,currency,primaryExchange\n"
LINES = {"AAPL": "AAPL,STK,SMART,USD,NASDAQ", "MSFT": "MSFT,STK,SMART,USD,NASDAQ", "IBM": "IBM,STK,SMART,USD,NYSE",
         "SPX": "SPX,IND,CBOE,USD,", "ZZZZ": "ZZZZ,STK,SMART,USD,NYSE"}
RATE = 240          # trades per minute and contract


# ------------------------------------------------------------------------------------------ helpers

def ny_now(needs: float | None) -> dt.datetime:
    """Now in New York, at least ``needs`` minutes (None: any time) before 23:59 there: closer to
    midnight, this waits for the next day (a test's session is one New York day's and closes at
    23:59 at the latest, so a test started at 23:57 would see its session end under it)."""
    now = dt.datetime.now(NY)
    last = now.replace(hour=23, minute=59, second=0, microsecond=0)
    if needs is not None and now + dt.timedelta(minutes=needs) > last:
        midnight = (now.replace(hour=12) + dt.timedelta(days=1)).replace(hour=0, minute=0, second=1, microsecond=0)
        time.sleep(max(0.0, (midnight.astimezone(UTC) - now.astimezone(UTC)).total_seconds()))
        now = dt.datetime.now(NY)
    return now


def session_now(minutes_before: int = 30, minutes_after: int = 60,
                needs: float | None = None) -> tuple[str, list[str], dt.datetime]:
    """Today's (New York) extra session around now, ``needs`` minutes of it at least (see :func:`ny_now`):
    (date, [open, close], open as aware UTC)."""
    now = ny_now(needs)
    start = max(now.replace(hour=0, minute=0, second=0, microsecond=0), now - dt.timedelta(minutes=minutes_before))
    start = start.replace(second=0, microsecond=0)
    end = min(now.replace(hour=23, minute=59, second=0, microsecond=0), now + dt.timedelta(minutes=minutes_after))
    return now.date().isoformat(), [start.strftime("%H:%M"), end.strftime("%H:%M")], start.astimezone(UTC)


class Collector(CollectorProcess):
    """bin/feed-ibkr as a child process; its log lines are kept in ``lines``."""

    output_tail = 4000

    def __init__(self, tmp: Path, dsn: str, sim, symbols=("AAPL", "MSFT", "SPX"), *, live: dict | None = None,
                 candles: dict | None = None, args: tuple[str, ...] = (), session: bool = True,
                 contracts_text: str | None = None, ibkr: dict | None = None,
                 session_hours: tuple[str, str] | None = None):
        tmp.mkdir(parents=True, exist_ok=True)
        self.contracts = tmp / "ibkr-live.csv"
        self.contracts.write_text(contracts_text if contracts_text is not None
                                  else HEADER + "\n".join(LINES[s] for s in symbols) + "\n")
        # a test that chose its hours (or has no session) runs on the day it saw: no wait here
        day, hours, self.session_open = session_now(needs=5.0 if session and session_hours is None else None)
        if session_hours is not None:
            hours = list(session_hours)
        self.session_day, self.session_hours = dt.date.fromisoformat(day), tuple(dt.time.fromisoformat(h)
                                                                                 for h in hours)
        lv = {"contracts_file": str(self.contracts), "status_interval": 1.0, "silence_timeout": 30.0,
              "reconnect_timeout": 30.0, "stop_after_close": 0.0, "extended_hours": False}
        lv.update(live or {})
        sections = {"ibkr": {"host": "127.0.0.1", "port": sim.port, "live_client_id": 72, "connect_timeout": 5,
                             **(ibkr or {})},
                    "live": lv,
                    "candles": {"grace": 0.5, "lateness": 2.0, **(candles or {})},
                    "sink": {"spool_dir": str(tmp / "spool"), "flush_interval": 0.1}}
        if session:
            sections["live.extra_sessions"] = {day: hours}
        self.config = write_config(tmp / "ibkr.toml", sections)
        self.start([sys.executable, str(BIN), "--config", str(self.config), "--unit", "feed-ibkr-test.service",
                    *args], collector_env(dsn))


@pytest.fixture
def collectors():
    yield from collectors_of(Collector)


@pytest.fixture
def sim():
    with TwsSimulatorThread(generate=("AAPL", "MSFT", "IBM", "SPX"), live_rate=RATE, unknown=("ZZZZ",)) as s:
        yield s


def wait_for(fn, timeout: float = 60.0, interval: float = 0.2):
    return poll(fn, timeout, interval)


def mkt_subs(sim) -> Counter:
    """symbol -> live reqMktData subscriptions over every connection of the simulator."""
    c: Counter = Counter()
    for conn in sim.subscriptions().values():
        c.update(conn["mktData"].values())
    return c


def tbt_subs(sim) -> Counter:
    c: Counter = Counter()
    for conn in sim.subscriptions().values():
        c.update(tuple(v) for v in conn["tbt"].values())
    return c


def quiesce(sim, seconds: float = 1.5) -> None:
    """No more ticks (as during a connectivity loss), and time for the sent ones to be stored."""
    sim._call(sim.sim.live_engine.set_offline, True)
    time.sleep(seconds)


def stored_trades(dsn, source="rtvolume") -> Counter:
    return Counter((s, str(Decimal(p).normalize()), str(Decimal(z).normalize()), t) for s, p, z, t in q(
        dsn, "SELECT symbol, price, size, (extract(epoch FROM ib_time) * 1000)::bigint FROM ibkr_trade "
             "WHERE source = %s", source))


def sent_trades(ticks, kind="trade") -> Counter:
    return Counter((t["symbol"], str(Decimal(t["price"]).normalize()), str(Decimal(t["size"]).normalize()),
                    t["time_ms"] if kind == "trade" else t["time_ms"] // 1000 * 1000)
                   for t in ticks if t["kind"] == kind and (kind != "trade" or t.get("rt_volume", True)))


def _n(x) -> str | None:
    return None if x is None else str(Decimal(str(x)).normalize())


def candles_of(dsn, interval: int, source: str | None = None) -> dict:
    """(symbol, bar_start) -> the latest row of each candle of ``interval``."""
    rows = q(dsn, """SELECT DISTINCT ON (symbol, bar_start) symbol, bar_start, bar_end, open, high, low, close,
                            volume, ticks, final, revision, source
                       FROM ibkr_candle WHERE interval_min = %s AND (%s::text IS NULL OR source = %s)
                      ORDER BY symbol, bar_start, recorded_at DESC, revision DESC""", interval, source, source)
    return {(r[0], r[1]): r[2:] for r in rows}


def sim_bar(sim, symbol: str, start: dt.datetime):
    spec = sim.sim.contracts[symbol]
    bar, _, _ = sim._call(sim.sim.store.minute_bar, spec, int(start.timestamp()))
    return bar


# ------------------------------------------------------------------------------------------ the tests

def test_every_tick_is_stored_once_and_candles_equal_the_simulators_bars(tmp_path, db, sim, collectors):
    """Stocks (RTVolume trades, bid/ask quotes, AAPL also tick by tick) and an index (SPX last
    price): every tick the simulator sent is stored once with its values, with IB's time and the
    market data type; the 1-minute candles of complete minutes equal the simulator's bars, 5 and
    15 minutes equal their rollups; the minutes since the session open up to the start are filled
    from history (source 'history'), equal to the bars as well; the stop writes the open candles
    final=false.  After the final 1-minute candles an earlier run stored (AAPL, until 10 minutes
    ago) is where AAPL's fill starts."""
    earlier = dt.datetime.now(UTC).replace(second=0, microsecond=0) - dt.timedelta(minutes=10)
    for i in range(20, -1, -1):          # what the earlier run stored: its last 20 minutes, final
        m = earlier - dt.timedelta(minutes=i)
        b = sim_bar(sim, "AAPL", m)
        q(db, "INSERT INTO ibkr_candle (symbol, con_id, interval_min, bar_start, bar_end, open, high, low, close, "
               "volume, ticks, final, revision, source, recorded_at) VALUES ('AAPL', 265598, 1, %s, %s, %s, %s, %s, "
               "%s, %s, %s, true, 0, 'live', now())", m, m + dt.timedelta(minutes=1), b.open, b.high, b.low, b.close,
          b.volume, b.count)
    c = collectors(tmp_path, db, sim, live={"tick_by_tick": ["AAPL"], "extended_hours": True})
    c.wait_line("first batch stored; READY")
    t_start = dt.datetime.now(UTC)
    first_full = (t_start.replace(second=0, microsecond=0) + dt.timedelta(minutes=1))
    # two complete minutes after the start, and their candles closed (grace 0.5 s)
    until = first_full + dt.timedelta(minutes=2, seconds=2)
    wait_for(lambda: dt.datetime.now(UTC) >= until, timeout=200, interval=0.5)
    assert mkt_subs(sim) == Counter({"AAPL": 1, "MSFT": 1, "SPX": 1})
    assert tbt_subs(sim) == Counter({("AAPL", "AllLast"): 1, ("AAPL", "BidAsk"): 1})
    quiesce(sim)
    assert c.stop() == 0
    assert "stopped: all rows committed or spooled" in c.output
    ticks = sim.sent_ticks()

    # trades: RTVolume of both stocks, AllLast of AAPL, each once with IB's values
    want = sent_trades(ticks)
    assert sum(want.values()) > 4 * RATE / 60
    assert stored_trades(db) == want
    assert stored_trades(db, "alllast") == sent_trades(ticks, "tbt_last")
    # quotes: one row per bid/ask update sent, with its four values
    got_q = Counter((s, _n(b), _n(bs), _n(a), _n(az)) for s, b, bs, a, az in q(
        db, "SELECT symbol, bid, bid_size, ask, ask_size FROM ibkr_quote WHERE source = 'mktdata'"))
    assert got_q == Counter((t["symbol"], _n(t["bid"]), _n(t["bid_size"]), _n(t["ask"]), _n(t["ask_size"]))
                            for t in ticks if t["kind"] == "bid_ask")
    got_tbt = Counter((s, _n(b), _n(a), int(t.timestamp())) for s, b, a, t in q(
        db, "SELECT symbol, bid, ask, ib_time FROM ibkr_quote WHERE source = 'bidask'"))
    assert got_tbt == Counter((t["symbol"], _n(t["bid"]), _n(t["ask"]), t["time_ms"] // 1000)
                              for t in ticks if t["kind"] == "tbt_bidask")
    # index: the last prices of SPX
    assert Counter(_n(p) for (p,) in q(db, "SELECT price FROM ibkr_index_tick WHERE symbol = 'SPX'")) == \
        Counter(_n(t["price"]) for t in ticks if t["kind"] == "index")
    assert q(db, "SELECT DISTINCT market_data_type FROM ibkr_trade") == [(1,)]
    assert q(db, "SELECT count(*) FROM ibkr_trade WHERE con_id IS NULL OR recv_time < ib_time - interval '1 s'") \
        == [(0,)]

    # candles of the complete minutes (stocks: IB's times; the index has no time from IB)
    one = candles_of(db, 1, "live")
    minutes = [first_full + dt.timedelta(minutes=i) for i in range(2)]
    for sym in ("AAPL", "MSFT"):
        for m in minutes:
            bar = sim_bar(sim, sym, m)
            got = one[(sym, m)]
            assert (got[0] - m, *map(_n, got[1:6]), got[6], got[7]) == \
                (dt.timedelta(minutes=1), _n(bar.open), _n(bar.high), _n(bar.low), _n(bar.close), _n(bar.volume),
                 bar.count, True), (sym, m)
    # history: the minutes from the session's (extended) open to the start minute
    hist = candles_of(db, 1, "history")
    pre_open = c.session_open - dt.timedelta(hours=5, minutes=30)
    start_min = t_start.replace(second=0, microsecond=0)
    for sym in ("AAPL", "MSFT"):
        got = sorted(k[1] for k in hist if k[0] == sym)
        assert got[0] == (earlier + dt.timedelta(minutes=1) if sym == "AAPL" else pre_open), sym
        assert got[-1] <= start_min and start_min - got[-1] <= dt.timedelta(minutes=2)
        for m in got[-3:]:
            bar = sim_bar(sim, sym, m)
            row = hist[(sym, m)]
            assert tuple(map(_n, row[1:6])) == (_n(bar.open), _n(bar.high), _n(bar.low), _n(bar.close),
                                                _n(bar.volume)) and row[7] is True
    # 5 and 15 minutes: the rollups of the stored 1-minute candles
    cal = ExchangeCalendar("XNYS", extra_sessions={c.session_day: c.session_hours})
    sessions = calendar_sessions(cal, pre_ns=int(5.5 * 3600e9), post_ns=int(4 * 3600e9))
    ones = [Candle(k[0], 1, int(k[1].timestamp()) * 10**9, int(v[0].timestamp()) * 10**9, Decimal(v[1]),
                   Decimal(v[2]), Decimal(v[3]), Decimal(v[4]), v[5], v[6], v[7], v[8], v[9])
            for k, v in candles_of(db, 1).items() if k[0] == "AAPL"]
    for interval in (5, 15):
        stored = {k[1]: v for k, v in candles_of(db, interval).items() if k[0] == "AAPL" and v[7]}
        assert stored
        for r in rollup(ones, sessions, interval):
            start = dt.datetime.fromtimestamp(r.start_ns / 1e9, UTC)
            if start in stored and r.final:
                assert tuple(map(_n, stored[start][1:6])) == tuple(map(_n, (r.open, r.high, r.low, r.close,
                                                                            r.volume))), (interval, start)
    # the stop: open candles written final=false
    assert q(db, "SELECT count(*) FROM ibkr_candle WHERE NOT final AND source = 'live' AND bar_end > %s",
             dt.datetime.now(UTC) - dt.timedelta(minutes=1))[0][0] >= 1


def test_disconnect_and_nightly_reset_restore_every_subscription_without_duplicates(tmp_path, db, sim, collectors):
    c = collectors(tmp_path, db, sim, live={"tick_by_tick": ["AAPL"]}, candles={"enabled": False})
    c.wait_line("first batch stored; READY")
    want = Counter({"AAPL": 1, "MSFT": 1, "SPX": 1})
    assert wait_for(lambda: mkt_subs(sim) == want, 20)
    sim.disconnect_all(abort=True)
    c.wait_line("reconnecting to")
    assert wait_for(lambda: mkt_subs(sim) == want and len(tbt_subs(sim)) == 2, 30), sim.subscriptions()
    sim._call(sim.sim.nightly_reset, 1.0, True, False)     # 1100 ... 1101 data lost: everything dropped
    c.wait_line("IB 1101")
    assert wait_for(lambda: mkt_subs(sim) == want and len(tbt_subs(sim)) == 2, 30), sim.subscriptions()
    sim._call(sim.sim.nightly_reset, 3.0, False, True)     # 2103, 2105, 1100, the sockets closed, back after 3 s
    assert wait_for(lambda: sum("reconnecting to" in ln for ln in c.lines) >= 2, 30)
    assert wait_for(lambda: mkt_subs(sim) == want and len(tbt_subs(sim)) == 2, 30), sim.subscriptions()
    # The new session starts with the farms as IB states them then (OK), not as the old one left them.
    back = max(i for i, ln in enumerate(c.lines) if "connected to" in ln)
    status_after(c, back, lambda ln: "farm broken" not in ln and "1100" not in ln and "stocks live 2" in ln)
    # An attempt while the gateway accepts and closes ends at once, not after ibkr.connect_timeout.
    retries = [ln for ln in c.lines if "cannot connect to" in ln]
    assert not [ln for ln in retries if "TimeoutError" in ln], retries
    assert all("ConnectionError" in ln for ln in retries), retries
    time.sleep(2)
    quiesce(sim)
    assert c.stop() == 0
    ticks = sim.sent_ticks()
    assert stored_trades(db) == sent_trades(ticks)
    # Each trade stored once: the rows equal the ticks sent, and no tick was sent twice (two live
    # subscriptions of one contract at once would send each trade twice).  Two AllLast trades of one
    # second at one price and size are two trades (IB's AllLast time is in seconds).
    assert stored_trades(db, "alllast") == sent_trades(ticks, "tbt_last")
    for kind in ("trade", "tbt_last"):
        once = Counter((t["symbol"], t["time_ms"]) for t in ticks if t["kind"] == kind)
        assert once and max(once.values()) == 1, (kind, once.most_common(3))
    assert [ln for ln in c.lines if "IB 1100" in ln] and [ln for ln in c.lines if "farm connection is broken" in ln]


def status_after(c: Collector, start: int, pred, timeout: float = 30.0) -> str:
    """The first journal line ``status: ...`` at index >= ``start`` for which ``pred(line)`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ln in c.lines[start:]:
            if "status: " in ln and pred(ln):
                return ln
        assert c.proc.poll() is None, c.output[-4000:]
        time.sleep(0.1)
    raise AssertionError(f"no such status line in {timeout} s:\n" + "\n".join(c.lines[start:])[-4000:])


def index_of(c: Collector, text: str) -> int:
    c.wait_line(text)
    return next(i for i, ln in enumerate(c.lines) if text in ln)


def test_data_maintained_and_farm_messages_are_waited_out_without_resubscribing(tmp_path, db, sim, collectors):
    """1100 then 1102 (IB kept the subscriptions) and the data farm notices 2103..2108, 2157, 2158
    as IB documents them: shown in STATUS while they last, nothing requested again, no reconnect,
    every tick sent still stored once."""
    c = collectors(tmp_path, db, sim, live={"tick_by_tick": ["AAPL"]}, candles={"enabled": False})
    c.wait_line("first batch stored; READY")
    want = Counter({"AAPL": 1, "MSFT": 1, "SPX": 1})
    assert wait_for(lambda: mkt_subs(sim) == want and len(tbt_subs(sim)) == 2, 20), sim.subscriptions()
    before = sim.subscriptions()
    resubscriptions = sim.stats()["live"]["resubscriptions"]

    sim._call(sim.sim.connectivity_loss, 4.0, False)            # 1100, no tick for 4 s, then 1102
    lost = index_of(c, "IB 1100")
    assert "waiting for 1101/1102" in c.lines[lost]
    status_after(c, lost, lambda ln: "IB-TWS connectivity lost (1100)" in ln)
    back = index_of(c, "IB 1102")
    assert "subscriptions maintained" in c.lines[back]
    status_after(c, back + 1, lambda ln: "1100" not in ln and "stocks live 2" in ln and "indices live 1" in ln)

    for code in (2103, 2105, 2157):                             # three farms broken
        sim.farm_message(code)
    broken = index_of(c, "IB 2157")
    status_after(c, broken, lambda ln: "farm broken secdefnj,usfarm,ushmds" in ln)
    sim.farm_message(2104)                                      # usfarm OK again
    sim.farm_message(2107)                                      # ushmds inactive, available on demand: fine
    i = index_of(c, "IB 2107")
    status_after(c, i, lambda ln: "farm broken secdefnj" in ln and "usfarm" not in ln and "ushmds" not in ln)
    sim.farm_message(2158)
    sim.farm_message(2106)
    sim.farm_message(2108)
    i = index_of(c, "IB 2108")
    status_after(c, i, lambda ln: "farm broken" not in ln)

    assert sim.subscriptions() == before                        # the same requests on the same connection
    assert sim.stats()["live"]["resubscriptions"] == resubscriptions
    assert not [ln for ln in c.lines if "reconnecting to" in ln or "requested again" in ln]
    t = dt.datetime.now(UTC)
    assert wait_for(lambda: q(db, "SELECT count(DISTINCT symbol) FROM ibkr_trade WHERE recv_time > %s", t)[0][0]
                    == 2, 20)                                   # ticking again after the 2104
    quiesce(sim)
    assert c.stop() == 0
    assert stored_trades(db) == sent_trades(sim.sent_ticks())
    detail = q(db, "SELECT detail FROM feed_heartbeat WHERE unit = 'feed-ibkr-test.service'")[0][0]
    assert detail.get("reconnects", 0) == 0 and detail.get("data lost", 0) == 0 and detail.get("resubscribed", 0) == 0


def test_a_silent_contract_is_resubscribed(tmp_path, db, sim, collectors):
    c = collectors(tmp_path, db, sim, live={"silence_timeout": 3.0}, candles={"enabled": False})
    c.wait_line("first batch stored; READY")
    sim.silence("MSFT", 120)
    line = c.wait_line("MSFT silent for", 30)
    assert "cancelled and requested again" in line
    assert wait_for(lambda: sim.stats()["live"]["resubscriptions_by_symbol"].get("MSFT", 0) >= 1, 10)
    t = dt.datetime.now(UTC)
    assert wait_for(lambda: q(db, "SELECT count(*) FROM ibkr_trade WHERE symbol = 'MSFT' AND recv_time > %s",
                              t)[0][0] > 0, 20)                     # ticking again
    assert not [ln for ln in c.lines if "AAPL silent for" in ln]
    assert c.stop() == 0
    detail = q(db, "SELECT detail FROM feed_heartbeat WHERE unit = 'feed-ibkr-test.service'")[0][0]
    assert detail["resubscribed"] == 1                  # counted, shown by feedctl status


def test_errors_are_recorded_against_their_contract_while_the_others_go_on(tmp_path, db, collectors):
    with TwsSimulatorThread(generate=("AAPL", "MSFT", "IBM", "SPX"), live_rate=RATE, unknown=("ZZZZ",),
                            max_tick_by_tick=1) as sim:
        sim.inject_error("MSFT", 354)
        sim.inject_error("IBM", 10167)              # not subscribed: delayed data instead
        c = collectors(tmp_path, db, sim, symbols=("AAPL", "MSFT", "IBM", "SPX", "ZZZZ"),
                       live={"tick_by_tick": ["AAPL"]}, candles={"enabled": False})
        c.wait_line("first batch stored; READY")
        errs = wait_for(lambda: {r[0]: r for r in q(db, "SELECT symbol, code, request, text, con_id "
                                                         "FROM ibkr_live_error")} if len(q(
                        db, "SELECT 1 FROM ibkr_live_error")) >= 4 else None, 30)
        assert errs["MSFT"][1:4] == (354, "mktData", "Requested market data is not subscribed.")
        assert errs["ZZZZ"][1:4] == (200, "contractDetails", "No security definition has been found for the request")
        assert errs["AAPL"][1:3] == (10190, "BidAsk") and errs["AAPL"][4] == 265598
        assert errs["IBM"][1:4] == (10167, "mktData", "Requested market data is not subscribed. Displaying delayed "
                                                      "market data.")
        t = dt.datetime.now(UTC)
        assert wait_for(lambda: {s for (s,) in q(db, "SELECT DISTINCT symbol FROM ibkr_trade WHERE recv_time > %s",
                                                 t)} == {"AAPL", "IBM"}, 20)
        assert q(db, "SELECT DISTINCT source, market_data_type FROM ibkr_trade WHERE symbol = 'IBM'") == [("last", 3)]
        assert q(db, "SELECT DISTINCT market_data_type FROM ibkr_quote WHERE symbol = 'IBM'") == [(3,)]
        assert wait_for(lambda: q(db, "SELECT count(*) FROM ibkr_index_tick WHERE recv_time > %s", t)[0][0] > 0, 20)
        assert wait_for(lambda: q(db, "SELECT count(*) FROM ibkr_trade WHERE source = 'alllast'")[0][0] > 0, 20)
        assert c.stop() == 0


def test_tws_gone_for_longer_than_reconnect_timeout_exits_1(tmp_path, db, collectors):
    sim = TwsSimulatorThread(generate=("AAPL", "MSFT", "SPX"), live_rate=RATE).__enter__()
    try:
        c = collectors(tmp_path, db, sim, live={"reconnect_timeout": 3.0}, candles={"enabled": False})
        c.wait_line("first batch stored; READY")
    finally:
        sim.close()
    assert c.wait(60) == 1
    assert "cannot connect to TWS/IB Gateway" in c.output and "stopped: all rows committed or spooled" in c.output


def test_the_session_close_stops_the_collector_cleanly(tmp_path, db, sim, collectors):
    now = ny_now(3)
    close = now.replace(second=0, microsecond=0) + dt.timedelta(minutes=1 if now.second < 45 else 2)
    c = collectors(tmp_path, db, sim, live={"stop_after_close": 1.0}, candles={"grace": 0.2},
                   session_hours=("00:00", close.strftime("%H:%M")))
    c.wait_line("first batch stored; READY")
    assert c.wait(150) == 0
    assert "session over (stop time" in c.output
    assert dt.datetime.now(NY) >= close
    # the candles of the last minute are closed at the close (final), nothing after it
    assert q(db, "SELECT count(*) FROM ibkr_candle WHERE bar_end > %s", close)[0][0] == 0


def test_holiday_exits_at_once_successfully_with_a_line(tmp_path, db, sim, collectors):
    today = dt.datetime.now(NY).date().isoformat()
    c = collectors(tmp_path, db, sim, session=False, live={"extra_holidays": [today]})
    assert c.wait(60) == 0
    assert f"no NYSE session on {dt.date.fromisoformat(today):%A %Y-%m-%d} (holiday in live.extra_holidays): " \
           "nothing to collect, exiting" in c.output
    assert mkt_subs(sim) == Counter()


@pytest.mark.parametrize("live, key", [
    ({"tick_by_tick": ["AAPL", "MSFT"], "max_tick_by_tick": 3}, "live.tick_by_tick"),
    ({"tick_by_tick": ["SPX"]}, "live.tick_by_tick"),
    ({"market_data_type": "live"}, "live.market_data_type"),
    ({"silence_timeout": 0}, "live.silence_timeout"),
])
def test_bad_configuration_exits_78_with_one_line(tmp_path, db, sim, collectors, live, key):
    c = collectors(tmp_path, db, sim, live=live)
    assert c.wait(60) == 78
    errs = [ln for ln in c.lines if "configuration error" in ln]
    assert len(errs) == 1 and f"key '{key}'" in errs[0] and str(c.config) in errs[0], c.output


def test_bad_contracts_file_exits_78_naming_file_line_and_field(tmp_path, db, sim, collectors):
    c = collectors(tmp_path, db, sim, contracts_text=HEADER + "AAPL,STK,SMART,US,NASDAQ\n")
    assert c.wait(60) == 78
    assert f"contracts file {c.contracts} line 2 field 'currency'" in c.output


def test_test_connection_prints_each_contracts_answer(tmp_path, db, sim, collectors):
    sim.inject_error("MSFT", 354)
    c = collectors(tmp_path, db, sim, symbols=("AAPL", "MSFT", "SPX"), args=("--test-connection", "--timeout", "5"))
    assert c.wait(60) == 1
    out = c.output
    assert "AAPL" in out and "reqMktData generic ticks 233" in out
    assert [ln for ln in c.lines if ln.startswith("ok   AAPL conId 265598")]
    assert [ln for ln in c.lines if ln.startswith("ok   SPX conId 416904")]
    assert [ln for ln in c.lines if ln.startswith("FAIL MSFT") and "354" in ln]
    sim.inject_error("MSFT", 0)
    c2 = collectors(tmp_path / "2", db, sim, symbols=("AAPL", "SPX"), args=("--test-connection",))
    assert c2.wait(60) == 0
