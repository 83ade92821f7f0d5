"""Scatter lists of guest-RAM views: slicing, gathering and scattering by byte offset."""

from __future__ import annotations

from collections.abc import Sequence


def total_length(views: Sequence[memoryview]) -> int:
    return sum(map(len, views))


def slice_views(views: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """The views covering bytes ``start .. start+length`` of the concatenation of ``views``."""
    out: list[memoryview] = []
    for view in views:
        if length <= 0:
            break
        if start >= len(view):
            start -= len(view)
            continue
        part = view if start == 0 and length >= len(view) else view[start : start + length]
        out.append(part)
        length -= len(part)
        start = 0
    return out


def gather(views: Sequence[memoryview], start: int, length: int) -> bytes:
    """Copy up to ``length`` bytes starting at ``start`` out of the scatter list."""
    return b"".join(slice_views(views, start, length))


def scatter(views: Sequence[memoryview], start: int, data: bytes | memoryview) -> int:
    """Copy ``data`` into the scatter list at ``start``; returns how many bytes fit."""
    done = 0
    for part in slice_views(views, start, len(data)):
        part[:] = data[done : done + len(part)]
        done += len(part)
    return done
