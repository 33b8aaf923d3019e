"""Values: VALUE and VALUE_CHUNK stored as blobs, served on REQ_VALUE, and the value modes."""

from __future__ import annotations

import asyncio
import sqlite3
import struct
from pathlib import Path

import pytest

from sds.appkeys import METRICS, STATE
from sds.backends.sqlite import store_filename
from sds.protocol import CHUNK_BYTES, value_chunk_frames
from tests.conftest import RunningServer, ServerFactory


def key(n: int) -> bytes:
    """A value key: 32 opaque bytes (real clients do not use SHA-256 here)."""
    return bytes([n]) * 32


def blobs(server: RunningServer, store_id: str) -> dict[str, bytes]:
    assert server.config.persist_dir is not None
    db = server.config.persist_dir / store_filename(store_id)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {h: bytes(d) for h, d in conn.execute("SELECT hash, data FROM blobs")}


def chunk(k: bytes, index: int, count: int, body: bytes) -> bytes:
    return b"\x05" + k + struct.pack(">II", index, count) + body


async def test_value_is_stored_as_blob_and_served_to_the_requester_alone(
    persistent_server: RunningServer,
) -> None:
    writer = await persistent_server.connect("vals", sub="writer")
    await writer.send(b"\x02" + key(1) + b"hello value")
    await asyncio.sleep(0.2)
    assert blobs(persistent_server, "vals") == {key(1).hex(): b"hello value"}
    await writer.close()

    requester = await persistent_server.connect("vals", scope="read", sub="req")
    other = await persistent_server.connect("vals", sub="other")
    await requester.send(b"\x03" + key(1))
    assert await requester.receive() == b"\x02" + key(1) + b"hello value"
    assert await other.receive() == b"\x03" + key(1)
    assert await other.receive_all(0.3) == []


async def test_request_for_unknown_value_is_only_relayed(stored_server: RunningServer) -> None:
    requester = await stored_server.connect("vals2", scope="read")
    other = await stored_server.connect("vals2")
    await requester.send(b"\x03" + key(9))
    assert await other.receive() == b"\x03" + key(9)
    assert await requester.receive_all(0.3) == []


async def test_large_value_round_trips_through_chunks(persistent_server: RunningServer) -> None:
    value = bytes(range(256)) * (10 * 1024) + b"tail"  # 2.5 MiB + 4 bytes
    frames = value_chunk_frames(key(2).hex(), value)
    assert len(frames) == 3
    writer = await persistent_server.connect("big")
    peer = await persistent_server.connect("big")
    for frame in frames:
        await writer.send(frame)
    assert [await peer.receive() for _ in frames] == frames
    await asyncio.sleep(0.2)
    assert blobs(persistent_server, "big") == {key(2).hex(): value}

    requester = await persistent_server.connect("big", scope="read")
    await requester.send(b"\x03" + key(2))
    answer = [await requester.receive() for _ in frames]
    assert answer == frames
    reassembled = b"".join(frame[1 + 32 + 8 :] for frame in answer)
    assert reassembled == value


async def test_value_of_exactly_one_mib_is_answered_as_one_value_frame(
    stored_server: RunningServer,
) -> None:
    value = b"v" * CHUNK_BYTES
    writer = await stored_server.connect("mib")
    await writer.send(b"\x02" + key(3) + value)
    await asyncio.sleep(0.3)
    requester = await stored_server.connect("mib", scope="read")
    await requester.send(b"\x03" + key(3))
    assert await requester.receive() == b"\x02" + key(3) + value


async def test_malformed_chunks_are_relayed_but_never_stored(
    persistent_server: RunningServer,
) -> None:
    writer = await persistent_server.connect("bad-chunks")
    peer = await persistent_server.connect("bad-chunks")
    bad = [
        b"\x05" + key(4)[:10],
        chunk(key(4), 0, 0, b"zero count"),
        chunk(key(4), 3, 2, b"index past count"),
        chunk(key(4), 0, 1, b"x" * (CHUNK_BYTES + 1)),
        chunk(key(5), 0, 2, b"first"),
        chunk(key(5), 1, 3, b"count changed"),
    ]
    for frame in bad:
        await writer.send(frame)
    assert [await peer.receive() for _ in bad] == bad
    await asyncio.sleep(0.2)
    assert blobs(persistent_server, "bad-chunks") == {}


async def test_incomplete_sequence_is_dropped_when_sender_leaves(
    persistent_server: RunningServer,
) -> None:
    budget = persistent_server.app[STATE].chunk_budget
    writer = await persistent_server.connect("partial")
    await writer.send(chunk(key(6), 0, 3, b"a" * 1000))
    await writer.send(chunk(key(6), 1, 3, b"b" * 1000))
    await asyncio.sleep(0.2)
    assert budget.used == 2000
    await writer.close()
    async with asyncio.timeout(5):
        while budget.used:
            await asyncio.sleep(0.02)
    assert blobs(persistent_server, "partial") == {}


async def test_chunk_count_past_the_connection_limit_is_relayed_but_never_stored(
    make_server: ServerFactory,
) -> None:
    server = await make_server(persist=True, max_chunk_bytes_per_client=1500)
    writer = await server.connect("bounded")
    peer = await server.connect("bounded")
    frames = [chunk(key(7), 0, 2, b"a" * 1000), chunk(key(7), 1, 2, b"b" * 1000)]
    for frame in frames:
        await writer.send(frame)
    assert [await peer.receive() for _ in frames] == frames
    await asyncio.sleep(0.2)
    assert blobs(server, "bounded") == {}
    assert server.app[STATE].chunk_budget.used == 0
    assert server.app[METRICS].values_not_stored["count_too_large"] == 2
    assert writer.close_code is None


async def test_chunk_memory_per_connection_is_bounded_and_the_sender_learns_it(
    make_server: ServerFactory,
) -> None:
    server = await make_server(persist=True, max_chunk_bytes_per_client=2 * CHUNK_BYTES)
    writer = await server.connect("full")
    peer = await server.connect("full")
    frames = [
        chunk(key(7), 0, 1, b"done"),
        chunk(key(8), 0, 2, b"a" * CHUNK_BYTES),
        chunk(key(9), 0, 2, b"b" * CHUNK_BYTES),
        chunk(key(10), 0, 2, b"c"),
    ]
    for frame in frames:
        await writer.send(frame)
    # Relayed as they came; the last one finds the connection's memory full: not stored,
    # and the sender is closed with 1013 so it knows.
    assert [await peer.receive() for _ in frames] == frames
    assert await writer.wait_closed() == 1013
    assert blobs(server, "full") == {key(7).hex(): b"done"}
    assert server.app[METRICS].values_not_stored["client_limit"] == 1
    async with asyncio.timeout(5):
        while server.app[STATE].chunk_budget.used:
            await asyncio.sleep(0.02)


async def test_one_store_cannot_take_the_chunk_memory_of_the_others(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = await make_server(
        persist=True, max_chunk_bytes_per_store=3000, max_chunk_bytes_total=4000
    )
    tenant_token = server.token("tenant", sub="greedy")
    tenant = await server.connect("tenant", token=tenant_token)
    peer = await server.connect("tenant", scope="read")
    hoard = [chunk(key(9), index, 8, bytes([index]) * 1000) for index in range(4)]
    for frame in hoard:
        await tenant.send(frame)
    # Every chunk is relayed; the fourth passes the store's budget: the sender is told.
    assert [await peer.receive() for _ in hoard] == hoard
    assert await tenant.wait_closed() == 1013
    metrics = server.app[METRICS]
    assert metrics.values_not_stored["store_limit"] == 1

    # Another store's value still fits in the total and is stored.
    other = await server.connect("other")
    await other.send(chunk(key(10), 0, 1, b"o" * 900))
    await other.send(chunk(key(11), 0, 2, b"x" * 500))
    await other.send(chunk(key(11), 1, 2, b"y" * 500))
    await asyncio.sleep(0.3)
    assert blobs(server, "other") == {
        key(10).hex(): b"o" * 900,
        key(11).hex(): b"x" * 500 + b"y" * 500,
    }
    assert other.close_code is None
    assert server.app[STATE].chunk_budget.used == 0

    lines = [r.getMessage() for r in caplog.records if "not stored" in r.getMessage()]
    assert any("store tenant" in line and "store_limit" in line for line in lines)
    assert not any(tenant_token in r.getMessage() for r in caplog.records)


async def test_value_beyond_the_total_chunk_memory_is_refused_with_1013(
    make_server: ServerFactory,
) -> None:
    server = await make_server(persist=True, max_chunk_bytes_total=1500)
    first = await server.connect("total-a")
    await first.send(chunk(key(12), 0, 2, b"a" * 1000))
    second = await server.connect("total-b")
    await second.send(chunk(key(13), 0, 2, b"b" * 1000))
    assert await second.wait_closed() == 1013
    assert server.app[METRICS].values_not_stored["total_limit"] == 1
    assert first.close_code is None
    await first.send(chunk(key(12), 1, 2, b"c" * 400))
    await asyncio.sleep(0.3)
    assert blobs(server, "total-a") == {key(12).hex(): b"a" * 1000 + b"c" * 400}


async def test_stale_chunk_sequences_expire(make_server: ServerFactory) -> None:
    server = await make_server(persist=True, chunk_timeout=0.2)
    writer = await server.connect("stale")
    await writer.send(chunk(key(8), 0, 2, b"a" * 100))
    await asyncio.sleep(0.1)
    assert server.app[STATE].chunk_budget.used == 100
    async with asyncio.timeout(5):
        while server.app[STATE].chunk_budget.used:
            await asyncio.sleep(0.05)
    await writer.send(chunk(key(8), 1, 2, b"b" * 100))
    await asyncio.sleep(0.2)
    assert blobs(server, "stale") == {}


async def test_blob_mode_never_prunes_history_on_value(stored_server: RunningServer) -> None:
    async with stored_server.client("blobmode") as writer:
        await writer.send(b"\x01before")
        await writer.send(b"\x02" + key(1) + b"entry value")
        await writer.send(b"\x01after")
        await asyncio.sleep(0.3)
    joiner = await stored_server.connect("blobmode")
    assert await joiner.receive_all(0.4) == [b"\x01before", b"\x01after"]


async def test_snapshot_mode_replaces_snapshot_and_prunes_older_patches(
    make_server: ServerFactory,
) -> None:
    server = await make_server(persist=True, value_mode="snapshot")
    async with server.client("snapmode") as writer:
        await writer.send(b"\x01old-1")
        await writer.send(b"\x01old-2")
        await writer.send(b"\x02" + key(1) + b"whole state")
        await writer.send(b"\x01newer")
        await asyncio.sleep(0.3)
    joiner = await server.connect("snapmode")
    assert await joiner.receive_all(0.4) == [b"\x02" + key(1) + b"whole state", b"\x01newer"]
    assert server.config.persist_dir is not None
    db = Path(server.config.persist_dir) / store_filename("snapmode")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT count(*) FROM patches").fetchone() == (1,)
        assert conn.execute("SELECT clock FROM snapshots").fetchone() == (2,)
