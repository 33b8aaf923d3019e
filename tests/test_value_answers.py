"""REQ_VALUE answers: complete for large values, one at a time per client, paced by the socket."""

from __future__ import annotations

import asyncio
import struct
import time

import aiohttp

from sds.appkeys import METRICS
from sds.backends.sqlite import store_filename
from sds.protocol import CHUNK_BYTES, value_chunk_frames
from tests.conftest import RunningServer, ServerFactory
from tests.raw_ws import RawWebSocket
from tests.store_files import read_rows

MiB = 1024 * 1024


def key(n: int) -> bytes:
    return bytes([n]) * 32


def big_value(size: int) -> bytes:
    """Bytes that differ from chunk to chunk, so a reordered or mixed answer shows."""
    block = bytes(range(256)) * 4096  # 1 MiB
    return b"".join(struct.pack(">I", i) + block[4:] for i in range(-(-size // MiB)))[:size]


async def raw_reader(server: RunningServer, store_id: str, *, sub: str) -> RawWebSocket:
    """A read-scope client of ``store_id`` on a raw socket: it reads only when told to."""
    token = server.token(store_id, scope="read", sub=sub)
    return await asyncio.to_thread(
        RawWebSocket.connect, server.server.port or 0, f"/ws/{store_id}?token={token}"
    )


async def store_value(server: RunningServer, store_id: str, k: bytes, value: bytes) -> None:
    """Store a value the way a client does (VALUE_CHUNK frames), and wait until it is committed."""
    assert server.config.persist_dir is not None
    db = server.config.persist_dir / store_filename(store_id)
    query = "SELECT length(data) FROM blobs WHERE hash = ?"
    async with server.client(store_id, sub="uploader") as writer:
        for frame in value_chunk_frames(k.hex(), value):
            await writer.send(frame)
        async with asyncio.timeout(20):
            while not db.exists() or read_rows(db, query, (k.hex(),)) != [(len(value),)]:
                await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # the last chunk is relayed (to nobody) right after its commit


async def wait_for(condition: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_value_larger_than_the_client_buffer_is_answered_completely(
    make_server: ServerFactory,
) -> None:
    server = await make_server(persist=True, max_client_buffer_bytes=2 * MiB + 4096)
    value = big_value(7 * MiB + 123)
    await store_value(server, "large", key(1), value)

    reader = await server.connect("large", scope="read", sub="reader")
    await reader.send(b"\x03" + key(1))
    frames = [await reader.receive(timeout=20) for _ in range(8)]
    assert [frame[0] for frame in frames] == [0x05] * 8
    assert [struct.unpack(">II", f[33:41]) for f in frames] == [(i, 8) for i in range(8)]
    assert all(len(f) - 41 == CHUNK_BYTES for f in frames[:7])
    assert b"".join(f[41:] for f in frames) == value
    assert reader.close_code is None


async def test_flood_of_requests_gets_one_answer_paced_by_the_socket(
    make_server: ServerFactory,
) -> None:
    limit = 2 * MiB
    server = await make_server(persist=True, max_client_buffer_bytes=limit)
    metrics = server.app[METRICS]
    value = big_value(24 * MiB)
    await store_value(server, "flood", key(2), value)
    peer = await server.connect("flood", sub="peer")

    raw = await raw_reader(server, "flood", sub="flooder")
    try:
        for _ in range(200):
            await asyncio.to_thread(raw.send_binary, b"\x03" + key(2))
        # Every REQ_VALUE is still relayed to the other clients of the store.
        relayed = [await peer.receive(timeout=10) for _ in range(200)]
        assert relayed == [b"\x03" + key(2)] * 200
        await wait_for(lambda: metrics.value_requests_unanswered["duplicate"] == 199)
        await asyncio.sleep(0.5)  # the answer runs as far as the unread socket lets it
        assert metrics.value_answers_active == 1
        assert metrics.value_requests_queued == 0
        # Only what the socket took (kernel buffers plus the client's bound), not 200 x 24 MiB.
        assert metrics.value_answer_bytes < 12 * MiB

        # Commits go on while the answer waits on the socket.
        async with server.client("flood", sub="writer") as writer:
            await writer.send(b"\x01during the answer")
            assert await peer.receive(timeout=10) == b"\x01during the answer"

        # Read normally: the value arrives once, complete, then nothing more.
        code, frames = await asyncio.to_thread(raw.read_until_close, 6.0)
        assert code is None
        assert frames == 24 + 1  # the answer's chunks and the writer's patch
        assert metrics.value_answer_bytes == 24 * (1 + 32 + 8) + len(value)
        await wait_for(lambda: metrics.value_answers_active == 0)
    finally:
        raw.close()


async def test_answer_stops_when_the_requester_leaves(make_server: ServerFactory) -> None:
    server = await make_server(persist=True, max_client_buffer_bytes=2 * MiB)
    metrics = server.app[METRICS]
    await store_value(server, "leaver", key(3), big_value(20 * MiB))
    raw = await raw_reader(server, "leaver", sub="leaver")
    await asyncio.to_thread(raw.send_binary, b"\x03" + key(3))
    for n in range(4, 8):  # keys waiting behind the answer
        await asyncio.to_thread(raw.send_binary, b"\x03" + key(n))
    await wait_for(lambda: metrics.value_answers_active == 1)
    raw.close()
    await wait_for(lambda: metrics.value_answers_active == 0 and metrics.value_requests_queued == 0)
    sent = metrics.value_answer_bytes
    await asyncio.sleep(0.3)
    assert metrics.value_answer_bytes == sent < 20 * MiB


async def test_requests_beyond_the_queue_bound_are_counted_not_answered(
    persistent_server: RunningServer,
) -> None:
    metrics = persistent_server.app[METRICS]
    await store_value(persistent_server, "many", key(1), big_value(30 * MiB))
    raw = await raw_reader(persistent_server, "many", sub="many")
    try:
        await asyncio.to_thread(raw.send_binary, b"\x03" + key(1))
        await wait_for(lambda: metrics.value_answers_active == 1)
        for n in range(100):
            await asyncio.to_thread(raw.send_binary, b"\x03" + bytes([2]) * 31 + bytes([n]))
        await wait_for(lambda: metrics.value_requests_unanswered["busy"] == 100 - 64)
        assert metrics.value_requests_queued == 64
    finally:
        raw.close()
    await wait_for(lambda: metrics.value_requests_queued == 0)


async def test_answer_survives_a_compaction_through_the_server(make_server: ServerFactory) -> None:
    server = await make_server(persist=True, max_client_buffer_bytes=2 * MiB)
    value = big_value(20 * MiB + 7)
    await store_value(server, "compacted", key(4), value)
    raw = await raw_reader(server, "compacted", sub="slow")
    try:
        await asyncio.to_thread(raw.send_binary, b"\x03" + key(4))
        await wait_for(lambda: server.app[METRICS].value_answers_active == 1)
        admin = server.token("compacted", scope="admin", sub="ops")
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                f"{server.http_url}/api/stores/compacted/compact",
                headers={"Authorization": f"Bearer {admin}"},
            )
            assert response.status == 200
        frames = await asyncio.to_thread(read_binary_frames, raw, 21)
        assert b"".join(frame[41:] for frame in frames) == value
    finally:
        raw.close()


async def test_value_overwritten_during_its_answer_is_not_mixed(make_server: ServerFactory) -> None:
    server = await make_server(persist=True, max_client_buffer_bytes=2 * MiB)
    metrics = server.app[METRICS]
    await store_value(server, "overwritten", key(5), big_value(20 * MiB))
    raw = await raw_reader(server, "overwritten", sub="slow")
    try:
        await asyncio.to_thread(raw.send_binary, b"\x03" + key(5))
        await wait_for(lambda: metrics.value_answers_active == 1)
        async with server.client("overwritten", sub="writer") as writer:
            await writer.send(b"\x02" + key(5) + b"new value")
            # The requester is a peer of the store: the new value reaches it by relay.
            code, count = await asyncio.to_thread(raw.read_until_close, 4.0)
        assert code is None
        assert count < 21  # the old value's answer stopped part-way
        assert metrics.value_requests_unanswered["changed"] == 1
        await wait_for(lambda: metrics.value_answers_active == 0)
    finally:
        raw.close()


def read_binary_frames(raw: RawWebSocket, count: int, timeout: float = 20.0) -> list[bytes]:
    """Read ``count`` binary frames from a raw client (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    frames: list[bytes] = []
    buffer = b""
    raw.sock.settimeout(1.0)
    while len(frames) < count and time.monotonic() < deadline:
        while len(buffer) >= 2:
            length = buffer[1] & 0x7F
            offset = 2
            if length == 126:
                length, offset = struct.unpack_from("!H", buffer, 2)[0], 4
            elif length == 127:
                length, offset = struct.unpack_from("!Q", buffer, 2)[0], 10
            if len(buffer) < offset + length:
                break
            if buffer[0] & 0x0F == 0x2:
                frames.append(buffer[offset : offset + length])
            buffer = buffer[offset + length :]
        if len(frames) >= count:
            break
        try:
            data = raw.sock.recv(1 << 20)
        except TimeoutError:
            continue
        if not data:
            break
        buffer += data
    return frames
