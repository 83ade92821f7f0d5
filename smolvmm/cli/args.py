"""Argument types shared by the CLI's commands: a bad value is a usage error (exit 2) before anything runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import smolvmm


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def positive_float(text: str) -> float:
    """A number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def size(text: str) -> int:
    """A size in bytes such as 256M or 1G (``smolvmm.config.parse_size``)."""
    from smolvmm.config import parse_size

    try:
        return parse_size(text)
    except smolvmm.ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def non_empty(text: str) -> str:
    """Any text but the empty string (which would read as the flag's absence)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def path(text: str) -> Path:
    """A path; not empty (``Path("")`` is the current directory)."""
    return Path(non_empty(text))


def assignment(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` (an environment variable)."""
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    return name, value


def output_file(path: str | os.PathLike[str]) -> str:
    """A file the monitor will write, as an absolute path in its directory's real place: a jailed
    monitor's root is empty, and the jail stages the file in that directory (smolvmm.host.keeper)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(directory), name)
