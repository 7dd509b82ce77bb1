"""Configuration documents, one-line errors and secret files.

Configuration files are TOML (``tomllib``).  Defaults ship in ``etc/`` and are
installed to ``/etc/feeds/``; the operator edits the copies there.  Secrets
(passwords, TOTP seeds, DSN passwords) live in separate files readable only by
the service user and are referenced by path, never inlined in unit files.

Every setting is declared once in :mod:`feeds.settings`, whose
:func:`~feeds.settings.load` reads and checks a whole file and returns a
:class:`Config`.  A bad, missing or unknown key raises :class:`ConfigError`,
whose ``str()`` is one line naming the key and the file.  Programs turn it
into exit status 78 (``EX_CONFIG``), which every unit lists in
``RestartPreventExitStatus=``.
"""
from __future__ import annotations

import os
import stat
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable

#: exit statuses (sysexits.h): a temporary failure, a permission or credential refused (the unit is
#: not restarted: RestartPreventExitStatus), a bad configuration
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


def first_line(e: BaseException) -> str:
    """The first line of ``str(e)`` (its class name when empty), for one journal line."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


class ConfigError(Exception):
    """A configuration key is missing or invalid.

    Attributes: ``key`` (dotted path, e.g. ``binance.rest_url``), ``file`` (path
    of the configuration file), ``reason`` (short text, one line).
    """

    def __init__(self, key: str, file: str | os.PathLike, reason: str):
        reason = " ".join(str(reason).split())          # always one line
        self.key, self.file, self.reason = key, str(file), reason
        super().__init__(f"configuration error in {self.file}: key '{key}': {reason}")




class Config:
    """A TOML document: ``data`` (the parsed tables) and ``file`` (its path).

    Loaded through :func:`feeds.settings.load`, it also carries ``values``
    (every declared setting of its kind, checked, defaults filled in) and
    ``given`` (the keys the file sets); ``cfg["sink.batch_rows"]`` returns a
    value.
    """

    def __init__(self, data: dict, file: str | os.PathLike, values: dict | None = None,
                 given: set[str] | None = None):
        self.data, self.file = data, str(file)
        self.values: dict[str, Any] = values or {}
        self.given: set[str] = given or set()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Config":
        """Parse the TOML file at ``path`` (no checks of its keys).

        Raises :class:`ConfigError` (key ``-``) when the file is missing,
        unreadable or not valid TOML.
        """
        p = Path(path)
        try:
            with open(p, "rb") as f:
                return cls(tomllib.load(f), p)
        except FileNotFoundError:
            raise ConfigError("-", p, "file not found") from None
        except IsADirectoryError:
            raise ConfigError("-", p, "is a directory, not a file") from None
        except PermissionError:
            raise ConfigError("-", p, "permission denied") from None
        except UnicodeDecodeError:
            raise ConfigError("-", p, "not valid TOML (not UTF-8 text)") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("-", p, f"not valid TOML ({e})") from None

    def __getitem__(self, key: str) -> Any:
        """The checked value (or declared default) of a declared setting;
        KeyError for a key the file kind does not declare."""
        return self.values[key]

    def require(self, key: str) -> Any:
        """Like ``cfg[key]``, but a setting left unset (None) raises ConfigError."""
        v = self.values.get(key)
        if v is None:
            raise ConfigError(key, self.file, "missing")
        return v

    def secret(self, key: str, *, shared: bool = False) -> str:
        """The secret in the file named by setting ``key`` (see :func:`read_secret`)."""
        return read_secret(self.require(key), key, self.file, shared=shared)


def read_secret(path: str | os.PathLike, key: str, file: str | os.PathLike, *, shared: bool = False) -> str:
    """First line (stripped) of the secret file ``path``, named by setting
    ``key`` of configuration ``file`` (see :func:`read_secret_text`).  Raises
    :class:`ConfigError` also when that line is empty."""
    lines = read_secret_text(path, key, file, shared=shared).splitlines()
    value = lines[0].strip() if lines else ""
    if not value:
        raise ConfigError(key, file, f"secret file {path} is empty")
    return value


def read_secret_text(path: str | os.PathLike, key: str, file: str | os.PathLike, *,
                     shared: bool = False) -> str:
    """The whole text (UTF-8, at most 64 kB) of the secret file ``path``,
    named by setting ``key`` of configuration ``file``.

    The file must be a regular file readable by this user and by no group or
    other user (mode 0600 or stricter); with ``shared`` (a secret a group
    shares on purpose, e.g. the operators' database password) its group may
    read it too (mode 0640), never write it.  Raises :class:`ConfigError`
    naming the file (never its content) otherwise."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)      # a FIFO must not block the start
    except FileNotFoundError:
        raise ConfigError(key, file, f"secret file {p} not found") from None
    except PermissionError:
        raise ConfigError(key, file, f"secret file {p} not readable by this user") from None
    except OSError as e:
        raise ConfigError(key, file, f"secret file {p} not readable ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(key, file, f"secret file {p} is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(key, file, f"secret file {p} is not a regular file")
        if st.st_mode & (0o037 if shared else 0o077):
            raise ConfigError(key, file, f"secret file {p} is readable by "
                              + ("others or writable by its group (chmod 640)" if shared
                                 else "group/others (chmod 600)"))
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(65536)
    except OSError as e:
        raise ConfigError(key, file, f"secret file {p} not readable ({e.strerror})") from None
    finally:
        os.close(fd)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(key, file, f"secret file {p} is not UTF-8 text") from None


def positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


def non_negative(v) -> str | None:
    return None if v >= 0 else "must be >= 0"


def within(lo, hi, why: str = "", unit: str = "") -> Callable[[Any], str | None]:
    """Check ``lo <= v <= hi``; the message names the range (and ``why``)."""
    def check(v):
        if lo <= v <= hi:
            return None
        return f"must be {lo}..{hi}{' ' + unit if unit else ''}{f' ({why})' if why else ''}"
    return check


def one_of(*choices) -> Callable[[Any], str | None]:
    def check(v):
        return None if v in choices else f"must be one of {', '.join(map(str, choices))}"
    return check


def exit_on_config_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for entry points: a ConfigError prints its line and exits 78."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except ConfigError as e:
            print(str(e), file=sys.stderr, flush=True)
            sys.exit(EX_CONFIG)
    return wrapper


def database_dsn(cfg: Config) -> str:
    """libpq connection string of a loaded configuration (see
    :func:`feeds.settings.database_dsn`)."""
    from .settings import database_dsn as dsn
    return dsn(cfg)
