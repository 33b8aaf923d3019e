"""Ownership across machines: a lease row per store in PostgreSQL, held by an advisory lock.

Every server keeps one dedicated connection (outside the storage pool). Owning a
store (or a signalling room) is holding a session advisory lock on it on that
connection; the lease row ``sds_owners`` says who (instance, URL, pid) and
carries an epoch that grows with every new owner. Every commit of the store
checks, in the statement that writes it, that the row still names this server
with the epoch it took (``FOR SHARE``, so a takeover waits for the commit): a server that
lost its ownership can never commit into the store again.

The lock is the truth about whether a store is owned: PostgreSQL drops a
session's advisory locks when the session ends (process killed, connection cut).
A server cut off from PostgreSQL closes the clients of every store it owned with
1012 and forgets them; when it reconnects it takes nothing back on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncpg

from sds.backends.sqlite import HANDOVER_COMMAND, LockRecord, StoreLocked
from sds.ownership import SIGNAL, Key

if TYPE_CHECKING:
    from sds.cluster import ClusterStatus

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sds_owners (
    lock_key TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    url TEXT,
    pid INTEGER NOT NULL,
    command TEXT,
    epoch BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS sds_servers (
    instance TEXT PRIMARY KEY,
    url TEXT,
    pid INTEGER NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
"""
SCHEMA_LOCK = 0x5D5_0003
TAKE = """
INSERT INTO sds_owners AS o (lock_key, instance, url, pid, command, epoch)
VALUES ($1, $2, $3, $4, NULL, 1)
ON CONFLICT (lock_key) DO UPDATE
SET instance = excluded.instance, url = excluded.url, pid = excluded.pid, command = NULL,
    epoch = o.epoch + 1
RETURNING epoch
"""
HELD = """
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND classid = $1::oid AND objid = $2::oid
      AND objsubid = 1
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
)
"""
WATCH_SECONDS = 1.0
"""How often the dedicated connection is checked (a cut-off is noticed within about this)."""
WATCH_TIMEOUT = 3.0
RECONNECT_SECONDS = 1.0
CONNECT_TIMEOUT = 5.0


def lock_number(name: str) -> int:
    """A signed 64-bit advisory lock key for ``name`` (the same in every process)."""
    return int.from_bytes(
        hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True
    )


def _oids(number: int) -> tuple[int, int]:
    """How pg_locks shows a bigint advisory key: (classid, objid), the high and low halves."""
    unsigned = number & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


class Lease:
    """A lock this server holds: its row, its epoch, and the connection holding it."""

    __slots__ = ("epoch", "generation", "instance", "lock_key", "number")

    def __init__(self, lock_key: str, number: int, epoch: int, instance: str, generation: int):
        self.lock_key = lock_key
        self.number = number
        self.epoch = epoch
        self.instance = instance
        self.generation = generation


class PgLocks:
    """Ownership locks in PostgreSQL (see the module docstring)."""

    def __init__(self, url: str, *, describe: str = "the database") -> None:
        self._url = url
        self.where = describe
        self._conn: Any = None
        self._generation = 0
        self._io = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._server: LockRecord | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.on_lost: Callable[[str], None] = lambda why: None
        """Called when the dedicated connection is gone: every lock of it is lost."""

    async def start(self) -> None:
        await self._connect()
        self._watcher = asyncio.create_task(self._watch())

    async def _connect(self) -> None:
        conn = await asyncpg.connect(
            self._url,
            timeout=CONNECT_TIMEOUT,
            server_settings={
                "application_name": f"sds-ownership pid {os.getpid()}",
                # A server cut off without a goodbye (a partition) loses its session,
                # and so its locks, within seconds, not after the system's 2 hours.
                "tcp_keepalives_idle": "5",
                "tcp_keepalives_interval": "2",
                "tcp_keepalives_count": "3",
            },
        )
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                await conn.execute(SCHEMA)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._generation += 1
        if self._server is not None:
            await self._register(self._server)

    async def _register(self, record: LockRecord) -> None:
        conn = self._conn
        await conn.execute(
            "INSERT INTO sds_servers (instance, url, pid) VALUES ($1, $2, $3) "
            "ON CONFLICT (instance) DO UPDATE SET url = excluded.url",
            record.instance,
            record.url,
            record.pid,
        )
        await conn.execute("SELECT pg_advisory_lock($1)", lock_number("server:" + record.instance))

    async def _watch(self) -> None:
        """Check the dedicated connection; when it is gone, lose its locks and reconnect."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            try:
                async with self._io, asyncio.timeout(WATCH_TIMEOUT):
                    if self._conn is None:
                        raise ConnectionError("not connected")
                    await self._conn.fetchval("SELECT 1")
                continue
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                lost = self._conn is not None
                await self._drop()
                if lost:
                    self.on_lost(f"cut off from PostgreSQL at {self.where}: {type(exc).__name__}")
            while True:
                try:
                    async with self._io:
                        await self._connect()
                    log.info("ownership: connected to PostgreSQL at %s again", self.where)
                    break
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                    await asyncio.sleep(RECONNECT_SECONDS)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._generation += 1
        if conn is not None:
            conn.terminate()

    def _live(self) -> Any:
        if self._conn is None:
            raise StoreLocked("the ownership database is unavailable", None)
        return self._conn

    def ident(self, key: Key) -> str:
        kind, store_id = key
        return ("signal:" if kind == SIGNAL else "ws:") + store_id

    async def take(self, key: Key, record: LockRecord, timeout: float) -> tuple[Lease, Any]:
        lock_key = self.ident(key)
        number = lock_number(lock_key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._conn is None:
                # Reconnecting (the database was away): wait for it, bounded.
                if loop.time() >= deadline:
                    raise StoreLocked("the ownership database is unavailable", None)
                await asyncio.sleep(0.1)
                continue
            async with self._io:
                conn = self._live()
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", number):
                    row = await conn.fetchrow(
                        "SELECT instance, url, pid, command FROM sds_owners WHERE lock_key = $1",
                        lock_key,
                    )
                    epoch = await conn.fetchval(
                        TAKE, lock_key, record.instance, record.url, record.pid
                    )
                    previous = _record(row)
                    return Lease(
                        lock_key, number, epoch, record.instance, self._generation
                    ), previous
                holder = await self._holder(conn, lock_key, number)
            if (
                holder is not None
                and holder.url
                and holder.command != HANDOVER_COMMAND
                and holder.instance != record.instance
            ) or loop.time() >= deadline:
                raise StoreLocked(f"{lock_key} is owned by another server", holder)
            await asyncio.sleep(0.05)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def release(self, handle: Any) -> None:
        self._spawn(self._release(handle))

    async def _release(self, lease: Lease) -> None:
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            async with self._io:
                if self._conn is None or lease.generation != self._generation:
                    return  # that connection is gone, and its locks with it
                await self._conn.execute(
                    "UPDATE sds_owners SET url = NULL WHERE lock_key = $1 AND epoch = $2 "
                    "AND command IS DISTINCT FROM $3",
                    lease.lock_key,
                    lease.epoch,
                    HANDOVER_COMMAND,
                )
                await self._conn.execute("SELECT pg_advisory_unlock($1)", lease.number)

    def mark(self, handle: Any, record: LockRecord) -> None:
        self._spawn(self._mark(handle, record))

    async def _mark(self, lease: Lease, record: LockRecord) -> None:
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            async with self._io:
                if self._conn is None:
                    return
                await self._conn.execute(
                    "UPDATE sds_owners SET url = $3, command = $4 WHERE lock_key = $1 AND epoch = $2",
                    lease.lock_key,
                    lease.epoch,
                    record.url,
                    record.command,
                )

    async def _holder(self, conn: Any, lock_key: str, number: int) -> LockRecord | None:
        if not await conn.fetchval(HELD, *_oids(number)):
            return None
        row = await conn.fetchrow(
            "SELECT instance, url, pid, command FROM sds_owners WHERE lock_key = $1", lock_key
        )
        return _record(row) or LockRecord(pid=0, instance="")

    async def holder(self, key: Key) -> LockRecord | None:
        lock_key = self.ident(key)
        try:
            async with self._io:
                return await self._holder(self._live(), lock_key, lock_number(lock_key))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, StoreLocked):
            return None

    async def server_url(self, instance: str) -> str | None:
        try:
            async with self._io:
                conn = self._live()
                if not await conn.fetchval(HELD, *_oids(lock_number("server:" + instance))):
                    return None
                url = await conn.fetchval(
                    "SELECT url FROM sds_servers WHERE instance = $1", instance
                )
                return str(url) if url else None
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, StoreLocked):
            return None

    def advertise(self, record: LockRecord) -> None:
        self._server = record
        self._spawn(self._advertise(record))

    async def _advertise(self, record: LockRecord) -> None:
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            async with self._io:
                if self._conn is not None:
                    await self._register(record)

    def fence(self, lease: Lease | None) -> tuple[str, str, int] | None:
        """What a commit checks: (store id, instance, epoch); None when not held."""
        if lease is None or lease.generation != self._generation:
            return None
        return lease.lock_key.removeprefix("ws:"), lease.instance, lease.epoch

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None


def _record(row: Any) -> LockRecord | None:
    if row is None:
        return None
    return LockRecord(
        pid=int(row["pid"]),
        instance=str(row["instance"]),
        url=row["url"],
        command=row["command"],
    )


HELD_ALL = """
SELECT classid::bigint, objid::bigint FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 1
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


async def database_status(url: str, describe: str = "the database") -> ClusterStatus:
    """The live servers of one database and the stores each owns (``sds cluster status``).

    Read-only: a server counts while it holds its advisory lock, a store while its
    lease's lock is held.
    """
    from sds.cluster import ClusterError, ClusterStatus, OwnedStore, ProcessStatus

    try:
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
        raise ClusterError(
            f"cannot connect to PostgreSQL at {describe}: {type(exc).__name__}"
        ) from None
    try:
        held = {(int(c) & 0xFFFF_FFFF, int(o)) for c, o in await conn.fetch(HELD_ALL)}
        try:
            servers = await conn.fetch("SELECT instance, url, pid FROM sds_servers")
            owners = await conn.fetch("SELECT lock_key, instance FROM sds_owners ORDER BY lock_key")
        except asyncpg.UndefinedTableError:
            servers, owners = [], []
    finally:
        await conn.close()
    processes: dict[str, ProcessStatus] = {}
    for row in servers:
        if _oids(lock_number("server:" + row["instance"])) in held:
            processes[row["instance"]] = ProcessStatus(row["instance"], int(row["pid"]), row["url"])
    for row in owners:
        owner = processes.get(row["instance"])
        if owner is None or _oids(lock_number(row["lock_key"])) not in held:
            continue
        kind, _, store_id = str(row["lock_key"]).partition(":")
        if kind == "ws":
            owner.stores.append(OwnedStore(file=row["lock_key"], store=store_id))
        else:
            owner.rooms.append(store_id)
    ordered = sorted(processes.values(), key=lambda p: (p.url or "", p.pid))
    return ClusterStatus(describe, ordered, [])
