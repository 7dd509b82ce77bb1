"""Small operator commands: ``feed-migrate``, ``feed-maintain``, ``feedctl``."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click
import psycopg
from psycopg import errors as pgerr

from .config import Config, ConfigError, exit_on_config_error
from .migrate import MigrationError, apply, default_sql_dir
from .db import connect
from .runtime import setup_logging
from .settings import FEEDS_FILE, database_dsn, empty, load

log = logging.getLogger("feeds")
COMMON = "/etc/feeds/feeds.toml"


def _common_config(config_path: str) -> Config:
    """``feeds.toml``, checked; an absent file reads as empty (enough when
    FEEDS_DSN is set, otherwise ``database_dsn`` names the missing key)."""
    return load(config_path, FEEDS_FILE) if Path(config_path).exists() else empty(config_path, FEEDS_FILE)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


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


@click.command()
@click.option("--config", "config_path", envvar="FEEDS_CONFIG", default=COMMON, show_default=True)
@exit_on_config_error
def maintain(config_path: str) -> None:
    """Create tomorrow's partitions and drop those older than the retention.

    Exit status: 0 every table maintained; 1 a table could not be maintained
    (its locks were not granted within the retries; it is named) or the
    database failed; 78 a configuration error (also retention for a table
    that is not a partitioned table)."""
    setup_logging()
    cfg = _common_config(config_path)
    dsn = database_dsn(cfg)
    try:
        res = run_maintenance(dsn, cfg["retention"], lock_timeout=cfg["maintain.lock_timeout"],
                              statement_timeout=cfg["maintain.statement_timeout"],
                              attempts=cfg["maintain.attempts"], retry_delay=cfg["maintain.retry_delay"])
    except UnknownTables as e:
        raise ConfigError(f"retention.{e.tables[0]}", cfg.file,
                          f"not a partitioned table (feed-maintain manages: {', '.join(e.known) or 'none'})") from None
    except psycopg.Error as e:
        log.error("maintenance failed: %s", _first_line(e))
        sys.exit(1)
    for table, created, dropped in res.done:
        log.info("%s: %d partition(s) created, %d dropped", table, created, dropped)
    for table, reason in res.failed.items():
        log.error("%s: not maintained: %s", table, reason)
    sys.exit(1 if res.failed else 0)


@click.group()
def feedctl() -> None:
    """Look at the feeds: unit states, heartbeats, row counts, the Binance kline check."""


@feedctl.command()
@click.option("--config", "config_path", envvar="FEEDS_CONFIG", default=COMMON, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--stale-after", default=60, show_default=True, help="Seconds after which a heartbeat is stale.")
@exit_on_config_error
def status(config_path: str, as_json: bool, stale_after: int) -> None:
    """Each unit's systemd state and its last heartbeat; exit 1 if any
    active unit's heartbeat is stale."""
    cfg = _common_config(config_path)
    try:
        with connect(database_dsn(cfg), application_name="feedctl", statement_timeout=10.0) as conn:
            rows = conn.execute("SELECT unit, host, pid, state, status, updated_at, detail FROM feed_heartbeat "
                                "ORDER BY unit").fetchall()
    except psycopg.Error as e:
        click.echo(f"database unreachable: {_first_line(e)}", err=True)
        sys.exit(2)
    now = datetime.now(timezone.utc)
    out, bad = [], False
    for unit, host, pid, state, line, updated, detail in rows:
        try:
            active = subprocess.run(["systemctl", "is-active", unit], capture_output=True, text=True,
                                    timeout=5).stdout.strip() or "unknown"
        except (OSError, subprocess.TimeoutExpired):
            active = "unknown"
        age = (now - updated).total_seconds()
        stale = active == "active" and age > stale_after
        bad |= stale
        out.append({"unit": unit, "systemd": active, "state": state, "heartbeat_age_s": round(age, 1),
                    "stale": stale, "status": line, "pid": pid, "host": host})
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        for o in out:
            flag = " STALE" if o["stale"] else ""
            click.echo(f"{o['unit']:<32} {o['systemd']:<10} {o['state']:<9} heartbeat {o['heartbeat_age_s']:>7.1f}s ago{flag}")
            click.echo(f"    {o['status']}")
        if not out:
            click.echo("no heartbeats yet")
    sys.exit(1 if bad else 0)


def _since(value: str | None) -> datetime | None:
    """``--since``: ``YYYY-MM-DD``, ``YYYY-MM-DDTHH:MM`` (UTC unless an offset is given) or ``Nd``/``Nh`` back."""
    if not value:
        return None
    v = value.strip()
    now = datetime.now(timezone.utc)
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
@click.option("--config", "config_path", envvar="FEEDS_CONFIG", default=COMMON, show_default=True)
@click.option("--symbol", default=None, help="Only this symbol (e.g. BTCUSDT).")
@click.option("--since", default=None, metavar="DATE",
              help="Minutes from then on: YYYY-MM-DD, YYYY-MM-DDTHH:MM (UTC) or 7d / 12h back.")
@click.option("--limit", default=200, show_default=True, help="At most this many minutes, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@exit_on_config_error
def kline_check(config_path: str, symbol: str | None, since: str | None, limit: int, as_json: bool) -> None:
    """Minutes whose closed Binance kline disagreed with the aggTrades
    feed-binance stored (binance_kline_check), newest first, and whether the
    aggTrade fill of the minute repaired them.  Exit status 0 (also when
    there are none), 2 when the database cannot be read."""
    cfg = _common_config(config_path)
    params = {"symbol": symbol.upper() if symbol else None, "since": _since(since), "limit": max(1, limit)}
    try:
        with connect(database_dsn(cfg), application_name="feedctl", statement_timeout=30.0) as conn:
            rows = conn.execute(KLINE_CHECK_SQL, params).fetchall()
    except psycopg.Error as e:
        click.echo(f"database unreachable: {_first_line(e)}", err=True)
        sys.exit(2)
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


@feedctl.command("alert")
@click.option("--config", "config_path", envvar="FEEDS_ALERTS_CONFIG", default="/etc/feeds/alerts.toml",
              show_default=True)
@click.option("--test", "send_test", is_flag=True, help="Send a test message to every channel.")
@exit_on_config_error
def alert(config_path: str, send_test: bool) -> None:
    """Alert channels (alerts.url_files in alerts.toml).  ``--test`` sends a
    test message to each and prints, per channel (named by its file), whether
    it accepted; exit 0 when every channel did, 1 when one did not or none is
    configured, 78 for a bad configuration."""
    from .ops.alerts import Channels, test_message
    from .settings import ALERTS_FILE
    if not send_test:
        raise click.UsageError("nothing to do: give --test")
    setup_logging()
    channels = Channels.from_config(load(config_path, ALERTS_FILE))
    if not len(channels):
        click.echo(f"no alert channel: alerts.url_files is empty in {config_path}", err=True)
        sys.exit(1)
    results = channels.send_each(test_message())
    for name, ok in results.items():
        click.echo(f"{name}: {'accepted' if ok else 'NOT accepted (see the log above)'}")
    sys.exit(0 if all(results.values()) else 1)
