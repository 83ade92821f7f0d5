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


# The fields of MachineConfig (and what it holds) and ImageRecipe as the flags that set them.
_FLAGS = {
    "MachineConfig.kernel": "--kernel",
    "MachineConfig.initrd": "--initrd",
    "MachineConfig.cmdline": "--cmdline",
    "MachineConfig.vcpus": "--cpus",
    "MachineConfig.memory": "--mem",
    "MachineConfig.disks": "--disk",
    "MachineConfig.console_socket": "--console-socket",
    "MachineConfig.console": "--console",
    "DiskConfig.path": "--disk",
    "DiskConfig.overlay": "--disk overlay",
    "DiskConfig.read_only": "--disk ro",
    "NetConfig.tap": "--net tap",
    "NetConfig.mac": "--net mac",
    "NetConfig.forwards": "--net forward",
    "ImageRecipe.vcpus": "--cpus",
    "ImageRecipe.memory": "--mem",
}


def as_flags(error: smolvmm.ConfigError) -> smolvmm.ConfigError:
    """A configuration's ``error`` naming the flags, as the user wrote them, not the fields."""
    return error.naming(_FLAGS)


def new_file(path: Path) -> None:
    """Check, before any work, that the file ``path`` (``-o``) can be written: not a directory, in
    an existing directory that this user may write (ConfigError, a usage error, if not)."""
    if path.is_dir():
        raise smolvmm.ConfigError(f"-o {path} is a directory: name the .smolmachine file to write")
    directory = path.parent
    if not directory.is_dir():
        raise smolvmm.ConfigError(f"-o {path}: {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise smolvmm.ConfigError(f"-o {path}: {directory} is not writable")
