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
import contextlib
import hashlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
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


class GroupCommitter:
    """The write queue of one store (file): writes that arrive while a commit runs form the
    next group commit, and one task commits the groups in order.

    A backend says how a group is written (``_commit``, which sets ``commit.ok``);
    queuing, gathering and handing the outcome to the relay are the same everywhere.
    """

    def __init__(self) -> None:
        self._next: Commit | None = None
        self._writing = 0
        self._committer: asyncio.Task[None] | None = None

    def _begin(self) -> Commit:
        """Start the next group commit (and the task that commits, if it is not running)."""
        commit = self._next = Commit(asyncio.get_running_loop())
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_loop())
        return commit

    def submit(self, write: Write) -> Commit:
        """Queue a blob or snapshot write for the next group commit, which is returned."""
        commit = self._next or self._begin()
        commit.add(write)
        return commit

    def queued_writes(self) -> int:
        """Writes waiting for their commit: the one being written and the next."""
        return self._writing + (self._next.size if self._next is not None else 0)

    async def _commit_loop(self) -> None:
        try:
            while self._next is not None:
                await gather_writes(self._next)
                commit, self._next = self._next, None
                try:
                    await self._commit(commit)
                finally:
                    if commit.ok is None:  # an unexpected error: nothing of it is relayed
                        commit.ok = False
                    commit.done.set_result(None)
        finally:
            self._committer = None

    async def _commit(self, commit: Commit) -> None:
        """Write one group commit and set ``commit.ok``."""
        raise NotImplementedError

    async def finish(self) -> None:
        """Wait for the commits already queued (a cancelled caller does not cancel them)."""
        committer = self._committer
        if committer is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(committer)


async def gather_writes(commit: Commit) -> None:
    """Let the event loop read what already arrived, so one commit takes all of it.

    Each turn costs microseconds; under load it adds the frames of every socket
    read in that turn to the group, and fewer, larger commits cost less per frame.
    When a turn brings no new write, the commit starts at once.
    """
    for _ in range(GATHER_TURNS):
        size = commit.size
        await asyncio.sleep(0)
        if commit.size == size:
            return


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


class HistorySource(Protocol):
    """The reads ``joiner_pages`` needs from one store of a backend."""

    @property
    def page_rows(self) -> int:
        """Rows in one catch-up page at most (a page is also bounded in bytes by the caller)."""
        ...

    async def snapshot_size(self) -> int | None:
        """The size of the store's snapshot (None without one), read without its data."""
        ...

    async def read_snapshot(self) -> tuple[bytes, int] | None:
        """The snapshot's VALUE payload and clock, or None."""
        ...

    async def patch_sizes(self, after: int, upto: int, limit: int) -> list[tuple[int, int]]:
        """(clock, size) of at most ``limit`` patches with ``after < clock <= upto``, in clock order."""
        ...

    async def read_patches(self, after: int, last: int) -> list[bytes]:
        """The payloads of the patches with ``after < clock <= last``, in clock order."""
        ...


ALL_CLOCKS = 1 << 62
"""An ``upto`` past every clock: the whole history (maintenance)."""


async def joiner_pages(
    source: HistorySource,
    upto: int,
    *,
    page_bytes: int,
    reserve: Callable[[int], Awaitable[None]],
) -> AsyncGenerator[list[tuple[bytes, bytes]], None]:
    """What a client joining the store receives, up to clock ``upto``, in pages.

    The one definition of a joiner's view, on every backend: the snapshot (if
    any) as a VALUE frame, then the patches after the snapshot's clock in clock
    order. The server's catch-up sends it, and compaction checks against it that
    a joiner receives the same frames before and after. A frame is a (type byte,
    payload) pair; a page holds at most ``page_bytes`` (but at least one frame)
    and is read only after ``reserve`` of its size returned.
    """
    after = 0
    size = await source.snapshot_size()
    if size is not None:
        await reserve(size)
        snapshot = await source.read_snapshot()
        if snapshot is not None:
            data, after = snapshot
            yield [(VALUE_PREFIX, data)]
    while after < upto:
        last, total = after, 0
        for clock, row_size in await source.patch_sizes(after, upto, source.page_rows):
            if total and total + row_size > page_bytes:
                break
            last, total = clock, total + row_size
        if last == after:
            return
        await reserve(total)
        rows = await source.read_patches(after, last)
        after = last
        if rows:
            yield [(PATCH_PREFIX, data) for data in rows]


async def no_budget(_size: int) -> None:
    """A catch-up reservation that never waits (maintenance reads, not joiners)."""
    return None


async def joiner_digests(source: HistorySource, *, page_bytes: int = 4 << 20) -> list[bytes]:
    """The SHA-256 of every frame a joiner receives of the whole history, in order.

    What compaction compares before and after (digests, not frames: a store's
    history need not fit in memory twice).
    """
    digests = []
    pages = joiner_pages(source, ALL_CLOCKS, page_bytes=page_bytes, reserve=no_budget)
    async for page in pages:
        for prefix, data in page:
            digest = hashlib.sha256(prefix)
            digest.update(data)
            digests.append(digest.digest())
    return digests


def distinct_in_order(items: list[bytes]) -> list[bytes]:
    """Each distinct item once, at its first occurrence (what compaction must preserve)."""
    seen: set[bytes] = set()
    result = []
    for item in items:
        if item not in seen:
            seen.add(item)
            result.append(item)
    return result


def run_without_suspending(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (its awaits complete at once).

    Maintenance reads SQLite files through a ``sqlite3`` connection in its own
    thread; ``joiner_pages`` over such a source awaits nothing that waits, so it
    is driven here without an event loop. RuntimeError if it does suspend.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("a synchronous history source suspended")


T = TypeVar("T")
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
