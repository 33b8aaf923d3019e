"""Memory bounds of the data path: catch-up pages, frames waiting for commit, large frames.

Bounds are checked through the server's own accounting (the catch-up budget and
the pending-bytes count, also exported in /metrics) while readers stall or commits
are held back, and through the RSS of a subprocess server against a bound far
below what the unbounded server held. Limits are configured small.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from sds.appkeys import RELAY
from sds.client import ClientClosed, StoreClient, store_url
from sds.relay import LiveStore, Relay
from tests.conftest import RunningServer, ServerFactory
from tests.helpers import http_get, rss_kib, spawn_server
from tests.raw_ws import RawWebSocket

KiB = 1024
MiB = 1024 * KiB


def patch(n: int, size: int) -> bytes:
    return b"\x01" + n.to_bytes(4, "big") + bytes([n % 251]) * (size - 5)


def seq(frame: bytes) -> int:
    return int.from_bytes(frame[1:5], "big")


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait (bounded) until ``condition`` holds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


async def write_history(server: RunningServer, store_id: str, count: int, size: int) -> None:
    """``count`` patches stored (committed) with nobody else online."""
    relay = server.app[RELAY]
    async with server.client(store_id) as writer:
        for n in range(count):
            await writer.send(patch(n, size))
        store = relay.stores[store_id]
        await until(lambda: store.relayed_clock == count, "history committed")


async def stalled_joiner(server: RunningServer, store_id: str, sub: str) -> RawWebSocket:
    """A joiner that does not read (a tiny receive buffer) until told to."""
    path = store_url("", store_id, server.token(store_id, scope="read", sub=sub))
    port = server.server.port
    assert port is not None
    return await asyncio.to_thread(RawWebSocket.connect, port, path)


@contextlib.asynccontextmanager
async def paused_commits(store: LiveStore) -> AsyncIterator[None]:
    """Hold the store file's commits back (maintenance does the same) while inside."""
    assert store.log is not None
    async with store.log.file.paused():
        yield


# --- catch-up (issue 13 item 1) ------------------------------------------------------


async def test_joiners_past_the_catchup_budget_wait_their_turn_and_miss_nothing(
    make_server: ServerFactory,
) -> None:
    page, total = 64 * KiB, 128 * KiB
    server = await make_server(
        persist=True,
        max_catchup_bytes_per_client=page,
        max_catchup_bytes_total=total,
        max_client_buffer_bytes=64 * KiB,
        max_frame_bytes=64 * KiB,
    )
    relay: Relay = server.app[RELAY]
    # More history than a joiner's socket buffers absorb while it does not read (on
    # loopback they take several hundred KiB): the stalled joiners keep their pages.
    history, size = 256, 16 * KiB
    await write_history(server, "catchup", history, size)

    joiners = [await stalled_joiner(server, "catchup", f"j{i}") for i in range(4)]
    try:
        # Two stalled joiners hold a page each: the whole budget; the others wait.
        await until(lambda: relay.catchup.waits >= 2, "joiners wait for catch-up room")
        peak = relay.catchup.used
        live = await server.connect("catchup", sub="live-writer")
        for n in range(history, history + 4):
            await live.send(patch(n, size))
        for _ in range(20):
            peak = max(peak, relay.catchup.used)
            await asyncio.sleep(0.01)
        assert 0 < peak <= total
        status, body = await asyncio.to_thread(http_get, server.http_url + "/metrics")
        assert status == 200 and b"sds_catchup_waits_total" in body

        received = await asyncio.gather(
            *(asyncio.to_thread(joiner.read_binary, history + 4) for joiner in joiners)
        )
        expected = [patch(n, size) for n in range(history + 4)]
        for frames in received:
            assert frames == expected, [seq(f) for f in frames][:8]
        await until(lambda: relay.catchup.used == 0, "catch-up budget given back")
    finally:
        for joiner in joiners:
            joiner.close()


@pytest.mark.slow
async def test_stalled_joiners_of_a_large_history_keep_server_memory_bounded(
    tmp_path: Path,
) -> None:
    history, size = 80, 512 * KiB
    args = [
        "--persist-dir",
        str(tmp_path / "stores"),
        "--max-frame-bytes",
        str(1 * MiB),
        "--max-client-buffer-bytes",
        str(256 * KiB),
        "--max-catchup-bytes-per-client",
        str(1 * MiB),
        "--max-catchup-bytes-total",
        str(2 * MiB),
    ]
    with spawn_server(args, cwd=tmp_path) as server:
        writer = StoreClient(server.ws_url, "big", server.token("big"))
        await writer.connect()
        reader = StoreClient(server.ws_url, "big", server.token("big", scope="read", sub="r"))
        await reader.connect()
        try:
            for n in range(history):
                await writer.send(patch(n, size))
                assert seq(await reader.receive(timeout=20)) == n  # committed and relayed
        finally:
            await writer.close()
            await reader.close()
        baseline = rss_kib(server.pid)
        path = store_url("", "big", server.token("big", scope="read", sub="stalled"))
        joiners = [
            await asyncio.to_thread(RawWebSocket.connect, server.port, path) for _ in range(4)
        ]
        try:
            peak = baseline
            for _ in range(60):  # 3 s of stalled catch-up
                peak = max(peak, rss_kib(server.pid))
                await asyncio.sleep(0.05)
            # Unbounded, every joiner held its whole page (all 80 rows, 40 MiB) and a
            # copy of each frame: over 300 MiB. Bounded: a few MiB.
            assert peak - baseline < 64 * 1024, f"RSS grew {peak - baseline} KiB"
            received = await asyncio.gather(
                *(asyncio.to_thread(joiner.read_binary, history, 30.0) for joiner in joiners)
            )
            for frames in received:
                assert [seq(f) for f in frames] == list(range(history))
        finally:
            for joiner in joiners:
                joiner.close()


# --- frames waiting for their commit (issue 13 item 2) --------------------------------


async def test_a_writer_is_not_read_past_the_per_store_pending_bound(
    make_server: ServerFactory,
) -> None:
    bound, size, count = 256 * KiB, 64 * KiB, 256
    server = await make_server(
        persist=True, max_pending_bytes_per_store=bound, max_frame_bytes=size
    )
    relay: Relay = server.app[RELAY]
    reader = await server.connect("pending", scope="read", sub="reader")
    writer = await server.connect("pending", sub="writer")
    store = relay.stores["pending"]
    async with paused_commits(store):
        sending = asyncio.create_task(_send_all(writer, count, size))
        await until(lambda: relay.metrics.writer_pauses["store"] >= 1, "the writer is paused")
        for _ in range(30):  # the writer keeps sending; the server does not read it
            assert store.pending_bytes() <= bound + size
            assert relay.pending.used <= bound + size
            await asyncio.sleep(0.01)
        assert not sending.done(), "16 MiB cannot fit in the socket buffers and the bound"
    await asyncio.wait_for(sending, 20)
    frames = [await reader.receive(timeout=10) for _ in range(count)]
    assert [seq(f) for f in frames] == list(range(count))
    await until(lambda: relay.pending.used == 0, "nothing waits once committed")


async def test_writers_of_all_stores_are_not_read_past_the_total_pending_bound(
    make_server: ServerFactory,
) -> None:
    total, size, count = 256 * KiB, 64 * KiB, 40
    server = await make_server(
        persist=True,
        max_pending_bytes_per_store=16 * MiB,
        max_pending_bytes_total=total,
        max_frame_bytes=size,
    )
    relay: Relay = server.app[RELAY]
    writers = [await server.connect(f"total-{i}", sub=f"w{i}") for i in range(2)]
    readers = [await server.connect(f"total-{i}", scope="read", sub=f"r{i}") for i in range(2)]
    stores = [relay.stores[f"total-{i}"] for i in range(2)]
    async with paused_commits(stores[0]), paused_commits(stores[1]):
        sending = [asyncio.create_task(_send_all(w, count, size)) for w in writers]
        await until(lambda: relay.metrics.writer_pauses["total"] >= 1, "writers are paused")
        for _ in range(30):
            assert relay.pending.used <= total + 2 * size
            await asyncio.sleep(0.01)
        status, body = await asyncio.to_thread(http_get, server.http_url + "/metrics")
        assert status == 200 and b'sds_writer_pauses_total{reason="total"}' in body
    await asyncio.wait_for(asyncio.gather(*sending), 20)
    for reader in readers:
        frames = [await reader.receive(timeout=10) for _ in range(count)]
        assert [seq(f) for f in frames] == list(range(count))


async def _send_all(writer: StoreClient, count: int, size: int) -> None:
    for n in range(count):
        await writer.send(patch(n, size))


async def test_a_large_patch_waits_for_its_commit_held_once(
    persistent_server: RunningServer,
) -> None:
    relay: Relay = persistent_server.app[RELAY]
    await persistent_server.connect("once")
    store = relay.stores["once"]
    assert store.log is not None
    frame = patch(1, 64 * KiB)
    commit = store.log.append_patch(frame)
    (run,) = commit.ops
    payload = run.payloads[0]  # type: ignore[union-attr]
    assert isinstance(payload, memoryview) and payload.obj is frame
    assert payload.tobytes() == frame[1:]
    await commit.done
    assert commit.ok


# --- frames larger than the client buffer (issue 13 item 4) ---------------------------


async def test_a_frame_larger_than_the_client_buffer_reaches_a_reader(
    make_server: ServerFactory,
) -> None:
    server = await make_server(max_client_buffer_bytes=64 * KiB, max_frame_bytes=4 * MiB)
    reader = await server.connect("big-frames", scope="read", sub="reader")
    writer = await server.connect("big-frames", sub="writer")
    for n in range(3):
        await writer.send(patch(n, 4 * MiB))
        frame = await reader.receive(timeout=10)
        assert frame == patch(n, 4 * MiB)
    assert reader.close_code is None


async def test_a_joiner_catching_up_keeps_a_large_live_frame_held_back(
    make_server: ServerFactory,
) -> None:
    size = 1 * MiB
    server = await make_server(
        persist=True,
        max_client_buffer_bytes=64 * KiB,
        max_frame_bytes=size,
        max_catchup_bytes_per_client=size,
        max_catchup_bytes_total=size,
    )
    relay: Relay = server.app[RELAY]
    await write_history(server, "held", 4, size)
    writer = await server.connect("held", sub="writer")
    for _ in range(4):  # caught up before the budget is taken
        await writer.receive(timeout=10)
    stalled = await stalled_joiner(server, "held", "stalled")  # holds the whole budget
    try:
        await until(lambda: relay.catchup.used > 0, "the stalled joiner holds the budget")
        joiner = await server.connect("held", scope="read", sub="joiner")  # waits its turn
        await until(lambda: relay.catchup.waits >= 1, "the joiner waits for catch-up room")
        await writer.send(patch(4, size))  # held back for the joiner: more than its buffer
        await until(lambda: relay.stores["held"].relayed_clock == 5, "live frame relayed")
        try:
            early = await joiner.receive(timeout=0.2)
        except TimeoutError:
            pass  # held back behind the catch-up that has not started
        else:
            raise AssertionError(f"frame {seq(early)} arrived before the catch-up")
    finally:
        stalled.close()  # its budget goes back; the joiner catches up
    try:
        frames = [await joiner.receive(timeout=20) for _ in range(5)]
    except ClientClosed as exc:
        raise AssertionError(f"joiner closed with {exc.code}") from None
    assert [seq(f) for f in frames] == [0, 1, 2, 3, 4]
