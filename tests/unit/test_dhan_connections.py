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
