"""POST /api/token: an admin of a store issues short-lived tokens for that store (SPEC 6)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest

from sds.tokens import verify_token
from tests.badtokens import refused_tokens
from tests.conftest import SECRET, RunningServer, ServerFactory
from tests.test_tokens import EXPIRY_DURATIONS

STORE = "team"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def post(
    session: aiohttp.ClientSession,
    server: RunningServer,
    body: Any = None,
    *,
    token: str | None = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else json.dumps(body).encode()
    async with session.post(
        f"{server.http_url}/api/token", data=data, headers=all_headers
    ) as response:
        try:
            parsed = await response.json(content_type=None)
        except ValueError:
            parsed = None
        return response.status, parsed, response


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def admin(server: RunningServer, store: str = STORE) -> str:
    """An admin token that outlives what the tests mint (minted tokens are capped at it)."""
    return server.token(store, "admin", "boss", expires_in=400 * 86400)


async def test_admin_mints_a_token_for_its_store(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    status, body, response = await post(
        session, server, {"sub": "alice", "scope": "write"}, token=admin(server)
    )
    assert status == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert response.content_type == "application/json"
    assert set(body) == {"token", "exp"}
    claims = verify_token(body["token"], SECRET, store_id=STORE)
    assert (claims.sub, claims.aud, claims.scope) == ("alice", STORE, "write")


async def test_minted_token_opens_the_store(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    _, body, _ = await post(session, server, {"sub": "w", "scope": "write"}, token=admin(server))
    _, read_body, _ = await post(
        session, server, {"sub": "r", "scope": "read"}, token=admin(server)
    )
    writer = await server.connect(STORE, token=body["token"])
    reader = await server.connect(STORE, token=read_body["token"])
    await writer.send(b"\x01minted")
    assert await reader.receive() == b"\x01minted"
    await reader.send(b"\x01read-scope-patch")
    assert await writer.receive_all(0.3) == [], "the minted read token keeps read scope"


async def test_aud_comes_from_the_admin_token_never_the_body(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    status, body, _ = await post(
        session,
        server,
        {"sub": "alice", "scope": "admin", "aud": "someone-elses-store"},
        token=admin(server),
    )
    assert status == 200
    assert claims_of(body["token"])["aud"] == STORE


@pytest.mark.parametrize(("exp", "seconds"), [*EXPIRY_DURATIONS, (120, 120)])
async def test_exp_durations(
    server: RunningServer, session: aiohttp.ClientSession, exp: Any, seconds: int
) -> None:
    status, body, _ = await post(
        session, server, {"sub": "a", "scope": "read", "exp": exp}, token=admin(server)
    )
    assert status == 200
    claims = claims_of(body["token"])
    assert claims["exp"] - claims["iat"] == seconds


async def test_default_expiry_is_24h_and_iat_always_set(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    _, body, _ = await post(session, server, {"sub": "a", "scope": "read"}, token=admin(server))
    claims = claims_of(body["token"])
    assert isinstance(claims["iat"], int)
    assert claims["exp"] - claims["iat"] == 86400
    assert "iss" not in claims


async def test_iss_is_set_when_configured(
    make_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    server = await make_server(issuer="sds-prod")
    status, body, _ = await post(
        session, server, {"sub": "a", "scope": "write"}, token=admin(server)
    )
    assert status == 200
    claims = claims_of(body["token"])
    assert claims["iss"] == "sds-prod"
    assert "iat" in claims
    assert (await server.connect(STORE, token=body["token"])).ws.closed is False


async def test_missing_authorization_is_401(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    status, body, _ = await post(session, server, {"sub": "a", "scope": "read"})
    assert status == 401
    assert body["error"]


async def test_admin_token_in_query_is_not_accepted(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{server.http_url}/api/token?token={admin(server)}", json={"sub": "a", "scope": "read"}
    ) as response:
        assert response.status == 401


@pytest.mark.parametrize(
    "name", ["alg_none", "expired", "tampered_payload", "garbage", "aud_a_list"]
)
async def test_invalid_bearer_is_401(
    server: RunningServer, session: aiohttp.ClientSession, name: str
) -> None:
    bad = refused_tokens(SECRET, STORE)[name]
    status, body, _ = await post(session, server, {"sub": "a", "scope": "read"}, token=bad)
    assert status == 401
    assert body["error"]


@pytest.mark.parametrize("scope", ["read", "write"])
async def test_non_admin_is_403(
    server: RunningServer, session: aiohttp.ClientSession, scope: str
) -> None:
    status, body, _ = await post(
        session, server, {"sub": "a", "scope": "read"}, token=server.token(STORE, scope)
    )
    assert status == 403
    assert body["error"]


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b"\xff\xfe",
        b"[]",
        b'"sub"',
        b"42",
        b"null",
        b"{}",
        b'{"scope": "read"}',
        b'{"sub": "", "scope": "read"}',
        b'{"sub": "   ", "scope": "read"}',
        b'{"sub": 5, "scope": "read"}',
        b'{"sub": "a"}',
        b'{"sub": "a", "scope": "owner"}',
        b'{"sub": "a", "scope": ["read"]}',
        b'{"sub": "a", "scope": "read", "exp": "soon"}',
        b'{"sub": "a", "scope": "read", "exp": "3600"}',
        b'{"sub": "a", "scope": "read", "exp": ""}',
        b'{"sub": "a", "scope": "read", "exp": -60}',
        b'{"sub": "a", "scope": "read", "exp": 0}',
        b'{"sub": "a", "scope": "read", "exp": true}',
        b'{"sub": "a", "scope": "read", "exp": null}',
        b'{"sub": "a", "scope": "read", "exp": "1000y"}',
    ],
)
async def test_bad_body_is_400_with_a_message(
    server: RunningServer, session: aiohttp.ClientSession, raw: bytes
) -> None:
    status, body, _ = await post(session, server, raw=raw, token=admin(server))
    assert status == 400
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"]


async def test_body_over_64_kib_is_413(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    big = json.dumps({"sub": "a", "scope": "read", "pad": "x" * 65 * 1024}).encode()
    status, body, _ = await post(session, server, raw=big, token=admin(server))
    assert status == 413, body
    assert body["error"]


async def test_chunked_body_over_64_kib_is_413(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"sub": "a", "scope": "read", "pad": "'
        for _ in range(70):
            yield b"x" * 1024
        yield b'"}'

    async with session.post(
        f"{server.http_url}/api/token",
        data=chunks(),
        headers={"Authorization": f"Bearer {admin(server)}"},
    ) as response:
        assert response.status == 413


async def test_body_just_under_the_limit_is_accepted(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    prefix = b'{"sub": "a", "scope": "read", "pad": "'
    raw = prefix + b"x" * (64 * 1024 - len(prefix) - 2) + b'"}'
    assert len(raw) == 64 * 1024
    status, _, _ = await post(session, server, raw=raw, token=admin(server))
    assert status == 200


async def test_get_is_not_allowed(server: RunningServer, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{server.http_url}/api/token") as response:
        assert response.status == 405


def _raw_post(port: int, head: bytes, parts: list[bytes]) -> tuple[int, Any]:
    """POST over a socket: ``head`` then each part in a TCP segment of its own; status and JSON."""
    import socket
    import time

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(head)
        for part in parts:
            time.sleep(0.1)
            sock.sendall(part)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < 2:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    body = answer.split(b"\r\n\r\n", 1)[1]
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def _head(server: RunningServer, extra: str) -> bytes:
    return (
        f"POST /api/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Bearer {admin(server)}\r\nContent-Type: application/json\r\n{extra}\r\n"
    ).encode()


async def test_a_body_in_two_tcp_segments_is_read_whole(server: RunningServer) -> None:
    import asyncio

    body = json.dumps({"sub": "split", "scope": "read"}).encode()
    head = _head(server, f"Content-Length: {len(body)}\r\n")
    status, answer = await asyncio.to_thread(
        _raw_post, server.server.port, head, [body[:10], body[10:]]
    )
    assert status == 200, answer
    assert claims_of(answer["token"])["sub"] == "split"


async def test_a_chunked_70_kb_body_is_413_with_a_json_error(server: RunningServer) -> None:
    import asyncio

    head = _head(server, "Transfer-Encoding: chunked\r\n")
    piece = b"x" * 10_000
    chunks = [b'{"sub": "a", "scope": "read", "pad": "']
    chunks += [piece] * 7 + [b'"}']
    parts = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for chunk in chunks] + [b"0\r\n\r\n"]
    status, answer = await asyncio.to_thread(_raw_post, server.server.port, head, parts)
    assert status == 413, answer
    assert "larger than" in answer["error"]


async def test_deeply_nested_json_is_400_with_a_json_error(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    deep = b"[" * 30_000 + b"]" * 30_000
    status, body, _ = await post(session, server, raw=deep, token=admin(server))
    assert status == 400
    assert "nested" in body["error"]
    async with session.post(
        f"{server.http_url}/api/stores/{STORE}/compact",
        data=deep,
        headers={"Authorization": f"Bearer {admin(server)}"},
    ) as response:
        assert response.status == 400
        assert "nested" in (await response.json())["error"]


async def test_a_minted_token_never_outlives_the_admin_token(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    short_admin = server.token(STORE, "admin", "boss", expires_in=600)
    admin_exp = claims_of(short_admin)["exp"]
    status, body, _ = await post(
        session, server, {"sub": "a", "scope": "admin", "exp": "100y"}, token=short_admin
    )
    assert status == 200
    assert claims_of(body["token"])["exp"] <= admin_exp
    assert body["exp"] == claims_of(body["token"])["exp"]
    status, body, _ = await post(
        session, server, {"sub": "a", "scope": "read", "exp": "60s"}, token=short_admin
    )
    assert claims_of(body["token"])["exp"] - claims_of(body["token"])["iat"] == 60


async def test_mint_beyond_admin_expiry_lifts_the_cap(
    make_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    server = await make_server(mint_beyond_admin_expiry=True)
    short_admin = server.token(STORE, "admin", "boss", expires_in=600)
    status, body, _ = await post(
        session, server, {"sub": "a", "scope": "read", "exp": "7d"}, token=short_admin
    )
    assert status == 200
    assert claims_of(body["token"])["exp"] > claims_of(short_admin)["exp"] + 86400
