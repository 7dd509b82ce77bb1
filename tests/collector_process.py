"""A collector program (bin/feed-*) run as a child process by the end-to-end tests, its TOML
configuration, and the small database and polling helpers those tests share."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def write_config(path: Path, sections: dict[str, dict]) -> Path:
    """``sections`` (table name -> keys and values) as a TOML file at ``path``; keys with a dash quoted."""
    lines = []
    for name, kv in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{json.dumps(k) if '-' in k else k} = {toml_value(v)}" for k, v in kv.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def collector_env(dsn: str, *, notify: bool = False) -> dict[str, str]:
    """The environment of a collector storing into ``dsn``: INFO logs, unbuffered, no systemd
    state directory; no notify socket or watchdog unless ``notify``."""
    env = {**os.environ, "FEEDS_DSN": dsn, "FEEDS_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
    env.pop("STATE_DIRECTORY", None)
    if not notify:
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
    return env


class CollectorProcess:
    """A collector as a child process (:meth:`start`); its log lines (stdout and stderr) are kept in ``lines``."""

    output_tail = 3000          # characters of the output shown by a failed wait_line

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ln in list(self.lines):
                if text in ln:
                    return ln
            if self.proc.poll() is not None:
                self._reader.join(2)
                for ln in self.lines:
                    if text in ln:
                        return ln
                raise AssertionError(f"exited {self.proc.returncode} without {text!r}:\n"
                                     f"{self.output[-self.output_tail:]}")
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r} in {timeout} s:\n{self.output[-self.output_tail:]}")

    def wait(self, timeout: float = 120.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def stop(self, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def collectors_of(cls):
    """The body of a ``collectors`` fixture: yields a factory of ``cls`` and, after the test,
    kills every process it made that still runs."""
    made: list[CollectorProcess] = []

    def make(*a, **kw):
        c = cls(*a, **kw)
        made.append(c)
        return c
    yield make
    for c in made:
        c.kill()


def q(dsn: str, sql: str, *args):
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, args)
        return cur.fetchall() if cur.description else []


def wait_for(fn, timeout: float = 60.0, interval: float = 0.1):
    """``fn()`` once it is true, polling every ``interval`` s; its last (false) value after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    return last
