"""The MQTT heartbeat end to end: bin/feed-binance against the Binance simulator, storing
into a throwaway PostgreSQL, publishing its status to a real mosquitto started by the test,
read back by a paho subscriber (with the password login, and TLS in one test)."""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from collector_process import CollectorProcess, collector_env, collectors_of, q, wait_for, write_config
from conftest import ROOT
from feeds.health import Health
from feeds.ops.mqtt import MqttHeartbeat
from feeds.sim.binance import SimulatorThread
from mosquitto import Mosquitto, free_port

pytestmark = pytest.mark.integration

UNIT = "feed-binance-mqtt-test.service"
TOPIC = f"feeds/{socket.gethostname()}/{UNIT}/status"
BIN = ROOT / "bin" / "feed-binance"
PASSWORD = "Heartbeat-Pa55-" + uuid.uuid4().hex[:8]
USERS = {"feeds": PASSWORD, "watcher": "watcher-pw"}


@dataclass
class Msg:
    retain: bool
    data: dict


class Subscriber:
    """A paho client subscribed to ``topic`` on ``broker``; every message (JSON) kept in ``messages``."""

    def __init__(self, broker: Mosquitto, topic: str = TOPIC, user: str = "watcher"):
        self.messages: list[Msg] = []
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"test-watcher-{uuid.uuid4().hex[:8]}")
        self.client.username_pw_set(user, USERS[user])
        if broker.tls:
            self.client.tls_set(ca_certs=str(broker.ca_file))
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1)
        self.client.on_message = lambda c, u, m: self.messages.append(Msg(m.retain, json.loads(m.payload)))
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()

    def wait(self, pred, since: int = 0, timeout: float = 90.0, what: str = "a message") -> Msg:
        found = wait_for(lambda: next((m for m in self.messages[since:] if pred(m.data)), None), timeout)
        assert found, f"no {what} in {timeout} s; got {[m.data for m in self.messages][-5:]}"
        return found

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Collector(CollectorProcess):
    """bin/feed-binance as a child process, with ``[mqtt]`` = ``mqtt``."""

    def __init__(self, tmp: Path, dsn: str, sim: SimulatorThread, mqtt_section: dict):
        cfg = write_config(tmp / "binance.toml", {
            "binance": {"rest_url": sim.http_url, "ws_url": sim.ws_url, "streams": ["aggTrade", "bookTicker"],
                        "status_interval": 1.0},
            "sink": {"spool_dir": str(tmp / "spool"), "flush_interval": 0.2},
            "metrics": {"port": 0},
            "mqtt": mqtt_section})
        env = collector_env(dsn)
        env["PYTHONPATH"] = str(ROOT / "lib")
        self.start([sys.executable, str(BIN), "--config", str(cfg), "--unit", UNIT], env)


@pytest.fixture
def collectors():
    yield from collectors_of(Collector)


def mqtt_section(broker: Mosquitto, tmp: Path) -> dict:
    user, pw = tmp / "mqtt.user", tmp / "mqtt.password"
    for path, text in ((user, "feeds"), (pw, PASSWORD)):
        path.write_text(text + "\n")
        os.chmod(path, 0o600)
    out = {"host": broker.host, "port": broker.port, "interval": 1.0, "keepalive": 5, "qos": 1,
           "username_file": str(user), "password_file": str(pw)}
    if broker.tls:
        out.update(tls=True, ca_file=str(broker.ca_file))
    return out


def simulator() -> SimulatorThread:
    return SimulatorThread(symbols=2, rate=100, seed=5, streams=["aggTrade", "bookTicker"])


def stored(db) -> int:
    return q(db, "select (select count(*) from binance_agg_trade) + (select count(*) from binance_book_ticker)")[0][0]


def online_from(pid: int, **more):
    return lambda d: (d["online"] and d["pid"] == pid and d["state"] == "running" and d.get("stored", 0) > 0
                      and all(d.get(k) == v for k, v in more.items()))


def test_heartbeats_then_the_last_will_after_kill(tmp_path, db, collectors):
    with Mosquitto(tmp_path / "broker", users=USERS) as broker, simulator() as sim:
        sub = Subscriber(broker)
        c = collectors(tmp_path, db, sim, mqtt_section(broker, tmp_path))
        pid = c.proc.pid
        first = sub.wait(online_from(pid), what="a running status").data
        assert first["unit"] == UNIT and first["host"] == socket.gethostname()
        assert first["interval"] == 1.0 and first["status"]
        assert first["messages"] > 0 and first["malformed"] == 0 and first["last_message_age"] is not None
        assert {"binance_agg_trade", "binance_book_ticker"} <= set(first["tables"])
        assert first["stored"] == sum(t["stored"] for t in first["tables"].values())
        assert first["pending"] >= 0 and first["spooling"] is False
        assert 0 <= first["score"]["total"] <= 100
        # one every interval, counting on
        n = len(sub.messages)
        later = sub.wait(lambda d: d["online"] and d["time"] > first["time"] and d["stored"] > first["stored"],
                         since=n, what="a later status").data
        assert later["messages"] >= first["messages"] and later["pid"] == pid
        # the collector's own counters, once the runtime has read them (every status interval)
        sub.wait(lambda d: d["online"] and "rest_weight_1m" in d["figures"], since=n, what="the figures")

        c.proc.kill()                       # SIGKILL: no offline message; the broker publishes the will
        c.proc.wait(30)
        will = sub.wait(lambda d: not d["online"], what="the last will").data
        assert will["state"] == "offline" and will["reason"] == "lost"
        assert (will["unit"], will["pid"]) == (UNIT, pid)
        sub.close()

        late = Subscriber(broker)            # subscribes afterwards: gets the retained will at once
        got = late.wait(lambda d: True, what="the retained message")
        assert got.retain and got.data == will
        late.close()
    assert PASSWORD not in c.output


def test_tls_and_a_clean_stop_publish_offline(tmp_path, db, collectors):
    with Mosquitto(tmp_path / "broker", users=USERS, tls=True) as broker, simulator() as sim:
        sub = Subscriber(broker)
        c = collectors(tmp_path, db, sim, mqtt_section(broker, tmp_path))
        pid = c.proc.pid
        sub.wait(online_from(pid), what="a running status over TLS")
        assert c.stop() == 0
        off = sub.wait(lambda d: not d["online"], what="the offline message").data
        assert off["state"] == "offline" and off["reason"] == "stopped" and off["pid"] == pid
        assert off["exit_status"] == 0 and off["final_state"] == "stopped"
        assert off["status"].startswith("stopped: all rows committed or spooled")
        sub.close()
        late = Subscriber(broker)
        got = late.wait(lambda d: True, what="the retained message")
        assert got.retain and got.data == off
        late.close()
    assert PASSWORD not in c.output
    assert c.wait_line("MQTT heartbeat: connected to")


def test_broker_down_never_stops_collecting_and_is_rejoined(tmp_path, db, collectors):
    broker = Mosquitto(tmp_path / "broker", users=USERS)       # not started yet
    with simulator() as sim:
        c = collectors(tmp_path, db, sim, mqtt_section(broker, tmp_path))
        pid = c.proc.pid
        c.wait_line("unreachable", timeout=60)
        assert wait_for(lambda: stored(db) > 0, 90), c.output[-2000:]
        n = stored(db)
        assert wait_for(lambda: stored(db) > n, 90), "rows stopped growing with the broker down"
        # a few status intervals with the broker down: the client retries meanwhile (1, 2, 4 ... s)
        assert wait_for(lambda: sum("status:" in ln for ln in c.lines) >= 4, 90), c.output[-2000:]
        assert sum("unreachable" in ln for ln in c.lines) == 1, c.output[-3000:]

        broker.start()
        try:
            sub = Subscriber(broker)
            sub.wait(online_from(pid), timeout=120, what="a status once the broker is up")
            c.wait_line("MQTT heartbeat: connected to")

            broker.stop()                                      # mid-run
            c.wait_line("MQTT heartbeat: connection to", timeout=60)
            n = stored(db)
            assert wait_for(lambda: stored(db) > n, 90), "rows stopped growing after the broker went away"

            broker.start()                                     # no persistence: nothing retained from before
            sub2 = Subscriber(broker)
            sub2.wait(online_from(pid), timeout=120, what="a status after the broker came back")
            c.wait_line("MQTT heartbeat: reconnected to")
            assert c.stop() == 0
            off = sub2.wait(lambda d: not d["online"], what="the offline message").data
            assert off["reason"] == "stopped" and off["pid"] == pid
            sub.close()
            sub2.close()
        finally:
            broker.stop()
    assert sum("connection to" in ln and "lost" in ln for ln in c.lines) == 1
    assert PASSWORD not in c.output


# ----------------------------------------------------------------------------- in this process

def fake_service():
    class Quiet:
        def notify(self, msg):
            pass
    return SimpleNamespace(unit="u.service", health=Health(unit="u.service", notifier=Quiet()), sink=None,
                           collector=None)


def counting(client, name: str) -> list:
    """Wrap callback ``name`` of ``client`` to count its calls."""
    calls: list = []
    orig = getattr(client, name)

    def wrapped(*a):
        calls.append(a)
        orig(*a)
    setattr(client, name, wrapped)
    return calls


def mqtt_records(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "feeds.ops.mqtt" and text in r.getMessage()]


def test_unreachable_broker_logged_once_and_stop_gives_up(caplog):
    caplog.set_level(logging.INFO, logger="feeds.ops.mqtt")
    hb = MqttHeartbeat("u.service", "127.0.0.1", free_port(), interval=1, hostname="h")
    fails = counting(hb.client, "on_connect_fail")
    hb.start(fake_service())
    try:
        assert wait_for(lambda: len(fails) >= 3, 60), "the client did not retry"
    finally:
        hb.stop(0)                                  # returns although no broker answers
    assert len(mqtt_records(caplog, "unreachable")) == 1
    assert mqtt_records(caplog, "not connected to") and hb.published == 0


def test_refused_login_logged_once_without_the_password(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="feeds.ops.mqtt")
    wrong = "Wrong-" + PASSWORD
    with Mosquitto(tmp_path / "broker", users=USERS) as broker:
        hb = MqttHeartbeat("u.service", broker.host, broker.port, interval=1, hostname="h",
                           username="feeds", password=wrong)
        answers = counting(hb.client, "on_connect")
        hb.start(fake_service())
        try:
            assert wait_for(lambda: len(answers) >= 2, 60), "the client did not retry"
        finally:
            hb.stop(0)
    refused = mqtt_records(caplog, "refused")
    assert len(refused) == 1 and "Not authorized" in refused[0], refused
    assert not any(wrong in r.getMessage() or PASSWORD in r.getMessage() for r in caplog.records)
    assert hb.published == 0


def test_broker_gone_at_stop(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="feeds.ops.mqtt")
    with Mosquitto(tmp_path / "broker", users=USERS) as broker:
        hb = MqttHeartbeat("u.service", broker.host, broker.port, interval=1, hostname="h",
                           username="feeds", password=PASSWORD, topic="t/{unit}")
        hb.start(fake_service())
        sub = Subscriber(broker, topic="t/u.service")
        sub.wait(lambda d: d["online"], what="a status")
        sub.close()
        gone = threading.Event()
        hb.client.on_disconnect = (lambda orig: lambda *a: (orig(*a), gone.set()))(hb.client.on_disconnect)
        broker.stop()
        assert gone.wait(60)
    hb.stop(0)                                      # broker down: gives up, does not raise
    assert mqtt_records(caplog, "lost")
