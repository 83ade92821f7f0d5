"""Caps on counts and lengths read from a bundle, so a bad file cannot make a reader loop or allocate."""

from __future__ import annotations

from construct import Construct, ExprValidator


def bounded(subcon: Construct, maximum: int) -> Construct:
    """``subcon`` (an integer) that fails validation, both ways, when above ``maximum``."""
    return ExprValidator(subcon, lambda value, _ctx: value <= maximum)
