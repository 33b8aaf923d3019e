"""The /ws relay: fan-out to the other clients of a store, in order, never back."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from sds.backends.base import Commit
from sds.relay import LiveStore
from tests.conftest import RunningServer, ServerFactory
from tests.helpers import upgrade_request


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


async def test_interleaved_senders_each_keep_their_order(server: RunningServer) -> None:
    a = await server.connect("mix", sub="a")
    b = await server.connect("mix", sub="b")
    reader = await server.connect("mix", sub="r")
    sent_a = [b"\x01a" + i.to_bytes(2, "big") for i in range(200)]
    sent_b = [b"\x04b" + i.to_bytes(2, "big") for i in range(200)]

    async def send_all(client: object, frames: list[bytes]) -> None:
        for frame in frames:
            await client.send(frame)  # type: ignore[attr-defined]

    await asyncio.gather(send_all(a, sent_a), send_all(b, sent_b))
    received = [await reader.receive() for _ in range(400)]
    assert [f for f in received if f[1:2] == b"a"] == sent_a
    assert [f for f in received if f[1:2] == b"b"] == sent_b
    # Each sender also got the other's frames, and never its own.
    assert sorted(await a.receive_all(0.3)) == sorted(sent_b)
    assert sorted(await b.receive_all(0.3)) == sorted(sent_a)


async def test_stores_are_isolated(server: RunningServer) -> None:
    a = await server.connect("left")
    other = await server.connect("right")
    await a.send(b"\x01only-left")
    assert await other.receive_all(0.3) == []


async def test_relay_is_byte_transparent(server: RunningServer) -> None:
    sender = await server.connect("bytes")
    receiver = await server.connect("bytes")
    frames = [
        b"\x01" + bytes(range(256)),
        b"\x02" + b"\xff" * 32 + b"\x00value",
        b"\x06",
        b"\x01" + bytes(range(256)) * 8192,  # 2 MiB whole-state patch
        b"\xee" + b"\x00" * 3,
    ]
    for frame in frames:
        await sender.send(frame)
    assert [await receiver.receive(timeout=10) for _ in frames] == frames


async def test_read_scope_write_frames_are_dropped_others_relayed(server: RunningServer) -> None:
    reader = await server.connect("rs", scope="read")
    peer = await server.connect("rs")
    for kind in (0x01, 0x02, 0x05):
        await reader.send(bytes([kind]) + b"x" * 40)
    for kind in (0x03, 0x04, 0x06, 0x7F):
        await reader.send(bytes([kind]) + b"y" * 40)
    got = await peer.receive_all(0.4)
    assert [frame[0] for frame in got] == [0x03, 0x04, 0x06, 0x7F]


async def test_read_scope_client_stays_open_and_receives_after_drops(
    server: RunningServer,
) -> None:
    reader = await server.connect("rs2", scope="read")
    writer = await server.connect("rs2")
    await reader.send(b"\x01dropped")
    await writer.send(b"\x01from-writer")
    assert await reader.receive() == b"\x01from-writer"
    await reader.send(b"\x04presence")
    assert await writer.receive() == b"\x04presence"
    assert not reader.ws.closed


@pytest.mark.parametrize("scope", ["write", "admin"])
async def test_write_and_admin_scopes_may_send_every_type(
    server: RunningServer, scope: str
) -> None:
    sender = await server.connect("ws", scope=scope)
    peer = await server.connect("ws", scope="read")
    frames = [bytes([kind]) + b"k" * 48 for kind in (1, 2, 3, 4, 5, 6, 0x42)]
    for frame in frames:
        await sender.send(frame)
    assert [await peer.receive() for _ in frames] == frames


async def test_empty_and_text_frames_are_ignored_without_closing(server: RunningServer) -> None:
    sender = await server.connect("quiet")
    peer = await server.connect("quiet")
    await sender.send(b"")
    await sender.send_text("not a frame")
    await sender.send_text("")
    await sender.send(b"\x01after")
    assert await peer.receive_all(0.4) == [b"\x01after"]
    assert not sender.ws.closed
    await peer.send(b"\x04back")
    assert await sender.receive() == b"\x04back"


@pytest.mark.parametrize(
    "deflate",
    [
        False,
        True,
    ],
    ids=["plain", "deflate"],
)
async def test_frame_limit_is_inclusive_and_larger_closes_1009(
    make_server: ServerFactory, deflate: bool
) -> None:
    server = await make_server(max_frame_bytes=1024, permessage_deflate=deflate)
    url = f"{server.ws_url}/ws/big?token={server.token('big')}"
    compress = 15 if deflate else 0
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, compress=compress) as sender,
        session.ws_connect(url, compress=compress) as peer,
    ):
        at_limit = b"\x01" + bytes(range(256)) * 4
        await sender.send_bytes(at_limit[:1024])
        assert (await peer.receive(timeout=5)).data == at_limit[:1024]
        await sender.send_bytes(b"\x01" + b"x" * 1024)
        msg = await sender.receive(timeout=2)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 1009
        with pytest.raises(TimeoutError):
            await peer.receive(timeout=0.3)
        assert not peer.closed


async def test_connection_closes_4001_when_token_expires(server: RunningServer) -> None:
    # exp is whole seconds: int(now) + 2 is 1-2 s away, never too close for the handshake.
    token = server.token("exp", expires_in=2, now=time.time())
    client = await server.connect("exp", token=token)
    started = time.monotonic()
    assert await client.wait_closed(4) == 4001
    assert time.monotonic() - started < 3


async def test_permessage_deflate_not_negotiated_by_default(server: RunningServer) -> None:
    url = f"{server.http_url}/ws/plain?token={server.token('plain')}"
    status, _, headers = await upgrade_request(
        url, headers={"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
    )
    assert status == 101
    assert "permessage-deflate" not in headers.get("Sec-WebSocket-Extensions", "")


async def test_frame_at_the_limit_is_relayed_with_deflate(make_server: ServerFactory) -> None:
    server = await make_server(max_frame_bytes=1024, permessage_deflate=True)
    url = f"{server.ws_url}/ws/edge?token={server.token('edge')}"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, compress=15) as sender,
        session.ws_connect(url, compress=15) as peer,
    ):
        frame = (b"\x01" + bytes(range(256)) * 4)[:1024]
        await sender.send_bytes(frame)
        assert (await peer.receive(timeout=5)).data == frame


async def test_permessage_deflate_when_enabled_still_relays(make_server: ServerFactory) -> None:
    server = await make_server(permessage_deflate=True)
    url = f"{server.ws_url}/ws/zip?token={server.token('zip')}"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, compress=15) as sender,
        session.ws_connect(url, compress=15) as receiver,
    ):
        extensions = sender._response.headers.get("Sec-WebSocket-Extensions", "")
        assert "permessage-deflate" in extensions
        payload = b"\x01" + b"compressible " * 1000
        await sender.send_bytes(payload)
        msg = await receiver.receive(timeout=5)
        assert msg.data == payload


class Peer:
    """A peer of a LiveStore that records what it was sent and how it was closed."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.closed_with: int | None = None

    def send(self, data: bytes) -> None:
        self.received.append(data)

    def close(self, code: int, reason: str = "") -> None:
        self.closed_with = code


def decide(commit: Commit, *, ok: bool, clocks: dict[str, int] | None = None) -> None:
    """End a group commit the way StoreFile does: outcome first, then the future."""
    commit.ok = ok
    commit.clocks = clocks or {}
    commit.done.set_result(None)


async def test_frames_wait_for_their_commit_in_arrival_order() -> None:
    store = LiveStore("s")
    a, b, reader = Peer(), Peer(), Peer()
    for peer in (a, b, reader):
        store.add_client(peer)
    commit = Commit(asyncio.get_running_loop())
    store.relay_after_commit(b"\x01p1", a, commit)
    store.relay_after_commit(b"\x01p2", a, commit)
    store.relay(b"\x04b waits", b)
    store.relay(b"\x04a waits", a)
    await asyncio.sleep(0)
    assert reader.received == [] and store.has_pending()

    decide(commit, ok=True, clocks={"s": 7})
    await asyncio.sleep(0)
    assert reader.received == [b"\x01p1", b"\x01p2", b"\x04b waits", b"\x04a waits"]
    assert a.received == [b"\x04b waits"]
    assert b.received == [b"\x01p1", b"\x01p2", b"\x04a waits"]
    assert store.relayed_clock == 7
    assert not store.has_pending()
    store.relay(b"\x04live", b)
    assert reader.received[-1] == b"\x04live", "with nothing committing, frames go at once"


async def test_failed_commit_closes_its_writer_and_relays_the_others_frames() -> None:
    store = LiveStore("s")
    writer, other, reader = Peer(), Peer(), Peer()
    for peer in (writer, other, reader):
        store.add_client(peer)
    loop = asyncio.get_running_loop()
    failing, next_commit = Commit(loop), Commit(loop)
    store.relay_after_commit(b"\x01lost", writer, failing)
    store.relay(b"\x04other", other)
    store.relay_after_commit(b"\x01later", other, next_commit)

    decide(failing, ok=False)
    await asyncio.sleep(0)
    assert writer.closed_with == 1011
    assert reader.received == [b"\x04other"]
    assert store.relayed_clock == 0
    decide(next_commit, ok=True, clocks={"s": 1})
    await asyncio.sleep(0)
    assert reader.received == [b"\x04other", b"\x01later"]
    assert other.closed_with is None
    assert store.relayed_clock == 1
