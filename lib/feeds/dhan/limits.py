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
#: Requests per second to the non-trading APIs (profile, token renewal, ...) ("Rate Limit": 20).
NON_TRADING_REQUESTS_PER_SECOND = 20
#: Requests per day to the data APIs ("Rate Limit": 100,000).
DATA_REQUESTS_PER_DAY = 100_000
#: Days one intraday charts request may span ("Historical Data": 90 days at a time).
MAX_INTRADAY_DAYS_PER_REQUEST = 90

#: The feed server pings every 10 s ("Live Market Feed", "Keeping Connection Alive");
#: the WebSocket library answers with a pong.
SERVER_PING_INTERVAL_S = 10
#: ... and closes a connection whose client has not answered for more than 40 s (same section).
SERVER_IDLE_CLOSE_S = 40
#: Beyond MAX_CONNECTIONS_PER_USER, every new connection makes Dhan close the *first* one with
#: disconnect code 805 ("Live Market Feed", "Feed Disconnect"; the code in "Annexure", "Data API Error").
TOO_MANY_CONNECTIONS_CODE = 805
