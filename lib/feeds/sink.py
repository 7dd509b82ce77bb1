"""The PostgreSQL sink shared by every collector.

Rows are plain tuples in a table's column order.  Collectors call
:meth:`Sink.add` from their event loop; one writer thread owns the database
connection and, every ``flush_interval`` seconds (or as soon as
``batch_rows`` rows are pending), takes everything pending and writes it in
one transaction, one ``COPY`` per table.  Under load each write cycle takes
what accumulated during the previous one, so batches grow by themselves
(group commit) and a row is never older than ``flush_interval`` plus one
write when it is committed.

Guarantees:

* **No duplicates.**  Every table has a natural primary key.  The fast path
  is a plain ``COPY``; if it meets a unique violation (a replay, a gap fill
  overlapping live data) the cycle is rolled back and redone through a
  temporary staging table with ``INSERT ... ON CONFLICT DO NOTHING``, which
  skips exactly the duplicates and keeps every new row.
* **Nothing dropped.**  When PostgreSQL is unreachable the batch is appended
  to a spool file in ``spool_dir`` (the unit's ``StateDirectory``), fsync'd,
  and later batches follow it there to keep the order.  Once the database is
  back the spool is replayed in order (through the staging path) before any
  new row, and each segment file is removed only after all its records are
  committed.  A spool left by a killed process is replayed at start.
* **Back-pressure, not loss.**  :meth:`add` blocks while ``max_pending`` rows
  wait for the writer; blocking the collector's event loop stops it reading
  its sockets, so TCP flow control slows the venue side down.
* **Bad rows are isolated.**  A row PostgreSQL refuses (for example a value
  that is not a number) is written, with the error, to ``rejects.jsonl`` in
  ``spool_dir`` and counted; the rest of its batch is stored.
* Missing daily partitions are created on demand
  (``feeds_ensure_day_partitions``) and the write retried.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

import psycopg
from psycopg import errors as pgerr
from psycopg import sql

log = logging.getLogger(__name__)

_CONN_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


@dataclass(frozen=True)
class Table:
    """A destination table.

    ``columns``: column names in row-tuple order.  ``partition_column``: the
    ``timestamptz`` column a daily-partitioned table is ranged on (None for an
    unpartitioned table).  ``time_column``: the venue event-time column used
    for latency figures (None: not measured).
    """

    name: str
    columns: tuple[str, ...]
    partition_column: str | None = None
    time_column: str | None = None

    @property
    def partition_index(self) -> int | None:
        return None if self.partition_column is None else self.columns.index(self.partition_column)

    @property
    def time_index(self) -> int | None:
        return None if self.time_column is None else self.columns.index(self.time_column)


@dataclass
class TableStats:
    stored: int = 0          # rows committed
    duplicates: int = 0      # rows skipped because their key was already stored
    rejected: int = 0        # rows refused by PostgreSQL, kept in rejects.jsonl


@dataclass
class SinkStats:
    tables: dict[str, TableStats] = field(default_factory=dict)
    commits: int = 0
    spooled_rows: int = 0        # rows written to the spool (cumulative)
    replayed_rows: int = 0       # rows read back from the spool (cumulative)
    outages: int = 0


def load_sink_settings(cfg, default_spool_dir: str) -> dict:
    """Validate a program's ``[sink]`` section (a :class:`feeds.config.Config`).

    Keys: ``spool_dir`` (used when systemd gives no StateDirectory),
    ``flow_timeout`` (s without data or storage progress before watchdog
    pings stop), ``flush_interval`` (0 < s <= 1), ``batch_rows``,
    ``max_pending``.  Raises :class:`feeds.config.ConfigError`.
    """
    from .config import positive
    return dict(
        spool_dir=cfg.get("sink.spool_dir", str, default_spool_dir),
        flow_timeout=cfg.get("sink.flow_timeout", float, 20.0, check=positive),
        flush_interval=cfg.get("sink.flush_interval", float, 0.2,
                               check=lambda v: None if 0 < v <= 1.0 else "must be > 0 and <= 1.0 s"),
        batch_rows=cfg.get("sink.batch_rows", int, 20_000, check=positive),
        max_pending=cfg.get("sink.max_pending", int, 200_000, check=positive),
    )


class Spool:
    """Append-only, crash-tolerant spool of batches on disk.

    Files ``spool-<seq>.bin``; each record is ``uint32 length, uint32 crc32``
    then a pickled ``{table: [row, ...]}``.  Records are fsync'd.  A torn
    record at the end of a file (process killed mid-write) is detected by its
    length or CRC; the file is renamed ``*.corrupt`` after its good records
    were replayed, so nothing is silently discarded.
    """

    SEGMENT_BYTES = 64 << 20
    _HDR = struct.Struct("!II")

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fh = None
        self._cur: Path | None = None
        self._nonempty = bool(self.segments())

    def segments(self) -> list[Path]:
        return sorted(self.dir.glob("spool-*.bin"))

    def has_data(self) -> bool:
        """Whether segments wait for replay (tracked in memory: no directory scan)."""
        return self._nonempty

    def append(self, batch: dict[str, list[tuple]]) -> None:
        """Append one batch durably (write, flush, fsync).  Raises OSError."""
        payload = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        if self._fh is None or self._fh.tell() >= self.SEGMENT_BYTES:
            self._close()
            segs = self.segments()
            seq = int(segs[-1].stem.split("-")[1]) + 1 if segs else 1
            self._cur = self.dir / f"spool-{seq:012d}.bin"
            self._fh = open(self._cur, "ab")
        self._fh.write(self._HDR.pack(len(payload), zlib.crc32(payload)) + payload)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._nonempty = True

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def read(self, path: Path) -> tuple[list[dict[str, list[tuple]]], bool]:
        """Records of one segment and whether its tail was torn."""
        data = path.read_bytes()
        out, off, n = [], 0, len(data)
        while off < n:
            if off + 8 > n:
                return out, True
            length, crc = self._HDR.unpack_from(data, off)
            body = data[off + 8: off + 8 + length]
            if len(body) < length or zlib.crc32(body) != crc:
                return out, True
            out.append(pickle.loads(body))
            off += 8 + length
        return out, False

    def done(self, path: Path, torn: bool) -> None:
        """Forget a fully replayed segment (kept as ``.corrupt`` if torn)."""
        if path == self._cur:
            self._close()
            self._cur = None
        if torn:
            path.rename(path.with_suffix(".corrupt"))
            log.error("spool segment %s had a torn tail; its good records were replayed, file kept as %s",
                      path.name, path.with_suffix(".corrupt").name)
        else:
            path.unlink()
        self._nonempty = bool(self.segments())


class Sink:
    """Batching, de-duplicating, spooling writer for a set of tables.

    ``dsn``: libpq connection string.  ``spool_dir``: a directory only this
    service writes (its StateDirectory).  ``tables``: the :class:`Table`
    definitions rows may be added for.  ``flush_interval``: seconds a row may
    wait before its batch is written (default 0.2; the issue-level guarantee
    is at most 1 s).  ``batch_rows``: pending rows that trigger an immediate
    write.  ``max_pending``: pending rows at which :meth:`add` blocks.
    ``on_commit(table, rows, commit_time)`` is called in the writer thread
    after each commit (used for lag figures).

    Call :meth:`start` once and :meth:`close` at shutdown.
    """

    def __init__(self, dsn: str, spool_dir: str | os.PathLike, tables: Iterable[Table], *,
                 flush_interval: float = 0.2, batch_rows: int = 20_000, max_pending: int = 200_000,
                 retry_interval: float = 2.0,
                 on_commit: Callable[[Table, list[tuple], datetime], None] | None = None,
                 connect_timeout: int = 5):
        self.dsn = dsn
        self.tables = {t.name: t for t in tables}
        self.spool = Spool(Path(spool_dir))
        self.rejects_path = Path(spool_dir) / "rejects.jsonl"
        self.flush_interval = flush_interval
        self.batch_rows = batch_rows
        self.max_pending = max_pending
        self.retry_interval = retry_interval
        self.on_commit = on_commit
        self.connect_timeout = connect_timeout
        self.stats = SinkStats(tables={n: TableStats() for n in self.tables})
        self._cond = threading.Condition(threading.Lock())
        self._pending: dict[str, list[tuple]] = {n: [] for n in self.tables}
        self._count = 0
        self._first = 0.0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection | None = None
        self._staged: set[str] = set()
        self._next_retry = 0.0
        self.spooling = False
        self.last_progress = time.monotonic()   # last commit or spool write
        self.last_error: str | None = None
        self.fatal: BaseException | None = None

    # ------------------------------------------------------------------ API
    def start(self) -> "Sink":
        """Start the writer thread (replaying any spool left from before)."""
        self._thread = threading.Thread(target=self._run, name="sink-writer", daemon=True)
        self._thread.start()
        return self

    @property
    def pending(self) -> int:
        return self._count

    def add(self, table: str, row: tuple) -> None:
        """Queue one row for ``table``; blocks while ``max_pending`` rows wait.

        Raises KeyError for a table not given to the constructor and
        RuntimeError after :meth:`close` or when the writer died.
        """
        with self._cond:
            if self._stopping or self.fatal:
                raise RuntimeError(f"sink is closed ({self.fatal or 'stopping'})")
            if not self._count:
                self._first = time.monotonic()
                self._cond.notify()
            self._pending[table].append(row)
            self._count += 1
            if self._count == self.batch_rows:
                self._cond.notify()
            while self._count >= self.max_pending and not self._stopping and not self.fatal:
                self._cond.wait(1.0)

    def add_many(self, table: str, rows: Sequence[tuple]) -> None:
        """Queue several rows for one table (same rules as :meth:`add`)."""
        if not rows:
            return
        with self._cond:
            if self._stopping or self.fatal:
                raise RuntimeError(f"sink is closed ({self.fatal or 'stopping'})")
            if not self._count:
                self._first = time.monotonic()
            self._pending[table].extend(rows)
            self._count += len(rows)
            self._cond.notify()
            while self._count >= self.max_pending and not self._stopping and not self.fatal:
                self._cond.wait(1.0)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything added so far is committed or spooled."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._first = 0.0  # make the pending batch due now
            self._cond.notify()
            while (self._count or self._busy) and time.monotonic() < deadline and not self.fatal:
                self._cond.wait(0.05)
            return not self._count and not self._busy

    def close(self, timeout: float = 60.0) -> bool:
        """Write (or spool) everything pending, stop the writer; True when all
        rows were committed or spooled within ``timeout`` seconds."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout)
            alive = self._thread.is_alive()
        else:
            alive = False
        if self._conn is not None and not alive:
            try:
                self._conn.close()
            except Exception:
                pass
        return not alive and self._count == 0

    # ------------------------------------------------------------ writer thread
    _busy = False

    def _take(self) -> dict[str, list[tuple]] | None:
        """Block until a batch is due (or stop); return it (None = stop)."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._count and (self._stopping or self._count >= self.batch_rows
                                    or now - self._first >= self.flush_interval):
                    break
                if self._stopping:
                    return None
                if self.spool.has_data() and now >= self._next_retry and not self._count:
                    self._busy = True
                    return {}
                if self._count:
                    wait = self.flush_interval - (now - self._first)
                elif self.spooling:
                    wait = max(0.05, self._next_retry - now)
                else:
                    wait = 1.0
                self._cond.wait(max(0.001, wait))
            batch = {t: rows for t, rows in self._pending.items() if rows}
            self._pending = {n: [] for n in self.tables}
            self._count = 0
            self._busy = True
            self._cond.notify_all()   # wake producers blocked on max_pending
            return batch

    def _run(self) -> None:
        try:
            while True:
                batch = self._take()
                if batch is None:
                    break
                try:
                    self._cycle(batch)
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
        except BaseException as e:  # the writer must never die silently
            log.critical("sink writer failed: %r", e, exc_info=True)
            with self._cond:
                self.fatal = e
                self._cond.notify_all()
        finally:
            self.spool._close()

    def _cycle(self, batch: dict[str, list[tuple]]) -> None:
        if self.spool.has_data():
            if time.monotonic() >= self._next_retry and self._replay_spool():
                pass
            else:
                if batch:
                    self._spool(batch)
                return
        if not batch:
            return
        try:
            self._write(batch)
        except _CONN_ERRORS as e:
            self._outage(e)
            self._spool(batch)

    def _spool(self, batch: dict[str, list[tuple]]) -> None:
        n = sum(len(r) for r in batch.values())
        while True:
            try:
                self.spool.append(batch)
                break
            except OSError as e:
                self.last_error = f"spool write failed: {e}"
                log.error("cannot write spool in %s: %s; retrying in 1 s (rows stay in memory)", self.spool.dir, e)
                time.sleep(1.0)
        self.stats.spooled_rows += n
        self.last_progress = time.monotonic()

    def _outage(self, e: BaseException) -> None:
        if not self.spooling:
            self.stats.outages += 1
            log.error("database unavailable (%s); spooling to %s", str(e).strip().splitlines()[0] if str(e) else type(e).__name__, self.spool.dir)
        self.spooling = True
        self.last_error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        self._next_retry = time.monotonic() + self.retry_interval
        self._drop_conn()

    def _replay_spool(self) -> bool:
        """Replay all spool segments in order; False if the database is still down."""
        try:
            self._connection()
        except _CONN_ERRORS as e:
            self._outage(e)
            return False
        segments = self.spool.segments()
        total = 0
        for seg in segments:
            records, torn = self.spool.read(seg)
            for rec in records:
                try:
                    self._write(rec, safe=True)
                except _CONN_ERRORS as e:
                    self._outage(e)
                    return False
                total += sum(len(r) for r in rec.values())
                self.stats.replayed_rows += sum(len(r) for r in rec.values())
            self.spool.done(seg, torn)
        if self.spooling or total:
            log.info("database back; replayed %d spooled rows from %d segment(s)", total, len(segments))
        self.spooling = False
        self.last_error = None
        return True

    # ----------------------------------------------------------- SQL
    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=self.connect_timeout,
                                         application_name="feeds-sink")
            self._staged = set()
        return self._conn

    def _drop_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None

    def _write(self, batch: dict[str, list[tuple]], safe: bool = False) -> None:
        """Commit one batch (all tables, one transaction).  Raises connection errors."""
        conn = self._connection()
        for attempt in range(3):
            try:
                with conn.transaction():
                    counts = {}
                    for name, rows in batch.items():
                        counts[name] = (self._copy_safe if safe else self._copy)(conn, self.tables[name], rows)
                break
            except pgerr.UniqueViolation:
                self._staged.clear()        # temp tables created in the rolled-back transaction are gone
                safe = True
            except pgerr.CheckViolation as e:
                self._staged.clear()
                if "no partition" not in str(e):
                    raise
                self._ensure_partitions(conn, batch)
            except psycopg.DataError as e:
                self._staged.clear()
                # a bad value somewhere: isolate it row by row
                log.warning("batch refused (%s); isolating bad rows", str(e).splitlines()[0])
                counts = self._write_rowwise(conn, batch)
                break
        else:
            raise RuntimeError("could not write batch after creating partitions")
        now = datetime.now(timezone.utc)
        self.stats.commits += 1
        self.last_progress = time.monotonic()
        for name, rows in batch.items():
            ts = self.stats.tables[name]
            stored = counts.get(name, len(rows))
            ts.stored += stored
            ts.duplicates += len(rows) - stored - 0
        if self.on_commit is not None:
            for name, rows in batch.items():
                try:
                    self.on_commit(self.tables[name], rows, now)
                except Exception:
                    log.exception("on_commit callback failed")

    @staticmethod
    def _copy_stmt(table: Table, target: str) -> sql.Composed:
        return sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(target), sql.SQL(", ").join(map(sql.Identifier, table.columns)))

    def _copy(self, conn: psycopg.Connection, table: Table, rows: list[tuple]) -> int:
        with conn.cursor() as cur:
            with cur.copy(self._copy_stmt(table, table.name)) as cp:
                write = cp.write_row
                for r in rows:
                    write(r)
        return len(rows)

    def _copy_safe(self, conn: psycopg.Connection, table: Table, rows: list[tuple]) -> int:
        stage = f"_stage_{table.name}"
        with conn.cursor() as cur:
            if stage not in self._staged:
                cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS) "
                                    "ON COMMIT DELETE ROWS").format(sql.Identifier(stage), sql.Identifier(table.name)))
                self._staged.add(stage)
            with cur.copy(self._copy_stmt(table, stage)) as cp:
                for r in rows:
                    cp.write_row(r)
            cols = sql.SQL(", ").join(map(sql.Identifier, table.columns))
            cur.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT DO NOTHING").format(
                sql.Identifier(table.name), cols, cols, sql.Identifier(stage)))
            inserted = cur.rowcount
            cur.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(stage)))
        return inserted

    def _write_rowwise(self, conn: psycopg.Connection, batch: dict[str, list[tuple]]) -> dict[str, int]:
        counts: dict[str, int] = {}
        with conn.transaction():
            for name, rows in batch.items():
                table = self.tables[name]
                cols = sql.SQL(", ").join(map(sql.Identifier, table.columns))
                stmt = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING").format(
                    sql.Identifier(name), cols, sql.SQL(", ").join(sql.Placeholder() * len(table.columns)))
                n = 0
                for r in rows:
                    try:
                        with conn.transaction():
                            cur = conn.execute(stmt, r)
                            n += cur.rowcount
                    except pgerr.CheckViolation as e:
                        if "no partition" not in str(e):
                            self._reject(name, r, e)
                            continue
                        self._ensure_partitions(conn, {name: [r]})
                        with conn.transaction():
                            n += conn.execute(stmt, r).rowcount
                    except (psycopg.DataError, psycopg.IntegrityError) as e:
                        self._reject(name, r, e)
                counts[name] = n
        return counts

    def _reject(self, table: str, row: tuple, err: Exception) -> None:
        self.stats.tables[table].rejected += 1
        rec = {"table": table, "row": [str(v) if v is not None else None for v in row],
               "error": str(err).splitlines()[0], "at": datetime.now(timezone.utc).isoformat()}
        with open(self.rejects_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        log.error("row rejected by PostgreSQL for %s (%s); kept in %s", table, rec["error"], self.rejects_path)

    def _ensure_partitions(self, conn: psycopg.Connection, batch: dict[str, list[tuple]]) -> None:
        for name, rows in batch.items():
            idx = self.tables[name].partition_index
            if idx is None:
                continue
            days: set[date] = set()
            for r in rows:
                v = r[idx]
                if isinstance(v, str):
                    v = datetime.fromisoformat(v)
                if isinstance(v, datetime):
                    days.add(v.astimezone(timezone.utc).date())
            for d in sorted(days):
                conn.execute("SELECT feeds_ensure_day_partitions(%s::regclass, %s, 1)", (name, d))
            if days:
                log.info("created partitions of %s for %s", name, ", ".join(map(str, sorted(days))))
