"""The arm64 device tree, read back by the reference tool: ``dtc -I dtb -O dts`` (Debian's
device-tree-compiler, installed by tools/setup). dtc must accept the blob without a warning, and
the source it prints is checked node by node."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smolvmm.arch.arm64 import dtb, fdt, layout, regs

Tree = dict[str, dict[str, object]]


def _dtc(blob: bytes, tmp_path: Path) -> str:
    """dtc's source for ``blob``; fails on any warning."""
    if shutil.which("dtc") is None:
        pytest.fail("dtc is missing: run tools/setup (it installs device-tree-compiler)")
    path = tmp_path / "machine.dtb"
    path.write_bytes(blob)
    result = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"dtc warned: {result.stderr}"
    return result.stdout


def _value(text: str) -> object:
    """A dtc property value: <cells> as a list of ints, "a\\0b" as a list of strings."""
    if text.startswith("<"):
        return [int(cell, 16) for cell in text.strip("<>").split()]
    if text.startswith('"'):
        return text[1:-1].split("\\0")
    raise AssertionError(f"unexpected dtc value {text}")


def _parse(source: str) -> Tree:
    """Path -> properties, from dtc's output (one node or property per line)."""
    tree: Tree = {}
    path: list[str] = []
    for line in source.splitlines():
        line = line.strip()
        if not line or line == "/dts-v1/;" or line.startswith("/memreserve/"):
            continue
        if line.endswith("{"):
            name = line[:-1].strip()
            path.append("" if name == "/" else name)
            tree["/".join(path) or "/"] = {}
        elif line == "};":
            path.pop()
        else:
            m = re.fullmatch(r"([^ =]+)(?: = (.*))?;", line)
            assert m, line
            tree["/".join(path) or "/"][m[1]] = True if m[2] is None else _value(m[2])
    return tree


def _machine(vcpus: int = 2, virtio: int = 3, initrd: fdt.Initrd | None = None) -> tuple[layout.Layout, bytes]:
    machine = layout.layout(vcpus, 512 << 20, virtio)
    blob = fdt.machine_fdt(machine, [regs.kvm_mpidr(n) for n in range(vcpus)], "console=ttyAMA0 panic=-1", initrd)
    return machine, blob


def _split64(*values: int) -> list[int]:
    return [part for value in values for part in (value >> 32, value & 0xFFFF_FFFF)]


def test_header_blocks_follow_the_spec() -> None:
    _, blob = _machine()
    magic, total, off_struct, off_strings, off_rsv, version, last_comp, boot_cpu, size_strings, size_struct = (
        struct.unpack_from(">10I", blob)
    )
    assert (magic, version, last_comp, boot_cpu) == (0xD00DFEED, 17, 16, 0)
    assert total == len(blob)
    assert off_rsv == 40 and off_rsv % 8 == 0
    assert blob[off_rsv : off_rsv + 16] == bytes(16)  # no reservations: just the terminator
    assert off_struct == off_rsv + 16 and off_struct % 4 == 0
    assert off_strings == off_struct + size_struct and off_strings + size_strings == total
    assert struct.unpack_from(">I", blob, off_struct)[0] == dtb.FDT_BEGIN_NODE
    assert struct.unpack_from(">I", blob, off_struct + size_struct - 4)[0] == dtb.FDT_END
    names = blob[off_strings:total].split(b"\0")[:-1]
    assert len(names) == len(set(names)), "each property name is stored once"


def test_every_node_and_property(tmp_path: Path) -> None:
    initrd = fdt.Initrd(0x9F00_0000, 0x12_3000)
    machine, blob = _machine(initrd=initrd)
    tree = _parse(_dtc(blob, tmp_path))

    assert tree["/"] == {
        "compatible": ["linux,dummy-virt"],
        "model": ["smolvmm"],
        "#address-cells": [2],
        "#size-cells": [2],
        "interrupt-parent": [fdt.Phandle.GIC],
    }
    assert tree["/chosen"] == {
        "bootargs": ["console=ttyAMA0 panic=-1"],
        "stdout-path": ["/uart@40000000"],
        "linux,initrd-start": _split64(0x9F00_0000),
        "linux,initrd-end": _split64(0x9F12_3000),
    }
    assert tree["/memory@80000000"] == {"device_type": ["memory"], "reg": _split64(0x8000_0000, 512 << 20)}
    assert tree["/cpus"] == {"#address-cells": [1], "#size-cells": [0]}
    for n in range(2):
        assert tree[f"/cpus/cpu@{n}"] == {
            "device_type": ["cpu"],
            "compatible": ["arm,arm-v8"],
            "enable-method": ["psci"],
            "reg": [n],
        }
    assert tree["/psci"] == {"compatible": ["arm,psci-1.0", "arm,psci-0.2"], "method": ["hvc"]}
    redist_base, redist_size = machine.gic_redist
    assert redist_size == 2 * 0x2_0000
    assert tree["/intc@3fff0000"] == {
        "compatible": ["arm,gic-v3"],
        "#interrupt-cells": [3],
        "#address-cells": [2],
        "#size-cells": [2],
        "ranges": True,
        "interrupt-controller": True,
        "reg": _split64(0x3FFF_0000, 0x1_0000, redist_base, redist_size),
        "phandle": [fdt.Phandle.GIC],
    }
    assert tree["/timer"] == {
        "compatible": ["arm,armv8-timer"],
        "interrupts": [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4],
        "always-on": True,
    }
    assert tree["/apb-pclk"] == {
        "compatible": ["fixed-clock"],
        "#clock-cells": [0],
        "clock-frequency": [24_000_000],
        "clock-output-names": ["clk24mhz"],
        "phandle": [fdt.Phandle.APB_CLOCK],
    }
    assert tree["/uart@40000000"] == {
        "compatible": ["arm,pl011", "arm,primecell"],
        "reg": _split64(0x4000_0000, 0x1000),
        "interrupts": [0, 1, 4],
        "clocks": [fdt.Phandle.APB_CLOCK, fdt.Phandle.APB_CLOCK],
        "clock-names": ["uartclk", "apb_pclk"],
    }
    assert tree["/rtc@40001000"] == {
        "compatible": ["arm,pl031", "arm,primecell"],
        "reg": _split64(0x4000_1000, 0x1000),
        "interrupts": [0, 2, 4],
        "clocks": [fdt.Phandle.APB_CLOCK],
        "clock-names": ["apb_pclk"],
    }
    for n in range(3):
        base = 0x4001_0000 + n * 0x1000
        assert tree[f"/virtio_mmio@{base:x}"] == {
            "compatible": ["virtio,mmio"],
            "reg": _split64(base, 0x1000),
            "interrupts": [0, 16 + n, 1],
            "dma-coherent": True,
        }
    assert len(tree) == 1 + 1 + 1 + 1 + 2 + 1 + 1 + 1 + 1 + 1 + 1 + 3


def test_phandle_references_resolve(tmp_path: Path) -> None:
    _, blob = _machine()
    tree = _parse(_dtc(blob, tmp_path))
    by_phandle = {props["phandle"][0]: props for props in tree.values() if "phandle" in props}
    assert len(by_phandle) == len(fdt.Phandle)
    parent = by_phandle[tree["/"]["interrupt-parent"][0]]
    assert parent.get("interrupt-controller") is True and parent["#interrupt-cells"] == [3]
    assert tree["/chosen"]["stdout-path"][0] in tree, "stdout-path names an existing node"
    for path, props in tree.items():
        if "interrupts" in props:
            assert len(props["interrupts"]) % 3 == 0, path
        for clock in props.get("clocks", []):
            assert by_phandle[clock]["#clock-cells"] == [0], path


def test_cpu_nodes_use_the_affinity_kvm_gives(tmp_path: Path) -> None:
    _, blob = _machine(vcpus=18, virtio=0, initrd=None)
    tree = _parse(_dtc(blob, tmp_path))
    cpus = {path: props["reg"][0] for path, props in tree.items() if path.startswith("/cpus/")}
    # vCPU 16 is Aff1 = 1, Aff0 = 0: MPIDR Aff0 holds only 16 vCPUs under KVM.
    assert cpus["/cpus/cpu@100"] == 0x100 and cpus["/cpus/cpu@101"] == 0x101 and len(cpus) == 18
    assert "linux,initrd-start" not in tree["/chosen"]
    assert not any(path.startswith("/virtio_mmio") for path in tree)


def test_dtc_round_trip_is_stable(tmp_path: Path) -> None:
    _, blob = _machine()
    source = _dtc(blob, tmp_path)
    (tmp_path / "again.dts").write_text(source)
    rebuilt = subprocess.run(
        ["dtc", "-I", "dts", "-O", "dtb", "-o", str(tmp_path / "again.dtb"), str(tmp_path / "again.dts")],
        capture_output=True,
        text=True,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert _dtc((tmp_path / "again.dtb").read_bytes(), tmp_path) == source


def test_memory_reservations_are_encoded(tmp_path: Path) -> None:
    blob = dtb.encode(dtb.Node("", {"#address-cells": dtb.cells(2)}), reservations=[(0x8000_0000, 0x1_0000)])
    assert "/memreserve/\t0x0000000080000000 0x0000000000010000;" in _dtc(blob, tmp_path)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda root: root.child("bad name"), "invalid device tree node name"),
        (lambda root: (root.child("a"), root.child("a")), "two children named"),
        (lambda root: root.properties.update({"bad=prop": b""}), "invalid property name"),
    ],
)
def test_encoder_rejects_invalid_trees(build, message: str) -> None:
    root = dtb.Node("")
    build(root)
    with pytest.raises(ValueError, match=message):
        dtb.encode(root)


def test_value_helpers_bound_their_input() -> None:
    assert dtb.u64_cells(0x1_0000_0002) == bytes.fromhex("00000001 00000002")
    assert dtb.strings("a", "bc") == b"a\0bc\0"
    with pytest.raises(ValueError):
        dtb.cells(1 << 32)
    with pytest.raises(ValueError):
        dtb.strings("a\0b")
    with pytest.raises(ValueError, match="MPIDRs"):
        fdt.machine_fdt(layout.layout(2, 512 << 20, 0), [0], "")


# dtc gives these property names a meaning it checks as an error: "name" must repeat the node's
# name, "phandle" and "linux,phandle" must be one unique cell (checks.c: name_is_string,
# name_properties, explicit_phandles). Every other check on a name is a warning.
DTC_RESERVED = frozenset({"name", "phandle", "linux,phandle"})
_names = st.text("abcdefghijklmnopqrstuvwxyz0123456789,._+-", min_size=1, max_size=20).filter(
    lambda name: name[0].isalpha() and name not in DTC_RESERVED
)
_values = st.one_of(
    # A non-ASCII first byte keeps dtc from guessing the cells are a string.
    st.lists(st.integers(0, (1 << 32) - 1), min_size=1, max_size=6).map(
        lambda v: ("cells", [v[0] | 0x8000_0000, *v[1:]])
    ),
    st.lists(st.text("abcdefghijklmnopqrstuvwxyz ,-/", min_size=1, max_size=12), min_size=1, max_size=3).map(
        lambda v: ("strings", v)
    ),
    st.just(("empty", None)),
)
_nodes = st.recursive(
    st.dictionaries(_names, _values, max_size=4).map(lambda props: (props, {})),
    lambda children: st.tuples(
        st.dictionaries(_names, _values, max_size=4), st.dictionaries(_names, children, max_size=3)
    ),
    max_leaves=8,
)


def _build(name: str, spec: tuple[dict, dict]) -> dtb.Node:
    props, children = spec
    encode = {"cells": lambda v: dtb.cells(*v), "strings": lambda v: dtb.strings(*v), "empty": lambda v: b""}
    node = dtb.Node(name, {key: encode[kind](value) for key, (kind, value) in props.items()})
    node.children = [_build(child, child_spec) for child, child_spec in children.items()]
    return node


def _expected(spec: tuple[dict, dict], path: str, tree: Tree) -> None:
    props, children = spec
    tree[path or "/"] = {key: True if kind == "empty" else value for key, (kind, value) in props.items()}
    for child, child_spec in children.items():
        _expected(child_spec, f"{path}/{child}", tree)


@settings(max_examples=40, deadline=None)
@given(_nodes)
def test_any_tree_reads_back_through_dtc(spec: tuple[dict, dict]) -> None:
    """Random trees of cells, strings and empty properties: dtc prints back exactly what was encoded."""
    result = subprocess.run(["dtc", "-I", "dtb", "-O", "dts"], input=dtb.encode(_build("", spec)), capture_output=True)
    assert result.returncode == 0, result.stderr
    expected: Tree = {}
    _expected(spec, "", expected)
    assert _parse(result.stdout.decode()) == expected
