"""The shared candle writer: its rows, a refusing sink, history bars written
a microsecond later, the rules of cumulative volume and of one second's
trades."""
from __future__ import annotations

from datetime import datetime, timezone

from feeds import candles as C
from feeds.candle_writer import CandleWriter, units_text
from feeds.sink import Table

NS = 1_000_000_000
MIN = 60 * NS
T0 = int(datetime(2024, 3, 1, 10, 0, tzinfo=timezone.utc).timestamp()) * NS      # a minute's start
TABLE = Table("test_candle", ("venue_symbol", "interval_min", "bar_start", "bar_end", "open", "high", "low",
                              "close", "volume", "ticks", "final", "revision", "source", "recorded_at"))
COLS = TABLE.columns


class Writer(CandleWriter):
    """Keys are symbols; "FX" prices have 4 decimals, the others 2."""
    table = TABLE

    def lead(self, key):
        return (f"X:{key}",)

    def decimals(self, key):
        return 4 if key == "FX" else 2

    def trade(self, key, ts_ns, price, volume):
        with self._lock:
            self._fold(key, ts_ns, price, volume)


class ListSink:
    def __init__(self):
        self.rows: list[dict] = []

    def add_many(self, table, rows):
        assert table == "test_candle"
        self.rows.extend(dict(zip(COLS, r)) for r in rows)


class RefusingSink:
    def add_many(self, table, rows):
        raise RuntimeError("sink is closed (stopping)")


def make(sink=None, intervals=(1,)):
    sink = sink if sink is not None else ListSink()
    return Writer(C.CandleSettings(intervals=intervals, grace=2.0, lateness=10.0), C.always(), sink), sink


def test_rows_leading_columns_exact_prices_and_counters():
    w, sink = make()
    w.trade("AB", T0 + 1 * NS, 165045, 1_000)
    w.trade("AB", T0 + 30 * NS, 165100, 1_250)
    w.trade("FX", T0 + 5 * NS, 835_025, None)
    assert w.close_due(T0 + MIN + 3 * NS) == 2
    got = {r["venue_symbol"]: r for r in sink.rows}
    ab = got["X:AB"]
    assert (ab["interval_min"], ab["bar_start"], ab["bar_end"]) == \
        (1, "2024-03-01 10:00:00.000000+00:00", "2024-03-01 10:01:00.000000+00:00")
    assert (ab["open"], ab["high"], ab["low"], ab["close"]) == ("1650.45", "1651.00", "1650.45", "1651.00")
    assert (ab["volume"], ab["ticks"], ab["final"], ab["revision"], ab["source"]) == (1_250, 2, True, 0, "live")
    assert ab["recorded_at"] == "2024-03-01 10:01:03.000000+00:00"
    assert got["X:FX"]["open"] == "83.5025" and got["X:FX"]["volume"] is None
    assert w.figures() == {"candles": 2, "candles from history": 0, "late revised": 0, "late dropped": 0}


def test_an_unchanged_cumulative_volume_is_no_trade():
    w, sink = make()
    w.trade("AB", T0 + 1 * NS, 100_00, 500)
    w.trade("AB", T0 + 2 * NS, 999_00, 500)        # a quote change: the same day volume
    w.trade("AB", T0 + 3 * NS, 101_00, 520)
    w.close_due(T0 + MIN + 3 * NS)
    (r,) = sink.rows
    assert w.not_trades == 1
    assert (r["high"], r["close"], r["ticks"], r["volume"]) == ("101.00", "101.00", 2, 520)


def test_trades_of_one_second_keep_their_order_of_arrival():
    w, sink = make()
    w.trade("AB", T0 + MIN, 200_00, 10)
    w.trade("AB", T0 + MIN - NS // 2, 199_00, 20)      # less than a second before: after it, in its minute
    w.trade("AB", T0 + MIN, 202_00, 30)                # the same second again: last
    w.trade("AB", T0 + MIN - NS, 150_00, 40)           # a whole second before: its own time
    w.close_due(T0 + 2 * MIN + 3 * NS)
    got = {r["bar_start"][11:16]: r for r in sink.rows}
    assert (got["10:01"]["open"], got["10:01"]["close"], got["10:01"]["ticks"]) == ("200.00", "202.00", 3)
    assert got["10:00"]["open"] == "150.00"


def test_a_refusing_sink_is_noted_not_raised():
    w, _ = make(RefusingSink())
    w.trade("AB", T0 + 1 * NS, 100_00, 5)
    assert w.close_due(T0 + MIN + 3 * NS) == 0
    assert w.sink_failure == "sink refused candle rows: sink is closed (stopping)"
    assert w.figures()["candles"] == 0


def test_seed_writes_history_a_microsecond_later_from_keep():
    w, sink = make(intervals=(1, 5))
    live_now = T0 + 2 * MIN + 13 * NS
    w.trade("AB", T0 + 2 * MIN + 1 * NS, 300_00, 5)     # live, the minute after the history
    bars = [(T0, 100_00, 101_00, 99_00, 100_50, 7, 0), (T0 + MIN, 100_50, 102_00, 100_00, 101_00, 3, 0)]
    n = w.seed("AB", bars, T0 + MIN, until_ns=T0 + 2 * MIN, now_ns=live_now)
    hist = [r for r in sink.rows if r["source"] == "history"]
    assert n == len(sink.rows) == len(hist) == 1 == w.history_rows
    (h,) = hist
    # the minute before keep_from_ns is stored already: not written again
    assert (h["interval_min"], h["bar_start"]) == (1, "2024-03-01 10:01:00.000000+00:00")
    assert (h["open"], h["close"], h["volume"]) == ("100.50", "101.00", 3)
    assert h["recorded_at"] == "2024-03-01 10:02:13.000001+00:00"
    assert w.figures()["candles from history"] == 1


def test_units_text():
    assert units_text(165045, 2) == "1650.45"
    assert units_text(5, 2) == "0.05"
    assert units_text(83_5025, 4) == "83.5025"
    assert units_text(12_3456789, 7) == "12.3456789"
