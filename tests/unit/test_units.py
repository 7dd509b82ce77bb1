"""The unit files in systemd/: exposure, comments on hardening lines, restart settings, users.

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
            "feed-sim-binance.service", "feed-sim-kite.service", "feed-sim-tws.service"} <= names


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


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_no_comment_promises_an_alert(path):
    """Nothing sends alerts yet: a unit must not say one fires."""
    assert not [ln for ln in unit_lines(path) if ln.startswith("#") and "alert" in ln.lower()]


def test_each_program_runs_as_its_own_user_declared_in_sysusers():
    sysusers = (UNITS / "feeds.sysusers").read_text().splitlines()
    users = {ln.split()[1] for ln in sysusers if ln.startswith("u ")}
    members = {(ln.split()[1], ln.split()[2]) for ln in sysusers if ln.startswith("m ")}
    want = {"feed-binance.service": "feeds_binance", "feed-binance@.service": "feeds_binance",
            "feed-zerodha.service": "feeds_kite", "feed-kite-token.service": "feeds_kite",
            "feed-backfill.service": "feeds_ibkr", "feed-migrate.service": "feeds",
            "feed-maintain.service": "feeds"}
    for name, user in want.items():
        d = directives(UNITS / name)
        assert d["User"] == [user] and d["Group"] == [user], name
        assert user in users, f"{user} not in feeds.sysusers"
        if user != "feeds":
            assert (user, "feeds") in members, f"{user} must be in the group feeds (reads feeds.toml)"
    for name in ("feed-sim-binance.service", "feed-sim-kite.service", "feed-sim-tws.service"):
        d = directives(UNITS / name)
        assert d["DynamicUser"] == ["yes"] and "User" not in d, name
        assert d["IPAddressDeny"] == ["any"] and d["IPAddressAllow"] == ["localhost"], name


def test_shipped_dsn_lets_peer_authentication_pick_the_role():
    """No user= in the shipped dsn: each program connects as the role named like its OS user."""
    import tomllib
    from psycopg.conninfo import conninfo_to_dict
    cfg = tomllib.loads((ROOT / "etc" / "feeds.toml").read_text())
    assert "user" not in conninfo_to_dict(cfg["database"]["dsn"])
