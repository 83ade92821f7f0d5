"""hostkvm.probe classifies /dev/kvm by the loaded KVM modules."""

from pathlib import Path

import pytest

from smolvmm.host.kvmprobe import probe


@pytest.fixture
def fake_dev(tmp_path: Path) -> Path:
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    return dev


@pytest.mark.parametrize(
    ("modules", "kind"),
    [(["kvm", "kvm_amd"], "hardware"), (["kvm", "kvm_intel"], "hardware"), (["kvm", "kvm_pvm"], "pvm"), ([], "none")],
)
def test_kind_follows_loaded_modules(tmp_path: Path, fake_dev: Path, modules: list[str], kind: str) -> None:
    sys_module = tmp_path / "module"
    for name in modules:
        (sys_module / name).mkdir(parents=True)
    result = probe(fake_dev, sys_module)
    assert result.kind == kind
    assert "\n" not in result.explanation


def test_pvm_explanation_says_why_and_names_the_harness(tmp_path: Path, fake_dev: Path) -> None:
    (tmp_path / "kvm_pvm").mkdir()
    explanation = probe(fake_dev, tmp_path).explanation
    assert "without VT-x/AMD-V" in explanation and "emulated" in explanation
    assert "tools/nested-kvm" in explanation


def test_missing_device_is_none(tmp_path: Path) -> None:
    (tmp_path / "kvm_amd").mkdir()
    result = probe(tmp_path / "absent", tmp_path)
    assert result.kind == "none"
    assert "absent" in result.explanation
