"""Database roles (sql/0005_roles.sql) against a real PostgreSQL.

Each collector role logs in as itself and runs the statements its program runs
(the sink's COPY, its TEMP staging table and INSERT ... ON CONFLICT DO NOTHING,
daily partitions on demand through feeds_ensure_day_partitions, the heartbeat
upsert of lib/feeds/health.py, and the program's own bookkeeping); then the
forbidden ones: another collector's tables, another unit's heartbeat row,
TRUNCATE, DROP, ALTER, CREATE TABLE.

Two set-ups: the ``db`` fixture (migrations applied by a superuser, as in the
other integration tests) and the way install.sh does it (a database owned by
the role ``feeds``, which applies the migrations itself, so that the partition
function runs as a non-superuser owner).
"""
from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from feeds.migrate import apply

from conftest import ROOT

UTC = timezone.utc
OLD_DAY = date(2021, 7, 22)                 # no partition exists for it after the migrations
T_OLD = datetime(2021, 7, 22, 10, 0, tzinfo=UTC)

HEARTBEAT = """INSERT INTO feed_heartbeat (unit, host, pid, started_at, updated_at, state, status, detail)
                       VALUES (%s, %s, %s, %s, now(), %s, %s, %s)
                       ON CONFLICT (unit) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid,
                         started_at = EXCLUDED.started_at, updated_at = now(), state = EXCLUDED.state,
                         status = EXCLUDED.status, detail = EXCLUDED.detail"""

# one row for a table of each collector, in column order
ROWS = {
    "binance_agg_trade": ("symbol, agg_id, price, qty, first_trade_id, last_trade_id, trade_time, "
                          "is_buyer_maker, event_time, recv_time",
                          ("BTCUSDT", 1, "30000.10", "0.001", 1, 1, T_OLD, True, T_OLD, T_OLD)),
    "kite_tick_ltp": ("instrument_token, last_price, recv_time, seq", (408065, "1573.70", T_OLD, 0)),
    "ibkr_bar_1min": ("symbol, bar_start, con_id, open, high, low, close, volume, wap, bar_count",
                      ("AAPL", T_OLD, 265598, "145.1", "145.3", "145.0", "145.2", "1200", "145.15", 17)),
}
OWN = {"feeds_binance": "binance_agg_trade", "feeds_kite": "kite_tick_ltp", "feeds_ibkr": "ibkr_bar_1min"}
UNIT = {"feeds_binance": ["feed-binance.service", "feed-binance@1of2.service"],
        "feeds_kite": ["feed-zerodha.service"], "feeds_ibkr": ["feed-backfill.service", "feed-ibkr.service"]}
COLLECTORS = sorted(OWN)


@pytest.fixture(params=["superuser", "owner"])
def dsn(request, db, pg):
    """A migrated database: ``superuser`` applied the migrations (the ``db``
    fixture); ``owner``: like install.sh, a database owned by ``feeds`` that
    ``feeds`` migrated (the roles already exist: the ``db`` migration made them)."""
    if request.param == "superuser":
        return db
    name = "o_" + conninfo_to_dict(pg.dsn(pg.create_db()))["dbname"]
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}" OWNER feeds')
    owner = as_role(pg.dsn(name), "feeds")
    apply(owner, ROOT / "sql")
    with psycopg.connect(pg.dsn(name)) as c:
        assert c.execute("SELECT proowner::regrole::text, prosecdef FROM pg_proc "
                         "WHERE proname = 'feeds_ensure_day_partitions'").fetchone() == ("feeds", True)
    return pg.dsn(name)


def as_role(dsn: str, role: str) -> str:
    """The same database, logging in as ``role`` (the test cluster trusts local logins)."""
    return make_conninfo(dsn, user=role)


def connect(dsn: str, role: str) -> psycopg.Connection:
    c = psycopg.connect(as_role(dsn, role), autocommit=True)
    assert c.execute("SELECT current_user, session_user").fetchone() == (role, role)
    return c


def copy_rows(conn: psycopg.Connection, table: str, rows: list[tuple], target: str | None = None) -> None:
    cols = ROWS[table][0] if table in ROWS else None
    with conn.cursor() as cur:
        with cur.copy(f"COPY {target or table} ({cols}) FROM STDIN") as cp:
            for r in rows:
                cp.write_row(r)


def insert_one(conn: psycopg.Connection, table: str) -> None:
    cols, row = ROWS[table]
    conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({', '.join(['%s'] * len(row))}) ON CONFLICT DO NOTHING",
                 row)


def heartbeat(conn: psycopg.Connection, unit: str, state: str = "running") -> None:
    conn.execute(HEARTBEAT, (unit, "host", 4242, datetime.now(UTC), state, f"{state}: test",
                             json.dumps({"streams": 1})))


def denied(fn, *args) -> str:
    """Run ``fn(*args)``; it must fail with insufficient_privilege (42501). Returns the message."""
    with pytest.raises(errors.InsufficientPrivilege) as ei:
        fn(*args)
    print(f"refused as expected: {str(ei.value).splitlines()[0]}")
    return str(ei.value)


# ------------------------------------------------------------------------------------------- allowed

@pytest.mark.parametrize("role", COLLECTORS)
def test_collector_copies_into_its_own_table_with_partitions_on_demand_and_staging(dsn, role):
    table = OWN[role]
    cols, row = ROWS[table]
    with connect(dsn, role) as conn:
        partitioned = table != "ibkr_bar_1min"
        if partitioned:
            # the sink's path: COPY meets no partition for the day, creates it, retries
            with pytest.raises(errors.CheckViolation, match="no partition"):
                with conn.transaction():
                    copy_rows(conn, table, [row])
            assert conn.execute("SELECT feeds_ensure_day_partitions(%s::regclass, %s, 1)",
                                (table, OLD_DAY)).fetchone()[0] == 1
            assert conn.execute("SELECT feeds_ensure_day_partitions(%s::regclass, %s, 1)",
                                (table, OLD_DAY)).fetchone()[0] == 0          # idempotent
        with conn.transaction():
            copy_rows(conn, table, [row])
        # a replay: the staged path of lib/feeds/sink.py (TEMP table LIKE the target)
        with conn.transaction():
            conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS _stage_{table} (LIKE {table} INCLUDING DEFAULTS) "
                         "ON COMMIT DELETE ROWS")
            copy_rows(conn, table, [row], target=f"_stage_{table}")
            cur = conn.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _stage_{table} "
                               "ON CONFLICT DO NOTHING")
            assert cur.rowcount == 0                    # the duplicate is skipped
            conn.execute(f"TRUNCATE _stage_{table}")
        insert_one(conn, table)                         # the row-wise path, also a duplicate
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 1
    if partitioned:
        with psycopg.connect(dsn) as c:
            owner = c.execute("SELECT relowner::regrole::text FROM pg_class WHERE relname = %s",
                              (f"{table}_p20210722",)).fetchone()[0]
            fowner = c.execute("SELECT proowner::regrole::text FROM pg_proc "
                               "WHERE proname = 'feeds_ensure_day_partitions'").fetchone()[0]
        assert owner == fowner                          # created by the function's owner, not the caller


@pytest.mark.parametrize("role", COLLECTORS)
def test_collector_upserts_the_heartbeat_of_its_own_units(dsn, role):
    with connect(dsn, role) as conn:
        for unit in UNIT[role]:
            heartbeat(conn, unit, "starting")
            heartbeat(conn, unit, "running")            # the ON CONFLICT DO UPDATE path
        rows = conn.execute("SELECT unit, state FROM feed_heartbeat ORDER BY unit").fetchall()
    assert rows == sorted((u, "running") for u in UNIT[role])


def test_binance_role_bookkeeping_and_resume_state(dsn):
    with connect(dsn, "feeds_binance") as conn:
        conn.execute("INSERT INTO binance_agg_gap (symbol, first_id, last_id) VALUES (%s, %s, %s) "
                     "ON CONFLICT DO NOTHING", ("BTCUSDT", 10, 20))
        assert conn.execute("SELECT symbol, first_id, last_id FROM binance_agg_gap WHERE symbol = ANY(%s) "
                            "ORDER BY symbol, first_id", (["BTCUSDT"],)).fetchall() == [("BTCUSDT", 10, 20)]
        conn.execute("DELETE FROM binance_agg_gap WHERE symbol = %s AND first_id = %s", ("BTCUSDT", 10))
        conn.execute("""SELECT s, (SELECT agg_id FROM binance_agg_trade t
                                    WHERE t.symbol = s AND t.trade_time > now() - make_interval(secs => %s)
                                    ORDER BY agg_id DESC LIMIT 1)
                          FROM unnest(%s::text[]) AS s""", (3600, ["BTCUSDT"])).fetchall()
        conn.execute("""SELECT s, i, (SELECT open_time FROM binance_kline k
                                       WHERE k.symbol = s AND k.interval = i ORDER BY open_time DESC LIMIT 1)
                          FROM unnest(%s::text[]) AS s, unnest(%s::text[]) AS i""",
                     (["BTCUSDT"], ["1m"])).fetchall()


def test_kite_role_upserts_instruments_and_reads_subscriptions(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("INSERT INTO kite_subscription (exchange, tradingsymbol, mode) VALUES ('NSE', 'INFY', 'full')")
    stmt = """INSERT INTO kite_instrument (instrument_token, exchange_token, exchange, tradingsymbol,
                  name, segment, instrument_type, tick_size, lot_size, expiry, strike, updated_at)
              VALUES (%s, %s, %s, %s, %s, %s, %s, %s::text::numeric, %s, %s, %s::text::numeric, now())
              ON CONFLICT (instrument_token) DO UPDATE SET exchange_token = EXCLUDED.exchange_token,
                  exchange = EXCLUDED.exchange, tradingsymbol = EXCLUDED.tradingsymbol, name = EXCLUDED.name,
                  segment = EXCLUDED.segment, instrument_type = EXCLUDED.instrument_type,
                  tick_size = EXCLUDED.tick_size, lot_size = EXCLUDED.lot_size, expiry = EXCLUDED.expiry,
                  strike = EXCLUDED.strike, updated_at = now()"""
    row = (408065, 1594, "NSE", "INFY", "INFOSYS", "NSE", "EQ", "0.05", 1, None, "0.0")
    with connect(dsn, "feeds_kite") as conn:
        conn.execute(stmt, row)
        conn.execute(stmt, row)
        assert conn.execute("SELECT exchange, tradingsymbol, coalesce(mode, %s) FROM kite_subscription "
                            "WHERE enabled ORDER BY exchange, tradingsymbol", ("full",)).fetchall() == \
            [("NSE", "INFY", "full")]
        assert conn.execute("SELECT count(*) FROM kite_instrument").fetchone()[0] == 1
        denied(conn.execute, "INSERT INTO kite_subscription (exchange, tradingsymbol) VALUES ('NSE', 'TCS')")


def test_ibkr_role_runs_its_store_statements(dsn):
    with connect(dsn, "feeds_ibkr") as conn:
        assert conn.execute("SELECT pg_try_advisory_lock(1)").fetchone()[0]
        with conn.transaction():
            conn.execute("UPDATE ibkr_backfill_run SET state = 'interrupted' "
                         "WHERE state = 'running' AND finished_at IS NULL")
            run_id = conn.execute("INSERT INTO ibkr_backfill_run (host, pid, client_id, arguments) "
                                  "VALUES (%s, %s, %s, %s) RETURNING run_id", ("h", 1, 7, "")).fetchone()[0]
        conn.execute("UPDATE ibkr_backfill_run SET requests = %s, finished_at = now() WHERE run_id = %s",
                     (3, run_id))
        for _ in range(2):
            conn.execute("""INSERT INTO ibkr_contract AS c (symbol, con_id, sec_type, exchange, primary_exchange,
                                currency, time_zone, calendar, head_timestamp, updated_at)
                            VALUES ('AAPL', 265598, 'STK', 'SMART', 'NASDAQ', 'USD', 'US/Eastern', 'XNYS', NULL, now())
                            ON CONFLICT (symbol) DO UPDATE SET con_id = COALESCE(EXCLUDED.con_id, c.con_id),
                                updated_at = now()""")
        day, open_, close = T_OLD.date(), T_OLD, T_OLD + timedelta(hours=6, minutes=30)
        with conn.transaction():
            conn.execute("DELETE FROM ibkr_bar_1min WHERE symbol = %s AND bar_start >= %s AND bar_start < %s",
                         ("AAPL", open_, close))
            copy_rows(conn, "ibkr_bar_1min", [ROWS["ibkr_bar_1min"][1]])
            conn.execute("""INSERT INTO ibkr_session_status AS s (symbol, session_date, con_id, status,
                                session_open, session_close, expected_bars, actual_bars)
                            VALUES ('AAPL', %s, 265598, 'COMPLETE', %s, %s, 390, 1)
                            ON CONFLICT (symbol, session_date) DO UPDATE SET status = EXCLUDED.status,
                                attempts = s.attempts + 1, updated_at = now()""", (day, open_, close))
        assert conn.execute("SELECT status FROM ibkr_session_status").fetchone()[0] == "COMPLETE"
        denied(conn.execute, "DELETE FROM ibkr_pacing_learned")
    # what the auto pacing profile learned: stored and read back by the store, as feeds_ibkr
    from feeds.ibkr.pacing import LearnedPacing
    from feeds.ibkr.store import BackfillStore
    store = BackfillStore(as_role(dsn, "feeds_ibkr")).connect()
    try:
        assert store.learned_pacing("127.0.0.1:7497", "1 min") is None
        first = LearnedPacing("documented", 16, datetime(2026, 3, 2, 21, 5, tzinfo=UTC), "ceiling")
        later = LearnedPacing("strict", 4, datetime(2026, 3, 3, 21, 5, 7, 250000, tzinfo=UTC), "pacing violation")
        store.save_learned_pacing("127.0.0.1:7497", "1 min", first)
        store.save_learned_pacing("127.0.0.1:4002", "1 min", first)
        store.save_learned_pacing("127.0.0.1:7497", "1 min", later)
        assert store.learned_pacing("127.0.0.1:7497", "1 min") == later
        assert store.learned_pacing("127.0.0.1:4002", "1 min") == first
        assert store.learned_pacing("127.0.0.1:7497", "5 secs") is None
    finally:
        store.close()


def test_collector_role_runs_the_real_sink(dsn, tmp_path):
    """lib/feeds/sink.py as feeds_binance: COPY, a missing partition created on
    demand, and an overlapping batch through the staging table."""
    from feeds.binance import adapter as A
    from feeds.sink import Sink

    def agg(i):
        ts = T_OLD + timedelta(milliseconds=i)
        return ("ETHUSDT", i, f"2000.{i % 100:02d}", "0.5", i, i, ts, False, ts, ts)
    sink = Sink(as_role(dsn, "feeds_binance"), tmp_path, A.TABLES).start()
    try:
        sink.add_many("binance_agg_trade", [agg(i) for i in range(1, 301)])
        assert sink.flush(20)
        sink.add_many("binance_agg_trade", [agg(i) for i in range(201, 401)])
        assert sink.flush(20)
    finally:
        assert sink.close()
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT count(*), count(DISTINCT agg_id) FROM binance_agg_trade").fetchone() == (400, 400)
    assert not list(tmp_path.glob("spool-*")) and not (tmp_path / "rejects.jsonl").exists()


# ----------------------------------------------------------------------------------------- forbidden

@pytest.mark.parametrize("role", COLLECTORS)
def test_collector_cannot_write_another_collectors_tables(dsn, role):
    with connect(dsn, role) as conn:
        for table in sorted(set(ROWS) - {OWN[role]}):
            msg = denied(insert_one, conn, table)
            assert f"permission denied for table {table}" in msg
            denied(lambda t=table: copy_rows(conn, t, [ROWS[t][1]]))
            if table != "ibkr_bar_1min":
                msg = denied(conn.execute, "SELECT feeds_ensure_day_partitions(%s::regclass, %s, 1)",
                             (table, OLD_DAY))
                assert f"may not add partitions to public.{table}" in msg
        others = [("binance_agg_gap", "DELETE FROM binance_agg_gap"),
                  ("kite_instrument", "UPDATE kite_instrument SET name = 'x'"),
                  ("ibkr_session_status", "UPDATE ibkr_session_status SET status = 'ERROR'"),
                  ("ibkr_contract", "DELETE FROM ibkr_contract"),
                  ("ibkr_pacing_learned", "INSERT INTO ibkr_pacing_learned (endpoint, bar_size, profile, "
                                          "concurrency, learned_at) VALUES ('h:1', '1 min', 'strict', 1, now())")]
        for table, stmt in others:
            if not table.startswith(OWN[role].split("_")[0]):
                denied(conn.execute, stmt)


@pytest.mark.parametrize("role", COLLECTORS)
def test_collector_cannot_write_another_units_heartbeat(dsn, role):
    with psycopg.connect(dsn, autocommit=True) as c:       # every unit has written its row once
        for unit in [u for us in UNIT.values() for u in us] + ["feed-maintain.service"]:
            heartbeat(c, unit, "running")
    with connect(dsn, role) as conn:
        for other in sorted({u for r, us in UNIT.items() if r != role for u in us} | {"feed-maintain.service"}):
            msg = denied(heartbeat, conn, other, "degraded")      # the upsert's UPDATE path
            assert "row-level security" in msg
            cur = conn.execute("UPDATE feed_heartbeat SET state = 'stopping' WHERE unit = %s", (other,))
            assert cur.rowcount == 0                               # invisible to UPDATE
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("DELETE FROM feed_heartbeat WHERE unit LIKE 'feed-zerodha%' OR unit LIKE 'feed-binance%' "
                      "OR unit LIKE 'feed-backfill%' OR unit LIKE 'feed-ibkr%'")
        for other in sorted({u for r, us in UNIT.items() if r != role for u in us}):
            msg = denied(heartbeat, conn, other, "running")       # the upsert's INSERT path
            assert "row-level security" in msg
        denied(conn.execute, "DELETE FROM feed_heartbeat")
        own = UNIT[role][0]
        heartbeat(conn, own, "running")
        msg = denied(conn.execute, "UPDATE feed_heartbeat SET unit = 'feed-other.service' WHERE unit = %s", (own,))
        assert "row-level security" in msg
    with psycopg.connect(dsn) as c:
        states = dict(c.execute("SELECT unit, state FROM feed_heartbeat").fetchall())
    assert states == {"feed-maintain.service": "running", own: "running"}


@pytest.mark.parametrize("role", COLLECTORS)
def test_collector_cannot_truncate_drop_alter_or_create(dsn, role):
    own = OWN[role]
    with connect(dsn, role) as conn:
        for table in (own, "feed_heartbeat", "schema_migrations", "feed_partitioned_table"):
            denied(conn.execute, f"TRUNCATE {table}")
            assert "must be owner" in denied(conn.execute, f"DROP TABLE {table}")
            assert "must be owner" in denied(conn.execute, f"ALTER TABLE {table} ADD COLUMN x int")
        denied(conn.execute, f"DELETE FROM {own}" if own != "ibkr_bar_1min" else "TRUNCATE ibkr_session_status")
        assert "permission denied for schema public" in denied(conn.execute, "CREATE TABLE my_table (x int)")
        denied(conn.execute, f"CREATE TABLE public.{own}_p20300101 PARTITION OF {own} "
                             "FOR VALUES FROM ('2030-01-01') TO ('2030-01-02')")
        denied(conn.execute, "CREATE SCHEMA mine")
        denied(conn.execute, "SELECT feeds_drop_day_partitions('binance_agg_trade'::regclass, 1)")
        denied(conn.execute, "UPDATE feed_partitioned_table SET keep_days = 1")
        denied(conn.execute, "DELETE FROM schema_migrations")
        conn.execute("CREATE TEMP TABLE scratch (x int)")          # the sink's staging stays possible
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT to_regclass(%s)", (own,)).fetchone()[0] is not None


def test_set_role_is_the_caller_the_partition_function_checks(dsn):
    """A superuser session that SET ROLE feeds_kite extends kite tables only."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET ROLE feeds_kite")
        assert conn.execute("SELECT feeds_ensure_day_partitions('kite_tick_ltp'::regclass, %s, 1)",
                            (OLD_DAY,)).fetchone()[0] == 1
        denied(conn.execute, "SELECT feeds_ensure_day_partitions('binance_agg_trade'::regclass, %s, 1)",
               (OLD_DAY,))
        conn.execute("RESET ROLE")
        assert conn.execute("SELECT feeds_ensure_day_partitions('binance_agg_trade'::regclass, %s, 1)",
                            (OLD_DAY,)).fetchone()[0] == 1


def test_partition_function_refuses_plain_tables_and_silly_spans(dsn):
    with connect(dsn, "feeds_binance") as conn:
        with pytest.raises(errors.WrongObjectType):
            conn.execute("SELECT feeds_ensure_day_partitions('binance_kline'::regclass, %s, 1)", (OLD_DAY,))
        with pytest.raises(errors.InvalidParameterValue):
            conn.execute("SELECT feeds_ensure_day_partitions('binance_agg_trade'::regclass, %s, 100000)",
                         (OLD_DAY,))


def test_reader_reads_everything_and_writes_nothing(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        heartbeat(c, "feed-binance.service")
        c.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'analyst_test') THEN "
                  "CREATE ROLE analyst_test LOGIN; END IF; END $$")
        c.execute("GRANT feeds_reader TO analyst_test")
        tables = [r[0] for r in c.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition").fetchall()]
    assert {"binance_agg_trade", "kite_tick_full", "ibkr_bar_1min", "feed_heartbeat"} <= set(tables)
    with connect(dsn, "analyst_test") as conn:
        for t in tables:
            conn.execute(f"SELECT count(*) FROM {t}").fetchone()
        assert conn.execute("SELECT unit FROM feed_heartbeat").fetchall() == [("feed-binance.service",)]
        denied(insert_one, conn, "binance_agg_trade")
        denied(heartbeat, conn, "feed-binance.service")
        denied(conn.execute, "TRUNCATE feed_heartbeat")
        denied(conn.execute, "SELECT feeds_ensure_day_partitions('binance_agg_trade'::regclass, %s, 1)", (OLD_DAY,))
        denied(conn.execute, "CREATE TABLE mine (x int)")


def test_migrations_as_owner_need_the_roles_to_exist_or_create_them_as_superuser(pg):
    """Roles are cluster-wide: a second database's migration finds them and goes on."""
    dsn1, dsn2 = pg.dsn(pg.create_db()), pg.dsn(pg.create_db())
    apply(dsn1, ROOT / "sql")
    apply(dsn2, ROOT / "sql")
    with psycopg.connect(dsn2) as c:
        roles = dict(c.execute("SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE 'feeds%'").fetchall())
    assert roles == {"feeds": True, "feeds_binance": True, "feeds_kite": True, "feeds_ibkr": True,
                     "feeds_reader": False, "feeds_dhan": True, "feeds_indicators": True}


def test_indicators_role_reads_candles_and_writes_only_its_table(dsn):
    cols = "venue, instrument, interval_min, bar_start, indicator, output, value, computed_at"
    row = ("kite", "408065", 1, T_OLD, "SMA(timeperiod=20)", "real", 1573.7, T_OLD)
    with psycopg.connect(dsn, autocommit=True) as c:
        heartbeat(c, "feed-binance.service")
    with connect(dsn, "feeds_indicators") as conn:
        for t in ("binance_kline", "kite_candle", "ibkr_candle", "candle_latest", "indicator_value", "indicator_latest"):
            conn.execute(f"SELECT count(*) FROM {t}").fetchone()
        conn.execute("LISTEN feeds_candle")
        with conn.transaction():
            with conn.cursor().copy(f"COPY indicator_value ({cols}) FROM STDIN") as cp:
                cp.write_row(row)
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS _stage_indicator_value "
                         "(LIKE indicator_value INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
            with conn.cursor().copy(f"COPY _stage_indicator_value ({cols}) FROM STDIN") as cp:
                cp.write_row(row)
            assert conn.execute(f"INSERT INTO indicator_value ({cols}) SELECT {cols} FROM _stage_indicator_value "
                                "ON CONFLICT DO NOTHING").rowcount == 0
        heartbeat(conn, "feed-indicators.service")
        denied(heartbeat, conn, "feed-binance.service")
        denied(conn.execute, "INSERT INTO kite_candle (instrument_token, interval_min, bar_start, bar_end, open, high, low, "
                             "close, ticks, final, revision, source, recorded_at) VALUES (1, 1, now(), "
                             "now() + interval '1 minute', 1, 1, 1, 1, 0, true, 0, 'live', now())")
        denied(insert_one, conn, "binance_agg_trade")
        denied(conn.execute, "UPDATE indicator_value SET value = 0")
        denied(conn.execute, "DELETE FROM indicator_value")
        denied(conn.execute, "TRUNCATE indicator_value")
        denied(conn.execute, "DROP TRIGGER kite_candle_notify ON kite_candle")
        denied(conn.execute, "CREATE TABLE mine (x int)")
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT has_table_privilege('feeds_reader', 'indicator_value', 'SELECT'), "
                         "has_table_privilege('feeds_reader', 'indicator_latest', 'SELECT'), "
                         "has_table_privilege('feeds_reader', 'indicator_value', 'INSERT')").fetchone() == (True, True, False)


def test_collectors_inserting_candles_notify_once_per_statement(dsn):
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN feeds_candle")
        with connect(dsn, "feeds_kite") as conn:
            with conn.transaction():
                with conn.cursor().copy("COPY kite_candle (instrument_token, interval_min, bar_start, bar_end, open, high, "
                                        "low, close, volume, ticks, final, revision, source, recorded_at) FROM STDIN") as cp:
                    for m in range(3):
                        t = T_OLD.replace(minute=m)
                        cp.write_row((408065, 1, t, t.replace(minute=m + 1), "1", "2", "1", "2", "5", 1, True, 0, "live", t))
        got = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert got == ["kite_candle"]
