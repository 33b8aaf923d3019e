"""``sds watch``: connect to a store as a client and print its frames live (debugging)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

import click

from sds.cli.options import (
    SERVER_PORT_HELP,
    fail,
    setting_options,
    stderr_console,
    stdout_console,
)
from sds.cli.store import URL_ENV, default_url, json_option
from sds.protocol import FrameType, frame_name

TOKEN_ENV = "SDS_TOKEN"


def describe_frame(frame: bytes, when: dt.datetime) -> dict[str, Any]:
    """What `sds watch` shows of one frame: time, type, size, and presence state as JSON."""
    kind = frame[0] if frame else None
    info: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds"),
        "type": frame_name(kind) if kind is not None else "EMPTY",
        "type_byte": kind,
        "bytes": len(frame),
    }
    if kind == FrameType.PRESENCE:
        try:
            info["presence"] = json.loads(frame[1:].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            info["presence_error"] = "not UTF-8 JSON"
    return info


def watch_url(url: str) -> str:
    """A ws:// or wss:// base URL from an http(s):// or ws(s):// one."""
    for plain, secure in (("http://", "ws://"), ("https://", "wss://")):
        if url.startswith(plain):
            return secure + url[len(plain) :]
    return url


class Refused(Exception):
    """The server refused the handshake: its status and the reason from its JSON body."""

    def __init__(self, status: int, reason: str | None) -> None:
        super().__init__(f"HTTP {status}: {reason}" if reason else f"HTTP {status}")


async def watch(
    base_url: str,
    store_id: str,
    token: str,
    *,
    count: int | None,
    as_json: bool,
    until_idle: float | None = None,
) -> int | None:
    """Print frames until ``count`` have arrived or ``until_idle`` seconds passed without
    one (None), or the server closes (its close code); Refused when it refuses."""
    import aiohttp

    from sds.client import ClientClosed, StoreClient

    terminal = stdout_console()
    client = StoreClient(base_url, store_id, token)
    try:
        await client.connect()
    except aiohttp.WSServerHandshakeError as exc:
        raise Refused(exc.status, client.refusal) from None
    try:
        stderr_console().print(f"watching store {store_id!r} on {base_url} (Ctrl-C to stop)")
        seen = 0
        while count is None or seen < count:
            try:
                frame = await client.receive(timeout=until_idle)
            except TimeoutError:
                return None
            except ClientClosed as closed:
                return closed.code if closed.code is not None else -1
            seen += 1
            info = describe_frame(frame, dt.datetime.now(dt.UTC))
            if as_json:
                click.echo(json.dumps(info))
            else:
                _print_frame(terminal, info)
    finally:
        await client.close()
    return None


def _print_frame(console: Any, info: dict[str, Any]) -> None:
    line = f"{info['time'][11:23]}  {info['type']:<11} {info['bytes']:>10,} B"
    if "presence" in info:
        line += "  " + json.dumps(info["presence"], separators=(",", ":"))
    elif "presence_error" in info:
        line += f"  ({info['presence_error']})"
    if console.is_terminal:
        from rich.markup import escape

        console.print(escape(line))
    else:
        click.echo(line)


@click.command("watch")
@click.argument("store_id", metavar="ID")
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    required=True,
    help=f"A token for the store (read scope is enough). [env var: {TOKEN_ENV}]",
)
@click.option(
    "--url",
    metavar="URL",
    default=None,
    help=f"Server base URL (http(s):// or ws(s)://). [env var: {URL_ENV}; default "
    "ws://127.0.0.1:<SDS_PORT or 3000>]",
)
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after N frames.")
@click.option(
    "--until-idle",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Stop (exit 0) once SECONDS pass without a frame.",
)
@json_option
@setting_options(
    "port",
    "persist_dir",
    secret=False,
    helps={
        "port": SERVER_PORT_HELP,
        "persist_dir": "The server's persist dir, if on this machine: warn when it has no "
        "file for ID (connecting creates the store, so a typo makes a new one).",
    },
)
def watch_command(
    store_id: str,
    token: str,
    url: str | None,
    count: int | None,
    until_idle: float | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Print the frames of a store live: time, type, size (presence state shown).

    Connects as an ordinary client, so it first receives the stored history, then
    live traffic. It sends nothing. Exit 1 when the server refuses (its reason is
    shown) or closes the connection; --count N, --until-idle SECONDS and Ctrl-C end
    it with exit 0.

    The server creates a store's file when a client first connects to it, so a
    mistyped ID makes a new, empty store: with the persist dir configured (on the
    server's machine) the command warns when that dir has no file for ID.

    \b
    Examples:
      sds watch notes --token "$(sds token mint --store notes --scope read --sub watcher)"
      SDS_TOKEN=... sds watch notes --url https://sds.example.com --json | jq .type
      sds watch notes --until-idle 2 --json > frames.jsonl
    """
    from sds.backends.sqlite import store_filename
    from sds.cli.options import config_from

    config = config_from(options, require_secret=False)
    if (
        config.persist_dir is not None
        and not (config.persist_dir / store_filename(store_id)).exists()
    ):
        click.echo(
            f"sds: warning: {config.persist_dir} has no file for store {store_id!r} (a typo?); "
            "connecting creates it",
            err=True,
        )
    base = watch_url(url or default_url(config))
    try:
        code = asyncio.run(
            watch(base, store_id, token, count=count, as_json=as_json, until_idle=until_idle)
        )
    except KeyboardInterrupt:
        return
    except Refused as exc:
        fail(f"the server refused the connection: {exc}")
        return
    except Exception as exc:
        fail(_connect_problem(base, exc))
        return
    if code is not None:
        fail(f"the server closed the connection (code {code})")


def _connect_problem(base: str, exc: Exception) -> str:
    import aiohttp

    if isinstance(exc, aiohttp.ClientError | OSError):
        return f"cannot connect to {base}: {exc}".splitlines()[0]
    return f"watch failed: {type(exc).__name__}: {exc}".splitlines()[0]
