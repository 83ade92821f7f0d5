"""Every conformance vector in spec/vectors/manifest.json gives its expected outcome."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from smolformat import FormatError, open_bundle

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())["vectors"]


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


def test_manifest_covers_the_required_cases() -> None:
    expected = {v["expect"] for v in MANIFEST}
    assert {
        "valid",
        "truncated",
        "bad-magic",
        "smolpack",
        "unsupported-version",
        "section-overlap",
        "section-outside-file",
        "length-overflow",
        "bad-checksum",
        "bad-digest",
        "map-outside-file",
        "map-outside-ram",
        "duplicate-vcpu",
        "unknown-required-section",
    } <= expected
