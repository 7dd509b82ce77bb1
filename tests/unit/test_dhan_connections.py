"""feed-dhan's split of the instruments over Dhan's feed connections
(lib/feeds/dhan/connections.py), the refusal of too many at start
(lib/feeds/dhan/main.py) and the frames of one connection as the collector
takes them (lib/feeds/dhan/collector.py)."""
from __future__ import annotations

import json

import pytest

from feeds.config import ConfigError
from feeds.dhan import limits
from feeds.dhan.connections import (Subscription, TooManyInstruments, plan_connections, subscribe_messages,
                                    too_many_message)
from feeds.dhan.main import DhanConfig, gather_lines


def subs(n: int, mode: str = "full", start: int = 100001, priority=lambda i: 0) -> list[Subscription]:
    return [Subscription(1, start + i, mode, priority(i), f"NSE_EQ:SIMEQ{i + 1:05d}") for i in range(n)]


def test_1000_instruments_fit_one_connection_at_dhans_limits():
    plan = plan_connections(subs(1000))
    assert [len(c) for c in plan] == [1000]
    msgs = subscribe_messages(plan[0])
    assert len(msgs) == 10
    docs = [json.loads(m) for m in msgs]
    assert all(d["RequestCode"] == 21 and d["InstrumentCount"] == len(d["InstrumentList"]) <= 100 for d in docs)
    assert {x["SecurityId"] for d in docs for x in d["InstrumentList"]} == {str(100001 + i) for i in range(1000)}


def test_1000_instruments_over_lowered_limits_use_the_needed_connections_evenly():
    plan = plan_connections(subs(1000), per_connection=300, max_connections=5)
    assert [len(c) for c in plan] == [250, 250, 250, 250]
    ids = [s.security_id for c in plan for s in c]
    assert len(ids) == len(set(ids)) == 1000
    assert max(len(c) for c in plan) <= 300


def test_25000_fit_and_25001_are_refused_naming_the_settings():
    plan = plan_connections(subs(25_000))
    assert [len(c) for c in plan] == [5000] * 5
    with pytest.raises(TooManyInstruments) as ei:
        plan_connections(subs(25_001))
    msg = str(ei.value)
    assert msg == too_many_message(25_001, 5, 5000)
    assert "25001 instruments requested" in msg and "at most 25000" in msg
    assert "dhan.max_connections" in msg and "dhan.max_instruments_per_connection" in msg and "remove 1" in msg
    assert "\n" not in msg


def test_limits_beyond_dhans_are_refused():
    with pytest.raises(ValueError):
        plan_connections(subs(1), per_connection=limits.MAX_INSTRUMENTS_PER_CONNECTION + 1)
    with pytest.raises(ValueError):
        plan_connections(subs(1), max_connections=limits.MAX_CONNECTIONS_PER_USER + 1)
    assert plan_connections([]) == []


def test_priority_instruments_are_shared_by_every_connection_and_come_first():
    s = subs(12, priority=lambda i: 1 if i in (10, 11, 7) else 0)
    plan = plan_connections(s, per_connection=4, max_connections=3)
    assert [len(c) for c in plan] == [4, 4, 4]
    firsts = [c[0] for c in plan]
    assert sorted(x.security_id for x in firsts) == [100008, 100011, 100012]


def test_duplicates_kept_once_with_the_highest_priority():
    a = Subscription(1, 1333, "full", 0, "NSE_EQ:HDFCBANK")
    b = Subscription(1, 1333, "quote", 3, "NSE_EQ:1333")
    plan = plan_connections([a, b, Subscription(0, 1333, "ticker")])
    assert len(plan[0]) == 2
    got = {(s.segment, s.security_id): s for s in plan[0]}
    assert got[(1, 1333)].mode == "full" and got[(1, 1333)].priority == 3


def test_subscribe_messages_per_mode_at_most_100_each():
    conn = subs(150, "full") + subs(30, "quote", start=200001) + subs(101, "ticker", start=300001)
    msgs = [json.loads(m) for m in subscribe_messages(conn)]
    assert [(m["RequestCode"], m["InstrumentCount"]) for m in msgs] == [(15, 100), (15, 1), (17, 30), (21, 100),
                                                                        (21, 50)]
    assert msgs[0]["InstrumentList"][0] == {"ExchangeSegment": "NSE_EQ", "SecurityId": "300001"}


def test_volumeless():
    assert Subscription(0, 13, "full").volumeless
    assert Subscription(1, 1, "ticker").volumeless
    assert not Subscription(1, 1, "quote").volumeless


def _config(tmp_path, n: int, **kw) -> DhanConfig:
    f = tmp_path / "dhan-instruments.txt"
    f.write_text("".join(f"NSE_EQ:SIMEQ{i:05d} quote\n" for i in range(1, n + 1)))
    base = dict(file=str(tmp_path / "dhan.toml"), client_id="1000000001", api_url="http://x", feed_url="wss://x",
                instrument_list_url="http://x", instrument_list_cache=str(tmp_path / "c.csv"),
                token_file=str(tmp_path / "t.json"), instruments_file=str(f), instruments_from_table=False,
                default_mode="full", session_calendar="none", connect_before_open=300.0, stop_after_close=300.0,
                max_connections=5, max_instruments_per_connection=5000)
    base.update(kw)
    return DhanConfig(**base)


def test_start_refuses_25001_instruments_with_one_line_naming_the_key(tmp_path):
    dc = _config(tmp_path, 25_001)
    with pytest.raises(ConfigError) as ei:
        gather_lines(dc, (), None, None)
    e = ei.value
    assert e.key == "dhan.instruments_file" and e.file == dc.instruments_file
    assert "25001 instruments requested" in str(e) and "dhan.max_instruments_per_connection" in str(e)
    lines, source = gather_lines(_config(tmp_path, 1000), (), None, None)
    assert len(lines) == 1000 and source == dc.instruments_file


def test_start_refuses_beyond_lowered_limits(tmp_path):
    dc = _config(tmp_path, 1001, max_connections=2, max_instruments_per_connection=500)
    with pytest.raises(ConfigError, match="1001 instruments requested, but feed-dhan carries at most 1000"):
        gather_lines(dc, (), None, None)


def test_command_line_instruments_replace_the_file(tmp_path):
    dc = _config(tmp_path, 3)
    lines, source = gather_lines(dc, ("NSE_EQ:HDFCBANK full priority,IDX_I:NIFTY 50 ticker", "NSE_EQ:1333 quote"),
                                 None, None)
    assert source == "the command line"
    assert [(ln.segment, ln.symbol, ln.mode, ln.priority) for ln in lines] == [
        ("NSE_EQ", "HDFCBANK", "full", 1), ("IDX_I", "NIFTY 50", "ticker", 0), ("NSE_EQ", "1333", "quote", 0)]
    with pytest.raises(ConfigError) as ei:
        gather_lines(dc, ("NSE_XX:FOO",), None, None)
    assert ei.value.key == "--instrument"


# ----------------------------------------------------------------------------- the connection's frames

class _Transport:
    """What the listener calls on picows's transport, recorded."""

    def __init__(self):
        self.calls = []

    def send_pong(self, payload):
        self.calls.append(("pong", payload))

    def send_close(self, code):
        self.calls.append(("close", int(code.value if hasattr(code, "value") else code)))

    def disconnect(self, graceful=True):
        self.calls.append(("disconnect",) if graceful else ("abort",))


def _listener(stop_on=None, fail_on=None):
    from feeds.dhan import collector as K
    from feeds.health import StreamHealth

    got, texts = [], []

    class Col:
        def _text(self, c, msg):
            texts.append(msg)

    def on(data):
        if data == fail_on:
            raise RuntimeError("handler bug")
        got.append(data)
        return data == stop_on

    c = K._Connection(1, [], StreamHealth())
    return K._Listener(Col(), c, on), c, got, texts


def _frame(kind, payload, fin=True):
    import picows
    return picows.picows._make_test_ws_frame(getattr(picows.WSMsgType, kind), payload, fin, False)


def test_frames_reach_the_handler_pings_are_answered_and_counted():
    listener, c, got, texts = _listener()
    t = _Transport()
    for f in (_frame("BINARY", b"\x08one"), _frame("PING", b"p1"), _frame("TEXT", b"hello"),
              _frame("PONG", b""), _frame("BINARY", b"\x08two")):
        listener.on_ws_frame(t, f)
    assert got == [b"\x08one", b"\x08two"]
    assert texts == ["hello"]
    assert c.pings == 1 and t.calls == [("pong", b"p1")]
    assert c.last > 0


def test_a_message_split_into_frames_is_handled_once_whole():
    listener, c, got, texts = _listener()
    t = _Transport()
    for f in (_frame("BINARY", b"ab", fin=False), _frame("PING", b"x"), _frame("CONTINUATION", b"cd", fin=False),
              _frame("CONTINUATION", b"ef"), _frame("TEXT", b"he", fin=False), _frame("CONTINUATION", b"llo")):
        listener.on_ws_frame(t, f)
    assert got == [b"abcdef"]
    assert texts == ["hello"]
    assert c.pings == 1


def test_a_stop_closes_the_connection_and_ignores_the_frames_still_buffered():
    listener, c, got, _ = _listener(stop_on=b"fatal")
    t = _Transport()
    for f in (_frame("BINARY", b"a"), _frame("BINARY", b"fatal"), _frame("BINARY", b"b")):
        listener.on_ws_frame(t, f)
    assert got == [b"a", b"fatal"]
    assert t.calls == [("close", 1000), ("disconnect",)]


def test_the_servers_close_is_answered_with_its_code():
    listener, _, _, _ = _listener()
    t = _Transport()
    listener.on_ws_frame(t, _frame("CLOSE", (1001).to_bytes(2, "big") + b"bye"))
    assert t.calls == [("close", 1001), ("disconnect",)]


def test_a_handler_exception_is_kept_for_the_connections_task():
    listener, _, got, _ = _listener(fail_on=b"bad")
    with pytest.raises(RuntimeError):
        listener.on_ws_frame(_Transport(), _frame("BINARY", b"bad"))
    assert isinstance(listener.error, RuntimeError)
    # nothing more reaches the handler on that connection
    listener.on_ws_frame(_Transport(), _frame("BINARY", b"\x08after"))
    assert got == []


def test_a_message_over_the_limit_closes_the_connection_with_1009(monkeypatch):
    from feeds.dhan import collector as K
    monkeypatch.setattr(K, "MAX_MESSAGE_BYTES", 10)
    listener, _, got, _ = _listener()
    t = _Transport()
    for f in (_frame("BINARY", b"12345", fin=False), _frame("CONTINUATION", b"67890", fin=False),
              _frame("CONTINUATION", b"X", fin=False), _frame("CONTINUATION", b"end")):
        listener.on_ws_frame(t, f)
    assert got == [] and listener.oversized
    assert t.calls == [("close", 1009), ("disconnect",)]
    # a message at the limit is whole
    listener, _, got, _ = _listener()
    for f in (_frame("BINARY", b"12345", fin=False), _frame("CONTINUATION", b"67890")):
        listener.on_ws_frame(_Transport(), f)
    assert got == [b"1234567890"] and not listener.oversized


class _Stuck(_Transport):
    is_close_frame_sent = False

    async def wait_disconnected(self):
        import asyncio
        await asyncio.sleep(3600)


def test_close_aborts_a_socket_that_does_not_close(monkeypatch):
    import asyncio
    from feeds.dhan import collector as K
    real = asyncio.wait_for

    async def quick(aw, timeout):
        return await real(aw, 0.01)
    monkeypatch.setattr(K.asyncio, "wait_for", quick)
    t = _Stuck()
    asyncio.run(K._close(t))
    assert t.calls == [("close", 1000), ("disconnect",), ("abort",)]


# ----------------------------------------------------------------------------- the messages of one read

class _Frame:
    """A frame as picows hands it over, ``last_in_buffer`` included (picows's test frames are always last)."""

    def __init__(self, kind, payload, last=False, fin=True):
        import picows
        self.msg_type = getattr(picows.WSMsgType, kind)
        self.fin = fin
        self.last_in_buffer = last
        self._payload = payload

    def get_payload_as_bytes(self):
        return self._payload


def _batch_listener(stop_on=None, fail_on=None):
    listener, c, got, texts = _listener()
    batches = []

    def on_batch(msgs):
        if fail_on in msgs:
            raise RuntimeError("handler bug")
        batches.append(list(msgs))
        return stop_on in msgs
    listener.on_batch = on_batch
    return listener, c, got, texts, batches


def test_the_binary_messages_of_one_read_reach_the_handler_together():
    listener, c, got, texts, batches = _batch_listener()
    t = _Transport()
    for f in (_Frame("BINARY", b"a"), _Frame("BINARY", b"b"), _Frame("BINARY", b"c", last=True),
              _Frame("BINARY", b"d"), _Frame("PING", b"p"), _Frame("BINARY", b"e"), _Frame("TEXT", b"hi"),
              _Frame("BINARY", b"f", last=True)):
        listener.on_ws_frame(t, f)
        if f.msg_type.name == "PING":
            assert batches[-1] == [b"d"]            # handed over before the ping is answered
    assert batches == [[b"a", b"b", b"c"], [b"d"], [b"e"], [b"f"]]
    assert texts == ["hi"] and got == [] and c.pings == 1 and c.last > 0


def test_a_long_read_is_handed_over_in_batches_of_at_most_max_batch_messages(monkeypatch):
    from feeds.dhan import collector as K
    monkeypatch.setattr(K, "MAX_BATCH_MESSAGES", 3)
    listener, _, _, _, batches = _batch_listener()
    for i in range(7):
        listener.on_ws_frame(_Transport(), _Frame("BINARY", bytes([i]), last=i == 6))
    assert [len(b) for b in batches] == [3, 3, 1]


def test_a_stop_in_a_batch_closes_the_connection_and_ignores_the_rest_of_the_read():
    listener, _, _, _, batches = _batch_listener(stop_on=b"fatal")
    t = _Transport()
    for f in (_Frame("BINARY", b"a"), _Frame("BINARY", b"fatal", last=True), _Frame("BINARY", b"b"),
              _Frame("BINARY", b"c", last=True)):
        listener.on_ws_frame(t, f)
    assert batches == [[b"a", b"fatal"]]
    assert t.calls == [("close", 1000), ("disconnect",)]


def test_messages_gathered_when_the_connection_ends_are_handed_over():
    listener, _, _, _, batches = _batch_listener()
    listener.on_ws_frame(_Transport(), _Frame("BINARY", b"a"))
    assert batches == []
    t = _Transport()
    listener.on_ws_disconnected(t)
    assert batches == [[b"a"]] and t.calls == []


def test_a_batch_handler_exception_is_kept_and_nothing_more_is_handled():
    listener, _, got, _, batches = _batch_listener(fail_on=b"bad")
    listener.on_ws_frame(_Transport(), _Frame("BINARY", b"a"))
    with pytest.raises(RuntimeError):
        listener.on_ws_frame(_Transport(), _Frame("BINARY", b"bad", last=True))
    assert isinstance(listener.error, RuntimeError)
    listener.on_ws_frame(_Transport(), _Frame("BINARY", b"after", last=True))
    assert batches == [] and got == []


# ----------------------------------------------------------------------------- the collector's batch path

class _Sink:
    fatal = None

    def __init__(self):
        self.calls = []

    def add_many(self, table, rows):
        self.calls.append((table, list(rows)))

    def rows(self, table):
        return [r for t, rs in self.calls if t == table for r in rs]


def _collector(batch_rows=2000, candles=True):
    import time
    from feeds import candles as C
    from feeds.candles import CandleSettings
    from feeds.dhan.candles import DhanCandles
    from feeds.dhan.collector import DhanCollector, Settings
    from feeds.health import Health
    sink = _Sink()
    plan = [Subscription(1, 1333, "full"), Subscription(1, 7, "quote"), Subscription(0, 13, "ticker"),
            Subscription(2, 35001, "quote")]
    cd = DhanCandles(CandleSettings(), C.always(), plan, sink, since_ns=time.time_ns() - 3600 * 10**9) \
        if candles else None
    col = DhanCollector(Settings(batch_rows=batch_rows), "token", [plan], sink, Health(unit="test-dhan"),
                        candles=cd)
    return col, sink


def _messages():
    import time
    from feeds.sim import dhan_packets as P
    ltt = P.ltt_from_utc(time.time() - 1)
    depth = [(100 + i, 200 + i, 3 + i, 4 + i, 1650.40 - 0.05 * i, 1650.50 + 0.05 * i) for i in range(5)]
    full = [P.pack_full(1, 1333, 1650.45 + 0.05 * i, 1 + i, ltt, 1650.0, 1000 + 10 * i, 1, 2, 0, 0, 0, 1640.0, 0.0,
                        1655.0, 1638.0, depth) for i in range(4)]
    return [full[0], P.pack_quote(1, 7, 99.5, 3, ltt, 99.4, 500, 1, 1, 99.0, 0.0, 100.0, 98.0),
            P.pack_frame(P.pack_prev_close(2, 35001, 24310.5, 1), P.pack_oi(2, 35001, 7),
                         P.pack_ticker(0, 13, 24500.35, ltt)),
            full[1], P.pack_ticker(0, 13, 24501.0, 0), P.pack_market_status(), full[2], full[3]]


def _bad():
    from feeds.sim import dhan_packets as P
    return P.pack_ticker(1, 1333, float("nan"), 0)


def _without_times(rows):
    return [tuple(r[:-2]) + (r[-1],) for r in rows]


def _stored(col, sink):
    from feeds.dhan import adapter as A
    col._flush()
    return {t.name: sink.rows(t.name) for t in A.TABLES}


def test_a_batch_makes_the_rows_and_candles_of_its_messages_one_at_a_time():
    from feeds.dhan import adapter as A
    msgs = _messages()
    one, one_sink = _collector()
    on = one.handler(one.conns[0])
    for m in msgs:
        assert on(m) is False
    many, many_sink = _collector()
    assert many.batch_handler(many.conns[0])(msgs) is False
    a, b = _stored(one, one_sink), _stored(many, many_sink)
    for name in a:
        assert _without_times(a[name]) == _without_times(b[name]), name
    assert len(b[A.FULL_TABLE.name]) == 4 and len(b[A.QUOTE_TABLE.name]) == 1
    assert [r[-1] for r in b[A.TICKER_TABLE.name]] == [2, 0]          # seq: the position in its message
    # receive times: one per message, one microsecond apart, the packets of a message share it
    recv = {r[-2] for name in b for r in b[name]}
    assert len(recv) == len(msgs)
    c = many.conns[0]
    assert c.messages == len(msgs) and c.packets == len(msgs)
    assert sorted(recv)[-1].endswith(f".{c.last_us % 1_000_000:06d}+00:00")
    # the candles are the same
    ca, cb = one.candles.close_all(), many.candles.close_all()
    assert ca == cb > 0
    assert [r[:-1] for r in one_sink.rows("dhan_candle")] == [r[:-1] for r in many_sink.rows("dhan_candle")]


def test_receive_times_keep_increasing_across_batches_and_seconds():
    import time
    col, _ = _collector()
    c = col.conns[0]
    on_batch = col.batch_handler(c)
    c.last_us = (int(time.time()) + 5) * 1_000_000 - 2      # the clock behind the connection's last message
    on_batch(_messages()[:4])
    on_batch(_messages()[:3])
    recv = sorted({r[-2] for rs in col.rows.rows.values() for r in rs})
    assert len(recv) == 7 and recv[0].endswith(".999999+00:00") and recv[1].endswith(".000000+00:00")


def test_a_malformed_message_in_a_batch_is_counted_and_the_others_stored():
    from feeds.dhan import adapter as A
    col, sink = _collector()
    msgs = _messages()
    msgs.insert(3, _bad())
    assert col.batch_handler(col.conns[0])(msgs) is False
    assert col.health.malformed == 1
    assert len(_stored(col, sink)[A.FULL_TABLE.name]) == 4
    assert col.conns[0].messages == len(msgs) and col.conns[0].packets == len(msgs) - 1


def test_a_fatal_disconnect_in_a_batch_stops_after_its_message():
    from feeds.dhan import adapter as A
    from feeds.sim import dhan_packets as P
    col, sink = _collector()
    msgs = _messages()
    msgs[3:3] = [_bad(), P.pack_frame(P.pack_oi(2, 35001, 8), P.pack_disconnect(807))]
    assert col.batch_handler(col.conns[0])(msgs) is True
    assert col.failure is not None and col.failure_rc == 77 and col.disconnects == {807: 1}
    got = _stored(col, sink)
    assert len(got[A.FULL_TABLE.name]) == 1                         # the messages after it are not handled
    assert [r[2] for r in got[A.OI_TABLE.name]] == [7, 8]           # its message's rows and those before it
    assert [r[2:] for r in got[A.DISCONNECT_TABLE.name]] == [(807, "access token is expired", "exit")]
    assert got[A.DISCONNECT_TABLE.name][0][0] == got[A.OI_TABLE.name][1][-2]
    assert col.health.malformed == 1 and col.conns[0].messages == 5


def test_a_disconnect_that_is_not_fatal_is_acted_on_and_the_batch_goes_on():
    from feeds.dhan import adapter as A
    from feeds.sim import dhan_packets as P
    col, sink = _collector()
    msgs = _messages()
    msgs.insert(2, P.pack_disconnect(805))
    assert col.batch_handler(col.conns[0])(msgs) is False
    assert col.conns[0].backoff_next and col.disconnects == {805: 1} and col.failure is None
    got = _stored(col, sink)
    assert len(got[A.FULL_TABLE.name]) == 4 and len(got[A.DISCONNECT_TABLE.name]) == 1


def test_rows_reach_the_sink_at_the_same_points_as_one_message_at_a_time():
    msgs = _messages() * 3
    one, one_sink = _collector(batch_rows=3, candles=False)
    on = one.handler(one.conns[0])
    for m in msgs:
        on(m)
    many, many_sink = _collector(batch_rows=3, candles=False)
    on_batch = many.batch_handler(many.conns[0])
    on_batch(msgs[:5])
    on_batch(msgs[5:])
    assert [(t, _without_times(rs)) for t, rs in one_sink.calls] == [(t, _without_times(rs))
                                                                     for t, rs in many_sink.calls]
    assert len(one_sink.calls) > 5 and many.rows.pending == one.rows.pending


def test_a_sink_that_refuses_rows_stops_the_batch_after_the_message_that_filled_it():
    col, sink = _collector(batch_rows=2, candles=False)

    def refuse(table, rows):
        raise RuntimeError("sink is closed")
    sink.add_many = refuse
    msgs = _messages()
    assert col.batch_handler(col.conns[0])(msgs) is True
    assert col.failure.startswith("sink refused rows") and col.conns[0].messages == 2
