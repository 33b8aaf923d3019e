"""Forwarding: a connection for a store another live process owns is piped to that owner.

The client is authenticated here first (refusals stay cheap and local). Then this
process opens a WebSocket to the URL in the owner's lock record, with the client's
token as ``Authorization: Bearer`` (never logged) and ``X-SDS-Forwarded-By`` naming
this process, upgrades the client, and pipes frames both ways unchanged and in
order. A close from either side is passed on; an owner that goes away (killed,
hung past the heartbeat) closes the client with 1012 so it reconnects through the
proxy. An owner that does not answer before the upgrade, or a lock whose record
names no URL for too long, gives the client 503: never a second copy of the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from aiohttp import WSMsgType, hdrs, web

from sds.appkeys import CONFIG, RELAY
from sds.auth import CLIENT_ADDRESS, http_error, request_token
from sds.client import store_url
from sds.ownership import (
    CLOSE_SERVICE_RESTART,
    FORWARDED_HEADER,
    NOT_OWNER_HEADER,
    Key,
    NotOwner,
    Ownership,
    StoreLocked,
)
from sds.relay import Refused

log = logging.getLogger(__name__)

T = TypeVar("T")

ROUTE_ATTEMPTS = 4
"""How often a connection looks for its store's owner again (owner changed meanwhile)."""
CONNECT_SECONDS = 5.0
"""How long the owner may take to accept a forwarded connection."""
CLOSE_SECONDS = 5.0
_UNSENDABLE = (1005, 1006, 1015)


class Forwarded:
    """The response of a connection that was forwarded (and has ended)."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response


class _Reroute(Exception):
    """The owner refused (not the owner any more) or did not answer: look again."""


async def forwarded_by(request: web.Request, ownership: Ownership) -> str | None:
    """The URL of the live sds process (of the same locks) that forwarded this connection
    here; None for a direct one."""
    instance = request.headers.get(FORWARDED_HEADER)
    if instance is None:
        return None
    return await ownership.server_url(instance)


async def serve_here_or_forward(
    request: web.Request,
    ownership: Ownership,
    key: Key,
    *,
    forwarded: bool,
    open_here: Callable[[], Awaitable[T]],
) -> T | Forwarded:
    """Serve ``key`` here (``open_here``'s result, with its lock claimed) or forward it.

    Raises an HTTP 503 when no process can serve it now.
    """
    for _attempt in range(ROUTE_ATTEMPTS):
        try:
            url = await ownership.route(key, forwarded=forwarded)
        except NotOwner:
            request.app[RELAY].metrics.connections_refused["not_owner"] += 1
            error = http_error(503, "this process does not own the store")
            error.headers[NOT_OWNER_HEADER] = "1"
            raise error from None
        if url is None:
            try:
                await ownership.claim(key)
            except StoreLocked as exc:
                if exc.holder is not None and exc.holder.url:
                    continue
                raise http_error(503, str(exc)) from None
            try:
                return await open_here()
            except Refused as exc:
                ownership.unclaim(key)
                if exc.holder is not None and exc.holder.url:
                    continue
                raise
            except BaseException:
                ownership.unclaim(key)
                raise
        try:
            return Forwarded(await forward(request, ownership, key, url))
        except _Reroute:
            continue
    request.app[RELAY].metrics.connections_refused["owner_unreachable"] += 1
    raise http_error(503, "the process owning this store does not answer")


async def place_client(
    request: web.Request, ownership: Ownership, key: Key, open_here: Callable[[], Awaitable[T]]
) -> tuple[T | Forwarded, str | None]:
    """Where a /ws or /signal client of ``key`` is served (see ``serve_here_or_forward``),
    and the URL of the process that forwarded it here (None for a direct client).

    A client served here is counted as joined; call ``ownership.left(key, via=...)``
    with the same URL when it leaves.
    """
    via = await forwarded_by(request, ownership)
    placed = await serve_here_or_forward(
        request, ownership, key, forwarded=via is not None, open_here=open_here
    )
    if not isinstance(placed, Forwarded):
        ownership.joined(key, via=via)
    return placed, via


def _session(ownership: Ownership) -> aiohttp.ClientSession:
    session = ownership.session
    if session is None or session.closed:
        session = ownership.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
        )
    return session


async def close_session(ownership: Ownership) -> None:
    if ownership.session is not None:
        await ownership.session.close()


async def forward(
    request: web.Request, ownership: Ownership, key: Key, owner_url: str
) -> web.StreamResponse:
    """Pipe one admitted connection to the owner at ``owner_url`` until either side closes."""
    config = request.app[CONFIG]
    relay = request.app[RELAY]
    metrics = relay.metrics
    if relay.open_connections() >= config.max_connections:
        metrics.connections_refused["max_connections"] += 1
        raise http_error(503, "server is at its connection limit")
    kind, store_id = key
    target = store_url(owner_url.replace("http", "ws", 1), store_id, path=kind)
    headers = {
        hdrs.AUTHORIZATION: f"Bearer {request_token(request)}",
        FORWARDED_HEADER: ownership.instance,
        hdrs.X_FORWARDED_FOR: str(request.get(CLIENT_ADDRESS) or request.remote or ""),
    }
    # Counted before the awaits, so concurrent connections cannot pass the limit.
    metrics.forwarded_connections_open += 1
    try:
        try:
            async with asyncio.timeout(CONNECT_SECONDS):
                upstream = await _session(ownership).ws_connect(
                    target,
                    headers=headers,
                    max_msg_size=0,
                    heartbeat=config.heartbeat,
                    autoping=True,
                    compress=0,
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 503:
                raise _Reroute from None
            log.warning(
                "store %s: the owner at %s refused a forwarded connection", store_id, owner_url
            )
            raise http_error(503, "the process owning this store refused the connection") from None
        except (aiohttp.ClientError, OSError, TimeoutError):
            raise _Reroute from None
        try:
            client = web.WebSocketResponse(
                max_msg_size=config.max_frame_bytes + (0 if config.permessage_deflate else 1),
                heartbeat=config.heartbeat,
                compress=config.permessage_deflate,
            )
            await client.prepare(request)
            metrics.forwarded_connections_opened += 1
            await _pipe(client, upstream, ownership)
            return client
        finally:
            await upstream.close()
    finally:
        metrics.forwarded_connections_open -= 1


def _close_code(code: Any) -> int:
    """A close code that may be sent on: the peer's, or 1012 for a connection that broke."""
    if isinstance(code, int) and 1000 <= code <= 4999 and code not in _UNSENDABLE:
        return code
    return CLOSE_SERVICE_RESTART


async def _pipe(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse, ownership: Ownership
) -> None:
    """Frames both ways until one side closes; its close code goes to the other side."""

    async def down() -> tuple[int, str]:
        while True:
            msg = await upstream.receive()
            if msg.type is WSMsgType.BINARY:
                await client.send_bytes(msg.data)
            elif msg.type is WSMsgType.TEXT:
                await client.send_str(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                return _close_code(msg.data), str(msg.extra or "")
            elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return CLOSE_SERVICE_RESTART, "store owner went away"

    async def up() -> int:
        while True:
            msg = await client.receive()
            if msg.type is WSMsgType.BINARY:
                await upstream.send_bytes(msg.data)
            elif msg.type is WSMsgType.TEXT:
                await upstream.send_str(msg.data)
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return _close_code(client.close_code or 1000)
            elif msg.type is WSMsgType.ERROR:
                return 1002

    to_client = asyncio.ensure_future(down())
    to_owner = asyncio.ensure_future(up())
    closed = asyncio.get_running_loop().create_future()

    def close_both(code: int, reason: str) -> None:
        if not closed.done():
            closed.set_result((code, reason))

    ownership.pipes.add(close_both)
    try:
        done, _ = await asyncio.wait(
            {to_client, to_owner, closed}, return_when=asyncio.FIRST_COMPLETED
        )
        if closed in done:
            code, reason = closed.result()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_SECONDS):
                    await client.close(code=code, message=reason.encode())
        elif to_client in done and not to_client.cancelled() and to_client.exception() is None:
            code, reason = to_client.result()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_SECONDS):
                    await client.close(code=code, message=reason.encode()[:120])
        elif to_owner in done and not to_owner.cancelled() and to_owner.exception() is None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_SECONDS):
                    await upstream.close(code=to_owner.result())
        else:
            # A pump failed (a socket reset): the client reconnects through the proxy.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_SECONDS):
                    await client.close(code=CLOSE_SERVICE_RESTART, message=b"forwarding failed")
    finally:
        ownership.pipes.discard(close_both)
        for task in (to_client, to_owner):
            task.cancel()
        await asyncio.gather(to_client, to_owner, return_exceptions=True)
        if not closed.done():
            closed.cancel()
