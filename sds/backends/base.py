"""The storage interface: what the relay, the /ws handler, the admin API and the app use.

A backend (today's SQLite files in ``sds.storage``, PostgreSQL in
``sds.backends.postgres``) provides these shapes; nothing outside a backend
needs to know which one is configured. The guarantees every backend keeps are
SPEC 4's: a write's ``Commit`` resolves only after it is durable, clocks are
gap-free per store, ``history`` yields what a joiner receives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar


class Commit(Protocol):
    """One group commit: the relay holds a write's frames back until ``done`` resolves.

    ``done`` never resolves with an exception; ``ok`` then tells whether the
    commit is durable (False: nothing of it may be relayed, its senders are
    closed with 1011), and ``clocks`` holds the last clock each store got in it.
    """

    done: asyncio.Future[None]
    ok: bool | None
    clocks: dict[str, int]


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

    async def read_blob(self, key: str) -> bytes | None:
        """The stored value of a hex key, or None (answers REQ_VALUE)."""
        ...

    async def last_clock(self) -> int:
        """The highest committed clock of the store (its snapshot's when patches were pruned)."""
        ...

    def history(self, upto: int) -> AsyncIterator[list[bytes]]:
        """What a joiner receives up to ``upto``, in bounded pages: snapshot as VALUE, then patches."""
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

    async def acquire(self, store_id: str) -> LogT:
        """Open (or reuse) a store for one more user; StorageError when it cannot be opened."""
        ...

    def release(self, store_log: LogT) -> None:
        """One user fewer; an unused store is closed after the grace period."""
        ...

    async def close(self) -> None:
        """Finish pending commits and close everything (shutdown)."""
        ...
