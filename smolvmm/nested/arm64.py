"""The arm64 machine: Debian's arm64 kernel at EL2 under ``qemu-system-aarch64`` (TCG), so /dev/kvm is arm64 KVM.

It proves smolvmm's arm64 code against a real arm64 KVM on an x86_64 host. The initramfs holds
busybox, the kernel's 9p and virtio modules and an arm64 Python userland unpacked from Debian
packages; the host root is shared read-only over 9p and its directories the userland lacks
(/work, /home, /root...) appear at the same paths, so a job runs in the host's working directory
with arm64 Python. The job protocol (job file, three virtio-serial ports) is the nested harness's.

arm64 packages come from a private apt configuration under the image cache (its own sources,
lists and empty dpkg status), so the host's apt state is never touched.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from smolvmm.config import cache_root
from smolvmm.errors import ImageError
from smolvmm.images import busybox
from smolvmm.images.cache import cache_key, cached_build
from smolvmm.images.cpio import Initramfs
from smolvmm.images.debian import Package, _run
from smolvmm.nested.harness import HarnessError, Job, job_devices, run_machine
from smolvmm.nested.image import INIT_SOURCE, init_script

QEMU = "qemu-system-aarch64"
SOURCE = "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main"
KERNEL_META = "linux-image-arm64"
MODULES = ["virtio_pci", "9pnet_virtio", "9p", "virtio_console"]
USERLAND = [
    "python3-minimal",
    "libpython3.11-stdlib",
    "python3-cffi",
    "python3-construct",
    "python3-zstandard",
    "python3-trio",
    "python3-anyio",
    "python3-pytest",
    "python3-pytest-timeout",
    "python3-hypothesis",
    "device-tree-compiler",
]
"""What the arm64 tests need: the project's runtime dependencies, pytest and hypothesis, and dtc."""
PATH = "/usr/local/bin:/usr/bin:/bin"

INIT = init_script(
    PATH,
    "no /dev/kvm: the kernel did not boot at EL2 (needs -M virt,virtualization=on)",
    r"""mkdir -p /host /job
mount -t 9p -o @NINEP@,ro,cache=loose @HOSTROOT@ /host || fail "could not mount the host root over 9p"
cp "/host$job/"* /job/ || fail "job $job not readable through 9p"
for dir in /host/*; do
    name="/${dir#/host/}"
    [ -d "$dir" ] && [ ! -L "$dir" ] && [ ! -e "$name" ] && mkdir "$name" && mount --bind "$dir" "$name"
done
read -r cwd < /job/cwd
if [ ! -d "$cwd" ]; then  # e.g. a checkout under /tmp, which the userland has of its own
    mkdir -p "$cwd" && mount --bind "/host$cwd" "$cwd" || fail "could not bind the working directory $cwd"
fi
mkdir -p /dev/pts /dev/shm /run/smolvmm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
cp /job/job /run/smolvmm/job && touch /run/smolvmm/readonly
while read -r tag path; do
    mkdir -p "$path" && mount -t 9p -o @NINEP@ "$tag" "$path" || fail "could not mount --out $path"
done < /job/mounts
""",
    "/bin/sh",
)
"""The arm64 userland is the initramfs itself; the host's directories it lacks are bound in at the same paths."""


def _apt(tool: str, *args: str, cwd: Path | None = None) -> str:
    """Run ``apt-get`` or ``apt-cache`` against the private arm64 configuration, updating its lists first if absent."""
    root = cache_root() / "apt-arm64"
    options = [
        f"-oDir::Etc::SourceList={root}/sources.list",
        f"-oDir::Etc::SourceParts={root}/empty",
        f"-oDir::Etc::PreferencesParts={root}/empty",
        f"-oDir::Etc::Preferences={root}/empty/none",
        f"-oDir::State={root}/state",
        f"-oDir::State::status={root}/state/status",
        f"-oDir::Cache={root}/cache",
        "-oAPT::Architecture=arm64",
        "-oAPT::Architectures=arm64",
        "-oAPT::Install-Recommends=0",
    ]
    if not list((root / "state" / "lists").glob("*_Packages*")):
        for directory in ("empty", "state/lists/partial", "cache/archives/partial"):
            (root / directory).mkdir(parents=True, exist_ok=True)
        (root / "sources.list").write_text(SOURCE + "\n")
        (root / "state" / "status").touch()
        _run("apt-get", *options, "update", "-qq")
    return _run(tool, *options, *args, cwd=cwd)


class Arm64Package(Package):
    """A Debian arm64 package, downloaded through the private configuration into ``debs-arm64``."""

    def download(self) -> Path:
        return fetch([self])[0]


def fetch(packages: Sequence[Package]) -> list[Path]:
    """The packages' .deb files, the missing ones fetched with one ``apt-get download``."""
    debs = cache_root() / "debs-arm64"
    missing = [package for package in packages if not (debs / package.deb_name).exists()]
    if missing:
        debs.mkdir(parents=True, exist_ok=True)
        tmp = debs / f".download-{os.getpid()}"
        tmp.mkdir(mode=0o755)
        try:
            os.chmod(tmp, 0o755)  # apt's _apt user may then write there instead of warning
            _apt("apt-get", "download", "-qq", *(f"{p.name}={p.version}" for p in missing), cwd=tmp)
            for package in missing:
                fetched = list(tmp.glob(f"{package.name}_*.deb"))
                if len(fetched) != 1:
                    raise ImageError(f"apt-get download {package.name} (arm64) produced {len(fetched)} .deb files")
                fetched[0].rename(debs / package.deb_name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [debs / package.deb_name for package in packages]


def closure(names: Sequence[str]) -> list[Arm64Package]:
    """``names`` and everything they depend on (no recommends), as apt would install them on an empty system."""
    output = _apt("apt-get", "install", "-s", *names)
    return [Arm64Package(name, version) for name, version in re.findall(r"^Inst (\S+) \((\S+) ", output, re.MULTILINE)]


def kernel_package() -> Arm64Package:
    """The unsigned build of the kernel Debian's arm64 metapackage points at."""
    for package in closure([KERNEL_META]):
        if package.name.startswith("linux-image-") and package.name != KERNEL_META:
            return Arm64Package(f"{package.name}-unsigned", package.version)
    raise ImageError(f"{KERNEL_META} (arm64) depends on no linux-image-* package")


def _build(out: Path, kernel: Arm64Package, tools: Arm64Package, userland: list[Arm64Package]) -> None:
    """busybox.build's kernel and initramfs, then the userland appended as a second cpio archive."""
    busybox.build(out, kernel, tools, MODULES, INIT)
    root = out / "userland"
    for path in fetch(userland):
        _run("dpkg-deb", "-x", str(path), str(root))
    image = Initramfs()
    image.tree(root, "/")
    image.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    with open(out / busybox.INITRD, "ab") as initrd:
        image.write(initrd)
    shutil.rmtree(root)


def arm64_image() -> tuple[Path, Path]:
    """(kernel, initrd) of the arm64 machine, built into the image cache on first use."""
    kernel = kernel_package()
    tools = next(package for package in closure(["busybox-static"]) if package.name == "busybox-static")
    userland = closure(USERLAND)
    inputs = [f"{p.name}={p.version}" for p in (kernel, tools, *userland)]
    key = cache_key(inputs, [Path(__file__), INIT_SOURCE])
    directory = cached_build("arm64-machine", key, lambda out: _build(out, kernel, tools, userland))
    return directory / busybox.KERNEL, directory / busybox.INITRD


def qemu_command(kernel: Path, initrd: Path, workdir: Path, outs: Sequence[Path]) -> list[str]:
    """virt with EL2 (virtualization=on) and GICv3, one TCG vCPU, and the job protocol's devices.

    ``pauth-impdef`` swaps QARMA pointer authentication for QEMU's cheaper implementation-defined
    algorithm: the guest cannot tell, and TCG runs noticeably faster.
    """
    args = [
        QEMU,
        "-M",
        "virt,virtualization=on,gic-version=3",
        "-cpu",
        "max,pauth-impdef=on",
        "-accel",
        "tcg",
        "-m",
        "2048",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        f"console=ttyAMA0 quiet panic=-1 smolvmm.job={workdir}/job",
    ]
    return args + job_devices(workdir, outs)


def run(job: Job, stdout: int = 1, stderr: int = 2) -> int:
    """Run ``job`` in a fresh arm64 machine with arm64 Python first on PATH; return its exit status.

    Raises HarnessError when the machine rather than the command failed.
    """
    if shutil.which(QEMU) is None:
        raise HarnessError(f"{QEMU} not found: apt-get install qemu-system-arm")
    kernel, initrd = arm64_image()
    env = {name: value for name, value in job.env.items() if name != "VIRTUAL_ENV"}
    job = dataclasses.replace(job, env={**env, "PATH": PATH})
    return run_machine(job, lambda workdir: qemu_command(kernel, initrd, workdir, job.outs), stdout, stderr)
