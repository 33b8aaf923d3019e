"""Helpers for the hardening tests: ``sds serve`` as a subprocess, its health, its memory."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
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
        self.preexec: Callable[[], None] | None = None
        """Run in the child before exec (e.g. to set resource limits)."""

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
                preexec_fn=self.preexec,
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


class RawWebSocket:
    """A WebSocket client on a plain blocking socket: it reads only when told to.

    A small SO_RCVBUF, set before connecting, keeps the kernel from absorbing much
    for it, so a server writing to it sees its own buffer grow at once.
    """

    def __init__(self, sock: socket.socket, leftover: bytes) -> None:
        self.sock = sock
        self._buffer = leftover

    @classmethod
    def connect(
        cls, port: int, path: str, *, rcvbuf: int | None = 4096, timeout: float = 5.0
    ) -> RawWebSocket:
        """Open a WebSocket to ``path`` (with its query string); raises unless the server says 101."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        sock.sendall(request.encode())
        response = b""
        while b"\r\n\r\n" not in response and len(response) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            response += chunk
        head, _, rest = response.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            sock.close()
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        return cls(sock, rest)

    def send_binary(self, payload: bytes) -> None:
        """Send one masked binary frame (clients must mask)."""
        self._send(0x82, payload)

    def send_close(self, code: int = 1000) -> None:
        """Answer (or start) the closing handshake."""
        with contextlib.suppress(OSError):
            self._send(0x88, struct.pack("!H", code))

    def _send(self, first: int, payload: bytes) -> None:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", first, 0x80 | length)
        elif length < 65536:
            header = struct.pack("!BBH", first, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", first, 0x80 | 127, length)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def read_until_close(self, timeout: float = 10.0, max_bytes: int = 512 * 1024 * 1024) -> Any:
        """Read frames until a close frame (its code) or EOF (None); binary payloads are skipped.

        Returns ``(close_code_or_None, binary_frames_seen)``.
        """
        deadline = time.monotonic() + timeout
        frames = 0
        total = 0
        while time.monotonic() < deadline and total < max_bytes:
            parsed = self._next_frame()
            if parsed is not None:
                opcode, payload = parsed
                if opcode == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                    return code, frames
                if opcode == 0x2:
                    frames += 1
                continue
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(1 << 20)
            except (TimeoutError, ConnectionError):
                return None, frames
            if not chunk:
                return None, frames
            total += len(chunk)
            self._buffer += chunk
        return None, frames

    def _next_frame(self) -> tuple[int, bytes] | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        opcode = buf[0] & 0x0F
        length = buf[1] & 0x7F
        offset = 2
        if length == 126:
            if len(buf) < 4:
                return None
            length = struct.unpack_from("!H", buf, 2)[0]
            offset = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length = struct.unpack_from("!Q", buf, 2)[0]
            offset = 10
        if len(buf) < offset + length:
            return None
        payload = buf[offset : offset + length]
        self._buffer = buf[offset + length :]
        return opcode, payload

    def close(self) -> None:
        self.sock.close()
