"""`sds backup`, `sds backup verify`, `sds restore`: online, verified, atomic."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from sds.backup import (
    ARCHIVE_GLOB,
    BackupError,
    StoresExist,
    create_backup,
    restore_archive,
    verify_archive,
)
from sds.cli import cli
from tests.conftest import ServerFactory
from tests.helpers import clean_env, one_error_line, run_sds, run_sds_async, streaming_writer
from tests.store_files import all_rows, db_digests, write_store


def _stores(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_store(
        directory / "notes.db",
        "notes",
        [b"n1", b"n2" * 500, b"n1"],
        snapshot=(b"K" * 32 + b"snap", 0),
        blobs={"ab" * 32: b"value" * 100},
    )
    write_store(directory / "a_b.db", "a/b", [b"x"])
    write_store(directory / "a_b.db", "a:b", [b"y", b"z"])
    return directory


def _rewrite(archive: Path, target: Path, change: object) -> None:
    """Copy an archive, passing each member's bytes through ``change(name, data)``."""
    with tarfile.open(archive, "r:gz") as source, tarfile.open(target, "w:gz") as out:
        for member in source:
            extracted = source.extractfile(member)
            assert extracted is not None
            data = change(member.name, extracted.read())  # type: ignore[operator]
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


def test_backup_round_trip_restores_identical_rows(tmp_path: Path) -> None:
    source = _stores(tmp_path / "stores")
    result = create_backup(source, tmp_path / "backups")
    assert result.archive.name.startswith("sds-backup-") and result.archive.name.endswith(".tar.gz")
    manifest = result.manifest
    entries = {entry.name: entry for entry in manifest.files}
    assert entries["a_b.db"].store_ids == ["a/b", "a:b"]
    assert entries["notes.db"].rows == {
        "snapshots": 1,
        "patches": 3,
        "blobs": 1,
        "blob_owners": 0,
        "store_blobs": 0,
    }
    assert len(entries["notes.db"].sha256) == 64
    assert manifest.sqlite_version and manifest.created.endswith("Z")
    assert verify_archive(result.archive).files == manifest.files
    restored = tmp_path / "restored"
    restore_archive(result.archive, restored)
    for name in ("notes.db", "a_b.db"):
        assert all_rows(restored / name) == all_rows(source / name)
    assert not list(restored.glob(".sds-restore-*"))
    assert not list((tmp_path / "backups").glob(".*"))


def test_backup_cli_json_and_verify(tmp_path: Path) -> None:
    source = _stores(tmp_path / "stores")
    out = tmp_path / "backups"
    runner = CliRunner()
    result = runner.invoke(
        cli, ["backup", "--out", str(out), "--json"], env={"SDS_PERSIST_DIR": str(source)}
    )
    assert result.exit_code == 0, result.output
    archive = Path(json.loads(result.output)["archive"])
    assert archive.parent == out and archive.is_file()
    verified = runner.invoke(cli, ["backup", "verify", str(archive), "--json"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.output)["ok"] is True
    shown = run_sds("backup", "verify", str(archive), env=clean_env(COLUMNS="200"))
    assert shown.returncode == 0 and "notes.db" in shown.stdout


@pytest.mark.parametrize("damage", ["flip", "manifest_sha", "manifest_rows", "extra_file"])
def test_a_damaged_archive_is_refused_and_nothing_is_restored(tmp_path: Path, damage: str) -> None:
    source = _stores(tmp_path / "stores")
    archive = create_backup(source, tmp_path / "backups").archive
    bad = tmp_path / "bad.tar.gz"
    if damage == "flip":
        data = bytearray(archive.read_bytes())
        for offset in range(len(data) // 2, len(data) // 2 + 16):
            data[offset] ^= 0xFF
        bad.write_bytes(bytes(data))
    else:

        def change(name: str, data: bytes) -> bytes:
            if name != "manifest.json":
                return data
            manifest = json.loads(data)
            if damage == "manifest_sha":
                manifest["files"][0]["sha256"] = "0" * 64
            elif damage == "manifest_rows":
                manifest["files"][0]["rows"]["patches"] += 1
            else:
                manifest["files"] = manifest["files"][:1]
            return json.dumps(manifest).encode()

        _rewrite(archive, bad, change)
    with pytest.raises(BackupError):
        verify_archive(bad)
    target = tmp_path / "target"
    result = run_sds("restore", str(bad), env=clean_env(SDS_PERSIST_DIR=str(target)))
    assert result.returncode == 1
    one_error_line(result)
    assert db_digests(target) == {}
    verify = run_sds("backup", "verify", str(bad))
    assert verify.returncode == 1
    one_error_line(verify)


def test_restore_refuses_to_overwrite_existing_stores_without_force(tmp_path: Path) -> None:
    source = _stores(tmp_path / "stores")
    archive = create_backup(source, tmp_path / "backups").archive
    write_store(source / "notes.db", "notes", [b"written after the backup"])
    before = db_digests(source)
    result = run_sds("restore", str(archive), env=clean_env(SDS_PERSIST_DIR=str(source)))
    assert result.returncode == 1
    assert "--force" in one_error_line(result)
    assert db_digests(source) == before
    with pytest.raises(StoresExist):
        restore_archive(archive, source)
    forced = run_sds("restore", str(archive), "--force", env=clean_env(SDS_PERSIST_DIR=str(source)))
    assert forced.returncode == 0, forced.stderr
    assert b"written after the backup" not in b"".join(
        row[2] for row in all_rows(source / "notes.db")["patches"]
    )
    assert not (source / "notes.db-wal").exists()


def test_restore_and_backup_bad_input(tmp_path: Path) -> None:
    missing = run_sds("restore", str(tmp_path / "nope.tar.gz"), env=clean_env(SDS_PERSIST_DIR="x"))
    assert missing.returncode == 2
    one_error_line(missing)
    verify_missing = run_sds("backup", "verify", str(tmp_path / "nope.tar.gz"))
    assert verify_missing.returncode == 2
    one_error_line(verify_missing)
    no_out = run_sds("backup", env=clean_env(SDS_PERSIST_DIR=str(tmp_path)))
    assert no_out.returncode == 2
    one_error_line(no_out)
    no_dir = run_sds("backup", "--out", str(tmp_path / "b"))
    assert no_dir.returncode == 2
    one_error_line(no_dir)
    gone = run_sds(
        "backup", "--out", str(tmp_path / "b"), env=clean_env(SDS_PERSIST_DIR=str(tmp_path / "no"))
    )
    assert gone.returncode == 1
    one_error_line(gone)
    not_archive = tmp_path / "plain.tar.gz"
    not_archive.write_text("hello")
    junk = run_sds("backup", "verify", str(not_archive))
    assert junk.returncode == 1
    one_error_line(junk)


def test_backup_with_an_unreadable_store_archives_the_rest_and_exits_1(tmp_path: Path) -> None:
    source = _stores(tmp_path / "stores")
    (source / "broken.db").write_bytes(b"garbage" * 100)
    out = tmp_path / "backups"
    result = run_sds("backup", "--out", str(out), env=clean_env(SDS_PERSIST_DIR=str(source)))
    assert result.returncode == 1
    assert "broken.db" in one_error_line(result)
    (archive,) = out.glob(ARCHIVE_GLOB)
    manifest = verify_archive(archive)
    assert sorted(e.name for e in manifest.files) == ["a_b.db", "notes.db"]
    assert manifest.skipped[0]["name"] == "broken.db"


async def test_restore_refuses_a_store_the_server_holds(
    tmp_path: Path, make_server: ServerFactory
) -> None:
    server = await make_server(persist=True)
    directory = server.config.persist_dir
    assert directory is not None
    writer, peer = await server.hold("held", b"\x01one")
    archive = (await asyncio.to_thread(create_backup, directory, tmp_path / "b")).archive
    await writer.send(b"\x01two")
    await peer.receive(timeout=5)
    result = await run_sds_async(
        "restore", str(archive), "--force", env=clean_env(SDS_PERSIST_DIR=str(directory))
    )
    assert result.returncode == 1
    assert "stop the server" in one_error_line(result)
    async with server.client("held", "read") as joiner:
        assert await joiner.receive_all(0.4) == [b"\x01one", b"\x01two"]


async def test_backup_while_a_writer_streams_restores_to_a_replayable_prefix(
    tmp_path: Path, make_server: ServerFactory
) -> None:
    server = await make_server(persist=True)
    directory = server.config.persist_dir
    assert directory is not None
    writer = await server.connect("live", sub="writer")
    peer = await server.connect("live", "read", sub="peer")
    out = tmp_path / "backups"
    env = clean_env(SDS_PERSIST_DIR=str(directory))
    async with streaming_writer(writer, lambda i: b"\x01" + i.to_bytes(4, "big") * 64) as sent:
        for _ in range(50):
            await peer.receive(timeout=5)
        committed_before_backup = 50
        result = await run_sds_async("backup", "--out", str(out), "--json", env=env)
    assert result.returncode == 0, result.stderr
    archive = Path(json.loads(result.stdout)["archive"])
    verified = await run_sds_async("backup", "verify", str(archive))
    assert verified.returncode == 0, verified.stderr

    fresh = tmp_path / "fresh"
    restored = await run_sds_async(
        "restore", str(archive), env=clean_env(SDS_PERSIST_DIR=str(fresh))
    )
    assert restored.returncode == 0, restored.stderr
    config = server.config.replace(persist_dir=fresh)
    second = await make_server(config)
    async with second.client("live", "read", sub="joiner") as joiner:
        replayed = await joiner.receive_all(0.5)
    assert len(replayed) >= committed_before_backup
    assert replayed == sent[: len(replayed)]


def _old_archives(out: Path, names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        (out / name).write_bytes(b"old")


@pytest.mark.parametrize("how", ["option", "env"])
def test_backup_keep_prunes_only_older_sds_archives(tmp_path: Path, how: str) -> None:
    source = _stores(tmp_path / "stores")
    out = tmp_path / "backups"
    old = [
        "sds-backup-20200101T000000Z.tar.gz",
        "sds-backup-20200102T000000Z.tar.gz",
        "sds-backup-20200102T000000Z-1.tar.gz",
    ]
    _old_archives(out, old)
    others = ["notes.txt", "sds-backup-notes.tar.gz", "other-20200101T000000Z.tar.gz"]
    _old_archives(out, others)
    args = ["backup", "--out", str(out), "--json"]
    env = clean_env(SDS_PERSIST_DIR=str(source))
    if how == "option":
        args += ["--keep", "2"]
    else:
        env["SDS_BACKUP_KEEP"] = "2"
    result = run_sds(*args, env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    new = Path(data["archive"])
    assert data["verified"] is True
    assert sorted(Path(p).name for p in data["pruned"]) == old[:2]
    left = sorted(p.name for p in out.iterdir())
    assert left == sorted([*others, old[2], new.name])


def test_backup_keep_prunes_nothing_when_a_store_could_not_be_copied(tmp_path: Path) -> None:
    source = _stores(tmp_path / "stores")
    (source / "broken.db").write_bytes(b"garbage" * 100)
    out = tmp_path / "backups"
    old = ["sds-backup-20200101T000000Z.tar.gz", "sds-backup-20200102T000000Z.tar.gz"]
    _old_archives(out, old)
    result = run_sds(
        "backup", "--out", str(out), "--keep", "1", env=clean_env(SDS_PERSIST_DIR=str(source))
    )
    assert result.returncode == 1
    one_error_line(result)
    assert set(old) <= {p.name for p in out.glob(ARCHIVE_GLOB)}


def test_backup_keep_must_be_positive(tmp_path: Path) -> None:
    source = _stores(tmp_path / "stores")
    for bad in (["--keep", "0"], ["--keep", "x"]):
        result = run_sds(
            "backup", "--out", str(tmp_path / "b"), *bad, env=clean_env(SDS_PERSIST_DIR=str(source))
        )
        assert result.returncode == 2
    env = clean_env(SDS_PERSIST_DIR=str(source), SDS_BACKUP_KEEP="-3")
    assert run_sds("backup", "--out", str(tmp_path / "b"), env=env).returncode == 2


def test_the_next_backup_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    source = _stores(tmp_path / "stores")
    out = tmp_path / "backups"
    out.mkdir()
    # What a run killed mid-way leaves: its work dir with full-size copies, a partial archive.
    work = out / ".sds-backup-k1ll3d"
    (work / "stores").mkdir(parents=True)
    (work / "stores" / "notes.db").write_bytes(b"x" * 100_000)
    (out / ".sds-backup-20200101T000000Z.tar.gz.partial").write_bytes(b"y" * 100_000)
    (out / ".keep-me").write_text("not ours")
    (out / "notes.txt").write_text("not ours")
    result = run_sds(
        "backup", "--out", str(out), "--json", env=clean_env(SDS_PERSIST_DIR=str(source))
    )
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)["removed_leftovers"]) == [
        ".sds-backup-20200101T000000Z.tar.gz.partial",
        ".sds-backup-k1ll3d",
    ]
    names = sorted(p.name for p in out.iterdir())
    assert names[:2] == [".keep-me", "notes.txt"]
    assert len(names) == 3 and names[2].startswith("sds-backup-")


def test_leftovers_of_a_running_backup_are_not_touched(tmp_path: Path) -> None:
    import fcntl
    import os

    source = _stores(tmp_path / "stores")
    out = tmp_path / "backups"
    (out / ".sds-backup-running").mkdir(parents=True)
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a backup in progress holds
        result = run_sds("backup", "--out", str(out), env=clean_env(SDS_PERSIST_DIR=str(source)))
    finally:
        os.close(fd)
    assert result.returncode == 1
    assert "another sds backup" in one_error_line(result)
    assert (out / ".sds-backup-running").is_dir()


def test_a_backup_subprocess_killed_mid_run_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    from tests.helpers import SDS

    source = tmp_path / "stores"
    source.mkdir()
    for n in range(20):
        write_store(source / f"s{n}.db", f"s{n}", [os.urandom(2000) for _ in range(150)])
    out = tmp_path / "backups"
    process = subprocess.Popen(
        [*SDS, "backup", "--out", str(out)],
        env=clean_env(SDS_PERSIST_DIR=str(source)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and process.poll() is None:
            work = list(out.glob(".sds-backup-*/stores/*.db")) if out.exists() else []
            if len(work) >= 2:
                break
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    leftovers = list(out.glob(".sds-backup-*"))
    if not leftovers:
        pytest.skip("the backup finished before it could be killed")
    result = run_sds("backup", "--out", str(out), env=clean_env(SDS_PERSIST_DIR=str(source)))
    assert result.returncode == 0, result.stderr
    assert not list(out.glob(".sds-backup-*"))
    assert len(list(out.glob(ARCHIVE_GLOB))) == 1


def _with_manifest(tmp_path: Path, text: str) -> Path:
    source = _stores(tmp_path / "stores")
    archive = create_backup(source, tmp_path / "backups").archive
    bad = tmp_path / "bad.tar.gz"
    _rewrite(archive, bad, lambda name, data: text.encode() if name == "manifest.json" else data)
    return bad


def _manifest_variants() -> dict[str, str]:
    good = {
        "format": 1,
        "created": "2025-01-01T00:00:00Z",
        "sqlite_version": "3",
        "sds_version": "1",
        "files": [
            {
                "name": "a_b.db",
                "store_ids": ["a/b"],
                "rows": {"patches": 1},
                "sha256": "0",
                "bytes": 1,
            }
        ],
    }

    def variant(**change: object) -> str:
        data = json.loads(json.dumps(good))
        for path, value in change.items():
            *parents, last = path.split("__")
            node = data
            for key in parents:
                node = node[int(key)] if isinstance(node, list) else node[key]
            node[last] = value
        return json.dumps(data)

    return {
        "deeply_nested": "[" * 100_000 + "]" * 100_000,
        "nested_in_files": variant(files=json.loads("[" * 50 + "]" * 50)),
        "huge_float": variant(files__0__bytes=1e300).replace("1e+300", "1e400"),
        "huge_int": variant(files__0__bytes=2**70),
        "nan": variant().replace('"bytes": 1', '"bytes": NaN'),
        "row_count_string": variant(files__0__rows={"patches": "3"}),
        "format_true": variant(format=True),
        "not_an_object": "[1, 2, 3]",
    }


@pytest.mark.parametrize("case", sorted(_manifest_variants()))
def test_a_malformed_manifest_is_one_clear_line_for_verify_and_restore(
    tmp_path: Path, case: str
) -> None:
    bad = _with_manifest(tmp_path, _manifest_variants()[case])
    with pytest.raises(BackupError):
        verify_archive(bad)
    verify = run_sds("backup", "verify", str(bad))
    assert verify.returncode == 1
    assert "manifest" in one_error_line(verify)
    target = tmp_path / "target"
    restore = run_sds("restore", str(bad), env=clean_env(SDS_PERSIST_DIR=str(target)))
    assert restore.returncode == 1
    one_error_line(restore)
    assert db_digests(target) == {}


def test_restore_one_store_leaves_the_others_alone(tmp_path: Path) -> None:
    source = _stores(tmp_path / "stores")
    archive = create_backup(source, tmp_path / "backups").archive
    write_store(source / "notes.db", "notes", [b"after the backup"])
    write_store(source / "a_b.db", "a/b", [b"after the backup"])
    a_b_before = db_digests(source)["a_b.db"]
    env = clean_env(SDS_PERSIST_DIR=str(source))
    result = run_sds("restore", str(archive), "--store", "notes", "--force", "--json", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [entry["name"] for entry in data["files"]] == ["notes.db"]
    assert data["replaced"] == ["notes.db"]
    assert b"after the backup" not in [row[2] for row in all_rows(source / "notes.db")["patches"]]
    assert db_digests(source)["a_b.db"] == a_b_before
    unknown = run_sds("restore", str(archive), "--store", "nope", "--force", env=env)
    assert unknown.returncode == 1
    assert "nope" in one_error_line(unknown)
    assert db_digests(source)["a_b.db"] == a_b_before


def test_restore_if_missing_restores_only_absent_stores(tmp_path: Path) -> None:
    source = _stores(tmp_path / "stores")
    archive = create_backup(source, tmp_path / "backups").archive
    target = tmp_path / "target"
    target.mkdir()
    write_store(target / "notes.db", "notes", [b"newer than the backup"])
    notes_before = db_digests(target)["notes.db"]
    env = clean_env(SDS_PERSIST_DIR=str(target))
    first = run_sds("restore", str(archive), "--if-missing", "--json", env=env)
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert [entry["name"] for entry in data["files"]] == ["a_b.db"]
    assert data["kept"] == ["notes.db"]
    assert db_digests(target)["notes.db"] == notes_before
    assert all_rows(target / "a_b.db") == all_rows(source / "a_b.db")
    again = run_sds("restore", str(archive), "--if-missing", env=env)
    assert again.returncode == 0, again.stderr
    assert "nothing to restore" in again.stdout
    both = run_sds("restore", str(archive), "--if-missing", "--force", env=env)
    assert both.returncode == 2
    one_error_line(both)


def test_the_next_restore_removes_what_a_killed_restore_left(tmp_path: Path) -> None:
    source = _stores(tmp_path / "stores")
    archive = create_backup(source, tmp_path / "backups").archive
    target = tmp_path / "target"
    unpacked = target / ".sds-restore-k1ll3d" / "stores"
    unpacked.mkdir(parents=True)
    (unpacked / "notes.db").write_bytes(b"x" * 100_000)
    result = run_sds("restore", str(archive), env=clean_env(SDS_PERSIST_DIR=str(target)))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in target.iterdir() if p.name.startswith(".")) == []
    assert all_rows(target / "notes.db") == all_rows(source / "notes.db")
