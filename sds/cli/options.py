"""Option bundles shared by the commands, built from ``sds.config.SETTINGS``.

Options are read as strings and parsed by ``sds.config`` so that a bad value on
the command line and in the environment gives the same one-line error (exit 2).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from sds.config import (
    SECRET_ENV,
    SECRET_FILE_ENV,
    SETTINGS_BY_NAME,
    Config,
    ConfigError,
    load_config,
)

F = TypeVar("F", bound=Callable[..., Any])

SERVER_SETTINGS = tuple(SETTINGS_BY_NAME)
"""Every setting: what `sds serve` accepts."""
STORE_SETTINGS = ("persist_dir", "value_mode", "sync")
"""What the store maintenance commands need."""
TOKEN_SETTINGS = ("issuer",)


class ConfigFailure(click.ClickException):
    """Bad configuration: one line on stderr, exit code 2."""

    exit_code = 2


def stderr_console() -> Console:
    """The console for diagnostics (stderr); NO_COLOR is honoured by rich."""
    return Console(stderr=True, highlight=False)


def stdout_console() -> Console:
    """The console for data (stdout)."""
    return Console(highlight=False)


def setting_options(*names: str, secret: bool = True) -> Callable[[F], F]:
    """Add click options for these settings (and the secret file), with their env vars in help."""

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
                help=f"{setting.help} [env var: {envs}]",
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
        return function

    return decorate


def config_from(
    options: dict[str, Any], *, secret: str | None = None, require_secret: bool = True
) -> Config:
    """A validated Config from a command's options and the environment; exit 2 if bad."""
    values = {name: options.get(name) for name in SETTINGS_BY_NAME}
    try:
        return load_config(
            values,
            secret_file=options.get("jwt_secret_file"),
            secret=secret,
            require_secret=require_secret,
        )
    except ConfigError as exc:
        raise ConfigFailure(str(exc)) from None


def fail(message: str, code: int = 1) -> None:
    """End the command with one line on stderr."""
    click.echo(f"sds: {message}", err=True)
    sys.exit(code)
