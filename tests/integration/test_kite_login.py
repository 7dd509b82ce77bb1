"""feed-kite-token end to end: the real program logging in to the Kite
simulator's pages in real headless Chromium (Debian's /usr/bin/chromium through
playwright), the HTTP path without a browser, refusals and retries.

The simulator runs in this process on an ephemeral loopback port; the program
runs as a child process with its secrets in 0600 files, as under systemd.
"""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from kiteconnect import KiteConnect

from collector_process import toml_value
from conftest import ROOT
from feeds.kite.token import TokenStore
from feeds.sim.kite import KiteSimulator

pytestmark = pytest.mark.integration
BIN = ROOT / "bin" / "feed-kite-token"
CHROMIUM = "/usr/bin/chromium"


def need_chromium():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")


class Setup:
    """Config, secrets and token paths for one run against ``sim``."""

    def __init__(self, tmp: Path, sim: KiteSimulator, *, totp: str | None = None, password: str | None = None,
                 login: dict | None = None, url: str | None = None):
        self.tmp, self.sim = tmp, sim
        sec = tmp / "secrets"
        sec.mkdir(parents=True, exist_ok=True)
        self.secrets = {"kite-api-secret": sim.account.api_secret,
                        "kite-password": password or sim.account.password,
                        "kite-totp-secret": totp or sim.account.totp_secret}
        for name, value in self.secrets.items():
            (sec / name).write_text(value + "\n")
            (sec / name).chmod(0o600)
        self.token_file = tmp / "state" / "access_token.json"
        base = url or sim.base_url
        lg = {"user_id": sim.account.user_id, "api_secret_file": str(sec / "kite-api-secret"),
              "password_file": str(sec / "kite-password"), "totp_secret_file": str(sec / "kite-totp-secret"),
              "browser": CHROMIUM, "timeout": 20, "attempts": 2, "retry_delays": [0.2]}
        lg.update(login or {})
        kite = {"api_key": sim.account.api_key, "api_url": base, "ticker_url": "ws" + base[4:] + "/",
                "login_url": base, "token_file": str(self.token_file)}
        self.config = tmp / "kite.toml"
        self.config.write_text("[kite]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in kite.items()) +
                               "[kite.login]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in lg.items()) +
                               '[metrics]\ntextfile_dir = ""\n')

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {**os.environ, "FEEDS_LOG_LEVEL": "DEBUG", "PYTHONUNBUFFERED": "1"}
        r = subprocess.run([sys.executable, str(BIN), "--config", str(self.config), *args], capture_output=True,
                           text=True, timeout=timeout, env=env)
        r.output = r.stdout + r.stderr
        return r

    def assert_no_secrets(self, text: str) -> None:
        for name, value in self.secrets.items():
            assert value not in text, f"{name} leaked into the output"
        if self.token_file.exists():
            assert TokenStore(self.token_file).load().access_token not in text, "access token leaked"


@pytest.fixture
def sim():
    with KiteSimulator(heartbeat_interval=0.5, min_nse_equities=100).running() as s:
        yield s


def last_line(r) -> str:
    return [ln for ln in r.output.splitlines() if ln.strip()][-1]


def test_renewal_in_headless_chromium_stores_a_valid_token(tmp_path, sim):
    need_chromium()
    s = Setup(tmp_path, sim)
    r = s.run()
    assert r.returncode == 0, r.output[-3000:]
    assert "new access token stored in" in r.output and "by browser" in r.output
    st = s.token_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    tok = TokenStore(s.token_file).load()
    assert tok.method == "browser" and tok.user_id == sim.account.user_id
    # the token works at Kite (profile), and the simulator saw one login, one TOTP, one exchange
    prof = KiteConnect(tok.api_key, access_token=tok.access_token, root=sim.base_url).profile()
    assert prof["user_id"] == sim.account.user_id
    auth = sim.stats()["auth"]
    assert (auth["logins_ok"], auth["twofa_ok"], auth["access_tokens_issued"]) == (1, 1, 1)
    s.assert_no_secrets(r.output)
    # --check validates it; a second run does nothing; --force logs in again
    chk = s.run("--check")
    assert chk.returncode == 0 and "stored access token is valid: user AB1234" in chk.output
    again = s.run()
    assert again.returncode == 0 and "nothing to do" in again.output
    assert sim.stats()["auth"]["logins_ok"] == 1
    forced = s.run("--force")
    assert forced.returncode == 0 and sim.stats()["auth"]["logins_ok"] == 2
    assert TokenStore(s.token_file).load().access_token != tok.access_token
    s.assert_no_secrets(chk.output + again.output + forced.output)


def test_wrong_totp_fails_with_a_clear_message_and_no_retry(tmp_path, sim):
    need_chromium()
    s = Setup(tmp_path, sim, totp="GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ")
    r = s.run()
    assert r.returncode == 1
    assert last_line(r).endswith(
        f"token renewal failed: Kite refused the TOTP code: Invalid TOTP. Please try again. (check the TOTP "
        f"secret in {tmp_path}/secrets/kite-totp-secret and the system clock; not retried)")
    auth = sim.stats()["auth"]
    assert auth["twofa_failed"] == 1 and auth["logins_ok"] == 1 and auth["access_tokens_issued"] == 0
    assert not s.token_file.exists()
    s.assert_no_secrets(r.output)


def test_wrong_password_is_not_retried(tmp_path, sim):
    need_chromium()
    s = Setup(tmp_path, sim, password="not-the-password")
    r = s.run()
    assert r.returncode == 1
    assert "Kite refused the user id or password: Invalid `user_id` or `password`. (not retried: repeated " \
           "failures lock the account)" in last_line(r)
    assert sim.stats()["auth"]["failed_attempts"] == 1
    s.assert_no_secrets(r.output)


def test_locked_account_fails_with_a_clear_message(tmp_path, sim):
    need_chromium()
    for _ in range(5):
        requests.post(sim.base_url + "/api/login", data={"user_id": sim.account.user_id, "password": "x"}, timeout=5)
    assert sim.stats()["auth"]["locked"]
    s = Setup(tmp_path, sim)
    r = s.run()
    assert r.returncode == 1
    assert "Kite refused the login, the account is locked: Account locked: too many invalid login attempts." \
        in last_line(r) and "not retried" in last_line(r)
    assert sim.stats()["auth"]["logins_failed"] == 6          # five to lock it, one from the renewal
    # --no-browser meets the same refusal through the HTTP path
    r2 = s.run("--no-browser")
    assert r2.returncode == 1 and "the account is locked" in last_line(r2)


def test_http_path_when_the_browser_is_unavailable(tmp_path, sim):
    s = Setup(tmp_path, sim, login={"browser": str(tmp_path / "no-such-chromium")})
    r = s.run()
    assert r.returncode == 0, r.output[-3000:]
    assert "browser login failed (Chromium (" in r.output and "trying the HTTP login without a browser" in r.output
    tok = TokenStore(s.token_file).load()
    assert tok.method == "http" and "by http" in r.output
    assert KiteConnect(tok.api_key, access_token=tok.access_token, root=sim.base_url).profile()["user_id"] == "AB1234"
    s.assert_no_secrets(r.output)


def test_retries_with_backoff_then_exit_1_with_the_reason(tmp_path, sim):
    with socket.socket() as sock:                   # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    s = Setup(tmp_path, sim, url=dead, login={"attempts": 3, "retry_delays": [0.2, 0.4],
                                              "browser": str(tmp_path / "no-such-chromium")})
    r = s.run()
    assert r.returncode == 1
    assert "token renewal attempt 1 of 3 failed" in r.output and "retrying in 0.2 s" in r.output
    assert "token renewal attempt 2 of 3 failed" in r.output
    assert "attempt 3 of 3 failed" not in r.output
    assert "token renewal failed after 3 attempt(s): login request failed: ConnectionError" in last_line(r)


def test_check_reports_missing_and_refused_tokens(tmp_path, sim):
    s = Setup(tmp_path, sim)
    r = s.run("--check")
    assert r.returncode == 1 and "no access token in" in last_line(r)
    s.run("--no-browser")
    assert s.run("--check").returncode == 0
    sim.fault_expire_tokens()
    r = s.run("--check")
    assert r.returncode == 1 and "Kite refused the stored access token" in last_line(r)
