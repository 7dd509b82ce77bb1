"""Apply the numbered SQL migrations in ``sql/`` in order, idempotently.

Each file ``NNNN_name.sql`` runs in its own transaction and is recorded in
``schema_migrations`` with its SHA-256.  Re-running applies nothing new.  An
already-applied migration whose file content changed is refused with
:class:`MigrationError` (the database is left untouched), because the schema
in the database would no longer match the file.  A transaction-level
advisory lock serialises concurrent runs (two units starting at once).

Session limits (:func:`feeds.db.connect`): no statement timeout (a migration
may rebuild a large table); a statement waits at most :data:`LOCK_TIMEOUT`
seconds for a table lock, so that a migration queued behind a long query does
not hold up the collectors' inserts queued behind it (it fails and is
rolled back instead); waiting for a concurrent run's advisory lock has no
limit.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from .db import connect

log = logging.getLogger(__name__)
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_KEY = 0x6665656473  # "feeds"

#: Seconds a migration statement may wait for a lock (PostgreSQL ``lock_timeout``).
LOCK_TIMEOUT = 30.0


class MigrationError(Exception):
    """A migration cannot be applied (changed checksum, bad file name, SQL error)."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path
    sql: str
    checksum: str


def default_sql_dir() -> Path:
    """The ``sql/`` directory: next to the source tree, or installed share dir."""
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "sql", Path("/usr/local/share/feeds/sql"), Path("/opt/feeds/sql")):
        if cand.is_dir():
            return cand
    raise MigrationError("sql/ directory not found")


def discover(sql_dir: Path) -> list[Migration]:
    """Migrations in ``sql_dir`` sorted by version; raises MigrationError on a
    badly named ``.sql`` file or a duplicate version."""
    out: list[Migration] = []
    seen: dict[str, str] = {}
    for p in sorted(sql_dir.glob("*.sql")):
        m = _NAME.match(p.name)
        if not m:
            raise MigrationError(f"{p}: migration file names must look like 0001_name.sql")
        v = m.group(1)
        if v in seen:
            raise MigrationError(f"{p}: version {v} already used by {seen[v]}")
        seen[v] = p.name
        sql = p.read_text()
        out.append(Migration(v, p.stem, p, sql, hashlib.sha256(sql.encode()).hexdigest()))
    return out


def apply(dsn: str, sql_dir: Path | None = None) -> list[str]:
    """Apply pending migrations; returns the names applied (empty when none).

    Raises MigrationError when an applied migration's checksum differs from
    its file, or when a migration fails (that migration is rolled back).
    """
    migs = discover(sql_dir or default_sql_dir())
    applied: list[str] = []
    with connect(dsn, application_name="feed-migrate", statement_timeout=0, lock_timeout=LOCK_TIMEOUT) as conn:
        conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
            version text PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())""")
        for mig in migs:
            with conn.transaction():
                # a concurrent run may take long: wait for it without limit, then the lock limit again
                conn.execute("SELECT set_config('lock_timeout', '0', true)")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{int(LOCK_TIMEOUT * 1000)}",))
                row = conn.execute("SELECT name, checksum FROM schema_migrations WHERE version = %s",
                                   (mig.version,)).fetchone()
                if row:
                    if row[1] != mig.checksum:
                        raise MigrationError(
                            f"migration {mig.path.name} was applied as {row[0]} with checksum "
                            f"{row[1][:12]} but the file now has {mig.checksum[:12]}: an applied "
                            f"migration must never change; add a new migration instead")
                    continue
                try:
                    conn.execute(mig.sql)
                except psycopg.Error as e:
                    raise MigrationError(f"migration {mig.path.name} failed: {e}".strip()) from e
                conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                             (mig.version, mig.name, mig.checksum))
                log.info("applied migration %s", mig.path.name)
                applied.append(mig.name)
    return applied
