"""The layering rules the architecture promises, checked on the source tree."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "smolvmm"
KVM_STATE_CODE = ("hypervisor/kvm/", "arch/x86_64/regs.py", "arch/arm64/")


def _sources() -> list[tuple[str, str]]:
    return [(str(p.relative_to(PACKAGE)), p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))]


def test_kvm_names_stay_in_the_backend_and_arch_state_code() -> None:
    offenders = [name for name, text in _sources() if "KVM_" in text and not name.startswith(KVM_STATE_CODE)]
    assert offenders == []


def test_only_the_backend_and_arch_state_code_import_kvm_modules() -> None:
    offenders = []
    for name, text in _sources():
        if name.startswith(KVM_STATE_CODE) or name == "hypervisor/__init__.py":
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and "kvm" in node.module.split("."):
                offenders.append(f"{name}: from {node.module}")
    assert offenders == []


def test_the_format_package_imports_nothing_from_the_monitor() -> None:
    format_dir = PACKAGE.parent / "format" / "smolformat"
    for path in format_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.split(".")[0] == "smolvmm" for n in names), path
