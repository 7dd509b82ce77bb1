"""The shared sink against a real PostgreSQL: COPY, de-duplication, spool and replay."""
import time
from datetime import datetime, timedelta, timezone

import psycopg

from feeds.binance import adapter as A
from feeds.sink import Sink, Spool

T0 = datetime(2021, 7, 22, 10, 0, tzinfo=timezone.utc)


def agg(i, symbol="BTCUSDT", t=T0):
    ts = t + timedelta(milliseconds=i)
    return (symbol, i, f"{30000 + i}.10", "0.001", i * 2, i * 2 + 1, ts, i % 2 == 0, ts, ts)


def count(dsn, sql="SELECT count(*), count(DISTINCT agg_id) FROM binance_agg_trade"):
    with psycopg.connect(dsn) as c:
        return c.execute(sql).fetchone()


def wait_for(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_rows_stored_exactly_with_partitions_created_on_demand(db, tmp_path):
    sink = Sink(db, tmp_path, A.TABLES).start()
    rows = [agg(i) for i in range(1, 1001)]
    sink.add_many("binance_agg_trade", rows)
    assert sink.flush(10)
    assert sink.close()
    with psycopg.connect(db) as c:
        got = c.execute("SELECT symbol, agg_id, price::text, qty::text, trade_time FROM binance_agg_trade "
                        "ORDER BY agg_id").fetchall()
        parts = c.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'binance_agg_trade'::regclass "
                          "AND inhrelid::regclass::text = 'binance_agg_trade_p20210722'").fetchone()[0]
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in got] == [(r[0], r[1], r[2], r[3], r[6]) for r in rows]
    assert parts == 1
    assert sink.stats.tables["binance_agg_trade"].stored == 1000


def test_duplicates_never_written_and_new_rows_of_the_batch_kept(db, tmp_path):
    sink = Sink(db, tmp_path, A.TABLES).start()
    sink.add_many("binance_agg_trade", [agg(i) for i in range(1, 501)])
    assert sink.flush(10)
    # overlapping batch (a gap fill racing live data): 250 old ids + 250 new ones
    sink.add_many("binance_agg_trade", [agg(i) for i in range(251, 751)])
    assert sink.flush(10)
    sink.close()
    assert count(db) == (750, 750)
    st = sink.stats.tables["binance_agg_trade"]
    assert st.stored == 750 and st.duplicates == 250


def test_rows_are_committed_by_the_writer_on_its_own(db, tmp_path):
    """The writer commits a lone row when its flush interval is up: no flush(),
    no close(), no further rows needed."""
    sink = Sink(db, tmp_path, A.TABLES, flush_interval=0.2).start()
    sink.add("binance_agg_trade", agg(1))
    assert wait_for(lambda: count(db)[0] == 1, 60)
    assert sink.stats.commits == 1 and sink.pending == 0
    sink.close()


def test_bad_value_is_rejected_to_file_and_the_rest_stored(db, tmp_path):
    sink = Sink(db, tmp_path, A.TABLES).start()
    rows = [agg(i) for i in range(1, 11)]
    bad = list(rows[4])
    bad[2] = "12.3.4"          # not a number: PostgreSQL refuses it
    rows[4] = tuple(bad)
    sink.add_many("binance_agg_trade", rows)
    assert sink.flush(10)
    sink.close()
    assert count(db) == (9, 9)
    assert sink.stats.tables["binance_agg_trade"].rejected == 1
    assert "12.3.4" in (tmp_path / "rejects.jsonl").read_text()


def test_outage_spools_then_replays_in_order_without_loss_or_duplicates(pg, db, tmp_path):
    sink = Sink(db, tmp_path, A.TABLES, retry_interval=0.5).start()
    sink.add_many("binance_agg_trade", [agg(i) for i in range(1, 101)])
    assert sink.flush(10)
    pg.stop("fast")
    try:
        for i in range(101, 3101):
            sink.add("binance_agg_trade", agg(i))
            if i % 500 == 0:
                time.sleep(0.3)
        assert sink.flush(20) and sink.spooling
        assert sink.stats.spooled_rows == 3000
        assert Spool(tmp_path).has_data()
    finally:
        pg.start()
    assert wait_for(lambda: not Spool(tmp_path).has_data() and not sink.spooling, 30)
    sink.add_many("binance_agg_trade", [agg(i) for i in range(3101, 3201)])
    assert sink.flush(10)
    sink.close()
    assert count(db) == (3200, 3200)
    assert sink.stats.replayed_rows == 3000


def test_spool_left_by_a_killed_process_is_replayed_at_start(db, tmp_path):
    sp = Spool(tmp_path)
    sp.append({"binance_agg_trade": [agg(i) for i in range(1, 51)]})
    sp.append({"binance_agg_trade": [agg(i) for i in range(40, 81)]})   # overlap: replay must de-duplicate
    sp._close()
    # a torn record at the tail, as a kill -9 mid-write leaves it
    with open(sp.segments()[-1], "ab") as f:
        f.write(b"\x00\x00\x10\x00garbage")
    sink = Sink(db, tmp_path, A.TABLES).start()
    assert wait_for(lambda: not Spool(tmp_path).has_data(), 10)
    sink.close()
    assert count(db) == (80, 80)
    assert list(tmp_path.glob("*.corrupt"))


def test_add_blocks_at_max_pending_instead_of_dropping(db, tmp_path):
    """A slow database makes add() wait (back-pressure); nothing is dropped."""
    sink = Sink(db, tmp_path, A.TABLES, max_pending=100, flush_interval=0.01)
    real_write = sink._write

    def slow_write(batch, safe=False):
        time.sleep(0.05)
        return real_write(batch, safe)
    sink._write = slow_write
    sink.start()
    peak = 0
    for i in range(1, 2001):
        sink.add("binance_agg_trade", agg(i))
        peak = max(peak, sink.pending)
    assert sink.flush(60)
    sink.close()
    assert peak <= 100                      # never more than max_pending waiting
    # the producer was held back: no batch can exceed max_pending rows, so the
    # 2,000 rows took at least 20 commits (unheld, they would fit in one or two)
    assert sink.stats.commits >= 2000 // 100
    assert count(db) == (2000, 2000)
