"""PostgreSQL storage: SPEC 4's guarantees on a real PostgreSQL 15, through real clients."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from sds.backends.postgres import PgStorage
from sds.client import StoreClient
from sds.config import Config, ConfigError, load_config, redacted_url
from sds.metrics import Metrics
from sds.protocol import value_chunk_frames
from tests.conftest import RunningServer, ServerFactory, start_pg_cluster
from tests.helpers import (
    TEST_SECRET,
    clean_env,
    one_error_line,
    run_sds,
    spawn_server,
    upgrade_request,
)
from tests.pg_cluster import PgCluster


def patch(n: int, size: int = 16) -> bytes:
    return b"\x01" + n.to_bytes(4, "big") + b"p" * size


def key(n: int) -> bytes:
    return bytes([n]) * 32


async def rows(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of a query, read by a connection of the test's own."""
    conn = await asyncpg.connect(url)
    try:
        return [tuple(record) for record in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def stored_patches(url: str, store_id: str) -> list[tuple[int, bytes]]:
    return [
        (int(clock), bytes(data))
        for clock, data in await rows(
            url, "SELECT clock, data FROM patches WHERE store_id = $1 ORDER BY clock", store_id
        )
    ]


async def receive_count(client: StoreClient, count: int, timeout: float = 20.0) -> list[bytes]:
    frames: list[bytes] = []
    async with asyncio.timeout(timeout):
        while len(frames) < count:
            frames.append(await client.receive(timeout=timeout))
    return frames


async def until_live(writer: StoreClient, reader: StoreClient) -> None:
    """Return once ``reader``'s catch-up is over: it receives a presence frame sent now."""
    await writer.send(b"\x04live")
    assert await reader.receive() == b"\x04live"


@pytest.fixture
async def pg_server(make_server: ServerFactory, database_url: str) -> RunningServer:
    return await make_server(database_url=database_url, store_close_grace=0.2)


async def test_patch_is_in_the_database_before_any_peer_sees_it(
    pg_server: RunningServer, database_url: str
) -> None:
    writer = await pg_server.connect("durable")
    reader = await pg_server.connect("durable")
    for n in range(30):
        await writer.send(patch(n))
        assert await reader.receive() == patch(n)
        assert (await stored_patches(database_url, "durable"))[-1] == (n + 1, patch(n)[1:])


async def test_schema_is_created_once_with_its_version(
    make_server: ServerFactory, database_url: str
) -> None:
    servers = await asyncio.gather(*(make_server(database_url=database_url) for _ in range(3)))
    assert len(servers) == 3
    tables = {
        name
        for (name,) in await rows(
            database_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
    }
    assert tables == {
        "snapshots",
        "patches",
        "blobs",
        "sds_schema_version",
        "sds_owners",
        "sds_servers",
    }
    assert await rows(database_url, "SELECT version FROM sds_schema_version") == [(1,)]


async def test_concurrent_writers_get_gap_free_clocks_in_relay_order(
    pg_server: RunningServer, database_url: str
) -> None:
    writers = [await pg_server.connect("busy", sub=f"w{i}") for i in range(4)]
    reader = await pg_server.connect("busy", scope="read", sub="r")
    sent = {i: [b"\x01" + bytes([i]) + n.to_bytes(4, "big") for n in range(400)] for i in range(4)}

    async def send_all(client: StoreClient, frames: list[bytes]) -> None:
        for n, frame in enumerate(frames):
            await client.send(frame)
            if n % 25 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(*(send_all(w, sent[i]) for i, w in enumerate(writers)))
    received = await receive_count(reader, 1600)
    for i in range(4):
        assert [f for f in received if f[1] == i] == sent[i]
    stored = await stored_patches(database_url, "busy")
    assert [clock for clock, _ in stored] == list(range(1, 1601))
    assert [b"\x01" + data for _, data in stored] == received


async def test_catch_up_pages_are_bounded_in_bytes_and_seamless(
    pg_server: RunningServer,
) -> None:
    from sds.appkeys import STORAGE

    storage: Any = pg_server.app[STORAGE]
    frames = [patch(n, size=300) for n in range(40)]
    witness = await pg_server.connect("paged", scope="read")
    async with pg_server.client("paged") as writer:
        for frame in frames:
            await writer.send(frame)
        assert await receive_count(witness, 40) == frames  # relayed, so committed
    reserved: list[int] = []

    async def reserve(size: int) -> None:
        reserved.append(size)

    store_log = await storage.acquire("paged")
    try:
        history = store_log.history(40, page_bytes=1000, reserve=reserve)
        pages = [page async for page in history]
    finally:
        storage.release(store_log)
    assert [prefix + bytes(data) for page in pages for prefix, data in page] == frames
    # Each page was reserved before it was read, at its size, within the page bound.
    assert reserved == [sum(len(data) for _, data in page) for page in pages]
    assert all(size <= 1000 for size in reserved)
    assert len(pages) >= 10
    joiner = await pg_server.connect("paged", scope="read")
    assert await receive_count(joiner, 40) == frames


async def test_values_are_stored_per_store_and_answer_req_value(
    pg_server: RunningServer, database_url: str
) -> None:
    writer = await pg_server.connect("vals", sub="writer")
    await writer.send(b"\x02" + key(1) + b"hello value")
    big = bytes(range(256)) * (5 * 1024) + b"tail"  # more than one chunk
    frames = value_chunk_frames(key(2).hex(), big)
    assert len(frames) == 2
    for frame in frames:
        await writer.send(frame)
    async with asyncio.timeout(10):
        while len(await rows(database_url, "SELECT hash FROM blobs")) < 2:
            await asyncio.sleep(0.05)
    stored = await rows(database_url, "SELECT store_id, hash, data FROM blobs ORDER BY hash")
    assert stored == [("vals", key(1).hex(), b"hello value"), ("vals", key(2).hex(), big)]

    requester = await pg_server.connect("vals", scope="read", sub="req")
    await requester.send(b"\x03" + key(1))
    assert await requester.receive() == b"\x02" + key(1) + b"hello value"
    await requester.send(b"\x03" + key(2))
    assert [await requester.receive() for _ in frames] == frames
    # Another store of the same database does not see this store's values.
    stranger = await pg_server.connect("other-store", scope="read")
    await stranger.send(b"\x03" + key(1))
    assert await stranger.receive_all(0.4) == []


async def test_a_value_is_read_in_pieces_and_an_overwrite_stops_the_reading(
    pg_server: RunningServer,
) -> None:
    from sds.appkeys import OWNERSHIP, STORAGE
    from sds.backends.base import BlobChanged

    storage: Any = pg_server.app[STORAGE]
    value = bytes(range(256)) * 64
    ownership = pg_server.app[OWNERSHIP]
    if ownership is not None:  # commits of a store need its ownership
        await ownership.claim(("ws", "pieces"))
    store_log = await storage.acquire("pieces")
    try:
        commit = store_log.put_blob(key(7).hex(), value)
        await commit.done
        assert commit.ok
        async with store_log.open_blob(key(7).hex()) as reader:
            assert reader.size == len(value)
            assert await store_log.read_blob_piece(reader, 1000, 500) == value[1000:1500]
            assert await store_log.read_blob_piece(reader, 0, 10) == value[:10]
            overwrite = store_log.put_blob(key(7).hex(), b"x" * len(value))
            await overwrite.done
            with pytest.raises(BlobChanged):
                await store_log.read_blob_piece(reader, 1500, 500)
        async with store_log.open_blob(key(8).hex()) as missing:
            assert missing is None
    finally:
        storage.release(store_log)


async def test_snapshot_mode_replaces_the_snapshot_and_prunes_older_patches(
    make_server: ServerFactory, database_url: str
) -> None:
    server = await make_server(database_url=database_url, value_mode="snapshot")
    writer = await server.connect("snap")
    reader = await server.connect("snap", scope="read")
    await until_live(writer, reader)
    for n in range(3):
        await writer.send(patch(n))
    await writer.send(b"\x02" + key(7) + b"state one")
    await writer.send(patch(3))
    await writer.send(b"\x02" + key(8) + b"state two")
    await writer.send(patch(4))
    assert len(await receive_count(reader, 7)) == 7
    await asyncio.sleep(0.2)
    assert await rows(database_url, "SELECT store_id, data, clock FROM snapshots") == [
        ("snap", key(8) + b"state two", 4)
    ]
    assert await stored_patches(database_url, "snap") == [(5, patch(4)[1:])]
    assert await rows(database_url, "SELECT count(*) FROM blobs") == [(0,)]
    joiner = await server.connect("snap", scope="read")
    assert await joiner.receive_all(0.5) == [b"\x02" + key(8) + b"state two", patch(4)]
    await writer.send(patch(5))
    assert await joiner.receive() == patch(5)
    assert (await stored_patches(database_url, "snap"))[-1] == (6, patch(5)[1:])


async def test_snapshot_within_one_group_commit_supersedes_the_patches_before_it(
    make_server: ServerFactory, database_url: str
) -> None:
    server = await make_server(database_url=database_url, value_mode="snapshot")
    writer = await server.connect("group")
    reader = await server.connect("group", scope="read")
    await until_live(writer, reader)  # a reader still catching up reads the snapshot instead
    burst = [patch(0), patch(1), b"\x02" + key(3) + b"after two", patch(2)]
    for frame in burst:
        await writer.send(frame)  # sent back to back: usually one group commit
    assert await receive_count(reader, 4) == burst
    assert await rows(database_url, "SELECT clock FROM snapshots") == [(2,)]
    assert await stored_patches(database_url, "group") == [(3, patch(2)[1:])]


async def test_blob_mode_keeps_values_apart_from_the_snapshot(
    pg_server: RunningServer, database_url: str
) -> None:
    writer = await pg_server.connect("blobmode")
    witness = await pg_server.connect("blobmode", scope="read")
    await writer.send(patch(1))
    await writer.send(b"\x02" + key(4) + b"v")
    assert await receive_count(witness, 2) == [patch(1), b"\x02" + key(4) + b"v"]
    assert await rows(database_url, "SELECT count(*) FROM snapshots") == [(0,)]
    assert await stored_patches(database_url, "blobmode") == [(1, patch(1)[1:])]


async def test_late_joiner_after_a_restart_gets_everything(
    make_server: ServerFactory, database_url: str
) -> None:
    first = await make_server(database_url=database_url)
    async with first.client("restart") as writer:
        for n in range(50):
            await writer.send(patch(n))
        await writer.send(b"\x02" + key(5) + b"kept value")
        await asyncio.sleep(0.3)
    await first.server.close()

    second = await make_server(database_url=database_url)
    joiner = await second.connect("restart", scope="read")
    assert await joiner.receive_all(0.5) == [patch(n) for n in range(50)]
    await joiner.send(b"\x03" + key(5))
    assert await joiner.receive() == b"\x02" + key(5) + b"kept value"
    writer = await second.connect("restart")
    await writer.send(patch(50))
    assert await joiner.receive() == patch(50)
    assert (await stored_patches(database_url, "restart"))[-1] == (51, patch(50)[1:])


def test_unreachable_database_exits_2_with_one_line_without_the_password() -> None:
    from tests.helpers import free_port

    port = free_port()
    url = f"postgresql://sds:very-secret-pw@127.0.0.1:{port}/stores"
    result = run_sds(
        "serve", "--port", "0", env=clean_env(secret=TEST_SECRET, SDS_DATABASE_URL=url)
    )
    assert result.returncode == 2
    line = one_error_line(result)
    assert line.startswith(f"sds: cannot connect to PostgreSQL at 127.0.0.1:{port}/stores: ")
    assert "very-secret-pw" not in result.stderr + result.stdout


def test_refused_login_exits_2_with_one_line_without_the_password(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    url_file = tmp_path / "database-url"
    url_file.write_text(pg_cluster.url("postgres", password="wrong-password-xyz") + "\n")
    result = run_sds(
        "serve",
        "--port",
        "0",
        "--database-url-file",
        str(url_file),
        env=clean_env(secret=TEST_SECRET),
    )
    assert result.returncode == 2
    line = one_error_line(result)
    assert line.startswith("sds: cannot connect to PostgreSQL at ")
    assert "password authentication failed" in line
    assert f"{pg_cluster.host}:{pg_cluster.port}/postgres" in line
    assert "wrong-password-xyz" not in result.stderr + result.stdout


def test_persist_dir_and_database_url_together_exit_2(tmp_path: Path) -> None:
    result = run_sds(
        "serve",
        "--persist-dir",
        str(tmp_path / "stores"),
        "--database-url",
        "postgresql://u:pw-not-shown@127.0.0.1:1/db",
    )
    assert result.returncode == 2
    assert "exclude each other" in one_error_line(result)
    assert "pw-not-shown" not in result.stderr
    assert not (tmp_path / "stores").exists()


def test_database_url_file_is_read_and_the_password_stays_out_of_repr(tmp_path: Path) -> None:
    url_file = tmp_path / "url"
    url_file.write_text("postgresql://app:s3cr3t-pw@db.internal:5433/sds?sslmode=require\n")
    config = load_config(
        {"database_url_file": str(url_file)}, {}, secret="x" * 40, require_secret=True
    )
    assert config.database_url == "postgresql://app:s3cr3t-pw@db.internal:5433/sds?sslmode=require"
    assert "s3cr3t-pw" not in repr(config)
    assert redacted_url(config.database_url) == (
        "postgresql://app:***@db.internal:5433/sds?sslmode=require"
    )
    assert redacted_url("postgresql://h/db?password=pw&user=u") == (
        "postgresql://h/db?password=***&user=u"
    )
    with pytest.raises(ConfigError, match="not both"):
        load_config(
            {"database_url_file": str(url_file), "database_url": "postgresql://h/db"},
            {},
            secret="x" * 40,
        )
    with pytest.raises(ConfigError, match="postgresql://"):
        Config(jwt_secret="x" * 40, database_url="mysql://u:pw@h/db").validate()


@pytest.fixture
def own_cluster() -> Iterator[PgCluster]:
    """A cluster of this test alone: it is stopped and started again mid-test."""
    cluster = start_pg_cluster()
    yield cluster
    cluster.destroy()


async def healthz(server: RunningServer) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.http_url}/healthz") as response,
    ):
        return response.status, await response.json()


async def test_database_going_away_fails_writes_cleanly_and_serving_resumes_by_itself(
    make_server: ServerFactory, own_cluster: PgCluster, caplog: pytest.LogCaptureFixture
) -> None:
    name = own_cluster.create_database()
    # The storage side alone: with ownership in the database, an outage also ends
    # the ownership and every client is closed with 1012 (tests/test_ownership_postgres.py).
    server = await make_server(database_url=own_cluster.url(name), database_ownership=False)
    writer = await server.connect("outage", sub="writer")
    reader = await server.connect("outage", scope="read", sub="reader")
    for n in range(20):
        await writer.send(patch(n))
    assert await receive_count(reader, 20) == [patch(n) for n in range(20)]
    assert (await healthz(server))[0] == 200

    await asyncio.to_thread(own_cluster.stop, "immediate")
    with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
        for n in range(20, 40):
            await writer.send(patch(n))
    assert await writer.wait_closed(timeout=30) == 1011
    assert await reader.receive_all(0.3) == []
    status, body = await healthz(server)
    assert status == 503
    assert any("storage write failed" in problem for problem in body["problems"])
    assert any("storage write failed" in r.getMessage() for r in caplog.records)
    assert all(own_cluster.password not in r.getMessage() for r in caplog.records)
    assert own_cluster.password not in str(body)

    await asyncio.sleep(1.5)  # the outage goes on: still no traceback in the log
    assert not [r.getMessage() for r in caplog.records if r.exc_info]
    # A new store cannot be opened meanwhile: 503 before the upgrade, without
    # naming the database to the client.
    status, refusal, _ = await upgrade_request(
        f"{server.ws_url}/ws/another?token={server.token('another')}"
    )
    assert status == 503
    assert str(own_cluster.port) not in str(refusal)
    assert "database is unavailable" in str(refusal)

    await asyncio.to_thread(own_cluster.start)
    async with asyncio.timeout(30):
        while (await healthz(server))[0] != 200:
            await asyncio.sleep(0.1)
    again = await server.connect("outage", sub="writer-2")
    await again.send(patch(99))
    assert await reader.receive() == patch(99)
    stored = await stored_patches(own_cluster.url(name), "outage")
    assert [clock for clock, _ in stored] == list(range(1, 22))
    assert stored[-1] == (21, patch(99)[1:])


async def test_back_to_back_patches_share_group_commits(
    pg_server: RunningServer, database_url: str
) -> None:
    from sds.appkeys import METRICS

    metrics = pg_server.app[METRICS]
    writer = await pg_server.connect("grouped")
    reader = await pg_server.connect("grouped", scope="read")
    frames = [patch(n) for n in range(2000)]
    before = metrics.commits
    for frame in frames:
        await writer.send(frame)
    assert await receive_count(reader, len(frames)) == frames
    commits = metrics.commits - before
    # Each commit is one statement; frames read while one runs form the next one.
    assert commits < len(frames) // 4, commits
    assert [c for c, _ in await stored_patches(database_url, "grouped")] == list(range(1, 2001))


async def test_a_group_commit_is_one_round_trip_and_releasing_sends_nothing(
    pg_server: RunningServer, database_url: str
) -> None:
    writer = await pg_server.connect("one-trip")
    reader = await pg_server.connect("one-trip", scope="read")
    for n in range(5):
        await writer.send(patch(n))
        assert await reader.receive() == patch(n)
    # What each of the server's connections ran last: a release that reset the session
    # (asyncpg's default) would be one more statement, and round trip, per commit.
    last = [
        query
        for (query,) in await rows(
            database_url,
            "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
        )
    ]
    assert any("INSERT INTO patches" in query for query in last), last
    assert not any("RESET ALL" in query or "unlock_all" in query for query in last), last


async def test_a_database_on_the_same_machine_is_reached_through_its_unix_socket(
    make_server: ServerFactory, pg_cluster: PgCluster
) -> None:
    name = pg_cluster.create_database()
    url = pg_cluster.socket_url(name)
    try:
        server = await make_server(database_url=url)
        writer = await server.connect("local")
        reader = await server.connect("local")
        await writer.send(patch(1))
        assert await reader.receive() == patch(1)
        assert await stored_patches(url, "local") == [(1, patch(1)[1:])]
        connected = await rows(
            url,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND client_port = -1",
        )
        assert connected[0][0] >= 1  # the server's connections came through the socket
    finally:
        pg_cluster.finished.append(name)


async def test_a_connection_released_inside_a_transaction_is_rolled_back(
    database_url: str,
) -> None:
    storage = PgStorage(database_url, pool_size=1, metrics=Metrics())
    await storage.start()
    try:
        async with storage.connection() as conn:
            await conn.execute("BEGIN")
            await conn.execute("CREATE TABLE left_open (n int)")
        async with storage.connection() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('left_open')") is None
    finally:
        await storage.close()


async def test_a_second_server_writing_the_same_store_never_duplicates_a_clock(
    make_server: ServerFactory, database_url: str
) -> None:
    """Two servers on one store: a clock collision fails that commit (1011), nothing is lost silently.

    The safety net under ownership: with --database-ownership off nothing keeps two
    servers from writing one store, and still no clock is taken twice.
    """
    one = await make_server(database_url=database_url, database_ownership=False)
    two = await make_server(database_url=database_url, database_ownership=False)
    first = await one.connect("shared", sub="one")
    reader_one = await one.connect("shared", scope="read", sub="r1")
    await first.send(patch(1))  # clock 1; server one now counts from 1
    assert await reader_one.receive() == patch(1)
    second = await two.connect("shared", sub="two")
    reader_two = await two.connect("shared", scope="read", sub="r2")
    await second.send(patch(2))  # server two reads clock 1 and commits clock 2
    assert await receive_count(reader_two, 2) == [patch(1), patch(2)]  # catch-up, live
    await first.send(patch(3))  # server one also takes clock 2: that commit fails
    assert await first.wait_closed(timeout=10) == 1011
    assert await reader_one.receive_all(0.3) == []
    again = await one.connect("shared", sub="one-again")  # the clock is read again
    await again.send(patch(4))
    assert await reader_one.receive() == patch(4)
    stored = await stored_patches(database_url, "shared")
    assert stored == [(1, patch(1)[1:]), (2, patch(2)[1:]), (3, patch(4)[1:])]


async def test_a_database_with_a_newer_schema_is_refused_at_start_up(
    make_server: ServerFactory, database_url: str
) -> None:
    from sds.backends.base import StorageError

    first = await make_server(database_url=database_url)
    await first.server.close()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO sds_schema_version (version) VALUES (2)")
    finally:
        await conn.close()
    with pytest.raises(StorageError, match="schema version 2"):
        await make_server(database_url=database_url)


def test_pool_size_must_be_positive() -> None:
    result = run_sds(
        "serve",
        "--database-url",
        "postgresql://u:pw-not-shown@127.0.0.1:1/db",
        "--database-pool-size",
        "0",
    )
    assert result.returncode == 2
    assert "database-pool-size must be greater than 0" in one_error_line(result)
    assert "pw-not-shown" not in result.stderr


@pytest.mark.slow
async def test_sigterm_commits_what_was_queued_and_exits_0(
    database_url: str, tmp_path: Path
) -> None:
    env = clean_env(secret=TEST_SECRET, SDS_DATABASE_URL=database_url)
    with spawn_server(env=env, cwd=tmp_path) as server:
        status, body = server.healthz()
        assert (status, body["storage"], body["persistence"]) == (200, "postgresql", True)
        writer = StoreClient(server.ws_url, "flush", server.token("flush", sub="writer"))
        reader = StoreClient(server.ws_url, "flush", server.token("flush", sub="reader"))
        await writer.connect()
        await reader.connect()
        try:
            sent = [patch(n) for n in range(500)]
            for frame in sent:
                await writer.send(frame)
            received = [await reader.receive(timeout=10) for _ in sent]
            code = await asyncio.to_thread(server.stop, signal.SIGTERM)
        finally:
            await writer.close()
            await reader.close()
    assert received == sent
    assert code == 0
    assert [b"\x01" + data for _, data in await stored_patches(database_url, "flush")] == sent
    assert database_url.split("@")[0].rsplit(":", 1)[1] not in server.stdout + server.stderr


def test_a_role_that_cannot_create_the_schema_exits_2_naming_the_problem(
    pg_cluster: PgCluster, database_url: str
) -> None:
    database = database_url.rsplit("/", 1)[1]
    role = "r_" + database[2:]
    pg_cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'no-ddl-pw-123'")
    try:
        url = database_url.replace("sds:", f"{role}:", 1).replace(
            f":{pg_cluster.password}@", ":no-ddl-pw-123@"
        )
        result = run_sds(
            "serve", "--port", "0", env=clean_env(secret=TEST_SECRET, SDS_DATABASE_URL=url)
        )
        assert result.returncode == 2
        line = one_error_line(result)
        assert line.startswith("sds: cannot create the schema in PostgreSQL at ")
        assert "permission denied for schema public" in line
        assert "no-ddl-pw-123" not in result.stderr + result.stdout
    finally:
        pg_cluster.psql(f"DROP ROLE {role}")


@pytest.mark.slow
async def test_dev_server_with_a_database_url_keeps_the_stores_in_postgresql(
    database_url: str, tmp_path: Path
) -> None:
    env = clean_env(SDS_DATABASE_URL=database_url)
    with spawn_server(["--dev"], env=env, cwd=tmp_path, log_dir=tmp_path / "logs") as server:
        assert "in PostgreSQL (persistence on)" in server.stdout
        token = next(
            line.split()[-1] for line in server.stdout.splitlines() if "write token:" in line
        )
        async with StoreClient(server.ws_url, "demo", token) as writer:
            await writer.send(patch(1))
            async with asyncio.timeout(10):
                while not await stored_patches(database_url, "demo"):
                    await asyncio.sleep(0.05)
    assert not (tmp_path / "sds-data" / "demo.db").exists()
    assert await stored_patches(database_url, "demo") == [(1, patch(1)[1:])]
