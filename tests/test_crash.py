"""Nothing a peer has seen is lost when the server is killed with SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from sds.client import ClientClosed, StoreClient
from sds.tokens import mint_token
from tests.conftest import SECRET

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_server(persist_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """`sds serve` as a real process; returns once /healthz answers."""
    env = {**os.environ, "SDS_JWT_SECRET": SECRET}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sds",
            "serve",
            "--port",
            str(port),
            "--persist-dir",
            str(persist_dir),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    if response.status == 200:
                        return process
            await asyncio.sleep(0.05)
    process.kill()
    raise AssertionError("server did not start")


async def test_sigkill_mid_stream_loses_nothing_a_peer_saw(tmp_path: Path) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    token = mint_token(SECRET, store_id="crash", scope="write", sub="t")
    server = await start_server(tmp_path, port)
    seen: list[bytes] = []
    try:
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
        server.wait(timeout=10)
        await asyncio.wait_for(recording, 10)
        streaming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await streaming
        await writer.close()
        await reader.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    assert len(seen) >= 2000
    assert seen == [b"\x01" + n.to_bytes(4, "big") + b"k" * 32 for n in range(len(seen))]
    server = await start_server(tmp_path, port)
    try:
        async with StoreClient(url, "crash", token) as joiner:
            replayed = await joiner.receive_all(1.0)
    finally:
        server.terminate()
        server.wait(timeout=15)
    assert replayed[: len(seen)] == seen
    assert replayed == [b"\x01" + n.to_bytes(4, "big") + b"k" * 32 for n in range(len(replayed))]
