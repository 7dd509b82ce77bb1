"""feed-ibkr's pure pieces: market hours (XNYS sessions, early closes, holidays, extended hours),
settings checks, TWS live messages -> rows (exact text, implausible values refused), the wire tap."""
from __future__ import annotations

import asyncio
import datetime as dt
from zoneinfo import ZoneInfo

import ib_async
import pytest
from ib_async import IB, Stock

from feeds.config import Config, ConfigError
from feeds.health import Health
from feeds.ibkr import live as L
from feeds.ibkr import live_rows as R
from feeds.ibkr.contracts import parse_contracts
from feeds.ibkr.wire import LIVE_MESSAGES, WireVersionError, req_id_of, tap_messages
from feeds.plausible import Malformed
from feeds.settings import IBKR_FILE, check_document

NY = ZoneInfo("America/New_York")
UTC = dt.timezone.utc
ROWS = parse_contracts("symbol,secType,exchange,currency,primaryExchange\nAAPL,STK,SMART,USD,NASDAQ\n"
                       "SPX,IND,CBOE,USD,\n")


def ny(*a) -> dt.datetime:
    return dt.datetime(*a, tzinfo=NY)


def cal(**kw) -> L.ExchangeCalendar:
    return L.new_york_calendar(L.LiveSettings(**kw))


# ------------------------------------------------------------------------------------ market hours

def test_a_regular_day_connects_10_minutes_before_the_open_and_stops_after_the_close():
    p = L.plan_run(ny(2026, 12, 1, 9, 0), cal(), stop_after=dt.timedelta(minutes=5))
    assert p.action == "collect"
    assert p.start == ny(2026, 12, 1, 9, 20) and p.stop == ny(2026, 12, 1, 16, 5)
    assert p.window == (ny(2026, 12, 1, 9, 30), ny(2026, 12, 1, 16, 0))
    started_late = L.plan_run(ny(2026, 12, 1, 11, 0), cal())
    assert started_late.start == ny(2026, 12, 1, 11, 0)


def test_summer_and_winter_opens_are_09_30_new_york():
    assert L.plan_run(ny(2026, 7, 1, 9, 0), cal()).window[0].astimezone(UTC).hour == 13
    assert L.plan_run(ny(2026, 12, 1, 9, 0), cal()).window[0].astimezone(UTC).hour == 14


def test_early_close_stops_after_13_00():
    p = L.plan_run(ny(2026, 11, 27, 9, 20), cal(), stop_after=dt.timedelta(seconds=300))
    assert p.window[1] == ny(2026, 11, 27, 13, 0) and p.stop == ny(2026, 11, 27, 13, 5)
    assert "early close" in p.reason


def test_holidays_weekends_and_configured_holidays_have_nothing_to_collect():
    p = L.plan_run(ny(2026, 11, 26, 9, 20), cal())
    assert p.action == "none" and p.reason == ("no NYSE session on Thursday 2026-11-26 (NYSE holiday in the "
                                               "XNYS calendar)")
    assert "weekend" in L.plan_run(ny(2026, 11, 28, 9, 20), cal()).reason
    p = L.plan_run(ny(2026, 12, 1, 9, 20), cal(extra_holidays=[dt.date(2026, 12, 1)]))
    assert p.action == "none" and "holiday in live.extra_holidays" in p.reason


def test_extra_session_and_after_the_stop():
    c = cal(extra_sessions={dt.date(2026, 11, 28): (dt.time(10, 0), dt.time(11, 0))})
    p = L.plan_run(ny(2026, 11, 28, 9, 0), c, stop_after=dt.timedelta(0))
    assert p.window == (ny(2026, 11, 28, 10, 0), ny(2026, 11, 28, 11, 0)) and p.start == ny(2026, 11, 28, 9, 50)
    assert L.plan_run(ny(2026, 12, 1, 16, 30), cal(), stop_after=dt.timedelta(minutes=5)).action == "over"


def test_extended_hours_run_from_04_00_to_20_00_and_to_17_00_on_an_early_close():
    p = L.plan_run(ny(2026, 12, 1, 3, 50), cal(), extended=True, stop_after=dt.timedelta(0))
    assert p.window == (ny(2026, 12, 1, 4, 0), ny(2026, 12, 1, 20, 0)) and p.start == ny(2026, 12, 1, 3, 50)
    assert L.plan_run(ny(2026, 11, 27, 3, 50), cal(), extended=True).window[1] == ny(2026, 11, 27, 17, 0)


def test_without_a_calendar_it_collects_until_stopped():
    p = L.plan_run(ny(2026, 11, 26, 3, 0), None)
    assert p.action == "collect" and p.stop is None and p.window is None


# ------------------------------------------------------------------------------------ settings

def settings_doc(tmp_path, live: dict) -> Config:
    return check_document(Config({"live": live}, tmp_path / "ibkr.toml"), IBKR_FILE)


def test_more_tick_by_tick_symbols_than_ib_allows_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        L.load_settings(settings_doc(tmp_path, {"tick_by_tick": ["AAPL", "MSFT"], "max_tick_by_tick": 3}))
    assert (e.value.key, e.value.file) == ("live.tick_by_tick", str(tmp_path / "ibkr.toml"))
    assert "4 tick-by-tick subscriptions" in str(e.value) and "at most 1 symbol" in str(e.value)
    ls = L.load_settings(settings_doc(tmp_path, {"tick_by_tick": ["aapl"], "max_tick_by_tick": 2}))
    assert ls.tick_by_tick == ["AAPL"] and ls.client_id == 72


def test_tick_by_tick_of_an_index_or_unknown_symbol_is_refused(tmp_path):
    ls = L.load_settings(settings_doc(tmp_path, {"tick_by_tick": ["SPX"]}))
    with pytest.raises(ConfigError, match="SPX is not a STK row"):
        L.select_contracts(ROWS, None, ls)
    ls = L.load_settings(settings_doc(tmp_path, {}))
    assert [r.symbol for r in L.select_contracts(ROWS, ["SPX"], ls)] == ["SPX"]


# ------------------------------------------------------------------------------------ rows

def test_rtvolume_keeps_ibs_text_and_time():
    t = R.parse_rtvolume("701.28;1;1348075471534;67854;701.46918464;true")
    assert (t.price, t.size, t.time_ms, t.total_volume, t.vwap) == ("701.28", "1", 1348075471534, "67854",
                                                                     "701.46918464")
    assert R.utc_from_ms(t.time_ms) == dt.datetime(2012, 9, 19, 17, 24, 31, 534000, tzinfo=UTC)
    assert R.parse_rtvolume(";0;1348075471534;67854;701.46;false") is None          # volume only


@pytest.mark.parametrize("text", ["-1;1;1348075471534;1;1;true", "0;1;1348075471534;1;1;true",
                                  "nan;1;1348075471534;1;1;true", "1e400;1;1348075471534;1;1;true",
                                  "701.28;-1;1348075471534;1;1;true", "701.28;1;9999999999999999;1;1;true",
                                  "701.28;1;1000;1;1;true", "701.28;1;x;1;1;true", "701.28;1;1348075471534"])
def test_implausible_rtvolume_is_malformed(text):
    with pytest.raises(Malformed):
        R.parse_rtvolume(text)


def test_tick_by_tick_fields():
    t = R.parse_all_last(["99", "5", "2", "1700000000", "190.12", "300", "0", "NASDAQ", ""])
    assert (t.price, t.size, t.time_ms, t.exchange, t.conditions) == ("190.12", "300", 1_700_000_000_000, "NASDAQ",
                                                                      None)
    assert R.parse_bid_ask(["99", "5", "3", "1700000000", "190.1", "-1", "200", "0", "0"]) == \
        (1_700_000_000_000, "190.1", "200", None, None)
    with pytest.raises(Malformed):
        R.parse_all_last(["99", "5", "2", "1700000000", "-3", "300", "0", "NASDAQ", ""])


def test_a_run_of_bid_ask_updates_is_one_quote():
    qs = R.Quotes()
    qs.price("A", R.BID, "10.01", "300")
    qs.size("A", R.BID_SIZE, "300")           # TWS repeats the size: no change
    qs.price("A", R.ASK, "10.03", "100")
    assert qs.take("A") == ("10.01", "300", "10.03", "100")
    assert qs.take("A") is None
    qs.size("A", R.ASK_SIZE, "200")
    qs.price("A", R.BID, "-1", "0")            # no bid any more
    assert qs.flush() == [("A", None, None, "10.03", "200")]
    with pytest.raises(Malformed):
        qs.price("A", R.ASK, "abc", "1")


# ------------------------------------------------------------------------------------ collector path

class Sink:
    fatal = None

    def __init__(self):
        self.rows: dict[str, list] = {}

    def add_many(self, table, rows):
        self.rows.setdefault(table, []).extend(rows)


class Quiet:
    def __init__(self):
        self.msgs = []

    def notify(self, msg):
        self.msgs.append(msg)


def collector():
    sink = Sink()
    health = Health(unit="t", notifier=Quiet())
    col = L.LiveCollector(L.LiveSettings(), ROWS, sink, health)
    aapl, spx = col.by_symbol["AAPL"], col.by_symbol["SPX"]
    aapl.con_id, spx.con_id = 265598, 416904
    col.by_req = {1: (aapl, "mktData"), 2: (spx, "mktData"), 3: (aapl, "AllLast")}
    return col, sink, health


def test_messages_become_rows_with_ibs_text_and_the_reported_market_data_type():
    col, sink, health = collector()
    for f in (["58", "1", "1", "3"],
              ["1", "6", "1", "1", "190.10", "300", "1"], ["2", "6", "1", "0", "300"],
              ["1", "6", "1", "2", "190.12", "100", "1"], ["2", "6", "1", "3", "100"],
              ["1", "6", "1", "4", "190.11", "5", "0"],
              ["46", "6", "1", "48", "190.11;5;1700000000123;1000;190.0;true"],
              ["1", "6", "2", "4", "5000.25", "0", "0"],
              ["99", "3", "2", "1700000001", "190.13", "7", "0", "ARCA", ""]):
        col._tap(int(f[0]), f)
    col._flush()
    (trade, alllast) = sink.rows["ibkr_trade"]
    assert trade[:6] == ("AAPL", 265598, "rtvolume", "190.11", "5", R.utc_from_ms(1_700_000_000_123))
    assert trade[8] == 3 and trade[9:11] == ("1000", "190.0")
    assert alllast[2:5] == ("alllast", "190.13", "7") and alllast[12] is None and alllast[11] == "ARCA"
    (quote,) = sink.rows["ibkr_quote"]
    assert quote[:7] == ("AAPL", 265598, "mktdata", "190.10", "300", "190.12", "100") and quote[10] == 3
    (index,) = sink.rows["ibkr_index_tick"]
    assert index[:4] == ("SPX", 416904, "5000.25", None)


def test_delayed_data_stores_the_last_price_as_the_trade():
    col, sink, health = collector()
    for f in (["58", "1", "1", "3"], ["1", "6", "1", "68", "190.11", "5", "0"], ["2", "6", "1", "71", "5"],
              ["1", "6", "1", "4", "190.12", "5", "0"]):
        col._tap(int(f[0]), f)
    col._flush()
    (trade,) = sink.rows["ibkr_trade"]
    assert trade[2:6] == ("last", "190.11", "5", None) and trade[8] == 3


def test_malformed_ticks_are_counted_never_stored():
    col, sink, health = collector()
    col._tap(46, ["46", "6", "1", "48", "-5;5;1700000000123;1000;190.0;true"])
    col._tap(1, ["1", "6", "2", "4", "inf", "0", "0"])
    col._tap(46, ["46", "6", "1", "48", "190;5;1700000000123"])
    col._flush()
    assert health.malformed == 3
    assert not sink.rows.get("ibkr_trade") and not sink.rows.get("ibkr_index_tick")


def test_errors_are_recorded_against_their_contract_and_refusals_end_the_request():
    col, sink, health = collector()
    col._on_error(1, 354, "Requested market data is not subscribed.", None)
    col._on_error(3, 10190, "Max number of tick-by-tick requests has been reached.", None)
    col._on_error(-1, 2104, "Market data farm connection is OK:usfarm", None)
    col._on_error(-1, 2103, "Market data farm connection is broken:usfarm", None)
    rows = sink.rows["ibkr_live_error"]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("AAPL", 265598, "mktData", 354),
                                                        ("AAPL", 265598, "AllLast", 10190)]
    aapl = col.by_symbol["AAPL"]
    assert aapl.mkt_state == "refused" and aapl.tbt_state == "refused"
    assert col.figures()["farm broken"] == "usfarm"
    col._on_error(-1, 2104, "Market data farm connection is OK:usfarm", None)
    assert "farm broken" not in col.figures()
    col._on_error(-1, 1100, "Connectivity between IB and Trader Workstation has been lost.", None)
    assert col.figures()["IB-TWS"] == "connectivity lost (1100)"
    col._on_error(-1, 1101, "Connectivity between IB and Trader Workstation has been restored - data lost.", None)
    assert col._data_lost and "IB-TWS" not in col.figures()


# ------------------------------------------------------------------------------------ the wire tap

def test_tap_sees_the_text_first_and_ib_async_still_handles_the_message():
    async def main():
        ib = IB()
        seen = []
        tap_messages(ib, lambda i, f: seen.append((i, list(f))))
        tap_messages(ib, lambda i, f: seen.append((i, list(f))))          # replaces, never stacks
        ticker = ib.wrapper.startTicker(7, Stock("AAPL", "SMART", "USD", conId=265598), "mktData")
        ib.client.decoder.interpret(["1", "6", "7", "1", "190.10", "300", "1"])
        ib.client.decoder.interpret(["46", "6", "7", "48", "190.11;5;1700000000123;1000;190.0;true"])
        assert req_id_of(ib, ticker, "mktData") == 7
        return seen, ticker
    seen, ticker = asyncio.run(main())
    assert seen == [(1, ["1", "6", "7", "1", "190.10", "300", "1"]),
                    (46, ["46", "6", "7", "48", "190.11;5;1700000000123;1000;190.0;true"])]
    assert ticker.bid == 190.10 and ticker.last == 190.11                  # ib_async's own handling


def test_tap_refuses_another_ib_async_version(monkeypatch):
    monkeypatch.setattr(ib_async, "__version__", "2.2.0")
    with pytest.raises(WireVersionError):
        tap_messages(IB(), lambda i, f: None)


def test_tapped_handlers_have_the_expected_shape():
    import inspect
    decoder = IB().client.decoder
    for msg_id, name in LIVE_MESSAGES.items():
        h = decoder.handlers[msg_id]
        assert list(inspect.signature(h).parameters) == ["fields"]
        assert name in (h.__name__, inspect.getclosurevars(h).nonlocals.get("methodName") if
                        inspect.isfunction(h) else None), msg_id
        assert callable(getattr(decoder.wrapper, name, None) or getattr(decoder, name, None))
    decoder.handlers[2] = lambda fields: None          # not the handler the tap was written against
    with pytest.raises(WireVersionError, match="message 2"):
        tap_messages(type("IBStub", (), {"client": type("C", (), {"decoder": decoder})()})(), lambda i, f: None)
    assert not hasattr(decoder.handlers[1], "_tap")     # nothing replaced


def test_watchdog_is_fed_only_while_ib_says_it_is_down():
    col, sink, health = collector()
    health.ready = True
    assert not col.waiting_for_ib()
    col._on_error(-1, 2105, "HMDS data farm connection is broken:ushmds", None)
    assert col.waiting_for_ib()
    col.keepalive()
    assert health.notifier.msgs == ["WATCHDOG=1"]
    col._on_error(-1, 2106, "HMDS data farm connection is OK:ushmds", None)
    assert not col.waiting_for_ib()
    col._on_error(-1, 1100, "Connectivity between IB and Trader Workstation has been lost.", None)
    assert col.waiting_for_ib()
    col._on_error(-1, 1102, "Connectivity between IB and Trader Workstation has been restored - data maintained.",
                  None)
    assert not col.waiting_for_ib() and not col._data_lost


@pytest.mark.parametrize("code", [354, 10089, 10090, 10167, 10168, 10190, 10197, 200])
def test_each_market_data_error_is_recorded_against_its_contract_while_the_others_go_on(code):
    """IB's market-data errors on AAPL's request: a row with IB's code and text for AAPL; the
    refusals end that request, 10090/10167 (part or all delayed) do not; SPX stays live."""
    col, sink, health = collector()
    for s in col.subs:
        s.mkt_state = "live"
    text = f"IB's text for {code}"
    col._on_error(1, code, text, None)
    rows = sink.rows["ibkr_live_error"]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("AAPL", 265598, "mktData", code)]
    assert text in rows[0]
    assert col.by_symbol["AAPL"].mkt_state == ("refused" if code in L.REFUSING else "live")
    assert col.by_symbol["SPX"].mkt_state == "live"
