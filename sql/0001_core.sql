-- Core objects shared by every collector: heartbeats and daily partitions.

-- One row per running unit, upserted every few seconds; `feedctl status` reads it.
CREATE TABLE feed_heartbeat (
    unit        text PRIMARY KEY,              -- systemd unit name, e.g. feed-binance.service
    host        text NOT NULL,
    pid         integer NOT NULL,
    started_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    state       text NOT NULL,                 -- starting | running | degraded | spooling | stopping
    status      text NOT NULL,                 -- the same line as sd_notify STATUS=
    detail      jsonb NOT NULL DEFAULT '{}'    -- per-stream counters, rates, ages, lag
);

-- Create the daily range partitions of a table partitioned BY RANGE (timestamptz),
-- named <parent>_pYYYYMMDD, for [first_day, first_day + days). Idempotent.
CREATE FUNCTION feeds_ensure_day_partitions(parent regclass, first_day date, days integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    d date;
    created integer := 0;
    pname text;
    pschema text;
    prel text;
BEGIN
    SELECT n.nspname, c.relname INTO pschema, prel
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = parent;
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

-- Drop daily partitions of `parent` whose whole day is older than keep_days before today (UTC).
CREATE FUNCTION feeds_drop_day_partitions(parent regclass, keep_days integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    r record;
    dropped integer := 0;
    cutoff date := (now() AT TIME ZONE 'UTC')::date - keep_days;
BEGIN
    FOR r IN
        SELECT c.oid::regclass AS part, c.relname
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = parent AND c.relname ~ '_p[0-9]{8}$'
    LOOP
        IF to_date(right(r.relname, 8), 'YYYYMMDD') < cutoff THEN
            EXECUTE format('DROP TABLE %s', r.part);
            dropped := dropped + 1;
        END IF;
    END LOOP;
    RETURN dropped;
END $$;

-- The partitioned tables that feed-maintain manages, with their retention.
CREATE TABLE feed_partitioned_table (
    table_name  regclass PRIMARY KEY,
    keep_days   integer NOT NULL DEFAULT 30 CHECK (keep_days > 0),
    ahead_days  integer NOT NULL DEFAULT 3 CHECK (ahead_days >= 1)
);
