"""The minimal kernel's configuration fragment, the check of a built .config against it, and the
cache key of a build (no kernel is built here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from smolvmm import MINIMAL_KERNEL, MachineConfig, progress
from smolvmm.config import MAX_VCPUS
from smolvmm.errors import ConfigError, ImageError
from smolvmm.images import busybox
from smolvmm.kernel import build, config


def test_parse_reads_values_and_unset_options_and_skips_comments() -> None:
    text = '# a comment\n\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\nCONFIG_D=0x10\n'
    assert config.parse(text) == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"x y"', "CONFIG_D": "0x10"}


@pytest.mark.parametrize(
    ("text", "complaint"),
    [("CONFIG_A=y\nCONFIG_A=n\n", "line 2: CONFIG_A is set twice"), ("A=y\n", "line 1: not a Kconfig option")],
)
def test_parse_refuses_malformed_text(text: str, complaint: str) -> None:
    with pytest.raises(ImageError, match=complaint):
        config.parse(text)


def test_missing_names_each_option_not_at_its_required_value() -> None:
    required = {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": "n", "CONFIG_D": "n", "CONFIG_E": "64"}
    built = {"CONFIG_A": "y", "CONFIG_C": "y", "CONFIG_E": "8"}  # B absent (off), D absent (off, as wanted)
    assert config.missing(required, built) == ["CONFIG_B=y", "CONFIG_C off", "CONFIG_E=64"]
    assert config.missing(required, {**required, "CONFIG_F": "y"}) == []


def test_the_fragment_gives_a_reason_for_every_option() -> None:
    lines = config.FRAGMENT.read_text().splitlines()
    options = config.parse("\n".join(lines))
    for number, line in enumerate(lines):
        if re.match(r"CONFIG_|# CONFIG_\w+ is not set", line):
            above = lines[number - 1]
            assert above.startswith("# ") and not re.match(r"# CONFIG_", above), f"no reason above {line!r}"
    assert options["CONFIG_MODULES"] == "n"


@pytest.mark.parametrize(
    "option",
    [
        "CONFIG_64BIT",
        "CONFIG_SMP",
        "CONFIG_KVM_GUEST",
        "CONFIG_PARAVIRT",
        "CONFIG_ACPI",
        "CONFIG_VIRTIO_MMIO",
        "CONFIG_VIRTIO_BLK",
        "CONFIG_VIRTIO_NET",
        "CONFIG_VIRTIO_CONSOLE",
        "CONFIG_HW_RANDOM_VIRTIO",
        "CONFIG_EXT4_FS",
        "CONFIG_DEVTMPFS_MOUNT",
        "CONFIG_TMPFS",
        "CONFIG_UNIX",
        "CONFIG_INET",
        "CONFIG_SERIAL_8250_CONSOLE",
        "CONFIG_BLK_DEV_INITRD",
        "CONFIG_RD_GZIP",
        "CONFIG_BINFMT_ELF",
        "CONFIG_BINFMT_SCRIPT",
        "CONFIG_FUTEX",
        "CONFIG_EPOLL",
        "CONFIG_PID_NS",
        "CONFIG_MEMCG",
    ],
)
def test_the_fragment_builds_in_what_a_smolvmm_guest_uses(option: str) -> None:
    assert config.parse(config.FRAGMENT.read_text())[option] == "y"


def test_the_cache_key_follows_the_source_version_and_the_fragment() -> None:
    key = build.build_key("linux-source-6.1=6.1.192-3", b"CONFIG_A=y\n")
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert key == build.build_key("linux-source-6.1=6.1.192-3", b"CONFIG_A=y\n")
    assert key != build.build_key("linux-source-6.1=6.1.193-1", b"CONFIG_A=y\n")
    assert key != build.build_key("linux-source-6.1=6.1.192-3", b"CONFIG_A=y\nCONFIG_B=y\n")


def test_a_failed_step_is_one_line_naming_it_and_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    build.log_path().parent.mkdir(parents=True)
    build.log_path().write_bytes(b"")
    script = "echo compiling; echo 'kernel/fork.c:1: error: boom' >&2; exit 2"
    with pytest.raises(ImageError) as caught:
        build._run(progress.Task(None), "make bzImage", "sh", "-c", script, cwd=tmp_path)
    assert str(caught.value) == f"make bzImage failed (exit 2): kernel/fork.c:1: error: boom (log: {build.log_path()})"
    assert "$ sh -c" in build.log_path().read_text()


def test_machine_config_takes_the_minimal_kernel_by_name(tmp_path: Path) -> None:
    assert MachineConfig(kernel=MINIMAL_KERNEL).kernel == "minimal"
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"")
    with pytest.raises(ConfigError, match="initrd does not go with kernel='minimal'"):
        MachineConfig(kernel=MINIMAL_KERNEL, initrd=initrd)
    with pytest.raises(ConfigError, match="MachineConfig.kernel minimal2 does not exist"):
        MachineConfig(kernel="minimal2")


class _Busybox:
    """A stand-in for the busybox-static package: its unpack writes bin/busybox."""

    def unpack(self, dest: Path) -> None:
        (dest / "bin").mkdir(parents=True)
        (dest / "bin" / "busybox").write_bytes(b"\x7fELF busybox")


def test_an_initramfs_for_a_kernel_with_everything_built_in_loads_no_modules(tmp_path: Path) -> None:
    busybox.build(tmp_path, None, _Busybox(), [], "#!/bin/busybox sh\n")  # type: ignore[arg-type]
    archive = (tmp_path / busybox.INITRD).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [busybox.INITRD]  # no vmlinuz, no scratch left
    assert b"etc/smolvmm/modules\0" in archive and b"bin/busybox\0" in archive and b"lib/modules" not in archive


def test_the_kernel_takes_as_many_vcpus_as_a_machine_may_have() -> None:
    assert config.parse(config.FRAGMENT.read_text())["CONFIG_NR_CPUS"] == str(MAX_VCPUS)


def test_a_build_without_its_tools_says_which_are_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build.shutil, "which", lambda tool: None if tool in ("flex", "bison") else f"/usr/bin/{tool}")
    with pytest.raises(ImageError, match=r"^building the kernel needs flex, bison \(tools/setup installs"):
        build._build(tmp_path, None, b"", 1)  # type: ignore[arg-type]
