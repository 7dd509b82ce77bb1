"""Daily access-token renewal: the Kite login with user id, password and
TOTP, then ``generate_session``.

Kite Connect v3 "User" / "Login flow": the login page
(``<login_url>/connect/login?api_key=..&v=3``) asks for the user id and
password, then for the second factor (an external TOTP, RFC 6238,
:func:`feeds.totp.totp_code`), and finally redirects the browser to the app's redirect
URL with ``request_token=..`` in the query.  ``POST /session/token``
(``KiteConnect.generate_session``, checksum with the api_secret) exchanges
it for the access token.

Two ways through the login:

* :func:`browser_login` drives the pages in headless Chromium through
  playwright, with Debian's ``/usr/bin/chromium`` (no browser download) and
  the flags in :data:`CHROMIUM_FLAGS`; the request_token is taken from the
  redirect request, which is never loaded.
* :func:`http_login` needs no browser: the same requests the page makes
  (``POST /api/login``, ``POST /api/twofa``), then the connect URL's
  redirects are followed by hand up to the one carrying the request_token.

:func:`renew` tries the browser first and the HTTP path when the browser
path fails for any reason other than Kite refusing the credentials; it
retries with backoff, validates the new token with the profile endpoint
and stores it.  Credentials never appear in logs or exception texts.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import parse_qs, urljoin, urlsplit

from ..totp import totp_code
from .token import AccessToken, TokenError, TokenStore, next_expiry, validate

log = logging.getLogger(__name__)
UTC = timezone.utc

#: Chromium command-line flags: headless, no sandbox (the unit's own
#: hardening confines it), and nothing that calls home or updates itself.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


class LoginError(Exception):
    """The login did not produce a token.  ``retry``: whether trying again
    later can help (network trouble, page not as expected, 5xx)."""
    retry = True


class CredentialsRejected(LoginError):
    """Kite refused the user id/password, the account is locked, or the
    TOTP code was refused.  Not retried: repeated wrong passwords lock the
    account."""
    retry = False


class BrowserUnavailable(LoginError):
    """Chromium could not be started."""


@dataclass(repr=False)
class Credentials:
    """The app (``api_key``, ``api_secret``) and the user (``user_id``,
    ``password``, ``totp_secret`` in base32).  ``repr()`` hides secrets."""
    api_key: str
    api_secret: str
    user_id: str
    password: str
    totp_secret: str
    totp_file: str = ""

    def __repr__(self) -> str:
        return f"Credentials(api_key={self.api_key!r}, user_id={self.user_id!r}, secrets hidden)"


@dataclass
class Selectors:
    """CSS selectors of the login page (comma lists: the first visible match
    is used).  The defaults match Kite's page and the simulator's."""
    user_id: str = "#userid, input[name=user_id]"
    password: str = "#password, input[name=password]"
    submit: str = "button[type=submit]"
    totp: str = ("#totp, input[name=twofa_value], input[autocomplete=one-time-code], "
                 "input[type=number], #pin")
    error: str = "#error, .error, .su-message.error, [role=alert]"


@dataclass
class LoginSettings:
    """Where and how to log in.

    ``login_url``: root of the login pages (``https://kite.zerodha.com``);
    ``api_url``: Kite Connect API root (``https://api.kite.trade``);
    ``browser``: Chromium executable; ``use_browser``/``http_fallback``:
    which paths to try; ``timeout``: seconds per page step or request.
    """
    login_url: str = "https://kite.zerodha.com"
    api_url: str = "https://api.kite.trade"
    browser: str = "/usr/bin/chromium"
    browser_flags: Sequence[str] = CHROMIUM_FLAGS
    use_browser: bool = True
    http_fallback: bool = True
    timeout: float = 30.0
    selectors: Selectors = field(default_factory=Selectors)


def _login_page_url(settings: LoginSettings, api_key: str) -> str:
    return f"{settings.login_url.rstrip('/')}/connect/login?api_key={api_key}&v=3"


def _request_token(url: str) -> str | None:
    vals = parse_qs(urlsplit(url).query).get("request_token")
    return vals[0] if vals and vals[0] else None


def _rejected(step: str, message: str, creds: Credentials) -> CredentialsRejected:
    msg = message.strip() or "refused"
    if step == "twofa":
        hint = "check the TOTP secret" + (f" in {creds.totp_file}" if creds.totp_file else "") + \
               " and the system clock"
        return CredentialsRejected(f"Kite refused the TOTP code: {msg} ({hint}; not retried)")
    if "lock" in msg.lower():
        return CredentialsRejected(f"Kite refused the login, the account is locked: {msg} "
                                   "(unlock it on Kite first; not retried)")
    return CredentialsRejected(f"Kite refused the user id or password: {msg} "
                               "(not retried: repeated failures lock the account)")


# ----------------------------------------------------------------- browser

def browser_login(creds: Credentials, settings: LoginSettings) -> str:
    """Log in through the pages in headless Chromium; returns the request_token.

    Raises :class:`BrowserUnavailable` when Chromium cannot start,
    :class:`CredentialsRejected` when the page shows Kite's refusal, and
    :class:`LoginError` when a step times out or the page is not as expected.
    """
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    sel = settings.selectors
    t_ms = settings.timeout * 1000
    captured: list[str] = []

    def on_request(req) -> None:
        tok = _request_token(req.url)
        if tok:
            captured.append(tok)

    try:
        pw_cm = sync_playwright()
        pw = pw_cm.__enter__()
    except Exception as e:
        raise BrowserUnavailable(f"playwright could not start: {e}") from None
    try:
        try:
            browser = pw.chromium.launch(executable_path=settings.browser, headless=True,
                                         args=list(settings.browser_flags), timeout=t_ms)
        except PlaywrightError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BrowserUnavailable(f"Chromium ({settings.browser}) did not start: {first}") from None
        try:
            context = browser.new_context()
            context.on("request", on_request)
            page = context.new_page()
            page.set_default_timeout(t_ms)
            page.goto(_login_page_url(settings, creds.api_key), wait_until="domcontentloaded")
            page.locator(sel.user_id).first.fill(creds.user_id)
            page.locator(sel.password).first.fill(creds.password)
            page.locator(sel.submit).first.click()
            _wait_step(page, sel.totp, sel.error, "login", creds, settings.timeout, captured)
            if not captured:
                totp = page.locator(sel.totp).first
                totp.fill(totp_code(creds.totp_secret))
                # Kite's page submits by itself once six digits are typed; the simulator's needs the button.
                page.wait_for_timeout(300)
                if not captured and not _error_text(page, sel.error):
                    try:
                        page.locator(sel.submit).first.click(timeout=2000)
                    except PlaywrightError:
                        pass
                _wait_step(page, None, sel.error, "twofa", creds, settings.timeout, captured)
            return captured[0]
        except PlaywrightError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LoginError(f"login page step failed: {first}") from None
        finally:
            try:
                browser.close()
            except Exception:
                pass
    finally:
        try:
            pw_cm.__exit__(None, None, None)
        except Exception:
            pass


def _error_text(page, selector: str) -> str:
    try:
        for el in page.locator(selector).all():
            if el.is_visible():
                txt = (el.inner_text(timeout=500) or "").strip()
                if txt:
                    return txt
    except Exception:
        return ""
    return ""


def _wait_step(page, next_selector: str | None, error_selector: str, step: str, creds: Credentials,
               timeout: float, captured: list[str]) -> None:
    """Wait until the next field is visible (or a request_token was seen),
    or the page shows an error (raised as CredentialsRejected)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if captured:
            return
        err = _error_text(page, error_selector)
        if err:
            raise _rejected(step, err, creds)
        if next_selector is not None:
            try:
                if page.locator(next_selector).first.is_visible():
                    return
            except Exception:
                pass
        page.wait_for_timeout(100)
    what = "the TOTP field" if step == "login" else "the redirect with the request_token"
    raise LoginError(f"timed out after {timeout:.0f} s waiting for {what}")


# ----------------------------------------------------------------- HTTP

def http_login(creds: Credentials, settings: LoginSettings) -> str:
    """Log in with the page's own requests, no browser; returns the request_token.

    Raises :class:`CredentialsRejected` for Kite's 4xx answers to the login
    or two-factor request, :class:`LoginError` otherwise.
    """
    import requests
    root = settings.login_url.rstrip("/")
    t = settings.timeout
    s = requests.Session()
    s.headers.update({"X-Kite-Version": "3", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) feeds"})
    try:
        r = s.get(_login_page_url(settings, creds.api_key), timeout=t)
        if r.status_code >= 400:
            raise LoginError(f"login page answered HTTP {r.status_code}")
        connect_url = r.url if "sess_id=" in r.url else _login_page_url(settings, creds.api_key)
        data = _api(s.post(f"{root}/api/login", data={"user_id": creds.user_id, "password": creds.password},
                           timeout=t), "login", creds)
        request_id = data.get("request_id")
        if not request_id:
            raise LoginError("the login answer has no request_id")
        _api(s.post(f"{root}/api/twofa", data={"user_id": data.get("user_id", creds.user_id),
                                               "request_id": request_id,
                                               "twofa_value": totp_code(creds.totp_secret),
                                               "twofa_type": "totp"}, timeout=t),
             "twofa", creds)
        url = connect_url
        for _ in range(10):
            tok = _request_token(url)
            if tok:
                return tok
            r = s.get(url, allow_redirects=False, timeout=t)
            loc = r.headers.get("Location")
            if r.status_code not in (301, 302, 303, 307, 308) or not loc:
                break
            url = urljoin(url, loc)
        raise LoginError("the login finished without a redirect carrying a request_token")
    except requests.RequestException as e:
        raise LoginError(f"login request failed: {type(e).__name__}: {_scrub(str(e))}") from None


def _scrub(text: str) -> str:
    return re.sub(r"(request_token|password|twofa_value)=[^&\s]+", r"\1=...", text)[:300]


def _api(r, step: str, creds: Credentials) -> dict:
    try:
        body = r.json()
    except ValueError:
        body = {}
    if r.status_code == 200 and body.get("status") == "success":
        return body.get("data") or {}
    msg = str(body.get("message") or f"HTTP {r.status_code}")
    if r.status_code in (400, 401, 403):
        raise _rejected(step, msg, creds)
    raise LoginError(f"{step} request answered HTTP {r.status_code}: {msg}")


# ----------------------------------------------------------------- the renewal

def obtain_request_token(creds: Credentials, settings: LoginSettings) -> tuple[str, str]:
    """The request_token and the path that got it (``browser`` or ``http``).

    Raises :class:`CredentialsRejected` at once; other failures of the
    browser path fall back to the HTTP path (when enabled), whose failure
    is raised.
    """
    if settings.use_browser:
        try:
            return browser_login(creds, settings), "browser"
        except CredentialsRejected:
            raise
        except LoginError as e:
            if not settings.http_fallback:
                raise
            log.warning("browser login failed (%s); trying the HTTP login without a browser", e)
    elif not settings.http_fallback:
        raise LoginError("neither the browser nor the HTTP login is enabled")
    return http_login(creds, settings), "http"


def exchange(creds: Credentials, request_token: str, api_url: str, method: str = "",
             now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> AccessToken:
    """``generate_session``: request_token -> :class:`AccessToken`.

    Raises :class:`LoginError` when Kite refuses (bad api_secret, used or
    expired request_token) or cannot be reached.
    """
    from kiteconnect import KiteConnect
    from kiteconnect import exceptions as kex
    import requests
    kite = KiteConnect(creds.api_key, root=api_url)
    try:
        data = kite.generate_session(request_token, api_secret=creds.api_secret)
    except kex.KiteException as e:
        raise LoginError(f"generate_session refused: {e} (check the api_secret)") from None
    except requests.RequestException as e:
        raise LoginError(f"generate_session failed: {type(e).__name__}") from None
    obtained = now()
    login_time = data.get("login_time")
    return AccessToken(api_key=creds.api_key, user_id=str(data.get("user_id") or creds.user_id),
                       access_token=str(data["access_token"]), obtained_at=obtained,
                       expires_at=next_expiry(obtained),
                       login_time=str(login_time) if login_time is not None else "", method=method)


def renew(creds: Credentials, settings: LoginSettings, store: TokenStore, *, attempts: int = 4,
          delays: Sequence[float] = (15.0, 60.0, 180.0), sleep: Callable[[float], None] = time.sleep,
          status: Callable[[str], None] = lambda s: None) -> AccessToken:
    """Obtain, validate (profile endpoint) and store a new access token.

    Up to ``attempts`` tries, waiting ``delays[i]`` (the last one repeats)
    between them.  Raises :class:`CredentialsRejected` at once, and
    :class:`LoginError` with the last reason after the last attempt.
    """
    from kiteconnect import exceptions as kex
    import requests
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        status(f"STATUS=logging in (attempt {attempt} of {attempts})")
        try:
            request_token, method = obtain_request_token(creds, settings)
            tok = exchange(creds, request_token, settings.api_url, method)
            prof = validate(tok, settings.api_url, timeout=settings.timeout)
            store.save(tok)
            log.info("new access token stored in %s (%s; profile check: %s)", store.path, tok.describe(),
                     prof.get("user_name") or prof.get("user_id") or "ok")
            return tok
        except CredentialsRejected:
            raise
        except (LoginError, TokenError, kex.KiteException, requests.RequestException, OSError, ValueError) as e:
            last = e
            if isinstance(e, ValueError) and "TOTP" in str(e):
                raise CredentialsRejected(str(e)) from None
            if attempt == attempts:
                break
            wait = delays[min(attempt - 1, len(delays) - 1)] if delays else 0.0
            log.warning("token renewal attempt %d of %d failed: %s; retrying in %.3g s", attempt, attempts,
                        _scrub(str(e)) or type(e).__name__, wait)
            sleep(wait)
    raise LoginError(f"token renewal failed after {attempts} attempt(s): "
                     f"{_scrub(str(last)) or type(last).__name__}")
