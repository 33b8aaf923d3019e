"""One SQLite file per store: schema, group commit, catch-up reads, the one-writer lock.

File layout (compatible with the Node server's persistence, so files open in place):

* ``snapshots(store_id, data, clock)``: ``data`` is a VALUE payload (key + value)
  in ``--value-mode snapshot``; sent to joiners as a VALUE frame.
* ``patches(store_id, clock, data)``: ``data`` is the PATCH payload without its
  type byte; ``clock`` is gap-free per store (max + 1), assigned at commit.
* ``blobs(hash, data, ref_count)``: ``hash`` is the lowercase hex of a value key,
  ``data`` the value bytes without the key.

Two tables of our own keep the values of the store ids that share a file apart
(``blobs`` has no store id): ``blob_owners(hash, store_id)`` names the store
whose value a ``blobs`` row is (a row without an owner was written by the Node
server and is readable by every store of the file), and ``store_blobs(store_id,
hash, data)`` holds a store's value whose key in ``blobs`` is another store's
(or ownerless). See docs/persistence.md.

While the server has a file open it holds an exclusive ``flock`` on the file's
lock file (``<name>.db.lock``); every other writer (``sds store compact``,
``sds restore``) takes the same lock first or goes through the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import logging
import os
import re
import secrets
import sqlite3
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from sds.backends import base
from sds.backends.base import (
    ALL_CLOCKS,
    BlobChanged,
    Commit,
    CompactionFailed,
    GroupCommitter,
    PatchRun,
    StorageError,
    StoreBusy,
    UnknownStore,
    Write,
    joiner_digests,
    joiner_pages,
    no_budget,
    patch_payload,
    run_without_suspending,
)
from sds.background import Tasks
from sds.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

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
CREATE TABLE IF NOT EXISTS blob_owners (
    hash TEXT PRIMARY KEY,
    store_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS store_blobs (
    store_id TEXT NOT NULL,
    hash TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (store_id, hash)
);
"""
OWN_BLOB_TABLES = ("blob_owners", "store_blobs")
"""Our tables beside the Node server's three: which store a value in ``blobs`` belongs to."""
_FIND_BLOB = (
    "SELECT 'store_blobs', rowid, length(data) FROM store_blobs WHERE store_id = ?1 AND hash = ?2"
    " UNION ALL SELECT 'blobs', b.rowid, length(b.data) FROM blobs AS b"
    " LEFT JOIN blob_owners AS o ON o.hash = b.hash"
    " WHERE b.hash = ?2 AND (o.store_id IS NULL OR o.store_id = ?1)"
    " LIMIT 1"
)
"""Where a store's value for a key is: its own row in store_blobs first, then blobs when the
row there is the store's or has no owner. ``length()`` of a BLOB does not read its content."""
SQLITE_VERSION = sqlite3.sqlite_version
MAX_ROWS_PER_INSERT = 10_000
"""Rows in one INSERT: one variable each (and two shared), under SQLite's limit of 32766."""
STATEMENT_CACHE = 512
"""Prepared INSERTs kept per connection (one per batch size seen)."""
OPEN_THREADS = 8
"""Threads that wait for store file locks (each wait lasts up to the lock timeout)."""
LOCK_SUFFIX = ".lock"
LOCKED_WARNING_SECONDS = 60.0
"""A store held by another process is logged at most once per this many seconds."""
MAX_LOCKED_WARNINGS = 4096
SERVER_RECORD_PREFIX = ".sds-server-"
"""Directory record of a running server: ``<persist dir>/.sds-server-<instance>.lock``."""
STALE_SERVER_RECORD_SECONDS = 10.0
HANDOVER_COMMAND = "handover"
"""The ``command`` of a lock record whose holder is letting the store go: wait, do not forward."""
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


class StoreLocked(StoreBusy):
    """Another process holds the store file's lock; ``holder`` is its lock record (or None)."""

    def __init__(self, message: str, holder: LockRecord | None) -> None:
        super().__init__(message)
        self.holder = holder


@dataclasses.dataclass(frozen=True)
class LockRecord:
    """Who holds a lock file: written into it by every process right after its flock succeeds.

    The flock is the truth about *whether* the file is held; the record says *by whom*
    and where that process is reached: a server records its URL (the address it bound),
    its persist dir and a random instance id, so ``sds store compact`` talks to the one
    process that owns the store and to nobody else. Command-line writers (compaction,
    restore) record their pid and command with no URL.
    """

    pid: int
    instance: str
    url: str | None = None
    persist_dir: str | None = None
    command: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> LockRecord | None:
        """The record of a lock file's text; None when empty or unreadable."""
        try:
            data = json.loads(text)
            record = cls(
                pid=int(data["pid"]),
                instance=str(data["instance"]),
                url=str(data["url"]) if data.get("url") else None,
                persist_dir=str(data["persist_dir"]) if data.get("persist_dir") else None,
                command=str(data["command"]) if data.get("command") else None,
            )
        except (ValueError, KeyError, TypeError):
            return None
        return record

    def describe(self) -> str:
        """``pid 123, http://127.0.0.1:3000`` (or ``pid 123, sds store compact``)."""
        where = self.url or self.command
        return f"pid {self.pid}, {where}" if where else f"pid {self.pid}"


PROCESS_INSTANCE = secrets.token_hex(8)
"""A random id of this process: recorded in the lock files it takes."""


def process_record(command: str | None = None) -> LockRecord:
    """The lock record of a process that is not a server (no URL)."""
    return LockRecord(pid=os.getpid(), instance=PROCESS_INSTANCE, command=command)


@contextlib.contextmanager
def file_lock(db_path: Path, *, timeout: float, record: LockRecord | None = None) -> Iterator[int]:
    """Hold the one-writer lock of a store file (blocking up to ``timeout`` seconds)."""
    fd = try_lock(db_path, timeout=timeout, record=record)
    try:
        yield fd
    finally:
        unlock(fd)


def try_lock(
    db_path: Path,
    *,
    timeout: float,
    record: LockRecord | None = None,
    previous: list[LockRecord | None] | None = None,
) -> int:
    """Take the one-writer lock of a store file; the returned fd holds it until closed.

    Once the flock is held, ``record`` (default: this process without a URL)
    replaces the lock file's content; the record found there before (a killed
    holder's, or a stopped server's handover record) is appended to ``previous``.
    StoreLocked, with the holder's record, when another process keeps the lock
    past ``timeout`` seconds, or at once when the holder is another live server
    (its clients are forwarded there, see sds.forwarding).
    """
    fd = os.open(lock_path(db_path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
        holder = _read_record(fd) if record is not None and record.url else None
        if (
            holder is not None
            and holder.url
            and holder.command != HANDOVER_COMMAND
            and holder.instance != (record and record.instance)
        ):
            # Another live server owns it: its clients are forwarded there, no wait.
            os.close(fd)
            raise StoreLocked(f"{db_path.name} is locked by another process", holder)
        if time.monotonic() >= deadline:
            holder = _read_record(fd)
            os.close(fd)
            # The holder's pid and URL go to the log, not into messages clients may see.
            raise StoreLocked(f"{db_path.name} is locked by another process", holder)
        time.sleep(0.05)
    if previous is not None:
        previous.append(_read_record(fd))
    try:
        data = (record or process_record()).to_json().encode() + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:
        # The record is for diagnostics; the flock alone guards the file.
        pass
    return fd


def rewrite_record(fd: int, record: LockRecord) -> None:
    """Replace the record of a lock this process holds (e.g. to say it is being handed over)."""
    with contextlib.suppress(OSError):
        data = record.to_json().encode() + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def unlock(fd: int) -> None:
    """Release a lock taken by try_lock; its record is cleared so nobody reads it as current.

    A handover record stays: it tells the next holder which server had the store
    before (sds.ownership moves the store back when that server returns).
    """
    record = _read_record(fd)
    if record is None or record.command != HANDOVER_COMMAND:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
    os.close(fd)


def lock_holder(db_path: Path) -> LockRecord | None:
    """The record of the process holding a store file's lock; None when nobody holds it.

    A held lock whose record is missing (a holder between its flock and its write,
    or an older version) gives a record with pid 0 and no URL.
    """
    try:
        fd = os.open(lock_path(db_path), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return _read_record(fd) or LockRecord(pid=0, instance="")
        return None
    finally:
        os.close(fd)


def live_servers(directory: Path) -> list[LockRecord]:
    """The records of the servers that hold a directory record in ``directory`` now.

    Records left behind by a server that died (nobody holds them) are removed
    once a few seconds old.
    """
    found = []
    for path in sorted(directory.glob(f"{SERVER_RECORD_PREFIX}*{LOCK_SUFFIX}")):
        base = path.with_name(path.name[: -len(LOCK_SUFFIX)])
        try:
            holder = lock_holder(base)
            if holder is not None:
                found.append(holder)
            elif time.time() - path.stat().st_mtime > STALE_SERVER_RECORD_SECONDS:
                path.unlink()
        except OSError:
            continue
    return found


def _read_record(fd: int) -> LockRecord | None:
    try:
        return LockRecord.from_json(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    except OSError:
        return None


BUSY_TIMEOUT_MS = 5000
"""How long a statement waits for another connection's lock on the file."""
STORE_FILE_MODE = 0o600
"""A new store file is readable by its owner alone (SQLite gives its -wal and -shm the same)."""


def create_private(path: Path) -> None:
    """Create an empty store file with mode 0600 unless it exists (SQLite reads it as empty)."""
    with contextlib.suppress(FileExistsError):
        os.close(
            os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, STORE_FILE_MODE)
        )


def connect_sync(
    path: Path,
    *,
    sync: str = "normal",
    readonly: bool = False,
    journal: str = "wal",
    cached_statements: int = 128,
) -> sqlite3.Connection:
    """Open a store file: the one way the server, maintenance and backup open one.

    Autocommit (transactions are explicit), a busy timeout, and unless
    ``readonly``: a new file created with mode 0600, WAL journal (``journal``
    "delete" for a copy that goes into an archive as one file), ``synchronous``
    from ``--sync``, and the schema (idempotent). The server runs it on its
    aiosqlite thread (``StoreFile.open``); the CLI in its own thread.
    """
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro",
            uri=True,
            isolation_level=None,
            cached_statements=cached_statements,
        )
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return conn
    create_private(path)
    conn = sqlite3.connect(
        path,
        isolation_level=None,
        cached_statements=cached_statements,
    )
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute(f"PRAGMA journal_mode={journal.upper()}")
        conn.execute(f"PRAGMA synchronous={sync.upper()}")
        conn.executescript(SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


def write_blob(conn: sqlite3.Connection, store_id: str, key: str, data: bytes) -> None:
    """Store a value of one store, never over another store's value under the same key.

    The first store to write a key gets the ``blobs`` row (as the Node server
    would have written it) and is recorded as its owner; a later value of
    another store of the file, or one for a key whose ``blobs`` row has no
    owner (written by the Node server), goes to ``store_blobs``. The server
    calls it inside a group commit; restoring a PostgreSQL store into a file too.
    """
    row = conn.execute(
        "SELECT (SELECT 1 FROM blobs WHERE hash = ?1),"
        " (SELECT store_id FROM blob_owners WHERE hash = ?1)",
        (key,),
    ).fetchone()
    exists, owner = (row[0], row[1]) if row else (None, None)
    if exists is None:
        conn.execute("INSERT INTO blobs (hash, data, ref_count) VALUES (?, ?, 1)", (key, data))
        conn.execute(
            "INSERT OR REPLACE INTO blob_owners (hash, store_id) VALUES (?, ?)", (key, store_id)
        )
    elif owner == store_id:
        conn.execute("UPDATE blobs SET data = ? WHERE hash = ?", (data, key))
    else:
        conn.execute(
            "INSERT INTO store_blobs (store_id, hash, data) VALUES (?, ?, ?) "
            "ON CONFLICT(store_id, hash) DO UPDATE SET data = excluded.data",
            (store_id, key, data),
        )


def store_values(conn: sqlite3.Connection, store_id: str) -> Iterator[tuple[str, bytes]]:
    """Every value a store of this file reads (key, value): what REQ_VALUE may answer.

    Its own ``store_blobs`` rows, and the ``blobs`` rows it owns or nobody owns
    (the Node server's) unless a ``store_blobs`` row of the store has that key.
    """
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not set(OWN_BLOB_TABLES) <= tables:
        yield from ((str(h), bytes(d)) for h, d in conn.execute("SELECT hash, data FROM blobs"))
        return
    rows = conn.execute(
        "SELECT hash, data FROM store_blobs WHERE store_id = ?1"
        " UNION ALL SELECT b.hash, b.data FROM blobs AS b"
        " LEFT JOIN blob_owners AS o ON o.hash = b.hash"
        " WHERE (o.store_id IS NULL OR o.store_id = ?1)"
        " AND b.hash NOT IN (SELECT hash FROM store_blobs WHERE store_id = ?1)",
        (store_id,),
    )
    yield from ((str(h), bytes(d)) for h, d in rows)


class StoreFile(GroupCommitter):
    """One open SQLite file; its writes are committed in groups, in the order submitted."""

    def __init__(self, path: Path, *, sync: str, metrics: Metrics) -> None:
        super().__init__()
        self.path = path
        self.sync = sync
        self.metrics = metrics
        self.users = 0
        self.close_handle: asyncio.TimerHandle | None = None
        self.failure: str | None = None
        self._db: Any = None
        self._lock_fd: int | None = None
        self._clocks: dict[str, int] = {}
        self._io = asyncio.Lock()
        self._blob_readers: set[BlobReader] = set()
        self.previous_holder: LockRecord | None = None
        """The record left in the lock file when this server took it (a killed or stopped
        holder's), None when it was clear."""

    async def open(
        self,
        *,
        lock_timeout: float,
        record: LockRecord | None = None,
        executor: Executor | None = None,
    ) -> None:
        """Take the file's lock (in ``executor``: the wait blocks) and open it."""
        loop = asyncio.get_running_loop()
        try:
            previous: list[LockRecord | None] = []
            self._lock_fd = await loop.run_in_executor(
                executor,
                lambda: try_lock(self.path, timeout=lock_timeout, record=record, previous=previous),
            )
        except OSError as exc:
            log.error("cannot lock store file %s: %s", self.path.name, exc.strerror)
            raise StorageError(f"cannot lock {self.path.name}: {exc.strerror}") from None
        self.previous_holder = previous[0] if previous else None
        try:
            # connect_sync runs on the connection's own thread, as every later statement.
            self._db = await aiosqlite.Connection(
                functools.partial(
                    connect_sync, self.path, sync=self.sync, cached_statements=STATEMENT_CACHE
                ),
                iter_chunk_size=64,
            )
        except (sqlite3.Error, OSError) as exc:
            log.error("cannot open store file %s: %s", self.path.name, exc)
            await self.close()
            raise StorageError(f"cannot open {self.path.name}: {exc}") from None
        self.metrics.store_files_open += 1

    @property
    def lock_fd(self) -> int | None:
        """The descriptor holding the file's lock (None when closed)."""
        return self._lock_fd

    async def close(self) -> None:
        """Finish pending commits and close the file (and its lock)."""
        await self.finish()
        if self._db is not None:
            db, self._db = self._db, None
            with contextlib.suppress(sqlite3.Error, ValueError):
                await db.close()
            self.metrics.store_files_open -= 1
        if self._lock_fd is not None:
            unlock(self._lock_fd)
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

    def append_patch(self, store_id: str, payload: bytearray | memoryview) -> Commit:
        """Queue a patch for the next group commit, which is returned."""
        commit = self._next or self._begin()
        commit.add_patch(store_id, payload)
        return commit

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
            self.metrics.observe_commit(time.perf_counter() - started, ok=commit.ok is True)

    async def _write_ops(self, ops: list[PatchRun | Write], commit: Commit) -> None:
        """Write a commit's operations in order, inside its transaction."""
        for op in ops:
            if isinstance(op, PatchRun):
                await self._insert_run(op, commit)
            elif op.kind == "blob":
                await self._write_blob(op)
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

    async def _write_blob(self, op: Write) -> None:
        """Store a value of one store (``write_blob``) inside the commit's transaction."""
        await self._db._execute(write_blob, self._db._conn, op.store_id, op.key, op.data)
        for reader in self._blob_readers:
            if reader.key == op.key:
                reader.stale = True

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

    @contextlib.asynccontextmanager
    async def open_blob(self, store_id: str, key: str) -> AsyncIterator[BlobReader | None]:
        """Where a store's value for ``key`` is (None when it has none), for reading in pieces.

        Nothing is read yet and no lock is held between pieces: commits go on. A
        commit that writes the same key makes the reader stale (BlobChanged on the
        next piece); maintenance (VACUUM may move rows) makes it look the row up again.
        """
        async with self._reading() as db:
            found = await _find_blob(db, store_id, key)
        if found is None:
            yield None
            return
        reader = BlobReader(store_id, key, *found)
        self._blob_readers.add(reader)
        try:
            yield reader
        finally:
            self._blob_readers.discard(reader)

    async def read_blob_piece(self, reader: BlobReader, offset: int, size: int) -> bytes:
        """``size`` bytes of a value from ``offset``, read incrementally (never the whole value).

        Raises BlobChanged when the value was overwritten since ``open_blob``.
        """
        async with self._reading() as db:
            if reader.stale:
                raise BlobChanged(f"value {reader.key[:12]} changed while it was read")
            if reader.moved:
                found = await _find_blob(db, reader.store_id, reader.key)
                if found is None or found[2] != reader.size:
                    raise BlobChanged(f"value {reader.key[:12]} changed while it was read")
                reader.table, reader.rowid, _ = found
                reader.moved = False
            # aiosqlite has no blob API: run sqlite3's incremental blob I/O on its thread.
            piece: bytes = await db._execute(
                _read_blob_piece, db._conn, reader.table, reader.rowid, offset, size
            )
            return piece

    async def last_clock(self, store_id: str) -> int:
        async with self._reading():
            return await self._max_clock(store_id)

    async def run_read(self, read: Callable[..., T], *args: Any) -> T:
        """``read(connection, *args)`` on the file's connection (its thread), between commits."""
        async with self._reading() as db:
            # aiosqlite runs a function on its thread with the raw sqlite3 connection.
            result: T = await db._execute(read, db._conn, *args)
            return result

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[Path]:
        """Let maintenance own the file: pending commits finish, new ones wait until the end."""
        async with self._io:
            for reader in self._blob_readers:  # VACUUM may move rows
                reader.moved = True
            yield self.path


class BlobReader:
    """Where one stored value is, for reading it in pieces (see ``StoreFile.open_blob``)."""

    __slots__ = ("key", "moved", "rowid", "size", "stale", "store_id", "table")

    def __init__(self, store_id: str, key: str, table: str, rowid: int, size: int) -> None:
        self.store_id = store_id
        self.key = key
        self.table = table
        self.rowid = rowid
        self.size = size
        self.stale = False
        """The value was overwritten: the rest of it is another value's."""
        self.moved = False
        """Maintenance ran: the row may have another rowid now."""


async def _find_blob(db: Any, store_id: str, key: str) -> tuple[str, int, int] | None:
    """(table, rowid, size) of a store's value for ``key``, or None."""
    async with db.execute(_FIND_BLOB, (store_id, key)) as cursor:
        row = await cursor.fetchone()
    return None if row is None else (str(row[0]), int(row[1]), int(row[2]))


def _read_blob_piece(
    conn: sqlite3.Connection, table: str, rowid: int, offset: int, size: int
) -> bytes:
    with conn.blobopen(table, "data", rowid, readonly=True) as blob:
        blob.seek(offset)
        return blob.read(size)


def snapshot_size(conn: sqlite3.Connection, store_id: str) -> int | None:
    """The size of a store's snapshot (None without one); ``length()`` does not read the data."""
    row = conn.execute("SELECT length(data) FROM snapshots WHERE store_id = ?", (store_id,))
    found = row.fetchone()
    return int(found[0]) if found else None


def read_snapshot(conn: sqlite3.Connection, store_id: str) -> tuple[bytes, int] | None:
    row = conn.execute(
        "SELECT data, clock FROM snapshots WHERE store_id = ?", (store_id,)
    ).fetchone()
    return (bytes(row[0]), int(row[1])) if row else None


def patch_sizes(
    conn: sqlite3.Connection, store_id: str, after: int, upto: int, limit: int
) -> list[tuple[int, int]]:
    rows = conn.execute(
        "SELECT clock, length(data) FROM patches "
        "WHERE store_id = ? AND clock > ? AND clock <= ? ORDER BY clock LIMIT ?",
        (store_id, after, upto, limit),
    ).fetchall()
    return [(int(clock), int(size)) for clock, size in rows]


def read_patches(conn: sqlite3.Connection, store_id: str, after: int, last: int) -> list[bytes]:
    rows = conn.execute(
        "SELECT data FROM patches WHERE store_id = ? AND clock > ? AND clock <= ? ORDER BY clock",
        (store_id, after, last),
    ).fetchall()
    return [data for (data,) in rows]


class SqliteHistory:
    """A store's history in a SQLite file (``base.HistorySource``), read through ``run``.

    ``run(read, *args)`` calls ``read(connection, *args)``: on the server's connection
    in its thread (``StoreFile.run_read``), or on a connection of the calling thread
    (``SqliteHistory.of_connection``, maintenance).
    """

    __slots__ = ("run", "store_id")
    page_rows = 1024
    """A page is read between group commits of the file: a short read keeps them flowing
    (1024 rows of small patches take about a millisecond; large rows are bounded by the
    page's bytes)."""

    def __init__(self, run: Callable[..., Awaitable[Any]], store_id: str) -> None:
        self.run = run
        self.store_id = store_id

    @classmethod
    def of_connection(cls, conn: sqlite3.Connection, store_id: str) -> SqliteHistory:
        async def run(read: Callable[..., Any], *args: Any) -> Any:
            return read(conn, *args)

        return cls(run, store_id)

    async def snapshot_size(self) -> int | None:
        size: int | None = await self.run(snapshot_size, self.store_id)
        return size

    async def read_snapshot(self) -> tuple[bytes, int] | None:
        snapshot: tuple[bytes, int] | None = await self.run(read_snapshot, self.store_id)
        return snapshot

    async def patch_sizes(self, after: int, upto: int, limit: int) -> list[tuple[int, int]]:
        sizes: list[tuple[int, int]] = await self.run(
            patch_sizes, self.store_id, after, upto, limit
        )
        return sizes

    async def read_patches(self, after: int, last: int) -> list[bytes]:
        rows: list[bytes] = await self.run(read_patches, self.store_id, after, last)
        return rows


def joiner_frames(conn: sqlite3.Connection, store_id: str) -> list[bytes]:
    """The frames a client joining ``store_id`` receives from this file (maintenance, tests)."""

    async def collect() -> list[bytes]:
        source = SqliteHistory.of_connection(conn, store_id)
        pages = joiner_pages(source, ALL_CLOCKS, page_bytes=4 << 20, reserve=no_budget)
        return [prefix + bytes(data) async for page in pages for prefix, data in page]

    return run_without_suspending(collect())


def joiner_view_digests(conn: sqlite3.Connection, store_id: str) -> list[bytes]:
    """``base.joiner_digests`` of a store in this file (compaction's before/after check)."""
    return run_without_suspending(joiner_digests(SqliteHistory.of_connection(conn, store_id)))


class StoreLog:
    """What one store writes and reads in its file."""

    __slots__ = ("file", "store_id", "value_mode")

    def __init__(self, file: StoreFile, store_id: str, value_mode: str) -> None:
        self.file = file
        self.store_id = store_id
        self.value_mode = value_mode

    def append_patch(self, frame: bytes) -> Commit:
        """Store a PATCH frame's payload (the frame without its type byte)."""
        return self.file.append_patch(self.store_id, patch_payload(frame))

    def put_value(self, key: str, value: bytes, payload: bytes) -> Commit:
        """Store a VALUE: as a blob, or (snapshot mode) as the store snapshot."""
        if self.value_mode == "snapshot":
            return self.file.submit(Write(self.store_id, "snapshot", payload))
        return self.put_blob(key, value)

    def put_blob(self, key: str, value: bytes) -> Commit:
        return self.file.submit(Write(self.store_id, "blob", value, key=key))

    def open_blob(self, key: str) -> contextlib.AbstractAsyncContextManager[BlobReader | None]:
        """This store's value for ``key``, to read in pieces (see ``StoreFile.open_blob``)."""
        return self.file.open_blob(self.store_id, key)

    async def read_blob_piece(self, reader: base.BlobReader, offset: int, size: int) -> bytes:
        if not isinstance(reader, BlobReader):
            raise TypeError("a value opened by another backend")
        return await self.file.read_blob_piece(reader, offset, size)

    def paused(self) -> contextlib.AbstractAsyncContextManager[Path]:
        """Let maintenance own the store's file (see ``StoreFile.paused``)."""
        return self.file.paused()

    async def last_clock(self) -> int:
        """The highest committed clock of this store (its snapshot's when patches were pruned)."""
        return await self.file.last_clock(self.store_id)

    def history(
        self,
        upto: int,
        *,
        page_bytes: int,
        reserve: Callable[[int], Awaitable[None]],
    ) -> AsyncGenerator[list[tuple[bytes, bytes]], None]:
        """What a joiner receives up to clock ``upto`` (``base.joiner_pages``), read in pages."""
        source = SqliteHistory(self.file.run_read, self.store_id)
        return joiner_pages(source, upto, page_bytes=page_bytes, reserve=reserve)


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
        tasks: Tasks | None = None,
    ) -> None:
        self.directory = directory
        self.sync = sync
        self.value_mode = value_mode
        self.max_open = max_open
        self.close_grace = close_grace
        self.lock_timeout = lock_timeout
        self.metrics = metrics or Metrics()
        self.holder = LockRecord(
            pid=os.getpid(), instance=secrets.token_hex(8), persist_dir=str(directory.resolve())
        )
        """What this server writes into the lock files it takes; ``advertise`` adds its URL."""
        self._locked_warned: dict[str, float] = {}
        self._server_fd: int | None = None
        self.tasks = tasks if tasks is not None else Tasks()
        self.open_executor = ThreadPoolExecutor(OPEN_THREADS, thread_name_prefix="sds-open")
        """Where lock waits run: serving never queues behind maintenance or other blocking work."""
        self._files: dict[str, StoreFile] = {}
        self._opening: dict[str, asyncio.Future[StoreFile]] = {}
        self._closing: set[asyncio.Future[None]] = set()

    def path_of(self, store_id: str) -> Path:
        return self.directory / store_filename(store_id)

    async def compact(
        self, store_id: str, *, value_mode: str, executor: Executor
    ) -> dict[str, Any]:
        """Compact a store's file while serving: the file's commits and reads wait meanwhile.

        The work (``sds.maintenance.compact_file``) runs in ``executor`` on a
        connection of its own. The report names this server (persist dir and
        instance), so that ``sds store compact`` can check it asked the lock's holder.
        """
        from sds.maintenance import MaintenanceError, compact_file  # it imports this module

        if not self.path_of(store_id).is_file():
            raise UnknownStore(f"no store file for {store_id!r}")
        store_log = await self.acquire(store_id)
        try:
            async with store_log.file.paused() as path:
                result = await asyncio.get_running_loop().run_in_executor(
                    executor,
                    functools.partial(compact_file, path, store_id=store_id, value_mode=value_mode),
                )
        except MaintenanceError as exc:
            if str(exc).startswith("unknown store"):
                raise UnknownStore(str(exc)) from None
            raise CompactionFailed(str(exc)) from None
        finally:
            self.release(store_log)
        result.via = "server"
        # Who did it: `sds store compact` checks that the server it asked is the one that
        # holds the store in the persist dir it was pointed at (see LockRecord).
        return {
            **result.as_json(),
            "server": {"persist_dir": self.holder.persist_dir, "instance": self.holder.instance},
        }

    def advertise(self, url: str) -> None:
        """Record the URL this server is reached at in every lock file it takes from now on.

        Also leaves a directory record (``.sds-server-<instance>.lock``, held while the
        server runs) and logs a WARNING for each other live server of the same persist
        dir: they would answer 503 for each other's stores. A warning, not a refusal,
        so that several processes may share a dir on purpose.
        """
        self.holder = dataclasses.replace(self.holder, url=url)
        for other in live_servers(self.directory):
            log.info(
                "persist dir %s is also served by another server (%s): each store is owned "
                "by the server holding its file's lock, and the other forwards its clients there",
                self.directory,
                other.describe(),
            )
        if self._server_fd is None:
            try:
                # A few seconds: another server's start-up scan may probe it meanwhile.
                self._server_fd = try_lock(
                    self._server_record_path(), timeout=2.0, record=self.holder
                )
            except (OSError, StorageError) as exc:
                log.warning("cannot write the server record in %s: %s", self.directory, exc)

    def holds(self, store_id: str) -> bool:
        """True while this server has the store's file open (or is opening it): it owns the store."""
        name = store_filename(store_id)
        return name in self._files or name in self._opening

    def previous_holder(self, store_id: str) -> LockRecord | None:
        """Who held a store's file before this server (see ``StoreFile.previous_holder``)."""
        file = self._files.get(store_filename(store_id))
        return None if file is None else file.previous_holder

    def mark(self, store_id: str, record: LockRecord) -> None:
        """Write ``record`` into the lock file of a store file this server holds."""
        file = self._files.get(store_filename(store_id))
        if file is not None and file.lock_fd is not None:
            rewrite_record(file.lock_fd, record)

    async def close_now(self, store_id: str) -> bool:
        """Close a store's file at once (releasing its lock) if nobody uses it; False if in use."""
        file = self._files.get(store_filename(store_id))
        if file is None:
            return True
        if file.users:
            return False
        await self._close_file(file)
        return True

    def _server_record_path(self) -> Path:
        return self.directory / f"{SERVER_RECORD_PREFIX}{self.holder.instance}"

    def _warn_locked(self, store_id: str, exc: StoreLocked) -> None:
        """One WARNING per store and minute: another process holds the file this server needs."""
        now = time.monotonic()
        if (
            now - self._locked_warned.get(store_id, -LOCKED_WARNING_SECONDS)
            < LOCKED_WARNING_SECONDS
        ):
            return
        if len(self._locked_warned) >= MAX_LOCKED_WARNINGS:
            self._locked_warned.clear()
        self._locked_warned[store_id] = now
        holder = exc.holder.describe() if exc.holder is not None else "no lock record"
        log.warning(
            "store %r is held by another process (%s): its clients get 503 here "
            "(one writer per store file)",
            store_id,
            holder,
        )

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
                    if isinstance(exc, StoreLocked) and (exc.holder is None or not exc.holder.url):
                        # A store another server owns is forwarded to it (sds.forwarding).
                        self._warn_locked(store_id, exc)
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
        await file.open(
            lock_timeout=self.lock_timeout, record=self.holder, executor=self.open_executor
        )
        self._files[name] = file
        self.metrics.ownership_changes["acquired"] += 1
        return file

    def release(self, store_log: StoreLog) -> None:
        """One user fewer; the file closes after the grace period when nobody uses it."""
        file = store_log.file
        file.users -= 1
        if file.users == 0 and file.close_handle is None:
            loop = asyncio.get_running_loop()
            file.close_handle = loop.call_later(
                self.close_grace, lambda: self.tasks.spawn(self._close_idle(file))
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
            self.metrics.ownership_changes["released"] += 1
        # Shielded and tracked: a cancelled idle close (shutdown) still finishes, and
        # ``close`` waits for it.
        closing = asyncio.ensure_future(file.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        await asyncio.shield(closing)

    async def close(self) -> None:
        """Flush and close every file (shutdown)."""
        for file in list(self._files.values()):
            await self._close_file(file)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._server_fd is not None:
            with contextlib.suppress(OSError):
                lock_path(self._server_record_path()).unlink()
            unlock(self._server_fd)
            self._server_fd = None
        self.open_executor.shutdown(wait=False, cancel_futures=True)
