"""A write that cannot be stored is never relayed: the sender is closed with 1011."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from sds.backends.sqlite import store_filename
from sds.client import ClientClosed
from tests.conftest import ServerFactory


@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "256k") -> Iterator[Path]:
    """A real, tiny tmpfs: writes past its size fail with ENOSPC (needs root, as CI has)."""
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_full_disk_closes_sender_with_1011_and_relays_nothing_unstored(
    make_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="sds.backends.sqlite")
    with small_filesystem(tmp_path / "tiny") as stores:
        server = await make_server(persist_dir=stores)
        writer = await server.connect("full", sub="writer")
        reader = await server.connect("full", scope="read", sub="reader")
        frames = [b"\x01" + n.to_bytes(4, "big") + b"z" * 8192 for n in range(200)]
        closed_with = None
        try:
            for frame in frames:
                await writer.send(frame)
                await asyncio.sleep(0.005)
        except (ConnectionResetError, aiohttp.ClientError):
            pass
        closed_with = await writer.wait_closed(timeout=10)
        assert closed_with == 1011

        received: list[bytes] = []
        with contextlib.suppress(ClientClosed):
            received = await reader.receive_all(0.5)
        assert 0 < len(received) < len(frames)
        with sqlite3.connect(f"file:{stores / store_filename('full')}?mode=ro", uri=True) as db:
            stored = [
                bytes(row[0]) for row in db.execute("SELECT data FROM patches ORDER BY clock")
            ]
        assert [frame[1:] for frame in received] == stored[: len(received)]
        assert len(stored) == len(received)

        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{server.http_url}/healthz") as response,
        ):
            body = await response.json()
            assert response.status == 503
        assert any("storage write failed" in problem for problem in body["problems"])
        assert any("storage write failed" in record.getMessage() for record in caplog.records)
        await reader.close()
        await server.server.close()


async def test_healthz_stays_503_after_the_failing_store_closed_until_a_write_succeeds(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    with small_filesystem(tmp_path / "tiny") as stores:
        filler = stores / "filler"
        filler.write_bytes(b"f" * 96 * 1024)
        server = await make_server(persist_dir=stores, store_close_grace=0.1)
        writer = await server.connect("full", sub="writer")
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
            for n in range(200):
                await writer.send(b"\x01" + n.to_bytes(4, "big") + b"z" * 8192)
                await asyncio.sleep(0.005)
        assert await writer.wait_closed(timeout=10) == 1011
        await writer.close()

        async def health() -> tuple[int, dict[str, object]]:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{server.http_url}/healthz") as response,
            ):
                return response.status, await response.json()

        # Past the store's close grace and several probes: the disk is still full.
        for _ in range(15):
            status, body = await health()
            assert status == 503, body
            await asyncio.sleep(0.2)
        assert body["stores"] == 0
        assert "full" not in str(body["problems"])
        assert str(stores) not in str(body)
        assert store_filename("full") not in str(body)

        filler.unlink()
        for _ in range(50):
            status, body = await health()
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert status == 200, body
        await server.server.close()
