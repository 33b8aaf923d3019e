"""Several servers on one PostgreSQL (standing in for several machines) never split a store.

Each server has its own working directory and shares nothing but the database;
ownership is a lease row plus an advisory lock per store (--database-ownership, the
default with --database-url).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from sds.client import StoreClient
from tests.conftest import ServerFactory, start_pg_cluster
from tests.helpers import TEST_SECRET, ServerProcess, clean_env, run_sds, spawn_server
from tests.test_ownership import (
    assert_every_frame_exchanged,
    eventually,
    frame,
    hand_over_to_the_forwarder,
    kill_the_owner_mid_stream,
    metric,
    sigterm_the_owner,
)

pytestmark = pytest.mark.slow


@contextmanager
def pg_servers(tmp_path: Path, database_url: str, count: int) -> Iterator[list[ServerProcess]]:
    # The URL (with its password) in the environment, never on a command line.
    env = clean_env(secret=TEST_SECRET, SDS_DATABASE_URL=database_url)
    with ExitStack() as stack:
        servers = []
        for i in range(count):
            home = tmp_path / f"machine{i}"
            home.mkdir()
            servers.append(
                stack.enter_context(spawn_server(["--handover-grace", "0.5"], env=env, cwd=home))
            )
        yield servers


async def owner_of(database_url: str, store_id: str) -> tuple[Any, ...] | None:
    """(instance, url, epoch) of a store's lease row."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT instance, url, epoch FROM sds_owners WHERE lock_key = $1", "ws:" + store_id
        )
    finally:
        await conn.close()
    return None if row is None else tuple(row)


async def test_servers_sharing_a_database_never_split_a_store(
    tmp_path: Path, database_url: str
) -> None:
    with pg_servers(tmp_path, database_url, 3) as servers:
        await assert_every_frame_exchanged(servers, "shared")
        forwarded = [metric(s, "sds_forwarded_connections_opened_total") for s in servers]
        assert sorted(forwarded) == [0.0, 2.0, 2.0]
        joiner = StoreClient(servers[2].ws_url, "shared", servers[2].token("shared"))
        async with joiner:
            history = await joiner.receive_all(window=1.0)
            # sds cluster status reads the owners from the database.
            env = clean_env(SDS_DATABASE_URL=database_url)
            result = await asyncio.to_thread(run_sds, "cluster", "status", "--json", env=env)
        assert len(history) == 600
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert sorted(p["url"] for p in status["processes"]) == sorted(s.http_url for s in servers)
        owning = [p for p in status["processes"] if p["stores"]]
        assert [[s["store"] for s in p["stores"]] for p in owning] == [["shared"]]
        assert "password" not in result.stdout and database_url not in result.stdout


async def test_owner_killed_mid_stream_loses_nothing_and_the_next_owner_gets_a_new_epoch(
    tmp_path: Path, database_url: str
) -> None:
    with pg_servers(tmp_path, database_url, 2) as (owner, other):
        writer = StoreClient(owner.ws_url, "crash", owner.token("crash", sub="w"))
        await writer.connect()
        reader = StoreClient(other.ws_url, "crash", other.token("crash", sub="r"))
        await reader.connect()
        first = await owner_of(database_url, "crash")
        assert first is not None and first[1] == owner.http_url
        seen = await kill_the_owner_mid_stream(owner, writer, reader, after=500)

        joiner = StoreClient(other.ws_url, "crash", other.token("crash", sub="j"))
        async with joiner:
            history = await joiner.receive_all(window=1.0)
            second = await owner_of(database_url, "crash")
        assert history[: len(seen)] == seen
        assert history == [frame(0, n) for n in range(len(history))]
        assert second is not None and second[1] == other.http_url and second[2] > first[2]


async def test_store_with_only_forwarded_clients_moves_to_their_server(
    tmp_path: Path, database_url: str
) -> None:
    with pg_servers(tmp_path, database_url, 2) as (first, second):
        await hand_over_to_the_forwarder(first, second, "doc")
        async with StoreClient(second.ws_url, "doc", second.token("doc")) as again:
            assert await again.receive(timeout=10) == frame(0, 0)
            row = await owner_of(database_url, "doc")
            assert row is not None and row[1] == second.http_url
            assert metric(second, "sds_forwarded_connections") == 0


async def test_sigterm_hands_stores_over_with_one_reconnect(
    tmp_path: Path, database_url: str
) -> None:
    with pg_servers(tmp_path, database_url, 2) as (owner, other):
        assert await sigterm_the_owner(owner, other, "roll") == [1001, 1001]
        async with StoreClient(other.ws_url, "roll", other.token("roll")) as again:
            assert await again.receive_all(window=1.0) == [frame(0, n) for n in range(50)]
        assert owner.wait(15) == 0


async def test_server_cut_off_from_the_database_stops_serving_and_takes_nothing_back(
    tmp_path: Path, database_url: str
) -> None:
    with pg_servers(tmp_path, database_url, 2) as (cut, other):
        client = StoreClient(cut.ws_url, "part", cut.token("part", sub="c"))
        await client.connect()
        await client.send(frame(0, 0))
        await asyncio.sleep(0.3)
        before = await owner_of(database_url, "part")
        assert before is not None and before[1] == cut.http_url
        # Cut the connection that holds its locks (as a partition would).
        conn = await asyncpg.connect(database_url)
        try:
            terminated = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = $1",
                f"sds-ownership pid {cut.pid}",
            )
        finally:
            await conn.close()
        assert terminated == 1
        assert await client.wait_closed(timeout=15) == 1012
        await client.close()
        await eventually(cut, "sds_ownership_changes_total", '{reason="lost"}', 1)
        assert "lost the ownership" in cut.stderr
        # The store is served by the other server now; the cut-off one, back on the
        # database, forwards to it instead of taking it back.
        async with StoreClient(other.ws_url, "part", other.token("part")) as there:
            assert await there.receive(timeout=10) == frame(0, 0)
            after = await owner_of(database_url, "part")
            assert after is not None and after[1] == other.http_url and after[2] > before[2]
            async with asyncio.timeout(15):
                while True:
                    try:
                        async with StoreClient(cut.ws_url, "part", cut.token("part")) as back:
                            assert await back.receive(timeout=10) == frame(0, 0)
                            await back.send(frame(1, 0))
                            assert await there.receive(timeout=10) == frame(1, 0)
                        break
                    except aiohttp.WSServerHandshakeError:
                        await asyncio.sleep(0.5)  # still reconnecting to the database
            assert metric(cut, "sds_forwarded_connections_opened_total") >= 1


@asynccontextmanager
async def fenced_store_log(database_url: str, store_id: str) -> AsyncIterator[Any]:
    """A store opened by storage whose commits are fenced on a lease this test took."""
    from sds.backends.postgres import PgStorage
    from sds.backends.sqlite import LockRecord
    from sds.metrics import Metrics
    from sds.pg_ownership import PgLocks

    storage = PgStorage(database_url, metrics=Metrics())
    await storage.start()
    locks = PgLocks(database_url)
    await locks.start()
    try:
        record = LockRecord(pid=1, instance="0123456789abcdef", url="http://127.0.0.1:9")
        lease, _previous = await locks.take(("ws", store_id), record, 1.0)
        storage.fence = lambda _store_id: locks.fence(lease)
        store_log = await storage.acquire(store_id)
        try:
            yield store_log
        finally:
            storage.release(store_log)
    finally:
        locks.close()
        await storage.close()


async def take_over(conn: Any, store_id: str) -> None:
    """What another server's takeover does to the lease row: its instance, a newer epoch."""
    await conn.execute(
        "UPDATE sds_owners SET epoch = epoch + 1, instance = 'fedcba9876543210'"
        " WHERE lock_key = 'ws:' || $1",
        store_id,
    )


async def test_a_commit_after_another_server_took_the_store_is_refused(database_url: str) -> None:
    async with fenced_store_log(database_url, "fenced") as store_log:
        first = store_log.append_patch(b"\x01first")
        await first.done
        assert first.ok is True
        conn = await asyncpg.connect(database_url)
        try:
            await take_over(conn, "fenced")
            late = store_log.append_patch(b"\x01late")
            await late.done
            assert late.ok is False
            stored = await conn.fetch("SELECT data FROM patches WHERE store_id = 'fenced'")
            assert [bytes(row["data"]) for row in stored] == [b"first"]
        finally:
            await conn.close()


async def test_a_value_commit_after_another_server_took_the_store_writes_nothing(
    database_url: str,
) -> None:
    async with fenced_store_log(database_url, "fenced-value") as store_log:
        store_log.append_patch(b"\x01before")
        first = store_log.put_blob("a" * 64, b"first value")
        await first.done
        assert first.ok is True
        conn = await asyncpg.connect(database_url)
        try:
            await take_over(conn, "fenced-value")
            store_log.append_patch(b"\x01late")
            late = store_log.put_blob("b" * 64, b"late value")
            overwrite = store_log.put_blob("a" * 64, b"overwritten")
            await late.done
            assert late.ok is False and overwrite.ok is False
            patches = await conn.fetch(
                "SELECT data FROM patches WHERE store_id = 'fenced-value' ORDER BY clock"
            )
            assert [bytes(row["data"]) for row in patches] == [b"before"]
            blobs = await conn.fetch("SELECT hash, data FROM blobs WHERE store_id = 'fenced-value'")
            assert [(row["hash"], bytes(row["data"])) for row in blobs] == [
                ("a" * 64, b"first value")
            ]
        finally:
            await conn.close()


async def test_database_outage_ends_the_ownership_and_serving_resumes_with_nothing_lost(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    cluster = start_pg_cluster()
    try:
        url = cluster.url(cluster.create_database())
        server = await make_server(database_url=url)
        writer = await server.connect("outage", sub="writer")
        reader = await server.connect("outage", scope="read", sub="reader")
        for n in range(20):
            await writer.send(frame(0, n))
        assert [await reader.receive() for _ in range(20)] == [frame(0, n) for n in range(20)]
        await asyncio.to_thread(cluster.stop, "immediate")
        # Cut off from the database: no store is served without storage or ownership.
        assert await reader.wait_closed(timeout=15) in (1011, 1012)
        assert await writer.wait_closed(timeout=15) in (1011, 1012)
        await asyncio.to_thread(cluster.start)
        async with asyncio.timeout(30):
            while True:
                try:
                    again = await server.connect("outage", sub="writer-2")
                    break
                except aiohttp.WSServerHandshakeError:
                    await asyncio.sleep(0.2)
        history = await again.receive_all(window=1.0)
        assert history == [frame(0, n) for n in range(20)]
    finally:
        cluster.destroy()
