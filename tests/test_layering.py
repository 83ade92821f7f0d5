"""The layering rules the architecture promises, checked on the source tree."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "smolvmm"
# Where KVM names may appear: the backend, and the arm64 modules that list KVM's register ids.
KVM_NAMES = ("hypervisor/kvm/", "arch/arm64/regs.py", "arch/arm64/gic.py", "arch/arm64/timer.py")
# What may import the backend: the backend, the hypervisor opener, and x86_64/regs.py, which
# builds the boot registers in KVM's struct layouts.
KVM_IMPORTS = ("hypervisor/kvm/", "hypervisor/__init__.py", "arch/x86_64/regs.py")


def _sources() -> list[tuple[str, str]]:
    return [(str(p.relative_to(PACKAGE)), p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))]


def test_kvm_names_stay_in_the_backend_and_the_arm64_id_lists() -> None:
    offenders = [name for name, text in _sources() if "KVM_" in text and not name.startswith(KVM_NAMES)]
    assert offenders == []


def test_kvm_modules_are_imported_only_where_listed() -> None:
    offenders = []
    for name, text in _sources():
        if name.startswith(KVM_IMPORTS):
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


def test_the_cli_uses_only_the_public_api() -> None:
    """cli/*.py use the public API (``smolvmm.X`` and ``from smolvmm import X``, X in ``__all__``),
    the CLI's own modules, the developer utilities from the modules that own them (the names of
    ``smolvmm._UTILITIES``, never another name of those modules, never the monitor's internals),
    smolformat, anyio, tqdm (progress) and the standard library."""
    import smolvmm

    allowed = {"smolvmm", "smolformat", "anyio", "tqdm", *sys.stdlib_module_names}
    utilities = set()
    for name, where in smolvmm._UTILITIES.items():
        module, _, attribute = where.partition(":")
        utilities.add((module, attribute or name))
    offenders = []
    for path in sorted(PACKAGE.glob("cli/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:
                    offenders.append(f"{path.name}: from {'.' * node.level}{module}")
                elif module == "smolvmm":  # the public API
                    offenders += [f"{path.name}: {a.name}" for a in node.names if a.name not in smolvmm.__all__]
                elif module.startswith("smolvmm.") and not module.startswith("smolvmm.cli"):
                    offenders += [
                        f"{path.name}: from {module} import {a.name}"
                        for a in node.names
                        if (module, a.name) not in utilities
                    ]
                elif module.split(".")[0] not in allowed:
                    offenders.append(f"{path.name}: from {module}")
            elif isinstance(node, ast.Import):
                offenders += [
                    f"{path.name}: import {a.name}"
                    for a in node.names
                    if a.name.split(".")[0] not in allowed
                    or (a.name.startswith("smolvmm.") and not a.name.startswith("smolvmm.cli."))
                ]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "smolvmm":
                if node.attr not in smolvmm.__all__ and node.attr != "cli":
                    offenders.append(f"{path.name}:{node.lineno}: smolvmm.{node.attr}")
    assert offenders == []
