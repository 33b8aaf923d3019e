"""Option bundles shared by the commands, built from ``sds.config.SETTINGS``.

Options are read as strings and parsed by ``sds.config`` so that a bad value on
the command line and in the environment gives the same one-line error (exit 2).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.text import Text

from sds.config import (
    SECRET_ENV,
    SECRET_FILE_ENV,
    SETTINGS_BY_NAME,
    Config,
    ConfigError,
    load_config,
    read_secret_file,
)

F = TypeVar("F", bound=Callable[..., Any])

SERVER_SETTINGS = tuple(SETTINGS_BY_NAME)
"""Every setting: what `sds serve` accepts."""
STORE_SETTINGS = ("persist_dir", "value_mode", "sync")
"""What the store maintenance commands need."""
TOKEN_SETTINGS = ("issuer",)
SERVER_PORT_HELP = "TCP port of the server to reach (on 127.0.0.1)."
"""--port of the commands that talk to a running server, not listen themselves."""
DEV_DATA_DIR = Path("sds-data")
"""Where `sds serve --dev` keeps its secret file and store files (relative to the cwd)."""
DEV_SECRET_FILE = DEV_DATA_DIR / "jwt-secret"


class ConfigFailure(click.ClickException):
    """Bad configuration: one line on stderr, exit code 2."""

    exit_code = 2


def stderr_console() -> Console:
    """The console for diagnostics (stderr); NO_COLOR is honoured by rich."""
    return Console(stderr=True, highlight=False)


def stdout_console() -> Console:
    """The console for data (stdout)."""
    return Console(highlight=False)


Column = str | tuple[str, str]
"""A column name, or ``(name, "left" | "right")``."""


def print_json(data: Any) -> None:
    """Print the ``--json`` output of a command: one indented JSON document on stdout."""
    click.echo(json.dumps(data, indent=2))


def print_table(
    columns: Sequence[Column],
    rows: Iterable[Sequence[str | Text]],
    *,
    title: str | None = None,
    header: bool = True,
) -> None:
    """Print a table on stdout; every command's tables go through here.

    Nothing is ever cut short: on a terminal, rich wraps long values in their column
    (``overflow="fold"``); when stdout is not a terminal (a pipe, a file), each row
    is one plain line, columns padded to their widest value and separated by two
    spaces. Plain strings are shown as they are (no markup); pass a rich Text for style.
    """
    specs = [(c, "left") if isinstance(c, str) else c for c in columns]
    texts = [[cell if isinstance(cell, Text) else Text(cell) for cell in row] for row in rows]
    console = stdout_console()
    if console.is_terminal:
        from rich.table import Table

        table = Table(title=title, title_justify="left", show_header=header)
        for name, justify in specs:
            table.add_column(name, justify=justify, overflow="fold", no_wrap=False)  # type: ignore[arg-type]
        for row in texts:
            table.add_row(*row)
        console.print(table)
        return
    lines = [[cell.plain for cell in row] for row in texts]
    if header:
        lines.insert(0, [name for name, _ in specs])
    widths = [max((len(line[i]) for line in lines), default=0) for i in range(len(specs))]
    if title:
        click.echo(title)
    for line in lines:
        cells = [
            value.rjust(width) if justify == "right" else value.ljust(width)
            for value, width, (_, justify) in zip(line, widths, specs, strict=True)
        ]
        click.echo("  ".join(cells).rstrip())


def setting_options(
    *names: str, secret: bool = True, dev: bool = True, helps: Mapping[str, str] | None = None
) -> Callable[[F], F]:
    """Add click options for these settings (and the secret file), with their env vars in help.

    With ``secret``, also ``--jwt-secret-file`` and (with ``dev``) ``--dev``: use the
    secret, and the store files, of `sds serve --dev`. ``helps`` replaces a setting's
    help text.
    """

    def decorate(function: F) -> F:
        for name in reversed(names):
            setting = SETTINGS_BY_NAME[name]
            envs = ", ".join(setting.env)
            # A flag passes the string "true" so it is parsed like its env var.
            extra: dict[str, Any] = (
                {"is_flag": True, "flag_value": "true"}
                if setting.is_flag
                else {"metavar": setting.metavar, "multiple": setting.multiple}
            )
            function = click.option(
                setting.option,
                name,
                default=None,
                help=f"{(helps or {}).get(name, setting.help)} [env var: {envs}]",
                **extra,
            )(function)
        if secret:
            function = click.option(
                "--jwt-secret-file",
                "jwt_secret_file",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help=f"File holding the JWT secret. [env var: {SECRET_ENV} (the secret), "
                f"{SECRET_FILE_ENV} (a file)]",
            )(function)
        if secret and dev:
            function = click.option(
                "--dev",
                "dev",
                is_flag=True,
                default=False,
                help=f"Use the secret (and store files) of `sds serve --dev`: {DEV_SECRET_FILE} "
                f"and {DEV_DATA_DIR}/ in the current directory.",
            )(function)
        return function

    return decorate


def config_from(
    options: dict[str, Any], *, secret: str | None = None, require_secret: bool = True
) -> Config:
    """A validated Config from a command's options and the environment; exit 2 if bad.

    ``--dev`` reads the secret of `sds serve --dev` (and uses its store files unless a
    persist dir is given). A secret file that cannot be read is an error (exit 2) when
    the command needs the secret, else a warning on stderr.
    """
    values = {name: options.get(name) for name in SETTINGS_BY_NAME}
    secret_file = options.get("jwt_secret_file")
    if options.get("dev"):
        if secret_file is None and secret is None:
            secret_file = DEV_SECRET_FILE
            if not DEV_SECRET_FILE.is_file():
                raise ConfigFailure(
                    f"--dev: no {DEV_SECRET_FILE} here (run this where `sds serve --dev` ran)"
                )
        if (
            "persist_dir" in options
            and not _persist_dir_set(options)
            and not _database_set(options)
        ):
            values["persist_dir"] = str(DEV_DATA_DIR)
    elif not require_secret and secret is None:
        secret_file = _readable_secret_file(secret_file)
    try:
        return load_config(
            values,
            secret_file=secret_file,
            secret=secret,
            require_secret=require_secret,
        )
    except ConfigError as exc:
        message = str(exc)
        if message.startswith("no JWT secret") and DEV_SECRET_FILE.is_file():
            message += (
                f"; for the server `sds serve --dev` started here, add --dev ({DEV_SECRET_FILE})"
            )
        raise ConfigFailure(message) from None


def _database_set(options: dict[str, Any]) -> bool:
    """A database URL (or its file) is given: maintenance works on PostgreSQL, not files."""
    return any(
        options.get(name) is not None or any(os.environ.get(e) for e in SETTINGS_BY_NAME[name].env)
        for name in ("database_url", "database_url_file")
    )


def _persist_dir_set(options: dict[str, Any]) -> bool:
    setting = SETTINGS_BY_NAME["persist_dir"]
    return options.get("persist_dir") is not None or any(os.environ.get(e) for e in setting.env)


def _readable_secret_file(secret_file: Path | None) -> Path | None:
    """For a command that can do without the secret: a configured secret file
    (option or SDS_JWT_SECRET_FILE) that cannot be read is a one-line warning, not
    silence; the command goes on without it (None)."""
    path = secret_file or (
        Path(os.environ[SECRET_FILE_ENV]) if os.environ.get(SECRET_FILE_ENV) else None
    )
    if path is None:
        return None
    try:
        read_secret_file(path)
    except ConfigError as exc:
        click.echo(f"sds: warning: {exc}; ignoring it", err=True)
        return None
    return secret_file


def fail(message: str, code: int = 1) -> None:
    """End the command with one line on stderr."""
    click.echo(f"sds: {message}", err=True)
    sys.exit(code)
