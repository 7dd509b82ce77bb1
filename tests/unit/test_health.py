"""READY / WATCHDOG rules: pings only while data flows and is stored."""
import time

from feeds.health import Health, LagHistogram


class Notifier:
    def __init__(self):
        self.sent = []

    def notify(self, m):
        self.sent.append(m)


class FakeSink:
    @property
    def unsettled(self):
        return self.pending

    def __init__(self):
        self.pending = 0
        self.last_progress = time.monotonic()
        self.fatal = None
        self.spooling = False
        self.last_error = None
        self.reason = None
        self.held = None

        class S:
            commits = 0
            spooled_rows = 0
            tables = {}
        self.stats = S()

    def status_reason(self):
        return self.reason


def make():
    n, s = Notifier(), FakeSink()
    return Health(unit="u", sink=s, flow_timeout=5.0, notifier=n), n, s


def test_no_ready_before_first_batch_stored_then_ready_once():
    h, n, s = make()
    h.stream("a@aggTrade").last = time.monotonic()
    h.tick()
    assert "READY=1" not in n.sent and "WATCHDOG=1" not in n.sent
    s.stats.commits = 1
    h.tick(); h.tick()
    assert n.sent.count("READY=1") == 1 and n.sent.count("WATCHDOG=1") == 2


def test_ready_when_first_batch_spooled_because_database_is_down():
    h, n, s = make()
    h.stream("a@aggTrade").last = time.monotonic()
    s.stats.spooled_rows = 10
    s.spooling = True
    assert h.tick() and "READY=1" in n.sent and "WATCHDOG=1" in n.sent
    assert h.state == "spooling"


def test_silent_streams_stop_the_watchdog():
    h, n, s = make()
    s.stats.commits = 1
    st = h.stream("a@aggTrade")
    st.last = time.monotonic() - 6.0          # older than flow_timeout
    assert not h.tick()
    assert "WATCHDOG=1" not in n.sent and h.state == "degraded"
    st.last = time.monotonic()
    assert h.tick() and "WATCHDOG=1" in n.sent


def test_stuck_writer_stops_the_watchdog_even_while_messages_arrive():
    h, n, s = make()
    s.stats.commits = 1
    h.stream("a@aggTrade").last = time.monotonic()
    s.pending = 5000
    s.last_progress = time.monotonic() - 6.0
    assert not h.tick() and "WATCHDOG=1" not in n.sent
    s.fatal = RuntimeError("writer died")
    s.last_progress = time.monotonic()
    assert not h.tick()


def test_status_line_has_per_kind_rates_ages_and_lag():
    h, n, s = make()
    for name in ("a@aggTrade", "b@aggTrade", "a@bookTicker"):
        st = h.stream(name)
        st.window_count = 10
        st.last = time.monotonic()
    h.lag_window.counts[40] += 99
    h.lag_window.counts[300] += 1
    h.lag_window.n = 100
    line = h.status_line(lambda name: name.split("@")[1])
    assert line.startswith("aggTrade ") and "bookTicker" in line and "lag p50 40ms p99 40ms" in line
    assert n.sent[-1] == "STATUS=" + line


def test_lag_histogram_percentiles_from_text_and_datetime():
    from datetime import datetime, timedelta, timezone
    h = LagHistogram()
    now = datetime.now(timezone.utc)
    rows = [((now - timedelta(milliseconds=ms)).isoformat(),) for ms in range(1, 101)]
    h.add_rows(rows, 0, now)
    assert 49 <= h.percentile(50) <= 51 and 98 <= h.percentile(99) <= 100


def test_seen_counts_messages_now():
    h, n, s = make()
    st = h.stream("a@aggTrade")
    before = time.monotonic()
    st.seen()
    st.seen(3)
    assert (st.count, st.window_count) == (4, 4) and st.last >= before
    assert h.stream("a@aggTrade") is st


def test_malformed_inputs_counted_and_their_lines_throttled(monkeypatch, caplog):
    import logging
    from feeds import health as H
    clock = [1000.0]
    monkeypatch.setattr(H.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.WARNING, logger="feeds.health")
    h, n, s = make()
    for i in range(25):
        assert h.count_malformed("btcusdt@aggTrade", f"price not a decimal string ({i})") == i + 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 20 and h.malformed == 25
    assert lines[0] == "malformed input from btcusdt@aggTrade skipped (1 so far): price not a decimal string (0)"
    clock[0] += 61.0                                   # a minute later: the five not logged are summarised
    h.tick()
    assert caplog.records[-1].getMessage() == ("5 more malformed input(s) in the last minute not logged one by one "
                                               "(25 so far)")
    h.tick()
    assert len(caplog.records) == 21                    # once
    h.count_malformed("btcusdt@aggTrade", "again")      # a new minute: logged
    assert caplog.records[-1].getMessage().endswith("(26 so far): again")
    assert "malformed 26" in h.status_line(lambda name: name)


def test_figures_and_status_notes():
    h, n, s = make()
    h.notify_status("waiting for exchangeInfo")
    assert n.sent == ["STATUS=waiting for exchangeInfo"] and h.last_status == "waiting for exchangeInfo"
    h.set_figures({"gaps": 1234, "reconnects": 0, "ids_held": 2.5})
    line = h.status_line(lambda name: name)
    assert "gaps 1,234" in line and "ids_held 2.5" in line and "reconnects" not in line
    s.reason = "BACK-PRESSURE: spool write failed: No space left on device"
    assert "BACK-PRESSURE: spool write failed" in h.status_line(lambda name: name)
    h.set_figures({"gaps": 1})
    assert h.figures == {"gaps": 1}


def test_job_without_sink_or_streams_is_ready_and_healthy():
    n = Notifier()
    h = Health(unit="feed-backfill.service", notifier=n)
    assert h.tick() and n.sent == ["READY=1", "WATCHDOG=1"] and h.state == "running"


def test_watchdog_fed_while_back_pressure_blocks_the_producer(tmp_path):
    """Database down and spool full: add() blocks (back-pressure) and the event
    loop with it.  The sink's wait hook keeps WATCHDOG=1 going while its writer
    is alive and holds the rows, so systemd does not kill the process and lose
    them; no row is dropped."""
    import socket
    import threading

    from feeds.sink import Sink, Table

    with socket.socket() as s:                      # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    table = Table("t", ("a",))
    sink = Sink(f"host=127.0.0.1 port={port} dbname=x user=x connect_timeout=1", tmp_path, [table],
                max_pending=50, flush_interval=0.01, retry_interval=0.2, spool_max_bytes=1,
                statement_timeout=0).start()
    n = Notifier()
    h = Health(unit="u", notifier=n, flow_timeout=0.5)
    h.attach(sink)
    h.ready = True
    done = threading.Event()

    def produce():
        try:
            for i in range(200):
                sink.add("t", (i,))
        except RuntimeError:                            # the sink closed under it at the end of the test
            return
        done.set()

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
                sink.held and time.monotonic() - sink.last_progress > 2 * h.flow_timeout):
            time.sleep(0.1)
        assert sink.held and "spool" in sink.held, sink.status_reason()
        mark = n.sent.count("WATCHDOG=1")               # storage made no progress for a while now
        while time.monotonic() < deadline and n.sent.count("WATCHDOG=1") < mark + 3:
            time.sleep(0.1)
        assert not done.is_set()                        # the producer is held, not its rows dropped
        assert n.sent.count("WATCHDOG=1") >= mark + 3
        assert h.storing() and sink.writer_alive()
        assert sink.pending + sink.outcome().pending >= 50
    finally:
        sink.close(0.5)
    out = sink.outcome()
    assert out.committed == 0 and out.spooled == 0 and out.rejected == 0
    assert out.lost > 0                                  # counted, never silent


def test_no_watchdog_from_the_wait_hook_once_the_writer_is_dead():
    class S(FakeSink):
        held = "spool full"

        def writer_alive(self):
            return False
    n = Notifier()
    h = Health(unit="u", notifier=n, flow_timeout=0.5)
    h.sink = s = S()
    s.pending, s.last_progress = 10, time.monotonic() - 60
    h.ready = True
    h.sink_waiting()
    assert "WATCHDOG=1" not in n.sent


def test_lag_percentile_is_the_first_millisecond_reaching_the_share_of_values():
    import random
    from feeds.health import LagHistogram
    rnd = random.Random(7)
    h = LagHistogram()
    values = [rnd.choice((rnd.randint(0, 40), rnd.randint(0, 5000), 70_000)) for _ in range(5000)]
    for v in values:
        h.counts[min(v, h.LIMIT_MS)] += 1
    h.n = len(values)
    ordered = sorted(min(v, h.LIMIT_MS) for v in values)
    for p in (1, 50, 90, 99, 99.9, 100):
        k = max(1, -(-len(values) * p // 100))            # the smallest count reaching p %
        assert h.percentile(p) == float(ordered[int(k) - 1]), p
    assert LagHistogram().percentile(99) is None
