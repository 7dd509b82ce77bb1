"""Contract of the kiteconnect internals feeds.kite.wire relies on: the pinned version, KiteTicker's
naive local-time timestamps (hence TZ=Asia/Kolkata), KiteTicker.ws/.factory, connect() on a running
reactor, and the callback shapes the collector uses."""
from __future__ import annotations

import inspect
import logging
import os
import struct
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from kiteconnect import KiteTicker
from kiteconnect import ticker as kt_module
from twisted.internet.protocol import ReconnectingClientFactory

from conftest import pinned_in_setup_cfg
from feeds.kite import wire
from feeds.kite.wire import PINNED_VERSION, WireVersionError, check_version, installed_version

IST = ZoneInfo("Asia/Kolkata")
TOKEN = 408065                     # INFY, NSE (segment 1: prices in paise)
LAST_TRADE = 1625462487            # 2021-07-05 10:51:27 IST
EXCHANGE_TS = 1625462490


def full_frame() -> bytes:
    """One frame with one full-mode (184-byte) packet, laid out as Kite's WebSocket document says."""
    head = struct.pack(">11I", TOKEN, 157370, 5, 157210, 1_000_000, 300, 400, 156000, 158000, 155500, 157000)
    times = struct.pack(">5I", LAST_TRADE, 0, 0, 0, EXCHANGE_TS)
    depth = b"".join(struct.pack(">IIHH", 10 + i, 157300 + i * 5, 1, 0) for i in range(10))
    packet = head + times + depth
    assert len(packet) == 184
    return struct.pack(">HH", 1, len(packet)) + packet


@pytest.fixture
def restore_tz():
    old = os.environ.get("TZ")
    yield
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


def parse(frame: bytes) -> dict:
    ticks = KiteTicker("key", "token")._parse_binary(frame)
    assert len(ticks) == 1
    return ticks[0]


def test_the_pin_is_setup_cfg_and_installed():
    assert PINNED_VERSION == pinned_in_setup_cfg("kiteconnect")
    assert installed_version() == PINNED_VERSION
    check_version()
    with pytest.raises(WireVersionError, match=r"kiteconnect 5\.3\.0 is installed.*kiteconnect==5\.2\.2"):
        check_version("5.3.0")


def test_use_ist_localtime_refuses_another_version(monkeypatch, restore_tz):
    monkeypatch.setattr(wire, "installed_version", lambda: "6.0.0")
    with pytest.raises(WireVersionError):
        wire.use_ist_localtime()


def test_kiteticker_timestamps_are_naive_local_time_so_the_process_runs_in_ist(restore_tz):
    os.environ["TZ"] = "UTC"
    time.tzset()
    in_utc = parse(full_frame())
    wire.use_ist_localtime()
    assert os.environ["TZ"] == "Asia/Kolkata" and time.localtime(0).tm_gmtoff == 19_800
    tick = parse(full_frame())
    for key, epoch in (("last_trade_time", LAST_TRADE), ("exchange_timestamp", EXCHANGE_TS)):
        assert tick[key].tzinfo is None                               # naive ...
        assert tick[key] == datetime.fromtimestamp(epoch, IST).replace(tzinfo=None)   # ... IST wall clock
        assert in_utc[key] != tick[key]                               # and it depends on the local zone
    assert tick["last_trade_time"] == datetime(2021, 7, 5, 10, 51, 27)
    assert tick["instrument_token"] == TOKEN and tick["mode"] == KiteTicker.MODE_FULL
    # the parser still takes its datetime from the ticker module's datetime.fromtimestamp
    assert kt_module.datetime is datetime
    assert "datetime.fromtimestamp(" in inspect.getsource(KiteTicker._parse_binary)


def test_ws_and_factory_attributes_and_abort():
    kt = KiteTicker("key", "token", reconnect_max_tries=7, reconnect_max_delay=9, connect_timeout=3)
    assert kt.ws is None and not wire.connection_started(kt) and not wire.abort_connection(kt)
    kt._create_connection("ws://127.0.0.1:9/")                        # what connect() does first (no I/O)
    assert wire.connection_started(kt) and isinstance(kt.factory, ReconnectingClientFactory)
    assert (kt.factory.maxRetries, kt.factory.maxDelay) == (7, 9)

    class Proto:
        def __init__(self):
            self.dropped = []

        def dropConnection(self, abort=False):
            self.dropped.append(abort)

    seen = []
    kt.on_connect = lambda ws, response: seen.append((ws, response))
    proto = Proto()
    kt._on_connect(proto, "response")                                 # what the protocol's onConnect calls
    assert kt.ws is proto and seen == [(kt, "response")]
    assert wire.abort_connection(kt) and proto.dropped == [True]
    # the real protocol class has the autobahn call used above
    params = inspect.signature(kt_module.KiteTickerClientProtocol.dropConnection).parameters
    assert "abort" in params
    assert "self.factory.ws = self" in inspect.getsource(kt_module.KiteTickerClientProtocol.onConnect)


def test_connect_runs_the_reactor_only_when_it_is_not_running():
    src = inspect.getsource(KiteTicker.connect)
    assert "if not reactor.running:" in src and "reactor.run(" in src
    assert kt_module.reactor is __import__("twisted.internet.reactor", fromlist=["reactor"])

    class Ticker:
        calls = 0

        def connect(self):
            self.calls += 1

    t = Ticker()
    with pytest.raises(RuntimeError, match="not running"):
        wire.connect_in_reactor(t)                                    # the reactor is not running in tests
    assert t.calls == 0


def test_callback_shapes_the_collector_uses():
    kt = KiteTicker("key", "token")
    got = []
    kt.on_message = lambda ws, payload, is_binary: got.append(("message", ws, payload, is_binary))
    kt.on_ticks = lambda ws, ticks: got.append(("ticks", ws, len(ticks)))
    kt.on_close = lambda ws, code, reason: got.append(("close", ws, code, reason))
    kt.on_error = lambda ws, code, reason: got.append(("error", ws, code, reason))
    kt.on_reconnect = lambda ws, attempts: got.append(("reconnect", ws, attempts))
    kt.on_noreconnect = lambda ws: got.append(("noreconnect", ws))
    frame = full_frame()
    kt._on_message(None, frame, True)
    kt._on_close(None, 1006, "gone")
    kt._on_error(None, 1006, "gone")
    kt._on_reconnect(3)
    kt._on_noreconnect()
    assert got == [("message", kt, frame, True), ("ticks", kt, 1), ("close", kt, 1006, "gone"),
                   ("error", kt, 1006, "gone"), ("reconnect", kt, 3), ("noreconnect", kt)]
    for name in ("subscribe", "set_mode", "close", "connect"):
        assert callable(getattr(kt, name))
    # the collector quiets the library's logs through the "kiteconnect" logger
    assert kt_module.log is logging.getLogger("kiteconnect.ticker")


def test_feed_zerodha_refuses_another_version_with_one_line(monkeypatch, restore_tz, tmp_path):
    from click.testing import CliRunner

    from feeds.kite.main import main
    cfg = tmp_path / "kite.toml"
    cfg.write_text('[kite]\napi_key = "k"\nsession_calendar = "none"\n')
    monkeypatch.setattr(wire, "installed_version", lambda: "6.0.0")
    r = CliRunner().invoke(main, ["--config", str(cfg), "--instrument", "NSE:INFY"],
                           env={"FEEDS_DSN": "host=127.0.0.1 port=1 dbname=x"})
    assert r.exit_code == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "kiteconnect 6.0.0 is installed" in lines[0]


def test_the_collector_reaches_kiteticker_internals_only_through_wire():
    from feeds.kite import collector
    src = inspect.getsource(collector)
    for internal in ('"ws"', '"factory"', ".ws.", ".factory", "dropConnection", "ticker.connect"):
        assert internal not in src, internal
