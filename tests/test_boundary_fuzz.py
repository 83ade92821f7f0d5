"""Fuzzing the boundary between bundle state and the hypervisor with hostile, re-sealed bundles.

A hostile author needs only spec/smolmachine.md to change a state section and re-seal the file,
so the mutants here are built from the spec's rules alone (§2-§4: header, table entries, BLAKE2b
digests, the header checksum; §7-§8 for where fields sit), not with smolvmm's writer. Each mutant
goes through a real restore on this host's /dev/kvm up to the first guest entry (every ioctl of a
restore runs; no guest runs), with Python warnings turned into errors: the outcome is a restore or
one BundleError line, never another exception, a warning (cffi copying past a buffer) or a crash.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from smolvmm import BundleError, Machine, MachineConfig

pytestmark = [
    pytest.mark.kvm(linux_guest=False),
    pytest.mark.filterwarnings("error"),  # a warning (e.g. cffi copying past a buffer) fails the test
]

# spec §3 and §4, written out from the text
HEADER = struct.Struct("<8sHHIQQQII48s32s")
ENTRY = struct.Struct("<HHHHIIQQQ32s")
CHECKSUMMED = 96
VCPU_STATE, VM_STATE, DEVICES = 3, 4, 5
# spec §7.1: VCPU_STATE starts mp_state (4), regs (144), sregs (312), fpu (416), then the xsave blob32
XSAVE_LENGTH_AT = 4 + 144 + 312 + 416


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


class Frame:
    """A bundle's header and table as the spec lays them out, and re-sealing after a change."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.header = list(HEADER.unpack_from(data, 0))
        table_offset, count, entry_size = self.header[6], self.header[7], self.header[8]
        self.entries = [list(ENTRY.unpack_from(data, table_offset + i * entry_size)) for i in range(count)]

    def find(self, kind: int, index: int = 0) -> int:
        return next(n for n, e in enumerate(self.entries) if e[0] == kind and e[4] == index)

    def payload(self, number: int) -> bytes:
        offset, length = self.entries[number][6], self.entries[number][7]
        return self.data[offset : offset + length]

    def resealed(self, replacements: dict[int, bytes]) -> bytes:
        """The file with sections replaced: same-length payloads in place, others moved to the end
        of the data area (their old bytes zeroed: gaps are zero, §2); digests, table and checksum anew."""
        table_offset = self.header[6]
        body = bytearray(self.data[:table_offset])
        entries = [list(e) for e in self.entries]
        for number, payload in replacements.items():
            entry = entries[number]
            offset, length = entry[6], entry[7]
            if len(payload) == length:
                body[offset : offset + length] = payload
            else:
                body[offset : offset + length] = bytes(length)
                body += bytes(-len(body) % 8)
                entry[6] = len(body)
                body += payload
            entry[7] = entry[8] = len(payload)  # length and logical_length (STRUCT sections)
            entry[9] = _digest(payload)
        body += bytes(-len(body) % 8)
        table = b"".join(ENTRY.pack(*e) for e in entries)
        header = list(self.header)
        header[5], header[6], header[7], header[8] = len(body) + len(table), len(body), len(entries), ENTRY.size
        header[10] = bytes(32)
        head = HEADER.pack(*header)
        checksum = _digest(head[:CHECKSUMMED] + table)
        return head[:CHECKSUMMED] + checksum + bytes(body[HEADER.size :]) + table


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Frame:
    """A real bundle of this host: the default guest booted for an instant (on PVM it gets only
    as far as its decompressor) and saved, 2 vCPUs."""
    path = tmp_path_factory.mktemp("fuzz") / "base.smolmachine"

    async def save() -> None:
        async with Machine.boot(MachineConfig(vcpus=2, memory=128 << 20)) as machine:
            await machine.snapshot(path)
            await machine.stop()

    anyio.run(save, backend="trio")
    return Frame(path.read_bytes())


def _restore(data: bytes, directory: Path, backend: str) -> str:
    """Restore ``data`` up to the first guest entry on anyio ``backend``: "ok" or the one-line refusal."""
    path = directory / "mutant.smolmachine"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            anyio.run(lambda: Machine.prepare_restore(path), backend=backend)
        except BundleError as exc:
            assert "\n" not in str(exc)
            return str(exc)
    return "ok"


def test_the_resealer_follows_the_spec(saved: Frame, tmp_path: Path, anyio_backend: str) -> None:
    """An unchanged re-seal restores, and one changed value is refused by the boundary by name."""
    assert _restore(saved.resealed({}), tmp_path, anyio_backend) == "ok"
    vcpu = saved.find(VCPU_STATE, 1)
    payload = saved.payload(vcpu)
    (xsave_length,) = struct.unpack_from("<I", payload, XSAVE_LENGTH_AT)
    start = XSAVE_LENGTH_AT + 4
    xsave = payload[start : start + xsave_length]
    grown = (
        payload[:XSAVE_LENGTH_AT]
        + struct.pack("<I", xsave_length + 3)
        + xsave
        + b"\xff" * 3
        + payload[start + xsave_length :]
    )
    refusal = _restore(saved.resealed({vcpu: grown}), tmp_path, anyio_backend)
    assert (
        refusal == f"VCPU_STATE#1 xsave: {xsave_length + 3} bytes; this host's hypervisor takes exactly {xsave_length}"
    )


@st.composite
def mutants(draw: st.DrawFn, frame: Frame) -> tuple[dict[int, bytes], str]:
    """One state section changed (bytes overwritten, its XSAVE blob resized, or its tail cut or
    grown) and what the refusal must say ("" where any outcome is right)."""
    kind = draw(st.sampled_from([VCPU_STATE, VM_STATE, DEVICES]))
    vcpu_id = draw(st.integers(0, 1)) if kind == VCPU_STATE else 0
    number = frame.find(kind, vcpu_id)
    original = frame.payload(number)
    payload = bytearray(original)
    how = draw(st.sampled_from(["overwrite", "overwrite", "resize", *(["xsave"] if kind == VCPU_STATE else [])]))
    expect = ""
    if how == "overwrite":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(payload) - 1))
            value = draw(st.binary(min_size=1, max_size=8))
            payload[at : at + len(value)] = value[: len(payload) - at]
    elif how == "xsave":
        (length,) = struct.unpack_from("<I", payload, XSAVE_LENGTH_AT)
        size = draw(st.sampled_from([0, 4095, 4097, 4099, 8192, length - 4, length + 64]))
        start = XSAVE_LENGTH_AT + 4
        blob = bytes(payload[start : start + size]).ljust(size, b"\xaa")
        payload[XSAVE_LENGTH_AT : start + length] = struct.pack("<I", size) + blob
        expect = f"VCPU_STATE#{vcpu_id} xsave: {size} bytes" if size != length else ""
    else:
        cut = draw(st.integers(-16, 16).filter(bool))
        payload = payload[:cut] if cut < 0 else payload + draw(st.binary(min_size=cut, max_size=cut))
        expect = "does not parse"  # a STRUCT payload must fill its section exactly (spec §5)
    return {number: bytes(payload)}, expect


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hostile_state_is_restored_or_refused_in_one_line(saved: Frame, tmp_path: Path, data: st.DataObject) -> None:
    replacements, expect = data.draw(mutants(saved))
    backend = data.draw(st.sampled_from(["trio", "asyncio"]))  # both anyio backends, no example run twice
    outcome = _restore(saved.resealed(replacements), tmp_path, backend)
    event(
        "restored"
        if outcome == "ok"
        else outcome.rpartition("[")[2]
        if outcome.endswith("]")
        else outcome.split(":")[0]
    )
    if expect:  # otherwise any outcome is right: a restore, or one BundleError line and no warning
        assert expect in outcome
