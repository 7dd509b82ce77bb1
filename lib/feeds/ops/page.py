"""The status page of ``feed-api`` (``GET /``): plain HTML with inline CSS and
server-drawn SVG charts; no script, nothing fetched from anywhere (the
``Content-Security-Policy`` of :data:`HEADERS` forbids it).  The page
reloads itself every minute (``<meta http-equiv="refresh">``).

:func:`render` takes the ``GET /status`` document and, per venue, the rows
stored per minute (``{minute epoch s: rows}``), and returns the page.
Every chart element carries ``data-*`` attributes (venue, number of
minutes with rows) so that a test can check it without reading pixels.
"""
from __future__ import annotations

import datetime as dt
import html
import math
from typing import Mapping

UTC = dt.timezone.utc

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

#: Line colour of each venue (colour-blind safe palette).
COLOURS = {"binance": "#e69f00", "kite": "#0072b2", "ibkr": "#009e73"}
_OTHER_COLOUR = "#cc79a7"

CSS = """
:root { color-scheme: light dark; --fg: #1d1d1f; --bg: #fafafa; --muted: #6b6b70; --line: #d9d9de;
        --card: #ffffff; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e8e8ea; --bg: #17171a; --muted: #9a9aa2; --line: #34343a; --card: #1f1f23; } }
* { box-sizing: border-box; }
body { margin: 0; padding: 1.2rem 1.6rem; font: 14px/1.4 system-ui, sans-serif; color: var(--fg);
       background: var(--bg); }
h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
h2 { font-size: 1.05rem; margin: 1.6rem 0 .5rem; }
.meta { color: var(--muted); margin-bottom: 1rem; }
.bad { color: #c0392b; font-weight: 600; }
table { border-collapse: collapse; width: 100%; background: var(--card); }
th, td { text-align: left; padding: .45rem .6rem; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; color: var(--muted); font-size: .85rem; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.unit { font-weight: 600; }
.status { color: var(--muted); font-size: .8rem; max-width: 40rem; overflow-wrap: anywhere; }
.score { display: inline-block; min-width: 2.6rem; text-align: center; padding: .1rem .4rem;
         border-radius: .3rem; font-weight: 700; color: #fff; }
.s-good { background: #2e8b57; } .s-warn { background: #d68910; } .s-bad { background: #c0392b; }
.s-none { background: #8e8e93; }
.parts { color: var(--muted); font-size: .75rem; }
.rates { font-size: .85rem; white-space: nowrap; }
svg text { fill: var(--muted); font-size: 11px; }
svg .grid { stroke: var(--line); stroke-width: 1; }
.legend span { margin-right: 1.2rem; white-space: nowrap; }
.legend i { display: inline-block; width: .9rem; height: .25rem; margin-right: .3rem; vertical-align: middle; }
.chart { background: var(--card); border: 1px solid var(--line); padding: .4rem; }
"""


def _e(s) -> str:
    return html.escape("" if s is None else str(s), quote=True)


def _fmt(n: float) -> str:
    """1234 -> "1.2k", 2500000 -> "2.5M"."""
    n = float(n)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suf}"
    return f"{n:.0f}" if n == int(n) else f"{n:.1f}"


def _nice_max(v: float) -> float:
    """The smallest 1, 2 or 5 x 10^k at or above ``v`` (1 for v <= 0)."""
    if v <= 0:
        return 1.0
    k = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 5, 10):
        if m * k >= v:
            return float(m * k)
    return float(10 * k)


def _age(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h {s % 3600 // 60}m"


def _score_class(total: int | None) -> str:
    if total is None:
        return "s-none"
    return "s-good" if total >= 80 else "s-warn" if total >= 60 else "s-bad"


def _minutes(now: dt.datetime, hours: int) -> list[int]:
    """Epoch seconds of every minute of the last ``hours`` (the current minute last)."""
    last = int(now.replace(second=0, microsecond=0).timestamp())
    return list(range(last - (hours * 60 - 1) * 60, last + 60, 60))


def _polyline(values: list[float], x0: float, y0: float, w: float, h: float, top: float) -> str:
    n = max(1, len(values) - 1)
    pts = []
    for i, v in enumerate(values):
        x = x0 + w * i / n
        y = y0 + h - (h * min(v, top) / top if top > 0 else 0)
        pts.append(f"{x:.1f},{y:.1f}")
    return " ".join(pts)


def _bucket(values: list[float], size: int) -> list[float]:
    return [sum(values[i:i + size]) / len(values[i:i + size]) for i in range(0, len(values), size)]


def chart_svg(series: Mapping[str, Mapping[int, float]], now: dt.datetime, hours: int = 24,
              width: int = 960, height: int = 260) -> str:
    """The main chart: rows stored per minute of each venue over the last ``hours``."""
    minutes = _minutes(now, hours)
    ml, mr, mt, mb = 56, 12, 12, 28
    w, h = width - ml - mr, height - mt - mb
    peak = max((v for s in series.values() for v in s.values()), default=0.0)
    top = _nice_max(peak)
    out = [f'<svg id="chart" class="chart" role="img" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" '
           f'aria-label="rows stored per minute, last {hours} hours">']
    for frac in (0.0, 0.5, 1.0):
        y = mt + h - h * frac
        out.append(f'<line class="grid" x1="{ml}" y1="{y:.1f}" x2="{ml + w}" y2="{y:.1f}"/>')
        out.append(f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(top * frac)}</text>')
    first = minutes[0]
    span = max(60, minutes[-1] - first)
    step = 3 if hours >= 12 else 1
    t = dt.datetime.fromtimestamp(first, UTC).replace(minute=0) + dt.timedelta(hours=1)
    while t.timestamp() <= minutes[-1]:
        if t.hour % step == 0:
            x = ml + w * (t.timestamp() - first) / span
            out.append(f'<line class="grid" x1="{x:.1f}" y1="{mt}" x2="{x:.1f}" y2="{mt + h}"/>')
            out.append(f'<text x="{x:.1f}" y="{height - 8}" text-anchor="middle">{t:%H:%M}</text>')
        t += dt.timedelta(hours=1)
    for venue in sorted(series):
        pts = series[venue]
        values = [float(pts.get(m, 0.0)) for m in minutes]
        with_rows = sum(1 for v in values if v > 0)
        if not with_rows:
            continue
        colour = COLOURS.get(venue, _OTHER_COLOUR)
        out.append(f'<polyline class="series" data-venue="{_e(venue)}" data-points="{with_rows}" '
                   f'fill="none" stroke="{colour}" stroke-width="1.5" stroke-linejoin="round" '
                   f'points="{_polyline(values, ml, mt, w, h, top)}"><title>{_e(venue)}: peak '
                   f'{_fmt(max(values))} rows/min</title></polyline>')
    out.append("</svg>")
    return "".join(out)


def sparkline_svg(points: Mapping[int, float], now: dt.datetime, hours: int = 24, venue: str = "",
                  width: int = 180, height: int = 34) -> str:
    """A small chart of one venue's rows per minute (5-minute averages)."""
    minutes = _minutes(now, hours)
    values = _bucket([float(points.get(m, 0.0)) for m in minutes], 5)
    with_rows = sum(1 for m in minutes if points.get(m, 0) > 0)
    top = _nice_max(max(values, default=0.0))
    colour = COLOURS.get(venue, _OTHER_COLOUR)
    line = ""
    if with_rows:
        line = (f'<polyline fill="none" stroke="{colour}" stroke-width="1.2" '
                f'points="{_polyline(values, 1, 2, width - 2, height - 4, top)}"/>')
    return (f'<svg class="spark" data-venue="{_e(venue)}" data-points="{with_rows}" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" '
            f'role="img" aria-label="rows per minute, last {hours} hours">'
            f'<line class="grid" x1="0" y1="{height - 2}" x2="{width}" y2="{height - 2}"/>{line}</svg>')


def _row(u: Mapping, series: Mapping[str, Mapping[int, float]], now: dt.datetime, hours: int) -> str:
    sd, hb, health = u.get("systemd"), u.get("heartbeat"), u.get("health")
    total = health["total"] if health else None
    parts = ", ".join(f"{k} {v}" for k, v in (health or {}).get("parts", {}).items())
    reasons = "; ".join((health or {}).get("reasons", []))
    active = f'{sd["active_state"]}/{sd["sub_state"]}' if sd else "unknown"
    active_cls = "" if not sd or sd["active_state"] in ("active", "inactive") else ' class="bad"'
    rates = " ".join(f"{_e(k)} {_fmt(v)}/s" for k, v in sorted((u.get("rates") or {}).items())) or "-"
    venue = u.get("venue") or ""
    pts = series.get(venue, {}) if venue else {}
    last_min = int(now.replace(second=0, microsecond=0).timestamp()) - 60
    per_min = _fmt(pts.get(last_min, 0.0)) if venue else "-"
    spark = sparkline_svg(pts, now, hours, venue) if venue else ""
    return (
        f'<tr class="feed" data-unit="{_e(u["unit"])}">'
        f'<td><div class="unit">{_e(u["unit"])}</div>'
        f'<div class="status">{_e(hb["status"]) if hb else "no heartbeat"}</div></td>'
        f'<td{active_cls}>{_e(active)}</td>'
        f'<td>{_e(hb["state"]) if hb else "-"}</td>'
        f'<td><span class="score {_score_class(total)}" title="{_e(reasons)}">'
        f'{"-" if total is None else total}</span><div class="parts">{_e(parts)}</div></td>'
        f'<td class="num">{_age(hb["age_s"]) if hb else "-"}</td>'
        f'<td class="rates">{rates}</td>'
        f'<td class="num">{per_min}</td>'
        f'<td>{spark}</td></tr>')


def render(status: Mapping, series: Mapping[str, Mapping[int, float]], *,
           estimated: Mapping[str, bool] | None = None, errors: Mapping[str, str] | None = None,
           hours: int = 24, host: str | None = None) -> str:
    """The whole page for the ``GET /status`` document ``status`` and the
    per-venue ``series`` (``{venue: {minute epoch s: rows}}``)."""
    import socket
    now = dt.datetime.fromisoformat(status["now"]) if status.get("now") else dt.datetime.now(UTC)
    units = status.get("units") or []
    host = host or socket.gethostname()
    problems = [f"{k}: {status.get(k)}" for k in ("database", "systemd") if status.get(k, "ok") != "ok"]
    rows = "".join(_row(u, series, now, hours) for u in units) or \
        '<tr><td colspan="8">no feed unit known to systemd and no heartbeat yet</td></tr>'
    legend = "".join(f'<span><i style="background:{COLOURS.get(v, _OTHER_COLOUR)}"></i>{_e(v)}'
                     f'{" (estimated)" if (estimated or {}).get(v) else ""}</span>'
                     for v in sorted(series) if any(x > 0 for x in series[v].values()))
    errs = "".join(f'<div class="bad">{_e(v)}: {_e(t)}</div>' for v, t in sorted((errors or {}).items()))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="60">
<link rel="icon" href="data:,">
<title>feeds on {_e(host)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>Feeds on {_e(host)}</h1>
<div class="meta">{len(units)} unit(s) &middot; {now.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC &middot;
reloads every minute{''.join(f' &middot; <span class="bad">{_e(p)}</span>' for p in problems)}</div>
<table id="feeds">
<thead><tr><th>unit</th><th>systemd</th><th>state</th><th>health</th><th>heartbeat</th>
<th>rates</th><th>rows last min</th><th>last {hours} h</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
<h2>Rows stored per minute, last {hours} hours (UTC)</h2>
<div class="legend">{legend or "no rows stored in this period"}</div>
{chart_svg(series, now, hours)}
{errs}
<p class="meta">Health 0-100: running 30, market-hours compliance 20, error rate 25, data freshness 15,
performance 10. Rows per minute are counted on each venue's tick tables by their time column; a large
table is sampled and its counts marked estimated. Control: POST /start, /stop, /restart with a bearer
token.</p>
</body>
</html>
"""
