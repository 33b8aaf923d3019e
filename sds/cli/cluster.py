"""``sds cluster status``: the processes sharing a persist dir and the stores each owns."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from sds.cli.options import (
    ConfigFailure,
    config_from,
    fail,
    print_json,
    print_table,
    setting_options,
)
from sds.cli.store import json_option

if TYPE_CHECKING:
    from sds.cluster import ClusterStatus


@click.group()
def cluster() -> None:
    """Several sds processes on one persist dir (docs/scaling.md)."""


@cluster.command("status")
@json_option
@setting_options("persist_dir", "lock_dir", "database_url", secret=False)
def cluster_status_command(as_json: bool, **options: Any) -> None:
    """Show the live processes of a persist dir (or lock dir), their URLs and stores.

    Read from the lock files: a process is alive while it holds its server record,
    and owns a store (or signalling room) while it holds its lock. With
    --database-url (servers run with --database-ownership), read from the
    database's lease rows and advisory locks. Nothing is written. Exit 1 when no
    process is alive.

    \b
    Examples:
      sds cluster status --persist-dir /var/lib/sds
      sds cluster status --lock-dir /run/sds          # relay-only processes
      sds cluster status                              # SDS_DATABASE_URL set
      sds cluster status --json | jq '.processes[] | {url, stores: [.stores[].store]}'
    """
    from sds.cluster import ClusterError, cluster_status

    config = config_from(options, require_secret=False)
    directory = config.lock_dir if config.persist_dir is None else config.persist_dir
    if directory is None and config.database_url is not None:
        import asyncio

        from sds.config import redacted_url
        from sds.pg_ownership import database_status

        try:
            status = asyncio.run(
                database_status(config.database_url, redacted_url(config.database_url))
            )
        except ClusterError as exc:
            raise ConfigFailure(str(exc)) from None
        _show(status, as_json)
        return
    if directory is None:
        raise ConfigFailure(
            "no persist dir or lock dir: set --persist-dir (SDS_PERSIST_DIR) "
            "or --lock-dir (SDS_LOCK_DIR)"
        )
    try:
        status = cluster_status(directory)
    except ClusterError as exc:
        raise ConfigFailure(str(exc)) from None
    _show(status, as_json)


def _show(status: ClusterStatus, as_json: bool) -> None:
    where = status.persist_dir
    if as_json:
        print_json(status.as_json())
    else:
        rows = [
            (
                process.url or "-",
                str(process.pid),
                process.instance,
                str(len(process.stores)),
                " ".join([*(s.store for s in process.stores), *process.rooms]) or "-",
            )
            for process in status.processes
        ]
        rows += [
            (other.command or "-", str(other.pid), "-", "1", other.file) for other in status.others
        ]
        print_table(
            ("url", ("pid", "right"), "instance", ("stores", "right"), "owns (stores, rooms)"),
            rows,
            title=f"{where}: {len(status.processes)} process(es) alive",
        )
    if not status.alive:
        fail(f"no sds process is serving {where}")
