-- Dhan live market feed (feed-dhan): ticks of the ticker, quote and full modes, the OI, previous
-- close and market status packets, the feed's disconnect packets, the candles built from the
-- ticks, and the instruments to collect from a table.
-- Venue documents: DhanHQ v2 "Live Market Feed" (packet layouts), "Annexure" (exchange segments,
-- disconnect codes).
--
-- Prices are numeric: Dhan sends float32 rupees; every price is a multiple of the tick, so the
-- collector rounds each to 2 decimals (4 for NSE_CURRENCY and BSE_CURRENCY) and writes that text,
-- never a binary float (lib/feeds/dhan/wire.py, "Prices").
-- Times are UTC. ltt is Dhan's last trade time, sent as epoch seconds of the IST wall clock and
-- converted; recv_time is when the collector received the WebSocket message (microseconds,
-- strictly increasing per connection).
-- A packet has no id of its own: (exchange_segment, security_id, recv_time, seq) is its natural
-- key, seq being the packet's position in its message, so a replayed spool never duplicates a row.
-- Tick tables are range-partitioned by day on recv_time (feed_partitioned_table, feed-maintain).
-- exchange_segment is the Annexure name (NSE_EQ, IDX_I, NSE_FNO, ...), as in dhan_bar.

-- Ticker mode: last traded price and time (code 2).
CREATE TABLE dhan_tick_ticker (
    exchange_segment  text        NOT NULL,
    security_id       bigint      NOT NULL,
    ltp               numeric     NOT NULL,
    ltt               timestamptz,             -- NULL: no trade yet
    recv_time         timestamptz NOT NULL,
    seq               integer     NOT NULL,    -- position of the packet in its message
    PRIMARY KEY (exchange_segment, security_id, recv_time, seq)
) PARTITION BY RANGE (recv_time);

-- Quote mode (code 4).
CREATE TABLE dhan_tick_quote (
    exchange_segment  text        NOT NULL,
    security_id       bigint      NOT NULL,
    ltp               numeric     NOT NULL,
    ltq               integer     NOT NULL,    -- last traded quantity
    ltt               timestamptz,
    atp               numeric     NOT NULL,    -- average traded price
    volume            bigint      NOT NULL,    -- the day's cumulative volume
    total_sell_qty    bigint      NOT NULL,
    total_buy_qty     bigint      NOT NULL,
    open              numeric     NOT NULL,    -- the day's open, close (0 before the close), high, low
    close             numeric     NOT NULL,
    high              numeric     NOT NULL,
    low               numeric     NOT NULL,
    recv_time         timestamptz NOT NULL,
    seq               integer     NOT NULL,
    PRIMARY KEY (exchange_segment, security_id, recv_time, seq)
) PARTITION BY RANGE (recv_time);

-- Full mode (code 8): the quote fields, open interest and five-level depth (arrays, best first).
CREATE TABLE dhan_tick_full (
    exchange_segment  text        NOT NULL,
    security_id       bigint      NOT NULL,
    ltp               numeric     NOT NULL,
    ltq               integer     NOT NULL,
    ltt               timestamptz,
    atp               numeric     NOT NULL,
    volume            bigint      NOT NULL,
    total_sell_qty    bigint      NOT NULL,
    total_buy_qty     bigint      NOT NULL,
    oi                bigint      NOT NULL,
    oi_day_high       bigint      NOT NULL,    -- NSE_FNO only (0 elsewhere)
    oi_day_low        bigint      NOT NULL,
    open              numeric     NOT NULL,
    close             numeric     NOT NULL,
    high              numeric     NOT NULL,
    low               numeric     NOT NULL,
    bid_quantity      bigint[]    NOT NULL,
    ask_quantity      bigint[]    NOT NULL,
    bid_orders        integer[]   NOT NULL,
    ask_orders        integer[]   NOT NULL,
    bid_price         numeric[]   NOT NULL,
    ask_price         numeric[]   NOT NULL,
    recv_time         timestamptz NOT NULL,
    seq               integer     NOT NULL,
    PRIMARY KEY (exchange_segment, security_id, recv_time, seq)
) PARTITION BY RANGE (recv_time);

-- OI Data packets (code 5), sent with quote subscriptions of derivatives.
CREATE TABLE dhan_tick_oi (
    exchange_segment  text        NOT NULL,
    security_id       bigint      NOT NULL,
    oi                bigint      NOT NULL,
    recv_time         timestamptz NOT NULL,
    seq               integer     NOT NULL,
    PRIMARY KEY (exchange_segment, security_id, recv_time, seq)
) PARTITION BY RANGE (recv_time);

-- Prev Close packets (code 6): sent once per instrument on subscription, in every mode.
CREATE TABLE dhan_prev_close (
    exchange_segment  text        NOT NULL,
    security_id       bigint      NOT NULL,
    prev_close        numeric     NOT NULL,
    prev_oi           bigint      NOT NULL,
    recv_time         timestamptz NOT NULL,
    seq               integer     NOT NULL,
    PRIMARY KEY (exchange_segment, security_id, recv_time, seq)
);

-- Market Status packets (code 7): the header (and any undocumented body, kept as bytes).
CREATE TABLE dhan_market_status (
    exchange_segment  text        NOT NULL,
    security_id       bigint      NOT NULL,
    body              bytea       NOT NULL,
    recv_time         timestamptz NOT NULL,
    seq               integer     NOT NULL,
    PRIMARY KEY (exchange_segment, security_id, recv_time, seq)
);

-- Feed Disconnect packets (code 50): Dhan closes a connection and says why (the Annexure's data
-- API error codes: 805 too many connections, 807 access token expired, ...). action is what
-- feed-dhan did: reconnect, backoff (a long wait first) or exit (status 77, not restarted).
CREATE TABLE dhan_disconnect (
    recv_time    timestamptz NOT NULL,
    connection   integer     NOT NULL,         -- feed-dhan's connection number, 1..dhan.max_connections
    code         integer     NOT NULL,
    meaning      text        NOT NULL,
    action       text        NOT NULL CHECK (action IN ('reconnect', 'backoff', 'exit')),
    PRIMARY KEY (recv_time, connection)
);

-- Candles built by feed-dhan from the ticks (lib/feeds/candles.py; the columns of kite_candle,
-- see sql/0006_candles.sql), keyed by the instrument's exchange segment and security id.
CREATE TABLE dhan_candle (
    exchange_segment  text        NOT NULL,
    security_id       bigint      NOT NULL,
    interval_min      smallint    NOT NULL CHECK (interval_min > 0),
    bar_start         timestamptz NOT NULL,
    bar_end           timestamptz NOT NULL,
    open              numeric     NOT NULL,
    high              numeric     NOT NULL,
    low               numeric     NOT NULL,
    close             numeric     NOT NULL,
    volume            numeric,
    ticks             integer     NOT NULL CHECK (ticks >= 0),
    final             boolean     NOT NULL,
    revision          integer     NOT NULL CHECK (revision >= 0),
    source            text        NOT NULL CHECK (source IN ('live', 'history')),
    recorded_at       timestamptz NOT NULL,
    stored_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (exchange_segment, security_id, interval_min, bar_start, recorded_at),
    CHECK (bar_end > bar_start)
);

-- feed-indicators reads the candles committed since its last look (stored_at) and is told of
-- each statement that stored some (sql/0010_indicators.sql, feeds_candle_notify).
CREATE INDEX dhan_candle_stored_at ON dhan_candle (stored_at);
CREATE TRIGGER dhan_candle_notify AFTER INSERT ON dhan_candle
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION feeds_candle_notify();

-- Instruments to collect when dhan.instruments_from_table = true (added to the file's list).
-- symbol: Dhan's trading symbol, or a security id in digits.
CREATE TABLE dhan_subscription (
    exchange_segment  text    NOT NULL,
    symbol            text    NOT NULL,
    mode              text    CHECK (mode IN ('ticker', 'quote', 'full')),   -- NULL: dhan.default_mode
    priority          integer NOT NULL DEFAULT 0 CHECK (priority >= 0),
    enabled           boolean NOT NULL DEFAULT true,
    PRIMARY KEY (exchange_segment, symbol)
);

INSERT INTO feed_partitioned_table (table_name, keep_days, ahead_days) VALUES
    ('dhan_tick_ticker', 30, 3),
    ('dhan_tick_quote', 30, 3),
    ('dhan_tick_full', 30, 3),
    ('dhan_tick_oi', 30, 3);

SELECT feeds_ensure_day_partitions(table_name, (now() AT TIME ZONE 'UTC')::date - 1, ahead_days + 1)
  FROM feed_partitioned_table WHERE table_name::text LIKE 'dhan\_tick\_%';

-- The newest row of every candle of every venue: the columns and rows of sql/0006_candles.sql,
-- and Dhan's candles with instrument = 'SEGMENT:security_id' (e.g. 'NSE_EQ:1333').
CREATE OR REPLACE VIEW candle_latest AS
SELECT 'ibkr'::text AS venue, i.* FROM (
    SELECT DISTINCT ON (symbol, interval_min, bar_start)
           symbol AS instrument, interval_min, bar_start, bar_end, open, high, low, close, volume, ticks,
           final, revision, source, recorded_at
      FROM ibkr_candle
     ORDER BY symbol, interval_min, bar_start, recorded_at DESC, revision DESC) i
UNION ALL
SELECT 'kite'::text AS venue, k.* FROM (
    SELECT DISTINCT ON (instrument_token, interval_min, bar_start)
           instrument_token::text AS instrument, interval_min, bar_start, bar_end, open, high, low, close,
           volume, ticks, final, revision, source, recorded_at
      FROM kite_candle
     ORDER BY instrument_token, interval_min, bar_start, recorded_at DESC, revision DESC) k
UNION ALL
SELECT 'dhan'::text AS venue, d.* FROM (
    SELECT DISTINCT ON (exchange_segment, security_id, interval_min, bar_start)
           exchange_segment || ':' || security_id AS instrument, interval_min, bar_start, bar_end, open, high,
           low, close, volume, ticks, final, revision, source, recorded_at
      FROM dhan_candle
     ORDER BY exchange_segment, security_id, interval_min, bar_start, recorded_at DESC, revision DESC) d;

-- feed-dhan (role feeds_dhan, created by sql/0009_dhan.sql) writes only its own tables: the sink's
-- COPY and staged INSERT ... ON CONFLICT DO NOTHING, daily partitions on demand.
GRANT SELECT, INSERT ON dhan_tick_ticker, dhan_tick_quote, dhan_tick_full, dhan_tick_oi, dhan_prev_close,
    dhan_market_status, dhan_disconnect, dhan_candle TO feeds_dhan;
GRANT SELECT ON dhan_subscription TO feeds_dhan;
GRANT EXECUTE ON FUNCTION feeds_ensure_day_partitions(regclass, date, integer) TO feeds_dhan;
GRANT SELECT ON dhan_tick_ticker, dhan_tick_quote, dhan_tick_full, dhan_tick_oi, dhan_prev_close,
    dhan_market_status, dhan_disconnect, dhan_candle, dhan_subscription TO feeds_reader;
-- feed-indicators reads every venue's candles (sql/0010_indicators.sql grants the others).
GRANT SELECT ON dhan_candle TO feeds_indicators;
