"""The storage interface: what the relay, the /ws handler, the admin API and the app use.

A backend (SQLite files in ``sds.backends.sqlite``, PostgreSQL in
``sds.backends.postgres``) provides these shapes and raises these errors;
nothing outside the backends needs to know which one is configured (only
maintenance of SQLite files on disk imports ``sds.backends.sqlite``). The
guarantees every backend keeps are SPEC 4's: a write's ``Commit`` resolves only after it is durable, clocks are
gap-free per store, ``history`` yields what a joiner receives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import Executor
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar


class StorageError(Exception):
    """A store could not be opened, read or written (its text may reach clients: no secrets)."""


class StoreBusy(StorageError):
    """The store is held elsewhere, or too many stores are open: try again later."""


class UnknownStore(StorageError):
    """Nothing is stored for the store (maintenance asked for a store that does not exist)."""


class CompactionFailed(StorageError):
    """Compaction of a store failed; nothing of it was applied."""


class BlobChanged(StorageError):
    """A value was overwritten (or its store compacted) while it was read in pieces."""


GATHER_TURNS = 4
"""Event-loop turns a group commit may wait, while writes keep arriving, before it starts."""
PATCH_PREFIX = b"\x01"
VALUE_PREFIX = b"\x02"
VIEW_BINDING_BYTES = 4096
"""Patch payloads of this size or more are bound as a view of the received frame (held
once); smaller ones are copied into a bytearray, which sqlite3 binds faster than a view
(asyncpg binds both alike)."""


def patch_payload(frame: bytes) -> bytearray | memoryview:
    """A PATCH frame's payload (without its type byte) as a commit holds it.

    A large payload is a view of the frame the relay holds anyway (held once, so
    what waits for a commit is counted once); a small one a copy in a bytearray:
    sqlite3 binds a bytearray as a BLOB directly, while bytes or a memoryview go
    through its adapter lookup (Python 3.11 raises and clears an AttributeError
    per row), which costs more than copying a small payload.
    """
    if len(frame) > VIEW_BINDING_BYTES:
        return memoryview(frame)[1:]
    payload = bytearray(frame)
    del payload[0]
    return payload


class Write:
    """A write other than a patch (a blob, or a snapshot in ``--value-mode snapshot``)."""

    __slots__ = ("data", "key", "kind", "store_id")

    def __init__(self, store_id: str, kind: str, data: bytes, key: str = "") -> None:
        self.store_id = store_id
        self.kind = kind
        self.data = data
        self.key = key


class PatchRun:
    """Patches of one store that follow each other in a commit: one multi-row INSERT."""

    __slots__ = ("payloads", "store_id")

    def __init__(self, store_id: str) -> None:
        self.store_id = store_id
        self.payloads: list[bytearray | memoryview] = []


class Commit:
    """One group commit: every write of a store (file) that arrived while the previous one ran.

    The relay holds a write's frames back until ``done`` resolves (never with an
    exception); ``ok`` then tells whether the commit is durable (False: nothing of
    it may be relayed, its senders are closed with 1011), and ``clocks`` holds the
    last clock each store got in it. Both backends queue their writes in it.
    """

    __slots__ = ("_run", "clocks", "done", "ok", "ops", "size")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.ok: bool | None = None
        self.clocks: dict[str, int] = {}
        self.ops: list[PatchRun | Write] = []
        self.size = 0
        self._run: PatchRun | None = None

    def add_patch(self, store_id: str, payload: bytearray | memoryview) -> None:
        run = self._run
        if run is None or run.store_id != store_id:
            run = self._run = PatchRun(store_id)
            self.ops.append(run)
        run.payloads.append(payload)
        self.size += 1

    def add(self, write: Write) -> None:
        self.ops.append(write)
        self._run = None
        self.size += 1

    def store_ids(self) -> set[str]:
        return {op.store_id for op in self.ops}


class BlobReader(Protocol):
    """A stored value opened for reading in pieces (what a backend needs to find it again)."""

    @property
    def key(self) -> str: ...

    @property
    def size(self) -> int: ...


class StoreLog(Protocol):
    """What one store writes and reads; writes are queued for the next group commit."""

    store_id: str

    def append_patch(self, frame: bytes) -> Commit:
        """Store a PATCH frame's payload (the frame without its type byte) with the next clock."""
        ...

    def put_value(self, key: str, value: bytes, payload: bytes) -> Commit:
        """Store a VALUE: as a blob, or (``--value-mode snapshot``) as the store snapshot."""
        ...

    def put_blob(self, key: str, value: bytes) -> Commit:
        """Store a value (a completed VALUE_CHUNK sequence) under its hex key."""
        ...

    def open_blob(self, key: str) -> AbstractAsyncContextManager[BlobReader | None]:
        """This store's value for a hex key, to read in pieces (None: the store has none).

        Nothing of the value is read yet, and commits go on while it is read.
        """
        ...

    async def read_blob_piece(self, reader: BlobReader, offset: int, size: int) -> bytes:
        """``size`` bytes of an opened value from ``offset``, never the whole value at once.

        Raises BlobChanged when the value was overwritten since ``open_blob``.
        """
        ...

    async def last_clock(self) -> int:
        """The highest committed clock of the store (its snapshot's when patches were pruned)."""
        ...

    def history(
        self, upto: int, *, page_bytes: int, reserve: Callable[[int], Awaitable[None]]
    ) -> AsyncGenerator[list[tuple[bytes, bytes]], None]:
        """What a joiner receives up to ``upto``: the snapshot as VALUE, then patches in clock order.

        Frames are (type byte, payload) pairs. A page holds at most ``page_bytes``
        (but at least one frame) and is read only after ``reserve`` of its size
        returned (the caller's memory budget).
        """
        ...

    def paused(self) -> AbstractAsyncContextManager[object]:
        """Hold the store's commits and reads back while maintenance owns it."""
        ...


LogT = TypeVar("LogT", bound=StoreLog)


class Storage(Protocol[LogT]):
    """The stores of one backend, opened per user and closed when idle."""

    @property
    def failures(self) -> list[str]:
        """Why the last writes failed (empty when storage works); reported by /healthz."""
        ...

    def queued_writes(self) -> int:
        """Writes waiting for their commit (the commit queue gauge)."""
        ...

    def advertise(self, url: str) -> None:
        """The server is reached at ``url`` from now on (recorded where the backend needs it)."""
        ...

    async def acquire(self, store_id: str) -> LogT:
        """Open (or reuse) a store for one more user; StorageError when it cannot be opened."""
        ...

    def release(self, store_log: LogT) -> None:
        """One user fewer; an unused store is closed after the grace period."""
        ...

    async def compact(
        self, store_id: str, *, value_mode: str, executor: Executor
    ) -> dict[str, Any]:
        """Compact one store while serving it; the report (JSON) of what was removed.

        Byte-identical repeats of a patch go (the first stays) and, in ``value_mode``
        snapshot, patches the snapshot supersedes: a joiner receives the same frames,
        each once. Blocking work runs in ``executor``. UnknownStore when nothing is
        stored for ``store_id``, StoreBusy when it cannot be opened now,
        CompactionFailed when it failed (nothing was applied).
        """
        ...

    async def close(self) -> None:
        """Finish pending commits and close everything (shutdown)."""
        ...
