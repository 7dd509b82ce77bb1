-- Interactive Brokers live market data (feed-ibkr): trades and quotes of stocks, index ticks,
-- and IB's errors about the subscriptions.
-- Prices and sizes are numeric, stored from the decimal text TWS sent. ib_time is IB's own time
-- of the tick where IB gives one (RTVolume: milliseconds; tick-by-tick: seconds; reqMktData
-- bid/ask: none), recv_time when feed-ibkr read it. All times UTC.
-- market_data_type is what IB reported for the subscription (TWS API marketDataType:
-- 1 real-time, 2 frozen, 3 delayed, 4 delayed-frozen; NULL before IB said).
-- A tick has no id of its own: (symbol, recv_time, seq) is its natural key, seq being a counter
-- of the collector process; a replayed spool therefore never duplicates a tick.
-- Tick tables are range-partitioned by day on recv_time.
-- Venue document: TWS API reference, "Market Data: Top of Book", "Tick-by-Tick Data",
-- "Market Data Types", "Message Codes".

-- Trades of stocks: RTVolume (generic tick 233: price;size;time;total volume;VWAP;single trade)
-- and, for the contracts in live.tick_by_tick, tick-by-tick AllLast; with delayed market data
-- (no RTVolume) the delayed last price and its size (source 'last', no IB time).
CREATE TABLE ibkr_trade (
    symbol            text        NOT NULL,   -- key of the contracts file row
    con_id            bigint,                 -- IB conId
    source            text        NOT NULL CHECK (source IN ('rtvolume', 'alllast', 'last')),
    price             numeric     NOT NULL,
    size              numeric     NOT NULL,
    ib_time           timestamptz,            -- RTVolume time (ms) / AllLast time (s) / none
    recv_time         timestamptz NOT NULL,
    seq               bigint      NOT NULL,
    market_data_type  smallint,
    total_volume      numeric,                -- RTVolume: the day's volume after this trade
    vwap              numeric,                -- RTVolume: the day's VWAP
    exchange          text,                   -- AllLast: where it traded
    conditions        text,                   -- AllLast: special conditions
    PRIMARY KEY (symbol, recv_time, seq)
) PARTITION BY RANGE (recv_time);

-- Bid and ask of stocks after each change: reqMktData (source 'mktdata', no IB time) and
-- tick-by-tick BidAsk (source 'bidask', IB's time). A side without a quote is NULL.
CREATE TABLE ibkr_quote (
    symbol            text        NOT NULL,
    con_id            bigint,
    source            text        NOT NULL CHECK (source IN ('mktdata', 'bidask')),
    bid               numeric,
    bid_size          numeric,
    ask               numeric,
    ask_size          numeric,
    ib_time           timestamptz,
    recv_time         timestamptz NOT NULL,
    seq               bigint      NOT NULL,
    market_data_type  smallint,
    PRIMARY KEY (symbol, recv_time, seq)
) PARTITION BY RANGE (recv_time);

-- Last price of indices (SPX on CBOE and others): reqMktData tick type LAST, with IB's last
-- timestamp (whole seconds) when it came with the price.
CREATE TABLE ibkr_index_tick (
    symbol            text        NOT NULL,
    con_id            bigint,
    price             numeric     NOT NULL,
    ib_time           timestamptz,
    recv_time         timestamptz NOT NULL,
    seq               bigint      NOT NULL,
    market_data_type  smallint,
    PRIMARY KEY (symbol, recv_time, seq)
) PARTITION BY RANGE (recv_time);

-- IB's errors about a contract's requests (354 not subscribed, 10089/10090/10167/10168 market
-- data permissions, 10190 tick-by-tick limit, 10197 competing live session, 200 no such
-- contract, ...), with IB's text, while the other contracts go on.
CREATE TABLE ibkr_live_error (
    symbol      text,
    con_id      bigint,
    request     text        NOT NULL,     -- mktData, AllLast, BidAsk, contractDetails, historicalData
    code        integer     NOT NULL,
    text        text        NOT NULL,
    error_time  timestamptz NOT NULL,     -- when feed-ibkr read it
    seq         bigint      NOT NULL,
    PRIMARY KEY (error_time, seq)
);
CREATE INDEX ibkr_live_error_symbol ON ibkr_live_error (symbol, error_time);

INSERT INTO feed_partitioned_table (table_name, keep_days, ahead_days) VALUES
    ('ibkr_trade', 30, 3),
    ('ibkr_quote', 30, 3),
    ('ibkr_index_tick', 30, 3);

SELECT feeds_ensure_day_partitions(table_name, (now() AT TIME ZONE 'UTC')::date - 1, ahead_days + 1)
  FROM feed_partitioned_table
 WHERE table_name::text IN ('ibkr_trade', 'ibkr_quote', 'ibkr_index_tick');

-- feeds_ibkr (feed-ibkr): rows through the sink (COPY, or INSERT ... ON CONFLICT DO NOTHING
-- through a TEMP staging table, which needs SELECT), partitions on demand.
GRANT SELECT, INSERT ON ibkr_trade, ibkr_quote, ibkr_index_tick, ibkr_live_error TO feeds_ibkr;
GRANT EXECUTE ON FUNCTION feeds_ensure_day_partitions(regclass, date, integer) TO feeds_ibkr;
GRANT SELECT ON ibkr_trade, ibkr_quote, ibkr_index_tick, ibkr_live_error TO feeds_reader;

-- feed-ibkr.service (and instances or test names starting with feed-ibkr) run as feeds_ibkr:
-- it may write their heartbeat rows.
INSERT INTO feed_unit_role (unit_pattern, role_name) VALUES ('feed-ibkr%', 'feeds_ibkr');
