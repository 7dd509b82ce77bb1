"""feed-zerodha end to end: the real program (bin/feed-zerodha, kiteconnect's
KiteTicker inside) against the Kite simulator, storing into a throwaway
PostgreSQL.

The collector runs as a child process (KiteTicker's Twisted reactor cannot be
restarted within one process); the simulator runs in this process, on
loopback, on an ephemeral port.  Every test asserts what a user would check:
rows in the tick tables equal to what the simulator sent, the exit status,
the journal lines.
"""
from __future__ import annotations

import json
import re
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from collector_process import CollectorProcess, collector_env, collectors_of, q, wait_for, write_config
from conftest import ROOT, shared_file
from feeds.kite.token import AccessToken, TokenStore, next_expiry
from feeds.sim.kite import KiteSimulator

pytestmark = pytest.mark.integration

UTC = timezone.utc
INFY = 408065
BIN = ROOT / "bin" / "feed-zerodha"


def store_token(path: Path, sim: KiteSimulator, *, expired: bool = False) -> str:
    now = datetime.now(UTC)
    tok = sim.issue_access_token()
    exp = datetime(2020, 1, 1, tzinfo=UTC) if expired else next_expiry(now)
    TokenStore(path).save(AccessToken(sim.account.api_key, sim.account.user_id, tok, now, exp, method="test"))
    return tok


class Collector(CollectorProcess):
    """bin/feed-zerodha as a child process; its log lines are kept in ``lines``."""

    def __init__(self, tmp: Path, dsn: str, sim: KiteSimulator, instruments: list[str] | None, *,
                 kite: dict | None = None, token: str = "valid", args: tuple[str, ...] = (),
                 sink_extra: dict | None = None, notify: bool = False, sections: dict | None = None):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.token_file = tmp / "state" / "access_token.json"
        if token == "valid":
            store_token(self.token_file, sim)
        elif token == "expired":
            store_token(self.token_file, sim, expired=True)
        inst_file = tmp / "instruments.txt"
        inst_file.write_text("\n".join(instruments or []) + "\n")
        cfg = {"api_key": sim.account.api_key, "api_url": sim.base_url, "ticker_url": sim.ws_url,
               "login_url": sim.base_url, "token_file": str(self.token_file), "instruments_file": str(inst_file),
               "session_calendar": "none", "status_interval": 1.0, "silence_timeout": 5.0}
        cfg.update(kite or {})
        self.config = write_config(tmp / "kite.toml", {
            "kite": cfg, "sink": {"spool_dir": str(tmp / "spool"), "flush_interval": 0.1, **(sink_extra or {})},
            **(sections or {})})
        self.start([sys.executable, str(BIN), "--config", str(self.config), *args],
                   collector_env(dsn, notify=notify))


@pytest.fixture
def collectors():
    yield from collectors_of(Collector)


def sim_for(**kw) -> KiteSimulator:
    kw.setdefault("heartbeat_interval", 0.5)
    kw.setdefault("seed", 7)
    return KiteSimulator(**kw)


def ticker_conns(sim: KiteSimulator) -> list[dict]:
    return sim.stats()["connections"]


def _d(x) -> Decimal:
    return Decimal(str(x))


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


# ---------------------------------------------------------------------------------- recorded INFY

@pytest.mark.parametrize("decoder", ["kiteticker", "native"])
@pytest.mark.parametrize("mode", ["full", "quote"])
def test_recorded_infy_packets_land_with_the_recorded_values(tmp_path, db, collectors, decoder, mode):
    """The real INFY packets, served by the simulator and decoded (by KiteTicker's
    own parser, and by the collector's), are stored with the values of
    ticker_full.json / ticker_quote.json."""
    want = json.loads(shared_file("kite", f"ticker_{mode}.json").read_text())
    with sim_for(rate=0).running() as sim:
        before = datetime.now(UTC)
        c = collectors(tmp_path, db, sim, [f"NSE:INFY={mode}"], kite={"decoder": decoder})
        table = f"kite_tick_{mode}"
        assert wait_for(lambda: q(db, f"select count(*) from {table} where instrument_token = %s", INFY)[0][0]), \
            c.output[-2000:]
        after = datetime.now(UTC)
        assert c.stop() == 0
    cols = ("last_price", "last_traded_quantity", "average_traded_price", "volume_traded", "total_buy_quantity",
            "total_sell_quantity", "open", "high", "low", "close")
    extra = ("last_trade_time", "oi", "oi_day_high", "oi_day_low", "exchange_timestamp", "bid_price",
             "bid_quantity", "bid_orders", "ask_price", "ask_quantity", "ask_orders") if mode == "full" else ()
    rows = q(db, f"select {', '.join(cols + extra)}, recv_time from {table} where instrument_token = %s", INFY)
    assert rows
    r = dict(zip(cols + extra + ("recv_time",), rows[0]))
    o = want["ohlc"]
    assert r["last_price"] == _d(want["last_price"])
    assert r["last_traded_quantity"] == want["last_quantity"]
    assert r["average_traded_price"] == _d(want["average_price"])
    assert r["volume_traded"] == want["volume"]
    assert r["total_buy_quantity"] == want["buy_quantity"]
    assert r["total_sell_quantity"] == want["sell_quantity"]
    assert (r["open"], r["high"], r["low"], r["close"]) == (_d(o["open"]), _d(o["high"]), _d(o["low"]),
                                                            _d(o["close"]))
    if mode == "full":
        # Kite's naive IST times (10:41:27 IST) stored as UTC (05:11:27Z)
        assert r["exchange_timestamp"] == _utc(want["timestamp"]) == datetime(2021, 7, 5, 5, 11, 27, tzinfo=UTC)
        assert r["last_trade_time"] == _utc(want["last_trade_time"])
        assert (r["oi"], r["oi_day_high"], r["oi_day_low"]) == (want["oi"], want["oi_day_high"], want["oi_day_low"])
        buy, sell = want["depth"]["buy"], want["depth"]["sell"]
        assert r["bid_price"] == [_d(x["price"]) for x in buy]
        assert r["bid_quantity"] == [x["quantity"] for x in buy]
        assert r["bid_orders"] == [x["orders"] for x in buy]
        assert r["ask_price"] == [_d(x["price"]) for x in sell]
        assert r["ask_quantity"] == [x["quantity"] for x in sell]
        assert r["ask_orders"] == [x["orders"] for x in sell]
    # received while the collector ran, before the row was seen in the table
    assert before <= r["recv_time"] <= after, (before, r["recv_time"], after)
    # the resolved instrument is named in kite_instrument
    assert q(db, "select exchange, tradingsymbol from kite_instrument where instrument_token = %s", INFY) == \
        [("NSE", "INFY")]
    assert "feed-zerodha starting" in c.output and "stopped: all rows committed or spooled" in c.output


def test_index_ltp_and_generated_ticks_all_tables(tmp_path, db, collectors):
    """Index packets (quote 28 and full 32 bytes), LTP packets and generated full
    packets go to their tables; the status line reports rates; a heartbeat row
    is written."""
    with sim_for(rate=4).running() as sim:
        c = collectors(tmp_path, db, sim, ["NSE:NIFTY 50 full", "NSE:NIFTY BANK=quote", "NSE:RELIANCE ltp",
                                           "NSE:SIMEQ00001", "NSE:SIMEQ00002 quote", "NSE:NO_SUCH_SYMBOL"])
        counts = lambda: q(db, "select (select count(*) from kite_tick_full), (select count(*) from kite_tick_quote),"
                               " (select count(*) from kite_tick_ltp)")[0]
        assert wait_for(lambda: min(counts()) >= 8), (counts(), c.output[-2000:])
        c.wait_line("status: ")
        assert wait_for(lambda: q(db, "select status from feed_heartbeat where unit = 'feed-zerodha.service'"))
        assert c.stop() == 0
    nifty = q(db, "select last_price, open, exchange_timestamp, last_traded_quantity, bid_price "
                  "from kite_tick_full where instrument_token = 256265 limit 1")[0]
    assert nifty[0] > 0 and nifty[1] > 0 and nifty[2] is not None and nifty[3] is None and nifty[4] is None
    bank = q(db, "select last_price, volume_traded from kite_tick_quote where instrument_token = 260105 limit 1")[0]
    assert bank[0] > 0 and bank[1] is None
    assert q(db, "select count(*) from kite_tick_ltp where instrument_token = 738561")[0][0] >= 2
    eq = q(db, "select bid_price, ask_price, bid_quantity from kite_tick_full t join kite_instrument i "
               "using (instrument_token) where i.tradingsymbol = 'SIMEQ00001' limit 1")[0]
    assert len(eq[0]) == len(eq[1]) == len(eq[2]) == 5 and eq[0][0] < eq[1][0]
    assert "1 instrument(s) not in Kite's instrument list, skipped: NSE:NO_SUCH_SYMBOL" in c.output
    status = c.wait_line("status: ")
    assert "full" in status and "stored" in status


# ---------------------------------------------------------------------------------- limits

def test_7000_instruments_split_over_three_connections_all_ticking(tmp_path, db, collectors):
    names = [f"NSE:SIMEQ{i:05d} quote" for i in range(1, 7001)]
    with sim_for(rate=0.3, min_nse_equities=10_000).running() as sim:
        c = collectors(tmp_path, db, sim, names)
        conns = wait_for(lambda: len(ticker_conns(sim)) == 3 and
                         sum(x["subscribed"] for x in ticker_conns(sim)) == 7000 and ticker_conns(sim), timeout=120)
        assert conns, c.output[-2000:]
        sizes = sorted(x["subscribed"] for x in conns)
        assert sizes == [2333, 2333, 2334] and max(sizes) <= 3000
        tokens = [t for x in conns for t in x["tokens"]["quote"]]
        assert len(tokens) == len(set(tokens)) == 7000
        # every instrument's ticks reach the database
        assert wait_for(lambda: q(db, "select count(distinct instrument_token) from kite_tick_quote")[0][0] == 7000,
                        timeout=120), q(db, "select count(distinct instrument_token) from kite_tick_quote")
        # and all three connections keep ticking after the subscription snapshot
        sent0 = {x["id"]: x["packets_sent"]["quote"] for x in ticker_conns(sim)}
        ticking = lambda: all(x["packets_sent"]["quote"] > sent0[x["id"]] for x in ticker_conns(sim))
        assert wait_for(ticking), (sent0, ticker_conns(sim))
        n0 = q(db, "select count(*) from kite_tick_quote")[0][0]
        assert wait_for(lambda: q(db, "select count(*) from kite_tick_quote")[0][0] > n0 + 3000, timeout=120)
        assert sim.stats()["subscribe_over_limit"] == 0 and sim.stats()["refused_429"] == 0
        assert c.stop() == 0
    assert "7000 instruments" in c.wait_line("feed-zerodha starting") and "over 3 connection(s)" in c.output


def test_10000_instruments_are_refused_with_the_message(tmp_path, db, collectors):
    names = [f"NSE:SIMEQ{i:05d}" for i in range(1, 10_001)]
    with sim_for(rate=0).running() as sim:
        c = collectors(tmp_path, db, sim, names)
        rc = c.wait()
        assert sim.stats()["connections_total"] == 0
    assert rc == 78
    assert "10000 instruments requested, but one API key carries at most 9000 (3 connections x 3000 instruments" \
        in c.output
    assert len([ln for ln in c.lines if ln.strip()]) == 1, c.output


# ---------------------------------------------------------------------------------- faults

def test_silent_connection_is_detected_and_reconnected(tmp_path, db, collectors):
    """KiteTicker never notices a connection that goes quiet; the collector drops
    it after silence_timeout and KiteTicker's factory reconnects."""
    silence_timeout = 2.0
    with sim_for(rate=2).running() as sim:
        c = collectors(tmp_path, db, sim, ["NSE:SIMEQ00010 full", "NSE:SIMEQ00011 quote"],
                       kite={"silence_timeout": silence_timeout})
        first = wait_for(lambda: ticker_conns(sim))
        assert first, c.output[-2000:]
        cid = first[0]["id"]
        assert wait_for(lambda: q(db, "select count(*) from kite_tick_full")[0][0] >= 2), c.output[-2000:]
        sim.fault_silence(600, connection=cid)      # silent for longer than the test waits
        # the collector notices the silence and drops the connection; KiteTicker connects again
        line = c.wait_line("dropping it to reconnect")
        assert "connection 1 silent for" in line, line
        new = wait_for(lambda: [x for x in ticker_conns(sim) if x["id"] != cid])
        assert new, c.output[-2000:]
        reconnected_at = datetime.fromtimestamp(new[0]["connected_at"], UTC)
        # ticks flow again, stored
        assert wait_for(lambda: q(db, "select count(*) from kite_tick_full where recv_time > %s",
                                  reconnected_at)[0][0] >= 2), c.output[-2000:]
        # resubscribed in the right modes (read now: the snapshot above may predate the subscription)
        modes = [x["modes"] for x in ticker_conns(sim) if x["id"] == new[0]["id"]]
        assert modes == [{"ltp": 0, "quote": 1, "full": 1}], modes
        assert c.stop() == 0
    assert "open (generation 2)" in c.output


def test_disconnect_loses_nothing_sent_after_reconnect(tmp_path, db, collectors):
    with sim_for(rate=20).running() as sim:
        c = collectors(tmp_path, db, sim, [f"NSE:SIMEQ{i:05d} full" for i in range(1, 21)] +
                       [f"NSE:SIMEQ{i:05d} ltp" for i in range(21, 31)], kite={"silence_timeout": 300.0})
        first = wait_for(lambda: ticker_conns(sim))
        assert first, c.output[-2000:]
        # disconnect while ticks are flowing and being stored
        assert wait_for(lambda: q(db, "select count(*) from kite_tick_full")[0][0] > 0), c.output[-2000:]
        sim.fault_disconnect()                      # TCP abort, no close frame
        new = wait_for(lambda: [x for x in ticker_conns(sim) if x["id"] != first[0]["id"]])
        assert new, c.output[-2000:]
        cid, since = new[0]["id"], datetime.fromtimestamp(new[0]["connected_at"], UTC)

        def sent_on_new() -> int:
            sent = [x for x in ticker_conns(sim) if x["id"] == cid][0]["packets_sent"]
            return sent["full"] + sent["quote"] + sent["ltp"]
        assert wait_for(lambda: sent_on_new() > 400), sent_on_new()
        # freeze: no more packets on the new connection.  The count read after it is final: the
        # silence and the counter both live on the simulator's loop.
        sim.fault_silence(600, connection=cid)
        n_sent = sent_on_new()
        assert n_sent > 400

        def stored():
            return sum(q(db, f"select count(*) from kite_tick_{m} where recv_time >= %s", since)[0][0]
                       for m in ("full", "quote", "ltp"))
        assert wait_for(lambda: stored() == n_sent), (stored(), n_sent)
        assert c.stop() == 0
    assert stored() == n_sent
    dups = q(db, "select count(*) - count(distinct (instrument_token, recv_time, seq)) from kite_tick_full")[0][0]
    assert dups == 0


def test_malformed_packet_and_text_messages_are_counted_not_fatal(tmp_path, db, collectors):
    with sim_for(rate=5).running() as sim:
        c = collectors(tmp_path, db, sim, ["NSE:SIMEQ00003 quote"])
        assert wait_for(lambda: ticker_conns(sim))
        sim.fault_malformed("bad_length")
        sim.fault_malformed("truncated")
        sim.send_text("message", "simulated notice")
        c.wait_line("malformed 2")
        c.wait_line("text message from Kite")
        n = q(db, "select count(*) from kite_tick_quote")[0][0]
        assert wait_for(lambda: q(db, "select count(*) from kite_tick_quote")[0][0] > n + 5)
        assert c.stop() == 0


# ---------------------------------------------------------------------------------- token and calendar

def test_missing_or_expired_token_refused_with_one_line(tmp_path, db, collectors):
    with sim_for(rate=0).running() as sim:
        missing = collectors(tmp_path / "missing", db, sim, ["NSE:INFY"], token="none")
        assert missing.wait() == 77
        expired = collectors(tmp_path / "expired", db, sim, ["NSE:INFY"], token="expired")
        assert expired.wait() == 77
    for c, text in ((missing, "no access token in"), (expired, "expired at")):
        lines = [ln for ln in c.lines if ln.strip()]
        assert len(lines) == 1 and text in lines[0] and "run feed-kite-token" in lines[0], c.output


def test_token_revoked_at_kite_is_refused_at_start_and_during_the_session(tmp_path, db, collectors):
    with sim_for(rate=2).running() as sim:
        c = collectors(tmp_path / "a", db, sim, ["NSE:SIMEQ00004 ltp"])
        assert wait_for(lambda: q(db, "select count(*) from kite_tick_ltp")[0][0] >= 1), c.output[-2000:]
        sim.fault_expire_tokens(disconnect=True)     # Kite's morning flush, mid-session
        rc = c.wait()
        assert rc == 77, c.output[-3000:]
        assert "Kite refused the access token on the ticker (HTTP 403)" in c.output
        assert "stopped: all rows committed or spooled" in c.output
        # the next start is refused at once: the profile check answers 403
        d = collectors(tmp_path / "b", db, sim, ["NSE:SIMEQ00004 ltp"], token="none")
        TokenStore(d.token_file).save(AccessToken(sim.account.api_key, sim.account.user_id, "revoked-token",
                                                  datetime.now(UTC), next_expiry(datetime.now(UTC))))
        assert d.wait() in (77,)
    assert "Kite refused the stored access token" in d.output


def test_day_without_session_ends_at_once_successfully(tmp_path, db, collectors):
    today = datetime.now(timezone.utc).astimezone(__import__("zoneinfo").ZoneInfo("Asia/Kolkata")).date()
    with sim_for(rate=0).running() as sim:
        c = collectors(tmp_path, db, sim, ["NSE:INFY"], token="none",
                       kite={"session_calendar": "XNSE", "extra_holidays": [today.isoformat()]})
        assert c.wait() == 0
        assert sim.stats()["connections_total"] == 0
    assert f"no NSE session on {today:%A %Y-%m-%d} (holiday in kite.extra_holidays): nothing to collect, exiting" \
        in c.output


def test_plan_for_2024_holiday_and_muhurat(tmp_path, db, collectors):
    with sim_for(rate=0).running() as sim:
        hol = collectors(tmp_path / "h", db, sim, ["NSE:INFY"], token="none", kite={"session_calendar": "XNSE"},
                         args=("--at", "2024-11-15T09:10+05:30"))
        mur = collectors(tmp_path / "m", db, sim, ["NSE:INFY"], token="none", kite={"session_calendar": "XNSE"},
                         args=("--at", "2024-11-01T09:10+05:30"))
        assert hol.wait() == 0 and mur.wait() == 0
    assert "no NSE session on Friday 2024-11-15 (NSE holiday" in hol.output
    assert "session 2024-11-01 18:00-19:00 IST (special): connect at 2024-11-01 17:55 IST, " \
           "stop at 2024-11-01 19:05 IST" in mur.output


def test_instruments_from_the_table_the_file_and_the_command_line(tmp_path, db, collectors):
    q(db, "insert into kite_subscription (exchange, tradingsymbol, mode) values ('NSE', 'SIMEQ00005', 'ltp'), "
          "('NSE', 'SIMEQ00006', 'full'), ('NSE', 'SIMEQ00009', 'full')")
    q(db, "update kite_subscription set enabled = false where tradingsymbol = 'SIMEQ00009'")
    with sim_for(rate=0).running() as sim:
        # file + table; the table's mode wins for an instrument in both
        c = collectors(tmp_path / "a", db, sim, ["NSE:SIMEQ00006 quote", "NSE:SIMEQ00007 quote"],
                       kite={"instruments_from_table": True})
        conns = wait_for(lambda: [x for x in ticker_conns(sim) if x["subscribed"] == 3])
        assert conns, c.output[-2000:]
        tok = {r[0]: r[1] for r in q(db, "select tradingsymbol, instrument_token from kite_instrument")}
        assert conns[0]["tokens"] == {"ltp": [tok["SIMEQ00005"]], "quote": [tok["SIMEQ00007"]],
                                      "full": [tok["SIMEQ00006"]]}
        assert c.stop() == 0
        # the command line replaces both
        d = collectors(tmp_path / "b", db, sim, ["NSE:SIMEQ00006"], kite={"instruments_from_table": True},
                       args=("--instrument", "NSE:SIMEQ00008=ltp,NSE:INFY"))
        conns = wait_for(lambda: [x for x in ticker_conns(sim) if x["subscribed"] == 2])
        assert conns, d.output[-2000:]
        assert sorted(conns[0]["tokens"]["ltp"] + conns[0]["tokens"]["full"]) == \
            sorted([408065, q(db, "select instrument_token from kite_instrument where tradingsymbol = 'SIMEQ00008'")[0][0]])
        assert d.stop() == 0
    assert "3 instruments from " in c.output and "table kite_subscription" in c.output
    assert "2 instruments from the command line" in d.output


class NotifySocket:
    """A NOTIFY_SOCKET for the child: every sd_notify datagram with its arrival time."""

    def __init__(self, path: Path):
        import socket as so
        self.path = str(path)
        self.sock = so.socket(so.AF_UNIX, so.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.msgs: list[tuple[float, str]] = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except OSError:
                continue
            for part in data.decode().splitlines():
                self.msgs.append((time.monotonic(), part))

    def times(self, msg: str) -> list[float]:
        return [t for t, m in self.msgs if m == msg]

    def close(self):
        self._stop = True
        self._t.join(2)
        self.sock.close()


def _stall_status(msg: str, flow_timeout: float) -> bool:
    """A STATUS= line saying nothing arrived for longer than ``flow_timeout``: every
    kind with data shows a max-age beyond it (the youngest message is older)."""
    if not msg.startswith("STATUS="):
        return False
    ages = [float(a) for a in re.findall(r" max-age ([\d.]+)s", msg)]
    return bool(ages) and min(ages) > flow_timeout + 0.5


def test_ready_status_and_watchdog_follow_the_data(tmp_path, db, collectors, monkeypatch):
    """READY=1 after the first stored batch; STATUS= lines; WATCHDOG=1 only while
    messages arrive and rows are stored (a silent feed stops the pings, data
    flowing again brings them back)."""
    flow_timeout = 2.0
    ns = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", ns.path)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")          # pings every second
    try:
        with sim_for(rate=5).running() as sim:
            c = collectors(tmp_path / "c", db, sim, ["NSE:SIMEQ00012 quote"],
                           kite={"silence_timeout": 300.0}, sink_extra={"flow_timeout": flow_timeout}, notify=True)
            assert wait_for(lambda: ns.times("READY=1")), c.output[-2000:]
            ready = ns.times("READY=1")[0]
            first_commit = c.wait_line("first batch stored; READY")
            assert first_commit
            assert wait_for(lambda: len([t for t in ns.times("WATCHDOG=1") if t > ready]) >= 3)
            assert any(m.startswith("STATUS=quote ") or m.startswith("STATUS=frames ") for _, m in ns.msgs)
            conn = ticker_conns(sim)[0]["id"]
            sim.fault_silence(600, connection=conn)        # no ticks, no heartbeats until told otherwise
            mark = len(ns.msgs)
            msgs = lambda: [m for _, m in ns.msgs[mark:]]
            # the collector reports the stall ...
            assert wait_for(lambda: any(_stall_status(m, flow_timeout) for m in msgs())), msgs()
            stall = next(i for i, m in enumerate(msgs()) if _stall_status(m, flow_timeout))
            # ... and keeps reporting it (the supervise loop goes on) without a single ping
            assert wait_for(lambda: sum(m.startswith("STATUS=") for m in msgs()[stall + 1:]) >= 3), msgs()
            during = msgs()[stall:]
            assert "WATCHDOG=1" not in during, during
            sim.fault_silence(0, connection=conn)          # data flows again
            n = q(db, "select count(*) from kite_tick_quote")[0][0]
            assert wait_for(lambda: q(db, "select count(*) from kite_tick_quote")[0][0] > n), c.output[-2000:]
            # pings again once data arrives and is stored
            assert wait_for(lambda: "WATCHDOG=1" in msgs()[stall + len(during):]), msgs()
            assert c.stop() == 0
        assert ns.times("STOPPING=1")
    finally:
        ns.close()


def _ist_now():
    from zoneinfo import ZoneInfo
    return datetime.now(ZoneInfo("Asia/Kolkata"))


def test_collector_stops_cleanly_after_the_session_close(tmp_path, db, collectors):
    """A session (XNSE calendar plus kite.extra_sessions) that closed a moment
    ago, with stop_after_close ending a few seconds from now: the collector
    collects, then stops by itself with every row stored, exit 0.  (The stop
    time is a real wall-clock moment; the few seconds only leave time to start.)"""
    now = _ist_now()
    close = now.replace(second=0, microsecond=0)
    if close.hour == 0 and close.minute == 0:
        pytest.skip("at midnight IST a session cannot have closed earlier the same day")
    open_ = close.replace(hour=close.hour - 1) if close.hour else close.replace(minute=0)
    stop_after = (now - close).total_seconds() + 10.0
    with sim_for(rate=5).running() as sim:
        c = collectors(tmp_path, db, sim, ["NSE:SIMEQ00013 quote"],
                       kite={"session_calendar": "XNSE", "stop_after_close": stop_after},
                       sections={"kite.extra_sessions": {now.date().isoformat(): [f"{open_:%H:%M}", f"{close:%H:%M}"]}})
        assert wait_for(lambda: q(db, "select count(*) from kite_tick_quote")[0][0] >= 3), c.output[-2000:]
        assert c.wait() == 0
    assert f"session {now.date()} {open_:%H:%M}-{close:%H:%M} IST" in c.output
    assert "session over (stop time" in c.output
    stop = re.search(r"stopped: all rows committed or spooled \(([\d,]+) committed, 0 spooled, 0 rejected, 0 lost",
                     c.output)
    assert stop, c.output[-3000:]
    # every row it received is in the table, the ones seen while it ran and the rest
    assert q(db, "select count(*) from kite_tick_quote")[0][0] == int(stop.group(1).replace(",", "")) >= 3


def test_before_the_session_it_reports_ready_and_waits(tmp_path, db, collectors, monkeypatch):
    """Started before the session: READY=1 at once (the unit is up), a STATUS and
    journal line saying when it connects, watchdog pings while waiting, no
    connection yet; SIGTERM while waiting is a clean stop."""
    now = _ist_now()
    open_ = (now + timedelta(minutes=11)).replace(second=0, microsecond=0)
    if (open_ + timedelta(minutes=1)).date() != now.date():
        pytest.skip("too close to midnight IST for a later session today")
    ns = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", ns.path)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    try:
        with sim_for(rate=5).running() as sim:
            c = collectors(tmp_path / "c", db, sim, ["NSE:SIMEQ00014 quote"], notify=True,
                           kite={"session_calendar": "XNSE"},
                           sections={"kite.extra_sessions": {now.date().isoformat():
                                                             [f"{open_:%H:%M}", f"{open_ + timedelta(minutes=1):%H:%M}"]}})
            line = c.wait_line("waiting for the session")
            assert f"connecting at {open_ - timedelta(minutes=5):%Y-%m-%d %H:%M} IST" in line
            assert wait_for(lambda: ns.times("READY=1") and len(ns.times("WATCHDOG=1")) >= 2)
            assert any(m.startswith("STATUS=waiting for the session") for _, m in ns.msgs)
            assert sim.stats()["connections_total"] == 0
            assert c.stop() == 0
    finally:
        ns.close()
