"""The one exception smolformat raises for a bad bundle, with a stable machine-readable code."""

from __future__ import annotations

from collections.abc import Iterable


class FormatError(Exception):
    """A .smolmachine file is malformed, truncated, unsupported or fails its integrity checks.

    ``code`` is stable (listed in spec/smolmachine.md, used by the conformance vectors);
    ``str(exc)`` is one line a user can act on.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message


def brief(values: Iterable[int], limit: int = 8) -> str:
    """Sorted ``values`` for a one-line message: at most ``limit`` of them, then how many in all."""
    ordered = sorted(values)
    if len(ordered) <= limit:
        return str(ordered)
    return "[" + ", ".join(map(str, ordered[:limit])) + f", ... ({len(ordered)} in all)]"
