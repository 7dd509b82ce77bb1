"""MQTT heartbeat of a collector: its status, retained, on one topic of a broker.

Off unless ``mqtt.host`` is set (:func:`feeds.service.reporters` builds a
:class:`MqttHeartbeat` with :meth:`MqttHeartbeat.from_config`).  The client
is paho-mqtt 2.x (MQTT 3.1.1, callback API version 2); it connects, and
reconnects after 1, 2, 4 ... 60 s, in its own thread, so a broker that is
down at start or goes away later never stops nor slows collecting.

Topic: ``mqtt.topic`` with ``{host}`` and ``{unit}`` replaced by the host
name and the systemd unit (default ``feeds/{host}/{unit}/status``, e.g.
``feeds/db1/feed-binance.service/status``).  Every message is a UTF-8 JSON
object, retained (a subscriber that comes late gets the last one at once),
with QoS ``mqtt.qos``:

* the status, at once on every (re)connection and then every
  ``mqtt.interval`` seconds (its own timer thread: the heartbeat goes on
  while a collector waits hours for its session)::

    {"online": true, "state": "running", "unit": "feed-binance.service",
     "host": "db1", "pid": 4242, "status": "<the STATUS= line>",
     "messages": 123456, "malformed": 0, "last_message_age": 0.012,
     "stored": 120000, "tables": {"binance_agg_trade": {"stored": 60000,
     "duplicates": 0, "rejected": 0}, ...}, "pending": 35,
     "spooling": false, "spooled_rows": 0, "replayed_rows": 0,
     "spool_bytes": 0, "figures": {"reconnects": 0, ...},
     "score": {"total": 100, "parts": {...}, "reasons": []},
     "interval": 30.0, "started_at": "2026-...Z", "time": "2026-...Z"}

  ``state`` is :attr:`feeds.health.Health.state` (starting, waiting,
  running, degraded, spooling, stopping); ``last_message_age`` is in
  seconds (null: no message yet); ``stored``, ``pending``, ``tables`` and
  the spool fields are rows (bytes for ``spool_bytes``) and absent for a
  job without a sink; ``score`` is the health score
  (:mod:`feeds.ops.healthscore`) as this process sees it over the last
  interval: it cannot count its own restarts nor know the usual rate, which
  ``feedctl status`` adds.  A status whose ``time`` is older than about
  three ``interval`` is stale (e.g. the broker restarted while the
  collector was stopped without reaching it).

* ``offline``: the last will, which the broker publishes when the
  connection ends without a DISCONNECT (the process was killed or hung, or
  its network went away; about 1.5 x ``mqtt.keepalive`` seconds later),
  and the message of a clean stop::

    {"online": false, "state": "offline", "reason": "lost",
     "unit": ..., "host": ..., "pid": ..., "started_at": ...}

  A clean stop has ``"reason": "stopped"`` and adds ``"exit_status"``,
  ``"final_state"`` (stopped or failed), ``"status"`` (the stop line) and
  ``"time"``.  A consumer tests ``payload["online"]`` (or ``payload["state"]
  == "offline"``).

Connection changes are logged once per change (connected, refused with
the broker's reason, unreachable, lost); the password is never logged.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ..config import Config, ConfigError, read_secret, read_secret_text
from . import healthscore

log = logging.getLogger(__name__)

#: Seconds :meth:`MqttHeartbeat.stop` waits for the broker (offline message and disconnect).
STOP_TIMEOUT = 2.0
#: Reconnect delays of the client thread: first and largest, seconds (doubled each try).
RECONNECT_MIN, RECONNECT_MAX = 1, 60
#: Seconds a TCP (and TLS) connection attempt may take.
CONNECT_TIMEOUT = 5.0

#: States of a healthy running collector: data is expected to flow (for the score's freshness).
def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def topic_for(template: str, host: str, unit: str) -> str:
    """``template`` with ``{host}`` and ``{unit}`` replaced (other text kept
    as it is).  Raises ValueError when the result is not a topic one may
    publish to (empty, or holding the wildcards ``+``/``#`` or a NUL)."""
    topic = template.replace("{host}", host).replace("{unit}", unit)
    if not topic or any(c in topic for c in "+#\0"):
        raise ValueError(f"not a topic to publish to: {topic!r} (no + or # wildcards)")
    return topic


def _tls_context(cfg: Config) -> ssl.SSLContext:
    """The client TLS context of ``mqtt.ca_file`` / ``cert_file`` / ``key_file``
    (what paho's ``tls_set(ca_certs, certfile, keyfile)`` builds: the broker's
    certificate and host name verified).  Raises ConfigError naming the key."""
    ca, cert, key = cfg["mqtt.ca_file"], cfg["mqtt.cert_file"], cfg["mqtt.key_file"]
    for k, path in (("mqtt.ca_file", ca), ("mqtt.cert_file", cert)):
        if path and not Path(path).is_file():
            raise ConfigError(k, cfg.file, f"file {path} not found")
    if key:
        read_secret_text(key, "mqtt.key_file", cfg.file)      # exists, readable, mode 0600
        if not cert:
            raise ConfigError("mqtt.key_file", cfg.file, "needs mqtt.cert_file (the client certificate)")
    try:
        ctx = ssl.create_default_context(cafile=ca or None)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError("mqtt.ca_file", cfg.file, f"CA certificates in {ca} not usable: {e}") from None
    if cert:
        try:
            ctx.load_cert_chain(cert, key or None)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError("mqtt.cert_file", cfg.file,
                              f"client certificate {cert} (key {key or 'in the same file'}) not usable: "
                              f"{getattr(e, 'reason', None) or e.__class__.__name__}") from None
    return ctx


class MqttHeartbeat:
    """Publishes the status of the service it is started with (a
    :class:`feeds.service.Reporter`; see the module docstring for topic and
    payloads).

    Args:
        unit: the systemd unit (``{unit}`` of the topic, ``unit`` of the payload).
        host: broker host name or address.
        port: broker TCP port.
        topic: the topic template (``{host}``, ``{unit}``).
        interval: seconds between status messages (> 0).
        qos: MQTT QoS 0, 1 or 2 of every message (the will too).
        keepalive: MQTT keep-alive, seconds; the broker publishes the will
            about 1.5 times this after the process stops answering.
        tls: a client TLS context, or None for plain TCP.
        username, password: the broker login, or None.
        hostname: ``{host}`` of the topic (default: this host's name).

    Raises ValueError for a topic one cannot publish to.  Nothing touches
    the network before :meth:`start`.
    """

    def __init__(self, unit: str, host: str, port: int = 1883, *, topic: str = "feeds/{host}/{unit}/status",
                 interval: float = 30.0, qos: int = 1, keepalive: int = 60, tls: ssl.SSLContext | None = None,
                 username: str | None = None, password: str | None = None, hostname: str | None = None):
        self.unit, self.host, self.port = unit, host, port
        self.hostname = hostname or socket.gethostname()
        self.topic = topic_for(topic, self.hostname, unit)
        self.interval, self.qos, self.keepalive = float(interval), qos, keepalive
        self.tls = tls is not None
        self.pid = os.getpid()
        self.service = None
        self.started_at = datetime.now(timezone.utc)
        self._link = "new"             # connection state last logged
        self._connected = False
        self._wake = threading.Event()
        self._halt = False
        self._timer: threading.Thread | None = None
        self._window: healthscore.Counters | None = None   # counters at the start of the score's window
        self._ever_connected = False
        self.published = 0             # status messages handed to the client

        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"{unit}@{self.hostname}"[:128], clean_session=True,
                                  protocol=mqtt.MQTTv311)
        if tls is not None:
            self.client.tls_set_context(tls)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.will_set(self.topic, self._json(self.offline("lost")), qos=qos, retain=True)
        self.client.reconnect_delay_set(RECONNECT_MIN, RECONNECT_MAX)
        self.client.connect_timeout = CONNECT_TIMEOUT
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect

    def __repr__(self) -> str:
        return f"MqttHeartbeat({self.unit!r}, {self.host}:{self.port}, topic {self.topic!r})"

    @classmethod
    def from_config(cls, cfg: Config, unit: str) -> "MqttHeartbeat":
        """The heartbeat the ``mqtt.*`` settings of ``cfg`` describe, for
        ``unit``.  The user name and password come from
        ``mqtt.username_file`` / ``mqtt.password_file`` (first line; mode
        0600), TLS (``mqtt.tls``) from ``mqtt.ca_file`` (empty: the system's
        CAs), ``mqtt.cert_file`` and ``mqtt.key_file`` (mode 0600).  Raises
        ConfigError naming the key and the file (a secret file readable by
        others, missing, empty; a password without a user name; TLS files
        given without ``mqtt.tls``; a topic with wildcards) - never a
        secret's content."""
        username = password = None
        if cfg["mqtt.username_file"]:
            username = read_secret(cfg["mqtt.username_file"], "mqtt.username_file", cfg.file)
        if cfg["mqtt.password_file"]:
            if username is None:
                raise ConfigError("mqtt.password_file", cfg.file, "needs mqtt.username_file (MQTT sends a "
                                  "password only with a user name)")
            password = read_secret(cfg["mqtt.password_file"], "mqtt.password_file", cfg.file)
        tls = None
        if cfg["mqtt.tls"]:
            tls = _tls_context(cfg)
        else:
            for k in ("mqtt.ca_file", "mqtt.cert_file", "mqtt.key_file"):
                if cfg[k]:
                    raise ConfigError(k, cfg.file, "given but mqtt.tls is false (set mqtt.tls = true)")
        try:
            return cls(unit, cfg["mqtt.host"], cfg["mqtt.port"], topic=cfg["mqtt.topic"],
                       interval=cfg["mqtt.interval"], qos=cfg["mqtt.qos"], keepalive=cfg["mqtt.keepalive"],
                       tls=tls, username=username, password=password)
        except ValueError as e:
            raise ConfigError("mqtt.topic", cfg.file, str(e)) from None

    # ------------------------------------------------------------ payloads
    def status(self) -> dict[str, Any]:
        """The status payload now (see the module docstring), from the
        service's health and sink; safe to call from any thread."""
        svc = self.service
        h = getattr(svc, "health", None)
        sink = getattr(svc, "sink", None)
        now = datetime.now(timezone.utc)
        out: dict[str, Any] = {"online": True, "state": h.state if h else "starting",
                               "unit": self.unit, "host": self.hostname, "pid": self.pid,
                               "status": h.last_status if h else ""}
        if h is not None:
            streams = list(h.streams.values())
            age = h.last_message_age()
            out.update(messages=sum(s.count for s in streams), malformed=h.malformed,
                       last_message_age=None if age is None else round(age, 3))
        if sink is not None:
            tables = {n: {"stored": t.stored, "duplicates": t.duplicates, "rejected": t.rejected}
                      for n, t in list(sink.stats.tables.items())}
            out.update(stored=sum(t["stored"] for t in tables.values()), tables=tables, pending=sink.pending,
                       spooling=bool(sink.spooling), spooled_rows=sink.stats.spooled_rows,
                       replayed_rows=sink.stats.replayed_rows, spool_bytes=sink.spool.bytes)
        if h is not None:
            out["figures"] = dict(h.figures)
            out["score"] = self._score(h, sink)
        out.update(interval=self.interval, started_at=_iso(self.started_at), time=_iso(now))
        return out

    def _score(self, h, sink) -> dict | None:
        """The health score over the window since the last call
        (:func:`feeds.ops.healthscore.process_score`)."""
        try:
            sc, self._window = healthscore.process_score(h, sink, self._window,
                                                         heartbeat_interval_s=self.interval)
            return sc.as_dict()
        except Exception:
            log.debug("MQTT heartbeat: health score not computed", exc_info=True)
            return None

    def offline(self, reason: str, rc: int | None = None) -> dict[str, Any]:
        """The offline payload: ``reason`` "lost" (the last will) or
        "stopped" (a clean stop with exit status ``rc``)."""
        out: dict[str, Any] = {"online": False, "state": "offline", "reason": reason, "unit": self.unit,
                               "host": self.hostname, "pid": self.pid, "started_at": _iso(self.started_at)}
        if reason != "lost":
            h = getattr(self.service, "health", None)
            out.update(exit_status=rc, final_state=h.state if h else None,
                       status=h.last_status if h else "", time=_iso(datetime.now(timezone.utc)))
        return out

    @staticmethod
    def _json(payload: dict) -> bytes:
        return json.dumps(payload, separators=(",", ":"), default=str).encode()

    # ------------------------------------------------------------ Reporter
    def start(self, service) -> None:
        """Connect in the client's thread and start the status timer;
        returns at once (a broker down is retried in the background)."""
        self.service = service
        log.info("MQTT heartbeat: broker %s:%d%s, topic %s, every %gs", self.host, self.port,
                 " (TLS)" if self.tls else "", self.topic, self.interval)
        self._timer = threading.Thread(target=self._run_timer, name="mqtt-heartbeat", daemon=True)
        self._timer.start()
        try:
            self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
            self.client.loop_start()
        except Exception as e:       # e.g. a host name paho refuses; the collector goes on
            log.warning("MQTT heartbeat not started: %s", e)

    def update(self) -> None:
        """Nothing: the timer thread publishes (the event loop never waits for the client)."""

    def stop(self, rc: int) -> None:
        """Publish the retained offline message and disconnect, waiting at
        most about :data:`STOP_TIMEOUT` seconds for the broker."""
        if self.service is None:           # never started
            return
        deadline = time.monotonic() + STOP_TIMEOUT
        self._halt = True
        self._wake.set()
        if self._timer is not None:
            self._timer.join(STOP_TIMEOUT)
        c = self.client
        if self._connected:
            try:
                info = c.publish(self.topic, self._json(self.offline("stopped", rc)), qos=self.qos, retain=True)
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
                if not info.is_published():
                    log.warning("MQTT heartbeat: offline message not confirmed by %s:%d in %.0f s",
                                self.host, self.port, STOP_TIMEOUT)
                c.disconnect()
            except Exception as e:
                log.warning("MQTT heartbeat: offline message not sent: %s", e)
        else:
            log.info("MQTT heartbeat: not connected to %s:%d at stop; no offline message sent",
                     self.host, self.port)
        # loop_stop joins the client thread, which may sit in a connection attempt: bounded here
        t = threading.Thread(target=c.loop_stop, name="mqtt-stop", daemon=True)
        t.start()
        t.join(max(0.2, deadline - time.monotonic()))

    # ------------------------------------------------------------ threads and callbacks
    def _run_timer(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._halt:
                return
            if self._connected:
                self._publish_status()

    def _publish_status(self) -> None:
        try:
            payload = self._json(self.status())
        except Exception:
            log.exception("MQTT heartbeat: status not built")
            return
        try:
            self.client.publish(self.topic, payload, qos=self.qos, retain=True)
            self.published += 1
        except Exception as e:
            log.debug("MQTT heartbeat: status not published: %s", e)

    def _changed(self, link: str, level: int, msg: str, *args) -> None:
        """Log ``msg`` when the connection state becomes ``link`` (once per change)."""
        if link != self._link:
            self._link = link
            log.log(level, msg, *args)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._connected = False
            self._changed(f"refused:{reason_code}", logging.WARNING,
                          "MQTT heartbeat: broker %s:%d refused the connection (%s); retrying every %d-%d s",
                          self.host, self.port, reason_code, RECONNECT_MIN, RECONNECT_MAX)
            return
        again, self._ever_connected = self._ever_connected, True
        self._connected = True
        self._changed("connected", logging.INFO, "MQTT heartbeat: %s %s:%d, publishing to %s",
                      "reconnected to" if again else "connected to", self.host, self.port, self.topic)
        self._wake.set()               # the online status at once, from the timer thread

    def _on_connect_fail(self, client, userdata) -> None:
        self._connected = False
        self._changed("unreachable", logging.WARNING,
                      "MQTT heartbeat: broker %s:%d unreachable%s; retrying every %d-%d s", self.host, self.port,
                      " or TLS handshake failed" if self.tls else "", RECONNECT_MIN, RECONNECT_MAX)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected
        self._connected = False
        if self._halt:
            return
        if was:
            self._changed("lost", logging.WARNING, "MQTT heartbeat: connection to %s:%d lost (%s); reconnecting",
                          self.host, self.port, reason_code)
