"""Kite ticker packets -> rows: the recorded INFY packets, every packet kind
and segment against kiteconnect's own parser, exact prices, malformed frames."""
from __future__ import annotations

import base64
import json
import os
import random
import struct
import time
from datetime import datetime, timezone
from decimal import Decimal

import numpy as np
import pytest

from conftest import shared_file
from feeds.kite import adapter as A
from feeds.sim.kite_packets import MODE_FULL, MODE_LTP, MODE_QUOTE, Market, frame

RECV = "2026-01-02 03:04:05.123456+00:00"
UTC = timezone.utc


@pytest.fixture
def ist_local_time():
    """KiteTicker builds naive datetimes with fromtimestamp: local time IST, as in the collector."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Kolkata"
    time.tzset()
    yield
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


def recorded(mode: str) -> tuple[bytes, dict]:
    packet = base64.b64decode(shared_file("kite", f"ticker_{mode}.packet").read_text().strip())
    return packet, json.loads(shared_file("kite", f"ticker_{mode}.json").read_text())


def _d(x) -> str:
    return str(Decimal(str(x)))


def test_recorded_full_packet_gives_the_recorded_tick():
    packet, want = recorded("full")
    ltp, quote, full = A.FrameDecoder().decode(frame([packet]), RECV)
    assert (ltp, quote) == ([], []) and len(full) == 1
    r = dict(zip(A.FULL_TABLE.columns, full[0]))
    assert r["instrument_token"] == want["instrument_token"] == 408065
    for col, key in (("last_price", "last_price"), ("average_traded_price", "average_price")):
        assert Decimal(r[col]) == Decimal(_d(want[key]))
    assert r["last_price"] == "1573.70"                  # exact text from 157370 paise
    assert (r["last_traded_quantity"], r["volume_traded"], r["total_buy_quantity"], r["total_sell_quantity"]) == \
        (want["last_quantity"], want["volume"], want["buy_quantity"], want["sell_quantity"])
    assert [Decimal(r[k]) for k in ("open", "high", "low", "close")] == \
        [Decimal(_d(want["ohlc"][k])) for k in ("open", "high", "low", "close")]
    # 2021-07-05T10:41:27+05:30 (Kite's IST wall clock) is stored as UTC
    assert r["exchange_timestamp"] == "2021-07-05 05:11:27+00:00"
    assert datetime.fromisoformat(r["exchange_timestamp"]) == datetime.fromisoformat(want["timestamp"])
    assert datetime.fromisoformat(r["last_trade_time"]) == datetime.fromisoformat(want["last_trade_time"])
    buy, sell = want["depth"]["buy"], want["depth"]["sell"]
    assert r["bid_price"] == "{" + ",".join(f"{Decimal(_d(x['price'])):.2f}" for x in buy) + "}"
    assert r["bid_quantity"] == "{" + ",".join(str(x["quantity"]) for x in buy) + "}"
    assert r["bid_orders"] == "{" + ",".join(str(x["orders"]) for x in buy) + "}"
    assert r["ask_price"] == "{1573.70,1573.75,1573.85,1573.90,1573.95}"
    assert r["ask_quantity"] == "{" + ",".join(str(x["quantity"]) for x in sell) + "}"
    assert (r["recv_time"], r["seq"]) == (RECV, 0)


def test_recorded_quote_packet_gives_the_recorded_tick():
    packet, want = recorded("quote")
    _, quote, _ = A.FrameDecoder().decode(frame([packet]), RECV)
    r = dict(zip(A.QUOTE_TABLE.columns, quote[0]))
    assert r["last_price"] == "1573.15" and Decimal(r["average_traded_price"]) == Decimal("1570.33")
    assert (r["volume_traded"], r["total_buy_quantity"], r["total_sell_quantity"]) == (1175986, 256511, 360503)
    assert r["close"] == "1567.80"


def test_recorded_packets_through_kiteticker_parser_give_the_same_rows(ist_local_time):
    from kiteconnect import KiteTicker
    parse = KiteTicker("k", "t")._parse_binary
    for mode in ("full", "quote"):
        packet, _ = recorded(mode)
        f = frame([packet, packet[:8]])                 # plus an LTP packet of the same token
        assert A.rows_from_ticks(parse(f), RECV) == A.FrameDecoder().decode(f, RECV)


def _market(tokens, seed=3):
    ticks = {1: 0.05, 3: 0.0025, 6: 0.0001, 9: 0.0, 12: 0.01}
    return Market(tokens, [ticks[t & 0xFF] for t in tokens],
                  [0.0] * len(tokens), seed=seed)


def test_every_packet_kind_and_segment_matches_kiteticker(ist_local_time):
    """Equities (paise), indices (index packets), CDS (10^7), BCD and NCO (10^4)
    in every mode: FrameDecoder == KiteTicker's parser + rows_from_ticks."""
    from kiteconnect import KiteTicker
    parse = KiteTicker("k", "t")._parse_binary
    tokens = [(1000 + i) << 8 | seg for i, seg in enumerate([1, 1, 9, 9, 3, 6, 12, 1, 3, 9])]
    m = _market(tokens)
    rows = np.arange(len(tokens))
    seen = set()
    for step in range(30):
        m.advance(rows)
        modes = np.array([(i + step) % 3 for i in range(len(tokens))])
        f = m.pack(rows, modes)
        native = A.FrameDecoder().decode(f, RECV)
        assert A.rows_from_ticks(parse(f), RECV) == native
        for kind, table_rows in zip(("ltp", "quote", "full"), native):
            for r in table_rows:
                seen.add((kind, r[0] & 0xFF))
    assert {("full", 9), ("quote", 9), ("ltp", 9), ("full", 3), ("quote", 6), ("full", 12)} <= seen
    # currency prices carry 7 decimals, BCD/NCO 4
    _, quote, full = A.FrameDecoder().decode(m.pack(rows, np.full(len(tokens), MODE_FULL)), RECV)
    cds = [r for r in full if r[0] & 0xFF == 3][0]
    assert len(cds[1].split(".")[1]) == 7 and len([r for r in full if r[0] & 0xFF == 6][0][1].split(".")[1]) == 4


def test_index_packets_fill_ohlc_in_table_order():
    tok = 256265                                       # NIFTY 50, segment 9
    q = struct.pack(">IIIIIIi", tok, 2200050, 2210000, 2190000, 2195000, 2199000, 1050)
    fl = q + struct.pack(">I", 1625461887)
    _, quote, full = A.FrameDecoder().decode(frame([q, fl]), RECV)
    assert quote == [(tok, "22000.50", None, None, None, None, None, "21950.00", "22100.00", "21900.00",
                      "21990.00", RECV, 0)]
    assert full[0][:11] == quote[0][:11]
    assert full[0][11:22] == (None, None, None, None, "2021-07-05 05:11:27+00:00", None, None, None, None, None, None)
    assert full[0][-1] == 1


def test_prices_are_exact_decimal_text_for_every_divisor():
    rnd = random.Random(5)
    for div in (100, 10_000, 10_000_000):
        for units in [0, 1, 5, 99, 100, 101, 2**32 - 1] + [rnd.randrange(2**32) for _ in range(20_000)]:
            text = A.price_text(units, div)
            assert Decimal(text) == Decimal(units) / div
            assert text.count(".") == 1 and "e" not in text.lower()
    assert A.price_text(157370, 100) == "1573.70" and A.price_text(5, 10_000_000) == "0.0000005"


def test_float_prices_from_kiteticker_are_recovered_exactly():
    """rows_from_ticks gets prices as units/divisor floats: the units come back exact."""
    rnd = random.Random(9)
    for div in (100, 10_000, 10_000_000):
        tok = 1000 << 8 | {100: 1, 10_000: 6, 10_000_000: 3}[div]
        for units in [rnd.randrange(2**32) for _ in range(20_000)] + [2**32 - 1, 1]:
            ltp, _, _ = A.rows_from_ticks([{"mode": "ltp", "instrument_token": tok, "last_price": units / div}], RECV)
            assert Decimal(ltp[0][1]) == Decimal(units) / div


def test_heartbeat_and_empty_frames_give_no_rows():
    d = A.FrameDecoder()
    assert d.decode(b"\x00", RECV) == ([], [], [])
    assert d.decode(b"", RECV) == ([], [], [])
    assert d.decode(b"\x00\x00", RECV) == ([], [], [])
    assert d.malformed == 0


def test_zero_timestamps_are_null():
    body = struct.pack(">16I", 408065, *([100] * 10), 0, 0, 0, 0, 0) + bytes(120)
    _, _, full = A.FrameDecoder().decode(frame([body]), RECV)
    r = dict(zip(A.FULL_TABLE.columns, full[0]))
    assert r["last_trade_time"] is None and r["exchange_timestamp"] is None


def test_packet_of_unknown_length_is_skipped_and_counted():
    ok = struct.pack(">II", 408065, 157370)
    d = A.FrameDecoder()
    ltp, quote, full = d.decode(frame([ok, ok[:7] + b"\x00" * 36, ok]), RECV)   # 43-byte packet in the middle
    assert [r[3] for r in ltp] == [0, 2] and quote == full == []
    assert d.malformed == 1


def test_truncated_frame_raises_and_keeps_the_complete_packets():
    ok = struct.pack(">II", 408065, 157370)
    f = frame([ok, ok + bytes(36)])[:-10]              # the quote packet is cut short
    d = A.FrameDecoder()
    with pytest.raises(A.Malformed, match="claims 44 bytes"):
        d.decode(f, RECV)
    assert d.partial[0] == [(408065, "1573.70", RECV, 0)]
    with pytest.raises(A.Malformed, match="header"):
        d.decode(struct.pack(">H", 3) + struct.pack(">H", 8) + ok + b"\x00", RECV)


def test_simulator_fault_packets_are_handled():
    from feeds.sim.kite_packets import malformed_packet
    good = struct.pack(">II", 408065, 157370)
    for kind in ("bad_length", "truncated"):
        packet, truncate = malformed_packet(kind, 408065)
        f = frame([good, packet])
        if truncate:
            f = f[:-84]
        d = A.FrameDecoder()
        try:
            ltp, _, _ = d.decode(f, RECV)
        except A.Malformed:
            ltp = d.partial[0]
        assert ltp == [(408065, "1573.70", RECV, 0)]


def test_epoch_text_is_utc_and_zero_is_none():
    assert A.epoch_text(1625461887) == "2021-07-05 05:11:27+00:00"
    assert A.epoch_text(0) is None


def test_table_definitions_match_the_rows():
    d = A.FrameDecoder()
    m = _market([1001 << 8 | 1])
    r = np.arange(1)
    for mode, table in ((MODE_LTP, A.LTP_TABLE), (MODE_QUOTE, A.QUOTE_TABLE), (MODE_FULL, A.FULL_TABLE)):
        rows = d.decode(m.pack(r, np.array([mode])), RECV)[mode]
        assert len(rows[0]) == len(table.columns)
        assert table.columns[-2:] == ("recv_time", "seq") and table.partition_column == "recv_time"
    assert A.TABLE_OF == {"ltp": "kite_tick_ltp", "quote": "kite_tick_quote", "full": "kite_tick_full"}


# ---------------------------------------------------------------- ranges

NOW_S = 1625461887                                     # 2021-07-05 10:41:27 IST, the recording


def _full_packet(ltt: int, ts: int, tok: int = 408065) -> bytes:
    return struct.pack(">16I", tok, 157370, 5, 157000, 1000, 10, 20, 157000, 158000, 156000, 156500,
                       ltt, 0, 0, 0, ts) + bytes(120)


@pytest.fixture
def recording_day(monkeypatch):
    """'Now' is the recording's moment: the window ends 10 minutes later."""
    from feeds import plausible as P
    monkeypatch.setattr(A, "WINDOW", P.Window(P.KITE_START_MS, ahead_ms=600_000, clock=lambda: NOW_S * 1000))


@pytest.mark.parametrize("ltt, ts", [
    (NOW_S, 4_000_000_000),                 # exchange time in 2096
    (NOW_S + 3600, NOW_S),                  # last trade an hour ahead of now
    (NOW_S, 1_000_000_000),                 # 2001: before Kite existed
    (1, NOW_S),                             # 1970
])
def test_full_packet_with_implausible_exchange_time_is_skipped_and_counted(recording_day, ltt, ts):
    ok = struct.pack(">II", 408065, 157370)
    reasons = []
    d = A.FrameDecoder(on_bad=reasons.append)
    ltp, quote, full = d.decode(frame([ok, _full_packet(ltt, ts), _full_packet(NOW_S, NOW_S), ok]), RECV)
    assert [r[-1] for r in ltp] == [0, 3] and [r[-1] for r in full] == [2] and quote == []
    assert d.malformed == 1 and len(reasons) == 1 and "exchange time" in reasons[0]


def test_index_full_packet_with_a_future_timestamp_is_skipped(recording_day):
    tok = 256265
    q = struct.pack(">IIIIIIi", tok, 2200050, 2210000, 2190000, 2195000, 2199000, 1050)
    d = A.FrameDecoder()
    _, quote, full = d.decode(frame([q + struct.pack(">I", NOW_S + 86400), q + struct.pack(">I", NOW_S)]), RECV)
    assert [r[-1] for r in full] == [1] and d.malformed == 1


def test_zero_and_current_times_pass_with_the_wall_clock():
    now = int(time.time())
    _, _, full = A.FrameDecoder().decode(frame([_full_packet(now - 5, now), _full_packet(0, 0)]), RECV)
    assert len(full) == 2 and full[1][11] is None and full[1][15] is None


def test_implausible_ticks_from_kiteticker(recording_day, ist_local_time):
    base = {"mode": "ltp", "instrument_token": 408065, "last_price": 1573.7}
    assert A.rows_from_ticks([base], RECV)[0][0][1] == "1573.70"
    for bad in (-1.0, float("inf"), float("nan"), 2.0 ** 40):
        with pytest.raises(A.Malformed):
            A.rows_from_ticks([dict(base, last_price=bad)], RECV)
    # with on_bad, only the bad tick is skipped
    reasons = []
    ltp, _, _ = A.rows_from_ticks([base, dict(base, last_price=-5.0), base], RECV, on_bad=reasons.append)
    assert [r[-1] for r in ltp] == [0, 2] and len(reasons) == 1
    from kiteconnect import KiteTicker
    parse = KiteTicker("k", "t")._parse_binary
    ticks = parse(frame([_full_packet(NOW_S, 4_000_000_000)]))
    with pytest.raises(A.Malformed, match="exchange time"):
        A.rows_from_ticks(ticks, RECV)
    ticks = parse(frame([_full_packet(NOW_S, NOW_S)]))
    ticks[0]["volume_traded"] = -3
    with pytest.raises(A.Malformed, match="quantity"):
        A.rows_from_ticks(ticks, RECV)
