"""Access tokens and errors of the simulated Dhan.

Models DhanHQ v2 "Authentication": an access token is a JWT (``header.payload.
signature``, base64url) whose payload carries ``iss`` ("dhan"), ``exp`` and
``iat`` (UTC epoch seconds), ``tokenConsumerType`` and ``dhanClientId``; it
lasts 24 hours unless configured otherwise.  ``GET /v2/RenewToken`` expires
the current token and issues one with a fresh lifetime; ``POST
/app/generateAccessToken?dhanClientId=..&pin=..&totp=..`` issues one for the
client's PIN and a TOTP (RFC 6238, 30 s steps, one step of tolerance either
way, checked with pyotp).  Tokens can be expired on demand (faults).

Errors use Dhan's envelope ``{"errorType", "errorCode", "errorMessage"}``
("Annexure", "Trading API Error"): :class:`DhanError`.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field

import pyotp

from .dhan_market import IST

# Annexure "Trading API Error": code -> (errorType, message)
ERRORS = {
    "DH-901": ("Invalid_Authentication", "Client ID or user generated access token is invalid or expired."),
    "DH-902": ("Invalid_Access", "User has not subscribed to Data APIs or does not have access to Trading APIs."),
    "DH-904": ("Rate_Limit", "Too many requests on server from single user breaching rate limits. "
                             "Try throttling API calls."),
    "DH-905": ("Input_Exception", "Missing required fields, bad values for parameters etc."),
    "DH-906": ("Order_Error", "Invalid Token"),
    "DH-907": ("Data_Error", "System is unable to fetch data due to incorrect parameters or no data present."),
    "DH-908": ("Internal_Server_Error", "Server was not able to process API request."),
}


class DhanError(Exception):
    """An error answered the way Dhan answers it: HTTP ``status`` and the envelope."""

    def __init__(self, status: int, code: str, message: str | None = None) -> None:
        error_type, default = ERRORS[code]
        self.status = status
        self.code = code
        self.error_type = error_type
        self.message = message or default
        super().__init__(f"{status} {code} {self.message}")

    def body(self) -> dict:
        return {"errorType": self.error_type, "errorCode": self.code, "errorMessage": self.message}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Token:
    token: str
    client_id: str
    issued_at: float
    expires_at: float
    revoked: bool = False

    def valid(self, now: float) -> bool:
        return not self.revoked and now < self.expires_at

    def expiry_text(self) -> str:
        """``expiryTime`` as Dhan writes it: ISO, IST wall clock, no zone."""
        return dt.datetime.fromtimestamp(self.expires_at, IST).strftime("%Y-%m-%dT%H:%M:%S")


@dataclass
class AuthStats:
    issued: int = 0
    renewed: int = 0
    generated: int = 0
    rejected_invalid: int = 0
    rejected_expired: int = 0
    totp_failures: int = 0
    expired_forced: int = 0
    events: list = field(default_factory=list)


class TokenBook:
    """The one Dhan user (``client_id``, ``pin``, ``totp_secret`` base32) and its tokens.

    ``ttl``: token lifetime in seconds (Dhan: 24 h).  ``clock``: epoch seconds.
    Raises ValueError for a bad TOTP secret or ttl.  Not thread-safe."""

    def __init__(self, client_id: str = "1000000001", *, pin: str = "123456",
                 totp_secret: str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", ttl: float = 86_400.0,
                 client_name: str = "SIMULATED USER", clock=time.time) -> None:
        if ttl <= 0:
            raise ValueError("token ttl must be > 0 seconds")
        try:
            self._totp = pyotp.TOTP(totp_secret)
            self._totp.now()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"totp secret is not valid base32 ({exc})") from exc
        self.client_id = client_id
        self.pin = pin
        self.ttl = float(ttl)
        self.client_name = client_name
        self.clock = clock
        self.stats = AuthStats()
        self._tokens: dict[str, Token] = {}
        self._key = secrets.token_bytes(32)

    def totp_now(self) -> str:
        return self._totp.now()

    def issue(self, ttl: float | None = None, token: str | None = None) -> Token:
        """A new token (a JWT, or ``token`` verbatim when given) valid for ``ttl`` s (default: the book's)."""
        now = self.clock()
        exp = now + (self.ttl if ttl is None else float(ttl))
        if token is None:
            header = _b64(json.dumps({"typ": "JWT", "alg": "HS512"}, separators=(",", ":")).encode())
            payload = _b64(json.dumps({"iss": "dhan", "partnerId": "", "exp": int(exp), "iat": int(now),
                                       "tokenConsumerType": "SELF", "webhookUrl": "",
                                       "dhanClientId": self.client_id, "jti": secrets.token_hex(8)},
                                      separators=(",", ":")).encode())
            sig = _b64(hmac.new(self._key, f"{header}.{payload}".encode(), hashlib.sha512).digest())
            token = f"{header}.{payload}.{sig}"
        tok = Token(token, self.client_id, now, exp)
        self._tokens[token] = tok
        self.stats.issued += 1
        return tok

    def lookup(self, token: str | None) -> Token | None:
        return self._tokens.get(token or "")

    def check(self, token: str | None, client_id: str | None = None) -> Token:
        """The valid token, or DhanError: unknown token 400 DH-906 "Invalid Token" (as
        recorded), expired/revoked token or a client id that is not the token's
        401 DH-901."""
        tok = self._tokens.get(token or "")
        if tok is None:
            self.stats.rejected_invalid += 1
            raise DhanError(400, "DH-906")
        if not tok.valid(self.clock()) or (client_id and client_id != tok.client_id):
            self.stats.rejected_expired += 1
            raise DhanError(401, "DH-901")
        return tok

    def renew(self, token: str | None, client_id: str | None) -> Token:
        """``GET /v2/RenewToken``: expire ``token`` and issue a new one (DhanError as :meth:`check`)."""
        old = self.check(token, client_id)
        old.revoked = True
        self.stats.renewed += 1
        return self.issue()

    def generate(self, client_id: str | None, pin: str | None, totp: str | None) -> Token:
        """``POST /app/generateAccessToken``: a new token for the PIN and a current TOTP.

        Raises DhanError 400 DH-905 for a missing field, 401 DH-901 for a wrong
        client id, PIN or TOTP."""
        if not client_id or not pin or not totp:
            raise DhanError(400, "DH-905", "dhanClientId, pin and totp are required.")
        code = totp.strip()
        ok_totp = code.isdigit() and len(code) == 6 and self._totp.verify(code, for_time=self.clock(),
                                                                           valid_window=1)
        if not ok_totp:
            self.stats.totp_failures += 1
        if client_id != self.client_id or not hmac.compare_digest(pin, self.pin) or not ok_totp:
            raise DhanError(401, "DH-901", "Invalid client id, PIN or TOTP.")
        self.stats.generated += 1
        return self.issue()

    def expire(self, token: str | None = None) -> list[Token]:
        """Expire one token (or every valid one) now; returns those expired."""
        now = self.clock()
        targets = [self._tokens[token]] if token in self._tokens else (
            [] if token else [t for t in self._tokens.values() if t.valid(now)])
        for t in targets:
            t.expires_at = min(t.expires_at, now)
        self.stats.expired_forced += len(targets)
        return targets

    def answer(self, tok: Token) -> dict:
        """The JSON of a token answer (the shape of "Consume Consent")."""
        return {"dhanClientId": self.client_id, "dhanClientName": self.client_name, "dhanClientUcc": "SIM0001",
                "givenPowerOfAttorney": False, "accessToken": tok.token, "expiryTime": tok.expiry_text()}
