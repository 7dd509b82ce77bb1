-- What feed-backfill's "auto" pacing profile learned from IB's answers (lib/feeds/ibkr/pacing.py,
-- LearnedPacing): the profile in force and the requests in flight IB answered promptly, per
-- TWS / IB Gateway (host:port as configured in ibkr.toml, known before connecting) and bar size.
-- A run starts from this row while it is younger than backfill.relearn_hours, so IB is not
-- probed again; every fall back (a pacing violation, "query cancelled", slow answers) and the
-- ceiling replace it.
-- Venue document: TWS API reference, "Historical Data Limitations".
CREATE TABLE ibkr_pacing_learned (
    endpoint     text        NOT NULL,   -- TWS / IB Gateway as "host:port"
    bar_size     text        NOT NULL,   -- IB's barSizeSetting, e.g. '1 min'
    profile      text        NOT NULL CHECK (profile IN ('strict', 'documented')),
    concurrency  integer     NOT NULL CHECK (concurrency BETWEEN 1 AND 50),
    learned_at   timestamptz NOT NULL,   -- when it was learned
    why          text        NOT NULL DEFAULT '',   -- one line: what IB's answers showed
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint, bar_size)
);

-- feeds_ibkr (feed-backfill): reads and upserts its rows; everyone else only reads.
GRANT SELECT, INSERT, UPDATE ON ibkr_pacing_learned TO feeds_ibkr;
GRANT SELECT ON ibkr_pacing_learned TO feeds_reader;
