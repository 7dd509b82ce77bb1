"""``feed-binance``: collect Binance USD-M futures market streams into PostgreSQL.

Exit status: 0 after a clean stop (SIGTERM: every buffered row committed or
spooled), 78 on a configuration error (one line naming the key and file),
1 on a fatal runtime error or when rows could not be written at the stop
(systemd restarts the unit).

``feed-binance --test-connection`` prints what the collector would
subscribe (symbols, streams per symbol, connections) and Binance's answer
for every symbol (exchangeInfo status and contract type, last price from
``GET /fapi/v2/ticker/price``), then opens the first connection of each
category and waits for its first message; exit 0 when everything answered,
1 otherwise.  It writes nothing (no database, no spool).  The process around the collector (sink,
health, READY/STATUS/WATCHDOG, status lines, heartbeat, clean stop) is
:mod:`feeds.service`; the collector is :mod:`feeds.binance.collector`.
"""
from __future__ import annotations

import asyncio
import logging
import re
import sys
import time

import click

from .. import service
from ..config import Config, ConfigError, exit_on_config_error
from ..health import Health
from ..settings import BINANCE_FILE, database_dsn, shard_check
from . import adapter as A
from . import wire
from .collector import BinanceCollector, Settings
from .rest import BinanceRest

log = logging.getLogger("feeds.binance")


def _shard(v: str) -> tuple[int, int]:
    if not v:
        return (1, 1)
    k, n = v.split("of")
    return int(k), int(n)


def load_settings(cfg: Config, shard: str | None = None, symbols: str | None = None) -> Settings:
    """:class:`Settings` from a loaded ``binance.toml`` (see
    :data:`feeds.settings.BINANCE`); ``shard`` (KofN) and ``symbols`` (comma
    list) come from the command line and win.  Raises ConfigError."""
    b = "binance."
    s = Settings(**{k: cfg[b + k] for k in (
        "rest_url", "ws_url", "symbols", "quote_assets", "streams", "kline_intervals",
        "max_streams_per_connection", "rollover_after", "backoff_max", "rest_weight_budget",
        "gap_fill_max_trades", "resume_lookback_hours", "status_interval", "symbols_refresh",
        "max_future_s", "id_confirmations", "id_adopt_lone_after", "kline_check")})
    s.stale_after.update(cfg[b + "stale_after"])
    s.max_id_jump.update(cfg[b + "max_id_jump"])
    if symbols:
        s.symbols = [x.strip().upper() for x in symbols.split(",") if x.strip()]
        bad = [x for x in s.symbols if not re.fullmatch(r"[A-Z0-9_]+", x)]
        if bad:
            raise ConfigError("--symbols", "the command line", f"not a symbol: {bad[0]!r}")
    if shard:
        err = shard_check(shard)
        if err:
            raise ConfigError("--shard", "the command line", err)
    s.shard = _shard(shard or cfg[b + "shard"])
    return s


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="FEEDS_BINANCE_CONFIG", default="/etc/feeds/binance.toml",
              show_default=True, help="TOML configuration file.")
@click.option("--shard", default=None, help="Collect share K of N of the symbols, as KofN (e.g. 1of2).")
@click.option("--symbols", default=None, help="Comma-separated symbols, overriding the configuration.")
@click.option("--unit", envvar="FEEDS_UNIT", default=None, help="Name used for the heartbeat row.")
@click.option("--test-connection", is_flag=True,
              help="Print what would be subscribed and Binance's answer per symbol, write nothing, exit.")
@exit_on_config_error
def main(config_path: str, shard: str | None, symbols: str | None, unit: str | None, test_connection: bool) -> None:
    """Collect Binance USD-M futures markPrice, 24h ticker, aggTrade,
    bookTicker and closed klines into PostgreSQL."""
    cfg = service.start(config_path, BINANCE_FILE)
    settings = load_settings(cfg, shard, symbols)
    if test_connection:
        sys.exit(asyncio.run(check_connection(settings)))
    dsn = database_dsn(cfg)
    sk = service.sink_settings(cfg)
    unit = unit or ("feed-binance@%dof%d.service" % settings.shard if settings.shard != (1, 1)
                    else "feed-binance.service")
    log.info("feed-binance starting: config %s, rest %s, ws %s, shard %dof%d",
             config_path, settings.rest_url, settings.ws_url, *settings.shard)
    reporters = service.reporters(cfg, unit, port_offset=settings.shard[0] if settings.shard != (1, 1) else 0)
    svc = service.Service(unit, dsn, tables=A.TABLES, sink=sk, status_interval=settings.status_interval,
                          heartbeat_interval=settings.heartbeat_interval, reporters=reporters)

    def prepare(svc: service.Service) -> BinanceCollector:
        return BinanceCollector(settings, svc.sink, svc.health, dsn=dsn)
    sys.exit(svc.run(prepare))


class _Quiet:
    def notify(self, msg: str) -> None:
        pass


async def check_connection(settings: Settings, echo=click.echo, first_message_timeout: float = 15.0) -> int:
    """``feed-binance --test-connection``: the plan (symbols, streams,
    connections), exchangeInfo status and last price of every symbol, and
    the first message of the first connection of each category.  Returns 0
    when every symbol is a TRADING perpetual with a price and every opened
    connection delivered, else 1.  Writes nothing."""
    col = BinanceCollector(settings, None, Health(unit="feed-binance --test-connection", notifier=_Quiet()))
    rest = col.rest = BinanceRest(settings.rest_url, settings.rest_weight_budget)
    ok = True
    try:
        echo(f"Binance REST {settings.rest_url}, WebSocket {settings.ws_url}, shard {settings.shard[0]}of"
             f"{settings.shard[1]}")
        try:
            info = await rest.exchange_info()
            symbols = await col.discover_symbols()
        except Exception as e:
            echo(f"FAIL exchangeInfo: {str(e).strip() or type(e).__name__}")
            return 1
        slots = col.plan(symbols)
        kinds = [f"kline_{iv}" if k == A.KLINE else k for k in settings.streams
                 for iv in (settings.kline_intervals if k == A.KLINE else [""])]
        echo(f"would subscribe {len(symbols)} symbol(s) x {len(kinds)} stream(s) ({', '.join(kinds)}) = "
             f"{len(col.routes)} streams over {len(slots)} connection(s) of at most "
             f"{settings.max_streams_per_connection}")
        for slot in slots:
            echo(f"  connection {slot.index + 1}: /{slot.category}, {len(slot.streams)} streams "
                 f"({slot.streams[0]} .. {slot.streams[-1]})")
        echo("kline check: " + (f"off ({col.kline_check_off})" if col.kline_check_off else "on"))
        listed = {s.get("symbol"): s for s in info.get("symbols", []) if isinstance(s, dict)}
        try:
            prices = {p.get("symbol"): p for p in await rest.ticker_prices() if isinstance(p, dict)}
        except Exception as e:
            echo(f"FAIL ticker/price: {str(e).strip() or type(e).__name__}")
            prices, ok = {}, False
        for sym in symbols:
            s = listed.get(sym)
            p = prices.get(sym)
            if s is None:
                ok = False
                echo(f"FAIL {sym}: not in exchangeInfo")
                continue
            good = s.get("status") == "TRADING" and s.get("contractType") == "PERPETUAL" and p is not None
            ok &= good
            price = f"price {p.get('price')} at {A.ms_text(p['time'])[:19]}" if p is not None and \
                type(p.get("time")) is int else ("price " + str(p.get("price")) if p is not None else "no price")
            echo(f"{'ok  ' if good else 'FAIL'} {sym} {s.get('contractType')} {s.get('status')} "
                 f"{s.get('quoteAsset', '-')}, {price}")
        # python-binance reports the normal close of its socket as an error: not one here
        logging.getLogger("binance.ws").setLevel(logging.CRITICAL)
        for cat in ("market", "public"):
            slot = next((x for x in slots if x.category == cat), None)
            if slot is None:
                continue
            t0 = time.monotonic()
            sock = task = None
            try:
                sock = await asyncio.wait_for(wire.open_combined(rest.client, settings.ws_url, slot.streams, cat),
                                              first_message_timeout)
                first = asyncio.Event()
                task = asyncio.ensure_future(wire.pump(sock, lambda msg: None, first))
                await asyncio.wait_for(first.wait(), first_message_timeout)
                echo(f"ok   websocket /{cat}: connection {slot.index + 1} delivered its first message after "
                     f"{time.monotonic() - t0:.1f} s")
            except Exception as e:
                ok = False
                echo(f"FAIL websocket /{cat}: connection {slot.index + 1}: "
                     f"{str(e).strip() or type(e).__name__ + ' (no message within ' + str(first_message_timeout) + ' s)'}")
            finally:
                if sock is not None:
                    await wire.close(sock, task)
    finally:
        await rest.close()
    echo("all symbols answered" if ok else "FAILED: see the lines above")
    return 0 if ok else 1
