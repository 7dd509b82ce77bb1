"""Kite simulator against the unmodified kiteconnect 5.2.2 client.

REST goes through ``KiteConnect(api_key, root=...)``; the login flow through
plain ``requests`` with a cookie jar (and headless Chromium when Debian's
``/usr/bin/chromium`` is installed); the ticker through ``KiteTicker``.

KiteTicker runs a Twisted reactor, which cannot be restarted within one
process.  Every ticker test therefore runs the KiteTicker client in a child
process: this same file started as a script (``ticker-client`` mode), which
prints one JSON event per line (connect, ticks, raw messages with their
packet lengths, errors, closes) and takes commands (subscribe, mode, raw
text, stop) on stdin.  Each test gets a fresh reactor and a fresh simulator,
so tests stay independent and can run in any order.  The child runs with
``TZ=Asia/Kolkata`` so that the naive datetimes KiteTicker builds with
``datetime.fromtimestamp`` are IST wall clock, like the recorded ticks.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import struct
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

if __name__ != "__main__":
    # Under pytest only: the ticker child process (this file as a script) stays light.
    import numpy as np
    import pyotp
    import pytest
    import requests
    from kiteconnect import KiteConnect
    from kiteconnect import exceptions as kex

    from feeds.sim.kite import KiteSimulator
    from feeds.sim.kite_auth import next_daily_expiry
    from feeds.sim.kite_instruments import HEADER, InstrumentMaster
    from feeds.sim.kite_packets import IST, MODE_FULL, MODE_LTP, MODE_QUOTE, Market

DATA = Path(os.environ.get("FEEDS_SHARED_DATA") or Path(__file__).resolve().parents[2] / ".." / "shared" / "data")
KITE_DATA = DATA / "kite"
HAVE_DATA = (KITE_DATA / "ticker_full.packet").is_file()

INFY = 408065
NIFTY = 256265
RELIANCE = 738561


# =============================================================================
# the KiteTicker child process


def _packet_lengths(payload: bytes) -> list[int]:
    """Lengths of the packets in a ticker frame, read from its headers."""
    n = struct.unpack_from(">H", payload, 0)[0]
    out, j = [], 2
    for _ in range(n):
        if j + 2 > len(payload):
            break
        length = struct.unpack_from(">H", payload, j)[0]
        out.append(length)
        j += 2 + length
    return out


def _ticker_client_main(argv: list[str]) -> None:
    """Run KiteTicker client(s); events to stdout as JSON lines, commands from stdin."""
    import argparse

    from kiteconnect import KiteTicker
    from twisted.internet import reactor

    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--access-token", required=True)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--no-retry", action="store_true")
    args = ap.parse_args(argv)
    lock = threading.Lock()

    def emit(**event) -> None:
        line = json.dumps(event, default=lambda o: o.isoformat() if isinstance(o, datetime) else str(o))
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    tickers = []
    for i in range(args.count):
        kws = KiteTicker(args.api_key, args.access_token, root=args.root, reconnect_max_delay=5)

        def on_connect(ws, response, i=i):
            emit(ev="connect", conn=i)

        def on_ticks(ws, ticks, i=i):
            emit(ev="ticks", conn=i, t=time.monotonic(), n=len(ticks), ticks=ticks if len(ticks) <= 20 else [])

        def on_message(ws, payload, is_binary, i=i):
            event = {"ev": "msg", "conn": i, "t": time.monotonic(), "len": len(payload), "binary": is_binary}
            if is_binary and len(payload) >= 2:
                event["packet_lengths"] = _packet_lengths(payload)[:50]
            elif not is_binary:
                event["text"] = payload.decode("utf-8", "replace")
            emit(**event)

        def on_error(ws, code, reason, i=i):
            emit(ev="error", conn=i, code=code, reason=str(reason))

        def on_close(ws, code, reason, i=i):
            emit(ev="close", conn=i, code=code, reason=str(reason))
            if args.no_retry:
                ws.stop_retry()

        def on_reconnect(ws, attempt, i=i):
            emit(ev="reconnect", conn=i, attempt=attempt)

        kws.on_connect, kws.on_ticks, kws.on_message = on_connect, on_ticks, on_message
        kws.on_error, kws.on_close, kws.on_reconnect = on_error, on_close, on_reconnect
        tickers.append(kws)

    tickers[0].connect(threaded=True)
    for kws in tickers[1:]:
        reactor.callFromThread(kws.connect)
    for line in sys.stdin:
        cmd = json.loads(line)
        kws = tickers[cmd.get("conn", 0)]
        name = cmd["cmd"]
        if name == "subscribe":
            reactor.callFromThread(kws.subscribe, cmd["tokens"])
        elif name == "unsubscribe":
            reactor.callFromThread(kws.unsubscribe, cmd["tokens"])
        elif name == "mode":
            reactor.callFromThread(kws.set_mode, cmd["mode"], cmd["tokens"])
        elif name == "raw":
            reactor.callFromThread(kws.ws.sendMessage, cmd["text"].encode())
        elif name == "stop":
            break
    sys.stdout.flush()
    os._exit(0)


class TickerProc:
    """A KiteTicker child process and the events it reported."""

    def __init__(self, sim, token: str, *, count: int = 1, retry: bool = True) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "ticker-client", "--root", sim.ws_url,
               f"--api-key={sim.account.api_key}", f"--access-token={token}", "--count", str(count)]
        if not retry:
            cmd.append("--no-retry")
        env = dict(os.environ, TZ="Asia/Kolkata")
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=env, bufsize=1)
        self.events: list[dict] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self._queue.put(json.loads(line))
            except ValueError:
                continue

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def wait_for(self, predicate, timeout: float = 60.0, after: int = 0) -> dict:
        """Return the first event at position >= ``after`` (seen or new) matching predicate.

        Fails the test after ``timeout`` seconds.
        """
        for event in self.events[after:]:
            if predicate(event):
                return event
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching ticker event within {timeout}s; last: {self.events[-5:]}; "
                                     f"client stderr: {self.stderr_text()[-2000:]!r}")
            try:
                event = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            self.events.append(event)
            if predicate(event):
                return event

    def wait_count(self, predicate, n: int, timeout: float = 60.0) -> list[dict]:
        """Wait until n events match predicate; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events if predicate(e)]
            if len(found) >= n:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{len(found)}/{n} matching ticker events within {timeout}s")
            try:
                self.events.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                pass

    def collect(self, seconds: float) -> None:
        """Gather events for the given time."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                self.events.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                pass

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(cmd="stop")
                self.proc.wait(timeout=3)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=3)
        for stream in (self.proc.stdin, self.proc.stdout, self.stderr):
            try:
                stream.close()
            except OSError:
                pass


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "ticker-client":
        _ticker_client_main(sys.argv[2:])
    sys.exit(0)


needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"recorded Kite data not found under {KITE_DATA}")


def _expected(name: str) -> dict:
    return json.loads((KITE_DATA / name).read_text())


def _sim(**kw) -> "KiteSimulator":
    kw.setdefault("data_dir", DATA if DATA.is_dir() else None)
    return KiteSimulator(**kw)


def _wait_until(predicate, timeout: float = 60.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.fixture
def ticker_procs():
    procs: list[TickerProc] = []
    yield procs
    for p in procs:
        p.close()


# =============================================================================
# packets and instrument master (no network)


def test_generated_packets_decode_with_kiteticker_parser():
    from kiteconnect import KiteTicker

    cds = (90_001 << 8) | 3
    market = Market([RELIANCE, NIFTY, cds], [0.05, 0.0, 0.0025], [2450.0, 22000.0, 83.25], seed=7)
    rows = np.arange(3)
    market.advance(rows)
    parse = KiteTicker("k", "t")._parse_binary

    def decode(modes):
        frame = market.pack(rows, np.array(modes))
        return {t["instrument_token"]: t for t in parse(frame)}, _packet_lengths(frame)

    ticks, lengths = decode([MODE_LTP] * 3)
    assert lengths == [8, 8, 8]
    assert ticks[cds]["last_price"] == market.last_price[2] / 10**7
    assert round(ticks[cds]["last_price"], 4) == ticks[cds]["last_price"]  # 0.0025 ticks survive 10^7
    assert ticks[RELIANCE]["last_price"] == market.last_price[0] / 100

    ticks, lengths = decode([MODE_QUOTE] * 3)
    assert sorted(lengths) == [28, 44, 44]
    assert ticks[NIFTY]["tradable"] is False and "exchange_timestamp" not in ticks[NIFTY]
    assert ticks[NIFTY]["ohlc"]["close"] == 22000.0
    assert ticks[RELIANCE]["volume_traded"] == market.volume[0]

    ticks, lengths = decode([MODE_FULL] * 3)
    assert sorted(lengths) == [32, 184, 184]
    assert ticks[NIFTY]["mode"] == "full" and ticks[NIFTY]["exchange_timestamp"] is not None
    depth = ticks[RELIANCE]["depth"]
    assert len(depth["buy"]) == 5 and len(depth["sell"]) == 5
    bids = [level["price"] for level in depth["buy"]]
    asks = [level["price"] for level in depth["sell"]]
    assert bids == sorted(bids, reverse=True) and asks == sorted(asks) and bids[0] < asks[0]
    assert asks[0] == ticks[RELIANCE]["last_price"]
    assert all(level["quantity"] > 0 and level["orders"] > 0 for level in depth["buy"] + depth["sell"])


def test_instrument_master_has_ten_thousand_nse_equities_and_recorded_rows():
    master = InstrumentMaster.build(KITE_DATA if HAVE_DATA else None)
    nse_eq = [i for i in master.instruments if i.exchange == "NSE" and i.instrument_type == "EQ" and not i.is_index]
    assert len(nse_eq) >= 10_000
    tokens = [i.instrument_token for i in master.instruments]
    assert len(tokens) == len(set(tokens))
    assert all(i.instrument_token == (i.exchange_token << 8) | (i.instrument_token & 0xFF) for i in master.instruments)
    assert master.by_key["NSE:INFY"].instrument_token == INFY
    assert master.by_key["NSE:NIFTY 50"].is_index
    if HAVE_DATA:
        with (KITE_DATA / "instruments_all.csv").open(newline="") as fh:
            recorded = list(csv.reader(fh))[1:]
        served = {i.row for i in master.instruments}
        assert all(tuple(row) in served for row in recorded)


def test_daily_token_expiry_is_next_0600_ist():
    before_six = datetime(2024, 3, 5, 5, 59, 59, tzinfo=IST).timestamp()
    after_six = datetime(2024, 3, 5, 6, 0, 0, tzinfo=IST).timestamp()
    assert next_daily_expiry(before_six) == datetime(2024, 3, 5, 6, 0, tzinfo=IST).timestamp()
    assert next_daily_expiry(after_six) == datetime(2024, 3, 6, 6, 0, tzinfo=IST).timestamp()


# =============================================================================
# REST through KiteConnect


@pytest.fixture(scope="module")
def rest_sim():
    with _sim(rest_rate_limits=False).running() as sim:
        yield sim


def _login_request_token(sim, session: "requests.Session | None" = None) -> str:
    """The no-browser login: /api/login, /api/twofa, then /connect/login follows to the redirect."""
    s = session or requests.Session()
    base = sim.base_url
    r = s.post(f"{base}/api/login", data={"user_id": sim.account.user_id, "password": sim.account.password}, timeout=5)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["twofa_type"] == "totp"
    r = s.post(f"{base}/api/twofa", timeout=5, data={
        "user_id": data["user_id"], "request_id": data["request_id"],
        "twofa_value": pyotp.TOTP(sim.account.totp_secret).now(), "twofa_type": "totp"})
    assert r.status_code == 200, r.text
    r = s.get(f"{base}/connect/login", params={"api_key": sim.account.api_key, "v": "3"}, timeout=5)
    assert r.status_code == 200 and [h.status_code for h in r.history] == [302, 302, 302]
    query = dict(parse_qsl(urlsplit(r.url).query))
    assert query["action"] == "login" and query["status"] == "success"
    return query["request_token"]


def _kite(sim) -> "KiteConnect":
    kite = KiteConnect(sim.account.api_key, root=sim.base_url)
    kite.generate_session(_login_request_token(sim), sim.account.api_secret)
    return kite


def test_instruments_csv_through_kiteconnect(rest_sim):
    kite = KiteConnect(rest_sim.account.api_key, root=rest_sim.base_url)
    everything = kite.instruments()
    nse = kite.instruments("NSE")
    assert len(everything) == len(rest_sim.master.instruments)
    assert {r["exchange"] for r in nse} == {"NSE"}
    assert sum(1 for r in nse if r["instrument_type"] == "EQ" and r["segment"] == "NSE") >= 10_000
    infy = next(r for r in nse if r["tradingsymbol"] == "INFY")
    assert infy["instrument_token"] == INFY and infy["tick_size"] == 0.05
    raw = requests.get(f"{rest_sim.base_url}/instruments", timeout=5)
    assert raw.headers["Content-Type"].startswith("text/csv")
    assert raw.text.splitlines()[0] == ",".join(HEADER)
    with pytest.raises(kex.InputException):
        kite.instruments("NOPE")


@needs_data
def test_instruments_serve_recorded_rows_unchanged(rest_sim):
    served = requests.get(f"{rest_sim.base_url}/instruments", timeout=5).text.splitlines()
    for name in ("instruments_all.csv", "instruments_nse.csv"):
        recorded = (KITE_DATA / name).read_text().splitlines()
        assert recorded[0] == served[0]
        assert set(recorded[1:]) <= set(served[1:])


def test_generate_session_checksum_and_profile(rest_sim):
    kite = KiteConnect(rest_sim.account.api_key, root=rest_sim.base_url)
    request_token = _login_request_token(rest_sim)
    with pytest.raises(kex.TokenException) as bad:
        kite.generate_session(request_token, "wrong-secret")
    assert bad.value.code == 403
    session = kite.generate_session(request_token, rest_sim.account.api_secret)
    expected_keys = set(_expected("generate_session.json")["data"]) if HAVE_DATA else {"access_token"}
    assert expected_keys <= set(session)
    assert session["user_id"] == rest_sim.account.user_id and session["access_token"]
    assert isinstance(session["login_time"], datetime)
    profile = kite.profile()
    assert profile["user_id"] == rest_sim.account.user_id
    if HAVE_DATA:
        assert set(profile) == set(_expected("profile.json")["data"])
    # A request_token is good for one exchange only.
    with pytest.raises(kex.TokenException):
        kite.generate_session(request_token, rest_sim.account.api_secret)


def test_invalid_and_expired_tokens_raise_token_exception():
    with _sim(token_ttl=600, rest_rate_limits=False).running() as sim:
        ahead = [0.0]  # seconds the simulator's auth clock runs ahead of the wall clock
        sim.auth.clock = lambda: time.time() + ahead[0]
        kite = _kite(sim)
        assert kite.profile()["user_id"] == sim.account.user_id
        ahead[0] = 300.0
        assert kite.profile()["user_id"] == sim.account.user_id  # still inside its lifetime
        ahead[0] = 601.0
        with pytest.raises(kex.TokenException) as exc:
            kite.profile()
        assert exc.value.code == 403 and str(exc.value) == "Incorrect `api_key` or `access_token`."
        ahead[0] = 0.0

        kite = _kite(sim)
        kite.set_access_token("not-a-token")
        with pytest.raises(kex.TokenException):
            kite.ltp("NSE:INFY")

    with _sim(rest_rate_limits=False).running() as sim:
        kite = _kite(sim)
        kite.profile()
        assert sim.fault_expire_tokens() == 1
        with pytest.raises(kex.TokenException):
            kite.quote("NSE:INFY")


@needs_data
def test_quote_ltp_ohlc_shapes_and_recorded_infy(rest_sim):
    kite = _kite(rest_sim)
    full = _expected("ticker_full.json")
    quote = kite.quote("NSE:INFY", "NSE:RELIANCE", "NSE:NOSUCH")
    assert set(quote) == {"NSE:INFY", "NSE:RELIANCE"}
    infy = quote["NSE:INFY"]
    assert set(infy) == set(_expected("quote.json")["data"]["NSE:INFY"])
    assert infy["last_price"] == full["last_price"] and infy["volume"] == full["volume"]
    assert infy["ohlc"] == full["ohlc"]
    assert infy["depth"] == full["depth"]
    assert infy["timestamp"] == datetime(2021, 7, 5, 10, 41, 27)  # IST wall clock, as Kite sends it
    rel = quote["NSE:RELIANCE"]
    assert rel["depth"]["buy"][0]["price"] < rel["depth"]["sell"][0]["price"]

    ltp = kite.ltp("NSE:INFY")
    assert ltp == {"NSE:INFY": {"instrument_token": INFY, "last_price": full["last_price"]}}
    assert set(ltp["NSE:INFY"]) == set(_expected("ltp.json")["data"]["NSE:INFY"])
    ohlc = kite.ohlc("NSE:INFY")["NSE:INFY"]
    assert set(ohlc) == set(_expected("ohlc.json")["data"]["NSE:INFY"])
    assert ohlc["ohlc"] == full["ohlc"]


def test_quote_rate_limit_answers_429():
    with _sim().running() as sim:
        kite = _kite(sim)
        kite.ltp("NSE:INFY")
        # Calls one after the other: one of them falls within a second of the one before it
        # (on a busy machine not necessarily the first) and is refused.
        deadline = time.monotonic() + 60
        while True:
            try:
                kite.ltp("NSE:INFY")
            except kex.NetworkException as e:
                exc = e
                break
            assert time.monotonic() < deadline, "LTP calls in a row were never refused"
        assert exc.code == 429 and str(exc) == "Too many requests"
        kite.quote("NSE:INFY")  # each quote endpoint has its own one-per-second window
        assert sim.stats()["rate_limited"] == 1


def test_historical_minute_candles(rest_sim):
    kite = _kite(rest_sim)
    day = date(2024, 3, 1)  # an NSE trading day (Friday)
    candles = kite.historical_data(INFY, f"{day} 00:00:00", f"{day} 23:59:59", "minute")
    assert len(candles) == 375
    assert candles[0]["date"] == datetime(2024, 3, 1, 9, 15, tzinfo=IST)
    assert candles[-1]["date"] == datetime(2024, 3, 1, 15, 29, tzinfo=IST)
    steps = {(b["date"] - a["date"]) for a, b in zip(candles, candles[1:])}
    assert steps == {timedelta(minutes=1)}
    for c in candles:
        assert c["low"] <= min(c["open"], c["close"]) <= max(c["open"], c["close"]) <= c["high"]
        assert c["volume"] > 0
    raw = requests.get(f"{rest_sim.base_url}/instruments/historical/{INFY}/minute",
                       params={"from": f"{day} 09:15:00", "to": f"{day} 09:20:00"},
                       headers={"Authorization": f"token {kite.api_key}:{kite.access_token}"}, timeout=5).json()
    assert raw["status"] == "success" and len(raw["data"]["candles"]) == 6
    assert raw["data"]["candles"][0][0] == "2024-03-01T09:15:00+0530"
    if HAVE_DATA:
        sample = _expected("historical_minute.json")["data"]["candles"][0]
        assert [type(v) in (int, float) for v in raw["data"]["candles"][0][1:]] == \
               [type(v) in (int, float) for v in sample[1:]]
    # The same request gives the same candles; weekends give none.
    again = kite.historical_data(INFY, f"{day} 09:15:00", f"{day} 09:20:00", "minute")
    assert [(c["open"], c["close"], c["volume"]) for c in again] == \
           [(c["open"], c["close"], c["volume"]) for c in candles[:6]]
    assert kite.historical_data(INFY, "2024-03-02 00:00:00", "2024-03-03 23:59:59", "minute") == []
    with pytest.raises(kex.InputException, match="60 days"):
        kite.historical_data(INFY, "2024-01-01 00:00:00", "2024-03-15 00:00:00", "minute")


# =============================================================================
# login flow without a browser


def _fresh_login_sim(**kw):
    kw.setdefault("redirect_url", "http://127.0.0.1:9/kite/callback?app=feeds")
    return _sim(**kw)


def test_login_flow_redirects_with_request_token():
    with _fresh_login_sim().running() as sim:
        s = requests.Session()
        base = sim.base_url
        r = s.get(f"{base}/connect/login", params={"api_key": sim.account.api_key, "v": "3"},
                  allow_redirects=False, timeout=5)
        assert r.status_code == 302 and "sess_id=" in r.headers["Location"]
        page = s.get(base + r.headers["Location"], timeout=5)
        assert page.status_code == 200 and 'id="form"' in page.text
        r = s.post(f"{base}/api/login", data={"user_id": sim.account.user_id, "password": sim.account.password},
                   timeout=5)
        login = r.json()["data"]
        r = s.post(f"{base}/api/twofa", timeout=5, data={
            "user_id": login["user_id"], "request_id": login["request_id"],
            "twofa_value": pyotp.TOTP(sim.account.totp_secret).now(), "twofa_type": "totp"})
        assert r.json() == {"status": "success", "data": {"profile": {}}}
        assert "kf_session" in s.cookies
        # Back to the connect login with the session cookie: finish, then the app's redirect URL.
        url = f"{base}/connect/login?api_key={sim.account.api_key}&v=3"
        hops = []
        for _ in range(5):
            r = s.get(url, allow_redirects=False, timeout=5)
            assert r.status_code == 302
            url = r.headers["Location"] if r.headers["Location"].startswith("http") else base + r.headers["Location"]
            hops.append(url)
            if url.startswith("http://127.0.0.1:9/"):
                break
        assert any("/connect/finish?" in h for h in hops)
        final = urlsplit(hops[-1])
        assert final.path == "/kite/callback"
        query = dict(parse_qsl(final.query))
        assert query["app"] == "feeds" and query["action"] == "login" and query["status"] == "success"
        kite = KiteConnect(sim.account.api_key, root=base)
        assert kite.generate_session(query["request_token"], sim.account.api_secret)["access_token"]


def _wrong_totp(secret: str) -> str:
    totp = pyotp.TOTP(secret)
    now = time.time()
    valid = {totp.at(now + k * 30) for k in (-1, 0, 1, 2)}
    return next(c for c in (f"{n:06d}" for n in range(0, 1_000_000, 7919)) if c not in valid)


def test_wrong_totp_is_refused():
    with _fresh_login_sim().running() as sim:
        s = requests.Session()
        login = s.post(f"{sim.base_url}/api/login", timeout=5,
                       data={"user_id": sim.account.user_id, "password": sim.account.password}).json()["data"]
        r = s.post(f"{sim.base_url}/api/twofa", timeout=5, data={
            "user_id": login["user_id"], "request_id": login["request_id"],
            "twofa_value": _wrong_totp(sim.account.totp_secret), "twofa_type": "totp"})
        assert r.status_code == 400
        body = r.json()
        assert body["status"] == "error" and body["error_type"] == "TwoFAException"
        assert "Invalid TOTP" in body["message"]
        assert "kf_session" not in s.cookies
        # Without a web session the connect flow never reaches the app.
        r = s.get(f"{sim.base_url}/connect/login", params={"api_key": sim.account.api_key, "v": "3"}, timeout=5)
        assert r.status_code == 200 and 'id="form"' in r.text
        assert sim.stats()["auth"]["twofa_failed"] == 1


def test_five_wrong_passwords_lock_the_account():
    with _fresh_login_sim().running() as sim:
        url = f"{sim.base_url}/api/login"
        for _ in range(5):
            r = requests.post(url, data={"user_id": sim.account.user_id, "password": "nope"}, timeout=5)
            assert r.status_code == 400
            assert r.json()["message"] == "Invalid `user_id` or `password`."
        r = requests.post(url, data={"user_id": sim.account.user_id, "password": sim.account.password}, timeout=5)
        assert r.status_code == 403 and "locked" in r.json()["message"].lower()
        assert sim.stats()["auth"]["locked"] is True
        sim.unlock_account()
        r = requests.post(url, data={"user_id": sim.account.user_id, "password": sim.account.password}, timeout=5)
        assert r.status_code == 200


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed (apt-get install chromium)")
def test_login_pages_in_headless_chromium():
    from playwright.sync_api import sync_playwright

    with _sim().running() as sim, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{sim.base_url}/connect/login?api_key={sim.account.api_key}&v=3")
            page.fill("#userid", sim.account.user_id)
            page.fill("#password", "wrong")
            page.click("button[type=submit]")
            page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=60000)
            assert "Invalid `user_id` or `password`." in page.inner_text("#error")
            page.fill("#password", sim.account.password)
            page.click("button[type=submit]")
            page.wait_for_selector("#totp", timeout=60000)
            page.fill("#totp", _wrong_totp(sim.account.totp_secret))
            page.click("button[type=submit]")
            page.wait_for_function("document.getElementById('error').textContent.includes('TOTP')", timeout=60000)
            page.fill("#totp", pyotp.TOTP(sim.account.totp_secret).now())
            page.click("button[type=submit]")
            page.wait_for_url("**request_token=**", timeout=60000)
            query = dict(parse_qsl(urlsplit(page.url).query))
            assert page.inner_text("#request_token") == query["request_token"]
            kite = KiteConnect(sim.account.api_key, root=sim.base_url)
            kite.generate_session(query["request_token"], sim.account.api_secret)
            assert kite.profile()["user_id"] == sim.account.user_id
        finally:
            browser.close()


# =============================================================================
# ticker through KiteTicker (child process)


def _ticks(proc: TickerProc, token: int, mode: str, timeout: float = 60.0) -> dict:
    event = proc.wait_for(lambda e: e["ev"] == "ticks" and any(
        t["instrument_token"] == token and t["mode"] == mode for t in e["ticks"]), timeout)
    return next(t for t in event["ticks"] if t["instrument_token"] == token and t["mode"] == mode)


def _naive_ist(text: str) -> str:
    return datetime.fromisoformat(text).astimezone(IST).replace(tzinfo=None).isoformat()


@needs_data
def test_ticker_replays_recorded_infy_full_quote_and_ltp(ticker_procs):
    with _sim(rate=5).running() as sim:
        proc = TickerProc(sim, sim.issue_access_token())
        ticker_procs.append(proc)
        proc.wait_for(lambda e: e["ev"] == "connect")
        proc.send(cmd="subscribe", tokens=[INFY])
        quote = _ticks(proc, INFY, "quote")
        proc.send(cmd="mode", mode="full", tokens=[INFY])
        full = _ticks(proc, INFY, "full")
        proc.send(cmd="mode", mode="ltp", tokens=[INFY])
        ltp = _ticks(proc, INFY, "ltp")

    renames = {"last_quantity": "last_traded_quantity", "average_price": "average_traded_price",
               "volume": "volume_traded", "buy_quantity": "total_buy_quantity",
               "sell_quantity": "total_sell_quantity", "timestamp": "exchange_timestamp"}
    for got, expected in ((quote, _expected("ticker_quote.json")), (full, _expected("ticker_full.json"))):
        for key, value in expected.items():
            name = renames.get(key, key)
            if key == "change":
                # pykiteconnect reports change in percent of the close.
                close = expected["ohlc"]["close"]
                assert got[name] == pytest.approx((expected["last_price"] - close) * 100 / close)
            elif key in ("timestamp", "last_trade_time"):
                # KiteTicker yields naive local datetimes; the client runs in IST.
                assert got[name] == _naive_ist(value) == "2021-07-05T10:41:27"
            else:
                assert got[name] == value, key
    assert set(quote) == {"tradable", "mode", "instrument_token", "last_price", "last_traded_quantity",
                          "average_traded_price", "volume_traded", "total_buy_quantity",
                          "total_sell_quantity", "ohlc", "change"}
    assert ltp == _expected("ticker_ltp.json")
    lengths = {tuple(e["packet_lengths"]) for e in proc.events if e["ev"] == "msg" and e.get("packet_lengths")}
    assert {(44,), (184,), (8,)} <= lengths


def test_ticker_index_packets_and_generated_ticks(ticker_procs):
    before = datetime.now(IST).replace(tzinfo=None, microsecond=0)  # naive IST, whole seconds like the packets
    with _sim(rate=10).running() as sim:
        proc = TickerProc(sim, sim.issue_access_token())
        ticker_procs.append(proc)
        proc.wait_for(lambda e: e["ev"] == "connect")
        proc.send(cmd="subscribe", tokens=[NIFTY, RELIANCE])
        quote = _ticks(proc, NIFTY, "quote")
        assert quote["tradable"] is False and "exchange_timestamp" not in quote
        assert set(quote["ohlc"]) == {"open", "high", "low", "close"}
        proc.send(cmd="mode", mode="full", tokens=[NIFTY, RELIANCE])
        full = _ticks(proc, NIFTY, "full")
        rel = _ticks(proc, RELIANCE, "full")
        after = datetime.now(IST).replace(tzinfo=None)
        assert before <= datetime.fromisoformat(full["exchange_timestamp"]) <= after
        assert before <= datetime.fromisoformat(rel["last_trade_time"]) <= after
        # a random walk, not a constant: another RELIANCE price comes
        first = rel["last_price"]
        proc.wait_for(lambda e: e["ev"] == "ticks" and any(
            t["instrument_token"] == RELIANCE and t["last_price"] != first for t in e["ticks"]))
        lengths = {n for e in proc.events if e["ev"] == "msg" for n in e.get("packet_lengths", [])}
        assert {28, 32, 44, 184} <= lengths
        conn = sim.stats()["connections"][0]
        assert conn["modes"] == {"ltp": 0, "quote": 0, "full": 2}
        assert sorted(conn["tokens"]["full"]) == sorted([NIFTY, RELIANCE])
        assert conn["packets_sent"]["quote"] >= 2
        # full packets keep coming after the two of the mode change
        assert _wait_until(lambda: sim.stats()["connections"][0]["packets_sent"]["full"] > 2)


def test_ticker_refuses_invalid_and_expired_tokens_with_403(ticker_procs):
    with _sim().running() as sim:
        bad = TickerProc(sim, "not-a-token", retry=False)
        ticker_procs.append(bad)
        err = bad.wait_for(lambda e: e["ev"] == "error")
        assert "403" in err["reason"]
        assert not any(e["ev"] == "connect" for e in bad.events)

        proc = TickerProc(sim, sim.issue_access_token())
        ticker_procs.append(proc)
        proc.wait_for(lambda e: e["ev"] == "connect")
        sim.fault_expire_tokens()
        proc.wait_for(lambda e: e["ev"] == "close")
        # KiteTicker reconnects by itself and is refused with 403 from now on.
        proc.wait_for(lambda e: e["ev"] == "error" and "403" in e["reason"])
        assert sim.stats()["refused_403"] >= 2


def test_ticker_subscription_limit_3000(ticker_procs):
    with _sim(rate=0.2).running() as sim:
        tokens = [i.instrument_token for i in sim.master.instruments
                  if i.exchange == "NSE" and i.instrument_type == "EQ"][:3001]
        assert len(tokens) == 3001
        proc = TickerProc(sim, sim.issue_access_token())
        ticker_procs.append(proc)
        proc.wait_for(lambda e: e["ev"] == "connect")
        proc.send(cmd="subscribe", tokens=tokens)
        err = proc.wait_for(lambda e: e["ev"] == "error" and e["code"] == 0)
        assert "3000" in err["reason"]
        text = proc.wait_for(lambda e: e["ev"] == "msg" and not e["binary"])
        assert json.loads(text["text"])["type"] == "error"
        snapshot = proc.wait_for(lambda e: e["ev"] == "ticks" and e["n"] >= 1000)
        assert snapshot["n"] == 3000
        conn = sim.stats()["connections"][0]
        assert conn["subscribed"] == 3000 and tokens[-1] not in conn["tokens"]["quote"]
        assert sim.stats()["subscribe_over_limit"] == 1


def test_ticker_fourth_connection_refused_with_429(ticker_procs):
    with _sim().running() as sim:
        proc = TickerProc(sim, sim.issue_access_token(), count=4, retry=False)
        ticker_procs.append(proc)
        refused = proc.wait_for(lambda e: e["ev"] == "error" and "429" in e["reason"])
        connected = set()
        for _ in range(3):
            event = proc.wait_for(lambda e: e["ev"] == "connect" and e["conn"] not in connected)
            connected.add(event["conn"])
        assert refused["conn"] not in connected
        stats = sim.stats()
        assert stats["active_connections"] == 3 and stats["refused_429"] == 1


def test_ticker_heartbeat_when_idle(ticker_procs):
    with _sim(heartbeat_interval=0.25).running() as sim:
        proc = TickerProc(sim, sim.issue_access_token())
        ticker_procs.append(proc)
        proc.wait_for(lambda e: e["ev"] == "connect")
        beats = proc.wait_count(lambda e: e["ev"] == "msg", 3)
        assert all(e["binary"] and e["len"] == 1 for e in beats)
        assert not any(e["ev"] == "ticks" for e in proc.events)
        assert _wait_until(lambda: sim.stats()["connections"][0]["heartbeats_sent"] >= 3)
        stats = sim.stats()["connections"][0]
        assert stats["frames_sent"] == 0 and sum(stats["packets_sent"].values()) == 0


def test_ticker_silence_fault_sends_nothing_then_resumes(ticker_procs):
    with _sim(rate=10, heartbeat_interval=0.2).running() as sim:
        proc = TickerProc(sim, sim.issue_access_token())
        ticker_procs.append(proc)
        proc.wait_for(lambda e: e["ev"] == "connect")
        proc.send(cmd="subscribe", tokens=[RELIANCE])
        proc.wait_for(lambda e: e["ev"] == "ticks")
        assert sim.fault_silence(3600.0) == 1  # ended below, never by its length

        def sent() -> int:
            c = sim.stats()["connections"][0]
            return c["frames_sent"] + c["heartbeats_sent"] + c["texts_sent"]

        def received() -> int:
            return sum(1 for e in proc.events if e["ev"] == "msg")

        # The mark: every message sent before the silence began has arrived.
        deadline = time.monotonic() + 60
        while (mark := sent()) != received():
            assert time.monotonic() < deadline, f"sent {mark}, received {received()}"
            proc.collect(0.05)
        # Meanwhile ticks (10/s) and heartbeats (every 0.2 s) would be due: nothing is sent or arrives.
        proc.collect(1.0)
        assert sim.stats()["connections"][0]["silenced"] is True
        assert sent() == mark and received() == mark
        assert sim.fault_silence(0) == 1  # the silence ends
        proc.wait_for(lambda e: e["ev"] == "ticks", after=len(proc.events))
        assert received() > mark and sent() > mark
        assert not any(e["ev"] in ("close", "error") for e in proc.events)
        assert sim.stats()["active_connections"] == 1


def test_ticker_disconnect_fault_and_reconnect(ticker_procs):
    with _sim(rate=5).running() as sim:
        proc = TickerProc(sim, sim.issue_access_token())
        ticker_procs.append(proc)
        proc.wait_for(lambda e: e["ev"] == "connect")
        proc.send(cmd="subscribe", tokens=[RELIANCE])
        proc.wait_for(lambda e: e["ev"] == "ticks")
        assert sim.fault_disconnect() == 1
        close = proc.wait_for(lambda e: e["ev"] == "close")
        assert close["code"] == 1006
        index = next(i for i, e in enumerate(proc.events) if e is close)
        # KiteTicker reconnects and resubscribes; ticks flow again.
        proc.wait_for(lambda e: e["ev"] == "connect", after=index)
        proc.wait_for(lambda e: e["ev"] == "ticks", after=len(proc.events))
        assert sim.stats()["connections_total"] == 2


def test_ticker_malformed_packet_fault_and_bad_client_messages(ticker_procs):
    with _sim(rate=5).running() as sim:
        proc = TickerProc(sim, sim.issue_access_token())
        ticker_procs.append(proc)
        proc.wait_for(lambda e: e["ev"] == "connect")
        proc.send(cmd="subscribe", tokens=[RELIANCE])
        proc.wait_for(lambda e: e["ev"] == "ticks")
        sim.fault_malformed("bad_length")
        bad = proc.wait_for(lambda e: e["ev"] == "msg" and 43 in e.get("packet_lengths", []))
        # KiteTicker skips the odd packet and keeps the valid one in the same frame.
        assert 44 in bad["packet_lengths"]
        proc.wait_for(lambda e: e["ev"] == "ticks" and e["t"] > bad["t"])
        for text in ("not json", '{"a": "subscribe", "v": "x"}', '{"a": "dance", "v": []}'):
            proc.send(cmd="raw", text=text)
        errors = proc.wait_count(lambda e: e["ev"] == "error" and e["code"] == 0, 3)
        assert "invalid JSON" in errors[0]["reason"] and "unknown action" in errors[2]["reason"]
        assert _wait_until(lambda: sim.stats()["bad_client_messages"] == 3)
        sim.send_text("message", "market closes early today")
        note = proc.wait_for(lambda e: e["ev"] == "msg" and not e["binary"] and "closes early" in e["text"])
        assert json.loads(note["text"]) == {"type": "message", "data": "market closes early today"}
        proc.wait_for(lambda e: e["ev"] == "ticks" and e["t"] > note["t"])


def test_control_endpoints_drive_faults_over_http(ticker_procs):
    with _sim(rate=5, heartbeat_interval=0.2).running() as sim:
        token = requests.post(f"{sim.base_url}/sim/access_token", timeout=5).json()["data"]["access_token"]
        proc = TickerProc(sim, token, retry=False)
        ticker_procs.append(proc)
        proc.wait_for(lambda e: e["ev"] == "connect")
        r = requests.post(f"{sim.base_url}/sim/fault/silence", params={"seconds": "3600"}, timeout=5)
        assert r.json()["data"] == {"fault": "silence", "affected": 1}
        stats = requests.get(f"{sim.base_url}/sim/stats", timeout=5).json()["data"]
        assert stats["connections"][0]["silenced"] is True
        r = requests.post(f"{sim.base_url}/sim/fault/silence", params={"seconds": "x"}, timeout=5)
        assert r.status_code == 400 and r.json()["error_type"] == "InputException"
        r = requests.post(f"{sim.base_url}/sim/fault/disconnect", params={"code": "1011"}, timeout=5)
        assert r.json()["data"]["affected"] == 1
        close = proc.wait_for(lambda e: e["ev"] == "close")
        assert close["code"] == 1011
        r = requests.post(f"{sim.base_url}/sim/fault/expire_tokens", timeout=5)
        assert r.json()["status"] == "success"
        kite = KiteConnect(sim.account.api_key, access_token=token, root=sim.base_url)
        with pytest.raises(kex.TokenException):
            kite.profile()
