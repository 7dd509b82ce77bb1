"""Database sessions: the one place their settings are made.

Every program opens its PostgreSQL sessions through :func:`connect`, so that
none of them can wait forever: a statement that runs longer than
``statement_timeout`` or waits longer than ``lock_timeout`` for a lock is
cancelled by the server (``psycopg.errors.QueryCanceled`` /
``psycopg.errors.LockNotAvailable``, both ``psycopg.OperationalError``), and
TCP keepalives plus ``tcp_user_timeout`` make a dead peer or a cut network
fail the session instead of leaving it blocked.

Reference: PostgreSQL documentation, "Client Connection Defaults"
(``statement_timeout``, ``lock_timeout``) and libpq "Parameter Key Words"
(``keepalives*``, ``tcp_user_timeout``, ``connect_timeout``).
"""
from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict

#: libpq options added unless the DSN sets them itself (TCP connections only;
#: libpq ignores them for Unix-domain sockets).
TCP_OPTIONS = {
    "keepalives": 1,
    "keepalives_idle": 10,        # s of silence before the first probe
    "keepalives_interval": 5,     # s between probes
    "keepalives_count": 3,        # unanswered probes before the session fails
    "tcp_user_timeout": 30_000,   # ms sent data may stay unacknowledged
}


def _ms(seconds: float | None) -> str:
    """Seconds -> a PostgreSQL duration in whole milliseconds ("0": no limit)."""
    return str(max(0, int(round((seconds or 0) * 1000))))


def connect(dsn: str, *, application_name: str, statement_timeout: float | None = 10.0,
            lock_timeout: float | None = 5.0, autocommit: bool = True,
            connect_timeout: int = 5) -> psycopg.Connection:
    """Open a session with the project's settings.

    ``dsn``: libpq connection string.  ``application_name``: shown in
    ``pg_stat_activity`` (e.g. ``feeds-sink``).  ``statement_timeout``,
    ``lock_timeout``: seconds (0 or None: no limit), set for the whole
    session.  ``connect_timeout``: seconds to establish the connection.
    Returns a :class:`psycopg.Connection` in ``autocommit`` mode as asked.
    Raises ``psycopg.OperationalError`` when the server cannot be reached
    or refuses the session.
    """
    given = conninfo_to_dict(dsn)
    extra = {k: v for k, v in TCP_OPTIONS.items() if k not in given}
    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout,
                           application_name=application_name, **extra)
    try:
        conn.execute("SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false)",
                     (_ms(statement_timeout), _ms(lock_timeout)))
        conn.autocommit = autocommit
    except BaseException:
        conn.close()
        raise
    return conn
