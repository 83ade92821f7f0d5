"""``smolvmm doctor``: what this host has, what follows for smolvmm, and what is missing.

Exits 0 when smolvmm's main job (booting guests and resuming bundles) can run here, 1 when not.
"""

from __future__ import annotations

import argparse
import glob
import grp
import os
import platform
import pwd
import shutil
import stat
import sysconfig
from dataclasses import dataclass
from typing import Any

from smolvmm.cli import output as cli_output
from smolvmm.cli import status as cli_status
from smolvmm.cli.output import size

README_PVM = "README, 'PVM hosts and the nested machine'"
KVM = "/dev/kvm"
NESTED_QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class HostTool:
    """A program (or file) smolvmm runs on the host, the Debian package that provides it, and what for."""

    name: str
    package: str
    needed_for: str

    def present(self) -> bool:
        if self.name.startswith("/"):
            return bool(glob.glob(self.name))
        return shutil.which(self.name) is not None


# What booting the default guest needs (the README's "Host requirements" lists the same).
GUEST_TOOLS = (
    HostTool("apt-get", "apt", "downloading the demo guest's Debian packages"),
    HostTool("apt-cache", "apt", "choosing their versions"),
    HostTool("dpkg-deb", "dpkg", "unpacking them (never installed)"),
    HostTool("gcc", "gcc", "compiling the guest agent"),
    HostTool("/usr/lib/*/libc.a", "libc6-dev", "linking the guest agent statically"),
)
OTHER_TOOLS = (
    HostTool("mke2fs", "e2fsprogs", "ext4 disk images (smolvmm.images.disk)"),
    HostTool(NESTED_QEMU, "qemu-system-x86", "the nested KVM machine, on PVM hosts"),
    HostTool("passt", "passt", "user networking without root (--net user)"),
    HostTool(
        "/usr/lib/*/libseccomp.so.2", "libseccomp2", "the seccomp filter of the jail (run/boot as root, or --jail)"
    ),
    HostTool(
        os.path.join(sysconfig.get_paths()["include"], "Python.h"),
        "python3-dev",
        "the save's page scanner, virtio-blk's request loop and the vCPU loop's native part in C "
        "(without: slower Python paths)",
    ),
)


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the findings as one JSON document on stdout")


def run(name: str, args: argparse.Namespace) -> int:
    report = examine()
    if args.json:
        cli_output.result_json(report)
    else:
        cli_output.result(_text(report))
    return cli_status.OK if report["can_run_guests"] else cli_status.ERROR


def examine() -> dict[str, Any]:
    """Every finding, as plain data."""
    from smolvmm.config import cache_root
    from smolvmm.host.kvmprobe import probe
    from smolvmm.images.cache import cache_entries

    host = probe()
    device = _device()
    tools = [
        {"name": t.name.rsplit("/", 1)[-1], "package": t.package, "for": t.needed_for, "present": t.present()}
        for t in (*GUEST_TOOLS, *OTHER_TOOLS)
    ]
    guest_tools = {t.name.rsplit("/", 1)[-1] for t in GUEST_TOOLS}
    missing_for_guests = [t for t in tools if t["name"] in guest_tools and not t["present"]]
    nested_missing = [
        t["package"] for t in tools if t["name"] in (NESTED_QEMU, "apt-get", "dpkg-deb") and not t["present"]
    ]
    entries = cache_entries()
    runnable = host.kind == "hardware" and device.get("read_write", False)
    return {
        "version": cli_output.version(),
        "python": platform.python_version(),
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "kvm": {"kind": host.kind, "explanation": host.explanation},
        "dev_kvm": device,
        "tools": tools,
        "cache": {
            "path": str(cache_root()),
            "bytes": sum(e.size for e in entries),
            "stale_bytes": sum(e.size for e in entries if e.stale),
        },
        "nested": {"can_run": not nested_missing, "missing": nested_missing},
        "can_run_guests": runnable and not missing_for_guests,
    }


def _device() -> dict[str, Any]:
    try:
        info = os.stat(KVM)
    except OSError as exc:
        return {"exists": False, "error": exc.strerror}
    return {
        "exists": True,
        "mode": stat.filemode(info.st_mode),
        "owner": _name(pwd.getpwuid, info.st_uid),
        "group": _name(grp.getgrgid, info.st_gid),
        "read_write": os.access(KVM, os.R_OK | os.W_OK),
    }


def _name(lookup: Any, number: int) -> str:
    try:
        return str(lookup(number)[0])
    except KeyError:
        return str(number)


def _text(report: dict[str, Any]) -> str:
    kind = report["kvm"]["kind"]
    lines = [f"smolvmm {report['version']}, Python {report['python']}, {report['kernel']}"]
    if kind == "hardware":
        lines.append(
            f"kvm       hardware-assisted ({report['kvm']['explanation'].rsplit('(', 1)[-1].rstrip(')')}):"
            " guests boot and bundles resume here"
        )
    elif kind == "pvm":
        lines.append(
            "kvm       PVM (kvm_pvm), a software KVM: standard guest kernels die in early boot on it, so boot,"
            " build and run cannot run guests here; demo and the tests use the nested machine"
            f" ({README_PVM})"
        )
    else:
        lines.append(
            f"kvm       none: {report['kvm']['explanation']}; load kvm_intel or kvm_amd"
            " (and enable virtualization in the firmware)"
        )
    device = report["dev_kvm"]
    if not device["exists"]:
        lines.append(f"{KVM:<10}missing ({device['error']})")
    else:
        access = (
            "you can open it read-write"
            if device["read_write"]
            else (
                f"you cannot open it read-write: join group {device['group']} (sudo usermod -aG {device['group']} $USER)"
            )
        )
        lines.append(f"{KVM:<10}{device['mode']} {device['owner']}:{device['group']}; {access}")
    present = [t for t in report["tools"] if t["present"]]
    missing = [t for t in report["tools"] if not t["present"]]
    lines.append("tools     " + (", ".join(f"{t['name']} ({t['package']})" for t in present) or "none found"))
    lines += [f"          missing {t['name']}: apt-get install {t['package']} (for {t['for']})" for t in missing]
    cache = report["cache"]
    stale = f", {size(cache['stale_bytes'])} of it stale (smolvmm cache prune)" if cache["stale_bytes"] else ""
    lines.append(f"cache     {cache['path']}: {size(cache['bytes'])}{stale}")
    nested = report["nested"]
    lines.append(
        "nested    "
        + (
            "can run (tools/nested-kvm CMD runs CMD where standard guests boot)"
            if nested["can_run"]
            else f"cannot run: apt-get install {' '.join(nested['missing'])}"
        )
    )
    if report["can_run_guests"]:
        lines.append("verdict   ready: smolvmm boots guests and resumes bundles on this host")
    else:
        if kind == "pvm":
            why = "standard guests cannot run on PVM; run them inside tools/nested-kvm (see nested)"
        elif kind != "hardware" or not device.get("read_write"):
            why = f"no usable hardware KVM ({KVM} above)"
        else:
            why = "host tools are missing (above)"
        lines.append(f"verdict   not ready: {why}")
    return "\n".join(lines)
