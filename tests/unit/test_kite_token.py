"""The stored access token, its expiry, and the renewal's retry rules (no network)."""
from __future__ import annotations

import os
import stat
from datetime import datetime, timezone

import pyotp
import pytest

from feeds.kite import login as L
from feeds.totp import totp_code
from feeds.kite.token import (IST, AccessToken, TokenExpired, TokenMissing, TokenStore, next_expiry)

UTC = timezone.utc


def tok(obtained: datetime, **kw) -> AccessToken:
    d = dict(api_key="key", user_id="AB1234", access_token="s3cr3t-token", obtained_at=obtained,
             expires_at=next_expiry(obtained), login_time="2024-11-04 08:00:03", method="browser")
    d.update(kw)
    return AccessToken(**d)


def test_expiry_is_the_next_0600_ist():
    assert next_expiry(datetime(2024, 11, 4, 8, 0, tzinfo=IST)) == datetime(2024, 11, 5, 6, 0, tzinfo=IST)
    assert next_expiry(datetime(2024, 11, 4, 5, 59, tzinfo=IST)) == datetime(2024, 11, 4, 6, 0, tzinfo=IST)
    assert next_expiry(datetime(2024, 11, 4, 6, 0, tzinfo=IST)) == datetime(2024, 11, 5, 6, 0, tzinfo=IST)
    # given in UTC: 2024-11-04 01:00 UTC is 06:30 IST
    e = next_expiry(datetime(2024, 11, 4, 1, 0, tzinfo=UTC))
    assert e == datetime(2024, 11, 5, 0, 30, tzinfo=UTC) and e.tzinfo == UTC


def test_store_writes_0600_atomically_and_reads_back(tmp_path):
    store = TokenStore(tmp_path / "kite" / "access_token.json")
    t = tok(datetime(2024, 11, 4, 8, 0, tzinfo=IST))
    store.save(t)
    st = store.path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.stat(store.path.parent).st_uid
    assert store.load() == t
    assert [p.name for p in store.path.parent.iterdir()] == ["access_token.json"]   # no temporary left
    store.save(tok(datetime(2024, 11, 5, 8, 0, tzinfo=IST), access_token="other"))
    assert store.load().access_token == "other"


def test_load_current_refuses_missing_foreign_and_expired(tmp_path):
    store = TokenStore(tmp_path / "t.json")
    with pytest.raises(TokenMissing, match=r"no access token in .*t\.json: run feed-kite-token"):
        store.load_current("key")
    store.path.write_text("{not json")
    with pytest.raises(TokenMissing, match="not a token document"):
        store.load()
    obtained = datetime(2024, 11, 4, 8, 0, tzinfo=IST)
    store.save(tok(obtained))
    assert store.load_current("key", now=datetime(2024, 11, 5, 5, 59, tzinfo=IST)).user_id == "AB1234"
    with pytest.raises(TokenExpired, match=r"expired at 2024-11-05 06:00 IST .*run feed-kite-token"):
        store.load_current("key", now=datetime(2024, 11, 5, 6, 0, tzinfo=IST))
    with pytest.raises(TokenExpired, match="another api_key"):
        store.load_current("other-key", now=obtained)


def test_describe_never_shows_the_token():
    t = tok(datetime(2024, 11, 4, 8, 0, tzinfo=IST))
    assert "s3cr3t" not in t.describe()
    assert t.describe() == "user AB1234, obtained 2024-11-04 08:00:00 IST by browser, expires 2024-11-05 06:00 IST"


def test_credentials_repr_hides_secrets():
    c = L.Credentials("key", "apisecret", "AB1234", "hunter2", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
    assert "hunter2" not in repr(c) and "apisecret" not in repr(c) and "JBSW" not in repr(c)


def test_totp_code_is_pyotp_and_waits_near_the_step_end():
    secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    now = [1_700_000_038.5]                    # 1.5 s left in the 30 s step
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s
    code = totp_code(secret, min_left=3.0, clock=lambda: now[0], sleep=sleep)
    assert slept and 1.5 <= slept[0] <= 1.6
    assert code == pyotp.TOTP(secret).at(1_700_000_040.1)
    assert totp_code(secret, clock=lambda: 1_700_000_010.0, sleep=sleep) == pyotp.TOTP(secret).at(1_700_000_010)
    with pytest.raises(ValueError, match="not a usable base32 secret"):
        totp_code("not base32!")


def test_refusal_messages():
    c = L.Credentials("key", "s", "AB1234", "p", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", totp_file="/etc/feeds/secrets/kite-totp")
    e = L._rejected("twofa", "Invalid TOTP. Please try again.", c)
    assert str(e) == ("Kite refused the TOTP code: Invalid TOTP. Please try again. (check the TOTP secret in "
                      "/etc/feeds/secrets/kite-totp and the system clock; not retried)")
    assert "account is locked" in str(L._rejected("login", "Account locked: too many invalid login attempts.", c))
    assert "user id or password" in str(L._rejected("login", "Invalid `user_id` or `password`.", c))
    assert not e.retry and L.LoginError("x").retry


def test_request_token_from_redirect_url():
    assert L._request_token("https://example.org/cb?action=login&status=success&request_token=abc123") == "abc123"
    assert L._request_token("https://example.org/cb?status=success") is None
    assert L._scrub("GET /x?request_token=abc&password=pw") == "GET /x?request_token=...&password=..."


class _Store:
    def __init__(self):
        self.saved = []
        self.path = "/state/access_token.json"

    def save(self, t):
        self.saved.append(t)


def test_renew_retries_with_backoff_then_fails_with_the_last_reason(monkeypatch):
    calls = []

    def fail(creds, settings):
        calls.append(1)
        raise L.LoginError(f"login page step failed: timeout {len(calls)}")
    monkeypatch.setattr(L, "obtain_request_token", fail)
    slept = []
    with pytest.raises(L.LoginError) as e:
        L.renew(L.Credentials("k", "s", "u", "p", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"), L.LoginSettings(), _Store(), attempts=4,
                delays=[1, 5], sleep=slept.append)
    assert len(calls) == 4 and slept == [1, 5, 5]
    assert str(e.value) == "token renewal failed after 4 attempt(s): login page step failed: timeout 4"


def test_renew_does_not_retry_refused_credentials(monkeypatch):
    calls = []

    def refuse(creds, settings):
        calls.append(1)
        raise L.CredentialsRejected("Kite refused the user id or password: Invalid")
    monkeypatch.setattr(L, "obtain_request_token", refuse)
    with pytest.raises(L.CredentialsRejected):
        L.renew(L.Credentials("k", "s", "u", "p", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"), L.LoginSettings(), _Store(), attempts=4,
                delays=[0], sleep=lambda s: None)
    assert len(calls) == 1


def test_renew_stores_the_validated_token(monkeypatch):
    monkeypatch.setattr(L, "obtain_request_token", lambda c, s: ("rt", "http"))
    t = tok(datetime.now(UTC), method="http")
    monkeypatch.setattr(L, "exchange", lambda c, rt, url, method: t if rt == "rt" and method == "http" else None)
    monkeypatch.setattr(L, "validate", lambda tk, url, timeout: {"user_id": "AB1234"})
    store = _Store()
    assert L.renew(L.Credentials("k", "s", "u", "p", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"), L.LoginSettings(), store) is t
    assert store.saved == [t]


def test_browser_failure_falls_back_to_http_but_refusal_does_not(monkeypatch):
    creds, st = L.Credentials("k", "s", "u", "p", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"), L.LoginSettings()
    monkeypatch.setattr(L, "browser_login", lambda c, s: (_ for _ in ()).throw(L.BrowserUnavailable("no chromium")))
    monkeypatch.setattr(L, "http_login", lambda c, s: "from-http")
    assert L.obtain_request_token(creds, st) == ("from-http", "http")
    monkeypatch.setattr(L, "browser_login",
                        lambda c, s: (_ for _ in ()).throw(L.CredentialsRejected("Kite refused the TOTP code")))
    with pytest.raises(L.CredentialsRejected):
        L.obtain_request_token(creds, st)
    st.http_fallback = False
    monkeypatch.setattr(L, "browser_login", lambda c, s: (_ for _ in ()).throw(L.BrowserUnavailable("x")))
    with pytest.raises(L.BrowserUnavailable):
        L.obtain_request_token(creds, st)
    assert L.obtain_request_token(creds, L.LoginSettings(use_browser=False)) == ("from-http", "http")


def test_chromium_flags_as_required():
    assert L.CHROMIUM_FLAGS == ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                                "--disable-background-networking", "--disable-component-update", "--disable-sync")
    assert L.LoginSettings().browser == "/usr/bin/chromium"
