"""scripts/backup.sh, run for real with bash: archive, verify, prune, fail loudly."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from sds.backup import ARCHIVE_GLOB, verify_archive
from tests.helpers import BIN_DIR, clean_env
from tests.store_files import write_store

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "backup.sh"
CRON = SCRIPT.parent.parent / "deployment" / "sds-backup.cron"
NOBODY = 65534
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
    (out / ".sds-backup-killed").mkdir()
    result = _run("--out", str(out), "--keep", "2", SDS_PERSIST_DIR=str(stores))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # what cron would mail: nothing when all went well
    lines = result.stdout.strip().splitlines()
    assert lines and all(LOG_LINE.match(line) for line in lines), lines
    assert not (out / ".sds-backup-killed").exists()
    assert any("removed .sds-backup-killed" in line for line in lines)
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
    assert _run("--out").returncode == 2


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_backup_script_help_prints_the_whole_header_and_exits_0(flag: str) -> None:
    result = _run(flag)
    assert result.returncode == 0, result.stderr
    header = []
    for line in SCRIPT.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(line[2:] if line.startswith("# ") else line[1:])
    assert result.stdout.splitlines() == header
    for needed in ("--out DIR", "--keep N", "SDS_PERSIST_DIR", "SDS_BIN", "logger -t sds-backup"):
        assert needed in result.stdout


def _cron_job() -> tuple[str, str]:
    """The user and the command of the job line of the shipped cron file."""
    lines = [
        line
        for line in CRON.read_text().splitlines()
        if line.strip() and not line.startswith("#") and not re.match(r"^[A-Z_]+=", line)
    ]
    assert len(lines) == 1, lines
    fields = lines[0].split(None, 6)
    return fields[5], fields[6]


def test_the_shipped_cron_job_runs_as_the_service_user_and_mails_only_failures(
    tmp_path: Path,
) -> None:
    user, command = _cron_job()
    assert user == "sds"
    assert "install -d -o sds -g sds -m 0700 /var/backups/sds" in CRON.read_text()
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("needs root and setpriv, as CI has")
        pytest.skip("needs root and setpriv to run the job as another user")
    as_service_user = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    base = Path(tempfile.mkdtemp(prefix="sds-cron-"))  # outside the 0700 pytest dirs
    try:
        probe = subprocess.run(
            [*as_service_user, "bash", "-c", f"{Path(BIN_DIR) / 'sds'} --version"],
            env=clean_env(),
            cwd=base,
            capture_output=True,
            check=False,
        )
        if probe.returncode != 0:
            pytest.skip("another user cannot run the sds of this Python installation")
        base.chmod(0o755)
        persist = base / "lib"
        persist.mkdir(mode=0o750)
        write_store(persist / "notes.db", "notes", [b"a"])
        backups = base / "backups"
        backups.mkdir(mode=0o700)  # what the documented `install -d -o sds ...` makes
        for path in (persist, persist / "notes.db", backups):
            os.chown(path, NOBODY, NOBODY)
        journal = base / "journal"
        journal.touch()
        os.chown(journal, NOBODY, NOBODY)

        def run_job(persist_dir: Path) -> subprocess.CompletedProcess[str]:
            job = (
                command.replace("/opt/sds/scripts/backup.sh", str(SCRIPT))
                .replace("/opt/sds/venv/bin/sds", str(Path(BIN_DIR) / "sds"))
                .replace("/var/lib/sds", str(persist_dir))
                .replace("/var/backups/sds", str(backups))
                .replace("logger -t sds-backup", f"cat >>{journal}")
            )
            return subprocess.run(
                [*as_service_user, "bash", "-c", job],
                env=clean_env(),
                cwd=base,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        good = run_job(persist)
        assert good.returncode == 0 and good.stderr == "" and good.stdout == "", good
        assert "wrote and verified" in journal.read_text()
        (archive,) = backups.glob(ARCHIVE_GLOB)
        assert archive.stat().st_uid == NOBODY
        assert archive.stat().st_mode & 0o777 == 0o600
        failed = run_job(base / "missing")
        assert "FAILED" in failed.stderr  # cron mails this
    finally:
        shutil.rmtree(base)
