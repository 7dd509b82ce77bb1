"""Per-stream health, sd_notify (READY / STATUS / WATCHDOG) and heartbeats.

The watchdog ping means "data is flowing and being stored": :meth:`Health.tick`
sends ``WATCHDOG=1`` only while (a) some stream delivered a message within
``flow_timeout`` seconds and (b) the sink committed or spooled within
``flow_timeout`` seconds, or has nothing pending.  A silent socket or a stuck
writer therefore stops the pings and systemd restarts the unit
(``WatchdogSec=``).  ``READY=1`` is sent once the first batch is stored
(committed, or spooled to disk when PostgreSQL is down at start).

Protocol: sd_notify(3), through the ``sdnotify`` package (a no-op when
``NOTIFY_SOCKET`` is unset, e.g. when run by hand); the process's one
notifier is :func:`feeds.runtime.sd_notifier`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from array import array
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from .db import connect
from .runtime import sd_notifier
from .sink import Sink, Table

log = logging.getLogger(__name__)


#: One "<kind> <rate>/s" item of a status line (:meth:`Health.status_line`).
_STATUS_RATE = re.compile(r"(?:^|; )([A-Za-z][\w@.\-]*) ([\d,]+(?:\.\d+)?)/s")


def status_rates(line: str) -> dict[str, float]:
    """``{stream kind: messages/s}`` read back from a status line written by
    :meth:`Health.status_line` (``aggTrade 1,234/s max-age 0.1s; bookTicker
    0/s (no data); stored ...``); ``{}`` for a line without rates."""
    return {m.group(1): float(m.group(2).replace(",", "")) for m in _STATUS_RATE.finditer(line or "")}


@dataclass(slots=True)
class StreamHealth:
    """Counters for one stream (e.g. ``btcusdt@aggTrade``).  Collectors call
    :meth:`seen`; ``count`` and ``last`` may be read."""
    count: int = 0
    last: float = 0.0          # time.monotonic() of the last message, 0 = never
    window_count: int = 0      # messages since the last status report

    def seen(self, n: int = 1) -> None:
        """Record ``n`` messages (default one) received now."""
        self.count += n
        self.window_count += n
        self.last = time.monotonic()


class LagHistogram:
    """Commit time minus venue event time, 1 ms buckets up to 60 s.

    ``add_rows(rows, idx, commit_time)`` records one value per row from the
    aware datetime at ``idx``; :meth:`percentile` returns milliseconds.
    """

    LIMIT_MS = 60_000

    def __init__(self):
        self.counts = array("q", bytes(8 * (self.LIMIT_MS + 1)))
        self.n = 0

    def add_rows(self, rows: list[tuple], idx: int, commit: datetime) -> None:
        counts, lim = self.counts, self.LIMIT_MS
        c = commit.timestamp()
        parse = datetime.fromisoformat
        step = max(1, len(rows) // 2000)          # large batches are sampled evenly
        n = 0
        for r in rows[::step] if step > 1 else rows:
            t = r[idx]
            if t is None:
                continue
            if type(t) is str:
                t = parse(t)
            ms = int((c - t.timestamp()) * 1000.0)
            counts[ms if 0 <= ms < lim else (lim if ms >= lim else 0)] += 1
            n += 1
        self.n += n

    def cumulative(self) -> np.ndarray:
        """Cumulative counts now: int64, one per 1 ms bin (index = ms; the
        last bin holds every value of :attr:`LIMIT_MS` or more).  A copy:
        safe while the sink's writer thread adds to the histogram."""
        return np.cumsum(np.frombuffer(self.counts, dtype=np.int64))

    def percentile(self, p: float, cumulative: np.ndarray | None = None) -> float | None:
        """The ``p``-th percentile in milliseconds (None when empty), from
        ``cumulative`` when given (:meth:`cumulative`, to reuse one)."""
        if not self.n:
            return None
        cum = self.cumulative() if cumulative is None else cumulative
        ms = int(np.searchsorted(cum, self.n * p / 100.0, side="left"))
        return float(min(ms, self.LIMIT_MS))

    def snapshot(self) -> dict:
        """Sparse ``{ms: count}`` for the heartbeat detail."""
        return {str(i): c for i, c in enumerate(self.counts) if c}

    def reset(self) -> None:
        self.counts = array("q", bytes(8 * (self.LIMIT_MS + 1)))
        self.n = 0


@dataclass
class Health:
    """Health of one collector process.

    ``unit``: the systemd unit name (heartbeat key).  ``flow_timeout``:
    seconds without any message (or without storage progress while rows are
    pending) after which watchdog pings stop.  ``sink``: the process's sink
    (None for a job without one, e.g. feed-backfill: it is ready at once and
    judged by nothing but its own progress).

    Collectors use :meth:`stream` (then :meth:`StreamHealth.seen`),
    :meth:`count_malformed` and :meth:`notify_status`; the runtime
    (:mod:`feeds.service`) calls :meth:`set_figures`, :meth:`tick`,
    :meth:`status_line` and :meth:`heartbeat`.
    """

    #: Malformed-input journal lines allowed per minute before they are summarised.
    MALFORMED_LINES_PER_MINUTE = 20

    unit: str
    sink: Sink | None = None
    flow_timeout: float = 20.0
    notifier: object = field(default_factory=sd_notifier)
    streams: dict[str, StreamHealth] = field(default_factory=dict)
    malformed: int = 0
    ready: bool = False
    state: str = "starting"
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    lag_window: LagHistogram = field(default_factory=LagHistogram)
    lag_total: LagHistogram = field(default_factory=LagHistogram)
    figures: dict = field(default_factory=dict)
    _last_report: float = field(default_factory=time.monotonic)
    last_status: str = ""
    pings: int = 0
    _mlock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _mwindow: float = 0.0          # start of the current minute of malformed-input lines
    _mlines: int = 0               # lines logged in it
    _msuppressed: int = 0          # lines not logged in it

    def stream(self, name: str) -> StreamHealth:
        """The counters of stream ``name`` (created on first use)."""
        s = self.streams.get(name)
        if s is None:
            s = self.streams[name] = StreamHealth()
        return s

    # ------------------------------------------------------------ malformed input
    def count_malformed(self, where: str, reason: str) -> int:
        """Count one malformed or implausible input from ``where`` (e.g. a
        stream or connection name) and log it with ``reason``; returns the
        running count.  At most :attr:`MALFORMED_LINES_PER_MINUTE` lines a
        minute are logged; the rest are counted and summarised in one line.
        Safe to call from any thread."""
        now = time.monotonic()
        with self._mlock:
            self.malformed += 1
            n = self.malformed
            summary = self._roll_window(now)
            if self._mlines < self.MALFORMED_LINES_PER_MINUTE:
                self._mlines += 1
                logged = True
            else:
                self._msuppressed += 1
                logged = False
        if summary:
            self._log_suppressed(summary, n)
        if logged:
            log.warning("malformed input from %s skipped (%d so far): %.300s", where, n, reason)
        return n

    def _roll_window(self, now: float) -> int:
        """Start a new minute when the current one is over; returns the lines
        suppressed in the minute that ended (to be summarised).  Lock held."""
        if now - self._mwindow < 60.0:
            return 0
        suppressed = self._msuppressed
        self._mwindow, self._mlines, self._msuppressed = now, 0, 0
        return suppressed

    def _log_suppressed(self, suppressed: int, total: int) -> None:
        log.warning("%d more malformed input(s) in the last minute not logged one by one (%d so far)",
                    suppressed, total)

    def _flush_malformed(self) -> None:
        with self._mlock:
            summary = self._roll_window(time.monotonic()) if self._msuppressed else 0
            total = self.malformed
        if summary:
            self._log_suppressed(summary, total)

    # ------------------------------------------------------------ figures and notifications
    def set_figures(self, figures: dict) -> None:
        """Replace the counters shown in STATUS= and the heartbeat
        (``{name: int | float}``; zero values are left out of STATUS=)."""
        self.figures = dict(figures)

    def notify_status(self, text: str) -> None:
        """Send ``STATUS=text`` (also the heartbeat's status), e.g. what the
        process waits for before READY."""
        self.last_status = text
        self.notifier.notify("STATUS=" + text[:1000])

    def notify(self, message: str) -> None:
        """Send one sd_notify message (``STATUS=...`` is kept for the
        heartbeat too): lets a job use this object as its notifier."""
        if message.startswith("STATUS="):
            self.last_status = message[7:]
        self.notifier.notify(message)

    def on_commit(self, table: Table, rows: list[tuple], commit: datetime) -> None:
        """Sink callback: record lag figures for tables with a time column."""
        idx = table.time_index
        if idx is not None and rows:
            self.lag_window.add_rows(rows, idx, commit)
            self.lag_total.add_rows(rows, idx, commit)

    # ------------------------------------------------------------ judgement
    def last_message_age(self) -> float | None:
        last = max((s.last for s in list(self.streams.values())), default=0.0)
        return None if not last else time.monotonic() - last

    def flowing(self) -> bool:
        """Some stream delivered a message within ``flow_timeout`` (always
        true for a job without streams and sink)."""
        if not self.streams and self.sink is None:
            return True
        age = self.last_message_age()
        return age is not None and age < self.flow_timeout

    def storing(self) -> bool:
        """The sink keeps up: nothing pending, or a commit or spool write
        within ``flow_timeout``, or rows deliberately held in memory
        (back-pressure: neither the database nor the spool takes them) by a
        writer that is alive and retrying.  Killing the process then would
        lose exactly the rows it holds."""
        sink = self.sink
        if sink is None:
            return True
        if sink.fatal:
            return False
        if sink.unsettled == 0 or time.monotonic() - sink.last_progress < self.flow_timeout:
            return True
        return bool(sink.held) and sink.writer_alive()

    def attach(self, sink: Sink) -> None:
        """Judge storage by ``sink``, and keep the watchdog fed while a
        producer is blocked in :meth:`Sink.add` by back-pressure (the event
        loop, and with it :meth:`tick`, is blocked then; the socket's unread
        data waits in the kernel, so the venue is not silent)."""
        self.sink = sink
        sink.on_wait = self.sink_waiting

    def sink_waiting(self) -> None:
        """Called by the sink about once a second while a producer waits:
        WATCHDOG=1 while the sink still stores or holds its rows alive."""
        if self.ready and self.storing():
            self.notifier.notify("WATCHDOG=1")
            self.pings += 1

    def tick(self) -> bool:
        """Send READY once stored, and WATCHDOG=1 if healthy; returns healthy."""
        sink = self.sink
        if not self.ready and (sink is None or sink.stats.commits or sink.stats.spooled_rows):
            self.ready = True
            self.state = "running"
            self.notifier.notify("READY=1")
            log.info("first batch stored; READY" if sink is not None else "READY")
        healthy = self.flowing() and self.storing()
        if healthy and self.ready:
            self.notifier.notify("WATCHDOG=1")
            self.pings += 1
        if sink is not None and sink.spooling:
            self.state = "spooling"
        elif self.ready:
            self.state = "running" if healthy else "degraded"
        self._flush_malformed()
        return healthy

    def status_line(self, group) -> str:
        """One line for STATUS= and the journal; ``group(stream_name)`` maps a
        stream to its kind for per-kind rates and ages."""
        now = time.monotonic()
        dt = max(1e-6, now - self._last_report)
        kinds: dict[str, list] = {}
        for name, s in list(self.streams.items()):
            k = kinds.setdefault(group(name), [0, 0, None])
            k[0] += s.window_count
            k[1] += 1
            age = now - s.last if s.last else None
            if age is not None and (k[2] is None or age > k[2]):
                k[2] = age
            s.window_count = 0
        self._last_report = now
        parts = []
        for kind in sorted(kinds):
            cnt, n, age = kinds[kind]
            parts.append(f"{kind} {cnt / dt:,.0f}/s max-age {age:.1f}s" if age is not None
                         else f"{kind} 0/s (no data)")
        sink = self.sink
        tail = []
        if sink is not None:
            stored = sum(t.stored for t in sink.stats.tables.values())
            tail.append(f"stored {stored:,}")
            reason = sink.status_reason()
            if reason:
                tail.append(reason)
            if sink.pending:
                tail.append(f"pending {sink.pending:,}")
        p50, p99 = self.lag_window.percentile(50), self.lag_window.percentile(99)
        if p50 is not None:
            tail.append(f"lag p50 {p50:.0f}ms p99 {p99:.0f}ms")
        self.lag_window.reset()
        if self.malformed:
            tail.append(f"malformed {self.malformed}")
        for k, v in list(self.figures.items()):
            if v:
                tail.append(f"{k} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k} {v}")
        line = "; ".join(parts + tail)
        self.notify_status(line)
        return line

    def heartbeat(self, dsn: str) -> None:
        """Upsert this unit's row in ``feed_heartbeat`` (best effort: errors are logged)."""
        sink = self.sink
        detail = {
            "streams": len(self.streams),
            "messages": sum(s.count for s in list(self.streams.values())),
            "malformed": self.malformed,
            "last_message_age": self.last_message_age(),
            "lag_ms_hist": self.lag_total.snapshot(),
            **dict(self.figures),
        }
        if sink is not None:
            detail["tables"] = {n: vars(t) for n, t in list(sink.stats.tables.items())}
            detail["spooled_rows"] = sink.stats.spooled_rows
            detail["replayed_rows"] = sink.stats.replayed_rows
            detail["pending"] = sink.pending
        try:
            with connect(dsn, application_name=self.unit[:63], connect_timeout=3,
                            statement_timeout=5.0, lock_timeout=2.0) as conn:
                conn.execute(
                    """INSERT INTO feed_heartbeat (unit, host, pid, started_at, updated_at, state, status, detail)
                       VALUES (%s, %s, %s, %s, now(), %s, %s, %s)
                       ON CONFLICT (unit) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid,
                         started_at = EXCLUDED.started_at, updated_at = now(), state = EXCLUDED.state,
                         status = EXCLUDED.status, detail = EXCLUDED.detail""",
                    (self.unit, socket.gethostname(), os.getpid(), self.started_at, self.state,
                     self.last_status, json.dumps(detail, default=str)))
        except Exception as e:
            log.debug("heartbeat not written: %s", e)
