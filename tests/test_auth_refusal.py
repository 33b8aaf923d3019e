"""--auth-refusal close: refused tokens get an upgrade and an immediate 4001 / 4003 close.

The SDS sidecar tells a bad token from a network problem only by these close
codes (as the Node server sent them). The default, --auth-refusal http, is
covered by tests/test_auth.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import quote

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sds.config import ConfigError, load_config
from tests.badtokens import claims_for, signed
from tests.conftest import SECRET, RunningServer, ServerFactory
from tests.helpers import TEST_SECRET, clean_env, spawn_server, upgrade_request
from tests.raw_ws import RawWebSocket

STORE = "sidecar-notes"


@pytest.fixture
async def closing_server(make_server: ServerFactory) -> RunningServer:
    return await make_server(auth_refusal="close")


def refused(secret: str = SECRET) -> dict[str, tuple[str, int, str]]:
    """Name: (token, close code, reason) for tokens refused on STORE."""
    now = int(time.time())
    return {
        "expired": (
            signed(secret, claims_for(STORE, iat=now - 7200, exp=now - 60)),
            4001,
            "token expired",
        ),
        "malformed": ("this is not a token", 4001, "malformed token"),
        "bad_signature": (signed("x" * 40, claims_for(STORE)), 4001, "bad token signature"),
        "wrong_store": (
            signed(secret, claims_for("another-store")),
            4003,
            "token is for another store",
        ),
    }


def endpoint(base: str, path: str, token: str | None) -> str:
    url = f"{base}/{path}/{quote(STORE)}"
    return url if token is None else f"{url}?token={quote(token, safe='')}"


async def close_of(url: str, headers: dict[str, str] | None = None) -> tuple[int | None, str]:
    """Open a WebSocket (it must upgrade) and read until the server closes it: (code, reason)."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.ws_connect(url, headers=headers or {}, autoclose=True) as ws,
    ):
        message = await ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE, message
        return ws.close_code, str(message.extra or "")


async def metrics(server: RunningServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.http_url}/metrics") as response,
    ):
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.parametrize("path", ["ws", "signal"])
@pytest.mark.parametrize("case", ["expired", "malformed", "bad_signature", "wrong_store"])
async def test_refused_token_is_upgraded_and_closed_with_the_node_close_code(
    closing_server: RunningServer, path: str, case: str
) -> None:
    token, code, reason = refused()[case]
    assert await close_of(endpoint(closing_server.ws_url, path, token)) == (code, reason)


@pytest.mark.parametrize("path", ["ws", "signal"])
async def test_missing_token_and_bearer_tokens_are_closed_too(
    closing_server: RunningServer, path: str
) -> None:
    assert await close_of(endpoint(closing_server.ws_url, path, None)) == (4001, "missing token")
    token, code, reason = refused()["wrong_store"]
    headers = {"Authorization": f"Bearer {token}"}
    assert await close_of(endpoint(closing_server.ws_url, path, None), headers) == (code, reason)


async def test_a_frame_sent_after_the_refused_upgrade_is_never_handled(
    closing_server: RunningServer,
) -> None:
    reader = await closing_server.connect(STORE)
    before = await metrics(closing_server)
    token = refused()["expired"][0]
    refused_ws = await asyncio.to_thread(
        RawWebSocket.connect, closing_server.server.port, f"/ws/{STORE}?token={quote(token)}"
    )
    try:
        # Sent at once, before reading anything: the close frame may still be in flight.
        await asyncio.to_thread(refused_ws.send_binary, b"\x01a patch from a refused client")
        await asyncio.to_thread(refused_ws.send_binary, b"\x04{}")
        code, frames = await asyncio.to_thread(refused_ws.read_until_close, 5.0)
        # The client never answers the close: the server cuts the socket (after 2 s).
        cut, more = await asyncio.to_thread(refused_ws.read_until_close, 15.0)
        eof = await asyncio.to_thread(refused_ws.sock.recv, 1)
    finally:
        refused_ws.close()
    assert (code, frames) == (4001, 0)
    assert (cut, more, eof) == (None, 0, b"")
    assert await reader.receive_all(window=0.5) == []
    after = await metrics(closing_server)
    for unchanged in ("sds_frames_received_total", "sds_connections_opened_total"):
        assert after[(unchanged, ())] == before[(unchanged, ())], unchanged
    assert after[("sds_connections", ())] == 1
    assert after[("sds_auth_failures_total", (("reason", "expired"),))] == 1


async def test_refusals_by_close_are_counted_and_logged_as_a_summary(
    closing_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sds.auth")
    cases = refused()
    for _ in range(3):
        for name in ("expired", "wrong_store"):
            await close_of(endpoint(closing_server.ws_url, "ws", cases[name][0]))
    await close_of(endpoint(closing_server.ws_url, "signal", cases["malformed"][0]))
    samples = await metrics(closing_server)
    assert samples[("sds_auth_failures_total", (("reason", "expired"),))] == 3
    assert samples[("sds_auth_failures_total", (("reason", "wrong_store"),))] == 3
    assert samples[("sds_auth_failures_total", (("reason", "malformed"),))] == 1
    summaries = [r for r in caplog.records if "refused tokens" in r.getMessage()]
    assert len(summaries) <= 1, [r.getMessage() for r in summaries]
    for record in caplog.records:
        for token, _, _ in cases.values():
            assert token not in record.getMessage()


async def test_refusals_that_are_not_about_the_token_stay_http(
    make_server: ServerFactory,
) -> None:
    server = await make_server(
        auth_refusal="close",
        allowed_origins=("https://app.example",),
        max_store_id_length=16,
        max_connections_per_store=1,
    )
    long_id = "x" * 17
    status, body, _ = await upgrade_request(
        f"{server.ws_url}/ws/{long_id}?token={server.token(long_id)}"
    )
    assert status == 400 and "store id" in body["error"]
    url = endpoint(server.ws_url, "ws", server.token(STORE))
    status, body, _ = await upgrade_request(url, headers={"Origin": "https://evil.example"})
    assert status == 403 and body == {"error": "origin not allowed"}
    await server.connect(STORE)
    status, body, _ = await upgrade_request(url)
    assert status == 503


async def test_a_plain_get_with_a_refused_token_gets_the_http_refusal(
    closing_server: RunningServer,
) -> None:
    token = refused()["expired"][0]
    async with (
        aiohttp.ClientSession() as session,
        session.get(endpoint(closing_server.http_url, "ws", token)) as response,
    ):
        assert response.status == 401
        assert await response.json() == {"error": "token expired"}


async def test_default_refusal_is_http_before_the_upgrade(server: RunningServer) -> None:
    token = refused()["wrong_store"][0]
    status, body, _ = await upgrade_request(endpoint(server.ws_url, "ws", token))
    assert (status, body) == (403, {"error": "token is for another store"})


def test_auth_refusal_comes_from_the_environment_and_refuses_unknown_modes() -> None:
    environ = {"SDS_JWT_SECRET": SECRET}
    assert load_config(environ=environ).auth_refusal == "http"
    assert load_config(environ={**environ, "SDS_AUTH_REFUSAL": "close"}).auth_refusal == "close"
    assert (
        load_config({"auth_refusal": "http"}, {**environ, "SDS_AUTH_REFUSAL": "close"}).auth_refusal
        == "http"
    )
    with pytest.raises(ConfigError, match="SDS_AUTH_REFUSAL: must be one of http, close"):
        load_config(environ={**environ, "SDS_AUTH_REFUSAL": "sometimes"})


async def test_sds_serve_with_auth_refusal_close_closes_a_wrong_store_token_with_4003(
    tmp_path: object,
) -> None:
    with spawn_server(["--auth-refusal", "close"], cwd=str(tmp_path)) as server:
        token, code, reason = refused(TEST_SECRET)["wrong_store"]
        assert await close_of(endpoint(server.ws_url, "ws", token)) == (code, reason)
    with spawn_server(
        env=clean_env(secret=TEST_SECRET, SDS_AUTH_REFUSAL="close"), cwd=str(tmp_path)
    ) as server:
        token, code, reason = refused(TEST_SECRET)["expired"]
        assert await close_of(endpoint(server.ws_url, "signal", token)) == (code, reason)
