"""Small operator commands: ``feed-migrate``, ``feed-maintain``, ``feedctl``."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import click
import psycopg
from psycopg import errors as pgerr

from .config import EX_NOPERM
from .config import first_line as _first_line
from .config import EX_CONFIG, Config, ConfigError, exit_on_config_error
from .migrate import MigrationError, apply, default_sql_dir
from .db import connect
from .runtime import setup_logging
from .settings import ALERTS_FILE, FEEDS_FILE, OPS_FILE, Schema, alerts_path, database_dsn, empty, load

log = logging.getLogger("feeds")
COMMON = "/etc/feeds/feeds.toml"


def _common_config(config_path: str) -> Config:
    """``feeds.toml``, checked; an absent file reads as empty (enough when
    FEEDS_DSN is set, otherwise ``database_dsn`` names the missing key)."""
    return load(config_path, FEEDS_FILE) if Path(config_path).exists() else empty(config_path, FEEDS_FILE)




@click.command()
@click.option("--config", "config_path", envvar="FEEDS_CONFIG", default=COMMON, show_default=True)
@click.option("--sql-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@exit_on_config_error
def migrate(config_path: str, sql_dir: Path | None) -> None:
    """Apply pending SQL migrations in order (idempotent)."""
    setup_logging()
    try:
        done = apply(database_dsn(_common_config(config_path)), sql_dir or default_sql_dir())
    except MigrationError as e:
        log.error("%s", e)
        sys.exit(1)
    except psycopg.OperationalError as e:
        log.error("cannot connect to the database: %s", _first_line(e))
        sys.exit(1)
    log.info("migrations: %s", ", ".join(done) if done else "nothing to apply (up to date)")


class UnknownTables(Exception):
    """Retention was given for tables feed-maintain does not manage.
    ``tables``: those names; ``known``: the partitioned tables."""

    def __init__(self, tables: list[str], known: list[str]):
        self.tables, self.known = tables, known
        super().__init__(f"not partitioned tables: {', '.join(tables)}")


@dataclass
class Maintenance:
    """What :func:`run_maintenance` did: ``done`` as ``(table, created,
    dropped)`` and ``failed`` as ``{table: reason}`` (tables whose locks were
    not granted within the retries)."""

    done: list[tuple[str, int, int]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def __iter__(self):
        return iter(self.done)


_LOCK_ERRORS = (pgerr.LockNotAvailable, pgerr.QueryCanceled)


def run_maintenance(dsn: str, retention: dict[str, int] | None = None, *, lock_timeout: float = 5.0,
                    statement_timeout: float = 60.0, attempts: int = 5, retry_delay: float = 2.0) -> Maintenance:
    """Create daily partitions ahead and drop those past retention.

    ``retention``: optional ``{table: keep_days}`` overriding (and stored in)
    ``feed_partitioned_table.keep_days``.  Each statement waits at most
    ``lock_timeout`` seconds for its locks and runs at most
    ``statement_timeout`` seconds (a DDL statement waiting for a lock makes
    every later reader and writer of the table queue behind it); one refused
    is tried again up to ``attempts`` times, ``retry_delay`` seconds later,
    doubled each time (at most 30 s).  A table still refused is left for the
    next run and reported in ``failed``; the others are maintained.

    Returns :class:`Maintenance` (iterating it gives the ``(table, created,
    dropped)`` of the tables done).  Raises :class:`UnknownTables` (nothing
    changed) for retention of a table that is not a partitioned table, and
    ``psycopg.Error`` when the database fails otherwise.
    """
    out = Maintenance()
    with connect(dsn, application_name="feed-maintain", statement_timeout=statement_timeout,
                    lock_timeout=lock_timeout) as conn:
        rows = conn.execute("SELECT table_name::text, keep_days, ahead_days FROM feed_partitioned_table "
                            "ORDER BY 1").fetchall()
        known = [r[0] for r in rows]
        unknown = [t for t in (retention or {}) if t not in known]
        if unknown:
            raise UnknownTables(unknown, known)
        for table, keep, ahead in rows:
            keep = (retention or {}).get(table, keep)

            def work(table=table, keep=keep, ahead=ahead) -> tuple[int, int]:
                with conn.transaction():
                    conn.execute("UPDATE feed_partitioned_table SET keep_days = %s "
                                 "WHERE table_name = %s::regclass AND keep_days <> %s", (keep, table, keep))
                    created = conn.execute("SELECT feeds_ensure_day_partitions(%s::regclass, "
                                           "(now() AT TIME ZONE 'UTC')::date, %s)", (table, ahead + 1)).fetchone()[0]
                    dropped = conn.execute("SELECT feeds_drop_day_partitions(%s::regclass, %s)",
                                           (table, keep)).fetchone()[0]
                return created, dropped
            delay = retry_delay
            for attempt in range(1, attempts + 1):
                try:
                    created, dropped = work()
                except _LOCK_ERRORS as e:
                    if attempt == attempts:
                        out.failed[table] = f"{_first_line(e)} ({attempts} attempt(s))"
                        break
                    log.warning("%s: %s; attempt %d of %d, next in %.1f s", table, _first_line(e), attempt,
                                attempts, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)
                else:
                    out.done.append((table, created, dropped))
                    break
    return out


def _write_job_textfile(cfg: Config, job: str, started: float, code: int, extra: dict[str, float]) -> None:
    """The node_exporter textfile of a oneshot job, in ``metrics.textfile_dir``
    of ``cfg``; skipped when that directory is empty or does not exist."""
    from .ops.metrics import job_values, write_textfile
    directory = cfg["metrics.textfile_dir"]
    if directory and Path(directory).is_dir():
        write_textfile(directory, job, job_values(started, code, **extra))


@click.command()
@click.option("--config", "config_path", envvar="FEEDS_CONFIG", default=COMMON, show_default=True)
@exit_on_config_error
def maintain(config_path: str) -> None:
    """Create tomorrow's partitions and drop those older than the retention.

    Exit status: 0 every table maintained; 1 a table could not be maintained
    (its locks were not granted within the retries; it is named) or the
    database failed; 78 a configuration error (also retention for a table
    that is not a partitioned table).  After a run that reached the
    database, writes the node_exporter textfile ``feeds_maintain.prom``
    (job ``maintain``: last run, success, duration, exit code, partitions
    created and dropped, tables failed) when the textfile directory exists."""
    setup_logging()
    cfg = _common_config(config_path)
    dsn = database_dsn(cfg)
    started = time.time()
    try:
        res = run_maintenance(dsn, cfg["retention"], lock_timeout=cfg["maintain.lock_timeout"],
                              statement_timeout=cfg["maintain.statement_timeout"],
                              attempts=cfg["maintain.attempts"], retry_delay=cfg["maintain.retry_delay"])
    except UnknownTables as e:
        _write_job_textfile(cfg, "maintain", started, EX_CONFIG, {})
        raise ConfigError(f"retention.{e.tables[0]}", cfg.file,
                          f"not a partitioned table (feed-maintain manages: {', '.join(e.known) or 'none'})") from None
    except psycopg.Error as e:
        log.error("maintenance failed: %s", _first_line(e))
        _write_job_textfile(cfg, "maintain", started, 1, {})
        sys.exit(1)
    for table, created, dropped in res.done:
        log.info("%s: %d partition(s) created, %d dropped", table, created, dropped)
    for table, reason in res.failed.items():
        log.error("%s: not maintained: %s", table, reason)
    code = 1 if res.failed else 0
    _write_job_textfile(cfg, "maintain", started, code, {
        "partitions_created": float(sum(c for _, c, _ in res.done)),
        "partitions_dropped": float(sum(d for _, _, d in res.done)),
        "tables_failed": float(len(res.failed))})
    sys.exit(code)


# -- feedctl ---------------------------------------------------------------------------------------

#: feedctl's configuration: the operators' file (database role feeds_ops, API); the alerts'
#: file (channels, conditions) is alerts.toml beside it unless --alerts-config names another.
OPS = "/etc/feeds/ops.toml"
#: Runs systemctl and journalctl (``argv -> (returncode, stdout)``); None: feeds.ops.gather.run_command.
RUNNER = None
#: Whether to ask systemd; None: when systemd is PID 1 (or RUNNER is set).
SYSTEMD: bool | None = None
#: Exit status when the database cannot be reached.
EX_DB = 2
#: Exit status when this user may not read ops.toml or alerts.toml (EX_NOPERM).
#: Exit status of ``check`` when its alert state cannot be read or written (EX_CANTCREAT):
#: feed-check.service then fails, and its OnFailure= alert says so.
EX_STATE = 73


def _runner():
    from .ops import gather as G
    return RUNNER if RUNNER is not None else G.run_command


def _systemd() -> bool:
    from .ops import gather as G
    if SYSTEMD is not None:
        return SYSTEMD
    return True if RUNNER is not None else G.systemd_booted()


def _operators_file(path: str | os.PathLike, schema: Schema) -> Config:
    """One of the operators' files, checked; an absent file reads as empty
    (its defaults).  Exits 77 with one line when this user may not read it."""
    if Path(path).exists() and not os.access(path, os.R_OK):
        click.echo(f"feedctl: cannot read {path}: feedctl is for root and the members of the group feeds_ops "
                   f"(sudo usermod -aG feeds_ops $USER, then log in again)", err=True)
        sys.exit(EX_NOPERM)
    return load(path, schema) if Path(path).exists() else empty(path, schema)


def _ops_config(ctx: click.Context, config_path: str | None) -> Config:
    """``ops.toml`` (the subcommand's --config, else feedctl's --config, else
    FEEDS_OPS_CONFIG, else /etc/feeds/ops.toml), checked; an absent file reads
    as empty (enough with FEEDS_DSN, or a feeds.toml beside it)."""
    return _operators_file(config_path or (ctx.find_root().obj or {}).get("config") or OPS, OPS_FILE)


def _alerts_config(ctx: click.Context, ops: Config) -> Config:
    """``alerts.toml``: feedctl's --alerts-config (FEEDS_ALERTS_CONFIG), else
    the file of that name beside the ops.toml in use; checked, an absent file
    reads as its defaults (no channel)."""
    return _operators_file(alerts_path(ops.file, (ctx.find_root().obj or {}).get("alerts_config")), ALERTS_FILE)


def _connect(cfg: Config, statement_timeout: float = 30.0):
    """A session of feedctl; prints one line and exits 2 when the database
    cannot be reached."""
    dsn = database_dsn(cfg, shared_secret=True)
    try:
        return connect(dsn, application_name="feedctl", statement_timeout=statement_timeout, connect_timeout=5)
    except psycopg.Error as e:
        click.echo(f"database unreachable: {_first_line(e)}", err=True)
        sys.exit(EX_DB)


def _now(value: str | None) -> datetime:
    if not value:
        return datetime.now(timezone.utc)
    t = datetime.fromisoformat(value)
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


_config_option = click.option("--config", "config_path", default=None, metavar="FILE",
                              help="ops.toml (default: feedctl's --config, FEEDS_OPS_CONFIG, /etc/feeds/ops.toml); "
                                   "alerts.toml is read beside it.")
_now_option = click.option("--now", "now_text", default=None, hidden=True,
                           help="Judge as if it were this time (ISO 8601; UTC unless an offset is given).")


@click.group()
@click.option("--config", "config_path", envvar="FEEDS_OPS_CONFIG", default=OPS, show_default=True,
              help="The operators' configuration (database role feeds_ops, control API).")
@click.option("--alerts-config", "alerts_path", envvar="FEEDS_ALERTS_CONFIG", default=None, metavar="FILE",
              help="The alerts' configuration (channels, conditions) [default: alerts.toml beside ops.toml].")
@click.pass_context
def feedctl(ctx: click.Context, config_path: str, alerts_path: str | None) -> None:
    """Look at the feeds: unit states, health, gaps, reports, the kline check, alerts.

    Every subcommand reads ops.toml and connects as its database role (root
    or a member of the group feeds_ops); status, check, gaps, report and
    alert also read alerts.toml.  Exit status 2: the database cannot be
    reached; 77: this user may not read them; 78: a configuration error."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config_path
    ctx.obj["alerts_config"] = alerts_path


def _memory(alerts: Config, notes: list[str]):
    """The check memory (read-only use): None when it cannot be read."""
    from .ops.gather import Memory
    path = Memory.path_for(alerts["alerts.state_file"])
    try:
        path.stat()
    except FileNotFoundError:
        return Memory(None)
    except OSError as e:
        notes.append(f"check memory {path} not readable ({e.strerror}): uptime, filled gaps and alerts unknown")
        return None
    if not os.access(path, os.R_OK):
        notes.append(f"check memory {path} not readable by this user: uptime, filled gaps and alerts unknown")
        return None
    return Memory(path)


def _gather(cfg: Config, conn, now: datetime, memory):
    from .ops import gather as G
    return G.gather(now, conn, memory=memory if memory is not None else G.Memory(None), runner=_runner(),
                    systemd=_systemd(), spool_root=G.SPOOL_ROOT, kite_config=G.KITE_CONFIG)


def _stand_in_units(g) -> dict:
    """Without systemd: each heartbeat's state stands in for the unit's
    (for the health score only)."""
    from .ops.checks import UnitFacts
    if g.systemd:
        return dict(g.facts.units)
    return {u: UnitFacts("inactive" if hb.state in ("stopped", "failed") else "active", hb.state)
            for u, hb in g.facts.heartbeats.items()}


def _last_error_line(unit: str) -> str | None:
    try:
        rc, out = _runner()(["journalctl", "-u", unit, "-p", "err", "-n", "1", "--no-pager", "-o", "cat"])
    except OSError:
        return None
    lines = [ln for ln in out.splitlines() if ln.strip()] if rc == 0 else []
    return lines[-1][:300] if lines else None


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@feedctl.command()
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--stale-after", default=60, show_default=True, help="Seconds after which a heartbeat is stale.")
@_now_option
@click.pass_context
@exit_on_config_error
def status(ctx: click.Context, config_path: str | None, as_json: bool, stale_after: int,
           now_text: str | None) -> None:
    """Every feed unit (from systemd and the heartbeats): systemd state, health
    score (0-100), heartbeat age, rates per stream kind (the STATUS line's:
    messages per second over the last status interval), spool, last error.
    Exit 1 if any active unit's heartbeat is stale (without systemd: a unit
    whose heartbeat says it runs, during its session), 2 when the database
    cannot be reached."""
    from dataclasses import replace
    from .ops import checks
    from .ops.gather import expected_now
    cfg = _ops_config(ctx, config_path)
    acfg = _alerts_config(ctx, cfg)
    now = _now(now_text)
    notes: list[str] = []
    memory = _memory(acfg, notes)
    with _connect(cfg) as conn:
        g = _gather(cfg, conn, now, memory)
    params = checks.Params.from_config(acfg, stale_after_s=float(stale_after))
    ev = checks.evaluate(replace(g.facts, units=_stand_in_units(g)), params)
    spools = {}
    for sp in g.facts.spools:
        spools.setdefault(sp.unit, sp)
    out, bad = [], False
    for unit in sorted(set(g.facts.units) | set(g.facts.heartbeats)):
        uf = g.facts.units.get(unit)
        hb = g.facts.heartbeats.get(unit)
        if uf is None and hb is None:
            continue
        age = (now - hb.updated_at).total_seconds() if hb is not None else None
        if uf is not None:
            active = uf.active
        elif hb is not None and checks.rule_of_unit(unit).kind != "none":
            try:
                active = hb.state not in ("stopped", "failed") and expected_now(unit, now, None)
            except Exception:
                active = False
        else:
            active = False
        stale = bool(active and checks.rule_of_unit(unit).kind != "none" and (age is None or age > stale_after))
        bad |= stale
        sc = ev.scores.get(unit)
        last_error = None
        if hb is not None and hb.state in ("degraded", "spooling", "failed"):
            last_error = hb.status
        elif uf is not None and (uf.active_state == "failed" or uf.result not in ("success", "")):
            last_error = _last_error_line(unit) or f"result {uf.result}"
        sp = spools.get(unit)
        out.append({
            "unit": unit,
            "systemd": f"{uf.active_state}/{uf.sub_state}" if uf is not None and uf.sub_state else
                       (uf.active_state if uf is not None else "unknown"),
            "result": uf.result if uf is not None else None,
            "restarts": uf.n_restarts if uf is not None else None,
            "state": hb.state if hb is not None else None,
            "heartbeat_age_s": round(age, 1) if age is not None else None,
            "stale": stale,
            "health": sc.as_dict() if sc is not None else None,
            "rates": {k: r for (u, k), r in sorted(g.rates.items()) if u == unit},
            "spool": {"path": sp.path, "files": sp.files, "bytes": sp.bytes} if sp is not None else None,
            "last_error": last_error,
            "status": hb.status if hb is not None else None,
        })
    if as_json:
        click.echo(json.dumps({"at": now.isoformat(timespec="seconds"), "units": out, "notes": g.notes + notes},
                              indent=2))
    else:
        for o in out:
            health = f"health {o['health']['total']:>3}" if o["health"] else "health   -"
            hb_txt = f"heartbeat {o['heartbeat_age_s']:>7.1f}s ago" if o["heartbeat_age_s"] is not None \
                else "no heartbeat"
            flag = " STALE" if o["stale"] else ""
            click.echo(f"{o['unit']:<32} {o['systemd']:<18} {health}  {hb_txt}{flag}")
            if o["rates"]:
                click.echo("    rates: " + ", ".join(f"{k} {r:,.1f}/s" for k, r in o["rates"].items()))
            if o["spool"] and (o["spool"]["files"] or o["spool"]["bytes"]):
                click.echo(f"    spool: {o['spool']['files']} file(s), {_bytes(o['spool']['bytes'])} in "
                           f"{o['spool']['path']}")
            if o["health"] and o["health"]["reasons"]:
                click.echo("    health: " + "; ".join(o["health"]["reasons"]))
            if o["last_error"]:
                click.echo(f"    last error: {o['last_error']}")
            elif o["status"]:
                click.echo(f"    {o['status']}")
        if not out:
            click.echo("no feed unit and no heartbeat yet")
        for n in g.notes + notes:
            click.echo(f"note: {n}")
    sys.exit(1 if bad else 0)


@feedctl.command()
@_config_option
@_now_option
@click.pass_context
@exit_on_config_error
def check(ctx: click.Context, config_path: str | None, now_text: str | None) -> None:
    """Judge every alert condition now and tell the alert channels what
    started or cleared (run every minute by feed-check.timer).

    Prints each condition that holds and each alert sent.  Each condition is
    told once when it starts and once when it clears (alerts.state_file);
    the runs' memory (counters, usual rates, uptime samples, alerts sent)
    is kept beside it in check-memory.json.  Exit status 0 nothing holds, 1
    something holds, 2 the database cannot be reached (still alerted, as
    condition "database"; the other conditions are kept as they were), 73
    the alert state cannot be read or written, 78 a configuration error."""
    from .ops import checks
    from .ops.alerts import AlertState, Channels
    from .ops.gather import Memory
    setup_logging()
    cfg = _ops_config(ctx, config_path)
    acfg = _alerts_config(ctx, cfg)
    params = checks.Params.from_config(acfg)
    dsn = database_dsn(cfg, shared_secret=True)
    channels = Channels.from_config(acfg)
    now = _now(now_text)
    try:
        state = AlertState.from_config(acfg, channels.names)
        memory = Memory(Memory.path_for(acfg["alerts.state_file"]))
    except (OSError, ValueError) as e:
        click.echo(f"alert state not usable: {_first_line(e)}", err=True)
        sys.exit(EX_STATE)
    try:
        conn = connect(dsn, application_name="feedctl check", statement_timeout=30.0, connect_timeout=5)
        unreachable = None
    except psycopg.Error as e:
        conn, unreachable = None, _first_line(e)
    try:
        g = _gather(cfg, conn, now, memory)
    finally:
        if conn is not None:
            conn.close()
    if unreachable is not None:
        holding = {k: (c["title"], c["body"], c["severity"]) for k, c in state.conditions.items()
                   if c.get("cleared") is None}
        holding["database"] = (
            "feeds: database unreachable",
            f"feedctl check cannot reach PostgreSQL: {unreachable}.\nThe collectors spool to disk while it "
            f"is down; nothing else can be checked.\nWhat to do:\n  systemctl status postgresql\n"
            f"  journalctl -u postgresql -e\n  df -h /var/lib/postgresql",
            "critical")
        ev = None
    else:
        ev = checks.evaluate(g.facts, params)
        holding = ev.holding
    if not len(channels):
        click.echo(f"note: no alert channel (alerts.url_files is empty in {acfg.file}): nothing is sent")
    try:
        results = state.deliver(holding, now, channels)
        if ev is not None:
            memory.doc["checks"] = ev.memory
            memory.record_uptime(now, g.up)
            memory.learn_rates(now, {(u, k): r for (u, k), r in g.rates.items() if g.up.get(u) == (True, True)})
            memory.record_scores(now, ev.scores)
        memory.record_alerts(now, results)
        memory.prune(now)
        memory.save()
    except OSError as e:
        click.echo(f"alert state not writable: {e.strerror or e} ({getattr(e, 'filename', '')})", err=True)
        sys.exit(EX_STATE)
    for key, (title, _, severity) in sorted(holding.items()):
        click.echo(f"holds [{severity}] {key}: {title}")
    for alert, ok in results:
        if not len(channels):
            click.echo(f"due {alert.status} {alert.key}: no channel to send it to (recorded as told)")
            continue
        click.echo(f"sent {alert.status} {alert.key}: "
                   + ("accepted" if ok else "NOT accepted by every channel (offered again next run)"))
    for n in g.notes:
        click.echo(f"note: {n}")
    if unreachable is not None:
        click.echo(f"database unreachable: {unreachable}", err=True)
        sys.exit(EX_DB)
    sys.exit(1 if holding else 0)


@feedctl.command()
@_config_option
@click.option("--since", default="7d", show_default=True, metavar="DATE",
              help="From then on: YYYY-MM-DD, YYYY-MM-DDTHH:MM (UTC) or 7d / 12h back.")
@click.option("--stream", type=click.Choice(["binance_agg_trade", "binance_kline", "ibkr_bar_1min", "dhan_bar"]),
              default=None, help="Only this stream.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_now_option
@click.pass_context
@exit_on_config_error
def gaps(ctx: click.Context, config_path: str | None, since: str, stream: str | None, as_json: bool,
         now_text: str | None) -> None:
    """Missing id ranges or minutes per stream and day, and which were filled:
    Binance aggTrade id gaps (filled, filling, not filled), Binance minutes
    whose kline disagreed (repaired or not), IBKR and Dhan history sessions
    not complete (Dhan's THIN sessions too: minutes without a trade).  A
    stream whose table is not there yet is a note.  Exit status 0, 2 when
    the database cannot be reached."""
    from .ops import report as R
    cfg = _ops_config(ctx, config_path)
    now = _now(now_text)
    notes: list[str] = []
    memory = _memory(_alerts_config(ctx, cfg), notes)
    try:
        with _connect(cfg) as conn:
            doc = R.gaps(conn, now, since=_since(since, now) or now - timedelta(days=7), stream=stream,
                         memory=memory, notes=notes)
    except psycopg.Error as e:
        click.echo(f"database error: {_first_line(e)}", err=True)
        sys.exit(EX_DB)
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
    else:
        for ln in R.gaps_text(doc):
            click.echo(ln)


@feedctl.command()
@_config_option
@click.option("--daily", "kind", flag_value="daily", default=True, help="One UTC day (default: yesterday).")
@click.option("--weekly", "kind", flag_value="weekly", help="One ISO week, Monday to Sunday (default: last week).")
@click.option("--date", "day", default=None, metavar="YYYY-MM-DD", help="A day of the period.")
@click.option("--exact", is_flag=True, help="Count every row (slow on large days) instead of the planner's estimate.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_now_option
@click.pass_context
@exit_on_config_error
def report(ctx: click.Context, config_path: str | None, kind: str, day: str | None, exact: bool, as_json: bool,
           now_text: str | None) -> None:
    """Per feed, over a UTC day or an ISO week: rows stored per table, uptime
    inside its sessions (from feedctl check's runs), gaps, alerts sent,
    health score; for feed-dhan-backfill also the adjustments found and the
    reconciliation of the live candles with Dhan's, per instrument.  Exit
    status 0, 2 when the database cannot be reached."""
    from .ops import checks
    from .ops import report as R
    cfg = _ops_config(ctx, config_path)
    now = _now(now_text)
    if day:
        try:
            d = date.fromisoformat(day)
        except ValueError:
            raise click.BadParameter("use YYYY-MM-DD", param_hint="--date") from None
    else:
        d = now.date() - timedelta(days=1 if kind == "daily" else 7)
    notes: list[str] = []
    acfg = _alerts_config(ctx, cfg)
    memory = _memory(acfg, notes)
    from dataclasses import replace
    try:
        with _connect(cfg, statement_timeout=300.0) as conn:
            g = _gather(cfg, conn, now, memory)
            ev = checks.evaluate(replace(g.facts, units=_stand_in_units(g)), checks.Params.from_config(acfg))
            doc = R.report(conn, kind, d, memory=memory, scores=ev.scores,
                           units=sorted(set(g.facts.units) | set(g.facts.heartbeats)), exact=exact, notes=notes)
    except psycopg.Error as e:
        click.echo(f"database error: {_first_line(e)}", err=True)
        sys.exit(EX_DB)
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
    else:
        for ln in R.report_text(doc):
            click.echo(ln)


def _since(value: str | None, now: datetime | None = None) -> datetime | None:
    """``--since``: ``YYYY-MM-DD``, ``YYYY-MM-DDTHH:MM`` (UTC unless an offset is given) or ``Nd``/``Nh``
    back from ``now`` (default: the current time)."""
    if not value:
        return None
    v = value.strip()
    now = datetime.now(timezone.utc) if now is None else now
    if v[:-1].isdigit() and v[-1:] in ("d", "h"):
        n = int(v[:-1])
        return now - (timedelta(days=n) if v[-1] == "d" else timedelta(hours=n))
    try:
        t = datetime.fromisoformat(v)
    except ValueError:
        raise click.BadParameter("use YYYY-MM-DD, YYYY-MM-DDTHH:MM or a number of days/hours back (7d, 12h)",
                                 param_hint="--since") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


KLINE_CHECK_SQL = """
SELECT f.symbol, f.open_time, f.checked_at, f.differs, f.note,
       f.kline_open::text, f.kline_high::text, f.kline_low::text, f.kline_close::text, f.kline_volume::text,
       f.kline_trades,
       f.agg_open::text, f.agg_high::text, f.agg_low::text, f.agg_close::text, f.agg_volume::text, f.agg_trades,
       a.checked_at, a.repaired, a.differs, a.basis, a.rest_trades, a.note,
       a.agg_open::text, a.agg_high::text, a.agg_low::text, a.agg_close::text, a.agg_volume::text, a.agg_trades
  FROM binance_kline_check f
  LEFT JOIN LATERAL (
        SELECT * FROM binance_kline_check x
         WHERE x.symbol = f.symbol AND x.open_time = f.open_time AND x.stage = 'after_fill'
           AND x.checked_at >= f.checked_at
         ORDER BY x.checked_at LIMIT 1) a ON true
 WHERE f.stage = 'found'
   AND (%(symbol)s::text IS NULL OR f.symbol = %(symbol)s)
   AND (%(since)s::timestamptz IS NULL OR f.open_time >= %(since)s)
 ORDER BY f.open_time DESC, f.symbol
 LIMIT %(limit)s"""

_KC_FIELDS = ("open", "high", "low", "close", "volume", "trades")


def _kline_check_rows(rows) -> list[dict]:
    out = []
    for r in rows:
        (sym, minute, found_at, differs, note, *rest) = r
        kline = dict(zip(_KC_FIELDS, rest[0:6]))
        found = dict(zip(_KC_FIELDS, rest[6:12]))
        after_at, repaired, after_differs, basis, rest_trades, after_note = rest[12:18]
        after = dict(zip(_KC_FIELDS, rest[18:24]))
        out.append({
            "symbol": sym, "minute": minute.astimezone(timezone.utc).isoformat(),
            "found_at": found_at.astimezone(timezone.utc).isoformat(),
            "differs": [x for x in differs.split(",") if x], "kline": kline, "aggtrades": found,
            "state": ("repaired" if repaired else "not repaired") if after_at is not None else
                     ("not filled" if note else "fill pending"),
            "note": note,
            "after_fill": None if after_at is None else {
                "checked_at": after_at.astimezone(timezone.utc).isoformat(), "repaired": repaired,
                "differs": [x for x in (after_differs or "").split(",") if x], "basis": basis,
                "rest_trades": rest_trades, "aggtrades": after, "note": after_note},
        })
    return out


@feedctl.command("kline-check")
@_config_option
@click.option("--symbol", default=None, help="Only this symbol (e.g. BTCUSDT).")
@click.option("--since", default=None, metavar="DATE",
              help="Minutes from then on: YYYY-MM-DD, YYYY-MM-DDTHH:MM (UTC) or 7d / 12h back.")
@click.option("--limit", default=200, show_default=True, help="At most this many minutes, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@exit_on_config_error
def kline_check(ctx: click.Context, config_path: str | None, symbol: str | None, since: str | None, limit: int,
                as_json: bool) -> None:
    """Minutes whose closed Binance kline disagreed with the aggTrades
    feed-binance stored (binance_kline_check), newest first, and whether the
    aggTrade fill of the minute repaired them.  Exit status 0 (also when
    there are none), 2 when the database cannot be read."""
    cfg = _ops_config(ctx, config_path)
    params = {"symbol": symbol.upper() if symbol else None, "since": _since(since), "limit": max(1, limit)}
    with _connect(cfg) as conn:
        try:
            rows = conn.execute(KLINE_CHECK_SQL, params).fetchall()
        except psycopg.Error as e:
            click.echo(f"database unreachable: {_first_line(e)}", err=True)
            sys.exit(EX_DB)
    out = _kline_check_rows(rows)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    if not out:
        click.echo("no minute disagreed" + (f" for {params['symbol']}" if symbol else "")
                   + (f" since {params['since']:%Y-%m-%d %H:%M} UTC" if params["since"] else ""))
        return
    for o in out:
        k, g = o["kline"], o["aggtrades"]
        click.echo(f"{o['minute'][:16].replace('T', ' ')} {o['symbol']:<14} {o['state']:<13} "
                   f"differs: {', '.join(o['differs'])}; kline n {k['trades']} v {k['volume']}, "
                   f"aggTrades n {g['trades']} v {g['volume']}")
        a = o["after_fill"]
        if a is not None:
            ga = a["aggtrades"]
            click.echo(f"    after the fill ({a['rest_trades']} aggTrades from REST, compared with the "
                       f"{'stored' if a['basis'] == 'stored' else 'REST'} ones): n {ga['trades']} v {ga['volume']}"
                       + (f"; still differs: {', '.join(a['differs'])}" if a["differs"] else "")
                       + (f"; {a['note']}" if a["note"] else ""))
        elif o["note"]:
            click.echo(f"    {o['note']}")



def failure_hint(props: dict[str, str]) -> str:
    """What a unit's failure usually means and what to do, from ``systemctl
    show`` properties (``Result``, ``ExecMainStatus``, ``NRestarts``)."""
    unit = props.get("Id", "the unit")
    result = props.get("Result", "")
    status = props.get("ExecMainStatus", "")
    lines = []
    if result == "start-limit-hit":
        lines.append(f"systemd gave up restarting {unit}: it failed too often in a short time "
                     f"(start limit hit, {props.get('NRestarts', '?')} restart(s)). Fix the cause, then:")
        lines.append(f"  systemctl reset-failed {unit}")
        lines.append(f"  systemctl start {unit}")
    elif status == str(EX_CONFIG):
        lines.append(f"{unit} exited 78: a configuration error (the journal names the key and the file); "
                     "systemd does not restart it. Fix the file, then:")
        lines.append(f"  systemctl restart {unit}")
    elif result == "watchdog":
        lines.append(f"{unit} stopped pinging the watchdog (no data flowing or stored) and was killed. "
                     "It is restarted automatically; if it is not running:")
        lines.append(f"  systemctl restart {unit}")
    else:
        lines.append(f"{unit} ended with result {result or '?'}"
                     + (f" (exit status {status})" if status not in ("", "0") else "") + ". If it is not running:")
        lines.append(f"  systemctl restart {unit}")
    return "\n".join(lines)


@feedctl.command("alert")
@_config_option
@click.option("--test", "send_test", is_flag=True, help="Send a test message to every channel.")
@click.option("--unit", "unit", default=None, metavar="UNIT",
              help="Tell every channel that UNIT failed, with its last journal lines (feed-alert@.service).")
@click.pass_context
@exit_on_config_error
def alert(ctx: click.Context, config_path: str | None, send_test: bool, unit: str | None) -> None:
    """Alert channels (alerts.url_files in alerts.toml).  ``--test`` sends a
    test message to each and prints, per channel (named by its file), whether
    it accepted; exit 0 when every channel did, 1 when one did not or none is
    configured.  ``--unit UNIT`` (run by feed-alert@UNIT.service through
    OnFailure=) sends UNIT's failure with its last alerts.journal_lines
    journal lines and what to do; exit 0 when at least one channel accepted
    it, 1 otherwise.  78 for a bad configuration."""
    from .ops.alerts import Channels, test_message, unit_failure_alert
    if send_test == bool(unit):
        raise click.UsageError("give either --test or --unit UNIT")
    setup_logging()
    cfg = _alerts_config(ctx, _ops_config(ctx, config_path))
    channels = Channels.from_config(cfg)
    if not len(channels):
        click.echo(f"no alert channel: alerts.url_files is empty in {cfg.file}", err=True)
        sys.exit(1)
    if send_test:
        results = channels.send_each(test_message())
        for name, ok in results.items():
            click.echo(f"{name}: {'accepted' if ok else 'NOT accepted (see the log above)'}")
        sys.exit(0 if all(results.values()) else 1)
    run = _runner()
    n = cfg["alerts.journal_lines"]
    lines: list[str] = []
    if n > 0:
        try:
            rc, out = run(["journalctl", "-u", unit, "-n", str(n), "--no-pager", "-o", "short-iso"])
            lines = out.splitlines()[-n:] if rc == 0 else [f"(journalctl exited {rc})"]
        except OSError as e:
            lines = [f"(journal not readable: {_first_line(e)})"]
    props: dict[str, str] = {"Id": unit}
    try:
        rc, out = run(["systemctl", "show", "-p", "Id,Result,ExecMainStatus,NRestarts,ActiveState", "--", unit])
        if rc == 0:
            props.update(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)
    except OSError:
        pass
    results = channels.send_each(unit_failure_alert(unit, lines, failure_hint(props)))
    for name, ok in results.items():
        click.echo(f"{name}: {'accepted' if ok else 'NOT accepted (see the log above)'}")
    sys.exit(0 if any(results.values()) else 1)
