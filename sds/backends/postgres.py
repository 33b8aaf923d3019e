"""PostgreSQL storage: every store in one database, group commits in one round trip.

Tables (created on first start, idempotently, under an advisory lock so that
several servers starting at once do not race on the DDL):

* ``snapshots(store_id, data, clock)``: as in a SQLite store file.
* ``patches(store_id, clock, data)``: primary key ``(store_id, clock)``; clocks
  are gap-free per store (max + 1), assigned at commit.
* ``blobs(store_id, hash, data, ref_count)``: primary key ``(store_id, hash)``.
  One database holds every store, so a value belongs to the store that wrote
  it; a store never answers REQ_VALUE with another store's value. (SQLite
  files key blobs by hash alone to stay Node-compatible; nothing here has to
  open in the Node server.)
* ``sds_schema_version(version)``: the schema's version, for later migrations.

Each open store has its own commit queue: writes arriving while a commit runs
form the next commit, written by ONE statement (a single transaction, a single
round trip) whatever it holds: patches through ``unnest`` of arrays, blobs
upserted, a snapshot replaced with its older patches pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

import asyncpg

from sds.backends import base
from sds.backends.base import (
    BlobChanged,
    Commit,
    CompactionFailed,
    GroupCommitter,
    PatchRun,
    StorageError,
    UnknownStore,
    Write,
    distinct_in_order,
    joiner_digests,
    joiner_pages,
    patch_payload,
)
from sds.metrics import Metrics

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA_LOCK = 0x5D5_0001
"""The advisory lock key held while the schema is created (any server, any database)."""
SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    store_id TEXT PRIMARY KEY,
    data BYTEA NOT NULL,
    clock BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS patches (
    store_id TEXT NOT NULL,
    clock BIGINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (store_id, clock)
);
CREATE TABLE IF NOT EXISTS blobs (
    store_id TEXT NOT NULL,
    hash TEXT NOT NULL,
    data BYTEA NOT NULL,
    ref_count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (store_id, hash)
);
ALTER TABLE blobs ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE TABLE IF NOT EXISTS sds_schema_version (
    version INTEGER PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
"""
MAX_CLOCK = """
SELECT greatest(
    (SELECT max(clock) FROM patches WHERE store_id = $1),
    (SELECT clock FROM snapshots WHERE store_id = $1)
)
"""
COMMIT = """
WITH new_patches AS (
    INSERT INTO patches (store_id, clock, data)
    SELECT $1, c, d FROM unnest($2::bigint[], $3::bytea[]) AS t(c, d)
), new_blobs AS (
    INSERT INTO blobs (store_id, hash, data, ref_count)
    SELECT $1, h, d, 1 FROM unnest($4::text[], $5::bytea[]) AS t(h, d)
    ON CONFLICT (store_id, hash) DO UPDATE SET data = excluded.data
), new_snapshot AS (
    INSERT INTO snapshots (store_id, data, clock)
    SELECT $1, $6::bytea, $7::bigint WHERE $6::bytea IS NOT NULL
    ON CONFLICT (store_id) DO UPDATE SET data = excluded.data, clock = excluded.clock
), pruned AS (
    DELETE FROM patches WHERE store_id = $1 AND $6::bytea IS NOT NULL AND clock <= $7::bigint
)
SELECT 1
"""
"""A whole group commit in one statement: one transaction, one round trip.

The parts of one statement cannot see each other's rows, so the pruning of a
snapshot only reaches patches committed earlier; patches of this same commit
that the snapshot supersedes are left out of ``$2``/``$3`` beforehand."""
INSERT_PATCHES = """
INSERT INTO patches (store_id, clock, data)
SELECT $1, $2::bigint + n, d FROM unnest($3::bytea[]) WITH ORDINALITY AS t(d, n)
"""
"""The common commit, patches alone: the clocks after ``$2`` follow the array's order."""
PATCH_SIZES = """
SELECT clock, octet_length(data) AS size FROM patches
WHERE store_id = $1 AND clock > $2 AND clock <= $3
ORDER BY clock
LIMIT $4
"""
"""The clocks and sizes of the next catch-up page (at most $4 rows), without the data."""
READ_PATCHES = """
SELECT data FROM patches WHERE store_id = $1 AND clock > $2 AND clock <= $3 ORDER BY clock
"""
BLOB_SIZE = """
SELECT octet_length(data), xmin::text FROM blobs WHERE store_id = $1 AND hash = $2
"""
"""A value's size and the version of its row (``xmin`` changes with every overwrite)."""
BLOB_PIECE = """
SELECT substring(data from $3 for $4) FROM blobs
WHERE store_id = $1 AND hash = $2 AND xmin::text = $5
"""
"""One piece of a value (``$3`` counts from 1); no row when the value was overwritten since."""
LEASE = """
lease AS (
    SELECT FROM sds_owners
    WHERE lock_key = 'ws:' || $1 AND instance = $%d AND epoch = $%d
    FOR SHARE
)"""
"""The lease of a store (sds.pg_ownership), still held by this server with its epoch.

Read ``FOR SHARE`` by the commit's own statement: a takeover (which updates the
row) waits until the commit is done, and a commit after a takeover finds no row."""
FENCED_INSERT_PATCHES = (
    "WITH"
    + LEASE % (4, 5)
    + """, new_patches AS (
    INSERT INTO patches (store_id, clock, data)
    SELECT $1, $2::bigint + n, d FROM unnest($3::bytea[]) WITH ORDINALITY AS t(d, n)
    WHERE EXISTS (SELECT FROM lease)
)
SELECT EXISTS (SELECT FROM lease)
"""
)
"""INSERT_PATCHES with the lease check in the same statement (one round trip): it
writes only while the lease holds, and answers whether it held."""
FENCED_COMMIT = (
    "WITH"
    + LEASE % (8, 9)
    + """, new_patches AS (
    INSERT INTO patches (store_id, clock, data)
    SELECT $1, c, d FROM unnest($2::bigint[], $3::bytea[]) AS t(c, d)
    WHERE EXISTS (SELECT FROM lease)
), new_blobs AS (
    INSERT INTO blobs (store_id, hash, data, ref_count)
    SELECT $1, h, d, 1 FROM unnest($4::text[], $5::bytea[]) AS t(h, d)
    WHERE EXISTS (SELECT FROM lease)
    ON CONFLICT (store_id, hash) DO UPDATE SET data = excluded.data
), new_snapshot AS (
    INSERT INTO snapshots (store_id, data, clock)
    SELECT $1, $6::bytea, $7::bigint WHERE $6::bytea IS NOT NULL AND EXISTS (SELECT FROM lease)
    ON CONFLICT (store_id) DO UPDATE SET data = excluded.data, clock = excluded.clock
), pruned AS (
    DELETE FROM patches
    WHERE store_id = $1 AND $6::bytea IS NOT NULL AND clock <= $7::bigint
      AND EXISTS (SELECT FROM lease)
)
SELECT EXISTS (SELECT FROM lease)
"""
)
"""COMMIT with the lease check in the same statement, as FENCED_INSERT_PATCHES."""
CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0
PROBE_SECONDS = 0.5
"""How often a failing storage checks whether the database answers again."""
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


REMOVE_SUPERSEDED = """
DELETE FROM patches
WHERE store_id = $1 AND clock <= (SELECT clock FROM snapshots WHERE store_id = $1)
"""
REMOVE_DUPLICATES = """
DELETE FROM patches AS p USING (
    SELECT clock, row_number() OVER (PARTITION BY data ORDER BY clock) AS nth
    FROM patches
    WHERE store_id = $1
      AND clock > coalesce((SELECT clock FROM snapshots WHERE store_id = $1), 0)
) AS d
WHERE p.store_id = $1 AND p.clock = d.clock AND d.nth > 1
"""
"""Byte-identical repeats of a patch a joiner replays, all but the first (``bytea`` compares
bytes). A patch hidden behind the snapshot never makes a later, visible copy go."""
STORE_EXISTS = """
SELECT EXISTS (SELECT 1 FROM patches WHERE store_id = $1)
    OR EXISTS (SELECT 1 FROM snapshots WHERE store_id = $1)
    OR EXISTS (SELECT 1 FROM blobs WHERE store_id = $1)
"""


async def compact_store(conn: Any, store_id: str, *, value_mode: str) -> dict[str, int] | None:
    """Compact one store in one transaction; the counts removed (None: nothing is stored).

    Inside the transaction, what a joiner receives (``base.joiner_pages``, the
    server's own catch-up) is compared before and after: each distinct frame once,
    in the same order, or the transaction is rolled back (CompactionFailed).

    Safe while servers write the store. The transaction is REPEATABLE READ: every
    statement sees the rows committed when it began, so patches committed
    meanwhile (rows with higher clocks, only ever inserted) are neither read nor
    deleted by it, and stay. What could change the rows it decides on is a
    snapshot write (which prunes older patches) or another compaction: before its
    snapshot of the data is taken, the transaction locks ``snapshots`` in SHARE
    ROW EXCLUSIVE mode, which both wait for (patch commits do not: they never
    write ``snapshots``; a commit with a value or snapshot does, and waits).
    """
    async with conn.transaction(isolation="repeatable_read"):
        # LOCK TABLE takes no snapshot: the data is read only once the lock is held.
        await conn.execute("LOCK TABLE snapshots IN SHARE ROW EXCLUSIVE MODE")
        if not await conn.fetchval(STORE_EXISTS, store_id):
            return None
        history = PgHistory.of_connection(conn, store_id)
        before = await joiner_digests(history)
        superseded = 0
        if value_mode == "snapshot":
            superseded = _row_count(await conn.execute(REMOVE_SUPERSEDED, store_id))
        duplicates = _row_count(await conn.execute(REMOVE_DUPLICATES, store_id))
        if await joiner_digests(history) != distinct_in_order(before):
            # Raising rolls the transaction back: nothing of it is applied.
            raise CompactionFailed(
                f"compaction of {store_id!r} would change what a joiner receives; not applied"
            )
    return {"duplicates": duplicates, "superseded": superseded}


def _row_count(status: str) -> int:
    """The rows of a command status (``DELETE 3``)."""
    return int(status.rsplit(" ", 1)[-1])


async def create_schema(conn: Any) -> int:
    """Create the tables unless they exist (under an advisory lock); the newest schema version.

    A version newer than SCHEMA_VERSION means a newer sds wrote the database: the
    caller refuses to work on it.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        await conn.execute(SCHEMA)
        await conn.execute(
            "INSERT INTO sds_schema_version (version) VALUES ($1) ON CONFLICT DO NOTHING",
            SCHEMA_VERSION,
        )
        newest: int = await conn.fetchval("SELECT max(version) FROM sds_schema_version")
    return newest


def describe(url: str) -> str:
    """``host:port/db`` of a database URL (for messages: never the user's password)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "the configured database"
    query = urllib.parse.parse_qs(parts.query)
    if "host" in query:
        host = query["host"][0]
    database = parts.path.lstrip("/") or parts.username or "postgres"
    return f"{host}:{port}/{database}"


async def keep_session(_conn: Any) -> None:
    """What a pooled connection needs on release beyond asyncpg's own rollback: nothing.

    asyncpg rolls back a transaction left open before it calls this; its default
    reset (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``) is one
    more round trip per release, on every group commit's path. The pool's users
    leave no session state to reset: each runs single statements or a transaction
    (no ``SET``, no ``LISTEN``, no cursors or advisory locks outside a transaction;
    the session advisory locks of ``sds.pg_ownership`` live on its own connection).
    """
    return None


class PgHistory:
    """A store's history in the database (``base.HistorySource``).

    ``connect()`` gives the connection of each read: a pooled one per query
    (catch-up), or the one connection of a transaction (compaction's check).
    """

    __slots__ = ("commits", "connect", "store_id")
    page_rows = 2048
    """Reads of a page hold no lock the commits need, but each costs two round trips:
    pages of many small patches (the byte bound still applies) keep catch-up fast."""

    def __init__(
        self,
        connect: Callable[[], contextlib.AbstractAsyncContextManager[Any]],
        store_id: str,
        commits: asyncio.Lock | None = None,
    ) -> None:
        self.connect = connect
        self.store_id = store_id
        self.commits = commits
        """The store's commit lock (catch-up): the snapshot is read between commits."""

    @classmethod
    def of_connection(cls, conn: Any, store_id: str) -> PgHistory:
        return cls(lambda: contextlib.nullcontext(conn), store_id)

    async def snapshot_size(self) -> int | None:
        async with self.connect() as conn:
            size = await conn.fetchval(
                "SELECT octet_length(data) FROM snapshots WHERE store_id = $1", self.store_id
            )
        return None if size is None else int(size)

    async def read_snapshot(self) -> tuple[bytes, int] | None:
        # Between commits, as on SQLite: a snapshot this read sees is from a commit
        # whose frames were relayed (held for a joiner) before the read returns.
        async with self.commits or contextlib.nullcontext(), self.connect() as conn:
            row = await conn.fetchrow(
                "SELECT data, clock FROM snapshots WHERE store_id = $1", self.store_id
            )
        return None if row is None else (row["data"], int(row["clock"]))

    async def patch_sizes(self, after: int, upto: int, limit: int) -> list[tuple[int, int]]:
        async with self.connect() as conn:
            rows = await conn.fetch(PATCH_SIZES, self.store_id, after, upto, limit)
        return [(int(clock), int(size)) for clock, size in rows]

    async def read_patches(self, after: int, last: int) -> list[bytes]:
        async with self.connect() as conn:
            rows = await conn.fetch(READ_PATCHES, self.store_id, after, last)
        return [row[0] for row in rows]


class PgStore(GroupCommitter):
    """One open store: its users, its commit queue and its clock."""

    def __init__(self, storage: PgStorage, store_id: str) -> None:
        super().__init__()
        self.storage = storage
        self.store_id = store_id
        self.users = 0
        self.close_handle: asyncio.TimerHandle | None = None
        self.clock: int | None = None
        """The last committed clock, once read; None means "read it before the next commit"."""
        self._io = asyncio.Lock()

    @property
    def commits(self) -> asyncio.Lock:
        """Held by each commit (and maintenance): a read that takes it sees no commit half-relayed."""
        return self._io

    def append_patch(self, payload: bytearray | memoryview) -> Commit:
        commit = self._next or self._begin()
        commit.add_patch(self.store_id, payload)
        return commit

    async def _commit(self, commit: Commit) -> None:
        storage = self.storage
        metrics = storage.metrics
        started = time.perf_counter()
        self._writing = commit.size
        try:
            async with self._io, storage.connection(quiet=True) as conn:
                lease = None if storage.fence is None else storage.fence(self.store_id)
                if storage.fence is not None and lease is None:
                    raise StorageError("this server does not own the store (any more)")
                if self.clock is None:
                    self.clock = int(await conn.fetchval(MAX_CLOCK, self.store_id) or 0)
                ops = commit.ops
                if len(ops) == 1 and isinstance(ops[0], PatchRun):
                    payloads = ops[0].payloads
                    clock = self.clock + len(payloads)
                    args: list[Any] = [self.clock, payloads]
                    statement = INSERT_PATCHES if lease is None else FENCED_INSERT_PATCHES
                else:
                    clock, args = self._statement_args(ops, self.clock)
                    statement = COMMIT if lease is None else FENCED_COMMIT
                if lease is None:
                    await conn.execute(statement, self.store_id, *args)
                # The lease is checked by the commit's own statement (one round trip): a
                # server that lost the store never commits into it again.
                elif not await conn.fetchval(statement, self.store_id, *args, *lease[1:]):
                    raise StorageError("this server does not own the store any more")
        except Exception as exc:  # whatever the cause, a commit that did not succeed failed
            # The outcome is unknown when the connection broke after sending: read the
            # clock again before the next commit instead of guessing it.
            self.clock = None
            commit.clocks = {}
            commit.ok = False
            storage.commit_failed(self.store_id, exc)
        else:
            self.clock = clock
            if clock:
                commit.clocks[self.store_id] = clock
            commit.ok = True
            storage.commit_succeeded(self.store_id)
        finally:
            self._writing = 0
            metrics.observe_commit(time.perf_counter() - started, ok=commit.ok is True)

    @staticmethod
    def _statement_args(ops: list[PatchRun | Write], clock: int) -> tuple[int, list[Any]]:
        """The last clock after ``ops`` and the COMMIT statement's arguments ($2 to $7)."""
        clocks: list[int] = []
        payloads: list[Any] = []
        blobs: dict[str, bytes] = {}
        snapshot: bytes | None = None
        snapshot_clock = 0
        for op in ops:
            if isinstance(op, PatchRun):
                for payload in op.payloads:
                    clock += 1
                    clocks.append(clock)
                    payloads.append(payload)
            elif op.kind == "blob":
                blobs[op.key] = op.data  # one row per key: the last write of a key wins
            elif op.kind == "snapshot":
                snapshot, snapshot_clock = op.data, clock
        if snapshot is not None:
            # Patches of this commit up to the snapshot are superseded by it, as the
            # DELETE does for earlier ones.
            keep = [i for i, c in enumerate(clocks) if c > snapshot_clock]
            clocks = [clocks[i] for i in keep]
            payloads = [payloads[i] for i in keep]
        return clock, [
            clocks,
            payloads,
            list(blobs),
            list(blobs.values()),
            snapshot,
            snapshot_clock,
        ]

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[object]:
        """Maintenance owns the store: the running commit finishes, the next waits until the end."""
        async with self._io:
            yield self


class PgBlobReader:
    """A value opened for reading in pieces: its key, size and row version."""

    __slots__ = ("key", "size", "version")

    def __init__(self, key: str, size: int, version: str) -> None:
        self.key = key
        self.size = size
        self.version = version


class PgStoreLog:
    """What one store writes and reads in the database (``sds.backends.base.StoreLog``)."""

    __slots__ = ("store", "store_id", "value_mode")

    def __init__(self, store: PgStore, value_mode: str) -> None:
        self.store = store
        self.store_id = store.store_id
        self.value_mode = value_mode

    def append_patch(self, frame: bytes) -> Commit:
        return self.store.append_patch(patch_payload(frame))

    def put_value(self, key: str, value: bytes, payload: bytes) -> Commit:
        if self.value_mode == "snapshot":
            return self.store.submit(Write(self.store_id, "snapshot", bytes(payload)))
        return self.put_blob(key, value)

    def put_blob(self, key: str, value: bytes) -> Commit:
        return self.store.submit(Write(self.store_id, "blob", bytes(value), key=key))

    @contextlib.asynccontextmanager
    async def open_blob(self, key: str) -> AsyncIterator[PgBlobReader | None]:
        """This store's value for ``key`` (its size and row version), to read in pieces."""
        async with self.store.storage.connection() as conn:
            row = await conn.fetchrow(BLOB_SIZE, self.store_id, key)
        yield None if row is None else PgBlobReader(key, int(row[0]), str(row[1]))

    async def read_blob_piece(self, reader: base.BlobReader, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset``, read by ``substring`` in the database.

        The blobs column is stored uncompressed (``STORAGE EXTERNAL``), so a piece
        is read without the rest of the value. BlobChanged when the row was
        overwritten since ``open_blob`` (by this server or another).
        """
        if not isinstance(reader, PgBlobReader):
            raise TypeError("a value opened by another backend")
        async with self.store.storage.connection() as conn:
            piece = await conn.fetchval(
                BLOB_PIECE, self.store_id, reader.key, offset + 1, size, reader.version
            )
        if piece is None or len(piece) != size:
            raise BlobChanged(f"value {reader.key[:12]} changed while it was read")
        return bytes(piece)

    async def last_clock(self) -> int:
        async with self.store.storage.connection() as conn:
            clock = int(await conn.fetchval(MAX_CLOCK, self.store_id) or 0)
        return clock

    def history(
        self,
        upto: int,
        *,
        page_bytes: int,
        reserve: Callable[[int], Awaitable[None]],
    ) -> AsyncGenerator[list[tuple[bytes, bytes]], None]:
        """What a joiner receives up to ``upto`` (``base.joiner_pages``), read in pages.

        Each read takes a pooled connection for that query alone.
        """
        source = PgHistory(self.store.storage.connection, self.store_id, self.store.commits)
        return joiner_pages(source, upto, page_bytes=page_bytes, reserve=reserve)

    def paused(self) -> contextlib.AbstractAsyncContextManager[object]:
        return self.store.paused()


class PgStorage:
    """Every store of one PostgreSQL database, through one connection pool."""

    def __init__(
        self,
        url: str,
        *,
        value_mode: str = "blob",
        pool_size: int = 10,
        close_grace: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._url = url
        self.url: str | None = None
        self.instance = secrets.token_hex(8)
        """Where this server is reached (``advertise``); the database URL is ``_url``."""
        self.where = describe(url)
        self.value_mode = value_mode
        self.pool_size = pool_size
        self.close_grace = close_grace
        self.metrics = metrics or Metrics()
        self._pool: Any = None
        self._stores: dict[str, PgStore] = {}
        self._failures: dict[str, str] = {}
        self._probe: asyncio.Task[None] | None = None
        self._closers: set[asyncio.Task[None]] = set()
        self.fence: Callable[[str], tuple[str, str, int] | None] | None = None
        """Set when ownership lives in this database (sds.pg_ownership): the lease a
        commit of a store must still hold, (store id, instance, epoch); None: not owned."""

    def __repr__(self) -> str:
        return f"PgStorage({self.where})"

    def _clean(self, exc: BaseException) -> str:
        """An error's text for logs and /healthz, with any trace of the password removed."""
        text = str(exc) or type(exc).__name__
        password = urllib.parse.urlsplit(self._url).password
        if password:
            for form in (password, urllib.parse.unquote(password)):
                text = text.replace(form, "***")
        return " ".join(text.split())

    async def start(self) -> None:
        """Connect and create the schema; StorageError (one line, no password) when impossible."""
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=0,  # no background reconnect loop logging tracebacks during an outage
                max_size=self.pool_size,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                max_inactive_connection_lifetime=60.0,
                reset=keep_session,
            )
            conn = await self._pool.acquire(timeout=CONNECT_TIMEOUT)
        except (*DB_ERRORS, ValueError) as exc:
            await self._close_pool()
            raise StorageError(
                f"cannot connect to PostgreSQL at {self.where}: {self._clean(exc)}"
            ) from None
        try:
            try:
                newest = await create_schema(conn)
            finally:
                with contextlib.suppress(*DB_ERRORS):
                    await self._pool.release(conn)
        except DB_ERRORS as exc:
            await self._close_pool()
            raise StorageError(
                f"cannot create the schema in PostgreSQL at {self.where}: {self._clean(exc)}"
            ) from None
        if newest > SCHEMA_VERSION:
            await self._close_pool()
            raise StorageError(
                f"PostgreSQL at {self.where} has schema version {newest}; this server "
                f"knows up to {SCHEMA_VERSION} (upgrade the server)"
            )
        log.info("storage: PostgreSQL at %s, schema version %d", self.where, SCHEMA_VERSION)

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(*DB_ERRORS):
                await asyncio.wait_for(pool.close(), COMMAND_TIMEOUT)

    @contextlib.asynccontextmanager
    async def connection(self, *, quiet: bool = False) -> AsyncIterator[Any]:
        """A pooled connection; a database error becomes StorageError.

        The StorageError's text may reach clients (a refused upgrade), so it does
        not name the database; the detail is logged here unless ``quiet`` (the
        caller reports it itself) and stays on the exception's ``__cause__``.
        """
        pool = self._pool
        if pool is None:
            raise StorageError("the database is closed")
        try:
            async with pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                yield conn
        except DB_ERRORS as exc:
            if not quiet:
                log.warning(
                    "reading from PostgreSQL at %s failed: %s", self.where, self._clean(exc)
                )
            raise StorageError("the database is unavailable") from exc

    @property
    def failures(self) -> list[str]:
        return list(self._failures.values())

    def queued_writes(self) -> int:
        return sum(store.queued_writes() for store in self._stores.values())

    def advertise(self, url: str) -> None:
        """Remember the server's URL (a database has no lock files to record it in)."""
        self.url = url

    def commit_failed(self, store_id: str, exc: BaseException) -> None:
        cause = exc.__cause__ if isinstance(exc, StorageError) and exc.__cause__ else exc
        message = f"PostgreSQL at {self.where}: {self._clean(cause)}"
        self._failures[store_id] = message
        self.metrics.commit_failures += 1
        log.error("storage write failed for store %s: %s", store_id, message)
        if self._probe is None and self._pool is not None:
            self._probe = asyncio.create_task(self._probe_until_back())

    def commit_succeeded(self, store_id: str) -> None:
        if self._failures:
            self._failures.pop(store_id, None)

    async def _probe_until_back(self) -> None:
        """While writes fail: ask the database every PROBE_SECONDS; clear the failures once it answers."""
        try:
            while self._failures and self._pool is not None:
                await asyncio.sleep(PROBE_SECONDS)
                try:
                    async with self.connection(quiet=True) as conn:
                        await conn.fetchval("SELECT 1")
                except (*DB_ERRORS, StorageError):
                    continue
                log.info("storage: PostgreSQL at %s answers again", self.where)
                self._failures.clear()
        finally:
            self._probe = None

    async def acquire(self, store_id: str) -> PgStoreLog:
        if self._pool is None:
            raise StorageError(f"PostgreSQL at {self.where} is closed")
        store = self._stores.get(store_id)
        if store is None:
            store = self._stores[store_id] = PgStore(self, store_id)
        if store.close_handle is not None:
            store.close_handle.cancel()
            store.close_handle = None
        store.users += 1
        return PgStoreLog(store, self.value_mode)

    def release(self, store_log: PgStoreLog) -> None:
        store = store_log.store
        store.users -= 1
        if store.users == 0 and store.close_handle is None:
            store.close_handle = asyncio.get_running_loop().call_later(
                self.close_grace, self._close_idle, store
            )

    def _close_idle(self, store: PgStore) -> None:
        store.close_handle = None
        if store.users == 0:
            task = asyncio.get_running_loop().create_task(self._forget(store))
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)

    async def _forget(self, store: PgStore) -> None:
        await store.finish()
        if store.users == 0 and self._stores.get(store.store_id) is store:
            del self._stores[store.store_id]

    async def compact(
        self, store_id: str, *, value_mode: str, executor: Executor
    ) -> dict[str, Any]:
        """Compact one store in the database (``compact_store``); its report (JSON).

        The store's commits on this server wait meanwhile; other servers' commits of
        the store go on (see ``compact_store``). Nothing blocks, so ``executor`` is unused.
        """
        if self._pool is None:
            raise StorageError(f"PostgreSQL at {self.where} is closed")
        store = self._stores.get(store_id)
        try:
            async with contextlib.AsyncExitStack() as stack:
                if store is not None:
                    await stack.enter_async_context(store.paused())
                conn = await stack.enter_async_context(self.connection(quiet=True))
                details = await compact_store(conn, store_id, value_mode=value_mode)
        except CompactionFailed:
            raise
        except StorageError as exc:
            cause = exc.__cause__ or exc
            raise CompactionFailed(
                f"compaction of {store_id!r} failed: {self._clean(cause)}"
            ) from None
        if details is None:
            raise UnknownStore(f"unknown store {store_id!r}: nothing stored")
        return {
            "file": self.where,
            "store_ids": [store_id],
            "duplicates_removed": details["duplicates"],
            "superseded_removed": details["superseded"],
            "via": "server",
            "details": {store_id: details},
            "server": {"database": self.where, "instance": self.instance},
        }

    async def close(self) -> None:
        """Finish every queued commit, then close the pool."""
        for store in list(self._stores.values()):
            if store.close_handle is not None:
                store.close_handle.cancel()
                store.close_handle = None
            await store.finish()
        self._stores.clear()
        for task in list(self._closers):
            with contextlib.suppress(Exception):
                await task
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self._close_pool()
