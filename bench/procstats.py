"""Process figures, loopback helpers, child-process shutdown and the durable PostgreSQL cluster
shared by the benchmarks (Linux /proc)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parents[1]
#: every commit on disk before it returns: fsync, synchronous commit, full-page writes
COMMIT_SETTINGS = "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n"
#: COMMIT_SETTINGS with the WAL and checkpoint spacing of a server sized for steady ingest
DURABLE_SETTINGS = COMMIT_SETTINGS + "max_wal_size = 4GB\ncheckpoint_timeout = 15min\n"


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_hwm_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of process ``pid``, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 15.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``; RuntimeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on port {port} within {timeout}s")


def stop_processes(procs, timeout: float = 20.0) -> None:
    """SIGTERM each still running process of ``procs`` (None entries skipped) and wait for it;
    SIGKILL one that outlives ``timeout`` seconds."""
    for p in procs:
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()


def durable_cluster(settings: str = DURABLE_SETTINGS):
    """A throwaway PostgreSQL cluster (tests/pgserver.py, which the caller puts on sys.path),
    started with ``settings`` appended to its postgresql.conf: durable defaults, not the tests' shortcuts."""
    from pgserver import PgServer
    pg = PgServer().init()
    with open(pg.data / "postgresql.conf", "a") as f:
        f.write(settings)
    pg.start()
    return pg


def migrated_database(pg) -> str:
    """The DSN of a new database of ``pg`` with every migration (sql/) applied."""
    from feeds.migrate import apply
    dsn = pg.dsn(pg.create_db())
    apply(dsn, ROOT / "sql")
    return dsn
