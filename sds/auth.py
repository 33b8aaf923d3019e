"""Who may connect: the token of a request, the store it names, its Origin.

Every refusal is an HTTP error with a JSON body, raised before any upgrade, and
cheap: refused SDS clients retry every 2 s forever. Failures are logged as one
summary line per interval, never one line per attempt, and never with the token.

With ``--auth-refusal close`` a refused token on /ws or /signal is answered the
way the Node server did, for the SDS sidecar, which reads only close codes: the
request is upgraded and closed at once with 4001 (token problem) or 4003 (a
valid token for another store), the reason text as in the HTTP body, and no
frame is ever handled. Refusals that are not about the token stay HTTP.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from sds.config import Config
from sds.logs import LogSummary
from sds.metrics import Metrics
from sds.tokens import Claims, TokenError, verify_token

if TYPE_CHECKING:
    from sds.appkeys import ServerState

log = logging.getLogger(__name__)

AUTH_LOG_INTERVAL = 60.0
CLOSE_CODES = {401: 4001, 403: 4003}
"""Close code of a refused token with --auth-refusal close, by its HTTP status."""
REFUSAL_CLOSE_TIMEOUT = 2.0
"""Seconds a refused socket waits for the client's close frame before it is cut."""


class _PayloadTooLarge(web.HTTPClientError):
    """413 without aiohttp's required sizes (web.HTTPRequestEntityTooLarge wants them)."""

    status_code = 413


_ERRORS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest,
    401: web.HTTPUnauthorized,
    403: web.HTTPForbidden,
    404: web.HTTPNotFound,
    413: _PayloadTooLarge,
    503: web.HTTPServiceUnavailable,
}


def http_error(status: int, message: str) -> web.HTTPException:
    """An HTTP error whose body is ``{"error": message}``, ready to raise."""
    error_class = _ERRORS.get(status, web.HTTPBadRequest)
    return error_class(text=json.dumps({"error": message}), content_type="application/json")


def request_token(request: web.Request, *, allow_query: bool = True) -> str:
    """The token of a request: ``Authorization: Bearer`` first, else the ``token`` query parameter."""
    header = request.headers.get(hdrs.AUTHORIZATION, "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.query.get("token", "") if allow_query else ""


def store_id_of(request: web.Request, max_length: int) -> str:
    """The percent-decoded store id of the path; 400 unless 1 to ``max_length`` characters."""
    store_id = request.match_info.get("store_id", "")
    if not 1 <= len(store_id) <= max_length:
        raise http_error(400, f"store id must be 1 to {max_length} characters")
    return store_id


def check_origin(request: web.Request, config: Config) -> None:
    """Refuse (403) browser requests from an Origin not in --allowed-origin."""
    origin = request.headers.get(hdrs.ORIGIN)
    if config.allowed_origins and origin is not None and origin not in config.allowed_origins:
        raise http_error(403, "origin not allowed")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
CLIENT_ADDRESS = web.RequestKey("client_address", str)
"""Where ``client_address_middleware`` leaves the client address on the request (access log)."""


def trusted_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """The networks of ``--trusted-proxy`` (validated by the config already)."""
    return tuple(ipaddress.ip_network(value, strict=False) for value in values)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address of a forwarded hop: ``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80`` or ``::1``."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _forwarded_hops(request: web.BaseRequest) -> list[str]:
    """The client and proxies named by ``Forwarded`` (if present) or ``X-Forwarded-For``."""
    if hdrs.FORWARDED in request.headers:
        return [element.get("for", "") for element in request.forwarded]
    return [
        hop
        for header in request.headers.getall(hdrs.X_FORWARDED_FOR, [])
        for hop in header.split(",")
    ]


def client_address(request: web.BaseRequest, trusted: tuple[Network, ...]) -> str | None:
    """The address of the client: the peer, or what trusted proxies say the client was.

    Headers are believed only from a peer in ``trusted``. The hops are read from the
    nearest (last) one back; the first that is not a trusted proxy is the client. A
    hop that is not an IP address ends the walk at the last address known.
    """
    peer = request.remote
    address = _address(peer) if peer else None
    if address is None or not any(address in network for network in trusted):
        return peer
    client = peer
    for hop in reversed(_forwarded_hops(request)):
        hop_address = _address(hop)
        if hop_address is None:
            break
        client = str(hop_address)
        if not any(hop_address in network for network in trusted):
            break
    return client


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def client_address_middleware(trusted: tuple[Network, ...]) -> Middleware:
    """Handlers (and the access log) see the client's address, not the proxy's."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        address = client_address(request, trusted)
        if address is not None:
            request[CLIENT_ADDRESS] = address
            if address != request.remote:
                request = request.clone(remote=address)
        return await handler(request)

    return middleware


class AuthFailures:
    """Counts refused tokens by reason and logs a summary at most once per interval."""

    def __init__(self, metrics: Metrics, interval: float = AUTH_LOG_INTERVAL) -> None:
        self.metrics = metrics
        self.summary = LogSummary(log, "refused tokens", interval)

    def record(self, reason: str) -> None:
        self.metrics.auth_failures[reason] += 1
        self.summary.count(reason)

    def flush_if_due(self) -> None:
        """Log the summary when an interval has passed since the last one (and there is one)."""
        self.summary.flush_if_due()

    def flush(self) -> None:
        """Log what was refused since the last summary line."""
        self.summary.flush()


def authenticate(
    request: web.Request,
    config: Config,
    failures: AuthFailures,
    store_id: str | None,
    *,
    allow_query: bool = True,
) -> Claims:
    """The claims of the request's token for ``store_id``; 401/403 with a JSON body otherwise."""
    try:
        return _verify(request, config, failures, store_id, allow_query=allow_query)
    except TokenError as exc:
        raise http_error(exc.status, exc.message) from None


def _verify(
    request: web.Request,
    config: Config,
    failures: AuthFailures,
    store_id: str | None,
    *,
    allow_query: bool = True,
) -> Claims:
    """The claims of the request's token; a refusal is counted, then raised as TokenError."""
    try:
        return verify_token(
            request_token(request, allow_query=allow_query),
            config.jwt_secret,
            store_id=store_id,
            issuer=config.issuer,
        )
    except TokenError as exc:
        failures.record(exc.reason)
        raise


class CloseRefusal(Exception):
    """A refused token to answer with an upgrade and an immediate close (--auth-refusal close)."""

    def __init__(self, error: TokenError) -> None:
        super().__init__(error.message)
        self.status = error.status
        self.code = CLOSE_CODES.get(error.status, 4001)
        self.message = error.message


async def refuse_with_close(request: web.Request, refusal: CloseRefusal) -> web.WebSocketResponse:
    """Upgrade, send the close frame at once, never handle a frame of the client.

    A request that is not a WebSocket upgrade gets the HTTP refusal instead.
    """
    ws = web.WebSocketResponse(
        timeout=REFUSAL_CLOSE_TIMEOUT,
        autoping=False,
        heartbeat=None,
        compress=False,
        max_msg_size=1024,
    )
    if not ws.can_prepare(request).ok:
        raise http_error(refusal.status, refusal.message)
    await ws.prepare(request)
    await ws.close(code=refusal.code, message=refusal.message.encode())
    return ws


def admit(request: web.Request, config: Config, state: ServerState) -> tuple[str, Claims]:
    """The store id and token claims of a /ws or /signal request, checked before any upgrade.

    Raises an HTTP error, or CloseRefusal for a refused token with --auth-refusal close.
    """
    store_id = store_id_of(request, config.max_store_id_length)
    check_origin(request, config)
    try:
        claims = _verify(request, config, state.auth_failures, store_id)
    except TokenError as exc:
        if config.auth_refusal == "close":
            raise CloseRefusal(exc) from None
        raise http_error(exc.status, exc.message) from None
    if state.shutting_down:
        raise http_error(503, "server is shutting down")
    return store_id, claims
