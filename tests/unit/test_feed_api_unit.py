"""feed-api's pure parts: unit names, redaction, status-line rates, the page's
HTML and SVG, the polkit rule (run by node when installed) and the D-Bus
client against a stand-in ``org.freedesktop.systemd1`` on a private
dbus-daemon (when installed)."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from feeds.config import ConfigError
from feeds.health import status_rates
from feeds.ops import api, page, systemd_bus
from feeds.ops.systemd_bus import AccessDenied, BusError, NoSuchUnit, SystemdManager

ROOT = Path(__file__).resolve().parents[2]
UTC = dt.timezone.utc


# -- unit names -----------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,name", [
    ("feed-binance.service", "feed-binance.service"),
    ("feed-binance", "feed-binance.service"),
    (" feed-zerodha ", "feed-zerodha.service"),
    ("feed-binance@1of2.service", "feed-binance@1of2.service"),
    ("feed-binance@1of2", "feed-binance@1of2.service"),
    ("feed-sim_binance.service", "feed-sim_binance.service"),
])
def test_unit_name_accepts_feed_services(raw, name):
    assert api.unit_name(raw) == name
    assert api.UNIT_RE.match(name)


@pytest.mark.parametrize("raw", ["sshd.service", "sshd", "dbus", "systemd-journald.service",
                                 "feed-binance.timer", "feed-binance.socket", "feed-api.service",
                                 "feed-api", "multi-user.target", "feedbinance.service"])
def test_unit_name_forbids_other_units(raw):
    with pytest.raises(api.ForbiddenUnit):
        api.unit_name(raw)


@pytest.mark.parametrize("raw", ["", " ", "../etc/passwd", "feed-../x.service", "feed-a/b.service",
                                 "feed-a b.service", "feed-a;reboot", "feed-$(id)", "feed-a\n.service",
                                 "feed-", "feed-binance@.service", ".feed-x.service", "-feed-x.service",
                                 "feed-é.service", "f" * 300, None, 3, ["feed-binance.service"]])
def test_unit_name_rejects_malformed_names(raw):
    with pytest.raises(api.BadUnit):
        api.unit_name(raw)


# -- redaction -----------------------------------------------------------------------------------

SECRET = "Sup3r-S3cret"


@pytest.mark.parametrize("key,value", [
    ("database.dsn", f"host=127.0.0.1 dbname=feeds user=feeds_ops password={SECRET}"),
    ("database.dsn", f"host=127.0.0.1 password='{SECRET} with space' dbname=feeds"),
    ("database.dsn", f"postgresql://feeds_ops:{SECRET}@127.0.0.1:5432/feeds"),
    ("other.dsn", f"postgresql://feeds_ops:{SECRET}@127.0.0.1/feeds?sslmode=require"),
    ("x.note", f"connect with host=a password={SECRET}"),
    ("x.url", f"mqtts://user:{SECRET}@broker.example:8883/"),
    ("x.password", SECRET), ("x.token", SECRET), ("x.api_secret", SECRET), ("x.secret", SECRET),
    ("kite.login.totp_secret", SECRET),
    ("x.list", [f"https://u:{SECRET}@h/x", "plain"]),
    ("x", {"password": SECRET, "inner": {"token": SECRET}}),
])
def test_redact_hides_secrets(key, value):
    out = api.redact(key, value)
    assert SECRET not in json.dumps(out)


def test_redact_keeps_file_paths_and_plain_values():
    assert api.redact("database.password_file", "/etc/feeds/secrets/x.password") == "/etc/feeds/secrets/x.password"
    assert api.redact("alerts.url_files", ["/etc/feeds/secrets/alert-mail.url"]) == \
        ["/etc/feeds/secrets/alert-mail.url"]
    assert api.redact("api.token_file", "/t") == "/t"
    assert api.redact("binance.symbols", ["BTCUSDT"]) == ["BTCUSDT"]
    assert api.redact("api.port", 9800) == 9800
    dsn = api.redact("database.dsn", "host=/run/postgresql dbname=feeds")
    assert dsn == "host=/run/postgresql dbname=feeds"
    red = api.redact("database.dsn", f"host=h user=u password={SECRET}")
    assert "user=u" in red and "host=h" in red and api.REDACTED in red


def test_effective_config_never_opens_secret_files(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    (tmp_path / "ops.toml").write_text(f'[database]\ndsn = "host=h"\npassword_file = "{secret}"\n')
    out = api.effective_config(tmp_path)
    assert out["ops.toml"]["error"] is None
    assert out["ops.toml"]["values"]["database.password_file"] == str(secret)
    assert out["ops.toml"]["values"]["api.port"] == 9800
    assert SECRET not in json.dumps(out)
    assert api.effective_config(tmp_path / "missing") == {}


def test_schema_for_demo_files():
    assert api._schema_for("binance-demo.toml").name == "binance.toml"
    assert api._schema_for("kite.toml").name == "kite.toml"
    assert api._schema_for("whatever.toml") is None


# -- status ----------------------------------------------------------------------------------------

def test_stream_rates_from_status_lines():
    assert status_rates("aggTrade 1,234/s max-age 0.2s; bookTicker 0/s (no data); stored 5,000; "
                            "lag p50 3ms p99 9ms; reconnects 2") == {"aggTrade": 1234.0, "bookTicker": 0.0}
    assert status_rates("") == {}
    assert status_rates("starting") == {}


def test_venue_of_unit():
    assert api.venue_of_unit("feed-binance.service") == "binance"
    assert api.venue_of_unit("feed-binance@2of2.service") == "binance"
    assert api.venue_of_unit("feed-zerodha.service") == "kite"
    assert api.venue_of_unit("feed-ibkr.service") == "ibkr"
    assert api.venue_of_unit("feed-backfill.service") is None
    assert api.venue_of_unit("feed-binancex.service") is None
    assert api.venue_of_unit("feed-dhan.service") == "dhan"
    assert api.venue_of_unit("feed-dhan-token.service") is None
    assert api.venue_of_unit("feed-dhan-backfill.service") is None


def test_create_app_refuses_an_empty_token():
    with pytest.raises(ValueError):
        api.create_app(api.Settings(token="", dsn="host=x"), object())


# -- page --------------------------------------------------------------------------------------------

NOW = dt.datetime(2026, 3, 2, 12, 30, 20, tzinfo=UTC)


def _status(units):
    return {"now": NOW.isoformat(), "database": "ok", "systemd": "ok", "units": units}


def _unit(name, status="aggTrade 5/s max-age 0.1s", total=97):
    return {"unit": name, "venue": api.venue_of_unit(name),
            "systemd": {"name": name, "load_state": "loaded", "active_state": "active", "sub_state": "running",
                        "result": "success", "n_restarts": 0, "description": ""},
            "heartbeat": {"age_s": 3.0, "state": "running", "status": status, "host": "h", "pid": 1,
                          "started_at": None, "updated_at": None},
            "health": {"total": total, "parts": {"running": 30}, "reasons": ["lag"]},
            "rates": status_rates(status), "stored": {}, "spooled_rows": 0, "pending": 0,
            "last_message_age_s": 1.0}


def test_page_escapes_everything_and_fetches_nothing():
    hostile = '<script>alert(1)</script><img src="http://evil.example/x.png">'
    html = page.render(_status([_unit("feed-binance.service", status=hostile)]), {}, host="<b>h</b>")
    assert "<script" not in html and "<img" not in html and "<b>h</b>" not in html
    assert "&lt;script&gt;" in html
    assert ' src="' not in html and "url(" not in html and "@import" not in html
    assert html.count(' href="') == 1 and ' href="data:,"' in html       # the empty favicon
    assert 'data-unit="feed-binance.service"' in html
    assert "no rows stored in this period" in html
    assert "default-src 'none'" in page.HEADERS["Content-Security-Policy"]


def test_page_chart_has_a_series_per_venue_with_rows():
    last = int(NOW.replace(second=0).timestamp())
    series = {"binance": {last - 60: 100.0, last - 120: 50.0, last - 3600: 7.0},
              "kite": {last - 600: 3.0}, "ibkr": {}}
    html = page.render(_status([_unit("feed-binance.service"), _unit("feed-zerodha.service", "full 1/s")]),
                       series, estimated={"binance": True})
    assert html.count('class="series"') == 2
    assert 'data-venue="binance" data-points="3"' in html
    assert 'data-venue="kite" data-points="1"' in html
    assert "binance (estimated)" in html
    svg = page.chart_svg(series, NOW)
    first = svg.index(' points="') + len(' points="')
    assert len(svg[first:svg.index('"', first)].split()) == 24 * 60


def test_page_without_units_or_database():
    html = page.render({"now": NOW.isoformat(), "database": "connection refused", "systemd": "ok",
                        "units": []}, {})
    assert "no feed unit known" in html
    assert "database: connection refused" in html


def test_nice_max_and_format():
    assert page._nice_max(0) == 1 and page._nice_max(3) == 5 and page._nice_max(5) == 5
    assert page._nice_max(51) == 100 and page._nice_max(0.3) == 0.5
    assert page._fmt(1500) == "1.5k" and page._fmt(2_500_000) == "2.5M" and page._fmt(12) == "12"


# -- polkit rule ----------------------------------------------------------------------------------

POLKIT_HARNESS = r"""
const fs = require("fs");
let rule = null;
const polkit = { Result: { YES: "yes", NO: "no", NOT_HANDLED: null, AUTH_ADMIN: "auth_admin" },
                 addRule: (f) => { rule = f; } };
new Function("polkit", fs.readFileSync(process.argv[2], "utf8"))(polkit);
const cases = JSON.parse(process.argv[3]);
const out = cases.map(([user, id, unit, verb]) => {
    const action = { id: id, lookup: (k) => ({ unit: unit, verb: verb })[k] };
    const r = rule(action, { user: user });
    return r === undefined ? null : r;
});
console.log(JSON.stringify(out));
"""

MANAGE = "org.freedesktop.systemd1.manage-units"


def test_polkit_rule_lets_feeds_api_manage_feed_units_only(tmp_path):
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node not installed (the rule is checked by polkitd in the system test)")
    cases = [
        ("feeds_api", MANAGE, "feed-binance.service", "start", "yes"),
        ("feeds_api", MANAGE, "feed-binance.service", "stop", "yes"),
        ("feeds_api", MANAGE, "feed-binance@1of2.service", "restart", "yes"),
        ("feeds_api", MANAGE, "feed-binance.service", "reload", "no"),
        ("feeds_api", MANAGE, "feed-binance.service", "enable", "no"),
        ("feeds_api", MANAGE, "ssh.service", "start", "no"),
        ("feeds_api", MANAGE, "feed-binance.timer", "start", "no"),
        ("feeds_api", MANAGE, "xfeed-binance.service", "stop", "no"),
        ("feeds_api", MANAGE, "feed-binance.service\nssh.service", "stop", "no"),
        ("feeds_api", MANAGE, None, "start", "no"),
        ("feeds_api", "org.freedesktop.systemd1.manage-unit-files", "feed-binance.service", "start", "no"),
        ("feeds_api", "org.freedesktop.login1.reboot", None, None, "no"),
        ("alice", MANAGE, "feed-binance.service", "start", None),
        ("feeds_ops", MANAGE, "feed-binance.service", "restart", None),
    ]
    harness = tmp_path / "harness.js"
    harness.write_text(POLKIT_HARNESS)
    out = subprocess.run([node, str(harness), str(ROOT / "systemd" / "feeds-api.polkit.rules"),
                          json.dumps([c[:4] for c in cases])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert [(c[:4], g) for c, g in zip(cases, got)] == [(c[:4], c[4]) for c in cases]


# -- unit file -------------------------------------------------------------------------------------

def test_unit_file_hardening_lines_are_commented():
    lines = (ROOT / "systemd" / "feed-api.service").read_text().splitlines()
    text = "\n".join(lines)
    for want in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "MemoryMax=", "User=feeds_api",
                 "SupplementaryGroups=feeds_ops", "ExecStart=/opt/feeds/bin/feed-api",
                 "RestrictAddressFamilies=AF_UNIX AF_INET"):
        assert want in text
    hardening = ("Protect", "Private", "NoNewPrivileges", "CapabilityBoundingSet", "Restrict", "Lock",
                 "MemoryDeny", "RemoveIPC", "SystemCall", "UMask", "IPAddress")
    for i, line in enumerate(lines):
        if line.startswith(hardening):
            assert lines[i - 1].startswith("#"), line


# -- the D-Bus client -------------------------------------------------------------------------------

def test_errors_are_mapped():
    from jeepney import DBusErrorResponse

    class Msg:
        def __init__(self, name, text):
            from jeepney.low_level import HeaderFields

            class H:
                fields = {HeaderFields.error_name: name}
            self.header, self.body = H(), (text,)

    e = systemd_bus._error(DBusErrorResponse(Msg("org.freedesktop.DBus.Error.AccessDenied", "no")), "u")
    assert isinstance(e, AccessDenied) and isinstance(e, PermissionError) and e.reason == "no"
    e = systemd_bus._error(DBusErrorResponse(Msg(
        "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired", "Interactive authentication required.")))
    assert isinstance(e, AccessDenied)
    e = systemd_bus._error(DBusErrorResponse(Msg("org.freedesktop.systemd1.NoSuchUnit", "Unit x not found.")), "x")
    assert isinstance(e, NoSuchUnit) and isinstance(e, LookupError)
    e = systemd_bus._error(DBusErrorResponse(Msg("org.freedesktop.systemd1.JobTypeNotApplicable", "nope")))
    assert isinstance(e, BusError)
    assert isinstance(systemd_bus._error(ConnectionRefusedError(111, "refused")), BusError)


class FakeSystemd:
    """``org.freedesktop.systemd1`` on a private bus: two units, jobs recorded,
    ``feed-locked.service`` refused the way polkit refuses."""

    UNITS = {"feed-binance.service": ("loaded", "active", "running"),
             "feed-locked.service": ("loaded", "inactive", "dead")}

    def __init__(self, address: str):
        from jeepney.io.blocking import open_dbus_connection
        from jeepney.bus_messages import message_bus
        self.conn = open_dbus_connection(address)
        self.conn.send_and_get_reply(message_bus.RequestName(systemd_bus.SYSTEMD))
        self.jobs: list[tuple[str, str, str]] = []
        self.stop = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    @staticmethod
    def path(name):
        return "/org/freedesktop/systemd1/unit/" + name.replace("-", "_2d").replace(".", "_2e")

    def reply(self, msg):
        from jeepney import new_error, new_method_return
        from jeepney.low_level import HeaderFields
        h = msg.header.fields
        member, iface, path = h.get(HeaderFields.member), h.get(HeaderFields.interface), h.get(HeaderFields.path)
        body = msg.body
        if member == "ListUnitsByPatterns":
            units = [(n, "desc " + n, ld, a, s, "", self.path(n), 0, "", "/")
                     for n, (ld, a, s) in sorted(self.UNITS.items())]
            return new_method_return(msg, "a(ssssssouso)", (units,))
        if member == "LoadUnit":
            return new_method_return(msg, "o", (self.path(body[0]),))
        if member == "Get":
            by_path = {self.path(n): (n, v) for n, v in self.UNITS.items()}
            n, (ld, a, s) = by_path.get(path, ("missing", ("not-found", "inactive", "dead")))
            vals = {"LoadState": ("s", ld), "ActiveState": ("s", a), "SubState": ("s", s),
                    "Description": ("s", "desc"), "Result": ("s", "success"), "NRestarts": ("u", 2)}
            return new_method_return(msg, "v", (vals[body[1]],))
        if member in ("StartUnit", "StopUnit", "RestartUnit"):
            if body[0] not in self.UNITS:
                return new_error(msg, "org.freedesktop.systemd1.NoSuchUnit", "s", (f"Unit {body[0]} not found.",))
            if body[0] == "feed-locked.service":
                return new_error(msg, "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired", "s",
                                 ("Interactive authentication required.",))
            self.jobs.append((member, body[0], body[1]))
            return new_method_return(msg, "o", (f"/org/freedesktop/systemd1/job/{len(self.jobs)}",))
        return new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s", (f"{iface}.{member}",))

    def serve(self):
        from jeepney.low_level import MessageType
        while not self.stop:
            try:
                msg = self.conn.receive(timeout=0.2)
            except TimeoutError:
                continue
            except Exception:
                return
            if msg.header.message_type == MessageType.method_call:
                self.conn.send(self.reply(msg))


@pytest.fixture
def private_bus():
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        pytest.skip("dbus-daemon not installed")
    d = tempfile.mkdtemp(prefix="feeds-dbus-")
    address = f"unix:path={d}/bus"
    proc = subprocess.Popen([daemon, "--session", "--nofork", "--nopidfile", f"--address={address}",
                             "--print-address"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("unix:")
        fake = FakeSystemd(address)
        yield address, fake
        fake.stop = True
        fake.thread.join(5)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def test_systemd_manager_over_a_real_bus(private_bus):
    address, fake = private_bus
    m = SystemdManager(bus=address, timeout=5)

    async def go():
        units = await m.list_units(["feed-*.service"])
        assert [u.name for u in units] == ["feed-binance.service", "feed-locked.service"]
        assert units[0].active_state == "active" and units[0].sub_state == "running"
        assert units[0].result == "success" and units[0].n_restarts == 2
        st = await m.unit_state("feed-binance.service")
        assert st.load_state == "loaded" and st.active_state == "active"
        with pytest.raises(NoSuchUnit):
            await m.unit_state("feed-nope.service")
        assert (await m.restart("feed-binance.service")).startswith("/org/freedesktop/systemd1/job/")
        await m.stop("feed-binance.service")
        await m.start("feed-binance.service")
        with pytest.raises(AccessDenied) as e:
            await m.start("feed-locked.service")
        assert "Interactive authentication required" in e.value.reason
        with pytest.raises(NoSuchUnit):
            await m.stop("feed-nope.service")
    asyncio.run(go())
    assert fake.jobs == [("RestartUnit", "feed-binance.service", "replace"),
                         ("StopUnit", "feed-binance.service", "replace"),
                         ("StartUnit", "feed-binance.service", "replace")]


def test_systemd_manager_without_a_bus(tmp_path):
    m = SystemdManager(bus=f"unix:path={tmp_path}/no-bus", timeout=2)
    with pytest.raises(BusError):
        asyncio.run(m.list_units(["feed-*.service"]))


def test_command_line(private_bus, capsys):
    address, fake = private_bus
    m = SystemdManager(bus=address, timeout=5)
    assert asyncio.run(systemd_bus._main(["list"], m)) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["name"] for x in lines] == ["feed-binance.service", "feed-locked.service"]
    assert asyncio.run(systemd_bus._main(["restart", "feed-binance.service"], m)) == 0
    assert json.loads(capsys.readouterr().out)["job"].startswith("/org/freedesktop/systemd1/job/")
    assert asyncio.run(systemd_bus._main(["start", "feed-locked.service"], m)) == 77
    assert asyncio.run(systemd_bus._main(["stop", "feed-nope.service"], m)) == 4
    assert asyncio.run(systemd_bus._main(["frobnicate"], m)) == 2
    assert os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") != address      # nothing leaked into the environment


def test_the_health_threshold_comes_from_alerts_toml_beside_ops_toml_or_the_one_named(tmp_path, monkeypatch):
    from feeds.settings import OPS_FILE, load
    monkeypatch.setenv("FEEDS_DSN", "host=127.0.0.1 dbname=feeds user=feeds_ops")
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    token.chmod(0o600)
    (tmp_path / "ops.toml").write_text(f'[api]\ntoken_file = "{token}"\n')
    cfg = load(tmp_path / "ops.toml", OPS_FILE)
    assert api.settings_from_config(cfg).params.health_threshold == 60          # no alerts.toml: default
    (tmp_path / "alerts.toml").write_text("[alerts]\nhealth_threshold = 45\n")
    assert api.settings_from_config(cfg).params.health_threshold == 45
    other = tmp_path / "other.toml"
    other.write_text("[alerts]\nhealth_threshold = 30\n")
    s = api.settings_from_config(cfg, alerts=api.alerts_beside(cfg, other))
    assert s.params.health_threshold == 30 and s.token == "t0ken"
    other.write_text("[alerts]\nhealth_treshold = 30\n")
    with pytest.raises(ConfigError, match="alerts.health_treshold") as e:
        api.alerts_beside(cfg, other)
    assert e.value.file == str(other)
