"""Limits: each one has an option and an SDS_* variable, and is enforced where the spec says."""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from sds.cli import cli
from sds.client import StoreClient, store_url
from sds.config import SETTINGS_BY_NAME, Config, ConfigError, load_config
from tests.conftest import SECRET, RunningServer, ServerFactory

LIMITS = {
    "max_frame_bytes": ("SDS_MAX_FRAME_BYTES", 32 * 1024 * 1024),
    "max_store_id_length": ("SDS_MAX_STORE_ID_LENGTH", 128),
    "max_connections": ("SDS_MAX_CONNECTIONS", 10_000),
    "max_connections_per_store": ("SDS_MAX_CONNECTIONS_PER_STORE", 1_000),
    "max_client_buffer_bytes": ("SDS_MAX_CLIENT_BUFFER_BYTES", 16 * 1024 * 1024),
    "max_chunk_bytes_per_client": ("SDS_MAX_CHUNK_BYTES_PER_CLIENT", 64 * 1024 * 1024),
    "max_chunk_bytes_total": ("SDS_MAX_CHUNK_BYTES_TOTAL", 256 * 1024 * 1024),
    "max_request_bytes": ("SDS_MAX_REQUEST_BYTES", 64 * 1024),
}
UPGRADE_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
}


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_limit_has_option_env_var_and_documented_default(name: str) -> None:
    env, default = LIMITS[name]
    setting = SETTINGS_BY_NAME[name]
    assert env in setting.env
    assert setting.option == "--" + name.replace("_", "-")
    assert getattr(Config(jwt_secret=SECRET), name) == default
    assert getattr(load_config({}, {env: "4096"}, secret=SECRET), name) == 4096
    assert getattr(load_config({name: "2048"}, {env: "4096"}, secret=SECRET), name) == 2048


@pytest.mark.parametrize("name", sorted(LIMITS))
@pytest.mark.parametrize("bad", ["0", "-1", "lots"])
def test_bad_limit_value_is_refused_naming_its_source(name: str, bad: str) -> None:
    env = LIMITS[name][0]
    with pytest.raises(ConfigError) as from_env:
        load_config({}, {env: bad}, secret=SECRET)
    assert "max-" in str(from_env.value) or env in str(from_env.value)
    with pytest.raises(ConfigError):
        load_config({name: bad}, {}, secret=SECRET)


@pytest.mark.parametrize(
    "option", ["--max-chunk-bytes-per-client", "--max-chunk-bytes-total", "--chunk-timeout"]
)
def test_serve_rejects_a_bad_chunk_memory_limit_with_exit_2(option: str) -> None:
    result = CliRunner().invoke(cli, ["serve", option, "0"], env={"SDS_JWT_SECRET": SECRET})
    assert result.exit_code == 2
    assert option.lstrip("-") in result.output
    assert "Traceback" not in result.output


async def test_frame_at_the_limit_is_relayed(make_server: ServerFactory) -> None:
    server = await make_server(max_frame_bytes=1024)
    sender = await server.connect("frames", sub="sender")
    peer = await server.connect("frames", sub="peer")
    frame = b"\x01" + b"a" * 1023
    await sender.send(frame)
    assert await peer.receive() == frame


async def test_frame_over_the_limit_closes_sender_with_1009_and_is_not_relayed(
    make_server: ServerFactory,
) -> None:
    server = await make_server(max_frame_bytes=1024)
    sender = await server.connect("big", sub="sender")
    peer = await server.connect("big", sub="peer")
    await sender.send(b"\x01" + b"b" * 1024)
    assert await sender.wait_closed() == 1009
    assert await peer.receive_all(0.3) == []
    await peer.send(b"\x01still-open")
    other = await server.connect("big", sub="other")
    await peer.send(b"\x01after")
    assert await other.receive() == b"\x01after"


async def test_default_frame_limit_accepts_a_large_patch(server: RunningServer) -> None:
    sender = await server.connect("large")
    peer = await server.connect("large")
    frame = b"\x01" + os.urandom(3 * 1024 * 1024)
    await sender.send(frame)
    assert await peer.receive(timeout=10) == frame


async def _get(url: str, **kw: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url, **kw) as response:
        return response.status, await response.json(content_type=None)


async def test_store_id_up_to_the_limit_is_accepted_longer_gets_400(server: RunningServer) -> None:
    longest = "s" * 128
    client = await server.connect(longest)
    assert client.close_code is None
    too_long = "s" * 129
    status, body = await _get(
        store_url(server.ws_url, too_long, server.token(too_long)).replace("ws://", "http://"),
        headers=UPGRADE_HEADERS,
    )
    assert status == 400
    assert "128" in body["error"]


async def test_store_id_length_counts_decoded_characters(make_server: ServerFactory) -> None:
    server = await make_server(max_store_id_length=4)
    ok = await server.connect("a/b?")
    assert ok.close_code is None
    status, body = await _get(
        store_url(server.http_url, "a/b?c", server.token("a/b?c"), path="ws"),
        headers=UPGRADE_HEADERS,
    )
    assert status == 400
    assert set(body) == {"error"}


async def _refusal(server: RunningServer, store_id: str, path: str = "ws") -> tuple[int, Any]:
    url = store_url(server.http_url, store_id, server.token(store_id), path=path)
    return await _get(url, headers=UPGRADE_HEADERS)


async def test_connections_per_store_limit_gives_503_before_upgrade(
    make_server: ServerFactory,
) -> None:
    server = await make_server(max_connections_per_store=2)
    first = await server.connect("busy", sub="a")
    await server.connect("busy", sub="b")
    status, body = await _refusal(server, "busy")
    assert status == 503
    assert "limit" in body["error"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await server.connect("busy", sub="c")
    assert refused.value.status == 503
    assert (await server.connect("other-store")).close_code is None
    await first.close()
    third = StoreClient(server.ws_url, "busy", server.token("busy", sub="c"))
    for _ in range(50):
        try:
            await third.connect()
            break
        except aiohttp.WSServerHandshakeError:
            await asyncio.sleep(0.05)
    assert third.close_code is None
    assert not third.ws.closed
    await third.close()


async def test_total_connection_limit_gives_503_on_any_store(make_server: ServerFactory) -> None:
    server = await make_server(max_connections=2)
    await server.connect("one")
    await server.connect("two")
    status, body = await _refusal(server, "three")
    assert status == 503
    assert "limit" in body["error"]
    metrics = await _metrics_text(server)
    assert 'sds_connections_refused_total{reason="max_connections"}' in metrics


async def test_signalling_room_limit_gives_503(make_server: ServerFactory) -> None:
    server = await make_server(max_connections_per_store=1)
    await server.connect("room", path="signal")
    status, body = await _refusal(server, "room", path="signal")
    assert status == 503
    assert "error" in body


async def _metrics_text(server: RunningServer) -> str:
    async with aiohttp.ClientSession() as session, session.get(server.http_url + "/metrics") as r:
        return await r.text()


async def _post_token(server: RunningServer, body: bytes, *, chunked: bool = False) -> int:
    admin = server.token("api", scope="admin", sub="admin")
    headers = {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"}

    async def stream() -> Any:
        yield body

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.http_url + "/api/token", data=stream() if chunked else body, headers=headers
        ) as response,
    ):
        body = await response.json(content_type=None)
        if response.status != 200:
            assert set(body) == {"error"}
        return response.status


async def test_token_api_body_over_64_kib_gets_413(server: RunningServer) -> None:
    filler = b" " * (64 * 1024)
    assert await _post_token(server, b'{"sub": "u", "scope": "read"}') == 200
    assert await _post_token(server, b'{"sub": "u", "scope": "read"}' + filler) == 413
    assert await _post_token(server, b'{"sub": "u", "scope": "read"}' + filler, chunked=True) == 413


async def test_request_body_limit_follows_its_option(make_server: ServerFactory) -> None:
    server = await make_server(max_request_bytes=100)
    small = b'{"sub": "u", "scope": "write"}'
    assert await _post_token(server, small) == 200
    assert await _post_token(server, small + b" " * 100) == 413


@pytest.mark.parametrize("first", ["ws", "signal"])
@pytest.mark.parametrize("extra", ["ws", "signal"])
async def test_max_connections_counts_ws_and_signal_together(
    make_server: ServerFactory, first: str, extra: str
) -> None:
    server = await make_server(max_connections=2)
    await server.connect("one", path=first)
    await server.connect("two", path="signal" if first == "ws" else "ws")
    status, body = await _refusal(server, "three", path=extra)
    assert status == 503, "refused before the upgrade"
    assert "connection limit" in body["error"]
    metrics = await _metrics_text(server)
    assert 'sds_connections_refused_total{reason="max_connections"} 1.0' in metrics
