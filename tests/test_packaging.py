"""The package as someone installing it gets it: a wheel built in a fresh venv with only the pinned
build requirements, holding py.typed, the license and the guest agent's source."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _floor() -> str:
    """The setuptools version pyproject.toml's build requirement names as its floor."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    (floor,) = [re.fullmatch(r"setuptools>=([\d.]+)", r)[1] for r in requires if r.startswith("setuptools")]
    return floor


def test_the_wheel_builds_with_the_setuptools_floor_and_ships_types_and_license(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", f"setuptools=={_floor()}"], check=True, timeout=600)
    out = tmp_path / "wheels"
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = out.glob("smolvmm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        (license_name,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        license_text = archive.read(license_name).decode()
    assert {"smolvmm/py.typed", "smolformat/py.typed", "smolvmm/images/agent.c"} <= names
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert license_text == (ROOT / "LICENSE").read_text()
    assert "License-Expression: Apache-2.0" in metadata and "Requires-Dist: tqdm" in metadata
    # Installed (without its dependencies), the entry point answers --version from the metadata.
    subprocess.run([*pip, "install", "--no-deps", str(wheel)], check=True, timeout=600)
    version = subprocess.run([str(venv / "bin" / "smolvmm"), "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.stdout == "smolvmm 0.1.0\n", version.stderr
