"""smolvmm's arm64 register ids against a real arm64 KVM: tests/test_arm64_kvm_real.py run inside
tools/arm64-kvm (qemu-system-aarch64 TCG with the kernel at EL2; see docs/arm64-emulated.md)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    shutil.which("qemu-system-aarch64") is None and not os.environ.get("CI"),
    reason="needs qemu-system-aarch64 (apt-get install qemu-system-arm)",
)
def test_arm64_register_ids_on_real_arm64_kvm() -> None:
    inner = ["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_arm64_kvm_real.py"]
    result = subprocess.run(
        [str(ROOT / "tools" / "arm64-kvm"), "--timeout", "600", *inner],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 30 and "failed" not in summary and "error" not in summary, summary
