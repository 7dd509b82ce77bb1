"""install.sh refuses, in one line and before changing anything, where systemd is not PID 1."""
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT


def test_install_without_systemd_as_pid1_exits_nonzero_with_one_line():
    if Path("/run/systemd/system").exists():
        pytest.skip("systemd is PID 1 here; the guard cannot be exercised")
    if os.geteuid() != 0:
        pytest.skip("install.sh checks for root first")
    before = {p: p.exists() for p in (Path("/opt/feeds"), Path("/etc/feeds"), Path("/etc/sysusers.d/feeds.conf"))}
    p = subprocess.run(["bash", str(ROOT / "install.sh"), "--demo"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "systemd is not running as PID 1" in lines[0], lines
    assert {q: q.exists() for q in before} == before       # nothing was installed


def test_install_rejects_unknown_option():
    p = subprocess.run(["bash", str(ROOT / "install.sh"), "--bogus"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown option --bogus" in p.stderr
