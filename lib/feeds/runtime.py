"""Process plumbing shared by the bin/ programs: logging for the journal,
signals, state directory, watchdog period and the sd_notify socket.
:mod:`feeds.service` puts them together for the collectors."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from functools import lru_cache
from pathlib import Path


def setup_logging() -> None:
    """One event per line on stderr.  Under systemd (``JOURNAL_STREAM`` set)
    the journal adds time and unit, so lines carry only level and logger."""
    level = os.environ.get("FEEDS_LOG_LEVEL", "INFO").upper()
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") \
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    for noisy in ("binance", "websockets", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def tune_gc() -> None:
    """Collectors allocate a few short-lived containers per message; with the
    default thresholds the cyclic collector runs every 700 allocations and
    regularly rescans everything.  Freeze what start-up built and collect
    less often (reference counting still frees almost everything at once)."""
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def state_dir(configured: str) -> Path:
    """systemd's ``StateDirectory=`` (``$STATE_DIRECTORY``) when set, else the
    configured path."""
    env = os.environ.get("STATE_DIRECTORY")
    p = Path(env.split(":")[0]) if env else Path(configured)
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    return p


def watchdog_interval(default: float = 2.0) -> float:
    """A third of ``WatchdogSec=`` (``$WATCHDOG_USEC``), at most ``default``."""
    usec = os.environ.get("WATCHDOG_USEC")
    if usec and usec.isdigit() and int(usec) > 0:
        return min(default, int(usec) / 3e6)
    return default


def install_stop_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` (a clean, flushed exit)."""
    log = logging.getLogger("feeds")

    def on_signal(signame: str) -> None:
        if not stop.is_set():
            log.info("%s received: stopping, flushing buffered rows", signame)
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)


@lru_cache(maxsize=None)
def sd_notifier():
    """The process's one sd_notify(3) sender (``sdnotify.SystemdNotifier``;
    a no-op when ``NOTIFY_SOCKET`` is unset)."""
    import sdnotify
    return sdnotify.SystemdNotifier()


def notify(*messages: str) -> None:
    """Send each of ``messages`` (``READY=1``, ``STATUS=...``, ...) to systemd."""
    n = sd_notifier()
    for m in messages:
        n.notify(m)



def write_atomically(path: str | os.PathLike, text: str, *, owner_of_dir: bool = False) -> None:
    """Replace ``path`` with ``text`` (UTF-8) so that a reader sees the old
    or the new content, never a part: a temporary file (mode 0600) in the
    same directory, fsync, rename, fsync of the directory.  With
    ``owner_of_dir`` and when run as root the file is given to the owner of
    its directory (a service user).  Raises OSError; the temporary file is
    removed on failure."""
    import tempfile
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        if owner_of_dir and os.geteuid() == 0:
            st = p.parent.stat()
            os.fchown(fd, st.st_uid, st.st_gid)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
