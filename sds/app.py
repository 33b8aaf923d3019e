"""The aiohttp Application: routes, start-up, graceful shutdown, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from sds.admin_api import MAINTENANCE_THREADS, compact_handler
from sds.appkeys import (
    CONFIG,
    HEALTH,
    MAINTENANCE,
    METRICS,
    OWNERSHIP,
    RELAY,
    SIGNALLING,
    STATE,
    STORAGE,
    TASKS,
    ServerState,
)
from sds.auth import (
    CLIENT_ADDRESS,
    AuthFailures,
    client_address_middleware,
    trusted_networks,
)
from sds.backends import open_storage
from sds.backends.base import Storage
from sds.background import Tasks
from sds.chunks import ChunkBudget
from sds.config import SETTINGS, Config
from sds.connections import CLOSE_GOING_AWAY
from sds.forwarding import close_session
from sds.health import StorageHealth, healthz_handler
from sds.logs import flush_log_summaries, redact_access_log
from sds.metrics import Metrics, sds_version
from sds.ownership import WS, Key, Ownership, ownership_for, same_lock
from sds.relay import Relay
from sds.signalling import Signalling, signal_handler
from sds.token_api import token_handler
from sds.ws_handler import ws_handler

log = logging.getLogger(__name__)

HOUSEKEEPING_SECONDS = 1.0
LISTEN_BACKLOG = 128
TASKS_GRACE_SECONDS = 1.0
"""How long background tasks may finish on their own at shutdown before they are cancelled."""


class AccessLogger(AbstractAccessLogger):
    """One line per HTTP request without the query string (it may hold a token).

    JSON lines carry the parts as fields: method, path, status, duration_s, remote.
    """

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        # Set by the client address middleware; a request that failed to parse never
        # reached it, and its headers cannot be believed: the peer's address then.
        remote = request.get(CLIENT_ADDRESS) or request.remote
        self.logger.info(
            '%s "%s %s" %s %.3fs',
            remote,
            request.method,
            request.path,
            response.status,
            time,
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_s": round(time, 6),
                "remote": remote,
            },
        )


def create_app(config: Config) -> web.Application:
    """The relay server for ``config`` (storage opens on start-up, closes on shutdown)."""
    app = web.Application(
        client_max_size=config.max_request_bytes,
        handler_args={"max_line_size": 32 * 1024, "max_field_size": 32 * 1024},
        middlewares=[client_address_middleware(trusted_networks(config.trusted_proxies))],
    )
    redact_access_log()
    metrics = Metrics()
    app[CONFIG] = config
    app[METRICS] = metrics
    app[STATE] = ServerState(
        metrics=metrics,
        auth_failures=AuthFailures(metrics),
        chunk_budget=ChunkBudget(
            config.max_chunk_bytes_total, per_store=config.max_chunk_bytes_per_store
        ),
    )
    app[SIGNALLING] = Signalling(max_peers_per_room=config.max_connections_per_store)
    app[TASKS] = Tasks()
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
    tasks = app[TASKS]
    app[MAINTENANCE] = maintenance = ThreadPoolExecutor(
        MAINTENANCE_THREADS, thread_name_prefix="sds-maintenance"
    )
    storage = await open_storage(config, metrics, tasks=tasks)
    app[STORAGE] = storage
    app[HEALTH] = None if config.persist_dir is None else StorageHealth(config.persist_dir, metrics)
    app[RELAY] = Relay(
        max_connections=config.max_connections,
        max_connections_per_store=config.max_connections_per_store,
        storage=storage,
        metrics=metrics,
        max_pending_bytes_per_store=config.max_pending_bytes_per_store,
        max_pending_bytes_total=config.max_pending_bytes_total,
        max_catchup_bytes_per_client=config.max_catchup_bytes_per_client,
        max_catchup_bytes_total=config.max_catchup_bytes_total,
        tasks=tasks,
    )
    app[OWNERSHIP] = ownership = await _ownership(app, storage)
    sweeper = asyncio.create_task(_housekeeping(app))
    try:
        yield
    finally:
        if ownership is not None:
            await close_session(ownership)
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        app[STATE].auth_failures.flush()
        await tasks.drain(TASKS_GRACE_SECONDS)
        flush_log_summaries(force=True)
        if storage is not None:
            await storage.close()
            log.info("storage flushed and closed")
        if ownership is not None:
            ownership.close()
        maintenance.shutdown(wait=False, cancel_futures=True)


async def _ownership(app: web.Application, storage: Storage[Any] | None) -> Ownership | None:
    """Store ownership among the processes of one lock dir: the persist dir, or --lock-dir."""
    config = app[CONFIG]
    ownership = await ownership_for(
        config.persist_dir if config.persist_dir is not None else config.lock_dir,
        storage,
        database_url=config.database_url,
        database_ownership=config.database_ownership,
        metrics=app[METRICS],
        tasks=app[TASKS],
        handover_grace=config.handover_grace,
    )
    if ownership is None:
        return None
    relay = app[RELAY]
    state = app[STATE]
    signalling = app[SIGNALLING]

    def close_clients(key: Key, code: int, reason: str) -> None:
        kind, store_id = key
        if kind == WS:
            for client in [c for c in state.clients if c.store_id == store_id]:
                client.close(code, reason)
        else:
            room = signalling.rooms.get(store_id)
            for peer in list(room.peers) if room is not None else []:
                peer.client.close(code, reason)

    def in_use(key: Key) -> bool:
        kind, store_id = key
        if kind == WS:
            return store_id in relay.stores
        return store_id in signalling.rooms

    def shares_lock(key: Key) -> bool:
        kind, store_id = key
        live = relay.stores if kind == WS else signalling.rooms
        return any(other != store_id and same_lock(other, store_id) for other in live)

    ownership.close_clients = close_clients
    ownership.in_use = in_use
    ownership.shares_lock = shares_lock
    return ownership


async def _housekeeping(app: web.Application) -> None:
    """Every second: log due failure summaries, drop chunk sequences that stopped."""
    state = app[STATE]
    while True:
        await asyncio.sleep(HOUSEKEEPING_SECONDS)
        state.auth_failures.flush_if_due()
        flush_log_summaries()
        for client in list(state.clients):
            if client.chunks is not None:
                for key in client.chunks.expire():
                    log.info(
                        "store %s: incomplete value %s from sub %s timed out, not stored",
                        client.store_id,
                        key[:12],
                        client.sub,
                    )


async def _close_clients(app: web.Application) -> None:
    """On SIGTERM/SIGINT: refuse new clients, close every open one with 1001."""
    state = app[STATE]
    state.shutting_down = True
    ownership = app.get(OWNERSHIP)
    if ownership is not None:
        ownership.retire(CLOSE_GOING_AWAY)
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


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus text exposition of the server's counters."""
    from sds.metrics import CONTENT_TYPE, render_prometheus

    metrics = request.app[METRICS]
    storage = request.app.get(STORAGE)
    if storage is not None:
        # A gauge read when scraped: counting it per write would cost on the hot path.
        metrics.commit_queue_depth = storage.queued_writes()
    metrics.pending_bytes = request.app[RELAY].pending.used
    body = render_prometheus(metrics)
    return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE})


def start_line(config: Config, url: str | None = None) -> str:
    """What ``sds serve`` logs on start: version, address, storage, non-default limits.

    No secret and no password: a setting named like one is left out, and a URL
    setting (a database URL) is shown without its password.
    """
    host = f"[{config.host}]" if ":" in config.host else config.host
    if config.persist_dir is None:
        storage = "relay only (no persistence)"
    else:
        storage = f"persist dir {config.persist_dir} (sync {config.sync})"
    shown = {"host", "port", "persist_dir", "sync", "value_mode", "log_format", "log_level"}
    changed = []
    for setting in SETTINGS:
        name = setting.name
        if name in shown or "secret" in name or "password" in name:
            continue
        value = getattr(config, name, None)
        default = (
            Config.__dataclass_fields__[name].default
            if name in Config.__dataclass_fields__
            else None
        )
        if value == default:
            continue
        if isinstance(value, tuple):
            value = ",".join(str(item) for item in value)
        changed.append(f"{setting.option.lstrip('-')}={_without_password(str(value))}")
    line = (
        f"sds {sds_version()} listening on {url or f'http://{host}:{config.port}'}, "
        f"storage: {storage}, "
        f"value mode: {config.value_mode}"
    )
    return line + (f", settings: {' '.join(changed)}" if changed else "")


def _without_password(value: str) -> str:
    """``value`` without the password of a URL: ``user:***@host``, ``?password=***``."""
    if "://" not in value:
        return value
    try:
        parts = urlsplit(value)
        if parts.password is not None:
            user_info, _, host = parts.netloc.rpartition("@")
            user = user_info.partition(":")[0]
            parts = parts._replace(netloc=f"{user}:***@{host}")
        query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
        return urlunsplit(parts._replace(query=query))
    except ValueError:
        return "***"


def run(
    config: Config,
    *,
    access_log: bool = True,
    on_bound: Callable[[str], None] | None = None,
) -> None:
    """Bind, call ``on_bound(url)``, serve until SIGTERM/SIGINT, then shut down gracefully.

    The sockets are bound before anything else happens, so a busy port fails (OSError)
    before a banner is printed, and the real port is known when ``--port 0`` was asked.
    """
    sockets = bind_sockets(config.host, config.port)
    url = server_url(sockets[0])
    if on_bound is not None:
        on_bound(url)
    app = create_app(config)

    async def advertise(app: web.Application) -> None:
        # Where other processes reach this one (forwarding): --advertise-url, else
        # the bound address.
        reached = config.advertise_url or url
        storage = app[STORAGE]
        if storage is not None:
            storage.advertise(reached)
        ownership = app[OWNERSHIP]
        if ownership is not None:
            ownership.advertise(reached)

    app.on_startup.append(advertise)

    def log_start(_banner: str) -> None:
        # aiohttp prints its banner once every site listens: the start line instead.
        log.info("%s", start_line(config, url))

    web.run_app(
        app,
        sock=sockets,
        shutdown_timeout=config.shutdown_timeout,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("sds.access") if access_log else None,
        print=log_start,
        handle_signals=True,
    )


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address of ``host`` (all on one port, also for port 0)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            bound_port = sockets[0].getsockname()[1] if len(sockets) > 1 else port
            try:
                sock.bind((address[0], bound_port, *address[2:]))
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL or len(infos) == 1:
                    raise
                # An address family the machine does not have (e.g. ::1 without
                # IPv6): skipped, as asyncio does.
                sockets.pop().close()
                continue
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
    return sockets


def server_url(sock: socket.socket) -> str:
    """The http:// URL of a listening socket, as a local client reaches it."""
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
