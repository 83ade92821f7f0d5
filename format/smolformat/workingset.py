"""Giving a bundle its WORKING_SET (spec §9.1) once the bundle exists: the set comes from a trial
resume of it, so it is added after, without re-encoding anything else (``amend``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from . import checks
from .amend import replace_section
from .errors import FormatError
from .layout import SectionKind
from .payloads import payload
from .reader import open_bundle


def set_working_set(path: str | os.PathLike[str], ranges: Sequence[Mapping[str, int]]) -> bytes:
    """Write bundle ``path`` again with a WORKING_SET of ``ranges`` (``{address, pages}``) in place
    of any it had, atomically; returns the new bundle digest. A signed bundle is refused: its
    signature covers the working set (record it before signing)."""
    declared = payload(SectionKind.WORKING_SET)
    data = declared.build(list(ranges))
    with open_bundle(path) as bundle:
        checks.check_working_set(checks.ram_regions(bundle.config), declared.parse(data))
        if bundle.signatures:
            raise FormatError("bad-section", f"{path} is signed: record its working set before signing it")
    return replace_section(path, path, SectionKind.WORKING_SET, data)
