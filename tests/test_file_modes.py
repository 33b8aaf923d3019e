"""Store files and archives are private (0600), and belong to the persist dir's owner.

A restore or compaction run as root must not leave root-owned files that the server,
running as the service user, cannot write; a store file the server cannot open is
logged at ERROR.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from sds.backends.sqlite import connect_sync, store_filename
from sds.backup import BackupError, create_backup, restore_archive
from sds.maintenance import CompactionResult, MaintenanceError, compact_safely
from tests.conftest import ServerFactory
from tests.helpers import clean_env, run_sds
from tests.store_files import all_rows, write_store

NOBODY = 65534
IN_CI = os.environ.get("CI") == "true"


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def needs_root() -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("this test needs root, as CI runs it")
        pytest.skip("needs root to create files owned by another user")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _compact_notes(directory: Path) -> CompactionResult:
    """``sds store compact`` of notes.db in ``directory`` (a blob-mode persist dir)."""
    return compact_safely(
        directory / "notes.db",
        store_id=None,
        value_mode="blob",
        persist_dir=directory,
        admin_token=None,
        wait=0,
    )


def _service_dir(path: Path) -> Path:
    """A persist dir owned by an unprivileged user, as StateDirectory= makes it."""
    path.mkdir(mode=0o750)
    os.chown(path, NOBODY, NOBODY)
    return path


def test_store_files_and_archives_are_created_0600_under_a_permissive_umask(
    tmp_path: Path,
) -> None:
    stores = tmp_path / "stores"
    stores.mkdir()
    with umask(0o022):
        conn = connect_sync(stores / "notes.db")
        conn.execute("INSERT INTO patches VALUES ('notes', 1, x'01')")
        assert _mode(stores / "notes.db") == 0o600
        assert _mode(stores / "notes.db-wal") == 0o600
        conn.close()
        result = create_backup(stores, tmp_path / "backups")
        restored = tmp_path / "restored"
        restore_archive(result.archive, restored)
    assert _mode(result.archive) == 0o600
    assert _mode(restored / "notes.db") == 0o600


async def test_the_server_creates_store_files_0600(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    with umask(0o022):
        server = await make_server(persist=True)
        directory = server.config.persist_dir
        assert directory is not None
        await server.hold("modes", b"\x01one")
        path = directory / store_filename("modes")
        for candidate in (path, path.with_name(path.name + "-wal")):
            assert _mode(candidate) == 0o600, candidate.name


async def test_a_store_file_the_server_cannot_open_is_logged_at_error(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="sds.backends.sqlite")
    server = await make_server(persist=True)
    directory = server.config.persist_dir
    assert directory is not None
    directory.mkdir(parents=True, exist_ok=True)
    (directory / store_filename("broken")).mkdir()  # not a file SQLite can open
    url = f"{server.ws_url}/ws/broken?token={server.token('broken')}"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url)
    assert refused.value.status == 503
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("broken.db" in message for message in errors), errors


def test_restore_as_root_gives_every_file_the_persist_dirs_owner(tmp_path: Path) -> None:
    needs_root()
    source = tmp_path / "source"
    source.mkdir()
    write_store(source / "notes.db", "notes", [b"new-1", b"new-2"])
    write_store(source / "todo.db", "todo", [b"t"])
    archive = create_backup(source, tmp_path / "backups").archive
    target = _service_dir(tmp_path / "service")
    # An existing store the server left with a WAL: the restore's own open of it
    # (folding the WAL in) creates -wal/-shm as root, which must not stay root's.
    conn = connect_sync(target / "notes.db")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("INSERT INTO patches VALUES ('notes', 1, x'6f6c64')")
    os.chown(target / "notes.db", NOBODY, NOBODY)
    with umask(0o022):
        result = run_sds(
            "restore", str(archive), "--force", env=clean_env(SDS_PERSIST_DIR=str(target))
        )
    conn.close()
    assert result.returncode == 0, result.stderr
    files = sorted(path for path in target.iterdir())
    names = {path.name for path in files}
    assert {"notes.db", "todo.db", "notes.db.lock", "todo.db.lock"} <= names
    for path in files:
        info = path.lstat()
        assert (info.st_uid, info.st_gid) == (NOBODY, NOBODY), path.name
        assert stat.S_IMODE(info.st_mode) == 0o600, path.name
    assert [row[2] for row in all_rows(target / "notes.db")["patches"]] == [b"new-1", b"new-2"]


def test_compaction_as_root_leaves_no_root_owned_file(tmp_path: Path) -> None:
    needs_root()
    target = _service_dir(tmp_path / "service")
    write_store(target / "notes.db", "notes", [b"a", b"b", b"a"])
    os.chown(target / "notes.db", NOBODY, NOBODY)
    with umask(0o022):
        result = _compact_notes(target)
    assert result.duplicates_removed == 1
    for path in target.iterdir():
        info = path.lstat()
        assert (info.st_uid, info.st_gid) == (NOBODY, NOBODY), path.name
        assert stat.S_IMODE(info.st_mode) == 0o600, path.name


def test_another_user_than_the_dirs_owner_is_refused_with_a_hint(tmp_path: Path) -> None:
    needs_root()
    source = tmp_path / "source"
    source.mkdir()
    write_store(source / "notes.db", "notes", [b"x"])
    archive = create_backup(source, tmp_path / "backups").archive
    base = Path(tempfile.mkdtemp(prefix="sds-modes-"))  # outside the 0700 pytest dirs
    base.chmod(0o755)
    target = base / "root-owned"
    target.mkdir()
    os.seteuid(NOBODY)
    try:
        with pytest.raises(BackupError, match="run it as that user") as refused:
            restore_archive(archive, target)
        with pytest.raises(MaintenanceError, match="run it as that user"):
            _compact_notes(target)
    finally:
        os.seteuid(0)
    try:
        assert "sudo -u root" in str(refused.value)
        assert list(target.iterdir()) == []
    finally:
        shutil.rmtree(base)
