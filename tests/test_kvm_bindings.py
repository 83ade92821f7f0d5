"""The cffi declarations agree with the system's <linux/kvm.h> byte for byte.

A C probe, generated from our own declarations and compiled against the host headers
(Debian's linux-libc-dev), prints every struct size, field offset and field size, and
every ioctl, capability and exit number and every ``KVM_*`` constant the backend's modules
define; each must equal what cffi computed or what the module says.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import smolvmm.hypervisor.kvm
from smolvmm.hypervisor.kvm import ioctls
from smolvmm.hypervisor.kvm.bindings import CDEF, ffi

STRUCTS = re.findall(r"^struct (kvm_\w+) \{", CDEF, re.M)
# Ours, with no counterpart in the uapi headers: KVM's own limit lives in the kernel's kvm_host.h.
NOT_IN_HEADERS = {"KVM_MAX_CPUID_ENTRIES"}
UNDEFINED = "undefined"


def _fields(ctype, prefix: str = ""):
    """(dotted path, offset, size) for every field, recursing into nested structs and unions."""
    for name, field in ctype.fields:
        path = f"{prefix}{name}"
        if field.type.kind == "array" and field.type.length is None:
            yield path, field.offset, None  # a flexible array member: offset only
            continue
        yield path, field.offset, ffi.sizeof(field.type)
        if field.type.kind in ("struct", "union"):
            for sub, offset, size in _fields(field.type, path + "."):
                yield sub, field.offset + offset, size


def _expected() -> dict[str, int]:
    values: dict[str, int] = {}
    for struct in STRUCTS:
        ctype = ffi.typeof(f"struct {struct}")
        values[f"sizeof {struct}"] = ffi.sizeof(ctype)
        for path, offset, size in _fields(ctype):
            values[f"offsetof {struct} {path}"] = offset
            if size is not None:
                values[f"sizeof {struct} {path}"] = size
    for enum in (ioctls.Ioctl, ioctls.Cap, ioctls.Exit):
        for member in enum:
            values[member.name] = int(member)
    values.update(_module_constants())
    return values


def _module_constants() -> dict[str, int]:
    """Every module-level ``KVM_*`` integer in smolvmm.hypervisor.kvm (one name, one value)."""
    constants: dict[str, int] = {}
    package = smolvmm.hypervisor.kvm
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if name.startswith("KVM_") and type(value) is int:
                assert constants.setdefault(name, value) == value, f"{name} differs between modules"
    return constants


def _probe_source(names: dict[str, int]) -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for key in names:
        parts = key.split(" ")
        if parts[0] == "sizeof" and len(parts) == 2:
            expr = f"sizeof(struct {parts[1]})"
        elif parts[0] == "sizeof":
            expr = f"sizeof(((struct {parts[1]} *)0)->{parts[2]})"
        elif parts[0] == "offsetof":
            expr = f"offsetof(struct {parts[1]}, {parts[2]})"
        else:  # a macro: the probe says so when the headers do not define it
            lines += [
                f"#ifdef {key}",
                f'    printf("%s=%lu\\n", "{key}", (unsigned long)({key}));',
                "#else",
                f'    printf("%s={UNDEFINED}\\n", "{key}");',
                "#endif",
            ]
            continue
        lines.append(f'    printf("%s=%lu\\n", "{key}", (unsigned long)({expr}));')
    lines += ["    return 0;", "}"]
    return "\n".join(lines)


def test_declarations_match_system_headers(tmp_path: Path) -> None:
    if not shutil.which("gcc") or not Path("/usr/include/linux/kvm.h").exists():
        pytest.fail("gcc and /usr/include/linux/kvm.h are needed: run tools/setup")
    expected = _expected()
    source = tmp_path / "probe.c"
    source.write_text(_probe_source(expected))
    subprocess.run(["gcc", "-o", str(tmp_path / "probe"), str(source)], check=True)
    output = subprocess.run([str(tmp_path / "probe")], check=True, capture_output=True, text=True).stdout
    actual = dict(line.rsplit("=", 1) for line in output.splitlines())
    undefined = {k for k, v in actual.items() if v == UNDEFINED}
    assert undefined == NOT_IN_HEADERS, f"not defined by the headers: {undefined ^ NOT_IN_HEADERS}"
    mismatches = {k: (v, int(actual[k])) for k, v in expected.items() if k not in undefined and int(actual[k]) != v}
    assert not mismatches, f"ours vs <linux/kvm.h>: {mismatches}"
    assert len(expected) > 300


def test_failed_ioctl_names_ioctl_and_errno() -> None:
    from smolvmm.errors import HypervisorError
    from smolvmm.hypervisor.kvm.system import ioctl

    with pytest.raises(HypervisorError, match=r"KVM_GET_API_VERSION failed: Bad file descriptor \(errno EBADF\)"):
        ioctl(999_999, ioctls.Ioctl.KVM_GET_API_VERSION)
