"""POST /api/stores/{id}/compact, and `sds store compact` through a running server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from pathlib import Path

import aiohttp
import pytest

from sds.admin_api import MAINTENANCE_THREADS
from sds.appkeys import MAINTENANCE
from sds.backends.sqlite import try_lock
from sds.client import StoreClient
from sds.maintenance import distinct_in_order
from tests.conftest import SECRET, RunningServer, ServerFactory
from tests.helpers import (
    TEST_SECRET,
    clean_env,
    one_error_line,
    run_sds_async,
    spawn_server,
    streaming_writer,
)
from tests.store_files import db_digests, write_store


async def _post(
    server: RunningServer, store_id: str, token: str | None, **kw: object
) -> aiohttp.ClientResponse:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{server.http_url}/api/stores/{store_id}/compact", headers=headers, **kw
        )
        await response.read()
        return response


async def _joiner_view(server: RunningServer, store_id: str) -> list[bytes]:
    async with server.client(store_id, scope="read", sub="joiner") as joiner:
        return await joiner.receive_all(0.5)


async def _write_all(server: RunningServer, store_id: str, frames: list[bytes]) -> None:
    """Send frames and wait until a peer has received them all (so all are committed)."""
    writer = await server.connect(store_id, sub="writer")
    peer = await server.connect(store_id, scope="read", sub="peer")
    for frame in frames:
        await writer.send(frame)
    for _ in frames:
        await peer.receive(timeout=5)


async def test_compact_endpoint_refuses_anything_but_an_admin_token_of_the_store(
    persistent_server: RunningServer,
) -> None:
    server = persistent_server
    await _write_all(server, "s", [b"\x01x", b"\x01x"])
    assert (await _post(server, "s", None)).status == 401
    assert (await _post(server, "s", "garbage")).status == 401
    assert (await _post(server, "s", server.token("s", "write"))).status == 403
    assert (await _post(server, "s", server.token("other", "admin"))).status == 403
    query = f"{server.http_url}/api/stores/s/compact?token={server.token('s', 'admin')}"
    async with aiohttp.ClientSession() as session, session.post(query) as response:
        assert response.status == 401
    assert await _joiner_view(server, "s") == [b"\x01x", b"\x01x"]


async def test_compact_endpoint_answers_404_for_an_unknown_store(
    persistent_server: RunningServer,
) -> None:
    response = await _post(
        persistent_server, "nothing", persistent_server.token("nothing", "admin")
    )
    assert response.status == 404


async def test_compact_endpoint_rejects_a_bad_value_mode(persistent_server: RunningServer) -> None:
    server = persistent_server
    await _write_all(server, "s", [b"\x01x"])
    response = await _post(server, "s", server.token("s", "admin"), json={"value_mode": "nope"})
    assert response.status == 400


async def test_compact_endpoint_on_an_open_store_keeps_the_joiner_view(
    persistent_server: RunningServer,
) -> None:
    server = persistent_server
    frames = [b"\x01" + bytes([i % 7]) * 50 for i in range(40)]
    await _write_all(server, "open", frames)
    before = await _joiner_view(server, "open")
    assert before == frames
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.http_url}/api/stores/open/compact",
            headers={"Authorization": f"Bearer {server.token('open', 'admin')}"},
        ) as response,
    ):
        assert response.status == 200
        report = await response.json()
    assert report["duplicates_removed"] == 33
    assert report["integrity"] == "ok"
    assert await _joiner_view(server, "open") == distinct_in_order(before)


async def test_cli_compaction_while_a_writer_streams_loses_nothing(
    make_server: ServerFactory,
) -> None:
    server = await make_server(persist=True)
    writer = await server.connect("live", sub="writer")
    peer = await server.connect("live", scope="read", sub="peer")
    env = clean_env(SDS_PERSIST_DIR=str(server.config.persist_dir), SDS_JWT_SECRET=SECRET)
    duplicating = streaming_writer(
        writer, lambda i: b"\x01" + f"patch-{i % 60}".encode() * 20, at_least=200
    )
    async with duplicating as sent:
        result = await run_sds_async(
            "store", "compact", "live", "--url", server.http_url, "--wait", "10", "--json", env=env
        )
    assert result.returncode == 0, result.stderr
    (report,) = json.loads(result.stdout)["results"]
    assert report["via"] == "server"
    assert report["duplicates_removed"] > 0
    received = [await peer.receive(timeout=5) for _ in sent]
    assert received == sent
    joined = await _joiner_view(server, "live")
    assert distinct_in_order(joined) == distinct_in_order(sent)
    assert len(joined) < len(sent)


async def test_cli_compaction_of_a_store_the_server_does_not_hold_takes_the_lock(
    make_server: ServerFactory,
) -> None:
    server = await make_server(persist=True)
    frames = [b"\x01a", b"\x01b", b"\x01a", b"\x01c", b"\x01b"]
    async with server.client("idle", sub="w") as writer, server.client("idle", "read") as peer:
        for frame in frames:
            await writer.send(frame)
        for _ in frames:
            await peer.receive(timeout=5)
    await _wait_closed(server, "idle")
    env = clean_env(SDS_PERSIST_DIR=str(server.config.persist_dir))
    result = await run_sds_async("store", "compact", "idle", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["via"] == "lock"
    assert await _joiner_view(server, "idle") == [b"\x01a", b"\x01b", b"\x01c"]


async def _wait_closed(server: RunningServer, store_id: str) -> None:
    """Wait (bounded) until the server has closed the store's file after its grace period."""
    from sds.appkeys import STORAGE

    storage = server.app[STORAGE]
    assert storage is not None
    name = storage.path_of(store_id).name
    for _ in range(100):
        if all(f.path.name != name for f in storage.open_files()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the server kept the store file open")


async def test_store_client_sees_no_gap_after_compaction(persistent_server: RunningServer) -> None:
    server = persistent_server
    await _write_all(server, "seam", [b"\x01one", b"\x01one", b"\x01two"])
    response = await _post(server, "seam", server.token("seam", "admin"))
    assert response.status == 200
    async with StoreClient(server.ws_url, "seam", server.token("seam")) as late:
        assert await late.receive_all(0.5) == [b"\x01one", b"\x01two"]
        writer = await server.connect("seam", sub="after")
        await writer.send(b"\x01three")
        assert await late.receive(timeout=5) == b"\x01three"
    assert await _joiner_view(server, "seam") == [b"\x01one", b"\x01two", b"\x01three"]


def _two_servers_with_duplicates(tmp_path: Path) -> tuple[Path, Path]:
    """Two persist dirs, each with a store "notes" holding 3 distinct of 5 patches."""
    dirs = (tmp_path / "a", tmp_path / "b")
    for directory in dirs:
        directory.mkdir()
        write_store(directory / "notes.db", "notes", [b"a", b"b", b"a", b"c", b"b"])
    return dirs


async def test_compact_asks_only_the_server_that_holds_the_store_of_its_persist_dir(
    tmp_path: Path,
) -> None:
    dir_a, dir_b = _two_servers_with_duplicates(tmp_path)
    with (
        spawn_server(["--persist-dir", str(dir_a)], cwd=tmp_path, log_dir=tmp_path / "la") as a,
        spawn_server(["--persist-dir", str(dir_b)], cwd=tmp_path, log_dir=tmp_path / "lb") as b,
    ):
        async with (
            StoreClient(a.ws_url, "notes", a.token("notes", "read")),
            StoreClient(b.ws_url, "notes", b.token("notes", "read")),
        ):
            b_before = db_digests(dir_b)
            # The default URL (SDS_PORT) reaches server B; the persist dir is A's.
            env = clean_env(
                SDS_PERSIST_DIR=str(dir_a), SDS_PORT=str(b.port), SDS_JWT_SECRET=TEST_SECRET
            )
            result = await run_sds_async("store", "compact", "notes", "--json", env=env)
            assert result.returncode == 0, result.stderr
            (report,) = json.loads(result.stdout)["results"]
            assert report["via"] == "server"
            assert report["duplicates_removed"] == 2
            assert db_digests(dir_b) == b_before
            async with StoreClient(b.ws_url, "notes", b.token("notes", "read")) as joiner:
                assert len(await joiner.receive_all(0.5)) == 5

            # An explicit --url naming the other server is refused; nothing changes.
            a_before = db_digests(dir_a)
            result = await run_sds_async(
                "store", "compact", "notes", "--url", b.http_url, "--wait", "1", env=env
            )
            assert result.returncode == 1
            line = one_error_line(result)
            assert "refusing" in line and b.http_url in line and f"pid {a.pid}" in line
            assert db_digests(dir_a) == a_before
            assert db_digests(dir_b) == b_before


async def test_compact_never_sends_the_token_to_a_default_url_when_the_holder_names_none(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "stores"
    directory.mkdir()
    write_store(directory / "notes.db", "notes", [b"a", b"a"])
    before = db_digests(directory)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0)
        port = listener.getsockname()[1]
        fd = try_lock(directory / "notes.db", timeout=1)  # a holder that recorded no URL
        try:
            env = clean_env(
                SDS_PERSIST_DIR=str(directory), SDS_PORT=str(port), SDS_JWT_SECRET=TEST_SECRET
            )
            result = await run_sds_async("store", "compact", "notes", "--wait", "0.5", env=env)
        finally:
            os.close(fd)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert result.returncode == 1
    line = one_error_line(result)
    assert "not a server" in line and f"pid {os.getpid()}" in line
    assert db_digests(directory) == before


async def test_a_new_store_opens_while_compactions_and_the_default_threads_are_busy(
    persistent_server: RunningServer,
) -> None:
    server = persistent_server
    await _write_all(server, "busy", [b"\x01x", b"\x01x"])
    loop = asyncio.get_running_loop()
    release = threading.Event()
    # Compactions in flight fill the maintenance threads; other blocking work fills
    # the default executor (where store opens used to queue behind compactions).
    blockers = [
        loop.run_in_executor(server.app[MAINTENANCE], release.wait, 30.0)
        for _ in range(MAINTENANCE_THREADS)
    ]
    blockers += [loop.run_in_executor(None, release.wait, 30.0) for _ in range(32)]
    try:
        compaction = asyncio.create_task(_post(server, "busy", server.token("busy", "admin")))
        writer = await asyncio.wait_for(server.connect("fresh", sub="w"), 10)
        reader = await asyncio.wait_for(server.connect("fresh", scope="read", sub="r"), 10)
        await writer.send(b"\x01new store works")
        assert await reader.receive(timeout=10) == b"\x01new store works"
        assert not compaction.done(), "the compaction waits for a maintenance thread"
    finally:
        release.set()
    response = await asyncio.wait_for(compaction, 20)
    assert response.status == 200
    await asyncio.gather(*blockers)
