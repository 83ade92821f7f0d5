"""Writing and reading whole bundles: contents survive, RAM maps from the file, failures leave nothing."""

from __future__ import annotations

import mmap
import os
import random
import tracemalloc
from pathlib import Path

import pytest
from bundles import contents, leftovers

import smolformat.pages
import smolformat.reader
from smolformat import (
    FormatError,
    make_metadata,
    open_bundle,
    repack_bundle,
    set_working_set,
    verify_bundle,
    write_bundle,
)
from smolformat.config import MAX_DEVICES, MAX_VCPUS
from smolformat.crafting import (
    build_frame,
    edit_table,
    find_entry,
    parse_frame,
    replace_section,
    rewrite_section,
    section_digest,
)
from smolformat.layout import MAX_SECTIONS, PAGE_SIZE, SectionKind
from smolformat.pages import MIN_DEDUP_RUN, MIN_ZERO_GAP
from smolformat.payloads import WorkingSet

MIB = 1 << 20
TIB = 1 << 40


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
@pytest.mark.parametrize("encoding", ["raw", "zstd"])
def test_contents_survive_a_round_trip(tmp_path: Path, arch: str, encoding: str) -> None:
    given = contents(tmp_path, arch)
    path = tmp_path / "m.smolmachine"
    digest = write_bundle(path, given, memory_encoding=encoding)
    with open_bundle(path) as bundle:
        assert bundle.digest == digest
        assert bundle.memory_encoding == encoding
        assert str(bundle.config.arch) == arch and bundle.config.vcpu_count == 2
        assert [(label.key, label.value) for label in bundle.metadata.labels] == [("app", "demo")]
        assert bundle.metadata.hypervisor == "kvm-pvm"
        assert len(bundle.vcpus) == 2 and bundle.devices[3].state.device.serial == "disk0"
        assert bundle.kernel == given.kernel and bundle.initrd == given.initrd
        memory = [mmap.mmap(-1, len(m)) for m in given.memory]
        bundle.read_memory_into(memory)
        assert [m[:] for m in memory] == [bytes(m) for m in given.memory]
        disk_copy = tmp_path / "copy.img"
        bundle.disk(0).materialise(disk_copy)
        assert disk_copy.read_bytes() == Path(given.disks[0]).read_bytes()
        bundle.verify()


def test_raw_memory_maps_straight_from_the_file(tmp_path: Path) -> None:
    given = contents(tmp_path)
    path = tmp_path / "m.smolmachine"
    write_bundle(path, given, memory_encoding="raw")
    with open_bundle(path) as bundle:
        extents = bundle.memory_extents()
        regions = {r.gpa: bytearray(r.size) for r in bundle.config.ram}  # zero: pages in no extent
        for gpa, length, file_offset in extents:
            assert file_offset % PAGE_SIZE == 0 and gpa % PAGE_SIZE == 0
            with mmap.mmap(bundle.fileno(), length, flags=mmap.MAP_PRIVATE, offset=file_offset) as view:
                base = max(r for r in regions if r <= gpa)
                regions[base][gpa - base : gpa - base + length] = view[:]
        assert [bytes(regions[r.gpa]) for r in bundle.config.ram] == [bytes(m) for m in given.memory]


def _stored_pages(memory: bytearray, tmp_path: Path, **options: int) -> tuple[int, list]:
    """(pages in MEMORY_DATA, memory extents) of ``memory`` written raw; checks it reads back."""
    path = tmp_path / "m.smolmachine"
    write_bundle(path, contents(tmp_path, "arm64", [memory]), memory_encoding="raw", **options)
    with open_bundle(path) as bundle:
        ram = bytearray(len(memory))
        bundle.read_memory_into([memoryview(ram)])
        assert ram == memory
        data = next(s for s in bundle.sections if s.kind == SectionKind.MEMORY_DATA)
        return data.length // PAGE_SIZE, bundle.memory_extents()


def test_zero_pages_are_left_out_and_identical_pages_stored_once(tmp_path: Path) -> None:
    rng = random.Random(5)
    run = rng.randbytes(16 * PAGE_SIZE)
    x, y = rng.randbytes(PAGE_SIZE), rng.randbytes(PAGE_SIZE)
    memory = bytearray(4 * MIB)
    memory[0 : len(run)] = run
    memory[MIB : MIB + 3 * PAGE_SIZE] = x + y + x  # a repeat inside a run not yet written
    memory[2 * MIB : 2 * MIB + len(run)] = run  # a copy of a whole run: one extent onto the first
    memory[3 * MIB : 3 * MIB + PAGE_SIZE] = run[:PAGE_SIZE]  # one equal page alone
    pages, extents = _stored_pages(memory, tmp_path, min_dedup_run=1)
    assert pages == 16 + 2
    run_at, xy, x_again, run_again, single = extents
    assert x_again.file_offset == xy.file_offset and xy.length == 2 * PAGE_SIZE
    assert run_again.file_offset == single.file_offset == run_at.file_offset
    # The default deduplicates only runs of 16 pages (a restore-speed choice): the single page
    # and the x are stored again, the copy of the whole run is not.
    assert MIN_DEDUP_RUN == 16
    assert _stored_pages(memory, tmp_path)[0] == 16 + 4


def test_dedup_stops_where_a_restore_would_map_too_much(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = random.Random(7).randbytes(PAGE_SIZE)
    memory = bytearray(4 * MIB)
    for n in range(0, 64, 2):  # the same page every other page: one mapping per copy
        memory[n * PAGE_SIZE : (n + 1) * PAGE_SIZE] = page
    monkeypatch.setattr(smolformat.pages, "DEDUP_EXTENTS", 8)
    pages, extents = _stored_pages(memory, tmp_path, min_dedup_run=1, min_zero_gap=1)
    assert len(extents) == 32 and pages == 32 - 7


def test_repack_is_lossless(tmp_path: Path) -> None:
    raw = tmp_path / "raw.smolmachine"
    write_bundle(raw, contents(tmp_path), memory_encoding="raw")
    repack_bundle(raw, tmp_path / "z.smolmachine", memory_encoding="zstd")
    repack_bundle(tmp_path / "z.smolmachine", tmp_path / "back.smolmachine", memory_encoding="raw")
    assert (tmp_path / "back.smolmachine").read_bytes() == raw.read_bytes()
    assert (tmp_path / "z.smolmachine").stat().st_size < raw.stat().st_size


def test_a_short_batched_write_is_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given = contents(tmp_path)
    write_bundle(tmp_path / "whole.smolmachine", given, memory_encoding="raw")
    monkeypatch.setattr(os, "pwritev", lambda fd, views, at: os.pwrite(fd, views[0][: len(views[0]) // 2], at))
    write_bundle(tmp_path / "short.smolmachine", given, memory_encoding="raw")
    assert (tmp_path / "short.smolmachine").read_bytes() == (tmp_path / "whole.smolmachine").read_bytes()


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    given = contents(tmp_path)
    given.memory = [given.memory[0], bytearray(12)]  # wrong size, found after sections were written
    with pytest.raises(ValueError):
        write_bundle(tmp_path / "m.smolmachine", given)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.img"]


def test_the_writer_refuses_what_the_reader_would(tmp_path: Path) -> None:
    given = contents(tmp_path)
    given.vcpus = [given.vcpus[0]]
    with pytest.raises(FormatError) as caught:
        write_bundle(tmp_path / "m.smolmachine", given)
    assert caught.value.code == "vcpu-mismatch"
    assert not (tmp_path / "m.smolmachine").exists()


def test_open_reads_no_bulk_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.smolmachine"
    write_bundle(path, contents(tmp_path), memory_encoding="raw")
    read = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        read.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(smolformat.reader.os, "pread", counting_pread)
    with open_bundle(path):
        pass
    assert sum(read) < 64 * 1024  # header, table, config, state and indexes only


def test_on_config_gets_the_checked_config_before_the_other_sections_are_read(tmp_path: Path) -> None:
    path = tmp_path / "m.smolmachine"
    write_bundle(path, contents(tmp_path), memory_encoding="raw")
    data = bytearray(path.read_bytes())
    data[find_entry(parse_frame(bytes(data))[1], SectionKind.VCPU_STATE)["offset"]] ^= 0xFF
    path.write_bytes(data)
    seen = []
    with pytest.raises(FormatError, match="vcpu_state#0 does not match its digest"):
        open_bundle(path, on_config=lambda config: seen.append([(r.gpa, r.size) for r in config.ram]))
    assert seen == [[(0, 4 * MIB), (1 << 32, MIB)]]

    class Refused(Exception):
        pass

    def refuse(config: object) -> None:
        raise Refused

    with pytest.raises(Refused):
        open_bundle(path, on_config=refuse)


def test_zstd_memory_is_not_mappable(tmp_path: Path) -> None:
    path = tmp_path / "m.smolmachine"
    write_bundle(path, contents(tmp_path), memory_encoding="zstd")
    with open_bundle(path) as bundle, pytest.raises(FormatError) as caught:
        bundle.memory_extents()
    assert caught.value.code == "wrong-encoding"


def test_dedup_can_be_turned_off(tmp_path: Path) -> None:
    run = random.Random(6).randbytes(MIN_DEDUP_RUN * PAGE_SIZE)
    memory = bytearray(4 * MIB)
    memory[0 : len(run)] = memory[2 * MIB : 2 * MIB + len(run)] = run
    path = tmp_path / "m.smolmachine"
    write_bundle(path, contents(tmp_path, "arm64", [memory]), memory_encoding="raw", min_dedup_run=0)
    with open_bundle(path) as bundle:
        assert next(s for s in bundle.sections if s.kind == SectionKind.MEMORY_DATA).length == 2 * len(run)
        assert len({e.file_offset for e in bundle.memory_extents()}) == 2


def test_short_zero_gaps_are_stored_long_ones_left_out(tmp_path: Path) -> None:
    memory = bytearray(4 * MIB)
    for at in (0, 2, MIN_ZERO_GAP + 3):  # data, a 1-page gap, data, a MIN_ZERO_GAP-page gap, data
        memory[at * PAGE_SIZE : (at + 1) * PAGE_SIZE] = bytes([at + 1]) * PAGE_SIZE
    last = (MIN_ZERO_GAP + 3) * PAGE_SIZE
    for gap, expected in (
        (MIN_ZERO_GAP, [(0, 3 * PAGE_SIZE), (last, PAGE_SIZE)]),
        (1, [(0, PAGE_SIZE), (2 * PAGE_SIZE, PAGE_SIZE), (last, PAGE_SIZE)]),
    ):
        path = tmp_path / f"gap{gap}.smolmachine"
        write_bundle(path, contents(tmp_path, "arm64", [memory]), memory_encoding="raw", min_zero_gap=gap)
        with open_bundle(path) as bundle:
            base = bundle.config.ram[0].gpa
            assert [(e.guest_phys_addr - base, e.length) for e in bundle.memory_extents()] == expected
            ram = bytearray(len(memory))
            bundle.read_memory_into([memoryview(ram)])
            assert ram == memory


def test_huge_claims_cost_nothing_to_open_and_verify(tmp_path: Path) -> None:
    """A bundle claiming 1 TiB of RAM and a 4 EiB disk opens and verifies without allocating them."""
    data = (Path(__file__).resolve().parent.parent / "spec/vectors/valid-x86_64-raw.smolmachine").read_bytes()
    data = rewrite_section(
        data, SectionKind.CONFIG, lambda config: config.__setitem__(slice(17, 25), TIB.to_bytes(8, "little"))
    )

    def claim(_header: dict, entries: list[dict]) -> None:
        find_entry(entries, SectionKind.MEMORY_DATA)["logical_length"] = TIB
        find_entry(entries, SectionKind.DISK_DATA)["logical_length"] = 1 << 62

    path = tmp_path / "huge.smolmachine"
    path.write_bytes(edit_table(data, claim))
    tracemalloc.start()
    try:
        with open_bundle(path) as bundle:
            bundle.verify()
            assert bundle.config.ram[0].size == TIB and bundle.disk(0).size == 1 << 62
            assert bundle.memory_extents()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MIB


def _with_vcpu_sections(count: int) -> bytes:
    """The valid vector plus ``count`` more zero-length VCPU_STATE sections (ids 1..count)."""
    data = (Path(__file__).resolve().parent.parent / "spec/vectors/valid-x86_64-raw.smolmachine").read_bytes()
    header, entries = parse_frame(data)
    empty = {"kind": SectionKind.VCPU_STATE, "flags": 1, "encoding": 0, "reserved0": 0, "reserved1": 0}
    empty.update(offset=header["table_offset"], length=0, logical_length=0, digest=section_digest(b""))
    entries += [{**empty, "index": i} for i in range(1, count + 1)]
    return build_frame(data[: header["table_offset"]], header, entries)


def test_the_section_count_is_capped_above_any_real_bundle() -> None:
    assert MAX_SECTIONS >= MAX_VCPUS + 2 * MAX_DEVICES + len(smolformat.reader._SINGLETONS)


def _reads_to_open(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, FormatError | None]:
    """How many reads ``open_bundle(path)`` makes of the file, and the error it raises (or None)."""
    reads = 0
    pread = os.pread

    def counting(fd: int, length: int, offset: int) -> bytes:
        nonlocal reads
        reads += 1
        return pread(fd, length, offset)

    with monkeypatch.context() as patch:
        patch.setattr(os, "pread", counting)
        try:
            open_bundle(path).close()
        except FormatError as exc:
            return reads, exc
    return reads, None


@pytest.mark.parametrize(("extra", "code"), [(MAX_SECTIONS - 20, "vcpu-mismatch"), (MAX_SECTIONS, "bad-header")])
def test_many_sections_are_refused_quickly_in_one_short_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: int, code: str
) -> None:
    valid = Path(__file__).resolve().parent.parent / "spec/vectors/valid-x86_64-raw.smolmachine"
    opening_valid, nothing = _reads_to_open(valid, monkeypatch)
    assert nothing is None
    path = tmp_path / "many.smolmachine"
    path.write_bytes(_with_vcpu_sections(extra))
    reads, error = _reads_to_open(path, monkeypatch)
    assert error is not None and error.code == code and len(str(error)) < 200
    # Refused before any extra section is read: no more reads than opening the valid bundle takes,
    # and a section count above the cap is refused on the header alone.
    assert reads < opening_valid
    assert code != "bad-header" or reads == 1


def test_the_writer_refuses_a_parent_digest_that_is_not_a_digest(tmp_path: Path) -> None:
    given = contents(tmp_path)
    given.metadata = make_metadata("kvm-pvm", parent_digest=b"12345")
    with pytest.raises(FormatError) as caught:
        write_bundle(tmp_path / "m.smolmachine", given)
    assert caught.value.code == "bad-section" and "metadata" in str(caught.value)


def test_a_working_set_is_kept_through_repack_and_signed_content(tmp_path: Path) -> None:
    given = contents(tmp_path)
    ranges = [{"address": 0, "pages": 3}, {"address": 16 * PAGE_SIZE, "pages": 1}, {"address": 1 << 32, "pages": 256}]
    given.working_set = ranges
    raw = tmp_path / "raw.smolmachine"
    write_bundle(raw, given, memory_encoding="raw")
    with open_bundle(raw) as bundle:
        assert [(r.address, r.pages) for r in bundle.working_set] == [(0, 3), (16 * PAGE_SIZE, 1), (1 << 32, 256)]
        assert not find_entry(parse_frame(raw.read_bytes())[1], SectionKind.WORKING_SET)["flags"]  # optional
    repack_bundle(raw, tmp_path / "z.smolmachine", memory_encoding="zstd")
    with open_bundle(tmp_path / "z.smolmachine") as bundle:
        assert [(r.address, r.pages) for r in bundle.working_set] == [(0, 3), (16 * PAGE_SIZE, 1), (1 << 32, 256)]
    given.working_set = []
    write_bundle(tmp_path / "none.smolmachine", given)
    with open_bundle(tmp_path / "none.smolmachine") as bundle:
        assert bundle.working_set == []


@pytest.mark.parametrize(
    "ranges",
    [
        [{"address": 100, "pages": 1}],  # not page-aligned
        [{"address": 0, "pages": 0}],  # empty
        [{"address": PAGE_SIZE, "pages": 1}, {"address": 0, "pages": 1}],  # out of order
        [{"address": 0, "pages": 2}, {"address": PAGE_SIZE, "pages": 1}],  # overlapping
        [{"address": 4 * MIB - PAGE_SIZE, "pages": 2}],  # past the end of its region
        [{"address": 1 << 40, "pages": 1}],  # no RAM there
    ],
)
def test_a_bad_working_set_is_refused_by_writer_and_reader(tmp_path: Path, ranges: list[dict[str, int]]) -> None:
    given = contents(tmp_path)
    given.working_set = ranges
    with pytest.raises(FormatError) as caught:
        write_bundle(tmp_path / "m.smolmachine", given)
    assert caught.value.code == "bad-working-set"
    given.working_set = [{"address": 0, "pages": 1}]
    good = tmp_path / "good.smolmachine"
    write_bundle(good, given)
    good.write_bytes(replace_section(good.read_bytes(), SectionKind.WORKING_SET, WorkingSet.build(ranges)))
    with pytest.raises(FormatError) as caught:
        open_bundle(good)
    assert caught.value.code == "bad-working-set"


def test_a_working_set_is_added_by_copying_the_other_sections_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "m.smolmachine"
    write_bundle(path, contents(tmp_path))
    before = open_bundle(path)
    sections = {(s.kind, s.index): (s.offset, s.digest) for s in before.sections}
    before.close()
    digest = set_working_set(path, [{"address": 0, "pages": 4}])
    with open_bundle(path) as bundle:
        assert bundle.digest == digest and [(r.address, r.pages) for r in bundle.working_set] == [(0, 4)]
        assert {
            (s.kind, s.index): (s.offset, s.digest) for s in bundle.sections if s.kind != SectionKind.WORKING_SET
        } == sections
    verify_bundle(path)
    set_working_set(path, [{"address": PAGE_SIZE, "pages": 1}])  # replaced: the old section's bytes zeroed
    verify_bundle(path)
    with open_bundle(path) as bundle:
        assert [(r.address, r.pages) for r in bundle.working_set] == [(PAGE_SIZE, 1)]
    with pytest.raises(FormatError) as caught:
        set_working_set(path, [{"address": 1 << 40, "pages": 1}])
    assert caught.value.code == "bad-working-set" and leftovers(tmp_path, path.name) == []
