"""Dhan's v2 live market feed: feeds.dhan.wire (requests, decoder, prices, times, disconnect codes)
against the simulator's encoder feeds.sim.dhan_packets and against byte fixtures laid out by hand
from the offsets of DhanHQ v2 "Live Market Feed"."""
from __future__ import annotations

import json
import math
import struct
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from feeds.dhan import limits, wire
from feeds.sim import dhan_packets as pk

NOW = 1_726_036_200.0                        # 2024-09-11 06:30:00 UTC = 12:00:00 IST
LTT = 1_726_036_195 + 19_800                 # a trade 5 s before NOW, as Dhan sends it (IST epoch)
HDFCBANK = 1333
F32 = struct.Struct("<f")


def f32(x: float) -> float:
    """x as the float32 Dhan would send, widened back (what the decoder returns)."""
    return F32.unpack(F32.pack(x))[0]


def one(frame: bytes, **kw):
    d = wire.decode(frame, now=NOW, **kw)
    assert d.errors == [], d.errors
    assert len(d.records) == 1
    return d.records[0]


DEPTH = [(100 + i, 200 + i, 3 + i, 4 + i, 1650.40 - 0.05 * i, 1650.50 + 0.05 * i) for i in range(5)]


def full_packet(**over) -> bytes:
    args = dict(segment=1, security_id=HDFCBANK, ltp=1650.45, ltq=25, ltt=LTT, atp=1648.35, volume=3_456_789,
                total_sell_qty=120_000, total_buy_qty=98_765, oi=0, oi_day_high=0, oi_day_low=0,
                open=1640.0, close=0.0, high=1655.5, low=1638.05, depth=DEPTH)
    args.update(over)
    return pk.pack_full(**args)


# --------------------------------------------------------------------------- hand-built fixtures

def test_ticker_from_documented_offsets():
    """Ticker Packet: header (code 2) in bytes 1-8, LTP float32 in 9-12, LTT int32 in 13-16 (1-based)."""
    b = bytearray(16)
    b[0] = 2                                          # byte 1: feed response code
    b[1:3] = (16).to_bytes(2, "little")               # bytes 2-3: message length
    b[3] = 1                                          # byte 4: NSE_EQ
    b[4:8] = HDFCBANK.to_bytes(4, "little")           # bytes 5-8: security id
    b[8:12] = F32.pack(1650.45)                       # bytes 9-12: LTP
    b[12:16] = LTT.to_bytes(4, "little")              # bytes 13-16: LTT
    r = one(bytes(b))
    assert r == wire.Ticker(1, HDFCBANK, f32(1650.45), LTT)
    assert r.kind == "ticker" and wire.price_decimal(r.ltp) == Decimal("1650.45")
    assert bytes(b) == pk.pack_ticker(1, HDFCBANK, 1650.45, LTT)


def test_full_from_documented_offsets():
    """Full Packet: every field written at its documented (1-based) byte position."""
    b = bytearray(162)
    b[0] = 8
    b[1:3] = (162).to_bytes(2, "little")
    b[3] = 2                                          # NSE_FNO
    b[4:8] = (35001).to_bytes(4, "little")

    def i32(pos, v):                                  # pos: first byte, 1-based as in the document
        b[pos - 1:pos + 3] = v.to_bytes(4, "little")

    def fl(pos, v):
        b[pos - 1:pos + 3] = F32.pack(v)

    fl(9, 24510.05); b[12:14] = (40_000).to_bytes(2, "little"); i32(15, LTT); fl(19, 24490.3)
    i32(23, 1_234_567); i32(27, 44_000); i32(31, 55_000); i32(35, 9_876_500); i32(39, 9_900_000)
    i32(43, 9_800_000); fl(47, 24400.0); fl(51, 0.0); fl(55, 24555.95); fl(59, 24380.1)
    for lvl in range(5):                              # 63-162: 5 levels of 20 bytes
        at = 63 + 20 * lvl
        i32(at, 10 * (lvl + 1)); i32(at + 4, 20 * (lvl + 1))
        b[at + 7:at + 9] = (lvl + 1).to_bytes(2, "little"); b[at + 9:at + 11] = (lvl + 2).to_bytes(2, "little")
        fl(at + 12, 24510.0 - 0.05 * lvl); fl(at + 16, 24510.1 + 0.05 * lvl)
    r = one(bytes(b))
    assert isinstance(r, wire.Full) and r.kind == "full"
    assert (r.segment, r.security_id, r.ltq, r.ltt_ist, r.volume) == (2, 35001, 40_000, LTT, 1_234_567)
    assert (r.total_sell_qty, r.total_buy_qty, r.oi, r.oi_day_high, r.oi_day_low) == (
        44_000, 55_000, 9_876_500, 9_900_000, 9_800_000)
    texts = [wire.price_text(v) for v in (r.ltp, r.atp, r.open, r.close, r.high, r.low)]
    assert texts == ["24510.05", "24490.30", "24400.00", "0.00", "24555.95", "24380.10"]
    levels = wire.depth_levels(r.depth)
    assert len(levels) == 5
    assert levels[0] == wire.DepthLevel(10, 20, 1, 2, f32(24510.0), f32(24510.1))
    assert [wire.price_text(lv.ask_price) for lv in levels] == ["24510.10", "24510.15", "24510.20", "24510.25",
                                                                "24510.30"]
    assert [lv.ask_orders for lv in levels] == [2, 3, 4, 5, 6]
    # the encoder writes the same bytes
    assert bytes(b) == pk.pack_full(2, 35001, 24510.05, 40_000, LTT, 24490.3, 1_234_567, 44_000, 55_000, 9_876_500,
                                    9_900_000, 9_800_000, 24400.0, 0.0, 24555.95, 24380.1,
                                    [(10 * (i + 1), 20 * (i + 1), i + 1, i + 2, 24510.0 - 0.05 * i,
                                      24510.1 + 0.05 * i) for i in range(5)])


def test_disconnect_from_documented_offsets():
    b = bytes([50]) + (10).to_bytes(2, "little") + bytes(5) + (807).to_bytes(2, "little")
    r = one(b)
    assert r == wire.Disconnect(0, 0, 807) and r.kind == "disconnect"
    assert b == pk.pack_disconnect(807)


# --------------------------------------------------------------------------- round trips

def test_round_trip_every_kind():
    cases = [
        (pk.pack_ticker(4, 500180, 1702.3, LTT), wire.Ticker(4, 500180, f32(1702.3), LTT)),
        (pk.pack_quote(1, HDFCBANK, 1650.45, 40_000, LTT, 1648.35, 3_456_789, 120_000, 98_765, 1640.0, 0.0,
                       1655.5, 1638.05),
         wire.Quote(1, HDFCBANK, f32(1650.45), 40_000, LTT, f32(1648.35), 3_456_789, 120_000, 98_765, 1640.0, 0.0,
                    1655.5, f32(1638.05))),
        (pk.pack_oi(2, 35001, 9_876_500), wire.OpenInterest(2, 35001, 9_876_500)),
        (pk.pack_prev_close(1, HDFCBANK, 1633.2, 0), wire.PrevClose(1, HDFCBANK, f32(1633.2), 0)),
        (pk.pack_market_status(), wire.MarketStatus(0, 0, b"")),
        (full_packet(), wire.Full(1, HDFCBANK, f32(1650.45), 25, LTT, f32(1648.35), 3_456_789, 120_000, 98_765,
                                  0, 0, 0, 1640.0, 0.0, 1655.5, f32(1638.05),
                                  tuple(v if i % 6 < 4 else f32(v) for lvl in DEPTH for i, v in
                                        enumerate(lvl, start=0)))),
        (pk.pack_disconnect(805), wire.Disconnect(0, 0, 805)),
    ]
    kinds = set()
    for frame, expected in cases:
        assert len(frame) == wire.PACKET_SIZES[frame[0]]
        r = one(frame)
        assert r == expected and type(r) is type(expected)
        kinds.add(r.kind)
    assert kinds == {"ticker", "quote", "oi", "prev_close", "market_status", "full", "disconnect"}


def test_currency_prices_keep_four_decimals():
    r = one(pk.pack_ticker(wire.ExchangeSegment.NSE_CURRENCY, 10093, 83.4725, LTT))
    assert wire.price_decimal(r.ltp, r.segment) == Decimal("83.4725")
    assert wire.price_decimal(r.ltp, wire.ExchangeSegment.NSE_EQ) == Decimal("83.47")


def test_full_depth_padding_and_empty_levels():
    r = one(full_packet(depth=DEPTH[:2]))
    levels = wire.depth_levels(r.depth)
    assert levels[2:] == (wire.DepthLevel(0, 0, 0, 0, 0.0, 0.0),) * 3
    with pytest.raises(ValueError):
        full_packet(depth=DEPTH * 2)


def test_several_packets_in_one_message():
    frame = pk.pack_frame(pk.pack_prev_close(1, HDFCBANK, 1633.2, 0), full_packet(),
                          pk.pack_ticker(1, 1594, 1890.0, LTT), pk.pack_oi(2, 35001, 12))
    d = wire.decode(frame, now=NOW)
    assert d.errors == []
    assert [r.kind for r in d.records] == ["prev_close", "full", "ticker", "oi"]


def test_length_field_counting_the_payload_only_is_accepted():
    b = bytearray(pk.pack_ticker(1, HDFCBANK, 1650.45, LTT))
    b[1:3] = (8).to_bytes(2, "little")
    assert one(bytes(b)).ltt_ist == LTT


# --------------------------------------------------------------------------- malformed input

def reasons(frame: bytes, **kw) -> tuple[list[str], list[str]]:
    d = wire.decode(frame, now=NOW, **kw)
    for e in d.errors:
        assert isinstance(e, wire.WireError) and isinstance(e, ValueError) and str(e)
    return [r.kind for r in d.records], [e.reason for e in d.errors]


def test_malformed_packets_are_counted_and_the_good_ones_kept():
    good = pk.pack_ticker(1, HDFCBANK, 1650.45, LTT)
    bad_len = bytearray(good); bad_len[1:3] = (15).to_bytes(2, "little")
    bad_seg = bytearray(good); bad_seg[3] = 6                     # no segment 6 in the Annexure
    neg = pk.pack_ticker(1, HDFCBANK, -1.5, LTT)
    nan = pk.pack_quote(1, HDFCBANK, 10.0, 1, LTT, 10.0, 1, 1, 1, float("nan"), 0.0, 10.0, 9.0)
    inf_depth = full_packet(depth=[(1, 1, 1, 1, 10.0, float("inf"))])
    future = pk.pack_ticker(1, HDFCBANK, 1650.45, LTT + 3600)      # an hour ahead: e.g. a UTC epoch sent as IST
    ancient = pk.pack_full(1, HDFCBANK, 1.0, 1, 19_800 + 86_400, 1.0, 0, 0, 0, 0, 0, 0, 1.0, 0.0, 1.0, 1.0)
    frame = b"".join([good, bytes(bad_len), good, bytes(bad_seg), neg, nan, inf_depth, future, ancient,
                      pk.pack_prev_close(1, HDFCBANK, float("-inf"), 0), good])
    kinds, why = reasons(frame)
    assert kinds == ["ticker", "ticker", "ticker"]
    assert why == ["length", "segment", "price", "price", "price", "ltt", "ltt", "price"]


def test_unknown_and_undocumented_codes_are_skipped_by_their_length():
    good = pk.pack_oi(2, 35001, 7)
    unknown = pk.pack_header(99, 12, 1, 1) + bytes(4)
    index = pk.pack_header(1, 12, 0, 13) + bytes(4)
    assert reasons(unknown + good + index + good) == (["oi", "oi"], ["unknown-code", "undocumented-code"])
    # a length field that cannot be walked ends the message
    assert reasons(good + pk.pack_header(99, 4000, 1, 1) + good) == (["oi"], ["unknown-code"])


def test_short_and_truncated_messages():
    full = full_packet()
    assert reasons(b"") == ([], ["short"])
    assert reasons(b"\x02\x10") == ([], ["short"])
    assert reasons(full[:100]) == ([], ["truncated"])
    assert reasons(pk.pack_oi(1, 1, 1) + full[:5]) == (["oi"], ["short"])


def test_ltt_zero_means_no_trade_and_max_age_is_optional():
    assert one(pk.pack_ticker(1, 1, 0.0, 0)).ltt_ist == 0
    week_old = pk.pack_ticker(1, 1, 5.0, LTT - 7 * 86_400)
    assert reasons(week_old) == (["ticker"], [])
    assert reasons(week_old, max_age_s=86_400) == ([], ["ltt"])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_decode_never_raises(data):
    d = wire.decode(data, now=NOW)
    assert all(isinstance(e, wire.WireError) for e in d.errors)
    assert d.records or d.errors


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_corrupting_one_packet_never_loses_the_others(data):
    packets = [pk.pack_ticker(1, i, 100.0 + i, LTT) for i in range(5)]
    victim = data.draw(st.integers(0, 4))
    pos = data.draw(st.integers(0, 15))
    bad = bytearray(packets[victim]); bad[pos] ^= data.draw(st.integers(1, 255))
    packets[victim] = bytes(bad)
    d = wire.decode(b"".join(packets), now=NOW)
    survivors = {r.security_id for r in d.records if r.kind == "ticker"}
    if pos != 0:                                      # the code byte intact: the walk stays aligned
        assert survivors >= {i for i in range(5) if i != victim}
        assert len(d.records) + len(d.errors) == 5


# --------------------------------------------------------------------------- many messages at once

def _one_by_one(frames, **kw):
    """What decode_many must give: decode of each message in turn, laid end to end."""
    records, index, errors = [], [], []
    for i, f in enumerate(frames):
        d = wire.decode(f, now=NOW, **kw)
        records += d.records
        index += [i] * len(d.records)
        errors += d.errors
    return records, index, errors


def _same_as_one_by_one(frames, **kw):
    got = wire.decode_many(frames, now=NOW, **kw)
    records, index, errors = _one_by_one(frames, **kw)
    assert got.records == records and [type(r) for r in got.records] == [type(r) for r in records]
    assert got.index == index
    assert [(type(e), str(e), e.reason, e.offset, e.code, e.segment, e.security_id) for e in got.errors] == \
        [(type(e), str(e), e.reason, e.offset, e.code, e.segment, e.security_id) for e in errors]
    assert got.messages == len(set(index))
    assert got.disconnects == sum(type(r) is wire.Disconnect for r in records)
    return got


def test_decode_many_is_decode_of_each_message_in_turn():
    good = full_packet()
    bad_len = bytearray(good); bad_len[1:3] = (161).to_bytes(2, "little")
    bad_seg = bytearray(good); bad_seg[3] = 6
    frames = [good, full_packet(security_id=7, ltt=0),
              pk.pack_frame(pk.pack_prev_close(2, 35001, 24310.5, 1), pk.pack_oi(2, 35001, 5)),
              bytes(bad_len), bytes(bad_seg), full_packet(ltp=float("nan")), full_packet(ltt=LTT + 3600),
              full_packet(depth=[(1, 1, 1, 1, -0.05, 10.0)]), b"", good[:100], good + good,
              pk.pack_ticker(1, 1, 5.0, LTT), pk.pack_quote(1, 1, 1.0, 1, LTT, 1.0, 1, 1, 1, 1.0, 1.0, 1.0, 1.0),
              pk.pack_market_status(), full_packet(segment=3, ltp=83.1275), bytearray(good), memoryview(good)]
    got = _same_as_one_by_one(frames)
    assert got.index == [0, 1, 2, 2, 10, 10, 11, 12, 13, 14, 15, 16]
    assert [e.reason for e in got.errors] == ["length", "segment", "price", "ltt", "price", "short", "truncated"]
    assert got.messages == 10 and got.disconnects == 0
    assert got.records[0] == one(good)
    # the trade-time range of every message is that of decode, max_age_s included
    old = full_packet(ltt=LTT - 7 * 86_400)
    assert _same_as_one_by_one([old, good], max_age_s=86_400).index == [1]
    assert _same_as_one_by_one([old, good]).index == [0, 1]


def test_decode_many_counts_disconnects_and_takes_no_messages():
    got = _same_as_one_by_one([full_packet(), pk.pack_frame(pk.pack_oi(1, 1, 1), pk.pack_disconnect(807)),
                               full_packet()])
    assert got.disconnects == 1 and got.index == [0, 1, 1, 2]
    assert wire.decode_many([], now=NOW) == ([], [], [], 0, 0)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decode_many_of_corrupted_full_packets_is_decode(data):
    frames = []
    for _ in range(data.draw(st.integers(1, 4))):
        b = bytearray(full_packet(security_id=data.draw(st.integers(0, 2**32 - 1))))
        for _ in range(data.draw(st.integers(0, 3))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            b = b[:data.draw(st.integers(0, len(b)))] if data.draw(st.booleans()) else b + b[:data.draw(
                st.integers(0, 20))]
        frames.append(bytes(b))
    _same_as_one_by_one(frames)


# --------------------------------------------------------------------------- prices

def test_float32_price_conversion_examples():
    assert f32(1650.45) != 1650.45                    # the wire value is not the price ...
    assert wire.price_text(f32(1650.45)) == "1650.45"  # ... rounding gives it back
    assert wire.price_decimal(f32(1650.45)) == Decimal("1650.45")
    assert wire.price_on_tick(f32(1650.45), Decimal("0.05")) == Decimal("1650.45")
    assert wire.price_on_tick(f32(150000.15), Decimal("0.05")) == Decimal("150000.15")
    assert wire.price_text(f32(150000.15)) == "150000.16"   # beyond EXACT_BELOW[2]: the tick is needed
    assert wire.price_text(-0.0) == "0.00"
    assert wire.format_prices([f32(0.05), 0.0, f32(99.95)]) == ["0.05", "0.00", "99.95"]
    assert wire.price_units([f32(1650.45), f32(0.05)]) == [165045, 5]
    assert wire.price_units([f32(83.4725)], 4) == [834725]
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            wire.price_text(bad)
        with pytest.raises(ValueError):
            wire.price_on_tick(bad, Decimal("0.05"))
    with pytest.raises(ValueError):
        wire.price_on_tick(1.0, Decimal(0))


@settings(max_examples=2000, deadline=None)
@given(st.integers(0, int(wire.EXACT_BELOW[2] * 100) - 1))
def test_every_paise_price_below_the_bound_survives_float32(paise):
    price = Decimal(paise).scaleb(-2)
    sent = one(pk.pack_ticker(1, 1, float(price), LTT)).ltp
    assert wire.price_decimal(sent, 1) == price
    assert wire.price_units([sent]) == [paise]
    assert wire.format_prices([sent]) == [f"{price:.2f}"]


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, int(wire.EXACT_BELOW[4] / 0.0025) - 1))
def test_every_currency_tick_survives_float32(ticks):
    price = ticks * Decimal("0.0025")
    sent = one(pk.pack_ticker(wire.ExchangeSegment.BSE_CURRENCY, 1, float(price), LTT)).ltp
    assert wire.price_decimal(sent, wire.ExchangeSegment.BSE_CURRENCY) == price.quantize(Decimal("0.0001"))


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(["0.05", "0.10", "0.50", "1", "5"]), st.integers(0, 10**7))
def test_rounding_to_the_tick_is_exact_below_two_to_the_23_ticks(tick, n):
    tick = Decimal(tick)
    price = (n * tick) % (Decimal(2 ** 23) * tick)
    sent = f32(float(price))
    assert wire.price_on_tick(sent, tick) == price.quantize(tick)


# --------------------------------------------------------------------------- times

def test_ltt_is_ist_wall_clock():
    # 2024-09-11 09:15:00 IST = 03:45:00 UTC; Dhan sends the epoch of 09:15:00 "UTC"
    ltt = int(datetime(2024, 9, 11, 9, 15, tzinfo=timezone.utc).timestamp())
    assert wire.ltt_to_utc_ns(ltt) == int(datetime(2024, 9, 11, 3, 45, tzinfo=timezone.utc).timestamp()) * 10**9
    assert wire.ltt_to_utc(ltt) == datetime(2024, 9, 11, 3, 45, tzinfo=timezone.utc)
    assert wire.ltt_to_utc_ns(0) is None and wire.ltt_to_utc(0) is None
    # the simulator's helper is the inverse
    assert wire.ltt_to_utc_ns(pk.ltt_from_utc(1_726_026_300)) == 1_726_026_300 * 10**9
    # the decoder's check uses the same shift: a trade stamped "now" in IST passes
    assert reasons(pk.pack_ticker(1, 1, 1.0, pk.ltt_from_utc(NOW)), ahead_s=0) == (["ticker"], [])
    assert reasons(pk.pack_ticker(1, 1, 1.0, pk.ltt_from_utc(NOW) + 1), ahead_s=0) == ([], ["ltt"])


# --------------------------------------------------------------------------- requests

def test_subscription_messages_are_split_by_100():
    instruments = [("NSE_EQ", str(1000 + i)) for i in range(250)]
    msgs = wire.subscribe_messages("full", instruments)
    assert len(msgs) == 3 and all(isinstance(m, str) for m in msgs)
    bodies = [json.loads(m) for m in msgs]
    assert [b["InstrumentCount"] for b in bodies] == [100, 100, 50]
    assert all(b["RequestCode"] == 21 and b["InstrumentCount"] == len(b["InstrumentList"]) for b in bodies)
    assert set(bodies[0]) == {"RequestCode", "InstrumentCount", "InstrumentList"}
    assert bodies[0]["InstrumentList"][0] == {"ExchangeSegment": "NSE_EQ", "SecurityId": "1000"}
    sent = [i["SecurityId"] for b in bodies for i in b["InstrumentList"]]
    assert sent == [str(1000 + i) for i in range(250)]
    assert max(b["InstrumentCount"] for b in bodies) <= limits.MAX_INSTRUMENTS_PER_MESSAGE


def test_request_codes_segments_and_duplicates():
    pairs = [(1, 1333), ("bse_eq", "532540"), (wire.ExchangeSegment.IDX_I, 13), (1, "1333")]
    for mode, (sub, unsub) in {"ticker": (15, 16), "quote": (17, 18), "full": (21, 22)}.items():
        (s,) = map(json.loads, wire.subscribe_messages(mode, pairs))
        (u,) = map(json.loads, wire.unsubscribe_messages(mode, pairs))
        assert (s["RequestCode"], u["RequestCode"]) == (sub, unsub)
        assert s["InstrumentList"] == u["InstrumentList"] == [
            {"ExchangeSegment": "NSE_EQ", "SecurityId": "1333"},
            {"ExchangeSegment": "BSE_EQ", "SecurityId": "532540"},
            {"ExchangeSegment": "IDX_I", "SecurityId": "13"}]
    assert wire.subscribe_messages("quote", []) == []
    assert json.loads(wire.disconnect_message()) == {"RequestCode": 12}
    for bad in [("NSE", 1), (6, 1), (1, "12a"), (1, -5), (1, 2**32), ("NSE_EQ",)]:
        with pytest.raises(ValueError):
            wire.subscribe_messages("full", [bad])
    with pytest.raises(ValueError):
        wire.subscribe_messages("depth", [(1, 1)])
    assert wire.SEGMENT_NAMES == {0: "IDX_I", 1: "NSE_EQ", 2: "NSE_FNO", 3: "NSE_CURRENCY", 4: "BSE_EQ",
                                  5: "MCX_COMM", 7: "BSE_CURRENCY", 8: "BSE_FNO"}


def test_feed_url():
    url = wire.feed_url("wss://api-feed.dhan.co", "ey.tok", "1000000001")
    assert url == "wss://api-feed.dhan.co?version=2&token=ey.tok&clientId=1000000001&authType=2"


# --------------------------------------------------------------------------- disconnect codes

def test_disconnect_reasons_and_actions():
    assert set(wire.DISCONNECT_REASONS) == {800, 804, 805, 806, 807, 808, 809, 810, 811, 812, 813, 814}
    assert "expired" in wire.disconnect_reason(807)
    assert wire.disconnect_reason(999) == "unknown reason 999"
    assert wire.FATAL_CODES == {806, 807, 808, 809, 810} and wire.EXIT_FATAL == 77
    assert [wire.disconnect_action(c) for c in (807, 808, 809, 810, 806)] == ["exit"] * 5
    assert wire.disconnect_action(wire.TOO_MANY_CONNECTIONS) == "backoff"
    assert wire.disconnect_action(800) == wire.disconnect_action(999) == "reconnect"
    r = one(pk.pack_disconnect(805))
    assert wire.disconnect_action(r.reason) == "backoff"


def test_limits_cover_keepalive():
    assert limits.SERVER_PING_INTERVAL_S == 10 and limits.SERVER_IDLE_CLOSE_S == 40
    assert math.isclose(limits.SERVER_IDLE_CLOSE_S / limits.SERVER_PING_INTERVAL_S, 4)
