-- Candles (OHLCV bars) built by the collectors from live trades (lib/feeds/candles.py), or taken
-- from the venue's one-minute history for minutes a collector missed (source = 'history').
--
-- A candle is labelled by its start (bar_start) and ends at bar_end (exclusive). Intervals are
-- aligned to the session open (09:30 New York, 09:15 IST) and cut at the session's edges, so the
-- last 60-minute candle of an NSE day is 15:15-15:30 and an early close cuts the day's last candle.
-- A candle is written when its end + grace has passed; a late trade (within the collector's
-- candles.lateness) writes it again with revision + 1, so a candle may have several rows: the
-- newest recorded_at is the one to use (view candle_latest). final = false: written at shutdown
-- while still open, or incomplete (the collector started inside it).
-- Prices and volume are numeric, exactly as the venue gave them (Kite: paise / 100).
-- volume NULL = no volume (an index, a Kite LTP-mode instrument); ticks = trades folded in (for a
-- history bar, the venue's trade count, 0 when unknown).
-- recorded_at: when the collector produced the row; stored_at: when the row was committed
-- (clock_timestamp() at insert, not written by the collector: the latency measure).

CREATE TABLE ibkr_candle (
    symbol        text        NOT NULL,
    con_id        bigint,                 -- IB contract id, when resolved
    interval_min  smallint    NOT NULL CHECK (interval_min > 0),
    bar_start     timestamptz NOT NULL,
    bar_end       timestamptz NOT NULL,
    open          numeric     NOT NULL,
    high          numeric     NOT NULL,
    low           numeric     NOT NULL,
    close         numeric     NOT NULL,
    volume        numeric,
    ticks         integer     NOT NULL CHECK (ticks >= 0),
    final         boolean     NOT NULL,
    revision      integer     NOT NULL CHECK (revision >= 0),
    source        text        NOT NULL CHECK (source IN ('live', 'history')),
    recorded_at   timestamptz NOT NULL,
    stored_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (symbol, interval_min, bar_start, recorded_at),
    CHECK (bar_end > bar_start)
);

CREATE TABLE kite_candle (
    instrument_token  bigint      NOT NULL,
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
    PRIMARY KEY (instrument_token, interval_min, bar_start, recorded_at),
    CHECK (bar_end > bar_start)
);

-- The newest row of every candle of both venues: instrument = IB symbol or Kite instrument_token.
CREATE VIEW candle_latest AS
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
     ORDER BY instrument_token, interval_min, bar_start, recorded_at DESC, revision DESC) k;

-- Each collector writes its own candles (the sink's COPY and staged INSERT ... ON CONFLICT DO NOTHING).
GRANT SELECT, INSERT ON ibkr_candle TO feeds_ibkr;
GRANT SELECT, INSERT ON kite_candle TO feeds_kite;
GRANT SELECT ON ibkr_candle, kite_candle, candle_latest TO feeds_reader;
