"""``feed-indicators``: technical indicators on the closed candles of every venue, as each closes.

Reads the candle tables of the venues in ``indicators.venues`` (:data:`SOURCES`:
``binance_kline``, ``kite_candle``, ``ibkr_candle`` and, once its migration
exists, ``dhan_candle``; a table that does not exist is skipped with one
journal line), computes the indicators of ``indicators.functions`` with the
engine of :mod:`feeds.indicators` (TA-Lib stream handles, O(1) per bar) and
writes ``indicator_value`` rows (sql/0010_indicators.sql) through the shared
sink, so a database outage spools them to disk and nothing is dropped.

Finding new candles.  Every candle table carries ``stored_at``
(``clock_timestamp()`` at insert, indexed) and a statement-level AFTER INSERT
trigger that sends one ``NOTIFY feeds_candle`` per statement (not per row) at
commit.  The program LISTENs and, on each notification and at the latest every
``indicators.poll_interval`` seconds, reads the rows stored after its
watermark (the newest ``stored_at`` seen).  A transaction may commit after a
later one although its rows were inserted first (an earlier ``stored_at``): so
each poll also counts the rows of the last :data:`OVERLAP` seconds before the
watermark (an index-only count), and reads that stretch again, skipping the
rows already seen, only when the count is larger than the rows seen there.  The collectors' cost is one trigger call per
statement, and they never wait for this program: the notification is only a
wake-up, polling alone would give the same rows, one poll interval later.
Polling alone was the alternative: a one-second poll costs a query a second and
up to a second of latency; LISTEN makes the usual case immediate.

Which candles: closed ones.  A Kite or IBKR candle is used in its newest
revision (``recorded_at``, then ``revision``, as the view ``candle_latest``)
and only when that is ``final``; a Binance kline is stored closed.  A revised
candle (revision + 1) or one arriving late, before the newest bar of its series,
makes the engine reopen the series' handles on the bars it keeps and write the
values from that bar on again, as new rows with a later ``computed_at``
(``indicator_latest`` shows the newest).

Start and restart.  At start, each series with candles stored in the last
:data:`RECENT_DAYS` days is warmed up from its last ``indicators.warmup_bars``
closed candles (back to the session's first bar for VWAP), and the values of
the bars whose values are not stored yet (the program was down, an indicator
was added, a candle was revised meanwhile) are written.  A series first seen
later is warmed up the same way when its first new candle comes.

Health (:mod:`feeds.service`): READY once the start-up warm-up is done (or the
first values are stored); WATCHDOG=1 while the database answers the polls (or a
lost session is being reopened: the database is then what is missing, and the
candles wait for us there) and the sink stores the values; a loop stuck on
anything else stops the pings and systemd restarts the unit.  STATUS= and the
journal's ``status:`` line give the series, values, revisions and the sink's
counts.

Exit status: 0 after a clean stop, 78 for a configuration error (one line
naming the key and the file), 1 on a failure or when rows could not be written
at the stop.
"""
from __future__ import annotations

import asyncio
import logging
import math
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import click

from .config import first_line as _first_line
from . import indicators as I
from . import service
from .config import Config, ConfigError, exit_on_config_error
from .settings import INDICATORS_FILE, database_dsn
from .sink import Table

log = logging.getLogger("feeds.indicators")
UTC = timezone.utc

#: The destination table (sql/0010_indicators.sql), in row-tuple order.
INDICATOR_TABLE = Table("indicator_value", ("venue", "instrument", "interval_min", "bar_start", "indicator",
                                            "output", "value", "computed_at"), time_column="computed_at")

#: Seconds of stored candles read again at each poll (see the module docstring).
OVERLAP = 60.0
#: Series with candles stored within this many days are warmed up at start.
RECENT_DAYS = 7
#: Rows read per poll query (more: the next query follows at once).
POLL_ROWS = 50_000
#: The LISTEN channel of the candle tables' trigger.
CHANNEL = "feeds_candle"

_BINANCE_MINUTES = {"1m": 1, "3m": 3, "5m": 5, "15m": 15, "30m": 30, "1h": 60, "2h": 120, "4h": 240,
                    "6h": 360, "8h": 480, "12h": 720, "1d": 1440}
_BINANCE_INTERVAL = {m: k for k, m in _BINANCE_MINUTES.items()}


@dataclass(frozen=True)
class Source:
    """Where one venue's candles are read.

    ``table``; SQL expressions over its columns: ``instrument`` (text),
    ``minutes`` (interval), ``start`` (bar start), ``final`` (the candle is
    closed), ``version`` (timestamptz ordering a candle's revisions, ``NULL``
    for a table without revisions), ``order`` (the revision order after the bar
    start in the warm-up's DISTINCT ON, empty without revisions); ``series``:
    the WHERE clause of one series with ``%(instrument)s``, ``%(minutes)s``
    and ``%(interval)s`` (the venue's own interval name) so that it uses the
    table's key.  ``zone``: the VWAP session's calendar zone."""

    venue: str
    table: str
    instrument: str
    minutes: str
    series: str
    final: str = "final"
    version: str = "recorded_at"
    order: str = "recorded_at DESC, revision DESC"
    start: str = "bar_start"

    @property
    def zone(self) -> str:
        return I.SESSION_ZONE[self.venue]


_CASE = "CASE interval " + " ".join(f"WHEN '{k}' THEN {m}" for k, m in _BINANCE_MINUTES.items()) + " END"

#: Every venue's candles: adding a venue is one entry.
SOURCES: tuple[Source, ...] = (
    Source("binance", "binance_kline", instrument="symbol", minutes=_CASE, start="open_time",
           series="symbol = %(instrument)s AND interval = %(interval)s", final="true", version="NULL", order=""),
    Source("kite", "kite_candle", instrument="instrument_token::text", minutes="interval_min",
           series="instrument_token = %(instrument)s::bigint AND interval_min = %(minutes)s"),
    Source("ibkr", "ibkr_candle", instrument="symbol", minutes="interval_min",
           series="symbol = %(instrument)s AND interval_min = %(minutes)s"),
    # instrument 'SEGMENT:security_id' (e.g. 'NSE_EQ:1333'), as in the view candle_latest
    Source("dhan", "dhan_candle", instrument="exchange_segment || ':' || security_id", minutes="interval_min",
           series="exchange_segment = split_part(%(instrument)s, ':', 1) "
                  "AND security_id = split_part(%(instrument)s, ':', 2)::bigint AND interval_min = %(minutes)s"),
)


@dataclass
class Settings:
    """The ``[indicators]`` settings (see :data:`feeds.settings.INDICATORS`)."""
    specs: list[I.Spec]
    venues: list[str]
    intervals: list[int]
    warmup_bars: int
    poll_interval: float
    status_interval: float


def load_settings(cfg: Config) -> Settings:
    """:class:`Settings` from a loaded ``indicators.toml``.  Raises
    ConfigError (a spec TA-Lib does not know; a warm-up shorter than an
    indicator's lookback)."""
    specs = I.load_specs(cfg["indicators.functions"], str(cfg.file))
    st = Settings(specs=specs, **{k: cfg["indicators." + k] for k in (
        "venues", "intervals", "warmup_bars", "poll_interval", "status_interval")})
    need = max(s.lookback + 1 for s in specs)
    if st.warmup_bars < need:
        worst = max(specs, key=lambda s: s.lookback)
        raise ConfigError("indicators.warmup_bars", str(cfg.file),
                          f"{st.warmup_bars} bars is less than {worst.text} needs before its first value ({need})")
    return st




SeriesKey = tuple[str, str, int]          # venue, instrument, interval minutes


class Engine:
    """The database side of the indicators: sources, series, polling, rows.

    Args:
        dsn: libpq connection string (reads).
        st: :class:`Settings`.
        emit: ``emit(rows)`` queues ``indicator_value`` rows (the sink's
            ``add_many`` bound to the table).
        seen: ``seen(stream, n)``: n candles read (``candles <venue>``) or a
            poll done (``poll``), for the health of the service.
        sources: the candle sources (default :data:`SOURCES`).

    :meth:`run` runs until its stop event is set; call it in a thread.
    """

    def __init__(self, dsn: str, st: Settings, emit: Callable[[list[tuple]], None],
                 seen: Callable[[str, int], None] = lambda s, n: None, sources: Sequence[Source] = SOURCES,
                 on_ready: Callable[[], None] = lambda: None):
        self.dsn, self.st, self.emit, self.seen = dsn, st, emit, seen
        self.sources = [s for s in sources if s.venue in st.venues]
        self.on_ready = on_ready
        self.counters = I.Counters()
        self.series: dict[SeriesKey, I.Series] = {}
        self.watermark: dict[str, datetime] = {}
        self.recent: dict[str, dict[tuple, datetime]] = {}   # per table: row identity -> stored_at
        self.present: list[Source] = []
        self.not_final = 0
        self.late_reads = 0
        self.other_interval = 0
        self.polls = 0
        self.notifications = 0
        self.db_errors = 0
        self.series_warmed = 0
        self._last_computed = datetime.min.replace(tzinfo=UTC)
        self._conn = None
        self._wake = threading.Event()
        self.ready = threading.Event()
        self._zones = {v: (None if z == "UTC" else ZoneInfo(z)) for v, z in I.SESSION_ZONE.items()}

    # ------------------------------------------------------------ helpers
    def _computed_at(self) -> datetime:
        now = datetime.now(UTC)
        if now <= self._last_computed:
            now = self._last_computed + timedelta(microseconds=1)
        self._last_computed = now
        return now

    def _rows(self, key: SeriesKey, values: list[I.Value]) -> list[tuple]:
        at = self._computed_at()
        venue, instrument, minutes = key
        return [(venue, instrument, minutes, v.bar_start, v.indicator, v.output, v.value, at) for v in values]

    def _new_series(self, key: SeriesKey) -> I.Series:
        return I.Series(self.st.specs, self.st.warmup_bars, I.session_key(self._zones[key[0]]), self.counters)

    def _connect(self):
        from .db import connect
        conn = connect(self.dsn, application_name="feed-indicators", statement_timeout=60.0)
        conn.execute(f"LISTEN {CHANNEL}")
        return conn

    # ------------------------------------------------------------ start
    def discover(self, conn) -> None:
        """The sources whose table exists (one journal line for each that does not)."""
        self.present = []
        for s in self.sources:
            if conn.execute("SELECT to_regclass(%s)", (s.table,)).fetchone()[0] is None:
                log.info("%s: table %s does not exist (yet): its candles are not read", s.venue, s.table)
                continue
            self.present.append(s)

    def start(self, conn) -> None:
        """Discover the sources, set the watermarks, warm up the recent series
        and write their missing values."""
        self.discover(conn)
        now = conn.execute("SELECT clock_timestamp()").fetchone()[0]
        for s in self.present:
            self.watermark.setdefault(s.table, now)
            self.recent.setdefault(s.table, {})
        n = 0
        for s in self.present:
            keys = conn.execute(
                f"SELECT DISTINCT {s.instrument}, {s.minutes} FROM {s.table} "
                f"WHERE stored_at > now() - make_interval(days => %s)", (RECENT_DAYS,)).fetchall()
            for instrument, minutes in keys:
                if minutes is None or (self.st.intervals and minutes not in self.st.intervals):
                    continue
                key = (s.venue, instrument, int(minutes))
                if key not in self.series:
                    self.warm(conn, s, key)
                    n += 1
        log.info("warmed up %d series (%d values written for bars not stored yet); reading %s",
                 n, self.counters.values, ", ".join(s.table for s in self.present) or "no table")

    # ------------------------------------------------------------ warm-up
    def _bars_sql(self, s: Source, extra: str = "") -> str:
        cols = (f"{s.start}, open::float8, high::float8, low::float8, close::float8, volume::float8, "
                f"{s.final} AS final, {s.version} AS version, stored_at")
        if s.order:
            inner = (f"SELECT DISTINCT ON ({s.start}) {cols} FROM {s.table} WHERE {s.series} {extra} "
                     f"ORDER BY {s.start} DESC, {s.order}")
        else:
            inner = f"SELECT {cols} FROM {s.table} WHERE {s.series} {extra} ORDER BY {s.start} DESC"
        return f"SELECT * FROM ({inner}) c WHERE final ORDER BY 1 DESC"

    def _params(self, key: SeriesKey) -> dict:
        return {"instrument": key[1], "minutes": key[2], "interval": _BINANCE_INTERVAL.get(key[2], "")}

    def warm(self, conn, s: Source, key: SeriesKey) -> I.Series:
        """Warm up one series from its stored candles and write the values
        not stored yet; returns it."""
        p = self._params(key)
        rows = conn.execute(self._bars_sql(s) + " LIMIT %(n)s", {**p, "n": self.st.warmup_bars}).fetchall()
        series = self._new_series(key)
        if rows and any(x.name == I.VWAP for x in self.st.specs):
            # VWAP: back to the first bar of the newest bar's session
            sess = series.session
            last = sess(I._us(rows[0][0]))
            if sess(I._us(rows[-1][0])) == last:
                zone = self._zones[key[0]]
                day = rows[0][0].astimezone(zone or UTC).replace(hour=0, minute=0, second=0, microsecond=0)
                more = conn.execute(self._bars_sql(s, f"AND {s.start} >= %(day)s AND {s.start} < %(first)s"),
                                    {**p, "day": day, "first": rows[-1][0]}).fetchall()
                rows.extend(more)
        rows.reverse()
        bars = [self._bar(r) for r in rows]
        emit_from, seeds = self._stored(conn, key, bars, rows)
        values = series.warm(bars, emit_from, seeds)
        self.series[key] = series
        self.series_warmed += 1
        if values:
            self.emit(self._rows(key, values))
        return series

    @staticmethod
    def _bar(r) -> I.Bar:
        start, o, h, l, c, v, _final, version = r[:8]
        return I.Bar(start, o, h, l, c, math.nan if v is None else v,
                     0 if version is None else I._us(version))

    def _stored(self, conn, key: SeriesKey, bars: list[I.Bar], rows) -> tuple[dict, dict]:
        """What is stored already: per indicator the first bar whose values
        must be written (after its newest stored bar; at the first bar whose
        candle was stored after the values were computed: a revision made
        while the program was down), and OBV's stored value at the first bar."""
        if not bars:
            return {}, {}
        venue, instrument, minutes = key
        specs = self.st.specs
        first = bars[0].start
        last = conn.execute(
            """SELECT s.ind, (SELECT max(bar_start) FROM indicator_value v
                               WHERE v.venue = %(venue)s AND v.instrument = %(instrument)s
                                 AND v.interval_min = %(minutes)s AND v.indicator = s.ind AND v.output = s.out
                                 AND v.bar_start >= %(first)s)
                 FROM unnest(%(inds)s::text[], %(outs)s::text[]) AS s(ind, out)""",
            {"venue": venue, "instrument": instrument, "minutes": minutes, "first": first,
             "inds": [x.text for x in specs], "outs": [x.outputs[-1] for x in specs]}).fetchall()
        # a candle stored after the newest computation of its bar: revised while we were down
        computed = dict(conn.execute(
            """SELECT bar_start, max(computed_at) FROM indicator_value
                WHERE venue = %s AND instrument = %s AND interval_min = %s AND indicator = %s AND output = %s
                  AND bar_start >= %s GROUP BY bar_start""",
            (venue, instrument, minutes, specs[0].text, specs[0].outputs[-1], first)).fetchall())
        revised = None
        for b, r in zip(bars, rows):
            at = computed.get(b.start)
            if at is not None and r[8] is not None and r[8] > at:
                revised = b.start
                break
        emit_from: dict[str, datetime] = {}
        for text, newest in last:
            frm = first if newest is None else newest + timedelta(microseconds=1)
            if revised is not None and revised < frm:
                frm = revised
            emit_from[text] = frm
        seeds = {}
        for x in specs:
            if x.name in I.REBASED:
                row = conn.execute(
                    """SELECT value FROM indicator_value WHERE venue = %s AND instrument = %s AND interval_min = %s
                          AND indicator = %s AND output = %s AND bar_start = %s
                        ORDER BY computed_at DESC LIMIT 1""",
                    (venue, instrument, minutes, x.text, x.outputs[0], first)).fetchone()
                if row is not None:
                    seeds[x.text] = row[0]
        return emit_from, seeds

    # ------------------------------------------------------------ polling
    def poll(self, conn) -> int:
        """Read the candles stored since each source's watermark and apply
        them.  The last :data:`OVERLAP` seconds before the watermark are
        read again only when PostgreSQL counts more rows there than were
        seen (a transaction that committed after a later one).  Returns the
        candles applied."""
        total = 0
        for s in self.present:
            wm = self.watermark[s.table]
            lo = wm - timedelta(seconds=OVERLAP)
            recent = self.recent[s.table]
            seen = sum(1 for t in recent.values() if t >= lo)
            there = conn.execute(f"SELECT count(*) FROM {s.table} WHERE stored_at >= %s AND stored_at <= %s",
                                 (lo, wm)).fetchone()[0]
            if there != seen:
                self.late_reads += 1
                since, op = lo, ">="
            else:
                since, op = wm, ">"
            while True:
                rows = conn.execute(
                    f"SELECT {s.instrument}, {s.minutes}, {s.start}, open::float8, high::float8, low::float8, "
                    f"close::float8, volume::float8, {s.final}, {s.version}, stored_at FROM {s.table} "
                    f"WHERE stored_at {op} %s ORDER BY stored_at LIMIT %s", (since, POLL_ROWS)).fetchall()
                total += self._take(conn, s, rows)
                if len(rows) < POLL_ROWS or rows[-1][10] == since:
                    break
                since, op = rows[-1][10], ">="
        self.polls += 1
        self.seen("poll", 1)
        return total

    def _take(self, conn, s: Source, rows) -> int:
        recent = self.recent[s.table]
        wm = self.watermark[s.table]
        groups: dict[SeriesKey, list[I.Bar]] = defaultdict(list)
        n = 0
        for r in rows:
            instrument, minutes, start, o, h, l, c, v, final, version, stored = r
            ident = (instrument, minutes, start, version)
            if ident in recent:
                continue
            recent[ident] = stored
            if stored > wm:
                wm = stored
            n += 1
            if minutes is None or (self.st.intervals and minutes not in self.st.intervals):
                self.other_interval += 1
                continue
            if not final:
                self.not_final += 1
                continue
            groups[(s.venue, instrument, int(minutes))].append(
                I.Bar(start, o, h, l, c, math.nan if v is None else v, 0 if version is None else I._us(version)))
        self.watermark[s.table] = wm
        cut = wm - timedelta(seconds=OVERLAP)
        if n:
            for k in [k for k, t in recent.items() if t < cut]:
                del recent[k]
        if n:
            self.seen(f"candles {s.venue}", n)
        for key, bars in groups.items():
            series = self.series.get(key)
            if series is None:
                series = self.warm(conn, s, key)
            values = series.apply(bars)
            if values:
                self.emit(self._rows(key, values))
        return n

    # ------------------------------------------------------------ loop
    def run(self, stop: threading.Event) -> None:
        """Connect, start, then poll on every notification and every
        ``poll_interval`` until ``stop`` is set; a database failure is
        logged and retried (the series stay in memory)."""
        delay = 1.0
        started = False
        while not stop.is_set():
            try:
                if self._conn is None:
                    self._conn = self._connect()
                conn = self._conn
                if not started:
                    self.start(conn)
                    started = True
                    self.ready.set()
                    self.on_ready()
                delay = 1.0
                while not stop.is_set():
                    self._wake.clear()
                    self.poll(conn)
                    self._wait(conn, stop)
            except Exception as e:
                import psycopg
                self._close()
                if isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError)):
                    self.db_errors += 1
                    log.warning("database: %s; trying again in %.0f s", _first_line(e), delay)
                    self.seen("poll", 1)        # alive and retrying: the database is what is missing
                else:                           # not fed to the watchdog: systemd restarts a stuck loop
                    log.exception("indicators: unexpected failure; starting the loop again in %.0f s", delay)
                stop.wait(delay)
                delay = min(delay * 2, 30.0)
        self._close()

    def _wait(self, conn, stop: threading.Event) -> None:
        end = time.monotonic() + self.st.poll_interval
        while not stop.is_set() and not self._wake.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            for _ in conn.notifies(timeout=min(left, 0.5), stop_after=1):
                self.notifications += 1
                self._wake.set()

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def figures(self) -> dict[str, int | float]:
        c = self.counters
        return {"series": len(self.series), "values": c.values, "bars": c.bars, "rebuilds": c.rebuilds,
                "no_volume": c.no_volume, "nonfinite": c.nonfinite, "stale": c.stale, "too_old": c.too_old,
                "not_final": self.not_final, "late_reads": self.late_reads, "polls": self.polls, "notifications": self.notifications,
                "db_errors": self.db_errors}


class IndicatorsCollector:
    """The :class:`feeds.service.Collector` of ``feed-indicators``: runs the
    :class:`Engine` in a thread and marks the service READY once warmed up."""

    def __init__(self, engine: Engine, svc: service.Service):
        self.engine, self.svc = engine, svc
        self._last_values = 0

    def stream_kind(self, stream: str) -> str:
        return stream.split(" ", 1)[0]

    def figures(self) -> dict[str, int | float]:
        return self.engine.figures()

    def periodic(self) -> None:
        pass

    def status_line(self) -> str:
        f = self.engine.figures()
        dt = self.svc.status_interval
        rate = (f["values"] - self._last_values) / max(dt, 1e-6)
        self._last_values = f["values"]
        sink = self.svc.sink
        stored = sink.outcome().line() if sink is not None else ""
        return (f"{f['series']:,} series, {f['values']:,} values ({rate:,.0f}/s), {f['bars']:,} bars, "
                f"{f['rebuilds']:,} revisions, {f['no_volume']:,} skipped without volume; {stored}")

    async def run(self, stop: asyncio.Event) -> int:
        tstop = threading.Event()
        loop = asyncio.get_running_loop()
        task = loop.run_in_executor(None, self.engine.run, tstop)
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        tstop.set()
        await task
        stopper.cancel()
        return 0


def _ready(svc: service.Service) -> Callable[[], None]:
    def ready() -> None:
        h = svc.health
        if not h.ready:
            h.ready, h.state = True, "running"
            svc.notifier.notify("READY=1")
            log.info("warmed up; READY")
    return ready


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="FEEDS_INDICATORS_CONFIG", default="/etc/feeds/indicators.toml",
              show_default=True, help="Configuration file (indicators.toml).")
@click.option("--unit", envvar="FEEDS_UNIT", default="feed-indicators.service", show_default=True,
              help="Name used for the heartbeat row.")
@click.option("--check-config", is_flag=True, help="Check the configuration (and the indicators against "
              "TA-Lib), print the normalised indicators and exit.")
@exit_on_config_error
def main(config_path: str, unit: str, check_config: bool) -> None:
    """Compute technical indicators on every venue's closed candles into PostgreSQL."""
    cfg = service.start(config_path, INDICATORS_FILE)
    st = load_settings(cfg)
    if check_config:
        for s in st.specs:
            click.echo(f"{s.text}: {', '.join(s.outputs)} (first value after {s.lookback} bars)")
        sys.exit(0)
    dsn = database_dsn(cfg)
    sk = service.sink_settings(cfg)
    again = [s.text for s in st.specs if s.name in I.PATH_DEPENDENT and s.name not in I.REBASED
             and s.name != I.VWAP]
    log.info("feed-indicators starting: config %s, %d indicators (%s), venues %s, intervals %s, warm-up %d bars",
             config_path, len(st.specs), ", ".join(s.text for s in st.specs), ",".join(st.venues),
             ",".join(map(str, st.intervals)) or "all", st.warmup_bars)
    if again:
        log.info("%s: values depend on the whole series; after a restart or a revision they are computed "
                 "from the last %d bars", ", ".join(again), st.warmup_bars)
    svc = service.Service(unit, dsn, tables=(INDICATOR_TABLE,), sink=sk, status_interval=st.status_interval,
                          reporters=service.reporters(cfg, unit))

    def prepare(svc: service.Service) -> IndicatorsCollector:
        sink = svc.sink
        engine = Engine(dsn, st, emit=lambda rows: sink.add_many(INDICATOR_TABLE.name, rows),
                        seen=lambda stream, n: svc.health.stream(stream).seen(n), on_ready=_ready(svc))
        return IndicatorsCollector(engine, svc)
    sys.exit(svc.run(prepare))


if __name__ == "__main__":      # pragma: no cover
    main()
