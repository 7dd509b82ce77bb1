"""Dhan (DhanHQ v2): the live market feed (feed-dhan), the access token
(feed-dhan-token) and one-minute history (feed-dhan-backfill)."""
