"""The unit files in systemd/: exposure, comments on hardening lines, restart settings, users,
the alert units and the drop-ins that start them.

``systemd-analyze security --offline=true FILE`` scores each service's sandbox from its
file alone (0 = fully confined, 10 = fully exposed); every unit must stay at or below
MAX_EXPOSURE.  Each hardening directive explains itself in a one-line comment right above
it; ``RestartPreventExitStatus=`` only means something next to ``Restart=``.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

UNITS = ROOT / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))
MAX_EXPOSURE = 2.5
# A unit allowed more must say why in its own comments; none needs it today.
EXCEPTIONS: dict[str, float] = {}

# Directives that confine a service (those `systemd-analyze security` weighs, and the
# identity and file-system ones next to them).
HARDENING = re.compile(
    r"^(User|Group|DynamicUser|SupplementaryGroups|NoNewPrivileges|CapabilityBoundingSet|AmbientCapabilities"
    r"|Protect\w+|Private\w+|Restrict\w+|ProcSubset|LockPersonality|MemoryDenyWriteExecute|RemoveIPC"
    r"|SystemCall\w+|UMask|IPAddress(Allow|Deny)|KeyringMode|NotifyAccess|Delegate|RootDirectory|RootImage"
    r"|ReadWritePaths|ReadOnlyPaths|InaccessiblePaths|DevicePolicy|DeviceAllow)=")


def unit_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def directives(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ln in unit_lines(path):
        m = re.match(r"^(\w+)=(.*)$", ln)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def exposure(path: Path) -> float:
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(path)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout)
    assert m, f"no exposure figure for {path.name}: {p.stdout[-500:]}{p.stderr[-500:]}"
    return float(m.group(1))


def test_there_are_units_to_check():
    names = {p.name for p in SERVICES}
    assert {"feed-binance.service", "feed-binance@.service", "feed-zerodha.service", "feed-kite-token.service",
            "feed-backfill.service", "feed-migrate.service", "feed-maintain.service",
            "feed-sim-binance.service", "feed-sim-kite.service", "feed-sim-tws.service",
            "feed-check.service", "feed-alert@.service", "feed-indicators.service", "feed-dhan.service", "feed-dhan-token.service",
            "feed-dhan-backfill.service", "feed-sim-dhan.service"} <= names


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_every_service_exposure_at_most_2_5():
    figures = {p.name: exposure(p) for p in SERVICES}
    for name, fig in figures.items():
        print(f"systemd-analyze security: {name:<28} {fig:.1f}")
    too_high = {n: f for n, f in figures.items() if f > EXCEPTIONS.get(n, MAX_EXPOSURE)}
    assert not too_high, f"exposure above {MAX_EXPOSURE}: {too_high}"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_exposure_check_can_fail(tmp_path):
    """The parser reads the figure of a unit with no confinement at all (about 9.6)."""
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    assert exposure(bare) > MAX_EXPOSURE


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_each_hardening_line_has_its_comment(path):
    lines = unit_lines(path)
    bare = [ln for i, ln in enumerate(lines) if HARDENING.match(ln) and (i == 0 or not lines[i - 1].startswith("#"))]
    assert not bare, f"{path.name}: hardening lines without a comment line above them: {bare}"


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_restart_prevent_exit_status_only_with_restart(path):
    d = directives(path)
    if "RestartPreventExitStatus" in d:
        assert d.get("Restart", ["no"])[-1] not in ("no", ""), \
            f"{path.name}: RestartPreventExitStatus= without Restart="


DROPINS = sorted(UNITS.glob("*.service.d/*.conf"))


def test_every_feed_unit_gets_on_failure_from_one_prefix_dropin():
    """feed-.service.d/ applies to every unit named feed-*.service (systemd's prefix drop-ins):
    each of them starts feed-alert@<its name>.service when it ends failed."""
    d = directives(UNITS / "feed-.service.d" / "on-failure.conf")
    assert d == {"OnFailure": ["feed-alert@%n.service"]}
    assert "[Unit]" in unit_lines(UNITS / "feed-.service.d" / "on-failure.conf")
    outside = [p.name for p in SERVICES if not p.name.startswith("feed-")]
    assert not outside, f"units the OnFailure= drop-in does not reach: {outside}"
    for p in SERVICES:
        assert "OnFailure" not in directives(p), f"{p.name}: OnFailure= belongs to the shared drop-in"


def test_alert_units_do_not_alert_about_themselves():
    """feed-alert@.service is a feed-*.service too: a drop-in of its own, read after
    on-failure.conf (drop-ins are applied in file name order across directories), empties
    OnFailure= so that a failed alert does not start another one."""
    own = sorted((UNITS / "feed-alert@.service.d").glob("*.conf"))
    resets = [p for p in own if directives(p).get("OnFailure") == [""]]
    assert resets, "feed-alert@.service.d/ has no file with an empty OnFailure="
    assert all(p.name > "on-failure.conf" for p in resets), \
        f"{[p.name for p in resets]} sort before on-failure.conf: the shared drop-in would win"
    for p in own:
        assert directives(p).get("OnFailure", [""])[-1] == "", p.name


def test_dropins_explain_themselves():
    assert DROPINS
    for p in DROPINS:
        assert unit_lines(p)[0].startswith("#"), f"{p}: starts with no comment"


def test_alert_unit_sends_the_failed_units_alert():
    d = directives(UNITS / "feed-alert@.service")
    assert d["Type"] == ["oneshot"]
    assert d["ExecStart"] == ["/opt/feeds/bin/feedctl alert --unit %i"]
    assert d["User"] == ["feeds_ops"] and d["Group"] == ["feeds_ops"]
    assert d["SupplementaryGroups"] == ["systemd-journal"], "reads the failed unit's journal"
    assert d["CapabilityBoundingSet"] == [""]
    assert "Restart" not in d
    assert {"TimeoutStartSec", "MemoryMax"} <= set(d)


def test_check_unit_and_its_timer():
    d = directives(UNITS / "feed-check.service")
    assert d["Type"] == ["oneshot"]
    assert d["ExecStart"] == ["/opt/feeds/bin/feedctl check"]
    assert d["User"] == ["feeds_ops"] and d["Group"] == ["feeds_ops"]
    assert d["SupplementaryGroups"] == ["systemd-journal"]
    assert d["StateDirectory"] == ["feeds/alerts"], "alerts.state_file is /var/lib/feeds/alerts/state.json"
    # reads the collectors' 0700 spool directories, and may do nothing else as a privilege
    assert d["AmbientCapabilities"] == ["CAP_DAC_READ_SEARCH"]
    assert d["CapabilityBoundingSet"] == ["CAP_DAC_READ_SEARCH"]
    assert d["ProtectSystem"] == ["strict"] and "ReadWritePaths" not in d
    # exit 1: a condition holds, 2: the database is unreachable (itself a condition, told once):
    # the check worked, and a failed unit would alert through feed-alert@ every minute
    assert {"1", "2"} <= set(d["SuccessExitStatus"][-1].split())
    assert {"TimeoutStartSec", "MemoryMax"} <= set(d)
    t = directives(UNITS / "feed-check.timer")
    assert t["OnCalendar"] == ["minutely"] and t["AccuracySec"] == ["5s"] and t["Persistent"] == ["false"]
    assert t.get("Unit", ["feed-check.service"]) == ["feed-check.service"]


def test_every_timer_starts_an_existing_service():
    for timer in UNITS.glob("*.timer"):
        unit = directives(timer).get("Unit", [timer.name.replace(".timer", ".service")])[-1]
        assert (UNITS / unit).exists(), f"{timer.name} starts {unit}, not in systemd/"
        assert "[Install]" in unit_lines(timer) and "WantedBy=timers.target" in unit_lines(timer), timer.name


def _sysusers() -> tuple[set[str], set[str], set[tuple[str, str]]]:
    lines = [ln.split() for ln in (UNITS / "feeds.sysusers").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    return ({ln[1] for ln in lines if ln[0] == "u"}, {ln[1] for ln in lines if ln[0] == "g"},
            {(ln[1], ln[2]) for ln in lines if ln[0] == "m"})


def test_operators_users_and_groups():
    users, groups, members = _sysusers()
    assert {"feeds_ops", "feeds_api"} <= users
    assert ("feeds_api", "feeds_ops") in members, "feed-api reads ops.toml, alerts.toml and the feeds_ops password"
    # the operators' group gives nothing but ops.toml, alerts.toml and that password: no service user is in it
    # but feed-api's, and feeds_ops is in no other group
    assert {m for m in members if m[1] == "feeds_ops"} == {("feeds_api", "feeds_ops")}
    assert not {m for m in members if m[0] == "feeds_ops"}


#: The oneshot jobs that write a node_exporter textfile.
TEXTFILE_JOBS = ("feed-maintain.service", "feed-backfill.service", "feed-kite-token.service",
                 "feed-dhan-token.service", "feed-dhan-backfill.service")


def test_oneshot_jobs_may_write_their_textfile():
    """The oneshot jobs write a node_exporter textfile in /var/lib/prometheus/node-exporter
    (tmpfiles: group feeds_metrics, group-writable); nobody else writes there."""
    users, groups, members = _sysusers()
    assert "feeds_metrics" in groups
    tmpfiles = [ln.split() for ln in (UNITS / "feeds.tmpfiles").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    line = [t for t in tmpfiles if t[1] == "/var/lib/prometheus/node-exporter"]
    assert line and line[0][0] == "d" and line[0][4] == "feeds_metrics"
    assert int(line[0][2], 8) & 0o070 == 0o070 and int(line[0][2], 8) & 0o002 == 0
    for name in TEXTFILE_JOBS:
        d = directives(UNITS / name)
        assert "-/var/lib/prometheus/node-exporter" in " ".join(d.get("ReadWritePaths", [])).split(), name
        assert (d["User"][0], "feeds_metrics") in members, f"{name}: {d['User'][0]} not in feeds_metrics"
    for p in SERVICES:   # nobody else writes there
        if p.name not in TEXTFILE_JOBS:
            assert "/var/lib/prometheus" not in " ".join(directives(p).get("ReadWritePaths", [])), p.name


def test_each_program_runs_as_its_own_user_declared_in_sysusers():
    sysusers = (UNITS / "feeds.sysusers").read_text().splitlines()
    users = {ln.split()[1] for ln in sysusers if ln.startswith("u ")}
    members = {(ln.split()[1], ln.split()[2]) for ln in sysusers if ln.startswith("m ")}
    want = {"feed-binance.service": "feeds_binance", "feed-binance@.service": "feeds_binance",
            "feed-zerodha.service": "feeds_kite", "feed-kite-token.service": "feeds_kite",
            "feed-backfill.service": "feeds_ibkr", "feed-migrate.service": "feeds",
            "feed-maintain.service": "feeds", "feed-check.service": "feeds_ops",
            "feed-alert@.service": "feeds_ops"}
    if (UNITS / "feed-api.service").exists():
        want["feed-api.service"] = "feeds_api"
    want["feed-indicators.service"] = "feeds_indicators"
    want["feed-dhan-token.service"] = "feeds_dhan"
    want["feed-dhan.service"] = "feeds_dhan"
    want["feed-dhan-backfill.service"] = "feeds_dhan"
    for name, user in want.items():
        d = directives(UNITS / name)
        assert d["User"] == [user] and d["Group"] == [user], name
        assert user in users, f"{user} not in feeds.sysusers"
        if user not in ("feeds", "feeds_ops", "feeds_api"):
            assert (user, "feeds") in members, f"{user} must be in the group feeds (reads feeds.toml)"
    for name in ("feed-sim-binance.service", "feed-sim-kite.service", "feed-sim-tws.service", "feed-sim-dhan.service"):
        d = directives(UNITS / name)
        assert d["DynamicUser"] == ["yes"] and "User" not in d, name
        assert d["IPAddressDeny"] == ["any"] and d["IPAddressAllow"] == ["localhost"], name


def test_shipped_dsn_lets_peer_authentication_pick_the_role():
    """No user= in the shipped dsn: each program connects as the role named like its OS user."""
    import tomllib
    from psycopg.conninfo import conninfo_to_dict
    cfg = tomllib.loads((ROOT / "etc" / "feeds.toml").read_text())
    assert "user" not in conninfo_to_dict(cfg["database"]["dsn"])
