"""A restore on a nearly full disk replaces a store completely or leaves it exactly as it was.

The old store was left by a crashed server: its patches are still in a WAL that was
never checkpointed, so deleting that WAL (or putting a new file beside it) would lose
or corrupt them. Real tmpfs mounts, real subprocesses.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sds.backup import create_backup
from tests.helpers import clean_env, one_error_line, run_sds
from tests.store_files import all_rows, db_digests, write_store

OLD_CHECKPOINTED = 800
OLD_IN_WAL = 40
NEW_PATCHES = 1000

CRASHED_WRITER = """
import os, sys
from pathlib import Path
from sds.backends.sqlite import connect_sync
conn = connect_sync(Path(sys.argv[1]))
conn.execute("PRAGMA wal_autocheckpoint=0")
first = int(sys.argv[2])
for clock in range(first, first + int(sys.argv[3])):
    conn.execute("INSERT INTO patches VALUES ('s0', ?, ?)", (clock, os.urandom(1000)))
os._exit(0)  # no close, no checkpoint: what a crash leaves
"""


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size``; skipped where mounting is not permitted, except in CI."""
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        message = f"cannot mount a small tmpfs here: {result.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _crashed_store(path: Path) -> None:
    """A large store whose last patches sit in a WAL that was never checkpointed."""
    write_store(path, "s0", [os.urandom(1000) for _ in range(OLD_CHECKPOINTED)])
    subprocess.run(
        [
            sys.executable,
            "-c",
            CRASHED_WRITER,
            str(path),
            str(OLD_CHECKPOINTED + 1),
            str(OLD_IN_WAL),
        ],
        check=True,
        timeout=60,
    )
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size > OLD_IN_WAL * 1000, "the last patches must sit in the WAL"


def _fill(directory: Path, leave: int) -> None:
    """Fill the file system of ``directory`` until about ``leave`` bytes are free."""
    stats = os.statvfs(directory)
    free = stats.f_bavail * stats.f_frsize
    assert free > leave
    with (directory / "filler").open("wb") as filler:
        filler.write(b"\0" * (free - leave))


def _leftovers(directory: Path) -> list[str]:
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.name.startswith(".") or p.name.endswith((".restoring", ".replaced"))
    )


@pytest.mark.parametrize("room", ["less_than_the_archive", "one_copy_not_two"])
def test_restore_on_a_full_disk_over_a_crashed_store(tmp_path: Path, room: str) -> None:
    source = tmp_path / "source"
    source.mkdir()
    write_store(source / "s0.db", "s0", [os.urandom(1000) for _ in range(NEW_PATCHES)])
    archive = create_backup(source, tmp_path / "backups").archive
    new_size = (source / "s0.db").stat().st_size

    with small_filesystem(tmp_path / "tiny", "8m") as stores:
        _crashed_store(stores / "s0.db")
        old_rows = all_rows(stores / "s0.db")
        assert len(old_rows["patches"]) == OLD_CHECKPOINTED + OLD_IN_WAL
        before = db_digests(stores)
        leave = new_size // 2 if room == "less_than_the_archive" else new_size * 3 // 2
        _fill(stores, leave)

        result = run_sds(
            "restore", str(archive), "--force", env=clean_env(SDS_PERSIST_DIR=str(stores))
        )

        assert "Traceback" not in result.stderr
        assert _leftovers(stores) == []
        if result.returncode == 0:
            # Room enough: the new store is complete and no old WAL lies beside it.
            assert all_rows(stores / "s0.db") == all_rows(source / "s0.db")
            assert not (stores / "s0.db-wal").exists() or not (stores / "s0.db-wal").stat().st_size
        else:
            assert result.returncode == 1
            line = one_error_line(result)
            assert "No space left on device" in line
            assert "not a readable" not in line
            assert db_digests(stores) == before
            assert all_rows(stores / "s0.db") == old_rows
        if room == "one_copy_not_two":
            # A restore needs room for one copy of the file, not two.
            assert result.returncode == 0, result.stderr
        else:
            assert result.returncode == 1
