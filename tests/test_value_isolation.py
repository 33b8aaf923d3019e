"""Store ids that share a file (``a/b``, ``a_b``, ``a.b`` -> ``a_b.db``) never share values."""

from __future__ import annotations

import asyncio
import sqlite3

from sds.backends.sqlite import store_filename
from sds.backup import row_counts
from sds.maintenance import connect_readonly, inspect_file
from sds.protocol import value_chunk_frames
from tests.conftest import RunningServer, ServerFactory
from tests.store_files import read_rows, write_store

NODE_TABLES = {
    "snapshots": "CREATE TABLE snapshots (store_id TEXT PRIMARY KEY, data BLOB NOT NULL, "
    "clock INTEGER NOT NULL)",
    "patches": "CREATE TABLE patches (store_id TEXT NOT NULL, clock INTEGER NOT NULL, "
    "data BLOB NOT NULL, PRIMARY KEY(store_id, clock))",
    "blobs": "CREATE TABLE blobs (hash TEXT PRIMARY KEY, data BLOB NOT NULL, "
    "ref_count INTEGER NOT NULL DEFAULT 0)",
}


def key(n: int) -> bytes:
    return bytes([n]) * 32


async def answer(server: RunningServer, store_id: str, k: bytes) -> list[bytes]:
    """What a read client of ``store_id`` gets back for a REQ_VALUE (alone in its store)."""
    async with server.client(store_id, scope="read", sub="reader") as reader:
        await reader.send(b"\x03" + k)
        return [f for f in await reader.receive_all(0.4) if f[0] != 0x01]  # not catch-up


async def put(server: RunningServer, store_id: str, k: bytes, value: bytes) -> None:
    async with server.client(store_id, sub="writer") as writer:
        await writer.send(b"\x02" + k + value)
        await asyncio.sleep(0.3)


async def test_stores_of_one_file_read_and_write_only_their_own_values(
    persistent_server: RunningServer,
) -> None:
    server = persistent_server
    assert {store_filename(s) for s in ("a/b", "a_b", "a.b")} == {"a_b.db"}
    await put(server, "a/b", key(1), b"from a/b")
    assert await answer(server, "a/b", key(1)) == [b"\x02" + key(1) + b"from a/b"]
    assert await answer(server, "a_b", key(1)) == []
    assert await answer(server, "a.b", key(1)) == []

    # Same key, another store of the file: its own value, the first one untouched.
    await put(server, "a.b", key(1), b"from a.b")
    assert await answer(server, "a.b", key(1)) == [b"\x02" + key(1) + b"from a.b"]
    assert await answer(server, "a/b", key(1)) == [b"\x02" + key(1) + b"from a/b"]
    assert await answer(server, "a_b", key(1)) == []

    # Overwrites stay within the store.
    await put(server, "a/b", key(1), b"a/b again")
    await put(server, "a.b", key(1), b"a.b again")
    assert await answer(server, "a/b", key(1)) == [b"\x02" + key(1) + b"a/b again"]
    assert await answer(server, "a.b", key(1)) == [b"\x02" + key(1) + b"a.b again"]
    assert await answer(server, "a_b", key(1)) == []

    # A large value of the second store travels in chunks from its own table.
    large = bytes(range(256)) * 9000
    async with server.client("a_b", sub="writer") as writer:
        for frame in value_chunk_frames(key(1).hex(), large):
            await writer.send(frame)
        await asyncio.sleep(0.4)
    frames = await answer(server, "a_b", key(1))
    assert frames == value_chunk_frames(key(1).hex(), large)
    assert await answer(server, "a/b", key(1)) == [b"\x02" + key(1) + b"a/b again"]

    # The Node tables keep their exact layout; the first writer's value is in blobs.
    assert server.config.persist_dir is not None
    db = server.config.persist_dir / "a_b.db"
    node = sqlite3.connect(":memory:")
    for table, sql in NODE_TABLES.items():
        node.execute(sql)
        expected = node.execute(f"PRAGMA table_info({table})").fetchall()
        assert read_rows(db, f"PRAGMA table_info({table})") == expected
    node.close()
    assert read_rows(db, "SELECT hash, data FROM blobs") == [(key(1).hex(), b"a/b again")]

    # Inspection and backup manifests count every store's values.
    report = inspect_file(db)
    figures = {f.store_id: (f.blobs, f.blob_bytes) for f in report.stores}
    assert figures == {"a.b": (1, 9), "a/b": (1, 9), "a_b": (1, len(large))}
    assert (report.blobs, report.blob_bytes, report.unowned_blobs) == (3, 18 + len(large), 0)
    conn = connect_readonly(db)
    try:
        counts = row_counts(conn)
    finally:
        conn.close()
    assert counts == {"snapshots": 0, "patches": 0, "blobs": 1, "blob_owners": 1, "store_blobs": 2}


async def test_ownerless_value_of_a_node_file_is_answered_to_every_store_of_the_file(
    make_server: ServerFactory,
) -> None:
    server = await make_server(persist=True)
    assert server.config.persist_dir is not None
    server.config.persist_dir.mkdir(parents=True, exist_ok=True)
    db = server.config.persist_dir / "n_x.db"
    conn = sqlite3.connect(db)
    for sql in NODE_TABLES.values():
        conn.execute(sql)
    conn.commit()
    conn.close()
    write_store(db, "n/x", [b"p1"], blobs={key(2).hex(): b"node value"})

    assert await answer(server, "n/x", key(2)) == [b"\x02" + key(2) + b"node value"]
    assert await answer(server, "n_x", key(2)) == [b"\x02" + key(2) + b"node value"]

    # Writing that key keeps the Node row for the others.
    await put(server, "n/x", key(2), b"mine")
    assert await answer(server, "n/x", key(2)) == [b"\x02" + key(2) + b"mine"]
    assert await answer(server, "n_x", key(2)) == [b"\x02" + key(2) + b"node value"]
    assert read_rows(db, "SELECT data FROM blobs") == [(b"node value",)]
    report = inspect_file(db)
    assert (report.blobs, report.unowned_blobs) == (2, 1)
    assert {f.store_id: f.blobs for f in report.stores} == {"n/x": 1}
