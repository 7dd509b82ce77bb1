-- Zerodha Kite Connect ticks (KiteTicker modes LTP, quote, full) and the instruments they refer to.
-- Prices are numeric, built exactly from Kite's integer units (paise; 10^7 for CDS, 10^4 for BCD/NCO).
-- exchange_timestamp / last_trade_time are Kite's exchange times, recv_time is when the collector
-- received the frame. All times UTC (Kite's IST wall-clock times are converted).
-- A tick has no id of its own: (instrument_token, recv_time, seq) is its natural key, seq being the
-- packet's position in its frame; a replayed spool therefore never duplicates a tick.
-- Tick tables are range-partitioned by day on recv_time.
-- Venue document: https://kite.trade/docs/connect/v3/websocket/

-- LTP mode: 8-byte packets.
CREATE TABLE kite_tick_ltp (
    instrument_token  bigint      NOT NULL,
    last_price        numeric     NOT NULL,
    recv_time         timestamptz NOT NULL,
    seq               integer     NOT NULL,   -- position of the packet in its frame
    PRIMARY KEY (instrument_token, recv_time, seq)
) PARTITION BY RANGE (recv_time);

-- Quote mode: 44-byte packets, and 28-byte index quote packets (quantities NULL).
CREATE TABLE kite_tick_quote (
    instrument_token      bigint      NOT NULL,
    last_price            numeric     NOT NULL,
    last_traded_quantity  bigint,
    average_traded_price  numeric,
    volume_traded         bigint,
    total_buy_quantity    bigint,
    total_sell_quantity   bigint,
    open                  numeric     NOT NULL,
    high                  numeric     NOT NULL,
    low                   numeric     NOT NULL,
    close                 numeric     NOT NULL,   -- previous day's close
    recv_time             timestamptz NOT NULL,
    seq                   integer     NOT NULL,
    PRIMARY KEY (instrument_token, recv_time, seq)
) PARTITION BY RANGE (recv_time);

-- Full mode: 184-byte packets with the five best bids and offers (arrays, best first),
-- and 32-byte index full packets (quantities, OI and depth NULL).
CREATE TABLE kite_tick_full (
    instrument_token      bigint      NOT NULL,
    last_price            numeric     NOT NULL,
    last_traded_quantity  bigint,
    average_traded_price  numeric,
    volume_traded         bigint,
    total_buy_quantity    bigint,
    total_sell_quantity   bigint,
    open                  numeric     NOT NULL,
    high                  numeric     NOT NULL,
    low                   numeric     NOT NULL,
    close                 numeric     NOT NULL,
    last_trade_time       timestamptz,
    oi                    bigint,
    oi_day_high           bigint,
    oi_day_low            bigint,
    exchange_timestamp    timestamptz,
    bid_price             numeric[],   -- depth.buy[0..4].price
    bid_quantity          bigint[],
    bid_orders            integer[],
    ask_price             numeric[],   -- depth.sell[0..4].price
    ask_quantity          bigint[],
    ask_orders            integer[],
    recv_time             timestamptz NOT NULL,
    seq                   integer     NOT NULL,
    PRIMARY KEY (instrument_token, recv_time, seq)
) PARTITION BY RANGE (recv_time);

-- The instruments feed-zerodha resolved, from Kite's instrument list (upserted at each start),
-- so that ticks can be joined to their names.
CREATE TABLE kite_instrument (
    instrument_token  bigint      PRIMARY KEY,
    exchange_token    bigint      NOT NULL,
    exchange          text        NOT NULL,
    tradingsymbol     text        NOT NULL,
    name              text,
    segment           text,
    instrument_type   text,
    tick_size         numeric,
    lot_size          integer,
    expiry            date,
    strike            numeric,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX kite_instrument_symbol ON kite_instrument (exchange, tradingsymbol);

-- Instruments to collect when kite.instruments_from_table = true (added to the file's list).
CREATE TABLE kite_subscription (
    exchange       text    NOT NULL,
    tradingsymbol  text    NOT NULL,
    mode           text    NOT NULL DEFAULT 'full' CHECK (mode IN ('ltp', 'quote', 'full')),
    enabled        boolean NOT NULL DEFAULT true,
    PRIMARY KEY (exchange, tradingsymbol)
);

INSERT INTO feed_partitioned_table (table_name, keep_days, ahead_days) VALUES
    ('kite_tick_ltp', 30, 3),
    ('kite_tick_quote', 30, 3),
    ('kite_tick_full', 30, 3);

SELECT feeds_ensure_day_partitions(table_name, (now() AT TIME ZONE 'UTC')::date - 1, ahead_days + 1)
  FROM feed_partitioned_table WHERE table_name::text LIKE 'kite\_tick\_%';
