"""KVM_RUN works on this host's /dev/kvm: a real-mode guest's port writes come back.

Real mode needs no standard kernel, so this runs natively even on a PVM host.
"""

from __future__ import annotations

import pytest
from kvm_smoke_guest import run_guest


@pytest.mark.kvm(linux_guest=False)
def test_real_mode_guest_writes_to_port() -> None:
    assert run_guest() == b"ok"
