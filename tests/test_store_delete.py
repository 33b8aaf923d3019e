"""`sds store delete`: refused while a server holds the store, asks first, removes every file."""

from __future__ import annotations

import json
from pathlib import Path

from sds.backends.sqlite import connect_sync, store_filename
from tests.conftest import ServerFactory
from tests.helpers import clean_env, one_error_line, run_sds, run_sds_async
from tests.store_files import db_digests, write_store

SIDE_FILES = ("notes.db", "notes.db-wal", "notes.db-shm", "notes.db.lock")


def _store_with_side_files(directory: Path) -> None:
    """notes.db with a WAL, shared memory and lock file, as a crashed server leaves it."""
    directory.mkdir(parents=True, exist_ok=True)
    write_store(directory / "notes.db", "notes", [b"a", b"b"])
    write_store(directory / "todo.db", "todo", [b"t"])
    conn = connect_sync(directory / "notes.db")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("INSERT INTO patches VALUES ('notes', 3, x'63')")
    # Copy the files while the connection is open, so the WAL and -shm stay.
    snapshot = {name: (directory / name).read_bytes() for name in ("notes.db-wal", "notes.db-shm")}
    conn.close()
    for name, data in snapshot.items():
        (directory / name).write_bytes(data)
    (directory / "notes.db.lock").touch()


def test_delete_with_yes_removes_the_db_wal_shm_and_lock(tmp_path: Path) -> None:
    directory = tmp_path / "stores"
    _store_with_side_files(directory)
    assert all((directory / name).exists() for name in SIDE_FILES)
    result = run_sds(
        "store", "delete", "notes", "--yes", "--json", env=clean_env(SDS_PERSIST_DIR=str(directory))
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["store_ids"] == ["notes"]
    assert sorted(data["deleted"]) == sorted(SIDE_FILES)
    assert sorted(p.name for p in directory.iterdir()) == ["todo.db"]


def test_delete_asks_and_a_no_keeps_everything(tmp_path: Path) -> None:
    directory = tmp_path / "stores"
    _store_with_side_files(directory)
    before = db_digests(directory)
    env = clean_env(SDS_PERSIST_DIR=str(directory))
    refused = run_sds("store", "delete", "notes", env=env, input="n\n")
    assert refused.returncode == 1
    assert "not deleted" in refused.stderr
    no_answer = run_sds("store", "delete", "notes", env=env, input="")
    assert no_answer.returncode == 1
    assert db_digests(directory) == before
    assert all((directory / name).exists() for name in SIDE_FILES)
    agreed = run_sds("store", "delete", "notes", env=env, input="y\n")
    assert agreed.returncode == 0, agreed.stderr
    assert "Delete" in agreed.stderr and "'notes'" in agreed.stderr
    assert not (directory / "notes.db").exists()


async def test_delete_is_refused_while_the_server_holds_the_store(
    make_server: ServerFactory,
) -> None:
    server = await make_server(persist=True)
    directory = server.config.persist_dir
    assert directory is not None
    await server.hold("held", b"\x01kept")
    before = db_digests(directory)
    result = await run_sds_async(
        "store", "delete", "held", "--yes", env=clean_env(SDS_PERSIST_DIR=str(directory))
    )
    assert result.returncode == 1
    assert "stop the server" in one_error_line(result)
    assert (directory / store_filename("held")).exists()
    assert db_digests(directory) == before
    async with server.client("held", "read") as joiner:
        assert await joiner.receive_all(0.4) == [b"\x01kept"]


def test_delete_of_an_id_sharing_its_file_needs_the_file_name(tmp_path: Path) -> None:
    directory = tmp_path / "stores"
    directory.mkdir()
    write_store(directory / "a_b.db", "a/b", [b"x"])
    write_store(directory / "a_b.db", "a:b", [b"y"])
    env = clean_env(SDS_PERSIST_DIR=str(directory))
    shared = run_sds("store", "delete", "a/b", "--yes", env=env)
    assert shared.returncode == 1
    assert "a:b" in one_error_line(shared)
    assert (directory / "a_b.db").exists()
    by_file = run_sds("store", "delete", str(directory / "a_b.db"), "--yes", env=env)
    assert by_file.returncode == 0, by_file.stderr
    assert not (directory / "a_b.db").exists()


def test_delete_of_an_unknown_store_is_one_line(tmp_path: Path) -> None:
    directory = tmp_path / "stores"
    directory.mkdir()
    result = run_sds(
        "store", "delete", "nope", "--yes", env=clean_env(SDS_PERSIST_DIR=str(directory))
    )
    assert result.returncode == 1
    assert "nope" in one_error_line(result)
