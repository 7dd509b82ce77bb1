"""READY / WATCHDOG rules: pings only while data flows and is stored."""
import time

from feeds.health import Health, LagHistogram


class Notifier:
    def __init__(self):
        self.sent = []

    def notify(self, m):
        self.sent.append(m)


class FakeSink:
    def __init__(self):
        self.pending = 0
        self.last_progress = time.monotonic()
        self.fatal = None
        self.spooling = False
        self.last_error = None

        class S:
            commits = 0
            spooled_rows = 0
            tables = {}
        self.stats = S()


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
