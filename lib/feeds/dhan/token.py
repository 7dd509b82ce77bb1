"""feed-dhan-token: the Dhan access token, kept valid before each NSE session.

Venue document: DhanHQ v2 "Authentication".  A Dhan access token is valid
for 24 hours.  Two ways to get the next one (``dhan.login.method``):

* ``renew``: ``GET {dhan.api_url}/v2/RenewToken`` with the headers
  ``access-token`` (the current token) and ``dhanClientId``.  Dhan answers
  with a new token valid for another 24 hours and retires the one sent; it
  renews only a token that is still valid.  The first token is one
  generated on Dhan's web page (web.dhan.co, "Access DhanHQ APIs"), put in
  ``dhan.login.initial_token_file``; each run renews the stored one.
* ``totp``: ``POST {dhan.auth_url}/app/generateAccessToken?dhanClientId=..&pin=..&totp=..``
  (no body) for accounts with TOTP enabled: the PIN from
  ``dhan.login.pin_file`` and a TOTP code (RFC 6238, 30 s steps, pyotp)
  from the base32 secret in ``dhan.login.totp_secret_file``.  Dhan answers
  ``{dhanClientId, dhanClientName, dhanClientUcc, givenPowerOfAttorney,
  accessToken, expiryTime}``.

Both answers are read alike: the token from ``accessToken`` (``token`` is
accepted too), the expiry from, in this order, the token itself (a JWT
whose ``exp`` claim is Unix seconds), the answer's ``expiryTime`` (ISO
8601; without an offset it is IST, Dhan's time), the profile's
``tokenValidity`` (``DD/MM/YYYY HH:MM`` IST) or, failing all, 24 hours
after it was obtained.  ``GET {dhan.api_url}/v2/profile`` (header
``access-token``) checks a token: Dhan answers ``{dhanClientId,
tokenValidity, activeSegment, ddpi, mtf, dataPlan, dataValidity}``, or its
error envelope ``{errorType, errorCode, errorMessage}`` with ``DH-901``
(invalid authentication: the token expired) or ``DH-906`` (invalid token).

Why not the official client: ``dhanhq`` 2.3.0 has these calls
(``DhanLogin.generate_token``, ``renew_token``, ``user_profile``), but they
send requests without a timeout (a oneshot unit could hang until systemd
kills it), and on any failure they log through the root logger and raise
an exception whose text is the whole request error: for a network failure
of ``generate_token`` that is the URL with ``pin=`` and ``totp=`` in its
query.  So the three requests are made here with the standard library
(:mod:`urllib.request`), with ``dhan.login.timeout`` per request, and no
message ever carries the token, the PIN or the TOTP code.

The stored token is one JSON document (:class:`DhanToken`:
``client_id``, ``access_token``, ``obtained_at``, ``expires_at`` (ISO 8601
UTC), ``method``, ``expiry_from``, ``client_name``) at ``dhan.token_file``,
written atomically with mode 0600 (:mod:`feeds.tokens`; when written by
root, owned by the owner of its directory, the feeds_dhan user).
feed-dhan and feed-dhan-backfill read it with
:meth:`TokenStore.load_current`.

When a run renews (``renew`` method): when the stored token has less than
:data:`RENEW_WITHIN` left (so that a token renewed twice a day, by the
timer at 08:00 and 21:00 IST, never comes near its end and a missed run
still leaves time), or when it would expire before the end of the next
session (its open minus ``dhan.connect_before_open`` to its close plus
``dhan.stop_after_close``, from the XNSE calendar) while a new token would
last to that end.  Inside that window only the second reason counts: a
renewal retires the token the running collector holds.  With ``totp``, only
the second reason counts.  ``--force`` always renews.

Exit status of ``feed-dhan-token``: 0 when a valid token is stored
(renewed, or still good); 1 when the renewal failed after
``dhan.login.attempts`` tries (network, Dhan's 5xx or 429, malformed
answers; the reason is the last journal line); 77 when Dhan refused (the
stored and initial tokens are invalid or expired, or the PIN/TOTP was
refused): a person must act, retrying cannot help; 78 on a configuration
error (one line naming the key and the file).  ``--check`` only validates
the stored token: 0 valid, 77 missing, expired, expiring during the next
session or refused by Dhan (one line saying which), 1 when Dhan could not
be asked.  Each run but ``--check`` ends by writing the node_exporter
textfile ``<metrics.textfile_dir>/feeds_dhan_token.prom``
(:func:`feeds.ops.metrics.write_textfile`): the standard job keys and
``feeds_job_token_expiry_timestamp_seconds``, the stored token's expiry.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import click

from ..config import EX_NOPERM, Config, ConfigError, exit_on_config_error, first_line, read_secret
from .. import session_main as M
from .. import tokens
from ..tokens import IST, UTC, TokenError, TokenExpired, TokenMissing
from ..totp import read_totp_secret, totp_code

__all__ = ["IST", "UTC", "EX_NOPERM", "LIFETIME", "RENEW_WITHIN", "TOKEN_REFUSED", "TRANSIENT", "JOB", "TokenError",
           "TokenMissing", "TokenExpired", "DhanRefused", "DhanUnavailable", "RenewalFailed", "DhanToken",
           "TokenStore", "jwt_expiry", "parse_dhan_time", "token_expiry", "DhanAuth", "token_from_answer",
           "TokenSettings", "load_settings", "Window", "next_window", "renewal_due", "obtain", "check", "run",
           "main"]

log = logging.getLogger("feeds.dhan.token")

#: A Dhan access token's validity ("Authentication": 24 hours).
LIFETIME = timedelta(hours=24)
#: With the ``renew`` method, a token with less than this left is renewed
#: (outside a session): with runs at 08:00 and 21:00 IST every run renews,
#: and each finds at least 11 hours left.
RENEW_WITHIN = timedelta(hours=16)
#: Dhan's error codes that mean "this token is not accepted" (Annexure:
#: DH-901 invalid authentication, e.g. expired; DH-906 invalid token).
TOKEN_REFUSED = frozenset({"DH-901", "DH-906"})
#: Codes worth another try (DH-904 rate limit, DH-908 internal server error, DH-909 network error).
TRANSIENT = frozenset({"DH-904", "DH-908", "DH-909"})
#: The node_exporter textfile job name (``feeds_dhan_token.prom``).
JOB = "dhan_token"
_MAX_ANSWER = 1 << 20
_TOKEN_CHARS = re.compile(r"^[\x21-\x7e]{8,4096}$")


# ----------------------------------------------------------------------------- errors

class DhanRefused(Exception):
    """Dhan answered a request with a refusal (HTTP 4xx other than 429, or
    DH-901/DH-906...): not retried.  ``code``: Dhan's errorCode (or "");
    ``status``: the HTTP status; ``token_refused``: the token sent is not
    accepted (DH-901, DH-906, HTTP 401/403)."""

    def __init__(self, message: str, code: str = "", status: int = 0):
        super().__init__(message)
        self.code, self.status = code, status

    @property
    def token_refused(self) -> bool:
        return self.code in TOKEN_REFUSED or self.status in (401, 403)


class DhanUnavailable(Exception):
    """Dhan could not be asked or answered in a way worth another try:
    network failure, timeout, HTTP 5xx, HTTP 429 / DH-904, an answer that is
    not the documented JSON."""


class RenewalFailed(Exception):
    """The token could not be renewed; ``rc`` is the exit status (1 after
    transient failures, 77 after a refusal)."""

    def __init__(self, message: str, rc: int):
        super().__init__(message)
        self.rc = rc


# ----------------------------------------------------------------------------- the stored token

@dataclass
class DhanToken(tokens.StoredToken):
    """A stored access token: ``client_id`` (dhanClientId), ``access_token``,
    ``obtained_at`` and ``expires_at`` (aware UTC), ``method`` (``renew``,
    ``totp``), ``expiry_from`` (where the expiry came from: ``token``,
    ``answer``, ``profile`` or ``assumed``) and ``client_name`` (Dhan's, may
    be empty).  ``repr()`` hides the token."""
    client_id: str
    access_token: str = field(repr=False)
    obtained_at: datetime
    expires_at: datetime
    method: str = ""
    expiry_from: str = ""
    client_name: str = ""

    @classmethod
    def from_json(cls, text: str) -> "DhanToken":
        """Raises ValueError/KeyError/TypeError for a document that is not a token."""
        d = json.loads(text)
        obtained = datetime.fromisoformat(d["obtained_at"])
        expires = datetime.fromisoformat(d["expires_at"])
        if obtained.tzinfo is None or expires.tzinfo is None:
            raise ValueError("times without a UTC offset")
        tok = str(d["access_token"])
        if not _TOKEN_CHARS.match(tok):
            raise ValueError("the access token is not a printable token")
        return cls(client_id=str(d["client_id"]), access_token=tok, obtained_at=obtained, expires_at=expires,
                   method=str(d.get("method", "")), expiry_from=str(d.get("expiry_from", "")),
                   client_name=str(d.get("client_name", "")))

    def holder(self) -> str:
        return f"client {self.client_id}"

    def not_for(self, account: str) -> str | None:
        return f"client {self.client_id}, not dhan.client_id {account}" if self.client_id != account else None


class TokenStore(tokens.TokenStore[DhanToken]):
    """The token file at ``path`` (``dhan.token_file``)."""
    document = DhanToken
    renewer = "feed-dhan-token"


# ----------------------------------------------------------------------------- expiry

def jwt_expiry(token: str) -> datetime | None:
    """The ``exp`` claim (Unix seconds) of a JWT access token, as aware UTC;
    None when ``token`` is not a JWT with a numeric ``exp``.  The signature
    is not checked: the time only schedules the next renewal."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp = payload.get("exp") if isinstance(payload, dict) else None
        if isinstance(exp, bool) or not isinstance(exp, (int, float)):
            return None
        return datetime.fromtimestamp(exp, UTC)
    except (ValueError, binascii.Error, OverflowError, OSError, UnicodeDecodeError):
        return None


def parse_dhan_time(value) -> datetime | None:
    """A time as Dhan writes it, as aware UTC: ISO 8601 (``expiryTime``,
    e.g. ``2026-01-01T00:00:00.000``), ``DD/MM/YYYY HH:MM`` (the profile's
    ``tokenValidity``) or Unix seconds.  Without an offset the time is IST.
    None when it is none of these."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, UTC)
        text = str(value).strip()
        if not text:
            return None
        try:
            t = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            t = datetime.strptime(text, "%d/%m/%Y %H:%M")
        return (t.replace(tzinfo=IST) if t.tzinfo is None else t).astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        return None


def token_expiry(token: str, answer_expiry, obtained: datetime,
                 profile_validity=None) -> tuple[datetime, str]:
    """``(expires_at, source)`` for a token obtained at ``obtained``: the
    first of the JWT's ``exp`` (``token``), the answer's ``expiryTime``
    (``answer``), the profile's ``tokenValidity`` (``profile``) that lies
    after ``obtained``; else ``obtained`` + 24 h (``assumed``)."""
    for source, t in (("token", jwt_expiry(token)), ("answer", parse_dhan_time(answer_expiry)),
                      ("profile", parse_dhan_time(profile_validity))):
        if t is not None and t > obtained:
            return t, source
    return obtained + LIFETIME, "assumed"


# ----------------------------------------------------------------------------- Dhan's three requests

class DhanAuth:
    """The token requests of DhanHQ v2 "Authentication" (see the module
    docstring): :meth:`renew`, :meth:`generate`, :meth:`profile`.  Each
    returns the answer's JSON object and raises :class:`DhanRefused` or
    :class:`DhanUnavailable`; no text it logs or raises carries a token,
    PIN or TOTP code.  ``timeout``: seconds per request."""

    def __init__(self, api_url: str, auth_url: str, client_id: str, timeout: float = 30.0):
        self.api_url, self.auth_url = api_url.rstrip("/"), auth_url.rstrip("/")
        self.client_id, self.timeout = client_id, timeout
        self._secrets: set[str] = set()

    def renew(self, token: str) -> dict:
        """``GET /v2/RenewToken`` with the current ``token``: the new token's answer."""
        self._secrets.add(token)
        return self._call("GET", self.api_url + "/v2/RenewToken", "GET /v2/RenewToken",
                          {"access-token": token, "dhanClientId": self.client_id})

    def generate(self, pin: str, totp: str) -> dict:
        """``POST /app/generateAccessToken?dhanClientId=..&pin=..&totp=..``: a new token's answer."""
        self._secrets.update((pin, totp))
        query = urllib.parse.urlencode({"dhanClientId": self.client_id, "pin": pin, "totp": totp})
        return self._call("POST", f"{self.auth_url}/app/generateAccessToken?{query}",
                          "POST /app/generateAccessToken", {})

    def profile(self, token: str) -> dict:
        """``GET /v2/profile``: the account's profile, which Dhan gives only for a valid token."""
        self._secrets.add(token)
        return self._call("GET", self.api_url + "/v2/profile", "GET /v2/profile",
                          {"access-token": token, "client-id": self.client_id})

    def scrub(self, text: str) -> str:
        """``text`` with every secret this client has sent replaced by ``...``, at most 300 characters."""
        for s in sorted(self._secrets, key=len, reverse=True):
            if s:
                text = text.replace(s, "...")
        return " ".join(text.split())[:300]

    def _call(self, method: str, url: str, what: str, headers: dict[str, str]) -> dict:
        req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None,
                                     headers={"Accept": "application/json", "User-Agent": "feeds", **headers})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                status, raw = r.status, r.read(_MAX_ANSWER)
        except urllib.error.HTTPError as e:
            status = e.code
            try:
                raw = e.read(_MAX_ANSWER)
            except (OSError, http.client.HTTPException):
                raw = b""
            finally:
                e.close()
        except urllib.error.URLError as e:
            raise DhanUnavailable(self.scrub(f"{what}: {_reason(e.reason)}")) from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise DhanUnavailable(self.scrub(f"{what}: {_reason(e)}")) from None
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if 200 <= status < 300:
            if not isinstance(body, dict):
                raise DhanUnavailable(f"{what} answered HTTP {status} without a JSON object")
            return body
        code, message = _envelope(body)
        text = self.scrub(f"{what} answered HTTP {status}{' ' + code if code else ''}"
                          f"{': ' + message if message else ''}")
        if status == 429 or status >= 500 or code in TRANSIENT:
            raise DhanUnavailable(text)
        raise DhanRefused(text, code=code, status=status)


def _reason(e) -> str:
    if isinstance(e, (TimeoutError,)) or str(e) == "timed out":
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return first_line(e) if isinstance(e, BaseException) else str(e)


def _envelope(body) -> tuple[str, str]:
    """(errorCode, errorMessage) of Dhan's error envelope (or of a
    ``{status, message}`` / ``{remarks}`` answer); empty strings when absent."""
    if not isinstance(body, dict):
        return "", ""
    code = body.get("errorCode") or ""
    msg = body.get("errorMessage") or body.get("message") or body.get("remarks") or ""
    if isinstance(msg, dict):
        code = code or msg.get("error_code") or ""
        msg = msg.get("error_message") or ""
    return str(code)[:20], str(msg)[:200]


def token_from_answer(answer: dict, client_id: str, method: str, obtained: datetime) -> DhanToken:
    """The :class:`DhanToken` in a renewal or generation answer (the token
    in ``accessToken``, or ``token``; a ``data`` object is looked into).
    Raises :class:`DhanUnavailable` when it holds no usable token and
    :class:`DhanRefused` when it is for another client id."""
    data = answer.get("data") if isinstance(answer.get("data"), dict) else answer
    tok = data.get("accessToken") or data.get("token") or data.get("access_token")
    if not isinstance(tok, str) or not _TOKEN_CHARS.match(tok):
        raise DhanUnavailable("the answer holds no access token (expected accessToken)")
    cid = data.get("dhanClientId")
    if cid not in (None, "") and str(cid) != client_id:
        raise DhanRefused(f"the answer's token is for client {cid}, not dhan.client_id {client_id}")
    expires, source = token_expiry(tok, data.get("expiryTime"), obtained)
    name = data.get("dhanClientName")
    return DhanToken(client_id=client_id, access_token=tok, obtained_at=obtained, expires_at=expires,
                     method=method, expiry_from=source, client_name=str(name) if name else "")


# ----------------------------------------------------------------------------- settings

@dataclass
class TokenSettings:
    """What feed-dhan-token needs from ``dhan.toml`` (see :func:`load_settings`).

    ``sessions``: the calendar (None: ``session_calendar = "none"``);
    ``connect_before``/``stop_after``: the collection window around each
    session; ``pin``/``totp_secret``: read from their files (method
    ``totp`` only); ``initial_token_file``: path (may be empty)."""
    file: str
    client_id: str
    api_url: str
    auth_url: str
    token_file: str
    method: str
    initial_token_file: str
    timeout: float
    attempts: int
    retry_delays: list[float]
    textfile_dir: str
    sessions: object | None = None
    connect_before: timedelta = timedelta(minutes=5)
    stop_after: timedelta = timedelta(minutes=5)
    pin: str = field(default="", repr=False)
    totp_secret: str = field(default="", repr=False)
    totp_file: str = ""


def load_settings(cfg: Config, *, read_login_secrets: bool = True) -> TokenSettings:
    """:class:`TokenSettings` from a loaded ``dhan.toml``; with method
    ``totp`` (and ``read_login_secrets``) reads and checks the PIN and
    TOTP secret files.  Raises ConfigError."""
    d, lg = "dhan.", "dhan.login."
    ts = TokenSettings(
        file=cfg.file, client_id=cfg.require(d + "client_id").strip(), api_url=cfg[d + "api_url"],
        auth_url=cfg[d + "auth_url"], token_file=cfg[d + "token_file"], method=cfg[lg + "method"],
        initial_token_file=cfg[lg + "initial_token_file"], timeout=cfg[lg + "timeout"],
        attempts=cfg[lg + "attempts"], retry_delays=list(cfg[lg + "retry_delays"]),
        textfile_dir=cfg["metrics.textfile_dir"],
        connect_before=timedelta(seconds=cfg[d + "connect_before_open"]),
        stop_after=timedelta(seconds=cfg[d + "stop_after_close"]))
    if cfg[d + "session_calendar"] != "none":
        from ..calendars import ExchangeCalendar
        extra, holidays = M.extra_days(cfg, "dhan")
        try:
            ts.sessions = ExchangeCalendar(cfg[d + "session_calendar"], extra_sessions=extra, extra_holidays=holidays)
        except ValueError as e:
            raise ConfigError(d + "extra_sessions", cfg.file, first_line(e)) from None
    if ts.method == "totp" and read_login_secrets:
        ts.pin = cfg.secret(lg + "pin_file")
        if not ts.pin.isdigit():
            raise ConfigError(lg + "pin_file", cfg.file, f"the PIN in {cfg[lg + 'pin_file']} is not all digits")
        ts.totp_file = cfg.require(lg + "totp_secret_file")
        ts.totp_secret = read_totp_secret(cfg, lg + "totp_secret_file")
    return ts


# ----------------------------------------------------------------------------- when a token is needed

@dataclass(frozen=True)
class Window:
    """The collection window of one session: ``start`` (open minus
    connect_before) to ``end`` (close plus stop_after), aware UTC, and the
    session's one-line description."""
    start: datetime
    end: datetime
    what: str

    def contains(self, t: datetime) -> bool:
        return self.start <= t < self.end


def next_window(sessions, now: datetime, connect_before: timedelta, stop_after: timedelta,
                look_ahead_days: int = 15) -> Window | None:
    """The window in progress at ``now`` or the next one (None without a
    calendar, or none within ``look_ahead_days``)."""
    if sessions is None:
        return None
    day = now.astimezone(IST).date() - timedelta(days=1)
    for _ in range(look_ahead_days + 1):
        s = sessions.session(day)
        if s is not None and s.close + stop_after > now:
            return Window(s.open - connect_before, s.close + stop_after, s.describe())
        day += timedelta(days=1)
    return None


def _ist(t: datetime) -> str:
    return f"{t.astimezone(IST):%Y-%m-%d %H:%M} IST"


def renewal_due(tok: DhanToken, now: datetime, window: Window | None, method: str) -> str | None:
    """Why a new token is needed now (one line), or None when ``tok`` (of
    the configured client, not checked here) can stay (module docstring)."""
    if tok.expired(now):
        return f"the stored token expired at {_ist(tok.expires_at)}"
    if window is not None and tok.expires_at < window.end <= now + LIFETIME:
        return (f"the stored token expires at {_ist(tok.expires_at)}, before the end of the session "
                f"{window.what} ({_ist(window.end)})")
    if method == "renew" and tok.expires_at - now < RENEW_WITHIN:
        if window is not None and window.contains(now):
            return None                    # the running collector holds it; it lasts to the end
        left = (tok.expires_at - now).total_seconds() / 3600
        return f"the stored token has {left:.1f} h left (renewed when under {RENEW_WITHIN.total_seconds() / 3600:.0f} h)"
    return None


# ----------------------------------------------------------------------------- obtaining a token

def _initial_token(ts: TokenSettings, stored_exists: bool) -> str | None:
    """The token in ``dhan.login.initial_token_file``; None when unset or
    absent and a stored token exists (then a refusal says what to do).
    Raises ConfigError: unset or missing with no stored token, readable by
    others, empty."""
    key = "dhan.login.initial_token_file"
    path = ts.initial_token_file
    if not path:
        if stored_exists:
            return None
        raise ConfigError(key, ts.file, f"no token in {ts.token_file} to renew: set it to a file holding a "
                                        "token generated on web.dhan.co (mode 0600)")
    if not os.path.lexists(path) and stored_exists:
        return None
    tok = read_secret(path, key, ts.file)
    if not _TOKEN_CHARS.match(tok):
        raise ConfigError(key, ts.file, f"secret file {path} does not hold an access token")
    return tok


def obtain(ts: TokenSettings, store: TokenStore, auth: DhanAuth, *, stored: DhanToken | None,
           stored_exists: bool, now: Callable[[], datetime] = lambda: datetime.now(UTC),
           sleep: Callable[[float], None] = time.sleep) -> DhanToken:
    """Get a new token (renewal, or generation with PIN + TOTP), store it,
    then check it with the profile endpoint.

    ``stored``: the stored token when still valid for this client (the one
    to renew), else None.  Method ``renew`` renews ``stored``, and when Dhan
    refuses it (or there is none) the token of
    ``dhan.login.initial_token_file``.  Up to ``ts.attempts`` tries per
    token for :class:`DhanUnavailable`, waiting ``ts.retry_delays[i]`` (the
    last repeats).  Raises :class:`RenewalFailed` (``rc`` 1 or 77),
    ConfigError for a bad initial token file, OSError when the new token
    cannot be stored (it is lost: the old one may be retired already).
    """
    if ts.method == "totp":
        sources: list[tuple[str, str | None]] = [("PIN + TOTP", None)]
    else:
        sources = []
        if stored is not None:
            sources.append((f"the stored token ({store.path})", stored.access_token))
        initial = None if stored is not None and not ts.initial_token_file else \
            _initial_token(ts, stored_exists or stored is not None)
        if initial is not None and (stored is None or initial != stored.access_token):
            sources.append((f"the initial token ({ts.initial_token_file})", initial))
        if not sources:
            where = ts.initial_token_file or "unset"
            raise RenewalFailed(f"no valid token to renew: the token in {store.path} is expired or refused and "
                                f"dhan.login.initial_token_file ({where}) holds none: generate a token on "
                                f"web.dhan.co and put it in that file (see {ts.file})", EX_NOPERM)
    refusals: list[str] = []
    for label, source in sources:
        what = "generation" if source is None else "renewal"
        for attempt in range(1, ts.attempts + 1):
            try:
                if source is None:
                    answer = auth.generate(ts.pin, totp_code(ts.totp_secret))
                else:
                    answer = auth.renew(source)
                tok = token_from_answer(answer, ts.client_id, ts.method, now())
            except DhanRefused as e:
                refusals.append(f"{'the PIN or TOTP code' if source is None else label}: {e}")
                log.warning("Dhan refused %s: %s", "the PIN or TOTP code" if source is None else label, e)
                break
            except DhanUnavailable as e:
                if attempt == ts.attempts:
                    raise RenewalFailed(f"token {what} failed after {ts.attempts} attempt(s): {e}", 1) from None
                wait = ts.retry_delays[min(attempt - 1, len(ts.retry_delays) - 1)] if ts.retry_delays else 0.0
                log.warning("token %s attempt %d of %d failed: %s; retrying in %.3g s", what, attempt,
                            ts.attempts, e, wait)
                sleep(wait)
                continue
            store.save(tok)
            log.info("new access token stored in %s (%s, from %s; expiry from the %s)", store.path,
                     tok.describe(), "PIN + TOTP" if source is None else label, tok.expiry_from)
            if source is not None and (stored is None or source != stored.access_token):
                log.info("the token in %s is retired by the renewal; the file may be emptied",
                         ts.initial_token_file)
            return _confirm(tok, store, auth)
    hint = ("check the PIN and TOTP secret files and the system clock" if ts.method == "totp"
            else "generate a token on web.dhan.co and put it in dhan.login.initial_token_file")
    raise RenewalFailed(f"Dhan refused {'; '.join(refusals)} ({hint}; not retried)", EX_NOPERM)


def _confirm(tok: DhanToken, store: TokenStore, auth: DhanAuth) -> DhanToken:
    """Ask the profile endpoint about the new token.  An unreachable Dhan
    is only logged (the token is stored); a refusal raises RenewalFailed
    (77).  When the expiry was assumed, the profile's tokenValidity
    replaces it."""
    try:
        prof = auth.profile(tok.access_token)
    except DhanUnavailable as e:
        log.warning("the new token could not be checked with the profile endpoint: %s", e)
        return tok
    except DhanRefused as e:
        raise RenewalFailed(f"Dhan refused the token it had just issued ({e})", EX_NOPERM) from None
    cid = prof.get("dhanClientId")
    if cid not in (None, "") and str(cid) != tok.client_id:
        raise RenewalFailed(f"the new token's profile is client {cid}, not dhan.client_id {tok.client_id}", EX_NOPERM)
    if tok.expiry_from == "assumed":
        t, src = token_expiry(tok.access_token, None, tok.obtained_at, prof.get("tokenValidity"))
        if src == "profile" and t != tok.expires_at:
            tok = replace(tok, expires_at=t, expiry_from=src)
            store.save(tok)
    log.info("profile check: client %s, token valid until %s (Dhan's)", cid or tok.client_id,
             prof.get("tokenValidity") or "?")
    return tok


# ----------------------------------------------------------------------------- the program

def check(ts: TokenSettings, store: TokenStore, auth: DhanAuth, now: datetime) -> int:
    """``--check``: 0 when the stored token is valid (log line), 77 when it
    is missing, expired, expiring during the next session or refused by
    Dhan, 1 when Dhan could not be asked (one error line each)."""
    try:
        tok = store.load_current(ts.client_id, now)
    except TokenError as e:
        log.error("%s", e)
        return EX_NOPERM
    w = next_window(ts.sessions, now, ts.connect_before, ts.stop_after)
    if w is not None and w.start < tok.expires_at < w.end:
        log.error("the stored access token expires at %s, during the session %s: run feed-dhan-token",
                  _ist(tok.expires_at), w.what)
        return EX_NOPERM
    try:
        prof = auth.profile(tok.access_token)
    except DhanRefused as e:
        log.error("Dhan refused the stored access token (%s): run feed-dhan-token", e)
        return EX_NOPERM
    except DhanUnavailable as e:
        log.error("cannot check the stored access token: %s", e)
        return 1
    cid = prof.get("dhanClientId")
    if cid not in (None, "") and str(cid) != ts.client_id:
        log.error("the stored access token is client %s's, not dhan.client_id %s: run feed-dhan-token", cid,
                  ts.client_id)
        return EX_NOPERM
    log.info("stored access token is valid: %s (Dhan: valid until %s)", tok.describe(),
             prof.get("tokenValidity") or "?")
    return 0


def run(ts: TokenSettings, store: TokenStore, auth: DhanAuth, *, force: bool = False,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], None] = time.sleep) -> int:
    """One run of feed-dhan-token: renew (or generate) when due (see
    :func:`renewal_due`) or when Dhan refuses the stored token; returns the
    exit status (module docstring).  Raises ConfigError."""
    t = now()
    stored: DhanToken | None = None
    stored_exists = store.path.exists()
    try:
        stored = store.load_current(ts.client_id, t)
    except TokenError as e:
        reason = re.sub(r"[:;] run feed-dhan-token.*$", "", str(e))
    else:
        reason = "forced (--force)" if force else renewal_due(
            stored, t, next_window(ts.sessions, t, ts.connect_before, ts.stop_after), ts.method)
        if reason is None:
            try:
                auth.profile(stored.access_token)
            except DhanRefused as e:
                reason = f"Dhan refused the stored token ({e})"
                stored = None
            except DhanUnavailable as e:
                log.warning("the stored token could not be checked with Dhan (%s); it is within its validity: kept", e)
                log.info("stored access token kept: %s", stored.describe())
                return 0
            else:
                log.info("stored access token is valid: %s; nothing to do (use --force to renew anyway)",
                         stored.describe())
                return 0
    log.info("%s: %s", "generating a new access token with PIN + TOTP" if ts.method == "totp"
             else "renewing the access token", reason)
    try:
        obtain(ts, store, auth, stored=stored if ts.method == "renew" else None, stored_exists=stored_exists,
               now=now, sleep=sleep)
    except RenewalFailed as e:
        log.error("%s", e)
        return e.rc
    except OSError as e:
        log.error("the new access token could not be stored in %s (%s); the previous one may be retired "
                  "by Dhan already", store.path, e.strerror or e)
        return 1
    return 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@M.config_option("FEEDS_DHAN_CONFIG", "/etc/feeds/dhan.toml")
@click.option("--check", "check_only", is_flag=True,
              help="Only validate the stored token (exit 0 valid, 77 not, 1 Dhan unreachable).")
@click.option("--force", is_flag=True, help="Renew (or generate) even when the stored token is still good.")
@exit_on_config_error
def main(config_path: str, check_only: bool, force: bool) -> None:
    """Keep the Dhan access token valid: renew it with Dhan's token renewal
    endpoint (or generate one with PIN + TOTP), check it with the profile
    endpoint and store it (mode 0600) for feed-dhan."""
    from .. import service
    from ..settings import DHAN_FILE
    started = time.time()
    cfg = service.start(config_path, DHAN_FILE)
    ts = load_settings(cfg, read_login_secrets=not check_only)
    store = TokenStore(ts.token_file)
    auth = DhanAuth(ts.api_url, ts.auth_url, ts.client_id, ts.timeout)
    if check_only:
        sys.exit(check(ts, store, auth, datetime.now(UTC)))
    tokens.finish_renewal(lambda: run(ts, store, auth, force=force), ts.textfile_dir, JOB, store, started)
