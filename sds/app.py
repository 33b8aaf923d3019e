"""The aiohttp Application: routes, start-up, graceful shutdown, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from sds.admin_api import compact_handler
from sds.appkeys import CONFIG, METRICS, RELAY, SIGNALLING, STATE, STORAGE, ServerState
from sds.auth import AuthFailures
from sds.backends import open_storage
from sds.chunks import ChunkBudget
from sds.config import Config, check_persist_dir
from sds.logs import redact_access_log
from sds.metrics import Metrics
from sds.relay import CLOSE_GOING_AWAY, Relay
from sds.signalling import Signalling, signal_handler
from sds.storage import SQLITE_VERSION
from sds.token_api import token_handler
from sds.ws_handler import ws_handler

log = logging.getLogger(__name__)

HOUSEKEEPING_SECONDS = 1.0


class AccessLogger(AbstractAccessLogger):
    """One line per HTTP request without the query string: it may hold a token."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %.3fs',
            request.remote,
            request.method,
            request.path,
            response.status,
            time,
        )


def create_app(config: Config) -> web.Application:
    """The relay server for ``config`` (storage opens on start-up, closes on shutdown)."""
    app = web.Application(
        client_max_size=config.max_request_bytes,
        handler_args={"max_line_size": 32 * 1024, "max_field_size": 32 * 1024},
    )
    redact_access_log()
    metrics = Metrics()
    app[CONFIG] = config
    app[METRICS] = metrics
    app[STATE] = ServerState(
        metrics=metrics,
        auth_failures=AuthFailures(metrics),
        chunk_budget=ChunkBudget(config.max_chunk_bytes_total),
    )
    app[SIGNALLING] = Signalling(max_peers_per_room=config.max_connections_per_store)
    app.cleanup_ctx.append(_storage_and_relay)
    app.on_shutdown.append(_close_clients)
    # The rest of the path is the store id: SDS clients do not percent-encode it,
    # so an id with "/" arrives as several segments.
    app.router.add_get("/ws/{store_id:.+}", ws_handler)
    app.router.add_get("/signal/{store_id:.+}", signal_handler)
    app.router.add_post("/api/token", token_handler)
    app.router.add_post("/api/stores/{store_id}/compact", compact_handler)
    app.router.add_get("/healthz", healthz_handler)
    app.router.add_get("/metrics", metrics_handler)
    return app


async def _storage_and_relay(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    metrics = app[METRICS]
    storage = await open_storage(config, metrics)
    app[STORAGE] = storage
    app[RELAY] = Relay(
        max_connections=config.max_connections,
        max_connections_per_store=config.max_connections_per_store,
        storage=storage,
        metrics=metrics,
    )
    sweeper = asyncio.create_task(_housekeeping(app))
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        app[STATE].auth_failures.flush()
        if storage is not None:
            await storage.close()
            log.info("storage flushed and closed")


async def _housekeeping(app: web.Application) -> None:
    """Every second: log a due auth-failure summary, drop chunk sequences that stopped."""
    state = app[STATE]
    while True:
        await asyncio.sleep(HOUSEKEEPING_SECONDS)
        state.auth_failures.flush_if_due()
        for client in list(state.clients):
            if client.chunks is not None:
                client.chunks.expire()


async def _close_clients(app: web.Application) -> None:
    """On SIGTERM/SIGINT: refuse new clients, close every open one with 1001."""
    state = app[STATE]
    state.shutting_down = True
    for client in list(state.clients):
        client.close(CLOSE_GOING_AWAY, "server shutting down")
    await app[SIGNALLING].close_all(CLOSE_GOING_AWAY)
    deadline = asyncio.get_running_loop().time() + app[CONFIG].shutdown_timeout / 2
    while state.clients and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    for client in list(state.clients):
        # A peer that does not read never takes its close frame; cut it off so the
        # exit stays within the shutdown timeout.
        if client.transport is not None:
            client.transport.abort()


def health(app: web.Application) -> tuple[bool, dict[str, object]]:
    """Whether the server serves and stores; the reasons when it does not."""
    config = app[CONFIG]
    storage = app.get(STORAGE)
    problems: list[str] = []
    if app[STATE].shutting_down:
        problems.append("shutting down")
    if storage is not None:
        problems.extend(f"storage write failed: {failure}" for failure in storage.failures)
    if config.persist_dir is not None:
        try:
            check_persist_dir(config.persist_dir)
        except ValueError as exc:
            problems.append(str(exc))
    body: dict[str, object] = {
        "status": "ok" if not problems else "unavailable",
        "persistence": storage is not None,
        "storage": "postgresql" if config.database_url else "sqlite" if storage else "none",
        "sqlite_version": SQLITE_VERSION,
        "connections": app[METRICS].connections_open,
        "stores": app[METRICS].stores_open,
    }
    if problems:
        body["problems"] = problems
    return not problems, body


async def healthz_handler(request: web.Request) -> web.Response:
    """200 when serving and storage works, 503 with the reasons otherwise."""
    ok, body = health(request.app)
    return web.json_response(body, status=200 if ok else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus text exposition of the server's counters."""
    from sds.metrics import CONTENT_TYPE, render_prometheus

    metrics = request.app[METRICS]
    storage = request.app.get(STORAGE)
    if storage is not None:
        # A gauge read when scraped: counting it per write would cost on the hot path.
        metrics.commit_queue_depth = storage.queued_writes()
    body = render_prometheus(metrics)
    return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE})


def run(config: Config, *, access_log: bool = True) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully."""
    app = create_app(config)
    web.run_app(
        app,
        host=config.host,
        port=config.port,
        shutdown_timeout=config.shutdown_timeout,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("sds.access") if access_log else None,
        print=None,
        handle_signals=True,
    )
