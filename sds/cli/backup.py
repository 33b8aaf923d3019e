"""``sds backup``, ``sds backup verify`` and ``sds restore``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from sds.cli.options import config_from, fail, print_json, print_table, setting_options
from sds.cli.store import DATABASE_SETTINGS, human_bytes, json_option, persist_dir_of

BACKUP_DIR_ENV = "SDS_BACKUP_DIR"
BACKUP_KEEP_ENV = "SDS_BACKUP_KEEP"


@click.group(invoke_without_command=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar=BACKUP_DIR_ENV,
    help=f"Directory for the archive (created if needed). [env var: {BACKUP_DIR_ENV}]",
)
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    envvar=BACKUP_KEEP_ENV,
    default=None,
    metavar="N",
    help="After a run that archived every store: verify the new archive, then delete all "
    f"but the newest N sds-backup-* archives of the directory. [env var: {BACKUP_KEEP_ENV}]",
)
@json_option
@setting_options("persist_dir", *DATABASE_SETTINGS, secret=False)
@click.pass_context
def backup(
    ctx: click.Context, /, out_dir: Path | None, keep: int | None, as_json: bool, **options: Any
) -> None:
    """Back up every store into one timestamped archive (online, consistent).

    Each store file is copied with SQLite's backup API from a read-only
    connection, so the copy is consistent while the server keeps writing. The
    archive sds-backup-YYYYmmddTHHMMSSZ.tar.gz (mode 0600) holds the copies and
    manifest.json (store ids, row counts, sha256 per file, SQLite version, time);
    it is written under a temporary name and renamed when complete. Temporary
    files a killed run left in the directory are removed. With --keep N the new
    archive is verified and only the newest N archives are kept (other files in
    the directory are never touched). Exit 1 if any store file could not be
    copied (the others are still archived, nothing is pruned).

    With --database-url, every store of that PostgreSQL database is first written
    into a SQLite store file (one consistent snapshot while servers write), so the
    archive has the same format and restores into a persist dir or a database.
    For large databases prefer pg_dump or point-in-time recovery (DEPLOYMENT.md).

    \b
    Examples:
      sds backup --out /var/backups/sds --persist-dir /var/lib/sds
      SDS_DATABASE_URL_FILE=/etc/sds/database-url sds backup --out /var/backups/sds
      SDS_PERSIST_DIR=/var/lib/sds sds backup --out /var/backups/sds --keep 14
      SDS_PERSIST_DIR=/var/lib/sds sds backup --out /var/backups/sds --json
      sds backup verify /var/backups/sds/sds-backup-20250101T030000Z.tar.gz
    """
    if ctx.invoked_subcommand is not None:
        return
    if out_dir is None:
        raise click.UsageError(f"--out DIR is required (or {BACKUP_DIR_ENV})")
    from sds.backup import BackupError, create_backup

    config = config_from(options, require_secret=False)
    url = config.database_url
    directory = None if url is not None else persist_dir_of(config)
    try:
        with _progress("backing up", as_json) as progress:
            result = create_backup(
                directory, out_dir, database_url=url, keep=keep, progress=progress
            )
    except BackupError as exc:
        fail(str(exc))
        return
    manifest = result.manifest
    if as_json:
        print_json(result.as_json())
    else:
        size = human_bytes(result.archive.stat().st_size)
        stores = sum(len(entry.store_ids) for entry in manifest.files)
        click.echo(f"{result.archive}  ({len(manifest.files)} files, {stores} stores, {size})")
        for path in result.pruned:
            click.echo(f"pruned {path}")
    if manifest.skipped:
        names = ", ".join(item["name"] for item in manifest.skipped)
        fail(f"{len(manifest.skipped)} store file(s) could not be backed up: {names}")


@backup.command("verify")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
def backup_verify(archive: Path, as_json: bool) -> None:
    """Check an archive: manifest, sha256, integrity_check and row counts of each file.

    Exit 1 when anything does not match.

    \b
    Examples:
      sds backup verify /var/backups/sds/sds-backup-20250101T030000Z.tar.gz
      sds backup verify --json ARCHIVE | jq '.files[].rows'
    """
    from sds.backup import BackupError, verify_archive

    try:
        manifest = verify_archive(archive)
    except BackupError as exc:
        fail(f"{archive.name}: {exc}")
        return
    if as_json:
        print_json({"archive": str(archive), "ok": True, **manifest.as_json()})
        return
    _print_manifest(manifest, f"{archive.name}: ok (created {manifest.created})")


@click.command()
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace store files that already exist.")
@click.option(
    "--store",
    "only",
    metavar="ID",
    multiple=True,
    help="Restore only the file of this store (repeatable). Store ids whose names map "
    "to the same file come with it.",
)
@click.option(
    "--if-missing",
    is_flag=True,
    help="Restore only the store files that do not exist; keep the others (exit 0 when "
    "there is nothing to do). For a restore at boot.",
)
@json_option
@setting_options("persist_dir", *DATABASE_SETTINGS, secret=False)
def restore(
    archive: Path,
    force: bool,
    only: tuple[str, ...],
    if_missing: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Restore an archive into the persist dir (verified first; atomic per file).

    The archive is verified (sha256, integrity_check, row counts) before any file
    is touched. Existing store files are only replaced with --force. Each file is
    replaced under its one-writer lock: if a running server has a store of the
    archive open, nothing is restored and the command exits 1 (stop the server, or
    wait until it has released the store). A failed restore (a full disk, say)
    leaves every store as it was. Restored files get the owner of the persist dir
    (when run as root) and mode 0600; another user than the dir's owner is refused.

    With --database-url the stores go into that PostgreSQL database instead (the
    schema is created if it is empty), all in one transaction: existing stores are
    replaced only with --force (stop the servers first), --if-missing keeps them,
    --store selects stores; a failure writes nothing.

    \b
    Examples:
      sds restore ARCHIVE --database-url postgresql://sds@db/sds
      sds restore /var/backups/sds/sds-backup-20250101T030000Z.tar.gz --persist-dir /var/lib/sds
      sds restore ARCHIVE --store notes --force
      sds restore ARCHIVE --if-missing          # at boot: only what is not there
      SDS_PERSIST_DIR=/srv/sds-restore-drill sds restore ARCHIVE --json
    """
    if force and if_missing:
        raise click.UsageError("--force and --if-missing exclude each other")
    from sds.backup import BackupError, restore_archive, restore_archive_to_database

    config = config_from(options, require_secret=False)
    if config.database_url is not None:
        try:
            into_db = restore_archive_to_database(
                archive, config.database_url, force=force, only=only, if_missing=if_missing
            )
        except BackupError as exc:
            fail(str(exc))
            return
        if as_json:
            print_json(into_db.as_json())
            return
        click.echo(
            f"restored {len(into_db.store_ids)} stores into PostgreSQL at {into_db.database}"
            + (f", replacing {len(into_db.replaced)}" if into_db.replaced else "")
            + (f", keeping {len(into_db.kept)} that exist" if into_db.kept else "")
        )
        return
    directory = persist_dir_of(config)
    try:
        with _progress("restoring", as_json) as progress:
            result = restore_archive(
                archive,
                directory,
                force=force,
                only=only,
                if_missing=if_missing,
                progress=progress,
            )
    except BackupError as exc:
        fail(str(exc))
        return
    if as_json:
        print_json(result.as_json())
        return
    if not result.files:
        click.echo(f"nothing to restore: all {len(result.kept)} store file(s) exist in {directory}")
        return
    stores = sum(len(entry.store_ids) for entry in result.files)
    click.echo(
        f"restored {len(result.files)} files ({stores} stores) into {directory}"
        + (f", replacing {len(result.replaced)}" if result.replaced else "")
        + (f", keeping {len(result.kept)} that exist" if result.kept else "")
    )


def _print_manifest(manifest: Any, title: str) -> None:
    columns = ["file", "store ids", "patches", "snapshots", "blobs", "bytes", "sha256"]
    rows = [
        [
            entry.name,
            ", ".join(entry.store_ids),
            str(entry.rows.get("patches", 0)),
            str(entry.rows.get("snapshots", 0)),
            str(entry.rows.get("blobs", 0) + entry.rows.get("store_blobs", 0)),
            human_bytes(entry.bytes),
            entry.sha256[:16],
        ]
        for entry in manifest.files
    ]
    print_table(columns, rows, title=title)


@contextmanager
def _progress(label: str, quiet: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar on a terminal (stderr), nothing otherwise."""
    from sds.cli.options import stderr_console

    console = stderr_console()
    if quiet or not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console
    ) as bar:
        task = bar.add_task(label, total=None)

        def advance(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"{label} {name}")

        yield advance
