"""Binance message -> row conversion, on real recorded frames."""
import json
from datetime import datetime, timezone

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


def test_now_text_is_current_utc():
    t = A.text_to_dt(A.now_text())
    assert abs((t - datetime.now(timezone.utc)).total_seconds()) < 1


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("p"),
    lambda d: d.update(p=1.5),                 # a float, not the venue's string
    lambda d: d.update(p="1.2.3"),
    lambda d: d.update(a="12"),
    lambda d: d.update(m="true"),
    lambda d: d.update(T=None),
])
def test_malformed_agg_trade_raises(mutate):
    d = {"e": "aggTrade", "E": 1, "a": 5, "s": "X", "p": "1.0", "q": "2", "f": 1, "l": 2, "T": 1, "m": True}
    mutate(d)
    with pytest.raises(A.Malformed):
        A.agg_trade_row(d, RECV)


def test_rest_rows():
    r = A.rest_agg_trade_row("BTCUSDT", {"a": 7, "p": "1.10", "q": "3", "f": 1, "l": 1, "T": 5, "m": False}, RECV)
    assert r[1:4] == (7, "1.10", "3") and r[8] is None
    k = [60000, "1.0", "2.0", "0.5", "1.5", "10", 119999, "15", 4, "5", "7.5", "0"]
    r = A.rest_kline_row("BTCUSDT", "1m", k, RECV)
    assert A.text_to_dt(r[2]) == A.ms_to_dt(60000) and r[4:9] == ("1.0", "2.0", "0.5", "1.5", "10") and r[-1] == "rest"


def test_stream_names_and_categories():
    assert A.stream_name("BTCUSDT", A.KLINE, "1m") == "btcusdt@kline_1m"
    assert A.stream_name("BTCUSDT", A.MARK_PRICE) == "btcusdt@markPrice@1s"
    assert A.category(A.BOOK_TICKER) == "public" and A.category(A.AGG_TRADE) == "market"
