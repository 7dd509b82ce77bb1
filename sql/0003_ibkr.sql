-- Interactive Brokers one-minute history (feed-backfill).
-- Bars are IB's historical TRADES bars with barSizeSetting "1 min", labelled by their
-- start, regular trading hours only (useRTH=1). Prices, volume and WAP are numeric,
-- stored from the decimal text TWS sent. All times UTC.
-- Venue document: TWS API reference, "Historical Bar Data" and "Historical Data Limitations".

-- Contracts as IB resolved them (reqContractDetails), with the head timestamp
-- (reqHeadTimeStamp): the first bar IB can serve for the contract.
CREATE TABLE ibkr_contract (
    symbol            text        PRIMARY KEY,   -- key of the contracts file row
    con_id            bigint,                    -- IB conId (NULL while unresolved)
    sec_type          text        NOT NULL,      -- STK, IND
    exchange          text        NOT NULL,
    primary_exchange  text        NOT NULL DEFAULT '',
    currency          text        NOT NULL,
    time_zone         text,                      -- IB timeZoneId, e.g. US/Eastern
    calendar          text        NOT NULL,      -- pandas_market_calendars name, e.g. XNYS
    head_timestamp    timestamptz,               -- first available bar (useRTH as configured)
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- One-minute bars.  Natural key: the contract and the bar start.
CREATE TABLE ibkr_bar_1min (
    symbol     text        NOT NULL,
    bar_start  timestamptz NOT NULL,   -- IB's bar date (the minute's start)
    con_id     bigint      NOT NULL,
    open       numeric     NOT NULL,
    high       numeric     NOT NULL,
    low        numeric     NOT NULL,
    close      numeric     NOT NULL,
    volume     numeric     NOT NULL,
    wap        numeric     NOT NULL,   -- IB's "average" (volume-weighted average price)
    bar_count  integer     NOT NULL,   -- IB's barCount (trades in the bar)
    PRIMARY KEY (symbol, bar_start)
);

-- One row per contract and exchange session: what the calendar expects and what is stored.
-- A session's bars and its row are committed in the same transaction.
--   PENDING      planned, or a transient failure (pacing, connection, timeout): fetched by every run
--   COMPLETE     IB answered in full and every bar passed the checks (regular session)
--   EARLY_CLOSE  the same, on an early-close session (e.g. 210 bars, 09:30-13:00)
--   HOLIDAY      a weekday the exchange calendar has no session: nothing requested
--   PARTIAL      IB answered, but the session had not settled when it was fetched: fetched again
--   ERROR        IB refused the request (error text kept) or a bar failed a check:
--                fetched again only with --retry-failed
-- COMPLETE/EARLY_CLOSE with actual_bars < expected_bars is a thinly traded session
-- (minutes without a trade have no TRADES bar); `note` says so.
CREATE TABLE ibkr_session_status (
    symbol         text        NOT NULL,
    session_date   date        NOT NULL,   -- the exchange's local trading date
    con_id         bigint,
    status         text        NOT NULL CHECK (status IN
                       ('PENDING', 'COMPLETE', 'EARLY_CLOSE', 'HOLIDAY', 'PARTIAL', 'ERROR')),
    session_open   timestamptz,            -- from the exchange calendar (NULL on a holiday)
    session_close  timestamptz,
    expected_bars  integer     NOT NULL DEFAULT 0,
    actual_bars    integer     NOT NULL DEFAULT 0,
    first_bar      timestamptz,
    last_bar       timestamptz,
    error          text,                   -- last error read for this session (IB code and text; kept
                                           -- after a successful retry, as a record)
    note           text,                   -- why actual < expected, bars dropped, ...
    attempts       integer     NOT NULL DEFAULT 0,   -- historical requests sent for it
    requested_at   timestamptz,            -- when the last one was sent (a new run's pacing starts from these)
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, session_date)
);
CREATE INDEX ibkr_session_status_todo ON ibkr_session_status (status, session_date)
    WHERE status IN ('PENDING', 'PARTIAL', 'ERROR');

-- One row per feed-backfill run.
CREATE TABLE ibkr_backfill_run (
    run_id          bigserial   PRIMARY KEY,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    state           text        NOT NULL DEFAULT 'running'
                        CHECK (state IN ('running', 'finished', 'failed', 'interrupted')),
    host            text        NOT NULL DEFAULT '',
    pid             integer,
    client_id       integer,
    arguments       text        NOT NULL DEFAULT '',
    sessions_planned integer    NOT NULL DEFAULT 0,
    sessions_done   integer     NOT NULL DEFAULT 0,
    requests        integer     NOT NULL DEFAULT 0,   -- historical data requests sent
    bars_stored     bigint      NOT NULL DEFAULT 0,
    errors          integer     NOT NULL DEFAULT 0,   -- IB errors read (all kinds)
    pacing_violations integer   NOT NULL DEFAULT 0,
    reconnects      integer     NOT NULL DEFAULT 0,
    summary         text
);
