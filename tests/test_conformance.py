"""Every conformance vector in spec/vectors/manifest.json gives its expected outcome."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from smolformat import FormatError, open_bundle

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())["vectors"]
SPEC = (VECTORS.parent / "smolmachine.md").read_text()


def outcome(path: Path) -> str:
    """'valid' when the file opens and verifies, else the FormatError code."""
    try:
        with open_bundle(path) as bundle:
            bundle.verify()
    except FormatError as exc:
        assert "\n" not in str(exc)
        return exc.code
    return "valid"


@pytest.mark.parametrize("vector", MANIFEST, ids=[v["file"] for v in MANIFEST])
def test_vector(vector: dict) -> None:
    assert outcome(VECTORS / vector["file"]) == vector["expect"], vector["description"]


def test_every_error_code_of_the_spec_has_a_vector() -> None:
    section = SPEC.split("### 10.1 Error codes")[1].split("These names are stable")[0]
    codes = set(re.findall(r"`([a-z0-9-]+)`", section))
    assert len(codes) > 30
    # wrong-encoding is a caller's request the file cannot serve, not a fault of the file.
    assert codes - {"wrong-encoding"} <= {v["expect"] for v in MANIFEST}


def test_the_manifest_lists_every_vector_once() -> None:
    files = [v["file"] for v in MANIFEST]
    assert len(set(files)) == len(files)
    assert set(files) == {p.name for p in VECTORS.glob("*.smolmachine")}


def test_the_vectors_are_what_make_vectors_writes(tmp_path: Path) -> None:
    """A reviewer who reruns spec/make_vectors.py gets spec/vectors byte for byte."""
    loader = importlib.util.spec_from_file_location("make_vectors", VECTORS.parent / "make_vectors.py")
    assert loader and loader.loader
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    module.write_vectors(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in VECTORS.iterdir())
    assert [name for name in written if (tmp_path / name).read_bytes() != (VECTORS / name).read_bytes()] == []
