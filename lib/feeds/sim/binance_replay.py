"""Reader for recorded Binance USD-M WebSocket sessions.

Two line formats are read, detected line by line, from plain or gzip files
(gzip is recognised by its magic bytes, whatever the file is called):

1. ``*.frames`` recordings (see ``shared/data/README.md``):

   * ``<recv_unix_ts>: {"stream":"<name>","data":{...}}`` - one frame exactly
     as received, the receive time in seconds (decimals allowed); the text of
     the data object is kept byte for byte;
   * ``wss://fstream.binance.com/stream?streams=a/b/... <-> <unix_ts>`` - the
     connection that was recorded (its stream list);
   * ``<url> -> <recv_unix_ts>: <body>`` - a REST answer captured in the same
     session (``/fapi/v1/depth`` snapshots are used for the REST depth
     endpoint);
   * ``configuration: {...}`` and blank lines - skipped.

2. Receive-time-prefixed frames, as other public recordings store them:
   ``<recv_time> <frame>`` - an integer receive time in nanoseconds since
   the Unix epoch, one space, then the raw JSON frame as received.  (A
   timestamp too small to be nanoseconds is read by its magnitude as
   microseconds, milliseconds or seconds.)  The frame is either a
   combined-stream object ``{"stream":..,"data":..}`` or a raw event
   ``{"e":..,"s":..,...}`` from a ``/ws`` connection.  A raw event gets the
   stream name Binance gives that event type: ``<symbol>@aggTrade``,
   ``@bookTicker``, ``@kline_<interval>``, ``@markPrice``, ``@ticker``,
   ``@miniTicker``, ``@forceOrder`` and ``@depth`` (a raw event does not say
   which update speed or level count was subscribed, so ``@depth@100ms``
   recordings replay as ``@depth``); its text is sent verbatim as the data.
   Lines that are not frames (subscription replies, arrays, unknown event
   types) are skipped and counted.

Frames are replayed in file order, paced by their receive times (see
:class:`~feeds.sim.binance.BinanceSimulator`, ``speed``).  A sibling REST
file (``<stem>.rest``, or ``<stem>.rest.gz``; for ``x.frames.gz`` the stem
is ``x``) is read too when present.  A gzip file cut short (a recording
that was interrupted) is read up to the cut, with a warning.
"""

from __future__ import annotations

import gzip
import logging
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import orjson

from .binance_market import parse_scaled
from .binance_streams import StreamNameError, parse_stream

log = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_RECV_PREFIXED = re.compile(rb"^(\d{9,20}) +(?=[{\[])")

#: Event type (``e``) of a raw frame -> stream kind Binance serves it on.
RAW_EVENT_KINDS: dict[str, str] = {
    "aggTrade": "aggTrade",
    "bookTicker": "bookTicker",
    "markPriceUpdate": "markPrice",
    "24hrTicker": "ticker",
    "24hrMiniTicker": "miniTicker",
    "forceOrder": "forceOrder",
    "depthUpdate": "depth",
}


def _recv_seconds(stamp: int) -> float:
    """An integer receive time (ns, or by magnitude us/ms/s) in seconds."""
    if stamp >= 10**17:
        return stamp / 1e9
    if stamp >= 10**14:
        return stamp / 1e6
    if stamp >= 10**11:
        return stamp / 1e3
    return float(stamp)


def read_lines(path: Path) -> Iterator[bytes]:
    """The lines of ``path``, gunzipped when it is gzip (by its magic bytes).

    Raises ``OSError`` when the file cannot be read or is not valid gzip;
    a gzip stream cut short ends the lines with a warning.
    """
    with open(path, "rb") as f:
        gz = f.read(2) == _GZIP_MAGIC
    if not gz:
        with open(path, "rb") as f:
            yield from f
        return
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                yield line
    except (EOFError, zlib.error) as exc:
        log.warning("%s: gzip data ends early after line %d (%s); the rest is not replayed", path, n, exc)


def rest_sibling(path: Path) -> Path | None:
    """The REST capture beside a recording: ``<stem>.rest`` or ``<stem>.rest.gz``."""
    base = path.with_suffix("") if path.suffix == ".gz" else path
    for cand in (base.with_suffix(".rest"), base.with_suffix(".rest.gz")):
        if cand != path and cand.exists():
            return cand
    return None


@dataclass(slots=True)
class ReplayItem:
    """One replayable line.

    Frames: ``stream`` (canonical name), ``symbol`` (upper case), ``body``
    (the whole combined frame text, verbatim), ``data_raw`` (the data
    object's text, verbatim), ``data`` (parsed). REST captures: ``rest_path``
    and ``body`` (response text), ``symbol`` from the query.
    ``ts`` is the recorded local receive time (s).
    """

    ts: float
    stream: str = ""
    symbol: str = ""
    body: bytes = b""
    data_raw: bytes = b""
    data: dict | None = None
    rest_path: str = ""


@dataclass
class Recording:
    """A parsed recording: items in file order plus summary facts.

    ``streams``: every stream name that has frames; ``symbols``: upper-case
    symbols; ``price_scale``/``qty_scale``: most decimals seen per symbol;
    ``kline_symbols``: symbols with recorded 1m kline frames;
    ``skipped``: lines that were neither frames nor REST captures;
    ``unknown_events``: event types of raw frames that were skipped.
    """

    path: Path
    items: list[ReplayItem] = field(default_factory=list)
    streams: set[str] = field(default_factory=set)
    symbols: set[str] = field(default_factory=set)
    price_scale: dict[str, int] = field(default_factory=dict)
    qty_scale: dict[str, int] = field(default_factory=dict)
    kline_symbols: set[str] = field(default_factory=set)
    frame_count: int = 0
    skipped: int = 0
    unknown_events: set = field(default_factory=set)

    @property
    def frames(self) -> list[ReplayItem]:
        """Only the WebSocket frames."""
        return [it for it in self.items if it.data is not None]

    @classmethod
    def load(cls, path: str | Path) -> "Recording":
        """Read ``path`` (plain or gzip; either line format, see the module
        doc) and the REST capture beside it, if any.

        Raises ``OSError`` if the file cannot be read (or is damaged gzip)
        and ``ValueError`` if it holds no frame at all.
        """
        path = Path(path)
        rec = cls(path=path)
        for lineno, line in enumerate(read_lines(path), 1):
            rec._parse_line(line, lineno)
        rest = rest_sibling(path)
        if rest is not None:
            extra = cls(path=rest)
            for lineno, line in enumerate(read_lines(rest), 1):
                extra._parse_line(line, lineno)
            rec.items.extend(it for it in extra.items if it.rest_path)
            rec.items.sort(key=lambda it: it.ts)  # stable: file order kept on ties
        if rec.frame_count == 0:
            raise ValueError(f"{path}: no frames found")
        return rec

    def _parse_line(self, line: bytes, lineno: int) -> None:
        line = line.strip()
        if not line or line.startswith(b"configuration:") or line.startswith(b"wss://"):
            return
        if line.startswith(b"http://") or line.startswith(b"https://"):
            self._parse_rest(line, lineno)
            return
        m = _RECV_PREFIXED.match(line)
        if m is not None:
            self._parse_frame(_recv_seconds(int(m.group(1))), line[m.end():], lineno)
            return
        head, sep, body = line.partition(b": ")
        try:
            ts = float(head)
        except ValueError:
            ts = None
        if not sep or ts is None or not body.startswith(b"{"):
            self.skipped += 1
            return
        self._parse_frame(ts, body, lineno)

    def _parse_frame(self, ts: float, body: bytes, lineno: int) -> None:
        try:
            msg = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            log.warning("%s:%d: skipped unreadable frame (%s)", self.path, lineno, exc)
            self.skipped += 1
            return
        if isinstance(msg, dict) and "stream" in msg:
            self._combined_frame(ts, body, msg, lineno)
        elif isinstance(msg, dict) and "e" in msg:
            self._raw_frame(ts, body, msg, lineno)
        else:
            self.skipped += 1  # a reply to a request, an array stream, ...

    def _combined_frame(self, ts: float, body: bytes, msg: dict, lineno: int) -> None:
        try:
            stream = parse_stream(msg["stream"])
            data = msg["data"]
        except (KeyError, TypeError, StreamNameError) as exc:
            log.warning("%s:%d: skipped unreadable frame (%s)", self.path, lineno, exc)
            self.skipped += 1
            return
        raw = _data_text(body)
        if raw is None or orjson.loads(raw) != data:
            # Not the usual '{"stream":..,"data":..}' layout: fall back to a
            # re-serialisation (values equal, spelling may differ).
            raw = orjson.dumps(data)
            body = b'{"stream":"' + stream.name.encode() + b'","data":' + raw + b"}"
        self._add(ts, stream.name, stream.symbol, body, raw, data)

    def _raw_frame(self, ts: float, body: bytes, data: dict, lineno: int) -> None:
        e = data.get("e")
        symbol = data.get("s")
        if e == "kline":
            interval = (data.get("k") or {}).get("i") if isinstance(data.get("k"), dict) else None
            kind = f"kline_{interval}" if isinstance(interval, str) else None
        elif e == "forceOrder":
            kind = "forceOrder"
            symbol = (data.get("o") or {}).get("s") if isinstance(data.get("o"), dict) else None
        else:
            kind = RAW_EVENT_KINDS.get(e) if isinstance(e, str) else None
        if kind is None or not isinstance(symbol, str):
            if e not in self.unknown_events:
                self.unknown_events.add(e)
                log.warning("%s:%d: raw event %r is not replayed (no stream known for it)", self.path, lineno, e)
            self.skipped += 1
            return
        try:
            stream = parse_stream(f"{symbol.lower()}@{kind}")
        except StreamNameError as exc:
            log.warning("%s:%d: skipped raw event (%s)", self.path, lineno, exc)
            self.skipped += 1
            return
        combined = b'{"stream":"' + stream.name.encode() + b'","data":' + body + b"}"
        self._add(ts, stream.name, stream.symbol, combined, body, data)

    def _add(self, ts: float, stream: str, symbol: str, body: bytes, raw: bytes, data) -> None:
        symbol = symbol.upper()
        if isinstance(data, dict):
            symbol = str(data.get("s", symbol)).upper()
            self._note_scales(symbol, data)
        self.items.append(ReplayItem(ts, stream, symbol, body, raw, data))
        self.streams.add(stream)
        self.symbols.add(symbol)
        self.frame_count += 1

    def _parse_rest(self, line: bytes, lineno: int) -> None:
        url, sep, rest = line.partition(b" -> ")
        head, sep2, body = rest.partition(b": ")
        try:
            ts = float(head)
        except ValueError:
            self.skipped += 1
            return
        if not sep or not sep2:
            self.skipped += 1
            return
        parts = urlsplit(url.decode())
        symbol = (parse_qs(parts.query).get("symbol") or [""])[0].upper()
        self.items.append(ReplayItem(ts, symbol=symbol, body=body, rest_path=parts.path))

    def _note_scales(self, symbol: str, data: dict) -> None:
        e = data.get("e")
        if e == "aggTrade":
            prices, qtys = (data.get("p"),), (data.get("q"),)
        elif e == "bookTicker":
            prices, qtys = (data.get("b"), data.get("a")), (data.get("B"), data.get("A"))
        elif e == "kline":
            k = data.get("k") or {}
            prices, qtys = (k.get("o"), k.get("c")), (k.get("v"),)
            if k.get("i") == "1m":
                self.kline_symbols.add(symbol)
        else:
            return
        for values, table in ((prices, self.price_scale), (qtys, self.qty_scale)):
            for v in values:
                if isinstance(v, str):
                    try:
                        scale = parse_scaled(v)[1]
                    except ValueError:
                        continue
                    if scale > table.get(symbol, -1):
                        table[symbol] = scale


def _data_text(body: bytes) -> bytes | None:
    """The verbatim text of the data object in ``{"stream":"..","data":<x>}``."""
    if not body.startswith(b'{"stream":"') or not body.endswith(b"}"):
        return None
    i = body.find(b'","data":', 11)
    if i < 0:
        return None
    return body[i + 9 : -1]
