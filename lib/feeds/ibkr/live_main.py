"""``feed-ibkr``: IBKR live trades, quotes, index ticks and candles into PostgreSQL.

Run by ``feed-ibkr.service`` from ``feed-ibkr.timer`` (Mon..Fri 09:20
America/New_York) or by hand::

    feed-ibkr                        every STK and IND contract of live.contracts_file
    feed-ibkr --symbols AAPL SPX     only these (also --symbols AAPL,SPX)
    feed-ibkr --at 2024-11-29T09:20  what a start at that moment would do (New York time if no zone)
    feed-ibkr --test-connection      connect, resolve every contract, wait for its first tick, exit

See :mod:`feeds.ibkr.live` for what is collected and how IB's messages are
handled.  On a day without an NYSE session it ends at once, successfully,
with a journal line; it stops ``live.stop_after_close`` seconds after the
close (early closes included).

Exit status: 0 after a clean stop (SIGTERM, the end of the session, a day
without a session); 1 no connection to TWS within ``live.reconnect_timeout``,
a runtime failure or rows lost at the stop (systemd restarts the unit), or
at start an installed ib_async other than the version
:mod:`feeds.ibkr.wire` patches; 78 bad configuration or contracts file (one
line naming the key and file, or the file, line and field), including more
tick-by-tick symbols than ``live.max_tick_by_tick`` allows.
``--test-connection``: 0 when every contract answered, else 1.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
import time

import click

from .. import service
from ..config import EX_CONFIG, exit_on_config_error
from ..settings import IBKR_FILE, database_dsn
from . import live as L
from . import live_rows as R
from .contracts import ContractsError, load_contracts
from .main import _symbols
from .wire import TICK_BY_TICK, TICK_PRICE, TICK_STRING, WireVersionError, check_version, req_id_of

log = logging.getLogger("feeds.ibkr.live")
UTC = dt.timezone.utc


def make_builders(ls: L.LiveSettings, cal, started_ns: int) -> dict | None:
    """``{"stock": CandleBuilder(volume="size"), "index": CandleBuilder(volume="none")}`` over the
    XNYS sessions (extended hours added when configured), or None when candles are off."""
    if not ls.candles:
        return None
    from .. import candles as C
    if cal is None:
        sessions = C.always()
    elif ls.extended_hours:
        sessions = C.calendar_sessions(cal, pre_ns=int(L.PRE_MARKET.total_seconds()) * 1_000_000_000,
                                       post_ns=int(L.POST_MARKET.total_seconds()) * 1_000_000_000)
    else:
        sessions = C.calendar_sessions(cal)
    kw = dict(grace_s=ls.grace, lateness_s=ls.lateness, since_ns=started_ns)
    return {"stock": C.CandleBuilder(sessions, ls.intervals, volume="size", **kw),
            "index": C.CandleBuilder(sessions, ls.intervals, volume="none", **kw)}


async def check_connection(ls: L.LiveSettings, rows, timeout: float) -> int:
    """Print what would be subscribed and IB's answer per contract: its
    conId and the first tick (or IB's error) within ``timeout`` seconds.
    Returns 0 when every contract answered, else 1."""
    from ..health import Health

    class _NoSink:
        fatal = None

        def add_many(self, table, rows):
            pass

    col = L.LiveCollector(ls, rows, _NoSink(), Health(unit="feed-ibkr --test-connection", notifier=_Quiet()))
    click.echo(f"would subscribe (market data type {ls.market_data_type}, clientId {ls.client_id}):")
    for sub in col.subs:
        what = ("reqMktData last price" if sub.kind == "index" else
                f"reqMktData generic ticks {L.STOCK_GENERIC_TICKS} (RTVolume) + bid/ask")
        click.echo(f"  {sub.symbol:<10} {sub.row.sec_type} {sub.row.exchange}"
                   f"{'/' + sub.row.primary_exchange if sub.row.primary_exchange else ''}: {what}"
                   f"{' + tick-by-tick AllLast, BidAsk' if sub.tbt else ''}")
    ok = True
    first: dict[str, str] = {}
    errors: dict[str, str] = {}

    def tap(msg_id, fields):
        try:
            routed = col.by_req.get(int(fields[1] if msg_id == TICK_BY_TICK else fields[2]))
            if routed is None or routed[0].symbol in first:
                return
            sub = routed[0]
            if msg_id == TICK_STRING and fields[3] in ("48", "77"):
                tr = R.parse_rtvolume(fields[4])
                if tr is not None:
                    first[sub.symbol] = f"RTVolume {tr.price} x {tr.size}"
            elif msg_id == TICK_PRICE and int(fields[3]) in R.LAST_TYPES | R.BID_TYPES | R.ASK_TYPES:
                name = {1: "bid", 2: "ask", 4: "last", 66: "delayed bid", 67: "delayed ask", 68: "delayed last"}
                first[sub.symbol] = f"{name.get(int(fields[3]), 'price')} {R.price_text(fields[4])}"
        except (ValueError, IndexError) as e:       # Malformed is a ValueError
            errors.setdefault(routed[0].symbol if routed else "?", f"tick not understood: {e}")
    col._tap = tap          # this connection only reports; nothing is stored
    try:
        ib = await col.connect(time.monotonic())
    except L.LiveFailed as e:
        click.echo(f"FAIL {e}")
        return 1

    def on_error(req_id, code, text, contract):
        routed = col.by_req.get(req_id)
        if routed is not None and code not in (10167, 10090):
            errors.setdefault(routed[0].symbol, f"IB error {code}: {text}")
    ib.errorEvent += on_error
    try:
        t = await asyncio.wait_for(ib.reqCurrentTimeAsync(), ls.connect_timeout)
        click.echo(f"connected to {ls.host}:{ls.port} clientId {col.client_id}, server version "
                   f"{ib.client.serverVersion()}, TWS time {t:%Y-%m-%d %H:%M:%S %Z}")
        await col.resolve()
        ib.reqMarketDataType(R.MARKET_DATA_TYPES[ls.market_data_type])
        for sub in col.subs:
            if sub.unresolved:
                ok = False
                click.echo(f"FAIL {sub.symbol} ({sub.row.sec_type} {sub.row.exchange}): {sub.unresolved}")
                continue
            ticker = ib.reqMktData(sub.contract, L.STOCK_GENERIC_TICKS if sub.kind == "stock" else "", False, False)
            col.by_req[req_id_of(ib, ticker, "mktData")] = (sub, "mktData")
            t0 = time.monotonic()
            while sub.symbol not in first and sub.symbol not in errors and time.monotonic() - t0 < timeout:
                await asyncio.sleep(0.05)
            ib.cancelMktData(sub.contract)
            mdt = {1: "real-time", 2: "frozen", 3: "delayed", 4: "delayed-frozen"}.get(ticker.marketDataType, "?")
            if sub.symbol in first:
                click.echo(f"ok   {sub.symbol} conId {sub.con_id} {sub.row.sec_type} {sub.row.exchange}: first tick "
                           f"{first[sub.symbol]} ({mdt}) after {time.monotonic() - t0:.1f}s")
            else:
                ok = False
                click.echo(f"FAIL {sub.symbol} conId {sub.con_id}: "
                           + (errors.get(sub.symbol) or f"no tick within {timeout:g}s"))
    finally:
        ib.disconnect()
    return 0 if ok else 1


class _Quiet:
    def notify(self, msg: str) -> None:
        pass


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="FEEDS_IBKR_CONFIG", default="/etc/feeds/ibkr.toml",
              show_default=True, help="TOML configuration file.")
@click.option("--symbols", "symbols", default=None, metavar="SYM [SYM ...]",
              help="Only these symbols (space- or comma-separated; default: all in live.contracts_file).")
@click.option("--at", "at", default=None,
              help="Print the plan for a start at this ISO time (New York time without a zone) and exit.")
@click.option("--test-connection", is_flag=True,
              help="Connect, resolve every contract, wait for its first tick, print, exit 0 (all fine) or 1.")
@click.option("--timeout", type=float, default=15.0, show_default=True,
              help="With --test-connection: seconds to wait for each contract's first tick.")
@click.option("--unit", envvar="FEEDS_UNIT", default="feed-ibkr.service", show_default=True,
              help="Name used for the heartbeat row.")
@click.argument("more_symbols", nargs=-1, metavar="")
@exit_on_config_error
def main(config_path, symbols, at, test_connection, timeout, unit, more_symbols):
    """Collect IBKR live trades, quotes and index ticks, and candles built
    from them, during NYSE sessions into PostgreSQL."""
    try:
        check_version()
    except WireVersionError as e:
        click.echo(f"feed-ibkr: {e}", err=True)
        sys.exit(1)
    started_ns = time.time_ns()
    cfg = service.start(config_path, IBKR_FILE)
    for name in ("ib_async.wrapper", "ib_async.client", "ib_async.ib", "ib_async.Decoder"):
        # every IB error is logged once here, with its contract; the client's own lines would repeat it
        logging.getLogger(name).setLevel(logging.CRITICAL)
    ls = L.load_settings(cfg)
    try:
        rows = load_contracts(ls.contracts_file)
    except ContractsError as e:
        click.echo(str(e), err=True)
        sys.exit(EX_CONFIG)
    sym_list = _symbols(symbols, more_symbols)
    if sym_list:
        unknown = [s for s in sym_list if s not in {r.symbol for r in rows}]
        if unknown:
            raise click.BadParameter(f"not in {ls.contracts_file}: {', '.join(unknown)}", param_hint="--symbols")
    contracts = L.select_contracts(rows, sym_list, ls)
    if test_connection:
        sys.exit(asyncio.run(check_connection(ls, contracts, timeout)))
    cal = L.new_york_calendar(ls)
    now = service.run_time(at, L.NY)
    plan = L.plan_run(now, cal, extended=ls.extended_hours, stop_after=dt.timedelta(seconds=ls.stop_after_close))
    service.plan_or_exit(plan, at, L.NY, "New York")
    dsn = database_dsn(cfg)
    sk = service.sink_settings(cfg)
    builders = make_builders(ls, cal, started_ns)
    log.info("feed-ibkr starting: config %s, contracts %s (%d collected: %s), TWS %s:%d clientId %d, %s, "
             "market data type %s, tick-by-tick %s, candles %s", config_path, ls.contracts_file, len(contracts),
             " ".join(r.symbol for r in contracts), ls.host, ls.port, ls.client_id, plan.reason,
             ls.market_data_type, ",".join(s for s in ls.tick_by_tick if s in {r.symbol for r in contracts}) or "none",
             ",".join(f"{m}m" for m in ls.intervals) if builders else "off")
    svc = service.Service(unit, dsn, tables=L.TABLES, sink=sk, status_interval=ls.status_interval,
                          reporters=service.reporters(cfg, unit))

    async def prepare(svc: service.Service):
        if plan.start is not None and plan.start > dt.datetime.now(UTC):
            line = f"waiting for the session: {plan.reason}; connecting at {plan.start.astimezone(L.NY):%Y-%m-%d %H:%M} New York"
            if not await svc.wait_until(plan.start, line):
                return None
        return L.LiveCollector(ls, contracts, svc.sink, svc.health, until=plan.stop, window=plan.window,
                               builders=builders, dsn=dsn, started_ns=started_ns)
    sys.exit(svc.run(prepare))


__all__ = ["main", "check_connection", "make_builders"]
