"""Who may open GET /ws/{store_id}: every refusal happens before the upgrade (SPEC 3)."""

from __future__ import annotations

from urllib.parse import quote

import aiohttp
import pytest

from sds.client import StoreClient
from tests.badtokens import claims_for, refused_tokens, signed
from tests.conftest import SECRET, RunningServer, ServerFactory
from tests.helpers import upgrade_request

STORE = "notes"
BAD = refused_tokens(SECRET, STORE)


def ws_url(server: RunningServer, path_store: str, token: str | None = None) -> str:
    url = f"{server.http_url}/ws/{path_store}"
    return f"{url}?token={quote(token, safe='')}" if token is not None else url


def assert_refused(status: int, body: object, headers: object, expected: int) -> None:
    assert status == expected
    assert isinstance(body, dict)
    assert isinstance(body.get("error"), str)
    assert body["error"]
    assert "Sec-WebSocket-Accept" not in headers  # type: ignore[operator]


@pytest.mark.parametrize("name", sorted(BAD))
async def test_bad_token_in_query_is_refused_with_401(server: RunningServer, name: str) -> None:
    status, body, headers = await upgrade_request(ws_url(server, STORE, BAD[name]))
    assert_refused(status, body, headers, 401)


@pytest.mark.parametrize("name", ["alg_none", "rs256_header", "expired", "aud_a_list", "garbage"])
async def test_bad_token_as_bearer_is_refused_with_401(server: RunningServer, name: str) -> None:
    status, body, headers = await upgrade_request(
        ws_url(server, STORE), headers={"Authorization": f"Bearer {BAD[name]}"}
    )
    assert_refused(status, body, headers, 401)


async def test_missing_token_is_401(server: RunningServer) -> None:
    status, body, headers = await upgrade_request(ws_url(server, STORE))
    assert_refused(status, body, headers, 401)


async def test_empty_token_is_401(server: RunningServer) -> None:
    status, body, headers = await upgrade_request(ws_url(server, STORE, ""))
    assert_refused(status, body, headers, 401)


async def test_very_large_token_is_refused_cheaply(server: RunningServer) -> None:
    token = signed(SECRET, claims_for(STORE, padding="p" * 100_000))
    status, _, _ = await upgrade_request(
        ws_url(server, STORE), headers={"Authorization": f"Bearer {token}"}
    )
    assert status in (400, 401, 413, 431)
    status, _, _ = await upgrade_request(ws_url(server, STORE, server.token(STORE)))
    assert status == 101, "the server still serves after a huge token"


async def test_valid_token_for_another_store_is_403(server: RunningServer) -> None:
    status, body, headers = await upgrade_request(ws_url(server, STORE, server.token("elsewhere")))
    assert_refused(status, body, headers, 403)


async def test_invalid_token_for_another_store_is_401(server: RunningServer) -> None:
    token = signed(SECRET, claims_for("elsewhere", sub=""))
    status, body, headers = await upgrade_request(ws_url(server, STORE, token))
    assert_refused(status, body, headers, 401)


@pytest.mark.parametrize("scope", ["read", "write", "admin"])
async def test_valid_token_upgrades(server: RunningServer, scope: str) -> None:
    status, _, headers = await upgrade_request(ws_url(server, STORE, server.token(STORE, scope)))
    assert status == 101
    assert "Sec-WebSocket-Accept" in headers


async def test_bearer_token_is_accepted_and_relays(server: RunningServer) -> None:
    token = server.token(STORE)
    sender = await server.connect(STORE, token=token, bearer=True)
    receiver = await server.connect(STORE)
    await sender.send(b"\x01via-bearer")
    assert await receiver.receive() == b"\x01via-bearer"


async def test_bearer_header_wins_over_query(server: RunningServer) -> None:
    good, bad = server.token(STORE), BAD["expired"]
    status, _, _ = await upgrade_request(
        ws_url(server, STORE, bad), headers={"Authorization": f"Bearer {good}"}
    )
    assert status == 101
    status, body, headers = await upgrade_request(
        ws_url(server, STORE, good), headers={"Authorization": f"Bearer {bad}"}
    )
    assert_refused(status, body, headers, 401)


async def test_other_authorization_schemes_fall_back_to_query(server: RunningServer) -> None:
    status, _, _ = await upgrade_request(
        ws_url(server, STORE, server.token(STORE)), headers={"Authorization": "Basic dTpw"}
    )
    assert status == 101


async def test_issuer_configured_requires_matching_iss(make_server: ServerFactory) -> None:
    server = await make_server(issuer="sds-prod")
    right = signed(SECRET, claims_for(STORE, iss="sds-prod"))
    wrong = signed(SECRET, claims_for(STORE, iss="sds-dev"))
    missing = signed(SECRET, claims_for(STORE))
    assert (await upgrade_request(ws_url(server, STORE, right)))[0] == 101
    for token in (wrong, missing):
        status, body, headers = await upgrade_request(ws_url(server, STORE, token))
        assert_refused(status, body, headers, 401)


async def test_issuer_not_configured_ignores_iss(server: RunningServer) -> None:
    token = signed(SECRET, claims_for(STORE, iss="anything"))
    assert (await upgrade_request(ws_url(server, STORE, token)))[0] == 101


async def test_percent_encoded_store_id_is_decoded(server: RunningServer) -> None:
    token = server.token("a/b")
    status, _, _ = await upgrade_request(ws_url(server, "a%2Fb", token))
    assert status == 101
    encoded = server.token("a%2Fb")
    status, body, headers = await upgrade_request(ws_url(server, "a%2Fb", encoded))
    assert_refused(status, body, headers, 403)


async def test_decoded_store_id_is_one_store(server: RunningServer) -> None:
    # StoreClient percent-encodes the id; a second client names it with %2F by hand.
    sender = await server.connect("team/notes")
    url = f"{server.ws_url}/ws/team%2Fnotes?token={server.token('team/notes')}"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as receiver:
        await sender.send(b"\x01slash")
        msg = await receiver.receive(timeout=5)
        assert msg.data == b"\x01slash"


async def test_unicode_and_space_store_ids(server: RunningServer) -> None:
    for store_id in ("café", "with space", "emoji-\U0001f600"):
        status, _, _ = await upgrade_request(
            ws_url(server, quote(store_id, safe=""), server.token(store_id))
        )
        assert status == 101, store_id


async def test_store_id_too_long_is_400(server: RunningServer) -> None:
    status, body, headers = await upgrade_request(
        ws_url(server, "x" * 129, server.token("x" * 129))
    )
    assert_refused(status, body, headers, 400)
    status, _, _ = await upgrade_request(ws_url(server, "x" * 128, server.token("x" * 128)))
    assert status == 101


async def test_store_id_length_counts_decoded_characters(make_server: ServerFactory) -> None:
    server = await make_server(max_store_id_length=3)
    # "a/b" is 3 characters although its path segment "a%2Fb" is 5.
    assert (await upgrade_request(ws_url(server, "a%2Fb", server.token("a/b"))))[0] == 101
    status, body, headers = await upgrade_request(ws_url(server, "abcd", server.token("abcd")))
    assert_refused(status, body, headers, 400)


async def test_store_id_is_checked_before_the_token(server: RunningServer) -> None:
    status, body, headers = await upgrade_request(ws_url(server, "x" * 200))
    assert_refused(status, body, headers, 400)


async def test_origin_not_allowed_is_403(make_server: ServerFactory) -> None:
    server = await make_server(allowed_origins=("https://app.example",))
    url = ws_url(server, STORE, server.token(STORE))
    status, body, headers = await upgrade_request(url, headers={"Origin": "https://evil.example"})
    assert_refused(status, body, headers, 403)
    assert (await upgrade_request(url, headers={"Origin": "https://app.example"}))[0] == 101
    assert (await upgrade_request(url))[0] == 101, "non-browser clients send no Origin"


async def test_any_origin_by_default(server: RunningServer) -> None:
    url = ws_url(server, STORE, server.token(STORE))
    assert (await upgrade_request(url, headers={"Origin": "https://any.example"}))[0] == 101


async def test_refusals_are_counted_by_reason_in_metrics(server: RunningServer) -> None:
    await upgrade_request(ws_url(server, STORE, BAD["expired"]))
    await upgrade_request(ws_url(server, STORE, server.token("elsewhere")))
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.http_url}/metrics") as response,
    ):
        text = await response.text()
    assert 'reason="expired"' in text
    assert 'reason="wrong_store"' in text
    assert STORE not in text
    assert "elsewhere" not in text


async def test_client_sees_refusal_status(server: RunningServer) -> None:
    client = StoreClient(server.ws_url, STORE, BAD["nbf_future"])
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.connect()
    assert caught.value.status == 401


async def test_unencoded_slash_is_part_of_the_store_id(server: RunningServer) -> None:
    writer = await server.connect("team/notes")
    status, _, _ = await upgrade_request(ws_url(server, "team/notes", server.token("team/notes")))
    assert status == 101
    async with server.client("team/notes") as peer:
        await writer.send(b"\x01same store")
        assert await peer.receive() == b"\x01same store"
