"""The storage interface: what the relay, the /ws handler, the admin API and the app use.

A backend (today's SQLite files in ``sds.storage``, PostgreSQL in
``sds.backends.postgres``) provides these shapes; nothing outside a backend
needs to know which one is configured. The guarantees every backend keeps are
SPEC 4's: a write's ``Commit`` resolves only after it is durable, clocks are
gap-free per store, ``history`` yields what a joiner receives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar


class StorageError(Exception):
    """A store could not be opened, read or written (its text may reach clients: no secrets)."""


class StoreBusy(StorageError):
    """The store is held elsewhere, or too many stores are open: try again later."""


class BlobChanged(StorageError):
    """A value was overwritten (or its store compacted) while it was read in pieces."""


class Commit(Protocol):
    """One group commit: the relay holds a write's frames back until ``done`` resolves.

    ``done`` never resolves with an exception; ``ok`` then tells whether the
    commit is durable (False: nothing of it may be relayed, its senders are
    closed with 1011), and ``clocks`` holds the last clock each store got in it.
    """

    done: asyncio.Future[None]
    ok: bool | None
    clocks: dict[str, int]


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

    async def close(self) -> None:
        """Finish pending commits and close everything (shutdown)."""
        ...
