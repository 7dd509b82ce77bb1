"""Prometheus metrics end to end: the endpoint of the real collector programs (bin/feed-binance
against the Binance simulator, bin/feed-zerodha against the Kite simulator, storing into a
throwaway PostgreSQL), scraped over HTTP and parsed with prometheus_client's parser; the
textfiles of feed-backfill and feed-kite-token; the dashboard's queries in a real Prometheus
loaded with the shipped scrape configuration."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from urllib.parse import urlencode

import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector_process import CollectorProcess, collector_env, collectors_of, q, wait_for, write_config
from conftest import ROOT
from feeds.health import Health
from feeds.ops.metrics import MetricsEndpoint, dashboard_queries, job_values, write_textfile
from feeds.sim.binance import SimulatorThread
from feeds.sink import SinkStats, TableStats

pytestmark = pytest.mark.integration

UNIT = "feed-binance-metrics-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, host: str = "127.0.0.1") -> dict | None:
    """The families served on ``host:port`` by name, None when nothing answers."""
    try:
        body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    except (urllib.error.URLError, OSError):
        return None
    return {f.name: f for f in text_string_to_metric_families(body)}


def total(fams: dict | None, family: str, sample: str) -> float:
    if not fams or family not in fams:
        return 0.0
    return sum(s.value for s in fams[family].samples if s.name == sample)


def listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* lists them) of the sockets listening on ``port``."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            addr, _, p = f[1].rpartition(":")
            if f[3] == "0A" and int(p, 16) == port:
                out.append(addr)
    return out


class Binance(CollectorProcess):
    def __init__(self, tmp, dsn, sim, sections: dict):
        cfg = write_config(tmp / "binance.toml", {
            "binance": {"rest_url": sim.http_url, "ws_url": sim.ws_url, "streams": ["aggTrade", "bookTicker"],
                        "status_interval": 1.0},
            "sink": {"spool_dir": str(tmp / "spool"), "flush_interval": 0.5}, **sections})
        self.start([sys.executable, str(ROOT / "bin" / "feed-binance"), "--config", str(cfg), "--unit", UNIT],
                   collector_env(dsn))


@pytest.fixture
def collectors():
    yield from collectors_of(Binance)


def labels(fams: dict, family: str, label: str) -> set[str]:
    return {s.labels[label] for s in fams[family].samples if label in s.labels}


def test_feed_binance_serves_its_metrics_on_loopback(tmp_path, db, collectors):
    port = free_port()
    with SimulatorThread(symbols=4, rate=400, seed=3, streams=["aggTrade", "bookTicker"]) as sim:
        c = collectors(tmp_path, db, sim, {"metrics": {"port": port}})
        fams = wait_for(lambda: (lambda f: f if total(f, "feeds_messages", "feeds_messages_total") > 0
                                 and total(f, "feeds_rows_stored", "feeds_rows_stored_total") > 0 else None)(
            scrape(port)), 90, 0.5)
        assert fams, c.output[-3000:]
        # loopback only (metrics.address defaults to 127.0.0.1)
        assert listening(port) == ["0100007F"], listening(port)
        units = {s.labels.get("unit") for f in fams.values() if f.name.startswith("feeds_") for s in f.samples}
        assert units == {UNIT}
        assert labels(fams, "feeds_messages", "stream") == {"aggTrade", "bookTicker"}
        # every table of the sink is listed; rows stored in the two collected
        assert {"binance_agg_trade", "binance_book_ticker"} <= labels(fams, "feeds_rows_stored", "table")
        assert {s.labels["table"] for s in fams["feeds_rows_stored"].samples if s.value > 0} <= {
            "binance_agg_trade", "binance_book_ticker"}
        assert fams["feeds_messages"].type == "counter" and fams["feeds_lag_seconds"].type == "histogram"
        for family in ("feeds_rows_duplicate", "feeds_rows_rejected", "feeds_rows_spooled", "feeds_rows_replayed",
                       "feeds_rows_pending", "feeds_spool_bytes", "feeds_sink_outages", "feeds_malformed",
                       "feeds_last_message_age_seconds", "feeds_state", "feeds_process_start_time_seconds",
                       "feeds_health_score", "feeds_health_score_part", "process_resident_memory_bytes"):
            assert family in fams, family
        # the collector's figures, from its first status step on
        figures = ("feeds_gaps", "feeds_gap_rows_filled", "feeds_reconnects", "feeds_collector_figure")
        fams = wait_for(lambda: (lambda f: f if f and all(n in f for n in figures) else None)(scrape(port)), 60, 0.5)
        assert fams, c.output[-3000:]
        assert "gaps" in labels(fams, "feeds_collector_figure", "name")
        # the lag histogram counts stored rows
        assert wait_for(lambda: total(scrape(port), "feeds_lag_seconds", "feeds_lag_seconds_count") > 0, 60, 0.5)
        # once data flows and is stored: running, and the score judges it
        fams = wait_for(lambda: (lambda f: f if f and any(
            s.value == 1 and s.labels["state"] == "running" for s in f["feeds_state"].samples) else None)(
            scrape(port)), 60, 0.5)
        assert fams, c.output[-3000:]
        score = total(fams, "feeds_health_score", "feeds_health_score")
        parts = total(fams, "feeds_health_score_part", "feeds_health_score_part")
        assert 0 < score <= 100 and score == parts
        # the counters only grow, and match what the tables hold once stopped
        assert c.stop() == 0, c.output[-3000:]
    assert scrape(port) is None                          # the endpoint closed with the process
    stored = q(db, "select (select count(*) from binance_agg_trade) + (select count(*) from binance_book_ticker)")
    assert stored[0][0] > 0
    assert f"metrics endpoint on http://127.0.0.1:{port}/metrics" in c.output


def test_port_taken_is_one_error_line_and_collecting_goes_on(tmp_path, db, collectors):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with SimulatorThread(symbols=2, rate=200, seed=4, streams=["aggTrade"]) as sim:
            c = collectors(tmp_path, db, sim, {"metrics": {"port": port}})
            assert wait_for(lambda: q(db, "select count(*) from binance_agg_trade")[0][0] > 0, 90), c.output[-3000:]
            assert c.stop() == 0, c.output[-3000:]
    errors = [ln for ln in c.lines if "metrics endpoint not started" in ln]
    assert len(errors) == 1 and str(port) in errors[0], c.output[-3000:]


def test_feed_zerodha_serves_its_metrics(tmp_path, db):
    from test_kite_collector import Collector as Zerodha, sim_for
    port = free_port()
    made = []
    try:
        with sim_for(rate=4).running() as sim:
            c = Zerodha(tmp_path, db, sim, ["NSE:SIMEQ00001", "NSE:SIMEQ00002 quote", "NSE:RELIANCE ltp"],
                        sections={"metrics": {"port": port}})
            made.append(c)
            fams = wait_for(lambda: (lambda f: f if total(f, "feeds_messages", "feeds_messages_total") > 0
                                     and total(f, "feeds_rows_stored", "feeds_rows_stored_total") > 0 else None)(
                scrape(port)), 90, 0.5)
            assert fams, c.output[-3000:]
            assert listening(port) == ["0100007F"]
            assert {s.labels["unit"] for s in fams["feeds_messages"].samples} == {"feed-zerodha.service"}
            # the stream kinds are the modes and the connections' frames, never an instrument
            assert labels(fams, "feeds_messages", "stream") <= {"full", "quote", "ltp", "frames"}
            assert {"full", "frames"} <= labels(fams, "feeds_messages", "stream")
            assert "kite_tick_full" in labels(fams, "feeds_rows_stored", "table")
            assert "feeds_health_score" in fams
            # Kite's figures (connections, reconnects, silences...) from its first status step on
            fams = wait_for(lambda: (lambda f: f if f and "feeds_reconnects" in f else None)(scrape(port)), 60, 0.5)
            assert fams, c.output[-3000:]
            assert {"connections", "instruments", "silent"} <= labels(fams, "feeds_collector_figure", "name")
            assert c.stop() == 0, c.output[-3000:]
    finally:
        for c in made:
            c.kill()


# ---------------------------------------------------------------------- oneshot jobs: textfiles
def job_file(path) -> dict[str, float]:
    return {s.name[len("feeds_job_"):]: s.value for f in text_string_to_metric_families(path.read_text())
            for s in f.samples}


def test_feed_backfill_writes_its_textfile(tmp_path, db, monkeypatch):
    from click.testing import CliRunner

    from feeds.ibkr.main import main
    from feeds.sim.tws import TwsSimulatorThread
    from test_ibkr_backfill import sim_kw
    prom = tmp_path / "prom"
    prom.mkdir()
    with TwsSimulatorThread(**sim_kw(generate=("AAPL",))) as sim:
        (tmp_path / "contracts.csv").write_text("symbol,secType,exchange,currency,primaryExchange\n"
                                                "AAPL,STK,SMART,USD,NASDAQ\n")
        cfg = write_config(tmp_path / "ibkr.toml", {
            "ibkr": {"port": sim.port, "contracts_file": str(tmp_path / "contracts.csv"), "connect_timeout": 5},
            "backfill": {"pacing_scale": 0.001, "status_interval": 1, "reconnect_timeout": 5},
            "metrics": {"textfile_dir": str(prom)}})
        monkeypatch.setenv("FEEDS_DSN", db)
        r = CliRunner().invoke(main, ["--config", str(cfg), "--symbols", "AAPL", "--date", "2024-07-03"],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
    v = job_file(prom / "feeds_backfill.prom")
    assert v["last_exit_code"] == 0 and v["sessions_done"] == 1 and v["sessions_failed"] == 0
    assert v["bars_stored"] > 0 and v["bars_stored"] == q(db, "select count(*) from ibkr_bar_1min")[0][0]
    assert v["last_success_timestamp_seconds"] == v["last_run_timestamp_seconds"]
    assert v["last_run_duration_seconds"] >= 0
    success = v["last_success_timestamp_seconds"]
    # a run that cannot reach the database: exit 1, the last success kept
    monkeypatch.setenv("FEEDS_DSN", "host=127.0.0.1 port=1 dbname=none connect_timeout=2")
    r = CliRunner().invoke(main, ["--config", str(cfg), "--symbols", "AAPL", "--date", "2024-07-03"])
    assert r.exit_code == 1, r.output
    v = job_file(prom / "feeds_backfill.prom")
    assert v["last_exit_code"] == 1 and v["last_success_timestamp_seconds"] == success
    assert v["last_run_timestamp_seconds"] >= success and "bars_stored" not in v
    # --dry-run and --status write nothing
    before = (prom / "feeds_backfill.prom").read_text()
    monkeypatch.setenv("FEEDS_DSN", db)
    r = CliRunner().invoke(main, ["--config", str(cfg), "--status"], catch_exceptions=False)
    assert r.exit_code == 0 and (prom / "feeds_backfill.prom").read_text() == before


def test_feed_kite_token_writes_its_textfile(tmp_path):
    from feeds.kite.token import TokenStore
    from feeds.sim.kite import KiteSimulator
    from test_kite_login import Setup
    prom = tmp_path / "prom"
    prom.mkdir()
    with KiteSimulator(heartbeat_interval=0.5, min_nse_equities=100).running() as sim:
        s = Setup(tmp_path, sim)
        s.config.write_text(s.config.read_text().replace('[metrics]\ntextfile_dir = ""\n',
                                                         f'[metrics]\ntextfile_dir = "{prom}"\n'))
        r = s.run("--no-browser")
        assert r.returncode == 0, r.output[-3000:]
        tok = TokenStore(s.token_file).load()
        v = job_file(prom / "feeds_kite_token.prom")
        assert v["last_exit_code"] == 0
        assert v["token_expiry_timestamp_seconds"] == pytest.approx(tok.expires_at.timestamp())
        success = v["last_success_timestamp_seconds"]
        # --check writes nothing
        before = (prom / "feeds_kite_token.prom").read_text()
        assert s.run("--check").returncode == 0
        assert (prom / "feeds_kite_token.prom").read_text() == before
        # a refused login: exit 1, the last success and the stored token's expiry kept
        (tmp_path / "secrets" / "kite-password").write_text("wrong password\n")
        r = s.run("--no-browser", "--force")
        assert r.returncode == 1, r.output[-3000:]
        v = job_file(prom / "feeds_kite_token.prom")
        assert v["last_exit_code"] == 1 and v["last_success_timestamp_seconds"] == success
        assert v["token_expiry_timestamp_seconds"] == pytest.approx(tok.expires_at.timestamp())


# ---------------------------------------------------------------------- the dashboard against a real Prometheus
PROMETHEUS = "/usr/bin/prometheus"
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"


def test_dashboard_queries_run_in_prometheus_over_the_shipped_configuration(tmp_path):
    """The shipped scrape configuration, its targets moved to free ports, scraping a live
    endpoint and node_exporter's textfile collector: every dashboard query runs, and those of
    the textfiles and the endpoint's families return series."""
    yaml = pytest.importorskip("yaml")
    for exe in (PROMETHEUS, NODE_EXPORTER):
        if not os.access(exe, os.X_OK):
            pytest.skip(f"{exe} not installed (Debian packages prometheus, prometheus-node-exporter)")
    class Quiet:
        def notify(self, *a):
            pass

    h = Health("feed-binance.service", notifier=Quiet())
    h.stream("btcusdt@aggTrade").seen(5)
    h.state, h.figures = "running", {"gaps": 1, "gap_trades_filled": 3, "reconnects": 0}
    now = datetime.now(timezone.utc)
    h.on_commit(SimpleNamespace(time_index=0), [(now - timedelta(milliseconds=20),)] * 10, now)
    (tmp_path / "spool").mkdir()
    sink = SimpleNamespace(stats=SinkStats(tables={"binance_agg_trade": TableStats(5, 0, 0)}), pending=0,
                           spooling=False, spool=SimpleNamespace(dir=tmp_path / "spool"))
    svc = SimpleNamespace(unit="feed-binance.service", health=h, sink=sink, heartbeat_interval=10.0,
                          collector=SimpleNamespace(stream_kind=lambda n: n.split("@", 1)[1]))
    ep_port, node_port, prom_port = free_port(), free_port(), free_port()
    ep = MetricsEndpoint(svc.unit, "127.0.0.1", ep_port)
    ep.start(svc)
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    write_textfile(textfiles, "backfill", job_values(time.time() - 5, 0, bars_stored=10))
    write_textfile(textfiles, "kite_token", job_values(time.time() - 1, 0,
                                                       token_expiry_timestamp_seconds=time.time() + 3600))
    cfg = yaml.safe_load((ROOT / "etc" / "prometheus-feeds.yml").read_text())
    cfg["global"]["scrape_interval"] = "1s"
    for sc in cfg["scrape_configs"]:
        sc["scrape_interval"], sc["scrape_timeout"] = "1s", "1s"
        port = ep_port if sc["job_name"] == "feeds" else node_port
        sc["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    (tmp_path / "prometheus.yml").write_text(json.dumps(cfg))
    procs = []
    try:
        procs.append(subprocess.Popen([NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{node_port}",
                                       "--collector.disable-defaults", "--collector.textfile",
                                       f"--collector.textfile.directory={textfiles}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{prom_port}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))

        def query(expr: str) -> dict | None:
            url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urlencode({"query": expr})
            try:
                return json.loads(urllib.request.urlopen(url, timeout=5).read())
            except urllib.error.HTTPError as e:
                try:                        # a query error is JSON; "Service Unavailable" while starting is not
                    return json.loads(e.read())
                except ValueError:
                    return None
            except (urllib.error.URLError, OSError):
                return None

        def has(expr: str) -> bool:
            r = query(expr)
            return bool(r and r.get("status") == "success" and r["data"]["result"])

        # two scrapes of each target at least (rate() needs two samples)
        assert wait_for(lambda: has('count_over_time(up{job="feeds"}[1m]) >= 3')
                        and has('count_over_time(up{job="node"}[1m]) >= 3'), 60, 0.5), \
            procs[1].stderr.read() if procs[1].poll() is not None else "prometheus scraped nothing"
        assert has('up{job="feeds"} == 1') and has('up{job="node"} == 1')
        # the textfiles keep their own job label (honor_labels)
        assert has('feeds_job_last_exit_code{job="backfill"}')
        assert has('feeds_job_token_expiry_timestamp_seconds{job="kite_token"}')
        empty = []
        for expr in dashboard_queries(ROOT / "etc" / "grafana-feeds.json"):
            r = query(expr)
            assert r and r["status"] == "success", (expr, r)
            if not r["data"]["result"]:
                empty.append(expr)
        # and every one returns series
        assert not empty, empty
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        ep.stop(0)
