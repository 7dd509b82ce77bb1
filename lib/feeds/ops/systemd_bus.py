"""A small client of systemd's D-Bus API (``org.freedesktop.systemd1``), with jeepney.

Used by ``feed-api`` to read the state of the feed units and to start, stop
and restart them.  Every call opens its own connection to the system bus
(asyncio, :mod:`jeepney.io.asyncio`) and closes it, so a restarted
dbus-daemon or systemd never leaves a stale connection behind.

Reading unit states needs no privilege.  Starting, stopping and restarting
a unit is checked by polkit (action ``org.freedesktop.systemd1.manage-units``,
details ``unit`` and ``verb``); ``systemd/feeds-api.polkit.rules`` lets the
user ``feeds_api`` do it for ``feed-*.service`` units and nothing else.

Errors:

* :class:`AccessDenied` (a ``PermissionError``): the bus or polkit refused
  (``org.freedesktop.DBus.Error.AccessDenied``,
  ``org.freedesktop.DBus.Error.InteractiveAuthorizationRequired``);
  ``reason`` is systemd's text.
* :class:`NoSuchUnit` (a ``LookupError``): the unit does not exist
  (``org.freedesktop.systemd1.NoSuchUnit``, or LoadState ``not-found``).
* :class:`BusError` (a ``RuntimeError``): anything else, also "no system bus".

The manager interface (:class:`SystemdManager`) is what ``feeds.ops.api``
uses; tests pass an object with the same coroutine methods.

A trivial command line for checking the real path on a machine::

    python -m feeds.ops.systemd_bus list                 # feed-*.service units, JSON lines
    python -m feeds.ops.systemd_bus show feed-binance.service
    python -m feeds.ops.systemd_bus restart feed-binance.service

Exit status: 0 done, 1 other D-Bus error, 4 no such unit, 77 access denied.
"""
from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict, dataclass
from typing import Iterable, Protocol

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"

#: D-Bus error names meaning "not allowed".
DENIED_ERRORS = frozenset({
    "org.freedesktop.DBus.Error.AccessDenied",
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
    "org.freedesktop.DBus.Error.AuthFailed",
})
#: D-Bus error names meaning "no such unit".
UNKNOWN_UNIT_ERRORS = frozenset({
    "org.freedesktop.systemd1.NoSuchUnit",
    "org.freedesktop.systemd1.LoadFailed",
})

#: ActiveState values of a unit (systemd.unit(5)).
ACTIVE_STATES = ("active", "reloading", "inactive", "failed", "activating", "deactivating", "maintenance")

#: seconds a D-Bus connection or call may take.
TIMEOUT = 10.0


class AccessDenied(PermissionError):
    """The bus or polkit refused the call; ``reason``: systemd's one-line text."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class NoSuchUnit(LookupError):
    """``unit`` does not exist (no unit file, not loaded)."""

    def __init__(self, unit: str, reason: str = ""):
        self.unit = unit
        super().__init__(reason or f"unit {unit} not found")


class BusError(RuntimeError):
    """Any other failure of the D-Bus call (no system bus, systemd error...)."""


@dataclass(frozen=True)
class UnitState:
    """systemd's view of one unit.

    ``name`` (e.g. ``feed-binance.service``), ``description``,
    ``load_state`` (``loaded`` / ``not-found`` / ...), ``active_state``
    (one of :data:`ACTIVE_STATES`), ``sub_state`` (``running``, ``dead``...),
    ``result`` (a service's Result: ``success``, ``exit-code``...; ``""``
    when not read), ``n_restarts`` (a service's NRestarts, cumulative since
    the unit was loaded).
    """
    name: str
    load_state: str = "loaded"
    active_state: str = "inactive"
    sub_state: str = ""
    result: str = ""
    n_restarts: int = 0
    description: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


class Manager(Protocol):
    """What :mod:`feeds.ops.api` needs of systemd (all coroutines).

    ``list_units(patterns)``: the loaded units whose names match one of the
    glob ``patterns``; ``unit_state(name)``: one unit (raises
    :class:`NoSuchUnit`); ``start``/``stop``/``restart(name)``: queue the job
    (mode ``replace``) and return its object path (raise
    :class:`AccessDenied`, :class:`NoSuchUnit`, :class:`BusError`).
    """

    async def list_units(self, patterns: Iterable[str]) -> list[UnitState]: ...

    async def unit_state(self, name: str) -> UnitState: ...

    async def start(self, name: str) -> str: ...

    async def stop(self, name: str) -> str: ...

    async def restart(self, name: str) -> str: ...


def _error(e: Exception, unit: str | None = None) -> Exception:
    """The exception of this module for a jeepney error ``e``."""
    from jeepney import DBusErrorResponse
    if isinstance(e, DBusErrorResponse):
        text = " ".join(str(x) for x in (e.data or ())) or str(e.name)
        if e.name in DENIED_ERRORS:
            return AccessDenied(text)
        if e.name in UNKNOWN_UNIT_ERRORS:
            return NoSuchUnit(unit or "?", text)
        return BusError(f"{e.name}: {text}")
    if isinstance(e, (OSError, EOFError, asyncio.TimeoutError)):
        return BusError(f"system bus unreachable: {type(e).__name__}: {e}")
    return BusError(f"{type(e).__name__}: {e}")


def _value(v):
    """A property value as jeepney returns it: a ``(signature, value)`` variant."""
    return v[1] if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) else v


class SystemdManager:
    """The real manager: systemd on the system bus (``bus`` ``"SYSTEM"``,
    or a bus address such as ``unix:path=/run/dbus/system_bus_socket``)."""

    def __init__(self, bus: str = "SYSTEM", timeout: float = TIMEOUT):
        self.bus, self.timeout = bus, timeout

    async def _calls(self, msgs_fn, unit: str | None = None):
        """Open a connection, run ``await msgs_fn(call)`` where ``call(msg)``
        returns a reply's body (raising on an error reply), close it."""
        from jeepney.io.asyncio import open_dbus_router
        from jeepney.wrappers import unwrap_msg
        try:
            async with open_dbus_router(bus=self.bus) as router:
                async def call(msg):
                    reply = await asyncio.wait_for(router.send_and_get_reply(msg), self.timeout)
                    return unwrap_msg(reply)
                return await asyncio.wait_for(msgs_fn(call), self.timeout * 3)
        except (AccessDenied, NoSuchUnit, BusError):
            raise
        except Exception as e:          # jeepney / OS errors, mapped to this module's
            raise _error(e, unit) from None

    @staticmethod
    def _manager_call(method: str, signature: str = "", body: tuple = ()):
        from jeepney import DBusAddress, new_method_call
        return new_method_call(DBusAddress(MANAGER_PATH, SYSTEMD, MANAGER_IFACE), method, signature, body)

    @staticmethod
    def _get(path: str, iface: str, prop: str):
        from jeepney import DBusAddress, Properties
        return Properties(DBusAddress(path, SYSTEMD, iface)).get(prop)

    async def _service_props(self, call, path: str, name: str) -> tuple[str, int]:
        if not name.endswith(".service"):
            return "", 0
        try:
            result = _value((await call(self._get(path, SERVICE_IFACE, "Result")))[0])
            n = _value((await call(self._get(path, SERVICE_IFACE, "NRestarts")))[0])
        except Exception:           # an old systemd without NRestarts, a unit that is not a service
            return "", 0
        return str(result), int(n)

    async def list_units(self, patterns: Iterable[str] = ("feed-*.service",)) -> list[UnitState]:
        pats = list(patterns)

        async def run(call):
            (units,) = await call(self._manager_call("ListUnitsByPatterns", "asas", ([], pats)))
            out = []
            for (name, desc, load, active, sub, _following, path, *_job) in units:
                result, n = await self._service_props(call, path, name)
                out.append(UnitState(name, load, active, sub, result, n, desc))
            return sorted(out, key=lambda u: u.name)
        return await self._calls(run)

    async def unit_state(self, name: str) -> UnitState:
        async def run(call):
            # LoadUnit: also a unit with a file that nothing has loaded yet; "not-found" otherwise
            (path,) = await call(self._manager_call("LoadUnit", "s", (name,)))
            vals = {}
            for prop in ("LoadState", "ActiveState", "SubState", "Description"):
                vals[prop] = str(_value((await call(self._get(path, UNIT_IFACE, prop)))[0]))
            if vals["LoadState"] == "not-found":
                raise NoSuchUnit(name)
            result, n = await self._service_props(call, path, name)
            return UnitState(name, vals["LoadState"], vals["ActiveState"], vals["SubState"], result, n,
                             vals["Description"])
        return await self._calls(run, name)

    async def _job(self, method: str, name: str) -> str:
        async def run(call):
            (job,) = await call(self._manager_call(method, "ss", (name, "replace")))
            return str(job)
        return await self._calls(run, name)

    async def start(self, name: str) -> str:
        return await self._job("StartUnit", name)

    async def stop(self, name: str) -> str:
        return await self._job("StopUnit", name)

    async def restart(self, name: str) -> str:
        return await self._job("RestartUnit", name)


# -- command line ---------------------------------------------------------------------------------

USAGE = """usage: python -m feeds.ops.systemd_bus list [PATTERN...]
       python -m feeds.ops.systemd_bus show UNIT
       python -m feeds.ops.systemd_bus start|stop|restart UNIT
Talks to systemd over the system bus (DBUS_SYSTEM_BUS_ADDRESS overrides its address);
prints JSON. Exit status: 0 done, 1 D-Bus error, 2 usage, 4 no such unit, 77 access denied."""


async def _main(argv: list[str], manager: SystemdManager) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "list":
            for u in await manager.list_units(args or ["feed-*.service"]):
                print(json.dumps(u.as_dict()))
        elif cmd == "show" and len(args) == 1:
            print(json.dumps((await manager.unit_state(args[0])).as_dict()))
        elif cmd in ("start", "stop", "restart") and len(args) == 1:
            job = await getattr(manager, cmd)(args[0])
            print(json.dumps({"unit": args[0], "action": cmd, "job": job}))
        else:
            print(USAGE, file=sys.stderr)
            return 2
    except AccessDenied as e:
        print(f"access denied: {e.reason}", file=sys.stderr)
        return 77
    except NoSuchUnit as e:
        print(f"no such unit: {e}", file=sys.stderr)
        return 4
    except BusError as e:
        print(f"D-Bus error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_main(sys.argv[1:] if argv is None else argv, SystemdManager()))


if __name__ == "__main__":
    sys.exit(main())
