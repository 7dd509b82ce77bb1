"""Accounts, login sessions and tokens of the simulated Kite.

Models Kite Connect v3 "User" (login flow, ``POST /session/token``) and
the kite.zerodha.com web login the flow goes through:

1. ``GET /connect/login?api_key=..&v=3`` opens a connect session (``sess_id``).
2. ``POST /api/login`` (user_id, password) -> ``request_id`` for the second
   factor; 5 consecutive wrong passwords lock the account.
3. ``POST /api/twofa`` (user_id, request_id, twofa_value, twofa_type=totp)
   checks a real TOTP (RFC 6238, 30 s steps, +-1 step) and opens a web
   session (cookie ``kf_session``).
4. ``GET /connect/finish?api_key=..&sess_id=..`` issues a one-time
   ``request_token`` and redirects to the app's redirect URL.
5. ``POST /session/token`` exchanges it, with ``checksum =
   sha256(api_key + request_token + api_secret)``, for an ``access_token``.

Access tokens expire at the next 06:00 IST after issue (Kite's daily flush),
after a fixed TTL when configured, or on demand.  Errors are raised as
:class:`KiteError` carrying the HTTP status, Kite ``error_type`` and message.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import string
import time
from dataclasses import dataclass
from datetime import datetime, time as dtime, timedelta

import pyotp

from .kite_packets import IST

log = logging.getLogger(__name__)

MSG_BAD_TOKEN = "Incorrect `api_key` or `access_token`."
MSG_BAD_LOGIN = "Invalid `user_id` or `password`."
MSG_LOCKED = ("Account locked: too many invalid login attempts. "
              "Reset your password to unlock the account.")
MSG_BAD_TOTP = "Invalid TOTP. Please try again."


_ALNUM = string.ascii_letters + string.digits


def _token(n: int = 32) -> str:
    """A random alphanumeric token, like Kite's access and request tokens."""
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


class KiteError(Exception):
    """An error answered the way Kite answers it.

    ``status`` is the HTTP code (400 input, 403 token, 429 rate, ...),
    ``error_type`` the Kite exception name (``TokenException``,
    ``InputException``, ``TwoFAException``, ``NetworkException``, ...).
    """

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message

    def body(self) -> dict:
        """The JSON error envelope: status, message, data (null), error_type."""
        return {"status": "error", "message": self.message, "data": None, "error_type": self.error_type}


@dataclass
class KiteAccount:
    """The one user and app the simulator knows.

    ``totp_secret`` is base32 (as shown when enabling external TOTP);
    ``redirect_url`` None means the simulator's own ``/sim/login_done`` page.
    """

    api_key: str = "simkey"
    api_secret: str = "simsecret"
    user_id: str = "AB1234"
    password: str = "simpassword"
    totp_secret: str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    redirect_url: str | None = None
    user_name: str = "Simulated User"
    email: str = "user@example.invalid"


@dataclass
class _AccessToken:
    token: str
    api_key: str
    issued_at: float
    expires_at: float
    revoked: bool = False


@dataclass
class _WebSession:
    session_id: str
    user_id: str
    created: float


@dataclass
class _PendingLogin:
    request_id: str
    user_id: str
    created: float


@dataclass
class _RequestToken:
    token: str
    api_key: str
    user_id: str
    created: float
    used: bool = False


@dataclass
class AuthStats:
    """Counters of the login flow and token use."""

    logins_ok: int = 0
    logins_failed: int = 0
    twofa_ok: int = 0
    twofa_failed: int = 0
    request_tokens_issued: int = 0
    access_tokens_issued: int = 0
    token_rejections: int = 0
    expirations_forced: int = 0
    locked: bool = False
    failed_attempts: int = 0


def next_daily_expiry(now: float, at: dtime = dtime(6, 0)) -> float:
    """Epoch seconds of the next ``at`` (IST wall clock) strictly after ``now``."""
    local = datetime.fromtimestamp(now, IST)
    candidate = datetime.combine(local.date(), at, tzinfo=IST)
    if candidate <= local:
        candidate = datetime.combine(local.date() + timedelta(days=1), at, tzinfo=IST)
    return candidate.timestamp()


class AuthState:
    """Login, session and token book-keeping for one :class:`KiteAccount`.

    ``token_expiry`` is the IST time of day tokens die (default 06:00);
    ``token_ttl`` (seconds), when set, overrides it.  ``clock`` returns
    epoch seconds.  All methods raise :class:`KiteError` on refusal.
    Not thread-safe: use from the simulator's event loop.
    """

    MAX_LOGIN_ATTEMPTS = 5

    def __init__(
        self,
        account: KiteAccount,
        *,
        token_expiry: dtime = dtime(6, 0),
        token_ttl: float | None = None,
        request_token_ttl: float = 300.0,
        login_ttl: float = 300.0,
        clock=time.time,
    ) -> None:
        self.account = account
        self.token_expiry = token_expiry
        self.token_ttl = token_ttl
        self.request_token_ttl = request_token_ttl
        self.login_ttl = login_ttl
        self.clock = clock
        self.stats = AuthStats()
        try:
            self._totp = pyotp.TOTP(account.totp_secret)
            self._totp.now()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"totp_secret is not a valid base32 secret ({exc})") from exc
        self._tokens: dict[str, _AccessToken] = {}
        self._web: dict[str, _WebSession] = {}
        self._pending: dict[str, _PendingLogin] = {}
        self._request_tokens: dict[str, _RequestToken] = {}
        self._connect_sessions: dict[str, str] = {}
        self.public_token = secrets.token_hex(16)

    # --------------------------------------------------------------- web login

    def check_api_key(self, api_key: str | None) -> None:
        """Raise InputException (400) unless api_key is the configured one."""
        if not api_key or not hmac.compare_digest(api_key, self.account.api_key):
            raise KiteError(400, "InputException", "Invalid `api_key`.")

    def open_connect_session(self, api_key: str) -> str:
        """Start a connect session for the app; returns its ``sess_id``."""
        self.check_api_key(api_key)
        sess_id = _token()
        self._connect_sessions[sess_id] = api_key
        return sess_id

    def connect_session_valid(self, api_key: str, sess_id: str | None) -> bool:
        """True when sess_id was opened for api_key."""
        return bool(sess_id) and self._connect_sessions.get(sess_id) == api_key

    def login(self, user_id: str | None, password: str | None) -> dict:
        """Check user_id/password; return the /api/login ``data`` dict.

        Raises KiteError 400 InputException for missing fields or a wrong
        password, 403 for a locked account (after 5 consecutive failures).
        """
        if not user_id or not password:
            raise KiteError(400, "InputException", "`user_id` and `password` are required.")
        user_ok = hmac.compare_digest(user_id.upper(), self.account.user_id.upper())
        if user_ok and self.stats.locked:
            self.stats.logins_failed += 1
            raise KiteError(403, "InputException", MSG_LOCKED)
        if not (user_ok and hmac.compare_digest(password, self.account.password)):
            self.stats.logins_failed += 1
            if user_ok:
                self.stats.failed_attempts += 1
                if self.stats.failed_attempts >= self.MAX_LOGIN_ATTEMPTS:
                    self.stats.locked = True
                    log.warning("event=account_locked user_id=%s attempts=%d",
                                self.account.user_id, self.stats.failed_attempts)
            raise KiteError(400, "InputException", MSG_BAD_LOGIN)
        self.stats.failed_attempts = 0
        self.stats.logins_ok += 1
        request_id = secrets.token_urlsafe(32)
        self._pending[request_id] = _PendingLogin(request_id, self.account.user_id, self.clock())
        return {
            "user_id": self.account.user_id,
            "request_id": request_id,
            "twofa_type": "totp",
            "twofa_types": ["totp"],
            "twofa_status": "active",
            "profile": {"user_name": self.account.user_name, "user_shortname": self.account.user_name.split()[0]},
        }

    def twofa(self, user_id: str | None, request_id: str | None, value: str | None,
              twofa_type: str | None = "totp") -> str:
        """Check the TOTP for a pending login; returns a new web session id.

        Raises KiteError 400 TwoFAException for a wrong or missing code, an
        unknown/expired request_id or an unsupported twofa_type.
        """
        if twofa_type not in (None, "", "totp"):
            raise KiteError(400, "TwoFAException", f"Unsupported twofa_type {twofa_type!r}.")
        pending = self._pending.get(request_id or "")
        now = self.clock()
        if (pending is None or now - pending.created > self.login_ttl
                or not user_id or user_id.upper() != pending.user_id.upper()):
            self.stats.twofa_failed += 1
            raise KiteError(400, "TwoFAException", "Invalid or expired login request. Please login again.")
        code = (value or "").strip()
        if not (code.isdigit() and len(code) == 6 and self._totp.verify(code, for_time=now, valid_window=1)):
            self.stats.twofa_failed += 1
            raise KiteError(400, "TwoFAException", MSG_BAD_TOTP)
        del self._pending[pending.request_id]
        self.stats.twofa_ok += 1
        session_id = secrets.token_urlsafe(32)
        self._web[session_id] = _WebSession(session_id, pending.user_id, now)
        return session_id

    def web_session_user(self, session_id: str | None) -> str | None:
        """User id of a web session cookie value, or None."""
        ws = self._web.get(session_id or "")
        return ws.user_id if ws else None

    def issue_request_token(self, api_key: str, session_id: str | None) -> str:
        """Issue a one-time request_token for a logged-in web session.

        Raises KiteError 403 TokenException when the session is unknown.
        """
        self.check_api_key(api_key)
        user = self.web_session_user(session_id)
        if user is None:
            raise KiteError(403, "TokenException", "Session expired. Please login again.")
        token = _token()
        self._request_tokens[token] = _RequestToken(token, api_key, user, self.clock())
        self.stats.request_tokens_issued += 1
        return token

    # ---------------------------------------------------------- access tokens

    def _expiry_for(self, issued: float) -> float:
        if self.token_ttl is not None:
            return issued + self.token_ttl
        return next_daily_expiry(issued, self.token_expiry)

    def issue_access_token(self, api_key: str | None = None) -> str:
        """Issue an access token directly (simulator control; no login)."""
        api_key = api_key or self.account.api_key
        self.check_api_key(api_key)
        now = self.clock()
        token = _token()
        self._tokens[token] = _AccessToken(token, api_key, now, self._expiry_for(now))
        self.stats.access_tokens_issued += 1
        return token

    def exchange(self, api_key: str | None, request_token: str | None, checksum: str | None) -> dict:
        """``POST /session/token``: return the session ``data`` with a fresh access_token.

        Raises KiteError 400 InputException for missing fields, 403
        TokenException for an unknown/used/expired request_token or a wrong
        checksum.
        """
        if not api_key or not request_token or not checksum:
            raise KiteError(400, "InputException", "`api_key`, `request_token` and `checksum` are required.")
        self.check_api_key(api_key)
        expected = hashlib.sha256((api_key + request_token + self.account.api_secret).encode()).hexdigest()
        if not hmac.compare_digest(expected, checksum.lower()):
            self.stats.token_rejections += 1
            raise KiteError(403, "TokenException", "Invalid `checksum`.")
        rt = self._request_tokens.get(request_token)
        now = self.clock()
        if rt is None or rt.used or rt.api_key != api_key or now - rt.created > self.request_token_ttl:
            self.stats.token_rejections += 1
            raise KiteError(403, "TokenException", "Token is invalid or has expired.")
        rt.used = True
        access_token = self.issue_access_token(api_key)
        login_time = datetime.fromtimestamp(now, IST).strftime("%Y-%m-%d %H:%M:%S")
        data = self.profile()
        data.update({
            "api_key": api_key,
            "access_token": access_token,
            "public_token": self.public_token,
            "enctoken": _token(64),
            "refresh_token": "",
            "silo": "",
            "login_time": login_time,
        })
        return data

    def check_access(self, api_key: str | None, access_token: str | None) -> None:
        """Raise KiteError 403 TokenException unless the pair is valid and unexpired."""
        tok = self._tokens.get(access_token or "")
        if (tok is None or tok.revoked or api_key != tok.api_key or self.clock() >= tok.expires_at):
            self.stats.token_rejections += 1
            raise KiteError(403, "TokenException", MSG_BAD_TOKEN)

    def is_valid(self, api_key: str | None, access_token: str | None) -> bool:
        """Like check_access but returns a bool and counts nothing."""
        tok = self._tokens.get(access_token or "")
        return not (tok is None or tok.revoked or api_key != tok.api_key or self.clock() >= tok.expires_at)

    def token_expires_at(self, access_token: str) -> float | None:
        """Epoch seconds when the token expires, or None if unknown."""
        tok = self._tokens.get(access_token)
        return tok.expires_at if tok else None

    def invalidate(self, api_key: str | None, access_token: str | None) -> bool:
        """``DELETE /session/token``: revoke one access token; True when it existed."""
        self.check_api_key(api_key)
        tok = self._tokens.get(access_token or "")
        if tok is None:
            return False
        tok.revoked = True
        return True

    def expire_all(self) -> int:
        """Revoke every access token and web session (fault); returns tokens revoked."""
        n = 0
        for tok in self._tokens.values():
            if not tok.revoked:
                tok.revoked = True
                n += 1
        self._web.clear()
        self.stats.expirations_forced += 1
        return n

    def unlock(self) -> None:
        """Unlock the account and reset the failed-attempt counter."""
        self.stats.locked = False
        self.stats.failed_attempts = 0

    def profile(self) -> dict:
        """The ``GET /user/profile`` data for the account (shape of Kite's profile)."""
        name = self.account.user_name
        return {
            "user_id": self.account.user_id,
            "user_type": "individual",
            "email": self.account.email,
            "user_name": name,
            "user_shortname": name.split()[0] if name else "",
            "broker": "ZERODHA",
            "exchanges": ["NSE", "NFO", "BFO", "CDS", "BSE", "MCX", "BCD", "MF"],
            "products": ["CNC", "NRML", "MIS", "BO", "CO"],
            "order_types": ["MARKET", "LIMIT", "SL", "SL-M"],
            "avatar_url": None,
            "meta": {"demat_consent": "physical"},
        }

    def totp_now(self) -> str:
        """The current TOTP code (for demos and tests)."""
        return self._totp.at(self.clock())
