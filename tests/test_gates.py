"""The gates CI runs before the tests (ruff lint, ruff format, mypy strict) pass here too, so a plain
``pytest`` run catches a finding; each failure lists the tool's findings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GATES = {
    "ruff check": ["ruff", "check", "."],
    "ruff format": ["ruff", "format", "--check", "."],
    "mypy": ["mypy"],  # what to check, and how strictly, is in pyproject.toml
}


@pytest.mark.parametrize("gate", GATES)
def test_the_gate_has_no_findings(gate: str) -> None:
    result = subprocess.run([sys.executable, "-m", *GATES[gate]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"`{gate}` has findings:\n{result.stdout}{result.stderr}"


def test_ci_runs_the_readme_test_command_with_the_gates_first() -> None:
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^(tools/setup && .*python -m pytest)\s+#", readme, re.M)
    assert command is not None, "the README's quick start has no test command"
    assert command.group(1) in (ROOT / ".ci" / "run").read_text().splitlines()
    gates = ["ruff check .", "ruff format --check .", "mypy", "python -m pytest"]
    positions = [command.group(1).find(gate) for gate in gates]
    assert -1 not in positions and positions == sorted(positions), command.group(1)
