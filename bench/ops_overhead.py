#!/usr/bin/env python3
"""Benchmark: what the metrics endpoint and the MQTT heartbeat cost the collectors.

Runs the Binance saturation benchmark (``bench/binance_collector.py``: 600
symbols, aggTrade + bookTicker, the simulator generating as fast as the
collector takes them) and the Kite benchmark (``bench/kite_collector.py``:
3,000 instruments in full mode, the simulator asked for more than the
collector can take) several times in one invocation, in two modes:

* ``off``: ``[metrics] port = 0`` and no ``[mqtt]`` section;
* ``on``: the metrics endpoint on a free loopback port, scraped every second
  by a thread of this program (HTTP GET /metrics, parsed with
  prometheus-client's ``text_string_to_metric_families``), and the MQTT
  heartbeat to a real mosquitto (``/usr/sbin/mosquitto``, started here on a
  free loopback port, anonymous, no persistence) every second
  (``[mqtt] interval = 1``: thirty times the default of 30 s) with a
  subscriber here counting the heartbeats that arrive (``--scrape-interval``
  and ``--mqtt-interval`` change both periods);
* with ``--modes``, also ``metrics`` (the endpoint and its scrapes only) and
  ``mqtt`` (the heartbeat only), to tell the two costs apart.

Each run is a fresh PostgreSQL cluster, simulator and collector, exactly as
the two benchmarks run them (their functions are called, with the extra TOML
sections appended to the collector's configuration).
The modes alternate in ABBA order (off on on off, then again; with more
modes off metrics mqtt mqtt metrics off) so that a machine drifting in one
direction weighs on every mode alike.

Prints a row per run (venue, mode, run, stored msg/s, collector CPU
seconds per million messages, scrapes that succeeded and failed,
heartbeats and offline messages received, seconds the run took, the
collector's exit status, the 1-minute load average at its end), then per
venue the median stored msg/s of each mode, the difference in percent and
PASS/FAIL against the target (``on`` stores less than 5% fewer messages per
second than ``off``), and the median collector CPU seconds per million
messages of each mode (``/proc``: every thread of the collector, the
metrics server and the MQTT client included), which a machine busy with
other work disturbs far less than the stored rate.  Also the load average
of the machine before and after.  Exit status 1 on FAIL.  With the
defaults a run takes about 8 minutes on 2 CPUs.

A scrape counts as failed only between the first and the last successful
scrape of a run: before the first the endpoint is not up yet, after the last
the collector is stopping.

Usage: bench/ops_overhead.py [--repeats 2] [--venues binance,kite] [--modes off,on]
                             [--scrape-interval 1] [--mqtt-interval 1]
                             [--symbols 600] [--binance-window 40]
                             [--instruments 3000] [--kite-rate 25] [--kite-window 30]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from procstats import free_port, stop_processes, wait_listening  # noqa: E402
import binance_collector  # noqa: E402
import kite_collector  # noqa: E402

MOSQUITTO = "/usr/sbin/mosquitto"
TARGET_PCT = 5.0
SCRAPE_INTERVAL = 1.0
MQTT_INTERVAL = 1.0

class Broker:
    """A mosquitto on a free loopback port, anonymous, nothing persisted."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        conf = tmp / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(tmp / "mosquitto.log", "w"))
        wait_listening(self.port)

    def close(self) -> None:
        stop_processes((self.proc,))


def _is_offline(payload: bytes) -> bool:
    """An offline message: JSON with ``"online": false`` (or a bare ``offline``)."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return payload.strip().lower() == b"offline"
    return isinstance(doc, dict) and doc.get("online") is False or doc == "offline"


class Heartbeats:
    """Subscribes to ``feeds/#`` on the broker and counts what arrives: heartbeats (the
    status messages) and offline messages (the last will, or the message of a clean stop)."""

    def __init__(self, port: int):
        import paho.mqtt.client as mqtt
        self.lock = threading.Lock()
        self.heartbeats = self.offline = 0
        self.topics: set[str] = set()
        self.last_payload = b""
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"ops-bench-{os.getpid()}")
        self.client.on_connect = lambda c, userdata, flags, rc, props: c.subscribe("feeds/#", qos=1)
        self.client.on_subscribe = lambda c, userdata, mid, rcs, props: self.subscribed.set()
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("the MQTT subscriber did not subscribe within 10 s")

    def _message(self, client, userdata, msg) -> None:
        with self.lock:
            self.topics.add(msg.topic)
            if _is_offline(msg.payload):
                self.offline += 1
            else:
                self.heartbeats += 1
                self.last_payload = msg.payload

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.heartbeats, self.offline

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Scraper(threading.Thread):
    """GET http://127.0.0.1:PORT/metrics every ``interval`` seconds and parse it as Prometheus
    would.  ``ok``: successful scrapes; ``failed``: failures between the first and the last
    success; ``families``/``samples``: of the last successful scrape."""

    def __init__(self, port: int, interval: float = SCRAPE_INTERVAL):
        super().__init__(daemon=True, name="scraper")
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.halt = threading.Event()
        self.ok = 0
        self.failed_since_ok = 0
        self.failed = 0
        self.families = self.samples = 0
        self.feeds_families = 0
        self.last_error = ""
        self.seconds = 0.0

    def run(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families
        due = time.monotonic()
        while not self.halt.is_set():
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    text = r.read().decode()
                fams = list(text_string_to_metric_families(text))
                self.families = len(fams)
                self.feeds_families = sum(f.name.startswith("feeds_") for f in fams)
                self.samples = sum(len(f.samples) for f in fams)
                self.seconds += time.perf_counter() - t0
                self.ok += 1
                self.failed += self.failed_since_ok
                self.failed_since_ok = 0
            except Exception as e:              # noqa: BLE001 - every failure is counted
                if self.ok:
                    self.failed_since_ok += 1
                    self.last_error = repr(e)
            due += self.interval
            self.halt.wait(max(0.0, due - time.monotonic()))

    def close(self) -> None:
        self.halt.set()
        self.join(10)


MODES = ("off", "on", "metrics", "mqtt")


def has_metrics(mode: str) -> bool:
    return mode in ("on", "metrics")


def has_mqtt(mode: str) -> bool:
    return mode in ("on", "mqtt")


def extra_toml(mode: str, broker: Broker, mqtt_interval: float) -> tuple[str, int]:
    """The sections appended to the collector's configuration for ``mode``; (text, metrics port or 0)."""
    port = free_port() if has_metrics(mode) else 0
    text = f'\n[metrics]\nport = {port}\naddress = "127.0.0.1"\n'
    if has_mqtt(mode):
        text += f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\ninterval = {mqtt_interval:g}\n'
    return text, port


def one_run(venue: str, mode: str, a, tmp: Path, broker: Broker, subscriber: Heartbeats) -> dict:
    text, mport = extra_toml(mode, broker, a.mqtt_interval)
    scraper = Scraper(mport, a.scrape_interval) if mport else None
    hb0 = subscriber.counts()
    if scraper:
        scraper.start()
    t0 = time.monotonic()
    try:
        if venue == "binance":
            r = binance_collector.saturation(a.symbols, a.binance_window, extra_toml=text)
        else:
            r = kite_collector.run(a.instruments, a.kite_rate, a.kite_window, "native", extra_toml=text)
    finally:
        if scraper:
            scraper.close()
    elapsed = time.monotonic() - t0
    if has_mqtt(mode):
        time.sleep(0.5)                         # the last heartbeat / offline in flight
    hb1 = subscriber.counts()
    mq = has_mqtt(mode)
    return {"venue": venue, "mode": mode, "rate": r["rate"], "cpu_per_m": r["cpu_per_m"], "rc": r["rc"],
            "window": r["window"], "elapsed": elapsed,
            "scrapes": scraper.ok if scraper else None, "failed": scraper.failed if scraper else None,
            "families": scraper.feeds_families if scraper else None,
            "samples": scraper.samples if scraper else None,
            "scrape_ms": scraper.seconds / scraper.ok * 1000 if scraper and scraper.ok else None,
            "scrape_error": scraper.last_error if scraper else "",
            "heartbeats": hb1[0] - hb0[0] if mq else None, "offline": hb1[1] - hb0[1] if mq else None,
            "load": os.getloadavg()[0]}


def ops_modules_missing() -> list[str]:
    sys.path.insert(0, str(ROOT / "lib"))
    missing = []
    for mod in ("feeds.ops.metrics", "feeds.ops.mqtt"):
        try:
            __import__(mod)
        except ImportError as e:
            missing.append(f"{mod} ({e})")
    return missing


def fmt(v, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mode per venue")
    ap.add_argument("--venues", default="binance,kite")
    ap.add_argument("--scrape-interval", type=float, default=SCRAPE_INTERVAL, help="seconds between scrapes")
    ap.add_argument("--mqtt-interval", type=float, default=MQTT_INTERVAL,
                    help="[mqtt] interval, seconds (the collectors' default is 30)")
    ap.add_argument("--modes", default="off,on",
                    help="off and any of on (metrics + MQTT), metrics (endpoint only), mqtt (heartbeat only)")
    ap.add_argument("--symbols", type=int, default=600, help="Binance symbols")
    ap.add_argument("--binance-window", type=float, default=40.0,
                    help="seconds measured per Binance run (after 15 s of warm-up)")
    ap.add_argument("--instruments", type=int, default=3000, help="Kite instruments")
    ap.add_argument("--kite-rate", type=float, default=25.0, help="ticks/s per instrument asked of the simulator")
    ap.add_argument("--kite-window", type=float, default=30.0,
                    help="seconds measured per Kite run (after 8 s of warm-up)")
    a = ap.parse_args()
    venues = [v.strip() for v in a.venues.split(",") if v.strip()]
    if set(venues) - {"binance", "kite"}:
        ap.error("--venues: binance and/or kite")
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if "off" not in modes or len(modes) < 2 or set(modes) - set(MODES) or len(set(modes)) != len(modes):
        ap.error("--modes: off and one or more of on, metrics, mqtt")
    missing = ops_modules_missing()
    if missing:
        raise SystemExit("cannot run the 'on' mode, missing: " + "; ".join(missing))
    if not Path(MOSQUITTO).exists():
        raise SystemExit(f"{MOSQUITTO} not found (Debian package mosquitto)")

    tmp = Path(tempfile.mkdtemp(prefix="feeds-bench-ops-"))

    order = []
    for i in range(a.repeats):
        order += modes if i % 2 == 0 else modes[::-1]
    load0 = os.getloadavg()
    print(f"metrics and MQTT overhead: {socket.gethostname()}, {os.cpu_count()} CPUs; "
          f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    print(f"off: [metrics] port = 0, no [mqtt].  on: /metrics scraped every {a.scrape_interval:g} s and parsed; "
          f"MQTT heartbeat every {a.mqtt_interval:g} s (default 30 s) to mosquitto on loopback, counted by a "
          f"subscriber.  Order per venue: {' '.join(order)}", flush=True)
    print(f"binance: saturation, {a.symbols} symbols, aggTrade + bookTicker, {a.binance_window:g} s window; "
          f"kite: {a.instruments} instruments full mode, simulator asked for {a.kite_rate:g}/s each, "
          f"{a.kite_window:g} s window", flush=True)

    broker = Broker(tmp)
    subscriber = Heartbeats(broker.port)
    results: list[dict] = []
    t_start = time.monotonic()
    head = (f"{'venue':8s} {'mode':7s} {'run':>3s} {'stored msg/s':>13s} {'CPU s/M':>8s} {'scrapes ok':>10s} "
            f"{'failed':>6s} {'heartbeats':>10s} {'offline':>7s} {'run s':>6s} {'exit':>4s} {'load1':>5s}")
    try:
        print(head, flush=True)
        for venue in venues:
            runs = dict.fromkeys(modes, 0)
            for mode in order:
                runs[mode] += 1
                r = one_run(venue, mode, a, tmp, broker, subscriber)
                r["run"] = runs[mode]
                results.append(r)
                print(f"{venue:8s} {mode:7s} {r['run']:>3d} {r['rate']:>13,.0f} {r['cpu_per_m']:>8.1f} "
                      f"{fmt(r['scrapes']):>10s} {fmt(r['failed']):>6s} {fmt(r['heartbeats']):>10s} "
                      f"{fmt(r['offline']):>7s} {r['elapsed']:>6.0f} {r['rc']:>4d} {r['load']:>5.2f}", flush=True)
    finally:
        subscriber.close()
        broker.close()
    load1 = os.getloadavg()

    print()
    ok_all = True
    for venue in venues:
        rs = [r for r in results if r["venue"] == venue]
        off = [r["rate"] for r in rs if r["mode"] == "off"]
        m_off = statistics.median(off)
        spread = (max(off) - min(off)) / m_off * 100 if len(off) > 1 else 0.0
        cpu_off = statistics.median(r["cpu_per_m"] for r in rs if r["mode"] == "off")
        print(f"{venue}: median stored msg/s off {m_off:,.0f} (spread of the off runs {spread:.1f}%); "
              f"collector CPU s per million messages off {cpu_off:.1f}")
        for mode in modes[1:]:
            mine = [r for r in rs if r["mode"] == mode]
            m_on = statistics.median(r["rate"] for r in mine)
            cpu_on = statistics.median(r["cpu_per_m"] for r in mine)
            diff = (m_on - m_off) / m_off * 100
            cpu_diff = (cpu_on - cpu_off) / cpu_off * 100
            scraped = not has_metrics(mode) or all(r["scrapes"] and r["families"] for r in mine)
            beat = not has_mqtt(mode) or all(r["heartbeats"] for r in mine)
            works = scraped and beat and all(r["rc"] == 0 for r in rs)
            line = f"  {mode}: median stored msg/s {m_on:,.0f}: {diff:+.1f}% vs off"
            if mode == "on":
                passed = -diff < TARGET_PCT and works
                ok_all &= passed
                line += f"  [{'PASS' if passed else 'FAIL'}; target: on at most {TARGET_PCT:g}% slower]"
            else:
                ok_all &= works
            print(line + ("" if scraped else "  NO SUCCESSFUL SCRAPE with feeds_ metrics in some run")
                  + ("" if beat else "  NO HEARTBEAT in some run"))
            print(f"    collector CPU s per million messages (all its threads) {cpu_on:.1f}: {cpu_diff:+.1f}% vs off "
                  f"[{'within' if cpu_diff < TARGET_PCT else 'OVER'} {TARGET_PCT:g}%: a CPU-bound collector "
                  f"would lose about as much msg/s]")
            for r in mine:
                parts = []
                if has_metrics(mode):
                    parts.append(f"{r['scrapes']} scrapes ({fmt(r['scrape_ms'], '.1f')} ms each GET + parse, "
                                 f"{r['families']} feeds_ families, {r['samples']} samples"
                                 f"{', last failure ' + r['scrape_error'] if r['failed'] else ''})")
                if has_mqtt(mode):
                    parts.append(f"{r['heartbeats']} heartbeats ({r['heartbeats'] / r['elapsed']:.2f}/s), "
                                 f"{r['offline']} offline")
                print(f"    run {r['run']} ({r['elapsed']:.0f} s): " + "; ".join(parts))
        if spread >= TARGET_PCT:
            print(f"  note: the off runs alone differ by {spread:.1f}%, more than the {TARGET_PCT:g}% target: "
                  f"the machine is noisy (other load, see load1); the CPU seconds per million messages "
                  f"compare the per-message cost more steadily")
    if subscriber.last_payload:
        print(f"last heartbeat payload ({len(subscriber.last_payload)} bytes): "
              f"{subscriber.last_payload[:300].decode(errors='replace')}")
    print(f"topics seen: {', '.join(sorted(subscriber.topics)) or '-'}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; total {time.monotonic() - t_start:.0f} s; "
          f"{'PASS' if ok_all else 'FAIL'}")
    sys.exit(0 if ok_all else 1)


if __name__ == "__main__":
    main()
