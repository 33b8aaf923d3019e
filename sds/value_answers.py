"""Answers to REQ_VALUE: one at a time per client, read in pieces, paced by the requester's socket.

A REQ_VALUE for a stored key is answered to the requester alone (the frame itself
is relayed to the other clients by the caller). What one client's requests may
cost is bounded:

* one answer in flight per client; up to ``MAX_QUEUED_REQUESTS`` other keys wait
  behind it, a key already waiting or in flight is not queued twice, and any
  further request is counted and left unanswered;
* a value is read one piece (one frame, at most 1 MiB) at a time, each piece in
  a short read of its own between group commits, never the whole value at once;
* the next piece is read only when the requester's socket has taken most of the
  previous one; a requester that takes nothing for ``HISTORY_STALL_SECONDS`` is
  closed with 1013 like any slow consumer;
* the answer is cancelled when the requester leaves.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import TYPE_CHECKING

from sds.backends.base import BlobChanged, StorageError
from sds.connections import HISTORY_STALL_SECONDS
from sds.protocol import CHUNK_BYTES, KEY_BYTES, REQ_VALUE, VALUE, VALUE_CHUNK

if TYPE_CHECKING:
    from sds.backends.base import StoreLog
    from sds.connections import Client
    from sds.metrics import Metrics

log = logging.getLogger(__name__)

MAX_QUEUED_REQUESTS = 64
"""Keys one client may have waiting behind the answer in flight (32 bytes each)."""
_POLL_FIRST = 0.002
_POLL_MAX = 0.05
_CHUNK_NUMBERS = struct.Struct(">II")


def requested_key(frame: bytes) -> str | None:
    """The hex key a REQ_VALUE frame asks for, or None when it is not one."""
    if frame[0] != REQ_VALUE or len(frame) < 1 + KEY_BYTES:
        return None
    return frame[1 : 1 + KEY_BYTES].hex()


class ValueAnswers:
    """The REQ_VALUE answers of one client: a bounded queue of keys and one task."""

    def __init__(self, client: Client, store_log: StoreLog, metrics: Metrics) -> None:
        self.client = client
        self.store_log = store_log
        self.metrics = metrics
        self._queue: dict[str, None] = {}
        self._current: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def request(self, key: str) -> None:
        """Queue an answer for ``key`` (hex); counted and dropped when it cannot wait."""
        unanswered = self.metrics.value_requests_unanswered
        if key == self._current or key in self._queue:
            unanswered["duplicate"] += 1
            return
        if len(self._queue) >= MAX_QUEUED_REQUESTS:
            unanswered["busy"] += 1
            return
        self._queue[key] = None
        self.metrics.value_requests_queued += 1
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    def cancel(self) -> None:
        """The client left: forget what waits and stop the answer in flight."""
        self.metrics.value_requests_queued -= len(self._queue)
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        self.metrics.value_answers_active += 1
        try:
            while self._queue and not self.client.closing:
                key = next(iter(self._queue))
                del self._queue[key]
                self.metrics.value_requests_queued -= 1
                self._current = key
                await self._answer(key)
        finally:
            self._current = None
            self._task = None
            self.metrics.value_answers_active -= 1

    async def _answer(self, key: str) -> None:
        try:
            async with self.store_log.open_blob(key) as reader:
                if reader is None:
                    return
                if reader.size <= CHUNK_BYTES:
                    header = bytes([VALUE]) + bytes.fromhex(key)
                    if await self._room(len(header) + reader.size):
                        piece = await self.store_log.read_blob_piece(reader, 0, reader.size)
                        self._write(header + piece)
                    return
                prefix = bytes([VALUE_CHUNK]) + bytes.fromhex(key)
                count = -(-reader.size // CHUNK_BYTES)
                for index in range(count):
                    offset = index * CHUNK_BYTES
                    size = min(CHUNK_BYTES, reader.size - offset)
                    # Wait for the socket first: a stalled requester holds no piece in memory.
                    if not await self._room(len(prefix) + 8 + size):
                        return
                    piece = await self.store_log.read_blob_piece(reader, offset, size)
                    self._write(prefix + _CHUNK_NUMBERS.pack(index, count) + piece)
        except BlobChanged:
            self.metrics.value_requests_unanswered["changed"] += 1
            log.info(
                "store %s: value %s changed while it was sent; answer stopped",
                self.client.store_id,
                key[:12],
            )
        except StorageError as exc:  # a failed read must not take the connection down
            self.metrics.value_requests_unanswered["storage_error"] += 1
            log.warning(
                "store %s: reading value %s failed: %s", self.client.store_id, key[:12], exc
            )

    async def _room(self, size: int) -> bool:
        """Wait until the requester's socket has room for a frame of ``size`` bytes.

        False when the client is gone, or was closed for taking nothing for too long.
        """
        client = self.client
        transport = client.transport
        if client.closing or transport is None or transport.is_closing():
            return False
        # Room for this frame on top of what the socket still holds, with slack for
        # the frames relayed meanwhile: the client's bound is never passed by an answer.
        low = max(0, min(client.limit // 4, client.limit - size - 16))
        delay = _POLL_FIRST
        deadline = time.monotonic() + HISTORY_STALL_SECONDS
        while transport.get_write_buffer_size() > low:
            if time.monotonic() > deadline:
                client.close_slow()
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)
            if client.closing or transport.is_closing():
                return False
        return True

    def _write(self, payload: bytes) -> None:
        client = self.client
        client.flush()  # relayed frames queued this turn go first
        client.send(payload)
        client.flush()
        self.metrics.value_answer_bytes += len(payload)
