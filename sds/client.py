"""A small asyncio client of the /ws protocol (tests, ``sds watch``, scripts).

async with StoreClient("ws://127.0.0.1:3000", "demo", token) as client:
    await client.send(b"\\x01patch")
    frame = await client.receive(timeout=5)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import TracebackType
from urllib.parse import quote

import aiohttp


class ClientClosed(Exception):
    """The server closed the connection; ``code`` is its close code."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"connection closed (code {code})")
        self.code = code


def store_url(base_url: str, store_id: str, token: str | None = None, *, path: str = "ws") -> str:
    """The URL of a store's endpoint, e.g. ws://host:3000/ws/<id>?token=..."""
    url = f"{base_url.rstrip('/')}/{path}/{quote(store_id, safe='')}"
    return f"{url}?token={quote(token, safe='')}" if token else url


class StoreClient:
    """One connection to a store (or, with ``path="signal"``, a signalling room)."""

    def __init__(
        self,
        base_url: str,
        store_id: str,
        token: str,
        *,
        bearer: bool = False,
        path: str = "ws",
        headers: dict[str, str] | None = None,
        max_frame_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.url = store_url(base_url, store_id, None if bearer else token, path=path)
        self.headers = dict(headers or {})
        if bearer:
            self.headers["Authorization"] = f"Bearer {token}"
        self.max_frame_bytes = max_frame_bytes
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._close_code: int | None = None
        self.refusal: str | None = None
        """The ``error`` of the server's JSON body when it refused the handshake."""

    async def __aenter__(self) -> StoreClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the connection; aiohttp.WSServerHandshakeError carries a refusal's status,
        and ``refusal`` the reason the server gave."""
        tracing = aiohttp.TraceConfig()
        tracing.on_request_end.append(self._read_refusal)
        self._session = aiohttp.ClientSession(trace_configs=[tracing])
        try:
            self._ws = await self._session.ws_connect(
                self.url,
                headers=self.headers,
                max_msg_size=self.max_frame_bytes,
                autoclose=False,
                compress=0,
            )
        except BaseException:
            await self._session.close()
            raise

    async def _read_refusal(
        self, _session: object, _context: object, params: aiohttp.TraceRequestEndParams
    ) -> None:
        # aiohttp raises on a non-101 answer without reading its body: read it here.
        response = params.response
        if response.status == 101:
            return
        try:
            body = json.loads(await response.read())
            self.refusal = str(body["error"])
        except (aiohttp.ClientError, ValueError, KeyError, TypeError):
            self.refusal = None

    @property
    def ws(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws is None:
            raise RuntimeError("not connected")
        return self._ws

    @property
    def close_code(self) -> int | None:
        """The server's close code once it closed (aiohttp reports 1006 after a timed-out wait)."""
        return self._close_code

    async def send(self, frame: bytes) -> None:
        """Send one binary frame."""
        await self.ws.send_bytes(frame)

    async def send_text(self, text: str) -> None:
        await self.ws.send_str(text)

    async def receive_message(self, timeout: float | None = None) -> aiohttp.WSMessage:
        """The next data message (binary or text); ClientClosed when the server closed.

        ``timeout`` bounds the whole wait: aiohttp's own per-receive timeout starts
        again at every ping, so it would never expire under a busy heartbeat.
        """
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.ws.receive()
                if msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                    return msg
                if msg.type is aiohttp.WSMsgType.CLOSE:
                    self._close_code = msg.data
                    await self.ws.close()
                    raise ClientClosed(msg.data)
                if msg.type in (
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.ERROR,
                ):
                    self._close_code = self._close_code or self.ws.close_code
                    raise ClientClosed(self._close_code)

    async def receive(self, timeout: float | None = 5.0) -> bytes:
        """The next binary frame (text frames are skipped)."""
        while True:
            msg = await self.receive_message(timeout)
            if msg.type is aiohttp.WSMsgType.BINARY:
                return bytes(msg.data)

    async def frames(self) -> AsyncIterator[bytes]:
        """Every binary frame until the connection closes."""
        try:
            while True:
                yield await self.receive(timeout=None)
        except ClientClosed:
            return

    async def receive_all(self, window: float = 0.3) -> list[bytes]:
        """Every binary frame that arrives until ``window`` seconds pass without one."""
        frames: list[bytes] = []
        while True:
            try:
                frames.append(await self.receive(timeout=window))
            except (TimeoutError, ClientClosed):
                return frames

    async def wait_closed(self, timeout: float = 5.0) -> int | None:
        """Read until the server closes; its close code."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.receive_message()
        except ClientClosed as closed:
            return closed.code
        except TimeoutError:
            return None

    async def close(self) -> None:
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
