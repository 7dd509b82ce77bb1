"""feed-dhan-token: the stored token, when it is renewed, and the real program against a small
server in this file that answers like Dhan (DhanHQ v2 "Authentication": GET /v2/RenewToken,
POST /app/generateAccessToken with a TOTP checked by pyotp, GET /v2/profile, and Dhan's error
envelope with DH-901 / DH-906 for expired and invalid tokens).

The program runs as a child process with its secrets in 0600 files, as under systemd.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import secrets
import stat
import subprocess
import sys
import threading
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pyotp
import pytest
from aiohttp import web

from conftest import ROOT
from feeds.calendars import ExchangeCalendar
from feeds.dhan import token as T

BIN = ROOT / "bin" / "feed-dhan-token"
UTC = timezone.utc
IST = T.IST
CLIENT = "1000000001"
PIN = "482913"
TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


# ----------------------------------------------------------------------------- a server answering like Dhan

def _b64(d: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")


class FakeDhan:
    """Dhan's three token endpoints on a loopback port.  ``tokens``: token ->
    expiry (aware UTC) of every token Dhan accepts now; a renewal retires the
    token it renews.  ``jwt``: issue JWTs (with ``exp``) or opaque tokens.
    ``fail``: path -> list of HTTP statuses to answer before serving."""

    def __init__(self, *, jwt: bool = True):
        self.jwt = jwt
        self.tokens: dict[str, datetime] = {}
        self.requests: list[tuple[str, str, dict]] = []       # (method, path, query)
        self.totp_codes: list[str] = []
        self.fail: dict[str, list[int]] = {}
        self._n = itertools.count(1)
        self.port = 0

    def issue(self, lifetime: timedelta = timedelta(hours=24)) -> str:
        exp = datetime.now(UTC).replace(microsecond=0) + lifetime
        n = next(self._n)
        if self.jwt:
            tok = ".".join((_b64({"typ": "JWT", "alg": "HS512"}),
                            _b64({"iss": "dhan", "exp": int(exp.timestamp()), "dhanClientId": CLIENT,
                                  "tokenConsumerType": "SELF", "n": n}),
                            secrets.token_urlsafe(32)))
        else:
            tok = f"opaque-{n}-{secrets.token_hex(20)}"
        self.tokens[tok] = exp
        return tok

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, path: str) -> int:
        return sum(1 for r in self.requests if r[1] == path)

    def _error(self, status: int, code: str, message: str, kind: str = "Invalid_Authentication"):
        return web.json_response({"errorType": kind, "errorCode": code, "errorMessage": message}, status=status)

    def _faulty(self, path: str):
        queue = self.fail.get(path)
        if queue:
            status = queue.pop(0)
            if status == 429:
                return self._error(429, "DH-904", "Too many requests", "Rate_Limit")
            return web.Response(status=status, text="upstream unavailable")
        return None

    def _check(self, request) -> str | web.Response:
        tok = request.headers.get("access-token", "")
        if tok not in self.tokens:
            return self._error(400, "DH-906", "Invalid Token", "Order_Error")
        if self.tokens[tok] <= datetime.now(UTC):
            return self._error(401, "DH-901", "Client ID or user generated access token is invalid or expired.")
        return tok

    def _answer(self, tok: str) -> dict:
        return {"dhanClientId": CLIENT, "dhanClientName": "JOHN DOE", "dhanClientUcc": "ABCD12345E",
                "givenPowerOfAttorney": False, "accessToken": tok,
                "expiryTime": self.tokens[tok].astimezone(IST).strftime("%Y-%m-%dT%H:%M:%S.000")}

    async def renew(self, request):
        self.requests.append(("GET", request.path, dict(request.query)))
        if (r := self._faulty(request.path)) is not None:
            return r
        if request.headers.get("dhanClientId") != CLIENT:
            return self._error(400, "DH-905", "Missing or invalid dhanClientId", "Input_Exception")
        tok = self._check(request)
        if isinstance(tok, web.Response):
            return tok
        del self.tokens[tok]                              # the renewed token is retired
        return web.json_response(self._answer(self.issue()))

    async def generate(self, request):
        q = dict(request.query)
        self.requests.append(("POST", request.path, q))
        if (r := self._faulty(request.path)) is not None:
            return r
        self.totp_codes.append(q.get("totp", ""))
        if q.get("dhanClientId") != CLIENT or q.get("pin") != PIN or \
                not pyotp.TOTP(TOTP_SECRET).verify(q.get("totp", ""), valid_window=1):
            return self._error(400, "DH-905", "Invalid PIN or TOTP", "Input_Exception")
        return web.json_response(self._answer(self.issue()))

    async def profile(self, request):
        self.requests.append(("GET", request.path, {}))
        if (r := self._faulty(request.path)) is not None:
            return r
        tok = self._check(request)
        if isinstance(tok, web.Response):
            return tok
        return web.json_response({"dhanClientId": CLIENT,
                                  "tokenValidity": self.tokens[tok].astimezone(IST).strftime("%d/%m/%Y %H:%M"),
                                  "activeSegment": "Equity, Derivative", "ddpi": "Active", "mtf": "Active",
                                  "dataPlan": "Active", "dataValidity": "2027-01-05 09:37:52.0"})

    @contextlib.contextmanager
    def running(self):
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="fake-dhan", daemon=True)
        thread.start()
        app = web.Application()
        app.router.add_get("/v2/RenewToken", self.renew)
        app.router.add_post("/app/generateAccessToken", self.generate)
        app.router.add_get("/v2/profile", self.profile)
        runner = web.AppRunner(app, access_log=None)      # its log would show the PIN

        async def start():
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return site._server.sockets[0].getsockname()[1]
        try:
            self.port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


@pytest.fixture
def dhan():
    with FakeDhan().running() as d:
        yield d


# ----------------------------------------------------------------------------- running the program

def toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml(x) for x in v) + "]"
    return json.dumps(str(v))


class Setup:
    """dhan.toml, secret files and paths for runs of the program against ``url``."""

    def __init__(self, tmp: Path, url: str, *, dhan: dict | None = None, login: dict | None = None,
                 initial: str | None = None):
        self.tmp = tmp
        self.sec = tmp / "secrets"
        self.sec.mkdir(parents=True, exist_ok=True)
        self.token_file = tmp / "state" / "access_token.json"
        self.prom = tmp / "prom"
        self.prom.mkdir(exist_ok=True)
        self.secrets: list[str] = [PIN, TOTP_SECRET]
        for name, value in (("dhan-pin", PIN), ("dhan-totp-secret", TOTP_SECRET)):
            self.secret(name, value)
        if initial is not None:
            self.secret("dhan-initial-token", initial)
        d = {"client_id": CLIENT, "api_url": url, "auth_url": url, "token_file": str(self.token_file),
             "session_calendar": "none"}
        d.update(dhan or {})
        lg = {"method": "renew", "initial_token_file": str(self.sec / "dhan-initial-token"),
              "pin_file": str(self.sec / "dhan-pin"), "totp_secret_file": str(self.sec / "dhan-totp-secret"),
              "timeout": 5, "attempts": 3, "retry_delays": [0.05]}
        lg.update(login or {})
        self.config = tmp / "dhan.toml"
        self.config.write_text("[dhan]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in d.items() if v is not None)
                               + "[dhan.login]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in lg.items())
                               + f"[metrics]\ntextfile_dir = {toml(str(self.prom))}\n")

    def secret(self, name: str, value: str, mode: int = 0o600) -> Path:
        p = self.sec / name
        p.write_text(value + "\n")
        p.chmod(mode)
        self.secrets.append(value)
        return p

    def run(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "FEEDS_LOG_LEVEL": "DEBUG", "PYTHONUNBUFFERED": "1"}
        env.pop("FEEDS_DHAN_CONFIG", None)
        r = subprocess.run([sys.executable, str(BIN), "--config", str(self.config), *args], capture_output=True,
                           text=True, timeout=120, env=env)
        r.output = r.stdout + r.stderr
        return r

    def stored(self) -> T.DhanToken:
        return T.TokenStore(self.token_file).load()

    def assert_no_secrets(self, text: str, dhan: FakeDhan | None, issued: list[str]) -> None:
        for value in self.secrets + issued + [c for c in (dhan.totp_codes if dhan else []) if c]:
            assert value not in text, "a secret leaked into the output"


def last_line(r) -> str:
    return r.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- the stored token

def tok(obtained: datetime, **kw) -> T.DhanToken:
    d = dict(client_id=CLIENT, access_token="s3cr3t-token-value", obtained_at=obtained,
             expires_at=obtained + T.LIFETIME, method="renew", expiry_from="token")
    d.update(kw)
    return T.DhanToken(**d)


def test_store_writes_0600_atomically_and_reads_back(tmp_path):
    store = T.TokenStore(tmp_path / "dhan" / "access_token.json")
    t = tok(datetime(2024, 11, 4, 8, 0, tzinfo=IST))
    store.save(t)
    st = store.path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.stat(store.path.parent).st_uid
    assert store.load() == t
    doc = json.loads(store.path.read_text())
    assert doc["expires_at"] == "2024-11-05T02:30:00+00:00" and doc["client_id"] == CLIENT   # UTC
    assert [p.name for p in store.path.parent.iterdir()] == ["access_token.json"]   # no temporary left
    store.save(tok(datetime(2024, 11, 5, 8, 0, tzinfo=IST), access_token="other-token-value"))
    assert store.load().access_token == "other-token-value"
    assert "s3cr3t" not in repr(t) and "s3cr3t" not in t.describe()
    assert t.describe() == "client 1000000001, obtained 2024-11-04 08:00:00 IST by renew, expires 2024-11-05 08:00 IST"


def test_load_current_refuses_missing_foreign_expired_and_malformed(tmp_path):
    store = T.TokenStore(tmp_path / "t.json")
    with pytest.raises(T.TokenMissing, match=r"no access token in .*t\.json: run feed-dhan-token"):
        store.load_current(CLIENT)
    store.path.write_text('{"client_id": "1", "access_token": "x y"}')
    with pytest.raises(T.TokenMissing, match="not a token document"):
        store.load()
    obtained = datetime(2024, 11, 4, 8, 0, tzinfo=IST)
    store.save(tok(obtained))
    assert store.load_current(CLIENT, now=obtained + timedelta(hours=23)).client_id == CLIENT
    with pytest.raises(T.TokenExpired, match=r"expired at 2024-11-05 08:00 IST .*run feed-dhan-token"):
        store.load_current(CLIENT, now=obtained + T.LIFETIME)
    with pytest.raises(T.TokenExpired, match="belongs to client 1000000001, not dhan.client_id 2"):
        store.load_current("2", now=obtained)


def test_expiry_from_the_token_the_answer_the_profile_or_24_hours():
    obtained = datetime(2026, 12, 1, 2, 30, tzinfo=UTC)
    exp = int((obtained + timedelta(hours=24)).timestamp())
    jwt = f"{_b64({'alg': 'HS512'})}.{_b64({'exp': exp})}.sig"
    assert T.jwt_expiry(jwt) == obtained + timedelta(hours=24)
    assert T.jwt_expiry("opaque") is None and T.jwt_expiry("a.b!.c") is None
    assert T.jwt_expiry(f"x.{_b64({'exp': 'soon'})}.y") is None
    # Dhan's times without an offset are IST
    assert T.parse_dhan_time("2026-12-02T08:00:00.000") == datetime(2026, 12, 2, 2, 30, tzinfo=UTC)
    assert T.parse_dhan_time("02/12/2026 08:00") == datetime(2026, 12, 2, 2, 30, tzinfo=UTC)
    assert T.parse_dhan_time("2026-12-02T02:30:00Z") == datetime(2026, 12, 2, 2, 30, tzinfo=UTC)
    assert T.parse_dhan_time("tomorrow") is None and T.parse_dhan_time(True) is None
    assert T.token_expiry(jwt, "2026-12-02T09:00:00", obtained) == (obtained + timedelta(hours=24), "token")
    assert T.token_expiry("opaque", "2026-12-02T07:00:00", obtained) == \
        (datetime(2026, 12, 2, 1, 30, tzinfo=UTC), "answer")
    assert T.token_expiry("opaque", "2026-11-30T07:00:00", obtained, "02/12/2026 07:59") == \
        (datetime(2026, 12, 2, 2, 29, tzinfo=UTC), "profile")          # an expiry in the past is not believed
    assert T.token_expiry("opaque", None, obtained) == (obtained + timedelta(hours=24), "assumed")


def test_answers_are_read_without_trusting_them():
    now = datetime(2026, 12, 1, 2, 30, tzinfo=UTC)
    t = T.token_from_answer({"accessToken": "abcdefgh12345678", "expiryTime": "2026-12-02T08:00:00.000",
                             "dhanClientId": CLIENT, "dhanClientName": "JOHN DOE"}, CLIENT, "totp", now)
    assert (t.access_token, t.expiry_from, t.client_name) == ("abcdefgh12345678", "answer", "JOHN DOE")
    assert T.token_from_answer({"token": "abcdefgh12345678"}, CLIENT, "renew", now).expiry_from == "assumed"
    for bad in ({}, {"accessToken": ""}, {"accessToken": "has a space in it"}, {"accessToken": 12345678}):
        with pytest.raises(T.DhanUnavailable, match="holds no access token"):
            T.token_from_answer(bad, CLIENT, "renew", now)
    with pytest.raises(T.DhanRefused, match="for client 42, not dhan.client_id"):
        T.token_from_answer({"accessToken": "abcdefgh12345678", "dhanClientId": "42"}, CLIENT, "renew", now)


# ----------------------------------------------------------------------------- when a token is renewed

XNSE = ExchangeCalendar("XNSE")


def window(now):
    return T.next_window(XNSE, now, timedelta(minutes=5), timedelta(minutes=5))


def at(d: date, h: int, m: int = 0) -> datetime:
    return datetime(d.year, d.month, d.day, h, m, tzinfo=IST)


def test_next_window_is_the_session_in_progress_or_the_next():
    mon, tue, fri = date(2024, 11, 4), date(2024, 11, 5), date(2024, 11, 8)
    w = window(at(mon, 21))
    assert (w.start, w.end) == (at(tue, 9, 10), at(tue, 15, 35))
    w = window(at(tue, 12))
    assert (w.start, w.end) == (at(tue, 9, 10), at(tue, 15, 35))
    assert window(at(fri, 21)).start == at(date(2024, 11, 11), 9, 10)          # over the weekend
    assert T.next_window(None, at(mon, 21), timedelta(0), timedelta(0)) is None


@pytest.mark.parametrize("now, expires, method, due", [
    # Monday 21:00: the token ends Tuesday 08:00, before Tuesday's session ends: both methods renew
    ((2024, 11, 4, 21), (2024, 11, 5, 8), "renew", "before the end of the session"),
    ((2024, 11, 4, 21), (2024, 11, 5, 8), "totp", "before the end of the session"),
    # Tuesday 08:00, 13 h left: renew keeps the chain; PIN + TOTP has what the session needs
    ((2024, 11, 5, 8), (2024, 11, 5, 21), "renew", "13.0 h left"),
    ((2024, 11, 5, 8), (2024, 11, 5, 21), "totp", None),
    # during the session the running collector holds the token: not retired while it lasts
    ((2024, 11, 5, 10), (2024, 11, 5, 21), "renew", None),
    # ...but one that ends during the session is replaced
    ((2024, 11, 5, 10), (2024, 11, 5, 14), "renew", "before the end of the session"),
    # a fresh token stays
    ((2024, 11, 5, 8), (2024, 11, 6, 7, 59), "renew", None),
    # Saturday: Monday's session is more than a day away; only the renewal chain matters
    ((2024, 11, 9, 8), (2024, 11, 9, 21), "renew", "13.0 h left"),
    ((2024, 11, 9, 8), (2024, 11, 9, 21), "totp", None),
    ((2024, 11, 9, 8), (2024, 11, 9, 7), "totp", "expired at 2024-11-09 07:00 IST"),
])
def test_renewal_due(now, expires, method, due):
    now, exp = datetime(*now, tzinfo=IST), datetime(*expires, tzinfo=IST)
    got = T.renewal_due(tok(now - timedelta(hours=5), expires_at=exp), now, window(now), method)
    assert (got is None) if due is None else (got is not None and due in got), got


# ----------------------------------------------------------------------------- the program against Dhan

def test_renew_stores_the_new_token_0600_atomically_and_keeps_the_chain(tmp_path, dhan):
    initial = dhan.issue()
    s = Setup(tmp_path, dhan.base, initial=initial)
    r = s.run()
    assert r.returncode == 0, r.output
    t = s.stored()
    assert stat.S_IMODE(s.token_file.stat().st_mode) == 0o600
    assert sorted(p.name for p in s.token_file.parent.iterdir()) == ["access_token.json"]
    assert t.access_token in dhan.tokens and initial not in dhan.tokens        # Dhan retired the initial one
    assert (t.client_id, t.method, t.expiry_from) == (CLIENT, "renew", "token")
    assert t.expires_at == dhan.tokens[t.access_token] and t.expires_at.utcoffset() == timedelta(0)
    assert dhan.count("/v2/RenewToken") == 1 and dhan.count("/v2/profile") == 1
    assert "new access token stored in" in r.stderr

    # a fresh token stays; Dhan is only asked whether it still accepts it
    r2 = s.run()
    assert r2.returncode == 0 and "nothing to do" in r2.stderr, r2.output
    assert dhan.count("/v2/RenewToken") == 1 and s.stored() == t

    # --force renews the stored token (not the initial one, which Dhan retired)
    r3 = s.run("--force")
    assert r3.returncode == 0, r3.output
    t3 = s.stored()
    assert t3.access_token != t.access_token and t.access_token not in dhan.tokens
    renewed_with = [q for (m, p, q) in dhan.requests if p == "/v2/RenewToken"]
    assert len(renewed_with) == 2
    s.assert_no_secrets(r.output + r2.output + r3.output, dhan, [initial, t.access_token, t3.access_token])

    # the node_exporter textfile: the expiry, never the token
    prom = (s.prom / "feeds_dhan_token.prom").read_text()
    values = textfile_values(prom)
    assert values["feeds_job_token_expiry_timestamp_seconds"] == t3.expires_at.timestamp()
    assert values["feeds_job_last_exit_code"] == 0 and t3.access_token not in prom


def textfile_values(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.labels == {"job": "dhan_token"}}


def test_totp_generates_a_token_with_pin_and_pyotp_code(tmp_path):
    with FakeDhan(jwt=False).running() as dhan:
        s = Setup(tmp_path, dhan.base, login={"method": "totp", "initial_token_file": ""})
        r = s.run()
        assert r.returncode == 0, r.output
        t = s.stored()
        assert t.access_token in dhan.tokens and t.method == "totp" and t.client_name == "JOHN DOE"
        # an opaque token: the expiry is the answer's expiryTime, IST, stored in UTC
        assert t.expiry_from == "answer" and t.expires_at == dhan.tokens[t.access_token]
        (m, p, q), = [x for x in dhan.requests if x[1] == "/app/generateAccessToken"]
        assert m == "POST" and q["dhanClientId"] == CLIENT and q["pin"] == PIN
        assert pyotp.TOTP(TOTP_SECRET).verify(q["totp"], valid_window=1)
        assert stat.S_IMODE(s.token_file.stat().st_mode) == 0o600
        s.assert_no_secrets(r.output, dhan, [t.access_token])


def test_refused_pin_or_totp_exits_77_without_retrying(tmp_path, dhan):
    s = Setup(tmp_path, dhan.base, login={"method": "totp", "initial_token_file": ""})
    s.secret("dhan-pin", "111111")
    r = s.run()
    assert r.returncode == 77, r.output
    assert dhan.count("/app/generateAccessToken") == 1
    assert "DH-905" in last_line(r) and "not retried" in last_line(r)
    assert not s.token_file.exists()
    s.assert_no_secrets(r.output, dhan, [])


def test_retries_transient_failures_then_succeeds(tmp_path, dhan):
    s = Setup(tmp_path, dhan.base, initial=dhan.issue(), login={"attempts": 3, "retry_delays": [0.05, 0.1]})
    dhan.fail["/v2/RenewToken"] = [503, 429]
    r = s.run()
    assert r.returncode == 0, r.output
    assert dhan.count("/v2/RenewToken") == 3
    assert "attempt 1 of 3 failed: GET /v2/RenewToken answered HTTP 503; retrying in 0.05 s" in r.stderr
    assert "attempt 2 of 3 failed: GET /v2/RenewToken answered HTTP 429 DH-904: Too many requests" in r.stderr
    assert s.stored().access_token in dhan.tokens


def test_gives_up_after_the_last_attempt_with_exit_1(tmp_path, dhan):
    initial = dhan.issue()
    s = Setup(tmp_path, dhan.base, initial=initial, login={"attempts": 2})
    dhan.fail["/v2/RenewToken"] = [502] * 5
    r = s.run()
    assert r.returncode == 1, r.output
    assert dhan.count("/v2/RenewToken") == 2
    assert last_line(r).endswith("token renewal failed after 2 attempt(s): GET /v2/RenewToken answered HTTP 502")
    assert not s.token_file.exists() and initial in dhan.tokens
    assert textfile_values((s.prom / "feeds_dhan_token.prom").read_text())["feeds_job_last_exit_code"] == 1


def test_unreachable_dhan_is_retried_and_named(tmp_path):
    with FakeDhan().running() as dhan:
        url = dhan.base                                          # nothing listens there afterwards
    s = Setup(tmp_path, url, initial="abcdefgh12345678", login={"attempts": 2})
    r = s.run()
    assert r.returncode == 1, r.output
    assert "token renewal failed after 2 attempt(s): GET /v2/RenewToken: Connection refused" in last_line(r)


def test_refused_stored_token_falls_back_to_the_initial_one(tmp_path, dhan):
    s = Setup(tmp_path, dhan.base, initial=dhan.issue())
    assert s.run().returncode == 0
    first = s.stored()
    del dhan.tokens[first.access_token]                       # Dhan no longer accepts it
    fresh = dhan.issue()
    s.secret("dhan-initial-token", fresh)                     # the operator put a new web token in place
    r = s.run()
    assert r.returncode == 0, r.output
    assert "Dhan refused the stored token" in r.stderr
    t = s.stored()
    assert t.access_token != first.access_token and t.access_token in dhan.tokens and fresh not in dhan.tokens
    s.assert_no_secrets(r.output, dhan, [first.access_token, fresh, t.access_token])


def test_expired_token_and_a_retired_initial_one_exit_77(tmp_path, dhan):
    initial = dhan.issue()
    s = Setup(tmp_path, dhan.base, initial=initial)
    assert s.run().returncode == 0
    # the stored token lapsed (the machine was off for a day); the initial one was retired long ago
    stored = s.stored()
    T.TokenStore(s.token_file).save(tok(datetime.now(UTC) - timedelta(hours=30),
                                        access_token=stored.access_token))
    r = s.run()
    assert r.returncode == 77, r.output
    line = last_line(r)
    assert "Dhan refused the initial token" in line and "DH-906" in line and "web.dhan.co" in line
    s.assert_no_secrets(r.output, dhan, [initial, stored.access_token])


def test_check_exit_codes(tmp_path, dhan):
    s = Setup(tmp_path, dhan.base, initial=dhan.issue())
    r = s.run("--check")
    assert r.returncode == 77 and "no access token in" in last_line(r), r.output
    assert s.run().returncode == 0
    t = s.stored()
    r = s.run("--check")
    assert r.returncode == 0 and "stored access token is valid" in r.stderr, r.output
    renewals = dhan.count("/v2/RenewToken")
    # Dhan refuses an expired token with DH-901
    dhan.tokens[t.access_token] = datetime.now(UTC) - timedelta(seconds=1)
    r = s.run("--check")
    assert r.returncode == 77 and "DH-901" in last_line(r) and "run feed-dhan-token" in last_line(r), r.output
    assert dhan.count("/v2/RenewToken") == renewals                   # --check never renews
    # expired by its own record
    T.TokenStore(s.token_file).save(tok(datetime.now(UTC) - timedelta(hours=25), access_token=t.access_token))
    r = s.run("--check")
    assert r.returncode == 77 and "expired at" in last_line(r), r.output
    s.assert_no_secrets(r.output, dhan, [t.access_token])


def test_check_exit_1_when_dhan_cannot_be_asked(tmp_path, dhan):
    s = Setup(tmp_path, dhan.base, initial=dhan.issue())
    assert s.run().returncode == 0
    dhan.fail["/v2/profile"] = [503]
    r = s.run("--check")
    assert r.returncode == 1 and "cannot check the stored access token" in last_line(r), r.output


def test_check_refuses_a_token_ending_during_the_next_session(tmp_path):
    now = at(date(2024, 11, 5), 8)
    store = T.TokenStore(tmp_path / "t.json")
    store.save(tok(now - timedelta(hours=20), expires_at=at(date(2024, 11, 5), 12)))
    ts = T.TokenSettings(file="dhan.toml", client_id=CLIENT, api_url="http://127.0.0.1:9", auth_url="x",
                         token_file=str(store.path), method="renew", initial_token_file="", timeout=1, attempts=1,
                         retry_delays=[], textfile_dir="", sessions=XNSE)

    class NoNetwork:
        def profile(self, token):
            raise AssertionError("not asked")
    assert T.check(ts, store, NoNetwork(), now) == 77


@pytest.mark.parametrize("change, key", [
    ({"dhan": {"client_id": None}}, "dhan.client_id"),
    ({"login": {"method": "password"}}, "dhan.login.method"),
    ({"login": {"attempts": 0}}, "dhan.login.attempts"),
    ({"dhan": {"api_url": "ftp://x"}}, "dhan.api_url"),
])
def test_bad_configuration_exits_78_naming_key_and_file(tmp_path, change, key):
    s = Setup(tmp_path, "http://127.0.0.1:9", dhan=change.get("dhan"), login=change.get("login"),
              initial="abcdefgh12345678")
    r = s.run()
    assert r.returncode == 78, r.output
    assert r.stderr.strip().splitlines() == [f"configuration error in {s.config}: key '{key}': "
                                             + last_line(r).split(f"key '{key}': ", 1)[1]]


def test_secret_files_readable_by_others_are_refused(tmp_path):
    s = Setup(tmp_path, "http://127.0.0.1:9", login={"method": "totp"})
    s.secret("dhan-pin", PIN, 0o644)
    r = s.run()
    assert r.returncode == 78, r.output
    assert last_line(r) == (f"configuration error in {s.config}: key 'dhan.login.pin_file': secret file "
                            f"{s.sec / 'dhan-pin'} is readable by group/others (chmod 600)")
    assert PIN not in r.output
    s = Setup(tmp_path, "http://127.0.0.1:9", initial="abcdefgh12345678")
    (s.sec / "dhan-initial-token").chmod(0o640)
    r = s.run()
    assert r.returncode == 78 and "'dhan.login.initial_token_file'" in last_line(r), r.output
    assert "abcdefgh12345678" not in r.output
    # no stored token and no initial token to renew: the key is named
    s = Setup(tmp_path, "http://127.0.0.1:9", login={"initial_token_file": ""})
    r = s.run()
    assert r.returncode == 78 and "'dhan.login.initial_token_file'" in last_line(r) and "web.dhan.co" in last_line(r)


def test_logs_in_process_carry_no_secret(tmp_path, dhan, caplog):
    """The library calls themselves (not only the program's output): no token, PIN or code in any record."""
    import logging
    caplog.set_level(logging.DEBUG)
    store = T.TokenStore(tmp_path / "t.json")
    ts = T.TokenSettings(file="dhan.toml", client_id=CLIENT, api_url=dhan.base, auth_url=dhan.base,
                         token_file=str(store.path), method="totp", initial_token_file="", timeout=5, attempts=2,
                         retry_delays=[0.01], textfile_dir="", pin=PIN, totp_secret=TOTP_SECRET)
    auth = T.DhanAuth(dhan.base, dhan.base, CLIENT, 5)
    dhan.fail["/app/generateAccessToken"] = [500]
    assert T.run(ts, store, auth) == 0
    t = store.load()
    ts.method = "renew"
    assert T.run(ts, store, auth, force=True) == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert {r.name for r in caplog.records} == {"feeds.dhan.token"}
    assert "new access token stored" in text
    for value in [PIN, TOTP_SECRET, t.access_token, store.load().access_token] + dhan.totp_codes:
        assert value not in text


def test_an_expired_token_without_an_initial_one_says_what_to_do(tmp_path, dhan):
    s = Setup(tmp_path, dhan.base, login={"initial_token_file": ""})
    T.TokenStore(s.token_file).save(tok(datetime.now(UTC) - timedelta(hours=30), access_token=dhan.issue()))
    r = s.run()
    assert r.returncode == 77, r.output
    assert "no valid token to renew" in last_line(r) and "dhan.login.initial_token_file (unset) holds none" \
        in last_line(r) and "web.dhan.co" in last_line(r)
    assert dhan.count("/v2/RenewToken") == 0


def test_against_the_dhan_simulator(tmp_path):
    """The program against feeds.sim.dhan: renew the simulator's token, generate one with PIN + TOTP,
    --check, and a token the simulator expired."""
    sim_mod = pytest.importorskip("feeds.sim.dhan")
    with sim_mod.DhanSimulator(client_id=CLIENT, pin=PIN, totp_secret=TOTP_SECRET, instruments=10,
                               data_dir=False).running() as sim:
        first = sim.access_token
        s = Setup(tmp_path, sim.base_url, initial=first)
        r = s.run()
        assert r.returncode == 0, r.output
        t = s.stored()
        assert t.access_token == sim.access_token != first and t.expiry_from == "token"
        assert t.expires_at == datetime.fromtimestamp(sim.auth.lookup(t.access_token).expires_at, UTC).replace(
            microsecond=0)
        assert sim.auth.stats.renewed == 1
        assert s.run("--check").returncode == 0
        s2 = Setup(tmp_path / "totp", sim.base_url, login={"method": "totp", "initial_token_file": ""})
        r2 = s2.run()
        assert r2.returncode == 0, r2.output
        assert s2.stored().access_token == sim.access_token and sim.auth.stats.generated == 1
        sim.fault_expire_token(s2.stored().access_token)
        r3 = s2.run("--check")
        assert r3.returncode == 77 and "DH-901" in last_line(r3), r3.output
        for setup in (s, s2):
            setup.assert_no_secrets(r.output + r2.output + r3.output, None, [first, t.access_token, sim.access_token])
