"""feeds.timetext: the UTC timestamp text of the tick tables."""
import time
from datetime import datetime, timedelta, timezone

from feeds import timetext as T

UTC = timezone.utc


def test_epoch_and_time_text_are_utc():
    assert T.epoch_text(1625461887) == "2021-07-05 05:11:27+00:00"
    assert T.epoch_text(0) == "1970-01-01 00:00:00+00:00"
    assert T.time_text(1625461887_123456_789) == "2021-07-05 05:11:27.123456+00:00"   # truncated, not rounded
    assert T.time_text(1625461887_000000_999) == "2021-07-05 05:11:27.000000+00:00"


def test_the_cache_is_emptied_not_grown_without_bound(monkeypatch):
    monkeypatch.setattr(T, "CACHE_SIZE", 3)
    monkeypatch.setattr(T, "_SECONDS", {})
    texts = [T.epoch_text(1_700_000_000 + i) for i in range(10)]
    assert len(T._SECONDS) <= 4
    assert texts == [datetime.fromtimestamp(1_700_000_000 + i, UTC).strftime("%Y-%m-%d %H:%M:%S+00:00")
                     for i in range(10)]


def test_now_text_is_the_wall_clock_to_the_microsecond():
    before = time.time_ns() // 1000
    t = T.now_text()
    after = time.time_ns() // 1000
    got = datetime.fromisoformat(t)
    assert len(t) == 32 and t.endswith("+00:00") and got.utcoffset() == timedelta(0)
    assert before <= (got - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) <= after, (before, t, after)
