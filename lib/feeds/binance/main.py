"""``feed-binance``: collect Binance USD-M futures market streams into PostgreSQL.

Exit status: 0 after a clean stop (SIGTERM: every buffered row committed or
spooled), 78 on a configuration error (one line naming the key and file),
1 on a fatal runtime error (systemd restarts the unit).
"""
from __future__ import annotations

import asyncio
import logging
import re
import sys

import click

from ..config import Config, ConfigError, database_dsn, exit_on_config_error, non_negative, positive
from ..health import Health
from ..runtime import install_stop_signals, setup_logging, state_dir, tune_gc, watchdog_interval
from ..sink import Sink, load_sink_settings
from . import adapter as A
from .collector import BinanceCollector, Settings

log = logging.getLogger("feeds.binance")
_URL = re.compile(r"^(https?|wss?)://[^\s/]+")


def _url(scheme_ok: tuple[str, ...]):
    def check(v: str):
        if not _URL.match(v) or not v.split(":", 1)[0] in scheme_ok:
            return f"not a {'/'.join(scheme_ok)} URL: {v!r}"
        return None
    return check


def _shard(v: str | None, cfg_file: str) -> tuple[int, int]:
    if not v:
        return (1, 1)
    m = re.fullmatch(r"(\d+)of(\d+)", v)
    if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
        raise ConfigError("shard", cfg_file, f"expected KofN with 1 <= K <= N (e.g. 1of2), got {v!r}")
    return int(m.group(1)), int(m.group(2))


def load_settings(cfg: Config, shard: str | None = None, symbols: str | None = None) -> Settings:
    """Validate ``[binance]`` into :class:`Settings`; raises ConfigError."""
    b = "binance."
    kinds_ok = set(A.KINDS)
    s = Settings(
        rest_url=cfg.get(b + "rest_url", str, check=_url(("http", "https"))),
        ws_url=cfg.get(b + "ws_url", str, check=_url(("ws", "wss"))),
        symbols=cfg.get(b + "symbols", list, []),
        quote_assets=cfg.get(b + "quote_assets", list, []),
        streams=cfg.get(b + "streams", list, list(A.KINDS),
                        check=lambda v: None if v and set(v) <= kinds_ok else
                        f"must be a non-empty subset of {sorted(kinds_ok)}"),
        kline_intervals=cfg.get(b + "kline_intervals", list, ["1m"],
                                check=lambda v: None if v and set(v) <= set(A.INTERVAL_MS) else
                                f"must be a non-empty subset of {list(A.INTERVAL_MS)}"),
        max_streams_per_connection=cfg.get(b + "max_streams_per_connection", int, 200,
                                           check=lambda v: None if 1 <= v <= 1024 else "must be 1..1024 (Binance limit)"),
        rollover_after=cfg.get(b + "rollover_after", float, 23 * 3600.0,
                               check=lambda v: None if 0 < v < 86400 else "must be > 0 and < 86400 (Binance closes at 24 h)"),
        backoff_max=cfg.get(b + "backoff_max", float, 60.0, check=positive),
        rest_weight_budget=cfg.get(b + "rest_weight_budget", int, 1200,
                                   check=lambda v: None if 1 <= v <= 2400 else "must be 1..2400 (Binance limit per minute)"),
        gap_fill_max_trades=cfg.get(b + "gap_fill_max_trades", int, 1_000_000, check=positive),
        resume_lookback_hours=cfg.get(b + "resume_lookback_hours", float, 48.0, check=non_negative),
        status_interval=cfg.get(b + "status_interval", float, 10.0, check=positive),
        symbols_refresh=cfg.get(b + "symbols_refresh", float, 3600.0, check=non_negative),
    )
    for k in s.symbols:
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z0-9_]+", k):
            raise ConfigError(b + "symbols", cfg.file, f"not a symbol: {k!r}")
    stale = cfg.get(b + "stale_after", dict, {})
    for k, v in stale.items():
        if k not in kinds_ok:
            raise ConfigError(f"{b}stale_after.{k}", cfg.file, f"unknown stream kind; use one of {sorted(kinds_ok)}")
        s.stale_after[k] = cfg.get(f"{b}stale_after.{k}", float, check=non_negative)
    if symbols:
        s.symbols = [x.strip().upper() for x in symbols.split(",") if x.strip()]
    s.shard = _shard(shard or cfg.get(b + "shard", str, ""), cfg.file)
    return s


async def _amain(dsn: str, sk: dict, settings: Settings, unit: str) -> int:
    spool = state_dir(sk["spool_dir"])
    health = Health(unit=unit, flow_timeout=sk["flow_timeout"])
    sink = Sink(dsn, spool, A.TABLES, flush_interval=sk["flush_interval"], batch_rows=sk["batch_rows"],
                max_pending=sk["max_pending"], on_commit=health.on_commit).start()
    health.sink = sink
    settings.watchdog_interval = watchdog_interval(settings.watchdog_interval)
    collector = BinanceCollector(settings, sink, health, dsn=dsn)
    tune_gc()
    stop = asyncio.Event()
    install_stop_signals(asyncio.get_running_loop(), stop)
    rc = 0
    try:
        await collector.run(stop)
    except Exception as e:
        log.critical("collector failed: %s", e, exc_info=True)
        rc = 1
    health.notifier.notify("STOPPING=1")
    pending = sink.pending
    ok = await asyncio.to_thread(sink.close, 60.0)
    stored = sum(t.stored for t in sink.stats.tables.values())
    health.state = "stopped"
    health.last_status = f"stopped; {stored:,} rows stored in this run"
    await asyncio.to_thread(health.heartbeat, dsn)
    log.info("stopped: %s (%d rows pending at stop; %d stored in this run; %d spooled)",
             "all rows committed or spooled" if ok else "NOT all rows written", pending, stored,
             sink.stats.spooled_rows)
    return rc if ok else 1


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
    setup_logging()
    cfg = Config.load(config_path)
    settings = load_settings(cfg, shard, symbols)
    sink_settings = load_sink_settings(cfg, "/var/lib/feeds/binance")
    dsn = database_dsn(cfg)
    unit = unit or ("feed-binance@%dof%d.service" % settings.shard if settings.shard != (1, 1)
                    else "feed-binance.service")
    log.info("feed-binance starting: config %s, rest %s, ws %s, shard %dof%d",
             config_path, settings.rest_url, settings.ws_url, *settings.shard)
    sys.exit(asyncio.run(_amain(dsn, sink_settings, settings, unit)))
