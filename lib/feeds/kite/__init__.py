"""Zerodha Kite Connect: live ticks (``feed-zerodha``) and the daily access
token renewal (``feed-kite-token``).

Modules: :mod:`.adapter` (ticker packets -> table rows), :mod:`.instruments`
(instrument lists, resolution to instrument_token, connection split),
:mod:`.session` (NSE sessions from the XNSE calendar), :mod:`.token` (the
stored access token), :mod:`.login` (the renewal: headless Chromium, HTTP
fallback), :mod:`.collector` (KiteTicker connections -> sink), :mod:`.candles`
(ticks -> candles in ``kite_candle``), :mod:`.history` (Kite's historical
minute candles for the minutes missed before a start) and :mod:`.main` (the
command lines).
"""
