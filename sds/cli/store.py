"""``sds store list``, ``sds store inspect`` and ``sds store compact``."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from sds.cli.options import (
    ConfigFailure,
    config_from,
    fail,
    print_json,
    print_table,
    setting_options,
)
from sds.config import Config

URL_ENV = "SDS_URL"
ADMIN_TOKEN_SECONDS = 300


def json_option(function: Any) -> Any:
    """The ``--json`` flag of every command that prints data."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(function)


DATABASE_SETTINGS = ("database_url", "database_url_file")
"""The options that point a maintenance command at a PostgreSQL database instead."""


def persist_dir_of(config: Config) -> Path:
    """The configured persist dir; exit 2 when none is set."""
    if config.persist_dir is None:
        raise ConfigFailure("no persist dir: set --persist-dir or SDS_PERSIST_DIR")
    return config.persist_dir


def human_bytes(size: int | None) -> str:
    """1234567 -> '1.2 MiB'."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def default_url(config: Config) -> str:
    """The server the CLI asks: SDS_URL, else http://127.0.0.1:<SDS_PORT or 3000>."""
    return os.environ.get(URL_ENV) or f"http://127.0.0.1:{config.port}"


@click.group()
def store() -> None:
    """Inspect and compact the stores: SQLite files of a persist dir, or a PostgreSQL database."""


@store.command("list")
@json_option
@setting_options("persist_dir", *DATABASE_SETTINGS, secret=False)
def store_list(as_json: bool, **options: Any) -> None:
    """List every store file of the persist dir (or store of the database) with its figures.

    Runs SQLite's quick_check on each file; exit 1 if a file is unreadable or damaged.
    Files are opened read-only: listing never writes a store. With --database-url,
    the stores of that PostgreSQL database, read in one read-only transaction.

    \b
    Examples:
      sds store list --persist-dir /var/lib/sds
      SDS_PERSIST_DIR=/var/lib/sds sds store list --json | jq '.files[].stores'
      SDS_DATABASE_URL_FILE=/etc/sds/database-url sds store list
    """
    from sds.maintenance import MaintenanceError, inspect_file, store_files

    config = config_from(options, require_secret=False)
    if config.database_url is not None:
        _database_report(config.database_url, None, as_json)
        return
    directory = persist_dir_of(config)
    try:
        paths = store_files(directory)
    except MaintenanceError as exc:
        raise ConfigFailure(str(exc)) from None
    reports: list[dict[str, Any]] = []
    problems = []
    for path in paths:
        try:
            report = inspect_file(path, quick=True).as_json()
        except MaintenanceError as exc:
            report = {"file": path.name, "path": str(path), "error": str(exc)}
        if report.get("error") or report.get("integrity") != "ok":
            problems.append(path.name)
        reports.append(report)
    from sds.backends.sqlite import SQLITE_VERSION

    if as_json:
        payload = {"persist_dir": str(directory), "sqlite_version": SQLITE_VERSION}
        print_json({**payload, "files": reports})
    else:
        _print_reports(reports, f"{directory} (SQLite {SQLITE_VERSION})")
    if problems:
        fail(f"{len(problems)} store file(s) failed the check: {', '.join(problems)}")


@store.command("inspect")
@click.argument("target", metavar="ID|FILE")
@json_option
@setting_options("persist_dir", *DATABASE_SETTINGS, secret=False)
def store_inspect(target: str, as_json: bool, **options: Any) -> None:
    """Show the figures of one store (by id) or one store file (by path).

    Patches, clock range, snapshot, blobs, bytes on disk, last write, SQLite's full
    integrity_check and version. Opened read-only. Exit 1 when the store is unknown,
    the file unreadable or the integrity check fails. With --database-url, one
    store (by id) of that PostgreSQL database.

    \b
    Examples:
      sds store inspect notes --persist-dir /var/lib/sds
      sds store inspect /var/lib/sds/notes.db --json
    """
    from sds.maintenance import MaintenanceError, inspect_file, resolve_store

    config = config_from(options, require_secret=False)
    if config.database_url is not None:
        _database_report(config.database_url, target, as_json)
        return
    try:
        path, store_id = resolve_store(config.persist_dir, target)
        report = inspect_file(path)
    except MaintenanceError as exc:
        fail(str(exc))
        return
    data = report.as_json()
    if store_id is not None and store_id not in [s.store_id for s in report.stores]:
        fail(f"unknown store {store_id!r}: {path.name} has no rows for it")
    if as_json:
        print_json(data)
    else:
        _print_reports([data], str(path))
    if report.integrity != "ok":
        fail(f"{path.name} failed the integrity check: {report.integrity}")


_STORE_COLUMNS = [
    ("store id", "left"),
    ("patches", "right"),
    ("clocks", "right"),
    ("patch bytes", "right"),
    ("snapshot", "right"),
]
"""The columns of one store's figures in ``store list / inspect`` (files or a database)."""


def _store_cells(figures: dict[str, Any]) -> list[str]:
    """The ``_STORE_COLUMNS`` cells of one store's figures (a StoreFigures as a dict)."""
    clocks = f"{figures['first_clock']}..{figures['last_clock']}" if figures["patches"] else "-"
    snapshot = (
        f"@{figures['snapshot_clock']} ({human_bytes(figures['snapshot_bytes'])})"
        if figures["snapshot_clock"] is not None
        else "-"
    )
    return [
        figures["store_id"],
        str(figures["patches"]),
        clocks,
        human_bytes(figures["patch_bytes"]),
        snapshot,
    ]


def _print_reports(reports: list[dict[str, Any]], title: str) -> None:
    from rich.text import Text

    columns = [
        ("file", "left"),
        *_STORE_COLUMNS,
        ("blobs", "right"),
        ("file bytes", "right"),
        ("last write", "left"),
        ("integrity", "left"),
    ]
    rows: list[list[str | Text]] = []
    for report in reports:
        if "error" in report:
            error = Text(report["error"], style="red")
            rows.append([report["file"], "", "", "", "", "", "", "", "", error])
            continue
        check = report["integrity"]
        check_cell = Text(check, style="green" if check == "ok" else "red")
        file_cells: list[str | Text] = [
            f"{report['blobs']} ({human_bytes(report['blob_bytes'])})",
            human_bytes(report["bytes"]),
            report["last_write"] or "-",
            check_cell,
        ]
        stores = report["stores"] or [None]
        for index, figures in enumerate(stores):
            if figures is None:
                store_cells = ["(empty)", "0", "-", "-", "-"]
            else:
                store_cells = _store_cells(figures)
            first = index == 0
            rows.append(
                [
                    report["file"] if first else "",
                    *store_cells,
                    *(file_cells if first else ["", "", "", ""]),
                ]
            )
    print_table(columns, rows, title=title)


@store.command("compact")
@click.argument("store_id", metavar="ID", required=False)
@click.option("--all", "all_stores", is_flag=True, help="Compact every store file.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds to keep trying to get the file lock or the server.",
)
@click.option(
    "--url",
    metavar="URL",
    default=None,
    help="The server you expect to hold the store: checked against the URL the holder "
    "recorded in the store's lock file; a mismatch is refused. (SDS_URL and SDS_PORT are "
    "not used: the lock record names the server.)",
)
@json_option
@click.option(
    "--port",
    "server_port",
    type=click.IntRange(1, 65535),
    metavar="N",
    default=None,
    help="The server's TCP port you expect to hold the store: checked against the lock "
    "record like --url.",
)
@setting_options("persist_dir", *DATABASE_SETTINGS, "value_mode", "issuer")
def store_compact(
    store_id: str | None,
    all_stores: bool,
    wait: float,
    url: str | None,
    server_port: int | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Remove duplicate patches (and, in snapshot mode, superseded ones); VACUUM.

    Byte-identical repeats of a patch are removed keeping the first (CRDT patches
    are idempotent, and peers re-send their state on every SYNC_REQ). With
    --value-mode snapshot, patches at or below the snapshot clock go too. Then the
    WAL is checkpointed and the file vacuumed. What a joining client replays stays
    the same: every distinct patch, in the order first written.

    One writer per file: if no process holds the file's lock, the command takes it
    and compacts the file itself. If a server holds it, the command asks that server
    and no other: the one whose URL, persist dir and instance id the holder recorded
    in the lock file (<file>.db.lock) when it took the lock (POST
    /api/stores/ID/compact with an admin token signed with the configured secret);
    the server's answer must name the same persist dir and instance. A --url or
    --port that disagrees with the record, a holder of another persist dir, or an
    answer from another server: refused, exit 1. If neither the lock nor the server
    is available within --wait seconds: exit 1.

    With --database-url the command compacts in the PostgreSQL database directly,
    while servers keep serving: each store in one transaction that holds back the
    servers' snapshot writes (patch commits go on), checks that a joiner receives
    the same frames before and after, and applies nothing otherwise.

    \b
    Examples:
      sds store compact notes --persist-dir /var/lib/sds
      SDS_DATABASE_URL_FILE=/etc/sds/database-url sds store compact --all
      sds store compact --all --json
      sds store compact notes --url http://127.0.0.1:8080 --value-mode snapshot
    """
    if bool(store_id) == all_stores:
        raise click.UsageError("give a store ID or --all (not both)")
    config = config_from(options, require_secret=False)
    if config.database_url is not None:
        _compact_database(config.database_url, store_id, config.value_mode, as_json)
        return
    directory = persist_dir_of(config)
    from sds.maintenance import MaintenanceError, compact_safely, resolve_store, store_files

    try:
        if all_stores:
            targets: list[tuple[Path, str | None]] = [(p, None) for p in store_files(directory)]
        else:
            assert store_id is not None
            path, named = resolve_store(directory, store_id)
            targets = [(path, named)]
    except MaintenanceError as exc:
        fail(str(exc))
        return
    admin_token = _admin_token_factory(config)
    results = []
    for path, one in targets:
        try:
            result = compact_safely(
                path,
                store_id=one,
                value_mode=config.value_mode,
                persist_dir=directory,
                admin_token=admin_token,
                wait=wait,
                server_url=url,
                server_port=server_port,
            )
        except MaintenanceError as exc:
            fail(str(exc))
            return
        results.append(result.as_json())
    if as_json:
        print_json({"results": results})
    else:
        _print_compaction(results)


def _database_report(url: str, store_id: str | None, as_json: bool) -> None:
    """``store list`` (all stores) or ``store inspect ID`` of a PostgreSQL database."""
    from sds.maintenance import MaintenanceError
    from sds.pg_maintenance import inspect_database

    try:
        report = inspect_database(url, store_id)
    except MaintenanceError as exc:
        fail(str(exc))
        return
    if as_json:
        print_json(report.as_json())
        return
    columns = [*_STORE_COLUMNS, ("blobs", "right")]
    rows = [
        [
            *_store_cells(asdict(figures)),
            f"{figures.blobs} ({human_bytes(figures.blob_bytes)})",
        ]
        for figures in report.stores
    ]
    title = f"PostgreSQL {report.server_version} at {report.database}"
    print_table(columns, rows, title=title)


def _compact_database(url: str, store_id: str | None, value_mode: str, as_json: bool) -> None:
    from sds.maintenance import MaintenanceError
    from sds.pg_maintenance import compact_database

    try:
        results = [r.as_json() for r in compact_database(url, store_id, value_mode=value_mode)]
    except MaintenanceError as exc:
        fail(str(exc))
        return
    if as_json:
        print_json({"results": results})
    else:
        _print_compaction(results)


def _admin_token_factory(config: Config) -> Any:
    """Mints a short admin token per store, or None without a secret."""
    if not config.jwt_secret:
        return None
    from sds.tokens import mint_token

    def admin_token(store_id: str) -> str:
        return mint_token(
            config.jwt_secret,
            store_id=store_id,
            scope="admin",
            sub="sds-store-compact",
            expires_in=ADMIN_TOKEN_SECONDS,
            issuer=config.issuer,
        )

    return admin_token


def _print_compaction(results: list[dict[str, Any]]) -> None:
    if not results:
        click.echo("no store files to compact")
        return
    columns = ["file", "stores", "duplicates removed", "superseded removed", "bytes", "via"]
    rows = [
        [
            result["file"],
            ", ".join(result["store_ids"]) or "(none)",
            str(result["duplicates_removed"]),
            str(result["superseded_removed"]),
            f"{human_bytes(result['bytes_before'])} -> {human_bytes(result['bytes_after'])}",
            result["via"],
        ]
        for result in results
    ]
    print_table(columns, rows)


@store.command("delete")
@click.argument("target", metavar="ID|FILE")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@setting_options("persist_dir", secret=False)
def store_delete(target: str, yes: bool, as_json: bool, **options: Any) -> None:
    """Delete a store: its file with the -wal, -shm, journal and lock files.

    Refused (exit 1) while a running server holds the store (the command takes the
    same lock as the server). Asks for confirmation unless --yes; a file that also
    holds other store ids (ids whose names map to the same file) is only deleted
    when named by its path. Take a backup first: this cannot be undone.

    \b
    Examples:
      sds store delete notes --persist-dir /var/lib/sds
      sds store delete notes --yes --json
      sds store delete /var/lib/sds/a_b.db --yes
    """
    from sds.maintenance import MaintenanceError, delete_store, resolve_store

    config = config_from(options, require_secret=False)

    def confirm(ids: list[str]) -> bool:
        others = [one for one in ids if one != store_id]
        if store_id is not None and others:
            raise MaintenanceError(
                f"{path.name} also holds store {', '.join(map(repr, others))}; "
                f"name the file ({path}) to delete them all"
            )
        if yes:
            return True
        held = ", ".join(map(repr, ids)) or "no store rows"
        try:
            return click.confirm(f"Delete {path} ({held})?", default=False, err=True)
        except click.Abort:
            click.echo("", err=True)  # end the prompt's line
            return False

    try:
        path, store_id = resolve_store(config.persist_dir, target)
        result = delete_store(path, confirm=confirm)
    except MaintenanceError as exc:
        fail(str(exc))
        return
    if as_json:
        print_json(result.as_json())
    else:
        click.echo(f"deleted {', '.join(result.deleted)}")
