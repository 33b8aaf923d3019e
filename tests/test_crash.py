"""Nothing a peer has seen is lost when the server is killed with SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sds.client import ClientClosed, StoreClient
from tests.helpers import spawn_server

pytestmark = pytest.mark.slow


def serve_args(storage_options: dict[str, Any], tmp_path: Path) -> list[str]:
    """`sds serve` options for a backend; the database URL goes through a file, as in production."""
    if "database_url" in storage_options:
        url_file = tmp_path / "database-url"
        url_file.write_text(storage_options["database_url"] + "\n")
        return ["--database-url-file", str(url_file)]
    return ["--persist-dir", str(storage_options["persist_dir"])]


async def test_sigkill_mid_stream_loses_nothing_a_peer_saw(
    tmp_path: Path, storage_options: dict[str, Any]
) -> None:
    args = serve_args(storage_options, tmp_path)
    with spawn_server(args, cwd=tmp_path, wait=False) as server:
        await server.wait_ready_async()
        url = server.ws_url
        token = server.token("crash", sub="t")
        seen: list[bytes] = []
        writer = StoreClient(url, "crash", token)
        reader = StoreClient(url, "crash", token)
        await writer.connect()
        await reader.connect()

        async def stream() -> None:
            with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
                for n in range(100_000):
                    await writer.send(b"\x01" + n.to_bytes(4, "big") + b"k" * 32)
                    if n % 20 == 0:
                        await asyncio.sleep(0.001)

        async def record() -> None:
            with contextlib.suppress(ClientClosed, asyncio.TimeoutError, aiohttp.ClientError):
                while True:
                    seen.append(await reader.receive(timeout=5))

        streaming = asyncio.create_task(stream())
        recording = asyncio.create_task(record())
        async with asyncio.timeout(20):
            while len(seen) < 2000:
                await asyncio.sleep(0.01)
        server.send_signal(signal.SIGKILL)
        await asyncio.to_thread(server.wait, 10)
        await asyncio.wait_for(recording, 10)
        streaming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await streaming
        await writer.close()
        await reader.close()

        assert len(seen) >= 2000
        assert seen == [b"\x01" + n.to_bytes(4, "big") + b"k" * 32 for n in range(len(seen))]
        server.restart()
        await server.wait_ready_async()
        async with StoreClient(url, "crash", token) as joiner:
            replayed = await joiner.receive_all(1.0)
        assert server.stop() == 0
    if "database_url" in storage_options:
        password = storage_options["database_url"].split("@")[0].rsplit(":", 1)[1]
        assert password not in server.stdout + server.stderr
    assert replayed[: len(seen)] == seen
    assert replayed == [b"\x01" + n.to_bytes(4, "big") + b"k" * 32 for n in range(len(replayed))]
