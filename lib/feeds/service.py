"""The collector runtime: one process, one collector, from start to clean stop.

Every collector program (``feed-binance``, ``feed-zerodha``,
``feed-backfill``) is a small ``main`` that validates its options and then
hands a collector to :class:`Service`, which owns everything around it:

* logging for the journal and the configuration (:func:`start`),
* the sink (:class:`feeds.sink.Sink`, with the ``[sink]`` settings of the
  file: :func:`sink_settings`), for programs that store through one,
* :class:`feeds.health.Health`, SIGTERM/SIGINT (a clean stop),
* the supervise loop: :meth:`Health.tick` (READY once the first batch is
  stored, WATCHDOG=1 while data flows and is stored) every watchdog
  interval; every status interval the collector's ``figures()``, the
  status line (STATUS= and a ``status:`` journal line) and the collector's
  ``periodic()``; every heartbeat interval the ``feed_heartbeat`` row,
* the reporters (:func:`reporters`): the Prometheus metrics endpoint
  (:mod:`feeds.ops.metrics`) and the MQTT heartbeat (:mod:`feeds.ops.mqtt`),
  started with the service, told every status interval, stopped last,
* the clean stop: ``STOPPING=1``, the sink closed (every row committed or
  spooled), the final heartbeat row and the stop line
  (``stopped: all rows committed or spooled (12,345 committed, 0 spooled,
  0 rejected, 0 lost; 35 pending at stop)``, from ``Sink.outcome()``); the
  exit status is the collector's, and non-zero whenever rows were lost.

A collector is any object with::

    async def run(self, stop: asyncio.Event) -> int | None
        # collect until ``stop`` is set; returns an exit status (None = 0)
    def stream_kind(self, stream: str) -> str      # groups streams in STATUS=
    def figures(self) -> dict[str, int | float]    # counters for STATUS= and the heartbeat
    def periodic(self) -> None                     # called every status interval

and, for a job without streams (feed-backfill), optionally
``status_line() -> str``, which replaces the per-stream rates.

sd_notify goes through one place: :func:`feeds.runtime.notify` (and the
:class:`Health` of the service, whose notifier is the same).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timezone
from typing import Any, Protocol

from .config import Config, ConfigError
from .health import Health
from .runtime import (install_stop_signals, notify, sd_notifier, setup_logging, state_dir, tune_gc,
                      watchdog_interval)
from .settings import Schema, load
from .sink import Sink, Table

log = logging.getLogger("feeds")

#: Sink constructor arguments taken from ``[sink]``.
SINK_KEYS = ("flush_interval", "batch_rows", "max_pending", "statement_timeout", "lock_timeout",
             "spool_max_bytes")


class Reporter(Protocol):
    """Publishes the service's health elsewhere (metrics, MQTT).

    ``start(service)`` is called once, before the collector is prepared
    (read :attr:`Service.health`, :attr:`Service.sink` and, once set,
    :attr:`Service.collector`); ``update()`` every status interval on the
    event loop (it must not block); ``stop(rc)`` once at the end, after the
    final heartbeat, with the exit status.  None of them may raise for a
    reason outside the process (a port taken, a broker down): they log it,
    and collecting goes on."""

    def start(self, service: "Service") -> None: ...

    def update(self) -> None: ...

    def stop(self, rc: int) -> None: ...


def reporters(cfg: Config, unit: str, *, port_offset: int = 0, serve_metrics: bool = True) -> list[Reporter]:
    """The reporters the ``metrics.*`` and ``mqtt.*`` settings of ``cfg`` ask
    for, for the program running as ``unit``: the metrics endpoint on
    ``metrics.port + port_offset`` (when that port is not 0 and
    ``serve_metrics``; a oneshot job writes a textfile instead, see
    :func:`feeds.ops.metrics.write_textfile`) and the MQTT heartbeat (when
    ``mqtt.host`` is set).  Raises ConfigError (e.g. a secret file of the
    broker readable by others) before anything starts."""
    out: list[Reporter] = []
    if serve_metrics and cfg["metrics.port"]:
        from .ops.metrics import MetricsEndpoint
        out.append(MetricsEndpoint(unit, cfg["metrics.address"], cfg["metrics.port"] + port_offset))
    if cfg["mqtt.host"]:
        from .ops.mqtt import MqttHeartbeat
        out.append(MqttHeartbeat.from_config(cfg, unit))
    return out


class Collector(Protocol):
    """What :class:`Service` runs (see the module docstring)."""

    async def run(self, stop: asyncio.Event) -> int | None: ...

    def stream_kind(self, stream: str) -> str: ...

    def figures(self) -> dict[str, int | float]: ...

    def periodic(self) -> None: ...


def start(config_path: str, schema: Schema) -> Config:
    """Logging for the journal, then the configuration file at
    ``config_path`` read as a ``schema`` file.  Raises ConfigError."""
    setup_logging()
    return load(config_path, schema)


def sink_settings(cfg: Config) -> dict[str, Any]:
    """The ``[sink]`` settings of a loaded configuration: ``spool_dir``,
    ``flow_timeout`` and the :class:`Sink` keyword arguments
    (:data:`SINK_KEYS`)."""
    return {k.split(".", 1)[1]: v for k, v in cfg.values.items() if k.startswith("sink.")}


def exit_notified(line: str, rc: int) -> None:
    """End a ``Type=notify`` program that has nothing to do: READY, the
    reason as STATUS=, STOPPING, then exit with ``rc``."""
    notify("READY=1", "STATUS=" + line[:1000], "STOPPING=1")
    sys.exit(rc)


def run_time(at: str | None, zone) -> datetime:
    """The time a market-hours run is planned for: ``--at`` (ISO 8601; a
    naive value is read in the exchange's ``zone``) or now.  Raises
    ConfigError naming ``--at`` for text that is not a date-time."""
    if at is None:
        return datetime.now(timezone.utc)
    try:
        now = datetime.fromisoformat(at)
    except ValueError:
        raise ConfigError("--at", "command line", f"not an ISO date-time: {at!r}") from None
    return now if now.tzinfo is not None else now.replace(tzinfo=zone)


def plan_or_exit(plan, at: str | None, zone, zone_name: str) -> None:
    """Act on a :class:`feeds.calendars.RunPlan` before any connection: with
    ``--at`` print what the run would do (times in ``zone``, called
    ``zone_name``) and exit 0; with no session to collect, say why (journal
    and STATUS=) and exit 0; else return."""
    if at is not None:
        if plan.action == "collect" and plan.stop:
            print(f"{plan.reason}: connect at {plan.start.astimezone(zone):%Y-%m-%d %H:%M} {zone_name}, "
                  f"stop at {plan.stop.astimezone(zone):%Y-%m-%d %H:%M} {zone_name}", flush=True)
        else:
            print(plan.reason if plan.action == "collect" else f"{plan.reason}: nothing to collect", flush=True)
        sys.exit(0)
    if plan.action != "collect":
        line = f"{plan.reason}: nothing to collect, exiting"
        log.info("%s", line)
        exit_notified(line, 0)


class Service:
    """Runs one collector in this process.

    Args:
        unit: the systemd unit name (heartbeat key, e.g. ``feed-zerodha.service``).
        dsn: libpq connection string (sink and heartbeat); empty: no heartbeat.
        tables: the :class:`Table` definitions of the sink; empty: no sink.
        sink: the ``[sink]`` settings (:func:`sink_settings`); needed with ``tables``.
        status_interval: seconds between status lines.
        heartbeat_interval: seconds between heartbeat rows.
        notifier: sd_notify sender (default: :func:`feeds.runtime.sd_notifier`).
        close_timeout: seconds the sink may take to flush at stop.
        reporters: :class:`Reporter` objects (:func:`reporters`).

    :meth:`run` returns the exit status.
    """

    def __init__(self, unit: str, dsn: str, *, tables: Iterable[Table] = (), sink: dict | None = None,
                 status_interval: float = 10.0, heartbeat_interval: float = 10.0,
                 notifier=None, close_timeout: float = 60.0, reporters: Iterable[Reporter] = ()):
        self.unit, self.dsn = unit, dsn
        self.reporters = list(reporters)
        self.tables = tuple(tables)
        self.sink_settings = dict(sink or {})
        self.status_interval = status_interval
        self.heartbeat_interval = heartbeat_interval
        self.watchdog_interval = watchdog_interval(2.0)
        self.close_timeout = close_timeout
        self.notifier = notifier or sd_notifier()
        self.health = Health(unit=unit, flow_timeout=self.sink_settings.get("flow_timeout", 20.0),
                             notifier=self.notifier)
        self.sink: Sink | None = None
        self.stop: asyncio.Event | None = None
        self.failure: str | None = None
        self.collector: Collector | None = None
        self._hb: asyncio.Future | None = None

    # ------------------------------------------------------------ set-up
    def _make_sink(self) -> Sink:
        s = self.sink_settings
        kwargs = {k: s[k] for k in SINK_KEYS if k in s}
        spool = state_dir(s.get("spool_dir", "/var/lib/feeds"))
        return Sink(self.dsn, spool, self.tables, on_commit=self.health.on_commit, **kwargs).start()

    def run(self, prepare: Callable[["Service"], Collector | None | Awaitable[Collector | None]]) -> int:
        """Run in a new event loop: :meth:`serve`.  Returns the exit status."""
        return asyncio.run(self.serve(prepare))

    async def serve(self, prepare) -> int:
        """Create the sink, call ``prepare(service)`` (returns the collector,
        or None when there is nothing to collect; may be a coroutine, e.g. to
        :meth:`wait_until` the session), run it, stop cleanly.  Returns the
        exit status: the collector's; 1 when it raised or the sink's writer
        died; non-zero whenever rows were lost."""
        self.stop = asyncio.Event()
        install_stop_signals(asyncio.get_running_loop(), self.stop)
        rc = 0
        try:
            if self.tables:
                self.sink = self._make_sink()
                self.health.attach(self.sink)
            self._each_reporter("start", self)
            collector = prepare(self)
            if inspect.isawaitable(collector):
                collector = await collector
            if collector is not None and not self.stop.is_set():
                if self.sink is not None:
                    tune_gc()           # a few short-lived containers per message: collect less often
                rc = await self.collect(collector)
        except Exception as e:
            log.critical("collector failed: %s", e, exc_info=True)
            rc = 1
        return await self._finish(rc)

    # ------------------------------------------------------------ running
    async def collect(self, collector: Collector) -> int:
        """Run ``collector`` until :attr:`stop` is set, under the supervise
        loop (with this service's :attr:`health`, :attr:`sink` and
        :attr:`stop`); returns its exit status (1 when the sink's writer
        died).  :meth:`serve` calls it; a test may call it with a sink and
        stop event of its own."""
        self.collector = collector
        task = asyncio.ensure_future(collector.run(self.stop))
        sup = asyncio.ensure_future(self._supervise(collector, task))
        try:
            rc = await task
        finally:
            if sup is not None:
                sup.cancel()
                await asyncio.gather(sup, return_exceptions=True)
        rc = int(rc or 0)
        if self.failure is not None and rc == 0:
            rc = 1
        return rc

    async def _supervise(self, collector: Collector, task: asyncio.Future) -> None:
        try:
            await self._supervise_loop(collector, task)
        except Exception as e:              # without it nothing would feed or stop the watchdog
            self.failure = f"supervise loop failed: {e!r}"
            log.critical("%s", self.failure, exc_info=True)
            self.stop.set()

    async def _supervise_loop(self, collector: Collector, task: asyncio.Future) -> None:
        h, sink = self.health, self.sink
        now = time.monotonic()
        next_status = now + min(2.0, self.status_interval)
        next_hb = now + min(1.0, self.heartbeat_interval)
        while not task.done():
            h.tick()
            now = time.monotonic()
            if now >= next_status:
                next_status = now + self.status_interval
                self.report(collector)
                self._each_reporter("update")
            if self.dsn and now >= next_hb and (self._hb is None or self._hb.done()):
                next_hb = now + self.heartbeat_interval
                self._figures(collector)
                self._hb = asyncio.ensure_future(asyncio.to_thread(h.heartbeat, self.dsn))
            if sink is not None and sink.fatal and self.failure is None:
                self.failure = f"sink writer failed: {sink.fatal!r}"
                log.error("%s", self.failure)
                self.stop.set()
            await asyncio.wait([task], timeout=self.watchdog_interval)

    def _figures(self, collector: Collector) -> None:
        try:
            self.health.set_figures(collector.figures())
        except Exception:
            log.exception("collector figures failed")

    def report(self, collector: Collector) -> str:
        """One status step: figures, the status line (STATUS= and the
        journal), then ``collector.periodic()``.  Returns the line."""
        h = self.health
        self._figures(collector)
        own = getattr(collector, "status_line", None)
        if own is not None:
            line = own()
            h.notify_status(line)
        else:
            line = h.status_line(collector.stream_kind)
        log.info("status: %s", line)
        try:
            collector.periodic()
        except Exception:
            log.exception("collector periodic work failed")
        return line

    async def wait_until(self, when: datetime, line: str) -> bool:
        """Before the work starts (e.g. a session's open): READY at once
        (the unit is up), ``line`` as STATUS= and in the journal, WATCHDOG
        pings (nothing can flow yet) and heartbeat rows until ``when``
        (aware).  Returns False when stopped while waiting."""
        h = self.health
        log.info("%s", line)
        h.ready, h.state = True, "waiting"
        self.notifier.notify("READY=1")
        h.notify_status(line)
        next_hb = time.monotonic()
        while not self.stop.is_set():
            left = (when - datetime.now(timezone.utc)).total_seconds()
            if left <= 0:
                return True
            self.notifier.notify("WATCHDOG=1")
            if self.dsn and time.monotonic() >= next_hb and (self._hb is None or self._hb.done()):
                next_hb = time.monotonic() + self.heartbeat_interval
                self._hb = asyncio.ensure_future(asyncio.to_thread(h.heartbeat, self.dsn))
            try:
                await asyncio.wait_for(self.stop.wait(), min(self.watchdog_interval, left))
            except asyncio.TimeoutError:
                pass
        return False

    # ------------------------------------------------------------ clean stop
    async def _finish(self, rc: int) -> int:
        h, sink = self.health, self.sink
        self.notifier.notify("STOPPING=1")
        h.state = "stopping"
        if self._hb is not None:
            await asyncio.gather(self._hb, return_exceptions=True)
        if sink is not None:
            pending = sink.pending
            ok = await asyncio.to_thread(sink.close, self.close_timeout)
            outcome = sink.outcome()
            whole = ok and not outcome.lost
            line = (f"stopped: {'all rows committed or spooled' if whole else 'ROWS LOST'} "
                    f"({outcome.line()}; {pending:,} pending at stop)")
            if not whole:
                rc = rc or 1
            h.last_status = line
            (log.info if whole else log.error)("%s", line)
        h.state = "stopped" if rc == 0 else "failed"
        if self.collector is not None:
            self._figures(self.collector)
        if self.dsn:
            await asyncio.to_thread(h.heartbeat, self.dsn)
        await asyncio.to_thread(self._each_reporter, "stop", rc)
        return rc

    def _each_reporter(self, what: str, *args) -> None:
        for r in self.reporters:
            try:
                getattr(r, what)(*args)
            except Exception:
                log.exception("%s %s failed", type(r).__name__, what)
