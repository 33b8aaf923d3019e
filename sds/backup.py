"""Online backups of every store file into one archive; verifying and restoring them.

An archive (``sds-backup-YYYYmmddTHHMMSSZ.tar.gz``) holds ``manifest.json`` and
``stores/<file>.db``. Each copy is taken with the SQLite backup API from a
read-only connection, in one step, so it is a consistent snapshot even while the
server writes (never a raw copy of a live WAL database). The copies are switched to
rollback-journal mode so each is one self-contained file. The manifest records the
store ids, row counts and sha256 of each file; ``verify_archive`` checks all of
them plus ``PRAGMA integrity_check`` before anything is restored.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from sds.backends.base import StoreBusy
from sds.backends.sqlite import SQLITE_VERSION, STORE_FILE_MODE, connect_sync, try_lock
from sds.maintenance import (
    TABLES,
    MaintenanceError,
    adopt,
    adopt_store_files,
    connect_readonly,
    foreign_owner,
    fsync_dir,
    integrity,
    own_blob_tables,
    store_files,
    store_ids,
)

ARCHIVE_PREFIX = "sds-backup-"
ARCHIVE_SUFFIX = ".tar.gz"
ARCHIVE_GLOB = f"{ARCHIVE_PREFIX}*{ARCHIVE_SUFFIX}"
MANIFEST_NAME = "manifest.json"
STORES_DIR = "stores"
FORMAT_VERSION = 1
ARCHIVE_MODE = 0o600
"""Archives hold every store in clear: readable by their owner alone."""
LEFTOVER_PREFIX = ".sds-backup-"
"""Work dirs and ``.partial`` archives of a run start with this; a dead run's are removed."""
RESTORE_PREFIX = ".sds-restore-"
"""The unpack dir of a restore in the persist dir; a killed restore's is removed by the next."""
MAX_MANIFEST_BYTES = 16 << 20
_SAFE_FILE = re.compile(r"^[A-Za-z0-9_-]+\.db$")
_ARCHIVE_NAME = re.compile(r"^sds-backup-(\d{8}T\d{6}Z)(?:-(\d+))?\.tar\.gz$")

Progress = Callable[[str, int, int], None]
"""Called as ``progress(file_name, done, total)`` after each file."""


class BackupError(Exception):
    """A backup, verification or restore failed; the message is one line."""


@dataclass
class FileEntry:
    """One store file in an archive."""

    name: str
    store_ids: list[str]
    rows: dict[str, int]
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """What an archive holds and how to check it."""

    created: str
    sqlite_version: str
    sds_version: str
    files: list[FileEntry]
    skipped: list[dict[str, str]] = field(default_factory=list)
    format: int = FORMAT_VERSION

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse manifest.json, checking every type; BackupError (one line) when it is not one."""
        top = _dict(data, "manifest")
        if top.get("format") != FORMAT_VERSION or isinstance(top.get("format"), bool):
            raise BackupError(f"unsupported manifest format {_short(top.get('format'))}")
        files = []
        for index, raw in enumerate(_list(top.get("files"), "files")):
            where = f"files[{index}]"
            item = _dict(raw, where)
            rows = _dict(item.get("rows"), f"{where}.rows")
            files.append(
                FileEntry(
                    name=_str(item.get("name"), f"{where}.name"),
                    store_ids=[
                        _str(one, f"{where}.store_ids")
                        for one in _list(item.get("store_ids"), f"{where}.store_ids")
                    ],
                    rows={key: _int(value, f"{where}.rows.{key}") for key, value in rows.items()},
                    sha256=_str(item.get("sha256"), f"{where}.sha256"),
                    bytes=_int(item.get("bytes"), f"{where}.bytes"),
                )
            )
        skipped = [
            {
                _str(key, "skipped"): _str(value, "skipped")
                for key, value in _dict(one, "skipped").items()
            }
            for one in _list(top.get("skipped", []), "skipped")
        ]
        return cls(
            created=_str(top.get("created"), "created"),
            sqlite_version=_str(top.get("sqlite_version"), "sqlite_version"),
            sds_version=_str(top.get("sds_version", ""), "sds_version"),
            files=files,
            skipped=skipped,
        )


MAX_MANIFEST_INT = 1 << 63
MAX_MANIFEST_STR = 4096


def _malformed(where: str, what: str) -> BackupError:
    return BackupError(f"manifest.json is malformed: {where} {what}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _malformed(where, "is not an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _malformed(where, "is not a list")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _malformed(where, "is not a string")
    if len(value) > MAX_MANIFEST_STR:
        raise _malformed(where, "is too long")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _malformed(where, "is not a whole number")
    if not 0 <= value < MAX_MANIFEST_INT:
        raise _malformed(where, "is out of range")
    return value


@dataclass
class BackupResult:
    """A written archive and its manifest."""

    archive: Path
    manifest: Manifest
    verified: bool = False
    pruned: list[Path] = field(default_factory=list)
    removed_leftovers: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "archive": str(self.archive),
            "manifest": self.manifest.as_json(),
            "verified": self.verified,
            "pruned": [str(path) for path in self.pruned],
            "removed_leftovers": self.removed_leftovers,
        }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(conn: sqlite3.Connection) -> tuple[list[str], dict[str, int], str]:
    """What the manifest records of one store file: store ids, row counts, integrity."""
    return store_ids(conn), row_counts(conn), integrity(conn)


def row_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Rows per table: the three Node tables, and the value-ownership tables where present."""
    return {
        table: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        for table in (*TABLES, *own_blob_tables(conn))
    }


def copy_store_file(source: Path, target: Path) -> FileEntry:
    """A consistent copy of a (possibly live) store file, and its manifest entry."""
    try:
        src = connect_readonly(source)
    except MaintenanceError as exc:
        raise BackupError(str(exc)) from None
    try:
        dst = sqlite3.connect(target, isolation_level=None)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")
            ids, rows, check = describe(dst)
        finally:
            dst.close()
    except (sqlite3.Error, MaintenanceError) as exc:
        raise BackupError(f"{source.name}: {exc}") from None
    finally:
        src.close()
    if check != "ok":
        raise BackupError(f"{source.name}: integrity check failed: {check}")
    return FileEntry(
        name=source.name,
        store_ids=ids,
        rows=rows,
        sha256=sha256_of(target),
        bytes=target.stat().st_size,
    )


def archive_name(now: dt.datetime) -> str:
    return f"{ARCHIVE_PREFIX}{now.strftime('%Y%m%dT%H%M%SZ')}{ARCHIVE_SUFFIX}"


def create_backup(
    persist_dir: Path,
    out_dir: Path,
    *,
    keep: int | None = None,
    progress: Progress | None = None,
    now: dt.datetime | None = None,
) -> BackupResult:
    """Back up every store file of ``persist_dir`` into one new archive (0600) in ``out_dir``.

    Files that cannot be read are listed under ``skipped`` in the manifest; the caller
    decides whether that is a failure (the CLI exits 1 so cron reports it). One run at
    a time writes into ``out_dir`` (it holds a lock on the directory), so what a killed
    run left there (``.sds-backup-*``) is removed at the start. With ``keep``, a run
    that archived every file verifies the new archive and then deletes all but the
    newest ``keep`` sds archives of ``out_dir``.
    """
    if keep is not None and keep < 1:
        raise BackupError("keep must be at least 1")
    try:
        sources = store_files(persist_dir)
    except MaintenanceError as exc:
        raise BackupError(str(exc)) from None
    try:
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise BackupError(f"cannot create {out_dir}: {exc.strerror}") from None
    now = now or dt.datetime.now(dt.UTC)
    with _directory_lock(out_dir, f"another sds backup is writing into {out_dir}"):
        leftovers = remove_leftovers(out_dir, LEFTOVER_PREFIX)
        result = _write_archive(sources, out_dir, now, progress)
        result.removed_leftovers = leftovers
        if keep is not None and not result.manifest.skipped:
            try:
                verify_archive(result.archive)
            except BackupError as exc:
                raise BackupError(
                    f"the new archive {result.archive.name} does not verify ({exc}); "
                    "no archive was pruned"
                ) from None
            result.verified = True
            result.pruned = prune_archives(out_dir, keep)
    return result


def _write_archive(
    sources: list[Path], out_dir: Path, now: dt.datetime, progress: Progress | None
) -> BackupResult:
    entries: list[FileEntry] = []
    skipped: list[dict[str, str]] = []
    try:
        work_dir = tempfile.TemporaryDirectory(prefix=LEFTOVER_PREFIX, dir=out_dir)
    except OSError as exc:
        raise BackupError(f"cannot write in {out_dir}: {exc.strerror}") from None
    with work_dir as work:
        stores = Path(work) / STORES_DIR
        stores.mkdir()
        for done, source in enumerate(sources, start=1):
            try:
                entries.append(copy_store_file(source, stores / source.name))
            except BackupError as exc:
                (stores / source.name).unlink(missing_ok=True)
                skipped.append({"name": source.name, "error": str(exc)})
            if progress is not None:
                progress(source.name, done, len(sources))
        manifest = Manifest(
            created=now.isoformat(timespec="seconds").replace("+00:00", "Z"),
            sqlite_version=SQLITE_VERSION,
            sds_version=_sds_version(),
            files=entries,
            skipped=skipped,
        )
        archive = _free_name(out_dir, archive_name(now))
        partial = out_dir / f".{archive.name}.partial"  # starts with LEFTOVER_PREFIX
        try:
            (Path(work) / MANIFEST_NAME).write_text(json.dumps(manifest.as_json(), indent=2) + "\n")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, ARCHIVE_MODE)
            with os.fdopen(fd, "wb") as raw:
                with tarfile.open(fileobj=raw, mode="w:gz") as tar:
                    tar.add(Path(work) / MANIFEST_NAME, arcname=MANIFEST_NAME)
                    for entry in entries:
                        tar.add(stores / entry.name, arcname=f"{STORES_DIR}/{entry.name}")
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(partial, archive)
            fsync_dir(out_dir)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise BackupError(f"cannot write the archive in {out_dir}: {exc.strerror}") from None
    return BackupResult(archive, manifest)


@contextlib.contextmanager
def _directory_lock(directory: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on a directory for one run; BackupError(busy) when another has it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BackupError(busy) from None
            raise BackupError(f"cannot lock {directory}: {exc.strerror}") from None
        yield
    finally:
        os.close(fd)


def remove_leftovers(directory: Path, prefix: str) -> list[str]:
    """Delete the work dirs and ``.partial`` archives a killed run left in ``directory``.

    Call with the directory lock held: then no live run owns any of them.
    """
    removed = []
    for path in sorted(directory.iterdir()):
        if not path.name.startswith(prefix):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise BackupError(f"cannot remove the leftover {path}: {exc.strerror}") from None
        removed.append(path.name)
    return removed


def archives_in(directory: Path) -> list[Path]:
    """The sds archives of a directory (regular files named sds-backup-...), oldest first."""
    found: list[tuple[str, int, Path]] = []
    for path in directory.iterdir():
        match = _ARCHIVE_NAME.match(path.name)
        if match is None or path.is_symlink() or not path.is_file():
            continue
        found.append((match.group(1), int(match.group(2) or 0), path))
    return [path for _, _, path in sorted(found)]


def prune_archives(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` sds archives of a directory; the deleted ones."""
    doomed = archives_in(directory)[:-keep]
    for path in doomed:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise BackupError(f"cannot delete the old archive {path}: {exc.strerror}") from None
    return doomed


def _free_name(directory: Path, name: str) -> Path:
    """``name`` in ``directory``, with a counter when a backup of the same second exists."""
    candidate = directory / name
    counter = 1
    while candidate.exists():
        stem = name[: -len(ARCHIVE_SUFFIX)]
        candidate = directory / f"{stem}-{counter}{ARCHIVE_SUFFIX}"
        counter += 1
    return candidate


def _sds_version() -> str:
    try:
        return metadata.version("sds-relay")
    except metadata.PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def extracted(archive: Path, *, parent: Path | None = None) -> Iterator[tuple[Manifest, Path]]:
    """Unpack an archive into a temporary dir (removed afterwards); its verified manifest."""
    try:
        work_dir = tempfile.TemporaryDirectory(prefix=RESTORE_PREFIX, dir=parent)
    except OSError as exc:
        raise BackupError(f"cannot unpack into {parent}: {exc.strerror}") from None
    with work_dir as work:
        manifest = _unpack(archive, Path(work))
        _verify_files(manifest, Path(work) / STORES_DIR)
        yield manifest, Path(work) / STORES_DIR


def verify_archive(archive: Path) -> Manifest:
    """Check an archive: manifest, sha256, integrity check and row counts of every file."""
    with extracted(archive) as (manifest, _):
        return manifest


def _unpack(archive: Path, work: Path) -> Manifest:
    """Extract only the expected members (no links, no paths outside ``work``)."""
    if not archive.is_file():
        raise BackupError(f"no archive {archive}")
    stores = work / STORES_DIR
    try:
        stores.mkdir()
    except OSError as exc:
        raise BackupError(f"cannot unpack into {work.parent}: {exc.strerror}") from None
    manifest_data: Any = None
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = member.name
                if not member.isfile():
                    raise BackupError(f"unexpected archive member {name!r}")
                source = tar.extractfile(member)
                if source is None:
                    raise BackupError(f"unreadable archive member {name!r}")
                if name == MANIFEST_NAME:
                    if member.size > MAX_MANIFEST_BYTES:
                        raise BackupError("manifest.json is too large")
                    manifest_data = _parse_manifest(source.read())
                    continue
                folder, _, file_name = name.partition("/")
                if folder != STORES_DIR or not _SAFE_FILE.match(file_name):
                    raise BackupError(f"unexpected archive member {name!r}")
                _extract_member(source, stores / file_name)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise BackupError(f"{archive.name} is not a readable backup archive: {exc}") from None
    if manifest_data is None:
        raise BackupError(f"{archive.name} has no manifest.json")
    return Manifest.from_json(manifest_data)


def _parse_manifest(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise BackupError("manifest.json is nested too deeply") from None
    except (UnicodeDecodeError, ValueError):
        raise BackupError("manifest.json is not valid JSON") from None


def _extract_member(source: Any, target: Path) -> None:
    """Copy one archive member into a new 0600 file; a write error is a one-line BackupError."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, STORE_FILE_MODE)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out)
    except OSError as exc:
        raise BackupError(
            f"cannot unpack {target.name} into {target.parent.parent.parent}: {exc.strerror}"
        ) from None


def _verify_files(manifest: Manifest, stores: Path) -> None:
    listed = {entry.name for entry in manifest.files}
    present = {path.name for path in stores.iterdir()}
    if present - listed:
        raise BackupError(f"files not in the manifest: {', '.join(sorted(present - listed))}")
    for entry in manifest.files:
        path = stores / entry.name
        if not _SAFE_FILE.match(entry.name) or not path.is_file():
            raise BackupError(f"{entry.name} is listed in the manifest but missing")
        if sha256_of(path) != entry.sha256:
            raise BackupError(f"{entry.name}: sha256 does not match the manifest")
        try:
            conn = connect_readonly(path)
            try:
                ids, rows, check = describe(conn)
            finally:
                conn.close()
        except (sqlite3.Error, MaintenanceError) as exc:
            raise BackupError(f"{entry.name}: {exc}") from None
        if check != "ok":
            raise BackupError(f"{entry.name}: integrity check failed: {check}")
        if rows != entry.rows:
            raise BackupError(f"{entry.name}: row counts {rows} differ from the manifest")
        if ids != entry.store_ids:
            raise BackupError(f"{entry.name}: store ids differ from the manifest")


@dataclass
class RestoreResult:
    """What a restore wrote: the files restored, the existing ones replaced or kept."""

    archive: str
    persist_dir: str
    files: list[FileEntry]
    replaced: list[str]
    kept: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class StoresExist(BackupError):
    """Restore would overwrite existing stores and ``force`` was not given."""


class StoreInUse(BackupError):
    """Another process (the server) holds the lock of a store file to be replaced."""


def restore_archive(
    archive: Path,
    persist_dir: Path,
    *,
    force: bool = False,
    only: Sequence[str] = (),
    if_missing: bool = False,
    lock_timeout: float = 0.0,
    progress: Progress | None = None,
) -> RestoreResult:
    """Verify an archive, then put its store files in ``persist_dir``, each atomically.

    ``only`` restores just the files holding these store ids; ``if_missing`` just the
    files that do not exist yet (the others are kept, not an error). Existing files
    are replaced only with ``force``. Each file's one-writer lock is taken before
    anything is replaced; a store the server holds open raises StoreInUse and nothing
    changes. Any failure leaves every store as it was (the unpacked copies are
    removed); the new files get the persist dir's owner and mode 0600.
    """
    if force and if_missing:
        raise BackupError("--force and --if-missing exclude each other")
    problem = foreign_owner(persist_dir)
    if problem is not None:
        raise BackupError(problem)
    try:
        persist_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise BackupError(f"cannot create {persist_dir}: {exc.strerror}") from None
    with (
        _directory_lock(persist_dir, f"another sds restore is running in {persist_dir}"),
        contextlib.ExitStack() as stack,
    ):
        remove_leftovers(persist_dir, RESTORE_PREFIX)
        manifest, stores = stack.enter_context(extracted(archive, parent=persist_dir))
        entries = _selected(manifest, only, archive)
        if if_missing:
            kept = [e.name for e in entries if (persist_dir / e.name).exists()]
            entries = [e for e in entries if e.name not in kept]
        else:
            kept = []
        targets = [persist_dir / entry.name for entry in entries]
        with _locks(targets, lock_timeout):
            existing = [path.name for path in targets if path.exists()]
            if existing and not force:
                if if_missing:
                    raise StoresExist(
                        f"{', '.join(existing)} appeared while restoring; nothing restored"
                    )
                raise StoresExist(
                    f"{len(existing)} store file(s) already exist in {persist_dir} "
                    f"({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}); "
                    "use --force to replace them"
                )
            try:
                for entry in entries:
                    _stage(stores / entry.name, persist_dir)
            except (OSError, MaintenanceError) as exc:
                raise BackupError(f"cannot prepare the restored files: {exc}") from None
            done: list[str] = []
            for entry, target in zip(entries, targets, strict=True):
                try:
                    _replace(stores / entry.name, target)
                except OSError as exc:
                    raise BackupError(
                        f"cannot replace {target.name}: {exc.strerror}; "
                        + (f"already restored: {', '.join(done)}" if done else "nothing restored")
                    ) from None
                done.append(entry.name)
                if progress is not None:
                    progress(entry.name, len(done), len(targets))
            fsync_dir(persist_dir)
    return RestoreResult(str(archive), str(persist_dir), entries, existing, kept)


def _selected(manifest: Manifest, only: Sequence[str], archive: Path) -> list[FileEntry]:
    """The manifest entries holding the store ids of ``only`` (every entry without it)."""
    if not only:
        return list(manifest.files)
    wanted = set(only)
    entries = [entry for entry in manifest.files if wanted & set(entry.store_ids)]
    found = {one for entry in entries for one in entry.store_ids}
    missing = sorted(wanted - found)
    if missing:
        raise BackupError(f"not in {archive.name}: store {', '.join(map(repr, missing))}")
    return entries


@contextlib.contextmanager
def _locks(targets: list[Path], timeout: float) -> Iterator[None]:
    fds: list[int] = []
    try:
        for target in targets:
            try:
                fds.append(try_lock(target, timeout=timeout))
            except StoreBusy:
                raise StoreInUse(
                    f"{target.name} is open in a running server: stop the server (or wait "
                    "until its clients have left and it released the file), then restore again"
                ) from None
            except OSError as exc:
                raise BackupError(f"cannot lock {target.name}: {exc.strerror}") from None
            try:
                adopt_store_files(target)
            except MaintenanceError as exc:
                raise BackupError(str(exc)) from None
        yield
    finally:
        for fd in fds:
            os.close(fd)


def _stage(unpacked: Path, persist_dir: Path) -> None:
    """Make an unpacked file ready to be renamed into place: owner, mode, on disk."""
    adopt(unpacked, persist_dir)
    fd = os.open(unpacked, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SIDE_FILES = ("-wal", "-shm", "-journal")


def _replace(staged: Path, target: Path) -> None:
    """Put ``staged`` (same file system) in place of ``target``; the old WAL never meets it.

    The old file's WAL is folded in first where that works (a full disk may refuse).
    Its side files are then renamed aside, never deleted before the new file is in
    place: if the rename of the new file fails they go back, and the old store is
    exactly as it was; only once it is in place are they deleted.
    """
    if target.exists():
        with contextlib.suppress(sqlite3.Error, OSError):
            conn = connect_sync(target)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
    moved: list[tuple[Path, Path]] = []
    try:
        for suffix in SIDE_FILES:
            side = target.with_name(target.name + suffix)
            if side.exists() or side.is_symlink():
                aside = target.with_name(f".{target.name}{suffix}.replaced")
                os.replace(side, aside)
                moved.append((aside, side))
        os.replace(staged, target)
    except OSError:
        for aside, side in reversed(moved):
            with contextlib.suppress(OSError):
                os.replace(aside, side)
        raise
    for aside, _ in moved:
        with contextlib.suppress(OSError):
            aside.unlink()
