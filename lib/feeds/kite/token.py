"""The Kite access token on disk, and its validation.

Kite Connect v3 "User" / "Login flow": an access token is obtained once a
day by exchanging a ``request_token`` (``POST /session/token``,
``KiteConnect.generate_session``) and stays valid until Kite flushes
sessions at 06:00 IST the next morning (or until it is invalidated).

:class:`TokenStore` keeps one JSON document, written atomically with mode
0600 (owned by the service user; when written by root, by the owner of the
directory).  :func:`validate` asks ``GET /user/profile`` whether Kite still
accepts the token.  Neither ever logs the token.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import datetime, time as dtime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from ..runtime import write_atomically

log = logging.getLogger(__name__)

IST = ZoneInfo("Asia/Kolkata")
UTC = timezone.utc
#: Kite invalidates every access token at this IST time each morning.
DAILY_EXPIRY = dtime(6, 0)


class TokenError(Exception):
    """The stored access token cannot be used; ``str()`` is one line for the journal."""


class TokenMissing(TokenError):
    """No token file (never renewed), or not readable."""


class TokenExpired(TokenError):
    """The token is past Kite's daily expiry, or Kite refused it (403 TokenException)."""


def next_expiry(obtained: datetime) -> datetime:
    """Kite's expiry for a token obtained at ``obtained`` (aware): the next
    06:00 IST strictly after it, as an aware UTC datetime."""
    local = obtained.astimezone(IST)
    exp = datetime.combine(local.date(), DAILY_EXPIRY, IST)
    if exp <= local:
        exp = datetime.combine(local.date() + timedelta(days=1), DAILY_EXPIRY, IST)
    return exp.astimezone(UTC)


@dataclass
class AccessToken:
    """A stored session: ``api_key``, ``user_id``, ``access_token``,
    ``obtained_at`` and ``expires_at`` (aware UTC), ``login_time`` (Kite's,
    IST text) and ``method`` (``browser`` or ``http``)."""
    api_key: str
    user_id: str
    access_token: str
    obtained_at: datetime
    expires_at: datetime
    login_time: str = ""
    method: str = ""

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.expires_at

    def to_json(self) -> str:
        d = asdict(self)
        d["obtained_at"] = self.obtained_at.isoformat()
        d["expires_at"] = self.expires_at.isoformat()
        return json.dumps(d, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "AccessToken":
        """Raises ValueError/KeyError/TypeError for a document that is not a token."""
        d = json.loads(text)
        return cls(api_key=str(d["api_key"]), user_id=str(d["user_id"]), access_token=str(d["access_token"]),
                   obtained_at=datetime.fromisoformat(d["obtained_at"]),
                   expires_at=datetime.fromisoformat(d["expires_at"]),
                   login_time=str(d.get("login_time", "")), method=str(d.get("method", "")))

    def describe(self) -> str:
        """One line without the token itself."""
        return (f"user {self.user_id}, obtained {self.obtained_at.astimezone(IST):%Y-%m-%d %H:%M:%S} IST"
                f"{' by ' + self.method if self.method else ''}, expires "
                f"{self.expires_at.astimezone(IST):%Y-%m-%d %H:%M} IST")


class TokenStore:
    """The token file at ``path``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self) -> AccessToken:
        """The stored token.  Raises :class:`TokenMissing` (absent,
        unreadable or not a token document)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            raise TokenMissing(f"no access token in {self.path}: run feed-kite-token "
                               "(systemctl start feed-kite-token)") from None
        except OSError as e:
            raise TokenMissing(f"access token file {self.path} not readable ({e.strerror})") from None
        try:
            return AccessToken.from_json(text)
        except (ValueError, KeyError, TypeError) as e:
            raise TokenMissing(f"access token file {self.path} is not a token document ({e}); "
                               "run feed-kite-token") from None

    def load_current(self, api_key: str, now: datetime | None = None) -> AccessToken:
        """The stored token if it belongs to ``api_key`` and is before its
        expiry.  Raises :class:`TokenMissing` or :class:`TokenExpired`."""
        tok = self.load()
        if tok.api_key != api_key:
            raise TokenExpired(f"the access token in {self.path} belongs to another api_key; run feed-kite-token")
        if tok.expired(now):
            raise TokenExpired(f"the access token in {self.path} expired at "
                               f"{tok.expires_at.astimezone(IST):%Y-%m-%d %H:%M} IST ({tok.describe()}); "
                               "run feed-kite-token")
        return tok

    def save(self, tok: AccessToken) -> None:
        """Write atomically (temporary file, fsync, rename) with mode 0600.
        When run as root, the file is given to the owner of its directory
        (the service user).  Raises OSError."""
        d = self.path.parent
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomically(self.path, tok.to_json(), owner_of_dir=True)


def validate(tok: AccessToken, api_url: str, timeout: float = 10.0) -> dict:
    """Check the token with Kite's profile endpoint (``GET /user/profile``).

    Returns the profile dict.  Raises :class:`TokenExpired` when Kite
    answers TokenException (403) or the profile belongs to another user;
    other failures (network, 5xx) raise kiteconnect/requests exceptions
    unchanged, so that callers can retry them.
    """
    from kiteconnect import KiteConnect
    from kiteconnect import exceptions as kex
    kite = KiteConnect(tok.api_key, access_token=tok.access_token, root=api_url, timeout=timeout)
    try:
        prof = kite.profile()
    except kex.TokenException as e:
        raise TokenExpired(f"Kite refused the stored access token ({e}); run feed-kite-token") from None
    if tok.user_id and prof.get("user_id") and prof["user_id"].upper() != tok.user_id.upper():
        raise TokenExpired(f"the stored access token belongs to {prof['user_id']}, not {tok.user_id}")
    return prof
