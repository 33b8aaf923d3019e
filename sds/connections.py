"""The socket side of a client: its bounded outgoing buffer, accepting and closing.

* A broadcast never waits for a slow peer. Each client has a bounded outgoing
  buffer; frames are encoded once per broadcast (``sds.relay``) and appended to
  every receiver's buffer, and all buffers are written out once per event-loop
  iteration (``Flusher``). A client whose buffer passes the bound (the
  configured buffer plus one largest frame) is closed with 1013.
* Stored history (catch-up) goes to the socket paced by the socket, not memory;
  live frames are held back meanwhile (``hold`` / ``release``).
* Closing never waits for ever: a peer that does not take its close frame is cut off.

Per-store ordering and the registry of stores are ``sds.relay``'s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sds.appkeys import TASKS
from sds.background import Tasks, spawn
from sds.metrics import Metrics
from sds.protocol import (
    BINARY_FIN,
    KEY_BYTES,
    PATCH,
    VALUE,
    binary_frame_header,
    encode_server_frame,
    server_frame_spans,
)

if TYPE_CHECKING:
    from sds.config import Config
    from sds.tokens import Claims

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_TOKEN_EXPIRED = 4001
FRAME_HEADER_BYTES = 10
"""The largest WebSocket header of an unmasked server frame."""
HISTORY_STALL_SECONDS = 30.0
"""How long catch-up waits for a joiner's socket to take more bytes before giving up."""


class Flusher:
    """Writes every client's queued frames once per event-loop iteration (one syscall each)."""

    __slots__ = ("_dirty", "_loop", "_scheduled")

    def __init__(self) -> None:
        self._dirty: list[Client] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def mark(self, client: Client) -> None:
        self._dirty.append(client)
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for client in dirty:
            client.flush()


class Client:
    """One /ws connection: who it is, and its bounded outgoing buffer."""

    __slots__ = (
        "_flusher",
        "_held",
        "_held_bytes",
        "_held_frames",
        "_out",
        "_out_bytes",
        "_out_frames",
        "_tasks",
        "bound",
        "can_write",
        "chunks",
        "close_code",
        "closing",
        "expiry",
        "limit",
        "metrics",
        "opened_at",
        "scope",
        "store_id",
        "sub",
        "transport",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        *,
        store_id: str,
        sub: str,
        scope: str,
        can_write: bool,
        limit: int,
        flusher: Flusher,
        metrics: Metrics,
        frame_slack: int = 0,
        tasks: Tasks | None = None,
    ) -> None:
        self.ws = ws
        self.transport: asyncio.Transport | None = None
        self.store_id = store_id
        self.sub = sub
        self.scope = scope
        self.can_write = can_write
        self.limit = limit
        self.bound = limit + frame_slack
        """Bytes queued past which the client is closed: the buffer plus one largest frame."""
        self.metrics = metrics
        self._tasks = tasks
        self.opened_at = time.monotonic()
        self.closing = False
        self.close_code: int | None = None
        self.expiry: asyncio.TimerHandle | None = None
        self.chunks: Any = None
        self._flusher = flusher
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._out_frames = 0
        self._held: list[bytes] | None = None
        self._held_bytes = 0
        self._held_frames = 0

    def attach(self, transport: asyncio.Transport | None) -> None:
        """Bind the client to its socket once the upgrade is done."""
        self.transport = transport

    def close_at(self, exp: float) -> None:
        """Close with 4001 when the token expires (``exp`` in epoch seconds)."""
        delay = max(0.0, exp - time.time())
        loop = asyncio.get_running_loop()
        self.expiry = loop.call_later(delay, self.close, CLOSE_TOKEN_EXPIRED, "token expired")

    def detach(self) -> None:
        """The connection ended: stop its timer, drop its incomplete chunk sequences."""
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        if self.chunks is not None:
            self.chunks.clear()

    def send(self, data: bytes) -> None:
        """Queue one frame (payload bytes) for this client."""
        self.deliver(encode_server_frame(data))

    def deliver(self, frame: bytes, frames: int = 1) -> None:
        """Queue already encoded WebSocket messages (``frames`` of them); close with 1013 past the bound."""
        if self.closing:
            return
        if self._held is not None:
            self._held.append(frame)
            self._held_bytes += len(frame)
            self._held_frames += frames
            if self._held_bytes > self.bound:
                self.close_slow()
            return
        backlog = self._out_bytes
        if backlog and backlog + len(frame) > self.bound:
            self.close_slow()
            return
        self._out.append(frame)
        self._out_bytes = backlog + len(frame)
        self._out_frames += frames
        if backlog == 0:
            self._flusher.mark(self)

    def flush(self) -> None:
        """Hand the queued frames to the socket; a socket that is not draining closes us."""
        out = self._out
        if not out or self.closing:
            return
        frames = self._out_frames
        self._out = []
        self._out_bytes = 0
        self._out_frames = 0
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.writelines(out)
        self.metrics.frames_sent += frames
        if transport.get_write_buffer_size() > self.bound:
            self.close_slow()

    def hold(self) -> None:
        """Keep live frames back (while the stored history is replayed first)."""
        self._held = []
        self._held_bytes = 0

    def drop_held_through_value(self, payload: bytes) -> None:
        """Forget the held PATCH and VALUE frames up to the last VALUE carrying ``payload``.

        Catch-up in ``--value-mode snapshot`` ended with this snapshot, read after
        the join: the held writes up to its VALUE are what it replaced (other held
        frames stay, in order). Nothing is dropped when no held VALUE carries it.
        """
        held = self._held
        if not held:
            return
        frames = []  # (type byte of a binary message or -1, the message's bytes, payload)
        for buffer in held:
            for start, body, end in server_frame_spans(buffer):
                binary = buffer[start] == BINARY_FIN and body < end
                kind = buffer[body] if binary else -1
                if kind == VALUE and end - body <= 1 + KEY_BYTES:
                    kind = -1  # a VALUE without a value is relayed, never stored
                frames.append((kind, buffer, start, body, end))
        last = -1
        for index, (kind, buffer, _start, body, end) in enumerate(frames):
            if kind == VALUE and buffer[body + 1 : end] == payload:
                last = index
        if last < 0:
            return
        kept = [
            buffer[start:end]
            for index, (kind, buffer, start, _body, end) in enumerate(frames)
            if index > last or kind not in (PATCH, VALUE)
        ]
        self._held = [b"".join(kept)] if kept else []
        self._held_bytes = len(self._held[0]) if kept else 0
        self._held_frames = len(kept)

    def release(self) -> None:
        """Send the frames held back during catch-up, then go live."""
        held, self._held = self._held, None
        frames, self._held_frames = self._held_frames, 0
        size, self._held_bytes = self._held_bytes, 0
        if not held or self.closing:
            return
        # The held frames are shared with the other receivers: queue them, not a copy.
        backlog = self._out_bytes
        self._out.extend(held)
        self._out_bytes = backlog + size
        self._out_frames += frames
        if backlog == 0:
            self._flusher.mark(self)

    async def send_history(self, frames: list[tuple[bytes, bytes]]) -> None:
        """Send stored frames ahead of anything held back, pacing on the socket, not memory.

        Each frame is a (type byte, payload) pair; the header and the payload go to
        the socket one after the other, so the stored payload is never copied.
        When this returns, the socket holds at most a quarter of the buffer bound.
        """
        transport = self.transport
        parts: list[bytes] = []
        queued = 0
        for prefix, data in frames:
            if self.closing or transport is None or transport.is_closing():
                return
            # Header and payload side by side in one writelines per batch: one
            # syscall for many small frames, and the stored payload never copied.
            parts.append(binary_frame_header(len(prefix) + len(data)) + prefix)
            parts.append(data)
            queued += len(data)
            if queued > self.limit // 4:
                transport.writelines(parts)
                self.metrics.frames_sent += len(parts) // 2
                parts, queued = [], 0
                if transport.get_write_buffer_size() > self.limit // 2:
                    await self._drained(transport)
        if parts and transport is not None and not transport.is_closing() and not self.closing:
            transport.writelines(parts)
            self.metrics.frames_sent += len(parts) // 2
        if transport is not None and transport.get_write_buffer_size() > self.limit // 4:
            await self._drained(transport)

    async def _drained(self, transport: asyncio.Transport) -> None:
        """Wait until the socket took most of what was written; a stuck reader is closed."""
        deadline = time.monotonic() + HISTORY_STALL_SECONDS
        while transport.get_write_buffer_size() > self.limit // 4:
            if self.closing or transport.is_closing():
                return
            if time.monotonic() > deadline:
                self.close_slow()
                return
            await asyncio.sleep(0.005)

    def gone(self) -> bool:
        """True once nothing more can be sent: closing, or the socket is closed."""
        transport = self.transport
        return self.closing or transport is None or transport.is_closing()

    def close_slow(self) -> None:
        """A client that cannot keep up is closed with 1013 instead of growing memory."""
        if not self.closing:
            self.metrics.slow_consumers_closed += 1
            log.warning("store %s: closing slow consumer (sub %s)", self.store_id, self.sub)
            self.close(CLOSE_TRY_AGAIN_LATER, "outgoing buffer full")

    def close(self, code: int, reason: str = "") -> None:
        """Stop sending to this client and close it with ``code`` (frames already queued go first)."""
        if self.closing:
            return
        self.closing = True
        self.close_code = code
        self._held = None
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(self._out)
        self._out = []
        self._out_bytes = 0
        self._out_frames = 0
        self.spawn(_close_ws(self.ws, self.transport, code, reason))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run work for this client in the background, drained with the server at shutdown."""
        if self._tasks is not None:
            return self._tasks.spawn(coro)
        return spawn(coro)


CLOSE_SECONDS = 30.0
"""How long a close may wait for the peer to take the close frame before the socket is cut.

A slow consumer's backlog is bounded and grows no more once it is closing, so a
peer that resumes reading within this time still receives its 1013 close frame."""


async def _close_ws(
    ws: web.WebSocketResponse, transport: asyncio.Transport | None, code: int, reason: str
) -> None:
    """Close with ``code``; a peer that never reads (aiohttp drains without a time limit) is cut off."""
    try:
        async with asyncio.timeout(CLOSE_SECONDS):
            await ws.close(code=code, message=reason.encode())
    except TimeoutError:
        if transport is not None:
            transport.abort()


async def accept_client(
    request: web.Request,
    config: Config,
    *,
    store_id: str,
    claims: Claims,
    can_write: bool,
    flusher: Flusher,
    metrics: Metrics,
) -> Client:
    """Upgrade an admitted request to a WebSocket and wrap it in a Client (/ws and /signal)."""
    ws = web.WebSocketResponse(
        # aiohttp refuses a frame of max_msg_size bytes (and, when inflating, one more):
        # the configured limit is the largest frame accepted.
        max_msg_size=config.max_frame_bytes + (0 if config.permessage_deflate else 1),
        heartbeat=config.heartbeat,
        compress=config.permessage_deflate,
    )
    await ws.prepare(request)
    client = Client(
        ws,
        store_id=store_id,
        sub=claims.sub,
        scope=claims.scope,
        can_write=can_write,
        limit=config.max_client_buffer_bytes,
        flusher=flusher,
        metrics=metrics,
        # A peer that reads at a normal pace receives every legal frame.
        frame_slack=config.max_frame_bytes + FRAME_HEADER_BYTES,
        tasks=request.app.get(TASKS),
    )
    client.attach(request.transport)
    if claims.exp is not None:
        client.close_at(claims.exp)
    return client
