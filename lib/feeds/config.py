"""Configuration loading with one-line errors.

Configuration files are TOML (``tomllib``).  Defaults ship in ``etc/`` and are
installed to ``/etc/feeds/``; the operator edits the copies there.  Secrets
(passwords, TOTP seeds, DSN passwords) live in separate files readable only by
the service user and are referenced by path, never inlined in unit files.

A bad or missing key raises :class:`ConfigError`, whose ``str()`` is one line
naming the key and the file.  Programs turn it into exit status 78
(``EX_CONFIG``), which every unit lists in ``RestartPreventExitStatus=``.
"""
from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable

EX_CONFIG = 78
DEFAULT_DIR = Path(os.environ.get("FEEDS_CONFIG_DIR", "/etc/feeds"))


class ConfigError(Exception):
    """A configuration key is missing or invalid.

    Attributes: ``key`` (dotted path, e.g. ``binance.rest_url``), ``file`` (path
    of the configuration file), ``reason`` (short text).
    """

    def __init__(self, key: str, file: str | os.PathLike, reason: str):
        self.key, self.file, self.reason = key, str(file), reason
        super().__init__(f"configuration error in {self.file}: key '{key}': {reason}")


_MISSING = object()


class Config:
    """A loaded TOML document with typed, path-named accessors.

    ``get("binance.symbols", list, default)`` returns the value at that dotted
    path, checked against the type; a missing key without default or a value of
    the wrong type raises :class:`ConfigError`.
    """

    def __init__(self, data: dict, file: str | os.PathLike):
        self.data, self.file = data, str(file)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Config":
        """Parse the TOML file at ``path``.

        Raises :class:`ConfigError` (key ``-``) when the file is missing,
        unreadable or not valid TOML.
        """
        p = Path(path)
        try:
            with open(p, "rb") as f:
                return cls(tomllib.load(f), p)
        except FileNotFoundError:
            raise ConfigError("-", p, "file not found") from None
        except PermissionError:
            raise ConfigError("-", p, "permission denied") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("-", p, f"not valid TOML ({e})") from None

    def get(self, key: str, typ: type | tuple = object, default: Any = _MISSING,
            check: Callable[[Any], str | None] | None = None) -> Any:
        """Value at dotted ``key``; ``check`` returns an error text or None."""
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is _MISSING:
                    raise ConfigError(key, self.file, "missing")
                return default
            node = node[part]
        if typ is float and isinstance(node, int) and not isinstance(node, bool):
            node = float(node)
        if not isinstance(node, typ) or (typ is int and isinstance(node, bool)):
            names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise ConfigError(key, self.file, f"expected {names}, got {type(node).__name__} {node!r}")
        if check is not None:
            err = check(node)
            if err:
                raise ConfigError(key, self.file, err)
        return node

    def secret(self, key: str) -> str:
        """Read a secret from the file named by ``key`` (first line, stripped).

        The file must not be readable by group or others. Raises ConfigError.
        """
        path = Path(self.get(key, str))
        try:
            st = path.stat()
            if st.st_mode & 0o077:
                raise ConfigError(key, self.file, f"secret file {path} is readable by group/others (chmod 600)")
            lines = path.read_text().splitlines()
            return lines[0].strip() if lines else ""
        except FileNotFoundError:
            raise ConfigError(key, self.file, f"secret file {path} not found") from None
        except PermissionError:
            raise ConfigError(key, self.file, f"secret file {path} not readable") from None


def positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


def non_negative(v) -> str | None:
    return None if v >= 0 else "must be >= 0"


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
    """libpq connection string from ``[database]``: ``dsn`` (string) and an
    optional ``password_file`` whose content is added as the password.
    Environment ``FEEDS_DSN`` overrides (used by tests and demos)."""
    env = os.environ.get("FEEDS_DSN")
    if env:
        return env
    if "database" not in cfg.data:
        common = Path(cfg.file).with_name("feeds.toml")
        if common.exists() and Path(cfg.file) != common:
            return database_dsn(Config.load(common))
    dsn = cfg.get("database.dsn", str)
    pwfile = cfg.get("database.password_file", str, "")
    if pwfile:
        pw = cfg.secret("database.password_file")
        from psycopg.conninfo import make_conninfo
        dsn = make_conninfo(dsn, password=pw)
    return dsn
