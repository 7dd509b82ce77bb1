"""Stream names, stream categories and WebSocket framing for the Binance simulator.

Follows Binance's USD-M futures "Websocket Market Streams" and "Live
Subscribing/Unsubscribing to streams" documents:

* a stream name is ``<symbol>@<kind>`` with a lower-case symbol, for example
  ``btcusdt@aggTrade``, ``btcusdt@bookTicker``, ``btcusdt@markPrice@1s``,
  ``btcusdt@ticker``, ``btcusdt@kline_1m``, ``btcusdt@depth@100ms``;
* since 2026-04 bookTicker and depth streams are served under ``/public`` and
  every other market stream under ``/market`` (:func:`category`);
* combined frames are ``{"stream":"<name>","data":<payload>}``, raw frames are
  the payload alone;
* control requests ``{"method":..,"params":[..],"id":N}`` are answered with
  ``{"result":..,"id":N}`` or ``{"error":{"code":..,"msg":..},"id":..}``.

Everything here is pure (no I/O).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import orjson

PUBLIC = "public"
MARKET = "market"

#: Kline intervals Binance accepts, in milliseconds ("1M" is a calendar month,
#: given here as 30 days only for ordering; aggregation treats it specially).
KLINE_INTERVALS_MS: dict[str, int] = {
    "1m": 60_000,
    "3m": 180_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "2h": 7_200_000,
    "4h": 14_400_000,
    "6h": 21_600_000,
    "8h": 28_800_000,
    "12h": 43_200_000,
    "1d": 86_400_000,
    "3d": 259_200_000,
    "1w": 604_800_000,
    "1M": 2_592_000_000,
}

# Kinds whose case Binance writes in camelCase; matched case-insensitively.
_CANONICAL_KINDS = {
    k.lower(): k
    for k in (
        "aggTrade",
        "bookTicker",
        "markPrice",
        "markPrice@1s",
        "ticker",
        "miniTicker",
        "forceOrder",
        "compositeIndex",
        "contractInfo",
        "assetIndex",
    )
}
_DEPTH_RE = re.compile(r"^depth(5|10|20)?(@(?:0|100|250|500)ms)?$")
_SYMBOL_RE = re.compile(r"^(?:[a-z0-9_]{1,40}|![a-z]+)$")
_KIND_RE = re.compile(r"^[A-Za-z0-9_@!]{1,40}$")

#: Close codes the simulator sends.
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008


class StreamNameError(ValueError):
    """A stream name that is not ``<symbol>@<kind>``."""


@dataclass(frozen=True, slots=True)
class StreamName:
    """One parsed stream name.

    ``symbol`` is lower case (``btcusdt``), ``kind`` canonical
    (``aggTrade``, ``kline_1m``, ``depth@100ms``), ``name`` the canonical
    full name used as the ``"stream"`` value of combined frames.
    """

    symbol: str
    kind: str
    name: str

    @property
    def category(self) -> str:
        """``"public"`` or ``"market"`` (see :func:`category`)."""
        return category(self.kind)


def canonical_kind(kind: str) -> str:
    """Return the canonical spelling of a stream kind.

    ``aggtrade`` -> ``aggTrade``; ``KLINE_1m`` -> ``kline_1m`` (the interval
    keeps its case: ``1m`` is a minute, ``1M`` a month); depth kinds are lower
    case. Unknown kinds are returned unchanged (Binance accepts any stream and
    simply never sends data for one it does not have).

    Raises :class:`StreamNameError` for a kline with an unknown interval.
    """
    low = kind.lower()
    if low in _CANONICAL_KINDS:
        return _CANONICAL_KINDS[low]
    if low.startswith("kline_"):
        interval = kind[6:]
        if interval not in KLINE_INTERVALS_MS:
            # "1M" is a month; anything else is accepted lower-case.
            if interval.lower() in KLINE_INTERVALS_MS and interval.lower() != "1m":
                interval = interval.lower()
            else:
                raise StreamNameError(f"invalid kline interval {interval!r}")
        return "kline_" + interval
    if _DEPTH_RE.match(low):
        return low
    return kind


def parse_stream(raw: str) -> StreamName:
    """Parse ``<symbol>@<kind>`` into a :class:`StreamName`.

    The symbol is lower-cased (Binance stream symbols are lower case).
    Raises :class:`StreamNameError` when the text is not a stream name.
    """
    if not isinstance(raw, str) or "@" not in raw:
        raise StreamNameError(f"invalid stream name {raw!r}")
    symbol, _, kind = raw.partition("@")
    symbol = symbol.lower()
    if not _SYMBOL_RE.match(symbol) or not _KIND_RE.match(kind):
        raise StreamNameError(f"invalid stream name {raw!r}")
    kind = canonical_kind(kind)
    return StreamName(symbol, kind, f"{symbol}@{kind}")


def category(kind: str) -> str:
    """Return the URL category that serves ``kind``.

    bookTicker and depth streams are ``"public"``; everything else
    (aggTrade, markPrice, ticker, kline_<i>, ...) is ``"market"``.
    """
    low = kind.lower()
    if low.startswith("bookticker") or low.startswith("depth"):
        return PUBLIC
    return MARKET


# --- WebSocket framing (RFC 6455, server side: never masked) ---------------

_SMALL_TEXT_HEADERS = [bytes((0x81, n)) for n in range(126)]
_PACK_16 = struct.Struct("!BBH").pack
_PACK_64 = struct.Struct("!BBQ").pack


def text_header(length: int) -> bytes:
    """Header of one unmasked, final text frame whose payload is ``length`` bytes."""
    if length < 126:
        return _SMALL_TEXT_HEADERS[length]
    if length < 65536:
        return _PACK_16(0x81, 126, length)
    return _PACK_64(0x81, 127, length)


def text_frame(payload: bytes) -> bytes:
    """One complete unmasked text frame carrying ``payload`` (UTF-8 bytes)."""
    return text_header(len(payload)) + payload


def ping_frame(payload: bytes = b"") -> bytes:
    """One ping control frame (payload at most 125 bytes)."""
    if len(payload) > 125:
        raise ValueError("control frame payload longer than 125 bytes")
    return bytes((0x89, len(payload))) + payload


def combined_payload(stream: str, data: bytes) -> bytes:
    """``{"stream":"<stream>","data":<data>}`` with ``data`` inserted verbatim."""
    return b'{"stream":"' + stream.encode() + b'","data":' + data + b"}"


def result_message(result, req_id) -> bytes:
    """Answer to a control request: ``{"result":<result>,"id":<id>}``."""
    return orjson.dumps({"result": result, "id": req_id})


def error_message(code: int, msg: str, req_id=None) -> bytes:
    """Binance-style control error: ``{"error":{"code":..,"msg":..},"id":..}``."""
    return orjson.dumps({"error": {"code": code, "msg": msg}, "id": req_id})
