"""Command lines: ``feed-zerodha`` (live ticks during NSE sessions) and
``feed-kite-token`` (the daily access-token renewal).

``feed-zerodha`` exit status: 0 after a clean stop (SIGTERM, or 5 minutes
after the session's close; also at once on a day without a session),
77 when the access token is missing, expired or refused (renew it first),
78 on a configuration error (one line naming the key and file; also for
more instruments than one API key carries), 1 on a runtime failure, when
rows could not be written at the stop (systemd restarts the unit), or at
start when the installed kiteconnect is not the version
:mod:`feeds.kite.wire` relies on or the system lacks the Asia/Kolkata zone.

``feed-zerodha --test-connection`` prints the access token's state, the
instruments and modes it would subscribe over which connections, and Kite's
last price for each instrument; exit 0 when all answered, else 1; it writes
nothing.

``feed-kite-token`` exit status: 0 when a valid token is stored (renewed,
or still valid), 1 when the renewal failed (the reason is the last journal
line), 78 on a configuration error.  ``--check`` only validates the stored
token: 0 valid, 1 not.  Each run but ``--check`` ends by writing the
node_exporter textfile ``<metrics.textfile_dir>/feeds_kite_token.prom``
(:mod:`feeds.ops.metrics`): ``feeds_job_last_exit_code{job="kite_token"}``,
the last success, and ``feeds_job_token_expiry_timestamp_seconds``, the
expiry of the stored token.
"""
from __future__ import annotations

import logging
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import click

from ..config import EX_NOPERM, Config, ConfigError, exit_on_config_error, first_line
from .. import service
from .. import session_main as M
from ..session_main import SourceUnavailable
from ..settings import KITE_FILE
from ..tokens import finish_renewal
from ..totp import read_totp_secret
from . import adapter as A
from . import history as H
from .candles import CANDLE_TABLE, KiteCandles, volumeless
from .collector import RC_TOKEN, KiteCollector, Settings
from .instruments import LTP_MAX_INSTRUMENTS, QUOTE_REQUESTS_PER_SECOND
from .instruments import (InstrumentSpec, SpecError, TooManyInstruments, merge_specs, parse_spec, plan_connections,
                          read_spec_file, read_spec_table, resolve)
from .session import IST, NseCalendar, plan_run
from .token import TokenError, TokenStore, validate
from .wire import WireVersionError, use_ist_localtime

log = logging.getLogger("feeds.kite")
UTC = timezone.utc


@dataclass(kw_only=True)
class KiteConfig(M.SessionConfig):
    """Validated ``[kite]`` section (see :data:`feeds.settings.KITE`; keyword
    arguments only)."""
    api_key: str
    ticker_url: str
    login_url: str
    collector: Settings = field(default_factory=Settings)


def load_settings(cfg: Config) -> KiteConfig:
    """:class:`KiteConfig` from a loaded ``kite.toml`` (checked by
    :func:`feeds.settings.load`)."""
    k = "kite."
    kc = M.load_session_config(KiteConfig, cfg, "kite", ("api_key", "ticker_url", "login_url"))
    kc.collector = Settings(api_key=kc.api_key, ticker_url=kc.ticker_url, **{n: cfg[k + n] for n in (
        "decoder", "silence_timeout", "reconnect_max_delay", "reconnect_max_tries")})
    return kc


def gather_specs(kc: KiteConfig, cli: tuple[str, ...], cli_file: str | None, dsn: str | None) -> tuple[list[InstrumentSpec], str]:
    """The instruments to collect and where they came from.

    ``cli`` (``--instrument``, each a spec or a comma list) replaces the
    configuration; else the file (``--instruments-file`` or
    ``kite.instruments_file``) plus, with ``kite.instruments_from_table``,
    the ``kite_subscription`` rows.  Raises ConfigError for a bad line, an
    empty list or more than one API key carries, :class:`SourceUnavailable`
    when the table cannot be read.
    """
    if cli:
        specs: list[InstrumentSpec] = []
        for arg in cli:
            for part in arg.split(","):
                if part.strip():
                    try:
                        specs.append(parse_spec(part, kc.default_mode))
                    except SpecError as e:
                        raise ConfigError("--instrument", "command line", str(e)) from None
        specs, source, where = merge_specs(specs), "the command line", ("--instrument", "command line")
    else:
        path = cli_file or kc.instruments_file
        groups, names = [], []
        if path:
            try:
                groups.append(read_spec_file(path, kc.default_mode))
            except SpecError as e:
                raise ConfigError(f"line {e.line}", path, f"{e.reason}: {e.text!r}") from None
            except FileNotFoundError:
                if not kc.instruments_from_table:
                    raise ConfigError("kite.instruments_file", kc.file, f"instrument list {path} not found") from None
            except OSError as e:
                raise ConfigError("kite.instruments_file", kc.file, f"cannot read {path}: {e.strerror}") from None
            else:
                names.append(path)
        if kc.instruments_from_table:
            try:
                groups.append(read_spec_table(dsn or "", kc.default_mode))
            except Exception as e:
                raise SourceUnavailable(f"cannot read the instruments from table kite_subscription: "
                                        f"{first_line(e)}") from None
            names.append("table kite_subscription")
        specs = merge_specs(*groups)
        source = " + ".join(names) or "nothing"
        where = ("kite.instruments_file", path or kc.file)
    if not specs:
        raise ConfigError(where[0], where[1], f"no instruments to collect (read from {source})")
    if len(specs) > kc.capacity:
        raise ConfigError(where[0], where[1], too_many_message(len(specs), kc))
    return specs, source


def too_many_message(n: int, kc: KiteConfig) -> str:
    """The refusal for more instruments than one API key carries."""
    return (f"{n} instruments requested, but one API key carries at most {kc.capacity} "
            f"({kc.max_connections} connections x {kc.max_instruments_per_connection} instruments, Kite's limits); "
            f"remove {n - kc.capacity} or run a second collector with another API key")


def _retry(what: str, fn, attempts: int = 4, delay: float = 2.0):
    """Call ``fn`` retrying network failures (not Kite's refusals)."""
    from kiteconnect import exceptions as kex
    import requests
    for i in range(1, attempts + 1):
        try:
            return fn()
        except (requests.RequestException, kex.NetworkException, kex.GeneralException, kex.DataException) as e:
            if i == attempts:
                raise
            log.warning("%s failed (%s); retrying in %.0f s", what, first_line(e), delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def _store_instruments(dsn: str, rows: list[dict]) -> None:
    """Upsert the resolved instruments into ``kite_instrument`` (best effort)."""
    from ..db import connect
    try:
        with connect(dsn, application_name="feed-zerodha") as conn:
            with conn.transaction():
                with conn.cursor() as cur:
                    cur.executemany(
                        """INSERT INTO kite_instrument (instrument_token, exchange_token, exchange, tradingsymbol,
                               name, segment, instrument_type, tick_size, lot_size, expiry, strike, updated_at)
                           VALUES (%s, %s, %s, %s, %s, %s, %s, %s::text::numeric, %s, %s, %s::text::numeric, now())
                           ON CONFLICT (instrument_token) DO UPDATE SET exchange_token = EXCLUDED.exchange_token,
                               exchange = EXCLUDED.exchange, tradingsymbol = EXCLUDED.tradingsymbol,
                               name = EXCLUDED.name, segment = EXCLUDED.segment,
                               instrument_type = EXCLUDED.instrument_type, tick_size = EXCLUDED.tick_size,
                               lot_size = EXCLUDED.lot_size, expiry = EXCLUDED.expiry, strike = EXCLUDED.strike,
                               updated_at = now()""",
                        [(int(r["instrument_token"]), int(r.get("exchange_token") or 0), r["exchange"],
                          r["tradingsymbol"], r.get("name") or None, r.get("segment") or None,
                          r.get("instrument_type") or None, repr(r.get("tick_size") or 0.0),
                          int(r.get("lot_size") or 0), r.get("expiry") or None, repr(r.get("strike") or 0.0))
                         for r in rows])
    except Exception as e:
        log.warning("instrument names not stored in kite_instrument (%s)", first_line(e))


def history_job(kc: KiteConfig, dsn: str, access_token: str, candles, subs, open_ns: int, last_ns: int):
    """The history fill of a start inside a session (run in a thread with a
    stop event): each instrument's missed one-minute candles, from the
    session's open (or after its last final one-minute candle stored today)
    to the minute starting at ``last_ns``, from Kite's historical API."""
    from kiteconnect import KiteConnect

    def job(stop) -> None:
        try:
            last = M.stored_minutes(lambda: H.last_final_minutes(dsn, [s.instrument_token for s in subs], open_ns), log)
            items = [(s, s.instrument_token) for s in subs]
            plan = [(token, first, keep, not volumeless(s))
                    for s, token, first, keep in M.missed_minutes(items, last, open_ns, kc.candles.intervals)
                    if keep <= last_ns]
            if not plan:
                return
            M.log_fill_start(log, min(p[1] for p in plan), last_ns, len(plan), "Kite's historical candles",
                             H.HISTORICAL_REQUESTS_PER_SECOND)
            kite = KiteConnect(kc.api_key, access_token=access_token, root=kc.api_url)
            res = H.fill(kite, plan, last_ns, candles.seed, stop)
            M.log_fill_end(log, res.stopped, res.instruments, res.bars, res.failed,
                           f", {len(plan) - res.instruments - res.failed} not requested" if res.stopped else "")
        except Exception:
            log.exception("candles: history fill failed")
    return job


#: What :func:`feeds.session_main.collect` runs for feed-zerodha.
FEED = M.SessionFeed(program="feed-zerodha", venue="Kite", renewer="feed-kite-token", tables=A.TABLES,
                     candle_table=CANDLE_TABLE, collector=KiteCollector, candles=KiteCandles, history_job=history_job,
                     history_source="Kite's historical candles", rc_token=RC_TOKEN, log=log)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@M.collector_options("FEEDS_KITE_CONFIG", "/etc/feeds/kite.toml", "EXCHANGE:TRADINGSYMBOL[=full|quote|ltp]",
                     "feed-zerodha.service")
@click.option("--test-connection", is_flag=True,
              help="Print what would be subscribed (instruments, modes, connections) and Kite's answer for each "
                   "instrument (its last price), then exit: 0 if every one answered, else 1.  Writes nothing.")
@exit_on_config_error
def main(config_path: str, instruments: tuple[str, ...], instruments_file: str | None, at: str | None,
         unit: str, test_connection: bool) -> None:
    """Collect Zerodha Kite ticks (full, quote, LTP) during NSE sessions into PostgreSQL."""
    st = M.begin(config_path, KITE_FILE, unit, load_settings)
    kc, dsn = st.settings, st.dsn
    try:
        use_ist_localtime()
    except (WireVersionError, RuntimeError) as e:
        log.error("%s", e)
        sys.exit(1)
    specs, source = M.gathered(lambda: gather_specs(kc, instruments, instruments_file, dsn), log)
    calendar = NseCalendar(kc.extra_sessions, kc.extra_holidays) if kc.session_calendar == "XNSE" else None
    if test_connection:
        sys.exit(check_connection(kc, specs, source, calendar))
    run_plan = plan_run(service.run_time(at, IST), calendar, connect_before=timedelta(seconds=kc.connect_before_open),
                        stop_after=timedelta(seconds=kc.stop_after_close))
    service.plan_or_exit(run_plan, at, IST, "IST")
    store = TokenStore(kc.token_file)
    try:
        tok = store.load_current(kc.api_key)
        _retry("access token check (profile)", lambda: validate(tok, kc.api_url))
    except TokenError as e:
        print(f"feed-zerodha: {e}", file=sys.stderr, flush=True)
        sys.exit(EX_NOPERM)
    except Exception as e:
        log.error("cannot reach Kite to check the access token: %s", first_line(e))
        sys.exit(1)
    from kiteconnect import KiteConnect
    from kiteconnect import exceptions as kex
    kite = KiteConnect(kc.api_key, access_token=tok.access_token, root=kc.api_url)
    master: list[dict] = []
    try:
        for exch in sorted({s.exchange for s in specs}):
            try:
                master.extend(_retry(f"instrument list {exch}", lambda e=exch: kite.instruments(e)))
            except kex.InputException as e:
                log.warning("instrument list for exchange %s refused: %s", exch, first_line(e))
    except kex.TokenException as e:
        print(f"feed-zerodha: Kite refused the access token ({e}); run feed-kite-token", file=sys.stderr, flush=True)
        sys.exit(EX_NOPERM)
    except Exception as e:
        log.error("cannot read Kite's instrument list: %s", first_line(e))
        sys.exit(1)
    subs, unknown = resolve(specs, master)
    M.check_resolved(subs, [s.key for s in unknown], len(specs), "Kite's", "kite.instruments_file",
                     kc.instruments_file or kc.file, log)
    try:
        plan_conns = plan_connections(subs, kc.max_instruments_per_connection, kc.max_connections)
    except TooManyInstruments as e:
        raise ConfigError("kite.instruments_file", kc.instruments_file or kc.file, str(e)) from None
    tokens = {s.instrument_token for s in subs}
    _store_instruments(dsn, [r for r in master if int(r["instrument_token"]) in tokens])
    modes = {m: sum(1 for s in subs if s.mode == m) for m in A.MODES}
    log.info("feed-zerodha starting: config %s, %d instruments from %s (full %d, quote %d, ltp %d) over %d "
             "connection(s) of at most %d, ticker %s, %s; token %s", config_path, len(subs), source,
             modes["full"], modes["quote"], modes["ltp"], len(plan_conns), kc.max_instruments_per_connection,
             kc.ticker_url, run_plan.reason, tok.describe())
    sys.exit(M.collect(FEED, kc, st, plan_conns, tok.access_token, run_plan, unit, calendar))


def check_connection(kc: KiteConfig, specs: list[InstrumentSpec], source: str, calendar: NseCalendar | None,
                     echo=click.echo) -> int:
    """``feed-zerodha --test-connection``: the access token (Kite's profile),
    the instrument list resolved against Kite's instrument master, the
    planned ticker connections with each instrument's mode, and Kite's last
    price for every instrument (``GET /quote/ltp``, at most
    :data:`~feeds.kite.instruments.LTP_MAX_INSTRUMENTS` a request and
    :data:`~feeds.kite.instruments.QUOTE_REQUESTS_PER_SECOND` request a
    second).  Prints one line each; returns 0 when the token is valid and
    every instrument is known and answered, else 1.  Writes nothing (no
    database, no token file)."""
    from kiteconnect import KiteConnect
    from kiteconnect import exceptions as kex

    echo(f"Kite REST {kc.api_url}, ticker {kc.ticker_url}, api_key {kc.api_key}")
    plan = plan_run(datetime.now(UTC), calendar, connect_before=timedelta(seconds=kc.connect_before_open),
                    stop_after=timedelta(seconds=kc.stop_after_close))
    echo(f"session: {plan.reason}" + ("" if plan.action == "collect" else " (nothing to collect now)"))
    try:
        tok = TokenStore(kc.token_file).load_current(kc.api_key)
        prof = _retry("access token check (profile)", lambda: validate(tok, kc.api_url))
    except TokenError as e:
        echo(f"access token: FAILED: {e}")
        return 1
    except Exception as e:
        echo(f"access token: FAILED: cannot reach Kite: {first_line(e)}")
        return 1
    echo(f"access token: valid ({tok.describe()}; user {prof.get('user_id', '?')})")
    kite = KiteConnect(kc.api_key, access_token=tok.access_token, root=kc.api_url)
    master: list[dict] = []
    ok = True
    for exch in sorted({sp.exchange for sp in specs}):
        try:
            master.extend(_retry(f"instrument list {exch}", lambda e=exch: kite.instruments(e)))
        except Exception as e:
            echo(f"instrument list {exch}: FAILED: {first_line(e)}")
            ok = False
    subs, unknown = resolve(specs, master)
    echo(f"{len(specs)} instrument(s) from {source}: {len(subs)} in Kite's instrument list, {len(unknown)} not")
    try:
        conns = plan_connections(subs, kc.max_instruments_per_connection, kc.max_connections) if subs else []
    except TooManyInstruments as e:
        echo(f"FAILED: {e}")
        return 1
    modes = {m: sum(1 for sb in subs if sb.mode == m) for m in A.MODES}
    echo(f"would subscribe {len(subs)} instrument(s) over {len(conns)} connection(s) of at most "
         f"{kc.max_instruments_per_connection}: full {modes['full']}, quote {modes['quote']}, ltp {modes['ltp']}")
    for i, conn in enumerate(conns, 1):
        by = {m: sum(1 for sb in conn if sb.mode == m) for m in A.MODES}
        echo(f"  connection {i}: {len(conn)} instrument(s) (full {by['full']}, quote {by['quote']}, "
             f"ltp {by['ltp']})")
    cs = kc.candles
    echo("candles: " + (f"{', '.join(map(str, cs.intervals))} min into kite_candle, history fill "
                        f"{'on' if cs.fill_from_history else 'off'}" if cs.enabled else "off"))
    answers: dict[str, dict] = {}
    keys = [sb.key for conn in conns for sb in conn]
    pacer = H.Pacer(QUOTE_REQUESTS_PER_SECOND)
    for j in range(0, len(keys), LTP_MAX_INSTRUMENTS):
        batch = keys[j:j + LTP_MAX_INSTRUMENTS]
        pacer.wait()
        try:
            answers.update(_retry("last prices (quote/ltp)", lambda b=batch: kite.ltp(b)))
        except kex.TokenException as e:
            echo(f"last prices: FAILED: Kite refused the access token ({first_line(e)})")
            return 1
        except Exception as e:
            echo(f"last prices of {len(batch)} instrument(s): FAILED: {first_line(e)}")
            ok = False
    for i, conn in enumerate(conns, 1):
        for sb in conn:
            a = answers.get(sb.key)
            if a is None or "last_price" not in a:
                ok = False
                echo(f"  {sb.key} (token {sb.instrument_token}, {sb.mode}, connection {i}): FAILED: no answer "
                     f"from Kite")
            else:
                echo(f"  {sb.key} (token {sb.instrument_token}, {sb.mode}, connection {i}): ok, last price "
                     f"{a['last_price']}")
    for sp in unknown:
        ok = False
        echo(f"  {sp.key} ({sp.mode}): FAILED: not in Kite's instrument list")
    echo("connection test: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


# ----------------------------------------------------------------------------- feed-kite-token

def load_login(cfg: Config, kc: KiteConfig, no_browser: bool = False):
    """Credentials and login settings from ``[kite]`` and ``[kite.login]``;
    reads the secret files.  Raises ConfigError."""
    from .login import Credentials, LoginSettings, Selectors
    k = "kite.login."
    sel = Selectors(**{n: cfg[f"{k}selectors.{n}"] for n in ("user_id", "password", "submit", "totp", "error")})
    settings = LoginSettings(
        login_url=kc.login_url, api_url=kc.api_url,
        browser=cfg[k + "browser"],
        browser_flags=tuple(cfg[k + "browser_flags"]),
        use_browser=not no_browser and cfg[k + "use_browser"],
        http_fallback=cfg[k + "http_fallback"],
        timeout=cfg[k + "timeout"],
        selectors=sel,
    )
    creds = Credentials(
        api_key=kc.api_key,
        api_secret=cfg.secret(k + "api_secret_file"),
        user_id=cfg.require(k + "user_id"),
        password=cfg.secret(k + "password_file"),
        totp_secret=read_totp_secret(cfg, k + "totp_secret_file"),
        totp_file=cfg[k + "totp_secret_file"],
    )
    return creds, settings, cfg[k + "attempts"], list(cfg[k + "retry_delays"])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@M.config_option("FEEDS_KITE_CONFIG", "/etc/feeds/kite.toml")
@click.option("--check", is_flag=True, help="Only validate the stored token (exit 0 valid, 1 not).")
@click.option("--force", is_flag=True, help="Log in even when the stored token is still valid.")
@click.option("--no-browser", is_flag=True, help="Skip the browser; use the HTTP login only.")
@exit_on_config_error
def token_main(config_path: str, check: bool, force: bool, no_browser: bool) -> None:
    """Renew the Kite access token: log in (headless Chromium, or HTTP
    without a browser) with the user id, password and TOTP, exchange the
    request_token, validate and store the access token."""
    started = time.time()
    cfg = service.start(config_path, KITE_FILE)
    kc = load_settings(cfg)
    if check:
        _token_run(cfg, kc, check, force, no_browser)
        return
    finish_renewal(lambda: _token_run(cfg, kc, check, force, no_browser), cfg["metrics.textfile_dir"], "kite_token",
                   TokenStore(kc.token_file), started)


def _token_run(cfg: Config, kc: KiteConfig, check: bool, force: bool, no_browser: bool) -> None:
    """The body of :func:`token_main`: returns when a valid token is
    stored, else exits (``sys.exit``) with its status."""
    from .login import CredentialsRejected, LoginError, renew
    # the credentials are checked first: a bad secret file stops the program whether or not a login is due
    login = None if check else load_login(cfg, kc, no_browser)
    store = TokenStore(kc.token_file)
    if check or not force:
        try:
            tok = store.load_current(kc.api_key)
            validate(tok, kc.api_url)
            log.info("stored access token is valid: %s", tok.describe())
            if check:
                sys.exit(0)
            log.info("nothing to do (use --force to log in anyway)")
            sys.exit(0)
        except TokenError as e:
            if check:
                log.error("%s", e)
                sys.exit(1)
            log.info("logging in: %s", re.sub(r"[:;] run feed-kite-token.*$", "", str(e)))
        except Exception as e:
            if check:
                log.error("cannot check the stored token: %s", first_line(e))
                sys.exit(1)
            log.info("renewing: the stored token could not be checked (%s)", first_line(e))
    creds, settings, attempts, delays = login
    try:
        renew(creds, settings, store, attempts=attempts, delays=delays)
    except CredentialsRejected as e:
        log.error("token renewal failed: %s", e)
        sys.exit(1)
    except LoginError as e:
        log.error("%s", e)
        sys.exit(1)
