"""The shipped Caddy and nginx configs, run for real in front of a real `sds serve`.

Each test derives its config from the shipped file by substitution only (ports,
certificate and log paths, the monitoring allow-list narrowed to 127.0.0.2), so
the routing logic under test is the shipped one. Linux routes all of 127.0.0.0/8
to the loopback device, so a client bound to 127.0.0.1 is "outside" the
allow-list and one bound to 127.0.0.2 is "inside".
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from tests.deploy_tools import (
    require_tool,
    self_signed_certificate,
    stop,
    substitute,
    wait_for_port,
)
from tests.helpers import ServerProcess, free_port, spawn_server

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = ROOT / "deployment"
OUTSIDE = "127.0.0.1"
INSIDE = "127.0.0.2"
TIMEOUT = aiohttp.ClientTimeout(total=15)


@dataclass
class Proxy:
    """A proxy in front of ``upstream``: its base URL, its access log."""

    http_url: str
    ws_url: str
    access_log: Path
    upstream: ServerProcess
    plain_http_url: str = ""
    """nginx: the port-80 server, which redirects to https."""


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[ServerProcess]:
    """The server behind the proxy, refusing tokens with a close (for the SDS sidecar)."""
    with spawn_server(["--auth-refusal", "close"], cwd=tmp_path / "sds") as server:
        yield server


@pytest.fixture
def caddy(tmp_path: Path, upstream: ServerProcess) -> Iterator[Proxy]:
    binary = require_tool("caddy")
    port = free_port()
    site = (DEPLOYMENT / "Caddyfile").read_text()
    site = substitute(site, "sds.example.com {", f"http://127.0.0.1:{port} {{")
    site = substitute(
        site, "reverse_proxy 127.0.0.1:3000", f"reverse_proxy 127.0.0.1:{upstream.port}"
    )
    site = substitute(
        site, "not remote_ip 127.0.0.1/8 ::1 10.0.0.0/8", f"not remote_ip {INSIDE}/32"
    )
    site = substitute(site, "/var/log/caddy/", f"{tmp_path}/")
    # Global options only: no admin endpoint, no certificates, loopback only.
    config = "{\n\tadmin off\n\tauto_https off\n\tdefault_bind 127.0.0.1\n}\n\n" + site
    (tmp_path / "Caddyfile").write_text(config)
    log = tmp_path / "caddy.log"
    home = str(tmp_path / "caddy-home")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "run", "--config", "Caddyfile", "--adapter", "caddyfile"],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={
                "PATH": "/usr/bin:/bin",
                "HOME": home,
                "XDG_DATA_HOME": home,
                "XDG_CONFIG_HOME": home,
            },
        )
    try:
        wait_for_port(port, process, log)
        yield Proxy(
            f"http://127.0.0.1:{port}",
            f"ws://127.0.0.1:{port}",
            tmp_path / "sds.access.log",
            upstream,
        )
    finally:
        stop(process)


@pytest.fixture
def nginx(tmp_path: Path, upstream: ServerProcess) -> Iterator[Proxy]:
    binary = require_tool("nginx")
    cert, key = self_signed_certificate(tmp_path)
    http_port, tls_port = free_port(), free_port()
    site = (DEPLOYMENT / "nginx" / "sds.conf").read_text()
    site = substitute(site, "listen 80;", f"listen 127.0.0.1:{http_port};")
    site = substitute(site, "listen [::]:80;", "")
    site = substitute(site, "listen 443 ssl http2;", f"listen 127.0.0.1:{tls_port} ssl http2;")
    site = substitute(site, "listen [::]:443 ssl http2;", "")
    site = substitute(site, "/etc/letsencrypt/live/sds.example.com/fullchain.pem", str(cert))
    site = substitute(site, "/etc/letsencrypt/live/sds.example.com/privkey.pem", str(key))
    site = site.replace("/var/log/nginx/", f"{tmp_path}/")
    site = substitute(site, "server 127.0.0.1:3000;", f"server 127.0.0.1:{upstream.port};")
    site = substitute(
        site,
        "allow 127.0.0.1;\n        allow ::1;\n        allow 10.0.0.0/8;",
        f"allow {INSIDE};",
    )
    (tmp_path / "site.conf").write_text(site)
    temp = tmp_path / "nginx-tmp"
    temp.mkdir()
    # One process in the foreground, as the user running the tests.
    (tmp_path / "nginx.conf").write_text(
        f"daemon off;\nmaster_process off;\npid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {temp}; proxy_temp_path {temp};\n"
        f"  fastcgi_temp_path {temp}; uwsgi_temp_path {temp}; scgi_temp_path {temp};\n"
        f"  include {tmp_path}/site.conf;\n}}\n"
    )
    log = tmp_path / "nginx.out"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(tls_port, process, log)
        wait_for_port(http_port, process, log)
        yield Proxy(
            f"https://127.0.0.1:{tls_port}",
            f"wss://127.0.0.1:{tls_port}",
            tmp_path / "sds.access.log",
            upstream,
            plain_http_url=f"http://127.0.0.1:{http_port}",
        )
    finally:
        stop(process)


def session(source: str = OUTSIDE) -> aiohttp.ClientSession:
    """A client whose connections come from ``source`` (certificates are not checked)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0), ssl=False, force_close=True)
    return aiohttp.ClientSession(connector=connector, timeout=TIMEOUT)


async def get(url: str, source: str = OUTSIDE) -> tuple[int, bytes]:
    async with session(source) as http, http.get(url, allow_redirects=False) as response:
        return response.status, await response.read()


async def relayed_through(proxy: Proxy, path: str, store_id: str, *, bearer: bool) -> str:
    """Two clients on ``/{path}/{store_id}`` via the proxy: what one sends, the other gets.

    Returns the token the clients used.
    """
    token = proxy.upstream.token(store_id)
    url = f"{proxy.ws_url}/{path}/{quote(store_id)}"
    headers = {"Authorization": f"Bearer {token}"} if bearer else {}
    if not bearer:
        url += f"?token={quote(token, safe='')}"
    text = path == "signal"
    message = json.dumps({"from": "a", "type": "hello"})
    frame = b"\x04" + json.dumps({"cursor": 1}).encode()
    async with (
        session() as http,
        http.ws_connect(url, headers=headers) as sender,
        http.ws_connect(url, headers=headers) as receiver,
    ):
        # The receiver joins its store on the server a moment after its 101:
        # send until it has one (every attempt bounded).
        for _ in range(50):
            if text:
                await sender.send_str(message)
            else:
                await sender.send_bytes(frame)
            try:
                got = await receiver.receive(timeout=0.2)
            except TimeoutError:
                continue
            assert got.data == (message if text else frame)
            return token
    pytest.fail(f"nothing relayed on /{path} through the proxy")


async def refusal_close_through(proxy: Proxy) -> tuple[int | None, str]:
    """Close code and reason of a token for another store, via the proxy."""
    token = proxy.upstream.token("another-store")
    url = f"{proxy.ws_url}/ws/proxied-refusal?token={quote(token, safe='')}"
    async with session() as http, http.ws_connect(url) as ws:
        message = await ws.receive(timeout=10)
        assert message.type is aiohttp.WSMsgType.CLOSE, message
        return ws.close_code, str(message.extra or "")


async def access_log_after(proxy: Proxy, needle: str) -> str:
    """The proxy's access log once it holds ``needle`` (bounded wait)."""
    for _ in range(100):
        if proxy.access_log.exists() and needle in proxy.access_log.read_text():
            return proxy.access_log.read_text()
        await asyncio.sleep(0.05)
    pytest.fail(f"{needle!r} never reached {proxy.access_log}")


async def check_proxy(proxy: Proxy) -> None:
    """The behaviour DEPLOYMENT.md promises of either proxy config."""
    status, body = await get(f"{proxy.http_url}/metrics", OUTSIDE)
    assert status == 403, body[:200]
    assert b"sds_" not in body
    status, body = await get(f"{proxy.http_url}/metrics", INSIDE)
    assert status == 200 and b"sds_connections" in body, body[:200]
    status, body = await get(f"{proxy.http_url}/healthz", OUTSIDE)
    assert status == 200 and json.loads(body)["status"], body[:200]
    status, body = await get(f"{proxy.http_url}/elsewhere", OUTSIDE)
    assert status == 404
    tokens = {
        "proxied-query": await relayed_through(proxy, "ws", "proxied-query", bearer=False),
        "proxied-bearer": await relayed_through(proxy, "ws", "proxied-bearer", bearer=True),
        "proxied-room": await relayed_through(proxy, "signal", "proxied-room", bearer=False),
    }
    # --auth-refusal close: the upgrade and the close code pass through unchanged.
    assert await refusal_close_through(proxy) == (4003, "token is for another store")
    log = await access_log_after(proxy, "proxied-room")
    for store_id, token in tokens.items():
        assert store_id in log
        assert token.split(".")[2] not in log, "a token reached the proxy's access log"
    assert "token=" not in log


async def test_caddy_refuses_metrics_outside_the_allow_list_and_proxies_the_rest(
    caddy: Proxy,
) -> None:
    await check_proxy(caddy)


async def test_nginx_refuses_metrics_outside_the_allow_list_and_proxies_the_rest(
    nginx: Proxy,
) -> None:
    await check_proxy(nginx)
    status, _ = await get(f"{nginx.plain_http_url}/healthz")
    assert status == 301
