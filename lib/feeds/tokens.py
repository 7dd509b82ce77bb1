"""A venue's access token on disk, and the end of a renewal run.

Each venue keeps one JSON document (its own dataclass on
:class:`StoredToken`) at its ``token_file``: written atomically with mode
0600 (:func:`feeds.runtime.write_atomically`; when written by root, owned
by the owner of its directory, the service user), read back by the
collectors with :meth:`TokenStore.load_current`.  Neither ever logs the
token.  :func:`finish_renewal` ends a renewer's run: the node_exporter
textfile of the run (:func:`feeds.ops.metrics.write_textfile`) whatever
happened, then the exit status.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Generic, NoReturn, TypeVar

from .calendars import IST
from .config import first_line as _first_line
from .config import EX_CONFIG, ConfigError
from .runtime import write_atomically

UTC = timezone.utc


class TokenError(Exception):
    """The stored access token cannot be used; ``str()`` is one line for the journal."""


class TokenMissing(TokenError):
    """No token file (never obtained), not readable, or not a token document."""


class TokenExpired(TokenError):
    """The token is past its expiry, belongs to another account, or the
    venue refused it."""


class StoredToken:
    """What the venues' token documents share.  A subclass is a dataclass
    with at least ``access_token``, ``obtained_at`` and ``expires_at``
    (aware datetimes) and ``method``; it gives :meth:`from_json`,
    :meth:`holder` and :meth:`not_for`."""

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.expires_at

    def to_json(self) -> str:
        """The document: the dataclass's fields, times as ISO 8601 UTC."""
        d = asdict(self)
        d["obtained_at"] = self.obtained_at.astimezone(UTC).isoformat()
        d["expires_at"] = self.expires_at.astimezone(UTC).isoformat()
        return json.dumps(d, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "StoredToken":
        """Raises ValueError/KeyError/TypeError for a document that is not a token."""
        raise NotImplementedError

    def holder(self) -> str:
        """Whose token it is, for :meth:`describe` (``user AB1234``, ``client 1000000001``)."""
        raise NotImplementedError

    def not_for(self, account: str) -> str | None:
        """Whom the token belongs to when not to ``account`` (the end of
        "belongs to ..."), else None."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line without the token itself."""
        return (f"{self.holder()}, obtained {self.obtained_at.astimezone(IST):%Y-%m-%d %H:%M:%S} IST"
                f"{' by ' + self.method if self.method else ''}, expires "
                f"{self.expires_at.astimezone(IST):%Y-%m-%d %H:%M} IST")


T = TypeVar("T", bound=StoredToken)


class TokenStore(Generic[T]):
    """The token file at ``path``; a venue's subclass names its
    :attr:`document` class and its :attr:`renewer` program (the one every
    refusal tells the operator to run)."""
    document: type[T]
    renewer: str

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self) -> T:
        """The stored token.  Raises :class:`TokenMissing` (absent,
        unreadable or not a token document)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            raise TokenMissing(f"no access token in {self.path}: run {self.renewer} "
                               f"(systemctl start {self.renewer})") from None
        except OSError as e:
            raise TokenMissing(f"access token file {self.path} not readable ({e.strerror})") from None
        try:
            return self.document.from_json(text)
        except (ValueError, KeyError, TypeError) as e:
            raise TokenMissing(f"access token file {self.path} is not a token document ({_first_line(e)}); "
                               f"run {self.renewer}") from None

    def load_current(self, account: str, now: datetime | None = None) -> T:
        """The stored token if it belongs to ``account`` (the API key, the
        client id) and is before its expiry.  Raises :class:`TokenMissing`
        or :class:`TokenExpired`."""
        tok = self.load()
        other = tok.not_for(account)
        if other is not None:
            raise TokenExpired(f"the access token in {self.path} belongs to {other}; run {self.renewer}")
        if tok.expired(now):
            raise TokenExpired(f"the access token in {self.path} expired at "
                               f"{tok.expires_at.astimezone(IST):%Y-%m-%d %H:%M} IST ({tok.describe()}); "
                               f"run {self.renewer}")
        return tok

    def save(self, tok: T) -> None:
        """Write atomically (temporary file 0600, fsync, rename, fsync of the
        directory).  When run as root, the file is given to the owner of its
        directory (the service user).  Raises OSError."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomically(self.path, tok.to_json(), owner_of_dir=True)


def write_textfile(directory: str, job: str, store: TokenStore, started: float, rc: int) -> None:
    """The node_exporter textfile of a renewal run (``feeds_<job>.prom``,
    :func:`feeds.ops.metrics.write_textfile`; nothing when ``directory`` is
    empty): the standard keys and ``token_expiry_timestamp_seconds``, the
    expiry of the token stored now (whether renewed by this run or still
    valid; left out when none)."""
    from .ops.metrics import job_values, write_textfile as write
    if not directory:
        return
    try:
        expiry = store.load().expires_at.timestamp()
    except TokenError:
        expiry = None
    write(directory, job, job_values(started, rc, token_expiry_timestamp_seconds=expiry))


def finish_renewal(run: Callable[[], int | None], directory: str, job: str, store: TokenStore,
                   started: float) -> NoReturn:
    """Run a renewal (``run`` returns the exit status, None for 0, or calls
    ``sys.exit``), write its textfile (:func:`write_textfile`) whatever
    happened, and exit with its status: a ConfigError is raised on with
    status 78, any other exception with status 1."""
    rc = 1
    try:
        rc = run() or 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    except ConfigError:
        rc = EX_CONFIG
        raise
    finally:
        write_textfile(directory, job, store, started, rc)
    sys.exit(rc)


