"""What ``feedctl check`` and ``feedctl status`` measure: the I/O around :mod:`feeds.ops.checks`.

:func:`gather` collects a :class:`feeds.ops.checks.Facts` at ``now`` from:

* systemd: every ``feed-*.service`` unit that is loaded (``systemctl
  list-units --all``), enabled, or started by an enabled timer of the same
  name (``systemctl list-unit-files``), with ``systemctl show -p
  ActiveState,SubState,Result,NRestarts``.  Without systemd (PID 1 is not
  systemd: ``/run/systemd/system`` is absent) ``units`` is empty and a note
  says so;
* PostgreSQL (an open session of the read-only operators' role): the
  ``feed_heartbeat`` rows, ``binance_agg_gap``, ``binance_kline_check``,
  ``ibkr_session_status`` and ``dhan_session_status`` rows in ERROR,
  ``schema_migrations`` against the ``sql/`` files, ``SHOW data_directory``.
  A table whose migration is not applied yet (``dhan_session_status``
  before ``sql/0009_dhan.sql``) is a note, not a failure;
* files: each collector's spool (``spool-*.bin`` in ``/var/lib/feeds/<dir>``),
  the Kite access token (``kite.token_file`` of ``/etc/feeds/kite.toml``),
  the Dhan access token (``dhan.token_file`` of ``/etc/feeds/dhan.toml``),
  free space (``statvfs``) of the database's and the spools' file systems;
* the memory of the previous run (:class:`Memory`, a JSON file next to
  ``alerts.state_file``): usual rates, uptime samples, gaps seen, alerts sent.

Every source that fails is recorded in :attr:`Gathered.notes` (one line
each) and left out; none is fatal.  Commands run through a *runner*
``runner(argv) -> (returncode, stdout)`` (raises OSError when the program is
missing), so that tests can fake ``systemctl`` and ``journalctl``.

How a filled aggTrade gap is seen: feed-binance lists a gap in
``binance_agg_gap`` when it finds it and deletes the row once the fill's
rows are committed (a fill cut short leaves it for the next start).  So a
row present is a gap not (yet) filled -- "filling" while younger than
:data:`GAP_FILL_GRACE_S`, "not filled" after that -- and a gap a previous
run saw that has left the table was filled; the memory keeps those
(:attr:`Memory.gaps_filled`) for :data:`HISTORY_DAYS` days.  A gap found and
filled between two runs is never listed; the heartbeat's ``gaps`` and
``gap_trades_filled`` counters count every one.

Rates: the per-kind rates of a collector come from its STATUS line
(``aggTrade 1,234/s max-age 0.1s; ...``: messages per second over the last
status interval); kind ``"all"`` from the heartbeat's message counter
between two runs.  The usual rate of a (unit, kind) is an exponentially
weighted mean per hour of the week (UTC), learnt from the runs where the
unit was active with a fresh heartbeat, and used once
:data:`USUAL_MIN_SAMPLES` samples are in that hour.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..config import first_line as _first_line
from ..health import status_rates
from ..runtime import write_atomically
from . import checks
from .checks import (BackfillError, Disk, Facts, Gap, Heartbeat, KlineMismatch, Spool, TokenFacts,
                     UnitFacts, parse_aware, utc_iso)

log = logging.getLogger(__name__)
UTC = dt.timezone.utc

#: Where the collectors keep their spools (``StateDirectory=feeds/<dir>``).
SPOOL_ROOT = Path("/var/lib/feeds")
#: The spool directory of each collector unit (``binance-<shard>`` for feed-binance@<shard>):
#: ``sink.spool_dir``'s default in each program's file (lib/feeds/settings.py), its StateDirectory=.
SPOOL_DIRS = (("feed-binance@", "binance-"), ("feed-binance", "binance"), ("feed-zerodha", "zerodha"),
              ("feed-ibkr", "ibkr"), ("feed-dhan", "dhan"), ("feed-indicators", "indicators"))
KITE_CONFIG = Path("/etc/feeds/kite.toml")
KITE_TOKEN_UNIT = "feed-kite-token.service"
#: Dhan's configuration (``dhan.token_file``); read at each :func:`gather` (tests point it elsewhere).
DHAN_CONFIG = Path("/etc/feeds/dhan.toml")
DHAN_TOKEN_UNIT = "feed-dhan-token.service"
#: A ``binance_agg_gap`` row younger than this is a fill in progress, not an unfilled gap.
GAP_FILL_GRACE_S = 600.0
#: ``binance_kline_check`` minutes looked at by the check.
KLINE_WINDOW = dt.timedelta(hours=24)
#: Days of uptime samples, filled gaps and alerts kept in the memory.
HISTORY_DAYS = 35
#: At most this many alerts and filled gaps are kept in the memory.
HISTORY_MAX = 5000
#: Weight of a new sample in the usual rate of an hour of the week.
USUAL_ALPHA = 0.1
#: Samples an hour of the week needs before its usual rate is used.
USUAL_MIN_SAMPLES = 10
MEMORY_VERSION = 1

Runner = Callable[[list[str]], tuple[int, str]]


def run_command(argv: list[str], timeout: float = 15.0) -> tuple[int, str]:
    """Run ``argv``; returns ``(returncode, stdout)``.  Raises OSError when the
    program cannot be run (missing) and on a timeout (as OSError)."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise OSError(f"{argv[0]} did not answer within {timeout:.0f}s") from None
    return p.returncode, p.stdout


def systemd_booted() -> bool:
    """True when systemd is PID 1 (sd_booted(3): ``/run/systemd/system`` exists)."""
    return os.path.isdir("/run/systemd/system")






# -- memory --------------------------------------------------------------------------------------


class Memory:
    """What ``feedctl check`` keeps between runs, in the JSON file ``path``
    (``check-memory.json`` next to ``alerts.state_file``).

    Shape (version 1)::

        {"version": 1,
         "checks": {...},                     # checks.Evaluation.memory of the last run
         "usual": {"<unit>|<kind>": {"<hour of week 0-167>": [mean msg/s, samples]}},
         "uptime": {"<unit>": {"YYYY-MM-DD": [runs up, runs expected]}},
         "gaps_open": {"<symbol>|<first>": {"last": int, "detected_at": iso}},
         "gaps_filled": [{"symbol", "first", "last", "detected_at", "filled_by": iso}, ...],
         "alerts": [{"at": iso, "key", "status", "severity", "title", "accepted": bool}, ...],
         "scores": {"<unit>": {"YYYY-MM-DD": [sum of health scores, runs]}}}

    "up" means: the unit is active and its heartbeat is no older than
    ``stale_after_s``; "expected": its venue's session is open (Binance:
    always) -- per UTC day of the run.  A missing, unreadable or corrupt
    file reads as empty (logged).  :meth:`save` writes atomically (mode
    0640: it holds no secret, the operators' group reads it for ``feedctl
    report`` and ``gaps``) and raises OSError.
    """

    def __init__(self, path: str | os.PathLike | None, doc: dict | None = None):
        self.path = Path(path) if path is not None else None
        self.doc = doc if doc is not None else self._load()
        for k, v in (("checks", None), ("usual", {}), ("uptime", {}), ("gaps_open", {}),
                     ("gaps_filled", []), ("alerts", []), ("scores", {})):
            self.doc.setdefault(k, v)
        self.doc["version"] = MEMORY_VERSION

    @staticmethod
    def path_for(state_file: str | os.PathLike) -> Path:
        """The memory file beside ``alerts.state_file``."""
        return Path(state_file).with_name("check-memory.json")

    def _load(self) -> dict:
        if self.path is None:
            return {}
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error("check memory %s not usable (%s); starting afresh", self.path, _first_line(e))
            return {}
        if not isinstance(doc, dict) or doc.get("version") != MEMORY_VERSION:
            log.error("check memory %s is not a version %d memory; starting afresh", self.path, MEMORY_VERSION)
            return {}
        return doc

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps(self.doc, sort_keys=True, separators=(",", ":")) + "\n")
        os.chmod(self.path, 0o640)      # no secret in it: the operators' group reads it (feedctl report)

    @property
    def checks(self) -> Mapping | None:
        return self.doc.get("checks")

    @property
    def alerts(self) -> list[dict]:
        return self.doc["alerts"]

    @property
    def uptime(self) -> dict:
        return self.doc["uptime"]

    @property
    def gaps_filled(self) -> list[dict]:
        return self.doc["gaps_filled"]

    # usual rates

    def usual_rates(self, now: dt.datetime) -> dict[tuple[str, str], float]:
        """``{(unit, kind): msg/s}`` usual in the hour of the week of ``now``
        (only hours with :data:`USUAL_MIN_SAMPLES` samples or more)."""
        how = str(_hour_of_week(now))
        out = {}
        for key, hours in self.doc["usual"].items():
            unit, _, kind = key.rpartition("|")
            v = hours.get(how) if isinstance(hours, dict) else None
            if isinstance(v, list) and len(v) == 2 and v[1] >= USUAL_MIN_SAMPLES:
                out[(unit, kind)] = float(v[0])
        return out

    def learn_rates(self, now: dt.datetime, rates: Mapping[tuple[str, str], float]) -> None:
        how = str(_hour_of_week(now))
        for (unit, kind), rate in rates.items():
            hours = self.doc["usual"].setdefault(f"{unit}|{kind}", {})
            mean, n = hours.get(how, [rate, 0])
            mean = rate if n == 0 else (1 - USUAL_ALPHA) * mean + USUAL_ALPHA * rate
            hours[how] = [round(mean, 4), n + 1]

    # history

    def record_uptime(self, now: dt.datetime, samples: Mapping[str, tuple[bool, bool]]) -> None:
        """``samples``: ``{unit: (up, expected)}`` of this run."""
        day = now.astimezone(UTC).date().isoformat()
        for unit, (up, expected) in samples.items():
            if not expected:
                continue
            days = self.doc["uptime"].setdefault(unit, {})
            u, e = days.get(day, [0, 0])
            days[day] = [u + (1 if up else 0), e + 1]

    def record_scores(self, now: dt.datetime, scores: Mapping[str, Any]) -> None:
        """``scores``: ``{unit: healthscore.Score}`` of this run."""
        day = now.astimezone(UTC).date().isoformat()
        for unit, sc in scores.items():
            days = self.doc["scores"].setdefault(unit, {})
            total, n = days.get(day, [0, 0])
            days[day] = [total + sc.total, n + 1]

    def record_alerts(self, now: dt.datetime, results: Iterable[tuple[Any, bool]]) -> None:
        for alert, ok in results:
            self.alerts.append({"at": utc_iso(now), "key": alert.key, "status": alert.status,
                                "severity": alert.severity, "title": alert.title, "accepted": bool(ok)})

    def prune(self, now: dt.datetime) -> None:
        cutoff = now - dt.timedelta(days=HISTORY_DAYS)
        cut_day = cutoff.date().isoformat()
        for k in ("uptime", "scores"):
            for unit in list(self.doc[k]):
                days = {d: v for d, v in self.doc[k][unit].items() if d >= cut_day}
                if days:
                    self.doc[k][unit] = days
                else:
                    del self.doc[k][unit]
        for k in ("alerts", "gaps_filled"):
            keep = [x for x in self.doc[k] if (parse_aware(x.get("at") or x.get("filled_by")) or now) >= cutoff]
            self.doc[k] = keep[-HISTORY_MAX:]


def _hour_of_week(now: dt.datetime) -> int:
    t = now.astimezone(UTC)
    return t.weekday() * 24 + t.hour


# -- the result ----------------------------------------------------------------------------------


@dataclass
class Gathered:
    """``facts`` for :func:`checks.evaluate`; ``notes``: one line per source
    that could not be read; ``systemd``: whether systemd was asked;
    ``gaps_filling``: aggTrade gaps listed but younger than the fill grace;
    ``rates``: ``{(unit, kind): msg/s}`` (STATUS line kinds and ``"all"``);
    ``up``: ``{unit: (up, expected)}`` of this run (for :meth:`Memory.record_uptime`);
    ``data_directory``: the database's, when PostgreSQL told it."""
    facts: Facts
    notes: list[str] = field(default_factory=list)
    systemd: bool = False
    gaps_filling: list[Gap] = field(default_factory=list)
    rates: dict = field(default_factory=dict)
    up: dict = field(default_factory=dict)
    data_directory: str | None = None


# -- sources -------------------------------------------------------------------------------------


def _list_units(runner: Runner) -> list[str]:
    """Installed ``feed-*.service`` units worth checking (no templates)."""
    rc, out = runner(["systemctl", "list-units", "--all", "--plain", "--no-legend", "feed-*"])
    if rc != 0:
        raise OSError(f"systemctl list-units exited {rc}")
    loaded = set()
    for ln in out.splitlines():
        f = ln.split()
        if f and f[0].endswith(".service") and "@." not in f[0]:
            loaded.add(f[0])
    rc, out = runner(["systemctl", "list-unit-files", "--plain", "--no-legend", "feed-*"])
    files: dict[str, str] = {}
    if rc == 0:
        for ln in out.splitlines():
            f = ln.split()
            if len(f) >= 2:
                files[f[0]] = f[1]
    enabled = ("enabled", "enabled-runtime", "linked", "linked-runtime", "alias")
    for name, state in files.items():
        if not name.endswith(".service") or "@." in name:
            continue
        timer = name[:-len(".service")] + ".timer"
        if state in enabled or files.get(timer) in enabled:
            loaded.add(name)
    return sorted(loaded)


def _show_units(runner: Runner, units: list[str]) -> dict[str, UnitFacts]:
    if not units:
        return {}
    rc, out = runner(["systemctl", "show", "-p", "Id,ActiveState,SubState,Result,NRestarts", "--", *units])
    if rc != 0:
        raise OSError(f"systemctl show exited {rc}")
    res: dict[str, UnitFacts] = {}
    blocks = [b for b in re.split(r"\n\s*\n", out.strip()) if b.strip()]
    for i, b in enumerate(blocks):
        props = dict(ln.split("=", 1) for ln in b.splitlines() if "=" in ln)
        unit = props.get("Id") or (units[i] if i < len(units) else None)
        if not unit:
            continue
        try:
            n = int(props.get("NRestarts") or 0)
        except ValueError:
            n = 0
        res[unit] = UnitFacts(props.get("ActiveState", "unknown"), props.get("SubState", ""),
                              props.get("Result", "success"), n)
    return res


def gather_units(runner: Runner, notes: list[str], *, extra: Iterable[str] = ()) -> dict[str, UnitFacts]:
    """``{unit: UnitFacts}`` of the installed feed units (and of ``extra``)."""
    try:
        units = sorted(set(_list_units(runner)) | set(extra))
        return _show_units(runner, units)
    except OSError as e:
        notes.append(f"systemd: units not read ({_first_line(e)})")
        return {}


def spool_dir_of(unit: str, root: Path = SPOOL_ROOT) -> Path | None:
    """The spool directory of a collector unit, None for another unit."""
    base = checks.unit_base(unit)
    for prefix, d in SPOOL_DIRS:
        if prefix.endswith("@"):
            if base.startswith(prefix):
                return root / (d + base[len(prefix):])
        elif base == prefix:
            return root / d
    return None


def gather_spools(units: Iterable[str], notes: list[str], root: Path = SPOOL_ROOT) -> list[Spool]:
    """The spool of each collector unit (files and bytes of ``spool-*.bin``); a
    directory that does not exist is an empty spool, one that cannot be read
    is noted and left out.  Also every ``binance*``, ``zerodha``, ``ibkr``,
    ``dhan``, ``indicators`` directory under ``root`` whose unit is not named
    (a spool left behind)."""
    dirs: dict[Path, str] = {}
    for u in units:
        d = spool_dir_of(u, root)
        if d is not None:
            dirs.setdefault(d, u)
    try:
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            name = d.name
            unit = (f"feed-binance@{name[len('binance-'):]}.service" if name.startswith("binance-") else
                    next((f"{u}.service" for u, dn in SPOOL_DIRS if not u.endswith("@") and dn == name),
                         None))
            if unit is not None:
                dirs.setdefault(d, unit)
    except OSError as e:
        notes.append(f"spools: {root} not readable ({e.strerror or e})")
    out = []
    for d, unit in sorted(dirs.items(), key=lambda x: (x[1], str(x[0]))):
        files = size = 0
        try:
            # os.scandir, not Path.glob: glob passes over a directory it may not read as if empty
            with os.scandir(d) as it:
                for e in it:
                    if e.name.startswith("spool-") and e.name.endswith(".bin"):
                        files += 1
                        size += e.stat().st_size
        except FileNotFoundError:
            pass
        except PermissionError:
            notes.append(f"spool {d} of {unit} not readable by this user (mode 0700, owned by the collector)")
            continue
        except OSError as e:
            notes.append(f"spool {d} of {unit} not readable ({e.strerror or e})")
            continue
        if not d.exists():
            continue
        out.append(Spool(unit, str(d), files, size))
    return out


def gather_heartbeats(conn) -> dict[str, Heartbeat]:
    rows = conn.execute("SELECT unit, updated_at, state, status, detail, started_at FROM feed_heartbeat "
                        "ORDER BY unit").fetchall()
    return {u: Heartbeat(updated_at=t, state=s, status=st or "", detail=d or {}, started_at=sa)
            for u, t, s, st, d, sa in rows}


def gather_gaps(conn, now: dt.datetime, memory: Memory) -> tuple[list[Gap], list[Gap]]:
    """(gaps for the check, gaps being filled).  Updates ``memory``'s open and filled gaps."""
    rows = conn.execute("SELECT symbol, first_id, last_id, detected_at FROM binance_agg_gap "
                        "ORDER BY symbol, first_id").fetchall()
    listed = {f"{s}|{f}": (s, f, l, d) for s, f, l, d in rows}
    for key, g in list(memory.doc["gaps_open"].items()):
        if key not in listed:
            sym, _, first = key.rpartition("|")
            memory.gaps_filled.append({"symbol": sym, "first": int(first), "last": g.get("last"),
                                       "detected_at": g.get("detected_at"), "filled_by": utc_iso(now)})
    memory.doc["gaps_open"] = {k: {"last": l, "detected_at": utc_iso(d)} for k, (s, f, l, d) in listed.items()}
    gaps, filling = [], []
    for s, f, l, d in rows:
        g = Gap("binance_agg_trade", s, f, l, False, d)
        if d is not None and (now - d).total_seconds() < GAP_FILL_GRACE_S:
            filling.append(g)
        else:
            gaps.append(g)
    return gaps, filling


def gather_klines(conn, now: dt.datetime) -> list[KlineMismatch]:
    rows = conn.execute(
        """SELECT DISTINCT ON (symbol, open_time) symbol, open_time, stage, differs, repaired, coalesce(note, '')
             FROM binance_kline_check WHERE open_time >= %s
            ORDER BY symbol, open_time, checked_at DESC""", (now - KLINE_WINDOW,)).fetchall()
    return [KlineMismatch(s, t, d if stage == "found" else (d or ""), None if stage == "found" else bool(r), n)
            for s, t, stage, d, r, n in rows]


def gather_backfill_errors(conn) -> list[BackfillError]:
    rows = conn.execute("SELECT symbol, session_date, coalesce(error, '') FROM ibkr_session_status "
                        "WHERE status = 'ERROR' ORDER BY symbol, session_date").fetchall()
    return [BackfillError(s, d, e) for s, d, e in rows]


class TableMissing(Exception):
    """A table whose migration is not applied yet."""


def table_exists(conn, table: str) -> bool:
    """Whether ``table`` (a relation of the search path) exists."""
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]


def gather_dhan_backfill_errors(conn) -> list[BackfillError]:
    """``dhan_session_status`` rows in ERROR (venue ``dhan``; symbol = the
    instrument ``SEGMENT:SYMBOL``).  Raises :class:`TableMissing` before
    ``sql/0009_dhan.sql`` is applied."""
    if not table_exists(conn, "dhan_session_status"):
        raise TableMissing("table dhan_session_status not there yet: sql/0009_dhan.sql not applied")
    rows = conn.execute("SELECT instrument, session_date, coalesce(error, '') FROM dhan_session_status "
                        "WHERE status = 'ERROR' ORDER BY instrument, session_date").fetchall()
    return [BackfillError(s, d, e, venue="dhan") for s, d, e in rows]


def gather_migrations(conn, sql_dir: Path | None) -> list[str]:
    from ..migrate import default_sql_dir, discover
    migs = discover(sql_dir or default_sql_dir())
    done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations").fetchall()}
    return [m.path.name for m in migs if m.version not in done]


def gather_token(runner: Runner | None, units: Mapping[str, UnitFacts], notes: list[str],
                 kite_config: Path = KITE_CONFIG) -> TokenFacts | None:
    """The Kite token's expiry and the renewal's result; None when Kite is not
    configured here (no ``kite.toml``) or it cannot be read (noted)."""
    if not kite_config.exists():
        return None
    from ..kite.token import TokenMissing, TokenStore
    from ..settings import KITE_FILE, load
    from ..config import ConfigError
    try:
        cfg = load(kite_config, KITE_FILE)
    except ConfigError as e:
        notes.append(f"kite token: {kite_config} not usable ({e.reason}); token not checked")
        return None
    path = Path(cfg["kite.token_file"])
    try:
        path.stat()
        exists = True
    except FileNotFoundError:
        exists = False
    except OSError as e:
        notes.append(f"kite token: {path} not readable ({e.strerror}); token not checked")
        return None
    expires = None
    if exists:
        try:
            expires = TokenStore(path).load().expires_at
        except TokenMissing as e:
            if "not readable" in str(e):
                notes.append(f"kite token: {path} not readable by this user; token not checked")
                return None
    u = units.get(KITE_TOKEN_UNIT)
    result = u.result if u is not None else None
    active = u.active_state if u is not None else "inactive"
    return TokenFacts(expires_at=expires, renewal_result=result, renewal_active_state=active)


def _dhan_token_expiry(path: Path) -> tuple[dt.datetime | None, str | None]:
    """(expiry, client id) of the Dhan token document at ``path``: through
    :class:`feeds.dhan.token.TokenStore`, else (that module not installed)
    the JSON's ``expires_at`` and ``client_id``.  (None, None) when the file
    is not a token document.  Raises PermissionError when it cannot be read."""
    try:
        from ..dhan.token import TokenMissing, TokenStore
    except ImportError:
        try:
            d = json.loads(path.read_text())
            t = dt.datetime.fromisoformat(d["expires_at"])
        except (ValueError, KeyError, TypeError):
            return None, None
        return (t if t.tzinfo is not None else None), str(d.get("client_id", "")) or None
    try:
        tok = TokenStore(path).load()
    except TokenMissing as e:
        if "not readable" in str(e):
            raise PermissionError(str(e)) from None
        return None, None
    return tok.expires_at, tok.client_id


def gather_dhan_token(units: Mapping[str, UnitFacts], notes: list[str],
                      dhan_config: Path | None = None) -> TokenFacts | None:
    """The Dhan token's expiry and feed-dhan-token's last result; None when
    Dhan is not configured here (no ``dhan.toml``), or the file or the token
    cannot be read by this user (noted).  A token of another client id than
    ``dhan.client_id`` is kept with its ``problem`` said."""
    dhan_config = DHAN_CONFIG if dhan_config is None else dhan_config
    if not dhan_config.exists():
        return None
    from ..config import ConfigError
    from ..settings import DHAN_FILE, load
    try:
        cfg = load(dhan_config, DHAN_FILE)
    except ConfigError as e:
        why = e.reason if e.key in ("-", "") else f"{e.key}: {e.reason}"
        notes.append(f"dhan token: {dhan_config} not usable ({why}); token not checked")
        return None
    path = Path(cfg["dhan.token_file"])
    expires = client = None
    try:
        path.stat()
        expires, client = _dhan_token_expiry(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        why = "by this user" if isinstance(e, PermissionError) else f"({e.strerror})"
        notes.append(f"dhan token: {path} not readable {why}; token not checked")
        return None
    problem = None
    if client is not None and client != cfg["dhan.client_id"]:
        problem = f"it belongs to client {client}, not dhan.client_id {cfg['dhan.client_id']}"
    u = units.get(DHAN_TOKEN_UNIT)
    return TokenFacts(expires_at=expires, renewal_result=u.result if u is not None else None,
                      renewal_active_state=u.active_state if u is not None else "inactive", problem=problem)


def gather_disks(paths: Iterable[str | os.PathLike], notes: list[str]) -> list[Disk]:
    """Free fraction of each file system (once per device) holding one of ``paths``."""
    out, seen = [], set()
    for p in paths:
        p = str(p)
        try:
            st = os.stat(p)
            if st.st_dev in seen:
                continue
            v = os.statvfs(p)
        except FileNotFoundError:
            continue
        except OSError as e:
            notes.append(f"disk {p}: not measured ({e.strerror or e})")
            continue
        seen.add(st.st_dev)
        if v.f_blocks:
            out.append(Disk(p, v.f_bavail / v.f_blocks))
    return out


def _all_rate(hb: Heartbeat, prev: Mapping | None) -> float | None:
    """msg/s between the previous run's counters and this heartbeat (same process)."""
    if not prev:
        return None
    c = (prev.get("counters") or {}) if isinstance(prev, Mapping) else {}
    if not c or c.get("started_at") != utc_iso(hb.started_at) or hb.started_at is None:
        return None
    t0 = parse_aware(c.get("updated_at"))
    if t0 is None:
        return None
    dt_s = (hb.updated_at - t0).total_seconds()
    if dt_s <= 0:
        return None
    try:
        return max(0, int((hb.detail or {}).get("messages") or 0) - int(c.get("messages") or 0)) / dt_s
    except (TypeError, ValueError):
        return None


def expected_now(unit: str, now: dt.datetime, get_cal) -> bool:
    """The unit's venue session is open at ``now`` (Binance: always; oneshots: never)."""
    rule = checks.rule_of_unit(unit)
    if rule.kind == "always":
        return True
    if rule.kind == "none":
        return False
    return checks.current_session(now, get_cal(rule.calendar)) is not None


def _get_cal(calendars):
    if calendars is None:
        from ..calendars import calendar
        return calendar
    if callable(calendars) and not isinstance(calendars, Mapping):
        return calendars
    return calendars.__getitem__


def gather(now: dt.datetime, conn, *, memory: Memory | None = None, runner: Runner | None = run_command,
           systemd: bool | None = None, spool_root: Path = SPOOL_ROOT, kite_config: Path = KITE_CONFIG,
           sql_dir: Path | None = None, calendars=None, stale_after_s: float = checks.DEFAULT_PARAMS.stale_after_s,
           extra_disks: Iterable[str] = (), dhan_config: Path | None = None) -> Gathered:
    """The :class:`Gathered` facts at ``now`` (aware).

    ``conn``: an open autocommit session (:func:`feeds.db.connect`) or None
    (the database is unreachable: its sources are left out and noted).
    ``memory``: the previous runs' :class:`Memory` (updated in place: gaps
    seen; the caller records uptime, rates and alerts and saves it).
    ``runner``: runs ``systemctl`` (see :func:`run_command`); ``systemd``:
    whether to ask it (default: :func:`systemd_booted` for the default
    runner, True for another).  ``spool_root``, ``kite_config``, ``sql_dir``,
    ``dhan_config`` (None: :data:`DHAN_CONFIG`): where those live.
    ``calendars``: as for :func:`checks.evaluate`.
    """
    memory = memory if memory is not None else Memory(None)
    dhan_config = DHAN_CONFIG if dhan_config is None else dhan_config
    notes: list[str] = []
    if systemd is None:
        systemd = systemd_booted() if runner is run_command else runner is not None
    units: dict[str, UnitFacts] = {}
    if systemd and runner is not None:
        extra = ([KITE_TOKEN_UNIT] if kite_config.exists() else []) + \
            ([DHAN_TOKEN_UNIT] if dhan_config.exists() else [])
        units = gather_units(runner, notes, extra=extra)
    else:
        notes.append("systemd: not available here (PID 1 is not systemd); unit states not checked")

    heartbeats: dict[str, Heartbeat] = {}
    gaps: list[Gap] = []
    filling: list[Gap] = []
    klines: list[KlineMismatch] = []
    backfill: list[BackfillError] = []
    pending: list[str] = []
    data_dir = None

    def source(name, fn):
        try:
            return fn()
        except Exception as e:          # a failing source is a note, never fatal
            notes.append(f"{name}: not read ({_first_line(e)})")
            return None

    if conn is not None:
        heartbeats = source("heartbeats", lambda: gather_heartbeats(conn)) or {}
        r = source("aggTrade gaps", lambda: gather_gaps(conn, now, memory))
        if r is not None:
            gaps, filling = r
        klines = source("kline check", lambda: gather_klines(conn, now)) or []
        backfill = source("backfill sessions", lambda: gather_backfill_errors(conn)) or []
        backfill += source("dhan backfill sessions", lambda: gather_dhan_backfill_errors(conn)) or []
        pending = source("migrations", lambda: gather_migrations(conn, sql_dir)) or []
        try:
            data_dir = conn.execute("SHOW data_directory").fetchone()[0]
        except Exception:
            data_dir = None             # refused to a role without pg_read_all_settings
    else:
        notes.append("database: unreachable; heartbeats, gaps, kline checks, backfill sessions and "
                     "migrations not read")
    # filled gaps of the last hour also count (for the check's listing)
    for g in memory.gaps_filled:
        t = parse_aware(g.get("filled_by"))
        if t is not None and (now - t).total_seconds() <= 3600:
            gaps.append(Gap("binance_agg_trade", g["symbol"], g["first"], g["last"], True,
                            parse_aware(g.get("detected_at"))))

    unit_names = sorted(set(units) | set(heartbeats))
    spools = gather_spools(unit_names, notes, spool_root)
    token = source("kite token", lambda: gather_token(runner, units, notes, kite_config))
    dhan_token = source("dhan token", lambda: gather_dhan_token(units, notes, dhan_config))
    disk_paths = ([data_dir] if data_dir else ["/var/lib/postgresql"]) + [s.path for s in spools] \
        + [str(spool_root)] + list(extra_disks)
    disks = gather_disks(disk_paths, notes)

    get_cal = _get_cal(calendars)
    prev_units = ((memory.checks or {}).get("units") or {}) if isinstance(memory.checks, Mapping) else {}
    rates: dict[tuple[str, str], float] = {}
    up: dict[str, tuple[bool, bool]] = {}
    for unit in unit_names:
        hb = heartbeats.get(unit)
        uf = units.get(unit)
        fresh = hb is not None and (now - hb.updated_at).total_seconds() <= stale_after_s
        if checks.rule_of_unit(unit).kind != "none":
            try:
                exp = expected_now(unit, now, get_cal)
            except Exception as e:
                notes.append(f"calendar of {unit}: {_first_line(e)}")
                exp = False
            active = uf.active if uf is not None else (hb is not None and hb.state not in ("stopped", "failed"))
            up[unit] = (active and fresh, exp)
        if hb is None or not fresh:
            continue
        for kind, r in status_rates(hb.status).items():
            rates[(unit, kind)] = r
        a = _all_rate(hb, prev_units.get(unit))
        if a is not None:
            rates[(unit, "all")] = a

    usual = memory.usual_rates(now)
    facts = Facts(now=now, units=units, heartbeats=heartbeats, spools=spools, gaps=gaps,
                  kline_mismatches=klines, token=token, dhan_token=dhan_token, backfill_errors=backfill,
                  disks=disks,
                  pending_migrations=pending, rates=rates, usual_rates=usual or None,
                  previous=memory.checks)
    return Gathered(facts=facts, notes=notes, systemd=bool(systemd and runner is not None),
                    gaps_filling=filling, rates=rates, up=up, data_directory=data_dir)
