"""GET /signal/{store_id}: WebRTC signalling rooms (SPEC 5)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from sds.client import ClientClosed, StoreClient
from tests.badtokens import refused_tokens
from tests.conftest import SECRET, RunningServer
from tests.helpers import upgrade_request

ROOM = "room"
QUIET = 0.3


async def peer(server: RunningServer, room: str = ROOM, scope: str = "write") -> StoreClient:
    return await server.connect(room, scope=scope, path="signal")


async def say(client: StoreClient, **message: Any) -> str:
    text = json.dumps(message)
    await client.send_text(text)
    return text


async def heard(client: StoreClient, timeout: float = 5.0) -> str:
    msg = await client.receive_message(timeout)
    assert msg.type is aiohttp.WSMsgType.TEXT, "signalling messages must stay text"
    return str(msg.data)


async def silent(client: StoreClient, window: float = QUIET) -> bool:
    try:
        await client.receive_message(window)
    except TimeoutError:
        return True
    except ClientClosed:
        return False
    return False


async def introduce(*clients: tuple[StoreClient, str]) -> None:
    """Each client says hello with its id; every other client hears it."""
    for client, name in clients:
        text = await say(client, type="hello", **{"from": name})
        for other, _ in clients:
            if other is not client:
                assert await heard(other) == text


async def test_message_without_to_reaches_every_other_peer(server: RunningServer) -> None:
    a, b, c = await peer(server), await peer(server), await peer(server)
    text = await say(a, type="hello", **{"from": "a"})
    assert await heard(b) == text
    assert await heard(c) == text
    assert await silent(a)


async def test_text_is_relayed_as_the_same_text(server: RunningServer) -> None:
    a, b = await peer(server), await peer(server)
    text = '{ "type":"candidate",  "from":"a", "candidate": {"c": "ünï ☃"} }'
    await a.send_text(text)
    assert await heard(b) == text


async def test_message_with_to_reaches_only_that_peer(server: RunningServer) -> None:
    a, b, c = await peer(server), await peer(server), await peer(server)
    await introduce((a, "a"), (b, "b"), (c, "c"))
    offer = await say(a, type="offer", to="b", sdp="v=0", **{"from": "a"})
    assert await heard(b) == offer
    assert await silent(c)
    assert await silent(a)
    answer = await say(b, type="answer", to="a", sdp="v=0", **{"from": "b"})
    assert await heard(a) == answer
    assert await silent(c)


async def test_unknown_to_is_dropped(server: RunningServer) -> None:
    a, b = await peer(server), await peer(server)
    await introduce((a, "a"), (b, "b"))
    await say(a, type="offer", to="nobody", sdp="x", **{"from": "a"})
    await say(a, type="offer", to=42, sdp="x", **{"from": "a"})
    assert await silent(b)
    assert not a.ws.closed


async def test_to_a_peer_that_never_spoke_is_dropped(server: RunningServer) -> None:
    a, b = await peer(server), await peer(server)
    await say(a, type="offer", to="b", sdp="x", **{"from": "a"})
    assert await silent(b)


async def test_peer_id_is_fixed_by_first_from(server: RunningServer) -> None:
    a, b = await peer(server), await peer(server)
    await introduce((a, "a"), (b, "b"))
    await say(a, type="hello", **{"from": "mallory"})
    assert await silent(b), "a message with another from is dropped"
    await say(b, type="offer", to="mallory", sdp="x", **{"from": "b"})
    assert await silent(a), "the second id was never claimed"
    again = await say(a, type="hello", **{"from": "a"})
    assert await heard(b) == again


async def test_id_held_by_another_connection_cannot_be_claimed(server: RunningServer) -> None:
    a, b, thief = await peer(server), await peer(server), await peer(server)
    hello_a = await say(a, type="hello", **{"from": "a"})
    assert await heard(b) == hello_a
    assert await heard(thief) == hello_a
    await say(thief, type="hello", **{"from": "a"})
    assert await silent(b), "the impostor's message is dropped"
    offer = await say(b, type="offer", to="a", sdp="x", **{"from": "b"})
    assert await heard(a) == offer
    assert await silent(thief)


async def test_id_is_free_again_after_its_holder_left(server: RunningServer) -> None:
    a, b, later = await peer(server), await peer(server), await peer(server)
    await introduce((a, "a"), (b, "b"), (later, "z"))
    await a.close()
    # `later` already holds "z"; a fresh connection takes over "a".
    fresh = await peer(server)
    hello = await say(fresh, type="hello", **{"from": "a"})
    assert await heard(b) == hello
    offer = await say(b, type="offer", to="a", sdp="x", **{"from": "b"})
    assert await heard(fresh) == offer


@pytest.mark.parametrize(
    "text", ["not json", "[1, 2]", '"hello"', "42", "null", "", '{"type": "hello"}', '{"from": 7}']
)
async def test_invalid_messages_are_dropped_without_closing(
    server: RunningServer, text: str
) -> None:
    a, b = await peer(server), await peer(server)
    await a.send_text(text)
    assert await silent(b)
    hello = await say(a, type="hello", **{"from": "a"})
    assert await heard(b) == hello
    assert not a.ws.closed


async def test_binary_frames_are_dropped_without_closing(server: RunningServer) -> None:
    a, b = await peer(server), await peer(server)
    await a.send(b'{"type":"hello","from":"a"}')
    assert await silent(b)
    hello = await say(a, type="hello", **{"from": "a"})
    assert await heard(b) == hello


async def test_rooms_are_per_store_and_separate_from_ws(server: RunningServer) -> None:
    a, other_room = await peer(server, "one"), await peer(server, "two")
    ws_client = await server.connect("one")
    await say(a, type="hello", **{"from": "a"})
    assert await silent(other_room)
    assert await ws_client.receive_all(QUIET) == []
    ws_peer = await server.connect("one")
    await ws_peer.send(b"\x01patch")
    assert await ws_client.receive() == b"\x01patch"
    assert await silent(a)


async def test_read_scope_may_signal(server: RunningServer) -> None:
    a, b = await peer(server, scope="read"), await peer(server, scope="read")
    hello = await say(a, type="hello", **{"from": "a"})
    assert await heard(b) == hello


@pytest.mark.parametrize("name", ["alg_none", "hs512", "expired", "empty_sub", "aud_a_list"])
async def test_bad_tokens_are_refused_with_401(server: RunningServer, name: str) -> None:
    token = refused_tokens(SECRET, ROOM)[name]
    status, body, _ = await upgrade_request(
        f"{server.http_url}/signal/{ROOM}?token={quote(token, safe='')}"
    )
    assert status == 401
    assert isinstance(body, dict) and body["error"]


async def test_missing_token_is_401_and_other_store_403(server: RunningServer) -> None:
    status, body, _ = await upgrade_request(f"{server.http_url}/signal/{ROOM}")
    assert (status, bool(body and body.get("error"))) == (401, True)
    other = server.token("elsewhere")
    status, body, _ = await upgrade_request(f"{server.http_url}/signal/{ROOM}?token={other}")
    assert (status, bool(body and body.get("error"))) == (403, True)


async def test_bearer_token_and_decoded_store_id(server: RunningServer) -> None:
    status, _, _ = await upgrade_request(
        f"{server.http_url}/signal/a%2Fb",
        headers={"Authorization": f"Bearer {server.token('a/b')}"},
    )
    assert status == 101
    status, _, _ = await upgrade_request(
        f"{server.http_url}/signal/{'x' * 129}?token={server.token('x' * 129)}"
    )
    assert status == 400


async def test_signal_connection_is_closed_with_4001_at_token_expiry(server: RunningServer) -> None:
    import time

    token = server.token("expiring-room", expires_in=1.5)
    client = StoreClient(server.ws_url, "expiring-room", token, path="signal")
    await client.connect()
    try:
        started = time.monotonic()
        assert await client.wait_closed(timeout=6) == 4001
        assert time.monotonic() - started < 4.5
    finally:
        await client.close()


async def test_deeply_nested_message_is_dropped_counted_and_the_connection_stays(
    server: RunningServer,
) -> None:
    a, b = await peer(server), await peer(server)
    await a.send_text('{"from": "a", "x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    assert await silent(b)
    hello = await say(a, type="hello", **{"from": "a"})
    assert await heard(b) == hello
    assert not a.ws.closed
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.http_url + "/metrics") as response,
    ):
        text = await response.text()
    assert 'sds_frames_dropped_total{reason="signal_invalid"} 1.0' in text
