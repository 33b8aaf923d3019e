"""Persistence: per-store SQLite files, persist-then-relay, catch-up for late joiners."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from sds.backends.base import StoreBusy
from sds.backends.sqlite import store_filename, try_lock
from sds.client import StoreClient
from tests.conftest import RunningServer, ServerFactory


def stored_patches(db: Path, store_id: str) -> list[tuple[int, bytes]]:
    """The (clock, payload) rows of a store, read from its file read-only."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT clock, data FROM patches WHERE store_id = ? ORDER BY clock", (store_id,)
        ).fetchall()
    return [(int(clock), bytes(data)) for clock, data in rows]


def db_of(server: RunningServer, store_id: str) -> Path:
    assert server.config.persist_dir is not None
    return server.config.persist_dir / store_filename(store_id)


def patch(n: int, size: int = 16) -> bytes:
    return b"\x01" + n.to_bytes(4, "big") + b"p" * size


async def test_store_file_is_named_after_the_store_id(persistent_server: RunningServer) -> None:
    writer = await persistent_server.connect("team/notes: 1")
    reader = await persistent_server.connect("team/notes: 1")
    await writer.send(patch(1))
    await reader.receive()
    assert store_filename("team/notes: 1") == "team_notes__1.db"
    assert stored_patches(db_of(persistent_server, "team/notes: 1"), "team/notes: 1") == [
        (1, patch(1)[1:])
    ]


async def test_two_ids_sharing_a_file_keep_their_rows_apart(
    persistent_server: RunningServer,
) -> None:
    assert store_filename("a/b") == store_filename("a_b")
    one = await persistent_server.connect("a/b")
    two = await persistent_server.connect("a_b")
    await one.send(patch(1))
    await two.send(patch(2))
    await two.send(patch(3))
    await asyncio.sleep(0.3)
    db = db_of(persistent_server, "a/b")
    assert stored_patches(db, "a/b") == [(1, patch(1)[1:])]
    assert stored_patches(db, "a_b") == [(1, patch(2)[1:]), (2, patch(3)[1:])]
    joiner = await persistent_server.connect("a_b")
    assert await joiner.receive_all(0.4) == [patch(2), patch(3)]


async def test_stores_sharing_a_file_commit_together_with_their_own_clocks(
    persistent_server: RunningServer,
) -> None:
    """Both ids of one file write at once, so one group commit holds runs of each."""
    one, two = await persistent_server.connect("c/d"), await persistent_server.connect("c_d")
    reader_one = await persistent_server.connect("c/d", scope="read")
    reader_two = await persistent_server.connect("c_d", scope="read")
    sent = {"c/d": [patch(n) for n in range(300)], "c_d": [patch(1000 + n) for n in range(300)]}
    for frame_one, frame_two in zip(sent["c/d"], sent["c_d"], strict=True):
        await one.send(frame_one)
        await two.send(frame_two)
    assert await _receive_count(reader_one, 300) == sent["c/d"]
    assert await _receive_count(reader_two, 300) == sent["c_d"]
    db = db_of(persistent_server, "c/d")
    for store_id, frames in sent.items():
        rows = stored_patches(db, store_id)
        assert [clock for clock, _ in rows] == list(range(1, 301)), store_id
        assert [data for _, data in rows] == [frame[1:] for frame in frames], store_id


async def test_patch_is_on_disk_before_any_peer_sees_it(persistent_server: RunningServer) -> None:
    writer = await persistent_server.connect("durable")
    reader = await persistent_server.connect("durable")
    db = db_of(persistent_server, "durable")
    for n in range(50):
        await writer.send(patch(n))
        frame = await reader.receive()
        assert frame == patch(n)
        assert stored_patches(db, "durable")[-1] == (n + 1, patch(n)[1:])


async def test_back_to_back_patches_get_gap_free_clocks(persistent_server: RunningServer) -> None:
    writer = await persistent_server.connect("burst")
    reader = await persistent_server.connect("burst")
    frames = [patch(n) for n in range(1000)]
    for frame in frames:
        await writer.send(frame)
    assert [await reader.receive() for _ in frames] == frames
    rows = stored_patches(db_of(persistent_server, "burst"), "burst")
    assert [clock for clock, _ in rows] == list(range(1, 1001))
    assert [data for _, data in rows] == [frame[1:] for frame in frames]


async def test_interleaved_writers_keep_each_senders_order_behind_their_commits(
    persistent_server: RunningServer,
) -> None:
    """Patches and unstored frames of two writers: each sender's order holds for every peer."""
    a = await persistent_server.connect("mixed", sub="a")
    b = await persistent_server.connect("mixed", sub="b")
    reader = await persistent_server.connect("mixed", scope="read", sub="r")

    def frames_of(name: bytes) -> list[bytes]:
        # Every third frame is a PRESENCE, which stores nothing but must not overtake the
        # sender's patches that are still committing.
        return [
            (b"\x04" if n % 3 == 2 else b"\x01") + name + n.to_bytes(2, "big") for n in range(300)
        ]

    sent_a, sent_b = frames_of(b"a"), frames_of(b"b")

    async def send_all(client: StoreClient, frames: list[bytes]) -> None:
        for n, frame in enumerate(frames):
            await client.send(frame)
            if n % 20 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(send_all(a, sent_a), send_all(b, sent_b))
    received = await _receive_count(reader, len(sent_a) + len(sent_b))
    assert [f for f in received if f[1:2] == b"a"] == sent_a
    assert [f for f in received if f[1:2] == b"b"] == sent_b
    assert await _receive_count(a, len(sent_b)) == sent_b
    assert await _receive_count(b, len(sent_a)) == sent_a
    rows = stored_patches(db_of(persistent_server, "mixed"), "mixed")
    assert [clock for clock, _ in rows] == list(range(1, 401))
    stored = [b"\x01" + data for _, data in rows]
    assert [f for f in stored if f[1:2] == b"a"] == [f for f in sent_a if f[0] == 1]
    assert [f for f in stored if f[1:2] == b"b"] == [f for f in sent_b if f[0] == 1]
    # The relay order is the storage order: patches reach peers in clock order.
    assert [f for f in received if f[0] == 1] == stored


async def test_identical_patches_are_all_relayed_and_replayed(stored_server: RunningServer) -> None:
    writer = await stored_server.connect("same")
    reader = await stored_server.connect("same")
    for _ in range(3):
        await writer.send(b"\x01identical")
    assert len(await reader.receive_all(0.4)) == 3
    joiner = await stored_server.connect("same", scope="read")
    assert await joiner.receive_all(0.4) == [b"\x01identical"] * 3


async def test_identical_patches_are_all_stored(persistent_server: RunningServer) -> None:
    writer = await persistent_server.connect("same")
    reader = await persistent_server.connect("same")
    for _ in range(3):
        await writer.send(b"\x01identical")
    assert len(await reader.receive_all(0.4)) == 3
    assert len(stored_patches(db_of(persistent_server, "same"), "same")) == 3


async def test_late_joiner_catches_up_with_nobody_online(stored_server: RunningServer) -> None:
    async with stored_server.client("offline") as writer:
        for n in range(20):
            await writer.send(patch(n))
        await writer.send(b"\x04presence is not stored")
        await asyncio.sleep(0.3)
    joiner = await stored_server.connect("offline", scope="read")
    assert await joiner.receive_all(0.5) == [patch(n) for n in range(20)]


async def test_joiner_during_a_stream_gets_every_patch_exactly_once_in_order(
    stored_server: RunningServer,
) -> None:
    writer = await stored_server.connect("stream")
    total = 3000
    joiners: list[StoreClient] = []

    async def write() -> None:
        for n in range(total):
            await writer.send(patch(n))
            if n % 50 == 0:
                await asyncio.sleep(0)

    async def join_while_writing() -> None:
        for _ in range(4):
            await asyncio.sleep(0.05)
            joiners.append(await stored_server.connect("stream", scope="read"))

    await asyncio.gather(write(), join_while_writing())
    expected = [patch(n) for n in range(total)]
    for joiner in joiners:
        received = await _receive_count(joiner, total)
        assert received == expected


async def _receive_count(client: StoreClient, count: int, timeout: float = 20.0) -> list[bytes]:
    frames: list[bytes] = []
    async with asyncio.timeout(timeout):
        while len(frames) < count:
            frames.append(await client.receive(timeout=timeout))
    assert await client.receive_all(0.2) == []
    return frames


async def test_many_clients_joining_at_once_share_one_store(
    stored_server: RunningServer,
) -> None:
    async with stored_server.client("restart") as writer:
        for n in range(10):
            await writer.send(patch(n))
        await asyncio.sleep(0.2)
    clients = await asyncio.gather(
        *(stored_server.connect("restart", sub=f"c{i}") for i in range(30))
    )
    history = [patch(n) for n in range(10)]
    for client in clients:
        assert await _receive_count(client, 10) == history
    await clients[0].send(patch(99))
    for client in clients[1:]:
        assert await client.receive() == patch(99)
    assert len(stored_server.app[_relay_key()].stores) == 1


def _relay_key():  # type: ignore[no-untyped-def]
    from sds.appkeys import RELAY

    return RELAY


async def test_node_layout_file_is_served_in_place(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    stores = tmp_path / "node-stores"
    stores.mkdir()
    key = bytes(range(32))
    with sqlite3.connect(stores / store_filename("legacy")) as conn:
        conn.executescript(
            """
            CREATE TABLE snapshots (store_id TEXT PRIMARY KEY, data BLOB NOT NULL,
                                    clock INTEGER NOT NULL);
            CREATE TABLE patches (store_id TEXT NOT NULL, clock INTEGER NOT NULL,
                                  data BLOB NOT NULL, PRIMARY KEY (store_id, clock));
            CREATE TABLE blobs (hash TEXT PRIMARY KEY, data BLOB NOT NULL,
                                ref_count INTEGER NOT NULL DEFAULT 0);
            """
        )
        conn.execute(
            "INSERT INTO snapshots VALUES (?, ?, ?)", ("legacy", key + b"state", 1732000000000)
        )
        for clock, body in ((1732000000500, b"late"), (1732000000100, b"early")):
            conn.execute("INSERT INTO patches VALUES (?, ?, ?)", ("legacy", clock, body))
    server = await make_server(persist_dir=stores)
    joiner = await server.connect("legacy")
    assert await joiner.receive_all(0.5) == [b"\x02" + key + b"state", b"\x01early", b"\x01late"]
    writer = await server.connect("legacy")
    await writer.send(b"\x01new")
    assert await joiner.receive() == b"\x01new"
    assert stored_patches(stores / "legacy.db", "legacy")[-1] == (1732000000501, b"new")


async def test_store_file_is_locked_while_open_and_released_after_grace(
    persistent_server: RunningServer,
) -> None:
    db = db_of(persistent_server, "locked")
    client = await persistent_server.connect("locked")
    await client.send(patch(1))
    await asyncio.sleep(0.1)
    with pytest.raises(StoreBusy):
        try_lock(db, timeout=0)
    await client.close()
    grace = persistent_server.config.store_close_grace
    async with asyncio.timeout(grace + 5):
        while True:
            try:
                fd = try_lock(db, timeout=0)
            except StoreBusy:
                await asyncio.sleep(0.05)
                continue
            break
    import os

    os.close(fd)


async def test_open_store_files_are_bounded(make_server: ServerFactory) -> None:
    server = await make_server(persist=True, max_open_stores=2, store_close_grace=30.0)
    first = await server.connect("one")
    await server.connect("two")
    client = server.client("three")
    with pytest.raises(Exception) as refused:
        await client.connect()
    assert getattr(refused.value, "status", None) == 503
    await first.close()
    await asyncio.sleep(0.2)
    async with server.client("three") as third:
        await third.send(patch(1))


async def test_sync_full_sets_synchronous_full(make_server: ServerFactory) -> None:
    from sds.appkeys import STORAGE

    server = await make_server(persist=True, sync="full")
    await server.connect("fsync")
    storage = server.app[STORAGE]
    assert storage is not None
    (file,) = storage.open_files()
    async with file._db.execute("PRAGMA synchronous") as cursor:
        assert (await cursor.fetchone())[0] == 2


async def test_corrupt_store_file_is_refused_with_503_and_left_untouched(
    persistent_server: RunningServer,
) -> None:
    assert persistent_server.config.persist_dir is not None
    persistent_server.config.persist_dir.mkdir(parents=True, exist_ok=True)
    db = db_of(persistent_server, "garbled")
    garbage = b"this is not an SQLite database" * 200
    db.write_bytes(garbage)
    client = persistent_server.client("garbled")
    with pytest.raises(Exception) as refused:
        await client.connect()
    assert getattr(refused.value, "status", None) == 503
    assert db.read_bytes() == garbage
    writer = await persistent_server.connect("healthy")
    reader = await persistent_server.connect("healthy")
    await writer.send(patch(1))
    assert await reader.receive() == patch(1)
