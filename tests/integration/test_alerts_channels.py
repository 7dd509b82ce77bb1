"""Alerts through apprise to real receivers on loopback: an SMTP server
(aiosmtpd) reached by a ``mailto://`` URL and an HTTP webhook reached by a
``json://`` URL.  Start, clear, a receiver that is down, and the URL never
appearing in the logs."""
import email
import email.policy
import json
import logging
import os
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller
from pgserver import free_port

from feeds.ops.alerts import FIRING, RESOLVED, AlertState, Channels, test_message, unit_failure_alert

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
CONFIG = "/etc/feeds/alerts.toml"
STALE = "stale:feed-binance.service"
HOLDS = {STALE: ("feed-binance.service is stale", "no aggTrade for 300 s on btcusdt", "critical")}
HOOK_PATH = "/hook/T0KEN-abcdef-s3cret"


class Mailbox:
    def __init__(self):
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes = []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        self.messages.append(email.message_from_bytes(envelope.original_content,
                                                      policy=email.policy.default))
        return "250 OK"

    def mails(self):
        return [(m["Subject"], m.get_content()) for m in self.messages]


class SmtpReceiver:
    """aiosmtpd on 127.0.0.1; stop() and start() keep the port."""

    def __init__(self):
        self.box, self.port, self.ctl = Mailbox(), free_port(), None

    def start(self):
        self.ctl = Controller(self.box, hostname="127.0.0.1", port=self.port)
        self.ctl.start()

    def stop(self):
        self.ctl.stop()

    @property
    def url(self):
        # mailto:// (not mailtos://) with mode=insecure: plain SMTP, no STARTTLS, no login
        return (f"mailto://127.0.0.1:{self.port}?mode=insecure"
                "&from=feeds@example.com&to=oncall@example.com")


class WebhookReceiver:
    """A JSON webhook (http.server) on 127.0.0.1; stop() and start() keep the port."""

    def __init__(self):
        self.posts: list[tuple[str, dict]] = []
        self.port, self.srv = free_port(), None

    def start(self):
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                posts.append((self.path, json.loads(self.rfile.read(n))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass
        for _ in range(50):                          # the port may linger briefly after stop()
            try:
                self.srv = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"port {self.port} stays busy")
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def stop(self):
        self.srv.shutdown()
        self.srv.server_close()

    @property
    def url(self):
        return f"json://127.0.0.1:{self.port}{HOOK_PATH}"


def running(receiver):
    """Start ``receiver``, hand it over, stop it (a test may have stopped it already)."""
    receiver.start()
    yield receiver
    try:
        receiver.stop()
    except Exception:
        pass


@pytest.fixture
def smtp():
    yield from running(SmtpReceiver())


@pytest.fixture
def hook():
    yield from running(WebhookReceiver())


def url_file(tmp_path, name, url):
    p = tmp_path / name
    p.write_text(f"# alert channel\n{url}\n")
    os.chmod(p, 0o600)
    return str(p)


@pytest.fixture
def channels(tmp_path, smtp, hook):
    return Channels([url_file(tmp_path, "mail.url", smtp.url), url_file(tmp_path, "hook.url", hook.url)],
                    CONFIG, send_timeout=5)


def test_test_message_arrives_by_mail_and_webhook(channels, smtp, hook):
    alert = test_message("box1")
    assert channels.send(alert) is True
    assert smtp.box.envelopes == [("feeds@example.com", ["oncall@example.com"])]
    ((subject, body),) = smtp.box.mails()
    assert subject == "feeds: test alert from box1"
    assert body.replace("\r\n", "\n").strip() == alert.body.strip()
    assert smtp.box.messages[0].get_content_type() == "text/plain"
    ((path, payload),) = hook.posts
    assert path == HOOK_PATH
    assert payload["title"] == "feeds: test alert from box1"
    assert payload["message"] == alert.body


def test_unit_failure_alert_arrives_with_journal_lines(channels, smtp, hook):
    lines = [f"feed-kite[7]: line {i}" for i in range(30)]
    assert channels.send(unit_failure_alert("feed-kite.service", lines, "", host="box1"))
    ((subject, body),) = smtp.box.mails()
    assert "feed-kite.service" in subject and "box1" in subject
    assert "journalctl -u feed-kite.service -e" in body and "line 29" in body
    assert hook.posts[0][1]["type"] == "failure"


def test_one_start_one_message_one_clear_one_resolved(tmp_path, channels, smtp, hook):
    state = AlertState(tmp_path / "state.json", channels=channels.names)
    for i in range(5):                                   # five runs of `feedctl check`, still stale
        state.deliver(HOLDS, T0 + timedelta(minutes=i), channels)
    assert [s for s, _ in smtp.box.mails()] == ["[critical] feed-binance.service is stale"]
    assert "no aggTrade for 300 s on btcusdt" in smtp.box.mails()[0][1]
    assert [p["title"] for _, p in hook.posts] == ["[critical] feed-binance.service is stale"]
    for i in range(5, 8):
        state.deliver({}, T0 + timedelta(minutes=i), channels)
    assert [s for s, _ in smtp.box.mails()][1:] == ["[resolved] feed-binance.service is stale"]
    assert "resolved" in smtp.box.mails()[1][1]
    assert [(p["title"], p["type"]) for _, p in hook.posts][1:] == \
        [("[resolved] feed-binance.service is stale", "success")]


def test_receiver_down_then_back(tmp_path, channels, smtp, hook):
    """The webhook is down when the condition starts: send() returns False
    without raising; mail gets it once; the webhook gets it when it is back."""
    hook.stop()
    alert = test_message("box1")
    t = time.monotonic()
    assert channels.send(alert) is False
    assert time.monotonic() - t < 10

    state = AlertState(tmp_path / "state.json", channels=channels.names)
    ((a, ok),) = state.deliver(HOLDS, T0, channels)
    assert a.status == FIRING and ok is False
    ((a, ok),) = state.deliver(HOLDS, T0 + timedelta(minutes=1), channels)   # still down
    assert ok is False and a.channels == (channels.names[1],)
    hook.start()
    ((a, ok),) = state.deliver(HOLDS, T0 + timedelta(minutes=2), channels)
    assert ok is True and a.channels == (channels.names[1],)
    assert state.deliver(HOLDS, T0 + timedelta(minutes=3), channels) == []
    subjects = [s for s, _ in smtp.box.mails()]
    assert subjects == ["feeds: test alert from box1", "[critical] feed-binance.service is stale"]
    assert [p["title"] for _, p in hook.posts] == ["[critical] feed-binance.service is stale"]

    smtp.stop()                                          # mail down when it clears
    ((a, ok),) = state.deliver({}, T0 + timedelta(minutes=4), channels)
    assert a.status == RESOLVED and ok is False
    smtp.start()
    ((a, ok),) = state.deliver({}, T0 + timedelta(minutes=5), channels)
    assert ok is True and a.channels == (channels.names[0],)
    assert state.deliver({}, T0 + timedelta(minutes=6), channels) == []
    assert [s for s, _ in smtp.box.mails()][2:] == ["[resolved] feed-binance.service is stale"]
    assert [p["title"] for _, p in hook.posts][1:] == ["[resolved] feed-binance.service is stale"]


def test_state_without_channel_names_still_delivers_once(tmp_path, channels, smtp, hook):
    state = AlertState(tmp_path / "state.json")          # all-or-nothing, one pseudo-channel
    assert [ok for _, ok in state.deliver(HOLDS, T0, channels)] == [True]
    assert state.deliver(HOLDS, T0 + timedelta(minutes=1), channels) == []
    assert len(smtp.box.messages) == 1 and len(hook.posts) == 1


def test_nothing_listening_is_a_failure_not_an_exception(tmp_path):
    ch = Channels([url_file(tmp_path, "mail.url",
                            f"mailto://127.0.0.1:{free_port()}?mode=insecure&from=f@example.com")],
                  CONFIG, send_timeout=2)
    assert ch.send(test_message("box1")) is False


def test_logs_never_carry_the_url(channels, smtp, hook, caplog):
    """At DEBUG (FEEDS_LOG_LEVEL=DEBUG), a delivered and a failed send log the
    channel's file path, never the URL's host, path or recipients."""
    with caplog.at_level(logging.DEBUG):
        assert channels.send(test_message("box1"))
        hook.stop()
        assert not channels.send(test_message("box1"))
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("mail.log"))
    for secret in ("T0KEN", "s3cret", "oncall@example.com", f":{hook.port}", f":{smtp.port}"):
        assert secret not in logged, logged
    assert channels.names[1] in logged and "not accepted" in logged


def test_feedctl_alert_test_reaches_every_channel_and_names_them_by_file(tmp_path, smtp, hook):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    files = [url_file(tmp_path, "mail.url", smtp.url), url_file(tmp_path, "hook.url", hook.url)]
    cfg = tmp_path / "ops.toml"
    cfg.write_text("[api]\n")
    (tmp_path / "alerts.toml").write_text("[alerts]\nurl_files = [%s]\nsend_timeout = 5.0\n"
                                          % ", ".join(f'"{f}"' for f in files))
    env = {**os.environ, "PYTHONPATH": str(root / "lib")}
    r = subprocess.run([sys.executable, str(root / "bin" / "feedctl"), "alert", "--test", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{files[0]}: accepted", f"{files[1]}: accepted"]
    assert len(smtp.box.messages) == 1 and smtp.box.messages[0]["Subject"].startswith("feeds: test alert from")
    assert len(hook.posts) == 1 and hook.posts[0][1]["title"].startswith("feeds: test alert from")
    assert str(smtp.port) not in r.stdout + r.stderr and "T0KEN" not in r.stdout + r.stderr

    hook.stop()                                             # one channel down: exit 1, the other still told
    r = subprocess.run([sys.executable, str(root / "bin" / "feedctl"), "alert", "--test", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1
    assert f"{files[1]}: NOT accepted" in r.stdout and len(smtp.box.messages) == 2

    os.chmod(files[0], 0o644)                               # a readable secret: exit 78, one line, no URL
    r = subprocess.run([sys.executable, str(root / "bin" / "feedctl"), "alert", "--test", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 78 and "alerts.url_files" in r.stderr and files[0] in r.stderr
    assert "127.0.0.1" not in r.stderr
