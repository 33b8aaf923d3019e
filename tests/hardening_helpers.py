"""Helpers for the hardening tests: ``sds serve`` as a subprocess, its health, its memory."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sds.tokens import mint_token
from tests.conftest import SECRET

STARTUP_SECONDS = 20.0


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
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


def read_rows(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a query on a store file opened read-only."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


class ServerProcess:
    """``python -m sds serve`` on a free loopback port; stderr goes to a file we can read."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.http_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.stderr_path = tmp_path / f"server-{self.port}.stderr"
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {**os.environ, "SDS_JWT_SECRET": SECRET, **(env or {})}
        for name in ("SDS_PERSIST_DIR", "SDS_PERSISTENCE_DIR", "SDS_JWT_SECRET_FILE"):
            if name not in (env or {}):
                self.env.pop(name, None)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> ServerProcess:
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sds", "serve", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=self.env,
            )
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.stderr()}")
            with contextlib.suppress(OSError):
                if http_get(self.http_url + "/healthz", timeout=0.5)[0] == 200:
                    return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("server did not become healthy in time")

    def token(self, store_id: str, scope: str = "write", sub: str = "tester", **kw: Any) -> str:
        return mint_token(SECRET, store_id=store_id, scope=scope, sub=sub, **kw)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` and wait for the exit code (killed after ``timeout``)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@contextlib.contextmanager
def server_process(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """A running server subprocess, killed at the end if the test did not stop it."""
    proc = ServerProcess(tmp_path, *args, env=env).start()
    try:
        yield proc
    finally:
        proc.kill()
