"""The collector runtime: supervise loop, clean stop, exit status (fake sink, fake collectors)."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from datetime import datetime, timedelta, timezone

import pytest

from feeds import service
from feeds.sink import Table

TABLES = (Table("t", ("a",)),)


class Notes:
    def __init__(self):
        self.sent: list[str] = []

    def notify(self, m):
        self.sent.append(m)

    def status(self) -> list[str]:
        return [m[7:] for m in self.sent if m.startswith("STATUS=")]


class FakeSink:
    """Stands in for feeds.sink.Sink: records its arguments; ``commit(n)`` stores rows."""
    made: list["FakeSink"] = []
    close_ok = True

    def __init__(self, dsn, spool_dir, tables, *, on_commit=None, **kwargs):
        self.args = dict(dsn=dsn, spool_dir=spool_dir, tables=tuple(tables), **kwargs)
        self.pending = 0
        self.last_progress = time.monotonic()
        self.fatal = None
        self.spooling = False
        self.last_error = None
        self.closed = False
        self.started = False

        class Stats:
            commits = 0
            spooled_rows = 0
            replayed_rows = 0
            tables = {}
        self.stats = Stats()
        FakeSink.made.append(self)

    def start(self):
        self.started = True
        return self

    def commit(self, n: int) -> None:
        from feeds.sink import TableStats
        self.stats.commits += 1
        self.stats.tables.setdefault("t", TableStats()).stored += n
        self.last_progress = time.monotonic()

    def close(self, timeout=60.0):
        self.closed = True
        return self.close_ok

    def outcome(self):
        from feeds.sink import SinkOutcome
        n = sum(t.stored for t in self.stats.tables.values())
        lost = self.pending if self.closed and not self.close_ok else 0
        return SinkOutcome(committed=n, duplicates=0, spooled=0, replayed=0, rejected=0, lost=lost,
                           pending=self.pending)

    def status_reason(self):
        return None

    @property
    def unsettled(self):
        return self.pending

    held = None

    def writer_alive(self):
        return True


class Collector:
    """Ticks one stream and commits a row per step; stops on its own after
    ``periodic_calls`` status steps (or at ``stop``), returning ``rc``."""

    def __init__(self, svc: service.Service, rc=None, fail: Exception | None = None, periodic_calls: int = 3,
                 ends: bool = True):
        self.svc, self.rc, self.fail, self.want, self.ends = svc, rc, fail, periodic_calls, ends
        self.periodic_calls = 0
        self.stopped_by_signal = False

    async def run(self, stop):
        st = self.svc.health.stream("btcusdt@trade")
        while not stop.is_set():
            st.seen()
            if self.svc.sink is not None:
                self.svc.sink.commit(1)
            if self.fail is not None:
                raise self.fail
            if self.ends and self.periodic_calls >= self.want:
                break
            await asyncio.sleep(0.005)
        self.stopped_by_signal = stop.is_set()
        return self.rc

    def stream_kind(self, stream):
        return stream.split("@")[1]

    def figures(self):
        return {"gaps": 2, "reconnects": 0}

    def periodic(self):
        self.periodic_calls += 1


@pytest.fixture
def fake_sink(monkeypatch):
    FakeSink.made = []
    FakeSink.close_ok = True
    monkeypatch.setattr(service, "Sink", FakeSink)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    return FakeSink


def make(tmp_path, dsn="", **kw):
    notes = Notes()
    sk = {"spool_dir": str(tmp_path / "spool"), "flush_interval": 0.5, "batch_rows": 10, "max_pending": 99,
          "flow_timeout": 5.0, "statement_timeout": 3.0, "lock_timeout": 1.0, "spool_max_bytes": 1 << 20}
    svc = service.Service("feed-test.service", dsn, tables=TABLES, sink=sk, status_interval=0.05,
                          heartbeat_interval=0.02, notifier=notes, **kw)
    svc.watchdog_interval = 0.01
    beats: list[tuple[str, str]] = []
    svc.health.heartbeat = lambda dsn: beats.append((svc.health.state, svc.health.last_status))
    return svc, notes, beats


def test_supervise_loop_status_figures_periodic_and_clean_stop(tmp_path, fake_sink, caplog):
    caplog.set_level(logging.INFO)
    svc, notes, beats = make(tmp_path, dsn="dbname=x")
    made = []
    rc = svc.run(lambda s: made.append(Collector(s, rc=None)) or made[0])
    assert rc == 0
    sink = fake_sink.made[0]
    assert sink.started and sink.closed and sink.args["spool_dir"] == tmp_path / "spool"
    assert {k: v for k, v in sink.args.items() if k not in ("dsn", "spool_dir", "tables")} == dict(
        flush_interval=0.5, batch_rows=10, max_pending=99, statement_timeout=3.0, lock_timeout=1.0,
        spool_max_bytes=1 << 20)                                     # flow_timeout is the health's
    assert svc.health.flow_timeout == 5.0
    assert made[0].periodic_calls >= 3
    assert notes.sent.count("READY=1") == 1 and "WATCHDOG=1" in notes.sent
    assert notes.sent.index("READY=1") < notes.sent.index("WATCHDOG=1")
    status = notes.status()
    assert status and status[0].startswith("trade ") and "gaps 2" in status[0] and "reconnects" not in status[0]
    assert notes.sent[-1] == "STOPPING=1"
    lines = [r.getMessage() for r in caplog.records]
    assert sum(1 for ln in lines if ln.startswith("status: trade ")) >= 3
    stop = [ln for ln in lines if ln.startswith("stopped: ")]
    n = sum(t.stored for t in sink.stats.tables.values())
    assert stop == [f"stopped: all rows committed or spooled ({n:,} committed, 0 spooled, 0 rejected, 0 lost; "
                    f"0 pending at stop)"]
    assert beats[-1] == ("stopped", stop[0])                         # the final heartbeat row
    assert any(state == "running" and line.startswith("trade ") for state, line in beats[:-1])   # while running


def test_rows_lost_at_stop_make_a_non_zero_exit(tmp_path, fake_sink, caplog):
    fake_sink.close_ok = False
    svc, notes, beats = make(tmp_path, dsn="dbname=x")
    svc.health.sink = None

    def prepare(s):
        s.sink.pending = 7
        return Collector(s, rc=None)
    assert svc.run(prepare) == 1
    stop = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped: ")]
    assert len(stop) == 1 and stop[0].startswith("stopped: ROWS LOST (") and "7 lost; 7 pending at stop" in stop[0]
    assert beats[-1][0] == "failed"


def test_rows_the_sink_reports_lost_make_a_non_zero_exit_even_after_a_close(tmp_path, fake_sink, caplog):
    class Outcome:
        lost = 3

        def line(self):
            return "10 committed, 0 spooled, 0 rejected, 3 lost"
    svc, notes, beats = make(tmp_path)

    def prepare(s):
        s.sink.outcome = lambda: Outcome()
        return Collector(s, rc=None)
    assert svc.run(prepare) == 1
    assert "stopped: ROWS LOST (10 committed, 0 spooled, 0 rejected, 3 lost; 0 pending at stop)" in \
        [r.getMessage() for r in caplog.records]


def test_collector_exit_status_is_kept_when_every_row_is_stored(tmp_path, fake_sink):
    svc, notes, beats = make(tmp_path)
    assert svc.run(lambda s: Collector(s, rc=77)) == 77


def test_collector_failure_exits_1_after_a_clean_stop(tmp_path, fake_sink, caplog):
    svc, notes, beats = make(tmp_path, dsn="dbname=x")
    assert svc.run(lambda s: Collector(s, fail=RuntimeError("socket exploded"))) == 1
    assert fake_sink.made[0].closed and notes.sent[-1] == "STOPPING=1"
    assert any(r.levelno == logging.CRITICAL and "socket exploded" in r.getMessage() for r in caplog.records)
    assert beats[-1][0] == "failed"


def test_dead_sink_writer_stops_the_collector_and_fails(tmp_path, fake_sink):
    svc, notes, beats = make(tmp_path)
    made = []

    def prepare(s):
        s.sink.fatal = RuntimeError("writer died")
        made.append(Collector(s, rc=None, ends=False))
        return made[0]
    assert svc.run(prepare) == 1
    assert made[0].stopped_by_signal and svc.failure.startswith("sink writer failed")


def test_sigterm_is_a_clean_stop(tmp_path, fake_sink):
    svc, notes, beats = make(tmp_path)
    made = []

    def prepare(s):
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        made.append(Collector(s, rc=None, ends=False))
        return made[0]
    assert svc.run(prepare) == 0
    assert made[0].stopped_by_signal and fake_sink.made[0].closed


def test_job_without_sink_uses_its_own_status_line(tmp_path, monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notes = Notes()
    svc = service.Service("feed-job.service", "", status_interval=0.02, notifier=notes)
    svc.watchdog_interval = 0.01

    class Job(Collector):
        def status_line(self):
            return f"progress: step {self.periodic_calls}"
    assert svc.run(lambda s: Job(s, rc=None)) == 0
    assert svc.sink is None and notes.sent[0] == "READY=1"
    assert notes.status()[:2] == ["progress: step 0", "progress: step 1"]
    assert svc.health.last_status.startswith("progress: step ")


def test_wait_until_reports_ready_and_pings_until_the_time_or_a_stop(tmp_path, fake_sink):
    svc, notes, beats = make(tmp_path)
    results = []

    async def prepare(s):
        results.append(await s.wait_until(datetime.now(timezone.utc) + timedelta(seconds=0.3), "waiting: a"))
        asyncio.get_running_loop().call_later(0.05, s.stop.set)
        results.append(await s.wait_until(datetime.now(timezone.utc) + timedelta(days=1), "waiting: b"))
        return None                         # stopped while waiting: nothing collected
    assert svc.run(prepare) == 0
    assert results == [True, False]
    assert notes.sent[:2] == ["READY=1", "STATUS=waiting: a"] and "STATUS=waiting: b" in notes.sent
    assert notes.sent.count("WATCHDOG=1") >= 2 and notes.sent[-1] == "STOPPING=1"
    assert fake_sink.made[0].closed


def test_exit_notified(monkeypatch):
    sent = []
    monkeypatch.setattr(service, "notify", lambda *m: sent.extend(m))
    with pytest.raises(SystemExit) as e:
        service.exit_notified("no NSE session today: nothing to collect, exiting", 0)
    assert e.value.code == 0
    assert sent == ["READY=1", "STATUS=no NSE session today: nothing to collect, exiting", "STOPPING=1"]


def test_a_failing_supervise_loop_stops_the_collector_and_fails(tmp_path, fake_sink, caplog):
    """Nothing else feeds the watchdog: a fault in the loop itself must not
    leave the collector running unsupervised."""
    svc, notes, beats = make(tmp_path)
    made = []

    class Broken(Collector):
        def stream_kind(self, stream):
            raise KeyError(stream)

    def prepare(s):
        made.append(Broken(s, rc=None, ends=False))
        return made[0]
    assert svc.run(prepare) == 1
    assert made[0].stopped_by_signal and svc.failure.startswith("supervise loop failed")
