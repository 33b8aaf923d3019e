"""Slow consumers: a reader that stops reading is closed (1013); memory stays bounded; others get everything."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sds.client import StoreClient, store_url
from tests.helpers import ServerProcess, http_get, rss_kib, spawn_server
from tests.raw_ws import RawWebSocket

FRAME_BYTES = 64 * 1024
FRAMES = 768
"""48 MiB streamed in all: far more than the buffer bound and the kernel's socket buffers."""
CLIENT_BUFFER = 1024 * 1024
MAX_FRAME = 2 * FRAME_BYTES
"""The bound is the buffer plus one largest frame: a small frame limit keeps it near 1 MiB."""
WINDOW = 8
"""Frames the writer may be ahead of the healthy readers (512 KiB: below the buffer bound)."""
RSS_MARGIN_KIB = 24 * 1024
"""An unbounded buffer would hold ~40 MiB for the stalled reader; the bound allows ~1 MiB."""


def _metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} missing from /metrics")


async def _metrics_when(server: ServerProcess, ready: Callable[[str], bool]) -> str:
    """The /metrics text once ``ready`` holds for it (bounded wait)."""
    text = ""
    for _ in range(150):
        status, body = await asyncio.to_thread(http_get, server.http_url + "/metrics")
        assert status == 200
        text = body.decode()
        if ready(text):
            return text
        await asyncio.sleep(0.1)
    return text


async def _read_in_order(client: StoreClient, progress: list[int], index: int) -> list[int]:
    seen: list[int] = []
    for _ in range(FRAMES):
        frame = await client.receive(timeout=20)
        seen.append(int.from_bytes(frame[1:5], "big"))
        progress[index] = len(seen)
    return seen


@pytest.mark.slow
async def test_stalled_reader_is_closed_with_1013_and_memory_stays_bounded(
    tmp_path: Path,
) -> None:
    args = ["--max-client-buffer-bytes", str(CLIENT_BUFFER), "--max-frame-bytes", str(MAX_FRAME)]
    with spawn_server(args, cwd=tmp_path) as server:
        await _stream_past_a_stalled_reader(server)


async def _stream_past_a_stalled_reader(server: ServerProcess) -> None:
    store = "slow-store"
    path = store_url("", store, server.token(store, scope="read", sub="stalled"))
    stalled = RawWebSocket.connect(server.port, path)
    writer = StoreClient(server.ws_url, store, server.token(store, sub="writer"))
    readers = [
        StoreClient(server.ws_url, store, server.token(store, scope="read", sub=f"r{i}"))
        for i in range(2)
    ]
    for client in (writer, *readers):
        await client.connect()
    try:
        progress = [0, 0]
        tasks = [
            asyncio.create_task(_read_in_order(reader, progress, i))
            for i, reader in enumerate(readers)
        ]
        payload = os.urandom(FRAME_BYTES - 5)
        baseline = rss_kib(server.pid)
        peak = baseline
        for seq in range(FRAMES):
            for _ in range(2000):
                if min(progress) >= seq - WINDOW or any(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.005)
            await writer.send(b"\x01" + seq.to_bytes(4, "big") + payload)
            if seq % 16 == 0:
                peak = max(peak, rss_kib(server.pid))
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        peak = max(peak, rss_kib(server.pid))

        assert results == [list(range(FRAMES))] * 2
        assert peak - baseline < RSS_MARGIN_KIB, f"RSS grew {peak - baseline} KiB"
        code, frames = await asyncio.to_thread(stalled.read_until_close, 15.0)
        assert code in (1013, None)
        assert frames < FRAMES
        stalled.send_close()
        text = await _metrics_when(server, lambda t: _metric(t, "sds_connections") == 3)
        assert _metric(text, "sds_slow_consumers_closed_total") == 1
        for reader in readers:
            assert reader.close_code is None
    finally:
        stalled.close()
        for client in (writer, *readers):
            await client.close()
