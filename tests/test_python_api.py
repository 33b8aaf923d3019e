"""The public Python API (SPEC 9): create_app, config from the environment, LiveStore, reject_write_frame."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import sds
from sds import Config, ConfigError, LiveStore, create_app, load_config, reject_write_frame
from sds.client import StoreClient

SECRET = "python-api-secret-0123456789abcdefghijklm"


class Recorder:
    """The simplest peer a LiveStore accepts: anything with ``send(bytes)``."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.received.append(data)


def test_public_names_are_exported() -> None:
    for name in ("create_app", "load_config", "Config", "LiveStore", "reject_write_frame"):
        assert name in sds.__all__
        assert hasattr(sds, name)


def test_live_store_broadcast_skips_the_sender() -> None:
    store = LiveStore("s")
    a, b, c = Recorder(), Recorder(), Recorder()
    assert store.is_empty()
    for peer in (a, b, c):
        store.add_client(peer)
    assert not store.is_empty()
    store.broadcast(b"\x01patch", a)
    assert a.received == []
    assert b.received == [b"\x01patch"]
    assert c.received == [b"\x01patch"]


def test_live_store_broadcast_without_sender_reaches_everyone() -> None:
    store = LiveStore()
    a, b = Recorder(), Recorder()
    store.add_client(a)
    store.add_client(b)
    store.broadcast(b"\x04hello")
    assert a.received == b.received == [b"\x04hello"]


def test_live_store_remove_client() -> None:
    store = LiveStore("s")
    a, b = Recorder(), Recorder()
    store.add_client(a)
    store.add_client(b)
    store.remove_client(a)
    store.broadcast(b"\x01x", b)
    assert a.received == []
    store.remove_client(b)
    assert store.is_empty()
    store.remove_client(b)  # removing twice is harmless
    assert store.is_empty()


def test_live_store_keeps_order_and_bytes() -> None:
    store = LiveStore("s")
    sender, receiver = Recorder(), Recorder()
    store.add_client(sender)
    store.add_client(receiver)
    frames = [bytes([1]) + n.to_bytes(2, "big") for n in range(100)]
    for frame in frames:
        store.broadcast(frame, sender)
    assert receiver.received == frames


def test_reject_write_frame() -> None:
    assert [t for t in range(256) if reject_write_frame(t)] == [0x01, 0x02, 0x05]


def test_load_config_from_an_environment_mapping(tmp_path: Path) -> None:
    config = load_config(
        environ={
            "SDS_JWT_SECRET": SECRET,
            "SDS_PORT": "4321",
            "SDS_ISSUER": "api",
            "SDS_PERSIST_DIR": str(tmp_path),
        }
    )
    assert isinstance(config, Config)
    assert (config.port, config.issuer, config.persist_dir) == (4321, "api", tmp_path)
    with pytest.raises(ConfigError):
        load_config(environ={})


def test_config_constructor_has_keyword_defaults() -> None:
    config = Config(jwt_secret=SECRET)
    config.validate()
    assert (config.port, config.host, config.value_mode) == (3000, "127.0.0.1", "blob")


async def test_create_app_serves_the_relay(tmp_path: Path) -> None:
    config = load_config(
        environ={"SDS_JWT_SECRET": SECRET, "SDS_PERSIST_DIR": str(tmp_path / "stores")}
    )
    app = create_app(config)
    assert isinstance(app, web.Application)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        base = f"ws://127.0.0.1:{server.port}"
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{server.port}/healthz") as response,
        ):
            assert response.status == 200
            assert (await response.json())["persistence"] is True
        token = sds.mint_token(SECRET, store_id="api", scope="write", sub="py")
        async with StoreClient(base, "api", token) as a, StoreClient(base, "api", token) as b:
            await a.send(b"\x01from-python")
            assert await b.receive() == b"\x01from-python"
    finally:
        await server.close()
    assert list((tmp_path / "stores").glob("*.db"))
