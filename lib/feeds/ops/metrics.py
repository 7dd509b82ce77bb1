"""Prometheus metrics: the endpoint of a collector, the textfiles of oneshot jobs.

Two ways out, both in the Prometheus text exposition format (version 0.0.4):

* :class:`MetricsEndpoint`, a :class:`feeds.service.Reporter` of the
  long-running collectors (``feed-binance`` on ``metrics.port`` 9810, shard K
  of a sharded ``feed-binance@KofN`` on 9810 + K, ``feed-zerodha`` 9820,
  ``feed-ibkr`` 9830), serves ``GET /metrics`` over HTTP on
  ``metrics.address`` (default 127.0.0.1: scraped from this machine only).
  Every value is read from the process's :class:`feeds.health.Health`, its
  :class:`feeds.sink.Sink` and the collector's figures at scrape time, in the
  HTTP server's own thread: the event loop never waits for a scrape.
* :func:`write_textfile`, for the oneshot jobs (``feed-backfill``,
  ``feed-kite-token``, ``feed-maintain``): one file
  ``<metrics.textfile_dir>/feeds_<job>.prom`` per job, read by
  node_exporter's textfile collector (Debian's prometheus-node-exporter
  reads ``/var/lib/prometheus/node-exporter/*.prom``).

Metrics of a collector (prefix ``feeds_``, label ``unit`` on every one; the
``stream`` label is the collector's stream kind, ``collector.stream_kind(name)``
such as aggTrade / bookTicker / full / ltp / trade, never a symbol)::

    feeds_up{unit}                                   gauge    1 (the process serves)
    feeds_state{unit,state}                          gauge    1 for the current Health.state, 0 for the others
    feeds_ready{unit}                                gauge    1 once READY=1 was sent
    feeds_process_start_time_seconds{unit}           gauge    Unix time the process started
    feeds_streams{unit,stream}                       gauge    streams of the kind
    feeds_messages_total{unit,stream}                counter  messages received
    feeds_last_message_age_seconds{unit,stream}      gauge    oldest "last message" of the kind's streams
                                                              that received any (as STATUS= shows it)
    feeds_malformed_total{unit}                      counter  malformed or implausible inputs skipped
    feeds_rows_stored_total{unit,table}              counter  rows committed
    feeds_rows_duplicate_total{unit,table}           counter  rows skipped: their key was stored already
    feeds_rows_rejected_total{unit,table}            counter  rows that cannot be stored (rejects.jsonl)
    feeds_rows_spooled_total{unit}                   counter  rows written to the disk spool
    feeds_rows_replayed_total{unit}                  counter  rows read back from the spool
    feeds_rows_pending{unit}                         gauge    rows waiting for the writer
    feeds_spool_bytes{unit}                          gauge    bytes of the spool's segment files on disk
    feeds_spooling{unit}                             gauge    1 while the database is unavailable
    feeds_sink_outages_total{unit}                   counter  database outages
    feeds_sink_commits_total{unit}                   counter  transactions committed
    feeds_watchdog_pings_total{unit}                 counter  WATCHDOG=1 sent
    feeds_lag_seconds{unit}                          histogram commit time - venue event time (rows of
                                                              large batches are sampled, see LagHistogram)
    feeds_gaps_total{unit}                           counter  sequence gaps found (Binance aggTrade ids)
    feeds_gap_rows_filled_total{unit,stream}         counter  rows fetched over REST to fill gaps
                                                              (stream aggTrade or kline)
    feeds_reconnects_total{unit}                     counter  reconnections to the venue
    feeds_venue_errors_total{unit}                   counter  errors the venue reported (IB errors)
    feeds_collector_figure{unit,name}                gauge    every numeric figure of the collector
                                                              (Health.figures: STATUS= and the heartbeat)
    feeds_health_score{unit}                         gauge    0-100, feeds.ops.healthscore.score
    feeds_health_score_part{unit,part}               gauge    its parts (running, compliance, errors,
                                                              freshness, performance)

plus the ``process_*`` metrics of prometheus_client (CPU seconds, resident
memory, open files).  The health score is computed in the process from
its lifetime counters: the unit is active and expected to run (it runs),
in session unless it waits for the session, with no restart and a fresh
heartbeat (the process itself answers); ``feedctl check`` scores the same
feed from outside (systemd, heartbeat rows, calendars).

Metrics of a oneshot job (textfile, label ``job``; see :func:`write_textfile`)::

    feeds_job_last_run_timestamp_seconds{job}        Unix time the last run ended
    feeds_job_last_success_timestamp_seconds{job}    Unix time the last successful run ended
    feeds_job_last_run_duration_seconds{job}         seconds the last run took
    feeds_job_last_exit_code{job}                    its exit status (0 = success)
    feeds_job_<figure>{job}                          the job's own figures (e.g. backfill
                                                     sessions_done, bars_stored; Kite
                                                     token_expiry_timestamp_seconds)

:func:`dashboard_queries` lists the PromQL expressions of a Grafana
dashboard (``etc/grafana-feeds.json``), its template variables replaced,
so that they can be run against a Prometheus.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from ..health import LagHistogram
from . import healthscore

if TYPE_CHECKING:
    from ..service import Service

log = logging.getLogger(__name__)

PREFIX = "feeds_"

#: Every state of :attr:`feeds.health.Health.state`, in lifecycle order.
STATES = ("starting", "waiting", "running", "degraded", "spooling", "stopping", "stopped", "failed")

#: Upper bounds (seconds) of the ``feeds_lag_seconds`` histogram buckets (+Inf follows).
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Collector figures exported under a metric of their own (besides ``feeds_collector_figure``):
#: figure name -> (metric name without prefix and ``_total``, extra labels, help).
FIGURE_COUNTERS: dict[str, tuple[str, dict[str, str], str]] = {
    "gaps": ("gaps", {}, "Sequence gaps found (Binance aggTrade ids)."),
    "gap_trades_filled": ("gap_rows_filled", {"stream": "aggTrade"}, "Rows fetched over REST to fill gaps."),
    "klines_filled": ("gap_rows_filled", {"stream": "kline"}, "Rows fetched over REST to fill gaps."),
    "reconnects": ("reconnects", {}, "Reconnections to the venue."),
    "ib errors": ("venue_errors", {}, "Errors the venue reported (IB error messages)."),
}

#: Help of the standard keys of a job textfile.
JOB_KEYS = {
    "last_run_timestamp_seconds": "Unix time the last run of the job ended.",
    "last_success_timestamp_seconds": "Unix time the last successful run of the job ended.",
    "last_run_duration_seconds": "Seconds the last run of the job took.",
    "last_exit_code": "Exit status of the last run of the job (0 = success).",
}

_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_JOB = re.compile(r"[a-zA-Z0-9_]+")


def _number(v: Any) -> float | None:
    """``v`` as a float when it is a number (a bool as 0 or 1), else None (e.g. a text figure)."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


class FeedCollector:
    """A prometheus_client collector of one :class:`feeds.service.Service`
    (or any object with ``unit``, ``health``, ``sink``, ``collector`` and
    ``heartbeat_interval`` attributes): :meth:`collect` builds every metric
    family of the module docstring from the live objects, once per scrape.

    Safe to call from any thread: it copies the dictionaries it walks
    (``list(d.items())``) and the lag histogram's counts, and reads only
    plain attributes of the collector (``stream_kind``)."""

    def __init__(self, service: "Service"):
        self.service = service
        self._kinds: dict[str, str] = {}
        self._kinds_of: object = None

    # ------------------------------------------------------------ helpers
    def _kind(self, collector, name: str) -> str | None:
        if collector is None:
            return None
        if collector is not self._kinds_of:
            self._kinds, self._kinds_of = {}, collector
        k = self._kinds.get(name)
        if k is None:
            try:
                k = str(collector.stream_kind(name))
            except Exception:
                k = "?"
            self._kinds[name] = k
        return k

    @staticmethod
    def spool_bytes(sink) -> int:
        """Bytes of the sink's spool segment files (``spool-*.bin``) on disk."""
        spool = getattr(sink, "spool", None)
        if spool is None:
            return 0
        total = 0
        try:
            paths = list(Path(spool.dir).glob("spool-*.bin"))
        except OSError:
            return 0
        for p in paths:
            try:
                total += p.stat().st_size
            except OSError:
                pass
        return total

    @staticmethod
    def lag(hist: LagHistogram) -> tuple[list[tuple[str, float]], float, int, float | None]:
        """``(buckets, sum_seconds, count, p99_ms)`` of ``hist`` (1 ms bins):
        cumulative buckets at :data:`LAG_BUCKETS` and +Inf; the sum counts
        each value at the middle of its millisecond; ``p99_ms`` as
        :meth:`LagHistogram.percentile` computes it (None when empty)."""
        counts = np.frombuffer(hist.counts, dtype=np.int64).copy()   # the sink's writer thread adds to it
        acc = np.cumsum(counts)
        n = int(acc[-1]) if len(acc) else 0
        buckets = []
        for le in LAG_BUCKETS:
            i = min(int(round(le * 1000)), len(acc))
            buckets.append((floatToGoString(le), float(acc[i - 1] if i > 0 else 0)))
        buckets.append(("+Inf", float(n)))
        total_ms = float(np.dot(np.arange(len(counts), dtype=np.float64), counts)) + 0.5 * n
        p99 = float(np.searchsorted(acc, n * 0.99, side="left")) if n else None
        return buckets, total_ms / 1000.0, n, p99

    # ------------------------------------------------------------ the scrape
    def collect(self) -> Iterator[Metric]:
        svc = self.service
        unit = svc.unit
        h = svc.health
        sink = getattr(svc, "sink", None)
        collector = getattr(svc, "collector", None)
        U = [unit]

        g = GaugeMetricFamily(PREFIX + "up", "1 while the collector process serves metrics.", labels=["unit"])
        g.add_metric(U, 1)
        yield g
        g = GaugeMetricFamily(PREFIX + "state", "1 for the collector's current state, 0 for the others.",
                              labels=["unit", "state"])
        state = h.state
        for s in STATES + ((state,) if state not in STATES else ()):
            g.add_metric([unit, s], 1 if s == state else 0)
        yield g
        g = GaugeMetricFamily(PREFIX + "ready", "1 once the first batch is stored (READY=1 sent).", labels=["unit"])
        g.add_metric(U, 1 if h.ready else 0)
        yield g
        g = GaugeMetricFamily(PREFIX + "process_start_time_seconds", "Unix time the collector process started.",
                              labels=["unit"])
        g.add_metric(U, h.started_at.timestamp())
        yield g

        # streams, in one pass, per kind
        now = time.monotonic()
        kinds: dict[str, list] = {}       # kind -> [streams, messages, max age or None]
        for name, st in list(h.streams.items()):
            count, last = st.count, st.last
            kind = self._kind(collector, name)
            if kind is None:
                continue
            k = kinds.get(kind)
            if k is None:
                k = kinds[kind] = [0, 0, None]
            k[0] += 1
            k[1] += count
            if last:
                age = now - last
                if k[2] is None or age > k[2]:
                    k[2] = age
        streams = GaugeMetricFamily(PREFIX + "streams", "Streams of the kind.", labels=["unit", "stream"])
        msgs = CounterMetricFamily(PREFIX + "messages", "Messages received, per stream kind.",
                                   labels=["unit", "stream"])
        ages = GaugeMetricFamily(PREFIX + "last_message_age_seconds",
                                 "Age of the oldest last message among the kind's streams that received any.",
                                 labels=["unit", "stream"])
        for kind in sorted(kinds):
            n, c, age = kinds[kind]
            streams.add_metric([unit, kind], n)
            msgs.add_metric([unit, kind], c)
            if age is not None:
                ages.add_metric([unit, kind], age)
        yield streams
        yield msgs
        yield ages
        c = CounterMetricFamily(PREFIX + "malformed", "Malformed or implausible inputs skipped.", labels=["unit"])
        c.add_metric(U, h.malformed)
        yield c
        c = CounterMetricFamily(PREFIX + "watchdog_pings", "WATCHDOG=1 notifications sent.", labels=["unit"])
        c.add_metric(U, h.pings)
        yield c

        # the sink
        if sink is not None:
            st = sink.stats
            tables = list(st.tables.items())
            fams = {k: CounterMetricFamily(PREFIX + f"rows_{k}", help_, labels=["unit", "table"])
                    for k, help_ in (("stored", "Rows committed to PostgreSQL."),
                                     ("duplicate", "Rows skipped because their key was stored already."),
                                     ("rejected", "Rows that cannot be stored (kept in rejects.jsonl)."))}
            for name, ts in sorted(tables):
                fams["stored"].add_metric([unit, name], ts.stored)
                fams["duplicate"].add_metric([unit, name], ts.duplicates)
                fams["rejected"].add_metric([unit, name], ts.rejected)
            yield from fams.values()
            pending = int(sink.pending)
            spooling = bool(sink.spooling)
            for name, kind, help_, v in (
                    ("rows_spooled", "c", "Rows written to the disk spool.", st.spooled_rows),
                    ("rows_replayed", "c", "Rows read back from the spool and stored.", st.replayed_rows),
                    ("sink_outages", "c", "Database outages (the sink spooled).", st.outages),
                    ("sink_commits", "c", "Transactions committed.", st.commits),
                    ("rows_pending", "g", "Rows waiting for the writer.", pending),
                    ("spool_bytes", "g", "Bytes of the spool's segment files on disk.", self.spool_bytes(sink)),
                    ("spooling", "g", "1 while the database is unavailable and rows go to the spool.",
                     1 if spooling else 0)):
                m = (CounterMetricFamily if kind == "c" else GaugeMetricFamily)(PREFIX + name, help_,
                                                                                 labels=["unit"])
                m.add_metric(U, v)
                yield m

        # lag
        buckets, lag_sum, lag_n, p99 = self.lag(h.lag_total)
        hist = HistogramMetricFamily(PREFIX + "lag_seconds", "Commit time minus venue event time of stored rows "
                                     "(rows of large batches sampled).", labels=["unit"])
        hist.add_metric(U, buckets, lag_sum)
        yield hist

        # collector figures
        figures = [(k, _number(v)) for k, v in list(h.figures.items())]
        figures = [(k, v) for k, v in figures if v is not None]
        own: dict[str, CounterMetricFamily] = {}
        for name, v in figures:
            spec = FIGURE_COUNTERS.get(name)
            if spec is None:
                continue
            metric, labels, help_ = spec
            fam = own.get(metric)
            if fam is None:
                fam = own[metric] = CounterMetricFamily(PREFIX + metric, help_, labels=["unit", *labels])
            fam.add_metric([unit, *labels.values()], v)
        yield from own.values()
        g = GaugeMetricFamily(PREFIX + "collector_figure", "The collector's figures (STATUS= and the heartbeat).",
                              labels=["unit", "name"])
        for name, v in sorted(figures):
            g.add_metric([unit, name], v)
        yield g

        # health score
        sc, _ = healthscore.process_score(h, sink, heartbeat_interval_s=float(
            getattr(svc, "heartbeat_interval", 10.0) or 10.0))
        g = GaugeMetricFamily(PREFIX + "health_score", "Health score 0-100 (feeds.ops.healthscore), from the "
                              "process's lifetime counters.", labels=["unit"])
        g.add_metric(U, sc.total)
        yield g
        g = GaugeMetricFamily(PREFIX + "health_score_part", "Points of each part of the health score.",
                              labels=["unit", "part"])
        for part, pts in sc.parts.items():
            g.add_metric([unit, part], pts)
        yield g


class MetricsEndpoint:
    """The Prometheus endpoint of one collector process (a
    :class:`feeds.service.Reporter`).

    ``MetricsEndpoint(unit, address, port)``: ``unit`` the systemd unit
    (label ``unit``), ``address`` the address to listen on (IPv4 or IPv6;
    ``127.0.0.1`` keeps it on this machine), ``port`` the TCP port.
    :meth:`start` serves ``/metrics`` (any path answers) from a daemon
    thread, :meth:`stop` shuts it down.  A port already in use (or an
    address that cannot be bound) is logged as one error line naming it,
    and collecting goes on without the endpoint."""

    def __init__(self, unit: str, address: str, port: int):
        self.unit, self.address, self.port = unit, address, int(port)
        self.registry = CollectorRegistry(auto_describe=False)
        self.server = None
        self._thread: threading.Thread | None = None
        self.collector: FeedCollector | None = None

    def start(self, service: "Service") -> None:
        """Register the collector of ``service`` and listen.  Never raises
        for a port in use or an address that cannot be bound."""
        from prometheus_client import start_http_server
        self.collector = FeedCollector(service)
        self.registry.register(self.collector)
        try:
            self.registry.register(ProcessCollector(registry=None))
        except Exception:                                  # pragma: no cover - not on Linux
            pass
        try:
            self.server, self._thread = start_http_server(self.port, self.address, self.registry)
        except OSError as e:
            log.error("metrics endpoint not started: cannot listen on %s port %d (%s)", self.address, self.port,
                      e.strerror or e)
            return
        log.info("metrics endpoint on http://%s:%d/metrics", self._host(), self.bound_port)

    def _host(self) -> str:
        return f"[{self.address}]" if ":" in self.address else self.address

    @property
    def bound_port(self) -> int | None:
        """The port actually listened on (the configured one; the kernel's
        choice for port 0), None when not listening."""
        if self.server is None:
            return None
        return self.server.server_address[1]

    def update(self) -> None:
        """Nothing: every value is read at scrape time."""

    def stop(self, rc: int) -> None:
        """Stop listening (the last scrape in progress ends first)."""
        srv, self.server = self.server, None
        if srv is None:
            return
        try:
            srv.shutdown()
            srv.server_close()
        except Exception as e:
            log.warning("metrics endpoint did not stop cleanly: %s", e)


# ---------------------------------------------------------------------- textfiles
def job_values(started: float, rc: int, *, finished: float | None = None,
               **figures: float | int | None) -> dict[str, float]:
    """The values of a job textfile for one run: ``started`` and ``finished``
    (default now) are Unix times, ``rc`` the exit status; the standard keys
    (``last_run_timestamp_seconds``, ``last_run_duration_seconds``,
    ``last_exit_code`` and, when ``rc == 0``, ``last_success_timestamp_seconds``)
    plus ``figures`` whose value is a number (None is left out)."""
    end = time.time() if finished is None else finished
    out: dict[str, float] = {"last_run_timestamp_seconds": end,
                             "last_run_duration_seconds": max(0.0, end - started),
                             "last_exit_code": float(rc)}
    if rc == 0:
        out["last_success_timestamp_seconds"] = end
    for k, v in figures.items():
        n = _number(v)
        if n is not None:
            out[k] = n
    return out


def _previous(path: Path, job: str, key: str) -> float | None:
    """The value of ``feeds_job_<key>{job="<job>"}`` in the textfile at
    ``path``, None when absent or unreadable."""
    from prometheus_client.parser import text_string_to_metric_families
    try:
        text = path.read_text(encoding="utf-8")
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == f"{PREFIX}job_{key}" and s.labels.get("job") == job:
                    return float(s.value)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return None


def render_textfile(job: str, values: Mapping[str, float]) -> str:
    """The text of a job textfile: one gauge ``feeds_job_<key>{job="<job>"}``
    per item of ``values`` (sorted by key).  Raises ValueError for a key
    that is not a metric name part or a value that is not a number."""
    lines = []
    for key in sorted(values):
        if not _NAME.fullmatch(key):
            raise ValueError(f"textfile key {key!r} is not a metric name part")
        v = _number(values[key])
        if v is None:
            raise ValueError(f"textfile value of {key!r} is not a number: {values[key]!r}")
        name = f"{PREFIX}job_{key}"
        help_ = JOB_KEYS.get(key, f"{key.replace('_', ' ')} of the last run of the job.")
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge",
                  f'{name}{{job="{job}"}} {floatToGoString(v)}']
    return "\n".join(lines) + "\n"


def write_textfile(directory: str | os.PathLike | None, job: str, values: Mapping[str, float]) -> Path | None:
    """Write the node_exporter textfile of oneshot ``job`` into ``directory``.

    The file is ``<directory>/feeds_<job>.prom`` with one gauge
    ``feeds_job_<key>{job="<job>"}`` per item of ``values`` (see
    :func:`job_values` for the standard keys), written atomically (a
    temporary ``.feeds_<job>.prom.*.tmp`` in the same directory, which the
    textfile collector ignores, fsync, rename) with mode 0644 (node_exporter
    runs as another user).  When ``values`` has no
    ``last_success_timestamp_seconds`` (the run failed), the one of the
    previous file is kept, so the time of the last success survives failed
    runs.

    Returns the path written; None when ``directory`` is empty (no
    textfiles configured) or the file could not be written (an OSError is
    logged as one error line, never raised: the job's own outcome matters
    more).  Raises ValueError for a ``job`` that is not ``[a-zA-Z0-9_]+``, or
    a key or value :func:`render_textfile` refuses."""
    if not directory:
        return None
    if not _JOB.fullmatch(job):
        raise ValueError(f"job name {job!r} is not [a-zA-Z0-9_]+")
    path = Path(directory) / f"feeds_{job}.prom"
    vals = dict(values)
    if "last_success_timestamp_seconds" not in vals:
        prev = _previous(path, job, "last_success_timestamp_seconds")
        if prev is not None:
            vals["last_success_timestamp_seconds"] = prev
    text = render_textfile(job, vals)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        try:
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    except OSError as e:
        log.error("metrics textfile %s not written: %s", path, e.strerror or e)
        return None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


# ---------------------------------------------------------------------- dashboards
_VAR = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")

#: Grafana's built-in interval variables and the durations :func:`dashboard_queries` puts in their place.
BUILTIN_DURATIONS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "__range_s": "3600",
                     "__interval_ms": "15000", "__range_ms": "3600000"}


def substitute(expr: str, matcher: str = ".+") -> str:
    """``expr`` with Grafana variables (``$unit``, ``${unit}``,
    ``${unit:regex}``, ``[[unit]]``) replaced by ``matcher`` (for ``=~``
    label matchers) and the built-in interval variables by
    :data:`BUILTIN_DURATIONS`."""
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return BUILTIN_DURATIONS.get(name, matcher)
    return _VAR.sub(repl, expr)


def _walk(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def dashboard_queries(path: str | os.PathLike, matcher: str = ".+") -> list[str]:
    """Every PromQL expression (``targets[].expr``) of the panels of the
    Grafana dashboard JSON at ``path`` (rows' nested panels too), in file
    order, with template variables replaced by ``matcher`` (see
    :func:`substitute`).  Template variable queries
    (``label_values(...)``) are not PromQL and are left out.  Raises
    OSError and ValueError (not JSON)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    for node in _walk(doc.get("panels", [])):
        for t in node.get("targets") or []:
            if isinstance(t, dict) and isinstance(t.get("expr"), str) and t["expr"].strip():
                out.append(substitute(t["expr"], matcher))
    return out


def metric_names(expr: str) -> set[str]:
    """The ``feeds_*`` metric names an expression refers to (series names,
    e.g. ``feeds_lag_seconds_bucket``)."""
    return set(re.findall(r"(?<![\w:])(feeds_[a-zA-Z0-9_:]*)", expr))


def family_of(series: str) -> str:
    """The family name of a series name: ``_total`` of counters and
    ``_bucket``/``_sum``/``_count`` of histograms removed."""
    for suffix in ("_total", "_bucket", "_sum", "_count"):
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


__all__ = ["MetricsEndpoint", "FeedCollector", "write_textfile", "job_values", "render_textfile",
           "dashboard_queries", "substitute", "metric_names", "family_of", "STATES", "LAG_BUCKETS"]
