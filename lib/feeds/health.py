"""Per-stream health, sd_notify (READY / STATUS / WATCHDOG) and heartbeats.

The watchdog ping means "data is flowing and being stored": :meth:`Health.tick`
sends ``WATCHDOG=1`` only while (a) some stream delivered a message within
``flow_timeout`` seconds and (b) the sink committed or spooled within
``flow_timeout`` seconds, or has nothing pending.  A silent socket or a stuck
writer therefore stops the pings and systemd restarts the unit
(``WatchdogSec=``).  ``READY=1`` is sent once the first batch is stored
(committed, or spooled to disk when PostgreSQL is down at start).

Protocol: sd_notify(3), through the ``sdnotify`` package (a no-op when
``NOTIFY_SOCKET`` is unset, e.g. when run by hand).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from array import array
from dataclasses import dataclass, field
from datetime import datetime, timezone

import sdnotify

from .sink import Sink, Table

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StreamHealth:
    """Counters for one stream (e.g. ``btcusdt@aggTrade``)."""
    count: int = 0
    last: float = 0.0          # time.monotonic() of the last message, 0 = never
    window_count: int = 0      # messages since the last status report


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

    def percentile(self, p: float) -> float | None:
        if not self.n:
            return None
        target, acc = self.n * p / 100.0, 0
        for ms, c in enumerate(self.counts):
            acc += c
            if acc >= target:
                return float(ms)
        return float(self.LIMIT_MS)

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
    pending) after which watchdog pings stop.
    """

    unit: str
    sink: Sink | None = None
    flow_timeout: float = 20.0
    notifier: sdnotify.SystemdNotifier = field(default_factory=sdnotify.SystemdNotifier)
    streams: dict[str, StreamHealth] = field(default_factory=dict)
    malformed: int = 0
    ready: bool = False
    state: str = "starting"
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    lag_window: LagHistogram = field(default_factory=LagHistogram)
    lag_total: LagHistogram = field(default_factory=LagHistogram)
    extra: dict = field(default_factory=dict)
    _last_report: float = field(default_factory=time.monotonic)
    last_status: str = ""
    pings: int = 0

    def stream(self, name: str) -> StreamHealth:
        s = self.streams.get(name)
        if s is None:
            s = self.streams[name] = StreamHealth()
        return s

    def on_commit(self, table: Table, rows: list[tuple], commit: datetime) -> None:
        """Sink callback: record lag figures for tables with a time column."""
        idx = table.time_index
        if idx is not None and rows:
            self.lag_window.add_rows(rows, idx, commit)
            self.lag_total.add_rows(rows, idx, commit)

    def last_message_age(self) -> float | None:
        last = max((s.last for s in self.streams.values()), default=0.0)
        return None if not last else time.monotonic() - last

    def flowing(self) -> bool:
        age = self.last_message_age()
        return age is not None and age < self.flow_timeout

    def storing(self) -> bool:
        if self.sink is None:
            return True
        if self.sink.fatal:
            return False
        return self.sink.pending == 0 or time.monotonic() - self.sink.last_progress < self.flow_timeout

    def tick(self) -> bool:
        """Send READY once stored, and WATCHDOG=1 if healthy; returns healthy."""
        sink = self.sink
        if not self.ready and sink is not None and (sink.stats.commits or sink.stats.spooled_rows):
            self.ready = True
            self.state = "running"
            self.notifier.notify("READY=1")
            log.info("first batch stored; READY")
        healthy = self.flowing() and self.storing()
        if healthy and self.ready:
            self.notifier.notify("WATCHDOG=1")
            self.pings += 1
        if sink is not None and sink.spooling:
            self.state = "spooling"
        elif self.ready:
            self.state = "running" if healthy else "degraded"
        return healthy

    def status_line(self, group) -> str:
        """One line for STATUS= and the journal; ``group(stream_name)`` maps a
        stream to its kind for per-kind rates and ages."""
        now = time.monotonic()
        dt = max(1e-6, now - self._last_report)
        kinds: dict[str, list] = {}
        for name, s in self.streams.items():
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
            if sink.spooling:
                tail.append(f"SPOOLING ({sink.last_error})")
            if sink.pending:
                tail.append(f"pending {sink.pending:,}")
        p50, p99 = self.lag_window.percentile(50), self.lag_window.percentile(99)
        if p50 is not None:
            tail.append(f"lag p50 {p50:.0f}ms p99 {p99:.0f}ms")
        self.lag_window.reset()
        if self.malformed:
            tail.append(f"malformed {self.malformed}")
        for k, v in self.extra.items():
            if v:
                tail.append(f"{k} {v}")
        line = "; ".join(parts + tail)
        self.last_status = line
        self.notifier.notify("STATUS=" + line[:1000])
        return line

    def heartbeat(self, dsn: str) -> None:
        """Upsert this unit's row in ``feed_heartbeat`` (best effort: errors are logged)."""
        import psycopg
        sink = self.sink
        detail = {
            "streams": len(self.streams),
            "messages": sum(s.count for s in self.streams.values()),
            "malformed": self.malformed,
            "last_message_age": self.last_message_age(),
            "lag_ms_hist": self.lag_total.snapshot(),
            **{k: v for k, v in self.extra.items()},
        }
        if sink is not None:
            detail["tables"] = {n: vars(t) for n, t in sink.stats.tables.items()}
            detail["spooled_rows"] = sink.stats.spooled_rows
            detail["replayed_rows"] = sink.stats.replayed_rows
            detail["pending"] = sink.pending
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
                conn.execute(
                    """INSERT INTO feed_heartbeat (unit, host, pid, started_at, updated_at, state, status, detail)
                       VALUES (%s, %s, %s, %s, now(), %s, %s, %s)
                       ON CONFLICT (unit) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid,
                         started_at = EXCLUDED.started_at, updated_at = now(), state = EXCLUDED.state,
                         status = EXCLUDED.status, detail = EXCLUDED.detail""",
                    (self.unit, socket.gethostname(), os.getpid(), self.started_at, self.state,
                     self.last_status, json.dumps(detail)))
        except Exception as e:
            log.debug("heartbeat not written: %s", e)
