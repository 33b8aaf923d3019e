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
import hashlib
import json
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from sds.maintenance import (
    TABLES,
    MaintenanceError,
    connect_readonly,
    integrity,
    own_blob_tables,
    store_files,
    store_ids,
)
from sds.storage import SQLITE_VERSION, StoreBusy, try_lock

ARCHIVE_PREFIX = "sds-backup-"
ARCHIVE_SUFFIX = ".tar.gz"
ARCHIVE_GLOB = f"{ARCHIVE_PREFIX}*{ARCHIVE_SUFFIX}"
MANIFEST_NAME = "manifest.json"
STORES_DIR = "stores"
FORMAT_VERSION = 1
_SAFE_FILE = re.compile(r"^[A-Za-z0-9_-]+\.db$")

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
        """Parse manifest.json; BackupError when it is not one."""
        try:
            if data["format"] != FORMAT_VERSION:
                raise BackupError(f"unsupported manifest format {data['format']!r}")
            files = [
                FileEntry(
                    name=str(item["name"]),
                    store_ids=[str(s) for s in item["store_ids"]],
                    rows={str(k): int(v) for k, v in item["rows"].items()},
                    sha256=str(item["sha256"]),
                    bytes=int(item["bytes"]),
                )
                for item in data["files"]
            ]
            return cls(
                created=str(data["created"]),
                sqlite_version=str(data["sqlite_version"]),
                sds_version=str(data.get("sds_version", "")),
                files=files,
                skipped=list(data.get("skipped", [])),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise BackupError("manifest.json is malformed") from None


@dataclass
class BackupResult:
    """A written archive and its manifest."""

    archive: Path
    manifest: Manifest

    def as_json(self) -> dict[str, Any]:
        return {"archive": str(self.archive), "manifest": self.manifest.as_json()}


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
    progress: Progress | None = None,
    now: dt.datetime | None = None,
) -> BackupResult:
    """Back up every store file of ``persist_dir`` into one new archive in ``out_dir``.

    Files that cannot be read are listed under ``skipped`` in the manifest; the caller
    decides whether that is a failure (the CLI exits 1 so cron reports it).
    """
    try:
        sources = store_files(persist_dir)
    except MaintenanceError as exc:
        raise BackupError(str(exc)) from None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(f"cannot create {out_dir}: {exc.strerror}") from None
    now = now or dt.datetime.now(dt.UTC)
    entries: list[FileEntry] = []
    skipped: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix=".sds-backup-", dir=out_dir) as work:
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
        (Path(work) / MANIFEST_NAME).write_text(json.dumps(manifest.as_json(), indent=2) + "\n")
        archive = _free_name(out_dir, archive_name(now))
        partial = out_dir / f".{archive.name}.partial"
        try:
            with tarfile.open(partial, "w:gz") as tar:
                tar.add(Path(work) / MANIFEST_NAME, arcname=MANIFEST_NAME)
                for entry in entries:
                    tar.add(stores / entry.name, arcname=f"{STORES_DIR}/{entry.name}")
            _fsync_file(partial)
            os.replace(partial, archive)
            _fsync_dir(out_dir)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise BackupError(f"cannot write the archive in {out_dir}: {exc.strerror}") from None
    return BackupResult(archive, manifest)


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
    with tempfile.TemporaryDirectory(prefix=".sds-restore-", dir=parent) as work:
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
    stores.mkdir()
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
                    manifest_data = json.loads(source.read())
                    continue
                folder, _, file_name = name.partition("/")
                if folder != STORES_DIR or not _SAFE_FILE.match(file_name):
                    raise BackupError(f"unexpected archive member {name!r}")
                with (stores / file_name).open("xb") as target:
                    shutil.copyfileobj(source, target)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise BackupError(f"{archive.name} is not a readable backup archive: {exc}") from None
    except (UnicodeDecodeError, ValueError):
        raise BackupError("manifest.json is not valid JSON") from None
    if manifest_data is None:
        raise BackupError(f"{archive.name} has no manifest.json")
    return Manifest.from_json(manifest_data)


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
    """What a restore replaced."""

    archive: str
    persist_dir: str
    files: list[FileEntry]
    replaced: list[str]

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
    lock_timeout: float = 0.0,
    progress: Progress | None = None,
) -> RestoreResult:
    """Verify an archive, then replace its store files in ``persist_dir`` atomically.

    Each file's one-writer lock is taken before anything is replaced; a store the
    server holds open raises StoreInUse and nothing changes.
    """
    try:
        persist_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(f"cannot create {persist_dir}: {exc.strerror}") from None
    with extracted(archive, parent=persist_dir) as (manifest, stores):
        targets = [persist_dir / entry.name for entry in manifest.files]
        existing = [path.name for path in targets if path.exists()]
        if existing and not force:
            raise StoresExist(
                f"{len(existing)} store file(s) already exist in {persist_dir} "
                f"({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}); "
                "use --force to replace them"
            )
        with _locks(targets, lock_timeout):
            for done, (entry, target) in enumerate(zip(manifest.files, targets, strict=True), 1):
                _replace(stores / entry.name, target)
                if progress is not None:
                    progress(entry.name, done, len(targets))
            _fsync_dir(persist_dir)
    return RestoreResult(str(archive), str(persist_dir), manifest.files, existing)


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
        yield
    finally:
        for fd in fds:
            os.close(fd)


def _replace(source: Path, target: Path) -> None:
    """Put ``source`` in place of ``target`` atomically; the old file's WAL cannot leak in."""
    if target.exists():
        # Fold the old WAL into the old file first: a crash before the rename then
        # leaves the old store whole, and no stale WAL can be replayed onto the new one.
        with contextlib.suppress(sqlite3.Error):
            conn = sqlite3.connect(target, isolation_level=None)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
    for suffix in ("-wal", "-shm", "-journal"):
        target.with_name(target.name + suffix).unlink(missing_ok=True)
    staged = target.with_name(f".{target.name}.restoring")
    shutil.copyfile(source, staged)
    _fsync_file(staged)
    os.replace(staged, target)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
