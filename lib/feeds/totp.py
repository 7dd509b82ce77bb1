"""TOTP codes for the venues' logins (Kite's second factor, Dhan's
``generateAccessToken``): RFC 6238, 6 digits, 30 s steps, computed with
pyotp from a base32 secret kept in a file readable only by the service user.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import pyotp

from .config import Config, ConfigError


def totp_code(secret: str, min_left: float = 3.0, clock: Callable[[], float] = time.time,
              sleep: Callable[[float], None] = time.sleep) -> str:
    """The current 6-digit TOTP code (30 s steps); when fewer than
    ``min_left`` seconds of its step remain, waits for the next step so the
    code is still valid when the venue checks it.  Raises ValueError for a
    secret that is not base32 or too short for pyotp (fewer than 112 bits)."""
    try:
        totp = pyotp.TOTP(secret)
        totp.byte_secret()
    except Exception as e:             # binascii.Error (a ValueError), too short, not a string
        raise ValueError(f"the TOTP secret is not a usable base32 secret ({e})") from None
    left = totp.interval - clock() % totp.interval
    if left < min_left:
        sleep(left + 0.05)
    return totp.at(clock())


def read_totp_secret(cfg: Config, key: str) -> str:
    """The base32 secret in the file named by setting ``key`` of ``cfg``,
    checked by computing a code.  Raises ConfigError naming ``key``: unset,
    file missing, readable by others or empty, or not a usable secret."""
    secret = cfg.secret(key)
    try:
        totp_code(secret, min_left=0)
    except ValueError as e:
        raise ConfigError(key, cfg.file, f"the secret in {cfg[key]}: {e}") from None
    return secret
