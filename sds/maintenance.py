"""Store file maintenance: figures for `sds store list/inspect`, compaction, the joiner's view.

Everything here works on a path or a ``sqlite3.Connection`` and does no locking of
its own: inspection opens files read-only (``mode=ro``), so it never writes the
database (SQLite may still create the empty ``-wal``/``-shm`` side files of a WAL
database). Compaction writes, so its caller must hold the file's one-writer lock or
run it inside the server's ``StoreFile.paused()`` (see ``sds.admin_api``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import sqlite3
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sds.backends.base import StoreBusy
from sds.backends.sqlite import (
    OWN_BLOB_TABLES,
    SQLITE_VERSION,
    STORE_FILE_MODE,
    LockRecord,
    StoreLocked,
    connect_sync,
    lock_path,
    process_record,
    store_filename,
    try_lock,
    unlock,
)

TABLES = ("snapshots", "patches", "blobs")
"""The Node server's tables, in every store file."""
SIDE_SUFFIXES = ("-wal", "-shm")


class MaintenanceError(Exception):
    """A store file cannot be inspected or compacted; the message is one line."""


@dataclass
class StoreFigures:
    """What one store id holds in its file."""

    store_id: str
    patches: int
    patch_bytes: int
    first_clock: int | None
    last_clock: int | None
    snapshot_clock: int | None
    snapshot_bytes: int | None
    blobs: int = 0
    """Values this store id wrote (in ``blobs`` as their owner, or in ``store_blobs``)."""
    blob_bytes: int = 0


@dataclass
class FileReport:
    """Figures of one store file (every store id in it, its blobs, its size and health)."""

    file: str
    path: str
    stores: list[StoreFigures]
    blobs: int
    """Every stored value of the file: ``blobs`` rows plus ``store_blobs`` rows."""
    blob_bytes: int
    bytes: int
    last_write: str | None
    integrity: str
    sqlite_version: str = SQLITE_VERSION
    unowned_blobs: int = 0
    """``blobs`` rows without an owner (written by the Node server): every store of the file reads them."""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompactionResult:
    """What compaction removed from one store, and the file size around it."""

    file: str
    store_ids: list[str]
    duplicates_removed: int = 0
    superseded_removed: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    integrity: str = ""
    via: str = "lock"
    details: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open an existing store file read-only; MaintenanceError if it is missing or not SQLite."""
    if not path.is_file():
        raise MaintenanceError(f"no store file {path}")
    try:
        conn = connect_sync(path, readonly=True)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise MaintenanceError(f"{path.name} is not a readable SQLite file: {exc}") from None
    return conn


def foreign_owner(directory: Path) -> str | None:
    """Why this process must not write files into ``directory``, or None.

    Files a command writes into a persist dir must belong to the dir's owner (the
    user the server runs as), or the server cannot open them. Root can hand them
    over (``adopt``); any other user writing into a dir it does not own cannot.
    """
    try:
        owner = directory.stat().st_uid
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read {directory}: {exc.strerror}"
    me = os.geteuid()
    if me == 0 or owner == me:
        return None
    name = user_name(owner)
    return (
        f"{directory} belongs to {name}, not to the user running this command: "
        f"run it as that user (sudo -u {name} ...) so the server can open the files"
    )


def user_name(uid: int) -> str:
    """The login name of a uid, or the number."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def adopt(path: Path, directory: Path) -> None:
    """Give a file this command wrote into a persist dir the dir's owner and mode 0600.

    As root the file is handed to the dir's uid and gid (a restore or compaction run
    with sudo must not leave root-owned files the server cannot write); otherwise
    only the mode is set (``foreign_owner`` refused the other cases up front).
    """
    owner = directory.stat()
    current = path.lstat()
    root = os.geteuid() == 0
    if root and (current.st_uid, current.st_gid) != (owner.st_uid, owner.st_gid):
        os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)
    if stat.S_IMODE(current.st_mode) != STORE_FILE_MODE and (
        root or current.st_uid == os.geteuid()
    ):
        os.chmod(path, STORE_FILE_MODE)


def store_file_set(path: Path) -> list[Path]:
    """A store file and its side files (WAL, shared memory, rollback journal, lock)."""
    suffixes = (*SIDE_SUFFIXES, "-journal")
    return [path, *(path.with_name(path.name + s) for s in suffixes), lock_path(path)]


def adopt_store_files(path: Path) -> None:
    """``adopt`` a store file and whichever of its side files exist."""
    for candidate in store_file_set(path):
        try:
            if candidate.is_symlink() or not candidate.is_file():
                continue
            adopt(candidate, path.parent)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise MaintenanceError(
                f"cannot give {candidate.name} the owner of {path.parent}: {exc.strerror}"
            ) from None


@dataclass
class DeleteResult:
    """The files ``delete_store`` removed."""

    file: str
    store_ids: list[str]
    deleted: list[str]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def delete_store(path: Path, *, confirm: Callable[[list[str]], bool] | None = None) -> DeleteResult:
    """Delete a store file with its WAL, shared-memory, journal and lock files.

    Refused (MaintenanceError) while another process, the server, holds the file's
    one-writer lock. ``confirm(store_ids)`` is asked while the lock is held; False
    leaves everything as it was.
    """
    if not path.is_file():
        raise MaintenanceError(f"no store file {path}")
    try:
        fd = try_lock(path, timeout=0)
    except StoreBusy:
        raise MaintenanceError(
            f"{path.name} is open in a running server: stop the server (or wait until "
            "its clients have left and it released the file), then delete again"
        ) from None
    except OSError as exc:
        raise MaintenanceError(f"cannot lock {path.name}: {exc.strerror}") from None
    try:
        try:
            conn = connect_readonly(path)
            try:
                ids = store_ids(conn)
            finally:
                conn.close()
        except (MaintenanceError, sqlite3.Error):
            ids = []
        if confirm is not None and not confirm(ids):
            raise MaintenanceError(f"{path.name} was not deleted")
        deleted = []
        # The database first, the lock last: until the lock file goes, nothing opens it.
        for candidate in store_file_set(path):
            try:
                candidate.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise MaintenanceError(f"cannot delete {candidate.name}: {exc.strerror}") from None
            deleted.append(candidate.name)
        fsync_dir(path.parent)
    finally:
        os.close(fd)
    return DeleteResult(file=path.name, store_ids=ids, deleted=deleted)


def fsync_dir(path: Path) -> None:
    """Make renames and deletions in a directory durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_store_file(path: Path) -> bool:
    """A ``*.db`` file of a persist dir (not a lock, WAL or temp file)."""
    return path.is_file() and path.suffix == ".db" and not path.name.startswith(".")


def store_files(directory: Path) -> list[Path]:
    """The store files of a persist dir, sorted by name."""
    if not directory.is_dir():
        raise MaintenanceError(f"persist dir {directory} does not exist")
    return sorted(p for p in directory.iterdir() if is_store_file(p))


def resolve_store(directory: Path | None, target: str) -> tuple[Path, str | None]:
    """A command's ID|FILE argument: an existing ``.db`` path, or a store id in the persist dir.

    Returns the file and the store id (None when a file was named).
    """
    candidate = Path(target)
    if target.endswith(".db") and candidate.is_file():
        return candidate, None
    if directory is None:
        raise MaintenanceError(
            f"{target!r} is not a store file and no persist dir is set "
            "(--persist-dir or SDS_PERSIST_DIR)"
        )
    path = directory / store_filename(target)
    if not path.is_file():
        raise MaintenanceError(f"unknown store {target!r}: no file {path.name} in {directory}")
    return path, target


def store_ids(conn: sqlite3.Connection) -> list[str]:
    """Every store id that has rows in a file (two ids can share one file)."""
    _check_schema(conn)
    sources = ["patches", "snapshots", *own_blob_tables(conn)]
    union = " UNION ".join(f"SELECT store_id FROM {table}" for table in sources)
    rows = conn.execute(union + " ORDER BY 1").fetchall()
    return [str(row[0]) for row in rows]


def own_blob_tables(conn: sqlite3.Connection) -> list[str]:
    """Which of the server's value-ownership tables a file has (files of the Node server have none)."""
    names = {
        str(row[0])
        for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    }
    return [table for table in OWN_BLOB_TABLES if table in names]


def value_figures(conn: sqlite3.Connection, store_id: str) -> tuple[int, int]:
    """How many values (and bytes) one store id wrote: owned ``blobs`` rows and ``store_blobs``."""
    if len(own_blob_tables(conn)) < len(OWN_BLOB_TABLES):
        return 0, 0
    count, size = conn.execute(
        "SELECT count(*), coalesce(sum(n), 0) FROM ("
        " SELECT length(b.data) AS n FROM blobs AS b JOIN blob_owners AS o ON o.hash = b.hash"
        " WHERE o.store_id = ?1"
        " UNION ALL SELECT length(data) FROM store_blobs WHERE store_id = ?1)",
        (store_id,),
    ).fetchone()
    return int(count), int(size)


def file_value_figures(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """Values of a whole file (count, bytes) and how many ``blobs`` rows have no owner."""
    count, size = conn.execute(
        "SELECT count(*), coalesce(sum(length(data)), 0) FROM blobs"
    ).fetchone()
    if len(own_blob_tables(conn)) < len(OWN_BLOB_TABLES):
        return int(count), int(size), int(count)
    extra, extra_size = conn.execute(
        "SELECT count(*), coalesce(sum(length(data)), 0) FROM store_blobs"
    ).fetchone()
    (unowned,) = conn.execute(
        "SELECT count(*) FROM blobs WHERE hash NOT IN (SELECT hash FROM blob_owners)"
    ).fetchone()
    return int(count) + int(extra), int(size) + int(extra_size), int(unowned)


def file_bytes(path: Path) -> int:
    """Bytes on disk of a store file with its WAL and shared-memory files."""
    total = 0
    for candidate in (path, *(path.with_name(path.name + s) for s in SIDE_SUFFIXES)):
        with contextlib.suppress(FileNotFoundError):
            total += candidate.stat().st_size
    return total


def last_write(path: Path) -> str | None:
    """When the file or its WAL last took a commit (or a checkpoint), ISO 8601 UTC.

    Call it before opening the file: a read-only open of a WAL database recreates an
    empty ``-wal``, which says nothing about writes, so an empty WAL does not count.
    """
    times = []
    with contextlib.suppress(FileNotFoundError):
        times.append(path.stat().st_mtime)
    with contextlib.suppress(FileNotFoundError):
        wal = path.with_name(path.name + "-wal").stat()
        if wal.st_size > 0:
            times.append(wal.st_mtime)
    if not times:
        return None
    return dt.datetime.fromtimestamp(max(times), tz=dt.UTC).isoformat(timespec="seconds")


def integrity(conn: sqlite3.Connection, *, quick: bool = False) -> str:
    """``ok`` or SQLite's first complaints, joined on one line."""
    pragma = "quick_check" if quick else "integrity_check"
    try:
        rows = conn.execute(f"PRAGMA {pragma}(20)").fetchall()
    except sqlite3.Error as exc:
        return f"error: {exc}"
    messages = [str(row[0]) for row in rows]
    return "ok" if messages == ["ok"] else "; ".join(messages)


def store_figures(conn: sqlite3.Connection, store_id: str) -> StoreFigures:
    """Patch count, clock range, bytes and snapshot of one store id."""
    count, size, first, last = conn.execute(
        "SELECT count(*), coalesce(sum(length(data)), 0), min(clock), max(clock) "
        "FROM patches WHERE store_id = ?",
        (store_id,),
    ).fetchone()
    snapshot = conn.execute(
        "SELECT clock, length(data) FROM snapshots WHERE store_id = ?", (store_id,)
    ).fetchone()
    blobs, blob_bytes = value_figures(conn, store_id)
    return StoreFigures(
        store_id=store_id,
        patches=int(count),
        patch_bytes=int(size),
        first_clock=first,
        last_clock=last,
        snapshot_clock=snapshot[0] if snapshot else None,
        snapshot_bytes=snapshot[1] if snapshot else None,
        blobs=blobs,
        blob_bytes=blob_bytes,
    )


def inspect_file(path: Path, *, quick: bool = False) -> FileReport:
    """Every figure of one store file, read through a read-only connection."""
    written = last_write(path)
    conn = connect_readonly(path)
    try:
        try:
            ids = store_ids(conn)
            blobs, blob_bytes, unowned = file_value_figures(conn)
            stores = [store_figures(conn, store_id) for store_id in ids]
        except sqlite3.Error as exc:
            raise MaintenanceError(f"{path.name} cannot be read: {exc}") from None
        check = integrity(conn, quick=quick)
    finally:
        conn.close()
    return FileReport(
        file=path.name,
        path=str(path),
        stores=stores,
        blobs=blobs,
        blob_bytes=blob_bytes,
        unowned_blobs=unowned,
        bytes=file_bytes(path),
        last_write=written,
        integrity=check,
    )


def joiner_frames(conn: sqlite3.Connection, store_id: str) -> list[bytes]:
    """The frames a client joining ``store_id`` replays: the snapshot as VALUE, then patches."""
    return list(_joiner_frames(conn, store_id))


def _joiner_frames(conn: sqlite3.Connection, store_id: str) -> Iterator[bytes]:
    snapshot = conn.execute(
        "SELECT data, clock FROM snapshots WHERE store_id = ?", (store_id,)
    ).fetchone()
    after = 0
    if snapshot is not None:
        after = int(snapshot[1])
        yield b"\x02" + bytes(snapshot[0])
    for (data,) in conn.execute(
        "SELECT data FROM patches WHERE store_id = ? AND clock > ? ORDER BY clock",
        (store_id, after),
    ):
        yield b"\x01" + bytes(data)


def distinct_in_order(frames: list[bytes]) -> list[bytes]:
    """Each distinct frame once, at its first occurrence (what compaction must preserve)."""
    seen: set[bytes] = set()
    result = []
    for frame in frames:
        if frame not in seen:
            seen.add(frame)
            result.append(frame)
    return result


def remove_duplicate_patches(conn: sqlite3.Connection, store_id: str) -> int:
    """Delete byte-identical repeats of a store's patches, keeping the first; the count removed.

    Only patches a joiner replays (after the snapshot clock) are compared: a patch
    hidden behind the snapshot must not make a later, visible copy disappear.
    """
    snapshot = conn.execute(
        "SELECT clock FROM snapshots WHERE store_id = ?", (store_id,)
    ).fetchone()
    after = int(snapshot[0]) if snapshot else 0
    first_by_digest: dict[bytes, int] = {}
    doomed: list[int] = []
    rows = conn.execute(
        "SELECT clock, data FROM patches WHERE store_id = ? AND clock > ? ORDER BY clock",
        (store_id, after),
    ).fetchall()
    for clock, data in rows:
        digest = hashlib.sha256(data).digest()
        first = first_by_digest.get(digest)
        if first is None:
            first_by_digest[digest] = clock
        elif _patch_data(conn, store_id, first) == bytes(data):
            doomed.append(clock)
    conn.executemany(
        "DELETE FROM patches WHERE store_id = ? AND clock = ?",
        [(store_id, clock) for clock in doomed],
    )
    return len(doomed)


def _patch_data(conn: sqlite3.Connection, store_id: str, clock: int) -> bytes:
    row = conn.execute(
        "SELECT data FROM patches WHERE store_id = ? AND clock = ?", (store_id, clock)
    ).fetchone()
    return bytes(row[0])


def remove_superseded_patches(conn: sqlite3.Connection, store_id: str) -> int:
    """Delete patches at or below the snapshot clock (``--value-mode snapshot``); the count."""
    cursor = conn.execute(
        "DELETE FROM patches WHERE store_id = ? AND clock <= "
        "(SELECT clock FROM snapshots WHERE store_id = ?)",
        (store_id, store_id),
    )
    return max(cursor.rowcount, 0)


def compact_connection(
    conn: sqlite3.Connection, ids: list[str], *, value_mode: str
) -> dict[str, dict[str, int]]:
    """Remove duplicate (and, in snapshot mode, superseded) patches of ``ids`` in one transaction."""
    details: dict[str, dict[str, int]] = {}
    conn.execute("BEGIN IMMEDIATE")
    try:
        for store_id in ids:
            superseded = (
                remove_superseded_patches(conn, store_id) if value_mode == "snapshot" else 0
            )
            duplicates = remove_duplicate_patches(conn, store_id)
            details[store_id] = {"duplicates": duplicates, "superseded": superseded}
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return details


def compact_file(
    path: Path, *, store_id: str | None = None, value_mode: str = "blob"
) -> CompactionResult:
    """Compact one store file (one store id of it, or all): dedupe, prune, checkpoint, VACUUM.

    The caller holds the file's one-writer lock or the server's paused StoreFile.
    """
    if not path.is_file():
        raise MaintenanceError(f"no store file {path}")
    before = file_bytes(path)
    try:
        conn = connect_sync(path)
    except sqlite3.Error as exc:
        raise MaintenanceError(f"cannot open {path.name}: {exc}") from None
    try:
        ids = store_ids(conn)
        if store_id is not None:
            if store_id not in ids:
                raise MaintenanceError(f"unknown store {store_id!r}: no rows in {path.name}")
            ids = [store_id]
        details = compact_connection(conn, ids, value_mode=value_mode)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        check = integrity(conn, quick=True)
    except sqlite3.Error as exc:
        raise MaintenanceError(f"compaction of {path.name} failed: {exc}") from None
    finally:
        conn.close()
    return CompactionResult(
        file=path.name,
        store_ids=ids,
        duplicates_removed=sum(d["duplicates"] for d in details.values()),
        superseded_removed=sum(d["superseded"] for d in details.values()),
        bytes_before=before,
        bytes_after=file_bytes(path),
        integrity=check,
        details=details,
    )


def _check_schema(conn: sqlite3.Connection) -> None:
    names = {
        str(row[0])
        for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    }
    missing = [table for table in TABLES if table not in names]
    if missing:
        raise MaintenanceError(f"not an SDS store file (no {', '.join(missing)} table)")


COMPACT_HTTP_TIMEOUT = 900.0
"""Seconds the CLI waits for the server to finish a compaction it asked for."""
RETRY_SECONDS = 0.2


class ServerUnavailable(MaintenanceError):
    """The server did not answer (yet); worth retrying until the wait is over."""


def compact_path(store_id: str) -> str:
    """The admin endpoint that compacts one store inside the running server."""
    return "/api/stores/" + urllib.parse.quote(store_id, safe="") + "/compact"


def compact_via_server(
    base_url: str, store_id: str, token: str, *, value_mode: str
) -> tuple[CompactionResult, dict[str, Any]]:
    """Ask the running server to compact a store (it holds the file): its report, and the
    ``server`` part of its answer (its persist dir and instance id)."""
    request = urllib.request.Request(
        base_url.rstrip("/") + compact_path(store_id),
        data=json.dumps({"value_mode": value_mode}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=COMPACT_HTTP_TIMEOUT) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        message = _error_message(exc)
        if exc.code == 503:
            raise ServerUnavailable(f"the server is busy: {message}") from None
        raise MaintenanceError(f"the server refused to compact {store_id!r}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerUnavailable(f"the server at {base_url} did not answer ({reason})") from None
    except ValueError:
        raise MaintenanceError(f"the server at {base_url} sent an unreadable answer") from None
    if not isinstance(body, dict):
        raise MaintenanceError(f"the server at {base_url} sent an unreadable answer")
    details = body.get("details", {})
    server = body.get("server")
    result = CompactionResult(
        file=str(body.get("file", "")),
        store_ids=list(body.get("store_ids", [store_id])),
        duplicates_removed=int(body.get("duplicates_removed", 0)),
        superseded_removed=int(body.get("superseded_removed", 0)),
        bytes_before=int(body.get("bytes_before", 0)),
        bytes_after=int(body.get("bytes_after", 0)),
        integrity=str(body.get("integrity", "")),
        via="server",
        details=details if isinstance(details, dict) else {},
    )
    return result, server if isinstance(server, dict) else {}


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return f"HTTP {exc.code}"


def compact_safely(
    path: Path,
    *,
    store_id: str | None,
    value_mode: str,
    persist_dir: Path,
    admin_token: Callable[[str], str] | None,
    wait: float,
    server_url: str | None = None,
    server_port: int | None = None,
) -> CompactionResult:
    """Compact under the one-writer rule: directly when the file lock is free, else through
    the server that holds it; MaintenanceError when neither works within ``wait`` seconds.

    The server is the one named in the lock file's record, never another: the admin
    token goes only to the URL its holder recorded, and the server's answer must name
    the same instance and ``persist_dir``. ``server_url``/``server_port`` (what the
    operator said) must agree with the record, else MaintenanceError without asking.
    """
    deadline = time.monotonic() + wait
    problem = foreign_owner(path.parent)
    if problem is not None:
        raise MaintenanceError(problem)
    while True:
        holder: LockRecord | None = None
        try:
            fd: int | None = try_lock(path, timeout=0, record=process_record("sds store compact"))
        except StoreLocked as exc:
            fd, holder = None, exc.holder
        except OSError as exc:
            raise MaintenanceError(f"cannot lock {path.name}: {exc.strerror}") from None
        if fd is not None:
            try:
                adopt_store_files(path)  # the lock file this command may have created
                result = compact_file(path, store_id=store_id, value_mode=value_mode)
                adopt_store_files(path)  # any -wal/-shm it left
                return result
            finally:
                unlock(fd)
        if holder is None or holder.url is None:
            # Between its flock and its record, or a command-line writer (restore,
            # another compaction) that will let go soon: worth waiting for.
            who = holder.describe() if holder is not None and holder.pid else "no lock record"
            problem = f"its holder ({who}) is not a server: it recorded no URL to ask"
        else:
            _check_holder(path, holder, persist_dir, server_url, server_port)
            if admin_token is None:
                raise MaintenanceError(
                    f"{path.name} is in use by the server at {holder.url}; a JWT secret is "
                    "needed to ask it to compact (SDS_JWT_SECRET or SDS_JWT_SECRET_FILE)"
                )
            try:
                return _compact_file_via_server(
                    path,
                    store_id,
                    value_mode=value_mode,
                    holder=holder,
                    persist_dir=persist_dir,
                    admin_token=admin_token,
                )
            except ServerUnavailable as exc:
                problem = str(exc)
        if time.monotonic() >= deadline:
            raise MaintenanceError(
                f"cannot compact {path.name} within {wait:g}s: another process holds its "
                f"lock and {problem}"
            )
        time.sleep(RETRY_SECONDS)


def _check_holder(
    path: Path,
    holder: LockRecord,
    persist_dir: Path,
    server_url: str | None,
    server_port: int | None,
) -> None:
    """Refuse (MaintenanceError) unless the lock's holder serves this persist dir at the
    address the operator named (if any)."""
    if holder.persist_dir is None or not _same_dir(holder.persist_dir, persist_dir):
        raise MaintenanceError(
            f"refusing to compact {path.name}: its lock is held by a server of another "
            f"persist dir ({holder.persist_dir or 'none recorded'}, {holder.describe()})"
        )
    assert holder.url is not None
    recorded = _host_port(holder.url)
    if server_url is not None and _host_port(server_url) != recorded:
        raise MaintenanceError(
            f"refusing to compact {path.name}: --url {server_url} is not the server that holds "
            f"it ({holder.describe()})"
        )
    if server_port is not None and recorded[1] != server_port:
        raise MaintenanceError(
            f"refusing to compact {path.name}: --port {server_port} is not the port of the "
            f"server that holds it ({holder.describe()})"
        )


def _same_dir(recorded: str, persist_dir: Path) -> bool:
    try:
        return os.path.samefile(recorded, persist_dir)
    except OSError:
        return os.path.realpath(recorded) == os.path.realpath(persist_dir)


def _host_port(url: str) -> tuple[str, int | None]:
    """``(host, port)`` of a URL, with the loopback names made one."""
    try:
        parts = urllib.parse.urlsplit(url if "//" in url else "//" + url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return url, None
    if port is None:
        port = 443 if parts.scheme in ("https", "wss") else 80
    return ("127.0.0.1" if host == "localhost" else host), port


def _compact_file_via_server(
    path: Path,
    store_id: str | None,
    *,
    value_mode: str,
    holder: LockRecord,
    persist_dir: Path,
    admin_token: Callable[[str], str],
) -> CompactionResult:
    assert holder.url is not None
    if store_id is not None:
        ids = [store_id]
    else:
        conn = connect_readonly(path)
        try:
            ids = store_ids(conn)
        finally:
            conn.close()
    total = CompactionResult(file=path.name, store_ids=ids, via="server")
    total.bytes_before = file_bytes(path)
    for one in ids:
        result, server = compact_via_server(
            holder.url, one, admin_token(one), value_mode=value_mode
        )
        answered_dir = server.get("persist_dir")
        if server.get("instance") != holder.instance or not (
            isinstance(answered_dir, str) and _same_dir(answered_dir, persist_dir)
        ):
            raise MaintenanceError(
                f"the server at {holder.url} is not the one that holds {path.name} "
                f"(it answered for persist dir {answered_dir or '?'}, instance "
                f"{server.get('instance') or '?'}; the lock names {holder.instance})"
            )
        total.duplicates_removed += result.duplicates_removed
        total.superseded_removed += result.superseded_removed
        total.details.update(result.details)
        total.integrity = result.integrity
    total.bytes_after = file_bytes(path)
    return total
