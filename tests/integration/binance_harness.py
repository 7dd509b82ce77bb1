"""Run the real collector (python-binance inside) against the simulator, in a thread."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg

from feeds import service
from feeds.binance import adapter as A
from feeds.binance.collector import BinanceCollector, Settings
from feeds.health import Health
from feeds.sink import Sink


class NullNotifier:
    def __init__(self):
        self.sent: list[str] = []

    def notify(self, msg: str) -> None:
        self.sent.append(msg)


class CollectorThread:
    """``with CollectorThread(dsn, spool, settings) as c:`` runs the collector
    under the runtime's supervise loop (:meth:`feeds.service.Service.collect`);
    leaving the block stops it like SIGTERM does and closes the sink."""

    def __init__(self, dsn: str, spool: Path, settings: Settings, **sink_opts):
        self.dsn, self.spool, self.settings = dsn, spool, settings
        self.sink_opts = {"flush_interval": 0.1, "retry_interval": 1.0, **sink_opts}
        self.notifier = NullNotifier()
        self.health = Health(unit="feed-binance-test.service", notifier=self.notifier)
        self.sink: Sink | None = None
        self.collector: BinanceCollector | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()

    def __enter__(self) -> "CollectorThread":
        self.sink = Sink(self.dsn, self.spool, A.TABLES, on_commit=self.health.on_commit, **self.sink_opts).start()
        self.health.attach(self.sink)
        self.collector = BinanceCollector(self.settings, self.sink, self.health, dsn=self.dsn)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._started.wait(10)
        return self

    def _run(self) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            s = self.settings
            svc = service.Service(self.health.unit, self.dsn, status_interval=s.status_interval,
                                  heartbeat_interval=s.heartbeat_interval, notifier=self.notifier)
            # this thread's sink, health and stop event (no signals: not the main thread)
            svc.health, svc.sink, svc.stop = self.health, self.sink, self._stop
            svc.watchdog_interval = s.watchdog_interval
            self._started.set()
            rc = await svc.collect(self.collector)
            if rc:
                raise RuntimeError(svc.failure or f"collector exited with status {rc}")
        try:
            asyncio.run(main())
        except BaseException as e:      # reported by __exit__
            self.error = e
            self._started.set()

    def stop(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass
        self._thread.join(60)
        assert not self._thread.is_alive(), "collector did not stop"
        assert self.sink.close(60), "sink did not flush everything"

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.error is not None and exc[0] is None:
            raise self.error


def settings_for(sim, **kw) -> Settings:
    s = Settings(rest_url=sim.http_url, ws_url=sim.ws_url, connect_stagger=0.0, status_interval=1.0,
                 watchdog_interval=0.5, heartbeat_interval=2.0)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def wait_until(pred, timeout: float, interval: float = 0.2, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def q(dsn: str, sql: str, params=()):
    with psycopg.connect(dsn) as c:
        return c.execute(sql, params).fetchall()


def recording_frames(path: Path) -> list[dict]:
    """The ``data`` objects of a recording, in order, with their stream name."""
    out = []
    for line in path.read_text().splitlines():
        ts, sep, body = line.partition(": ")
        if sep and body.startswith('{"stream"'):
            m = json.loads(body)
            out.append((m["stream"], m["data"]))
    return out


def stream_counts(frames) -> Counter:
    c = Counter()
    for stream, d in frames:
        kind = stream.split("@", 1)[1]
        if kind.startswith("kline"):
            if d["k"]["x"]:
                c["kline_closed"] += 1
        elif kind in ("aggTrade", "bookTicker"):
            c[kind] += 1
    return c
