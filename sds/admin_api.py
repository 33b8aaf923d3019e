"""``POST /api/stores/{store_id}/compact``: compaction of a store the server holds.

Only the holder of a file's one-writer lock may write it (SQLite 3.40.1 can corrupt
a WAL database when two connections write and checkpoint at once), so `sds store
compact` comes here when the server has the file. The backend does the work
(``Storage.compact``): on SQLite the server opens the file through its own Storage
(taking the lock if nobody uses the store yet), pauses its commits and reads, and
runs the compaction in a thread on a connection of its own while the server's
connection stays idle. Authorized by an admin token of that store.

Compactions run on the server's maintenance threads (``MAINTENANCE_THREADS`` of them;
more wait their turn), never on the threads that open stores.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from sds.appkeys import CONFIG, MAINTENANCE, STATE, STORAGE
from sds.auth import authenticate, http_error, store_id_of
from sds.backends.base import CompactionFailed, StorageError, UnknownStore
from sds.config import VALUE_MODES
from sds.token_api import read_json

log = logging.getLogger(__name__)

MAINTENANCE_THREADS = 2
"""Compactions that run at once; more wait their turn (each takes one thread)."""


async def compact_handler(request: web.Request) -> web.Response:
    """Compact one store (admin token whose aud is that store); the report as JSON."""
    config = request.app[CONFIG]
    store_id = store_id_of(request, config.max_store_id_length)
    claims = authenticate(
        request, config, request.app[STATE].auth_failures, store_id, allow_query=False
    )
    if claims.scope != "admin":
        raise http_error(403, "an admin token is required")
    value_mode = await _value_mode(request, config.value_mode)
    storage = request.app.get(STORAGE)
    if storage is None:
        raise http_error(404, "this server has no persist dir")
    try:
        answer = await storage.compact(
            store_id, value_mode=value_mode, executor=request.app[MAINTENANCE]
        )
    except UnknownStore as exc:
        raise http_error(404, str(exc)) from None
    except CompactionFailed as exc:
        log.error("compaction of %s failed: %s", store_id, exc)
        raise web.HTTPInternalServerError(
            text=json.dumps({"error": str(exc)}), content_type="application/json"
        ) from None
    except StorageError as exc:
        raise http_error(503, str(exc)) from None
    log.info(
        "compacted %s: %d duplicate and %d superseded patches removed",
        store_id,
        answer["duplicates_removed"],
        answer["superseded_removed"],
    )
    return web.json_response(answer, headers={"Cache-Control": "no-store"})


async def _value_mode(request: web.Request, default: str) -> str:
    """The value mode of an optional JSON body ``{"value_mode": "blob"|"snapshot"}``."""
    body: Any = await read_json(request, request.app[CONFIG].max_request_bytes)
    if body is None:
        return default
    if not isinstance(body, dict):
        raise http_error(400, "body must be a JSON object")
    mode = body.get("value_mode", default)
    if mode not in VALUE_MODES:
        raise http_error(400, f"`value_mode` must be one of {', '.join(VALUE_MODES)}")
    return str(mode)
