"""The contracts file: which IB contracts feed-backfill covers.

CSV with a header line; ``#`` starts a comment line; blank lines are
ignored.  Columns (TWS API ``Contract`` field names):

=============================  ========  ==========================================
column                         needed    meaning
=============================  ========  ==========================================
symbol                         always    IB symbol; the key of the tables (unique
                                         among STK and IND rows)
secType                        always    STK, IND (fetched); FUT, OPT (validated
                                         only: fetching them may come later)
exchange                       always    e.g. SMART, NYSE, CBOE, CME
currency                       always    three letters, e.g. USD
primaryExchange                optional  for SMART stocks: NASDAQ, NYSE, ARCA ...
lastTradeDateOrContractMonth   FUT, OPT  YYYYMM or YYYYMMDD
multiplier                     optional  FUT, OPT: a positive number
strike                         OPT       a positive number
right                          OPT       C, P, CALL or PUT
tradingClass, localSymbol      optional  passed to IB as given
conId                          optional  IB conId, a positive integer
priority                       optional  0-9 (default 0); higher is fetched first
                                         on the same date; --priority-only takes > 0
calendar                       optional  pandas_market_calendars name overriding
                                         the exchange's (see feeds.ibkr.sessions)
=============================  ========  ==========================================

A bad row stops the run: :class:`ContractsError` names the file, the line
and the field.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from .sessions import UnknownCalendar, calendar_name_for

log = logging.getLogger(__name__)

__all__ = ["ContractRow", "ContractsError", "load_contracts", "parse_contracts", "FETCHED_SEC_TYPES",
           "SEC_TYPES", "COLUMNS"]

SEC_TYPES = ("STK", "IND", "FUT", "OPT")
FETCHED_SEC_TYPES = ("STK", "IND")
REQUIRED = ("symbol", "secType", "exchange", "currency")
OPTIONAL = ("primaryExchange", "lastTradeDateOrContractMonth", "multiplier", "strike", "right",
            "tradingClass", "localSymbol", "conId", "priority", "calendar")
COLUMNS = REQUIRED + OPTIONAL

_SYMBOL = re.compile(r"^[A-Z0-9][A-Z0-9 ._/&-]{0,23}$")
_EXCHANGE = re.compile(r"^[A-Z0-9][A-Z0-9._-]{0,19}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_EXPIRY = re.compile(r"^\d{6}(\d{2})?$")


class ContractsError(Exception):
    """A contracts file that cannot be used.

    Attributes ``file``, ``line`` (1-based; 0 for the whole file), ``field``
    (column name, or ``-``), ``reason``.  ``str()`` is one line.
    """

    def __init__(self, file: str | os.PathLike, line: int, field: str, reason: str):
        self.file, self.line, self.field, self.reason = str(file), line, field, reason
        where = f"line {line}" if line else "file"
        super().__init__(f"contracts file {self.file} {where} field '{field}': {reason}")


@dataclass(frozen=True)
class ContractRow:
    """One validated row of the contracts file (see the module docstring).

    ``line`` is the row's line number; ``calendar`` is resolved (never empty
    for STK and IND rows).
    """

    symbol: str
    sec_type: str
    exchange: str
    currency: str
    primary_exchange: str = ""
    last_trade_date: str = ""
    multiplier: str = ""
    strike: str = ""
    right: str = ""
    trading_class: str = ""
    local_symbol: str = ""
    con_id: int = 0
    priority: int = 0
    calendar: str = ""
    line: int = 0

    @property
    def fetched(self) -> bool:
        """True for the secTypes feed-backfill fetches (STK, IND)."""
        return self.sec_type in FETCHED_SEC_TYPES

    def to_ib(self):
        """A new ``ib_async.Contract`` with these fields (each call a new object)."""
        from ib_async import Contract

        return Contract(
            secType=self.sec_type, conId=self.con_id, symbol=self.symbol,
            lastTradeDateOrContractMonth=self.last_trade_date,
            strike=float(self.strike) if self.strike else 0.0, right=self.right,
            multiplier=self.multiplier, exchange=self.exchange, primaryExchange=self.primary_exchange,
            currency=self.currency, localSymbol=self.local_symbol, tradingClass=self.trading_class)


def fetchable(rows: Sequence[ContractRow], symbols: Iterable[str] | None = None, *,
              keep: Callable[[ContractRow], bool] | None = None, verb: str = "collected") -> list[ContractRow]:
    """The rows whose data IB serves (``fetched``: STK and IND), in file
    order: only ``symbols`` when given (case-insensitive), only those
    ``keep(row)`` accepts when given.  Every other row of the selection is
    logged once as "validated but not <verb>"."""
    want = {s.upper() for s in symbols} if symbols else None
    out = []
    for r in rows:
        if (want is not None and r.symbol not in want) or (keep is not None and not keep(r)):
            continue
        if not r.fetched:
            log.info("contract %s %s (line %d) is validated but not %s: only STK and IND are",
                     r.symbol, r.sec_type, r.line, verb)
            continue
        out.append(r)
    return out


def load_contracts(path: str | os.PathLike) -> list[ContractRow]:
    """Read and validate the contracts file at ``path``.

    Returns the rows in file order.  Raises :class:`ContractsError` for a
    missing or unreadable file, a bad header, or the first bad row.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ContractsError(p, 0, "-", "file not found") from None
    except (PermissionError, UnicodeDecodeError) as e:
        raise ContractsError(p, 0, "-", f"cannot read: {e}") from None
    return parse_contracts(text, p)


def parse_contracts(text: str, file: str | os.PathLike = "<contracts>") -> list[ContractRow]:
    """Validate contracts CSV ``text`` (see :func:`load_contracts`)."""
    lines = text.splitlines()
    content = [(n, ln) for n, ln in enumerate(lines, start=1) if ln.strip() and not ln.lstrip().startswith("#")]
    if not content:
        raise ContractsError(file, 0, "-", "no header line (expected columns: " + ",".join(REQUIRED) + ", ...)")
    head_line, head = content[0]
    header = [h.strip() for h in next(csv.reader([head]))]
    for col in REQUIRED:
        if col not in header:
            raise ContractsError(file, head_line, col, "required column missing from the header")
    for col in header:
        if col not in COLUMNS:
            raise ContractsError(file, head_line, col or "-", f"unknown column (known: {', '.join(COLUMNS)})")
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise ContractsError(file, head_line, dup, "column named twice")

    rows: list[ContractRow] = []
    keys: dict[tuple, int] = {}
    symbols: dict[str, int] = {}
    for lineno, raw in content[1:]:
        values = next(csv.reader(io.StringIO(raw)))
        if len(values) > len(header):
            raise ContractsError(file, lineno, "-", f"{len(values)} fields but the header has {len(header)}")
        rec = {h: (values[i].strip() if i < len(values) else "") for i, h in enumerate(header)}
        row = _row(rec, file, lineno)
        key = (row.symbol, row.sec_type, row.exchange, row.currency, row.last_trade_date, row.strike, row.right,
               row.multiplier)
        if key in keys:
            raise ContractsError(file, lineno, "symbol", f"same contract as line {keys[key]}")
        keys[key] = lineno
        if row.fetched:
            if row.symbol in symbols:
                raise ContractsError(file, lineno, "symbol",
                                     f"{row.symbol} already on line {symbols[row.symbol]} "
                                     "(the symbol is the key of the bar and status tables)")
            symbols[row.symbol] = lineno
        rows.append(row)
    return rows


def _row(rec: dict[str, str], file, lineno: int) -> ContractRow:
    def bad(field: str, reason: str) -> ContractsError:
        return ContractsError(file, lineno, field, reason)

    def get(col: str) -> str:
        return rec.get(col, "")

    symbol = get("symbol").upper()
    if not symbol:
        raise bad("symbol", "empty")
    if not _SYMBOL.match(symbol):
        raise bad("symbol", f"not an IB symbol: {get('symbol')!r}")
    sec_type = get("secType").upper()
    if sec_type not in SEC_TYPES:
        raise bad("secType", f"{get('secType')!r} is not one of {', '.join(SEC_TYPES)}")
    exchange = get("exchange").upper()
    if not exchange:
        raise bad("exchange", "empty")
    if not _EXCHANGE.match(exchange):
        raise bad("exchange", f"not an exchange name: {get('exchange')!r}")
    currency = get("currency").upper()
    if not _CURRENCY.match(currency):
        raise bad("currency", f"expected three letters such as USD, got {get('currency')!r}")
    primary = get("primaryExchange").upper()
    if primary and not _EXCHANGE.match(primary):
        raise bad("primaryExchange", f"not an exchange name: {get('primaryExchange')!r}")
    if primary == "SMART":
        raise bad("primaryExchange", "SMART is a router, not a primary exchange")

    expiry = get("lastTradeDateOrContractMonth")
    multiplier = get("multiplier")
    strike = get("strike")
    right = get("right").upper()
    if sec_type in ("FUT", "OPT"):
        if not expiry:
            raise bad("lastTradeDateOrContractMonth", f"required for {sec_type} (YYYYMM or YYYYMMDD)")
        if not _EXPIRY.match(expiry) or not _valid_expiry(expiry):
            raise bad("lastTradeDateOrContractMonth", f"expected YYYYMM or YYYYMMDD, got {expiry!r}")
        if multiplier and not _positive(multiplier):
            raise bad("multiplier", f"expected a positive number, got {multiplier!r}")
    else:
        for col, val in (("lastTradeDateOrContractMonth", expiry), ("multiplier", multiplier)):
            if val:
                raise bad(col, f"must be empty for {sec_type}")
    if sec_type == "OPT":
        if not strike:
            raise bad("strike", "required for OPT")
        if not _positive(strike):
            raise bad("strike", f"expected a positive number, got {strike!r}")
        if right not in ("C", "P", "CALL", "PUT"):
            raise bad("right", f"expected C, P, CALL or PUT, got {get('right')!r}")
        right = right[0]
    else:
        if strike:
            raise bad("strike", f"must be empty for {sec_type}")
        if right:
            raise bad("right", f"must be empty for {sec_type}")

    con_id = 0
    if get("conId"):
        if not get("conId").isdigit() or int(get("conId")) <= 0:
            raise bad("conId", f"expected a positive integer, got {get('conId')!r}")
        con_id = int(get("conId"))
    priority = 0
    if get("priority"):
        if not get("priority").isdigit() or not 0 <= int(get("priority")) <= 9:
            raise bad("priority", f"expected an integer 0-9, got {get('priority')!r}")
        priority = int(get("priority"))

    calendar = get("calendar")
    if sec_type in FETCHED_SEC_TYPES or calendar:
        try:
            calendar = calendar_name_for(sec_type, exchange, primary, calendar)
        except UnknownCalendar as e:
            raise bad("calendar", str(e)) from None
    return ContractRow(symbol=symbol, sec_type=sec_type, exchange=exchange, currency=currency,
                       primary_exchange=primary, last_trade_date=expiry, multiplier=multiplier, strike=strike,
                       right=right, trading_class=get("tradingClass"), local_symbol=get("localSymbol"),
                       con_id=con_id, priority=priority, calendar=calendar, line=lineno)


def _positive(text: str) -> bool:
    try:
        v = Decimal(text)
    except InvalidOperation:
        return False
    return v.is_finite() and v > 0


def _valid_expiry(text: str) -> bool:
    import datetime as dt

    try:
        if len(text) == 6:
            dt.date(int(text[:4]), int(text[4:6]), 1)
        else:
            dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return False
    return True


@dataclass
class Details:
    """IB's answer to ``reqContractDetails`` for one row: ``details`` (an
    ``ib_async.ContractDetails`` whose ``contract.exchange`` is the row's
    exchange) when exactly one contract matched; else ``error`` ("IB error
    <code>: <text>", no details, or ambiguous) with IB's ``code`` and
    ``text`` when IB refused."""
    details: object | None = None
    error: str | None = None
    code: int | None = None
    text: str | None = None


async def request_details(ib, row: ContractRow, timeout: float) -> Details:
    """``reqContractDetails`` for ``row`` on the connected ``ib``
    (``ib_async.IB`` with ``RaiseRequestErrors``).  Raises
    ``asyncio.TimeoutError`` after ``timeout`` seconds and ``ConnectionError``
    when the session ends.  IB TWS API, "Contract Details"."""
    import asyncio

    from ib_async.wrapper import RequestError
    try:
        found = await asyncio.wait_for(ib.reqContractDetailsAsync(row.to_ib()), timeout)
    except RequestError as e:
        return Details(error=f"IB error {e.code}: {e.message}", code=e.code, text=e.message)
    if not found:
        return Details(error="IB returned no contract details")
    if len(found) > 1:
        return Details(error=f"ambiguous: {len(found)} contracts match "
                             "(give primaryExchange or conId in the contracts file)")
    found[0].contract.exchange = row.exchange
    return Details(found[0])
