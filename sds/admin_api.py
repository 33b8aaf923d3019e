"""``POST /api/stores/{store_id}/compact``: compaction of a store file the server holds.

Only the holder of a file's one-writer lock may write it (SQLite 3.40.1 can corrupt
a WAL database when two connections write and checkpoint at once), so `sds store
compact` comes here when the server has the file. The server opens the file through
its own Storage (taking the lock if nobody uses the store yet), pauses its commits
and reads, and runs the compaction in a thread on a connection of its own while the
server's connection stays idle. Authorized by an admin token of that store.

Compactions run on the server's maintenance threads (``MAINTENANCE_THREADS`` of them;
more wait their turn), never on the threads that open stores.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any

from aiohttp import web

from sds.appkeys import CONFIG, MAINTENANCE, STATE, STORAGE
from sds.auth import authenticate, http_error, store_id_of
from sds.backends.base import StorageError, StoreBusy
from sds.config import VALUE_MODES
from sds.maintenance import MaintenanceError, compact_file
from sds.storage import Storage
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
    if not isinstance(storage, Storage):
        raise http_error(404, "compaction through the server needs a persist dir (SQLite)")
    path = storage.path_of(store_id)
    if not path.is_file():
        raise http_error(404, f"no store file for {store_id!r}")
    try:
        store_log = await storage.acquire(store_id)
    except StoreBusy as exc:
        raise http_error(503, str(exc)) from None
    except StorageError as exc:
        raise http_error(503, str(exc)) from None
    try:
        async with store_log.file.paused() as file_path:
            result = await asyncio.get_running_loop().run_in_executor(
                request.app[MAINTENANCE],
                functools.partial(
                    compact_file, file_path, store_id=store_id, value_mode=value_mode
                ),
            )
    except MaintenanceError as exc:
        message = str(exc)
        if message.startswith("unknown store"):
            raise http_error(404, message) from None
        log.error("compaction of %s failed: %s", store_id, message)
        raise web.HTTPInternalServerError(
            text=json.dumps({"error": message}), content_type="application/json"
        ) from None
    finally:
        storage.release(store_log)
    log.info(
        "compacted %s: %d duplicate and %d superseded patches removed",
        store_id,
        result.duplicates_removed,
        result.superseded_removed,
    )
    result.via = "server"
    # Who did it: `sds store compact` checks that the server it asked is the one that
    # holds the store in the persist dir it was pointed at (see sds.storage.LockRecord).
    answer = {
        **result.as_json(),
        "server": {"persist_dir": storage.holder.persist_dir, "instance": storage.holder.instance},
    }
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
