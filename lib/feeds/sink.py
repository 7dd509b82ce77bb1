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
* **Nothing dropped.**  When PostgreSQL is unreachable, or does not answer
  within ``statement_timeout`` / ``lock_timeout`` (a lock held by someone
  else, a stalled server), the batch is appended to the spool in
  ``spool_dir`` (the unit's ``StateDirectory``), fsync'd, and later batches
  follow it there to keep the order.  Once the database answers again the
  spool is replayed in order, a bounded number of rows per transaction, so
  a spool of any size replays in bounded memory; each segment file is
  removed only after all its records are committed.  A spool left by a
  killed process is replayed at start.
* **Back-pressure, not loss.**  :meth:`add` blocks while ``max_pending`` rows
  wait for the writer; blocking the collector's event loop stops it reading
  its sockets, so TCP flow control slows the venue side down.  When neither
  the database nor the spool can take a batch (disk full, I/O error,
  ``spool_max_bytes`` reached) its rows go back to the pending rows, are
  retried every ``retry_interval`` and written wherever room returns first
  (:meth:`status_reason` says ``BACK-PRESSURE``; the journal says it once a
  minute).
* **Bad rows are isolated.**  A row that cannot be stored (PostgreSQL refuses
  a value, the client cannot render one, the row has the wrong number of
  columns, its time has no partition) is found by splitting its batch,
  written with the error to ``rejects.jsonl`` in ``spool_dir`` and counted;
  the rest of its batch is stored.  The writer thread never dies of a data
  or database error; :meth:`outcome` accounts for every row.
* Missing daily partitions are created on demand
  (``feeds_ensure_day_partitions``) and the write retried.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import socket
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

from .config import first_line as _first_line
from . import db

log = logging.getLogger(__name__)

_CONN_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
_NO_PARTITION = "no partition"


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
    rejected: int = 0        # rows that cannot be stored, kept in rejects.jsonl


@dataclass
class SinkStats:
    tables: dict[str, TableStats] = field(default_factory=dict)
    commits: int = 0
    spooled_rows: int = 0        # rows written to the spool (cumulative)
    replayed_rows: int = 0       # rows read back from the spool and committed, skipped or rejected
    outages: int = 0


@dataclass(frozen=True)
class SinkOutcome:
    """Row counts of one process's sink.

    ``committed``: rows inserted; ``duplicates``: rows whose key was already
    stored; ``spooled``: rows written to the spool; ``replayed``: rows read
    back from the spool (by this process, whoever spooled them);
    ``rejected``: rows kept in ``rejects.jsonl``; ``pending``: rows neither
    committed, spooled nor rejected yet; ``lost``: after :meth:`Sink.close`,
    the rows that stayed pending (0 before close).
    """

    committed: int
    duplicates: int
    spooled: int
    replayed: int
    rejected: int
    lost: int
    pending: int

    def line(self) -> str:
        """The stop line's counts, e.g. ``12,345 committed, 0 spooled,
        2 rejected, 0 lost``."""
        return (f"{self.committed:,} committed, {self.spooled:,} spooled, {self.rejected:,} rejected, "
                f"{self.lost:,} lost")


class _Every:
    """Journal lines for a recurring condition: the first at once, then at
    most one per ``interval`` seconds, with the number left out meanwhile."""

    def __init__(self, interval: float = 60.0):
        self.interval = interval
        self._next: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def __call__(self, key: str, level: int, msg: str, *args, **kw) -> None:
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return
        n = self._quiet.pop(key, 0)
        if n:
            msg += " (%d more like it in the last %.0f s)"
            args = (*args, n, self.interval)
        log.log(level, msg, *args, **kw)
        self._next[key] = now + self.interval

    def reset(self, key: str) -> None:
        self._next.pop(key, None)
        self._quiet.pop(key, None)


# ---------------------------------------------------------------------- spool
class SpoolFull(OSError):
    """The spool holds ``spool_max_bytes`` already (errno ENOSPC)."""


class Spool:
    """Append-only, crash-tolerant spool of rows on disk.

    Files ``spool-<seq>.bin`` (segments of about :attr:`SEGMENT_BYTES`).  A
    record is a 16-byte header (magic ``b"\\xf5FSR"``, uint32 payload length,
    uint32 CRC-32 of the payload, uint32 CRC-32 of the first 12 header
    bytes) and a pickled ``{table: [row, ...]}`` of at most
    :attr:`RECORD_ROWS` rows.  :meth:`append` writes a batch's records and
    fsyncs them, all or nothing.  Readers (:class:`SegmentReader`) stream
    one record at a time; a damaged record is skipped by scanning forward
    to the next valid header, and a segment that held damaged bytes is kept,
    whole, under a name never used before (``spool-<seq>.<n>.corrupt``).
    Segments written by earlier versions (records ``uint32 length, uint32
    crc32, pickle`` without magic) are still read.

    ``max_bytes``: total segment bytes beyond which :meth:`append` raises
    :class:`SpoolFull`.
    """

    SEGMENT_BYTES = 16 << 20
    RECORD_ROWS = 2000
    MAX_RECORD_BYTES = 256 << 20
    MAGIC = b"\xf5FSR"
    _HDR = struct.Struct("!4sIII")

    def __init__(self, directory: str | os.PathLike, max_bytes: int = 2 << 30):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._fd: int | None = None
        self._cur: Path | None = None
        self._pos = 0
        segs = self.segments()
        self.bytes = sum(self._size(p) for p in segs)
        self._seq = max((self._seq_of(p) for p in self.dir.glob("spool-*")), default=0)
        self._nonempty = bool(segs)

    @staticmethod
    def _size(p: Path) -> int:
        try:
            return p.stat().st_size
        except FileNotFoundError:
            return 0

    @staticmethod
    def _seq_of(p: Path) -> int:
        digits = p.name[len("spool-"):].split(".", 1)[0]
        return int(digits) if digits.isdigit() else 0

    def segments(self) -> list[Path]:
        """Segments waiting for replay, oldest first."""
        return sorted(self.dir.glob("spool-*.bin"))

    def has_data(self) -> bool:
        """Whether segments wait for replay (tracked in memory: no directory scan)."""
        return self._nonempty

    def rescan(self) -> list[Path]:
        """:meth:`segments`, also refreshing :meth:`has_data`."""
        segs = self.segments()
        self._nonempty = bool(segs)
        return segs

    # ------------------------------------------------------------ writing
    def _records(self, table: str, rows: list, out: list[bytes]) -> None:
        step = self.RECORD_ROWS
        for i in range(0, len(rows), step):
            chunk = rows[i:i + step]
            payload = pickle.dumps({table: chunk}, protocol=pickle.HIGHEST_PROTOCOL)
            if len(payload) > self.MAX_RECORD_BYTES and len(chunk) > 1:
                half = len(chunk) // 2
                self._records(table, chunk[:half], out)
                self._records(table, chunk[half:], out)
                continue
            head = self.MAGIC + struct.pack("!II", len(payload), zlib.crc32(payload))
            out.append(head + struct.pack("!I", zlib.crc32(head)))
            out.append(payload)

    def append(self, batch: dict[str, list[tuple]]) -> int:
        """Append one batch ``{table: rows}`` durably (written and fsync'd)
        and return the bytes written.  All or nothing: when writing fails
        the segment is cut back to where it was, so no partial record stays
        behind.  Raises :class:`SpoolFull` when ``max_bytes`` would be
        exceeded, OSError (ENOSPC, EIO, ...) when the disk refuses."""
        parts: list[bytes] = []
        for table, rows in batch.items():
            if rows:
                self._records(table, rows, parts)
        size = sum(map(len, parts))
        if not size:
            return 0
        if self.bytes + size > self.max_bytes:
            raise SpoolFull(errno.ENOSPC, f"spool full: {self.bytes:,} bytes held, spool_max_bytes is "
                                          f"{self.max_bytes:,}")
        if self._fd is None or self._pos >= self.SEGMENT_BYTES:
            self._open_segment()
        fd, start = self._fd, self._pos
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            self._cut(start)
            raise
        self._pos = start + size
        self.bytes += size
        self._nonempty = True
        return size

    def _open_segment(self) -> None:
        self._close()
        while True:
            self._seq += 1
            path = self.dir / f"spool-{self._seq:012d}.bin"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:
                continue
        try:
            self._fsync_dir()
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        self._fd, self._cur, self._pos = fd, path, 0

    def _cut(self, start: int) -> None:
        """Undo a failed append: truncate back to ``start`` (or, when even that
        fails, stop writing this segment; its readers skip the torn tail)."""
        try:
            os.ftruncate(self._fd, start)
            os.fsync(self._fd)
            self._pos = start
        except OSError as e:
            log.error("spool segment %s could not be cut back after a failed write (%s); starting a new one",
                      self._cur.name if self._cur else "?", e)
            self._close()

    def _fsync_dir(self) -> None:
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
            self._cur = None

    # ------------------------------------------------------------ reading
    def reader(self, path: Path, offset: int = 0, bad: Sequence[tuple[int, int]] = (),
               legacy: bool | None = None) -> "SegmentReader":
        """A :class:`SegmentReader` of ``path`` from ``offset`` (a record start)."""
        return SegmentReader(path, offset, bad, legacy)

    def inspect(self, path: Path) -> tuple[int, list[tuple[int, int]]]:
        """Rows in the intact records of ``path`` and its damaged spans
        ``[(offset, length), ...]``; changes nothing."""
        rows = 0
        with self.reader(path) as rd:
            while (rec := rd.next()) is not None:
                rows += sum(len(r) for r in rec.values())
            return rows, list(rd.bad)

    def done(self, path: Path, bad: Sequence[tuple[int, int]] = ()) -> Path | None:
        """Forget a fully replayed segment: removed, or, when it held damaged
        spans ``bad``, kept whole under a new quarantine name (returned)."""
        if path == self._cur:
            self._close()
        size = self._size(path)
        kept = None
        if bad:
            kept = self._quarantine(path)
            log.error("spool segment %s held %d damaged span(s) (%s; %d bytes) that could not be replayed; "
                      "its intact records were replayed and the file is kept as %s", path.name, len(bad),
                      ", ".join(f"{n} bytes at {o}" for o, n in bad[:5]) + (" ..." if len(bad) > 5 else ""),
                      sum(n for _, n in bad), kept.name)
        else:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self.bytes = max(0, self.bytes - size)
        self._nonempty = bool(self.segments())
        return kept

    def _quarantine(self, path: Path) -> Path:
        """Move ``path`` to ``<stem>.<n>.corrupt`` with the first free ``n``;
        an existing quarantine file is never replaced."""
        n = 0
        while True:
            n += 1
            dst = path.with_name(f"{path.stem}.{n}.corrupt")
            try:
                os.link(path, dst)
            except FileExistsError:
                continue
            except OSError:         # no hard links here: check, then rename
                if dst.exists():
                    continue
                os.rename(path, dst)
            else:
                path.unlink()
            break
        try:
            self._fsync_dir()
        except OSError:
            pass
        return dst


class SegmentReader:
    """Reads one spool segment record by record (``with`` closes it).

    :meth:`next` returns the next intact record ``{table: [row, ...]}`` or
    None at the end.  A damaged record (bad header or CRC, torn tail,
    unreadable payload) is skipped: the reader scans forward for the next
    valid header and records the skipped span in :attr:`bad`
    (``[(offset, length), ...]``).  :attr:`offset` is the start of the next
    record; :attr:`legacy` tells the format (records without magic).
    """

    _LEGACY = struct.Struct("!II")
    _SCAN = 1 << 20

    def __init__(self, path: Path, offset: int = 0, bad: Sequence[tuple[int, int]] = (),
                 legacy: bool | None = None):
        self.path = Path(path)
        self.offset = offset
        self.bad: list[tuple[int, int]] = list(bad)
        self.legacy = legacy
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size
        if self.legacy is None:
            self.legacy = self._is_legacy()

    def __enter__(self) -> "SegmentReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _is_legacy(self) -> bool:
        head = os.pread(self._fd, 4, 0)
        if len(head) < 4 or head == Spool.MAGIC:
            return False
        status, _, _ = self._legacy_at(0)
        return status == "ok"

    def _record_at(self, off: int) -> tuple[str, dict | None, int]:
        """``("ok", record, size)``, ``("end", None, 0)``, ``("bad", None, 0)``
        (no record starts here) or ``("skip", None, size)`` (a whole record
        whose payload cannot be read)."""
        hdr = os.pread(self._fd, 16, off)
        if not hdr:
            return "end", None, 0
        if len(hdr) < 16:
            return "bad", None, 0
        magic, length, crc, hcrc = Spool._HDR.unpack(hdr)
        if magic != Spool.MAGIC or zlib.crc32(hdr[:12]) != hcrc or length > Spool.MAX_RECORD_BYTES:
            return "bad", None, 0
        body = os.pread(self._fd, length, off + 16)
        if len(body) < length or zlib.crc32(body) != crc:
            return "bad", None, 0
        return self._decode(body, 16 + length)

    def _legacy_at(self, off: int) -> tuple[str, dict | None, int]:
        hdr = os.pread(self._fd, 8, off)
        if not hdr:
            return "end", None, 0
        if len(hdr) < 8:
            return "bad", None, 0
        length, crc = self._LEGACY.unpack(hdr)
        if length > Spool.MAX_RECORD_BYTES:
            return "bad", None, 0
        body = os.pread(self._fd, length, off + 8)
        if len(body) < length or zlib.crc32(body) != crc:
            return "bad", None, 0
        return self._decode(body, 8 + length)

    @staticmethod
    def _decode(body: bytes, size: int) -> tuple[str, dict | None, int]:
        try:
            rec = pickle.loads(body)
        except Exception:
            return "skip", None, size
        if type(rec) is not dict or not all(type(k) is str and type(v) is list for k, v in rec.items()):
            return "skip", None, size
        return "ok", rec, size

    def next(self) -> dict[str, list] | None:
        """The next intact record, or None at the end of the segment."""
        while True:
            off = self.offset
            if self.legacy:
                status, rec, size = self._legacy_at(off)
            else:
                status, rec, size = self._record_at(off)
            if status == "ok":
                self.offset = off + size
                return rec
            if status == "end":
                return None
            if status == "skip":
                nxt = off + size
            elif self.legacy:
                nxt = self.size          # no markers to find the next record by
            else:
                nxt = self._resync(off + 1)
            self.bad.append((off, nxt - off))
            self.offset = nxt

    def _resync(self, start: int) -> int:
        """Offset of the next valid record at or after ``start`` (else the end)."""
        magic = Spool.MAGIC
        pos, tail = start, b""
        while True:
            chunk = os.pread(self._fd, self._SCAN, pos)
            if not chunk:
                return max(start, self.size)
            buf = tail + chunk
            base = pos - len(tail)
            i = buf.find(magic)
            while i != -1:
                if self._record_at(base + i)[0] in ("ok", "skip"):
                    return base + i
                i = buf.find(magic, i + 1)
            pos += len(chunk)
            tail = buf[-(len(magic) - 1):]


# ---------------------------------------------------------------------- sink


def _row_error(e: BaseException) -> bool:
    """Whether ``e`` is about the values of rows (so the rows can be told
    apart by trying them in parts) rather than about the database."""
    if isinstance(e, psycopg.Error):
        state = e.sqlstate
        if state is None:      # raised by the client while rendering a value
            return isinstance(e, (psycopg.DataError, psycopg.ProgrammingError))
        return state[:2] in ("22", "23")     # data exception, integrity constraint violation
    return isinstance(e, (ValueError, TypeError, OverflowError))


class Sink:
    """Batching, de-duplicating, spooling writer for a set of tables.

    ``dsn``: libpq connection string.  ``spool_dir``: a directory only this
    service writes (its StateDirectory).  ``tables``: the :class:`Table`
    definitions rows may be added for.  ``flush_interval``: seconds a row may
    wait before its batch is written (default 0.2; the guarantee is at most
    1 s).  ``batch_rows``: pending rows that trigger an immediate write.
    ``max_pending``: pending rows at which :meth:`add` blocks.
    ``retry_interval``: seconds between attempts to reach the database (or
    the spool) again.  ``statement_timeout``, ``lock_timeout``: seconds a
    statement may run or wait for a lock before the database counts as
    unavailable (0: no limit).  ``spool_max_bytes``: spool size beyond which
    rows are held in memory (back-pressure).  ``replay_rows``: spooled rows
    committed per replay transaction.  ``on_commit(table, rows,
    commit_time)`` is called in the writer thread after each commit (used
    for lag figures).

    Call :meth:`start` once and :meth:`close` at shutdown.
    """

    def __init__(self, dsn: str, spool_dir: str | os.PathLike, tables: Iterable[Table], *,
                 flush_interval: float = 0.2, batch_rows: int = 20_000, max_pending: int = 200_000,
                 retry_interval: float = 2.0,
                 on_commit: Callable[[Table, list[tuple], datetime], None] | None = None,
                 connect_timeout: int = 5, statement_timeout: float = 10.0, lock_timeout: float = 5.0,
                 spool_max_bytes: int = 2 << 30, replay_rows: int = 50_000,
                 application_name: str = "feeds-sink"):
        self.dsn = dsn
        self.tables = {t.name: t for t in tables}
        self.spool = Spool(Path(spool_dir), max_bytes=spool_max_bytes)
        self.rejects_path = Path(spool_dir) / "rejects.jsonl"
        self.flush_interval = flush_interval
        self.batch_rows = batch_rows
        self.max_pending = max_pending
        self.retry_interval = retry_interval
        self.on_commit = on_commit
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self.lock_timeout = lock_timeout
        self.replay_rows = max(1, replay_rows)
        self.application_name = application_name
        self.stats = SinkStats(tables={n: TableStats() for n in self.tables})
        self._cond = threading.Condition(threading.Lock())
        self._pending: dict[str, list[tuple]] = {n: [] for n in self.tables}
        self._count = 0
        self._inflight = 0
        # rows add() may queue before it blocks: max_pending, less the held
        # rows while the writer retries them (memory stays bounded)
        self._room = max_pending
        self._first = 0.0
        self._stopping = False
        self._abandon = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection | None = None
        self._staged: set[str] = set()
        self._next_retry = 0.0
        self._hold_until = 0.0
        self._held: str | None = None            # why rows are held in memory
        self._spool_error: str | None = None
        self._replay_at: tuple | None = None     # (segment, offset, damaged spans, legacy)
        self._replay_run = 0
        self._every = _Every(60.0)
        # a statement the server does not answer (a stalled server) is cut off
        # from the client side once this deadline (monotonic s) has passed
        self._deadline = 0.0
        self._guard_stop = threading.Event()
        self.spooling = False
        self.last_progress = time.monotonic()   # last commit or spool write
        self.writer_beat = time.monotonic()     # last turn of the writer loop
        # called about once a second by a producer blocked in add()/add_many()
        # (back-pressure blocks the collector's event loop; see Health.attach)
        self.on_wait: Callable[[], None] | None = None
        self.last_error: str | None = None
        self.fatal: BaseException | None = None

    # ------------------------------------------------------------------ API
    def start(self) -> "Sink":
        """Start the writer thread (replaying any spool left from before)."""
        self._thread = threading.Thread(target=self._run, name="sink-writer", daemon=True)
        self._thread.start()
        if self.statement_timeout:
            threading.Thread(target=self._guard, name="sink-guard", daemon=True).start()
        return self

    @property
    def pending(self) -> int:
        """Rows waiting for the writer (besides the batch being written)."""
        return self._count

    @property
    def unsettled(self) -> int:
        """Rows neither committed, spooled nor rejected yet: pending plus the
        batch being written (read without the lock: safe from a wait hook)."""
        return self._count + self._inflight

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
            while self._count >= self._room and not self._stopping and not self.fatal:
                self._cond.wait(1.0)
                if self.on_wait is not None:
                    self.on_wait()

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
            while self._count >= self._room and not self._stopping and not self.fatal:
                self._cond.wait(1.0)
                if self.on_wait is not None:
                    self.on_wait()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything added so far is committed, spooled or
        rejected; False when that did not happen within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._first = 0.0  # make the pending batch due now
            self._cond.notify()
            while (self._count or self._busy) and time.monotonic() < deadline and not self.fatal:
                self._cond.wait(0.05)
            return not self._count and not self._busy

    def close(self, timeout: float = 60.0) -> bool:
        """Write (or spool) everything pending and stop the writer; True when
        every row was committed, spooled or rejected within ``timeout``
        seconds.  Rows still held then count as lost (:meth:`outcome`)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        alive = False
        if self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self._cond:
                    self._abandon = True
                    self._cond.notify_all()
                self._thread.join(min(10.0, max(1.0, self.statement_timeout or 0)))
            alive = self._thread.is_alive()
        self._guard_stop.set()
        if self._conn is not None and not alive:
            try:
                self._conn.close()
            except Exception:
                pass
        with self._cond:
            self._closed = True
            lost = self._count + self._inflight
        if lost:
            log.error("%d rows could neither be committed nor spooled before the stop (%s)", lost,
                      self._held or self.last_error or "writer busy")
        return not alive and lost == 0

    def outcome(self) -> SinkOutcome:
        """Row counts of this process so far (see :class:`SinkOutcome`)."""
        with self._cond:
            pending = self._count + self._inflight
            closed = self._closed
        tables = list(self.stats.tables.values())
        return SinkOutcome(committed=sum(t.stored for t in tables), duplicates=sum(t.duplicates for t in tables),
                           spooled=self.stats.spooled_rows, replayed=self.stats.replayed_rows,
                           rejected=sum(t.rejected for t in tables), lost=pending if closed else 0,
                           pending=pending)

    @property
    def held(self) -> str | None:
        """Why rows are held in memory (back-pressure), or None."""
        return self._held

    def writer_alive(self) -> bool:
        """The writer thread runs and its loop turned recently (a statement
        the server does not answer is cut off after about 1.5 x
        ``statement_timeout``, so a longer silence means it is stuck)."""
        t = self._thread
        if t is None or not t.is_alive() or self.fatal:
            return False
        limit = max(30.0, 2.0 * (self.statement_timeout or 10.0) + 10.0, 3.0 * self.retry_interval)
        return self._busy or time.monotonic() - self.writer_beat < limit

    def status_reason(self) -> str | None:
        """Why the sink is not simply committing, for STATUS= (None when it is):
        ``BACK-PRESSURE: ...`` (rows held in memory: neither the database nor
        the spool takes them), ``SPOOLING (<database error>)``, or
        ``REPLAYING spool (<n> MB left)``."""
        held = self._held
        if held:
            return f"BACK-PRESSURE: {held}"
        if self.spooling:
            return f"SPOOLING ({self.last_error})"
        if self.spool.has_data():
            return f"REPLAYING spool ({self.spool.bytes / 1e6:,.1f} MB left)"
        return None

    # ------------------------------------------------------------ writer thread
    _busy = False

    def _take(self) -> dict[str, list[tuple]] | None:
        """Block until a batch is due, or a replay step (stop: None)."""
        with self._cond:
            while True:
                if self._abandon:
                    return None
                now = self.writer_beat = time.monotonic()
                held = now < self._hold_until
                if not held:
                    if self._count and (self._stopping or self._count >= self.batch_rows
                                        or now - self._first >= self.flush_interval):
                        break
                    if not self._stopping and now >= self._next_retry and self.spool.has_data():
                        break
                if self._stopping and not self._count:
                    return None
                if held:
                    wait = self._hold_until - now
                elif self._count:
                    wait = self.flush_interval - (now - self._first)
                elif self.spool.has_data():
                    wait = max(0.05, self._next_retry - now)
                else:
                    wait = 1.0
                self._cond.wait(max(0.001, wait))
            batch = {t: rows for t, rows in self._pending.items() if rows}
            self._pending = {n: [] for n in self.tables}
            self._inflight = self._count
            self._count = 0
            self._room = max(0, self.max_pending - self._inflight) if self._held else self.max_pending
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
                except Exception as e:      # a fault of our own: keep the rows, try again later
                    self._every("cycle", logging.ERROR, "sink write cycle failed (%r); rows kept, retrying",
                                e, exc_info=True)
                    self._next_retry = time.monotonic() + self.retry_interval
                    self._hold(batch, f"writer error: {_first_line(e)}")
                finally:
                    with self._cond:
                        self._inflight = 0
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
        """Resolve ``batch``: committed, spooled, or held for a retry."""
        db_ok = None
        if self.spool.has_data() and time.monotonic() >= self._next_retry:
            try:
                db_ok = self._replay_step()
            except Exception as e:      # the replay is retried later; new rows still go on
                self._every("replay", logging.ERROR, "spool replay failed (%r); retrying", e, exc_info=True)
                self._next_retry = time.monotonic() + self.retry_interval
        if not batch:
            return
        if self.spool.has_data() or (self.spooling and time.monotonic() < self._next_retry):
            # rows follow the spool (order kept); the database is retried by replay
            if self._to_spool(batch):
                return
            if db_ok:            # the database answers: do not insist on the spool
                self._to_db(batch)
            else:
                self._hold(batch)
            return
        self._to_db(batch)

    def _to_db(self, batch: dict[str, list[tuple]]) -> None:
        try:
            self._write(batch)
        except psycopg.Error as e:
            self._outage(e)
            if not self._to_spool(batch):
                self._hold(batch)
            return
        self._release()
        if self.spooling and not self.spool.has_data():
            log.info("database back (spool empty)")
            self.spooling = False
            self.last_error = None

    def _to_spool(self, batch: dict[str, list[tuple]]) -> bool:
        try:
            try:
                self.spool.append(batch)
            except OSError:
                raise
            except Exception:       # a value that cannot be pickled: keep it aside, spool the rest
                if not self._drop_unpicklable(batch):
                    raise
                self.spool.append(batch)
        except OSError as e:
            self._spool_error = e.strerror if isinstance(e, SpoolFull) else f"spool write failed: {e.strerror or e}"
            self._every("spool", logging.ERROR, "cannot write the spool in %s (%s); rows held in memory",
                        self.spool.dir, self._spool_error)
            return False
        if self._spool_error is not None:
            log.info("spool in %s writable again", self.spool.dir)
            self._spool_error = None
            self._every.reset("spool")
        self.stats.spooled_rows += sum(len(r) for r in batch.values())
        self.last_progress = time.monotonic()
        self._release()
        return True

    def _drop_unpicklable(self, batch: dict[str, list[tuple]]) -> int:
        """Move the rows of ``batch`` that cannot be written to the spool to
        ``rejects.jsonl`` (``batch`` is changed in place); returns how many."""
        bad = []
        for name, rows in batch.items():
            keep = []
            for r in rows:
                try:
                    pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL)
                    keep.append(r)
                except Exception as e:
                    bad.append((name, r, TypeError(f"cannot be spooled: {_first_line(e)}")))
            batch[name] = keep
        if bad:
            self._reject(bad)
        return len(bad)

    def _hold(self, batch: dict[str, list[tuple]], reason: str | None = None) -> None:
        """Put ``batch`` back in front of the pending rows; retry after
        ``retry_interval`` (add() blocks once max_pending rows wait)."""
        if reason is None:
            reason = self._spool_error or "spool unavailable"
            if self.spooling:
                reason += f"; database unavailable ({self.last_error})"
        self._held = reason
        self._every("held", logging.ERROR, "BACK-PRESSURE: %s; %d rows held in memory, retrying every %.1f s",
                    reason, sum(len(r) for r in batch.values()), self.retry_interval)
        with self._cond:
            n = 0
            for name, rows in batch.items():
                if name in self._pending:
                    self._pending[name] = rows + self._pending[name]
                else:
                    self._pending[name] = rows
                n += len(rows)
            self._count += n
            self._inflight = 0
            self._room = self.max_pending
            self._first = 0.0
            self._hold_until = time.monotonic() + self.retry_interval

    def _release(self) -> None:
        if self._held is not None:
            log.info("back-pressure over: rows are being written again")
            self._held = None
            self._every.reset("held")
            with self._cond:
                self._room = self.max_pending
                self._cond.notify_all()

    def _outage(self, e: BaseException) -> None:
        msg = _first_line(e)
        if not self.spooling:
            self.stats.outages += 1
            log.error("database unavailable (%s); spooling to %s", msg, self.spool.dir)
        elif not isinstance(e, _CONN_ERRORS):
            self._every("dberror", logging.ERROR, "database error (%s); rows stay in the spool", msg)
        self.spooling = True
        self.last_error = msg
        self._next_retry = time.monotonic() + self.retry_interval
        self._drop_conn()

    def _replay_step(self) -> bool | None:
        """Commit the next ``replay_rows`` spooled rows, in order; True when
        the database took them (or nothing was left), False on an outage,
        None when the spool could not be read."""
        try:
            self._connection()
        except psycopg.Error as e:
            self._outage(e)
            return False
        try:
            chunk, n, finished, nxt = self._read_spool()
        except OSError as e:     # the spool cannot be read now: new rows still go there
            self._every("spoolread", logging.ERROR, "cannot read the spool in %s (%s); retrying", self.spool.dir, e)
            self._next_retry = time.monotonic() + self.retry_interval
            return None
        unknown = {name: chunk.pop(name) for name in list(chunk) if name not in self.tables}
        try:
            if chunk:
                self._write(chunk)
        except psycopg.Error as e:
            self._outage(e)
            return False
        if unknown:
            err = LookupError("table not written by this program")
            self._reject([(name, r, err) for name, rows in unknown.items() for r in rows])
        self.stats.replayed_rows += n
        self._replay_run += n
        self._replay_at = nxt
        if self.spooling:
            log.info("database back; replaying the spool (%.1f MB)", self.spool.bytes / 1e6)
            self.spooling = False
            self.last_error = None
        for seg, bad in finished:
            self.spool.done(seg, bad)
        if not self.spool.has_data():
            if self._replay_run or finished:
                log.info("spool replayed: %d rows", self._replay_run)
            self._replay_run = 0
            self._replay_at = None
        return True

    def _read_spool(self) -> tuple[dict[str, list], int, list[tuple[Path, list]], tuple | None]:
        """The next ``replay_rows`` spooled rows: ``(rows by table, row count,
        segments read to their end with their damaged spans, where to go on)``."""
        chunk: dict[str, list] = {}
        n = 0
        finished: list[tuple[Path, list]] = []
        at = self._replay_at
        for seg in self.spool.rescan():
            if at is not None and at[0] == seg:
                rd = self.spool.reader(seg, at[1], at[2], at[3])
            else:
                rd = self.spool.reader(seg)
            with rd:
                while n < self.replay_rows:
                    rec = rd.next()
                    if rec is None:
                        break
                    for name, rows in rec.items():
                        if rows:
                            chunk.setdefault(name, []).extend(rows)
                            n += len(rows)
                else:
                    return chunk, n, finished, (seg, rd.offset, list(rd.bad), rd.legacy)
                finished.append((seg, list(rd.bad)))
        return chunk, n, finished, None

    # ----------------------------------------------------------- stalled server
    def _arm(self) -> None:
        if self.statement_timeout:
            self._deadline = time.monotonic() + self.statement_timeout * 1.5 + 5.0

    def _guard(self) -> None:
        """Cut the connection when a statement outlives its deadline: a server
        that stopped answering cannot enforce its own statement_timeout."""
        while not self._guard_stop.wait(0.5):
            d = self._deadline
            conn = self._conn
            if d and time.monotonic() > d and conn is not None:
                self._deadline = 0.0
                try:
                    s = socket.socket(fileno=os.dup(conn.pgconn.socket))
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    finally:
                        s.close()
                    log.error("database did not answer within %.0f s; connection closed",
                              self.statement_timeout * 1.5 + 5.0)
                except Exception as e:
                    log.debug("could not cut the database connection: %r", e)

    # ----------------------------------------------------------- SQL
    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.dsn, application_name=self.application_name,
                                    statement_timeout=self.statement_timeout, lock_timeout=self.lock_timeout,
                                    autocommit=True, connect_timeout=self.connect_timeout)
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
        """Commit one batch (all tables, one transaction).  Rows that cannot
        be stored are isolated and rejected.  Raises psycopg errors about the
        database (connection lost, timeouts, ...)."""
        conn = self._connection()
        rejects: list[tuple[str, tuple, BaseException]] = []
        isolate = partitions = False
        try:
            while True:
                rejects.clear()
                try:
                    self._arm()
                    with conn.transaction():
                        counts = {}
                        for name, rows in batch.items():
                            table = self.tables[name]
                            if isolate:
                                counts[name] = self._isolate(conn, table, rows, rejects)
                            elif safe:
                                counts[name] = self._copy_safe(conn, table, rows)
                            else:
                                counts[name] = self._copy(conn, table, rows)
                        self._arm()
                    break
                except pgerr.UniqueViolation:
                    self._staged.clear()     # temp tables created in the rolled-back transaction are gone
                    if safe or isolate:
                        raise
                    safe = True
                except Exception as e:
                    self._staged.clear()
                    if isolate or not _row_error(e):
                        raise
                    if not partitions:
                        partitions = True
                        self._ensure_partitions(conn, batch)
                        if isinstance(e, pgerr.CheckViolation) and _NO_PARTITION in str(e):
                            continue
                    self._every("isolate", logging.WARNING, "batch refused (%s); isolating the rows that "
                                "cannot be stored", _first_line(e))
                    isolate = True
        finally:
            self._deadline = 0.0
        now = datetime.now(timezone.utc)
        self.stats.commits += 1
        self.last_progress = time.monotonic()
        bad: dict[str, int] = {}
        if rejects:
            self._reject(rejects, count=False)
            for name, _, _ in rejects:
                bad[name] = bad.get(name, 0) + 1
        for name, rows in batch.items():
            ts = self.stats.tables[name]
            stored = counts.get(name, len(rows))
            ts.stored += stored
            ts.rejected += bad.get(name, 0)
            ts.duplicates += len(rows) - stored - bad.get(name, 0)
        if self.on_commit is not None:
            gone = {id(r) for _, r, _ in rejects}
            for name, rows in batch.items():
                if name in bad:
                    rows = [r for r in rows if id(r) not in gone]
                try:
                    self.on_commit(self.tables[name], rows, now)
                except Exception:
                    log.exception("on_commit callback failed")

    @staticmethod
    def _copy_stmt(table: Table, target: str) -> sql.Composed:
        return sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(target), sql.SQL(", ").join(map(sql.Identifier, table.columns)))

    def _copy(self, conn: psycopg.Connection, table: Table, rows: list[tuple]) -> int:
        self._arm()
        with conn.cursor() as cur:
            with cur.copy(self._copy_stmt(table, table.name)) as cp:
                write = cp.write_row
                for r in rows:
                    write(r)
        return len(rows)

    def _stage(self, cur: psycopg.Cursor, table: Table) -> str:
        stage = f"_stage_{table.name}"
        if stage not in self._staged:
            cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS) "
                                "ON COMMIT DELETE ROWS").format(sql.Identifier(stage), sql.Identifier(table.name)))
            self._staged.add(stage)
        return stage

    def _copy_safe(self, conn: psycopg.Connection, table: Table, rows: list[tuple]) -> int:
        self._arm()
        with conn.cursor() as cur:
            stage = self._stage(cur, table)
            with cur.copy(self._copy_stmt(table, stage)) as cp:
                write = cp.write_row
                for r in rows:
                    write(r)
            self._arm()
            cols = sql.SQL(", ").join(map(sql.Identifier, table.columns))
            cur.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT DO NOTHING").format(
                sql.Identifier(table.name), cols, cols, sql.Identifier(stage)))
            inserted = cur.rowcount
            cur.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(stage)))
        return inserted

    def _isolate(self, conn: psycopg.Connection, table: Table, rows: list[tuple],
                 rejects: list[tuple[str, tuple, BaseException]]) -> int:
        """Store what can be stored of ``rows`` (inside the caller's
        transaction): parts that fail are halved, each under a savepoint,
        down to single rows, which are put in ``rejects``."""
        with conn.cursor() as cur:
            self._stage(cur, table)     # outside the savepoints, which would drop it on rollback
        stored = 0
        todo = [rows]
        while todo:
            part = todo.pop()
            try:
                with conn.transaction():
                    stored += self._copy_safe(conn, table, part)
            except Exception as e:
                if not _row_error(e):
                    raise
                if len(part) == 1:
                    rejects.append((table.name, part[0], e))
                else:
                    half = len(part) // 2
                    todo.append(part[half:])
                    todo.append(part[:half])
        return stored

    def _reject(self, rejects: list[tuple[str, tuple, BaseException]], count: bool = True) -> None:
        """Keep rows that cannot be stored in ``rejects.jsonl`` (one JSON
        object a line: table, row as text, error, time), or in the journal
        when that file cannot be written."""
        at = datetime.now(timezone.utc).isoformat()
        lines = []
        for table, row, err in rejects:
            if count:
                ts = self.stats.tables.get(table)
                if ts is None:
                    ts = self.stats.tables[table] = TableStats()
                ts.rejected += 1
            shown = []
            for v in (row if isinstance(row, (tuple, list)) else [row]):
                try:
                    shown.append(None if v is None else str(v))
                except Exception:
                    shown.append(object.__repr__(v))
            lines.append(json.dumps({"table": table, "row": shown, "error": _first_line(err), "at": at}))
        try:
            with open(self.rejects_path, "a") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
            kept = str(self.rejects_path)
        except OSError as e:
            for line in lines:
                log.error("cannot write %s (%s); row that cannot be stored: %s", self.rejects_path, e, line)
            kept = "the journal"
        for table, _, err in rejects:
            self._every(f"reject:{table}", logging.ERROR, "row for %s cannot be stored (%s); kept in %s",
                        table, _first_line(err), kept)

    def _ensure_partitions(self, conn: psycopg.Connection, batch: dict[str, list[tuple]]) -> None:
        """Create the daily partitions the rows of ``batch`` need (values
        that are not a time a partition can be made for are left to be
        rejected)."""
        for name, rows in batch.items():
            table = self.tables.get(name)
            idx = table.partition_index if table is not None else None
            if idx is None:
                continue
            days: set[date] = set()
            for r in rows:
                try:
                    v = r[idx]
                    if isinstance(v, str):
                        v = datetime.fromisoformat(v)
                    if isinstance(v, datetime):
                        days.add(v.astimezone(timezone.utc).date())
                except (ValueError, TypeError, OverflowError, IndexError, KeyError):
                    continue
            made = []
            for d in sorted(days):
                self._arm()
                try:
                    if conn.execute("SELECT feeds_ensure_day_partitions(%s::regclass, %s, 1)",
                                    (name, d)).fetchone()[0]:
                        made.append(d)
                except psycopg.Error as e:
                    if not _row_error(e):
                        raise
                    log.warning("partition of %s for %s not created (%s)", name, d, _first_line(e))
            if made:
                log.info("created partitions of %s for %s", name, ", ".join(map(str, made)))
