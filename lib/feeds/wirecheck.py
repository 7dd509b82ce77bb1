"""The version check every ``<venue>/wire.py`` makes before touching its
client library's internals.

A wire module patches internals of one exact library version (pinned with
``==`` in setup.cfg); with any other version installed it refuses to run
rather than patch code it was not written against.
"""
from __future__ import annotations


class WireVersionError(RuntimeError):
    """The installed client library is not the version a wire module patches,
    or its internals no longer have the shape the patch replaces."""


def require_version(library: str, found: str | None, pinned: str, relies_on: str) -> str:
    """Return ``found`` when it equals ``pinned``; otherwise raise
    :class:`WireVersionError` with one line naming both versions, what the
    wire module relies on (``relies_on``) and the fix."""
    if found != pinned:
        raise WireVersionError(
            f"{library} {found or '(not installed)'} is installed, but {relies_on} of {library} {pinned}: "
            f"install {library}=={pinned} as setup.cfg pins it, or review the patch against the new version")
    return found
