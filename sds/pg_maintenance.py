"""Maintenance of a PostgreSQL deployment: figures, compaction, and moving stores to and from files.

``sds store list / inspect / compact --database-url`` and ``sds backup / restore
--database-url`` come here. Everything is safe while servers run on the database:

* figures and exports read in one ``REPEATABLE READ`` read-only transaction, so
  an export is one consistent snapshot of every store while writers go on;
* compaction is ``sds.backends.postgres.compact_store``: one transaction per
  store, the same locking the servers' commits respect, and the joiner's view
  compared before and after (nothing is applied when it would differ);
* a restore writes all its stores in one transaction (all or nothing).

Moving between backends goes through the backup archive: a PostgreSQL store
becomes a SQLite store file (the file the SQLite backend would have written,
clocks kept), and a store file of an archive becomes rows of the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from sds.backends.postgres import (
    DB_ERRORS,
    SCHEMA_VERSION,
    STORE_EXISTS,
    compact_store,
    create_schema,
    describe,
)
from sds.backends.sqlite import connect_sync, store_filename, store_values, write_blob
from sds.maintenance import CompactionResult, MaintenanceError, StoreFigures, store_ids

T = TypeVar("T")
CONNECT_TIMEOUT = 10.0
EXPORT_PAGE_ROWS = 1000
"""Rows copied per query when a store moves between the database and a file."""
STORE_IDS = """
SELECT store_id FROM patches UNION SELECT store_id FROM snapshots
UNION SELECT store_id FROM blobs ORDER BY 1
"""


@dataclass
class DatabaseReport:
    """Figures of the stores of one database (``sds store list / inspect``)."""

    database: str
    stores: list[StoreFigures]
    schema_version: int | None
    server_version: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DatabaseRestore:
    """What a restore into the database wrote: the stores restored, replaced and kept."""

    archive: str
    database: str
    files: list[Any]
    store_ids: list[str]
    replaced: list[str]
    kept: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def database_name(url: str) -> str:
    """``host:port/db`` of a database URL, for messages (never the password)."""
    return describe(url)


def _clean(url: str, exc: BaseException) -> str:
    """An error's text with any trace of the URL's password removed (one line)."""
    text = str(exc) or type(exc).__name__
    with contextlib.suppress(ValueError):
        password = urllib.parse.urlsplit(url).password
        if password:
            for form in (password, urllib.parse.unquote(password)):
                text = text.replace(form, "***")
    return " ".join(text.split())


def run(url: str, work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    """Run ``work(connection)`` on a connection of its own; a database error: MaintenanceError."""
    return asyncio.run(_with_connection(url, work))


async def _with_connection(url: str, work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    where = describe(url)
    try:
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    except (*DB_ERRORS, ValueError) as exc:
        raise MaintenanceError(
            f"cannot connect to PostgreSQL at {where}: {_clean(url, exc)}"
        ) from None
    try:
        return await work(conn)
    except DB_ERRORS as exc:
        raise MaintenanceError(f"PostgreSQL at {where}: {_clean(url, exc)}") from None
    finally:
        with contextlib.suppress(*DB_ERRORS):
            await conn.close()


async def _check_schema(conn: Any, where: str) -> int | None:
    """The schema version of an sds database; MaintenanceError when it is not one."""
    if await conn.fetchval("SELECT to_regclass('patches') IS NULL"):
        raise MaintenanceError(f"PostgreSQL at {where} has no sds tables (no server ran on it)")
    if await conn.fetchval("SELECT to_regclass('sds_schema_version') IS NULL"):
        return None
    version: int | None = await conn.fetchval("SELECT max(version) FROM sds_schema_version")
    if version is not None and version > SCHEMA_VERSION:
        raise MaintenanceError(
            f"PostgreSQL at {where} has schema version {version}; this sds knows up to "
            f"{SCHEMA_VERSION} (upgrade sds)"
        )
    return version


async def _figures(conn: Any, store_id: str) -> StoreFigures:
    patches = await conn.fetchrow(
        "SELECT count(*), coalesce(sum(octet_length(data)), 0), min(clock), max(clock) "
        "FROM patches WHERE store_id = $1",
        store_id,
    )
    snapshot = await conn.fetchrow(
        "SELECT clock, octet_length(data) FROM snapshots WHERE store_id = $1", store_id
    )
    blobs = await conn.fetchrow(
        "SELECT count(*), coalesce(sum(octet_length(data)), 0) FROM blobs WHERE store_id = $1",
        store_id,
    )
    return StoreFigures(
        store_id=store_id,
        patches=int(patches[0]),
        patch_bytes=int(patches[1]),
        first_clock=None if patches[2] is None else int(patches[2]),
        last_clock=None if patches[3] is None else int(patches[3]),
        snapshot_clock=None if snapshot is None else int(snapshot[0]),
        snapshot_bytes=None if snapshot is None else int(snapshot[1]),
        blobs=int(blobs[0]),
        blob_bytes=int(blobs[1]),
    )


def inspect_database(url: str, store_id: str | None = None) -> DatabaseReport:
    """Figures of every store (or of ``store_id``, MaintenanceError when unknown), read-only."""
    where = describe(url)

    async def work(conn: Any) -> DatabaseReport:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            version = await _check_schema(conn, where)
            if store_id is None:
                ids = [str(row[0]) for row in await conn.fetch(STORE_IDS)]
            elif await conn.fetchval(STORE_EXISTS, store_id):
                ids = [store_id]
            else:
                raise MaintenanceError(f"unknown store {store_id!r}: no rows in {where}")
            stores = [await _figures(conn, one) for one in ids]
            server = str(await conn.fetchval("SHOW server_version"))
        return DatabaseReport(where, stores, version, server)

    return run(url, work)


def compact_database(url: str, store_id: str | None, *, value_mode: str) -> list[CompactionResult]:
    """Compact one store (or every store) of the database, each in its own transaction.

    Safe while servers write (see ``compact_store``); MaintenanceError when a store
    is unknown or its compaction failed (stores compacted before it stay compacted).
    """
    where = describe(url)

    async def work(conn: Any) -> list[CompactionResult]:
        await _check_schema(conn, where)
        if store_id is None:
            ids = [str(row[0]) for row in await conn.fetch(STORE_IDS)]
        else:
            ids = [store_id]
        results = []
        for one in ids:
            before = await _patch_bytes(conn, one)
            try:
                details = await compact_store(conn, one, value_mode=value_mode)
            except Exception as exc:  # CompactionFailed, or the database's error
                if isinstance(exc, DB_ERRORS):
                    raise
                raise MaintenanceError(str(exc)) from None
            if details is None:
                raise MaintenanceError(f"unknown store {one!r}: no rows in {where}")
            results.append(
                CompactionResult(
                    file=where,
                    store_ids=[one],
                    duplicates_removed=details["duplicates"],
                    superseded_removed=details["superseded"],
                    bytes_before=before,
                    bytes_after=await _patch_bytes(conn, one),
                    via="database",
                    details={one: details},
                )
            )
        return results

    return run(url, work)


async def _patch_bytes(conn: Any, store_id: str) -> int:
    return int(
        await conn.fetchval(
            "SELECT coalesce(sum(octet_length(data)), 0) FROM patches WHERE store_id = $1",
            store_id,
        )
    )


def export_stores(url: str, directory: Path) -> list[Path]:
    """Write every store of the database into SQLite store files in ``directory``.

    One consistent snapshot of the database (one read-only REPEATABLE READ
    transaction) while servers keep writing. Each store goes to the file the
    SQLite backend would use for it (ids that map to one file name share it, as
    in a persist dir), with its clocks, snapshot and values. The files returned
    are those written, in name order.
    """
    where = describe(url)

    async def work(conn: Any) -> list[Path]:
        written: set[Path] = set()
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await _check_schema(conn, where)
            for (one,) in await conn.fetch(STORE_IDS):
                path = directory / store_filename(str(one))
                await _export_store(conn, str(one), path)
                written.add(path)
        return sorted(written)

    return run(url, work)


async def _export_store(conn: Any, store_id: str, path: Path) -> None:
    target = connect_sync(path)
    try:
        target.execute("BEGIN IMMEDIATE")
        snapshot = await conn.fetchrow(
            "SELECT data, clock FROM snapshots WHERE store_id = $1", store_id
        )
        if snapshot is not None:
            target.execute(
                "INSERT OR REPLACE INTO snapshots (store_id, data, clock) VALUES (?, ?, ?)",
                (store_id, bytes(snapshot[0]), int(snapshot[1])),
            )
        async for rows in _pages(
            conn,
            "SELECT clock, data FROM patches WHERE store_id = $1 AND clock > $2 "
            "ORDER BY clock LIMIT $3",
            store_id,
            0,
        ):
            target.executemany(
                "INSERT INTO patches (store_id, clock, data) VALUES (?, ?, ?)",
                [(store_id, int(clock), bytes(data)) for clock, data in rows],
            )
        async for rows in _pages(
            conn,
            "SELECT hash, data FROM blobs WHERE store_id = $1 AND hash > $2 ORDER BY hash LIMIT $3",
            store_id,
            "",
        ):
            for key, data in rows:
                write_blob(target, store_id, str(key), bytes(data))
        target.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            target.execute("ROLLBACK")
        raise
    finally:
        target.close()


async def _pages(conn: Any, query: str, store_id: str, start: Any) -> AsyncIterator[list[Any]]:
    """Rows of a keyset query (``$2``: after this key, ``$3``: page size), page by page."""
    after = start
    while True:
        rows = await conn.fetch(query, store_id, after, EXPORT_PAGE_ROWS)
        if not rows:
            return
        yield rows
        after = rows[-1][0]


class StoresExist(MaintenanceError):
    """A restore would replace stores of the database and ``force`` was not given."""


def import_files(
    files: Sequence[Path],
    url: str,
    *,
    force: bool = False,
    if_missing: bool = False,
) -> tuple[list[str], list[str], list[str]]:
    """Write the stores of SQLite store files into the database, in one transaction.

    Returns (store ids restored, of them those that replaced existing stores, ids
    kept because they exist and ``if_missing``). A store that exists is replaced
    only with ``force`` (else StoresExist and nothing is written). The schema is
    created if the database is empty. Clocks, snapshots and each store's values
    are kept as they are in the files.
    """
    where = describe(url)
    sources: list[tuple[Path, list[str]]] = []
    for path in files:
        conn = connect_sync(path, readonly=True)
        try:
            sources.append((path, store_ids(conn)))
        finally:
            conn.close()

    async def work(conn: Any) -> tuple[list[str], list[str], list[str]]:
        newest = await create_schema(conn)
        if newest > SCHEMA_VERSION:
            raise MaintenanceError(
                f"PostgreSQL at {where} has schema version {newest}; this sds knows up to "
                f"{SCHEMA_VERSION} (upgrade sds)"
            )
        restored: list[str] = []
        replaced: list[str] = []
        kept: list[str] = []
        async with conn.transaction():
            for path, ids in sources:
                for one in ids:
                    exists = bool(await conn.fetchval(STORE_EXISTS, one))
                    if exists and if_missing:
                        kept.append(one)
                        continue
                    if exists and not force:
                        raise StoresExist(
                            f"store {one!r} already exists in PostgreSQL at {where}; "
                            "use --force to replace it (nothing restored)"
                        )
                    if exists:
                        for table in ("patches", "snapshots", "blobs"):
                            await conn.execute(f"DELETE FROM {table} WHERE store_id = $1", one)
                        replaced.append(one)
                    await _import_store(conn, path, one)
                    restored.append(one)
        return restored, replaced, kept

    return run(url, work)


async def _import_store(conn: Any, path: Path, store_id: str) -> None:
    source = connect_sync(path, readonly=True)
    try:
        snapshot = source.execute(
            "SELECT data, clock FROM snapshots WHERE store_id = ?", (store_id,)
        ).fetchone()
        if snapshot is not None:
            await conn.execute(
                "INSERT INTO snapshots (store_id, data, clock) VALUES ($1, $2, $3)",
                store_id,
                bytes(snapshot[0]),
                int(snapshot[1]),
            )
        cursor = source.execute(
            "SELECT clock, data FROM patches WHERE store_id = ? ORDER BY clock", (store_id,)
        )
        while rows := cursor.fetchmany(EXPORT_PAGE_ROWS):
            await conn.executemany(
                "INSERT INTO patches (store_id, clock, data) VALUES ($1, $2, $3)",
                [(store_id, int(clock), bytes(data)) for clock, data in rows],
            )
        for key, data in store_values(source, store_id):
            await conn.execute(
                "INSERT INTO blobs (store_id, hash, data, ref_count) VALUES ($1, $2, $3, 1)",
                store_id,
                key,
                data,
            )
    finally:
        source.close()
