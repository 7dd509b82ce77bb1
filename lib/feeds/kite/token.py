"""The Kite access token on disk, and its validation.

Kite Connect v3 "User" / "Login flow": an access token is obtained once a
day by exchanging a ``request_token`` (``POST /session/token``,
``KiteConnect.generate_session``) and stays valid until Kite flushes
sessions at 06:00 IST the next morning (or until it is invalidated).

:class:`TokenStore` keeps one JSON document (:mod:`feeds.tokens`: written
atomically with mode 0600, owned by the service user).  :func:`validate`
asks ``GET /user/profile`` whether Kite still accepts the token.  Neither
ever logs the token.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, time as dtime, timedelta

from .. import tokens
from ..tokens import IST, UTC, TokenError, TokenExpired, TokenMissing

__all__ = ["IST", "UTC", "DAILY_EXPIRY", "TokenError", "TokenMissing", "TokenExpired", "next_expiry", "AccessToken",
           "TokenStore", "validate"]

log = logging.getLogger(__name__)

#: Kite invalidates every access token at this IST time each morning.
DAILY_EXPIRY = dtime(6, 0)


def next_expiry(obtained: datetime) -> datetime:
    """Kite's expiry for a token obtained at ``obtained`` (aware): the next
    06:00 IST strictly after it, as an aware UTC datetime."""
    local = obtained.astimezone(IST)
    exp = datetime.combine(local.date(), DAILY_EXPIRY, IST)
    if exp <= local:
        exp = datetime.combine(local.date() + timedelta(days=1), DAILY_EXPIRY, IST)
    return exp.astimezone(UTC)


@dataclass
class AccessToken(tokens.StoredToken):
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

    @classmethod
    def from_json(cls, text: str) -> "AccessToken":
        """Raises ValueError/KeyError/TypeError for a document that is not a token."""
        d = json.loads(text)
        return cls(api_key=str(d["api_key"]), user_id=str(d["user_id"]), access_token=str(d["access_token"]),
                   obtained_at=datetime.fromisoformat(d["obtained_at"]),
                   expires_at=datetime.fromisoformat(d["expires_at"]),
                   login_time=str(d.get("login_time", "")), method=str(d.get("method", "")))

    def holder(self) -> str:
        return f"user {self.user_id}"

    def not_for(self, account: str) -> str | None:
        return "another api_key" if self.api_key != account else None


class TokenStore(tokens.TokenStore[AccessToken]):
    """The token file at ``path`` (``kite.token_file``)."""
    document = AccessToken
    renewer = "feed-kite-token"


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
