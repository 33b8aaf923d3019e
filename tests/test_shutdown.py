"""SIGTERM / SIGINT: stop accepting, close clients with 1001, flush storage, exit 0 in time."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from sds.backends.sqlite import store_filename
from sds.client import ClientClosed, StoreClient, store_url
from tests.helpers import ServerProcess, spawn_server
from tests.raw_ws import RawWebSocket
from tests.store_files import read_rows

SHUTDOWN_TIMEOUT = 6.0


async def _collect(client: StoreClient, frames: list[bytes]) -> int | None:
    """Read until the server closes; the close code (frames land in ``frames``)."""
    try:
        async with asyncio.timeout(SHUTDOWN_TIMEOUT + 10):
            while True:
                frames.append(await client.receive(timeout=None))
    except ClientClosed as closed:
        return closed.code
    except TimeoutError:
        return None


def _stop(server: ServerProcess, sig: int) -> tuple[int, float]:
    started = time.monotonic()
    code = server.stop(sig, timeout=SHUTDOWN_TIMEOUT + 10)
    return code, time.monotonic() - started


def _patches(persist: Path, store: str) -> list[tuple[int, bytes]]:
    return [
        (int(clock), bytes(data))
        for clock, data in read_rows(
            persist / store_filename(store),
            "SELECT clock, data FROM patches WHERE store_id = ? ORDER BY clock",
            (store,),
        )
    ]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_closes_clients_with_1001_flushes_and_exits_0(
    tmp_path: Path, sig: int
) -> None:
    persist = tmp_path / "stores"
    store = "shutdown-store"
    args = ["--persist-dir", str(persist), "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)]
    with spawn_server(args, cwd=tmp_path) as server:
        writer = StoreClient(server.ws_url, store, server.token(store, sub="writer"))
        reader = StoreClient(server.ws_url, store, server.token(store, scope="read", sub="r"))
        await writer.connect()
        await reader.connect()
        try:
            sent = [b"\x01" + i.to_bytes(4, "big") + b"p" * 100 for i in range(200)]
            for frame in sent:
                await writer.send(frame)
            received: list[bytes] = []
            reading = asyncio.create_task(_collect(reader, received))
            writer_closed = asyncio.create_task(_collect(writer, []))
            for _ in range(200):
                if received:
                    break
                await asyncio.sleep(0.01)
            assert received, "no frame relayed before the signal"
            code, elapsed = await asyncio.to_thread(_stop, server, sig)
            assert await reading == 1001
            assert await writer_closed == 1001
        finally:
            await writer.close()
            await reader.close()

    assert code == 0
    assert elapsed < SHUTDOWN_TIMEOUT
    stored = _patches(persist, store)
    assert [clock for clock, _ in stored] == list(range(1, len(stored) + 1))
    assert [b"\x01" + data for _, data in stored] == sent[: len(stored)]
    assert len(stored) >= len(received)
    assert received == sent[: len(received)]
    assert "storage flushed and closed" in server.stderr
    assert "Traceback" not in server.stderr


@pytest.mark.slow
async def test_patches_acknowledged_just_before_sigterm_are_on_disk(tmp_path: Path) -> None:
    persist = tmp_path / "stores"
    store = "flush-store"
    with spawn_server(["--persist-dir", str(persist)], cwd=tmp_path) as server:
        writer = StoreClient(server.ws_url, store, server.token(store, sub="writer"))
        reader = StoreClient(server.ws_url, store, server.token(store, sub="reader"))
        await writer.connect()
        await reader.connect()
        try:
            sent = [b"\x01" + i.to_bytes(4, "big") for i in range(500)]
            for frame in sent:
                await writer.send(frame)
            received = [await reader.receive(timeout=10) for _ in sent]
            code, _ = await asyncio.to_thread(_stop, server, signal.SIGTERM)
        finally:
            await writer.close()
            await reader.close()
    assert received == sent
    assert code == 0
    assert [b"\x01" + data for _, data in _patches(persist, store)] == sent


@pytest.mark.slow
async def test_after_sigterm_new_clients_are_refused_and_a_stalled_reader_does_not_hold_exit(
    tmp_path: Path,
) -> None:
    store = "stuck-store"
    with spawn_server(["--shutdown-timeout", "4"], cwd=tmp_path) as server:
        path = store_url("", store, server.token(store, scope="read", sub="stuck"))
        stuck = await asyncio.to_thread(RawWebSocket.connect, server.port, path)
        writer = StoreClient(server.ws_url, store, server.token(store, sub="writer"))
        await writer.connect()
        try:
            for _ in range(64):
                await writer.send(b"\x01" + b"f" * 65536)
            await asyncio.sleep(0.2)
            started = time.monotonic()
            server.send_signal(signal.SIGTERM)
            refused = await _new_connection_refused(server, store)
            code = await asyncio.to_thread(server.wait, 15.0)
            elapsed = time.monotonic() - started
        finally:
            stuck.close()
            await writer.close()
    assert refused
    assert code == 0, server.stderr
    assert elapsed < 4


async def _new_connection_refused(server: ServerProcess, store: str) -> bool:
    """True once a new client is turned away (503 or no listener) during shutdown."""
    url = store_url(server.ws_url, store, server.token(store, sub="late"))
    for _ in range(40):
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=1)) as ws,
            ):
                await ws.close()
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status == 503
        except aiohttp.ClientConnectionError:
            return True
        await asyncio.sleep(0.05)
    return False
