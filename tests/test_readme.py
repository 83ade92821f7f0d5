"""The README's library examples run as they are written (on real KVM)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from guests import GUEST_TIMEOUT

pytestmark = [pytest.mark.kvm]
README = Path(__file__).resolve().parent.parent / "README.md"


def examples() -> list[str]:
    library = README.read_text().split("## The library", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", library, re.S)


def test_the_readme_has_a_trio_and_an_asyncio_example() -> None:
    assert ["trio.run(main)" in code for code in examples()] == [True, False]
    assert "asyncio.run(main())" in examples()[1]


@pytest.mark.parametrize(
    ("index", "expected"), [(0, r"cloud-amd64"), (1, r"MachineExit\(reason=<ExitReason\.POWEROFF")]
)
def test_a_readme_example_runs(index: int, expected: str, bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "app.smolmachine").symlink_to(bundle)
    (tmp_path / "example.py").write_text(examples()[index])
    result = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=GUEST_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert re.search(expected, result.stdout), result.stdout
    if index == 0:
        assert (tmp_path / "later.smolmachine").is_file()  # its snapshot
