"""Run the real `sds` command in a subprocess: one-shot commands and `sds serve` on a free port.

Use these where the process itself matters (exit codes, stderr, files it creates,
signals, logs). Every wait is bounded; the environment starts without any SDS_*
variable of the machine running the tests, so only what a test passes is seen.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SDS = [sys.executable, "-m", "sds"]
"""The `sds` command of the interpreter running the tests (the venv's, with sds installed)."""
TEST_SECRET = "subprocess-test-secret-0123456789abcdefghij"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(
    extra: Mapping[str, str] | None = None, *, secret: str | None = None
) -> dict[str, str]:
    """The environment of a child `sds`: no inherited SDS_* variables, plus ``extra``.

    ``secret`` sets SDS_JWT_SECRET; pass None to leave it out.
    """
    env = {name: value for name, value in os.environ.items() if not name.startswith("SDS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["NO_COLOR"] = "1"
    if secret is not None:
        env["SDS_JWT_SECRET"] = secret
    env.update(extra or {})
    return env


def run_sds(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    timeout: float = 30.0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one `sds` command to completion; stdout and stderr captured as text."""
    return subprocess.run(
        [*SDS, *args],
        env=dict(env) if env is not None else clean_env(secret=TEST_SECRET),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        check=False,
    )


class ServerProcess:
    """A running `sds serve`: its URLs, its output files, and a bounded stop."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, out: Path, err: Path) -> None:
        self.process = process
        self.port = port
        self.stdout_path = out
        self.stderr_path = err
        self.http_url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def healthz(self, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
        """Status and JSON body of GET /healthz."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/healthz", timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until /healthz answers; RuntimeError (with the server's stderr) otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"sds serve exited with {self.process.returncode}:\n{self.stderr[-3000:]}"
                )
            try:
                self.healthz(timeout=1.0)
                return
            except (OSError, ValueError):
                time.sleep(0.05)
        raise RuntimeError(f"sds serve not ready after {timeout}s:\n{self.stderr[-3000:]}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Exit code of the process; killed (and TimeoutError raised) past ``timeout``."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
            raise TimeoutError(f"sds serve did not exit within {timeout}s") from None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then the exit code (SIGKILL past ``timeout``)."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)


@contextmanager
def spawn_server(
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    port: int | None = None,
    log_dir: Path | None = None,
    wait: bool = True,
    port_option: bool = True,
) -> Iterator[ServerProcess]:
    """`sds serve ARGS --port PORT` in a subprocess, ready when entered, stopped on exit.

    With ``port_option=False`` no --port is passed: the server must find its port
    elsewhere (SDS_PORT in ``env``), and ``port`` says which one to expect.

    stdout and stderr go to files in ``log_dir`` (default: ``cwd`` or the current
    directory) so a chatty server never blocks on a full pipe. Retries once on
    another port if the chosen one was taken meanwhile.
    """
    base = Path(log_dir or cwd or ".")
    base.mkdir(parents=True, exist_ok=True)
    attempts = 1 if port is not None else 2
    for attempt in range(attempts):
        chosen = port if port is not None else free_port()
        out = base / f"sds-serve-{chosen}.out"
        err = base / f"sds-serve-{chosen}.err"
        with out.open("wb") as out_file, err.open("wb") as err_file:
            process = subprocess.Popen(
                [*SDS, "serve", *args, *(["--port", str(chosen)] if port_option else [])],
                env=dict(env) if env is not None else clean_env(secret=TEST_SECRET),
                cwd=cwd,
                stdout=out_file,
                stderr=err_file,
                start_new_session=True,
            )
        server = ServerProcess(process, chosen, out, err)
        try:
            if wait:
                server.wait_ready()
        except RuntimeError:
            _kill(server)
            if attempt + 1 < attempts and "address already in use" in server.stderr:
                continue
            raise
        try:
            yield server
        finally:
            _kill(server)
        return


def _kill(server: ServerProcess) -> None:
    """Stop the server if it still runs: SIGTERM, then SIGKILL after a bounded wait."""
    if server.process.poll() is not None:
        return
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=5)


async def upgrade_request(
    url: str, *, headers: Mapping[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, Any, Mapping[str, str]]:
    """Send a WebSocket upgrade request by hand: (status, JSON body or None, headers).

    For refusals, where aiohttp's ws_connect hides the body. An accepted request
    answers 101 and is closed at once.
    """
    import aiohttp

    request_headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        **(headers or {}),
    }
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with (
        aiohttp.ClientSession(timeout=client_timeout) as session,
        session.get(url, headers=request_headers) as response,
    ):
        if response.status == 101:
            return 101, None, response.headers
        try:
            body = await response.json(content_type=None)
        except ValueError:
            body = None
        return response.status, body, response.headers
