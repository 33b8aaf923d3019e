"""Per-store ordering and the registry of live stores: every accepted frame goes to every
other client of its store.

Two concepts live here, ``LiveStore`` (one store's clients and the ordered relay of
their frames) and ``Relay`` (all live stores, their limits, joining and leaving);
a client's socket side (its bounded buffer, accepting, closing) is
``sds.connections``'s. The rules:

* A broadcast never waits for a slow peer: a frame is encoded once and handed
  to every receiver's bounded buffer (``sds.connections.Client.deliver``).
* Persist, then relay. With storage on, frames of a store pass one ordered
  queue: a frame is relayed when every write ahead of it (and its own) has
  committed, so no peer ever sees a frame that is not on disk, and the order
  of frames is the order the server received them.
* Catch-up without a seam. A joining client is added to the store at once but
  holds live frames back while the stored history up to the last relayed
  clock is replayed to it; then the held frames follow. When the history ends
  with a snapshot that a VALUE committed after the join wrote (``--value-mode
  snapshot``), the held writes up to that VALUE are dropped: the joiner has them.

Memory is bounded in bytes: what waits for its commit (per store and in all
stores together; writers are not read past it), and catch-up pages (per joiner
and in all joiners together; a joiner past it waits its turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from sds.backends.base import VALUE_PREFIX, StorageError
from sds.background import Tasks
from sds.budget import ByteBudget, PendingBytes
from sds.connections import CLOSE_INTERNAL_ERROR, CLOSE_TRY_AGAIN_LATER, Client, Flusher
from sds.metrics import Metrics
from sds.protocol import encode_server_frame, encode_server_frames

if TYPE_CHECKING:
    from sds.backends.base import Commit, Storage, StoreLog

log = logging.getLogger(__name__)


class Peer(Protocol):
    """Anything a LiveStore can relay to: our Client, or a test double with ``send``."""

    def send(self, data: bytes) -> None: ...


class Waiting:
    """Frames of one sender that wait for one commit, and for everything queued before them."""

    __slots__ = ("commit", "frames", "sender", "writes")

    def __init__(self, commit: Commit, sender: Any, data: bytes, *, writes: bool) -> None:
        self.commit = commit
        self.sender = sender
        self.frames = [data]
        self.writes = writes


class LiveStore:
    """The clients of one store and the ordered relay of their frames.

    On its own (no storage) this is the helper the Node package exported:
    ``add_client``, ``remove_client``, ``is_empty`` and ``broadcast(data, sender)``,
    where a client is anything with ``send(data: bytes)``.
    """

    __slots__ = (
        "_clients",
        "_drained_callbacks",
        "_queue",
        "_queued",
        "_queued_bytes",
        "_room",
        "_tail",
        "_watched",
        "full",
        "idle_handle",
        "log",
        "max_pending_bytes",
        "metrics",
        "relayed_clock",
        "store_id",
        "total",
    )

    def __init__(
        self,
        store_id: str = "",
        *,
        metrics: Metrics | None = None,
        max_pending_bytes: int = 64 * 1024 * 1024,
        pending_total: PendingBytes | None = None,
    ) -> None:
        self.store_id = store_id
        self.metrics = metrics or Metrics()
        self.log: StoreLog | None = None
        self.relayed_clock = 0
        self.idle_handle: asyncio.TimerHandle | None = None
        self._clients: dict[Any, Callable[..., None] | None] = {}
        # Runs of frames waiting for their commit, in the order they arrived.
        self._queue: deque[Waiting] = deque()
        self._tail: Waiting | None = None
        self._queued = 0
        self._queued_bytes = 0
        self.max_pending_bytes = max_pending_bytes
        self.total = pending_total if pending_total is not None else PendingBytes(1 << 62)
        """Bytes waiting for their commit in all stores of the server."""
        self.full = False
        """True while QUEUE_HIGH_WATER frames, or ``max_pending_bytes``, wait for their
        commit in this store: its writers are not read."""
        self._room = asyncio.Event()
        self._room.set()
        self._drained_callbacks: list[Callable[[], None]] = []
        self._watched: Commit | None = None

    def __len__(self) -> int:
        """How many clients are connected."""
        return len(self._clients)

    def add_client(self, client: Peer) -> None:
        """Start relaying this store's frames to ``client``."""
        self._clients[client] = getattr(client, "deliver", None)

    def remove_client(self, client: Peer) -> None:
        """Stop relaying to ``client`` (unknown clients are ignored)."""
        self._clients.pop(client, None)

    def is_empty(self) -> bool:
        """True when no client is connected."""
        return not self._clients

    def broadcast(self, data: bytes, sender: Any = None) -> None:
        """Relay ``data`` to every client but ``sender``, encoding it only once."""
        self._fan_out((data,), sender, len(data))

    def broadcast_run(self, frames: list[bytes], sender: Any = None) -> None:
        """Relay frames of one sender to every other client, encoded once into one buffer."""
        self._fan_out(frames, sender, sum(map(len, frames)))

    def _fan_out(self, frames: Sequence[bytes], sender: Any, size: int) -> None:
        count = len(frames)
        encoded: bytes | None = None
        receivers = 0
        for client, deliver in self._clients.items():
            if client is sender:
                continue
            receivers += 1
            if deliver is None:
                for data in frames:
                    client.send(data)
                continue
            if encoded is None:
                encoded = (
                    encode_server_frame(frames[0]) if count == 1 else encode_server_frames(frames)
                )
            deliver(encoded, count)
        self.metrics.frames_relayed += count
        self.metrics.bytes_relayed += size * receivers

    def relay(self, data: bytes, sender: Any) -> None:
        """Relay a frame that stores nothing, behind any writes still committing."""
        tail = self._tail
        if tail is None:
            self.broadcast(data, sender)
            return
        if tail.sender is sender:
            tail.frames.append(data)
            self._queued += 1
        else:
            self._wait(tail.commit, sender, data, writes=False)
        self._count(len(data))

    def relay_after_commit(self, data: bytes, sender: Any, commit: Commit) -> None:
        """Relay ``data`` once its commit, and every commit queued before it, is done.

        A write whose commit fails is never relayed and its sender is closed with
        1011 (with the frames it sent after it that waited for the same commit).
        """
        size = len(data)
        tail = self._tail
        if tail is not None and tail.sender is sender and tail.commit is commit:
            tail.frames.append(data)
            tail.writes = True
            self._queued += 1
        else:
            self._wait(commit, sender, data, writes=True)
        # The hot path: plain arithmetic, a method call only at a bound.
        queued_bytes = self._queued_bytes = self._queued_bytes + size
        total = self.total
        used = total.used = total.used + size
        if (
            queued_bytes >= self.max_pending_bytes
            or self._queued >= QUEUE_HIGH_WATER
            or used >= total.limit
        ):
            self._at_bound()

    def _count(self, size: int) -> None:
        """``size`` more bytes wait for a commit: past a bound, writers stop being read."""
        self._queued_bytes += size
        self.total.used += size
        self._at_bound()

    def _at_bound(self) -> None:
        if self._queued >= QUEUE_HIGH_WATER or self._queued_bytes >= self.max_pending_bytes:
            self.full = True
            self._room.clear()
        self.total.check()

    def _wait(self, commit: Commit, sender: Any, data: bytes, *, writes: bool) -> None:
        tail = self._tail = Waiting(commit, sender, data, writes=writes)
        self._queue.append(tail)
        self._queued += 1
        if commit is not self._watched:
            self._watched = commit
            commit.done.add_done_callback(self._on_commit)

    def _on_commit(self, _done: asyncio.Future[None]) -> None:
        """A group commit finished: relay every run at the head whose commit is decided."""
        queue = self._queue
        while queue:
            waiting = queue[0]
            commit = waiting.commit
            if commit.ok is None:
                break
            queue.popleft()
            self._queued -= len(waiting.frames)
            size = sum(map(len, waiting.frames))  # once per run: cheaper than per frame
            self._queued_bytes -= size
            self.total.remove(size)
            if commit.ok:
                clock = commit.clocks.get(self.store_id)
                if clock is not None:
                    self.relayed_clock = clock
            elif waiting.writes:
                close = getattr(waiting.sender, "close", None)
                if close is not None:
                    close(CLOSE_INTERNAL_ERROR, "storage failure")
                continue
            self.broadcast_run(waiting.frames, waiting.sender)
        if not queue:
            self._tail = None
        if self._queued < QUEUE_HIGH_WATER and self._queued_bytes < self.max_pending_bytes:
            self.full = False
            self._room.set()
        if not queue and self._drained_callbacks:
            callbacks, self._drained_callbacks = self._drained_callbacks, []
            for callback in callbacks:
                callback()

    def has_pending(self) -> bool:
        """True while frames wait for their commit."""
        return bool(self._queue)

    def pending_bytes(self) -> int:
        """Bytes of the frames that wait for their commit in this store."""
        return self._queued_bytes

    def on_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once no frame waits for its commit any more."""
        self._drained_callbacks.append(callback)

    async def wait_for_room(self) -> None:
        """Backpressure for writers: wait while too much waits for its commit.

        Too much is QUEUE_HIGH_WATER frames or ``max_pending_bytes`` in this store,
        or the server-wide pending total in all stores.
        """
        while True:
            if self.full:
                self.metrics.writer_pauses["store"] += 1
                await self._room.wait()
            elif self.total.full:
                self.metrics.writer_pauses["total"] += 1
                await self.total.wait_for_room()
            else:
                return


QUEUE_HIGH_WATER = 4096
"""Frames a store may have waiting for commit before its writers stop being read
(bytes are bounded by ``--max-pending-bytes-per-store`` and ``--max-pending-bytes-total``)."""
CATCHUP_WAIT_SECONDS = 60.0
"""How long a joiner may wait for room in the catch-up budget before it is closed with 1013."""


class Refused(Exception):
    """A connection cannot be admitted now (HTTP 503 before the upgrade)."""

    def __init__(self, message: str, reason: str, holder: Any = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.holder = holder
        """Who holds the store's lock (a LockRecord), when another process does
        (see sds.forwarding)."""


class Relay:
    """All live stores of the server, their limits, and how clients join and leave."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_connections_per_store: int,
        storage: Storage[Any] | None = None,
        metrics: Metrics | None = None,
        max_pending_bytes_per_store: int = 64 * 1024 * 1024,
        max_pending_bytes_total: int = 256 * 1024 * 1024,
        max_catchup_bytes_per_client: int = 4 * 1024 * 1024,
        max_catchup_bytes_total: int = 64 * 1024 * 1024,
        tasks: Tasks | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.max_connections_per_store = max_connections_per_store
        self.storage = storage
        self.metrics = metrics or Metrics()
        self.tasks = tasks if tasks is not None else Tasks()
        self.max_pending_bytes_per_store = max_pending_bytes_per_store
        self.pending = PendingBytes(max_pending_bytes_total)
        """Bytes waiting for their commit, all stores together."""
        self.catchup_page_bytes = max_catchup_bytes_per_client
        self.catchup = ByteBudget(max_catchup_bytes_total)
        """Bytes of catch-up pages read from storage and not yet taken by the joiners' sockets."""
        self.flusher = Flusher()
        self.stores: dict[str, LiveStore] = {}
        self.connections = 0
        self._opening: dict[str, asyncio.Future[LiveStore]] = {}
        self._users: dict[str, int] = {}

    def admit(self, store_id: str) -> None:
        """Raise Refused when one more connection to ``store_id`` would pass a limit."""
        if self.open_connections() >= self.max_connections:
            raise Refused("server is at its connection limit", "max_connections")
        if self._users.get(store_id, 0) >= self.max_connections_per_store:
            raise Refused("store is at its connection limit", "max_connections_per_store")

    def open_connections(self) -> int:
        """Connections counted by --max-connections: /ws, /signal and forwarded ones."""
        m = self.metrics
        return self.connections + m.signal_connections_open + m.forwarded_connections_open

    async def open_store(self, store_id: str) -> LiveStore:
        """The live store of ``store_id`` with one more user counted (opens its file if needed)."""
        self.admit(store_id)
        self.connections += 1
        self._users[store_id] = self._users.get(store_id, 0) + 1
        try:
            store = self.stores.get(store_id)
            if store is None:
                store = await self._create_store(store_id)
        except BaseException:
            self._forget_user(store_id)
            raise
        if store.idle_handle is not None:
            store.idle_handle.cancel()
            store.idle_handle = None
        return store

    async def _create_store(self, store_id: str) -> LiveStore:
        opening = self._opening.get(store_id)
        if opening is not None:
            return await asyncio.shield(opening)
        opening = asyncio.get_running_loop().create_future()
        self._opening[store_id] = opening
        try:
            store = LiveStore(
                store_id,
                metrics=self.metrics,
                max_pending_bytes=self.max_pending_bytes_per_store,
                pending_total=self.pending,
            )
            if self.storage is not None:
                try:
                    store.log = await self.storage.acquire(store_id)
                    store.relayed_clock = await store.log.last_clock()
                except StorageError as exc:
                    if store.log is not None:
                        self.storage.release(store.log)
                    # Set on sds.backends.sqlite.StoreLocked: another process holds the file.
                    holder = getattr(exc, "holder", None)
                    raise Refused(str(exc), "storage", holder) from None
            self.stores[store_id] = store
            self.metrics.stores_open = len(self.stores)
            opening.set_result(store)
            return store
        except BaseException as exc:
            opening.set_exception(exc)
            opening.exception()
            raise
        finally:
            self._opening.pop(store_id, None)

    async def join(self, store: LiveStore, client: Client) -> None:
        """Add a client; with storage, replay the history up to the last relayed clock first."""
        if store.log is None:
            store.add_client(client)
            return
        client.hold()
        upto = store.relayed_clock
        store.add_client(client)
        reserved = 0

        async def reserve(size: int) -> None:
            # The page before this one is on the socket (all but a quarter of the
            # client's buffer bound): its bytes go back to the budget first.
            nonlocal reserved
            self._give_catchup(reserved)
            reserved = 0
            try:
                async with asyncio.timeout(CATCHUP_WAIT_SECONDS):
                    reserved = await self.catchup.take(size)
            finally:
                self.metrics.catchup_waits = self.catchup.waits
                self.metrics.catchup_bytes = self.catchup.used

        history = store.log.history(upto, page_bytes=self.catchup_page_bytes, reserve=reserve)
        # The snapshot, when it was the last frame of the history (no patch after it).
        snapshot: bytes | None = None
        try:
            async with contextlib.aclosing(history):
                async for page in history:
                    if client.gone():
                        break
                    await client.send_history(page)
                    prefix, data = page[-1]
                    snapshot = data if prefix == VALUE_PREFIX else None
            if snapshot is not None:
                # A VALUE that committed after the join replaced the snapshot before it
                # was read: the joiner has it already, with the writes it superseded.
                client.drop_held_through_value(snapshot)
        except StorageError as exc:
            log.error("store %s: catch-up failed: %s", store.store_id, exc)
            client.close(CLOSE_INTERNAL_ERROR, "storage failure")
        except TimeoutError:
            self.metrics.catchup_timeouts += 1
            log.warning("store %s: no room for catch-up (sub %s)", store.store_id, client.sub)
            client.close(CLOSE_TRY_AGAIN_LATER, "server busy, try again later")
        finally:
            self._give_catchup(reserved)
            client.release()

    def _give_catchup(self, size: int) -> None:
        if size:
            self.catchup.give(size)
            self.metrics.catchup_bytes = self.catchup.used

    def leave(self, store: LiveStore, client: Client | None) -> None:
        """Forget a client; a store nobody uses any more is dropped (its file closes later)."""
        if client is not None:
            store.remove_client(client)
        self._forget_user(store.store_id)
        if self._users.get(store.store_id, 0) == 0 and store.is_empty():
            self._drop_store(store)

    def _forget_user(self, store_id: str) -> None:
        self.connections -= 1
        left = self._users.get(store_id, 0) - 1
        if left > 0:
            self._users[store_id] = left
        else:
            self._users.pop(store_id, None)

    def _drop_store(self, store: LiveStore) -> None:
        if store.has_pending():
            store.on_drained(lambda: self._drop_if_unused(store))
            return
        self._drop_if_unused(store)

    def _drop_if_unused(self, store: LiveStore) -> None:
        if self._users.get(store.store_id, 0) or not store.is_empty():
            return
        if self.stores.get(store.store_id) is store:
            del self.stores[store.store_id]
            self.metrics.stores_open = len(self.stores)
        if store.log is not None and self.storage is not None:
            self.storage.release(store.log)
            store.log = None
