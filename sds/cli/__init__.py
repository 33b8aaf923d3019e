"""The ``sds`` command: serving and operations. One module per command group."""

from __future__ import annotations

import sys

import click

from sds.cli.backup import backup, restore
from sds.cli.cluster import cluster
from sds.cli.serve import serve
from sds.cli.store import store
from sds.cli.token import secret, token
from sds.cli.watch import watch_command

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sds-relay", prog_name="sds")
def cli() -> None:
    """Relay server and operations toolkit for SDS (shareable-data-store) clients.

    \b
    Quick start:
      sds serve --dev                   # a local server with demo tokens
      sds secret generate > secret.txt  # a production secret
      sds token mint --store notes --scope write --sub alice
    """


cli.add_command(serve)
cli.add_command(secret)
cli.add_command(token)
cli.add_command(store)
cli.add_command(backup)
cli.add_command(restore)
cli.add_command(watch_command)
cli.add_command(cluster)


def main(argv: list[str] | None = None) -> None:
    """Entry point: every error is one line on stderr; exit 0 ok, 1 failure, 2 usage/config."""
    try:
        # Without standalone mode click *returns* the code of a raised Exit (e.g.
        # `sds token inspect` of an invalid token) instead of exiting with it.
        result = cli.main(args=argv, prog_name="sds", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("sds: aborted", err=True)
        sys.exit(EXIT_FAILURE)
    except click.UsageError as exc:
        click.echo(f"sds: {exc.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        click.echo(f"sds: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(result if isinstance(result, int) else EXIT_OK)
