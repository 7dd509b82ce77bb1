"""The control API and status page of the feeds (``feed-api.service``, aiohttp).

Listens on ``api.address``:``api.port`` of ``ops.toml`` (loopback by
default) and reads the database as the operators' role (``database_dsn(cfg,
shared_secret=True)``; ``FEEDS_DSN`` wins).

=========================  ==============================================================
request                    answer
=========================  ==============================================================
``GET /health``            no token; 200 ``{"ok": true, "database": "ok"}`` when the API
                           and the database answer, 503 ``{"ok": false, ...}`` otherwise
``GET /status``            JSON: every ``feed-*.service`` unit systemd knows or that has a
                           heartbeat row: systemd state, heartbeat age, state, status
                           line, health score (:func:`feeds.ops.checks.evaluate`),
                           per-stream-kind rates (from the status line), stored rows
``GET /metrics``           Prometheus text of this view (``feeds_api_*``)
``GET /config``            every readable ``*.toml`` of the configuration directory, with
                           defaults filled in and secrets redacted (:func:`redact`)
``POST /start``            ``{"unit": "feed-binance.service"}`` (or ``?unit=``): queue the
``POST /stop``             job through systemd's D-Bus API; 200 ``{"unit", "action",
``POST /restart``          "job", "state"}``; 400 a malformed name, 403 a unit outside
                           ``feed-*.service`` or refused by polkit (with its reason), 404
                           an unknown unit, 503 systemd unreachable
``GET /``                  the status page (:mod:`feeds.ops.page`)
=========================  ==============================================================

Every request but ``GET /health`` carries ``Authorization: Bearer <token>``
(the first line of ``api.token_file``), compared in constant time; a missing
or wrong token gets 401 with ``WWW-Authenticate`` and changes nothing.  For
a browser, GET requests also accept HTTP Basic authentication with the token
as the password (any user name); POST requests accept the bearer token only,
so that a browser's remembered credentials cannot be used by another site to
stop a feed.

The chart of the page ("rows stored per minute, last 24 hours") counts the
rows of each venue's tick tables per minute of their time column
(:data:`CHART_TABLES`).  To stay cheap on large tables, a table whose
partitions of the last two days exceed :data:`CHART_EXACT_BYTES` is read
with ``TABLESAMPLE SYSTEM`` at the fraction that reads about that many
bytes, and the counts are scaled back (an estimate, marked as such); the
result is kept for ``chart_ttl`` seconds.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hmac
import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from aiohttp import web

from ..config import first_line as _first_line
from ..config import Config, ConfigError
from ..health import status_rates
from . import checks
from .systemd_bus import ACTIVE_STATES, AccessDenied, BusError, Manager, NoSuchUnit, UnitState

log = logging.getLogger(__name__)

UTC = dt.timezone.utc

#: A unit the API may start, stop or restart.
UNIT_RE = re.compile(r"^feed-[A-Za-z0-9@._-]+\.service$")
_NAME_CHARS = re.compile(r"^[A-Za-z0-9@._-]+$")
#: Unit types other than services: such a name is refused with 403 (not a feed service).
_OTHER_SUFFIXES = (".socket", ".timer", ".target", ".mount", ".automount", ".path", ".slice",
                   ".scope", ".device", ".swap")
#: The API's own unit: never managed through the API (stopping it would cut the way back).
OWN_UNIT = "feed-api.service"
#: Units listed by GET /status (systemd glob patterns).
UNIT_PATTERNS = ("feed-*.service",)

#: Per venue: the units it covers (name prefix) and its tick tables with their time column.
CHART_TABLES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "binance": ("feed-binance", (("binance_agg_trade", "trade_time"), ("binance_book_ticker", "event_time"))),
    "kite": ("feed-zerodha", (("kite_tick_ltp", "recv_time"), ("kite_tick_quote", "recv_time"),
                              ("kite_tick_full", "recv_time"))),
    "ibkr": ("feed-ibkr", (("ibkr_trade", "recv_time"), ("ibkr_quote", "recv_time"),
                           ("ibkr_index_tick", "recv_time"))),
    "dhan": ("feed-dhan", (("dhan_tick_ticker", "recv_time"), ("dhan_tick_quote", "recv_time"),
                           ("dhan_tick_full", "recv_time"))),
}
#: Bytes of a table's last two days of partitions up to which rows are counted exactly.
CHART_EXACT_BYTES = 16 << 20

APP_KEY: web.AppKey["App"] = web.AppKey("feeds", "App")
"""Where :func:`create_app` keeps its :class:`App` (``app[APP_KEY]``)."""


class BadUnit(ValueError):
    """The name is not a unit name at all (400)."""


class ForbiddenUnit(ValueError):
    """A unit name, but not a feed service the API manages (403)."""


def unit_name(raw: Any) -> str:
    """The unit the API may manage, from a request's ``raw`` name:
    ``feed-binance`` and ``feed-binance.service`` both give
    ``feed-binance.service``.  Raises :class:`BadUnit` for a malformed name
    (empty, too long, a character outside ``[A-Za-z0-9@._-]``, ``..``) and
    :class:`ForbiddenUnit` for a unit outside ``feed-*.service`` (or the
    API's own unit)."""
    if not isinstance(raw, str):
        raise BadUnit("unit must be a string")
    name = raw.strip()
    if not name or len(name) > 255 or not _NAME_CHARS.match(name) or ".." in name \
            or name[0] in ".-@":
        raise BadUnit(f"not a unit name: {raw[:80]!r}")
    if name.endswith(_OTHER_SUFFIXES):
        raise ForbiddenUnit(f"{name} is not a service; only feed-*.service units are managed")
    if not name.endswith(".service"):
        name += ".service"
    if not name.startswith("feed-"):
        raise ForbiddenUnit(f"{name} is not a feed unit; only feed-*.service units are managed")
    if not UNIT_RE.match(name) or name.endswith("@.service"):
        raise BadUnit(f"not a unit name: {raw[:80]!r}")
    if name == OWN_UNIT:
        raise ForbiddenUnit(f"{name} is the API itself; manage it with systemctl")
    return name


# -- redaction -------------------------------------------------------------------------------------

REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"(^|[_.-])(password|passwd|pass|token|secret|api_secret|totp_secret|"
                         r"private_key|credentials?)$", re.I)
_DSN_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.I)
_URL_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://[^/@\s:]*:)([^/@\s]*)@", re.I)


def redact_dsn(dsn: str) -> str:
    """``dsn`` (libpq ``key=value`` or URI) with its password replaced by
    ``<redacted>``; an unparsable string is redacted as a whole when it
    mentions a password."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    try:
        parts = conninfo_to_dict(dsn)
    except Exception:
        return REDACTED if "password" in dsn.lower() or "@" in dsn else dsn
    if "password" in parts:
        parts["password"] = REDACTED
        return make_conninfo("", **parts)
    return dsn


def redact_text(s: str) -> str:
    """A string with any ``password=...`` and any URL's ``user:password@`` redacted."""
    s = _DSN_PASSWORD.sub(lambda m: m.group(1) + REDACTED, s)
    return _URL_USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", s)


def redact(key: str, value: Any) -> Any:
    """The value of setting ``key`` as ``GET /config`` shows it.

    A key ending in ``_file`` keeps its path (the file is never read); a key
    whose last part names a password, token or secret is replaced by
    ``<redacted>``; a DSN (a key ending in ``dsn``) has its password
    redacted; in any other string a ``password=...`` or a URL's password is
    redacted.  Lists and tables are redacted item by item."""
    last = key.rsplit(".", 1)[-1]
    if isinstance(value, Mapping):
        return {k: redact(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(key, v) for v in value]
    if last.endswith("_file") or last.endswith("_files"):
        return value
    if _SECRET_KEY.search(last):
        return REDACTED if value not in (None, "") else value
    if isinstance(value, str):
        if last.endswith("dsn"):
            return redact_dsn(value)
        return redact_text(value)
    if isinstance(value, (dt.date, dt.time, dt.datetime)):
        return value.isoformat()
    return value


def _schema_for(name: str):
    from ..settings import SCHEMAS
    if name in SCHEMAS:
        return SCHEMAS[name]
    stem = name.split(".", 1)[0]
    for key, schema in SCHEMAS.items():
        base = key.split(".", 1)[0]
        if stem.startswith(base + "-") or stem.startswith(base + "_"):
            return schema
    return None


def _flatten(data: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def effective_config(directory: str | os.PathLike) -> dict:
    """``{file name: {"schema", "values", "error"}}`` for every ``*.toml`` in
    ``directory``: the checked values with defaults (or, for a file no
    schema describes or that does not check, its raw keys), redacted with
    :func:`redact`.  A file this user cannot read has ``values`` None and
    an ``error``.  Secret files are never opened."""
    from ..settings import check_document
    out: dict = {}
    d = Path(directory)
    try:
        files = sorted(p for p in d.glob("*.toml") if p.is_file())
    except OSError as e:
        return {"-": {"schema": None, "values": None, "error": f"{d}: {e.strerror}"}}
    for p in files:
        schema = _schema_for(p.name)
        entry: dict = {"schema": schema.name if schema else None, "values": None, "error": None}
        try:
            doc = Config.load(p)
        except ConfigError as e:
            entry["error"] = e.reason
            out[p.name] = entry
            continue
        raw = _flatten(doc.data)
        if schema is not None:
            try:
                values = check_document(doc, schema).values
            except ConfigError as e:
                entry["error"] = redact_text(e.reason)
                values = raw
        else:
            values = raw
        entry["values"] = {k: redact(k, v) for k, v in sorted(values.items())}
        out[p.name] = entry
    return out


# -- status -----------------------------------------------------------------------------------------

def venue_of_unit(unit: str) -> str | None:
    """The :data:`CHART_TABLES` venue of ``unit`` (``feed-binance@2of2.service`` -> ``binance``;
    the name itself or an instance of it: ``feed-dhan-token.service`` is not ``feed-dhan``'s)."""
    base = checks.unit_base(unit)
    for venue, (prefix, _) in CHART_TABLES.items():
        if base == prefix or base.startswith(prefix + "@"):
            return venue
    return None


HEARTBEAT_SQL = ("SELECT unit, host, pid, started_at, updated_at, state, status, detail "
                 "FROM feed_heartbeat WHERE unit LIKE 'feed-%' ORDER BY unit")


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat(timespec="seconds")


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


@dataclass
class Snapshot:
    """One look at every feed unit: ``now`` (aware), ``units`` (list of
    JSON-ready dicts, see :meth:`App.snapshot`), ``database`` / ``systemd``
    (``"ok"`` or the error's first line)."""
    now: dt.datetime
    units: list[dict]
    database: str = "ok"
    systemd: str = "ok"

    def as_dict(self) -> dict:
        return {"now": _iso(self.now), "database": self.database, "systemd": self.systemd,
                "units": self.units}


@dataclass
class Series:
    """Rows stored per minute of one venue: ``points`` ``{minute epoch s: rows}``
    (only minutes with rows), ``estimated`` True when a table was sampled,
    ``error`` the first line of a failure."""
    venue: str
    points: dict[int, float] = field(default_factory=dict)
    estimated: bool = False
    error: str | None = None




def rows_per_minute(conn, table: str, column: str, since: dt.datetime, until: dt.datetime,
                    exact_bytes: int = CHART_EXACT_BYTES) -> tuple[dict[int, float], bool]:
    """``({minute epoch s: rows}, estimated)`` of ``table`` between ``since``
    and ``until`` by ``column`` (a psycopg connection; ``table`` and
    ``column`` are trusted identifiers of :data:`CHART_TABLES`).  Partitions
    of those days larger than ``exact_bytes`` in total are sampled."""
    from psycopg import sql
    size = conn.execute(
        "SELECT coalesce(sum(pg_relation_size(i.inhrelid)), 0)::bigint FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass "
        "AND c.relname ~ '_p[0-9]{8}$' AND right(c.relname, 8) >= %s",
        (table, (since - dt.timedelta(days=1)).strftime("%Y%m%d"))).fetchone()[0]
    pct = 100.0
    if size > exact_bytes > 0:
        pct = max(0.01, 100.0 * exact_bytes / size)
    sample = sql.SQL("") if pct >= 100.0 else sql.SQL(" TABLESAMPLE SYSTEM ({})").format(sql.Literal(pct))
    q = sql.SQL("SELECT extract(epoch FROM date_trunc('minute', {c}))::bigint, count(*) FROM {t}{s} "
                "WHERE {c} >= %s AND {c} < %s GROUP BY 1").format(
        c=sql.Identifier(column), t=sql.Identifier(table), s=sample)
    scale = 100.0 / pct
    rows = conn.execute(q, (since, until)).fetchall()
    return {int(m): n * scale for m, n in rows}, pct < 100.0


def chart_series(dsn: str, now: dt.datetime, hours: int = 24,
                 exact_bytes: int = CHART_EXACT_BYTES) -> dict[str, Series]:
    """Rows stored per minute of every venue of :data:`CHART_TABLES` over the
    last ``hours`` (blocking; a table that does not exist is skipped)."""
    from psycopg import errors as pgerr

    from ..db import connect
    until = now.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    since = until - dt.timedelta(hours=hours)
    out: dict[str, Series] = {}
    with connect(dsn, application_name="feed-api", statement_timeout=20.0, connect_timeout=5) as conn:
        for venue, (_prefix, tables) in CHART_TABLES.items():
            s = out[venue] = Series(venue)
            for table, column in tables:
                try:
                    pts, est = rows_per_minute(conn, table, column, since, until, exact_bytes)
                except pgerr.UndefinedTable:
                    continue
                except Exception as e:
                    s.error = _first_line(e)
                    continue
                s.estimated |= est
                for m, n in pts.items():
                    s.points[m] = s.points.get(m, 0.0) + n
    return out


# -- the application -----------------------------------------------------------------------------

@dataclass
class Settings:
    """What :func:`create_app` needs: ``token`` (the bearer token), ``dsn``,
    ``config_dir`` (for ``/config``), ``params`` (:class:`checks.Params`),
    ``chart_ttl`` (seconds a chart is reused), ``settle`` (seconds a control
    request waits for the unit to leave activating/deactivating)."""
    token: str
    dsn: str
    config_dir: str = "/etc/feeds"
    params: checks.Params = checks.DEFAULT_PARAMS
    chart_ttl: float = 60.0
    settle: float = 3.0
    chart_hours: int = 24
    chart_exact_bytes: int = CHART_EXACT_BYTES


class App:
    """The state behind the routes: the manager, the settings, the memory of
    :func:`checks.evaluate` between requests (rates, restarts) and the chart cache."""

    def __init__(self, settings: Settings, manager: Manager):
        self.settings, self.manager = settings, manager
        self._memory: dict | None = None
        self._chart: tuple[float, dict[str, Series]] | None = None
        self._chart_lock = asyncio.Lock()

    # -- data

    def _heartbeats(self) -> tuple[list, dt.datetime]:
        from ..db import connect
        with connect(self.settings.dsn, application_name="feed-api", statement_timeout=10.0,
                     connect_timeout=5) as conn:
            rows = conn.execute(HEARTBEAT_SQL).fetchall()
            now = conn.execute("SELECT now()").fetchone()[0]
        return rows, now

    async def snapshot(self) -> Snapshot:
        """systemd's units, the heartbeats and the health scores now.

        Each unit: ``unit``, ``venue``, ``systemd`` (:meth:`UnitState.as_dict`
        or None), ``heartbeat`` (``age_s``, ``state``, ``status``, ``host``,
        ``pid``, ``started_at``, ``updated_at`` or None), ``health``
        (:meth:`healthscore.Score.as_dict` or None for a job), ``rates``
        (``{stream kind: msg/s}``), ``stored`` (``{table: rows}`` since the
        process started), ``spooled_rows``, ``pending``, ``last_message_age_s``.
        """
        systemd_err = "ok"
        units: dict[str, UnitState] = {}
        try:
            for u in await self.manager.list_units(UNIT_PATTERNS):
                if u.name.endswith("@.service") or u.load_state == "not-found":
                    continue
                units[u.name] = u
        except (BusError, AccessDenied, OSError) as e:
            systemd_err = _first_line(e)
        db_err = "ok"
        rows: list = []
        now = dt.datetime.now(UTC)
        try:
            rows, now = await asyncio.to_thread(self._heartbeats)
        except Exception as e:
            db_err = _first_line(e)
        hbs = {}
        for unit, host, pid, started, updated, state, status, detail in rows:
            hbs[unit] = (host, pid, checks.Heartbeat(updated_at=updated, state=state, status=status or "",
                                                     detail=detail or {}, started_at=started))
        facts = checks.Facts(
            now=now,
            units={n: checks.UnitFacts(u.active_state, u.sub_state, u.result or "success", u.n_restarts)
                   for n, u in units.items()},
            heartbeats={n: hb for n, (_h, _p, hb) in hbs.items() if n in units},
            previous=self._memory)
        try:
            # in a thread: the first use of an exchange calendar takes a while to build
            ev = await asyncio.to_thread(checks.evaluate, facts, self.settings.params)
            self._memory = ev.memory
            scores = ev.scores
        except Exception as e:           # a calendar that cannot be read must not hide the rest
            log.warning("health scores not computed: %s", _first_line(e))
            scores = {}
        out = []
        for name in sorted(set(units) | set(hbs)):
            u = units.get(name)
            item: dict = {"unit": name, "venue": venue_of_unit(name),
                          "systemd": u.as_dict() if u else None, "heartbeat": None,
                          "health": scores[name].as_dict() if name in scores else None,
                          "rates": {}, "stored": {}, "spooled_rows": None, "pending": None,
                          "last_message_age_s": None}
            if name in hbs:
                host, pid, hb = hbs[name]
                d = hb.detail if isinstance(hb.detail, Mapping) else {}
                age = max(0.0, (now - hb.updated_at).total_seconds())
                item["heartbeat"] = {"age_s": round(age, 1), "state": hb.state, "status": hb.status,
                                     "host": host, "pid": pid, "started_at": _iso(hb.started_at),
                                     "updated_at": _iso(hb.updated_at)}
                item["rates"] = status_rates(hb.status)
                tables = d.get("tables") if isinstance(d.get("tables"), Mapping) else {}
                item["stored"] = {t: int(v.get("stored", 0)) for t, v in tables.items()
                                  if isinstance(v, Mapping) and isinstance(v.get("stored"), int)}
                item["spooled_rows"] = d.get("spooled_rows")
                item["pending"] = d.get("pending")
                lma = _num(d.get("last_message_age"))
                item["last_message_age_s"] = None if lma is None else round(lma + age, 1)
            out.append(item)
        return Snapshot(now, out, db_err, systemd_err)

    async def chart(self) -> dict[str, Series]:
        """The per-venue series, recomputed at most every ``chart_ttl`` seconds."""
        async with self._chart_lock:
            if self._chart is not None and time.monotonic() - self._chart[0] < self.settings.chart_ttl:
                return self._chart[1]
            now = dt.datetime.now(UTC)
            try:
                series = await asyncio.to_thread(chart_series, self.settings.dsn, now,
                                                 self.settings.chart_hours, self.settings.chart_exact_bytes)
            except Exception as e:
                series = {v: Series(v, error=_first_line(e)) for v in CHART_TABLES}
            self._chart = (time.monotonic(), series)
            return series

    def _db_ping(self) -> None:
        from ..db import connect
        with connect(self.settings.dsn, application_name="feed-api", statement_timeout=5.0,
                     connect_timeout=3) as conn:
            conn.execute("SELECT 1").fetchone()

    # -- handlers

    async def health(self, request: web.Request) -> web.Response:
        try:
            await asyncio.to_thread(self._db_ping)
        except Exception as e:
            return web.json_response({"ok": False, "database": _first_line(e)}, status=503)
        return web.json_response({"ok": True, "database": "ok"})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response((await self.snapshot()).as_dict())

    async def metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.core import GaugeMetricFamily
        snap = await self.snapshot()

        class _View:
            def collect(self_inner):
                up = GaugeMetricFamily("feeds_api_database_up", "1 when feed-api could read the database")
                up.add_metric([], 1.0 if snap.database == "ok" else 0.0)
                yield up
                sd = GaugeMetricFamily("feeds_api_systemd_up", "1 when feed-api could read systemd's units")
                sd.add_metric([], 1.0 if snap.systemd == "ok" else 0.0)
                yield sd
                score = GaugeMetricFamily("feeds_api_unit_health_score", "health score 0-100 of a feed "
                                          "unit (feeds.ops.healthscore)", labels=["unit"])
                age = GaugeMetricFamily("feeds_api_unit_heartbeat_age_seconds", "seconds since the unit's "
                                        "last feed_heartbeat row", labels=["unit"])
                state = GaugeMetricFamily("feeds_api_unit_active_state", "1 for the unit's systemd "
                                          "ActiveState, 0 for the others", labels=["unit", "state"])
                for u in snap.units:
                    if u["health"] is not None:
                        score.add_metric([u["unit"]], float(u["health"]["total"]))
                    if u["heartbeat"] is not None:
                        age.add_metric([u["unit"]], float(u["heartbeat"]["age_s"]))
                    if u["systemd"] is not None:
                        cur = u["systemd"]["active_state"]
                        for s in ACTIVE_STATES:
                            state.add_metric([u["unit"], s], 1.0 if s == cur else 0.0)
                yield score
                yield age
                yield state

        reg = CollectorRegistry()
        reg.register(_View())
        return web.Response(body=generate_latest(reg), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def config(self, request: web.Request) -> web.Response:
        files = await asyncio.to_thread(effective_config, self.settings.config_dir)
        return web.json_response({"directory": str(self.settings.config_dir), "files": files})

    async def control(self, request: web.Request) -> web.Response:
        action = request.path.strip("/")
        raw: Any = request.query.get("unit")
        data = await request.read()
        if data.strip():
            try:
                body = json.loads(data)
            except (ValueError, UnicodeDecodeError):
                return _error(400, "the body is not JSON: send {\"unit\": \"feed-....service\"}")
            if not isinstance(body, dict):
                return _error(400, "the body must be a JSON object {\"unit\": ...}")
            if "unit" in body:
                raw = body["unit"]
        if raw is None:
            return _error(400, "no unit given: {\"unit\": \"feed-binance.service\"} or ?unit=")
        try:
            name = unit_name(raw)
        except BadUnit as e:
            return _error(400, str(e))
        except ForbiddenUnit as e:
            return _error(403, str(e))
        try:
            await self.manager.unit_state(name)
            job = await getattr(self.manager, action)(name)
        except NoSuchUnit:
            return _error(404, f"no such unit: {name}")
        except AccessDenied as e:
            log.warning("%s %s refused by systemd: %s", action, name, e.reason)
            return _error(403, f"systemd refused to {action} {name}", reason=e.reason)
        except (BusError, OSError) as e:
            return _error(503, f"systemd unreachable: {_first_line(e)}")
        log.info("%s %s requested by %s: job %s", action, name, request.remote, job)
        state = await self._settled(name)
        return web.json_response({"unit": name, "action": action, "job": job,
                                  "state": state.as_dict() if state else None})

    async def _settled(self, name: str) -> UnitState | None:
        """The unit's state once it is no longer activating/deactivating, or
        after ``settle`` seconds (None when it cannot be read)."""
        deadline = time.monotonic() + self.settings.settle
        while True:
            try:
                st = await self.manager.unit_state(name)
            except (NoSuchUnit, AccessDenied, BusError, OSError):
                return None
            if st.active_state not in ("activating", "deactivating", "reloading") \
                    or time.monotonic() >= deadline:
                return st
            await asyncio.sleep(0.2)

    async def page(self, request: web.Request) -> web.Response:
        from . import page
        snap, series = await asyncio.gather(self.snapshot(), self.chart())
        html = page.render(snap.as_dict(), {v: s.points for v, s in series.items()},
                           estimated={v: s.estimated for v, s in series.items()},
                           errors={v: s.error for v, s in series.items() if s.error},
                           hours=self.settings.chart_hours)
        return web.Response(text=html, content_type="text/html", headers=page.HEADERS)


def _error(status: int, message: str, **extra) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _authorized(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, cred = header.strip().partition(" ")
    cred = cred.strip()
    want = token.encode()
    if scheme.lower() == "bearer" and cred:
        return hmac.compare_digest(cred.encode(), want)
    if scheme.lower() == "basic" and cred and request.method in ("GET", "HEAD"):
        try:
            _user, _, password = base64.b64decode(cred, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), want)
    return False


def create_app(settings: Settings, manager: Manager) -> web.Application:
    """The aiohttp application (``settings``: :class:`Settings`; ``manager``:
    a :class:`feeds.ops.systemd_bus.Manager`, e.g.
    :class:`~feeds.ops.systemd_bus.SystemdManager`)."""
    if not settings.token:
        raise ValueError("an empty token would let anyone in")
    state = App(settings, manager)

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path == "/health" and request.method in ("GET", "HEAD"):
            return await handler(request)
        if not _authorized(request, settings.token):
            resp = _error(401, "a valid token is required: Authorization: Bearer <token>")
            resp.headers.add("WWW-Authenticate", 'Bearer realm="feeds"')
            if request.method in ("GET", "HEAD"):
                resp.headers.add("WWW-Authenticate", 'Basic realm="feeds", charset="UTF-8"')
            return resp
        return await handler(request)

    app = web.Application(middlewares=[auth], client_max_size=64 * 1024)
    app[APP_KEY] = state
    app.router.add_get("/health", state.health)
    app.router.add_get("/status", state.status)
    app.router.add_get("/metrics", state.metrics)
    app.router.add_get("/config", state.config)
    app.router.add_get("/", state.page)
    for action in ("start", "stop", "restart"):
        app.router.add_post(f"/{action}", state.control)
    return app


# -- the program ---------------------------------------------------------------------------------

def alerts_beside(cfg: Config, path: str | os.PathLike | None = None) -> Config:
    """``alerts.toml`` (``path``, else the file of that name beside the loaded
    ``ops.toml``), checked; an absent file reads as its defaults.  Raises
    :class:`ConfigError`."""
    from ..settings import ALERTS_FILE, alerts_path, empty, load
    p = alerts_path(cfg.file, path)
    return load(p, ALERTS_FILE) if p.exists() else empty(p, ALERTS_FILE)


def settings_from_config(cfg: Config, config_dir: str | os.PathLike | None = None,
                         alerts: Config | None = None) -> Settings:
    """:class:`Settings` of a loaded ``ops.toml`` and ``alerts.toml`` (None:
    :func:`alerts_beside`); reads the token file, mode 0600; raises
    :class:`ConfigError`."""
    from ..config import read_secret
    from ..settings import database_dsn
    token = read_secret(cfg["api.token_file"], "api.token_file", cfg.file)
    return Settings(token=token, dsn=database_dsn(cfg, shared_secret=True),
                    config_dir=str(config_dir or Path(cfg.file).parent),
                    params=checks.Params.from_config(alerts if alerts is not None else alerts_beside(cfg)))


async def serve(cfg: Config, manager: Manager | None = None, config_dir: str | None = None,
                alerts: Config | None = None) -> None:
    """Run feed-api until SIGTERM/SIGINT: READY=1 once listening, WATCHDOG=1
    while the event loop runs."""
    from ..runtime import notify, watchdog_interval
    from .systemd_bus import SystemdManager
    settings = settings_from_config(cfg, config_dir, alerts)
    app = create_app(settings, manager or SystemdManager())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    address, port = cfg["api.address"], cfg["api.port"]
    site = web.TCPSite(runner, address, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise SystemExit(f"cannot listen on {address}:{port}: {e.strerror}") from None
    log.info("feed-api listening on http://%s:%d/", address, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notify("READY=1", f"STATUS=listening on {address}:{port}")
    period = watchdog_interval(10.0)
    try:
        while not stop.is_set():
            notify("WATCHDOG=1")
            try:
                await asyncio.wait_for(stop.wait(), period)
            except asyncio.TimeoutError:
                pass
    finally:
        log.info("stopping")
        notify("STOPPING=1")
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """``feed-api [--config /etc/feeds/ops.toml] [--alerts-config FILE]
    [--config-dir DIR]`` (env ``FEEDS_OPS_CONFIG``, ``FEEDS_ALERTS_CONFIG``;
    alerts.toml defaults to the file beside ops.toml).  Exit 78 for a bad
    configuration."""
    import argparse

    from ..config import EX_CONFIG
    from ..runtime import setup_logging
    from ..settings import OPS_FILE, load
    p = argparse.ArgumentParser(prog="feed-api", description="Control API and status page of the feeds.")
    p.add_argument("--config", default=os.environ.get("FEEDS_OPS_CONFIG", "/etc/feeds/ops.toml"))
    p.add_argument("--alerts-config", default=os.environ.get("FEEDS_ALERTS_CONFIG"),
                   help="alerts.toml (default: beside --config); the health threshold and rate drop")
    p.add_argument("--config-dir", default=None, help="directory whose *.toml GET /config shows "
                   "(default: the directory of --config)")
    args = p.parse_args(argv)
    setup_logging()
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        cfg = load(args.config, OPS_FILE)
        asyncio.run(serve(cfg, config_dir=args.config_dir, alerts=alerts_beside(cfg, args.alerts_config)))
    except ConfigError as e:
        print(str(e), flush=True, file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
