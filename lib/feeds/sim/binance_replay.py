"""Reader for recorded Binance USD-M WebSocket sessions (``*.frames`` files).

Line formats (see ``shared/data/README.md``):

* ``<recv_unix_ts>: {"stream":"<name>","data":{...}}`` - one frame exactly as
  received; the text of the data object is kept byte for byte;
* ``wss://fstream.binance.com/stream?streams=a/b/... <-> <unix_ts>`` - the
  connection that was recorded (its stream list);
* ``<url> -> <recv_unix_ts>: <body>`` - a REST answer captured in the same
  session (``/fapi/v1/depth`` snapshots are used for the REST depth endpoint);
* ``configuration: {...}`` and blank lines - skipped.

A sibling ``<name>.rest`` file (same stem) is read too when present.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import orjson

from .binance_market import parse_scaled
from .binance_streams import StreamNameError, parse_stream

log = logging.getLogger(__name__)


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
    ``skipped``: lines that were neither frames nor REST captures.
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

    @property
    def frames(self) -> list[ReplayItem]:
        """Only the WebSocket frames."""
        return [it for it in self.items if it.data is not None]

    @classmethod
    def load(cls, path: str | Path) -> "Recording":
        """Read ``path`` (and ``<stem>.rest`` beside it, if any).

        Raises ``OSError`` if the file cannot be read and ``ValueError`` if it
        holds no frame at all.
        """
        path = Path(path)
        rec = cls(path=path)
        for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
            rec._parse_line(line, lineno)
        rest = path.with_suffix(".rest")
        if rest.exists() and rest != path:
            extra = cls(path=rest)
            for lineno, line in enumerate(rest.read_bytes().splitlines(), 1):
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
        head, sep, body = line.partition(b": ")
        try:
            ts = float(head)
        except ValueError:
            ts = None
        if not sep or ts is None or not body.startswith(b"{"):
            self.skipped += 1
            return
        try:
            msg = orjson.loads(body)
            stream = parse_stream(msg["stream"])
            data = msg["data"]
        except (orjson.JSONDecodeError, KeyError, TypeError, StreamNameError) as exc:
            log.warning("%s:%d: skipped unreadable frame (%s)", self.path, lineno, exc)
            self.skipped += 1
            return
        raw = _data_text(body)
        if raw is None or orjson.loads(raw) != data:
            # Not the usual '{"stream":..,"data":..}' layout: fall back to a
            # re-serialisation (values equal, spelling may differ).
            raw = orjson.dumps(data)
            body = b'{"stream":"' + stream.name.encode() + b'","data":' + raw + b"}"
        symbol = stream.symbol.upper()
        if isinstance(data, dict):
            symbol = str(data.get("s", symbol)).upper()
            self._note_scales(symbol, data)
        self.items.append(ReplayItem(ts, stream.name, symbol, body, raw, data))
        self.streams.add(stream.name)
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
