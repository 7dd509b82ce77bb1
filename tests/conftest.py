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


def as_unprivileged(fn) -> int:
    """Run ``fn()`` in a forked child as the user nobody (when root; as
    this user otherwise), so that file modes apply; returns the child's exit
    status: 0 when ``fn`` returned, 1 when it raised (the error is printed)."""
    pid = os.fork()
    if pid == 0:                                  # the child: never returns into pytest
        code = 1
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            fn()
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture
def open_tmp(tmp_path_factory):
    """A fresh directory every user may enter (mode 0755 up from /tmp), for
    checks run through :func:`as_unprivileged`."""
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="feeds-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)
