"""Shared fixtures: a real server on a free loopback port, real SQLite files in tmp dirs,
and a real PostgreSQL cluster (one per test process) with a fresh database per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sds.app import create_app
from sds.appkeys import STORAGE
from sds.client import StoreClient
from sds.config import Config
from sds.tokens import mint_token
from tests import pg_cluster as pg

SECRET = "test-secret-0123456789abcdef0123456789abcdef"


class RunningServer:
    """A server under test: its URLs, its config, and helpers to mint tokens and connect."""

    def __init__(self, server: TestServer, config: Config) -> None:
        self.server = server
        self.config = config
        self.app: web.Application = server.app  # type: ignore[assignment]
        self.http_url = f"http://127.0.0.1:{server.port}"
        self.ws_url = f"ws://127.0.0.1:{server.port}"

    def token(self, store_id: str, scope: str = "write", sub: str = "tester", **kw: Any) -> str:
        return mint_token(
            self.config.jwt_secret,
            store_id=store_id,
            scope=scope,
            sub=sub,
            issuer=kw.pop("issuer", self.config.issuer),
            **kw,
        )

    def client(
        self, store_id: str, scope: str = "write", sub: str = "tester", **kw: Any
    ) -> StoreClient:
        """An unconnected client (use ``async with``)."""
        token = kw.pop("token", None) or self.token(store_id, scope, sub)
        return StoreClient(self.ws_url, store_id, token, **kw)

    async def connect(
        self, store_id: str, scope: str = "write", sub: str = "tester", **kw: Any
    ) -> StoreClient:
        """A connected client; closed by the fixture at the end of the test."""
        client = self.client(store_id, scope, sub, **kw)
        await client.connect()
        self._clients.append(client)
        return client

    async def hold(self, store_id: str, patch: bytes) -> tuple[StoreClient, StoreClient]:
        """A writer and a reader of ``store_id``, ``patch`` relayed from one to the other:
        the server holds the store (its file open) until they close."""
        writer = await self.connect(store_id)
        reader = await self.connect(store_id, "read")
        await writer.send(patch)
        assert await reader.receive(timeout=5) == patch
        return writer, reader

    _clients: list[StoreClient]


ServerFactory = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """A Config for tests; ``persist=True`` puts the store files in a fresh tmp dir."""

    def build(*, persist: bool = False, **overrides: Any) -> Config:
        values: dict[str, Any] = {"jwt_secret": SECRET, "port": 0, "heartbeat": 30.0}
        if persist:
            values["persist_dir"] = tmp_path / "stores"
            values["store_close_grace"] = 0.2
        values.update(overrides)
        config = Config(**values)
        config.validate()
        return config

    return build


@pytest.fixture
async def make_server(make_config: Callable[..., Config]) -> AsyncIterator[ServerFactory]:
    """Start real servers on free loopback ports; all stopped at the end of the test."""
    running: list[RunningServer] = []

    async def start(config: Config | None = None, **overrides: Any) -> RunningServer:
        config = config or make_config(**overrides)
        server = TestServer(create_app(config), host="127.0.0.1")
        await server.start_server()
        handle = RunningServer(server, config)
        storage = handle.app.get(STORAGE)
        if storage is not None:
            # As `sds serve` does once bound: lock files name the URL of their holder.
            storage.advertise(handle.http_url)
        handle._clients = []
        running.append(handle)
        return handle

    yield start
    for handle in running:
        for client in handle._clients:
            await client.close()
        await handle.server.close()


@pytest.fixture
async def server(make_server: ServerFactory) -> RunningServer:
    """A relay-only server."""
    return await make_server()


@pytest.fixture
async def persistent_server(make_server: ServerFactory) -> RunningServer:
    """A server that persists into a fresh tmp dir."""
    return await make_server(persist=True)


BACKENDS = ("sqlite", "postgresql")


def start_pg_cluster() -> pg.PgCluster:
    """A started cluster; skipped when PostgreSQL is not installed, except in CI (CI=true)."""
    if not pg.available():
        message = f"PostgreSQL 15 is not installed ({pg.PG_BIN}); apt-get install postgresql-15"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    cluster = pg.PgCluster()
    try:
        cluster.start()
    except BaseException:
        cluster.destroy()
        raise
    return cluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pg.PgCluster]:
    """One PostgreSQL cluster per test process (each pytest-xdist worker has its own)."""
    cluster = start_pg_cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def database_url(pg_cluster: pg.PgCluster) -> Iterator[str]:
    """The URL of a fresh, empty database (dropped when the next test asks for one)."""
    name = pg_cluster.create_database()
    yield pg_cluster.url(name)
    # Not dropped here: servers of the test may still hold connections until their
    # own fixture's teardown, which runs after this one.
    pg_cluster.finished.append(name)


@pytest.fixture(params=BACKENDS)
def storage_options(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Config values of a persistent server on each backend (tests that check through clients)."""
    if request.param == "sqlite":
        return {"persist_dir": tmp_path / "stores", "store_close_grace": 0.2}
    return {"database_url": request.getfixturevalue("database_url"), "store_close_grace": 0.2}


@pytest.fixture
async def stored_server(
    make_server: ServerFactory, storage_options: dict[str, Any]
) -> RunningServer:
    """A persistent server, once on SQLite files and once on PostgreSQL."""
    return await make_server(**storage_options)
