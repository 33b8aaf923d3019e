"""Token expiry closes a connection with 4001; keepalive pings reap peers that stopped answering."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest

from sds.appkeys import METRICS, RELAY
from sds.client import ClientClosed, StoreClient, store_url
from tests.conftest import RunningServer, ServerFactory
from tests.raw_ws import RawWebSocket


async def test_connection_is_closed_with_4001_soon_after_token_exp(server: RunningServer) -> None:
    token = server.token("expiring", sub="short-lived", expires_in=2)
    exp = _exp_of(token)
    expiring = await server.connect("expiring", token=token)
    peer = await server.connect("expiring", sub="peer")

    code = await expiring.wait_closed(timeout=exp + 5 - time.time())
    closed_at = time.time()
    assert code == 4001
    assert exp - 0.25 <= closed_at <= exp + 1.5

    other = await server.connect("expiring", sub="other")
    await peer.send(b"\x01still-relaying")
    assert await other.receive() == b"\x01still-relaying"


async def test_token_without_exp_is_not_closed(server: RunningServer) -> None:
    client = await server.connect("forever", token=server.token("forever", expires_in=None))
    assert await client.wait_closed(timeout=0.5) is None


async def test_expired_token_is_refused_on_reconnect(server: RunningServer) -> None:
    token = server.token("gone", expires_in=1)
    await asyncio.sleep(max(0.0, _exp_of(token) - time.time() + 0.1))
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await server.connect("gone", token=token)
    assert refused.value.status == 401


def _exp_of(token: str) -> float:
    from sds.tokens import decode_unverified

    _, claims = decode_unverified(token)
    return float(claims["exp"])


async def _connections_drop_to(server: RunningServer, count: int, timeout: float = 5.0) -> bool:
    metrics = server.app[METRICS]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.connections_open == count:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_server_sends_periodic_pings(make_server: ServerFactory) -> None:
    server = await make_server(heartbeat=0.5)
    token = server.token("pings")
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(store_url(server.ws_url, "pings", token), autoping=False) as ws,
    ):
        pings = 0
        deadline = time.monotonic() + 5
        while pings < 2 and time.monotonic() < deadline:
            msg = await ws.receive(timeout=2)
            if msg.type is aiohttp.WSMsgType.PING:
                pings += 1
                await ws.pong(msg.data)
        assert pings == 2


async def _keep_reading(client: StoreClient, seconds: float) -> list[bytes]:
    """Read (and so answer pings) for ``seconds``; the frames that arrived.

    The window is one outer timeout: aiohttp restarts receive(timeout) at every ping. Its
    cancellation leaves the connection open (``close_code`` reads 1006, ``ws.closed`` False).
    """
    frames: list[bytes] = []
    with contextlib.suppress(TimeoutError, ClientClosed):
        async with asyncio.timeout(seconds):
            while True:
                frames.append(await client.receive(timeout=None))
    return frames


async def test_peer_that_never_pongs_is_closed_and_leaves_its_store(
    make_server: ServerFactory,
) -> None:
    server = await make_server(heartbeat=0.5)
    healthy = await server.connect("reap", sub="healthy")
    reading = asyncio.create_task(_keep_reading(healthy, 2.5))
    token = server.token("reap", sub="silent")
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(store_url(server.ws_url, "reap", token), autoping=False) as silent,
    ):
        assert len(server.app[RELAY].stores["reap"]) == 2
        assert await _connections_drop_to(server, 1)
        assert len(server.app[RELAY].stores["reap"]) == 1
        metrics = await _scrape(server)
        assert "\nsds_connections 1.0\n" in metrics
        msg = await silent.receive(timeout=2)
        while msg.type is aiohttp.WSMsgType.PING:
            msg = await silent.receive(timeout=2)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    newcomer = await server.connect("reap", sub="newcomer")
    await newcomer.send(b"\x01alive")
    assert await reading == [b"\x01alive"]


async def test_healthy_peers_that_answer_pings_stay_connected(
    make_server: ServerFactory,
) -> None:
    server = await make_server(heartbeat=0.5)
    a = await server.connect("alive", sub="a")
    b = await server.connect("alive", sub="b")
    reading = asyncio.gather(_keep_reading(a, 1.5), _keep_reading(b, 1.5))
    await a.send(b"\x01during-pings")
    assert await reading == [[], [b"\x01during-pings"]]
    assert server.app[METRICS].connections_open == 2
    assert not a.ws.closed
    assert not b.ws.closed


async def test_socket_that_stops_reading_is_reaped(make_server: ServerFactory) -> None:
    server = await make_server(heartbeat=0.5)
    path = store_url("", "dead", server.token("dead", sub="dead"))
    port = int(server.http_url.rsplit(":", 1)[1])
    dead = await asyncio.to_thread(RawWebSocket.connect, port, path)
    try:
        assert server.app[METRICS].connections_open == 1
        assert await _connections_drop_to(server, 0)
        assert "dead" not in server.app[RELAY].stores
        metrics = await _scrape(server)
        assert "\nsds_stores 0.0\n" in metrics
    finally:
        dead.close()


async def _scrape(server: RunningServer) -> str:
    async with aiohttp.ClientSession() as session, session.get(server.http_url + "/metrics") as r:
        return await r.text()
