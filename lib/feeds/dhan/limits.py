"""Dhan's documented limits, in one place.

Venue documents: DhanHQ v2 "Live Market Feed" (connections, instruments,
messages), "Rate Limit" (data APIs) and "Historical Data" (the range of one
intraday request).  A setting may lower a limit, never raise it.
"""
from __future__ import annotations

#: WebSocket connections of the live market feed per user ("Live Market Feed": up to 5).
MAX_CONNECTIONS_PER_USER = 5
#: Instruments subscribed on one feed connection ("Live Market Feed": up to 5,000).
MAX_INSTRUMENTS_PER_CONNECTION = 5000
#: Instruments in one subscribe or unsubscribe JSON message ("Live Market Feed": up to 100).
MAX_INSTRUMENTS_PER_MESSAGE = 100

#: Requests per second to the data APIs (market quote, historical and intraday charts) ("Rate Limit").
DATA_REQUESTS_PER_SECOND = 5
#: Requests per day to the data APIs ("Rate Limit": 100,000).
DATA_REQUESTS_PER_DAY = 100_000
#: Days one intraday charts request may span ("Historical Data": 90 days at a time).
MAX_INTRADAY_DAYS_PER_REQUEST = 90
