"""Caps on counts and lengths read from a bundle, so a bad file cannot make a reader loop or allocate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from construct import Construct, ValidationError, Validator


class Checked(Validator):  # type: ignore[misc]
    """``subcon`` whose value must pass ``test``, both ways; else a ValidationError whose text is
    ``says(value)`` (construct's own is "object failed validation: <the whole value>")."""

    def __init__(self, subcon: Construct, test: Callable[[Any], bool], says: Callable[[Any], str]) -> None:
        super().__init__(subcon)
        self._test, self._says = test, says

    def _decode(self, obj: Any, context: Any, path: str) -> Any:
        if not self._test(obj):
            raise ValidationError(self._says(obj), path=path)
        return obj

    _encode = _decode


def bounded(subcon: Construct, maximum: int) -> Construct:
    """``subcon`` (an integer) that fails validation, both ways, when above ``maximum``."""
    return Checked(subcon, lambda value: value <= maximum, lambda value: f"{value} is more than the cap of {maximum}")
