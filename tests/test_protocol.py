"""Pure frame logic: scope rules, VALUE_CHUNK headers, value frames, server frame encoding."""

from __future__ import annotations

import asyncio
import struct

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from sds.protocol import (
    CHUNK_BYTES,
    KEY_BYTES,
    FrameType,
    encode_server_frame,
    encode_server_frames,
    frame_name,
    parse_chunk,
    reject_write_frame,
    scope_can_write,
    value_answer_frames,
    value_chunk_frames,
    value_frame,
    value_key_hex,
)

KEY = bytes(range(KEY_BYTES))
KEY_HEX = KEY.hex()


def chunk(index: int, count: int, body: bytes = b"data", key: bytes = KEY) -> bytes:
    return bytes([FrameType.VALUE_CHUNK]) + key + struct.pack(">II", index, count) + body


def test_frame_type_bytes_are_the_wire_protocol() -> None:
    assert [int(t) for t in FrameType] == [1, 2, 3, 4, 5, 6]


def test_only_patch_value_and_chunk_are_write_frames() -> None:
    rejected = [msg_type for msg_type in range(256) if reject_write_frame(msg_type)]
    assert rejected == [0x01, 0x02, 0x05]


def test_scopes_that_write() -> None:
    assert scope_can_write("write")
    assert scope_can_write("admin")
    assert not scope_can_write("read")
    assert not scope_can_write("owner")


def test_frame_names() -> None:
    assert frame_name(0x01) == "PATCH"
    assert frame_name(0x06) == "SYNC_REQ"
    assert frame_name(0x7F) == "0x7f"


def test_value_key_hex() -> None:
    assert value_key_hex(b"\x03" + KEY) == KEY_HEX
    assert value_key_hex(b"\x03" + KEY[:-1]) is None


def test_parse_chunk_reads_header_and_body() -> None:
    parsed = parse_chunk(chunk(2, 5, b"hello"))
    assert parsed is not None
    header, body = parsed
    assert (header.key, header.index, header.count) == (KEY_HEX, 2, 5)
    assert bytes(body) == b"hello"


def test_parse_chunk_accepts_an_empty_body_and_any_key_bytes() -> None:
    # The 32 key bytes are opaque (real clients do not use SHA-256 ids).
    parsed = parse_chunk(chunk(0, 1, b"", key=b"\xff" * KEY_BYTES))
    assert parsed is not None
    assert parsed[0].key == "ff" * KEY_BYTES


@pytest.mark.parametrize(
    "frame",
    [
        chunk(0, 0),
        chunk(3, 3),
        chunk(4, 3),
        chunk(0, 1, b"x" * (CHUNK_BYTES + 1)),
        chunk(0, 1)[: 1 + KEY_BYTES + 7],
        b"\x05",
        b"\x02" + chunk(0, 1)[1:],
    ],
    ids=[
        "count0",
        "index_eq_count",
        "index_gt_count",
        "too_big",
        "short",
        "type_only",
        "not_chunk",
    ],
)
def test_malformed_chunks_are_none(frame: bytes) -> None:
    assert parse_chunk(frame) is None


@given(st.binary(max_size=64))
def test_parse_chunk_never_raises(frame: bytes) -> None:
    parsed = parse_chunk(b"\x05" + frame)
    if parsed is not None:
        assert parsed[0].index < parsed[0].count


def test_value_frame_layout() -> None:
    assert value_frame(KEY_HEX, b"v") == b"\x02" + KEY + b"v"


def test_small_value_is_answered_as_one_value_frame() -> None:
    value = b"x" * CHUNK_BYTES
    assert value_answer_frames(KEY_HEX, value) == [b"\x02" + KEY + value]


def test_large_value_is_answered_as_chunks_that_reassemble() -> None:
    value = bytes(range(256)) * (CHUNK_BYTES // 256 * 2 + 3)
    frames = value_answer_frames(KEY_HEX, value)
    assert len(frames) == 3
    assert all(len(frame) <= 1 + 40 + CHUNK_BYTES for frame in frames)
    parts = []
    for expected_index, frame in enumerate(frames):
        parsed = parse_chunk(frame)
        assert parsed is not None
        assert (parsed[0].index, parsed[0].count, parsed[0].key) == (expected_index, 3, KEY_HEX)
        parts.append(bytes(parsed[1]))
    assert b"".join(parts) == value


def test_chunking_an_exact_multiple_has_no_empty_tail() -> None:
    frames = value_chunk_frames(KEY_HEX, b"y" * (2 * CHUNK_BYTES))
    assert len(frames) == 2


SIZES = [0, 1, 125, 126, 127, 65535, 65536, 200_000]


async def test_encoded_server_frames_decode_in_a_real_client() -> None:
    """Frames written raw to the socket (one by one, then as one run) are read back intact."""
    payloads = [bytes([n % 251]) * n for n in SIZES]

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        assert request.transport is not None
        for payload in payloads:
            request.transport.write(encode_server_frame(payload))
        request.transport.write(encode_server_frames(payloads))
        request.transport.write(encode_server_frame("héllo {}".encode(), text=True))
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"ws://127.0.0.1:{port}/") as ws,
        ):
            for payload in payloads + payloads:
                msg = await ws.receive(timeout=5)
                assert msg.type is aiohttp.WSMsgType.BINARY
                assert msg.data == payload
            msg = await ws.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.TEXT
            assert msg.data == "héllo {}"
            await ws.close()
    finally:
        await asyncio.wait_for(runner.cleanup(), 10)


@pytest.mark.parametrize("size", SIZES)
def test_encoded_header_length_field(size: int) -> None:
    frame = encode_server_frame(b"z" * size)
    assert frame[0] == 0x82
    assert frame[1] & 0x80 == 0, "server frames are never masked"
    header = len(frame) - size
    assert header == (2 if size < 126 else 4 if size < 65536 else 10)


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_a_run_of_frames_is_the_frames_back_to_back(payloads: list[bytes]) -> None:
    assert encode_server_frames(payloads) == b"".join(encode_server_frame(p) for p in payloads)
