"""``POST /api/token``: an admin of a store issues short-lived tokens for that store."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from aiohttp import web

from sds.appkeys import CONFIG, STATE
from sds.auth import authenticate, http_error
from sds.protocol import SCOPES
from sds.tokens import mint_token, parse_duration

DEFAULT_EXPIRY = "24h"


async def token_handler(request: web.Request) -> web.Response:
    """Mint a token for the admin token's store (``aud`` never comes from the body)."""
    config = request.app[CONFIG]
    state = request.app[STATE]
    claims = authenticate(request, config, state.auth_failures, None, allow_query=False)
    if claims.scope != "admin":
        raise http_error(403, "an admin token is required")
    body = await read_json(request, config.max_request_bytes)
    sub, scope, expires_in = _token_request(body)
    now = int(time.time())
    if claims.exp is not None and not config.mint_beyond_admin_expiry:
        # A minted token never outlives the admin token that asked for it.
        expires_in = min(expires_in, max(1, math.floor(claims.exp) - now))
    token = mint_token(
        config.jwt_secret,
        store_id=claims.aud,
        scope=scope,
        sub=sub,
        expires_in=expires_in,
        issuer=config.issuer,
        now=now,
    )
    exp = now + max(1, math.ceil(expires_in))
    return web.json_response({"token": token, "exp": exp}, headers={"Cache-Control": "no-store"})


async def read_json(request: web.Request, limit: int) -> Any:
    """The whole JSON body of a request (empty: None); 413 past ``limit`` bytes, 400 if not JSON.

    The body is read to its end however it arrives (several TCP segments, chunked);
    aiohttp stops reading past the app's ``client_max_size`` (the same limit).
    """
    if request.content_length is not None and request.content_length > limit:
        raise http_error(413, f"request body larger than {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise http_error(413, f"request body larger than {limit} bytes") from None
    except ValueError:
        raise http_error(400, "unreadable request body") from None
    if len(raw) > limit:
        raise http_error(413, f"request body larger than {limit} bytes")
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise http_error(400, "body must be a JSON object") from None
    except RecursionError:
        raise http_error(400, "body is nested too deeply") from None


def _token_request(body: Any) -> tuple[str, str, float]:
    """Validate ``{"sub", "scope", "exp"?}``; 400 with the reason otherwise."""
    if not isinstance(body, dict):
        raise http_error(400, "body must be a JSON object")
    sub = body.get("sub")
    if not isinstance(sub, str) or not sub.strip():
        raise http_error(400, "`sub` must be a non-empty string")
    scope = body.get("scope")
    if scope not in SCOPES:
        raise http_error(400, "`scope` must be read, write or admin")
    try:
        expires_in = parse_duration(body.get("exp", DEFAULT_EXPIRY))
    except ValueError as exc:
        raise http_error(400, f"`exp`: {exc}") from None
    return sub, str(scope), expires_in
