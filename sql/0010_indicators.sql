-- Technical indicators on closed candles of every venue (feed-indicators, lib/feeds/indicators.py).
--
-- One row per (series, indicator, output, bar): indicator is the normalised specification
-- (every parameter, defaults included, sorted by name, no spaces: 'SMA(timeperiod=20)',
-- 'MACD(fastperiod=12,signalperiod=9,slowperiod=26)', 'OBV', 'VWAP'), output TA-Lib's output
-- name ('real'; MACD 'macd', 'macdsignal', 'macdhist'; BBANDS 'upperband', 'middleband',
-- 'lowerband'). A bar inside a function's lookback has no row (no NULL values).
-- instrument: Binance symbol, IB symbol, Kite instrument_token (as text), Dhan security id.
-- A revised candle (revision + 1) or a late one makes feed-indicators compute the values from
-- that bar on again: they are new rows with a later computed_at, so a bar may have several
-- rows: the newest computed_at is the one to use (view indicator_latest).
-- computed_at: when feed-indicators computed the value; stored_at: when the row was committed
-- (clock_timestamp() at insert, not written by feed-indicators: the latency measure).

CREATE TABLE indicator_value (
    venue         text             NOT NULL CHECK (venue IN ('binance', 'kite', 'ibkr', 'dhan')),
    instrument    text             NOT NULL,
    interval_min  smallint         NOT NULL CHECK (interval_min > 0),
    bar_start     timestamptz      NOT NULL,
    indicator     text             NOT NULL,
    output        text             NOT NULL,
    value         double precision NOT NULL,
    computed_at   timestamptz      NOT NULL,
    stored_at     timestamptz      NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (venue, instrument, interval_min, indicator, output, bar_start, computed_at)
);

-- The newest value of every (series, indicator, output, bar).
CREATE VIEW indicator_latest AS
SELECT DISTINCT ON (venue, instrument, interval_min, indicator, output, bar_start)
       venue, instrument, interval_min, bar_start, indicator, output, value, computed_at
  FROM indicator_value
 ORDER BY venue, instrument, interval_min, indicator, output, bar_start, computed_at DESC;

-- New closed candles are found by their commit order: stored_at (clock_timestamp() at insert)
-- on every candle table, indexed, read by feed-indicators every indicators.poll_interval and
-- whenever a notification (below) says a candle table changed. binance_kline had no such
-- column: added here without rewriting the table (existing rows keep NULL; the default
-- applies to new rows only); the collector's COPY names its columns, so it is unaffected.
ALTER TABLE binance_kline ADD COLUMN stored_at timestamptz;
ALTER TABLE binance_kline ALTER COLUMN stored_at SET DEFAULT clock_timestamp();
CREATE INDEX binance_kline_stored_at ON binance_kline (stored_at);
CREATE INDEX kite_candle_stored_at ON kite_candle (stored_at);
CREATE INDEX ibkr_candle_stored_at ON ibkr_candle (stored_at);

-- One notification per INSERT/COPY statement that stored candles (not one per row): payload =
-- the table's name. It is sent at commit, so a reader never sees it before the rows; the
-- collectors pay one function call per statement. Collectors do not wait for feed-indicators:
-- notifications nobody listens to are discarded.
CREATE FUNCTION feeds_candle_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows) THEN
        PERFORM pg_notify('feeds_candle', TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER binance_kline_notify AFTER INSERT ON binance_kline
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION feeds_candle_notify();
CREATE TRIGGER kite_candle_notify AFTER INSERT ON kite_candle
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION feeds_candle_notify();
CREATE TRIGGER ibkr_candle_notify AFTER INSERT ON ibkr_candle
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION feeds_candle_notify();

-- feeds_indicators (feed-indicators): created here when missing, as 0005_roles.sql does.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'feeds_indicators') THEN
        BEGIN
            CREATE ROLE feeds_indicators LOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;   -- created meanwhile by a migration of another database of the cluster
        END;
    END IF;
END $$;

GRANT USAGE ON SCHEMA public TO feeds_indicators;
DO $$
BEGIN
    -- TEMPORARY: the sink's staging tables.
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO feeds_indicators', current_database());
END $$;

-- It reads the candles of every venue and writes its own table (the sink's COPY, and INSERT ...
-- ON CONFLICT DO NOTHING through a TEMP staging table, which needs SELECT).
GRANT SELECT ON binance_kline, kite_candle, ibkr_candle, candle_latest TO feeds_indicators;
GRANT SELECT, INSERT ON indicator_value TO feeds_indicators;
GRANT SELECT ON indicator_latest TO feeds_indicators;
GRANT SELECT ON indicator_value, indicator_latest TO feeds_reader;

-- feed-indicators.service (and test names starting with feed-indicators) run as feeds_indicators:
-- it may write their heartbeat rows.
INSERT INTO feed_unit_role (unit_pattern, role_name) VALUES ('feed-indicators%', 'feeds_indicators');
GRANT SELECT ON feed_unit_role TO feeds_indicators;
GRANT SELECT, INSERT, UPDATE ON feed_heartbeat TO feeds_indicators;
