"""``feed-binance``: collect Binance USD-M futures market streams into PostgreSQL.

Exit status: 0 after a clean stop (SIGTERM: every buffered row committed or
spooled), 78 on a configuration error (one line naming the key and file),
1 on a fatal runtime error or when rows could not be written at the stop
(systemd restarts the unit).  The process around the collector (sink,
health, READY/STATUS/WATCHDOG, status lines, heartbeat, clean stop) is
:mod:`feeds.service`; the collector is :mod:`feeds.binance.collector`.
"""
from __future__ import annotations

import logging
import re
import sys

import click

from .. import service
from ..config import Config, ConfigError, exit_on_config_error
from ..settings import BINANCE_FILE, database_dsn, shard_check
from . import adapter as A
from .collector import BinanceCollector, Settings

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
        "max_future_s", "id_confirmations", "id_adopt_lone_after")})
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
@exit_on_config_error
def main(config_path: str, shard: str | None, symbols: str | None, unit: str | None) -> None:
    """Collect Binance USD-M futures markPrice, 24h ticker, aggTrade,
    bookTicker and closed klines into PostgreSQL."""
    cfg = service.start(config_path, BINANCE_FILE)
    settings = load_settings(cfg, shard, symbols)
    dsn = database_dsn(cfg)
    sk = service.sink_settings(cfg)
    unit = unit or ("feed-binance@%dof%d.service" % settings.shard if settings.shard != (1, 1)
                    else "feed-binance.service")
    log.info("feed-binance starting: config %s, rest %s, ws %s, shard %dof%d",
             config_path, settings.rest_url, settings.ws_url, *settings.shard)
    svc = service.Service(unit, dsn, tables=A.TABLES, sink=sk, status_interval=settings.status_interval,
                          heartbeat_interval=settings.heartbeat_interval)

    def prepare(svc: service.Service) -> BinanceCollector:
        return BinanceCollector(settings, svc.sink, svc.health, dsn=dsn)
    sys.exit(svc.run(prepare))
