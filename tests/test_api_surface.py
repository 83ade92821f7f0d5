"""The public surface: ``smolvmm.__all__`` is the API the README documents, its three spellings in
``smolvmm/__init__.py`` agree, names that left it warn, and docs/ERRORS.md tells each error's meaning
and exit status as the CLI gives it."""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import threading
import types
import warnings
from pathlib import Path

import pytest

import smolvmm
from smolvmm.cli import machine as cli_machine
from smolvmm.cli import status as cli_status
from smolvmm.monitor.console import Console

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
ERRORS = (ROOT / "docs" / "ERRORS.md").read_text()

PUBLIC = [
    "AgentError",
    "AgentTooOld",
    "BundleError",
    "ConfigError",
    "Console",
    "DiskConfig",
    "ExecResult",
    "ExitReason",
    "GuestError",
    "GuestFileError",
    "GuestFiles",
    "GuestTimeout",
    "HypervisorError",
    "ImageConfig",
    "ImageError",
    "ImageRecipe",
    "Jail",
    "MINIMAL_KERNEL",
    "Machine",
    "MachineConfig",
    "MachineExit",
    "NetConfig",
    "OutputLimitError",
    "PortForward",
    "Process",
    "ProgressBar",
    "PullResult",
    "PushResult",
    "ReadyCondition",
    "Reference",
    "RegistryError",
    "SmolvmmError",
    "Transfer",
    "UsageError",
    "build_image",
    "bundle_image_config",
    "generate_signing_key",
    "image_process",
    "load_smolfile",
    "pull",
    "push",
    "record_working_set",
    "report_progress",
    "sign_bundle",
    "verify_signed_bundle",
]

MOVED = {
    "parse_size": "smolvmm.config.parse_size",
    "GuestImage": "smolvmm.images.guest.GuestImage",
    "default_guest": "smolvmm.images.guest.default_guest",
    "minimal_guest": "smolvmm.images.guest.minimal_guest",
    "BuiltKernel": "smolvmm.kernel.build.BuiltKernel",
    "minimal_kernel": "smolvmm.kernel.build.minimal_kernel",
    "HostKvm": "smolvmm.host.kvmprobe.HostKvm",
    "probe_host": "smolvmm.host.kvmprobe.probe",
    "cache_root": "smolvmm.config.cache_root",
    "CacheEntry": "smolvmm.images.cache.CacheEntry",
    "cache_entries": "smolvmm.images.cache.cache_entries",
    "prune_cache": "smolvmm.images.cache.prune_cache",
    "GuestMemoryError": "smolvmm.errors.GuestMemoryError",
}


def test_all_is_pinned() -> None:
    assert smolvmm.__all__ == PUBLIC


def test_the_export_map_all_and_the_type_checking_imports_agree() -> None:
    """One surface, spelt three times: the lazy map, ``__all__`` and the imports type checkers read."""
    tree = ast.parse((ROOT / "smolvmm" / "__init__.py").read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    imported = {
        alias.asname or alias.name: f"{node.module}:{alias.name}"
        for node in guarded.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    mapped = {name: where if ":" in where else f"{where}:{name}" for name, where in smolvmm._EXPORTS.items()}
    assert imported == mapped
    assert set(mapped) == set(smolvmm.__all__)
    assert not set(smolvmm._UTILITIES) & set(smolvmm.__all__)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_export_resolves_without_a_warning(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert getattr(smolvmm, name) is not None


def _documented() -> set[str]:
    """``smolvmm.X`` in the README where X is not one of smolvmm's modules (``smolvmm.host.…``)
    nor a dunder (``smolvmm.__all__``)."""
    names = set(re.findall(r"(?<![\w.])smolvmm\.([A-Za-z]\w*)", README))
    return {n for n in names if importlib.util.find_spec(f"smolvmm.{n}") is None}


def test_every_name_the_readme_calls_smolvmm_x_is_exported() -> None:
    assert _documented() - set(smolvmm.__all__) == set()


def test_every_export_is_documented_in_the_readme() -> None:
    undocumented = [n for n in smolvmm.__all__ if not re.search(rf"`[^`]*\b{n}\b[^`]*`", README)]
    assert undocumented == []


@pytest.mark.parametrize("name", sorted(MOVED))
def test_a_name_that_left_the_api_is_a_deprecated_alias_naming_its_home(name: str) -> None:
    module, _, attribute = MOVED[name].rpartition(".")
    with pytest.warns(DeprecationWarning, match=re.escape(f"use {MOVED[name]}")) as caught:
        value = getattr(smolvmm, name)
    assert caught[0].filename == __file__, "the warning points at the caller"
    assert value is getattr(importlib.import_module(module), attribute)
    assert name not in smolvmm.__all__


def test_from_import_of_a_deprecated_alias_warns_too() -> None:
    with pytest.warns(DeprecationWarning, match="smolvmm.config.parse_size"):
        from smolvmm import parse_size
    assert parse_size("2M") == 2 << 20


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        smolvmm.no_such_name  # noqa: B018


def test_exit_reason_and_machine_exit_live_in_the_module_that_owns_a_machine_s_exit() -> None:
    from smolvmm.monitor import exit, vcpu

    assert smolvmm.MachineExit is exit.MachineExit and smolvmm.ExitReason is exit.ExitReason
    assert smolvmm.MachineExit.__module__ == smolvmm.ExitReason.__module__ == "smolvmm.monitor.exit"
    assert vcpu.MachineExit is exit.MachineExit, "the vCPU thread uses them from there"


def _error_rows() -> dict[str, tuple[str, int]]:
    """docs/ERRORS.md's table: error -> (is also a, CLI exit)."""
    rows = {}
    for line in ERRORS.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1], int(cells[4]))
    return rows


def test_the_error_table_lists_every_exported_error_with_the_cli_status_it_gets() -> None:
    exported = {getattr(smolvmm, n) for n in smolvmm.__all__}
    errors = {c.__name__ for c in exported if isinstance(c, type) and issubclass(c, smolvmm.SmolvmmError)}
    rows = _error_rows()
    assert set(rows) == errors
    for name, (parents, status) in rows.items():
        cls = getattr(smolvmm, name)
        assert cli_status.for_error(cls("x")) == status, name
        for parent in re.findall(r"`(\w+)`", parents):
            assert issubclass(cls, getattr(smolvmm, parent, None) or getattr(builtins, parent)), (name, parent)
    assert "docs/ERRORS.md" in README


def test_the_first_machine_off_the_main_thread_is_a_usage_error() -> None:
    """A fresh interpreter, so that no earlier machine installed the kick handler already."""
    script = """
import threading
from smolvmm import UsageError
from smolvmm.monitor.vcpu import install_kick_handler
seen = []
def start():
    try:
        install_kick_handler()
    except UsageError as exc:
        seen.append((isinstance(exc, RuntimeError), str(exc)))
thread = threading.Thread(target=start)
thread.start()
thread.join()
print(seen)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "(True, 'the first machine must be started from the main thread" in done.stdout


def test_entering_the_jail_beside_other_threads_is_a_usage_error() -> None:
    from smolvmm.host import jail

    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        with pytest.raises(smolvmm.UsageError, match="already runs other threads"):
            jail.enter(smolvmm.Jail.parse(None), network=True)
    finally:
        release.set()
        other.join()


def test_a_command_too_long_for_the_console_channel_is_a_config_error() -> None:
    from smolvmm.oci import console_exec

    with pytest.raises(smolvmm.ConfigError, match="too long for the console channel"):
        console_exec._line("x" * console_exec.MAX_LINE)


@pytest.mark.anyio
async def test_waiting_for_a_ready_line_that_never_comes_is_a_guest_timeout() -> None:
    console = Console(len)
    console.write_output(b"booting\n")
    machine = types.SimpleNamespace(console=console)
    with pytest.raises(smolvmm.GuestTimeout, match="did not print 'ready'"):
        await cli_machine.wait_ready(machine, "ready", 0.01)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_console_wait_that_times_out_quotes_the_end_of_what_the_guest_printed() -> None:
    console = Console(len)
    console.write_output(b"x" * 1000 + b"[    4.2] Run /init as init process\r\n")
    with pytest.raises(smolvmm.GuestTimeout) as timed_out:
        await console.wait_for("guest ready", timeout=0.01)
    message = str(timed_out.value)
    assert message.startswith("the console did not show 'guest ready' within 0.01 s (its last output: '")
    assert message.endswith("x[    4.2] Run /init as init process\\r\\n')") and len(message) < 400
    assert (await console.receive()).endswith(b"init process\r\n")  # still unread
    with pytest.raises(smolvmm.GuestTimeout, match=r"within 0.01 s \(no output\)$"):
        await Console(len).wait_for("guest ready", timeout=0.01)
    with pytest.raises(smolvmm.GuestTimeout, match=r"^the console did not show a match of /ready\|\\n/ within"):
        await Console(len).wait_for(re.compile(rb"ready|\n"), timeout=0.01)
    stopped = Console(len)
    stopped.end_output()
    with pytest.raises(smolvmm.GuestError, match="^the machine stopped before its console showed 'image ready'$"):
        await stopped.wait_for("image ready")


@pytest.mark.anyio
async def test_a_console_wait_takes_a_compiled_regex_of_str_or_bytes() -> None:
    console = Console(len)
    console.write_output("[    1.0] Guest eth0 up\r\nguest été ready\r\n".encode())
    assert await console.wait_for(re.compile(r"guest (\w+) up", re.I)) == b"[    1.0] Guest eth0 up"
    assert await console.wait_for(re.compile("été")) == "\r\nguest été".encode()
    assert await console.wait_for(re.compile(rb"ready\r\n")) == b" ready\r\n"
    with pytest.raises(smolvmm.ConfigError, match=r"console pattern '\\\\u00e9' has no bytes equivalent"):
        await console.wait_for(re.compile(r"\u00e9"))


@pytest.mark.anyio
async def test_recent_console_output_stays_whether_read_or_not() -> None:
    console = Console(len)
    console.write_output(b"[    1.0] first line\r\n")
    assert await console.wait_for("first line") == b"[    1.0] first line"
    for i in range(20_000):  # 20,000 lines of 10 bytes: more than the 64 KiB kept
        console.write_output(b"line %04d\n" % (i % 10_000))
    recent = console.recent()
    assert len(recent) == 64 * 1024 and recent.endswith(b"line 9999\n")
    assert console.recent() == recent  # nothing consumed
    assert (await console.receive()).startswith(b"\r\nline 0000\n")  # nor taken from the reader


@pytest.mark.anyio
@pytest.mark.skipif(not os.path.exists("/dev/kvm") and not os.environ.get("CI"), reason="no /dev/kvm")
async def test_an_unknown_snapshot_encoding_is_a_config_error(tmp_path: Path) -> None:
    """(On this host's own /dev/kvm: the guest need not get far.)"""
    saved = tmp_path / "never.smolmachine"
    async with smolvmm.Machine.boot(smolvmm.MachineConfig(memory=128 << 20)) as machine:
        with pytest.raises(smolvmm.ConfigError, match="encoding 'lz4'"):
            await machine.snapshot(saved, encoding="lz4")
        await machine.stop()
    assert not saved.exists()
