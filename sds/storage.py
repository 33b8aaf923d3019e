"""One SQLite file per store: schema, group commit, catch-up reads, the one-writer lock.

File layout (compatible with the Node server's persistence, so files open in place):

* ``snapshots(store_id, data, clock)``: ``data`` is a VALUE payload (key + value)
  in ``--value-mode snapshot``; sent to joiners as a VALUE frame.
* ``patches(store_id, clock, data)``: ``data`` is the PATCH payload without its
  type byte; ``clock`` is gap-free per store (max + 1), assigned at commit.
* ``blobs(hash, data, ref_count)``: ``hash`` is the lowercase hex of a value key,
  ``data`` the value bytes without the key.

While the server has a file open it holds an exclusive ``flock`` on the file's
lock file (``<name>.db.lock``); every other writer (``sds store compact``,
``sds restore``) takes the same lock first or goes through the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiosqlite

from sds.background import spawn
from sds.metrics import Metrics

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    store_id TEXT PRIMARY KEY,
    data BLOB NOT NULL,
    clock INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS patches (
    store_id TEXT NOT NULL,
    clock INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (store_id, clock)
);
CREATE TABLE IF NOT EXISTS blobs (
    hash TEXT PRIMARY KEY,
    data BLOB NOT NULL,
    ref_count INTEGER NOT NULL DEFAULT 0
);
"""
SQLITE_VERSION = sqlite3.sqlite_version
HISTORY_PAGE_ROWS = 128
MAX_ROWS_PER_INSERT = 10_000
"""Rows in one INSERT: one variable each (and two shared), under SQLite's limit of 32766."""
GATHER_TURNS = 4
"""Event-loop turns a group commit may wait, while writes keep arriving, before it starts."""
STATEMENT_CACHE = 512
"""Prepared INSERTs kept per connection (one per batch size seen)."""
LOCK_SUFFIX = ".lock"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def store_filename(store_id: str) -> str:
    """The file of a store: every character outside [A-Za-z0-9_-] becomes ``_``, plus ``.db``."""
    return _UNSAFE.sub("_", store_id) + ".db"


def lock_path(db_path: Path) -> Path:
    """The lock file that guards one store file against a second writer."""
    return db_path.with_name(db_path.name + LOCK_SUFFIX)


@functools.lru_cache(maxsize=STATEMENT_CACHE)
def _insert_statement(rows: int) -> str:
    """INSERT of ``rows`` patches of one store with consecutive clocks.

    Parameters: the store id, the first clock, then one payload per row. Binding
    the store id and the clock once costs a quarter less per row than three
    parameters for every row.
    """
    values = ", ".join(f"(?1, ?2 + {row}, ?{row + 3})" for row in range(rows))
    return "INSERT INTO patches (store_id, clock, data) VALUES " + values


class StorageError(Exception):
    """A store file could not be opened or written."""


class StoreBusy(StorageError):
    """Another process holds the store file's lock, or too many files are open."""


@contextlib.contextmanager
def file_lock(db_path: Path, *, timeout: float) -> Iterator[int]:
    """Hold the one-writer lock of a store file (blocking up to ``timeout`` seconds)."""
    fd = try_lock(db_path, timeout=timeout)
    try:
        yield fd
    finally:
        os.close(fd)


def try_lock(db_path: Path, *, timeout: float) -> int:
    """Take the one-writer lock of a store file; the returned fd holds it until closed."""
    fd = os.open(lock_path(db_path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
        if time.monotonic() >= deadline:
            os.close(fd)
            raise StoreBusy(f"{db_path.name} is locked by another process")
        time.sleep(0.05)


def connect_sync(path: Path, *, sync: str = "normal", readonly: bool = False) -> sqlite3.Connection:
    """Open a store file with the server's pragmas (used by the CLI and tests)."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    else:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={sync.upper()}")
        conn.executescript(SCHEMA)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


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
        self.payloads: list[bytearray] = []


class Commit:
    """One group commit of a store file: every write that arrived while the previous one ran.

    The relay holds the frames of a commit back until ``done`` resolves (never
    with an exception); ``ok`` then says how it went, and ``clocks`` holds the
    last clock each store got in it.
    """

    __slots__ = ("_run", "clocks", "done", "ok", "ops", "size")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.ok: bool | None = None
        self.clocks: dict[str, int] = {}
        self.ops: list[PatchRun | Write] = []
        self.size = 0
        self._run: PatchRun | None = None

    def add_patch(self, store_id: str, payload: bytearray) -> None:
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


class StoreFile:
    """One open SQLite file; its writes are committed in groups, in the order submitted."""

    def __init__(self, path: Path, *, sync: str, metrics: Metrics) -> None:
        self.path = path
        self.sync = sync
        self.metrics = metrics
        self.users = 0
        self.close_handle: asyncio.TimerHandle | None = None
        self.failure: str | None = None
        self._db: Any = None
        self._lock_fd: int | None = None
        self._clocks: dict[str, int] = {}
        self._next: Commit | None = None
        self._writing = 0
        self._committer: asyncio.Task[None] | None = None
        self._io = asyncio.Lock()

    async def open(self, *, lock_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._lock_fd = await loop.run_in_executor(
                None, lambda: try_lock(self.path, timeout=lock_timeout)
            )
        except OSError as exc:
            raise StorageError(f"cannot lock {self.path.name}: {exc.strerror}") from None
        try:
            self._db = await aiosqlite.connect(
                self.path, isolation_level=None, cached_statements=STATEMENT_CACHE
            )
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute(f"PRAGMA synchronous={self.sync.upper()}")
            await self._db.execute("PRAGMA busy_timeout=5000")
            await self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            await self.close()
            raise StorageError(f"cannot open {self.path.name}: {exc}") from None
        self.metrics.store_files_open += 1

    async def close(self) -> None:
        """Finish pending commits and close the file (and its lock)."""
        if self._committer is not None:
            with contextlib.suppress(Exception):
                await self._committer
        if self._db is not None:
            db, self._db = self._db, None
            with contextlib.suppress(sqlite3.Error, ValueError):
                await db.close()
            self.metrics.store_files_open -= 1
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _max_clock(self, store_id: str) -> int:
        """The highest committed clock of a store (patches or snapshot); call with ``_io`` held."""
        async with self._db.execute(
            "SELECT max(clock) FROM (SELECT max(clock) AS clock FROM patches WHERE store_id = ?"
            " UNION ALL SELECT clock FROM snapshots WHERE store_id = ?)",
            (store_id, store_id),
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def append_patch(self, store_id: str, payload: bytearray) -> Commit:
        """Queue a patch for the next group commit, which is returned."""
        commit = self._next or self._begin()
        commit.add_patch(store_id, payload)
        return commit

    def queued_writes(self) -> int:
        """Writes waiting for their commit: the one being written and the next."""
        return self._writing + (self._next.size if self._next is not None else 0)

    def submit(self, write: Write) -> Commit:
        """Queue a blob or snapshot write for the next group commit, which is returned."""
        commit = self._next or self._begin()
        commit.add(write)
        return commit

    def _begin(self) -> Commit:
        commit = self._next = Commit(asyncio.get_running_loop())
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_loop())
        return commit

    async def _commit_loop(self) -> None:
        try:
            while self._next is not None:
                await self._gather(self._next)
                commit, self._next = self._next, None
                try:
                    await self._commit(commit)
                finally:
                    if commit.ok is None:  # an unexpected error: nothing of it is relayed
                        commit.ok = False
                    commit.done.set_result(None)
        finally:
            self._committer = None

    @staticmethod
    async def _gather(commit: Commit) -> None:
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

    async def _commit(self, commit: Commit) -> None:
        started = time.perf_counter()
        self._writing = commit.size
        clocks_before = dict(self._clocks)
        try:
            async with self._io:
                if self._db is None:
                    raise StorageError(f"{self.path.name} is closed")
                for store_id in commit.store_ids() - self._clocks.keys():
                    self._clocks[store_id] = await self._max_clock(store_id)
                ops = commit.ops
                run = ops[0]
                if (
                    len(ops) == 1
                    and isinstance(run, PatchRun)
                    and len(run.payloads) <= MAX_ROWS_PER_INSERT
                ):
                    # One INSERT is one transaction of its own: a single round trip to
                    # the database thread, which is what bounds a group commit's latency.
                    await self._insert_run(run, commit)
                else:
                    await self._db.execute("BEGIN IMMEDIATE")
                    try:
                        await self._write_ops(ops, commit)
                        await self._db.execute("COMMIT")
                    except BaseException:
                        with contextlib.suppress(sqlite3.Error):
                            await self._db.execute("ROLLBACK")
                        raise
        except (sqlite3.Error, StorageError, OSError) as exc:
            self._clocks = clocks_before
            self.failure = f"{self.path.name}: {exc}"
            self.metrics.commit_failures += 1
            log.error("storage write failed for %s: %s", self.path.name, exc)
            commit.clocks = {}
            commit.ok = False
        else:
            self.failure = None
            commit.ok = True
        finally:
            self._writing = 0
            elapsed = time.perf_counter() - started
            self.metrics.commits += 1
            self.metrics.commit_seconds_total += elapsed
            self.metrics.commit_seconds_max = max(self.metrics.commit_seconds_max, elapsed)

    async def _write_ops(self, ops: list[PatchRun | Write], commit: Commit) -> None:
        """Write a commit's operations in order, inside its transaction."""
        for op in ops:
            if isinstance(op, PatchRun):
                await self._insert_run(op, commit)
            elif op.kind == "blob":
                await self._db.execute(
                    "INSERT INTO blobs (hash, data, ref_count) VALUES (?, ?, 1) "
                    "ON CONFLICT(hash) DO UPDATE SET data = excluded.data",
                    (op.key, op.data),
                )
            elif op.kind == "snapshot":
                clock = self._clocks[op.store_id]
                await self._db.execute(
                    "INSERT OR REPLACE INTO snapshots (store_id, data, clock) VALUES (?, ?, ?)",
                    (op.store_id, op.data, clock),
                )
                await self._db.execute(
                    "DELETE FROM patches WHERE store_id = ? AND clock <= ?",
                    (op.store_id, clock),
                )

    async def _insert_run(self, run: PatchRun, commit: Commit) -> None:
        """Insert a run of patches with the next clocks of their store, many rows per statement.

        Multi-row statements cost about a third less per row than one row each.
        """
        store_id, payloads = run.store_id, run.payloads
        first = self._clocks[store_id] + 1
        for start in range(0, len(payloads), MAX_ROWS_PER_INSERT):
            chunk = payloads[start : start + MAX_ROWS_PER_INSERT]
            await self._db.execute(_insert_statement(len(chunk)), [store_id, first + start, *chunk])
        self._clocks[store_id] = commit.clocks[store_id] = first + len(payloads) - 1

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[Any]:
        """The connection for one read, between commits; SQLite errors become StorageError."""
        async with self._io:
            if self._db is None:
                raise StorageError(f"{self.path.name} is closed")
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise StorageError(f"reading {self.path.name} failed: {exc}") from None

    async def read_blob(self, key: str) -> bytes | None:
        """The stored value for a key (hex), or None."""
        async with (
            self._reading() as db,
            db.execute("SELECT data FROM blobs WHERE hash = ?", (key,)) as cur,
        ):
            row = await cur.fetchone()
        return bytes(row[0]) if row else None

    async def last_clock(self, store_id: str) -> int:
        async with self._reading():
            return await self._max_clock(store_id)

    async def read_snapshot(self, store_id: str) -> tuple[bytes, int] | None:
        async with (
            self._reading() as db,
            db.execute("SELECT data, clock FROM snapshots WHERE store_id = ?", (store_id,)) as cur,
        ):
            row = await cur.fetchone()
        return (bytes(row[0]), int(row[1])) if row else None

    async def read_patches(self, store_id: str, after: int, upto: int) -> list[tuple[int, bytes]]:
        """One page of patches with ``after < clock <= upto``, in clock order."""
        async with (
            self._reading() as db,
            db.execute(
                "SELECT clock, data FROM patches WHERE store_id = ? AND clock > ? AND clock <= ? "
                "ORDER BY clock LIMIT ?",
                (store_id, after, upto, HISTORY_PAGE_ROWS),
            ) as cur,
        ):
            rows = await cur.fetchall()
        return [(int(clock), bytes(data)) for clock, data in rows]

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[Path]:
        """Let maintenance own the file: pending commits finish, new ones wait until the end."""
        async with self._io:
            yield self.path


class StoreLog:
    """What one store writes and reads in its file."""

    __slots__ = ("file", "store_id", "value_mode")

    def __init__(self, file: StoreFile, store_id: str, value_mode: str) -> None:
        self.file = file
        self.store_id = store_id
        self.value_mode = value_mode

    def append_patch(self, frame: bytes) -> Commit:
        """Store a PATCH frame's payload (the frame without its type byte)."""
        # sqlite3 binds a bytearray as a BLOB directly; a bytes parameter first goes
        # through the adapter lookup, which raises and clears an AttributeError per row.
        payload = bytearray(frame)
        del payload[0]
        return self.file.append_patch(self.store_id, payload)

    def put_value(self, key: str, value: bytes, payload: bytes) -> Commit:
        """Store a VALUE: as a blob, or (snapshot mode) as the store snapshot."""
        if self.value_mode == "snapshot":
            return self.file.submit(Write(self.store_id, "snapshot", payload))
        return self.put_blob(key, value)

    def put_blob(self, key: str, value: bytes) -> Commit:
        return self.file.submit(Write(self.store_id, "blob", value, key=key))

    async def read_blob(self, key: str) -> bytes | None:
        return await self.file.read_blob(key)

    def paused(self) -> contextlib.AbstractAsyncContextManager[Path]:
        """Let maintenance own the store's file (see ``StoreFile.paused``)."""
        return self.file.paused()

    async def last_clock(self) -> int:
        """The highest committed clock of this store (its snapshot's when patches were pruned)."""
        return await self.file.last_clock(self.store_id)

    async def history(self, upto: int) -> AsyncIterator[list[bytes]]:
        """The stored frames up to clock ``upto`` in pages: the snapshot as VALUE, then patches."""
        snapshot = await self.file.read_snapshot(self.store_id)
        after = 0
        if snapshot is not None:
            data, after = snapshot
            yield [b"\x02" + data]
        while after < upto:
            rows = await self.file.read_patches(self.store_id, after, upto)
            if not rows:
                return
            after = rows[-1][0]
            yield [b"\x01" + data for _, data in rows]


class Storage:
    """The open store files of one persist dir, bounded in number."""

    def __init__(
        self,
        directory: Path,
        *,
        sync: str = "normal",
        value_mode: str = "blob",
        max_open: int = 256,
        close_grace: float = 5.0,
        lock_timeout: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.directory = directory
        self.sync = sync
        self.value_mode = value_mode
        self.max_open = max_open
        self.close_grace = close_grace
        self.lock_timeout = lock_timeout
        self.metrics = metrics or Metrics()
        self._files: dict[str, StoreFile] = {}
        self._opening: dict[str, asyncio.Future[StoreFile]] = {}

    def path_of(self, store_id: str) -> Path:
        return self.directory / store_filename(store_id)

    @property
    def failures(self) -> list[str]:
        return [f.failure for f in self._files.values() if f.failure]

    def open_files(self) -> list[StoreFile]:
        return list(self._files.values())

    def queued_writes(self) -> int:
        """Writes waiting for their commit, in all open files."""
        return sum(file.queued_writes() for file in self._files.values())

    async def acquire(self, store_id: str) -> StoreLog:
        """Open (or reuse) the file of a store for one more user."""
        name = store_filename(store_id)
        file = self._files.get(name)
        if file is None:
            opening = self._opening.get(name)
            if opening is None:
                opening = asyncio.get_running_loop().create_future()
                self._opening[name] = opening
                try:
                    file = await self._open(name)
                except BaseException as exc:
                    opening.set_exception(exc)
                    opening.exception()
                    raise
                finally:
                    self._opening.pop(name, None)
                opening.set_result(file)
            else:
                file = await asyncio.shield(opening)
        if file.close_handle is not None:
            file.close_handle.cancel()
            file.close_handle = None
        file.users += 1
        return StoreLog(file, store_id, self.value_mode)

    async def _open(self, name: str) -> StoreFile:
        if len(self._files) + len(self._opening) > self.max_open:
            idle = [f for f in self._files.values() if f.users == 0]
            if not idle:
                raise StoreBusy("too many store files open")
            await self._close_file(idle[0])
        file = StoreFile(self.directory / name, sync=self.sync, metrics=self.metrics)
        await file.open(lock_timeout=self.lock_timeout)
        self._files[name] = file
        return file

    def release(self, store_log: StoreLog) -> None:
        """One user fewer; the file closes after the grace period when nobody uses it."""
        file = store_log.file
        file.users -= 1
        if file.users == 0 and file.close_handle is None:
            loop = asyncio.get_running_loop()
            file.close_handle = loop.call_later(
                self.close_grace, lambda: spawn(self._close_idle(file))
            )

    async def _close_idle(self, file: StoreFile) -> None:
        file.close_handle = None
        if file.users == 0:
            await self._close_file(file)

    async def _close_file(self, file: StoreFile) -> None:
        if file.close_handle is not None:
            file.close_handle.cancel()
            file.close_handle = None
        if self._files.get(file.path.name) is file:
            del self._files[file.path.name]
        await file.close()

    async def close(self) -> None:
        """Flush and close every file (shutdown)."""
        for file in list(self._files.values()):
            await self._close_file(file)
