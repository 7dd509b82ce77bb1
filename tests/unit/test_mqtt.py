"""feeds.ops.mqtt without a broker: configuration errors, the topic, the payloads."""
import json
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from feeds.config import ConfigError
from feeds.health import Health
from feeds.ops.mqtt import MqttHeartbeat, topic_for
from feeds.settings import BINANCE_FILE, load
from feeds.sink import TableStats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mosquitto import make_certs  # noqa: E402

UNIT = "feed-binance.service"
PASSWORD = "s3cr3t-Pa55word"


class NullNotifier:
    def notify(self, msg: str) -> None:
        pass


def secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return path


def config(tmp_path: Path, **mqtt):
    """A binance.toml with ``[mqtt]`` = ``mqtt`` (host 127.0.0.1 unless given), loaded."""
    mqtt = {"host": "127.0.0.1", **mqtt}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in mqtt.items())
    f = tmp_path / "binance.toml"
    f.write_text('[binance]\nrest_url = "http://127.0.0.1:1"\nws_url = "ws://127.0.0.1:1/"\n'
                 f"[mqtt]\n{body}\n")
    return load(f, BINANCE_FILE)


def login(tmp_path: Path, user_mode=0o600, password_mode=0o600) -> dict:
    return {"username_file": str(secret(tmp_path / "mqtt.user", "feeds", user_mode)),
            "password_file": str(secret(tmp_path / "mqtt.password", PASSWORD, password_mode))}


# ----------------------------------------------------------------------------- from_config

def test_login_from_secret_files(tmp_path):
    hb = MqttHeartbeat.from_config(config(tmp_path, **login(tmp_path)), UNIT)
    assert hb.client._username == b"feeds" and hb.client._password == PASSWORD.encode()
    assert PASSWORD not in repr(hb)
    assert not hb.tls


@pytest.mark.parametrize("which", ["password", "username"])
def test_secret_file_readable_by_others_names_the_file_not_the_content(tmp_path, which):
    files = login(tmp_path, **{f"{'user' if which == 'username' else 'password'}_mode": 0o644})
    cfg = config(tmp_path, **files)
    with pytest.raises(ConfigError) as e:
        MqttHeartbeat.from_config(cfg, UNIT)
    key = f"mqtt.{which}_file"
    assert e.value.key == key and e.value.file == cfg.file
    assert files[f"{which}_file"] in str(e.value) and "chmod 600" in str(e.value)
    assert PASSWORD not in str(e.value) and "feeds\n" not in str(e.value)


def test_missing_or_empty_secret_file(tmp_path):
    cfg = config(tmp_path, username_file=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"key 'mqtt.username_file'.*nope not found"):
        MqttHeartbeat.from_config(cfg, UNIT)
    files = login(tmp_path)
    secret(Path(files["password_file"]), "")
    with pytest.raises(ConfigError, match=r"key 'mqtt.password_file'.*is empty"):
        MqttHeartbeat.from_config(config(tmp_path, **files), UNIT)


def test_password_without_user_name(tmp_path):
    cfg = config(tmp_path, password_file=login(tmp_path)["password_file"])
    with pytest.raises(ConfigError, match=r"key 'mqtt.password_file'.*needs mqtt.username_file"):
        MqttHeartbeat.from_config(cfg, UNIT)


def test_tls_files_need_tls_on(tmp_path):
    ca, _, _ = make_certs(tmp_path / "tls")
    with pytest.raises(ConfigError, match=r"key 'mqtt.ca_file'.*mqtt.tls is false"):
        MqttHeartbeat.from_config(config(tmp_path, ca_file=str(ca)), UNIT)


def test_tls_with_a_ca_file(tmp_path):
    ca, crt, key = make_certs(tmp_path / "tls")
    hb = MqttHeartbeat.from_config(config(tmp_path, tls=True, ca_file=str(ca), port=8883), UNIT)
    assert hb.tls and hb.port == 8883
    # the server's pair doubles as a client certificate here: loaded, key checked
    hb = MqttHeartbeat.from_config(config(tmp_path, tls=True, ca_file=str(ca), cert_file=str(crt),
                                          key_file=str(key)), UNIT)
    assert hb.tls


def test_tls_errors_name_the_key(tmp_path):
    ca, crt, key = make_certs(tmp_path / "tls")
    with pytest.raises(ConfigError, match=r"key 'mqtt.ca_file'.*not found"):
        MqttHeartbeat.from_config(config(tmp_path, tls=True, ca_file=str(tmp_path / "none.crt")), UNIT)
    bad = tmp_path / "bad.crt"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"key 'mqtt.ca_file'.*not usable"):
        MqttHeartbeat.from_config(config(tmp_path, tls=True, ca_file=str(bad)), UNIT)
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match=r"key 'mqtt.key_file'.*readable by group/others"):
        MqttHeartbeat.from_config(config(tmp_path, tls=True, cert_file=str(crt), key_file=str(key)), UNIT)


# ----------------------------------------------------------------------------- topic

def test_topic_default_has_host_and_unit(tmp_path):
    hb = MqttHeartbeat.from_config(config(tmp_path), UNIT)
    assert hb.topic == f"feeds/{socket.gethostname()}/{UNIT}/status"


def test_topic_substitution():
    assert topic_for("site/{unit}/on/{host}", "db1", "feed-binance@1of2.service") == \
        "site/feed-binance@1of2.service/on/db1"
    assert topic_for("plain/topic", "db1", "u") == "plain/topic"
    assert topic_for("{other}/{unit}", "db1", "u") == "{other}/u"
    assert MqttHeartbeat("u.service", "broker", hostname="h1", topic="x/{host}/{unit}").topic == "x/h1/u.service"


def test_topic_with_wildcards_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'mqtt.topic'.*wildcards"):
        MqttHeartbeat.from_config(config(tmp_path, topic="feeds/+/{unit}"), UNIT)
    with pytest.raises(ValueError):
        topic_for("feeds/{host}/#", "h", "u")


# ----------------------------------------------------------------------------- payloads

def service(with_sink: bool = True):
    h = Health(unit=UNIT, notifier=NullNotifier(), flow_timeout=20.0)
    sink = None
    if with_sink:
        sink = SimpleNamespace(
            stats=SimpleNamespace(tables={"binance_agg_trade": TableStats(stored=90, duplicates=2, rejected=1),
                                          "binance_book_ticker": TableStats(stored=10)},
                                  spooled_rows=5, replayed_rows=5),
            pending=7, spooling=False, spool=SimpleNamespace(bytes=0))
        h.sink = sink
    return SimpleNamespace(unit=UNIT, health=h, sink=sink, collector=None)


def test_status_payload():
    svc = service()
    h = svc.health
    h.stream("btcusdt@aggTrade").seen(60)
    h.stream("btcusdt@bookTicker").seen(40)
    h.count_malformed("btcusdt@aggTrade", "bad price")
    h.state = "running"
    h.notify_status("aggTrade 6/s max-age 0.1s; stored 100")
    h.set_figures({"reconnects": 2, "gaps": 0})
    hb = MqttHeartbeat(UNIT, "broker", hostname="db1", interval=30)
    hb.service = svc
    p = json.loads(hb._json(hb.status()))
    assert p["online"] is True and p["state"] == "running"
    assert (p["unit"], p["host"], p["pid"]) == (UNIT, "db1", os.getpid())
    assert p["status"] == "aggTrade 6/s max-age 0.1s; stored 100"
    assert p["messages"] == 100 and p["malformed"] == 1
    assert 0 <= p["last_message_age"] < 60
    assert p["stored"] == 100
    assert p["tables"]["binance_agg_trade"] == {"stored": 90, "duplicates": 2, "rejected": 1}
    assert (p["pending"], p["spooling"], p["spooled_rows"], p["replayed_rows"], p["spool_bytes"]) == (7, False, 5, 5, 0)
    assert p["figures"] == {"reconnects": 2, "gaps": 0}
    assert set(p["score"]["parts"]) == {"running", "compliance", "errors", "freshness", "performance"}
    assert 0 <= p["score"]["total"] <= 100
    assert p["score"]["parts"]["errors"] < 25          # 1 malformed + 1 rejected of 100 messages
    assert p["interval"] == 30.0
    assert p["time"].endswith("Z") and p["started_at"].endswith("Z")


def test_status_before_any_message_and_without_sink():
    svc = service(with_sink=False)
    svc.health.state = "waiting"
    hb = MqttHeartbeat(UNIT, "broker", hostname="db1")
    hb.service = svc
    p = hb.status()
    assert p["state"] == "waiting" and p["messages"] == 0 and p["last_message_age"] is None
    assert "stored" not in p and "pending" not in p
    assert p["score"]["parts"]["freshness"] == 15      # no session yet: not judged


def test_offline_payloads():
    svc = service()
    hb = MqttHeartbeat(UNIT, "broker", hostname="db1")
    will = hb.offline("lost")
    assert will == {"online": False, "state": "offline", "reason": "lost", "unit": UNIT, "host": "db1",
                    "pid": os.getpid(), "started_at": will["started_at"]}
    assert json.loads(hb.client._will_payload) == will
    assert hb.client._will_retain and hb.client._will_topic == hb.topic.encode() and hb.client._will_qos == 1
    hb.service = svc
    svc.health.state, svc.health.last_status = "stopped", "stopped: all rows committed or spooled"
    clean = hb.offline("stopped", 0)
    assert clean["online"] is False and clean["state"] == "offline" and clean["reason"] == "stopped"
    assert clean["exit_status"] == 0 and clean["final_state"] == "stopped"
    assert clean["status"].startswith("stopped:") and clean["time"].endswith("Z")
