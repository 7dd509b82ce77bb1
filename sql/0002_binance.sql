-- Binance USD-M futures market streams.
-- Prices and quantities are numeric, stored exactly as the decimal strings Binance sent.
-- event_time is Binance's "E" (or the trade/transaction time named explicitly);
-- recv_time is when the collector received the frame. All times UTC.
-- Tick tables are range-partitioned by day on their event time; each natural key
-- includes that column so that a replayed row always meets its twin in one partition.
-- Venue document: https://developers.binance.com/docs/derivatives/usds-margined-futures/websocket-market-streams

-- <symbol>@aggTrade
CREATE TABLE binance_agg_trade (
    symbol          text        NOT NULL,
    agg_id          bigint      NOT NULL,   -- a
    price           numeric     NOT NULL,   -- p
    qty             numeric     NOT NULL,   -- q
    first_trade_id  bigint      NOT NULL,   -- f
    last_trade_id   bigint      NOT NULL,   -- l
    trade_time      timestamptz NOT NULL,   -- T
    is_buyer_maker  boolean     NOT NULL,   -- m
    event_time      timestamptz,            -- E (absent when filled from REST)
    recv_time       timestamptz NOT NULL,
    PRIMARY KEY (symbol, agg_id, trade_time)
) PARTITION BY RANGE (trade_time);

-- <symbol>@bookTicker
CREATE TABLE binance_book_ticker (
    symbol            text        NOT NULL,
    update_id         bigint      NOT NULL,   -- u
    bid_price         numeric     NOT NULL,   -- b
    bid_qty           numeric     NOT NULL,   -- B
    ask_price         numeric     NOT NULL,   -- a
    ask_qty           numeric     NOT NULL,   -- A
    transaction_time  timestamptz NOT NULL,   -- T
    event_time        timestamptz NOT NULL,   -- E
    recv_time         timestamptz NOT NULL,
    PRIMARY KEY (symbol, update_id, event_time)
) PARTITION BY RANGE (event_time);

-- <symbol>@markPrice@1s
CREATE TABLE binance_mark_price (
    symbol             text        NOT NULL,
    event_time         timestamptz NOT NULL,   -- E
    mark_price         numeric     NOT NULL,   -- p
    index_price        numeric,                -- i
    est_settle_price   numeric,                -- P
    funding_rate       numeric,                -- r
    next_funding_time  timestamptz,            -- T
    recv_time          timestamptz NOT NULL,
    PRIMARY KEY (symbol, event_time)
) PARTITION BY RANGE (event_time);

-- <symbol>@ticker (24h rolling window statistics)
CREATE TABLE binance_ticker_24h (
    symbol              text        NOT NULL,
    event_time          timestamptz NOT NULL,   -- E
    price_change        numeric     NOT NULL,   -- p
    price_change_pct    numeric     NOT NULL,   -- P
    weighted_avg_price  numeric     NOT NULL,   -- w
    last_price          numeric     NOT NULL,   -- c
    last_qty            numeric     NOT NULL,   -- Q
    open_price          numeric     NOT NULL,   -- o
    high_price          numeric     NOT NULL,   -- h
    low_price           numeric     NOT NULL,   -- l
    volume              numeric     NOT NULL,   -- v (base asset)
    quote_volume        numeric     NOT NULL,   -- q
    open_time           timestamptz NOT NULL,   -- O
    close_time          timestamptz NOT NULL,   -- C
    first_trade_id      bigint      NOT NULL,   -- F
    last_trade_id       bigint      NOT NULL,   -- L
    trade_count         bigint      NOT NULL,   -- n
    recv_time           timestamptz NOT NULL,
    PRIMARY KEY (symbol, event_time)
) PARTITION BY RANGE (event_time);

-- <symbol>@kline_<interval>, closed klines only (x = true), or filled from REST /fapi/v1/klines.
CREATE TABLE binance_kline (
    symbol                  text        NOT NULL,
    interval                text        NOT NULL,   -- i, e.g. 1m
    open_time               timestamptz NOT NULL,   -- t
    close_time              timestamptz NOT NULL,   -- T
    open                    numeric     NOT NULL,   -- o
    high                    numeric     NOT NULL,   -- h
    low                     numeric     NOT NULL,   -- l
    close                   numeric     NOT NULL,   -- c
    volume                  numeric     NOT NULL,   -- v
    trade_count             bigint      NOT NULL,   -- n
    quote_volume            numeric     NOT NULL,   -- q
    taker_buy_volume        numeric     NOT NULL,   -- V
    taker_buy_quote_volume  numeric     NOT NULL,   -- Q
    first_trade_id          bigint,                 -- f (websocket only)
    last_trade_id           bigint,                 -- L (websocket only)
    event_time              timestamptz,            -- E (websocket only)
    recv_time               timestamptz NOT NULL,
    source                  text        NOT NULL CHECK (source IN ('ws', 'rest')),
    PRIMARY KEY (symbol, interval, open_time)
);

-- aggTrade id ranges seen missing and not yet confirmed filled from REST; a restart
-- re-fills every range still listed here, so a gap fill cut short is never forgotten.
CREATE TABLE binance_agg_gap (
    symbol       text        NOT NULL,
    first_id     bigint      NOT NULL,
    last_id      bigint      NOT NULL CHECK (last_id >= first_id),
    detected_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, first_id)
);

INSERT INTO feed_partitioned_table (table_name, keep_days, ahead_days) VALUES
    ('binance_agg_trade', 30, 3),
    ('binance_book_ticker', 30, 3),
    ('binance_mark_price', 30, 3),
    ('binance_ticker_24h', 30, 3);

SELECT feeds_ensure_day_partitions(table_name, (now() AT TIME ZONE 'UTC')::date - 1, ahead_days + 1)
  FROM feed_partitioned_table;
