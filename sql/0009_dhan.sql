-- Dhan one-minute history (feed-dhan-backfill): candles, per-session status, run log,
-- adjustments found when history is fetched again, and the reconciliation of live candles.
-- Candles are Dhan's intraday charts candles (POST /v2/charts/intraday, interval "1"),
-- labelled by their start; prices, volume and OI numeric, stored from the decimal text Dhan
-- sent. All times UTC (Dhan's epoch seconds; sessions are 09:15-15:30 IST = 03:45-10:00 UTC).
-- Venue documents: DhanHQ v2 "Historical Data", "Annexure" (exchange segments).
-- The role feeds_dhan runs feed-dhan, feed-dhan-token and feed-dhan-backfill.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'feeds_dhan') THEN
        BEGIN
            CREATE ROLE feeds_dhan LOGIN;   -- peer authentication: OS user feeds_dhan
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;   -- created meanwhile by a migration of another database of the cluster
        END;
    END IF;
END $$;

-- Instruments as resolved from Dhan's instrument list (scrip master), one row per
-- exchange segment and security id.
CREATE TABLE dhan_instrument (
    exchange_segment  text        NOT NULL,   -- NSE_EQ, IDX_I, NSE_FNO, BSE_EQ, ...
    security_id       bigint      NOT NULL,   -- Dhan's securityId
    symbol            text        NOT NULL,   -- SEM_TRADING_SYMBOL, e.g. HDFCBANK
    instrument        text        NOT NULL,   -- SEM_INSTRUMENT_NAME, e.g. EQUITY, INDEX
    tick_size         numeric,                -- rupees (SEM_TICK_SIZE / 100)
    lot_size          numeric,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (exchange_segment, security_id)
);

-- Adjustments: a session fetched again that differs from the stored one by a consistent
-- factor (a bonus, a split): fetched prices = stored / price_factor (each within a tick),
-- fetched volume = stored * volume_factor (within rounding).  kind 'revision' records a
-- session whose new answer differs without a consistent factor (both versions kept too).
CREATE TABLE dhan_adjustment (
    adjustment_id        bigserial   PRIMARY KEY,
    exchange_segment     text        NOT NULL,
    security_id          bigint      NOT NULL,
    symbol               text        NOT NULL,
    session_date         date        NOT NULL,   -- the IST trading date compared
    kind                 text        NOT NULL DEFAULT 'factor' CHECK (kind IN ('factor', 'revision')),
    price_factor         numeric,                -- e.g. 2 after a 1:1 bonus (prices halved)
    volume_factor        numeric,                -- e.g. 2 after a 1:1 bonus (volume doubled)
    interval_minutes     integer     NOT NULL,   -- candle interval of the new answer compared
    candles_compared     integer     NOT NULL,
    stored_first_close   numeric,                -- evidence: the first candle's close as stored ...
    fetched_first_close  numeric,                -- ... and as fetched again
    stored_version       integer     NOT NULL,   -- the dhan_bar version compared with
    new_version          integer,                -- the dhan_bar version holding the new answer (NULL:
                                                 -- another interval than one minute, not stored)
    found_at             timestamptz NOT NULL DEFAULT now(),
    detail               text,
    UNIQUE (exchange_segment, security_id, session_date, interval_minutes, stored_version)
);

-- One-minute candles. Natural key: the instrument, the minute, the version.  Version 0 is
-- the first answer stored; a session fetched again after Dhan adjusted its history is stored
-- as the next version with its adjustment_id, the earlier one kept (never overwritten).
CREATE TABLE dhan_bar (
    exchange_segment  text        NOT NULL,
    security_id       bigint      NOT NULL,
    symbol            text        NOT NULL,
    bar_start         timestamptz NOT NULL,   -- Dhan's timestamp (the minute's start)
    version           integer     NOT NULL DEFAULT 0,
    open              numeric     NOT NULL,
    high              numeric     NOT NULL,
    low               numeric     NOT NULL,
    close             numeric     NOT NULL,
    volume            numeric     NOT NULL,
    oi                numeric,                -- open interest (derivatives; NULL when not asked)
    adjustment_id     bigint      REFERENCES dhan_adjustment,
    PRIMARY KEY (exchange_segment, security_id, bar_start, version)
);
CREATE INDEX dhan_bar_symbol ON dhan_bar (symbol, bar_start);

-- The newest version of every candle.
CREATE VIEW dhan_bar_latest AS
SELECT DISTINCT ON (exchange_segment, security_id, bar_start) *
  FROM dhan_bar ORDER BY exchange_segment, security_id, bar_start, version DESC;

-- One row per instrument and exchange session (the shared backfill status, feeds.backfill):
--   PENDING      planned, or a transient failure (rate limit, connection, timeout): fetched by every run
--   COMPLETE     Dhan answered and every candle passed the checks: as many candles as minutes
--   EARLY_CLOSE  the same on an early-close session
--   THIN         the same with fewer candles than the calendar's minutes (minutes without a trade)
--   HOLIDAY      a day of the exchange's week without a session: nothing requested
--   PARTIAL      answered before the session settled: fetched again
--   ERROR        Dhan refused the request (code and text kept), no candle at all for a session the
--                calendar has, or a candle failed a check: fetched again only with --retry-failed
-- instrument is 'SEGMENT:SYMBOL' as in the instruments file, e.g. 'NSE_EQ:HDFCBANK'.
CREATE TABLE dhan_session_status (
    instrument     text        NOT NULL,
    session_date   date        NOT NULL,   -- the IST trading date
    security_id    bigint,
    status         text        NOT NULL CHECK (status IN
                       ('PENDING', 'COMPLETE', 'EARLY_CLOSE', 'THIN', 'HOLIDAY', 'PARTIAL', 'ERROR')),
    session_open   timestamptz,            -- from the XNSE calendar (NULL on a holiday)
    session_close  timestamptz,
    expected_bars  integer     NOT NULL DEFAULT 0,
    actual_bars    integer     NOT NULL DEFAULT 0,
    first_bar      timestamptz,
    last_bar       timestamptz,
    error          text,                   -- last error (Dhan's code and message)
    note           text,                   -- thin minutes, candles dropped, adjustments, ...
    attempts       integer     NOT NULL DEFAULT 0,   -- requests that covered it
    requested_at   timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instrument, session_date)
);
CREATE INDEX dhan_session_status_todo ON dhan_session_status (status, session_date)
    WHERE status IN ('PENDING', 'PARTIAL', 'ERROR');

-- One row per feed-dhan-backfill run (pacing_violations: Dhan's 429 / DH-904 answers).
CREATE TABLE dhan_backfill_run (
    run_id          bigserial   PRIMARY KEY,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    state           text        NOT NULL DEFAULT 'running'
                        CHECK (state IN ('running', 'finished', 'failed', 'interrupted')),
    host            text        NOT NULL DEFAULT '',
    pid             integer,
    client_id       text,                  -- the Dhan client id
    arguments       text        NOT NULL DEFAULT '',
    sessions_planned integer    NOT NULL DEFAULT 0,
    sessions_done   integer     NOT NULL DEFAULT 0,
    requests        integer     NOT NULL DEFAULT 0,   -- data API requests sent
    bars_stored     bigint      NOT NULL DEFAULT 0,
    errors          integer     NOT NULL DEFAULT 0,   -- Dhan error answers (all kinds)
    pacing_violations integer   NOT NULL DEFAULT 0,   -- 429 / DH-904 answers
    reconnects      integer     NOT NULL DEFAULT 0,
    adjustments     integer     NOT NULL DEFAULT 0,
    summary         text
);

-- Reconciliation: live one-minute candles (dhan_candle, built by feed-dhan) against Dhan's
-- own one-minute candles for the same minutes, per instrument and session.
CREATE TABLE dhan_reconciliation (
    exchange_segment   text        NOT NULL,
    security_id        bigint      NOT NULL,
    symbol             text        NOT NULL,
    session_date       date        NOT NULL,
    interval_minutes   integer     NOT NULL DEFAULT 1,
    minutes_compared   integer     NOT NULL,   -- minutes present on both sides
    minutes_differing  integer     NOT NULL,   -- of those, with any of OHLCV different
    missing_live       integer     NOT NULL,   -- minutes Dhan has and the live candles lack
    missing_dhan       integer     NOT NULL,   -- minutes the live candles have and Dhan lacks
    detail             text,                   -- the first differences, e.g. '09:31 close 1650.4/1650.45'
    checked_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (exchange_segment, security_id, session_date, interval_minutes)
);

-- feeds_dhan writes only its own tables; feeds_reader reads all.
GRANT USAGE ON SCHEMA public TO feeds_dhan;
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO feeds_dhan', current_database());
END $$;
GRANT SELECT, INSERT, UPDATE ON dhan_instrument, dhan_session_status, dhan_backfill_run, dhan_reconciliation
    TO feeds_dhan;
GRANT SELECT, INSERT, DELETE ON dhan_bar TO feeds_dhan;
GRANT SELECT, INSERT ON dhan_adjustment TO feeds_dhan;
GRANT SELECT ON dhan_bar_latest TO feeds_dhan;
GRANT USAGE ON SEQUENCE dhan_backfill_run_run_id_seq, dhan_adjustment_adjustment_id_seq TO feeds_dhan;
GRANT SELECT ON dhan_instrument, dhan_adjustment, dhan_bar, dhan_bar_latest, dhan_session_status,
    dhan_backfill_run, dhan_reconciliation TO feeds_reader;

-- Heartbeat rows: feed-dhan, feed-dhan-token and feed-dhan-backfill (and test names starting
-- with feed-dhan) run as feeds_dhan.
GRANT SELECT ON feed_unit_role TO feeds_dhan;
GRANT SELECT, INSERT, UPDATE ON feed_heartbeat TO feeds_dhan;
INSERT INTO feed_unit_role (unit_pattern, role_name) VALUES ('feed-dhan%', 'feeds_dhan');
