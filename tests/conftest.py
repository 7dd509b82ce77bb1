from __future__ import annotations

import configparser
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
SHARED_DATA = Path(os.environ.get("FEEDS_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_file(*parts: str) -> Path:
    """A file of the real recordings; skips the test when absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"recorded data not available: {p}")
    return p


def pinned_in_setup_cfg(package: str) -> str:
    """The version ``package`` is pinned to (``==``) in setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    for line in cfg["options"]["install_requires"].splitlines():
        m = re.fullmatch(rf"\s*{re.escape(package)}\s*==\s*(\S+)\s*", line)
        if m:
            return m.group(1)
    raise AssertionError(f"{package} is not pinned with == in setup.cfg")


@pytest.fixture(scope="session")
def pg():
    from pgserver import PgServer
    try:
        srv = PgServer().init()
    except (RuntimeError, OSError) as e:
        pytest.skip(f"PostgreSQL server binaries unavailable: {e}")
    srv.start()
    yield srv
    srv.destroy()


@pytest.fixture
def db(pg):
    """A fresh database with every migration applied; yields its DSN."""
    from feeds.migrate import apply
    name = pg.create_db()
    dsn = pg.dsn(name)
    apply(dsn, ROOT / "sql")
    yield dsn
