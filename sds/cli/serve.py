"""``sds serve``: run the relay server (``--dev`` for a first try on a laptop)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import click

from sds.cli.options import (
    DEV_DATA_DIR,
    DEV_SECRET_FILE,
    SERVER_SETTINGS,
    ConfigFailure,
    config_from,
    setting_options,
)
from sds.config import Config, ConfigError, check_persist_dir, read_secret_file
from sds.tokens import mint_token

DEV_STORE = "demo"
DEV_TOKEN_SECONDS = 7 * 86400
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@click.command()
@setting_options(*SERVER_SETTINGS, dev=False)
@click.option(
    "--dev",
    is_flag=True,
    help="First try on a laptop: secret file and persistence under ./sds-data, "
    "loopback only, demo tokens printed.",
)
def serve(dev: bool, **options: Any) -> None:
    """Run the relay server until SIGTERM or Ctrl-C.

    \b
    Examples:
      sds serve --dev
      SDS_JWT_SECRET_FILE=/etc/sds/secret sds serve --persist-dir /var/lib/sds
      SDS_DATABASE_URL_FILE=/etc/sds/database-url sds serve
      sds serve --port 8080 --max-connections 5000 --log-format json
    """
    config = _dev_config(options) if dev else config_from(options)
    if config.persist_dir is not None:
        try:
            check_persist_dir(config.persist_dir)
        except ConfigError as exc:
            raise ConfigFailure(str(exc)) from None

    from sds.app import run
    from sds.logs import setup_logging

    setup_logging(config.log_format, config.log_level)
    _use_uvloop()
    # The banner (with its tokens) is printed once the port is bound: a busy port
    # gives one line and exit 2, not tokens for a server that never ran.
    on_bound = (lambda url: _print_dev_banner(config, url)) if dev else None
    from sds.backends.base import StorageError

    try:
        run(config, on_bound=on_bound)
    except StorageError as exc:
        # The database is unreachable or refuses at start-up (the message names
        # host, port and database, never the password).
        raise ConfigFailure(str(exc)) from None
    except OSError as exc:
        # Binding fails before anything is served (port taken, unknown host): a
        # configuration problem for the operator, not a crash with a traceback.
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror
        raise ConfigFailure(
            f"cannot serve on {config.host}:{config.port}: {reason or exc}"
        ) from None


def _dev_config(options: dict[str, Any]) -> Config:
    """--dev: ./sds-data holds the secret and the store files; loopback only."""
    host = options.get("host") or os.environ.get("SDS_HOST") or "127.0.0.1"
    if host not in LOOPBACK_HOSTS:
        raise ConfigFailure(f"--dev binds loopback only, not {host}")
    options = {**options, "host": host}
    database = any(
        options.get(name) or os.environ.get(env)
        for name, env in (
            ("database_url", "SDS_DATABASE_URL"),
            ("database_url_file", "SDS_DATABASE_URL_FILE"),
        )
    )
    if not database and not (
        options.get("persist_dir")
        or os.environ.get("SDS_PERSIST_DIR")
        or os.environ.get("SDS_PERSISTENCE_DIR")
    ):
        options["persist_dir"] = str(DEV_DATA_DIR)
    explicit = options.get("jwt_secret_file") or os.environ.get("SDS_JWT_SECRET_FILE")
    secret = None
    if not explicit and not os.environ.get("SDS_JWT_SECRET"):
        secret = _dev_secret(DEV_SECRET_FILE)
    return config_from(options, secret=secret)


def _dev_secret(path: Path) -> str:
    """The dev secret: created once (mode 0600), reused on every later start."""
    if path.exists():
        try:
            return read_secret_file(path)
        except ConfigError as exc:
            raise ConfigFailure(str(exc)) from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigFailure(f"cannot create the dev secret file {path}: {exc.strerror}") from None
    value = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value


def _print_dev_banner(config: Config, url: str) -> None:
    admin, write = (
        mint_token(
            config.jwt_secret,
            store_id=DEV_STORE,
            scope=scope,
            sub=f"dev-{scope}",
            expires_in=DEV_TOKEN_SECONDS,
            issuer=config.issuer,
        )
        for scope in ("admin", "write")
    )
    base = "ws://" + url.removeprefix("http://")
    click.echo(
        "\n".join(
            [
                f"sds dev server on {url} (loopback only)",
                f"  store files:  {config.persist_dir}/  (persistence on)"
                if config.persist_dir is not None
                else "  stores:       in PostgreSQL (persistence on)",
                f"  secret file:  {DEV_SECRET_FILE}  (reused on restart)",
                f"  demo store:   {DEV_STORE}",
                f"  admin token:  {admin}",
                f"  write token:  {write}",
                f"  connect to:   {base}/ws/{DEV_STORE}?token={write}",
                "",
            ]
        )
    )


def _use_uvloop() -> None:
    """uvloop (a dependency on Linux and macOS): 10-20 % fewer CPU-seconds per frame relayed."""
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()
