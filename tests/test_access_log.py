"""No token (and never the secret) in any log line of a real `sds serve` process (SPEC 3)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from sds.tokens import mint_token
from tests.badtokens import claims_for, signed
from tests.conftest import RunningServer
from tests.helpers import TEST_SECRET, ServerProcess, clean_env, spawn_server

pytestmark = pytest.mark.slow

STORE = "logged"


async def wait_for_line(server: ServerProcess, fragment: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while fragment not in server.stderr:
        if time.monotonic() > deadline:
            raise AssertionError(f"log line with {fragment!r} not written within {timeout}s")
        await asyncio.sleep(0.05)


async def exercise(server: ServerProcess, tokens: dict[str, str]) -> None:
    """Accepted and refused requests on every endpoint, tokens in the query where allowed."""
    base = server.ws_url
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.ws_connect(f"{base}/ws/{STORE}?token={tokens['accepted']}") as ws:
            await ws.send_bytes(b"\x01logged patch")
            await ws.close()
        for name in ("refused", "expired", "other_store"):
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await session.ws_connect(f"{base}/ws/{STORE}?token={tokens[name]}")
        async with session.ws_connect(f"{base}/signal/{STORE}?token={tokens['accepted']}") as ws:
            await ws.close()
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await session.ws_connect(f"{base}/signal/{STORE}?token={tokens['refused']}")
        async with session.post(
            f"{server.http_url}/api/token",
            json={"sub": "minted", "scope": "read"},
            headers={"Authorization": f"Bearer {tokens['admin']}"},
        ) as response:
            assert response.status == 200
            tokens["minted"] = (await response.json())["token"]
        async with session.post(
            f"{server.http_url}/api/token?token={tokens['admin']}",
            json={"sub": "x", "scope": "read"},
        ) as response:
            assert response.status == 401


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_no_token_or_secret_in_any_log_line(tmp_path: Path, log_format: str) -> None:
    now = int(time.time())
    tokens = {
        "accepted": mint_token(TEST_SECRET, store_id=STORE, scope="write", sub="writer"),
        "admin": mint_token(TEST_SECRET, store_id=STORE, scope="admin", sub="boss"),
        "refused": signed("wrong-secret-" + "w" * 40, claims_for(STORE)),
        "expired": signed(TEST_SECRET, claims_for(STORE, exp=now - 60)),
        "other_store": mint_token(TEST_SECRET, store_id="elsewhere", scope="write", sub="w"),
    }
    args = ["--log-level", "debug", "--log-format", log_format]
    with spawn_server(args, env=clean_env(secret=TEST_SECRET), cwd=tmp_path) as server:
        await exercise(server, tokens)
        await wait_for_line(server, f"/ws/{STORE}")
        await wait_for_line(server, "close store=")
        assert server.stop() == 0
        log = server.stderr + server.stdout

    access_lines = [line for line in log.splitlines() if f"/ws/{STORE}" in line]
    assert any("101" in line for line in access_lines), "the access log line of the upgrade"
    assert any("401" in line for line in access_lines), "the access log line of a refusal"
    assert "refused tokens" in log, "auth failures are summarised"
    leaked = [name for name, token in tokens.items() if token in log]
    signatures = [name for name, token in tokens.items() if token.rsplit(".", 1)[1] in log]
    assert leaked == [], "tokens found in the log"
    assert signatures == [], "token signatures found in the log"
    assert "token=" not in log
    assert TEST_SECRET not in log, "the secret is in the log"


async def test_default_aiohttp_access_log_never_shows_the_token(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever serves create_app() with aiohttp's default access log: no token in it."""
    import logging

    caplog.set_level(logging.INFO, logger="aiohttp.access")
    token = server.token("redacted-store")
    async with server.client("redacted-store", token=token) as client:
        await client.send(b"\x04hello")
    bad = token[:-4] + "AAAA"
    refused = server.client("redacted-store", token=bad)
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await refused.connect()
    await asyncio.sleep(0.2)
    lines = [record.getMessage() for record in caplog.records if record.name == "aiohttp.access"]
    assert any("/ws/redacted-store" in line for line in lines)
    signature = token.rsplit(".", 1)[1]
    assert not any(signature in line or bad.rsplit(".", 1)[1] in line for line in lines)
    assert all("token=[redacted]" in line for line in lines if "/ws/redacted-store" in line)
