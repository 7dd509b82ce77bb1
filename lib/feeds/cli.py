"""Small operator commands: ``feed-migrate``, ``feed-maintain``, ``feedctl``."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import click
import psycopg

from .config import Config, ConfigError, database_dsn, exit_on_config_error
from .migrate import MigrationError, apply, default_sql_dir
from .runtime import setup_logging

log = logging.getLogger("feeds")
COMMON = "/etc/feeds/feeds.toml"


def _common_config(config_path: str) -> Config:
    """``feeds.toml``; an absent file reads as empty (enough when FEEDS_DSN is set,
    otherwise ``database_dsn`` names the missing key)."""
    return Config.load(config_path) if Path(config_path).exists() else Config({}, config_path)


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
        log.error("cannot connect to the database: %s", str(e).strip().splitlines()[0])
        sys.exit(1)
    log.info("migrations: %s", ", ".join(done) if done else "nothing to apply (up to date)")


def run_maintenance(dsn: str, retention: dict[str, int] | None = None) -> list[tuple[str, int, int]]:
    """Create daily partitions ahead and drop those past retention.

    ``retention``: optional ``{table: keep_days}`` overriding
    ``feed_partitioned_table.keep_days``.  Returns ``(table, created, dropped)``.
    """
    out = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table, days in (retention or {}).items():
            conn.execute("UPDATE feed_partitioned_table SET keep_days = %s WHERE table_name = %s::regclass",
                         (days, table))
        rows = conn.execute("SELECT table_name::text, keep_days, ahead_days FROM feed_partitioned_table "
                            "ORDER BY 1").fetchall()
        for table, keep, ahead in rows:
            created = conn.execute("SELECT feeds_ensure_day_partitions(%s::regclass, "
                                   "(now() AT TIME ZONE 'UTC')::date, %s)", (table, ahead + 1)).fetchone()[0]
            dropped = conn.execute("SELECT feeds_drop_day_partitions(%s::regclass, %s)", (table, keep)).fetchone()[0]
            out.append((table, created, dropped))
    return out


@click.command()
@click.option("--config", "config_path", envvar="FEEDS_CONFIG", default=COMMON, show_default=True)
@exit_on_config_error
def maintain(config_path: str) -> None:
    """Create tomorrow's partitions and drop those older than the retention."""
    setup_logging()
    cfg = _common_config(config_path)
    retention = cfg.get("retention", dict, {})
    for k, v in retention.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"retention.{k}", cfg.file, "must be an integer number of days >= 1")
    try:
        res = run_maintenance(database_dsn(cfg), retention)
    except psycopg.Error as e:
        log.error("maintenance failed: %s", str(e).strip().splitlines()[0])
        sys.exit(1)
    for table, created, dropped in res:
        log.info("%s: %d partition(s) created, %d dropped", table, created, dropped)


@click.group()
def feedctl() -> None:
    """Look at the feeds: unit states, heartbeats, row counts."""


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
        with psycopg.connect(database_dsn(cfg), connect_timeout=5) as conn:
            rows = conn.execute("SELECT unit, host, pid, state, status, updated_at, detail FROM feed_heartbeat "
                                "ORDER BY unit").fetchall()
    except psycopg.Error as e:
        click.echo(f"database unreachable: {str(e).strip().splitlines()[0]}", err=True)
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
