"""``feedctl gaps`` and ``feedctl report``: what is missing, and what a day or week stored.

Both read PostgreSQL (the read-only operators' role) and the memory of
``feedctl check`` (:class:`feeds.ops.gather.Memory`), and return JSON-ready
dicts that :func:`gaps_text` and :func:`report_text` print.

Gaps (:func:`gaps`), per stream, symbol and UTC day:

* ``binance_agg_trade``: aggTrade id ranges.  A ``binance_agg_gap`` row is a
  gap not filled yet (``filling`` while younger than
  :data:`feeds.ops.gather.GAP_FILL_GRACE_S`, then ``not filled``); gaps a check
  run saw leave the table are ``filled`` (from the memory).
* ``binance_kline``: minutes whose kline disagreed with the stored aggTrades
  (``binance_kline_check``): ``repaired``, ``not repaired`` or ``fill pending``.
* ``ibkr_bar_1min``: IBKR history sessions not complete (``ibkr_session_status``
  ERROR, PARTIAL, PENDING): the session's missing minutes (expected - stored bars).
* ``dhan_bar``: Dhan history sessions (``dhan_session_status``, symbol =
  the instrument ``SEGMENT:SYMBOL``) in ERROR, PARTIAL or PENDING, and THIN
  ones (final: minutes without a trade have no candle): their missing
  minutes (expected - stored candles).

Candle minutes missing in the live Kite, IBKR and Dhan candles are not
derived (a minute without a trade has no candle, so absence is not a gap);
the output says so.

Report (:func:`report`), per feed over a UTC day or ISO week (Monday to
Sunday): rows stored per table (a whole day partition by its planner
estimate ``reltuples`` once analysed, otherwise counted; other tables
counted on their time column), uptime inside its sessions (check runs that
saw the unit up / runs in which it was expected to run), gaps found and
filled, alerts sent (firing / resolved, from the memory), and the health
score (mean and last of the check runs).  For ``feed-dhan-backfill`` also
the adjustments Dhan's history showed in the period (``dhan_adjustment``,
by ``found_at``) and the reconciliation of the live one-minute candles with
Dhan's (``dhan_reconciliation``, sessions of the period): per instrument,
minutes compared, minutes differing, minutes missing live and at Dhan.

A table whose migration is not applied yet (the ``dhan_*`` tables before
``sql/0009_dhan.sql`` and ``sql/0011_dhan_live.sql``, ``indicator_value``
before ``sql/0010_indicators.sql``) is left out with a note; it never
fails the command.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Mapping

from .checks import parse_aware, utc_iso
from .gather import GAP_FILL_GRACE_S, Memory, table_exists

UTC = dt.timezone.utc

#: Tables of each feed (unit base name) and the time column a day is counted on.
FEED_TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "feed-binance": (("binance_agg_trade", "trade_time"), ("binance_book_ticker", "event_time"),
                     ("binance_mark_price", "event_time"), ("binance_ticker_24h", "event_time"),
                     ("binance_kline", "open_time")),
    "feed-zerodha": (("kite_tick_ltp", "recv_time"), ("kite_tick_quote", "recv_time"),
                     ("kite_tick_full", "recv_time"), ("kite_candle", "bar_start")),
    "feed-ibkr": (("ibkr_trade", "recv_time"), ("ibkr_quote", "recv_time"), ("ibkr_index_tick", "recv_time"),
                  ("ibkr_candle", "bar_start")),
    "feed-backfill": (("ibkr_bar_1min", "bar_start"),),
    "feed-dhan": (("dhan_tick_ticker", "recv_time"), ("dhan_tick_quote", "recv_time"),
                  ("dhan_tick_full", "recv_time"), ("dhan_tick_oi", "recv_time"), ("dhan_prev_close", "recv_time"),
                  ("dhan_candle", "bar_start")),
    "feed-dhan-backfill": (("dhan_bar", "bar_start"),),
    # computed_at, not bar_start: the rows written in the period.  A revised or late candle and the
    # warm-up after a restart write values of older bars again (new rows, later computed_at); by
    # bar_start those rows would be added to past periods, whose reports would change afterwards.
    "feed-indicators": (("indicator_value", "computed_at"),),
}

#: The migration that creates each table a feed may lack (named in the notes).
MIGRATION_OF = {"dhan_bar": "0009_dhan.sql", "dhan_session_status": "0009_dhan.sql",
                "dhan_adjustment": "0009_dhan.sql", "dhan_reconciliation": "0009_dhan.sql",
                "dhan_tick_ticker": "0011_dhan_live.sql", "dhan_tick_quote": "0011_dhan_live.sql",
                "dhan_tick_full": "0011_dhan_live.sql", "dhan_tick_oi": "0011_dhan_live.sql",
                "dhan_prev_close": "0011_dhan_live.sql", "dhan_candle": "0011_dhan_live.sql",
                "indicator_value": "0010_indicators.sql"}

#: Streams of :func:`gaps`.
STREAMS = ("binance_agg_trade", "binance_kline", "ibkr_bar_1min", "dhan_bar")

NOT_DERIVED = ("live candle minutes of Kite, IBKR and Dhan are not listed: a minute without a trade has no "
               "candle, so a missing candle is not a gap")

#: dhan_session_status states in gaps.
DHAN_GAP_STATES = {"ERROR": "not filled (ERROR)", "PARTIAL": "partial (fetched again)", "PENDING": "pending",
                   "THIN": "thin (no trade; final)"}


def missing_table_note(table: str, what: str = "") -> str:
    """One line: ``table`` is not there yet (its migration not applied)."""
    mig = MIGRATION_OF.get(table)
    return (f"{what or table}: table {table} not there yet "
            f"({'sql/' + mig if mig else 'its migration'} not applied; systemctl start feed-migrate.service)")



def _dec(v: Any) -> str | None:
    """A numeric as plain decimal text (``Decimal('2.000')`` -> ``"2"``); None stays None."""
    if v is None:
        return None
    t = format(v.normalize(), "f") if hasattr(v, "normalize") else str(v)
    return t


def _day(t: dt.datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).date().isoformat()


def feed_of(unit_or_key: str) -> str:
    """The feed (unit base name, e.g. ``feed-binance`` or ``feed-binance@1of2``)
    an alert key or unit belongs to; ``"system"`` for disk, migrations, database."""
    kind, _, subject = unit_or_key.partition(":")
    if not subject:
        subject = unit_or_key
    if kind in ("gap", "kline"):
        return "feed-binance"
    if kind == "token":
        return {"kite": "feed-zerodha", "dhan": "feed-dhan"}.get(subject, "system")
    if kind == "backfill-error":
        return "feed-dhan-backfill" if subject.startswith("dhan:") else "feed-backfill"
    if kind in ("disk", "migrations", "database") or not subject.startswith("feed-"):
        return "system"
    unit = subject.split(":")[0]
    return unit[:-len(".service")] if unit.endswith(".service") else unit


# -- gaps ----------------------------------------------------------------------------------------


def gaps(conn, now: dt.datetime, *, since: dt.datetime, stream: str | None = None,
         memory: Memory | None = None, notes: list[str] | None = None) -> dict:
    """Gaps from ``since`` on (aware), optionally of one ``stream`` (:data:`STREAMS`:
    ``binance_agg_trade``, ``binance_kline``, ``ibkr_bar_1min``, ``dhan_bar``).
    Returns ``{"since", "entries": [...], "notes": [...]}``, each entry
    ``{"stream", "symbol", "day", "first", "last", "missing", "unit", "state",
    "detail"}`` (``unit``: ``ids`` or ``minutes``), sorted by stream, day,
    symbol.  A stream whose table is not there yet is left out with a note.
    Raises ``psycopg.Error``."""
    notes = list(notes or [])
    out: list[dict] = []
    source_of = {"binance_agg_trade": "binance_agg_gap", "binance_kline": "binance_kline_check",
                 "ibkr_bar_1min": "ibkr_session_status", "dhan_bar": "dhan_session_status"}
    present: dict[str, bool] = {}

    def want(s: str) -> bool:
        if stream is not None and s != stream:
            return False
        if s not in present:
            present[s] = table_exists(conn, source_of[s])
            if not present[s]:
                notes.append(missing_table_note(source_of[s], s))
        return present[s]

    if want("binance_agg_trade"):
        rows = conn.execute("SELECT symbol, first_id, last_id, detected_at FROM binance_agg_gap "
                            "WHERE detected_at >= %s ORDER BY symbol, first_id", (since,)).fetchall()
        for s, f, l, d in rows:
            young = (now - d).total_seconds() < GAP_FILL_GRACE_S
            out.append({"stream": "binance_agg_trade", "symbol": s, "day": _day(d), "first": f, "last": l,
                        "missing": l - f + 1, "unit": "ids", "state": "filling" if young else "not filled",
                        "detail": f"found {utc_iso(d)}"})
        if memory is not None:
            listed = {(s, f) for s, f, _, _ in rows}
            for g in memory.gaps_filled:
                d = parse_aware(g.get("detected_at"))
                if (d is not None and d < since) or (g["symbol"], g["first"]) in listed:
                    continue
                last = g.get("last") if g.get("last") is not None else g["first"]
                out.append({"stream": "binance_agg_trade", "symbol": g["symbol"], "day": _day(d),
                            "first": g["first"], "last": last, "missing": last - g["first"] + 1,
                            "unit": "ids", "state": "filled",
                            "detail": f"found {utc_iso(d)}, filled by {g.get('filled_by')}"})
        else:
            notes.append("filled aggTrade gaps are known from feedctl check's memory, which is not readable here")
    if want("binance_kline"):
        rows = conn.execute(
            """SELECT DISTINCT ON (symbol, open_time) symbol, open_time, stage, differs, repaired,
                      coalesce(note, '')
                 FROM binance_kline_check WHERE open_time >= %s
                ORDER BY symbol, open_time, checked_at DESC""", (since,)).fetchall()
        for s, t, stage, diff, rep, note in rows:
            state = ("repaired" if rep else "not repaired") if stage == "after_fill" else \
                ("not filled" if note else "fill pending")
            out.append({"stream": "binance_kline", "symbol": s, "day": _day(t), "first": utc_iso(t),
                        "last": utc_iso(t + dt.timedelta(minutes=1)), "missing": 1, "unit": "minutes",
                        "state": state, "detail": (f"differs: {diff}" if diff else "agrees after the fill")
                        + (f"; {note}" if note else "")})
    if want("ibkr_bar_1min"):
        rows = conn.execute(
            """SELECT symbol, session_date, status, session_open, session_close, expected_bars, actual_bars,
                      coalesce(error, ''), coalesce(note, '')
                 FROM ibkr_session_status
                WHERE status IN ('ERROR', 'PARTIAL', 'PENDING') AND session_date >= %s
                ORDER BY symbol, session_date""", (since.astimezone(UTC).date(),)).fetchall()
        for s, d, st, o, c, exp, act, err, note in rows:
            out.append({"stream": "ibkr_bar_1min", "symbol": s, "day": d.isoformat(), "first": utc_iso(o),
                        "last": utc_iso(c), "missing": max(0, exp - act), "unit": "minutes",
                        "state": {"ERROR": "not filled (ERROR)", "PARTIAL": "partial (fetched again)",
                                  "PENDING": "pending"}[st],
                        "detail": "; ".join(x for x in (f"{act}/{exp} bars", err, note) if x)})
    if want("dhan_bar"):
        rows = conn.execute(
            """SELECT instrument, session_date, status, session_open, session_close, expected_bars, actual_bars,
                      coalesce(error, ''), coalesce(note, '')
                 FROM dhan_session_status
                WHERE status IN ('ERROR', 'PARTIAL', 'PENDING', 'THIN') AND session_date >= %s
                ORDER BY instrument, session_date""", (since.astimezone(UTC).date(),)).fetchall()
        for s, d, st, o, c, exp, act, err, note in rows:
            out.append({"stream": "dhan_bar", "symbol": s, "day": d.isoformat(), "first": utc_iso(o),
                        "last": utc_iso(c), "missing": max(0, exp - act), "unit": "minutes",
                        "state": DHAN_GAP_STATES[st],
                        "detail": "; ".join(x for x in (f"{act}/{exp} candles", err, note) if x)})
    out.sort(key=lambda e: (e["stream"], e["day"] or "", e["symbol"], str(e["first"])))
    notes.append(NOT_DERIVED)
    return {"since": utc_iso(since), "stream": stream, "entries": out, "notes": notes}



def gaps_text(doc: dict) -> list[str]:
    lines = []
    if not doc["entries"]:
        lines.append(f"no gap since {doc['since']}" + (f" in {doc['stream']}" if doc["stream"] else ""))
    cur = None
    for e in doc["entries"]:
        head = (e["stream"], e["day"])
        if head != cur:
            cur = head
            lines.append(f"{e['stream']} {e['day']}:")
        rng = f"{e['first']} .. {e['last']}" if e["unit"] == "ids" else \
            f"{(e['first'] or '?')[11:16]}-{(e['last'] or '?')[11:16]} UTC"
        lines.append(f"  {e['symbol']:<14} {rng:<28} {e['missing']:>8} {e['unit']:<7} {e['state']:<24} "
                     f"{e['detail']}")
    for n in doc["notes"]:
        lines.append(f"note: {n}")
    return lines


# -- report --------------------------------------------------------------------------------------


def period(kind: str, day: dt.date) -> tuple[dt.date, dt.date]:
    """``[first, last]`` UTC days of the ``daily`` report of ``day`` or the
    ``weekly`` report of the ISO week holding it (Monday to Sunday)."""
    if kind == "daily":
        return day, day
    first = day - dt.timedelta(days=day.weekday())
    return first, first + dt.timedelta(days=6)


def _days(first: dt.date, last: dt.date) -> list[dt.date]:
    return [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]


def rows_stored(conn, table: str, column: str, first: dt.date, last: dt.date, exact: bool = False) -> tuple[int, bool]:
    """(rows of ``table`` whose ``column`` falls in the days, estimated).  A
    daily partition ``<table>_pYYYYMMDD`` is taken whole: its ``reltuples``
    once analysed (estimated), else counted; a table without day
    partitions is counted with a range on ``column``."""
    from psycopg import sql
    total, estimated = 0, False
    parts = dict(conn.execute(
        """SELECT c.relname, c.reltuples FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = to_regclass(%s)""", (table,)).fetchall())
    partitioned = conn.execute("SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass(%s)",
                               (table,)).fetchone()
    if partitioned and partitioned[0]:
        for d in _days(first, last):
            name = f"{table}_p{d:%Y%m%d}"
            if name not in parts:
                continue
            if parts[name] >= 0 and not exact:
                total += int(parts[name])
                estimated = True
            else:
                total += conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(name))).fetchone()[0]
        return total, estimated
    lo = dt.datetime.combine(first, dt.time(), UTC)
    hi = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), UTC)
    n = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} >= %s AND {} < %s").format(
        sql.Identifier(table), sql.Identifier(column), sql.Identifier(column)), (lo, hi)).fetchone()[0]
    return n, False


def report(conn, kind: str, day: dt.date, *, memory: Memory | None, scores: Mapping[str, Any] | None = None,
           units: Iterable[str] = (), exact: bool = False, notes: list[str] | None = None) -> dict:
    """The ``daily`` or ``weekly`` report of the period holding ``day`` (see the
    module's doc).  ``scores``: ``{unit: healthscore.Score}`` now (from a
    check of the present); ``units``: unit names known now (systemd,
    heartbeats).  Returns ``{"kind", "first", "last", "feeds": [...], "notes"}``,
    each feed ``{"feed", "units", "rows": {table: n}, "rows_estimated",
    "uptime", "gaps", "alerts", "health"}``; ``feed-dhan-backfill`` also has
    ``"adjustments": {"found", "entries": [{"instrument", "symbol",
    "exchange_segment", "security_id", "session_date", "kind",
    "price_factor", "volume_factor" (decimal text), "interval_minutes",
    "candles_compared", "stored_version", "new_version", "found_at"}]}`` and
    ``"reconciliation": [{"instrument", "symbol", "exchange_segment",
    "interval_minutes", "sessions", "minutes_compared", "minutes_differing",
    "missing_live", "missing_dhan", "detail"}]`` (one per instrument and
    interval, summed over the period's sessions; ``detail``: the newest
    session's first differences).  Raises ``psycopg.Error``."""
    first, last = period(kind, day)
    lo = dt.datetime.combine(first, dt.time(), UTC)
    hi = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), UTC)
    notes = list(notes or [])
    mem = memory.doc if memory is not None else {}
    if memory is None:
        notes.append("uptime, filled gaps, alerts and health history come from feedctl check's memory, "
                     "which is not readable here")
    days = {d.isoformat() for d in _days(first, last)}

    feeds: dict[str, dict] = {}

    def feed(name: str) -> dict:
        return feeds.setdefault(name, {"feed": name, "units": [], "rows": {}, "rows_estimated": False,
                                       "uptime": None, "gaps": {}, "alerts": {"firing": 0, "resolved": 0,
                                                                               "keys": []},
                                       "health": None})

    for base in FEED_TABLES:
        feed(base)
    for u in list(units) + list((mem.get("uptime") or {}).keys()):
        f = feed(feed_of(u))
        if u not in f["units"]:
            f["units"].append(u)

    # rows
    exists: dict[str, bool] = {}

    def present(table: str, what: str = "") -> bool:
        if table not in exists:
            exists[table] = table_exists(conn, table)
            if not exists[table]:
                notes.append(missing_table_note(table, what))
        return exists[table]

    for base, tables in FEED_TABLES.items():
        f = feed(base)
        for table, col in tables:
            if not present(table, f"rows of {table}"):
                continue
            try:
                n, est = rows_stored(conn, table, col, first, last, exact)
            except Exception as e:
                conn.rollback() if not conn.autocommit else None
                notes.append(f"rows of {table}: not counted ({str(e).strip().splitlines()[0] if str(e) else e})")
                continue
            f["rows"][table] = n
            f["rows_estimated"] |= est

    # uptime inside the sessions (check runs)
    for u, per_day in (mem.get("uptime") or {}).items():
        upn = expn = 0
        for d, v in per_day.items():
            if d in days:
                upn += v[0]
                expn += v[1]
        f = feed(feed_of(u))
        if expn:
            prev = f["uptime"] or {"up_runs": 0, "expected_runs": 0}
            prev["up_runs"] += upn
            prev["expected_runs"] += expn
            prev["percent"] = round(100.0 * prev["up_runs"] / prev["expected_runs"], 2)
            f["uptime"] = prev

    # gaps
    g = feed("feed-binance")["gaps"]
    if present("binance_agg_gap", "aggTrade gaps"):
        rows = conn.execute("SELECT count(*), coalesce(sum(last_id - first_id + 1), 0) FROM binance_agg_gap "
                            "WHERE detected_at >= %s AND detected_at < %s", (lo, hi)).fetchone()
        filled = [x for x in (mem.get("gaps_filled") or [])
                  if (t := parse_aware(x.get("detected_at"))) is not None and lo <= t < hi]
        g["agg_trade_gaps_open"] = rows[0]
        g["agg_trade_ids_open"] = int(rows[1])
        g["agg_trade_gaps_filled"] = len(filled)
    if present("binance_kline_check", "kline check"):
        kc = conn.execute(
            """SELECT count(*) FILTER (WHERE stage = 'found'),
                      count(*) FILTER (WHERE stage = 'after_fill' AND repaired),
                      count(*) FILTER (WHERE stage = 'after_fill' AND NOT repaired)
                 FROM binance_kline_check WHERE open_time >= %s AND open_time < %s""", (lo, hi)).fetchone()
        g["kline_minutes_mismatched"], g["kline_minutes_repaired"], g["kline_minutes_not_repaired"] = kc
    if present("ibkr_session_status", "IBKR history sessions"):
        ib = conn.execute(
            """SELECT count(*), count(*) FILTER (WHERE status IN ('COMPLETE', 'EARLY_CLOSE', 'HOLIDAY')),
                      count(*) FILTER (WHERE status = 'ERROR'),
                      coalesce(sum(greatest(expected_bars - actual_bars, 0))
                               FILTER (WHERE status IN ('ERROR', 'PARTIAL', 'PENDING')), 0)
                 FROM ibkr_session_status WHERE session_date BETWEEN %s AND %s""", (first, last)).fetchone()
        bg = feed("feed-backfill")["gaps"]
        bg["sessions"], bg["sessions_ok"], bg["sessions_error"], bg["minutes_missing"] = \
            ib[0], ib[1], ib[2], int(ib[3])

    # Dhan history: sessions, adjustments found, reconciliation of the live candles
    dh = feed("feed-dhan-backfill")
    if present("dhan_session_status", "Dhan history sessions"):
        ds = conn.execute(
            """SELECT count(*), count(*) FILTER (WHERE status IN ('COMPLETE', 'EARLY_CLOSE', 'THIN', 'HOLIDAY')),
                      count(*) FILTER (WHERE status = 'ERROR'),
                      coalesce(sum(greatest(expected_bars - actual_bars, 0))
                               FILTER (WHERE status IN ('ERROR', 'PARTIAL', 'PENDING')), 0),
                      count(*) FILTER (WHERE status = 'THIN'),
                      coalesce(sum(greatest(expected_bars - actual_bars, 0)) FILTER (WHERE status = 'THIN'), 0)
                 FROM dhan_session_status WHERE session_date BETWEEN %s AND %s""", (first, last)).fetchone()
        dg = dh["gaps"]
        dg["sessions"], dg["sessions_ok"], dg["sessions_error"], dg["minutes_missing"] = \
            ds[0], ds[1], ds[2], int(ds[3])
        dg["sessions_thin"], dg["minutes_thin"] = ds[4], int(ds[5])
    if present("dhan_adjustment", "Dhan adjustments"):
        adj = conn.execute(
            """SELECT exchange_segment, symbol, security_id, session_date, kind, price_factor, volume_factor,
                      interval_minutes, candles_compared, stored_version, new_version, found_at
                 FROM dhan_adjustment WHERE found_at >= %s AND found_at < %s
                ORDER BY found_at, exchange_segment, symbol, session_date""", (lo, hi)).fetchall()
        dh["adjustments"] = {"found": len(adj), "entries": [
            {"instrument": f"{seg}:{sym}", "symbol": sym, "exchange_segment": seg, "security_id": sid,
             "session_date": d.isoformat(), "kind": kind, "price_factor": _dec(pf), "volume_factor": _dec(vf),
             "interval_minutes": iv, "candles_compared": n, "stored_version": sv, "new_version": nv,
             "found_at": utc_iso(at)}
            for seg, sym, sid, d, kind, pf, vf, iv, n, sv, nv, at in adj]}
    if present("dhan_reconciliation", "Dhan reconciliation"):
        rec = conn.execute(
            """SELECT exchange_segment, symbol, interval_minutes, count(*), sum(minutes_compared),
                      sum(minutes_differing), sum(missing_live), sum(missing_dhan),
                      (array_agg(detail ORDER BY session_date DESC)
                           FILTER (WHERE detail IS NOT NULL AND detail <> ''))[1]
                 FROM dhan_reconciliation WHERE session_date BETWEEN %s AND %s
                GROUP BY exchange_segment, symbol, interval_minutes
                ORDER BY symbol, exchange_segment, interval_minutes""", (first, last)).fetchall()
        dh["reconciliation"] = [
            {"instrument": f"{seg}:{sym}", "symbol": sym, "exchange_segment": seg, "interval_minutes": iv,
             "sessions": n, "minutes_compared": int(c), "minutes_differing": int(dif),
             "missing_live": int(ml), "missing_dhan": int(md), "detail": det}
            for seg, sym, iv, n, c, dif, ml, md, det in rec]

    # alerts
    for a in mem.get("alerts") or []:
        t = parse_aware(a.get("at"))
        if t is None or not (lo <= t < hi):
            continue
        f = feed(feed_of(a.get("key", "")))
        st = a.get("status")
        if st in ("firing", "resolved"):
            f["alerts"][st] += 1
        if a.get("key") not in f["alerts"]["keys"]:
            f["alerts"]["keys"].append(a.get("key"))

    # health
    hist = mem.get("scores") or {}
    for u in set(hist) | set(scores or {}):
        f = feed(feed_of(u))
        per_day = hist.get(u) or {}
        s = sum(v[0] for d, v in per_day.items() if d in days)
        n = sum(v[1] for d, v in per_day.items() if d in days)
        now_sc = (scores or {}).get(u)
        h = f["health"] = f["health"] or {}
        h.setdefault("units", {})[u] = {"mean": round(s / n, 1) if n else None, "runs": n,
                                        "now": now_sc.total if now_sc is not None else None}
    for f in feeds.values():
        f["units"].sort()
    return {"kind": kind, "first": first.isoformat(), "last": last.isoformat(),
            "feeds": [feeds[k] for k in sorted(feeds)], "notes": notes}


def _adjustments_text(adj: dict) -> list[str]:
    lines = [f"  adjustments found: {adj['found']}" + ("" if adj["found"] else " (Dhan's history unchanged)")]
    for e in adj["entries"]:
        what = (f"prices / {e['price_factor'] or '?'}, volume x {e['volume_factor'] or '?'}"
                if e["kind"] == "factor" else "no consistent factor")
        ver = f"version {e['stored_version']} kept" + (f", new version {e['new_version']}"
                                                       if e["new_version"] is not None else "")
        lines.append(f"    {e['instrument']} session {e['session_date']}: {e['kind']}, {what} "
                     f"({e['interval_minutes']}-minute candles, {e['candles_compared']} compared; {ver}), "
                     f"found {e['found_at']}")
    return lines


def _reconciliation_text(rec: list[dict]) -> list[str]:
    """Totals, then one line per instrument with a differing or missing minute
    (the --json output has every instrument)."""
    if not rec:
        return ["  reconciliation (live candles vs Dhan's): no session reconciled"]
    tot = {k: sum(r[k] for r in rec) for k in ("minutes_compared", "minutes_differing", "missing_live",
                                              "missing_dhan")}
    lines = [f"  reconciliation (live candles vs Dhan's): {len(rec)} instrument(s), "
             f"{tot['minutes_compared']:,} minutes compared, {tot['minutes_differing']:,} differing, "
             f"{tot['missing_live']:,} missing live, {tot['missing_dhan']:,} missing at Dhan"]
    agree = 0
    for r in rec:
        if not (r["minutes_differing"] or r["missing_live"] or r["missing_dhan"]):
            agree += 1
            continue
        iv = "" if r["interval_minutes"] == 1 else f" ({r['interval_minutes']}-minute)"
        lines.append(f"    {r['instrument']:<22}{iv} {r['sessions']} session(s): {r['minutes_compared']:,} compared, "
                     f"{r['minutes_differing']:,} differing, {r['missing_live']:,} missing live, "
                     f"{r['missing_dhan']:,} missing at Dhan" + (f"; {r['detail']}" if r["detail"] else ""))
    if agree:
        lines.append(f"    {agree} other instrument(s) agree on every compared minute")
    return lines


def report_text(doc: dict) -> list[str]:
    lines = [f"{doc['kind']} report {doc['first']}" + (f" .. {doc['last']}" if doc["last"] != doc["first"] else "")
             + " (UTC)"]
    for f in doc["feeds"]:
        lines.append("")
        lines.append(f"{f['feed']}" + (f" ({', '.join(f['units'])})" if f["units"] else ""))
        if f["rows"]:
            total = sum(f["rows"].values())
            lines.append(f"  rows stored: {total:,}" + (" (estimate)" if f["rows_estimated"] else "") + ": "
                         + ", ".join(f"{t} {n:,}" for t, n in f["rows"].items()))
        up = f["uptime"]
        lines.append("  uptime in session: " + (f"{up['percent']:.2f}% ({up['up_runs']} of {up['expected_runs']} "
                                                f"check runs)" if up else "no check run in session"))
        if f["gaps"]:
            lines.append("  gaps: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in f["gaps"].items()))
        if "adjustments" in f:
            lines += _adjustments_text(f["adjustments"])
        if "reconciliation" in f:
            lines += _reconciliation_text(f["reconciliation"])
        a = f["alerts"]
        lines.append(f"  alerts: {a['firing']} firing, {a['resolved']} resolved"
                     + (f" ({', '.join(a['keys'])})" if a["keys"] else ""))
        if f["health"]:
            for u, h in sorted(f["health"]["units"].items()):
                lines.append(f"  health {u}: mean {h['mean'] if h['mean'] is not None else '-'} over "
                             f"{h['runs']} check runs; now {h['now'] if h['now'] is not None else '-'}")
    for n in doc["notes"]:
        lines.append(f"note: {n}")
    return lines
