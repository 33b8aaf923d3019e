"""``sds watch``: connect to a store as a client and print its frames live (debugging)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
from typing import Any

import click

from sds.cli.options import fail, setting_options, stderr_console, stdout_console
from sds.cli.store import URL_ENV, json_option
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


async def watch(
    base_url: str, store_id: str, token: str, *, count: int | None, as_json: bool
) -> int | None:
    """Print frames until ``count`` have arrived (None: the close code when the server closes)."""
    from sds.client import ClientClosed, StoreClient

    terminal = stdout_console()
    async with StoreClient(base_url, store_id, token) as client:
        stderr_console().print(f"watching store {store_id!r} on {base_url} (Ctrl-C to stop)")
        seen = 0
        while count is None or seen < count:
            try:
                frame = await client.receive(timeout=None)
            except ClientClosed as closed:
                return closed.code if closed.code is not None else -1
            seen += 1
            info = describe_frame(frame, dt.datetime.now(dt.UTC))
            if as_json:
                click.echo(json.dumps(info))
            else:
                _print_frame(terminal, info)
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
@json_option
@setting_options("port", secret=False)
def watch_command(
    store_id: str, token: str, url: str | None, count: int | None, as_json: bool, **options: Any
) -> None:
    """Print the frames of a store live: time, type, size (presence state shown).

    Connects as an ordinary client, so it first receives the stored history, then
    live traffic. It sends nothing. Exit 1 when the server refuses or closes the
    connection; Ctrl-C ends it with exit 0.

    \b
    Examples:
      sds watch notes --token "$(sds token mint --store notes --scope read --sub watcher)"
      SDS_TOKEN=... sds watch notes --url https://sds.example.com --json | jq .type
    """
    from sds.cli.options import config_from

    config = config_from(options, require_secret=False)
    base = watch_url(url or os.environ.get(URL_ENV) or f"http://127.0.0.1:{config.port}")
    try:
        code = asyncio.run(watch(base, store_id, token, count=count, as_json=as_json))
    except KeyboardInterrupt:
        return
    except Exception as exc:
        fail(_connect_problem(base, exc))
        return
    if code is not None:
        fail(f"the server closed the connection (code {code})")


def _connect_problem(base: str, exc: Exception) -> str:
    import aiohttp

    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"the server refused the connection: HTTP {exc.status}"
    if isinstance(exc, aiohttp.ClientError | OSError):
        return f"cannot connect to {base}: {exc}".splitlines()[0]
    return f"watch failed: {type(exc).__name__}: {exc}".splitlines()[0]
