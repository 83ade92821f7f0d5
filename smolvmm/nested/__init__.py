"""The nested KVM machine: a QEMU TCG guest with emulated AMD-V whose /dev/kvm runs standard guests.

Used on PVM hosts, where /dev/kvm cannot run standard guest kernels; see ``tools/nested-kvm``.
"""

from smolvmm.nested.harness import HARNESS_FAILURE, NESTED_FROZE, HarnessError, Job, NestedMachineFroze, run

__all__ = ["HARNESS_FAILURE", "NESTED_FROZE", "HarnessError", "Job", "NestedMachineFroze", "run"]
