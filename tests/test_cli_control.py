"""The control socket of a detached machine (``smolvmm exec ID -- CMD``): its frames and requests,
checked as the untrusted input they are. The real exec runs in tests/test_cli_ps.py (kvm)."""

from __future__ import annotations

import json

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from smolvmm.cli import control


async def _frames(data: bytes) -> list[tuple[bytes, bytes]]:
    send, receive = anyio.create_memory_object_stream[bytes](1)
    async with send:
        send.send_nowait(data)
    stream = BufferedByteReceiveStream(receive)
    frames = []
    while (received := await control.read_frame(stream)) is not None:
        frames.append(received)
    return frames


@pytest.mark.anyio
async def test_frames_round_trip() -> None:
    data = control.frame(control.REQUEST, b'{"argv": ["true"]}') + control.frame(control.STDIN_END)
    assert await _frames(data) == [(b"R", b'{"argv": ["true"]}'), (b"E", b"")]


@pytest.mark.anyio
async def test_a_frame_over_the_limit_is_refused_before_it_is_read() -> None:
    with pytest.raises(control.ControlError, match="over the"):
        await _frames(b"I" + (control.MAX_PAYLOAD + 1).to_bytes(4, "big"))
    with pytest.raises(control.ControlError, match="over the"):
        control.frame(control.STDOUT, bytes(control.MAX_PAYLOAD + 1))


@pytest.mark.anyio
async def test_a_connection_that_ends_inside_a_frame_is_an_error() -> None:
    with pytest.raises(control.ControlError, match="inside a frame"):
        await _frames(b"I\x00\x00\x00\x10abc")


def test_a_request_is_checked_field_by_field() -> None:
    good = {"argv": ["sh", "-c", "echo"], "env": {"A": "b"}, "cwd": "/tmp"}
    assert control.parse_request(json.dumps(good).encode()) == (["sh", "-c", "echo"], {"A": "b"}, "/tmp")
    assert control.parse_request(b'{"argv": ["true"]}') == (["true"], {}, None)
    for bad in (
        b"\xff",
        b"[]",
        b'{"argv": []}',
        b'{"argv": "true"}',
        b'{"argv": ["true", 1]}',
        b'{"argv": ["true"], "env": {"A": 1}}',
        b'{"argv": ["true"], "env": []}',
        b'{"argv": ["true"], "cwd": 5}',
    ):
        with pytest.raises(control.ControlError):
            control.parse_request(bad)
