"""--allowed-origin: browser upgrades from an unlisted Origin get 403; no Origin is accepted."""

from __future__ import annotations

import aiohttp
import pytest
from click.testing import CliRunner

from sds.client import StoreClient, store_url
from sds.config import SETTINGS_BY_NAME, load_config
from tests.conftest import SECRET, RunningServer, ServerFactory

ALLOWED = ("https://app.example", "http://localhost:5173")


async def _status(server: RunningServer, origin: str | None, path: str = "ws") -> int:
    headers = {"Origin": origin} if origin is not None else {}
    client = StoreClient(
        server.ws_url, "origins", server.token("origins"), path=path, headers=headers
    )
    try:
        await client.connect()
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    await client.close()
    return 101


@pytest.mark.parametrize("path", ["ws", "signal"])
async def test_listed_origins_and_no_origin_are_accepted_others_get_403(
    make_server: ServerFactory, path: str
) -> None:
    server = await make_server(allowed_origins=ALLOWED)
    assert await _status(server, ALLOWED[0], path) == 101
    assert await _status(server, ALLOWED[1], path) == 101
    assert await _status(server, None, path) == 101
    assert await _status(server, "https://evil.example", path) == 403
    assert await _status(server, "https://app.example.evil.example", path) == 403


async def test_unlisted_origin_gets_a_json_403_before_the_upgrade(
    make_server: ServerFactory,
) -> None:
    server = await make_server(allowed_origins=ALLOWED)
    url = store_url(server.http_url, "origins", server.token("origins"))
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Origin": "https://evil.example"}) as response,
    ):
        assert response.status == 403
        assert await response.json() == {"error": "origin not allowed"}


async def test_any_origin_is_accepted_by_default(server: RunningServer) -> None:
    assert await _status(server, "https://anywhere.example") == 101


def test_allowed_origin_option_is_repeatable_and_env_is_comma_separated() -> None:
    setting = SETTINGS_BY_NAME["allowed_origins"]
    assert setting.multiple
    assert setting.option == "--allowed-origin"
    config = load_config({"allowed_origins": ALLOWED}, {}, secret=SECRET)
    assert config.allowed_origins == ALLOWED
    config = load_config({}, {"SDS_ALLOWED_ORIGINS": " , ".join(ALLOWED)}, secret=SECRET)
    assert config.allowed_origins == ALLOWED


def test_serve_help_offers_allowed_origin() -> None:
    from sds.cli import cli

    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    assert "--allowed-origin " in result.output or "--allowed-origin\n" in result.output
