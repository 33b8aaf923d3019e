"""Shared test helpers, chiefly the real `sds` command in a subprocess.

`run_sds` runs one-shot commands; `spawn_server` runs `sds serve` on a free port.
Use these where the process itself matters (exit codes, stderr, files it creates,
signals, logs, memory). Every wait is bounded; the environment starts without any
SDS_* variable of the machine running the tests, so only what a test passes is seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from sds.client import StoreClient
from sds.tokens import mint_token

SDS = [sys.executable, "-m", "sds"]
"""The `sds` command of the interpreter running the tests (the venv's, with sds installed)."""
TEST_SECRET = "subprocess-test-secret-0123456789abcdefghij"
BIN_DIR = str(Path(sys.executable).parent)
SUBPROCESS_TIMEOUT = 60.0
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body of a GET (error statuses included)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def clean_env(
    extra: Mapping[str, str] | None = None, *, secret: str | None = None, **values: str
) -> dict[str, str]:
    """The environment of a child `sds`: no inherited SDS_* variables, plus ``extra`` and ``values``.

    ``secret`` sets SDS_JWT_SECRET; pass None to leave it out. The venv's bin
    directory comes first on PATH, so scripts that call `sds` find this one.
    """
    env = {name: value for name, value in os.environ.items() if not name.startswith("SDS_")}
    env["PATH"] = BIN_DIR + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["NO_COLOR"] = "1"
    if secret is not None:
        env["SDS_JWT_SECRET"] = secret
    env.update(extra or {})
    env.update(values)
    return env


def run_sds(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    timeout: float = SUBPROCESS_TIMEOUT,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one `sds` command to completion; stdout and stderr captured as text.

    The default environment is `clean_env` with TEST_SECRET.
    """
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


async def run_sds_async(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`run_sds` without blocking the event loop (an in-process test server keeps serving)."""
    process = await asyncio.create_subprocess_exec(
        *SDS,
        *args,
        env=dict(env) if env is not None else clean_env(secret=TEST_SECRET),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), SUBPROCESS_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return subprocess.CompletedProcess(
        [*SDS, *args], process.returncode, out.decode(), err.decode()
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The stderr of a failed command, checked to be exactly one `sds: ...` line."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {lines!r}"
    assert lines[0].startswith("sds: ")
    assert "Traceback" not in result.stderr
    return lines[0]


class ServerProcess:
    """One `sds serve` command in a subprocess: start, wait for /healthz, stop, restart.

    stdout and stderr are appended to files (a chatty server never blocks on a full
    pipe, and a restart keeps the earlier lines). ``preexec`` runs in the child
    before exec, e.g. to set resource limits.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        port: int,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        log_dir: Path | None = None,
        port_option: bool = True,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.port = port
        self.http_url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"
        self.command = [*SDS, "serve", *args, *(["--port", str(port)] if port_option else [])]
        self.env = dict(env) if env is not None else clean_env(secret=TEST_SECRET)
        self.cwd = cwd
        self.preexec = preexec
        base = Path(log_dir or cwd or ".")
        base.mkdir(parents=True, exist_ok=True)
        self.stdout_path = base / f"sds-serve-{port}.out"
        self.stderr_path = base / f"sds-serve-{port}.err"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        """Launch the process (without waiting for it to be ready)."""
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=self.preexec,
            )
        return self

    def restart(self) -> ServerProcess:
        """Stop the process if it still runs, then start the same command (same port and dirs)."""
        self.kill()
        return self.start()

    @property
    def _running(self) -> subprocess.Popen[bytes]:
        assert self.process is not None, "the server was never started"
        return self.process

    @property
    def pid(self) -> int:
        return self._running.pid

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def token(self, store_id: str, scope: str = "write", sub: str = "tester", **kw: Any) -> str:
        """A token signed with the server's secret (SDS_JWT_SECRET of its environment)."""
        return mint_token(self.env["SDS_JWT_SECRET"], store_id=store_id, scope=scope, sub=sub, **kw)

    def healthz(self, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
        """Status and JSON body of GET /healthz."""
        status, body = http_get(f"{self.http_url}/healthz", timeout=timeout)
        return status, json.loads(body or b"{}")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until /healthz answers; RuntimeError (with the server's stderr) otherwise."""
        process = self._running
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"sds serve exited with {process.returncode}:\n{self.stderr[-3000:]}"
                )
            try:
                self.healthz(timeout=1.0)
                return
            except (OSError, ValueError):
                time.sleep(0.05)
        raise RuntimeError(f"sds serve not ready after {timeout}s:\n{self.stderr[-3000:]}")

    async def wait_ready_async(self, timeout: float = START_TIMEOUT) -> None:
        """`wait_ready` off the event loop, for tests whose clients must keep running."""
        await asyncio.to_thread(self.wait_ready, timeout)

    def send_signal(self, signum: int) -> None:
        if self._running.poll() is None:
            self._running.send_signal(signum)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Exit code of the process; killed (and TimeoutError raised) past ``timeout``."""
        try:
            return self._running.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._running.kill()
            self._running.wait(timeout=5)
            raise TimeoutError(f"sds serve did not exit within {timeout}s") from None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``signum`` (SIGTERM), then the exit code (SIGKILL and TimeoutError past ``timeout``)."""
        self.send_signal(signum)
        return self.wait(timeout)

    def kill(self) -> None:
        """Stop the process if it still runs: SIGTERM, then SIGKILL after a bounded wait."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


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
    preexec: Callable[[], None] | None = None,
) -> Iterator[ServerProcess]:
    """`sds serve ARGS --port PORT` in a subprocess, ready when entered, stopped on exit.

    ``env`` is the whole environment (default: `clean_env` with TEST_SECRET). With
    ``port_option=False`` no --port is passed: the server must find its port
    elsewhere (SDS_PORT in ``env``), and ``port`` says which one to expect.

    stdout and stderr go to files in ``log_dir`` (default: ``cwd`` or the current
    directory). Retries once on another port if the chosen one was taken meanwhile.
    With ``wait=False`` the caller waits (`wait_ready_async`) and no retry is made.
    """
    attempts = 1 if port is not None or not wait else 2
    for attempt in range(attempts):
        server = ServerProcess(
            args,
            port=port if port is not None else free_port(),
            env=env,
            cwd=cwd,
            log_dir=log_dir,
            port_option=port_option,
            preexec=preexec,
        ).start()
        try:
            if wait:
                server.wait_ready()
        except RuntimeError:
            server.kill()
            if attempt + 1 < attempts and "address already in use" in server.stderr.lower():
                continue
            raise
        try:
            yield server
        finally:
            server.kill()
        return


@asynccontextmanager
async def streaming_writer(
    writer: StoreClient,
    frame: Callable[[int], bytes],
    *,
    started: int = 100,
    at_least: int = 0,
    timeout: float = 30.0,
) -> AsyncIterator[list[bytes]]:
    """``writer`` sends ``frame(0)``, ``frame(1)``, ... every 2 ms in a task; yields the frames sent.

    Entered once ``started`` frames are sent; on exit the stream stops (after
    ``at_least`` frames in all) and the task is awaited, each wait bounded by ``timeout``.
    """
    sent: list[bytes] = []
    stop = asyncio.Event()

    async def stream() -> None:
        i = 0
        while not stop.is_set() or i < at_least:
            data = frame(i)
            await writer.send(data)
            sent.append(data)
            i += 1
            await asyncio.sleep(0.002)

    task = asyncio.create_task(stream())
    try:
        async with asyncio.timeout(timeout):
            while len(sent) < started:
                if task.done():
                    task.result()  # the stream failed: its error, here
                await asyncio.sleep(0.01)
        yield sent
        stop.set()
        await asyncio.wait_for(task, timeout)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


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


@contextmanager
def small_filesystem(path: Path, size: str = "256k") -> Iterator[Path]:
    """A real tmpfs of ``size``: writes past it fail with ENOSPC (needs root, as CI has).

    Skipped where mounting is not permitted, except in CI (CI=true), where it fails.
    """
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        message = f"cannot mount a small tmpfs here: {result.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
