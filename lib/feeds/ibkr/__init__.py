"""Interactive Brokers: the one-minute history backfill (``feed-backfill``).

Modules: :mod:`.contracts` (contracts file), :mod:`.sessions` (exchange
calendars), :mod:`.pacing` (IB's historical-data pacing rules),
:mod:`.bars` (exact bar values and checks), :mod:`.store` (PostgreSQL),
:mod:`.backfill` (the engine), :mod:`.main` (the command line).
"""
