-- Database roles and what each may do.
--
--   feeds          owns the database and every table: feed-migrate and feed-maintain run as it.
--                  It is the role that applies the migrations (install.sh runs feed-migrate as
--                  the OS user feeds); the grants below are made by it.
--   feeds_binance  feed-binance and feed-binance@*: writes the binance_* tables only.
--   feeds_kite     feed-zerodha: writes the kite_* tick and instrument tables only.
--   feeds_ibkr     feed-backfill: writes the ibkr_* tables only.
--   feeds_reader   read-only, for analysts: GRANT feeds_reader TO alice;
--
-- A collector role may insert into its own tables (COPY, INSERT ... ON CONFLICT DO NOTHING
-- through a TEMP staging table), read them (resume state; CREATE TEMP TABLE ... (LIKE t)
-- needs SELECT on t), update or delete only where its own program does, add daily
-- partitions to its own tables through feeds_ensure_day_partitions, and upsert the
-- feed_heartbeat rows of its own units (row-level security). It cannot write another
-- collector's tables, TRUNCATE, DROP or ALTER anything, nor create tables outside pg_temp.
--
-- Roles are cluster-wide: they are created here only when missing (install.sh creates
-- them first, as postgres, so that the migration itself needs no CREATEROLE).

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['feeds', 'feeds_binance', 'feeds_kite', 'feeds_ibkr', 'feeds_reader'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                -- collectors and the owner log in (peer authentication: OS user = role);
                -- analysts log in as themselves and are granted feeds_reader
                EXECUTE format('CREATE ROLE %I %s', r, CASE WHEN r = 'feeds_reader' THEN 'NOLOGIN' ELSE 'LOGIN' END);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;   -- created meanwhile by a migration of another database of the cluster
            END;
        END IF;
    END LOOP;
END $$;

-- Nobody but the owner creates objects in the schema (PostgreSQL < 15 lets PUBLIC do so).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO feeds_binance, feeds_kite, feeds_ibkr, feeds_reader;
DO $$
BEGIN
    -- TEMPORARY: the sink's staging tables; named through current_database() (tests use many).
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO feeds_binance, feeds_kite, feeds_ibkr',
                   current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO feeds_reader', current_database());
END $$;

-- Binance (lib/feeds/binance: the sink's COPY and staged INSERT, resume state, gap bookkeeping).
GRANT SELECT, INSERT ON binance_agg_trade, binance_book_ticker, binance_mark_price, binance_ticker_24h,
    binance_kline TO feeds_binance;
GRANT SELECT, INSERT, DELETE ON binance_agg_gap TO feeds_binance;

-- Kite (lib/feeds/kite: ticks through the sink, kite_instrument upserted at start,
-- kite_subscription read when kite.instruments_from_table is set).
GRANT SELECT, INSERT ON kite_tick_ltp, kite_tick_quote, kite_tick_full TO feeds_kite;
GRANT SELECT, INSERT, UPDATE ON kite_instrument TO feeds_kite;
GRANT SELECT ON kite_subscription TO feeds_kite;

-- IBKR (lib/feeds/ibkr/store.py: a session's bars are replaced whole, statuses and
-- contracts upserted, one run row per run).
GRANT SELECT, INSERT, DELETE ON ibkr_bar_1min TO feeds_ibkr;
GRANT SELECT, INSERT, UPDATE ON ibkr_contract, ibkr_session_status, ibkr_backfill_run TO feeds_ibkr;
GRANT USAGE ON SEQUENCE ibkr_backfill_run_run_id_seq TO feeds_ibkr;

-- Daily partitions on demand: the sink calls feeds_ensure_day_partitions(table, day, 1)
-- when a row meets no partition.  Creating a partition needs ownership of the parent, so
-- the function runs as its owner (SECURITY DEFINER) with a fixed search_path, and first
-- checks that the caller may INSERT into the parent.  The caller is the role set by
-- SET ROLE, else the session user (inside the function current_user is the owner).
CREATE OR REPLACE FUNCTION feeds_ensure_day_partitions(parent regclass, first_day date, days integer)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d date;
    created integer := 0;
    pname text;
    pschema text;
    prel text;
    pkind "char";
    caller text := coalesce(nullif(current_setting('role'), 'none'), session_user);
BEGIN
    IF NOT has_table_privilege(caller, parent, 'INSERT') THEN
        RAISE EXCEPTION 'permission denied: role % may not add partitions to %', caller, parent
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT n.nspname, c.relname, c.relkind INTO pschema, prel, pkind
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = parent;
    IF pkind IS DISTINCT FROM 'p' THEN
        RAISE EXCEPTION '% is not a partitioned table', parent USING ERRCODE = 'wrong_object_type';
    END IF;
    IF days IS NULL OR days < 0 OR days > 366 THEN
        RAISE EXCEPTION 'days must be 0..366, not %', days USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN 0 .. days - 1 LOOP
        d := first_day + i;
        pname := prel || '_p' || to_char(d, 'YYYYMMDD');
        IF to_regclass(quote_ident(pschema) || '.' || quote_ident(pname)) IS NULL THEN
            EXECUTE format('CREATE TABLE IF NOT EXISTS %I.%I PARTITION OF %s FOR VALUES FROM (%L) TO (%L)',
                           pschema, pname, parent,
                           (d::timestamp AT TIME ZONE 'UTC'), ((d + 1)::timestamp AT TIME ZONE 'UTC'));
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END $$;
REVOKE EXECUTE ON FUNCTION feeds_ensure_day_partitions(regclass, date, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION feeds_ensure_day_partitions(regclass, date, integer)
    TO feeds_binance, feeds_kite;
-- Retention is feed-maintain's (the owner's) alone.
REVOKE EXECUTE ON FUNCTION feeds_drop_day_partitions(regclass, integer) FROM PUBLIC;

-- Which role each unit runs as: a role may write the heartbeat rows of the units whose
-- name matches one of its patterns (LIKE), and no other.
CREATE TABLE feed_unit_role (
    unit_pattern  text PRIMARY KEY,   -- systemd unit name, or a LIKE pattern for template instances
    role_name     name NOT NULL
);
INSERT INTO feed_unit_role (unit_pattern, role_name) VALUES
    ('feed-binance.service', 'feeds_binance'),
    ('feed-binance@%.service', 'feeds_binance'),
    ('feed-zerodha.service', 'feeds_kite'),
    ('feed-zerodha@%.service', 'feeds_kite'),
    ('feed-backfill.service', 'feeds_ibkr');
GRANT SELECT ON feed_unit_role TO feeds_binance, feeds_kite, feeds_ibkr;

-- feed_heartbeat: everyone with SELECT reads every row; a collector inserts and updates
-- only its own units' rows (an upsert onto another unit's row is an error).  The owner
-- (feed-maintain, feedctl run as feeds) is not subject to these policies.
GRANT SELECT, INSERT, UPDATE ON feed_heartbeat TO feeds_binance, feeds_kite, feeds_ibkr;
ALTER TABLE feed_heartbeat ENABLE ROW LEVEL SECURITY;
CREATE POLICY feed_heartbeat_read ON feed_heartbeat FOR SELECT USING (true);
CREATE POLICY feed_heartbeat_insert_own ON feed_heartbeat FOR INSERT
    WITH CHECK (EXISTS (SELECT 1 FROM feed_unit_role m JOIN pg_roles r ON r.rolname = m.role_name
                         WHERE feed_heartbeat.unit LIKE m.unit_pattern AND pg_has_role(r.oid, 'USAGE')));
CREATE POLICY feed_heartbeat_update_own ON feed_heartbeat FOR UPDATE
    USING (EXISTS (SELECT 1 FROM feed_unit_role m JOIN pg_roles r ON r.rolname = m.role_name
                    WHERE feed_heartbeat.unit LIKE m.unit_pattern AND pg_has_role(r.oid, 'USAGE')))
    WITH CHECK (EXISTS (SELECT 1 FROM feed_unit_role m JOIN pg_roles r ON r.rolname = m.role_name
                         WHERE feed_heartbeat.unit LIKE m.unit_pattern AND pg_has_role(r.oid, 'USAGE')));

-- Analysts read everything, including tables later migrations create (as the owner).
GRANT SELECT ON ALL TABLES IN SCHEMA public TO feeds_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO feeds_reader;
