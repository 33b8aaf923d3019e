"""``GET /ws/{store_id}``: authenticate, upgrade, then read frames and relay them.

The path of one frame, top-down in ``handle_frame``: check the scope, store it
if it is a write (persistence on), relay it to the other clients of the store.
"""

from __future__ import annotations

import logging
import time

from aiohttp import WSMsgType, web

from sds.appkeys import CONFIG, OWNERSHIP, RELAY, STATE, ServerState
from sds.auth import CloseRefusal, admit, http_error, refuse_with_close
from sds.chunks import ChunkAssembler, ChunkRefused
from sds.connections import CLOSE_TRY_AGAIN_LATER, Client, accept_client
from sds.forwarding import Forwarded, place_client
from sds.ownership import WS
from sds.protocol import (
    KEY_BYTES,
    PATCH,
    REQ_VALUE,
    VALUE,
    VALUE_CHUNK,
    parse_chunk,
    reject_write_frame,
    scope_can_write,
)
from sds.relay import LiveStore, Refused
from sds.value_answers import ValueAnswers

log = logging.getLogger(__name__)


async def ws_handler(request: web.Request) -> web.StreamResponse:
    """Admit, upgrade and serve one client of a store until it leaves."""
    config = request.app[CONFIG]
    relay = request.app[RELAY]
    state = request.app[STATE]
    try:
        store_id, claims = admit(request, config, state)
    except CloseRefusal as refusal:
        return await refuse_with_close(request, refusal)
    ownership = request.app.get(OWNERSHIP)
    key = (WS, store_id)
    via: str | None = None
    try:
        if ownership is None:
            store = await relay.open_store(store_id)
        else:
            placed, via = await place_client(
                request, ownership, key, lambda: relay.open_store(store_id)
            )
            if isinstance(placed, Forwarded):
                return placed.response
            store = placed
    except Refused as exc:
        relay.metrics.connections_refused[exc.reason] += 1
        raise http_error(503, str(exc)) from None

    client: Client | None = None
    answers: ValueAnswers | None = None
    try:
        client = await accept_client(
            request,
            config,
            store_id=store_id,
            claims=claims,
            can_write=scope_can_write(claims.scope),
            flusher=relay.flusher,
            metrics=relay.metrics,
        )
        if store.log is not None:
            client.chunks = ChunkAssembler(
                state.chunk_budget,
                limit=config.max_chunk_bytes_per_client,
                timeout=config.chunk_timeout,
                store_id=store_id,
                not_stored=relay.metrics.values_not_stored,
            )
            answers = ValueAnswers(client, store.log, relay.metrics)
        relay.metrics.connections_opened += 1
        relay.metrics.connections_open += 1
        state.clients.add(client)
        log.info(
            "open store=%s scope=%s sub=%s",
            store_id,
            claims.scope,
            claims.sub,
            extra={"event": "open", "store_id": store_id, "scope": claims.scope, "sub": claims.sub},
        )
        await relay.join(store, client)
        await _read_frames(client.ws, store, client, answers)
        return client.ws
    finally:
        if answers is not None:
            answers.cancel()
        relay.leave(store, client)
        if client is not None:
            _forget(client, state)
        if ownership is not None:
            ownership.left(key, via=via)
            ownership.unclaim(key)


def _forget(client: Client, state: ServerState) -> None:
    state.clients.discard(client)
    client.metrics.connections_open -= 1
    client.detach()
    code = client.close_code if client.close_code is not None else client.ws.close_code
    duration = time.monotonic() - client.opened_at
    log.info(
        "close store=%s scope=%s sub=%s code=%s duration=%.1fs",
        client.store_id,
        client.scope,
        client.sub,
        code,
        duration,
        extra={
            "event": "close",
            "store_id": client.store_id,
            "scope": client.scope,
            "sub": client.sub,
            "code": None if code is None else int(code),
            "duration_s": round(duration, 3),
        },
    )


async def _read_frames(
    ws: web.WebSocketResponse, store: LiveStore, client: Client, answers: ValueAnswers | None
) -> None:
    metrics = client.metrics
    while True:
        msg = await ws.receive()
        if msg.type is WSMsgType.BINARY:
            data: bytes = msg.data
            if not data:
                metrics.frames_dropped["empty"] += 1
                continue
            metrics.frames_received += 1
            metrics.bytes_received += len(data)
            if client.closing:
                continue
            handle_frame(store, client, data, answers)
            if store.full or store.total.full:
                await store.wait_for_room()
        elif msg.type is WSMsgType.TEXT:
            metrics.frames_dropped["text"] += 1
        elif msg.type is WSMsgType.ERROR:
            metrics.frames_dropped["protocol_error"] += 1
            return
        else:
            return


def handle_frame(
    store: LiveStore, client: Client, data: bytes, answers: ValueAnswers | None = None
) -> None:
    """Check scope, store if it is a write, relay to the other clients of the store.

    A REQ_VALUE is relayed like any frame and, for a stored key, also answered to
    its sender alone by ``answers`` (one answer at a time, see sds.value_answers).
    """
    msg_type = data[0]
    if not client.can_write and reject_write_frame(msg_type):
        client.metrics.frames_dropped["read_scope"] += 1
        return
    log_ = store.log
    if log_ is None:
        store.relay(data, client)
        return
    if msg_type == PATCH:
        store.relay_after_commit(data, client, log_.append_patch(data))
    elif msg_type == VALUE and len(data) > 1 + KEY_BYTES:
        key = data[1 : 1 + KEY_BYTES].hex()
        store.relay_after_commit(data, client, log_.put_value(key, data[1 + KEY_BYTES :], data[1:]))
    elif msg_type == VALUE_CHUNK:
        try:
            value = _chunk_value(client, data)
        except ChunkRefused as refused:
            store.relay(data, client)
            _refuse_value(client, refused)
            return
        if value is None:
            store.relay(data, client)
        else:
            store.relay_after_commit(data, client, log_.put_blob(value[0], value[1]))
    else:
        store.relay(data, client)
        if msg_type == REQ_VALUE and answers is not None and len(data) >= 1 + KEY_BYTES:
            answers.request(data[1 : 1 + KEY_BYTES].hex())


def _chunk_value(client: Client, data: bytes) -> tuple[str, bytes] | None:
    """The (key, value) a VALUE_CHUNK completes, or None (incomplete or malformed).

    Raises ChunkRefused when the sequence cannot be stored for lack of memory.
    """
    parsed = parse_chunk(data)
    if parsed is None:
        client.metrics.frames_dropped["malformed_chunk_not_stored"] += 1
        return None
    header, body = parsed
    value = client.chunks.add(header, body)
    return None if value is None else (header.key, value)


def _refuse_value(client: Client, refused: ChunkRefused) -> None:
    """A value that cannot be stored: counted (by the assembler), logged, and its sender closed.

    The chunk that overflowed was relayed like every chunk; the close (1013, try
    again later) tells the sender that its value is not stored, so it can send it
    again when memory is free, instead of believing it saved.
    """
    log.warning(
        "store %s: value %s from sub %s not stored (%s); closing the sender with 1013",
        client.store_id,
        refused.key[:12],
        client.sub,
        refused.reason,
        extra={
            "event": "value_not_stored",
            "store_id": client.store_id,
            "sub": client.sub,
            "reason": refused.reason,
        },
    )
    client.close(CLOSE_TRY_AGAIN_LATER, f"value not stored: {refused.reason}")
