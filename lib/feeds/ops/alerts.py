"""Alerts: which conditions hold, who is told, and through which channels.

Three pieces, used by ``feedctl check``, ``feedctl alert --test`` and
``feed-alert@.service`` (``OnFailure=`` of every feed unit), all configured by
``alerts.toml`` (:data:`feeds.settings.ALERTS_FILE`):

* :class:`AlertState` turns "which conditions hold now" into the alerts to
  send: one ``firing`` alert when a condition starts holding, one
  ``resolved`` alert when it stops, nothing while it keeps holding.  It
  honours ``alerts.quiet_hours`` and persists in ``alerts.state_file``, so an
  alert that could not be delivered is offered again on the next run.
* :class:`Channels` sends an :class:`Alert` through apprise to every channel
  of ``alerts.url_files`` (one apprise URL a file; the URL holds the
  channel's credentials and is never logged nor put in an error message).
* :func:`test_message` and :func:`unit_failure_alert` build the alerts of
  ``feedctl alert --test`` and of a failed unit.

Delivery protocol (one run of ``feedctl check``)::

    channels = Channels.from_config(cfg)
    state = AlertState.from_config(cfg, channels.names)
    state.deliver(holding, datetime.now(timezone.utc), channels)

which is, per alert due::

    for alert in state.update(holding, now):
        results = channels.send_each(alert)       # only to alert.channels
        state.mark_sent(alert, [ch for ch, ok in results.items() if ok], now)

An alert is returned again by the next :meth:`AlertState.update`, for the
channels that did not accept it, until every channel has (never lost
because a channel was down); a channel that accepted it is never sent it
again (never duplicated).
"""
from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, time, timezone
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import parse_qsl, unquote, urlsplit
from zoneinfo import ZoneInfo

from ..config import ConfigError, read_secret_text
from ..runtime import write_atomically

log = logging.getLogger(__name__)

FIRING = "firing"
RESOLVED = "resolved"
STATUSES = (FIRING, RESOLVED)
SEVERITIES = ("critical", "warning")

STATE_VERSION = 1


@dataclass(frozen=True)
class Alert:
    """One message to send.

    ``key``: the condition, ``"<kind>:<subject>"`` (e.g.
    ``"stale:feed-binance.service"``); ``title``: one line, the message's
    subject; ``body``: plain text, several lines; ``severity``: ``"critical"``
    or ``"warning"``; ``status``: ``"firing"`` (the condition started holding)
    or ``"resolved"`` (it stopped); ``channels``: the names of the channels
    (URL file paths, :attr:`Channels.names`) still owed this alert, ``()``
    for every channel.  Raises ValueError for another severity or status.
    """
    key: str
    title: str
    body: str
    severity: str
    status: str = FIRING
    channels: tuple[str, ...] = ()

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"alert severity {self.severity!r} is not one of {SEVERITIES}")
        if self.status not in STATUSES:
            raise ValueError(f"alert status {self.status!r} is not one of {STATUSES}")


# -- quiet hours ---------------------------------------------------------------------------------


def _hhmm(v: str) -> time:
    h, m = v.strip().split(":")
    return time(int(h), int(m))


class QuietHours:
    """``alerts.quiet_hours`` in ``alerts.time_zone``: ``[]`` (never quiet) or
    ``["HH:MM", "HH:MM"]`` (start included, end excluded; when start > end the
    quiet hours span midnight, e.g. ``["22:00", "07:00"]``).

    Raises ValueError for another shape or an unknown time zone (the settings
    schema checks both before this is built).
    """

    def __init__(self, hours: Iterable[str] = (), time_zone: str = "UTC"):
        hours = list(hours)
        if hours and len(hours) != 2:
            raise ValueError('quiet hours must be [] or ["HH:MM", "HH:MM"]')
        self.tz = ZoneInfo(time_zone)
        self.span = (_hhmm(hours[0]), _hhmm(hours[1])) if hours else None
        if self.span and self.span[0] == self.span[1]:
            raise ValueError("quiet hours start and end are equal")

    def __contains__(self, now: datetime) -> bool:
        """Whether the aware datetime ``now`` falls within the quiet hours."""
        if self.span is None:
            return False
        t = _aware(now).astimezone(self.tz).time().replace(tzinfo=None)
        start, end = self.span
        if start < end:
            return start <= t < end
        return t >= start or t < end


def _aware(now: datetime) -> datetime:
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"expected an aware datetime, got {now!r}")
    return now


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    parts = [f"{d}d"] if d else []
    parts += [f"{h}h"] if h or d else []
    parts += [f"{m}m"]
    return " ".join(parts) if (d or h or m) else f"{s}s"


# -- state ---------------------------------------------------------------------------------------


class AlertState:
    """Which conditions hold and what was told to which channel, kept in the
    JSON file ``path`` (``alerts.state_file``).

    ``channels``: the names of the channels every alert must reach
    (:attr:`Channels.names`); the default, one channel ``"*"``, suits a
    caller that reports delivery all-or-nothing.

    File shape (version 1)::

        {"version": 1,
         "conditions": {"<key>": {"title": str, "body": str, "severity": str,
                                  "started": ISO-8601 UTC,      # began holding
                                  "due": ISO-8601 UTC | null,   # firing first offered
                                  "told": ISO-8601 UTC | null,  # firing delivered everywhere
                                  "cleared": ISO-8601 UTC | null,  # stopped holding
                                  "owed": [channel, ...] | null}}}  # not yet accepted by

    A condition is kept while it holds, and after it clears until its
    ``resolved`` alert is delivered.  A missing file means nothing holds; an
    unreadable or corrupt file is logged (ERROR) and treated as empty (the
    conditions that still hold are then told once more).  The file is
    written atomically (temporary file in the same directory, fsync,
    ``os.replace``) after every change; a write that fails raises OSError.

    Quiet hours (:class:`QuietHours`): while they last :meth:`update` returns
    nothing.  A condition that started during them and still holds at their
    end is told then; one that started and cleared within them is never told;
    the ``resolved`` alert of a condition told before them is told after them
    if the condition is still cleared.
    """

    def __init__(self, path: str | os.PathLike, quiet_hours: Iterable[str] = (),
                 time_zone: str = "UTC", channels: Iterable[str] = ("*",)):
        self.path = Path(path)
        self.quiet = QuietHours(quiet_hours, time_zone)
        self.channels = tuple(channels) or ("*",)
        self.conditions: dict[str, dict] = self._load()

    @classmethod
    def from_config(cls, cfg, channels: Iterable[str] = ("*",)) -> "AlertState":
        """From a loaded ``alerts.toml`` (:class:`feeds.config.Config`): settings
        ``alerts.state_file``, ``alerts.quiet_hours``, ``alerts.time_zone``;
        ``channels`` as for the constructor (e.g. ``Channels.names``)."""
        return cls(cfg["alerts.state_file"], cfg["alerts.quiet_hours"], cfg["alerts.time_zone"],
                   channels)

    # persistence

    def _load(self) -> dict[str, dict]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            log.error("alert state %s not readable (%s); starting with no conditions held",
                      self.path, e.strerror or e)
            return {}
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
                raise ValueError(f"not a version {STATE_VERSION} alert state")
            conditions = doc["conditions"]
            if not isinstance(conditions, dict):
                raise ValueError("'conditions' is not an object")
            for key, c in conditions.items():
                if not isinstance(c, dict) or c.get("severity") not in SEVERITIES:
                    raise ValueError(f"condition {key!r} is malformed")
                for f in ("title", "body"):
                    if not isinstance(c.get(f), str):
                        raise ValueError(f"condition {key!r} has no {f}")
                _aware(datetime.fromisoformat(c["started"]))
                for f in ("due", "told", "cleared"):
                    if c.get(f) is not None:
                        _aware(datetime.fromisoformat(c[f]))
                    c.setdefault(f, None)
                owed = c.setdefault("owed", None)
                if owed is not None and not (isinstance(owed, list)
                                             and all(isinstance(x, str) for x in owed)):
                    raise ValueError(f"condition {key!r}: 'owed' is not a list of channels")
            return conditions
        except (ValueError, KeyError, TypeError) as e:
            log.error("alert state %s is corrupt (%s); starting with no conditions held",
                      self.path, e)
            return {}

    def save(self) -> None:
        """Write the state atomically (temporary file + ``os.replace``).
        Raises OSError when the directory is not writable."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"version": STATE_VERSION, "conditions": self.conditions}
        write_atomically(self.path, json.dumps(doc, indent=1, sort_keys=True) + "\n")

    # the state machine

    def update(self, holding: Mapping[str, tuple[str, str, str]], now: datetime) -> list[Alert]:
        """Record which conditions hold at ``now`` and return the alerts due.

        ``holding``: ``{key: (title, body, severity)}`` for every condition
        that holds now (a key absent = does not hold); ``now``: an aware
        datetime.  Returns, outside quiet hours, a ``firing`` alert for each
        condition that holds and has not been told yet, and a ``resolved``
        alert for each told condition that has stopped holding; during quiet
        hours an empty list.  Each alert names the channels still owed it
        (``Alert.channels``); it is returned again by the next call, for
        those channels only, until :meth:`mark_sent` records that they all
        accepted it.  A firing alert once offered is still owed when its
        condition clears before it is delivered (it is then sent, and its
        resolved alert at the next call).  Saves the state.  Raises
        ValueError for a naive ``now`` or a bad severity, OSError when the
        state cannot be written.
        """
        now = _aware(now)
        stamp = _iso(now)
        for key, (title, body, severity) in holding.items():
            if severity not in SEVERITIES:
                raise ValueError(f"condition {key!r}: severity {severity!r} is not one of {SEVERITIES}")
            c = self.conditions.get(key)
            if c is None:
                c = self.conditions[key] = {"started": stamp, "due": None, "told": None,
                                            "cleared": None, "owed": None}
            if c["cleared"] is not None and c["told"] is not None:
                c["owed"] = None                 # holds again: its pending resolved is dropped
            c["cleared"] = None
            c.update(title=title, body=body, severity=severity)
        for key in list(self.conditions):
            c = self.conditions[key]
            if key in holding or c["cleared"] is not None:
                continue
            if c["told"] is None and c["due"] is None:
                del self.conditions[key]         # never offered (e.g. within quiet hours)
            else:
                c["cleared"] = stamp
        due: list[Alert] = []
        if now not in self.quiet:
            for key in sorted(self.conditions):
                c = self.conditions[key]
                if c["told"] is not None and c["cleared"] is None:
                    continue                     # told, still holds: nothing to say
                owed = self._owed(c)
                if not owed:                     # the channels still owed it were removed
                    c["owed"] = None
                    if c["told"] is None:
                        c["told"] = stamp
                    else:
                        del self.conditions[key]
                    continue
                if c["told"] is None:
                    if c["due"] is None:
                        c["due"] = stamp
                    due.append(self._firing(key, c, now, owed))
                else:
                    due.append(self._resolved(key, c, owed))
        self.save()
        return due

    def _owed(self, c: dict) -> tuple[str, ...]:
        if c["owed"] is None:
            c["owed"] = list(self.channels)
        else:                                    # a channel since removed is owed nothing
            c["owed"] = [ch for ch in c["owed"] if ch in self.channels]
        return tuple(c["owed"])

    def mark_sent(self, alert: Alert, channels: Iterable[str] | None = None,
                  now: datetime | None = None) -> None:
        """Record that ``channels`` (names; default: every channel the alert
        was owed to) accepted ``alert`` (as returned by :meth:`update`), so it
        is not sent to them again.  When no channel is owed it any more, a
        firing alert counts as told and a resolved one ends the condition's
        record.  ``now``: an aware datetime, default the current time.  Saves
        the state (OSError when it cannot be written).  An alert that is no
        longer pending (already marked, or its condition changed) is ignored.
        """
        now = _aware(now) if now is not None else datetime.now(timezone.utc)
        c = self.conditions.get(alert.key)
        if c is None:
            return
        pending = c["told"] is None if alert.status == FIRING else \
            (c["told"] is not None and c["cleared"] is not None)
        if not pending or c["owed"] is None:
            return
        accepted = set(alert.channels if channels is None else channels)
        c["owed"] = [ch for ch in c["owed"] if ch not in accepted]
        if not c["owed"]:
            c["owed"] = None
            if alert.status == FIRING:
                c["told"] = _iso(now)
            else:
                del self.conditions[alert.key]
        self.save()

    def deliver(self, holding: Mapping[str, tuple[str, str, str]], now: datetime,
                send) -> list[tuple[Alert, bool]]:
        """:meth:`update`, then send each alert due and :meth:`mark_sent` what
        was accepted.  ``send``: a :class:`Channels` (each alert goes only to
        the channels still owed it, acceptance is recorded per channel) or a
        callable ``send(alert) -> bool`` (all-or-nothing).  Returns
        ``[(alert, accepted by every channel owed it), ...]``.  An exception
        raised by ``send`` counts as not accepted (logged)."""
        results = []
        for alert in self.update(holding, now):
            try:
                if isinstance(send, Channels):
                    tried = send.send_each(alert)     # {} when no channel is configured
                    if set(alert.channels) & set(tried):
                        accepted = [ch for ch, ok in tried.items() if ok]
                        ok = set(accepted) >= set(alert.channels)
                    else:                             # this state does not track send's channels
                        ok = all(tried.values())
                        accepted = list(alert.channels) if ok else []
                else:
                    ok = bool(send(alert))
                    accepted = list(alert.channels) if ok else []
            except Exception:
                log.exception("sending alert %s (%s) failed", alert.key, alert.status)
                ok, accepted = False, []
            if accepted:
                self.mark_sent(alert, accepted, now)
            results.append((alert, ok))
        return results

    def _firing(self, key: str, c: dict, now: datetime, owed: tuple[str, ...]) -> Alert:
        started = datetime.fromisoformat(c["started"])
        lines = [c["body"].rstrip(), "",
                 f"since {c['started']} ({_duration((now - started).total_seconds())} ago)"]
        if c["cleared"] is not None:
            lines.append(f"cleared at {c['cleared']} (a resolved message follows)")
        lines.append(f"condition: {key}")
        return Alert(key, f"[{c['severity']}] {c['title']}", "\n".join(lines), c["severity"],
                     FIRING, owed)

    def _resolved(self, key: str, c: dict, owed: tuple[str, ...]) -> Alert:
        started, cleared = datetime.fromisoformat(c["started"]), datetime.fromisoformat(c["cleared"])
        body = (f"resolved: {c['title']}\n\n"
                f"held from {c['started']} to {c['cleared']} "
                f"({_duration((cleared - started).total_seconds())})\n"
                f"condition: {key}")
        return Alert(key, f"[resolved] {c['title']}", body, c["severity"], RESOLVED, owed)


# -- channels ------------------------------------------------------------------------------------


class _Redact(logging.Filter):
    """Replaces every known secret part of the channel URLs in apprise's log
    records by ``***`` (apprise masks passwords itself, but not the host,
    path or query parts that hold tokens in many schemes)."""

    def __init__(self):
        super().__init__()
        self.secrets: set[str] = set()

    def add_url(self, url: str) -> None:
        parts = {url}
        try:
            u = urlsplit(url)
            parts.update(p for p in (u.netloc, u.username, u.password, u.hostname, u.path,
                                     u.query, u.fragment) if p)
            parts.update(s for s in u.path.split("/") if s)
            parts.update(v for _, v in parse_qsl(u.query) if v)
        except ValueError:
            pass
        for p in list(parts):
            parts.add(unquote(p))
        self.secrets.update(p for p in parts if len(p) >= 3)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            msg = record.getMessage()
        except Exception:
            msg = str(record.msg)
        for s in sorted(self.secrets, key=len, reverse=True):
            msg = msg.replace(s, "***")
        record.msg, record.args = msg, None
        record.exc_info, record.exc_text = None, None
        return True


_REDACT = _Redact()


def _guard_apprise_logging() -> None:
    """apprise logs the recipients of a message at INFO ("Sent Email to ...")
    and loaded URLs, request URLs and unpacked URL fields at DEBUG and TRACE;
    those are parts of the channel URLs, which hold credentials.  Its logger
    is therefore held at WARNING whatever ``FEEDS_LOG_LEVEL`` says, and its
    remaining records pass through :class:`_Redact`.  urllib3 (under
    apprise's HTTP channels) logs request paths, which hold webhook tokens,
    at DEBUG: it is held at INFO."""
    a = logging.getLogger("apprise")
    if a.level < logging.WARNING:
        a.setLevel(logging.WARNING)
    if _REDACT not in a.filters:
        a.addFilter(_REDACT)
    u = logging.getLogger("urllib3")
    if u.level < logging.INFO:
        u.setLevel(logging.INFO)


def _read_url_file(path: Path, config_file: str) -> str:
    key = "alerts.url_files"
    text = read_secret_text(path, key, config_file)
    urls = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not urls:
        raise ConfigError(key, config_file, f"secret file {path} holds no apprise URL")
    if len(urls) > 1:
        raise ConfigError(key, config_file, f"secret file {path} holds {len(urls)} URLs; one channel a file")
    return urls[0]


@dataclass
class Channel:
    """One channel: ``file`` (the path of its URL file, the only name ever
    logged) and ``service`` (the apprise plugin built from the URL)."""
    file: str
    service: object


class Channels:
    """The alert channels of ``alerts.url_files``.

    ``url_files``: paths, each a file holding one apprise URL (blank lines and
    lines starting with ``#`` ignored) that must be a regular file readable by
    no group or other user (mode 0600 or stricter); ``config_file``: the
    configuration file naming them (for errors); ``send_timeout``: seconds
    one channel may take to accept a message (``alerts.send_timeout``).

    Raises :class:`~feeds.config.ConfigError` (key ``alerts.url_files``, reason
    ``"<file>: <why>"``) for a missing, unreadable, group/other-accessible or
    empty file, or a URL apprise does not accept.  Neither errors nor logs
    ever contain a URL: channels are named by their file path.  Building
    channels holds apprise's logger at WARNING (see
    :func:`_guard_apprise_logging`).
    """

    def __init__(self, url_files: Iterable[str | os.PathLike], config_file: str | os.PathLike,
                 send_timeout: float = 20.0):
        import apprise
        _guard_apprise_logging()
        self.config_file = str(config_file)
        self.send_timeout = float(send_timeout)
        self.channels: list[Channel] = []
        asset = apprise.AppriseAsset(secure_logging=True)
        for f in url_files:
            path = Path(f)
            url = _read_url_file(path, self.config_file)
            _REDACT.add_url(url)
            self.channels.append(Channel(str(path), self._service(apprise, asset, url, path)))

    def _service(self, apprise, asset, url: str, path: Path):
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        try:
            service = apprise.Apprise.instantiate(url, asset=asset, suppress_exceptions=False)
        except Exception:
            service = None
        if service is None:
            why = (f"check its {scheme}:// syntax" if _scheme_known(scheme)
                   else "unknown or unsupported scheme")
            raise ConfigError("alerts.url_files", self.config_file,
                              f"{path}: apprise does not accept the URL in it ({why})")
        service.socket_connect_timeout = self.send_timeout
        service.socket_read_timeout = self.send_timeout
        return service

    @classmethod
    def from_config(cls, cfg) -> "Channels":
        """From a loaded ``alerts.toml``: settings ``alerts.url_files`` and
        ``alerts.send_timeout``; errors name ``cfg.file``."""
        return cls(cfg["alerts.url_files"], cfg.file, cfg["alerts.send_timeout"])

    def __len__(self) -> int:
        return len(self.channels)

    def _deadline(self, ch: Channel) -> float:
        """A backstop for one channel's whole call: its connect and read
        timeouts (``send_timeout`` each) plus apprise's own pause between two
        messages to the same service (``request_rate_per_sec``, 5.5 s for
        mail), which runs inside the call."""
        return 2 * self.send_timeout + float(getattr(ch.service, "request_rate_per_sec", 0) or 0) + 5

    @property
    def names(self) -> list[str]:
        """The channels' names: their URL file paths, in configuration order."""
        return [ch.file for ch in self.channels]

    def send(self, alert: Alert) -> bool:
        """Send ``alert`` (title, plain-text body) to the channels it names
        (``alert.channels``; ``()`` or names none of these: every channel),
        each given ``send_timeout`` seconds to connect and to answer (apprise
        spaces two messages to the same mail channel 5.5 s apart, so a run
        with several alerts takes that much longer).  Returns True when every
        one of them accepted it (also when there are no channels: nothing to do is
        not a failure, but it is logged at WARNING); False otherwise, after
        logging each failed channel by its file path.  Never raises for a
        channel that is down or refuses."""
        return all(self.send_each(alert).values())

    def send_each(self, alert: Alert) -> dict[str, bool]:
        """Like :meth:`send`; returns ``{channel name: accepted}`` for the
        channels it tried."""
        import apprise
        if not self.channels:
            log.warning("alert %s (%s) not sent: alerts.url_files names no channel in %s",
                        alert.key, alert.status, self.config_file)
            return {}
        if alert.status == RESOLVED:
            kind = apprise.NotifyType.SUCCESS
        elif alert.severity == "critical":
            kind = apprise.NotifyType.FAILURE
        else:
            kind = apprise.NotifyType.WARNING
        targets = [ch for ch in self.channels if ch.file in alert.channels] or self.channels
        results = {}
        for ch in targets:
            try:
                a = apprise.Apprise()
                a.add(ch.service)
                accepted = bool(a.notify(body=alert.body, title=alert.title, notify_type=kind,
                                         body_format=apprise.NotifyFormat.TEXT,
                                         timeout=self._deadline(ch)))
            except Exception as e:
                log.error("alert channel %s: %s while sending", ch.file, type(e).__name__)
                accepted = False
            if accepted:
                log.info("alert %s (%s) sent to channel %s", alert.key, alert.status, ch.file)
            else:
                log.error("alert %s (%s) not accepted by channel %s", alert.key, alert.status, ch.file)
            results[ch.file] = accepted
        return results


def _scheme_known(scheme: str) -> bool:
    if not scheme:
        return False
    try:
        from apprise.manager_plugins import NotificationManager
        return scheme in NotificationManager()
    except Exception:
        return False


# -- messages ------------------------------------------------------------------------------------


def test_message(host: str | None = None) -> Alert:
    """The alert of ``feedctl alert --test``: title ``"feeds: test alert from
    <host>"`` (default: this machine's hostname), severity ``warning``, key
    ``"test:<host>"``.  Not recorded in any state."""
    host = host or socket.gethostname()
    now = _iso(datetime.now(timezone.utc))
    body = (f"A test alert sent by `feedctl alert --test` on {host} at {now}.\n"
            "If you read this, this channel works; nothing is wrong with the feeds.")
    return Alert(f"test:{host}", f"feeds: test alert from {host}", body, "warning", FIRING)


test_message.__test__ = False            # not a pytest test when imported by one


def unit_failure_alert(unit: str, journal_lines: list[str], hint: str = "",
                       host: str | None = None) -> Alert:
    """The alert of ``feed-alert@<unit>.service`` (``OnFailure=``): ``unit``
    failed on ``host`` (default: this machine's hostname).

    ``journal_lines``: the unit's last journal lines (``alerts.journal_lines``
    of them, oldest first); ``hint``: one or more lines on what the failure
    usually means (may be empty).  The body holds the hint, the commands to
    run (``systemctl status <unit>``, ``journalctl -u <unit> -e``) and the
    journal lines.  Key ``"failed:<unit>"``, severity ``critical``.
    """
    host = host or socket.gethostname()
    body = [f"{unit} failed on {host}.", ""]
    if hint.strip():
        body += [hint.strip(), ""]
    body += ["What to do:",
             f"  systemctl status {unit}",
             f"  journalctl -u {unit} -e",
             ""]
    if journal_lines:
        body.append(f"Last {len(journal_lines)} journal lines:")
        body += [ln.rstrip("\n") for ln in journal_lines]
    else:
        body.append("(no journal lines)")
    return Alert(f"failed:{unit}", f"feeds: {unit} failed on {host}", "\n".join(body),
                 "critical", FIRING)
