-- The kline check of feed-binance (lib/feeds/binance/klinecheck.py): minutes whose closed
-- one-minute kline (Binance's own candle) disagreed with the candle built from the aggTrades
-- the collector stored.  A row is written when the disagreement is found (stage 'found',
-- agg_* from the aggTrades received so far), and one more after the aggTrade gap fill of that
-- minute (stage 'after_fill', agg_* from the aggTrades stored after the fill, read back):
-- repaired says whether they now agree.  Minutes that agreed are only counted (STATUS).
-- List them with: feedctl kline-check [--symbol S] [--since DATE]
-- Venue document: https://developers.binance.com/docs/derivatives/usds-margined-futures/websocket-market-streams

CREATE TABLE binance_kline_check (
    symbol        text        NOT NULL,
    open_time     timestamptz NOT NULL,   -- the minute (kline t)
    checked_at    timestamptz NOT NULL,   -- when this comparison was made
    stage         text        NOT NULL CHECK (stage IN ('found', 'after_fill')),
    kline_open    numeric     NOT NULL,   -- o
    kline_high    numeric     NOT NULL,   -- h
    kline_low     numeric     NOT NULL,   -- l
    kline_close   numeric     NOT NULL,   -- c
    kline_volume  numeric     NOT NULL,   -- v
    kline_trades  bigint      NOT NULL,   -- n
    agg_open      numeric,                -- price of the lowest aggregate id; NULL: no aggTrade
    agg_high      numeric,
    agg_low       numeric,
    agg_close     numeric,                -- price of the highest aggregate id
    agg_volume    numeric     NOT NULL,   -- sum of q
    agg_trades    bigint      NOT NULL,   -- sum of l - f + 1
    differs       text        NOT NULL,   -- fields that disagree, comma-separated: open,high,low,close,volume,trades
    repaired      boolean,                -- after_fill: true when the stored aggTrades now agree; NULL in 'found'
    basis         text        NOT NULL CHECK (basis IN ('stream', 'stored', 'rest')),
                                          -- agg_* built from: the aggTrades received ('found'), those read back
                                          -- from binance_agg_trade, or (database not readable) those REST returned
    rest_trades   integer,                -- after_fill: aggTrades REST returned for the minute
    note          text,                   -- why a fill was not made, or what explains a remaining difference
    PRIMARY KEY (symbol, open_time, checked_at)
);
CREATE INDEX binance_kline_check_open_time ON binance_kline_check (open_time);

GRANT SELECT, INSERT ON binance_kline_check TO feeds_binance;
GRANT SELECT ON binance_kline_check TO feeds_reader;
