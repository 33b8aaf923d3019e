"""scripts/backup.sh, run for real with bash: archive, verify, prune, fail loudly."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sds.backup import ARCHIVE_GLOB, verify_archive
from tests.helpers import clean_env
from tests.store_files import write_store

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "backup.sh"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ backup: ")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _old_archives(out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    names = [f"sds-backup-2020010{day}T000000Z.tar.gz" for day in (1, 2, 3)]
    for name in names:
        (out / name).write_bytes(b"old")
    return names


def test_backup_script_writes_a_verified_archive_and_keeps_the_newest(tmp_path: Path) -> None:
    stores = tmp_path / "stores"
    stores.mkdir()
    write_store(stores / "notes.db", "notes", [b"a", b"b"])
    out = tmp_path / "backups"
    old = _old_archives(out)
    result = _run("--out", str(out), "--keep", "2", SDS_PERSIST_DIR=str(stores))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and all(LOG_LINE.match(line) for line in lines), lines
    kept = sorted(p.name for p in out.glob(ARCHIVE_GLOB))
    assert len(kept) == 2
    assert kept[0] == old[-1]
    new = out / kept[1]
    assert [e.store_ids for e in verify_archive(new).files] == [["notes"]]
    assert sum("pruned" in line for line in lines) == 2


def test_backup_script_failure_exits_non_zero_and_prunes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "backups"
    old = _old_archives(out)
    result = _run("--out", str(out), "--keep", "1", SDS_PERSIST_DIR=str(tmp_path / "missing"))
    assert result.returncode != 0
    assert "FAILED" in result.stderr
    assert sorted(p.name for p in out.glob(ARCHIVE_GLOB)) == old


def test_backup_script_bad_options_exit_2(tmp_path: Path) -> None:
    assert _run("--keep", "0", "--out", str(tmp_path)).returncode == 2
    assert _run("--bogus").returncode == 2
    assert _run(SDS_PERSIST_DIR=str(tmp_path)).returncode == 2
