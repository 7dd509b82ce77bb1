"""Venue simulators that speak each venue's real wire protocol on loopback.

``binance``: USD-M futures REST and WebSocket market streams.
``tws``: the TWS API socket protocol as ib_async speaks it.
``kite``: Kite Connect REST, login pages and the binary ticker.
``dhan``: DhanHQ v2 REST (charts, instrument list, tokens) and the binary live market feed.
``common``: the server plumbing the Kite and Dhan simulators share (lifecycle, thread, control routes, faults).
"""
