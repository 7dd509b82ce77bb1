"""The contracts file: validation stops on the first bad row with file, line and field."""
from __future__ import annotations

from pathlib import Path

import pytest

from feeds.ibkr.contracts import ContractsError, fetchable, load_contracts, parse_contracts

ROOT = Path(__file__).resolve().parents[2]
HEAD = ("symbol,secType,exchange,currency,primaryExchange,lastTradeDateOrContractMonth,strike,right,multiplier,"
        "priority\n")


def bad(text: str) -> ContractsError:
    with pytest.raises(ContractsError) as e:
        parse_contracts(text, "/etc/feeds/contracts.csv")
    return e.value


def test_shipped_contracts_file_is_valid():
    rows = load_contracts(ROOT / "etc" / "contracts.csv")
    by = {(r.symbol, r.sec_type): r for r in rows}
    assert {r.sec_type for r in rows} == {"STK", "IND", "FUT", "OPT"}
    assert by[("SPX", "IND")].calendar == "XNYS" and by[("SPX", "IND")].fetched
    assert by[("AAPL", "STK")].primary_exchange == "NASDAQ" and by[("AAPL", "STK")].calendar == "XNYS"
    assert not by[("ES", "FUT")].fetched and not by[("SPX", "OPT")].fetched
    assert by[("SPX", "OPT")].right == "C" and by[("SPX", "OPT")].strike == "6000"


def test_valid_rows_comments_and_blank_lines():
    text = ("# my contracts\n\n" + HEAD +
            "aapl,stk,smart,usd,nasdaq,,,,,3\n"
            "# a comment between rows\n"
            "SPX,IND,CBOE,USD,,,,,,\n"
            "ES,FUT,CME,USD,,202712,,,50,\n"
            "AAPL,OPT,SMART,USD,,20270115,200.5,put,100,\n")
    rows = parse_contracts(text)
    assert [(r.symbol, r.sec_type, r.line) for r in rows] == [
        ("AAPL", "STK", 4), ("SPX", "IND", 6), ("ES", "FUT", 7), ("AAPL", "OPT", 8)]
    assert rows[0].priority == 3 and rows[0].exchange == "SMART" and rows[0].currency == "USD"
    assert rows[3].right == "P" and rows[3].multiplier == "100"
    c = rows[0].to_ib()
    assert (c.symbol, c.secType, c.exchange, c.primaryExchange, c.currency) == ("AAPL", "STK", "SMART", "NASDAQ", "USD")
    assert rows[0].to_ib() is not c  # a new object each time


@pytest.mark.parametrize("row, line, field, words", [
    ("AAPL,STOCK,SMART,USD,NASDAQ,,,,,", 3, "secType", "not one of STK, IND, FUT, OPT"),
    (",STK,SMART,USD,NASDAQ,,,,,", 3, "symbol", "empty"),
    ("AAPL,STK,,USD,NASDAQ,,,,,", 3, "exchange", "empty"),
    ("AAPL,STK,SMART,US,NASDAQ,,,,,", 3, "currency", "three letters"),
    ("AAPL,STK,SMART,USD,SMART,,,,,", 3, "primaryExchange", "router"),
    ("AAPL,STK,SMART,USD,NASDAQ,202701,,,,", 3, "lastTradeDateOrContractMonth", "must be empty for STK"),
    ("AAPL,STK,SMART,USD,NASDAQ,,10,,,", 3, "strike", "must be empty"),
    ("ES,FUT,CME,USD,,,,,50,", 3, "lastTradeDateOrContractMonth", "required for FUT"),
    ("ES,FUT,CME,USD,,2027-03,,,50,", 3, "lastTradeDateOrContractMonth", "YYYYMM"),
    ("ES,FUT,CME,USD,,202713,,,50,", 3, "lastTradeDateOrContractMonth", "YYYYMM"),
    ("ES,FUT,CME,USD,,202703,,,-5,", 3, "multiplier", "positive"),
    ("SPX,OPT,SMART,USD,,20271217,,C,100,", 3, "strike", "required for OPT"),
    ("SPX,OPT,SMART,USD,,20271217,abc,C,100,", 3, "strike", "positive number"),
    ("SPX,OPT,SMART,USD,,20271217,6000,X,100,", 3, "right", "C, P, CALL or PUT"),
    ("AAPL,STK,SMART,USD,NASDAQ,,,,,12", 3, "priority", "0-9"),
    ("XYZ,STK,LSE,GBP,,,,,,", 3, "calendar", "no exchange calendar"),
    ("AAPL,STK,SMART,USD,NASDAQ,,,,,,,", 3, "-", "fields but the header has"),
])
def test_bad_row_names_file_line_and_field(row, line, field, words):
    e = bad("# header follows\n" + HEAD + row + "\n")
    assert (e.file, e.line, e.field) == ("/etc/feeds/contracts.csv", line, field)
    assert words in e.reason
    assert str(e).startswith(f"contracts file /etc/feeds/contracts.csv line {line} field '{field}': ")
    assert "\n" not in str(e)


def test_first_bad_row_stops_even_after_good_ones():
    e = bad(HEAD + "AAPL,STK,SMART,USD,NASDAQ,,,,,\nMSFT,STK,SMART,USD,NASDAQ,,,,,\nIBM,STK,SMART,USDX,NYSE,,,,,\n")
    assert (e.line, e.field) == (4, "currency")


def test_duplicates_refused():
    e = bad(HEAD + "AAPL,STK,SMART,USD,NASDAQ,,,,,\nAAPL,STK,SMART,USD,NASDAQ,,,,,\n")
    assert (e.line, e.field) == (3, "symbol") and "line 2" in e.reason
    e = bad(HEAD + "AAPL,STK,SMART,USD,NASDAQ,,,,,\nAAPL,STK,ISLAND,USD,NASDAQ,,,,,\n")
    assert (e.line, e.field) == (3, "symbol") and "key" in e.reason
    # the same symbol as STK and OPT is fine (only STK/IND rows are keyed by symbol)
    assert len(parse_contracts(HEAD + "AAPL,STK,SMART,USD,NASDAQ,,,,,\nAAPL,OPT,SMART,USD,,20270115,200,C,100,\n")) == 2


def test_header_problems():
    e = bad("symbol,secType,exchange\nAAPL,STK,SMART\n")
    assert (e.line, e.field) == (1, "currency") and "required column" in e.reason
    e = bad("symbol,secType,exchange,currency,colour\n")
    assert (e.line, e.field) == (1, "colour") and "unknown column" in e.reason
    e = bad("# nothing but comments\n\n")
    assert e.line == 0 and "no header" in e.reason


def test_calendar_column(tmp_path):
    rows = parse_contracts("symbol,secType,exchange,currency,calendar\nXYZ,STK,LSE,GBP,XLON\n")
    assert rows[0].calendar == "XLON"
    e = bad("symbol,secType,exchange,currency,calendar\nXYZ,STK,LSE,GBP,NOPE\n")
    assert (e.line, e.field) == (2, "calendar") and "unknown calendar" in e.reason


def test_missing_file(tmp_path):
    with pytest.raises(ContractsError) as e:
        load_contracts(tmp_path / "nope.csv")
    assert e.value.line == 0 and "file not found" in str(e.value)


def test_fetchable_keeps_stocks_and_indices_of_the_selection_and_names_the_rest(caplog):
    rows = parse_contracts(HEAD + "SPY,STK,SMART,USD,ARCA,,,,,1\n"
                                  "ES,FUT,CME,USD,,202712,,,50,1\n"
                                  "SPX,IND,CBOE,USD,,,,,,0\n"
                                  "AAPL,STK,SMART,USD,NASDAQ,,,,,0\n")
    caplog.set_level("INFO", logger="feeds.ibkr.contracts")
    assert [r.symbol for r in fetchable(rows)] == ["SPY", "SPX", "AAPL"]
    assert "ES FUT (line 3) is validated but not collected" in caplog.text
    caplog.clear()
    assert [r.symbol for r in fetchable(rows, ["aapl", "es"], verb="fetched")] == ["AAPL"]
    assert "ES FUT (line 3) is validated but not fetched" in caplog.text
    assert [r.symbol for r in fetchable(rows, keep=lambda r: r.priority > 0)] == ["SPY"]
