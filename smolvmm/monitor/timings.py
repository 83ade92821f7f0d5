"""Where the time of a boot or restore goes, phase by phase (``--timings``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field


@dataclass
class Timings:
    """Milliseconds since the boot or restore began, at the end of each phase."""

    start: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=dict)
    notes: dict[str, int | str] = field(default_factory=dict)

    def mark(self, phase: str) -> None:
        """Record ``phase`` as finished now (the first time only)."""
        self.phases.setdefault(phase, round((time.perf_counter() - self.start) * 1000, 3))

    def note(self, name: str, value: int | str) -> None:
        """Something a reader of the timings must know (e.g. state skipped in a measured restore)."""
        self.notes[name] = value

    def json(self) -> str:
        return json.dumps({"phases_ms": self.phases, **self.notes})
