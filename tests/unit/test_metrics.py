"""feeds.ops.metrics: the collector's families read from a live Health and sink, the job
textfiles, the dashboard's queries and the shipped Prometheus configuration."""
from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import types
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT
from feeds.health import Health
from feeds.ops import healthscore
from feeds.ops.metrics import (LAG_BUCKETS, STATES, FeedCollector, MetricsEndpoint, dashboard_queries, family_of,
                               job_values, metric_names, render_textfile, substitute, write_textfile)
from feeds.sink import SinkStats, TableStats

UNIT = "feed-test.service"
PROMTOOL = Path("/usr/bin/promtool")
DASHBOARD = ROOT / "etc" / "grafana-feeds.json"
PROM_CONFIG = ROOT / "etc" / "prometheus-feeds.yml"


class NullNotifier:
    def notify(self, *a):
        pass


class Kinds:
    """A collector's ``stream_kind``: the part after the first ``@`` (Binance's names)."""

    def __init__(self):
        self.calls = 0

    def stream_kind(self, name: str) -> str:
        self.calls += 1
        return name.split("@", 1)[1]


class LagTable:
    time_index = 1


def fake_service(tmp_path: Path, *, collector=True, spooling=False) -> types.SimpleNamespace:
    h = Health(UNIT, notifier=NullNotifier())
    for sym in ("btcusdt", "ethusdt", "solusdt"):
        h.stream(f"{sym}@aggTrade").seen(10)
        h.stream(f"{sym}@bookTicker").seen(5)
    h.stream("xrpusdt@aggTrade")                    # never received anything
    h.malformed = 2
    h.state, h.ready = "running", True
    h.figures = {"gaps": 3, "gap_trades_filled": 120, "klines_filled": 7, "reconnects": 1, "ib errors": 0,
                 "rest_weight_1m": 40, "IB-TWS": "connectivity lost (1100)"}
    now = datetime.now(timezone.utc)
    rows = [(i, now - timedelta(milliseconds=ms)) for i, ms in enumerate([3] * 50 + [40] * 45 + [1500] * 5)]
    h.on_commit(LagTable, rows, now)
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "spool-000000000001.bin").write_bytes(b"x" * 1000)
    (spool / "spool-000000000002.bin").write_bytes(b"x" * 24)
    (spool / "spool-000000000003.1.corrupt").write_bytes(b"x" * 5000)      # not a segment waiting
    stats = SinkStats(tables={"binance_agg_trade": TableStats(30, 2, 1), "binance_book_ticker": TableStats(15, 0, 0)},
                      commits=4, spooled_rows=9, replayed_rows=6, outages=1)
    sink = types.SimpleNamespace(stats=stats, pending=11, spooling=spooling, spool=types.SimpleNamespace(dir=spool))
    h.sink = None                                   # judged by the fake's attributes only
    return types.SimpleNamespace(unit=UNIT, health=h, sink=sink, collector=Kinds() if collector else None,
                                 heartbeat_interval=10.0)


def scrape(svc, collector: FeedCollector | None = None) -> dict:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector or FeedCollector(svc))
    return {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}


def samples(fam, name=None) -> dict:
    return {tuple(sorted((k, v) for k, v in s.labels.items() if k != "unit")): s.value
            for s in fam.samples if name is None or s.name == name}


def test_collector_families_from_health_and_sink(tmp_path):
    fams = scrape(fake_service(tmp_path))
    for f in fams.values():
        assert all(s.labels["unit"] == UNIT for s in f.samples), f.name
    assert fams["feeds_messages"].type == "counter"
    assert samples(fams["feeds_messages"], "feeds_messages_total") == {
        (("stream", "aggTrade"),): 30.0, (("stream", "bookTicker"),): 15.0}
    assert samples(fams["feeds_streams"]) == {(("stream", "aggTrade"),): 4.0, (("stream", "bookTicker"),): 3.0}
    ages = samples(fams["feeds_last_message_age_seconds"])
    assert set(ages) == {(("stream", "aggTrade"),), (("stream", "bookTicker"),)}
    assert all(0 <= a < 60 for a in ages.values())
    assert samples(fams["feeds_malformed"], "feeds_malformed_total") == {(): 2.0}
    assert samples(fams["feeds_rows_stored"], "feeds_rows_stored_total") == {
        (("table", "binance_agg_trade"),): 30.0, (("table", "binance_book_ticker"),): 15.0}
    assert samples(fams["feeds_rows_duplicate"], "feeds_rows_duplicate_total")[(("table", "binance_agg_trade"),)] == 2
    assert samples(fams["feeds_rows_rejected"], "feeds_rows_rejected_total")[(("table", "binance_agg_trade"),)] == 1
    assert samples(fams["feeds_rows_spooled"], "feeds_rows_spooled_total") == {(): 9.0}
    assert samples(fams["feeds_rows_replayed"], "feeds_rows_replayed_total") == {(): 6.0}
    assert samples(fams["feeds_sink_outages"], "feeds_sink_outages_total") == {(): 1.0}
    assert samples(fams["feeds_sink_commits"], "feeds_sink_commits_total") == {(): 4.0}
    assert samples(fams["feeds_rows_pending"]) == {(): 11.0}
    assert samples(fams["feeds_spool_bytes"]) == {(): 1024.0}            # the .bin segments only
    assert samples(fams["feeds_spooling"]) == {(): 0.0}
    state = samples(fams["feeds_state"])
    assert set(state) == {(("state", s),) for s in STATES}
    assert {k[0][1] for k, v in state.items() if v == 1} == {"running"}
    assert samples(fams["feeds_ready"]) == {(): 1.0} and samples(fams["feeds_up"]) == {(): 1.0}
    start = samples(fams["feeds_process_start_time_seconds"])[()]
    assert abs(start - datetime.now(timezone.utc).timestamp()) < 3600
    # figures: their own counters, and every numeric one generically (the text one left out)
    assert samples(fams["feeds_gaps"], "feeds_gaps_total") == {(): 3.0}
    assert samples(fams["feeds_gap_rows_filled"], "feeds_gap_rows_filled_total") == {
        (("stream", "aggTrade"),): 120.0, (("stream", "kline"),): 7.0}
    assert samples(fams["feeds_reconnects"], "feeds_reconnects_total") == {(): 1.0}
    assert samples(fams["feeds_venue_errors"], "feeds_venue_errors_total") == {(): 0.0}
    assert samples(fams["feeds_collector_figure"]) == {
        (("name", "gaps"),): 3.0, (("name", "gap_trades_filled"),): 120.0, (("name", "klines_filled"),): 7.0,
        (("name", "reconnects"),): 1.0, (("name", "ib errors"),): 0.0, (("name", "rest_weight_1m"),): 40.0}


def test_lag_histogram_is_cumulative_in_seconds(tmp_path):
    fams = scrape(fake_service(tmp_path))
    lag = fams["feeds_lag_seconds"]
    assert lag.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in lag.samples if s.name == "feeds_lag_seconds_bucket"}
    assert list(buckets) == [str(b) for b in LAG_BUCKETS] + ["+Inf"]
    assert buckets["0.005"] == 50 and buckets["0.05"] == 95 and buckets["2.5"] == 100 and buckets["+Inf"] == 100
    values = list(buckets.values())
    assert values == sorted(values)
    count = next(s.value for s in lag.samples if s.name == "feeds_lag_seconds_count")
    total = next(s.value for s in lag.samples if s.name == "feeds_lag_seconds_sum")
    assert count == 100
    assert total == pytest.approx((50 * 3.5 + 45 * 40.5 + 5 * 1500.5) / 1000, abs=0.05)


def test_health_score_is_the_healthscore_of_the_live_measures(tmp_path):
    svc = fake_service(tmp_path)
    fams = scrape(svc)
    parts = {k[0][1]: v for k, v in samples(fams["feeds_health_score_part"]).items()}
    assert set(parts) == set(healthscore.MAX_POINTS)
    total = samples(fams["feeds_health_score"])[()]
    assert total == sum(parts.values())
    # 2 malformed + 1 rejected + 1 reconnect over 45 messages: the errors part loses everything
    assert parts["errors"] == 0 and parts["running"] == 30 and parts["freshness"] == 15
    # lag p99 1500 ms is under the 2000 ms target; not spooling: full performance
    assert parts["performance"] == 10
    want = healthscore.score(healthscore.Measures(
        unit_active=True, expected_running=True, in_session=True, heartbeat_age_s=0.0, messages=45, malformed=2,
        rejected_rows=1, errors=1, last_message_age_s=1.0, lag_p99_ms=1500.0))
    assert total == want.total


def test_spooling_costs_the_lag_points_and_waiting_is_outside_the_session(tmp_path):
    svc = fake_service(tmp_path, spooling=True)
    fams = scrape(svc)
    assert samples(fams["feeds_spooling"]) == {(): 1.0}
    parts = {k[0][1]: v for k, v in samples(fams["feeds_health_score_part"]).items()}
    assert parts["performance"] == 5
    svc.health.state = "waiting"
    for s in svc.health.streams.values():
        s.last = 0.0                                   # nothing received yet
    parts = {k[0][1]: v for k, v in samples(scrape(svc)["feeds_health_score_part"]).items()}
    assert parts["freshness"] == 15                   # not judged outside the session


def test_before_the_collector_exists_streams_are_left_out(tmp_path):
    svc = fake_service(tmp_path, collector=False)
    fams = scrape(svc)
    assert samples(fams["feeds_messages"], "feeds_messages_total") == {}
    assert samples(fams["feeds_rows_stored"], "feeds_rows_stored_total")          # the rest is there
    # the kind of each stream is asked once, then remembered
    svc.collector = Kinds()
    fc = FeedCollector(svc)
    scrape(svc, fc)
    fams = scrape(svc, fc)
    assert samples(fams["feeds_messages"], "feeds_messages_total")
    assert svc.collector.calls == len(svc.health.streams)


def test_without_sink_no_sink_families(tmp_path):
    svc = fake_service(tmp_path)
    svc.sink = None
    fams = scrape(svc)
    assert "feeds_rows_stored" not in fams and "feeds_spool_bytes" not in fams
    assert "feeds_health_score" in fams and "feeds_messages" in fams


def test_endpoint_serves_and_a_taken_port_is_one_error_line(tmp_path, caplog):
    svc = fake_service(tmp_path)
    ep = MetricsEndpoint(UNIT, "127.0.0.1", 0)
    ep.start(svc)
    try:
        port = ep.bound_port
        assert port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        names = {f.name for f in text_string_to_metric_families(body)}
        assert {"feeds_messages", "feeds_health_score", "process_resident_memory_bytes"} <= names
        ep.update()
        caplog.clear()
        other = MetricsEndpoint(UNIT, "127.0.0.1", port)
        with caplog.at_level(logging.INFO, logger="feeds.ops.metrics"):
            other.start(svc)                           # never raises
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and str(port) in errors[0].getMessage()
        assert other.bound_port is None
        other.stop(0)
    finally:
        ep.stop(0)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


# ---------------------------------------------------------------------- textfiles
def parse_textfile(path: Path) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(path.read_text()):
        assert fam.type == "gauge"
        for s in fam.samples:
            out[(s.name, s.labels["job"])] = s.value
    return out


def test_textfile_written_atomically_readable_and_parsed(tmp_path):
    p = write_textfile(tmp_path, "backfill", job_values(1000.0, 0, finished=1060.5, bars_stored=390,
                                                        sessions_done=1, ignored=None))
    assert p == tmp_path / "feeds_backfill.prom"
    assert stat.S_IMODE(p.stat().st_mode) == 0o644        # node_exporter runs as another user
    assert sorted(os.listdir(tmp_path)) == ["feeds_backfill.prom"]       # no temporary left
    assert parse_textfile(p) == {
        ("feeds_job_last_run_timestamp_seconds", "backfill"): 1060.5,
        ("feeds_job_last_success_timestamp_seconds", "backfill"): 1060.5,
        ("feeds_job_last_run_duration_seconds", "backfill"): 60.5,
        ("feeds_job_last_exit_code", "backfill"): 0.0,
        ("feeds_job_bars_stored", "backfill"): 390.0,
        ("feeds_job_sessions_done", "backfill"): 1.0,
    }


def test_failed_run_keeps_the_last_success(tmp_path):
    write_textfile(tmp_path, "maintain", job_values(1000.0, 0, finished=1010.0))
    p = write_textfile(tmp_path, "maintain", job_values(2000.0, 1, finished=2030.0))
    v = parse_textfile(p)
    assert v[("feeds_job_last_exit_code", "maintain")] == 1
    assert v[("feeds_job_last_run_timestamp_seconds", "maintain")] == 2030.0
    assert v[("feeds_job_last_success_timestamp_seconds", "maintain")] == 1010.0
    # a failure with no previous success has no success time at all
    p = write_textfile(tmp_path, "other", job_values(0.0, 2, finished=5.0))
    assert ("feeds_job_last_success_timestamp_seconds", "other") not in parse_textfile(p)
    # a success replaces it
    p = write_textfile(tmp_path, "maintain", job_values(3000.0, 0, finished=3001.0))
    assert parse_textfile(p)[("feeds_job_last_success_timestamp_seconds", "maintain")] == 3001.0


def test_textfile_previous_content_unreadable_is_ignored(tmp_path):
    (tmp_path / "feeds_x.prom").write_text("not { prometheus text\n")
    p = write_textfile(tmp_path, "x", job_values(0.0, 1, finished=1.0))
    assert ("feeds_job_last_exit_code", "x") in parse_textfile(p)


def test_textfile_empty_directory_and_errors(tmp_path, caplog):
    assert write_textfile("", "backfill", {"last_exit_code": 0}) is None
    assert write_textfile(None, "backfill", {"last_exit_code": 0}) is None
    with caplog.at_level(logging.ERROR, logger="feeds.ops.metrics"):
        assert write_textfile(tmp_path / "missing", "backfill", {"last_exit_code": 0}) is None
    assert len(caplog.records) == 1 and "feeds_backfill.prom" in caplog.records[0].getMessage()
    with pytest.raises(ValueError):
        write_textfile(tmp_path, "bad job", {"last_exit_code": 0})
    with pytest.raises(ValueError):
        render_textfile("x", {"bad-key": 1})
    with pytest.raises(ValueError):
        render_textfile("x", {"key": "text"})


def test_textfile_unwritable_directory_is_logged(open_tmp):
    from conftest import as_unprivileged
    d = open_tmp / "ro"
    d.mkdir(mode=0o755)                          # root's: the unprivileged child may not write in it

    def check():
        records = []
        handler = logging.Handler(logging.ERROR)
        handler.emit = records.append
        logging.getLogger("feeds.ops.metrics").addHandler(handler)
        assert write_textfile(d, "backfill", {"last_exit_code": 0}) is None
        assert records and "backfill" in records[0].getMessage()
    assert as_unprivileged(check) == 0
    assert list(d.iterdir()) == []


# ---------------------------------------------------------------------- dashboard and Prometheus configuration
def exported_families(tmp_path) -> set[str]:
    names = set(scrape(fake_service(tmp_path)))
    for key in job_values(0.0, 0, finished=1.0, token_expiry_timestamp_seconds=2.0):
        names.add(f"feeds_job_{key}")
    return names


def test_substitute_variables():
    assert substitute('rate(x{unit=~"$unit"}[$__rate_interval])') == 'rate(x{unit=~".+"}[1m])'
    assert substitute('x{unit=~"${unit}", a=~"[[a]]", b=~"${b:regex}"}') == 'x{unit=~".+", a=~".+", b=~".+"}'


def test_dashboard_queries_cover_every_panel_and_only_exported_metrics(tmp_path):
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    queries = dashboard_queries(DASHBOARD)
    assert len(queries) == len(exprs) > 10
    assert all("$" not in q and "[[" not in q for q in queries)
    exported = exported_families(tmp_path)
    for q in queries:
        used = metric_names(q)
        assert used, q
        unknown = {n for n in used if family_of(n) not in exported}
        assert not unknown, (q, unknown)
    # what the issue asks to see, per feed
    text = "\n".join(queries)
    for needle in ("feeds_health_score", "rate(feeds_messages_total", "histogram_quantile(0.99",
                   "feeds_gaps_total", "feeds_gap_rows_filled_total", "feeds_spool_bytes", "feeds_job_last_exit_code"):
        assert needle in text, needle
    # one row per unit: a repeated row over the unit variable
    rows = [p for p in doc["panels"] if p["type"] == "row"]
    assert any(r.get("repeat") == "unit" for r in rows)
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["unit"]["query"]["query"] == "label_values(feeds_up, unit)"
    assert doc["schemaVersion"] == 38
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_parse_as_promql(tmp_path):
    if not PROMTOOL.exists():
        pytest.skip(f"{PROMTOOL} not installed (Debian package prometheus)")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(dashboard_queries(DASHBOARD))]}]}
    f = tmp_path / "rules.yml"
    f.write_text(json.dumps(rules))                  # JSON is YAML
    r = subprocess.run([str(PROMTOOL), "check", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_configuration_loads():
    if not PROMTOOL.exists():
        pytest.skip(f"{PROMTOOL} not installed (Debian package prometheus)")
    r = subprocess.run([str(PROMTOOL), "check", "config", str(PROM_CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = PROM_CONFIG.read_text()
    from feeds.settings import SCHEMAS
    ports = {sc.default("metrics.port") for sc in SCHEMAS.values() if sc.setting("metrics.port")} - {0}
    assert ports >= {9810, 9820, 9830, 9840, 9850}          # every long-running program's endpoint
    for target in [f"127.0.0.1:{p}" for p in sorted(ports)] + ["127.0.0.1:9100"]:
        assert f'"{target}"' in text, target
    assert "honor_labels: true" in text
