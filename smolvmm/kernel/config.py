"""Kernel configuration text (a fragment or a whole ``.config``): what it sets, and which of a
fragment's options a built ``.config`` lacks."""

from __future__ import annotations

import re
from pathlib import Path

from smolvmm.errors import ImageError

FRAGMENT = Path(__file__).with_name("x86_64.config")  # the x86_64 guest's; an arm64.config would sit beside it

_SET = re.compile(r"(CONFIG_[A-Za-z0-9_]+)=(.*)")
_NOT_SET = re.compile(r"# (CONFIG_[A-Za-z0-9_]+) is not set")


def parse(text: str) -> dict[str, str]:
    """Option -> value (``"n"`` for ``# CONFIG_X is not set``) of Kconfig text; other comments and
    blank lines are skipped. A malformed line or an option set twice raises ImageError."""
    options: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if match := _SET.fullmatch(line) or _NOT_SET.fullmatch(line):
            name, value = match[1], match[2] if match.re is _SET else "n"
            if name in options:
                raise ImageError(f"line {number}: {name} is set twice")
            options[name] = value
        elif line and not line.startswith("#"):
            raise ImageError(f"line {number}: not a Kconfig option or comment: {line!r}")
    return options


def missing(required: dict[str, str], built: dict[str, str]) -> list[str]:
    """``NAME=value`` for each required option ``built`` does not have at that value (an option
    absent from a ``.config`` is off, as Kconfig reads it)."""
    return [
        f"{name}={value}" if value != "n" else f"{name} off"
        for name, value in required.items()
        if built.get(name, "n") != value
    ]
