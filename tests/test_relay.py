"""The /ws relay: fan-out to the other clients of a store, in order, never back."""

from __future__ import annotations

import asyncio

from tests.conftest import RunningServer


async def test_patch_reaches_other_clients_but_not_sender(server: RunningServer) -> None:
    a = await server.connect("s1", sub="a")
    b = await server.connect("s1", sub="b")
    c = await server.connect("s1", sub="c")
    await a.send(b"\x01hello")
    assert await b.receive() == b"\x01hello"
    assert await c.receive() == b"\x01hello"
    assert await a.receive_all(0.3) == []


async def test_frames_of_one_sender_arrive_in_order(server: RunningServer) -> None:
    writer = await server.connect("order")
    reader = await server.connect("order")
    frames = [b"\x01" + i.to_bytes(4, "big") for i in range(500)]
    for frame in frames:
        await writer.send(frame)
    received = [await reader.receive() for _ in frames]
    assert received == frames


async def test_stores_are_isolated(server: RunningServer) -> None:
    a = await server.connect("left")
    other = await server.connect("right")
    await a.send(b"\x01only-left")
    assert await other.receive_all(0.3) == []


async def test_read_scope_write_frames_are_dropped_others_relayed(server: RunningServer) -> None:
    reader = await server.connect("rs", scope="read")
    peer = await server.connect("rs")
    for kind in (0x01, 0x02, 0x05):
        await reader.send(bytes([kind]) + b"x" * 40)
    for kind in (0x03, 0x04, 0x06, 0x7F):
        await reader.send(bytes([kind]) + b"y" * 40)
    got = await peer.receive_all(0.4)
    assert [frame[0] for frame in got] == [0x03, 0x04, 0x06, 0x7F]
    await asyncio.sleep(0)
