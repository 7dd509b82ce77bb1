"""Binance message -> row conversion, on real recorded frames."""
import json
import time
from datetime import datetime, timedelta, timezone

import pytest

from feeds.binance import adapter as A

from conftest import shared_file

RECV = "2021-07-22 00:00:00.000000+00:00"


def frames(name):
    for line in shared_file("binance", name).read_text().splitlines():
        ts, sep, body = line.partition(": ")
        if not sep or not body.startswith("{\"stream\""):
            continue
        yield json.loads(body)


def test_every_recorded_agg_trade_converts_with_strings_unchanged():
    n = 0
    for m in frames("binance-usdm-2021-07-22.frames"):
        d = m["data"]
        if d.get("e") != "aggTrade":
            continue
        row = A.agg_trade_row(d, RECV)
        assert row[:6] == (d["s"], d["a"], d["p"], d["q"], d["f"], d["l"])
        t = A.text_to_dt(row[6])
        assert t == A.ms_to_dt(d["T"]) and int(t.timestamp() * 1000) == d["T"]
        assert row[7] is d["m"]
        n += 1
    assert n == 91


def test_book_ticker_and_closed_kline_rows():
    bt = kl = 0
    for m in frames("binance-usdm-2021-07-22.frames"):
        d = m["data"]
        if d.get("e") == "bookTicker":
            r = A.book_ticker_row(d, RECV)
            assert r[:6] == (d["s"], d["u"], d["b"], d["B"], d["a"], d["A"])
            bt += 1
        elif d.get("e") == "kline":
            r = A.kline_row(d, RECV)
            k = d["k"]
            assert r[4:9] == (k["o"], k["h"], k["l"], k["c"], k["v"]) and r[-1] == "ws"
            kl += 1
    assert (bt, kl) == (613, 67)


def test_ms_to_dt_is_exact():
    assert A.ms_to_dt(1626992741017) == datetime(2021, 7, 22, 22, 25, 41, 17000, tzinfo=timezone.utc)


@pytest.mark.parametrize("ms", [0, 1, 999, 1000, 1626992741017, 1626992741999, 4102444799999])
def test_ms_text_is_exact_and_parses_back(ms):
    assert A.text_to_dt(A.ms_text(ms)) == A.ms_to_dt(ms)


def _epoch_us(t: datetime) -> int:
    return (t - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)


def test_now_text_is_current_utc():
    """The text is the wall clock read between the two readings around the call (UTC, microseconds)."""
    before = time.time_ns() // 1000
    text = A.now_text()
    after = time.time_ns() // 1000
    t = A.text_to_dt(text)
    assert t.utcoffset() == timedelta(0) and text.endswith("+00:00")
    assert before <= _epoch_us(t) <= after, (before, text, after)


T0 = 1_626_992_741_017          # 2021-07-22 22:25:41.017 UTC, as in the recording
AGG = {"e": "aggTrade", "E": T0, "a": 87353230, "s": "SUSHIUSDT", "p": "7.6110", "q": "2", "f": 101, "l": 102,
       "T": T0 - 5, "m": True}
BOOK = {"e": "bookTicker", "u": 600859600576, "s": "SUSHIUSDT", "b": "7.6110", "B": "2", "a": "7.6120", "A": "297",
        "T": T0 - 5, "E": T0}
KLINE = {"e": "kline", "E": T0, "s": "CTKUSDT", "k": {
    "t": 1626992700000, "T": 1626992759999, "s": "CTKUSDT", "i": "1m", "f": 23961275, "L": 23961322, "o": "1.01000",
    "c": "1.01100", "h": "1.01100", "l": "1.01000", "v": "3917", "n": 48, "x": True, "q": "3957.89900", "V": "1729",
    "Q": "1748.01900", "B": "0"}}
MARK = {"e": "markPriceUpdate", "E": T0, "s": "BTCUSDT", "p": "32000.10", "i": "32001.5", "P": "32010.0",
        "r": "-0.00012000", "T": 1626998400000}
TICKER = {"e": "24hrTicker", "E": T0, "s": "BTCUSDT", "p": "-120.50", "P": "-0.375", "w": "32100.2", "c": "32000.1",
          "Q": "0.010", "o": "32120.6", "h": "32500", "l": "31800", "v": "250000.5", "q": "8025000000.12",
          "O": T0 - 86_400_000, "C": T0, "F": 1000, "L": 2000, "n": 1001}
FAR = 10 ** 15                  # 33658-09-27: the year-33658 event time seen on the wire
ARABIC = "\u0667.\u0666\u0661\u0661\u0660"      # "7.6110" in Arabic-Indic digits


def test_plausible_messages_convert():
    assert A.agg_trade_row(dict(AGG), RECV)[:6] == ("SUSHIUSDT", 87353230, "7.6110", "2", 101, 102)
    assert A.book_ticker_row(dict(BOOK), RECV)[1] == 600859600576
    assert A.kline_row(dict(KLINE), RECV)[4] == "1.01000"
    assert A.mark_price_row(dict(MARK), RECV)[5] == "-0.00012000"          # funding rate may be negative
    assert A.ticker_row(dict(TICKER), RECV)[2:4] == ("-120.50", "-0.375")   # so may the price change


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("p"),
    lambda d: d.update(p=1.5),                 # a float, not the venue's string
    lambda d: d.update(p="1.2.3"),
    lambda d: d.update(a="12"),
    lambda d: d.update(m="true"),
    lambda d: d.update(T=None),
    lambda d: d.update(p="-1.5"),              # negative price
    lambda d: d.update(p="0"),                 # prices are > 0
    lambda d: d.update(p=".0"),
    lambda d: d.update(p="1e400"),
    lambda d: d.update(p="9" * 100),           # 100 digits
    lambda d: d.update(p=ARABIC),              # digits, but not ASCII ones
    lambda d: d.update(p=" 7.6"),
    lambda d: d.update(q="-2"),                # negative quantity
    lambda d: d.update(a=2 ** 63),             # beyond bigint
    lambda d: d.update(a=-1),
    lambda d: d.update(f=2 ** 64),
    lambda d: d.update(f=103),                 # first trade id after the last
    lambda d: d.update(E=0),                   # 1970
    lambda d: d.update(E=1_500_000_000_000),   # 2017: before USD-M futures existed
    lambda d: d.update(T=FAR),
    lambda d: d.update(E=FAR),
    lambda d: d.update(s=["SUSHIUSDT"]),
])
def test_malformed_or_out_of_range_agg_trade_raises(mutate):
    d = dict(AGG)
    mutate(d)
    with pytest.raises(A.Malformed):
        A.agg_trade_row(d, RECV)
    with pytest.raises(ValueError):            # Malformed is a ValueError
        A.agg_trade_row(d, RECV)


@pytest.mark.parametrize("field, value", [
    ("u", 2 ** 63), ("u", -5), ("u", "600859600576"), ("b", "-7.6110"), ("a", "1e400"), ("b", "1" * 33),
    ("b", ARABIC), ("A", "-1"), ("B", "1e-400"), ("E", 0), ("E", FAR), ("T", FAR),
])
def test_out_of_range_book_ticker_raises(field, value):
    d = dict(BOOK, **{field: value})
    with pytest.raises(A.Malformed):
        A.book_ticker_row(d, RECV)


@pytest.mark.parametrize("key, value", [
    ("s", ["CTKUSDT"]), ("i", ["1m"]), ("i", "7m"), ("t", 4102444800000), ("t", 1626992700001),
    ("T", 1626992700000 + 120_000), ("o", "-1.0"), ("v", "-3917"), ("n", 2 ** 63), ("f", -2), ("L", 2 ** 63),
])
def test_out_of_range_kline_raises(key, value):
    d = dict(KLINE, k=dict(KLINE["k"], **{key: value}))
    with pytest.raises(A.Malformed):
        A.kline_row(d, RECV)


@pytest.mark.parametrize("field, value", [
    ("p", "-32000.10"), ("p", "0"), ("i", "-1"), ("r", "1e400"), ("r", "-" + "1" * 40), ("T", FAR), ("E", 0),
])
def test_out_of_range_mark_price_raises(field, value):
    with pytest.raises(A.Malformed):
        A.mark_price_row(dict(MARK, **{field: value}), RECV)


@pytest.mark.parametrize("field, value", [
    ("c", "-1"), ("v", "-250000.5"), ("w", "-1"), ("n", -1), ("F", -2), ("L", 2 ** 63), ("O", 0), ("C", FAR),
    ("p", ARABIC),
])
def test_out_of_range_ticker_raises(field, value):
    with pytest.raises(A.Malformed):
        A.ticker_row(dict(TICKER, **{field: value}), RECV)


def test_time_window_follows_an_injected_clock(monkeypatch):
    """The window is a module-level policy; a test can set 'now' (here: the recording's day)."""
    from feeds import plausible as P
    monkeypatch.setattr(A, "WINDOW", P.Window(P.BINANCE_FUTURES_START_MS, ahead_ms=10 * 60_000,
                                              clock=lambda: T0))
    A.agg_trade_row(dict(AGG, E=T0 + 9 * 60_000, T=T0 + 9 * 60_000), RECV)      # 9 min ahead: fine
    with pytest.raises(A.Malformed, match="ahead of now"):
        A.agg_trade_row(dict(AGG, E=T0 + 11 * 60_000), RECV)                    # 11 min ahead: not
    monkeypatch.setattr(A, "WINDOW", P.Window(P.BINANCE_FUTURES_START_MS, behind_ms=3600_000, clock=lambda: T0))
    with pytest.raises(A.Malformed, match="before"):
        A.agg_trade_row(dict(AGG, E=T0 - 2 * 3600_000), RECV)


def test_rest_rows():
    r = A.rest_agg_trade_row("BTCUSDT", {"a": 7, "p": "1.10", "q": "3", "f": 1, "l": 1, "T": T0, "m": False}, RECV)
    assert r[1:4] == (7, "1.10", "3") and r[8] is None
    t = 1626992700000
    k = [t, "1.0", "2.0", "0.5", "1.5", "10", t + 59_999, "15", 4, "5", "7.5", "0"]
    r = A.rest_kline_row("BTCUSDT", "1m", k, RECV)
    assert A.text_to_dt(r[2]) == A.ms_to_dt(t) and r[4:9] == ("1.0", "2.0", "0.5", "1.5", "10") and r[-1] == "rest"


@pytest.mark.parametrize("i, value", [(0, 60_000), (0, FAR), (1, "-1.0"), (5, "1e400"), (8, -1), (6, 0)])
def test_out_of_range_rest_kline_raises(i, value):
    """A REST gap fill is held to the same ranges; its past bound is the venue's start."""
    t = 1626992700000
    k = [t, "1.0", "2.0", "0.5", "1.5", "10", t + 59_999, "15", 4, "5", "7.5", "0"]
    k[i] = value
    with pytest.raises(A.Malformed):
        A.rest_kline_row("BTCUSDT", "1m", k, RECV)
    with pytest.raises(A.Malformed):
        A.rest_agg_trade_row("BTCUSDT", {"a": 7, "p": "1.10", "q": "3", "f": 1, "l": 1, "T": 5, "m": False}, RECV)


def test_stream_names_and_categories():
    assert A.stream_name("BTCUSDT", A.KLINE, "1m") == "btcusdt@kline_1m"
    assert A.stream_name("BTCUSDT", A.MARK_PRICE) == "btcusdt@markPrice@1s"
    assert A.category(A.BOOK_TICKER) == "public" and A.category(A.AGG_TRADE) == "market"
