"""Dhan live feed rows (lib/feeds/dhan/adapter.py) from packets built by the
simulator's encoder (lib/feeds/sim/dhan_packets.py) and decoded by
lib/feeds/dhan/wire.py; the candles folded from them (lib/feeds/dhan/collector.py)."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

from feeds import candles as C
from feeds.dhan import adapter as A
from feeds.dhan import wire
from feeds.dhan.candles import CANDLE_TABLE, DhanCandles
from feeds.dhan.connections import Subscription
from feeds.candles import CandleSettings
from feeds.sim import dhan_packets as P

UTC = timezone.utc
NSE_EQ, IDX_I, NSE_CURRENCY = 1, 0, 3
# 2024-09-11 09:15:07 IST = 03:45:07 UTC
T_UTC = int(datetime(2024, 9, 11, 3, 45, 7, tzinfo=UTC).timestamp())
LTT = P.ltt_from_utc(T_UTC)
RECV = "2024-09-11 03:45:07.123456+00:00"
NOW = T_UTC + 1.0
DEPTH = [(100 + i, 200 + i, 3 + i, 4 + i, 1650.45 - 0.05 * i, 1650.5 + 0.05 * i) for i in range(5)]


def rows_of(*packets: bytes, recv: str = RECV) -> dict[str, list[tuple]]:
    recs, errs = wire.decode(P.pack_frame(*packets), NOW)
    assert errs == []
    rm = A.RowMaker()
    assert rm.add(recs, recv) == []
    return rm.take()


def as_dict(table, row) -> dict:
    assert len(row) == len(table.columns)
    return dict(zip(table.columns, row))


def test_ltt_is_ist_wall_clock_converted_to_utc():
    assert LTT - T_UTC == 19_800
    assert A.ltt_text(LTT) == "2024-09-11 03:45:07+00:00"
    assert wire.ltt_to_utc(LTT) == datetime(2024, 9, 11, 3, 45, 7, tzinfo=UTC)
    assert A.ltt_text(0) is None
    assert A.time_text(T_UTC * 1_000_000_000 + 123_456_789) == "2024-09-11 03:45:07.123456+00:00"


def test_ticker_row():
    rows = rows_of(P.pack_ticker(NSE_EQ, 1333, 1650.45, LTT))
    assert list(rows) == ["dhan_tick_ticker"]
    r = as_dict(A.TICKER_TABLE, rows["dhan_tick_ticker"][0])
    assert r == {"exchange_segment": "NSE_EQ", "security_id": 1333, "ltp": "1650.45",
                 "ltt": "2024-09-11 03:45:07+00:00", "recv_time": RECV, "seq": 0}


def test_quote_row_prices_exact_and_ltt_utc():
    rows = rows_of(P.pack_quote(NSE_EQ, 1333, 1650.45, 25, LTT, 1649.87, 1_234_567, 5000, 6000,
                                1640.0, 0.0, 1655.95, 1638.05))
    r = as_dict(A.QUOTE_TABLE, rows["dhan_tick_quote"][0])
    assert r == {"exchange_segment": "NSE_EQ", "security_id": 1333, "ltp": "1650.45", "ltq": 25,
                 "ltt": "2024-09-11 03:45:07+00:00", "atp": "1649.87", "volume": 1_234_567,
                 "total_sell_qty": 5000, "total_buy_qty": 6000, "open": "1640.00", "close": "0.00",
                 "high": "1655.95", "low": "1638.05", "recv_time": RECV, "seq": 0}
    # float32 cannot hold 1650.45: the text is the decimal Dhan meant
    assert Decimal(r["ltp"]) == Decimal("1650.45")


def test_full_row_with_depth_arrays():
    rows = rows_of(P.pack_full(NSE_EQ, 1333, 1650.45, 7, LTT, 1649.9, 99, 10, 20, 0, 0, 0,
                               1640.0, 0.0, 1655.0, 1638.0, DEPTH))
    r = as_dict(A.FULL_TABLE, rows["dhan_tick_full"][0])
    assert r["ltp"] == "1650.45" and r["ltq"] == 7 and r["volume"] == 99 and r["ltt"] == "2024-09-11 03:45:07+00:00"
    assert (r["oi"], r["oi_day_high"], r["oi_day_low"]) == (0, 0, 0)
    assert (r["open"], r["close"], r["high"], r["low"]) == ("1640.00", "0.00", "1655.00", "1638.00")
    assert r["bid_quantity"] == "{100,101,102,103,104}"
    assert r["ask_quantity"] == "{200,201,202,203,204}"
    assert r["bid_orders"] == "{3,4,5,6,7}"
    assert r["ask_orders"] == "{4,5,6,7,8}"
    assert r["bid_price"] == "{1650.45,1650.40,1650.35,1650.30,1650.25}"
    assert r["ask_price"] == "{1650.50,1650.55,1650.60,1650.65,1650.70}"


def test_oi_prev_close_market_status_and_several_packets_in_one_message():
    rows = rows_of(P.pack_prev_close(2, 35001, 24310.5, 120000), P.pack_oi(2, 35001, 125000),
                   P.pack_market_status(), P.pack_ticker(IDX_I, 13, 24500.35, 0))
    assert rows["dhan_prev_close"] == [("NSE_FNO", 35001, "24310.50", 120000, RECV, 0)]
    assert rows["dhan_tick_oi"] == [("NSE_FNO", 35001, 125000, RECV, 1)]
    assert rows["dhan_market_status"] == [("IDX_I", 0, b"", RECV, 2)]
    assert rows["dhan_tick_ticker"] == [("IDX_I", 13, "24500.35", None, RECV, 3)]       # LTT 0: no trade


def test_currency_segment_has_four_decimals():
    rows = rows_of(P.pack_ticker(NSE_CURRENCY, 10093, 83.1275, LTT))
    assert rows["dhan_tick_ticker"][0][2] == "83.1275"


def test_disconnect_record_is_returned_not_stored_and_its_row():
    recs, _ = wire.decode(P.pack_disconnect(807), NOW)
    rm = A.RowMaker()
    disc = rm.add(recs, RECV)
    assert [d.reason for d in disc] == [807] and rm.take() == {}
    assert A.disconnect_row(RECV, 2, 807, "exit") == (RECV, 2, 807, "access token is expired", "exit")
    assert A.disconnect_row(RECV, 1, 805, "backoff")[3].startswith("too many requests or connections")


def test_counts_and_take_empties():
    rm = A.RowMaker()
    recs, _ = wire.decode(P.pack_ticker(NSE_EQ, 1, 10.0, LTT), NOW)
    rm.add(recs, RECV)
    rm.add(recs, RECV)
    assert rm.pending == 2
    assert len(rm.take()["dhan_tick_ticker"]) == 2
    assert rm.take() == {} and rm.pending == 0 and rm.counts["dhan_tick_ticker"] == 2


def test_every_row_matches_its_table_columns():
    frames = [P.pack_ticker(1, 1, 1.0, LTT), P.pack_quote(1, 1, 1.0, 1, LTT, 1.0, 1, 1, 1, 1.0, 1.0, 1.0, 1.0),
              P.pack_full(1, 1, 1.0, 1, LTT, 1.0, 1, 1, 1, 1, 1, 1, 1.0, 1.0, 1.0, 1.0, DEPTH),
              P.pack_oi(2, 1, 5), P.pack_prev_close(1, 1, 1.0, 0), P.pack_market_status()]
    rows = rows_of(*frames)
    tables = {t.name: t for t in A.TABLES}
    assert set(rows) == set(tables) - {"dhan_disconnect"}
    for name, rs in rows.items():
        assert all(len(r) == len(tables[name].columns) for r in rs)


def test_add_many_makes_the_rows_add_makes_message_by_message():
    messages = [P.pack_full(NSE_EQ, 1333, 1650.45, 7, LTT, 1649.9, 99, 10, 20, 0, 0, 0, 1640.0, 0.0, 1655.0,
                            1638.0, DEPTH),
                P.pack_frame(P.pack_prev_close(2, 35001, 24310.5, 120000), P.pack_oi(2, 35001, 125000),
                             P.pack_disconnect(800), P.pack_market_status()),
                P.pack_full(NSE_CURRENCY, 10093, 83.1275, 1, 0, 83.12, 5, 1, 1, 0, 0, 0, 83.0, 0.0, 83.5, 82.9,
                            [(1, 2, 3, 4, 83.125, 83.13)]),
                P.pack_ticker(IDX_I, 13, 24500.35, 0),
                P.pack_quote(NSE_EQ, 1333, 1650.45, 25, LTT, 1649.87, 1_234_567, 5000, 6000, 1640.0, 0.0, 1655.95,
                             1638.05),
                P.pack_frame(P.pack_full(NSE_EQ, 1, 1.0, 1, LTT, 1.0, 1, 1, 1, 1, 1, 1, 1.0, 1.0, 1.0, 1.0, DEPTH),
                             P.pack_ticker(NSE_EQ, 2, 2.0, LTT))]
    recvs = [f"2024-09-11 03:45:07.{i:06d}+00:00" for i in range(len(messages))]
    one = A.RowMaker()
    disc_one = []
    for m, recv in zip(messages, recvs):
        disc_one += one.add(wire.decode(m, NOW).records, recv)
    got = wire.decode_many(messages, NOW)
    many = A.RowMaker()
    disc = many.add_many(got.records, got.index, recvs)
    assert [(i, d.reason) for i, d in disc] == [(1, 800)] and [d.reason for d in disc_one] == [800]
    assert many.pending == one.pending == 9
    assert many.take() == one.take()
    # seq is the position among the message's records, the disconnect included
    assert many.counts == one.counts


def test_full_rows_of_many_instruments_and_times():
    recs, index = [], []
    for i in range(20):
        ltt = 0 if i % 7 == 0 else LTT + i // 3
        f = P.pack_full(NSE_EQ, 100 + i % 4, 1650.45 + 0.05 * i, i, ltt, 1649.9, 99 + i, 10, 20, i, i, i,
                        1640.0, 0.0, 1655.0 + i, 1638.0, [(1 + i, 2, 3, 4, 1650.4 - 0.05 * i, 1650.5)])
        recs += wire.decode(f, NOW).records
        index.append(i)
    rm = A.RowMaker()
    rm.add_many(recs, index, [RECV] * 20)
    rows = rm.take()["dhan_tick_full"]
    for r, row in zip(recs, rows):
        row = as_dict(A.FULL_TABLE, row)
        assert row["ltt"] == A.ltt_text(r.ltt_ist) and row["ltp"] == wire.price_text(r.ltp)
        assert row["high"] == wire.price_text(r.high) and row["oi"] == r.oi
        assert row["bid_quantity"] == "{%d,0,0,0,0}" % r.depth[0] and row["ask_quantity"] == "{2,0,0,0,0}"
        assert row["bid_price"] == "{%s,0.00,0.00,0.00,0.00}" % wire.price_text(r.depth[4])


# ------------------------------------------------------------------------------------- candles

class ListSink:
    def __init__(self):
        self.rows: dict[str, list] = {}

    def add_many(self, table, rows):
        self.rows.setdefault(table, []).extend(rows)


def _candles(subs, since_ns=None):
    sink = ListSink()
    cs = CandleSettings(intervals=(1, 5), grace=1.0, lateness=5.0)
    return DhanCandles(cs, C.always(), subs, sink, since_ns=since_ns), sink


def _quote(sid, ltp, ltq, t_utc, vol):
    return P.pack_quote(NSE_EQ, sid, ltp, ltq, P.ltt_from_utc(t_utc), ltp, vol, 0, 0, 0.0, 0.0, 0.0, 0.0)


def test_candles_from_quote_packets_cumulative_volume_and_ltt_minutes():
    m0 = T_UTC - T_UTC % 60                               # 03:45:00 UTC
    cd, sink = _candles([Subscription(NSE_EQ, 1333, "quote")])
    trades = [(m0 + 1, 1650.45, 100), (m0 + 1, 1651.0, 150), (m0 + 20, 1649.5, 150), (m0 + 59, 1650.05, 400),
              (m0 + 61, 1652.0, 410)]
    for t, p, v in trades:
        recs, _ = wire.decode(_quote(1333, p, 5, t, v), m0 + 120)
        cd.records(recs, (m0 + 62) * 1_000_000_000)
    # the third packet repeats the volume: no trade (a quote change)
    assert cd.not_trades == 1
    cd.close_due((m0 + 70) * 1_000_000_000)
    rows = sink.rows[CANDLE_TABLE.name]
    r = dict(zip(CANDLE_TABLE.columns, rows[0]))
    assert (r["exchange_segment"], r["security_id"], r["interval_min"]) == ("NSE_EQ", 1333, 1)
    assert r["bar_start"] == "2024-09-11 03:45:00.000000+00:00"
    assert (r["open"], r["high"], r["low"], r["close"], r["volume"], r["ticks"]) == \
        ("1650.45", "1651.00", "1650.05", "1650.05", 400, 3)
    assert r["final"] is True and r["source"] == "live"


def test_candles_of_an_index_and_ticker_mode_have_no_volume():
    m0 = T_UTC - T_UTC % 60
    cd, sink = _candles([Subscription(IDX_I, 13, "quote"), Subscription(NSE_EQ, 7, "ticker")])
    for t, p, tp in ((m0 + 2, 24500.35, 245.1), (m0 + 3, 24501.0, 245.05)):
        recs, _ = wire.decode(P.pack_quote(IDX_I, 13, p, 0, P.ltt_from_utc(t), 0.0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)
                              + P.pack_ticker(NSE_EQ, 7, tp, P.ltt_from_utc(t)), m0 + 120)
        cd.records(recs, (m0 + 5) * 1_000_000_000)
    cd.close_all()
    got = {(r[0], r[1], r[2]): r for r in sink.rows[CANDLE_TABLE.name]}
    idx = got[("IDX_I", 13, 1)]
    assert idx[5:11] == ("24500.35", "24501.00", "24500.35", "24501.00", None, 2)
    tick = got[("NSE_EQ", 7, 1)]
    assert tick[5:11] == ("245.10", "245.10", "245.05", "245.05", None, 2)
