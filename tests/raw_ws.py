"""A WebSocket client by hand on a blocking socket: a peer that reads only when told to."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import struct
import time
from typing import Any


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

    def read_binary(self, count: int, timeout: float = 20.0) -> list[bytes]:
        """Read until ``count`` binary payloads arrived (fewer on close, EOF or timeout)."""
        deadline = time.monotonic() + timeout
        payloads: list[bytes] = []
        while len(payloads) < count and time.monotonic() < deadline:
            parsed = self._next_frame()
            if parsed is not None:
                opcode, payload = parsed
                if opcode == 0x8:
                    break
                if opcode == 0x2:
                    payloads.append(payload)
                continue
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(1 << 20)
            except (TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            self._buffer += chunk
        return payloads

    def close(self) -> None:
        self.sock.close()
