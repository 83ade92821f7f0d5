"""Agent protocol 2, natively: frame parsing (with a hypothesis fuzz), payloads, and the host
port's handling of untrusted guest bytes (budgets, unknown ids, garbage failing only its calls,
output windows)."""

import re
import struct
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import smolvmm
from smolvmm.agent import protocol
from smolvmm.agent.channel import CALL_BUDGET, AgentPort
from smolvmm.agent.process import UNREAD_LIMIT, open_process, run
from smolvmm.agent.protocol import Frame, FrameParser, ProtocolError, Type


def test_frames_round_trip_split_anywhere() -> None:
    frames = [Frame(Type.STDOUT, 7, b"x" * 1000), Frame(Type.EXIT, 7, b"\0" * 8), Frame(Type.OK, 9, b"")]
    wire = b"".join(protocol.encode(Type(f.type), f.id, f.payload) for f in frames)
    for cut in (1, 5, 12, 13, 1011, len(wire) - 1):
        parser = FrameParser()
        assert parser.feed(wire[:cut]) + parser.feed(wire[cut:]) == frames
    parser = FrameParser()
    assert [f for byte in wire for f in parser.feed(bytes([byte]))] == frames


def test_bad_magic_and_huge_length_break_the_parser_for_good() -> None:
    parser = FrameParser()
    assert parser.feed(protocol.encode(Type.OK, 1)) == [Frame(Type.OK, 1, b"")]
    with pytest.raises(ProtocolError, match="magic"):
        parser.feed(b"garbage garbage garbage")
    with pytest.raises(ProtocolError, match="magic"):
        parser.feed(protocol.encode(Type.OK, 1))  # no resynchronising after garbage
    parser = FrameParser()
    parser.feed(protocol.encode(Type.OK, 1))
    with pytest.raises(ProtocolError, match="4294967295 bytes"):
        parser.feed(struct.pack("<HHII", protocol.MAGIC, Type.STDOUT, 1, 0xFFFFFFFF))


def test_bytes_before_the_first_frame_are_skipped_within_a_bound() -> None:
    """A restored channel may begin with the tail of a frame sent before the snapshot."""
    tail = b"\x01\x02" + protocol.encode(Type.STDOUT, 3, b"lost")[5:]
    huge = struct.pack("<HHII", protocol.MAGIC, Type.STDOUT, 1, 0xFFFFFFFF)  # a magic, then no real header
    wire = tail + huge + protocol.encode(Type.READY, 0, protocol.u32(2)) + protocol.encode(Type.OK, 5)
    for step in (1, 3, 7, len(wire)):
        parser = FrameParser()
        out = [f for start in range(0, len(wire), step) for f in parser.feed(wire[start : start + step])]
        assert out == [Frame(Type.READY, 0, protocol.u32(2)), Frame(Type.OK, 5, b"")]
        assert parser.skipped == len(tail) + len(huge)
    parser = FrameParser()
    with pytest.raises(ProtocolError, match="no frame in the first 65536 bytes"):
        for _ in range(20):
            parser.feed(bytes(4096))


def test_encode_refuses_oversized_payload() -> None:
    with pytest.raises(ValueError):
        protocol.encode(Type.STDIN, 1, bytes(protocol.MAX_PAYLOAD + 1))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=30))
def test_parser_fuzz_never_holds_more_than_a_frame(chunks: list[bytes]) -> None:
    parser = FrameParser()
    for chunk in chunks:
        try:
            frames = parser.feed(chunk)
        except ProtocolError:
            return
        for frame in frames:
            assert len(frame.payload) <= protocol.MAX_PAYLOAD
        assert len(parser._buffer) <= protocol.HEADER.size + protocol.MAX_PAYLOAD


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 80), st.integers(0, 2**32 - 1), st.binary(max_size=300)), max_size=20),
    st.integers(1, 64),
)
def test_parser_fuzz_round_trip(frames: list[tuple[int, int, bytes]], step: int) -> None:
    wire = b"".join(protocol.HEADER.pack(protocol.MAGIC, t, i, len(p)) + p for t, i, p in frames)
    parser = FrameParser()
    out = [f for start in range(0, len(wire), step) for f in parser.feed(wire[start : start + step])]
    assert out == [Frame(t, i, p) for t, i, p in frames]


def test_payloads_check_their_input() -> None:
    payload = protocol.exec_payload(["sh", "-c", "true"], {"A": "1"}, "/tmp")
    assert payload == struct.pack("<II", 3, 4) + b"/tmp\0sh\0-c\0true\0A=1\0"
    for bad in (
        lambda: protocol.exec_payload([], {}, ""),
        lambda: protocol.exec_payload(["a\0b"], {}, ""),
        lambda: protocol.exec_payload(["x"], {"A=B": "1"}, ""),
        lambda: protocol.exec_payload(["x" * protocol.MAX_PAYLOAD], {}, ""),
        lambda: protocol.setup_payload("h", "m", {}, {"": "x"}),
    ):
        with pytest.raises(ValueError):
            bad()
    assert protocol.decode_exit(struct.pack("<II", 137, 9)) == (137, 9)
    assert protocol.decode_exit(struct.pack("<II", 3, 0)) == (3, None)
    with pytest.raises(ProtocolError):
        protocol.decode_exit(struct.pack("<II", 7000, 0))
    with pytest.raises(ProtocolError):
        protocol.decode_u32(b"abc")
    assert protocol.decode_message(b"no such\nfile\xff") == "no such?file\ufffd"


def test_guest_timeout_is_a_timeout_error() -> None:
    assert issubclass(smolvmm.GuestTimeout, TimeoutError) and issubclass(smolvmm.GuestTimeout, smolvmm.SmolvmmError)
    assert issubclass(smolvmm.GuestFileError, smolvmm.SmolvmmError)


@pytest.mark.anyio
async def test_port_drops_unknown_ids_and_fails_its_calls_on_garbage(anyio_backend: str) -> None:
    port, other = AgentPort(), AgentPort()
    await port.send(protocol.encode(Type.READY, 0, protocol.u32(2)))
    await other.send(protocol.encode(Type.READY, 0, protocol.u32(2)))
    port._delivered = other._delivered = True
    async with port.call() as call, other.call() as other_call:
        await port.send(protocol.encode(Type.STDOUT, call.id + 100, b"unsolicited"))
        assert port.dropped == 1
        await port.send(protocol.encode(Type.STDOUT, call.id, b"mine"))
        assert (await call.receive()).payload == b"mine"
        await port.send(b"\xff" * 40)  # garbage
        with pytest.raises(smolvmm.AgentError, match="broke protocol 2"):
            await call.receive()
        with pytest.raises(smolvmm.AgentError):
            async with port.call():
                pass
        await other.send(protocol.encode(Type.OK, other_call.id))  # another machine's port is unaffected
        assert (await other_call.receive()).type == Type.OK


@pytest.mark.anyio
async def test_port_bounds_what_a_flooding_guest_makes_it_hold(anyio_backend: str) -> None:
    port = AgentPort()
    await port.send(protocol.encode(Type.READY, 0, protocol.u32(2)))
    port._delivered = True
    async with port.call() as call:
        chunk = protocol.encode(Type.STDOUT, call.id, bytes(protocol.MAX_PAYLOAD))
        for _ in range(CALL_BUDGET // len(chunk)):
            await port.send(chunk)
        await port.send(chunk)  # past the budget: the agent ignored its window
        for _ in range(CALL_BUDGET // len(chunk)):
            await call.receive()
        with pytest.raises(smolvmm.AgentError, match="more than"):
            await call.receive()


@pytest.mark.anyio
async def test_a_flood_of_unasked_frames_is_dropped_in_bounded_memory(anyio_backend: str) -> None:
    port = AgentPort()
    await port.send(protocol.encode(Type.READY, 0, protocol.u32(2)))
    port._delivered = True
    batch = b"".join(protocol.encode(Type.STDOUT, 0xFFFF0000 + i, bytes(protocol.MAX_PAYLOAD)) for i in range(4))
    async with port.call() as call:
        tracemalloc.start()
        try:
            for _ in range(256):  # 64 MiB
                await port.send(batch)
            # What smolvmm's agent code still holds (a process-wide peak would count other threads:
            # the suite's nested run buffers output beside this test).
            agent = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*/smolvmm/agent/*")])
            held = sum(stat.size for stat in agent.statistics("filename"))
        finally:
            tracemalloc.stop()
        assert port.dropped == 1024 and held < 4 * len(batch)
        await port.send(protocol.encode(Type.OK, call.id))
        assert (await call.receive()).type == Type.OK  # the channel still works


@pytest.mark.anyio
async def test_protocol_1_agent_is_too_old(anyio_backend: str) -> None:
    port = AgentPort()
    port.protocol = 1
    with pytest.raises(smolvmm.AgentTooOld, match="rebuild"):
        async with port.call():
            pass


@pytest.mark.anyio
async def test_frames_for_a_call_that_gave_up_are_dropped(anyio_backend: str) -> None:
    port = AgentPort()
    await port.send(protocol.encode(Type.READY, 0, protocol.u32(2)))
    port._delivered = True
    async with port.call() as call:
        call.fail("abandoned")
        await port.send(protocol.encode(Type.STDOUT, call.id, b"late"))  # must not raise into the device
        with pytest.raises(smolvmm.AgentError, match="abandoned"):
            await call.receive()


@pytest.mark.anyio
async def test_a_host_file_that_cannot_be_read_or_written_is_a_smolvmm_error_naming_it(
    anyio_backend: str, tmp_path: Path
) -> None:
    files = smolvmm.GuestFiles(lambda: pytest.fail("the guest was asked"))
    missing = tmp_path / "gone" / "out"
    with pytest.raises(smolvmm.SmolvmmError, match=f"^cannot write {re.escape(str(missing))}: No such file"):
        await files.download("/etc/hostname", missing)
    with pytest.raises(smolvmm.SmolvmmError, match=f"^cannot read {re.escape(str(tmp_path))}/in: No such file"):
        await files.upload(tmp_path / "in", "/tmp/in")
    assert list(tmp_path.iterdir()) == []


async def _play_agent(port: AgentPort, answer: Callable[[Frame], Awaitable[None]]) -> None:
    """The guest agent's side of ``port``: ``answer`` each frame the host sends."""
    parser = FrameParser()
    while True:
        for frame in parser.feed(await port.receive()):
            await answer(frame)


def _agent_held() -> int:
    """What smolvmm's agent code holds of the memory traced so far."""
    agent = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*/smolvmm/agent/*")])
    return sum(stat.size for stat in agent.statistics("filename"))


@pytest.mark.anyio
async def test_an_agent_that_ignores_its_output_window_fails_its_process_in_bounded_memory(anyio_backend: str) -> None:
    port = AgentPort()
    await port.send(protocol.encode(Type.READY, 0, protocol.u32(2)))
    port._delivered = True
    flooded = anyio.Event()

    async def flood(frame: Frame) -> None:
        if frame.type == Type.EXEC:
            await port.send(protocol.encode(Type.STARTED, frame.id, protocol.u32(7)))
            for _ in range(1000):  # 64 MiB that nobody reads
                await port.send(protocol.encode(Type.STDOUT, frame.id, bytes(protocol.MAX_PAYLOAD)))
                await anyio.sleep(0)
            flooded.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(_play_agent, port, flood)
        tracemalloc.start()
        try:
            async with open_process(port, "yes", None, None) as process:
                await flooded.wait()
                assert _agent_held() < UNREAD_LIMIT + CALL_BUDGET + 2 * protocol.MAX_PAYLOAD  # not 64 MiB
                with pytest.raises(smolvmm.AgentError, match="ignored its output window"):
                    await process.wait()
                read = 0
                with pytest.raises(smolvmm.AgentError, match="ignored its output window"):
                    async for chunk in process.stdout:
                        read += len(chunk)
                assert read == UNREAD_LIMIT
        finally:
            tracemalloc.stop()
        async with port.call() as call:  # the frames after the failure were dropped: the channel still works
            await port.send(protocol.encode(Type.OK, call.id))
            assert (await call.receive()).type == Type.OK
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_an_agent_that_keeps_its_output_window_streams_megabytes(anyio_backend: str) -> None:
    port = AgentPort()
    await port.send(protocol.encode(Type.READY, 0, protocol.u32(2)))
    port._delivered = True
    output = b""
    sent = unacked = 0

    async def honest(frame: Frame) -> None:
        """Writes ``output`` while at most WINDOW bytes are unacknowledged (agent.c: while fewer), then exits."""
        nonlocal sent, unacked
        if frame.type == Type.EXEC:
            sent = unacked = 0
            await port.send(protocol.encode(Type.STARTED, frame.id, protocol.u32(7)))
        elif frame.type == Type.OUTPUT_ACK:
            unacked -= struct.unpack("<II", frame.payload)[1]
        else:
            return
        while unacked <= protocol.WINDOW and sent < len(output):
            chunk = output[sent : sent + protocol.MAX_PAYLOAD]
            await port.send(protocol.encode(Type.STDOUT, frame.id, chunk))
            sent += len(chunk)
            unacked += len(chunk)
            if sent == len(output):
                await port.send(protocol.encode(Type.EXIT, frame.id, bytes(8)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(_play_agent, port, honest)
        output = bytes(range(256)) * 16384 + b"tail"  # 4 MiB and a bit, read as it comes
        async with open_process(port, "cat big", None, None) as process:
            assert b"".join([chunk async for chunk in process.stdout]) == output
            assert await process.wait() == 0
        output = bytes(UNREAD_LIMIT)  # all unread when it exits: its last frame came with WINDOW bytes unread
        async with open_process(port, "cat window", None, None) as process:
            assert await process.wait() == 0
            assert b"".join([chunk async for chunk in process.stdout]) == output
        output = bytes(range(256)) * 16384
        assert (await run(port, "cat big", None, None, None, None, len(output))).stdout == output
        tg.cancel_scope.cancel()
